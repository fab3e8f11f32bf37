// CUDA kernels for score_skip, the fused FCN skip step:
//   out = coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]
// The 1x1 score convolution runs only on the kept window. Backward (all
// gathers, fixed summation order, no atomics):
//   grad_feature[n,c,fy,fx] = scale * sum_k weight[k,c] * grad[n,k,fy-oy,fx-ox]  (0 outside)
//   grad_weight[k,c]        = scale * sum_{n,y,x} grad[n,k,y,x] * feature[n,c,y+oy,x+ox]
//   grad_bias[k]            = sum_{n,y,x} grad[n,k,y,x]
// grad_coarse is grad itself (Python side).
#include "cuda/kernel_utils.cuh"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

// One thread per output element (n, k, y, x): a dot product over channels.
template <typename T>
__global__ void score_skip_kernel(const T* __restrict__ coarse, const T* __restrict__ feature,
                                  const T* __restrict__ weight, const T* __restrict__ bias,
                                  typename AccOf<T>::type scale, T* __restrict__ out, int total,
                                  int classes, int channels, int h, int w, int feature_h,
                                  int feature_w, int oy, int ox) {
  typedef typename AccOf<T>::type Acc;
  const int fplane = feature_h * feature_w;
  const FastDivs<3>& f = block_fast_divs({w, h, classes});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int xyk[3];
    const int n = split_index(f, 3, idx, xyk);
    const int x = xyk[0], y = xyk[1], k = xyk[2];
    const T* f = feature + n * channels * fplane + (y + oy) * feature_w + x + ox;
    const T* wk = weight + k * channels;
    Acc acc = Acc(0);
    for (int c = 0; c < channels; ++c) acc += to_acc(wk[c]) * to_acc(f[c * fplane]);
    Acc score = acc * scale;
    if (bias != nullptr) score += to_acc(bias[k]);
    out[idx] = from_acc<T>(to_acc(coarse[idx]) + score);
  }
}

// One thread per feature element (n, c, fy, fx).
template <typename T>
__global__ void score_skip_grad_feature_kernel(const T* __restrict__ grad,
                                               const T* __restrict__ weight,
                                               typename AccOf<T>::type scale,
                                               T* __restrict__ grad_feature, int total, int classes,
                                               int channels, int h, int w, int feature_h,
                                               int feature_w, int oy, int ox) {
  typedef typename AccOf<T>::type Acc;
  const FastDivs<3>& f = block_fast_divs({feature_w, feature_h, channels});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int xyc[3];
    const int n = split_index(f, 3, idx, xyc);
    const int fx = xyc[0], fy = xyc[1], c = xyc[2];
    const int y = fy - oy, x = fx - ox;
    Acc acc = Acc(0);
    if (y >= 0 && y < h && x >= 0 && x < w) {
      const T* g = grad + n * classes * h * w + y * w + x;
      for (int k = 0; k < classes; ++k)
        acc += to_acc(weight[k * channels + c]) * to_acc(g[k * h * w]);
    }
    grad_feature[idx] = from_acc<T>(acc * scale);
  }
}

// Weight elements (k, c) in tiles: `group` threads (reduction_group() of the
// launcher) split one element's (n, y, x) terms, kBlock / group elements per
// block, and a fixed-order group_sum combines them.
template <typename T>
__global__ void score_skip_grad_weight_kernel(const T* __restrict__ grad,
                                              const T* __restrict__ feature,
                                              typename AccOf<T>::type scale,
                                              T* __restrict__ grad_weight, int n_images, int group,
                                              int classes, int channels, int h, int w,
                                              int feature_h, int feature_w, int oy, int ox) {
  typedef typename AccOf<T>::type Acc;
  const int hw = h * w, count = n_images * hw;
  const unsigned weights = static_cast<unsigned>(classes * channels);
  const unsigned per_block = kBlock / group;
  const int lane = static_cast<int>(threadIdx.x) & (group - 1);
  FCN_BLOCK_STRIDE(tile, (weights - 1) / per_block + 1) {
    const unsigned e = tile * per_block + threadIdx.x / group;
    Acc acc = Acc(0);
    if (e < weights) {
      const int k = static_cast<int>(e) / channels, c = static_cast<int>(e) % channels;
      for (int j = lane; j < count; j += group) {
        const int n = j / hw, p = j - n * hw;
        const int y = p / w, x = p - y * w;
        acc += to_acc(grad[(n * classes + k) * hw + p]) *
               to_acc(feature[((n * channels + c) * feature_h + y + oy) * feature_w + x + ox]);
      }
    }
    acc = group_sum(acc, group);  // every thread: the barriers are block-wide
    if (lane == 0 && e < weights) grad_weight[e] = from_acc<T>(acc * scale);
  }
}

#ifndef __CUDACC_RTC__
cudaError_t score_skip(DType dtype, const void* coarse, const void* feature, const void* weight,
                       const void* bias, double scale, void* out, const ScoreSkipShape& s,
                       cudaStream_t stream) {
  const long long total = static_cast<long long>(s.n) * s.classes * s.h * s.w;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    return launch(score_skip_kernel<T>, grid_for(total), stream, static_cast<const T*>(coarse),
                  static_cast<const T*>(feature), static_cast<const T*>(weight),
                  static_cast<const T*>(bias), static_cast<Acc>(scale), static_cast<T*>(out),
                  static_cast<int>(total), s.classes, s.channels, s.h, s.w, s.feature_h,
                  s.feature_w, s.oy, s.ox);
  });
}

cudaError_t score_skip_backward(DType dtype, const void* grad, const void* feature,
                                const void* weight, double scale, void* grad_feature,
                                void* grad_weight, void* grad_bias, const ScoreSkipShape& s,
                                cudaStream_t stream) {
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    const T* g = static_cast<const T*>(grad);
    cudaError_t err = cudaSuccess;
    const long long feature_total =
        static_cast<long long>(s.n) * s.channels * s.feature_h * s.feature_w;
    if (grad_feature != nullptr && feature_total > 0) {
      err = launch(score_skip_grad_feature_kernel<T>, grid_for(feature_total), stream, g,
                   static_cast<const T*>(weight), static_cast<Acc>(scale),
                   static_cast<T*>(grad_feature), static_cast<int>(feature_total), s.classes,
                   s.channels, s.h, s.w, s.feature_h, s.feature_w, s.oy, s.ox);
    }
    const long long weights = static_cast<long long>(s.classes) * s.channels;
    if (err == cudaSuccess && grad_weight != nullptr && weights > 0) {
      const int group = reduction_group(static_cast<long long>(s.n) * s.h * s.w);
      err = launch(score_skip_grad_weight_kernel<T>, blocks_for_groups(weights, group), stream, g,
                   static_cast<const T*>(feature), static_cast<Acc>(scale),
                   static_cast<T*>(grad_weight), s.n, group, s.classes, s.channels, s.h, s.w,
                   s.feature_h, s.feature_w, s.oy, s.ox);
    }
    return launch_bias_grad(err, g, grad_bias, s.n, s.classes, s.h * s.w, stream);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
