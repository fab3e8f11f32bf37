// CUDA kernels for skip_add_crop: out = coarse + skip[..., oy:oy+H, ox:ox+W].
// Backward: grad_skip is grad inside the window and 0 elsewhere, written as a
// gather over grad_skip (no zero-fill pass, no atomics).
#include "cuda/kernel_utils.cuh"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

template <typename T>
__global__ void skip_add_crop_kernel(const T* __restrict__ coarse, const T* __restrict__ skip,
                                     T* __restrict__ out, int total, int h, int w, int skip_h,
                                     int skip_w, int oy, int ox) {
  const FastDivs<2>& f = block_fast_divs({w, h});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int xy[2];
    const int plane = split_index(f, 2, idx, xy);
    const int x = xy[0], y = xy[1];
    const T s = skip[(plane * skip_h + y + oy) * skip_w + x + ox];
    out[idx] = from_acc<T>(to_acc(coarse[idx]) + to_acc(s));
  }
}

template <typename T>
__global__ void skip_add_crop_backward_kernel(const T* __restrict__ grad, T* __restrict__ grad_skip,
                                              int total, int h, int w, int skip_h, int skip_w,
                                              int oy, int ox) {
  const FastDivs<2>& f = block_fast_divs({skip_w, skip_h});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int sxy[2];
    const int plane = split_index(f, 2, idx, sxy);
    const int sx = sxy[0], sy = sxy[1];
    const int y = sy - oy, x = sx - ox;
    grad_skip[idx] = (y >= 0 && y < h && x >= 0 && x < w) ? grad[(plane * h + y) * w + x]
                                                          : from_acc<T>(typename AccOf<T>::type(0));
  }
}

#ifndef __CUDACC_RTC__
cudaError_t skip_add_crop(DType dtype, const void* coarse, const void* skip, void* out, int planes,
                          int h, int w, int skip_h, int skip_w, int oy, int ox,
                          cudaStream_t stream) {
  const long long total = static_cast<long long>(planes) * h * w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(skip_add_crop_kernel<T>, grid_for(total), stream, static_cast<const T*>(coarse),
                  static_cast<const T*>(skip), static_cast<T*>(out), static_cast<int>(total), h, w,
                  skip_h, skip_w, oy, ox);
  });
}

cudaError_t skip_add_crop_backward(DType dtype, const void* grad, void* grad_skip, int planes,
                                   int h, int w, int skip_h, int skip_w, int oy, int ox,
                                   cudaStream_t stream) {
  const long long total = static_cast<long long>(planes) * skip_h * skip_w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(skip_add_crop_backward_kernel<T>, grid_for(total), stream,
                  static_cast<const T*>(grad), static_cast<T*>(grad_skip), static_cast<int>(total),
                  h, w, skip_h, skip_w, oy, ox);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
