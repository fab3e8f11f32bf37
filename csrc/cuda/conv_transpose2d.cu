// CUDA kernels for conv_transpose2d with a fused output crop:
//   F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)[crop]
// Phase decomposition: kept output pixel (y, x) (full-output coordinates)
// gathers only the taps k with (y + padding - k*dilation) % stride == 0
// (geometry.h conv_transpose_tap); no zero-inserted input, no col2im scatter.
// Backward, all gathers in a fixed order (no atomics):
//   grad_x[n,ci,iy,ix]      = sum_{co in group, ky, kx} grad[n,co,y,x] * w[ci,co',ky,kx],
//                             y = iy*stride - pad + ky*dil (kept window only)
//   grad_weight[ci,co',ky,kx] = sum_{n,iy,ix} x[n,ci,iy,ix] * grad[n,co,y,x]  (one block each)
//   grad_bias[co]           = sum_{n,y,x} grad[n,co,y,x]                       (one block each)
#include "cuda/kernel_utils.cuh"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

// First tap and tap step along one axis for full-output position y: with
// dilation 1 the taps are k = (y + pad) mod stride + j*stride; otherwise every
// k is tried and conv_transpose_tap filters.
__device__ __forceinline__ void tap_start(int y, int stride, int pad, int dil, int* first,
                                          int* step) {
  if (dil == 1) {
    *first = static_cast<int>(pos_mod(y + pad, stride));
    *step = stride;
  } else {
    *first = 0;
    *step = 1;
  }
}

template <typename T>
__global__ void conv_transpose2d_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const T* __restrict__ bias,
    T* __restrict__ out, int total, int in_channels, int in_h, int in_w, int out_channels,
    int groups, int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w,
    int dil_h, int dil_w, int top, int left, int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int cout_g = out_channels / groups, cin_g = in_channels / groups;
  const int in_plane = in_h * in_w, khw = kernel_h * kernel_w;
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    const int ox = idx % out_w, r1 = idx / out_w;
    const int oy = r1 % out_h, r2 = r1 / out_h;
    const int co = r2 % out_channels, n = r2 / out_channels;
    const int y = top + oy, xx = left + ox;
    const int ci0 = (co / cout_g) * cin_g, c_local = co % cout_g;
    const T* xn = x + (n * in_channels + ci0) * in_plane;
    const T* wc = weight + (ci0 * cout_g + c_local) * khw;
    int ky0, ky_step, kx0, kx_step;
    tap_start(y, stride_h, pad_h, dil_h, &ky0, &ky_step);
    tap_start(xx, stride_w, pad_w, dil_w, &kx0, &kx_step);
    Acc acc = Acc(0);
    for (int ky = ky0; ky < kernel_h; ky += ky_step) {
      int64_t iy;
      if (!conv_transpose_tap(y, ky, stride_h, pad_h, dil_h, in_h, &iy)) continue;
      for (int kx = kx0; kx < kernel_w; kx += kx_step) {
        int64_t ix;
        if (!conv_transpose_tap(xx, kx, stride_w, pad_w, dil_w, in_w, &ix)) continue;
        const int xoff = static_cast<int>(iy) * in_w + static_cast<int>(ix);
        const int woff = ky * kernel_w + kx;
        for (int c = 0; c < cin_g; ++c)
          acc += to_acc(xn[c * in_plane + xoff]) * to_acc(wc[c * cout_g * khw + woff]);
      }
    }
    if (bias != nullptr) acc += to_acc(bias[co]);
    out[idx] = from_acc<T>(acc);
  }
}

// One thread per input element (n, ci, iy, ix).
template <typename T>
__global__ void conv_transpose2d_grad_x_kernel(
    const T* __restrict__ grad, const T* __restrict__ weight, T* __restrict__ grad_x, int total,
    int in_channels, int in_h, int in_w, int out_channels, int groups, int kernel_h, int kernel_w,
    int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int top, int left,
    int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int cout_g = out_channels / groups, cin_g = in_channels / groups;
  const int out_plane = out_h * out_w, khw = kernel_h * kernel_w;
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    const int ix = idx % in_w, r1 = idx / in_w;
    const int iy = r1 % in_h, r2 = r1 / in_h;
    const int ci = r2 % in_channels, n = r2 / in_channels;
    const int co0 = (ci / cin_g) * cout_g;
    const T* gn = grad + (n * out_channels + co0) * out_plane;
    const T* wc = weight + ci * cout_g * khw;
    // crop-relative output row/column of tap 0; tap k adds k * dilation
    const int y0 = iy * stride_h - pad_h - top, x0 = ix * stride_w - pad_w - left;
    Acc acc = Acc(0);
    for (int ky = 0; ky < kernel_h; ++ky) {
      const int oy = y0 + ky * dil_h;
      if (oy < 0 || oy >= out_h) continue;
      for (int kx = 0; kx < kernel_w; ++kx) {
        const int ox = x0 + kx * dil_w;
        if (ox < 0 || ox >= out_w) continue;
        const int goff = oy * out_w + ox, woff = ky * kernel_w + kx;
        for (int c = 0; c < cout_g; ++c)
          acc += to_acc(gn[c * out_plane + goff]) * to_acc(wc[c * khw + woff]);
      }
    }
    grad_x[idx] = from_acc<T>(acc);
  }
}

// One block per weight element (ci, c_local, ky, kx), reducing over n, iy, ix.
template <typename T>
__global__ void conv_transpose2d_grad_weight_kernel(
    const T* __restrict__ x, const T* __restrict__ grad, T* __restrict__ grad_weight,
    int n_images, int in_channels, int in_h, int in_w, int out_channels, int groups,
    int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dil_h,
    int dil_w, int top, int left, int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int cout_g = out_channels / groups, cin_g = in_channels / groups;
  const int in_plane = in_h * in_w, out_plane = out_h * out_w;
  const int count = n_images * in_plane;
  FCN_BLOCK_STRIDE(b, in_channels * cout_g * kernel_h * kernel_w) {
    int r = static_cast<int>(b);
    const int kx = r % kernel_w;
    r /= kernel_w;
    const int ky = r % kernel_h;
    r /= kernel_h;
    const int c_local = r % cout_g, ci = r / cout_g;
    const int co = (ci / cin_g) * cout_g + c_local;
    const int dy = ky * dil_h - pad_h - top, dx = kx * dil_w - pad_w - left;
    Acc acc = Acc(0);
    for (int j = threadIdx.x; j < count; j += kBlock) {
      const int n = j / in_plane, p = j - n * in_plane;
      const int iy = p / in_w, ix = p - iy * in_w;
      const int oy = iy * stride_h + dy, ox = ix * stride_w + dx;
      if (oy < 0 || oy >= out_h || ox < 0 || ox >= out_w) continue;
      acc += to_acc(x[(n * in_channels + ci) * in_plane + p]) *
             to_acc(grad[(n * out_channels + co) * out_plane + oy * out_w + ox]);
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) grad_weight[b] = from_acc<T>(acc);
  }
}

#ifndef __CUDACC_RTC__
cudaError_t conv_transpose2d(DType dtype, const void* x, const void* weight, const void* bias,
                             void* out, const ConvTranspose2dShape& s, cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.out_channels * s.out_h * s.out_w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    conv_transpose2d_kernel<T><<<grid_for(total), kBlock, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<const T*>(bias),
        static_cast<T*>(out), static_cast<int>(total), s.in_channels, s.in_h, s.in_w,
        s.out_channels, s.groups, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h,
        s.pad_w, s.dil_h, s.dil_w, s.top, s.left, s.out_h, s.out_w);
    return cudaGetLastError();
  });
}

cudaError_t conv_transpose2d_backward(DType dtype, const void* grad, const void* x,
                                      const void* weight, void* grad_x, void* grad_weight,
                                      void* grad_bias, const ConvTranspose2dShape& s,
                                      cudaStream_t stream) {
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    const long long x_total = static_cast<long long>(s.n) * s.in_channels * s.in_h * s.in_w;
    if (grad_x != nullptr && x_total > 0) {
      conv_transpose2d_grad_x_kernel<T><<<grid_for(x_total), kBlock, 0, stream>>>(
          g, static_cast<const T*>(weight), static_cast<T*>(grad_x), static_cast<int>(x_total),
          s.in_channels, s.in_h, s.in_w, s.out_channels, s.groups, s.kernel_h, s.kernel_w,
          s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w, s.top, s.left, s.out_h,
          s.out_w);
    }
    const long long weights = static_cast<long long>(s.in_channels) * (s.out_channels / s.groups) *
                              s.kernel_h * s.kernel_w;
    if (grad_weight != nullptr && weights > 0) {
      conv_transpose2d_grad_weight_kernel<T><<<blocks_for(weights), kBlock, 0, stream>>>(
          static_cast<const T*>(x), g, static_cast<T*>(grad_weight), s.n, s.in_channels, s.in_h,
          s.in_w, s.out_channels, s.groups, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w,
          s.pad_h, s.pad_w, s.dil_h, s.dil_w, s.top, s.left, s.out_h, s.out_w);
    }
    if (grad_bias != nullptr && s.out_channels > 0) {
      channel_sum_kernel<T><<<blocks_for(s.out_channels), kBlock, 0, stream>>>(
          g, static_cast<T*>(grad_bias), s.n, s.out_channels, s.out_h * s.out_w);
    }
    return cudaGetLastError();
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
