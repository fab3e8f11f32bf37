// CUDA implementations of the fcnfast ops for the PyTorch dispatcher.
//
// Thin host wrappers: validate the arguments (csrc/host/op_checks.h, the very
// checks the CPU kernels run, plus "the lead tensor is on a CUDA device"; the
// others must share its device), make the inputs contiguous, allocate the
// outputs, then call the torch-free launchers of csrc/cuda/<op>.cu on the
// current stream of the input's device and check the returned error. Compiled
// only when the extension is built with CUDA.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "host/op_checks.h"
#include "host/pending_checks.h"
#include "cuda/launchers.h"

namespace fcnfast {
namespace {

using cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "fcnfast: unsupported dtype ", t.scalar_type());
}

// The tensor an op's other tensors must share a device with is on CUDA.
void check_cuda(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  check_device(t, at::kCUDA, name);
}

int to_int(int64_t v) { return static_cast<int>(v); }

cudaStream_t stream() { return at::cuda::getCurrentCUDAStream().stream(); }

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The outputs of a backward with an output_mask (grad of a, of the weight w and
// of a bias of `bias_size`), uninitialised; one not asked for is a distinct
// empty tensor (outputs must not alias).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_grads(const at::Tensor& a,
                                                            const at::Tensor& w, int64_t bias_size,
                                                            std::array<bool, 3> mask) {
  return {mask[0] ? at::empty_like(a) : empty_grad(a), mask[1] ? at::empty_like(w) : empty_grad(a),
          mask[2] ? at::empty({bias_size}, a.options()) : empty_grad(a)};
}

// ---------------------------------------------------------------------------
// skip_add_crop
// ---------------------------------------------------------------------------

at::Tensor skip_add_crop_cuda(const at::Tensor& coarse, const at::Tensor& skip,
                              at::IntArrayRef offset) {
  check_cuda(coarse, "coarse");
  const auto win = check_skip_add_crop(coarse, skip, offset);
  const int64_t H = win.h, W = win.w;
  const std::array<int64_t, 2> off{win.oy, win.ox};
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
  check_cuda(grad, "grad");
  const auto win = check_skip_add_crop_backward(grad, skip_h, skip_w, offset);
  const int64_t H = win.h, W = win.w;
  const std::array<int64_t, 2> off{win.oy, win.ox};
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

cuda::ScoreSkipShape score_skip_shape(const ScoreSkipWindow& w) {
  return {to_int(w.batch), to_int(w.classes), to_int(w.channels), to_int(w.h), to_int(w.w),
          to_int(w.fh),    to_int(w.fw),      to_int(w.oy),       to_int(w.ox)};
}

at::Tensor score_skip_cuda(const at::Tensor& coarse, const at::Tensor& feature,
                           const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           double scale, at::IntArrayRef offset) {
  check_cuda(coarse, "coarse");
  const auto shape = score_skip_shape(check_score_skip(coarse, feature, weight, bias, offset));
  const bool has_bias = bias.has_value() && bias->defined();
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
  check_cuda(grad, "grad");
  const auto shape = score_skip_shape(check_score_skip_backward(grad, feature, weight, offset));
  c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  const auto f = feature.contiguous();
  const auto wt = weight.contiguous();
  auto [gf, gw, gb] = masked_grads(f, wt, wt.size(0), mask);
  C10_CUDA_CHECK(cuda::score_skip_backward(
      dtype_of(g), g.const_data_ptr(), f.const_data_ptr(), wt.const_data_ptr(), scale,
      mask[0] ? gf.data_ptr() : nullptr, mask[1] ? gw.data_ptr() : nullptr,
      mask[2] ? gb.data_ptr() : nullptr, shape, stream()));
  return {gf, gw, gb};
}

// ---------------------------------------------------------------------------
// conv_transpose2d
// ---------------------------------------------------------------------------

cuda::ConvTranspose2dShape conv_shape(const ConvTransposeArgs& a) {
  const auto& g = a.g;
  return {to_int(a.batch),        to_int(g.in_channels), to_int(g.in_h),     to_int(g.in_w),
          to_int(g.out_channels), to_int(g.groups),      to_int(g.kernel_h), to_int(g.kernel_w),
          to_int(g.stride_h),     to_int(g.stride_w),    to_int(g.pad_h),    to_int(g.pad_w),
          to_int(g.dil_h),        to_int(g.dil_w),       to_int(g.crop_top), to_int(g.crop_left),
          to_int(g.crop_h),       to_int(g.crop_w)};
}

at::Tensor conv_transpose2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef output_padding,
                                 int64_t groups, at::IntArrayRef dilation, at::IntArrayRef crop) {
  check_cuda(x, "x");
  const auto s = conv_shape(check_conv_transpose2d(x, weight, bias, stride, padding, output_padding,
                                                   groups, dilation, crop));
  const bool has_bias = bias.has_value() && bias->defined();
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
  check_cuda(x, "x");
  const auto s = conv_shape(check_conv_transpose2d_backward(
      grad, x, weight, stride, padding, output_padding, groups, dilation, crop));
  c10::cuda::CUDAGuard guard(x.device());
  const auto g = grad.contiguous();
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto [gx, gw, gb] = masked_grads(xc, wc, s.out_channels, mask);
  C10_CUDA_CHECK(cuda::conv_transpose2d_backward(
      dtype_of(xc), g.const_data_ptr(), xc.const_data_ptr(), wc.const_data_ptr(),
      mask[0] ? gx.data_ptr() : nullptr, mask[1] ? gw.data_ptr() : nullptr,
      mask[2] ? gb.data_ptr() : nullptr, s, stream()));
  return {gx, gw, gb};
}

// ---------------------------------------------------------------------------
// bilinear_upsample2d, upsample_argmax, upsample_cross_entropy
// ---------------------------------------------------------------------------

cuda::UpsampleShape upsample_shape(const UpsampleGeometry& u) {
  return {to_int(u.batch),     to_int(u.channels),    to_int(u.in_h),
          to_int(u.in_w),      to_int(u.scale),       to_int(u.crop.top),
          to_int(u.crop.left), to_int(u.crop.height), to_int(u.crop.width)};
}

at::Tensor bilinear_upsample2d_cuda(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  check_cuda(x, "x");
  const auto s = upsample_shape(check_bilinear_upsample2d(x, scale, crop));
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  auto out = at::empty({xc.size(0), xc.size(1), s.out_h, s.out_w}, xc.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(
      cuda::bilinear_upsample2d(dtype_of(xc), xc.const_data_ptr(), out.data_ptr(), s, stream()));
  return out;
}

at::Tensor bilinear_upsample2d_backward_cuda(const at::Tensor& grad, int64_t in_h, int64_t in_w,
                                             int64_t scale, at::IntArrayRef crop) {
  check_cuda(grad, "grad");
  const auto s = upsample_shape(check_bilinear_upsample2d_backward(grad, in_h, in_w, scale, crop));
  c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous();
  auto out = at::empty({g.size(0), g.size(1), in_h, in_w}, g.options());
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::bilinear_upsample2d_backward(dtype_of(g), g.const_data_ptr(), out.data_ptr(),
                                                    s, stream()));
  return out;
}

at::Tensor upsample_argmax_cuda(const at::Tensor& x, int64_t scale, at::IntArrayRef crop) {
  check_cuda(x, "x");
  const auto s = upsample_shape(check_upsample_argmax(x, scale, crop));
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  auto out = at::empty({xc.size(0), s.out_h, s.out_w}, xc.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  C10_CUDA_CHECK(cuda::upsample_argmax(dtype_of(xc), xc.const_data_ptr(),
                                       out.mutable_data_ptr<int64_t>(), s, stream()));
  return out;
}

// ---- the label check of upsample_cross_entropy, reported without a device sync ----
//
// The forward kernel writes the first bad label ({index, value}, or {-1, 0}) to a
// device flag; the binding copies it asynchronously into pinned host memory and
// records an event. Later calls of the op on that device poll the events
// (csrc/host/pending_checks.h) and raise the ValueError of the other backends for
// a completed flag that shows a bad label; fcnfast._C.check_pending_errors()
// waits for them all. FCNFAST_CUDA_SYNC_CHECKS=1 checks every call before it
// returns instead (check_target_values: one reduction and a host sync).

struct LabelCheck {
  at::cuda::CUDAEvent copied;  // recorded after the flag's copy to `flag`
  at::Tensor flag;             // pinned host {index, value}
  int64_t classes, ignore_index;
  bool ready() { return copied.query(); }
  void wait() { copied.synchronize(); }
  bool failed() const { return flag.const_data_ptr<int64_t>()[0] >= 0; }
};

using LabelChecks = PendingChecks<LabelCheck>;

// One list per device (the events of a device complete in its own order).
LabelChecks& label_checks(c10::DeviceIndex device) {
  static std::vector<std::unique_ptr<LabelChecks>> lists = [] {
    std::vector<std::unique_ptr<LabelChecks>> v(c10::cuda::device_count());
    for (auto& l : v) l = std::make_unique<LabelChecks>();
    return v;
  }();
  return *lists.at(static_cast<size_t>(device));
}

void raise_label_check(const std::optional<LabelCheck>& failed) {
  if (!failed) return;
  const int64_t* f = failed->flag.const_data_ptr<int64_t>();
  fail_target_value(f[1], failed->classes, failed->ignore_index,
                    " (found at flat index " + std::to_string(f[0]) +
                        " of the target by the device-side check of an earlier "
                        "upsample_cross_entropy call on CUDA, whose loss is NaN; "
                        "FCNFAST_CUDA_SYNC_CHECKS=1 checks each call before it returns)");
}

// FCNFAST_CUDA_SYNC_CHECKS: unset, "" or "0" lazy, "1" synchronous; read on every call.
bool sync_label_checks() {
  const char* v = std::getenv("FCNFAST_CUDA_SYNC_CHECKS");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "0") == 0) return false;
  TORCH_CHECK_VALUE(std::strcmp(v, "1") == 0,
                    "fcnfast: FCNFAST_CUDA_SYNC_CHECKS must be 0 or 1, got '", v, "'");
  return true;
}

// Queue the copy of the device flag and its event on the current stream.
void defer_label_check(const at::Tensor& flag, int64_t classes, int64_t ignore_index) {
  auto host = at::empty({2}, flag.options().device(at::kCPU).pinned_memory(true));
  host.copy_(flag, /*non_blocking=*/true);
  LabelCheck check{at::cuda::CUDAEvent(cudaEventDisableTiming), host, classes, ignore_index};
  check.copied.record(at::cuda::getCurrentCUDAStream());
  label_checks(flag.device().index()).add(std::move(check));
}

struct CrossEntropyArgs {
  cuda::UpsampleShape shape;
  bool mean;
};

CrossEntropyArgs cross_entropy_args(const CrossEntropyGeometry& checked) {
  return {upsample_shape(checked.u), checked.mean};
}

at::Tensor ce_workspace(const at::Tensor& x, const cuda::UpsampleShape& s) {
  const auto bytes = static_cast<int64_t>(cuda::upsample_cross_entropy_workspace_bytes(s));
  return at::empty({(bytes + 7) / 8}, x.options().dtype(at::kDouble));
}

at::Tensor upsample_cross_entropy_cuda(const at::Tensor& x, const at::Tensor& target, int64_t scale,
                                       at::IntArrayRef crop, int64_t ignore_index,
                                       c10::string_view reduction) {
  check_cuda(x, "x");
  const auto a =
      cross_entropy_args(check_upsample_cross_entropy(x, target, scale, crop, reduction));
  raise_label_check(label_checks(x.device().index()).poll());  // an earlier call's bad label
  // the label values: checked on the device and reported by a later call (the loss is
  // NaN meanwhile), or, with FCNFAST_CUDA_SYNC_CHECKS=1, here (a reduction and a host sync)
  const bool sync = sync_label_checks();
  if (sync) check_target_values(target, x.size(1), ignore_index);
  c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto t = target.contiguous();
  auto loss = at::empty({}, xc.options());
  auto ws = ce_workspace(xc, a.shape);
  const bool defer = !sync && t.numel() > 0;
  auto flag = defer ? at::empty({2}, t.options()) : at::Tensor();
  C10_CUDA_CHECK(cuda::upsample_cross_entropy(
      dtype_of(xc), xc.const_data_ptr(), t.const_data_ptr<int64_t>(), ignore_index, a.mean,
      loss.data_ptr(), defer ? flag.mutable_data_ptr<int64_t>() : nullptr, ws.data_ptr(), a.shape,
      stream()));
  if (defer) defer_label_check(flag, x.size(1), ignore_index);
  return loss;
}

at::Tensor upsample_cross_entropy_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& x,
                                                const at::Tensor& target, int64_t scale,
                                                at::IntArrayRef crop, int64_t ignore_index,
                                                c10::string_view reduction) {
  check_cuda(x, "x");
  // no label-value check of its own (a host sync): the forward checked these labels (on
  // the device; reported here if that check has completed), and a bad one gives NaN
  // gradients (upsample_cross_entropy.cu), never wrong ones
  const auto a = cross_entropy_args(
      check_upsample_cross_entropy_backward(grad_loss, x, target, scale, crop, reduction));
  raise_label_check(label_checks(x.device().index()).poll());
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

// fcnfast._C.check_pending_errors (csrc/bindings.cpp): waits for the label checks of
// every device and raises the first failure.
void check_pending_cuda_errors() {
  for (c10::DeviceIndex d = 0; d < c10::cuda::device_count(); ++d) {
    raise_label_check(label_checks(d).wait_all());
  }
}

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
