// CUDA kernels for conv_transpose2d with a fused output crop:
//   F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)[crop]
// Phase decomposition: kept output pixel (y, x) (full-output coordinates)
// gathers only the taps k with (y + padding - k*dilation) % stride == 0; no
// zero-inserted input, no col2im scatter. Backward, all gathers in a fixed
// order (no atomics):
//   grad_x[n,ci,iy,ix]        = sum_{co in group, ky, kx} grad[n,co,y,x] * w[ci,co',ky,kx]
//   grad_weight[ci,co',ky,kx] = sum_{n,iy,ix} x[n,ci,iy,ix] * grad[n,co,y,x]  (tiled groups)
//   grad_bias[co]             = sum_{n,y,x} grad[n,co,y,x]                       (one block each)
// with y = iy*stride - pad + ky*dil inside the kept window. The per-pixel math
// (tap ranges, forward and grad_x gathers, the input range of a tap) is
// csrc/common/conv_transpose2d.h, shared with the CPU kernels' direct path.
#include "cuda/kernel_utils.cuh"  // first: NVRTC integer types
#include "common/conv_transpose2d.h"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

// The kernels take the geometry as plain ints (CuPy passes scalars, not structs).
#define FCN_CONV_GEOM_PARAMS                                                                     \
  int in_channels, int in_h, int in_w, int out_channels, int groups, int kernel_h, int kernel_w, \
      int stride_h, int stride_w, int pad_h, int pad_w, int dil_h, int dil_w, int top, int left, \
      int out_h, int out_w

// int geometry: the bindings refuse sizes past INT32_MAX / 2, so the index math
// stays in 32 bits (no 64-bit division subroutine calls per element).
__device__ __forceinline__ ConvTranspose2dGeomT<int> make_geom(FCN_CONV_GEOM_PARAMS) {
  ConvTranspose2dGeomT<int> g;
  g.in_channels = in_channels;
  g.in_h = in_h;
  g.in_w = in_w;
  g.out_channels = out_channels;
  g.groups = groups;
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride_h;
  g.stride_w = stride_w;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.dil_h = dil_h;
  g.dil_w = dil_w;
  g.crop_top = top;
  g.crop_left = left;
  g.crop_h = out_h;
  g.crop_w = out_w;
  return g;
}

#define FCN_CONV_GEOM_ARGS                                                                      \
  in_channels, in_h, in_w, out_channels, groups, kernel_h, kernel_w, stride_h, stride_w, pad_h, \
      pad_w, dil_h, dil_w, top, left, out_h, out_w

// The pixel functions' plan with FastDivs (fast_div.h), built once per block.
__device__ __forceinline__ const ConvTranspose2dPlan<int, FastDiv>& block_conv_plan(
    const ConvTranspose2dGeomT<int>& g) {
  return block_constant<ConvTranspose2dPlan<int, FastDiv>>(
      [&] { return make_conv_plan(g, MakeFastDiv()); });
}

// One thread per kept output element (n, co, oy, ox).
template <typename T>
__global__ void conv_transpose2d_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                                        const T* __restrict__ bias, T* __restrict__ out, int total,
                                        FCN_CONV_GEOM_PARAMS) {
  typedef typename AccOf<T>::type Acc;
  const ConvTranspose2dGeomT<int> g = make_geom(FCN_CONV_GEOM_ARGS);
  const ConvTranspose2dPlan<int, FastDiv>& plan = block_conv_plan(g);
  const FastDivs<3>& f = block_fast_divs({out_w, out_h, out_channels});
  const int in_image = in_channels * in_h * in_w;
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int xyc[3];
    const int n = split_index(f, 3, idx, xyc);
    const int co = xyc[2];
    Acc acc = conv_transpose2d_output_pixel<T, Acc>(g, plan, x + n * in_image, weight, co,
                                                    top + xyc[1], left + xyc[0]);
    if (bias != nullptr) acc += to_acc(bias[co]);
    out[idx] = from_acc<T>(acc);
  }
}

// One thread per input element (n, ci, iy, ix).
template <typename T>
__global__ void conv_transpose2d_grad_x_kernel(const T* __restrict__ grad,
                                               const T* __restrict__ weight, T* __restrict__ grad_x,
                                               int total, FCN_CONV_GEOM_PARAMS) {
  typedef typename AccOf<T>::type Acc;
  const ConvTranspose2dGeomT<int> g = make_geom(FCN_CONV_GEOM_ARGS);
  const ConvTranspose2dPlan<int, FastDiv>& plan = block_conv_plan(g);
  const FastDivs<3>& f = block_fast_divs({in_w, in_h, in_channels});
  const int out_image = out_channels * out_h * out_w;
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int xyc[3];
    const int n = split_index(f, 3, idx, xyc);
    grad_x[idx] = from_acc<T>(conv_transpose2d_grad_input_pixel<T, Acc>(
        g, plan, grad + n * out_image, weight, xyc[2], xyc[1], xyc[0]));
  }
}

// Weight elements (ci, c_local, ky, kx) in tiles: `group` threads (a power of
// two, reduction_group() of the launcher) split one element's (image, input
// position) pairs whose tap lands in the kept window (conv_transpose_input_range),
// kBlock / group elements per block, and a fixed-order group_sum combines them.
// (One block per element left ~1.8 M mostly idle blocks for a learned upscore32.)
template <typename T>
__global__ void conv_transpose2d_grad_weight_kernel(const T* __restrict__ x,
                                                    const T* __restrict__ grad,
                                                    T* __restrict__ grad_weight, int n_images,
                                                    int group, FCN_CONV_GEOM_PARAMS) {
  typedef typename AccOf<T>::type Acc;
  const int cout_g = out_channels / groups;
  const int in_plane = in_h * in_w, out_plane = out_h * out_w;
  const ConvTranspose2dGeomT<int> g = make_geom(FCN_CONV_GEOM_ARGS);
  const ConvTranspose2dPlan<int, FastDiv>& plan = block_conv_plan(g);
  const FastDivs<3>& f = block_fast_divs({kernel_w, kernel_h, cout_g});
  const unsigned weights = static_cast<unsigned>(in_channels * cout_g * kernel_h * kernel_w);
  const unsigned per_block = kBlock / group;
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  FCN_BLOCK_STRIDE(tile, (weights - 1) / per_block + 1) {
    const unsigned e = tile * per_block + threadIdx.x / group;
    Acc acc = Acc(0);
    if (e < weights) {
      int xyc[3];
      const int ci = split_index(f, 3, static_cast<int>(e), xyc);
      const int kx = xyc[0], ky = xyc[1], c_local = xyc[2];
      const int co = plan.by_cin_g.div(ci) * cout_g + c_local;
      int iy0, iy1, ix0, ix1;
      conv_transpose_input_range(plan.h, ky, &iy0, &iy1);
      conv_transpose_input_range(plan.w, kx, &ix0, &ix1);
      const int rows = iy1 - iy0, cols = ix1 - ix0;
      const int per_image = rows * cols, count = n_images * per_image;
      // crop-relative output position of input (iy, ix) through this tap
      const int dy = ky * dil_h - pad_h - top, dx = kx * dil_w - pad_w - left;
      for (int j = lane; j < count; j += group) {
        const int n = j / per_image, p = j - n * per_image;
        const int iy = iy0 + p / cols, ix = ix0 + p % cols;
        acc += to_acc(x[(n * in_channels + ci) * in_plane + iy * in_w + ix]) *
               to_acc(grad[(n * out_channels + co) * out_plane + (iy * stride_h + dy) * out_w +
                           ix * stride_w + dx]);
      }
    }
    acc = group_sum(acc, group);  // every thread: the barriers are block-wide
    if (lane == 0 && e < weights) grad_weight[e] = from_acc<T>(acc);
  }
}

#ifndef __CUDACC_RTC__
cudaError_t conv_transpose2d(DType dtype, const void* x, const void* weight, const void* bias,
                             void* out, const ConvTranspose2dShape& s, cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.out_channels * s.out_h * s.out_w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    return launch(conv_transpose2d_kernel<T>, grid_for(total), stream, static_cast<const T*>(x),
                  static_cast<const T*>(weight), static_cast<const T*>(bias), static_cast<T*>(out),
                  static_cast<int>(total), s.in_channels, s.in_h, s.in_w, s.out_channels, s.groups,
                  s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h,
                  s.dil_w, s.top, s.left, s.out_h, s.out_w);
  });
}

cudaError_t conv_transpose2d_backward(DType dtype, const void* grad, const void* x,
                                      const void* weight, void* grad_x, void* grad_weight,
                                      void* grad_bias, const ConvTranspose2dShape& s,
                                      cudaStream_t stream) {
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    const T* g = static_cast<const T*>(grad);
    cudaError_t err = cudaSuccess;
    const long long x_total = static_cast<long long>(s.n) * s.in_channels * s.in_h * s.in_w;
    if (grad_x != nullptr && x_total > 0) {
      err = launch(conv_transpose2d_grad_x_kernel<T>, grid_for(x_total), stream, g,
                   static_cast<const T*>(weight), static_cast<T*>(grad_x),
                   static_cast<int>(x_total), s.in_channels, s.in_h, s.in_w, s.out_channels,
                   s.groups, s.kernel_h, s.kernel_w, s.stride_h, s.stride_w, s.pad_h, s.pad_w,
                   s.dil_h, s.dil_w, s.top, s.left, s.out_h, s.out_w);
    }
    const long long weights = static_cast<long long>(s.in_channels) * (s.out_channels / s.groups) *
                              s.kernel_h * s.kernel_w;
    if (err == cudaSuccess && grad_weight != nullptr && weights > 0) {
      const int group = reduction_group(static_cast<long long>(s.n) * s.in_h * s.in_w);
      err = launch(conv_transpose2d_grad_weight_kernel<T>, blocks_for_groups(weights, group),
                   stream, static_cast<const T*>(x), g, static_cast<T*>(grad_weight), s.n, group,
                   s.in_channels, s.in_h, s.in_w, s.out_channels, s.groups, s.kernel_h, s.kernel_w,
                   s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w, s.top, s.left,
                   s.out_h, s.out_w);
    }
    return launch_bias_grad(err, g, grad_bias, s.n, s.out_channels, s.out_h * s.out_w, stream);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
