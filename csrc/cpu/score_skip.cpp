// CPU kernels for score_skip, the fused FCN skip step:
//   out = coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]
// The 1x1 score convolution runs only on the kept H x W window: per image it is
// the GEMM (K x C) @ (C x H*W) on the gathered window, with `scale` folded into
// the weight. The backward is the same algebra transposed (gathers and GEMMs
// in a fixed order: deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../common/checks.h"

namespace fcnfast {
namespace {

struct Window {
  int64_t batch, channels, classes;   // N, C (feature), K (weight.shape[0])
  int64_t h, w;                       // coarse / window size
  int64_t fh, fw;                     // feature size
  int64_t oy, ox;                     // window offset in the feature map
};

Window check_window(const at::Tensor& feature, const at::Tensor& weight, int64_t n, int64_t k,
                    int64_t h, int64_t w, at::IntArrayRef offset) {
  check_defined(feature, "feature");
  check_defined(weight, "weight");
  check_floating(feature, "feature");
  check_dim(feature, 4, "feature");
  check_dim(weight, 4, "weight");
  check_same(feature, "feature", weight, "weight");
  TORCH_CHECK_VALUE(weight.size(2) == 1 && weight.size(3) == 1,
                    "fcnfast: weight must be a 1x1 convolution weight (K, C, 1, 1), got ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(weight.size(1) == feature.size(1), "fcnfast: weight.shape[1] (",
                    weight.size(1), ") must equal feature channels (", feature.size(1), ")");
  TORCH_CHECK_VALUE(n == feature.size(0) && k == weight.size(0), "fcnfast: coarse/grad batch ",
                    n, " and channels ", k, " must have batch ", feature.size(0), " and ",
                    weight.size(0), " channels (weight.shape[0])");
  auto off = pair_arg(offset, "offset");
  const int64_t fh = feature.size(2), fw = feature.size(3);
  TORCH_CHECK_VALUE(off[0] >= 0 && off[1] >= 0 && off[0] + h <= fh && off[1] + w <= fw,
                    "fcnfast: offset (", off[0], ", ", off[1], ") with window ", h, "x", w,
                    " lies outside feature of size ", fh, "x", fw);
  check_index32(feature.numel(), "feature");
  check_index32(weight.numel(), "weight");
  check_index32(n * k * h * w, "coarse");
  return Window{n, feature.size(1), k, h, w, fh, fw, off[0], off[1]};
}

// (K, C) weight matrix in the compute dtype with the feature scale folded in.
at::Tensor scaled_weight(const at::Tensor& weight, double scale, at::ScalarType acc_type) {
  return (weight.reshape({weight.size(0), weight.size(1)}).to(acc_type) * scale).contiguous();
}

// buf[c, (y - y0) * w + x] = feature_n[c, oy + y, ox + x] for window rows [y0, y1)
// and channels [c0, c1).
template <typename scalar_t, typename acc_t>
void gather_window(const scalar_t* feat_n, const Window& win, int64_t y0, int64_t y1, int64_t c0,
                   int64_t c1, acc_t* buf) {
  const int64_t cols = (y1 - y0) * win.w;
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t y = y0; y < y1; ++y) {
      const scalar_t* src = feat_n + (c * win.fh + win.oy + y) * win.fw + win.ox;
      acc_t* dst = buf + c * cols + (y - y0) * win.w;
      for (int64_t x = 0; x < win.w; ++x) dst[x] = static_cast<acc_t>(src[x]);
    }
}

// grad_feature_n[c, :, :] for channels [c0, c1): the window from dwin (C, h*w),
// zeros elsewhere (every element written once).
template <typename scalar_t, typename acc_t>
void scatter_window(const acc_t* dwin, const Window& win, int64_t c0, int64_t c1, scalar_t* gf_n) {
  for (int64_t c = c0; c < c1; ++c) {
    scalar_t* plane = gf_n + c * win.fh * win.fw;
    std::fill(plane, plane + win.oy * win.fw, scalar_t(0));
    for (int64_t y = 0; y < win.h; ++y) {
      scalar_t* row = plane + (win.oy + y) * win.fw;
      const acc_t* src = dwin + (c * win.h + y) * win.w;
      std::fill(row, row + win.ox, scalar_t(0));
      for (int64_t x = 0; x < win.w; ++x) row[win.ox + x] = static_cast<scalar_t>(src[x]);
      std::fill(row + win.ox + win.w, row + win.fw, scalar_t(0));
    }
    std::fill(plane + (win.oy + win.h) * win.fw, plane + win.fh * win.fw, scalar_t(0));
  }
}

int64_t grain_for(int64_t work_per_item) {
  constexpr int64_t kMinWork = int64_t(1) << 16;
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

at::Tensor score_skip_cpu(const at::Tensor& coarse, const at::Tensor& feature,
                          const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          double scale, at::IntArrayRef offset) {
  check_defined(coarse, "coarse");
  check_floating(coarse, "coarse");
  check_dim(coarse, 4, "coarse");
  const Window win = check_window(feature, weight, coarse.size(0), coarse.size(1), coarse.size(2),
                                  coarse.size(3), offset);
  check_same(coarse, "coarse", feature, "feature");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dim(*bias, 1, "bias");
    check_same(coarse, "coarse", *bias, "bias");
    TORCH_CHECK_VALUE(bias->size(0) == win.classes, "fcnfast: bias has ", bias->size(0),
                      " elements, expected ", win.classes);
  }
  auto out = at::empty_like(coarse, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  auto cc = coarse.contiguous();
  auto fc = feature.contiguous();
  const at::Tensor bc = has_bias ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, coarse.scalar_type(), "score_skip", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor wm = scaled_weight(weight, scale, acc_type);
    const scalar_t* cp = cc.data_ptr<scalar_t>();
    const scalar_t* fp = fc.data_ptr<scalar_t>();
    const scalar_t* bp = has_bias ? bc.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t C = win.channels, K = win.classes, plane = win.h * win.w;
    at::Tensor fwin = at::empty({C, plane}, wm.options());
    at::Tensor res = at::empty({K, plane}, wm.options());
    // Per image: gather the window (cheap next to the GEMM), one GEMM, one add.
    for (int64_t n = 0; n < win.batch; ++n) {
      at::parallel_for(0, C, grain_for(plane), [&](int64_t b, int64_t e) {
        gather_window(fp + n * C * win.fh * win.fw, win, 0, win.h, b, e, fwin.data_ptr<acc_t>());
      });
      at::mm_out(res, wm, fwin);
      const acc_t* rp = res.data_ptr<acc_t>();
      at::parallel_for(0, K, grain_for(plane), [&](int64_t b, int64_t e) {
        for (int64_t k = b; k < e; ++k) {
          const acc_t bk = bp ? static_cast<acc_t>(bp[k]) : acc_t(0);
          const scalar_t* ck = cp + (n * K + k) * plane;
          const acc_t* rk = rp + k * plane;
          scalar_t* ok = op + (n * K + k) * plane;
          for (int64_t i = 0; i < plane; ++i)
            ok[i] = static_cast<scalar_t>(static_cast<acc_t>(ck[i]) + rk[i] + bk);
        }
      });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_skip_backward_cpu(
    const at::Tensor& grad, const at::Tensor& feature, const at::Tensor& weight, double scale,
    at::IntArrayRef offset, std::array<bool, 3> output_mask) {
  check_defined(grad, "grad");
  check_floating(grad, "grad");
  check_dim(grad, 4, "grad");
  const Window win = check_window(feature, weight, grad.size(0), grad.size(1), grad.size(2),
                                  grad.size(3), offset);
  check_same(grad, "grad", feature, "feature");
  // outputs not asked for are distinct empty tensors (outputs must not alias)
  auto empty = [&] { return at::empty({0}, grad.options()); };
  const auto acc_type = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gb = output_mask[2] ? grad.sum({0, 2, 3}, false, acc_type).to(grad.scalar_type())
                                 : empty();
  if (!output_mask[0] && !output_mask[1]) return {empty(), empty(), gb};
  at::Tensor gf = output_mask[0] ? at::empty(feature.sizes(), feature.options()) : empty();
  at::Tensor gw = output_mask[1] ? at::zeros(weight.sizes(), weight.options()) : empty();
  const int64_t C = win.channels, K = win.classes, plane = win.h * win.w;
  if (feature.numel() == 0 || weight.numel() == 0) {
    if (output_mask[0]) gf.zero_();
    return {gf, gw, gb};
  }
  auto gc = grad.contiguous();
  auto fc = feature.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "score_skip_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor wm = scaled_weight(weight, scale, acc_type);  // (K, C)
    const auto opts = wm.options();
    const scalar_t* fp = fc.data_ptr<scalar_t>();
    at::Tensor g_acc = gc.to(acc_type).reshape({win.batch, K, plane});
    at::Tensor fwin = output_mask[1] ? at::empty({C, plane}, opts) : at::Tensor();
    at::Tensor dwin = output_mask[0] ? at::empty({C, plane}, opts) : at::Tensor();
    at::Tensor dw = output_mask[1] ? at::zeros({K, C}, opts) : at::Tensor();
    const int64_t per_channel = plane;
    // Images in a fixed order; each step is a deterministic GEMM or gather.
    for (int64_t n = 0; n < win.batch; ++n) {
      const at::Tensor g_n = g_acc[n];  // (K, h*w)
      if (output_mask[1]) {
        at::parallel_for(0, C, grain_for(per_channel), [&](int64_t b, int64_t e) {
          gather_window(fp + n * C * win.fh * win.fw, win, 0, win.h, b, e, fwin.data_ptr<acc_t>());
        });
        dw.addmm_(g_n, fwin.t());
      }
      if (output_mask[0]) {
        at::mm_out(dwin, wm.t(), g_n);
        scalar_t* gf_n = gf.data_ptr<scalar_t>() + n * C * win.fh * win.fw;
        at::parallel_for(0, C, grain_for(win.fh * win.fw), [&](int64_t b, int64_t e) {
          scatter_window(dwin.data_ptr<acc_t>(), win, b, e, gf_n);
        });
      }
    }
    if (output_mask[1]) gw.copy_((dw * scale).view_as(gw));
  });
  return {gf, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CPU, m) {
  m.impl("score_skip", &score_skip_cpu);
  m.impl("score_skip_backward", &score_skip_backward_cpu);
}

}  // namespace fcnfast
