"""Argument normalisation and validation shared by ``fcnfast.ops`` and ``fcnfast.reference``.

Every check raises ``ValueError`` naming the argument and the offending values,
so the reference and the native path reject the same inputs with the same words.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

IntPair = Union[int, Sequence[int]]
Crop = Optional[Sequence[int]]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def pair(value: IntPair, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError("%s must be an int or a pair of ints, got %r" % (name, value))
    if isinstance(value, int):
        return (value, value)
    try:
        values = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError("%s must be an int or a pair of ints, got %r" % (name, value)) from None
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError("%s must be an int or a pair of ints, got %r" % (name, value))
    return values


def check_tensor(t, name: str, ndim: Optional[int] = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    if ndim is not None and t.dim() != ndim:
        raise ValueError("%s must be a %d-D tensor, got shape %s" % (name, ndim, tuple(t.shape)))
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError("%s must be a floating tensor (float32, float64, bfloat16, float16), got %s"
                         % (name, t.dtype))


def is_unbatched(t, name: str, dims: str = "C, H, W") -> bool:
    """``t`` has the batch dimension (N, <dims>) or not (<dims>); True when it has not.

    The ops accept unbatched input like ``torch.nn.ConvTranspose2d`` does: the result equals
    the batched call on ``t.unsqueeze(0)`` with the batch dimension removed again.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (name, type(t).__name__))
    n = len(dims.split(","))
    if t.dim() not in (n, n + 1):
        raise ValueError("%s must be a %d-D tensor (N, %s) or a %d-D tensor (%s) without the batch "
                         "dimension, got shape %s" % (name, n + 1, dims, n, dims, tuple(t.shape)))
    return t.dim() == n


def same_batching(a, name_a: str, b, name_b: str, dims_b: str = "C, H, W") -> bool:
    """Both tensors batched or both unbatched (``a`` is (N,) C, H, W); True when unbatched."""
    unbatched = is_unbatched(a, name_a)
    if is_unbatched(b, name_b, dims_b) != unbatched:
        raise ValueError("%s %s and %s %s must both have a batch dimension or both be unbatched"
                         % (name_a, tuple(a.shape), name_b, tuple(b.shape)))
    return unbatched


def check_same(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError("%s and %s must be on the same device, got %s and %s"
                         % (name_a, name_b, a.device, b.device))
    if a.dtype != b.dtype:
        raise ValueError("%s and %s must have the same dtype, got %s and %s"
                         % (name_a, name_b, a.dtype, b.dtype))


def is_symbolic(*values) -> bool:
    """True when a size is a ``torch.SymInt`` (torch.export / torch.compile with dynamic shapes)."""
    return any(isinstance(v, (torch.SymInt, torch.SymBool)) for v in values)


def violated(cond) -> bool:
    """Whether a check's failure condition ``cond`` holds.

    For concrete sizes that is ``bool(cond)``. For symbolic sizes (a ``torch.SymBool`` while
    torch.export / torch.compile trace with dynamic batch, height or width) it is True only
    when the condition is provably true for every size: evaluating it with ``bool`` would add
    a guard that pins the dynamic dimension (or fails the export). The native kernels check
    the same bounds again on concrete sizes when the exported program runs.
    """
    if isinstance(cond, torch.SymBool):
        return statically_known_true(cond)
    return bool(cond)


def _size(v):
    """An int, or a ``torch.SymInt`` kept symbolic (``int()`` would specialise it)."""
    return v if isinstance(v, torch.SymInt) else int(v)


def check_positive(value: Tuple[int, int], name: str) -> None:
    if min(value) <= 0:
        raise ValueError("%s must be positive, got %s" % (name, value))


def check_nonnegative(value: Tuple[int, int], name: str) -> None:
    if min(value) < 0:
        raise ValueError("%s must be non-negative, got %s" % (name, value))


def resolve_crop(crop: Crop, full_h: int, full_w: int) -> Tuple[int, int, int, int]:
    """``None`` -> the full output; otherwise validate (top, left, height, width)."""
    if crop is None:
        return (0, 0, full_h, full_w)
    try:
        values = tuple(_size(v) for v in crop)
    except (TypeError, ValueError):
        raise ValueError("crop must be (top, left, height, width), got %r" % (crop,)) from None
    if len(values) != 4:
        raise ValueError("crop must be (top, left, height, width), got %r" % (crop,))
    top, left, h, w = values
    if (any(violated(v < 0) for v in values) or violated(top + h > full_h)
            or violated(left + w > full_w)):
        raise ValueError("crop (top=%d, left=%d, height=%d, width=%d) lies outside the full output "
                         "of size %dx%d" % (top, left, h, w, full_h, full_w))
    return values


def conv_transpose_out_size(size, kernel, stride, padding, output_padding, dilation) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def conv_transpose2d_args(x, weight, bias, stride, padding, output_padding, groups, dilation):
    """Validate conv_transpose2d arguments; return normalised pairs and the full output size."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    check_same(x, "x", weight, "weight")
    if bias is not None:
        check_tensor(bias, "bias", 1)
        check_same(x, "x", bias, "bias")
    stride = pair(stride, "stride")
    padding = pair(padding, "padding")
    output_padding = pair(output_padding, "output_padding")
    dilation = pair(dilation, "dilation")
    check_positive(stride, "stride")
    check_positive(dilation, "dilation")
    check_nonnegative(padding, "padding")
    check_nonnegative(output_padding, "output_padding")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise ValueError("groups must be a positive int, got %r" % (groups,))
    c_in = x.shape[1]
    if weight.shape[0] != c_in:
        raise ValueError("weight.shape[0] (%d) must equal the input channels x.shape[1] (%d)"
                         % (weight.shape[0], c_in))
    if c_in % groups != 0:
        raise ValueError("groups (%d) must divide the input channels (%d)" % (groups, c_in))
    c_out = weight.shape[1] * groups
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError("bias has %d elements, expected the output channels %d"
                         % (bias.shape[0], c_out))
    for axis in range(2):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise ValueError("output_padding %s must be smaller than stride %s or dilation %s"
                             % (output_padding, stride, dilation))
    kh, kw = weight.shape[2], weight.shape[3]
    if kh == 0 or kw == 0:
        raise ValueError("weight kernel size must be positive, got %dx%d" % (kh, kw))
    full_h = conv_transpose_out_size(x.shape[2], kh, stride[0], padding[0], output_padding[0],
                                     dilation[0])
    full_w = conv_transpose_out_size(x.shape[3], kw, stride[1], padding[1], output_padding[1],
                                     dilation[1])
    if violated(full_h <= 0) or violated(full_w <= 0):
        raise ValueError("conv_transpose2d output would be %dx%d for input %s, weight %s"
                         % (full_h, full_w, tuple(x.shape), tuple(weight.shape)))
    return stride, padding, output_padding, dilation, (full_h, full_w)


def check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
        raise ValueError("scale must be a positive int, got %r" % (scale,))
    return scale


def bilinear_full_size(x: torch.Tensor, scale: int) -> Tuple[int, int]:
    # depthwise deconvolution, kernel 2*scale, stride scale, no padding
    return ((x.shape[2] + 1) * scale, (x.shape[3] + 1) * scale)


def skip_window(coarse: torch.Tensor, skip_hw: Tuple[int, int], offset, name: str = "skip"):
    """Validate that coarse's H x W window at ``offset`` fits in a map of size ``skip_hw``."""
    oy, ox = pair(offset, "offset")
    h, w = coarse.shape[2], coarse.shape[3]
    if oy < 0 or ox < 0 or violated(oy + h > skip_hw[0]) or violated(ox + w > skip_hw[1]):
        raise ValueError("offset (%d, %d) with window %dx%d lies outside %s of size %dx%d"
                         % (oy, ox, h, w, name, skip_hw[0], skip_hw[1]))
    return oy, ox
