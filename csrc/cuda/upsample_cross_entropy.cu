// CUDA kernels for upsample_cross_entropy, the final upsampling fused with the
// softmax cross-entropy:
//   F.cross_entropy(bilinear_upsample2d(x, s, crop), target, ignore_index=ii, reduction=r)
// The full-resolution logits and their gradient never exist; only one
// log-sum-exp per kept pixel is held (1/C of the logits) for the backward.
//
// Forward (deterministic two-pass reduction, no atomics):
//   pass 1  ce_pixel_kernel: a fixed grid of at most kCeMaxBlocks blocks; each
//           thread walks its pixels in a fixed order computing
//           lse = logsumexp_c z_c and loss = lse - z_target (online softmax);
//           each block writes its sum of losses, its number of counted
//           pixels (an int: a float count is inexact above 2^24 pixels) and
//           the index of its first bad label (one that is neither a class nor
//           ignore_index; kNoBadPixel if none).
//   pass 2  ce_finalize_kernel: one block sums the partials in a fixed order
//           and writes the loss (sum, or sum / count for "mean"; NaN when any
//           label is bad, whatever the reduction), or in the backward the
//           coefficient grad_loss (/ count). The forward also writes the first
//           bad label in memory order, {index, value} or {-1, 0}, to bad_label:
//           the CUDA binding checks the labels from that flag without a device
//           sync (csrc/host/pending_checks.h), and a bad label is never a
//           silently wrong finite loss.
// Backward: pass 1 (storing lse), pass 2 (coefficient), then
//   ce_grad_x_kernel: each input element gathers over its 2s x 2s footprint
//           coef * sum w(Y) w(X) (softmax_c(Y, X) - [target == c]) over
//           non-ignored pixels.
// Scores are csrc/common/bilinear.h bilinear_pixel values (the ones
// bilinear_upsample2d computes), rounded to the storage dtype before the
// softmax, as the unfused expression does.
#include "cuda/kernel_utils.cuh"  // first: NVRTC integer types
#include "common/bilinear.h"
#ifndef __CUDACC_RTC__
#include "cuda/launchers.h"
#endif

namespace fcnfast {
namespace cuda {

// No bad label in a block (pixel indices are below INT32_MAX: the host checks the
// target against the 32-bit index limit).
constexpr int kNoBadPixel = 0x7fffffff;

template <typename T>
__global__ void ce_pixel_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                int64_t ignore_index, typename AccOf<T>::type* __restrict__ lse_out,
                                typename AccOf<T>::type* __restrict__ partials,
                                int* __restrict__ counts, int* __restrict__ first_bad, int pixels,
                                int channels, int in_h, int in_w, int scale, int top, int left,
                                int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int in_plane = in_h * in_w;
  Acc loss_sum = Acc(0);
  int count = 0;
  int bad = kNoBadPixel;  // the thread's pixels ascend, so its first bad one is its smallest
  const FastDivs<3>& f = block_fast_divs({out_w, out_h, scale});
  FCN_GRID_STRIDE(i, pixels) {
    const int idx = static_cast<int>(i);
    int oxy[2];
    const int n = split_index(f, 2, idx, oxy);
    const int ox = oxy[0], oy = oxy[1];
    const int64_t t = target[idx];
    if (t == ignore_index || t < 0 || t >= channels) {
      // a bad label: recorded, and the finalize kernel makes the loss NaN; its lse
      // is never read (the backward's terms for it are NaN, see ce_grad_x_kernel)
      if (t != ignore_index && bad == kNoBadPixel) bad = idx;
      if (lse_out != nullptr) lse_out[idx] = Acc(0);
      continue;
    }
    const T* xn = x + n * channels * in_plane;
    // online softmax: running max m and sum of exp(z - m)
    Acc m = Acc(0), sum = Acc(0), z_target = Acc(0);
    for (int c = 0; c < channels; ++c) {
      const Acc z = round_to<T>(
          bilinear_pixel<T, Acc>(xn + c * in_plane, in_h, in_w, f.d[2], top + oy, left + ox));
      if (c == 0) {
        m = z;
        sum = Acc(1);
      } else if (z > m) {
        sum = sum * exp(m - z) + Acc(1);
        m = z;
      } else {
        sum += exp(z - m);
      }
      if (c == t) z_target = z;
    }
    const Acc lse = m + log(sum);
    if (lse_out != nullptr) lse_out[idx] = lse;
    loss_sum += lse - z_target;
    ++count;
  }
  loss_sum = block_sum(loss_sum);
  count = block_sum(count);
  bad = block_min(bad);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = loss_sum;
    counts[blockIdx.x] = count;
    first_bad[blockIdx.x] = bad;
  }
}

// One block. loss != null: write the loss (forward), NaN when a label is bad.
// coef != null: write grad_loss[0] (/ count for mean) (backward). bad_label !=
// null: write {index, value} of the first bad label of target, or {-1, 0}.
template <typename T>
__global__ void ce_finalize_kernel(const typename AccOf<T>::type* __restrict__ partials,
                                   const int* __restrict__ counts,
                                   const int* __restrict__ first_bad, int n_partials, int mean,
                                   const T* __restrict__ grad_loss, T* __restrict__ loss,
                                   typename AccOf<T>::type* __restrict__ coef,
                                   const int64_t* __restrict__ target,
                                   int64_t* __restrict__ bad_label) {
  typedef typename AccOf<T>::type Acc;
  Acc loss_sum = Acc(0);
  int count = 0;  // <= pixels <= INT32_MAX
  int bad = kNoBadPixel;
  for (int j = threadIdx.x; j < n_partials; j += kBlock) {
    loss_sum += partials[j];
    count += counts[j];
    bad = first_bad[j] < bad ? first_bad[j] : bad;
  }
  loss_sum = block_sum(loss_sum);
  count = block_sum(count);
  bad = block_min(bad);
  if (threadIdx.x == 0) {
    const bool any_bad = bad != kNoBadPixel;
    if (loss != nullptr) {
      const Acc value = mean ? loss_sum / Acc(count) : loss_sum;
      loss[0] = from_acc<T>(any_bad ? Acc(0) / Acc(0) : value);
    }
    if (bad_label != nullptr) {
      bad_label[0] = any_bad ? static_cast<int64_t>(bad) : int64_t(-1);
      bad_label[1] = any_bad ? target[bad] : int64_t(0);
    }
    if (coef != nullptr) {
      const Acc g = to_acc(grad_loss[0]);
      coef[0] = mean ? g / Acc(count) : g;
    }
  }
}

// One thread per input element (n, c, iy, ix).
template <typename T>
__global__ void ce_grad_x_kernel(const T* __restrict__ x, const int64_t* __restrict__ target,
                                 int64_t ignore_index,
                                 const typename AccOf<T>::type* __restrict__ lse,
                                 const typename AccOf<T>::type* __restrict__ coef,
                                 T* __restrict__ grad_x, int total, int channels, int in_h,
                                 int in_w, int scale, int top, int left, int out_h, int out_w) {
  typedef typename AccOf<T>::type Acc;
  const int in_plane = in_h * in_w;
  const Acc k = coef[0];
  const FastDivs<4>& f = block_fast_divs({in_w, in_h, channels, scale});
  FCN_GRID_STRIDE(i, total) {
    const int idx = static_cast<int>(i);
    int jyc[3];
    const int n = split_index(f, 3, idx, jyc);
    const int jx = jyc[0], iy = jyc[1], c = jyc[2];
    const T* plane = x + (n * channels + c) * in_plane;
    int y0, y1, x0, x1;
    bilinear_band(iy, scale, top, out_h, &y0, &y1);
    bilinear_band(jx, scale, left, out_w, &x0, &x1);
    Acc acc = Acc(0);
    bool any = false;
    for (int y = y0; y < y1; ++y) {
      const int prow = (n * out_h + y) * out_w;
      Acc row = Acc(0);
      for (int xo = x0; xo < x1; ++xo) {
        const int64_t t = target[prow + xo];
        if (t == ignore_index) continue;
        const Acc z =
            round_to<T>(bilinear_pixel<T, Acc>(plane, in_h, in_w, f.d[3], top + y, left + xo));
        // a label that is neither a class nor ignore_index makes its terms NaN: the
        // backward does not check the labels on the host (the forward did; a host
        // check is a device sync), so a direct call cannot give a silently wrong gradient
        const Acc d = (t < 0 || t >= channels)
                          ? Acc(0) / Acc(0)
                          : exp(z - lse[prow + xo]) - (t == c ? Acc(1) : Acc(0));
        row += bilinear_tap_weight<Acc>(left + xo - jx * scale, scale) * d;
        any = true;
      }
      acc += bilinear_tap_weight<Acc>(top + y - iy * scale, scale) * row;
    }
    // no counted pixel: exactly 0 (mean over zero pixels would give 0 * Inf)
    grad_x[idx] = from_acc<T>(any ? acc * k : Acc(0));
  }
}

#ifndef __CUDACC_RTC__
namespace {

// Upper bound on the pass-1 grid; the grid depends only on the pixel count
// (never on the device), so the summation order is fixed. fcnfast/_cupy.py
// uses the same rule.
constexpr int kCeMaxBlocks = 1024;

int ce_blocks(long long pixels) {
  long long b = (pixels + kBlock - 1) / kBlock;
  return static_cast<int>(b < 1 ? 1 : (b > kCeMaxBlocks ? kCeMaxBlocks : b));
}

// Workspace layout (in 8-byte slots, so it is aligned for either accumulator):
// [0, blocks) the loss partials, then the blocks' int pixel counts and after them
// the blocks' int first bad pixels (packed, starting at slot blocks; slots up to
// 2*blocks hold both), [2*blocks] the coefficient, then one lse per pixel.
// fcnfast/_cupy.py uses the same layout.
template <typename Acc>
struct CeWorkspace {
  Acc* partials;
  int* counts;
  int* first_bad;
  Acc* coef;
  Acc* lse;
  CeWorkspace(void* base, int blocks) {
    char* p = static_cast<char*>(base);
    partials = reinterpret_cast<Acc*>(p);
    counts = reinterpret_cast<int*>(p + blocks * sizeof(double));
    first_bad = counts + blocks;
    coef = reinterpret_cast<Acc*>(p + 2 * blocks * sizeof(double));
    lse = reinterpret_cast<Acc*>(p + (2 * blocks + 1) * sizeof(double));
  }
};

long long ce_pixels(const UpsampleShape& s) {
  return static_cast<long long>(s.n) * s.out_h * s.out_w;
}

}  // namespace

size_t upsample_cross_entropy_workspace_bytes(const UpsampleShape& s) {
  const long long pixels = ce_pixels(s);
  return static_cast<size_t>(2 * ce_blocks(pixels) + 1 + pixels) * sizeof(double);
}

cudaError_t upsample_cross_entropy(DType dtype, const void* x, const int64_t* target,
                                   int64_t ignore_index, bool mean, void* loss, int64_t* bad_label,
                                   void* workspace, const UpsampleShape& s, cudaStream_t stream) {
  const long long pixels = ce_pixels(s);
  const int blocks = ce_blocks(pixels);
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    CeWorkspace<Acc> ws(workspace, blocks);
    const cudaError_t err =
        launch(ce_pixel_kernel<T>, blocks, stream, static_cast<const T*>(x), target, ignore_index,
               nullptr, ws.partials, ws.counts, ws.first_bad, static_cast<int>(pixels), s.channels,
               s.in_h, s.in_w, s.scale, s.top, s.left, s.out_h, s.out_w);
    if (err != cudaSuccess) return err;
    return launch(ce_finalize_kernel<T>, 1, stream, ws.partials, ws.counts, ws.first_bad, blocks,
                  mean ? 1 : 0, nullptr, static_cast<T*>(loss), nullptr, target, bad_label);
  });
}

cudaError_t upsample_cross_entropy_backward(DType dtype, const void* grad_loss, const void* x,
                                            const int64_t* target, int64_t ignore_index, bool mean,
                                            void* grad_x, void* workspace, const UpsampleShape& s,
                                            cudaStream_t stream) {
  const long long pixels = ce_pixels(s);
  const long long total = static_cast<long long>(s.n) * s.channels * s.in_h * s.in_w;
  const int blocks = ce_blocks(pixels);
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(static_cast<int>(dtype), [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename AccOf<T>::type;
    CeWorkspace<Acc> ws(workspace, blocks);
    cudaError_t err =
        launch(ce_pixel_kernel<T>, blocks, stream, static_cast<const T*>(x), target, ignore_index,
               ws.lse, ws.partials, ws.counts, ws.first_bad, static_cast<int>(pixels), s.channels,
               s.in_h, s.in_w, s.scale, s.top, s.left, s.out_h, s.out_w);
    if (err != cudaSuccess) return err;
    // no bad_label flag: the forward of the step reported the labels; the bad
    // ones give NaN gradients here
    err = launch(ce_finalize_kernel<T>, 1, stream, ws.partials, ws.counts, ws.first_bad, blocks,
                 mean ? 1 : 0, static_cast<const T*>(grad_loss), nullptr, ws.coef,
                 static_cast<const int64_t*>(nullptr), static_cast<int64_t*>(nullptr));
    if (err != cudaSuccess) return err;
    return launch(ce_grad_x_kernel<T>, grid_for(total), stream, static_cast<const T*>(x), target,
                  ignore_index, ws.lse, ws.coef, static_cast<T*>(grad_x), static_cast<int>(total),
                  s.channels, s.in_h, s.in_w, s.scale, s.top, s.left, s.out_h, s.out_w);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace cuda
}  // namespace fcnfast
