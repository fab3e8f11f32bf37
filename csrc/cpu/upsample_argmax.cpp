// CPU kernel for upsample_argmax: bilinear_upsample2d(x, scale, crop).argmax(1)
// without the C x H x W scores. One output row at a time: each channel's
// upsampled row (the very values bilinear_upsample2d returns, see
// bilinear_rows.h) is folded into a running (best value, best class) row.
//
// The labels therefore equal fcnfast's bilinear_upsample2d(x).argmax(1) bit for
// bit. The reference upsamples with F.conv_transpose2d, which multiplies by the
// rounded 2-D weights w_y*w_x and sums the four taps in its own order; its
// scores can differ from ours in the last bit, so where two classes are within
// that rounding (a near-tie, |difference| ~ 1e-7 relative in float32) the
// reference may pick the other class. Exact ties (equal scores) agree.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bilinear_rows.h"
#include "large_output.h"

namespace fcnfast {
namespace {

// torch.argmax's order: NaN is larger than everything, and among equal values
// (NaNs included) the first index wins.
template <typename Acc>
inline bool argmax_takes(Acc value, Acc best) {
  return value > best || (value != value && best == best);
}

template <typename Acc>
void fold_argmax(const Acc* __restrict values, int64_t c, int64_t width, Acc* __restrict best,
                 int64_t* __restrict label) {
  if (c == 0) {
    std::copy(values, values + width, best);
    std::fill(label, label + width, int64_t(0));
    return;
  }
  for (int64_t x = 0; x < width; ++x) {
    const bool take = argmax_takes(values[x], best[x]);
    best[x] = take ? values[x] : best[x];
    label[x] = take ? c : label[x];
  }
}

at::Tensor upsample_argmax_cpu(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  const auto geo = check_upsample_argmax(x, scale, crop);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = geo.crop.height, w = geo.crop.width;
  auto xc = x.contiguous();
  auto out = cpu::empty_large({N, h, w}, xc.options().dtype(at::kLong));  // large_output.h
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, xc.scalar_type(), "upsample_argmax", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = xc.const_data_ptr<scalar_t>();
        int64_t* op = out.mutable_data_ptr<int64_t>();
        const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
        at::parallel_for(
            0, N * h, cpu::grain_for(C * w, cpu::kRowMinWork), [&](int64_t begin, int64_t end) {
              cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
              std::vector<acc_t> values(w), best(w);
              for (int64_t r = begin; r < end; ++r) {
                const int64_t n = r / h, y = r % h;
                int64_t* label = op + r * w;
                cpu::upsampled_row(
                    rows, n, geo.crop.top + y, scale, H, C, values.data(), 0,
                    [&](int64_t c, const acc_t* v) { fold_argmax(v, c, w, best.data(), label); });
              }
            });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) { m.impl("upsample_argmax", &upsample_argmax_cpu); }

}  // namespace fcnfast
