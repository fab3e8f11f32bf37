"""Drop-in FCN layers backed by fcnfast's ops.

* ``ConvTranspose2d`` -- a ``torch.nn.ConvTranspose2d`` (same constructor,
  parameters and ``state_dict`` keys) whose ``forward`` also takes ``crop``.
* ``BilinearUpsample2d`` -- the FCN "upscore" layer: frozen analytic bilinear
  (no parameters) or learnable, initialised with the bilinear kernel.
* ``SkipFuse`` -- the 1x1 score conv of a pooled feature (a ``torch.nn.Conv2d``)
  fused with its crop and the add onto the coarse score map.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import ops
from . import _geometry as geo
from .reference import bilinear_filter

__all__ = ["bilinear_kernel", "ConvTranspose2d", "BilinearUpsample2d", "SkipFuse"]


def bilinear_kernel(channels: int, kernel_size: int, dtype=torch.float32) -> torch.Tensor:
    """The (C, C, k, k) diagonal Caffe bilinear filter FCN initialises its deconvolutions with.

    ``weight[c, c] = bilinear_filter(k)`` and zero across channels, so the
    deconvolution upsamples each channel independently.
    """
    if channels <= 0:
        raise ValueError("channels must be positive, got %d" % channels)
    weight = torch.zeros(channels, channels, kernel_size, kernel_size, dtype=dtype)
    filt = bilinear_filter(kernel_size, dtype)
    idx = torch.arange(channels)
    weight[idx, idx] = filt
    return weight


class ConvTranspose2d(nn.ConvTranspose2d):
    """``torch.nn.ConvTranspose2d`` computed by ``fcnfast.ops.conv_transpose2d``.

    ``forward(x, output_size=None, crop=None)``: ``crop=(top, left, h, w)`` keeps
    only that window of the output, computed directly (no full output). ``x`` is
    (N, C, H, W) or unbatched (C, H, W), and ``output_size`` may include the batch and
    channel dimensions, as in PyTorch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError("fcnfast.nn.ConvTranspose2d supports padding_mode='zeros' only, got %r"
                             % self.padding_mode)

    def forward(self, input: torch.Tensor, output_size: Optional[Sequence[int]] = None,
                crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, 2, self.dilation)
        return ops.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                    output_padding, self.groups, self.dilation, crop)


class BilinearUpsample2d(nn.Module):
    """FCN upsampling by an integer ``scale``: kernel ``2*scale``, stride ``scale``.

    ``learnable=False`` (Caffe's frozen ``upscore``): no parameters, the bilinear
    weights are computed analytically by ``fcnfast.ops.bilinear_upsample2d``.
    ``learnable=True`` (the paper's learned deconvolution): a (C, C, k, k)
    ``weight`` initialised with ``bilinear_kernel``, no bias, computed by
    ``fcnfast.ops.conv_transpose2d``. Both give the same output at initialisation.
    ``x`` is (N, C, H, W) or unbatched (C, H, W).
    """

    def __init__(self, channels: int, scale: int, learnable: bool = False):
        super().__init__()
        self.channels = int(channels)
        self.scale = geo.check_scale(scale)
        self.learnable = bool(learnable)
        if self.learnable:
            self.weight = nn.Parameter(bilinear_kernel(self.channels, 2 * self.scale))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor, crop: Optional[Sequence[int]] = None) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() in (3, 4) and x.shape[-3] != self.channels:
            raise ValueError("x has %d channels, BilinearUpsample2d expects %d"
                             % (x.shape[-3], self.channels))
        if self.learnable:
            return ops.conv_transpose2d(x, self.weight, None, stride=self.scale, crop=crop)
        return ops.bilinear_upsample2d(x, self.scale, crop)

    def extra_repr(self) -> str:
        return "channels=%d, scale=%d, learnable=%s" % (self.channels, self.scale, self.learnable)


class SkipFuse(nn.Conv2d):
    """FCN skip step: ``coarse + (1x1 conv of feature * scale)[..., oy:oy+H, ox:ox+W]``.

    A ``torch.nn.Conv2d(in_channels, num_classes, 1)`` (so ``weight``/``bias``
    keys match a plain score layer) whose ``forward(coarse, feature)`` runs
    ``fcnfast.ops.score_skip``: the score conv is computed on the kept window only.
    ``scale`` is the at-once FCN-8s feature scaling (0.01 for pool4, 0.0001 for pool3).
    ``coarse`` and ``feature`` are both batched (N, ., ., .) or both unbatched.
    """

    def __init__(self, in_channels: int, num_classes: int, scale: float = 1.0, offset=(0, 0),
                 bias: bool = True):
        super().__init__(in_channels, num_classes, kernel_size=1, bias=bias)
        self.scale = float(scale)
        self.offset = geo.pair(offset, "offset")

    def forward(self, coarse: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.score_skip(coarse, feature, self.weight, self.bias, self.scale, self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", scale=%g, offset=%s" % (self.scale, self.offset)
