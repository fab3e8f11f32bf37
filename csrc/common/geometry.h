// Device-agnostic geometry shared by the CPU and CUDA kernels.
//
// Everything here is a small inline function usable from host code and from
// CUDA device code (FCN_HD), so the CPU tests also exercise the arithmetic the
// GPU kernels run. This header must not include any torch header: the .cu
// files include it and are compiled by plain nvcc and by NVRTC (CuPy).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__) || defined(__CUDACC_RTC__)
#define FCN_HD __host__ __device__ __forceinline__
#else
#define FCN_HD inline
#endif

#ifndef __CUDACC_RTC__
#include <cstdint>
#endif

namespace fcnfast {

// Full (uncropped) output length of a transposed convolution along one axis.
FCN_HD int64_t conv_transpose_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t padding,
                                       int64_t output_padding, int64_t dilation) {
  return (in - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1;
}

// Caffe's bilinear upsampling filter (FCN "upscore" initialisation), 1-D factor.
// f = ceil(k/2), c = f-1 (k odd) or f-0.5 (k even), w(i) = 1 - |i - c| / f.
// The 2-D filter is the outer product w(i) * w(j).
template <typename T, typename I>
FCN_HD T caffe_bilinear_1d(I i, I kernel) {
  I f = (kernel + 1) / 2;
  T c = (kernel % 2 == 1) ? T(f - 1) : T(f) - T(0.5);
  T d = T(i) - c;
  if (d < T(0)) d = -d;
  return T(1) - d / T(f);
}

}  // namespace fcnfast
