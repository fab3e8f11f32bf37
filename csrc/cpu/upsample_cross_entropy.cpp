// CPU kernels for upsample_cross_entropy:
//   F.cross_entropy(bilinear_upsample2d(x, scale, crop), target, ignore_index=..., reduction=...)
// and its gradient w.r.t. the low-resolution x, without the full-resolution
// logits or their gradient. Both stream over output rows: the logits of one row
// (all classes, the very values bilinear_upsample2d returns) live in a C x width
// buffer. The forward sums per-row losses in double and adds the rows in a fixed
// order; the backward recomputes each row's softmax and gathers it into the
// input rows it feeds (bilinear_rows.h walk_bands): no atomics, bitwise
// reproducible whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <string_view>

#include "bilinear_rows.h"

namespace fcnfast {
namespace {

// exp for the softmax: Cody-Waite range reduction and the Cephes expf
// polynomial, within ~2 ulp of expf. Arguments below -87 give 0 (std::exp would
// give a denormal < 1.2e-38), NaN gives NaN. The AVX2 version below performs
// the identical operation sequence, so a lane and the scalar tail agree bitwise.
constexpr float kExpLo = -87.0f, kExpHi = 88.0f, kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
constexpr float kLn2Hi = -0.693359375f, kLn2Lo = 2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

inline float softmax_exp(float x) {
  float xc = x >= kExpLo ? x : kExpLo;  // NaN -> kExpLo here, restored below
  xc = xc <= kExpHi ? xc : kExpHi;
  const float n = bl_fma(xc, kLog2e, kRound) - kRound;
  float r = bl_fma(n, kLn2Hi, xc);
  r = bl_fma(n, kLn2Lo, r);
  float p = kExpPoly[0];
  for (int k = 1; k < 6; ++k) p = bl_fma(p, r, kExpPoly[k]);
  p = bl_fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float e = p * two_n;
  return x != x ? x : (x < kExpLo ? 0.0f : e);
}
inline double softmax_exp(double x) { return std::exp(x); }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 softmax_exp8(__m256 x) {
  const __m256 round = _mm256_set1_ps(kRound);
  // max/min return the second operand for a NaN first: NaN -> kExpLo, as above
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), _mm256_set1_ps(kExpHi));
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(kLog2e), round), round);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Hi), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int k = 1; k < 6; ++k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[k]));
  p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  e = _mm256_blendv_ps(e, _mm256_setzero_ps(),
                       _mm256_cmp_ps(x, _mm256_set1_ps(kExpLo), _CMP_LT_OQ));
  return _mm256_blendv_ps(e, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
#endif

// out[x] = softmax_exp(v[x] - max[x]) (out may alias v).
template <typename Acc>
void exp_minus_max(const Acc* v, const Acc* max, int64_t width, Acc* out) {
  int64_t x = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<Acc, float>) {
    for (; x + 8 <= width; x += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(v + x), _mm256_loadu_ps(max + x));
      _mm256_storeu_ps(out + x, softmax_exp8(d));
    }
  }
#endif
  for (; x < width; ++x) out[x] = softmax_exp(v[x] - max[x]);
}

struct CrossEntropyArgs {
  BilinearGeometry geo;
  bool mean;
  int64_t N, C, H, W, h, w;  // x is N x C x H x W, the crop h x w
  at::Tensor x, target;      // contiguous
  int64_t valid;             // pixels whose target is not ignore_index
};

// Number of non-ignored pixels of a contiguous target; a value outside [0, C)
// that is not ignore_index is an error naming the first such value. One pass
// over the rows in parallel (a single parallel region: cheap on a busy machine).
int64_t count_valid_targets(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const int64_t width = target.size(2), rows = target.size(0) * target.size(1);
  if (rows == 0 || width == 0) return 0;
  const int64_t* tp = target.const_data_ptr<int64_t>();
  std::vector<int64_t> count(rows), first_bad(rows, -1);  // first bad column per row
  at::parallel_for(0, rows, cpu::grain_for(width, cpu::kRowMinWork),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t r = begin; r < end; ++r) {
                       const int64_t* t = tp + r * width;
                       int64_t n = 0;
                       for (int64_t x = 0; x < width; ++x) {
                         const bool ignored = t[x] == ignore_index;
                         if (!ignored && (t[x] < 0 || t[x] >= C) && first_bad[r] < 0)
                           first_bad[r] = x;
                         n += !ignored;
                       }
                       count[r] = n;
                     }
                   });
  int64_t total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (first_bad[r] >= 0) fail_target_value(tp[r * width + first_bad[r]], C, ignore_index);
    total += count[r];
  }
  return total;
}

// Shared by the forward and the backward: the argument checks (op_checks.h),
// then the target values (each in [0, C) or ignore_index) before any work.
CrossEntropyArgs prepare_cross_entropy(const CrossEntropyGeometry& checked, const at::Tensor& x,
                                       const at::Tensor& target, int64_t ignore_index) {
  CrossEntropyArgs args;
  args.geo = checked.u;
  args.mean = checked.mean;
  const int64_t N = x.size(0), C = x.size(1);
  args.N = N;
  args.C = C;
  args.H = x.size(2);
  args.W = x.size(3);
  args.h = args.geo.crop.height;
  args.w = args.geo.crop.width;
  args.x = x.contiguous();
  args.target = target.contiguous();
  args.valid = count_valid_targets(args.target, C, ignore_index);
  return args;
}

// Softmax of one logits row (C x width), in place: max over classes, then each
// value replaced by exp(v - max) and sum = the sum of those over classes.
template <typename Acc>
void softmax_exps(Acc* values, int64_t C, int64_t width, Acc* __restrict max, Acc* __restrict sum) {
  std::copy(values, values + width, max);
  for (int64_t c = 1; c < C; ++c) {
    const Acc* __restrict v = values + c * width;
    for (int64_t x = 0; x < width; ++x) max[x] = v[x] > max[x] ? v[x] : max[x];
  }
  std::fill(sum, sum + width, Acc(0));
  for (int64_t c = 0; c < C; ++c) {
    Acc* __restrict e = values + c * width;
    exp_minus_max(e, max, width, e);
    for (int64_t x = 0; x < width; ++x) sum[x] += e[x];
  }
}

// d = (p - onehot) * weight for class c of a row, p = exp(v - max) / sum given
// d = exp(v - max) and inv_sum = 1 / sum.
template <typename Acc>
void softmax_grad_row(Acc* __restrict d, const Acc* __restrict inv_sum,
                      const int32_t* __restrict label, int32_t c, const Acc* __restrict weight,
                      int64_t width) {
  for (int64_t x = 0; x < width; ++x) {
    const int32_t hit = label[x] == c;  // an int, not a bool: keeps the loop branch-free
    d[x] = (d[x] * inv_sum[x] - static_cast<Acc>(hit)) * weight[x];
  }
}

at::Tensor upsample_cross_entropy_cpu(const at::Tensor& x, const at::Tensor& target, int64_t scale,
                                      at::IntArrayRef crop, int64_t ignore_index,
                                      c10::string_view reduction) {
  const auto args = prepare_cross_entropy(
      check_upsample_cross_entropy(x, target, scale, crop, reduction), x, target, ignore_index);
  const auto& [geo, mean, N, C, H, W, h, w, xc, tc, valid] = args;
  const int64_t rows_total = N * h;
  std::vector<double> row_loss(rows_total, 0.0);
  if (rows_total > 0 && w > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, xc.scalar_type(), "upsample_cross_entropy", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const scalar_t* xp = xc.const_data_ptr<scalar_t>();
          const int64_t* tp = tc.const_data_ptr<int64_t>();
          const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
          at::parallel_for(0, rows_total, cpu::grain_for(C * w, cpu::kRowMinWork),
                           [&](int64_t begin, int64_t end) {
                             cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
                             std::vector<acc_t> logits(C * w), max(w), sum(w), picked(w);
                             for (int64_t r = begin; r < end; ++r) {
                               const int64_t n = r / h, y = r % h;
                               const int64_t* t = tp + r * w;
                               cpu::upsampled_row(rows, n, geo.crop.top + y, scale, H, C,
                                                  logits.data(), w, [](int64_t, const acc_t*) {});
                               for (int64_t x = 0; x < w; ++x) {
                                 picked[x] = t[x] == ignore_index ? acc_t(0) : logits[t[x] * w + x];
                               }
                               softmax_exps(logits.data(), C, w, max.data(), sum.data());
                               // loss = logsumexp - logit[target] = log(sum) + max - logit[target]
                               double loss = 0.0;
                               for (int64_t x = 0; x < w; ++x) {
                                 if (t[x] == ignore_index) continue;
                                 loss += static_cast<double>(std::log(sum[x]) + max[x] - picked[x]);
                               }
                               row_loss[r] = loss;
                             }
                           });
        });
  }
  double total = 0.0;
  for (int64_t r = 0; r < rows_total; ++r) total += row_loss[r];  // fixed order: deterministic
  // mean over no pixel is 0/0 = NaN, as F.cross_entropy
  const double loss = mean ? total / static_cast<double>(valid) : total;
  return at::scalar_tensor(loss, xc.options());
}

at::Tensor upsample_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x,
                                               const at::Tensor& target, int64_t scale,
                                               at::IntArrayRef crop, int64_t ignore_index,
                                               c10::string_view reduction) {
  const auto args = prepare_cross_entropy(
      check_upsample_cross_entropy_backward(grad_loss, x, target, scale, crop, reduction), x,
      target, ignore_index);
  const auto& [geo, mean, N, C, H, W, h, w, xc, tc, valid] = args;
  if (x.numel() == 0 || tc.numel() == 0) return at::zeros({N, C, H, W}, xc.options());
  auto out = at::empty({N, C, H, W}, xc.options());  // BandGather writes every row
  const double g = grad_loss.item<double>();
  // weight of each non-ignored pixel; with no such pixel every weight is unused
  const double pixel_weight = mean ? (valid > 0 ? g / static_cast<double>(valid) : 0.0) : g;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, xc.scalar_type(), "upsample_cross_entropy_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = xc.const_data_ptr<scalar_t>();
        const int64_t* tp = tc.const_data_ptr<int64_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
        const acc_t coef = static_cast<acc_t>(pixel_weight);
        at::parallel_for(0, N * H, cpu::grain_for(C * w * scale, cpu::kRowMinWork),
                         [&](int64_t begin, int64_t end) {
                           cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
                           cpu::BandGather<acc_t> gather(C, H, W, scale, geo.crop, geo.full_w);
                           std::vector<acc_t> dlogits(C * w), max(w), sum(w), weight(w), inv_sum(w);
                           std::vector<int32_t> label(w);
                           const auto prepare = [&](int64_t n, int64_t Y) {
                             // dlogits = coef * (softmax - onehot); 0 * (...) at ignored pixels, so
                             // a NaN/Inf logit there still poisons the gradient as in
                             // F.cross_entropy
                             const int64_t* t = tp + (n * h + Y - geo.crop.top) * w;
                             cpu::upsampled_row(rows, n, Y, scale, H, C, dlogits.data(), w,
                                                [](int64_t, const acc_t*) {});
                             softmax_exps(dlogits.data(), C, w, max.data(), sum.data());
                             for (int64_t x = 0; x < w; ++x) {
                               const bool ignored = t[x] == ignore_index;
                               weight[x] = ignored ? acc_t(0) : coef;
                               label[x] = ignored ? -1
                                                  : static_cast<int32_t>(
                                                        t[x]);  // 32-bit: the loop below vectorises
                               inv_sum[x] = acc_t(1) / sum[x];
                             }
                             for (int32_t c = 0; c < static_cast<int32_t>(C); ++c) {
                               softmax_grad_row(dlogits.data() + c * w, inv_sum.data(),
                                                label.data(), c, weight.data(), w);
                             }
                           };
                           gather.run(begin, end, op, prepare, [&](int64_t, int64_t, int64_t c) {
                             return static_cast<const acc_t*>(dlogits.data() + c * w);
                           });
                         });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("upsample_cross_entropy", &upsample_cross_entropy_cpu);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cpu);
}

}  // namespace fcnfast
