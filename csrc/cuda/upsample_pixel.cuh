// Per-pixel math of the frozen FCN bilinear upsampling on the GPU, shared by
// bilinear_upsample2d.cu, upsample_argmax.cu and upsample_cross_entropy.cu.
//
// The upsampling is a depthwise transposed convolution with kernel k = 2s,
// stride s, no padding and Caffe's bilinear filter (geometry.h
// caffe_bilinear_1d). Full-output position Y along an axis receives input
// q = Y / s through tap Y % s and input q - 1 through tap Y % s + s (the phase
// rule, geometry.h conv_transpose_tap); an input outside [0, in) contributes
// nothing (a missing term, never 0 * x, so an Inf input cannot turn into NaN).
// Torch-free, NVRTC-compatible, int32 arithmetic.
#pragma once

#include "cuda/kernel_utils.cuh"

namespace fcnfast {
namespace cuda {

// Bilinear weight of tap t of the kernel-2s filter.
template <typename Acc>
__device__ __forceinline__ Acc upsample_tap_weight(int t, int scale) {
  return caffe_bilinear_1d<Acc>(t, 2 * scale);
}

// Horizontal pass of one input row at full-output column X.
template <typename T, typename Acc>
__device__ __forceinline__ Acc upsample_row(const T* row, int in_w, int scale, int X) {
  const int q = X / scale, r = X - q * scale;
  Acc v = Acc(0);
  if (q >= 1) v += upsample_tap_weight<Acc>(r + scale, scale) * to_acc(row[q - 1]);
  if (q < in_w) v += upsample_tap_weight<Acc>(r, scale) * to_acc(row[q]);
  return v;
}

// Value of full-output pixel (Y, X) of one channel plane (in_h x in_w).
template <typename T, typename Acc>
__device__ __forceinline__ Acc upsample_value(const T* plane, int in_h, int in_w, int scale, int Y,
                                              int X) {
  const int q = Y / scale, r = Y - q * scale;
  Acc v = Acc(0);
  if (q >= 1) {
    v += upsample_tap_weight<Acc>(r + scale, scale) *
         upsample_row<T, Acc>(plane + (q - 1) * in_w, in_w, scale, X);
  }
  if (q < in_h) {
    v += upsample_tap_weight<Acc>(r, scale) * upsample_row<T, Acc>(plane + q * in_w, in_w, scale, X);
  }
  return v;
}

// Crop-relative output range [*begin, *end) that input position i feeds along
// one axis (full positions [i*s, i*s + 2s) intersected with the crop).
__device__ __forceinline__ void upsample_band(int i, int scale, int crop_start, int crop_len,
                                              int* begin, int* end) {
  const int b = i * scale - crop_start, e = b + 2 * scale;
  *begin = b < 0 ? 0 : b;
  *end = e > crop_len ? crop_len : e;
}

}  // namespace cuda
}  // namespace fcnfast
