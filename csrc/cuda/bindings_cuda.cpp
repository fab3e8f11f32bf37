// CUDA implementations of the fcnfast ops for the PyTorch dispatcher.
//
// Thin host wrappers: validate the arguments (the same checks as the CPU
// kernels, plus "every tensor on the same CUDA device"), make the inputs
// contiguous, allocate the outputs, then call the torch-free launchers of
// csrc/cuda/<op>.cu on the current stream of the input's device and check the
// returned error. Compiled only when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "common/geometry.h"
#include "cuda/launchers.h"

namespace fcnfast {
namespace {

using cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "fcnfast: unsupported dtype ", t.scalar_type());
}

// `t` is a defined 4-D floating CUDA tensor that fits 32-bit indexing.
void check_input(const at::Tensor& t, const char* name, int64_t dim = 4) {
  check_defined(t, name);
  check_device(t, at::kCUDA, name);
  check_floating(t, name);
  check_dim(t, dim, name);
  check_index32(t.numel(), name);
}

// `t` is on the same CUDA device and has the same dtype as `ref`.
void check_like(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                const char* name, int64_t dim) {
  check_defined(t, name);
  check_same(ref, ref_name, t, name);
  check_dim(t, dim, name);
  check_index32(t.numel(), name);
}

int to_int(int64_t v) { return static_cast<int>(v); }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// Sizes that feed int32 index arithmetic in the kernels (e.g. a full output
// extent or a stride product) must fit as well.
void check_int32(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v >= 0 && v <= std::numeric_limits<int32_t>::max() / 2, "fcnfast: ", what,
                    " = ", v, " is too large for 32-bit indexing");
}

// ---------------------------------------------------------------------------
// skip_add_crop
// ---------------------------------------------------------------------------

void check_window(int64_t oy, int64_t ox, int64_t h, int64_t w, int64_t skip_h, int64_t skip_w,
                  const char* name) {
  TORCH_CHECK_VALUE(oy >= 0 && ox >= 0 && oy + h <= skip_h && ox + w <= skip_w, "fcnfast: offset (",
                    oy, ", ", ox, ") with window ", h, "x", w, " lies outside ", name,
                    " of size ", skip_h, "x", skip_w);
}

at::Tensor skip_add_crop_cuda(const at::Tensor& coarse, const at::Tensor& skip,
                              at::IntArrayRef offset) {
  check_input(coarse, "coarse");
  check_like(coarse, "coarse", skip, "skip", 4);
  TORCH_CHECK_VALUE(coarse.size(0) == skip.size(0) && coarse.size(1) == skip.size(1),
                    "fcnfast: coarse ", shape_str(coarse), " and skip ", shape_str(skip),
                    " must agree in batch and channels");
  const auto off = pair_arg(offset, "offset");
  const int64_t H = coarse.size(2), W = coarse.size(3);
  check_window(off[0], off[1], H, W, skip.size(2), skip.size(3), "skip");
  c10::cuda::CUDAGuard guard(coarse.device());
  const auto c = coarse.contiguous();
  const auto s = skip.contiguous();
  auto out = at::empty_like(c, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::skip_add_crop(dtype_of(c), c.const_data_ptr(), s.const_data_ptr(),
                                     out.data_ptr(), to_int(c.size(0) * c.size(1)), to_int(H),
                                     to_int(W), to_int(s.size(2)), to_int(s.size(3)),
                                     to_int(off[0]), to_int(off[1]), stream()));
  return out;
}

at::Tensor skip_add_crop_backward_cuda(const at::Tensor& grad, int64_t skip_h, int64_t skip_w,
                                       at::IntArrayRef offset) {
  check_input(grad, "grad");
  const auto off = pair_arg(offset, "offset");
  const int64_t H = grad.size(2), W = grad.size(3);
  check_window(off[0], off[1], H, W, skip_h, skip_w, "skip");
  check_index32_sizes({grad.size(0), grad.size(1), skip_h, skip_w}, "grad_skip");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  auto out = at::empty({g.size(0), g.size(1), skip_h, skip_w}, g.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::skip_add_crop_backward(
      dtype_of(g), g.const_data_ptr(), out.data_ptr(), to_int(g.size(0) * g.size(1)), to_int(H),
      to_int(W), to_int(skip_h), to_int(skip_w), to_int(off[0]), to_int(off[1]), stream()));
  return out;
}

// ---------------------------------------------------------------------------
// score_skip
// ---------------------------------------------------------------------------

// Checks shared by the forward (ref = coarse) and the backward (ref = grad);
// returns the launcher shape.
cuda::ScoreSkipShape check_score_skip(const at::Tensor& ref, const char* ref_name,
                                      const at::Tensor& feature, const at::Tensor& weight,
                                      at::IntArrayRef offset) {
  check_input(ref, ref_name);
  check_like(ref, ref_name, feature, "feature", 4);
  check_like(ref, ref_name, weight, "weight", 4);
  TORCH_CHECK_VALUE(weight.size(2) == 1 && weight.size(3) == 1,
                    "fcnfast: weight must be a 1x1 convolution weight (K, C, 1, 1), got ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(weight.size(1) == feature.size(1), "fcnfast: weight.shape[1] (",
                    weight.size(1), ") must equal feature channels (", feature.size(1), ")");
  TORCH_CHECK_VALUE(ref.size(0) == feature.size(0) && ref.size(1) == weight.size(0), "fcnfast: ",
                    ref_name, " ", shape_str(ref), " must have batch ", feature.size(0), " and ",
                    weight.size(0), " channels (weight.shape[0])");
  const auto off = pair_arg(offset, "offset");
  check_window(off[0], off[1], ref.size(2), ref.size(3), feature.size(2), feature.size(3),
               "feature");
  return {to_int(ref.size(0)), to_int(ref.size(1)), to_int(feature.size(1)), to_int(ref.size(2)),
          to_int(ref.size(3)), to_int(feature.size(2)), to_int(feature.size(3)), to_int(off[0]),
          to_int(off[1])};
}

at::Tensor score_skip_cuda(const at::Tensor& coarse, const at::Tensor& feature,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           double scale, at::IntArrayRef offset) {
  const auto shape = check_score_skip(coarse, "coarse", feature, weight, offset);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_like(coarse, "coarse", *bias, "bias", 1);
    TORCH_CHECK_VALUE(bias->size(0) == weight.size(0), "fcnfast: bias has ", bias->size(0),
                      " elements, expected ", weight.size(0));
  }
  c10::cuda::CUDAGuard guard(coarse.device());
  const auto c = coarse.contiguous();
  const auto f = feature.contiguous();
  const auto wt = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty_like(c, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::score_skip(dtype_of(c), c.const_data_ptr(), f.const_data_ptr(),
                                  wt.const_data_ptr(), has_bias ? b.const_data_ptr() : nullptr,
                                  scale, out.data_ptr(), shape, stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_skip_backward_cuda(
    const at::Tensor& grad, const at::Tensor& feature, const at::Tensor& weight, double scale,
    at::IntArrayRef offset, std::array<bool, 3> mask) {
  const auto shape = check_score_skip(grad, "grad", feature, weight, offset);
  c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  const auto f = feature.contiguous();
  const auto wt = weight.contiguous();
  at::Tensor gf = mask[0] ? at::empty_like(f) : empty_grad(g);
  at::Tensor gw = mask[1] ? at::empty_like(wt) : empty_grad(g);
  at::Tensor gb = mask[2] ? at::empty({wt.size(0)}, g.options()) : empty_grad(g);
  C10_CUDA_CHECK(cuda::score_skip_backward(
      dtype_of(g), g.const_data_ptr(), f.const_data_ptr(), wt.const_data_ptr(), scale,
      mask[0] ? gf.data_ptr() : nullptr, mask[1] ? gw.data_ptr() : nullptr,
      mask[2] ? gb.data_ptr() : nullptr,
      shape, stream()));
  return {gf, gw, gb};
}

// ---------------------------------------------------------------------------
// conv_transpose2d
// ---------------------------------------------------------------------------

// Validates x/weight and the geometry; returns the launcher shape with the crop.
cuda::ConvTranspose2dShape conv_shape(const at::Tensor& x, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef output_padding, int64_t groups,
                                      at::IntArrayRef dilation, at::IntArrayRef crop) {
  check_input(x, "x");
  check_like(x, "x", weight, "weight", 4);
  const auto st = pair_arg(stride, "stride");
  const auto pad = pair_arg(padding, "padding");
  const auto opad = pair_arg(output_padding, "output_padding");
  const auto dil = pair_arg(dilation, "dilation");
  TORCH_CHECK_VALUE(st[0] > 0 && st[1] > 0, "fcnfast: stride must be positive, got (", st[0],
                    ", ", st[1], ")");
  TORCH_CHECK_VALUE(dil[0] > 0 && dil[1] > 0, "fcnfast: dilation must be positive, got (",
                    dil[0], ", ", dil[1], ")");
  TORCH_CHECK_VALUE(pad[0] >= 0 && pad[1] >= 0 && opad[0] >= 0 && opad[1] >= 0,
                    "fcnfast: padding and output_padding must be non-negative");
  TORCH_CHECK_VALUE(groups > 0, "fcnfast: groups must be positive, got ", groups);
  TORCH_CHECK_VALUE(weight.size(0) == x.size(1), "fcnfast: weight.shape[0] (", weight.size(0),
                    ") must equal the input channels x.shape[1] (", x.size(1), ")");
  TORCH_CHECK_VALUE(x.size(1) % groups == 0, "fcnfast: groups (", groups,
                    ") must divide the input channels (", x.size(1), ")");
  TORCH_CHECK_VALUE(weight.size(2) > 0 && weight.size(3) > 0,
                    "fcnfast: weight kernel size must be positive, got ", shape_str(weight));
  for (int a = 0; a < 2; ++a) {
    TORCH_CHECK_VALUE(opad[a] < st[a] || opad[a] < dil[a], "fcnfast: output_padding (", opad[0],
                      ", ", opad[1], ") must be smaller than stride or dilation");
    check_int32(st[a], "stride");
    check_int32(pad[a], "padding");
    check_int32(dil[a], "dilation");
  }
  const int64_t full_h = conv_transpose_out_size(x.size(2), weight.size(2), st[0], pad[0],
                                                 opad[0], dil[0]);
  const int64_t full_w = conv_transpose_out_size(x.size(3), weight.size(3), st[1], pad[1],
                                                 opad[1], dil[1]);
  TORCH_CHECK_VALUE(full_h > 0 && full_w > 0, "fcnfast: conv_transpose2d output would be ",
                    full_h, "x", full_w, " for input ", shape_str(x), ", weight ",
                    shape_str(weight));
  check_int32(full_h + pad[0] + dil[0] * weight.size(2), "full output height");
  check_int32(full_w + pad[1] + dil[1] * weight.size(3), "full output width");
  const Crop c = check_crop(crop, full_h, full_w);
  const int64_t out_channels = weight.size(1) * groups;
  check_index32_sizes({x.size(0), out_channels, c.height, c.width}, "output");
  return {to_int(x.size(0)), to_int(x.size(1)), to_int(x.size(2)), to_int(x.size(3)),
          to_int(out_channels), to_int(groups), to_int(weight.size(2)), to_int(weight.size(3)),
          to_int(st[0]), to_int(st[1]), to_int(pad[0]), to_int(pad[1]), to_int(dil[0]),
          to_int(dil[1]), to_int(c.top), to_int(c.left), to_int(c.height), to_int(c.width)};
}

at::Tensor conv_transpose2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef dilation, at::IntArrayRef crop) {
  const auto s =
      conv_shape(x, weight, stride, padding, output_padding, groups, dilation, crop);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_like(x, "x", *bias, "bias", 1);
    TORCH_CHECK_VALUE(bias->size(0) == s.out_channels, "fcnfast: bias has ", bias->size(0),
                      " elements, expected the output channels ", s.out_channels);
  }
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  auto out = at::empty({xc.size(0), s.out_channels, s.out_h, s.out_w}, xc.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::conv_transpose2d(dtype_of(xc), xc.const_data_ptr(), wc.const_data_ptr(),
                                        has_bias ? b.const_data_ptr() : nullptr, out.data_ptr(), s,
                                        stream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::IntArrayRef crop, std::array<bool, 3> mask) {
  const auto s =
      conv_shape(x, weight, stride, padding, output_padding, groups, dilation, crop);
  check_like(x, "x", grad, "grad", 4);
  TORCH_CHECK_VALUE(grad.size(0) == x.size(0) && grad.size(1) == s.out_channels &&
                        grad.size(2) == s.out_h && grad.size(3) == s.out_w,
                    "fcnfast: grad ", shape_str(grad), " must have the output shape [", x.size(0),
                    ", ", s.out_channels, ", ", s.out_h, ", ", s.out_w, "]");
  c10::cuda::CUDAGuard guard(x.device());
  const auto g = grad.contiguous();
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  at::Tensor gx = mask[0] ? at::empty_like(xc) : empty_grad(xc);
  at::Tensor gw = mask[1] ? at::empty_like(wc) : empty_grad(xc);
  at::Tensor gb = mask[2] ? at::empty({s.out_channels}, xc.options()) : empty_grad(xc);
  C10_CUDA_CHECK(cuda::conv_transpose2d_backward(
      dtype_of(xc), g.const_data_ptr(), xc.const_data_ptr(), wc.const_data_ptr(),
      mask[0] ? gx.data_ptr() : nullptr, mask[1] ? gw.data_ptr() : nullptr,
      mask[2] ? gb.data_ptr() : nullptr, s, stream()));
  return {gx, gw, gb};
}

// ---------------------------------------------------------------------------
// bilinear_upsample2d, upsample_argmax, upsample_cross_entropy
// ---------------------------------------------------------------------------

cuda::UpsampleShape upsample_shape(int64_t n, int64_t channels, int64_t in_h, int64_t in_w,
                                   int64_t scale, at::IntArrayRef crop) {
  TORCH_CHECK_VALUE(scale > 0, "fcnfast: scale must be a positive int, got ", scale);
  // bounded first, so (in_h + 1) * scale cannot overflow int64
  check_int32(scale, "scale");
  check_int32(in_h, "input height");
  check_int32(in_w, "input width");
  const int64_t full_h = (in_h + 1) * scale, full_w = (in_w + 1) * scale;
  check_int32(full_h, "upsampled height");
  check_int32(full_w, "upsampled width");
  const Crop c = check_crop(crop, full_h, full_w);
  return {to_int(n), to_int(channels), to_int(in_h), to_int(in_w), to_int(scale),
          to_int(c.top), to_int(c.left), to_int(c.height), to_int(c.width)};
}

cuda::UpsampleShape upsample_shape(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  return upsample_shape(x.size(0), x.size(1), x.size(2), x.size(3), scale, crop);
}

at::Tensor bilinear_upsample2d_cuda(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  check_input(x, "x");
  const auto s = upsample_shape(x, scale, crop);
  check_index32_sizes({x.size(0), x.size(1), s.out_h, s.out_w}, "output");
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  auto out = at::empty({xc.size(0), xc.size(1), s.out_h, s.out_w}, xc.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::bilinear_upsample2d(dtype_of(xc), xc.const_data_ptr(), out.data_ptr(), s,
                                           stream()));
  return out;
}

at::Tensor bilinear_upsample2d_backward_cuda(const at::Tensor& grad, int64_t in_h, int64_t in_w,
                                             int64_t scale, at::IntArrayRef crop) {
  check_input(grad, "grad");
  TORCH_CHECK_VALUE(in_h >= 0 && in_w >= 0, "fcnfast: input size must be non-negative, got ",
                    in_h, "x", in_w);
  const auto s = upsample_shape(grad.size(0), grad.size(1), in_h, in_w, scale, crop);
  TORCH_CHECK_VALUE(grad.size(2) == s.out_h && grad.size(3) == s.out_w, "fcnfast: grad ",
                    shape_str(grad), " must match the crop ", s.out_h, "x", s.out_w);
  check_index32_sizes({grad.size(0), grad.size(1), in_h, in_w}, "grad_x");
  c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  auto out = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::bilinear_upsample2d_backward(dtype_of(g), g.const_data_ptr(),
                                                    out.data_ptr(), s, stream()));
  return out;
}

at::Tensor upsample_argmax_cuda(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  check_input(x, "x");
  TORCH_CHECK_VALUE(x.size(1) > 0, "fcnfast: upsample_argmax needs at least one channel, got x ",
                    shape_str(x));
  const auto s = upsample_shape(x, scale, crop);
  check_index32_sizes({x.size(0), s.out_h, s.out_w}, "labels");
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  auto out = at::empty({xc.size(0), s.out_h, s.out_w}, xc.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::upsample_argmax(dtype_of(xc), xc.const_data_ptr(),
                                       out.mutable_data_ptr<int64_t>(), s, stream()));
  return out;
}

struct CrossEntropyArgs {
  cuda::UpsampleShape shape;
  bool mean;
};

CrossEntropyArgs check_cross_entropy(const at::Tensor& x, const at::Tensor& target, int64_t scale,
                                     at::IntArrayRef crop, int64_t ignore_index,
                                     c10::string_view reduction) {
  check_input(x, "x");
  check_defined(target, "target");
  check_dim(target, 3, "target");
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                    "fcnfast: target must be an int64 label map, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == x.device(), "fcnfast: x and target must be on the same "
                    "device, got ", x.device(), " and ", target.device());
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "fcnfast: reduction must be 'mean' or 'sum', got '", std::string(reduction),
                    "'");
  TORCH_CHECK_VALUE(x.size(1) > 0, "fcnfast: upsample_cross_entropy needs at least one class, "
                    "got x ", shape_str(x));
  const auto s = upsample_shape(x, scale, crop);
  TORCH_CHECK_VALUE(target.size(0) == x.size(0) && target.size(1) == s.out_h &&
                        target.size(2) == s.out_w,
                    "fcnfast: target shape ", shape_str(target), " must be (N, H, W) = [",
                    x.size(0), ", ", s.out_h, ", ", s.out_w, "] of the upsampled crop");
  check_index32(target.numel(), "target");
  // Same contract as F.cross_entropy: every label is a class or ignore_index.
  // (One small reduction and a host sync; an out-of-range label must not give
  // a silently wrong loss.)
  if (target.numel() > 0) {
    const bool bad = ((target < 0) | (target >= x.size(1))).logical_and(target != ignore_index)
                         .any()
                         .item<bool>();
    TORCH_CHECK_VALUE(!bad, "fcnfast: target has labels outside [0, ", x.size(1),
                      ") that are not ignore_index (", ignore_index, ")");
  }
  return {s, reduction == "mean"};
}

at::Tensor ce_workspace(const at::Tensor& x, const cuda::UpsampleShape& s) {
  const auto bytes = static_cast<int64_t>(cuda::upsample_cross_entropy_workspace_bytes(s));
  return at::empty({(bytes + 7) / 8}, x.options().dtype(at::kDouble));
}

at::Tensor upsample_cross_entropy_cuda(const at::Tensor& x, const at::Tensor& target,
                                       int64_t scale, at::IntArrayRef crop, int64_t ignore_index,
                                       c10::string_view reduction) {
  const auto a = check_cross_entropy(x, target, scale, crop, ignore_index, reduction);
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto t = target.contiguous();
  auto loss = at::empty({}, xc.options());
  auto ws = ce_workspace(xc, a.shape);
  C10_CUDA_CHECK(cuda::upsample_cross_entropy(dtype_of(xc), xc.const_data_ptr(),
                                              t.const_data_ptr<int64_t>(), ignore_index, a.mean,
                                              loss.data_ptr(), ws.data_ptr(), a.shape, stream()));
  return loss;
}

at::Tensor upsample_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                                                const at::Tensor& target, int64_t scale,
                                                at::IntArrayRef crop, int64_t ignore_index,
                                                c10::string_view reduction) {
  const auto a = check_cross_entropy(x, target, scale, crop, ignore_index, reduction);
  check_defined(grad_loss, "grad_loss");
  check_same(x, "x", grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "fcnfast: grad_loss must have one element, got ",
                    shape_str(grad_loss));
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto t = target.contiguous();
  const auto gl = grad_loss.contiguous();
  auto gx = at::empty_like(xc);
  if (gx.numel() == 0) return gx;
  auto ws = ce_workspace(xc, a.shape);
  C10_CUDA_CHECK(cuda::upsample_cross_entropy_backward(
      dtype_of(xc), gl.const_data_ptr(), xc.const_data_ptr(), t.const_data_ptr<int64_t>(),
      ignore_index, a.mean, gx.data_ptr(), ws.data_ptr(), a.shape, stream()));
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fcnfast, CUDA, m) {
  m.impl("conv_transpose2d", &conv_transpose2d_cuda);
  m.impl("conv_transpose2d_backward", &conv_transpose2d_backward_cuda);
  m.impl("bilinear_upsample2d", &bilinear_upsample2d_cuda);
  m.impl("bilinear_upsample2d_backward", &bilinear_upsample2d_backward_cuda);
  m.impl("skip_add_crop", &skip_add_crop_cuda);
  m.impl("skip_add_crop_backward", &skip_add_crop_backward_cuda);
  m.impl("score_skip", &score_skip_cuda);
  m.impl("score_skip_backward", &score_skip_backward_cuda);
  m.impl("upsample_argmax", &upsample_argmax_cuda);
  m.impl("upsample_cross_entropy", &upsample_cross_entropy_cuda);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cuda);
}

}  // namespace fcnfast
