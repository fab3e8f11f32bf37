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

#include <cmath>
#include <cstring>
#include <string_view>

#include "bilinear_rows.h"

namespace fcnfast {
namespace {

// exp for the softmax, vectorisable (branch-free selects): Cody-Waite range
// reduction and the Cephes expf polynomial, within ~2 ulp of expf. Arguments
// below -87 give 0 (std::exp gives a denormal < 1.2e-38), NaN gives NaN.
inline float softmax_exp(float x) {
  float xc = x >= -87.0f ? x : -87.0f;  // NaN -> -87 here, restored below
  xc = xc <= 88.0f ? xc : 88.0f;
  const float n = bl_fma(xc, 1.44269504088896341f, 12582912.0f) - 12582912.0f;  // round(x/ln2)
  float r = bl_fma(n, -0.693359375f, xc);
  r = bl_fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = bl_fma(p, r, 1.3981999507e-3f);
  p = bl_fma(p, r, 8.3334519073e-3f);
  p = bl_fma(p, r, 4.1665795894e-2f);
  p = bl_fma(p, r, 1.6666665459e-1f);
  p = bl_fma(p, r, 5.0000001201e-1f);
  p = bl_fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  const float e = p * two_n;
  return x != x ? x : (x < -87.0f ? 0.0f : e);
}
inline double softmax_exp(double x) { return std::exp(x); }

struct CrossEntropyArgs {
  BilinearGeometry geo;
  bool mean;
};

// Shared by the forward and the backward: shapes, dtypes, reduction and the
// target values (each in [0, C) or ignore_index) are checked before any work.
CrossEntropyArgs check_cross_entropy(const at::Tensor& x, const at::Tensor& target, int64_t scale,
                                     at::IntArrayRef crop, int64_t ignore_index,
                                     c10::string_view reduction) {
  CrossEntropyArgs args;
  args.geo = check_bilinear_input(x, "x", scale, crop);
  check_defined(target, "target");
  check_dim(target, 3, "target");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                    "fcnfast: target must be an int64 label map, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == x.device(), "fcnfast: x and target must be on the same ",
                    "device, got ", x.device(), " and ", target.device());
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "fcnfast: reduction must be 'mean' or 'sum', got '", reduction, "'");
  args.mean = reduction == "mean";
  const int64_t N = x.size(0), C = x.size(1);
  TORCH_CHECK_VALUE(target.size(0) == N && target.size(1) == args.geo.crop.height &&
                        target.size(2) == args.geo.crop.width,
                    "fcnfast: target shape ", shape_str(target), " must be (N, H, W) = [", N,
                    ", ", args.geo.crop.height, ", ", args.geo.crop.width,
                    "] of the upsampled crop");
  check_index32(target.numel(), "target");
  check_index32(2 * C * args.geo.full_w, "the row buffers");
  if (target.numel() > 0) {
    const auto bad = ((target < 0) | (target >= C)) & (target != ignore_index);
    if (bad.any().item<bool>()) {
      const int64_t value = target.masked_select(bad).flatten()[0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "fcnfast: target value ", value, " is out of bounds: classes are [0, ",
                        C, ") (x has ", C, " channels) and ignore_index is ", ignore_index);
    }
  }
  return args;
}

// Softmax statistics of one logits row (C x width): max and sum of exp(v - max).
template <typename Acc>
void softmax_stats(const Acc* logits, int64_t C, int64_t width, Acc* __restrict max,
                   Acc* __restrict sum) {
  std::copy(logits, logits + width, max);
  for (int64_t c = 1; c < C; ++c) {
    const Acc* __restrict v = logits + c * width;
    for (int64_t x = 0; x < width; ++x) max[x] = v[x] > max[x] ? v[x] : max[x];
  }
  std::fill(sum, sum + width, Acc(0));
  for (int64_t c = 0; c < C; ++c) {
    const Acc* __restrict v = logits + c * width;
    for (int64_t x = 0; x < width; ++x) sum[x] += softmax_exp(v[x] - max[x]);
  }
}

at::Tensor upsample_cross_entropy_cpu(const at::Tensor& x, const at::Tensor& target,
                                      int64_t scale, at::IntArrayRef crop, int64_t ignore_index,
                                      c10::string_view reduction) {
  const auto args = check_cross_entropy(x, target, scale, crop, ignore_index, reduction);
  const auto& geo = args.geo;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = geo.crop.height, w = geo.crop.width;
  auto xc = x.contiguous();
  auto tc = target.contiguous();
  const int64_t rows_total = N * h;
  std::vector<double> row_loss(rows_total, 0.0);
  std::vector<int64_t> row_count(rows_total, 0);
  if (rows_total > 0 && w > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "upsample_cross_entropy", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      const int64_t* tp = tc.const_data_ptr<int64_t>();
      const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
      at::parallel_for(0, rows_total, rows_grain(C * w), [&](int64_t begin, int64_t end) {
        cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
        std::vector<acc_t> logits(C * w), max(w), sum(w);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / h, y = r % h;
          const int64_t* t = tp + r * w;
          cpu::upsampled_row(rows, n, geo.crop.top + y, scale, H, C, logits.data(), w,
                             [](int64_t, const acc_t*) {});
          softmax_stats(logits.data(), C, w, max.data(), sum.data());
          double loss = 0.0;
          int64_t count = 0;
          for (int64_t x = 0; x < w; ++x) {
            if (t[x] == ignore_index) continue;
            loss += static_cast<double>(std::log(sum[x]) + max[x] - logits[t[x] * w + x]);
            ++count;
          }
          row_loss[r] = loss;
          row_count[r] = count;
        }
      });
    });
  }
  double total = 0.0;
  int64_t count = 0;
  for (int64_t r = 0; r < rows_total; ++r) {  // fixed order: deterministic
    total += row_loss[r];
    count += row_count[r];
  }
  // mean over no pixel is 0/0 = NaN, as F.cross_entropy
  const double loss = args.mean ? total / static_cast<double>(count) : total;
  return at::scalar_tensor(loss, xc.options());
}

at::Tensor upsample_cross_entropy_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& x,
                                               const at::Tensor& target, int64_t scale,
                                               at::IntArrayRef crop, int64_t ignore_index,
                                               c10::string_view reduction) {
  check_defined(grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "fcnfast: grad_loss must hold one value (the loss ",
                    "is a scalar), got shape ", shape_str(grad_loss));
  const auto args = check_cross_entropy(x, target, scale, crop, ignore_index, reduction);
  const auto& geo = args.geo;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = geo.crop.height, w = geo.crop.width;
  auto xc = x.contiguous();
  auto tc = target.contiguous();
  auto out = at::zeros({N, C, H, W}, xc.options());
  if (out.numel() == 0 || tc.numel() == 0) return out;
  const int64_t valid = (tc != ignore_index).sum().item<int64_t>();
  const double g = grad_loss.item<double>();
  // weight of each non-ignored pixel; with no such pixel every weight is unused
  const double pixel_weight = args.mean ? (valid > 0 ? g / static_cast<double>(valid) : 0.0) : g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "upsample_cross_entropy_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const int64_t* tp = tc.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
    const acc_t coef = static_cast<acc_t>(pixel_weight);
    at::parallel_for(0, N * H, rows_grain(C * w * scale), [&](int64_t begin, int64_t end) {
      cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
      cpu::BandGather<acc_t> gather(C, H, W, scale, geo.crop, geo.full_w);
      std::vector<acc_t> dlogits(C * w), max(w), sum(w);
      const auto prepare = [&](int64_t n, int64_t Y) {
        // dlogits = coef * (softmax - onehot); 0 * (...) at ignored pixels, so a
        // NaN/Inf logit there still poisons the gradient as in F.cross_entropy
        const int64_t* t = tp + (n * h + Y - geo.crop.top) * w;
        cpu::upsampled_row(rows, n, Y, scale, H, C, dlogits.data(), w, [](int64_t, const acc_t*) {});
        softmax_stats(dlogits.data(), C, w, max.data(), sum.data());
        for (int64_t c = 0; c < C; ++c) {
          acc_t* __restrict d = dlogits.data() + c * w;
          for (int64_t x = 0; x < w; ++x) {
            const acc_t p = softmax_exp(d[x] - max[x]) / sum[x];
            const acc_t k = t[x] == ignore_index ? acc_t(0) : coef;
            d[x] = (p - (t[x] == c ? acc_t(1) : acc_t(0))) * k;
          }
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
