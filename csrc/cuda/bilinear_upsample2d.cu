// CUDA kernels for bilinear_upsample2d, the frozen FCN "upscore" layer:
//   F.conv_transpose2d(x, bilinear_filter(2s) (C,1,2s,2s), stride=s, groups=C)[crop]
// with the Caffe bilinear weights computed analytically. Forward: each kept
// output pixel gathers its (at most) 2x2 input taps. Backward: each input
// pixel gathers the kept gradient pixels of its 2s x 2s footprint (no atomics).
// The per-pixel math is csrc/common/bilinear.h, the CPU kernels' own, in the
// same arithmetic order (explicit fma), so both backends compute the same values.
#include "cuda/kernel_utils.cuh"  // first: NVRTC integer types
#include "common/bilinear.h"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

template <typename T>
__global__ void bilinear_upsample2d_kernel(const T* __restrict__ x, T* __restrict__ out, int total,
                                           int in_h, int in_w, int scale, int top, int left,
                                           int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const FastDivs<3>& f = block_fast_divs({out_w, out_h, scale});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int oxy[2];
    const int plane = split_index(f, 2, idx, oxy);
    out[idx] = from_acc<T>(bilinear_pixel<T, Acc>(x + plane * in_h * in_w, in_h, in_w, f.d[2],
                                                  top + oxy[1], left + oxy[0]));
  }
}

template <typename T>
__global__ void bilinear_upsample2d_backward_kernel(const T* __restrict__ grad,
                                                    T* __restrict__ grad_x, int total, int in_h,
                                                    int in_w, int scale, int top, int left,
                                                    int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const FastDivs<2>& f = block_fast_divs({in_w, in_h});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int jxy[2];
    const int plane = split_index(f, 2, idx, jxy);
    const int jx = jxy[0], iy = jxy[1];
    grad_x[idx] = from_acc<T>(bilinear_grad_pixel<T, Acc>(grad + plane * out_h * out_w, out_h,
                                                          out_w, top, left, scale, iy, jx));
  }
}

#ifndef __CUDACC_RTC__
cudaError_t bilinear_upsample2d(DType dtype, const void* x, void* out, const UpsampleShape& s,
                                cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.channels * s.out_h * s.out_w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(bilinear_upsample2d_kernel<T>, grid_for(total), stream, static_cast<const T*>(x),
                  static_cast<T*>(out), static_cast<int>(total), s.in_h, s.in_w, s.scale, s.top,
                  s.left, s.out_h, s.out_w);
  });
}

cudaError_t bilinear_upsample2d_backward(DType dtype, const void* grad, void* grad_x,
                                         const UpsampleShape& s, cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.channels * s.in_h * s.in_w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(bilinear_upsample2d_backward_kernel<T>, grid_for(total), stream,
                  static_cast<const T*>(grad), static_cast<T*>(grad_x), static_cast<int>(total),
                  s.in_h, s.in_w, s.scale, s.top, s.left, s.out_h, s.out_w);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
