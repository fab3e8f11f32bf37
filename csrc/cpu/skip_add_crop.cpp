// CPU kernels for skip_add_crop: out = coarse + skip[..., oy:oy+H, ox:ox+W].
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../host/op_checks.h"

namespace fcnfast {
namespace {

at::Tensor skip_add_crop_cpu(const at::Tensor& coarse, const at::Tensor& skip,
                             at::IntArrayRef offset) {
  const auto win = check_skip_add_crop(coarse, skip, offset);
  const int64_t H = win.h, W = win.w;
  const std::array<int64_t, 2> off{win.oy, win.ox};

  auto c = coarse.contiguous();
  auto s = skip.contiguous();
  auto out = at::empty_like(c, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const int64_t planes = c.size(0) * c.size(1);
  const int64_t SH = s.size(2), SW = s.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "skip_add_crop", [&] {
    const scalar_t* cp = c.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t p = r / H, y = r % H;
        const scalar_t* crow = cp + r * W;
        const scalar_t* srow = sp + (p * SH + y + off[0]) * SW + off[1];
        scalar_t* orow = op + r * W;
        for (int64_t x = 0; x < W; ++x) orow[x] = crow[x] + srow[x];
      }
    });
  });
  return out;
}

// grad_skip: zeros with grad written into the window (a gather, no atomics).
at::Tensor skip_add_crop_backward_cpu(const at::Tensor& grad, int64_t skip_h, int64_t skip_w,
                                      at::IntArrayRef offset) {
  const auto win = check_skip_add_crop_backward(grad, skip_h, skip_w, offset);
  const int64_t H = win.h, W = win.w;
  const std::array<int64_t, 2> off{win.oy, win.ox};
  auto g = grad.contiguous();
  auto out = at::zeros({g.size(0), g.size(1), skip_h, skip_w}, g.options());
  if (g.numel() == 0) return out;
  const int64_t planes = g.size(0) * g.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, g.scalar_type(), "skip_add_crop_backward", [&] {
        const scalar_t* gp = g.data_ptr<scalar_t>();
        scalar_t* op = out.data_ptr<scalar_t>();
        at::parallel_for(0, planes * H, 16, [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int64_t p = r / H, y = r % H;
            const scalar_t* grow = gp + r * W;
            scalar_t* orow = op + (p * skip_h + y + off[0]) * skip_w + off[1];
            for (int64_t x = 0; x < W; ++x) orow[x] = grow[x];
          }
        });
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("skip_add_crop", &skip_add_crop_cpu);
  m.impl("skip_add_crop_backward", &skip_add_crop_backward_cpu);
}

}  // namespace fcnfast
