"""Public fcnfast ops: native kernels with autograd, falling back to ``fcnfast.reference``.

Each function has the same name and signature as its reference definition and
computes the expression stated in its docstring. When the compiled extension is
loaded and has a kernel for the input's device, the call goes through
``torch.ops.fcnfast.<op>`` -- a dispatcher op with autograd and fake (meta)
kernels, so ``torch.compile`` and ``torch.library.opcheck`` see it. Otherwise
the pure-PyTorch reference runs.

Shapes: every op takes NCHW tensors or, like ``torch.nn.ConvTranspose2d``, unbatched
CHW ones (``upsample_cross_entropy``: an (H, W) target with a (C, H, W) ``x``); an
unbatched call equals the batched call on ``x.unsqueeze(0)`` with the batch dimension
removed again. The ``torch.ops.fcnfast`` dispatcher ops themselves take NCHW only.

Gradients: the differentiable ops (all but ``upsample_argmax``) support gradients of
any order on every backend -- ``create_graph=True`` double backward, Hessian-vector
products, ``torch.func.grad`` / ``jacrev`` / ``jacfwd`` / ``hessian`` / ``vmap`` and
forward-mode AD. On the native backend the backward of each op is again a native op
with its own autograd formula (see ``_register``), so higher-order gradients run on the
same kernels. Integer arguments (``upsample_cross_entropy``'s ``target``, the labels
of ``upsample_argmax``) carry no gradient: PyTorch refuses ``requires_grad`` on
integer tensors, and ``torch.func`` refuses to differentiate with respect to them.

Mixed precision: under ``torch.autocast`` (CPU or CUDA) each op casts its tensors by its
rule (``fcnfast._autocast.RULES``, stated in each docstring) on both backends; the
``torch.ops.fcnfast`` dispatcher ops have ``AutocastCPU`` / ``AutocastCUDA`` kernels with
the same rules.
"""

from __future__ import annotations

import math

import torch
from torch._functorch import utils as _functorch_utils
from torch.autograd.forward_ad import _set_fwd_grad_enabled

from . import _autocast, _backend, reference
from . import _geometry as geo

__all__ = list(reference.OPS)


TRACE_REFUSAL = (
    "fcnfast.%s cannot be recorded by torch.jit.trace (or the TorchScript-based "
    "torch.onnx.export(..., dynamo=False)): its crop geometry depends on the input size, and a "
    "trace would freeze it as constants, silently giving wrong output sizes for other inputs. "
    "Use torch.export.export with dynamic Dims (fcnfast.export.export_program) or "
    "torch.onnx.export(..., dynamo=True) (fcnfast.export.export_onnx, `fcnfast export`) "
    "instead: both keep batch, height and width dynamic."
)


def _refuse_trace(name: str) -> None:
    """Raise when torch.jit.trace records the call: never a silently size-frozen trace."""
    if torch.jit.is_tracing():
        raise RuntimeError(TRACE_REFUSAL % name)


@torch.compiler.assume_constant_result
def _use_native(op: str, device_type: str) -> bool:
    return _backend.has_kernel(op, device_type)


def _native_or_reference(op: str, device_type: str, args, reference_args=None):
    """``torch.ops.fcnfast.<op>(*args)`` where the op has a kernel for the device, else the
    reference (``reference_args``, default ``args``) with autocast off (the caller cast)."""
    if _use_native(op, device_type):
        native = getattr(torch.ops.fcnfast, op)
        if _plain_call(args):
            # no autograd history to record: skip the Python autograd kernel (_differentiable)
            # and its redispatch, ~20-40 us per call, what small ops cost in themselves
            with torch._C._AutoDispatchBelowAutograd():
                return native(*args)
        return native(*args)
    with _autocast.disabled(device_type):
        return getattr(reference, op)(*(args if reference_args is None else reference_args))


def _upsample_op(name: str, check, x, scale, crop):
    """The public bilinear_upsample2d / upsample_argmax: ``check`` is the op's argument check."""
    _refuse_trace(name)
    if geo.is_unbatched(x, "x"):
        return _upsample_op(name, check, x.unsqueeze(0), scale, crop).squeeze(0)
    (x,) = _autocast.cast(name, x.device.type, (x,))
    crop = check(x, scale, crop)
    return _native_or_reference(name, x.device.type, (x, scale, crop))


def conv_transpose2d(
    x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, crop=None
):
    """Transposed convolution with a fused output crop.

    ``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)[..., top:top+h, left:left+w]``
    with ``crop=(top, left, h, w)`` (``None``: the full output). Only the kept
    output pixels are computed (phase decomposition: each output pixel gathers
    the taps that land on it). Gradients of any order for ``x``, ``weight`` and ``bias``.
    ``x`` is (N, C_in, H, W) or unbatched (C_in, H, W).

    Args:
        x (Tensor): the input.
        weight (Tensor): (C_in, C_out / groups, kH, kW), as ``F.conv_transpose2d``.
        bias (Tensor, optional): (C_out,).
        stride, padding, output_padding, dilation (int or (int, int)): as
            ``F.conv_transpose2d``; stride and dilation positive, the paddings non-negative,
            output_padding smaller than stride or dilation.
        groups (int): positive, divides C_in.
        crop ((int, int, int, int), optional): (top, left, h, w) inside the full output.

    Shape:
        - x: (N, C_in, H, W) or (C_in, H, W).
        - Output: (N, C_out, h, w) (or (C_out, h, w)); without ``crop`` the full
          ``(H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1``.

    dtype:
        float32, float64, bfloat16 or float16 (every floating tensor the same dtype and
        device); the result has the input's dtype.

    Under ``torch.autocast``: ``x``, ``weight`` and ``bias`` are cast to the autocast dtype
    (as ``F.conv_transpose2d``); the kernel accumulates in fp32. bfloat16 on a CPU with
    AVX512-BF16: the phase GEMMs of the forward and the backward run on oneDNN's bf16 kernels
    (fp32 accumulation; the forward's sum is rounded to bfloat16 before the bias is added, the
    weight gradient summed over images in fp32); elsewhere the operands are converted to fp32.
    """
    _refuse_trace("conv_transpose2d")
    if geo.is_unbatched(x, "x"):
        return conv_transpose2d(
            x.unsqueeze(0), weight, bias, stride, padding, output_padding, groups, dilation, crop
        ).squeeze(0)
    x, weight, bias = _autocast.cast("conv_transpose2d", x.device.type, (x, weight, bias))
    stride, padding, output_padding, dilation, crop = geo.check_conv_transpose2d(
        x, weight, bias, stride, padding, output_padding, groups, dilation, crop
    )
    return _native_or_reference(
        "conv_transpose2d",
        x.device.type,
        (x, weight, bias, stride, padding, output_padding, groups, dilation, crop),
    )


def bilinear_upsample2d(x, scale: int, crop=None):
    """Frozen FCN bilinear upsampling (depthwise deconvolution, kernel ``2*scale``, stride ``scale``).

    ``F.conv_transpose2d(x, bilinear_filter(2*scale).expand(C, 1, k, k), stride=scale, groups=C)[..., top:top+h, left:left+w]``.
    The Caffe bilinear weights are computed analytically (no weight tensor).
    Output full size is ``((H+1)*scale, (W+1)*scale)`` before the crop. ``x`` is
    (N, C, H, W) or unbatched (C, H, W); gradients of any order for ``x``.

    Args:
        x (Tensor): the coarse scores.
        scale (int): the upsampling factor (positive).
        crop ((int, int, int, int), optional): (top, left, h, w) inside the full output.

    Shape:
        - x: (N, C, H, W) or (C, H, W).
        - Output: (N, C, h, w) (or (C, h, w)); without ``crop`` ((H+1)*scale, (W+1)*scale).

    dtype:
        float32, float64, bfloat16 or float16 (every floating tensor the same dtype and
        device); the result has the input's dtype.

    Under ``torch.autocast``: ``x`` is cast to the autocast dtype (the expression is a
    ``F.conv_transpose2d``); the kernel accumulates in fp32.
    """
    return _upsample_op("bilinear_upsample2d", geo.check_bilinear_upsample2d, x, scale, crop)


def skip_add_crop(coarse, skip, offset):
    """``coarse + skip[..., oy:oy+H, ox:ox+W]`` with ``(H, W) = coarse.shape[-2:]``.

    ``coarse`` and ``skip`` both (N, C, ., .) or both unbatched (C, ., .); gradients of any
    order for both.

    Args:
        coarse (Tensor): the map the window is added to.
        skip (Tensor): the larger map the window is cut from.
        offset (int or (int, int)): (oy, ox), the window's top-left corner in ``skip``.

    Shape:
        - coarse: (N, C, H, W) or (C, H, W).
        - skip: (N, C, H_s, W_s) or (C, H_s, W_s), the window inside it.
        - Output: ``coarse``'s shape.

    dtype:
        float32, float64, bfloat16 or float16 (every floating tensor the same dtype and
        device); the result has the input's dtype.

    Under ``torch.autocast``: both are cast to the wider of their dtypes (as ``+``).
    """
    _refuse_trace("skip_add_crop")
    if geo.same_batching(coarse, "coarse", skip, "skip"):
        return skip_add_crop(coarse.unsqueeze(0), skip.unsqueeze(0), offset).squeeze(0)
    coarse, skip = _autocast.cast("skip_add_crop", coarse.device.type, (coarse, skip))
    offset = geo.check_skip_add_crop(coarse, skip, offset)
    return _native_or_reference("skip_add_crop", coarse.device.type, (coarse, skip, offset))


def score_skip(coarse, feature, weight, bias=None, scale: float = 1.0, offset=(0, 0)):
    """Fused FCN skip step: 1x1 score conv on the kept window only, then add.

    ``coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]``.
    ``coarse`` and ``feature`` both batched (N, ., ., .) or both unbatched; gradients of any
    order for ``coarse``, ``feature``, ``weight`` and ``bias``.

    Args:
        coarse (Tensor): the map the scores are added to.
        feature (Tensor): the pooled feature map scored with ``weight``.
        weight (Tensor): (K, C, 1, 1), the 1x1 score convolution.
        bias (Tensor, optional): (K,).
        scale (float): the feature scaling (FCN-8s at-once).
        offset (int or (int, int)): (oy, ox), the window's top-left corner in ``feature``.

    Shape:
        - coarse: (N, K, H, W) or (K, H, W).
        - feature: (N, C, H_f, W_f) or (C, H_f, W_f), the H x W window inside it.
        - Output: ``coarse``'s shape.

    dtype:
        float32, float64, bfloat16 or float16 (every floating tensor the same dtype and
        device); the result has the input's dtype.

    Under ``torch.autocast``: all tensors are cast to the wider of ``coarse``'s dtype and the
    autocast dtype (the 1x1 conv in the autocast dtype, then ``+`` promotes to ``coarse``'s);
    the kernel accumulates in fp32.
    """
    _refuse_trace("score_skip")
    if geo.same_batching(coarse, "coarse", feature, "feature"):
        return score_skip(
            coarse.unsqueeze(0), feature.unsqueeze(0), weight, bias, scale, offset
        ).squeeze(0)
    coarse, feature, weight, bias = _autocast.cast(
        "score_skip", coarse.device.type, (coarse, feature, weight, bias)
    )
    offset = geo.check_score_skip(coarse, feature, weight, bias, offset)
    return _native_or_reference(
        "score_skip",
        coarse.device.type,
        (coarse, feature, weight, bias, float(scale), offset),
        (coarse, feature, weight, bias, scale, offset),
    )


def upsample_argmax(x, scale: int, crop=None):
    """``bilinear_upsample2d(x, scale, crop).argmax(1)`` without materialising the C x H x W scores.

    Returns the int64 label map (N, h, w), or (h, w) for an unbatched (C, H, W) ``x``; ties go
    to the lowest class index, as ``argmax``. Not differentiable (integer output).

    Args:
        x (Tensor): the coarse scores (at least one class).
        scale (int): the upsampling factor (positive).
        crop ((int, int, int, int), optional): (top, left, h, w) inside the full output.

    Shape:
        - x: (N, C, H, W) or (C, H, W).
        - Output: (N, h, w) (or (h, w)); without ``crop`` ((H+1)*scale, (W+1)*scale).

    dtype:
        ``x`` float32, float64, bfloat16 or float16; the output is int64.

    Under ``torch.autocast``: ``x`` is cast to float32 (the coarse map is small; the labels
    are then those of the fp32 reference on the same scores).
    """
    return _upsample_op("upsample_argmax", geo.check_upsample_argmax, x, scale, crop)


def upsample_cross_entropy(
    x, target, scale: int, crop=None, ignore_index: int = 255, reduction: str = "mean"
):
    """Fused final upsampling + softmax cross-entropy.

    ``F.cross_entropy(bilinear_upsample2d(x, scale, crop), target, ignore_index=ignore_index, reduction=reduction)``,
    computed without holding the full-resolution logits or their gradient. ``x`` (N, C, H, W)
    with ``target`` (N, h, w), or unbatched ``x`` (C, H, W) with ``target`` (h, w): one image,
    the batched call with N = 1 (``F.cross_entropy`` itself would read a 3-D input as (N, C, d)).

    Gradients of any order for ``x`` (the second-order formulas materialise the upsampled
    softmax while such a graph is built); ``target`` is an int64 label map and not
    differentiable.

    Args:
        x (Tensor): the coarse scores (at least one class).
        target (Tensor): int64 labels in [0, C) or ``ignore_index``.
        scale (int): the upsampling factor (positive).
        crop ((int, int, int, int), optional): (top, left, h, w) inside the full output.
        ignore_index (int): the label that contributes nothing.
        reduction (str): ``"mean"`` (over the non-ignored pixels) or ``"sum"``.

    Shape:
        - x: (N, C, H, W) or (C, H, W).
        - target: (N, h, w) or (h, w), the (cropped) upsampled size.
        - Output: a scalar.

    dtype:
        ``x`` float32, float64, bfloat16 or float16, ``target`` int64 on ``x``'s device; the
        loss has ``x``'s dtype.

    Under ``torch.autocast``: ``x`` is cast to float32 and the loss is float32 (as
    ``F.cross_entropy`` under autocast); the gradient reaches a bf16/fp16 ``x`` in its dtype.

    Raises:
        ValueError: a ``target`` value outside [0, C) that is not ``ignore_index``
            ("target value V is out of bounds: ..."). On the CPU and with the CuPy backend
            at once. With the compiled CUDA kernels the labels are checked on the device,
            so a training step costs no device-to-host sync: the call returns a NaN loss
            (either reduction; its gradients for that pixel's inputs are NaN too), and the
            error is raised by a later ``upsample_cross_entropy`` call (forward or backward)
            on that device once the check has completed, or by
            :func:`check_pending_errors`, which waits for it; the message adds that an
            earlier call's device-side check found it. ``FCNFAST_CUDA_SYNC_CHECKS=1``
            checks every call before it returns instead (one host sync per call).
    """
    _refuse_trace("upsample_cross_entropy")
    if geo.same_batching(x, "x", target, "target", "H, W"):
        return upsample_cross_entropy(
            x.unsqueeze(0), target.unsqueeze(0), scale, crop, ignore_index, reduction
        )
    (x,) = _autocast.cast("upsample_cross_entropy", x.device.type, (x,))
    crop = geo.check_upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction)
    return _native_or_reference(
        "upsample_cross_entropy",
        x.device.type,
        (x, target, scale, crop, int(ignore_index), reduction),
        (x, target, scale, crop, ignore_index, reduction),
    )


def check_pending_errors() -> None:
    """Wait for the device-side checks of earlier CUDA calls and raise the first failure.

    The compiled CUDA ``upsample_cross_entropy`` checks its labels on the device and reports
    a bad one at a later call (see its docstring); this waits for every such pending check
    on every device and raises its ``ValueError`` now, e.g. at the end of an epoch or
    before trusting a NaN loss. A no-op without the compiled CUDA kernels (the CPU, the
    CuPy backend and the reference check at once) or when nothing is pending.
    """
    check = getattr(_backend.extension(), "check_pending_errors", None)
    if check is not None:
        check()


# ---------------------------------------------------------------------------
# fake kernels and autograd for the dispatcher ops (only when the extension loaded)
# ---------------------------------------------------------------------------
#
# Every differentiable op *and every backward op* has an Autograd kernel made from a
# torch.autograd.Function (``_autograd`` below) with ``backward`` (reverse mode) and
# ``jvp`` (forward mode), and a vmap rule (the op once per batch entry). The formulas
# call fcnfast's own dispatcher ops: the ops are linear (or bilinear) in their tensor
# arguments, so the gradient of a backward op is the op itself or its adjoint, e.g. the
# gradient of conv_transpose2d_backward's grad_x with respect to weight is
# conv_transpose2d_backward's grad_weight of the incoming gradient. Because those ops have Autograd kernels too,
# gradients of any order stay on the native kernels and are exact (double backward,
# gradient penalties, Hessian-vector products, torch.func.jacrev / jacfwd / hessian).
# The one nonlinear op, upsample_cross_entropy, differentiates its backward through
# bilinear_upsample2d, softmax and bilinear_upsample2d_backward (the full-resolution
# softmax exists only while such a second-order graph is built).
#
# The formulas only call dispatcher ops, so they are device-agnostic: CPU, compiled CUDA
# and CuPy kernels all register under the same op names and get the same autograd.

_LIB = None  # torch.library.Library holding the Autograd / vmap kernels
_NOT_DIFFERENTIABLE = ("dense_crf", "permutohedral_filter")  # inference-only CRF ops


def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _or_none(t: torch.Tensor, wanted: bool):
    return t if wanted else None


def _plain_call(args) -> bool:
    """True when a native call needs no autograd kernel at all: no gradient or tangent to
    record, no functorch transform, not traced by torch.compile (which sees the op whole)."""
    return (
        not torch.compiler.is_compiling()
        and not _wants_autograd(args)
        and not torch._C._are_functorch_transforms_active()
    )


def _wants_autograd(args) -> bool:
    """True when a call must record autograd history or forward-mode tangents."""
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return True
    return torch.autograd.forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled()


def _vmap_loop(op):
    """vmap rule: the op once per batch entry (the kernels have no batch-of-batches mode)."""

    def rule(info, in_dims, *args):
        outs = [
            op(
                *[
                    a.select(d, b) if isinstance(a, torch.Tensor) and d is not None else a
                    for a, d in zip(args, in_dims)
                ]
            )
            for b in range(info.batch_size)
        ]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
        return torch.stack(outs), 0

    return rule


def _autograd(name, setup_context, backward, jvp):
    """Register the Autograd kernel and the vmap rule of ``fcnfast::<name>``.

    The kernel plays the part of a C++ autograd kernel: it records one autograd node
    (an autograd.Function whose forward redispatches below autograd) on the tensors it
    is given. Under torch.func transforms those are the functorch wrappers of the level
    being processed, so the node is a single-level Function there, as functorch's own
    kernels are; the other levels see the op again when it is redispatched.
    """
    op = getattr(torch.ops.fcnfast, name).default

    def forward(*args):
        keyset = args[-1] & torch._C._after_autograd_keyset
        if torch._C._are_functorch_transforms_active():
            # Function.apply turned grad modes off for this level; the levels below (reached
            # through the redispatch) keep theirs, as in functorch's own single-level Functions
            with (
                torch.enable_grad(),
                _set_fwd_grad_enabled(True),
                torch._C._AutoDispatchBelowAutograd(),
            ):
                return op.redispatch(keyset, *args[:-1])
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset, *args[:-1])

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs[:-1], output)

    def bwd(ctx, *grads):
        needs = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = needs[:-1]
            return tuple(backward(ctx, *grads)) + (None,)
        finally:
            ctx.needs_input_grad = needs

    def fwd_jvp(ctx, *tangents):
        return jvp(ctx, *tangents[:-1])

    fn = type(
        "fcnfast_%s" % name,
        (torch.autograd.Function,),
        dict(
            forward=staticmethod(forward),
            setup_context=staticmethod(setup),
            backward=staticmethod(bwd),
            jvp=staticmethod(fwd_jvp),
        ),
    )
    apply_here = super(torch.autograd.Function, fn).apply  # _C._FunctionBase.apply

    def kernel(keyset, *args):
        if not _wants_autograd(args):
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)
        if torch._C._are_functorch_transforms_active():
            with _functorch_utils.enable_single_level_autograd_function():
                return apply_here(*args, keyset)
        return fn.apply(*args, keyset)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)
    torch.library.register_vmap("fcnfast::" + name, _vmap_loop(op), lib=_LIB)


def _not_differentiable(name):
    """Autograd kernel of an inference-only op: raise when a gradient is asked for."""
    op = getattr(torch.ops.fcnfast, name).default

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            raise RuntimeError(
                "fcnfast::%s is inference-only and not differentiable: detach its inputs or call "
                "it under torch.no_grad()" % name
            )
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    _LIB.impl(name, kernel, "Autograd", with_keyset=True)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _bias_map(b: torch.Tensor, shape) -> torch.Tensor:
    """A per-channel vector broadcast over an (N, C, H, W) output, as a new tensor."""
    return b.view(1, -1, 1, 1).expand(shape).contiguous()


def _fill(outs, shapes, like):
    """Replace missing tangents by zeros of the output's shape."""
    return tuple(like.new_zeros(s) if o is None else o for o, s in zip(outs, shapes))


def _save(ctx, tensors, args):
    """setup_context's common part: the tensors for backward and for jvp, the other inputs."""
    ctx.save_for_backward(*tensors)
    ctx.save_for_forward(*tensors)
    ctx.args = tuple(args)


def _materialized(grads, mask):
    """The incoming gradients of a backward op's outputs; None where the output is unused or
    output_mask is False (the output is then an empty placeholder)."""
    return [g if m else None for g, m in zip(grads, mask)]


def _autograd_backward_op(name, backward_op, tangent):
    """Autograd of a backward op ``(grad, a, w, *args, mask) -> (grad_a, grad_w, grad_bias)``
    linear in grad and in w and bilinear in (grad, a): conv_transpose2d_backward (a = x) and
    score_skip_backward (a = feature). ``tangent(a, w, ta, tw, tbias, args, shape)`` is the
    forward op's tangent (None without tangents)."""

    def setup(ctx, inputs, output):
        grad, a, w = inputs[:3]
        _save(ctx, (grad, a, w), inputs[3:-1])
        ctx.mask = list(inputs[-1])
        ctx.shapes = [o.shape for o in output]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no work

    def backward(ctx, gga, ggw, ggb):
        grad, a, w = ctx.saved_tensors
        gga, ggw, ggb = _materialized((gga, ggw, ggb), ctx.mask)
        need_g, need_a, need_w = ctx.needs_input_grad[:3]
        dg = da = dw = None
        if need_g:
            dg = tangent(a, w, gga, ggw, ggb, ctx.args, grad.shape)
        if need_a and ggw is not None:  # <ggw, grad_w(a, grad)> = <grad, op(a, ggw)>
            da = backward_op(grad, a, ggw, *ctx.args, [True, False, False])[0]
        if need_w and gga is not None:  # <gga, grad_a(w, grad)> = <grad, op(gga, w)>
            dw = backward_op(grad, gga, w, *ctx.args, [False, True, False])[1]
        return (dg, da, dw) + (None,) * (len(ctx.args) + 1)

    def jvp(ctx, tg, ta, tw, *_):
        grad, a, w = ctx.saved_tensors
        mask = ctx.mask
        outs = [None] * 3
        if tg is not None:
            outs = [o if m else None for o, m in zip(backward_op(tg, a, w, *ctx.args, mask), mask)]
        if tw is not None and mask[0]:
            outs[0] = _add(outs[0], backward_op(grad, a, tw, *ctx.args, [True, False, False])[0])
        if ta is not None and mask[1]:
            outs[1] = _add(outs[1], backward_op(grad, ta, w, *ctx.args, [False, True, False])[1])
        return _fill(outs, ctx.shapes, grad)

    _autograd(name, setup, backward, jvp)


def _register():
    global _LIB
    lib = torch.library
    T = torch.ops.fcnfast
    _LIB = lib.Library("fcnfast", "IMPL")

    # ---- conv_transpose2d: y = ct(x, w) + b, linear in x and in w --------------------------
    @lib.register_fake("fcnfast::conv_transpose2d")
    def _(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
        return x.new_empty((x.shape[0], weight.shape[1] * groups, crop[2], crop[3]))

    @lib.register_fake("fcnfast::conv_transpose2d_backward")
    def _(grad, x, weight, stride, padding, output_padding, groups, dilation, crop, output_mask):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format)
            if output_mask[0]
            else _empty(x),
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if output_mask[1]
            else _empty(x),
            x.new_empty((weight.shape[1] * groups,)) if output_mask[2] else _empty(x),
        )

    def ct_tangent(x, weight, tx, tw, tb, args, shape):
        """d ct = ct(tx, w, tb) + ct(x, tw); None when no tangent is given."""
        out = None
        if tx is not None:
            out, tb = T.conv_transpose2d(tx, weight, tb, *args), None
        if tw is not None:
            out, tb = _add(out, T.conv_transpose2d(x, tw, tb, *args)), None
        if tb is not None:
            out = _add(out, _bias_map(tb, shape))
        return out

    def ct_setup(ctx, inputs, output):
        x, weight = inputs[:2]
        _save(ctx, (x, weight), inputs[3:])
        ctx.shape = output.shape

    def ct_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        if not any(mask):
            return (None,) * 9
        gx, gw, gb = T.conv_transpose2d_backward(grad, x, weight, *ctx.args, mask)
        return (
            _or_none(gx, mask[0]),
            _or_none(gw, mask[1]),
            _or_none(gb, mask[2]),
            None,
            None,
            None,
            None,
            None,
            None,
        )

    def ct_jvp(ctx, tx, tw, tb, *_):
        x, weight = ctx.saved_tensors
        out = ct_tangent(x, weight, tx, tw, tb, ctx.args, ctx.shape)
        return x.new_zeros(ctx.shape) if out is None else out

    _autograd("conv_transpose2d", ct_setup, ct_backward, ct_jvp)

    # conv_transpose2d_backward: grad_x = ct^T(grad; w) (linear in grad and w),
    # grad_weight (bilinear in x and grad), grad_bias = sum(grad)
    _autograd_backward_op("conv_transpose2d_backward", T.conv_transpose2d_backward, ct_tangent)

    # ---- bilinear_upsample2d: y = U x; its backward U^T g ----------------------------------
    @lib.register_fake("fcnfast::bilinear_upsample2d")
    def _(x, scale, crop):
        return x.new_empty((x.shape[0], x.shape[1], crop[2], crop[3]))

    @lib.register_fake("fcnfast::bilinear_upsample2d_backward")
    def _(grad, in_height, in_width, scale, crop):
        return grad.new_empty((grad.shape[0], grad.shape[1], in_height, in_width))

    def bu_setup(ctx, inputs, output):
        x, scale, crop = inputs
        ctx.args = (x.shape[2], x.shape[3], scale, crop)

    def bu_backward(ctx, grad):
        return T.bilinear_upsample2d_backward(grad, *ctx.args), None, None

    def bu_jvp(ctx, tx, *_):
        return T.bilinear_upsample2d(tx, *ctx.args[2:])

    _autograd("bilinear_upsample2d", bu_setup, bu_backward, bu_jvp)

    def bub_setup(ctx, inputs, output):
        ctx.args = tuple(inputs[1:])  # (in_height, in_width, scale, crop)

    def bub_backward(ctx, gg):
        return (T.bilinear_upsample2d(gg, *ctx.args[2:]),) + (None,) * 4

    def bub_jvp(ctx, tg, *_):
        return T.bilinear_upsample2d_backward(tg, *ctx.args)

    _autograd("bilinear_upsample2d_backward", bub_setup, bub_backward, bub_jvp)

    # ---- skip_add_crop: y = coarse + S skip (S: the window); backward S^T g (zero pad) ------
    @lib.register_fake("fcnfast::skip_add_crop")
    def _(coarse, skip, offset):
        return torch.empty_like(coarse, memory_format=torch.contiguous_format)

    @lib.register_fake("fcnfast::skip_add_crop_backward")
    def _(grad, skip_height, skip_width, offset):
        return grad.new_empty((grad.shape[0], grad.shape[1], skip_height, skip_width))

    def window(t, offset, hw):
        (oy, ox), (h, w) = offset, hw
        return t[..., oy : oy + h, ox : ox + w]

    def sa_setup(ctx, inputs, output):
        coarse, skip, offset = inputs
        ctx.args = (skip.shape[2], skip.shape[3], offset)
        ctx.hw = tuple(coarse.shape[2:])

    def sa_backward(ctx, grad):
        grad_skip = None
        if ctx.needs_input_grad[1]:
            grad_skip = T.skip_add_crop_backward(grad, *ctx.args)
        return (grad if ctx.needs_input_grad[0] else None), grad_skip, None

    def sa_jvp(ctx, tc, ts, _):
        offset = ctx.args[2]
        if tc is not None and ts is not None:
            return T.skip_add_crop(tc, ts, offset)
        if ts is not None:
            return window(ts, offset, ctx.hw).clone(memory_format=torch.contiguous_format)
        return tc.clone()

    _autograd("skip_add_crop", sa_setup, sa_backward, sa_jvp)

    def sab_setup(ctx, inputs, output):
        grad = inputs[0]
        ctx.args = tuple(inputs[1:])  # (skip_height, skip_width, offset)
        ctx.hw = tuple(grad.shape[2:])

    def sab_backward(ctx, gg):
        return window(gg, ctx.args[2], ctx.hw), None, None, None

    def sab_jvp(ctx, tg, *_):
        return T.skip_add_crop_backward(tg, *ctx.args)

    _autograd("skip_add_crop_backward", sab_setup, sab_backward, sab_jvp)

    # ---- score_skip: y = coarse + scale * S conv1x1(feature; w) + b -------------------------
    @lib.register_fake("fcnfast::score_skip")
    def _(coarse, feature, weight, bias, scale, offset):
        return torch.empty_like(coarse, memory_format=torch.contiguous_format)

    @lib.register_fake("fcnfast::score_skip_backward")
    def _(grad, feature, weight, scale, offset, output_mask):
        return (
            torch.empty_like(feature, memory_format=torch.contiguous_format)
            if output_mask[0]
            else _empty(grad),
            torch.empty_like(weight, memory_format=torch.contiguous_format)
            if output_mask[1]
            else _empty(grad),
            grad.new_empty((weight.shape[0],)) if output_mask[2] else _empty(grad),
        )

    def ss_tangent(feature, weight, tc, tf, tw, tb, args, shape):
        """d score_skip = tc + ss(0, tf, w, tb) + ss(0, feature, tw); None without tangents."""
        out = tc
        for f, w in ((tf, weight), (feature, tw)):
            if f is None or w is None:
                continue
            base = feature.new_zeros(shape) if out is None else out
            out, tb = T.score_skip(base, f, w, tb, *args), None
        if tb is not None:
            out = _add(out, _bias_map(tb, shape))
        return out

    def ss_setup(ctx, inputs, output):
        coarse, feature, weight, bias, scale, offset = inputs
        _save(ctx, (feature, weight), (scale, offset))
        ctx.shape = output.shape

    def ss_backward(ctx, grad):
        feature, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[1:4])
        gf = gw = gb = None
        if any(mask):
            gf, gw, gb = T.score_skip_backward(grad, feature, weight, *ctx.args, mask)
        return (
            (grad if ctx.needs_input_grad[0] else None),
            _or_none(gf, mask[0]),
            _or_none(gw, mask[1]),
            _or_none(gb, mask[2]),
            None,
            None,
        )

    def ss_jvp(ctx, tc, tf, tw, tb, *_):
        feature, weight = ctx.saved_tensors
        out = ss_tangent(feature, weight, tc, tf, tw, tb, ctx.args, ctx.shape)
        if out is None:
            return feature.new_zeros(ctx.shape)
        return out.clone() if out is tc else out

    _autograd("score_skip", ss_setup, ss_backward, ss_jvp)

    # score_skip_backward: grad_feature = scale * S^T w^T grad (linear in grad and w),
    # grad_weight (bilinear in grad and feature), grad_bias = sum(grad)
    _autograd_backward_op(
        "score_skip_backward",
        T.score_skip_backward,
        lambda f, w, tf, tw, tb, args, shape: ss_tangent(f, w, None, tf, tw, tb, args, shape),
    )

    # ---- upsample_argmax: int64 labels, no gradient (the autograd fallback gives none) -------
    @lib.register_fake("fcnfast::upsample_argmax")
    def _(x, scale, crop):
        return x.new_empty((x.shape[0], crop[2], crop[3]), dtype=torch.int64)

    # ---- upsample_cross_entropy: L(x) = CE(U x, target); target is not differentiable --------
    @lib.register_fake("fcnfast::upsample_cross_entropy")
    def _(x, target, scale, crop, ignore_index, reduction):
        return x.new_empty(())

    @lib.register_fake("fcnfast::upsample_cross_entropy_backward")
    def _(grad_loss, x, target, scale, crop, ignore_index, reduction):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def ce_hvp(x, target, v, scale, crop, ignore_index, reduction):
        """Hessian of the loss (grad_loss = 1) times v: U^T [m (p * Uv - p <p, Uv>)], p = softmax(Ux),
        m = 1 on non-ignored pixels (divided by their count for "mean")."""
        z = T.bilinear_upsample2d(x, scale, crop)
        u = T.bilinear_upsample2d(v, scale, crop)
        if x.dtype in (torch.float16, torch.bfloat16):
            z, u = z.float(), u.float()
        p = torch.softmax(z, dim=1)
        pu = p * u
        t = pu - p * pu.sum(1, keepdim=True)
        valid = (target != ignore_index).unsqueeze(1)
        t = torch.where(valid, t, torch.zeros_like(t))
        if reduction == "mean":
            t = t / valid.sum().clamp(min=1).to(t.dtype)
        return T.bilinear_upsample2d_backward(t.to(x.dtype), x.shape[2], x.shape[3], scale, crop)

    def ce_directional(x, target, t, args):
        """<t, d loss / d x> for grad_loss = 1. As PyTorch's nll_loss, NaN for a "mean" over no
        pixels (the loss itself is NaN there, while its gradient with respect to x is 0)."""
        g1 = T.upsample_cross_entropy_backward(x.new_ones(()), x, target, *args)
        out = (t * g1).sum()
        ignore_index, reduction = args[2:]
        if reduction == "mean":
            out = torch.where((target != ignore_index).any(), out, torch.full_like(out, math.nan))
        return out

    def ce_setup(ctx, inputs, output):
        x, target = inputs[:2]
        _save(ctx, (x, target), inputs[2:])

    def ce_backward(ctx, grad_loss):
        x, target = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = T.upsample_cross_entropy_backward(grad_loss, x, target, *ctx.args)
        return gx, None, None, None, None, None

    def ce_jvp(ctx, tx, *_):
        x, target = ctx.saved_tensors
        return ce_directional(x, target, tx, ctx.args)

    _autograd("upsample_cross_entropy", ce_setup, ce_backward, ce_jvp)

    def ceb_setup(ctx, inputs, output):
        grad_loss, x, target = inputs[:3]
        _save(ctx, (grad_loss, x, target), inputs[3:])

    def ceb_backward(ctx, ggx):
        grad_loss, x, target = ctx.saved_tensors
        dgl = dx = None
        if ctx.needs_input_grad[0]:
            dgl = ce_directional(x, target, ggx, ctx.args).reshape(grad_loss.shape)
        if ctx.needs_input_grad[1]:
            dx = grad_loss * ce_hvp(x, target, ggx, *ctx.args)
        return (dgl, dx) + (None,) * 5

    def ceb_jvp(ctx, tgl, tx, *_):
        grad_loss, x, target = ctx.saved_tensors
        out = None
        if tgl is not None:
            out = T.upsample_cross_entropy_backward(tgl, x, target, *ctx.args)
        if tx is not None:
            out = _add(out, grad_loss * ce_hvp(x, target, tx, *ctx.args))
        return x.new_zeros(x.shape) if out is None else out

    _autograd("upsample_cross_entropy_backward", ceb_setup, ceb_backward, ceb_jvp)

    # ---- autocast: every op casts by its rule (fcnfast._autocast.RULES), CPU and CUDA ------
    _autocast.register(_LIB, [n for n in _autocast.RULES if hasattr(T, n)])

    # ---- CRF ops: inference only ----------------------------------------------------------
    for name in _NOT_DIFFERENTIABLE:
        if hasattr(T, name):
            _not_differentiable(name)


_backend.on_extension_load(_register)
_backend.extension()
