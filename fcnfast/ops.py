"""Public fcnfast ops: native kernels with autograd, falling back to ``fcnfast.reference``.

Each function has the same name and signature as its reference definition and
computes the expression stated in its docstring. When the compiled extension is
loaded and has a kernel for the input's device, the call goes through
``torch.ops.fcnfast.<op>`` -- a dispatcher op with autograd and fake (meta)
kernels, so ``torch.compile`` and ``torch.library.opcheck`` see it. Otherwise
the pure-PyTorch reference runs.
"""
from __future__ import annotations

import torch

from . import _backend
from . import _geometry as geo
from . import reference

__all__ = [
    "conv_transpose2d",
    "bilinear_upsample2d",
    "skip_add_crop",
    "score_skip",
    "upsample_argmax",
    "upsample_cross_entropy",
]


@torch.compiler.assume_constant_result
def _use_native(op: str, device_type: str) -> bool:
    return _backend.has_kernel(op, device_type)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1, crop=None):
    """Transposed convolution with a fused output crop.

    ``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)[..., top:top+h, left:left+w]``
    with ``crop=(top, left, h, w)`` (``None``: the full output). Only the kept
    output pixels are computed (phase decomposition: each output pixel gathers
    the taps that land on it). Gradients for ``x``, ``weight`` and ``bias``.
    """
    stride, padding, output_padding, dilation, full = geo.conv_transpose2d_args(
        x, weight, bias, stride, padding, output_padding, groups, dilation)
    crop = geo.resolve_crop(crop, *full)
    if _use_native("conv_transpose2d", x.device.type):
        return torch.ops.fcnfast.conv_transpose2d(x, weight, bias, stride, padding, output_padding,
                                                  groups, dilation, crop)
    return reference.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups,
                                      dilation, crop)


def bilinear_upsample2d(x, scale: int, crop=None):
    """Frozen FCN bilinear upsampling (depthwise deconvolution, kernel ``2*scale``, stride ``scale``).

    ``F.conv_transpose2d(x, bilinear_filter(2*scale).expand(C, 1, k, k), stride=scale, groups=C)[..., top:top+h, left:left+w]``.
    The Caffe bilinear weights are computed analytically (no weight tensor).
    Output full size is ``((H+1)*scale, (W+1)*scale)`` before the crop.
    """
    geo.check_tensor(x, "x", 4)
    scale = geo.check_scale(scale)
    crop = geo.resolve_crop(crop, *geo.bilinear_full_size(x, scale))
    if _use_native("bilinear_upsample2d", x.device.type):
        return torch.ops.fcnfast.bilinear_upsample2d(x, scale, crop)
    return reference.bilinear_upsample2d(x, scale, crop)


def skip_add_crop(coarse, skip, offset):
    """``coarse + skip[..., oy:oy+H, ox:ox+W]`` with ``(H, W) = coarse.shape[-2:]``."""
    offset = reference._check_skip_add_crop(coarse, skip, offset)
    if _use_native("skip_add_crop", coarse.device.type):
        return torch.ops.fcnfast.skip_add_crop(coarse, skip, offset)
    return reference.skip_add_crop(coarse, skip, offset)


def score_skip(coarse, feature, weight, bias=None, scale: float = 1.0, offset=(0, 0)):
    """Fused FCN skip step: 1x1 score conv on the kept window only, then add.

    ``coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]``.
    """
    offset = reference._check_score_skip(coarse, feature, weight, bias, offset)
    if _use_native("score_skip", coarse.device.type):
        return torch.ops.fcnfast.score_skip(coarse, feature, weight, bias, float(scale), offset)
    return reference.score_skip(coarse, feature, weight, bias, scale, offset)


def upsample_argmax(x, scale: int, crop=None):
    """``bilinear_upsample2d(x, scale, crop).argmax(1)`` without materialising the C x H x W scores.

    Returns the int64 label map; ties go to the lowest class index, as ``argmax``.
    """
    geo.check_tensor(x, "x", 4)
    scale = geo.check_scale(scale)
    crop = geo.resolve_crop(crop, *geo.bilinear_full_size(x, scale))
    if _use_native("upsample_argmax", x.device.type):
        return torch.ops.fcnfast.upsample_argmax(x, scale, crop)
    return reference.upsample_argmax(x, scale, crop)


def upsample_cross_entropy(x, target, scale: int, crop=None, ignore_index: int = 255,
                           reduction: str = "mean"):
    """Fused final upsampling + softmax cross-entropy.

    ``F.cross_entropy(bilinear_upsample2d(x, scale, crop), target, ignore_index=ignore_index, reduction=reduction)``,
    computed without holding the full-resolution logits or their gradient.
    """
    reference._check_cross_entropy_args(x, target, scale, crop, reduction)
    crop = geo.resolve_crop(crop, *geo.bilinear_full_size(x, scale))
    if _use_native("upsample_cross_entropy", x.device.type):
        return torch.ops.fcnfast.upsample_cross_entropy(x, target, scale, crop, int(ignore_index),
                                                        reduction)
    return reference.upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction)


# ---------------------------------------------------------------------------
# fake kernels and autograd for the dispatcher ops (only when the extension loaded)
# ---------------------------------------------------------------------------

def _empty(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _or_none(t: torch.Tensor, wanted: bool):
    return t if wanted else None


def _register():
    lib = torch.library

    @lib.register_fake("fcnfast::conv_transpose2d")
    def _(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
        return x.new_empty((x.shape[0], weight.shape[1] * groups, crop[2], crop[3]))

    @lib.register_fake("fcnfast::conv_transpose2d_backward")
    def _(grad, x, weight, stride, padding, output_padding, groups, dilation, crop, output_mask):
        return (torch.empty_like(x, memory_format=torch.contiguous_format)
                if output_mask[0] else _empty(x),
                torch.empty_like(weight, memory_format=torch.contiguous_format)
                if output_mask[1] else _empty(x),
                x.new_empty((weight.shape[1] * groups,)) if output_mask[2] else _empty(x))

    def ct_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, output_padding, groups, dilation, crop = inputs
        ctx.save_for_backward(x, weight)
        ctx.args = (stride, padding, output_padding, groups, dilation, crop)

    def ct_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gx, gw, gb = torch.ops.fcnfast.conv_transpose2d_backward(grad, x, weight, *ctx.args, mask)
        return (_or_none(gx, mask[0]), _or_none(gw, mask[1]), _or_none(gb, mask[2]),
                None, None, None, None, None, None)

    lib.register_autograd("fcnfast::conv_transpose2d", ct_backward, setup_context=ct_setup)

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
        return torch.ops.fcnfast.bilinear_upsample2d_backward(grad, *ctx.args), None, None

    lib.register_autograd("fcnfast::bilinear_upsample2d", bu_backward, setup_context=bu_setup)

    @lib.register_fake("fcnfast::skip_add_crop")
    def _(coarse, skip, offset):
        return torch.empty_like(coarse, memory_format=torch.contiguous_format)

    @lib.register_fake("fcnfast::skip_add_crop_backward")
    def _(grad, skip_height, skip_width, offset):
        return grad.new_empty((grad.shape[0], grad.shape[1], skip_height, skip_width))

    def sa_setup(ctx, inputs, output):
        coarse, skip, offset = inputs
        ctx.args = (skip.shape[2], skip.shape[3], offset)

    def sa_backward(ctx, grad):
        grad_skip = None
        if ctx.needs_input_grad[1]:
            grad_skip = torch.ops.fcnfast.skip_add_crop_backward(grad, *ctx.args)
        return (grad if ctx.needs_input_grad[0] else None), grad_skip, None

    lib.register_autograd("fcnfast::skip_add_crop", sa_backward, setup_context=sa_setup)

    @lib.register_fake("fcnfast::score_skip")
    def _(coarse, feature, weight, bias, scale, offset):
        return torch.empty_like(coarse, memory_format=torch.contiguous_format)

    @lib.register_fake("fcnfast::score_skip_backward")
    def _(grad, feature, weight, scale, offset, output_mask):
        return (torch.empty_like(feature, memory_format=torch.contiguous_format)
                if output_mask[0] else _empty(grad),
                torch.empty_like(weight, memory_format=torch.contiguous_format)
                if output_mask[1] else _empty(grad),
                grad.new_empty((weight.shape[0],)) if output_mask[2] else _empty(grad))

    def ss_setup(ctx, inputs, output):
        coarse, feature, weight, bias, scale, offset = inputs
        ctx.save_for_backward(feature, weight)
        ctx.args = (scale, offset)

    def ss_backward(ctx, grad):
        feature, weight = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[1:4])
        gf, gw, gb = torch.ops.fcnfast.score_skip_backward(grad, feature, weight, *ctx.args, mask)
        return ((grad if ctx.needs_input_grad[0] else None), _or_none(gf, mask[0]),
                _or_none(gw, mask[1]), _or_none(gb, mask[2]), None, None)

    lib.register_autograd("fcnfast::score_skip", ss_backward, setup_context=ss_setup)

    @lib.register_fake("fcnfast::upsample_argmax")
    def _(x, scale, crop):
        return x.new_empty((x.shape[0], crop[2], crop[3]), dtype=torch.int64)

    @lib.register_fake("fcnfast::upsample_cross_entropy")
    def _(x, target, scale, crop, ignore_index, reduction):
        return x.new_empty(())

    @lib.register_fake("fcnfast::upsample_cross_entropy_backward")
    def _(grad_loss, x, target, scale, crop, ignore_index, reduction):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def ce_setup(ctx, inputs, output):
        x, target, scale, crop, ignore_index, reduction = inputs
        ctx.save_for_backward(x, target)
        ctx.args = (scale, crop, ignore_index, reduction)

    def ce_backward(ctx, grad_loss):
        x, target = ctx.saved_tensors
        gx = torch.ops.fcnfast.upsample_cross_entropy_backward(grad_loss, x, target, *ctx.args)
        return gx, None, None, None, None, None

    lib.register_autograd("fcnfast::upsample_cross_entropy", ce_backward, setup_context=ce_setup)


_backend.on_extension_load(_register)
_backend.extension()
