// One argument check per op (forward and backward), shared by the CPU kernels
// (csrc/cpu/<op>.cpp) and the CUDA bindings (csrc/cuda/bindings_cuda.cpp).
//
// Each function validates every argument of its op -- tensors, dtypes, sizes,
// geometry and the 32-bit index limits of checks.h (kIndexLimit for elements,
// kExtentLimit for single sizes) -- and returns the geometry the kernels need.
// A backend adds only what is its own: the CUDA bindings check that the
// tensors are on a CUDA device, the CPU ones that they are on the CPU (the
// dispatcher already guarantees that).
//
// The messages are the words of fcnfast/_geometry.py (the Python checks of the
// reference, the public ops and the CuPy backend) with the same values and
// argument names, in the same order of checks; tests/test_error_table.py holds
// both to that. Host-only: includes ATen (see checks.h).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>

#include "host/checks.h"
#include "common/conv_transpose2d.h"
#include "common/geometry.h"

namespace fcnfast {

// ---------------------------------------------------------------------------
// conv_transpose2d
// ---------------------------------------------------------------------------

struct ConvTransposeArgs {
  int64_t batch;
  ConvTranspose2dGeom g;  // with the crop resolved against the full output
};

namespace detail {

inline ConvTransposeArgs check_conv_transpose2d_common(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor* bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::IntArrayRef crop) {
  check_tensor(x, "x", 4);
  check_tensor(weight, "weight", 4);
  check_same(x, "x", weight, "weight");
  if (bias) {
    check_tensor(*bias, "bias", 1);
    check_same(x, "x", *bias, "bias");
  }
  const auto s = pair_arg(stride, "stride");
  const auto p = pair_arg(padding, "padding");
  const auto op = pair_arg(output_padding, "output_padding");
  const auto d = pair_arg(dilation, "dilation");
  TORCH_CHECK_VALUE(s[0] > 0 && s[1] > 0, "fcnfast: stride must be positive, got (", s[0], ", ",
                    s[1], ")");
  TORCH_CHECK_VALUE(d[0] > 0 && d[1] > 0, "fcnfast: dilation must be positive, got (", d[0], ", ",
                    d[1], ")");
  TORCH_CHECK_VALUE(p[0] >= 0 && p[1] >= 0, "fcnfast: padding must be non-negative, got (", p[0],
                    ", ", p[1], ")");
  TORCH_CHECK_VALUE(op[0] >= 0 && op[1] >= 0, "fcnfast: output_padding must be non-negative, got (",
                    op[0], ", ", op[1], ")");
  TORCH_CHECK_VALUE(groups > 0, "fcnfast: groups must be a positive int, got ", groups);
  const int64_t cin = x.size(1);
  TORCH_CHECK_VALUE(weight.size(0) == cin, "fcnfast: weight.shape[0] (", weight.size(0),
                    ") must equal the input channels x.shape[1] (", cin, ")");
  TORCH_CHECK_VALUE(cin % groups == 0, "fcnfast: groups (", groups,
                    ") must divide the input channels (", cin, ")");
  const int64_t cout = weight.size(1) * groups;
  if (bias) {
    TORCH_CHECK_VALUE(bias->size(0) == cout, "fcnfast: bias has ", bias->size(0),
                      " elements, expected the output channels ", cout);
  }
  for (int axis = 0; axis < 2; ++axis) {
    TORCH_CHECK_VALUE(op[axis] < std::max(s[axis], d[axis]), "fcnfast: output_padding (", op[0],
                      ", ", op[1], ") must be smaller than stride (", s[0], ", ", s[1],
                      ") or dilation (", d[0], ", ", d[1], ")");
  }
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(kh > 0 && kw > 0, "fcnfast: weight kernel size must be positive, got ", kh, "x",
                    kw);
  // bounded before the output size is formed, so nothing below overflows int64
  check_extent(s, "stride");
  check_extent(p, "padding");
  check_extent(d, "dilation");
  check_index32(x.sizes(), "x");
  check_index32(weight.sizes(), "weight");
  const int64_t full_h = conv_transpose_out_size(x.size(2), kh, s[0], p[0], op[0], d[0]);
  const int64_t full_w = conv_transpose_out_size(x.size(3), kw, s[1], p[1], op[1], d[1]);
  TORCH_CHECK_VALUE(full_h > 0 && full_w > 0, "fcnfast: conv_transpose2d output would be ", full_h,
                    "x", full_w, " for input ", shape_str(x), ", weight ", shape_str(weight));
  // a full-output position plus the padding (and minus a dilated tap) in int32
  check_extent(full_h + p[0] + d[0] * kh, "the full output height plus padding and dilated kernel");
  check_extent(full_w + p[1] + d[1] * kw, "the full output width plus padding and dilated kernel");
  const Crop c = check_crop(crop, full_h, full_w);
  check_index32({x.size(0), cout, c.height, c.width}, "output");
  return ConvTransposeArgs{
      x.size(0), ConvTranspose2dGeom{cin, x.size(2), x.size(3), cout, groups, kh, kw, s[0], s[1],
                                     p[0], p[1], d[0], d[1], c.top, c.left, c.height, c.width}};
}

}  // namespace detail

inline ConvTransposeArgs check_conv_transpose2d(const at::Tensor& x, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef output_padding, int64_t groups,
                                                at::IntArrayRef dilation, at::IntArrayRef crop) {
  const at::Tensor* b = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  return detail::check_conv_transpose2d_common(x, weight, b, stride, padding, output_padding,
                                               groups, dilation, crop);
}

// The forward's checks on x, weight and the geometry, then grad: the cropped output's shape.
inline ConvTransposeArgs check_conv_transpose2d_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef output_padding, int64_t groups,
    at::IntArrayRef dilation, at::IntArrayRef crop) {
  const auto a = detail::check_conv_transpose2d_common(x, weight, nullptr, stride, padding,
                                                       output_padding, groups, dilation, crop);
  const auto& g = a.g;
  check_tensor(grad, "grad", 4);
  check_same(x, "x", grad, "grad");
  TORCH_CHECK_VALUE(grad.size(0) == a.batch && grad.size(1) == g.out_channels &&
                        grad.size(2) == g.crop_h && grad.size(3) == g.crop_w,
                    "fcnfast: grad has shape ", shape_str(grad), ", expected [", a.batch, ", ",
                    g.out_channels, ", ", g.crop_h, ", ", g.crop_w, "] (the cropped output)");
  return a;
}

// ---------------------------------------------------------------------------
// bilinear_upsample2d, upsample_argmax, upsample_cross_entropy: the frozen
// bilinear upsampling (kernel 2*scale, stride scale) and a crop of its output
// ---------------------------------------------------------------------------

struct UpsampleGeometry {
  int64_t batch, channels, in_h, in_w, scale;
  int64_t full_h, full_w;  // uncropped output size (in_h+1)*scale x (in_w+1)*scale
  Crop crop;
};

// scale, the full output size (bounded before multiplying) and the crop.
inline UpsampleGeometry check_upsample_geometry(int64_t batch, int64_t channels, int64_t in_h,
                                                int64_t in_w, int64_t scale, at::IntArrayRef crop) {
  TORCH_CHECK_VALUE(scale > 0, "fcnfast: scale must be a positive int, got ", scale);
  TORCH_CHECK_VALUE(scale <= kExtentLimit / (in_h + 1) && scale <= kExtentLimit / (in_w + 1),
                    "fcnfast: scale ", scale, " with input size ", in_h, "x", in_w,
                    " gives a full output larger than 32-bit indexing allows (", kExtentLimit, ")");
  UpsampleGeometry u{batch, channels, in_h, in_w, scale, (in_h + 1) * scale, (in_w + 1) * scale,
                     Crop{}};
  u.crop = check_crop(crop, u.full_h, u.full_w);
  return u;
}

inline UpsampleGeometry check_upsample_input(const at::Tensor& x, int64_t scale,
                                             at::IntArrayRef crop) {
  check_tensor(x, "x", 4);
  check_index32(x.sizes(), "x");
  return check_upsample_geometry(x.size(0), x.size(1), x.size(2), x.size(3), scale, crop);
}

// The two rows of channels x full width the row-streaming kernels keep.
inline void check_row_buffers(const UpsampleGeometry& u) {
  check_index32({2, u.channels, u.full_w}, "the row buffers");
}

inline UpsampleGeometry check_bilinear_upsample2d(const at::Tensor& x, int64_t scale,
                                                  at::IntArrayRef crop) {
  const auto u = check_upsample_input(x, scale, crop);
  check_index32({u.batch, u.channels, u.crop.height, u.crop.width}, "output");
  return u;
}

inline UpsampleGeometry check_bilinear_upsample2d_backward(const at::Tensor& grad,
                                                           int64_t in_height, int64_t in_width,
                                                           int64_t scale, at::IntArrayRef crop) {
  check_tensor(grad, "grad", 4);
  check_index32(grad.sizes(), "grad");
  TORCH_CHECK_VALUE(in_height >= 0 && in_width >= 0,
                    "fcnfast: in_height and in_width must be non-negative, got ", in_height,
                    " and ", in_width);
  const auto u =
      check_upsample_geometry(grad.size(0), grad.size(1), in_height, in_width, scale, crop);
  TORCH_CHECK_VALUE(grad.size(2) == u.crop.height && grad.size(3) == u.crop.width,
                    "fcnfast: grad of shape ", shape_str(grad), " does not match the crop ",
                    u.crop.height, "x", u.crop.width);
  check_index32({u.batch, u.channels, in_height, in_width}, "grad_x");
  check_row_buffers(u);
  return u;
}

inline UpsampleGeometry check_upsample_argmax(const at::Tensor& x, int64_t scale,
                                              at::IntArrayRef crop) {
  check_tensor(x, "x", 4);
  check_index32(x.sizes(), "x");
  TORCH_CHECK_VALUE(x.size(1) > 0,
                    "fcnfast: upsample_argmax needs at least one channel, got x "
                    "of shape ",
                    shape_str(x));
  const auto u = check_upsample_geometry(x.size(0), x.size(1), x.size(2), x.size(3), scale, crop);
  check_index32({u.batch, u.crop.height, u.crop.width}, "output");
  check_row_buffers(u);
  return u;
}

struct CrossEntropyGeometry {
  UpsampleGeometry u;
  bool mean;  // reduction == "mean" (else "sum")
};

// Everything but the label values (checked by the kernels' first pass on the CPU
// and by check_target_values on CUDA, with fail_target_value's message).
inline CrossEntropyGeometry check_upsample_cross_entropy(const at::Tensor& x,
                                                         const at::Tensor& target, int64_t scale,
                                                         at::IntArrayRef crop,
                                                         c10::string_view reduction) {
  check_tensor(x, "x", 4);
  check_index32(x.sizes(), "x");
  check_tensor(target, "target", 3, /*floating=*/false);
  TORCH_CHECK_VALUE(target.scalar_type() == at::kLong,
                    "fcnfast: target must be an int64 label map, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.device() == x.device(),
                    "fcnfast: x and target must be on the same "
                    "device, got ",
                    x.device(), " and ", target.device());
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum",
                    "fcnfast: reduction must be 'mean' or 'sum', got '", std::string(reduction),
                    "'");
  TORCH_CHECK_VALUE(x.size(1) > 0,
                    "fcnfast: upsample_cross_entropy needs at least one class, "
                    "got x of shape ",
                    shape_str(x));
  const auto u = check_upsample_geometry(x.size(0), x.size(1), x.size(2), x.size(3), scale, crop);
  TORCH_CHECK_VALUE(target.size(0) == u.batch && target.size(1) == u.crop.height &&
                        target.size(2) == u.crop.width,
                    "fcnfast: target shape ", shape_str(target), " must be (N, H, W) = [", u.batch,
                    ", ", u.crop.height, ", ", u.crop.width, "] of the upsampled crop");
  check_index32(target.sizes(), "target");
  check_row_buffers(u);
  return {u, reduction == "mean"};
}

inline CrossEntropyGeometry check_upsample_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& target, int64_t scale,
    at::IntArrayRef crop, c10::string_view reduction) {
  const auto a = check_upsample_cross_entropy(x, target, scale, crop, reduction);
  check_defined(grad_loss, "grad_loss");
  check_same(x, "x", grad_loss, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss.numel() == 1,
                    "fcnfast: grad_loss must hold one value (the loss "
                    "is a scalar), got shape ",
                    shape_str(grad_loss));
  return a;
}

// A label that is neither a class of x nor ignore_index (F.cross_entropy's contract).
// note: appended, e.g. the CUDA binding's word that a device check of an earlier
// call found it.
[[noreturn]] inline void fail_target_value(int64_t value, int64_t classes, int64_t ignore_index,
                                           const std::string& note = std::string()) {
  TORCH_CHECK_VALUE(false, "fcnfast: target value ", value, " is out of bounds: classes are [0, ",
                    classes, ") (x has ", classes, " channels) and ignore_index is ", ignore_index,
                    note);
  __builtin_unreachable();
}

// The label check as tensor operations (any device; one reduction and a host
// sync): the first offending label in memory order, as the CPU kernels report it.
inline void check_target_values(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  if (target.numel() == 0) return;
  const auto bad = ((target < 0) | (target >= classes)).logical_and(target != ignore_index);
  if (!bad.any().item<bool>()) return;
  const auto first = bad.reshape(-1).to(at::kByte).argmax();
  fail_target_value(target.reshape(-1).index({first}).item<int64_t>(), classes, ignore_index);
}

// ---------------------------------------------------------------------------
// skip_add_crop and score_skip: a window of a larger map at an offset
// ---------------------------------------------------------------------------

// The h x w window at `offset` lies inside a map of size map_h x map_w (no overflow).
inline std::array<int64_t, 2> check_window(at::IntArrayRef offset, int64_t h, int64_t w,
                                           int64_t map_h, int64_t map_w, const char* map_name) {
  const auto off = pair_arg(offset, "offset");
  TORCH_CHECK_VALUE(off[0] >= 0 && off[1] >= 0 && h <= map_h - off[0] && w <= map_w - off[1],
                    "fcnfast: offset (", off[0], ", ", off[1], ") with window ", h, "x", w,
                    " lies outside ", map_name, " of size ", map_h, "x", map_w);
  return off;
}

struct SkipWindow {
  int64_t batch, channels, h, w;  // coarse / grad (batch, channels, h, w)
  int64_t skip_h, skip_w, oy, ox;
};

inline SkipWindow check_skip_add_crop(const at::Tensor& coarse, const at::Tensor& skip,
                                      at::IntArrayRef offset) {
  check_tensor(coarse, "coarse", 4);
  check_tensor(skip, "skip", 4);
  check_same(coarse, "coarse", skip, "skip");
  TORCH_CHECK_VALUE(coarse.size(0) == skip.size(0) && coarse.size(1) == skip.size(1),
                    "fcnfast: coarse ", shape_str(coarse), " and skip ", shape_str(skip),
                    " must agree in batch and channels");
  const int64_t h = coarse.size(2), w = coarse.size(3);
  const auto off = check_window(offset, h, w, skip.size(2), skip.size(3), "skip");
  check_index32(coarse.sizes(), "coarse");
  check_index32(skip.sizes(), "skip");
  return {coarse.size(0), coarse.size(1), h, w, skip.size(2), skip.size(3), off[0], off[1]};
}

inline SkipWindow check_skip_add_crop_backward(const at::Tensor& grad, int64_t skip_height,
                                               int64_t skip_width, at::IntArrayRef offset) {
  check_tensor(grad, "grad", 4);
  const int64_t h = grad.size(2), w = grad.size(3);
  const auto off = check_window(offset, h, w, skip_height, skip_width, "skip");
  check_index32(grad.sizes(), "grad");
  check_index32({grad.size(0), grad.size(1), skip_height, skip_width}, "grad_skip");
  return {grad.size(0), grad.size(1), h, w, skip_height, skip_width, off[0], off[1]};
}

struct ScoreSkipWindow {
  int64_t batch, channels, classes;  // N, C (feature), K (weight.shape[0])
  int64_t h, w;                      // coarse / window size
  int64_t fh, fw;                    // feature size
  int64_t oy, ox;                    // window offset in the feature map
};

namespace detail {

// `lead` is coarse (forward) or grad (backward): (N, K, H, W), H x W the window.
inline ScoreSkipWindow check_score_skip_common(const at::Tensor& lead, const char* lead_name,
                                               const at::Tensor& feature, const at::Tensor& weight,
                                               const at::Tensor* bias, at::IntArrayRef offset) {
  check_tensor(lead, lead_name, 4);
  check_tensor(feature, "feature", 4);
  check_tensor(weight, "weight", 4);
  check_same(lead, lead_name, feature, "feature");
  check_same(lead, lead_name, weight, "weight");
  TORCH_CHECK_VALUE(weight.size(2) == 1 && weight.size(3) == 1,
                    "fcnfast: weight must be a 1x1 convolution weight (K, C, 1, 1), got ",
                    shape_str(weight));
  TORCH_CHECK_VALUE(weight.size(1) == feature.size(1), "fcnfast: weight.shape[1] (", weight.size(1),
                    ") must equal feature channels (", feature.size(1), ")");
  const int64_t n = lead.size(0), k = lead.size(1), h = lead.size(2), w = lead.size(3);
  TORCH_CHECK_VALUE(n == feature.size(0) && k == weight.size(0), "fcnfast: ", lead_name,
                    " has batch ", n, " and ", k, " channels, expected batch ", feature.size(0),
                    " and ", weight.size(0), " channels (weight.shape[0])");
  if (bias) {
    check_tensor(*bias, "bias", 1);
    check_same(lead, lead_name, *bias, "bias");
    TORCH_CHECK_VALUE(bias->size(0) == k, "fcnfast: bias has ", bias->size(0),
                      " elements, expected ", k);
  }
  const int64_t fh = feature.size(2), fw = feature.size(3);
  const auto off = check_window(offset, h, w, fh, fw, "feature");
  check_index32(lead.sizes(), lead_name);
  check_index32(feature.sizes(), "feature");
  check_index32(weight.sizes(), "weight");
  return {n, feature.size(1), k, h, w, fh, fw, off[0], off[1]};
}

}  // namespace detail

inline ScoreSkipWindow check_score_skip(const at::Tensor& coarse, const at::Tensor& feature,
                                        const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias,
                                        at::IntArrayRef offset) {
  const at::Tensor* b = (bias.has_value() && bias->defined()) ? &*bias : nullptr;
  return detail::check_score_skip_common(coarse, "coarse", feature, weight, b, offset);
}

inline ScoreSkipWindow check_score_skip_backward(const at::Tensor& grad, const at::Tensor& feature,
                                                 const at::Tensor& weight, at::IntArrayRef offset) {
  return detail::check_score_skip_common(grad, "grad", feature, weight, nullptr, offset);
}

}  // namespace fcnfast
