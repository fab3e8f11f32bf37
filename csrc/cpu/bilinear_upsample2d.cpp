// CPU kernels for bilinear_upsample2d, the frozen FCN "upscore":
//   out = F.conv_transpose2d(x, bilinear_filter(2s).expand(C,1,2s,2s), stride=s, groups=C)[crop]
// computed separably (csrc/common/bilinear.h): each kept output row blends two
// horizontally interpolated input rows; only the crop is computed. The backward
// (w.r.t. x) is a gather over each input row's band of output rows: no atomics,
// bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bilinear_rows.h"
#include "large_output.h"

namespace fcnfast {
namespace {

at::Tensor bilinear_upsample2d_cpu(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  const auto geo = check_bilinear_upsample2d(x, scale, crop);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto xc = x.contiguous();
  // a reused block when one is free: no page faults (large_output.h)
  auto out = cpu::empty_large({N, C, geo.crop.height, geo.crop.width}, xc.options());
  if (out.numel() == 0) return out;
  const int64_t h = geo.crop.height, w = geo.crop.width, top = geo.crop.top;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, xc.scalar_type(), "bilinear_upsample2d", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* xp = xc.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        const cpu::ColumnTaps<acc_t> cols(geo.crop.left, w, scale, W);
        // stream outputs well beyond the caches (see blend_rows_stream)
        const bool stream = cpu::use_streaming_stores(out);
        at::parallel_for(0, N * h, cpu::grain_for(C * w, cpu::kRowMinWork),
                         [&](int64_t begin, int64_t end) {
                           cpu::UpsampledRows<scalar_t, acc_t> rows(xp, C, H, W, cols);
                           for (int64_t r = begin; r < end; ++r) {
                             const int64_t n = r / h, y = r % h;
                             const auto ty = bilinear_taps<acc_t>(top + y, scale, H);
                             const acc_t* lo = ty.has_lo ? rows.get(n, ty.lo) : nullptr;
                             const acc_t* hi = ty.has_hi ? rows.get(n, ty.lo + 1) : nullptr;
                             for (int64_t c = 0; c < C; ++c) {
                               const acc_t* lo_c = lo ? lo + c * w : nullptr;
                               const acc_t* hi_c = hi ? hi + c * w : nullptr;
                               scalar_t* dst = op + ((n * C + c) * h + y) * w;
                               if (stream) {
                                 cpu::blend_rows_stream(lo_c, ty.w_lo, hi_c, ty.w_hi, w, dst);
                               } else {
                                 cpu::blend_rows(lo_c, ty.w_lo, hi_c, ty.w_hi, w, dst);
                               }
                             }
                           }
                           cpu::stream_fence();
                         });
      });
  return out;
}

at::Tensor bilinear_upsample2d_backward_cpu(const at::Tensor& grad, int64_t in_height,
                                            int64_t in_width, int64_t scale, at::IntArrayRef crop) {
  const auto geo = check_bilinear_upsample2d_backward(grad, in_height, in_width, scale, crop);
  const int64_t N = grad.size(0), C = grad.size(1), H = in_height, W = in_width;
  auto g = grad.contiguous();
  if (N * C * H * W == 0 || g.numel() == 0) return at::zeros({N, C, H, W}, g.options());
  auto out = at::empty({N, C, H, W}, g.options());  // BandGather writes every row
  const int64_t h = geo.crop.height, w = geo.crop.width;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.scalar_type(), "bilinear_upsample2d_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* gp = g.const_data_ptr<scalar_t>();
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, N * H, cpu::grain_for(C * w * scale, cpu::kRowMinWork),
                         [&](int64_t begin, int64_t end) {
                           cpu::BandGather<acc_t> gather(C, H, W, scale, geo.crop, geo.full_w);
                           gather.run(
                               begin, end, op, [](int64_t, int64_t) {},
                               [&](int64_t n, int64_t Y, int64_t c) {
                                 return gp + ((n * C + c) * h + (Y - geo.crop.top)) * w;
                               });
                         });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("bilinear_upsample2d", &bilinear_upsample2d_cpu);
  m.impl("bilinear_upsample2d_backward", &bilinear_upsample2d_backward_cpu);
}

}  // namespace fcnfast
