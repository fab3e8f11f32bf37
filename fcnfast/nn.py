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

from . import _geometry as geo
from . import ops
from .reference import bilinear_filter, bilinear_weight

__all__ = [
    "bilinear_kernel",
    "ConvTranspose2d",
    "BilinearUpsample2d",
    "SkipFuse",
    "convert",
    "FrozenBilinearConvTranspose2d",
    "BilinearInterpolate2d",
    "SCRIPT_REFUSAL",
]

SCRIPT_REFUSAL = (
    "%s cannot be compiled by torch.jit.script: fcnfast's layers call native ops whose crop "
    "geometry is computed in Python from the input size. Export the model with torch.export.export "
    "and dynamic Dims (fcnfast.export.export_program, `fcnfast export --format pt2`) or with "
    "torch.onnx.export(..., dynamo=True) (fcnfast.export.export_onnx, `fcnfast export --format "
    "onnx`): both are correct at every batch size, height and width."
)


class NoScript:
    """Mixin: ``torch.jit.script`` refuses the module (and any model containing it) with one
    clear error instead of failing deep inside the TorchScript compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(SCRIPT_REFUSAL % type(self).__name__)


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


class ConvTranspose2d(nn.ConvTranspose2d, NoScript):
    """``torch.nn.ConvTranspose2d`` computed by ``fcnfast.ops.conv_transpose2d``.

    ``forward(x, output_size=None, crop=None)``: ``crop=(top, left, h, w)`` keeps
    only that window of the output, computed directly (no full output). ``x`` is
    (N, C, H, W) or unbatched (C, H, W), and ``output_size`` may include the batch and
    channel dimensions, as in PyTorch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding_mode != "zeros":
            raise ValueError(
                "fcnfast.nn.ConvTranspose2d supports padding_mode='zeros' only, got %r"
                % self.padding_mode
            )

    def forward(
        self,
        input: torch.Tensor,
        output_size: Optional[Sequence[int]] = None,
        crop: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if output_size is not None and crop is None and geo.is_symbolic(*output_size):
            return self._symbolic_output_size(input, output_size)
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return ops.conv_transpose2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
            crop,
        )

    def _symbolic_output_size(self, input, output_size):
        """``output_size`` with symbolic sizes (torch.export / ONNX with dynamic height/width).

        ``output_padding`` only appends rows/columns at the bottom/right and leaves the others
        unchanged, so the output for any allowed ``output_size`` is the top-left window of the
        output with the largest ``output_padding``: a crop, whose size may stay symbolic
        (PyTorch's ``_output_padding`` would branch on the size and pin the dynamic dims).
        """
        size = list(output_size)[-2:]
        if len(size) != 2:
            raise ValueError(
                "output_size must end with (height, width), got %r" % (list(output_size),)
            )
        largest = tuple(max(s, d) - 1 for s, d in zip(self.stride, self.dilation))
        return ops.conv_transpose2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            largest,
            self.groups,
            self.dilation,
            (0, 0, size[0], size[1]),
        )


class BilinearUpsample2d(nn.Module, NoScript):
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
            raise ValueError(
                "x has %d channels, BilinearUpsample2d expects %d" % (x.shape[-3], self.channels)
            )
        if self.learnable:
            return ops.conv_transpose2d(x, self.weight, None, stride=self.scale, crop=crop)
        return ops.bilinear_upsample2d(x, self.scale, crop)

    def extra_repr(self) -> str:
        return "channels=%d, scale=%d, learnable=%s" % (self.channels, self.scale, self.learnable)


class SkipFuse(nn.Conv2d, NoScript):
    """FCN skip step: ``coarse + (1x1 conv of feature * scale)[..., oy:oy+H, ox:ox+W]``.

    A ``torch.nn.Conv2d(in_channels, num_classes, 1)`` (so ``weight``/``bias``
    keys match a plain score layer) whose ``forward(coarse, feature)`` runs
    ``fcnfast.ops.score_skip``: the score conv is computed on the kept window only.
    ``scale`` is the at-once FCN-8s feature scaling (0.01 for pool4, 0.0001 for pool3).
    ``coarse`` and ``feature`` are both batched (N, ., ., .) or both unbatched.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        scale: float = 1.0,
        offset=(0, 0),
        bias: bool = True,
    ):
        super().__init__(in_channels, num_classes, kernel_size=1, bias=bias)
        self.scale = float(scale)
        self.offset = geo.pair(offset, "offset")

    def forward(self, coarse: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return ops.score_skip(coarse, feature, self.weight, self.bias, self.scale, self.offset)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", scale=%g, offset=%s" % (self.scale, self.offset)


# ---------------------------------------------------------------------------
# convert(): swap PyTorch layers of an existing model for fcnfast's
# ---------------------------------------------------------------------------


def _bilinear_scale(m: nn.ConvTranspose2d) -> Optional[int]:
    """``s`` when ``m`` is an FCN bilinear upsampling by ``s`` (kernel 2s, stride s, no padding,
    no bias, the Caffe bilinear weights, per channel: diagonal (C, C, k, k) or depthwise
    (C, 1, k, k) with groups=C); else None."""
    k, s = m.kernel_size, m.stride
    if (
        k[0] != k[1]
        or s[0] != s[1]
        or k[0] != 2 * s[0]
        or tuple(m.padding) != (0, 0)
        or tuple(m.dilation) != (1, 1)
        or m.bias is not None
        or m.in_channels != m.out_channels
        or m.padding_mode != "zeros"
    ):
        return None
    channels, scale = m.in_channels, s[0]
    w = m.weight.detach()
    if m.groups == 1:
        expected = bilinear_kernel(channels, k[0], torch.float64)
    elif m.groups == channels:
        expected = bilinear_weight(channels, k[0], torch.float64)
    else:
        return None
    if tuple(w.shape) != tuple(expected.shape):
        return None
    if not torch.allclose(w.double().cpu(), expected, rtol=0, atol=1e-6):
        return None
    return scale


class FrozenBilinearConvTranspose2d(ConvTranspose2d):
    """What ``convert`` makes of a frozen bilinear ``nn.ConvTranspose2d`` (FCN's ``upscore``).

    The same module as ``ConvTranspose2d`` (``weight`` kept, frozen, so ``state_dict`` keys and
    values are unchanged) whose forward runs the analytic ``ops.bilinear_upsample2d`` (no weight
    read) while the weight is the bilinear kernel and ``requires_grad`` is False. Setting
    ``requires_grad`` or loading other weights (``load_state_dict``) switches it to the general
    ``ops.conv_transpose2d`` path, so the output always follows the weight.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_scale: Optional[int] = None

    def refresh(self) -> None:
        """Re-check whether the weight is the bilinear kernel (after changing it in place)."""
        self.fixed_scale = _bilinear_scale(self)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh()

    def forward(
        self,
        input: torch.Tensor,
        output_size: Optional[Sequence[int]] = None,
        crop: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        if self.fixed_scale is not None and not self.weight.requires_grad:
            output_padding = self._output_padding(
                input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
            )
            if tuple(output_padding) == (0, 0):
                return ops.bilinear_upsample2d(input, self.fixed_scale, crop)
        return super().forward(input, output_size, crop)


class BilinearInterpolate2d(nn.Module, NoScript):
    """``F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)`` for an even
    integer ``s``, through fcnfast's bilinear upsampling: the Caffe bilinear deconvolution of
    the input replicate-padded by one pixel, cropped at ``3s/2`` (the tent filter of kernel
    ``2s`` is exactly the linear interpolation at the half-pixel centres, and the replicated
    border is PyTorch's clamping). What ``convert`` makes of such an ``nn.Upsample``."""

    def __init__(self, scale: int):
        super().__init__()
        scale = geo.check_scale(scale)
        if scale % 2:
            raise ValueError("BilinearInterpolate2d needs an even scale, got %d" % scale)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        off = 3 * s // 2
        return ops.bilinear_upsample2d(padded, s, (off, off, x.shape[-2] * s, x.shape[-1] * s))

    def extra_repr(self) -> str:
        return "scale=%d" % self.scale


def _upsample_scale(m: nn.Module) -> Optional[int]:
    """``s`` for an ``nn.Upsample(scale_factor=s, mode="bilinear", align_corners=False)`` with an
    even integer ``s`` (both axes); else None (left unconverted)."""
    if type(m) is not nn.Upsample or m.mode != "bilinear" or m.align_corners or m.size is not None:
        return None
    factor = m.scale_factor
    factors = tuple(factor) if isinstance(factor, (tuple, list)) else (factor, factor)
    if len(set(factors)) != 1 or factors[0] is None or float(factors[0]) != int(factors[0]):
        return None
    scale = int(factors[0])
    if scale <= 0 or scale % 2 or getattr(m, "recompute_scale_factor", None):
        return None
    return scale


def _convert_one(m: nn.Module) -> Optional[nn.Module]:
    if type(m) is nn.ConvTranspose2d and m.padding_mode == "zeros":
        scale = _bilinear_scale(m)
        cls = FrozenBilinearConvTranspose2d if scale is not None else ConvTranspose2d
        new = cls(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            output_padding=m.output_padding,
            groups=m.groups,
            bias=m.bias is not None,
            dilation=m.dilation,
            device=m.weight.device,
            dtype=m.weight.dtype,
        )
        new.weight = m.weight  # the same Parameter objects: optimisers and ties keep working
        if m.bias is not None:
            new.bias = m.bias
        new.train(m.training)
        if scale is not None:
            new.refresh()
        return new
    scale = _upsample_scale(m)
    if scale is not None:
        return BilinearInterpolate2d(scale).train(m.training)
    return None


def convert(module: nn.Module) -> nn.Module:
    """Swap PyTorch layers inside ``module`` for fcnfast's, in place; returns the module.

    * ``nn.ConvTranspose2d`` (zero padding) -> ``fcnfast.nn.ConvTranspose2d`` sharing the same
      ``weight``/``bias`` Parameters (same ``state_dict``, same outputs, ``output_size`` works);
      a bilinear-initialised one (FCN's ``upscore``: kernel 2s, stride s, no bias, Caffe
      bilinear weights) becomes ``FrozenBilinearConvTranspose2d``, which runs the analytic
      fixed path while its weight stays frozen;
    * ``nn.Upsample(scale_factor=s, mode="bilinear", align_corners=False)`` with an even
      integer ``s`` -> ``BilinearInterpolate2d(s)`` (equal outputs; no parameters).

    Anything else (other upsampling modes, ``align_corners=True``, odd or fractional scales,
    ``F.interpolate`` called inside a ``forward``) is left as it is.
    """
    if not isinstance(module, nn.Module):
        raise ValueError("module must be a torch.nn.Module, got %s" % type(module).__name__)
    top = _convert_one(module)
    if top is not None:
        return top
    for name, child in list(module.named_children()):
        new = _convert_one(child)
        if new is not None:
            setattr(module, name, new)
        else:
            convert(child)
    return module
