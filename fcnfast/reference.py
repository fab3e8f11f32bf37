"""Pure-PyTorch definition of every fcnfast op.

This module is the readable specification, the fallback when the native
extension is missing, and the oracle the tests compare the kernels against.
Each function is the one-line PyTorch expression given in its docstring (plus
argument checks); gradients (of any order) come from PyTorch autograd. Unbatched
(C, H, W) input is computed as the batched call on ``x.unsqueeze(0)`` with the batch
dimension removed again, as ``torch.nn.functional`` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _geometry as geo

# the ops (fcnfast.ops and the top-level fcnfast package export the same names)
OPS = (
    "conv_transpose2d",
    "bilinear_upsample2d",
    "skip_add_crop",
    "score_skip",
    "upsample_argmax",
    "upsample_cross_entropy",
)

__all__ = ["bilinear_filter", "bilinear_weight", *OPS]


def bilinear_filter(kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Caffe's 2-D bilinear upsampling filter of size ``kernel_size`` x ``kernel_size``.

    ``f = ceil(k/2)``, ``c = f-1`` (k odd) or ``f-0.5`` (k even),
    ``w(i, j) = (1 - |i-c|/f) * (1 - |j-c|/f)``.
    """
    if kernel_size <= 0:
        raise ValueError("kernel_size must be positive, got %d" % kernel_size)
    f = math.ceil(kernel_size / 2)
    c = f - 1 if kernel_size % 2 == 1 else f - 0.5
    idx = torch.arange(kernel_size, dtype=torch.float64, device=device)
    w1 = 1 - (idx - c).abs() / f
    return torch.outer(w1, w1).to(dtype)


def bilinear_weight(
    channels: int, kernel_size: int, dtype=torch.float32, device=None
) -> torch.Tensor:
    """The depthwise weight of the frozen FCN upsampling: ``bilinear_filter(kernel_size)`` for each
    of ``channels`` channels, shape ``(channels, 1, k, k)`` (an expanded view, no copy).

    ``F.conv_transpose2d(x, bilinear_weight(C, 2*s), stride=s, groups=C)`` is the uncropped
    ``bilinear_upsample2d(x, s)``.
    """
    k = kernel_size
    return bilinear_filter(k, dtype, device).expand(channels, 1, k, k)


def _crop(out: torch.Tensor, crop) -> torch.Tensor:
    top, left, h, w = crop
    return out[..., top : top + h, left : left + w]


def conv_transpose2d(
    x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1, crop=None
):
    """``F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)[..., top:top+h, left:left+w]``"""
    if geo.is_unbatched(x, "x"):
        return conv_transpose2d(
            x.unsqueeze(0), weight, bias, stride, padding, output_padding, groups, dilation, crop
        ).squeeze(0)
    stride, padding, output_padding, dilation, crop = geo.check_conv_transpose2d(
        x, weight, bias, stride, padding, output_padding, groups, dilation, crop
    )
    out = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)
    return _crop(out, crop)


def bilinear_upsample2d(x, scale: int, crop=None):
    """``F.conv_transpose2d(x, bilinear_filter(2*scale).expand(C, 1, k, k), stride=scale, groups=C)[crop]``

    The FCN "upscore" layer with frozen Caffe bilinear weights (depthwise). Not
    ``F.interpolate``: the output is shifted and its borders are zero-padded.
    """
    if geo.is_unbatched(x, "x"):
        return bilinear_upsample2d(x.unsqueeze(0), scale, crop).squeeze(0)
    crop = geo.check_bilinear_upsample2d(x, scale, crop)
    channels = x.shape[1]
    weight = bilinear_weight(channels, 2 * scale, x.dtype, x.device)
    out = (
        F.conv_transpose2d(x, weight, stride=scale, groups=max(channels, 1))
        if channels
        else x.new_zeros(x.shape[0], 0, *geo.bilinear_full_size(x, scale))
    )
    return _crop(out, crop)


def skip_add_crop(coarse, skip, offset):
    """``coarse + skip[..., oy:oy+H, ox:ox+W]`` with ``(H, W) = coarse.shape[-2:]``."""
    if geo.same_batching(coarse, "coarse", skip, "skip"):
        return skip_add_crop(coarse.unsqueeze(0), skip.unsqueeze(0), offset).squeeze(0)
    oy, ox = geo.check_skip_add_crop(coarse, skip, offset)
    h, w = coarse.shape[2:]
    return coarse + skip[..., oy : oy + h, ox : ox + w]


def score_skip(coarse, feature, weight, bias=None, scale: float = 1.0, offset=(0, 0)):
    """``coarse + F.conv2d(feature * scale, weight, bias)[..., oy:oy+H, ox:ox+W]``

    The FCN skip step: score a pooled feature map with a 1x1 convolution
    (``scale`` is the at-once FCN-8s feature scaling), crop it to the coarse
    map's window and add.
    """
    if geo.same_batching(coarse, "coarse", feature, "feature"):
        return score_skip(
            coarse.unsqueeze(0), feature.unsqueeze(0), weight, bias, scale, offset
        ).squeeze(0)
    oy, ox = geo.check_score_skip(coarse, feature, weight, bias, offset)
    h, w = coarse.shape[2:]
    return coarse + F.conv2d(feature * scale, weight, bias)[..., oy : oy + h, ox : ox + w]


def upsample_argmax(x, scale: int, crop=None):
    """``bilinear_upsample2d(x, scale, crop).argmax(1)`` (int64 label map)."""
    if geo.is_unbatched(x, "x"):
        return upsample_argmax(x.unsqueeze(0), scale, crop).squeeze(0)
    crop = geo.check_upsample_argmax(x, scale, crop)
    return bilinear_upsample2d(x, scale, crop).argmax(1)


def upsample_cross_entropy(
    x, target, scale: int, crop=None, ignore_index: int = 255, reduction: str = "mean"
):
    """``F.cross_entropy(bilinear_upsample2d(x, scale, crop), target, ignore_index=ignore_index, reduction=reduction)``

    ``reduction`` is ``"mean"`` (over non-ignored pixels) or ``"sum"`` (Caffe's
    unnormalised loss). An unbatched ``x`` (C, H, W) with ``target`` (h, w) is one image
    (N = 1), not ``F.cross_entropy``'s reading of a 3-D input as (N, C, d).
    """
    if geo.same_batching(x, "x", target, "target", "H, W"):
        return upsample_cross_entropy(
            x.unsqueeze(0), target.unsqueeze(0), scale, crop, ignore_index, reduction
        )
    crop = geo.check_upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction)
    return F.cross_entropy(
        bilinear_upsample2d(x, scale, crop), target, ignore_index=ignore_index, reduction=reduction
    )
