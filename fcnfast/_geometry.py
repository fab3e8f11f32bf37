"""The argument checks of every fcnfast op, for ``fcnfast.ops``, ``fcnfast.reference`` and the
CuPy backend (``fcnfast._cupy``).

One function per op (forward and backward: ``conv_transpose2d``, ``conv_transpose2d_backward``,
...) validates all its arguments and returns the normalised geometry. They are the Python twin
of ``csrc/host/op_checks.h``, which the CPU kernels and the CUDA bindings run: the same checks
in the same order, raising ``ValueError`` with the same words, values and argument names
(shapes as ``[1, 3, 8, 8]``, dtypes as C++ prints them: ``Float``, ``Long``), and the same
32-bit index limits (``INDEX_LIMIT``, ``EXTENT_LIMIT``). tests/test_error_table.py holds every
backend to that. (The C++ messages start with "fcnfast: ".)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

IntPair = Union[int, Sequence[int]]
Crop = Optional[Sequence[int]]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# The 32-bit index limits (csrc/host/checks.h: kIndexLimit, kExtentLimit). INDEX_LIMIT bounds
# the elements of every tensor an op reads or writes (the CUDA kernels index with int32);
# EXTENT_LIMIT bounds any one size or geometry value (stride, padding, dilation, the full output
# size plus padding and dilated kernel, the upsampled full size): the CUDA kernels add two such
# values in int32. Every backend, the reference included, refuses the same inputs.
INDEX_LIMIT = 2**31 - 1
EXTENT_LIMIT = INDEX_LIMIT // 2

# c10::ScalarType names: how the C++ checks print a dtype
_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
    torch.complex32: "ComplexHalf",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``dtype`` as the C++ checks print it (``Float``, ``Long``, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def sizes_str(sizes) -> str:
    """Sizes as the C++ checks print them: ``[1, 3, 8, 8]``."""
    return "[%s]" % ", ".join(str(s) for s in sizes)


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


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
        raise ValueError("%s must be an int or a pair of ints, got %s" % (name, sizes_str(values)))
    return values


def check_tensor(t, name: str, ndim: Optional[int] = None, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (name, _type_name(t)))
    if ndim is not None and t.dim() != ndim:
        raise ValueError(
            "%s must be a %d-D tensor, got shape %s" % (name, ndim, sizes_str(t.shape))
        )
    if floating and t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            "%s must be a floating tensor (float32, float64, bfloat16, float16), got %s"
            % (name, dtype_name(t.dtype))
        )


def is_unbatched(t, name: str, dims: str = "C, H, W") -> bool:
    """``t`` has the batch dimension (N, <dims>) or not (<dims>); True when it has not.

    The ops accept unbatched input like ``torch.nn.ConvTranspose2d`` does: the result equals
    the batched call on ``t.unsqueeze(0)`` with the batch dimension removed again.
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError("%s must be a torch.Tensor, got %s" % (name, _type_name(t)))
    n = len(dims.split(","))
    if t.dim() not in (n, n + 1):
        raise ValueError(
            "%s must be a %d-D tensor (N, %s) or a %d-D tensor (%s) without the batch "
            "dimension, got shape %s" % (name, n + 1, dims, n, dims, tuple(t.shape))
        )
    return t.dim() == n


def same_batching(a, name_a: str, b, name_b: str, dims_b: str = "C, H, W") -> bool:
    """Both tensors batched or both unbatched (``a`` is (N,) C, H, W); True when unbatched."""
    unbatched = is_unbatched(a, name_a)
    if is_unbatched(b, name_b, dims_b) != unbatched:
        raise ValueError(
            "%s %s and %s %s must both have a batch dimension or both be unbatched"
            % (name_a, tuple(a.shape), name_b, tuple(b.shape))
        )
    return unbatched


def check_same(a: torch.Tensor, name_a: str, b: torch.Tensor, name_b: str) -> None:
    if a.device != b.device:
        raise ValueError(
            "%s and %s must be on the same device, got %s and %s"
            % (name_a, name_b, a.device, b.device)
        )
    if a.dtype != b.dtype:
        raise ValueError(
            "%s and %s must have the same dtype, got %s and %s"
            % (name_a, name_b, dtype_name(a.dtype), dtype_name(b.dtype))
        )


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
        raise ValueError("crop must be (top, left, height, width), got %s" % sizes_str(values))
    top, left, h, w = values
    if (
        any(violated(v < 0) for v in values)
        or violated(top + h > full_h)
        or violated(left + w > full_w)
    ):
        raise ValueError(
            "crop (top=%d, left=%d, height=%d, width=%d) lies outside the full output "
            "of size %dx%d" % (top, left, h, w, full_h, full_w)
        )
    return values


def conv_transpose_out_size(size, kernel, stride, padding, output_padding, dilation) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


# ---------------------------------------------------------------------------
# the 32-bit index limits
# ---------------------------------------------------------------------------


def check_index32(sizes, name: str) -> None:
    """A tensor of these sizes has at most ``INDEX_LIMIT`` elements."""
    numel = 1
    for s in sizes:
        numel = numel * s
    if violated(numel > INDEX_LIMIT):
        count = "more than 2^63" if numel >= 2**63 else "%d" % numel
        raise ValueError(
            "%s of size %s has %s elements, more than 32-bit indexing allows (%d)"
            % (name, sizes_str(sizes), count, INDEX_LIMIT)
        )


def check_extent(value, what: str) -> None:
    """One size or geometry value, or a pair of them, within ``EXTENT_LIMIT``."""
    if isinstance(value, tuple):
        if any(violated(v > EXTENT_LIMIT) for v in value):
            raise ValueError(
                "%s (%d, %d) is larger than 32-bit indexing allows (%d)"
                % (what, value[0], value[1], EXTENT_LIMIT)
            )
    elif violated(value > EXTENT_LIMIT):
        raise ValueError(
            "%s %d is larger than 32-bit indexing allows (%d)" % (what, value, EXTENT_LIMIT)
        )


# ---------------------------------------------------------------------------
# conv_transpose2d
# ---------------------------------------------------------------------------


def _conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation, crop):
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
        raise ValueError(
            "weight.shape[0] (%d) must equal the input channels x.shape[1] (%d)"
            % (weight.shape[0], c_in)
        )
    if c_in % groups != 0:
        raise ValueError("groups (%d) must divide the input channels (%d)" % (groups, c_in))
    c_out = weight.shape[1] * groups
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(
            "bias has %d elements, expected the output channels %d" % (bias.shape[0], c_out)
        )
    for axis in range(2):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise ValueError(
                "output_padding %s must be smaller than stride %s or dilation %s"
                % (output_padding, stride, dilation)
            )
    kh, kw = weight.shape[2], weight.shape[3]
    if kh == 0 or kw == 0:
        raise ValueError("weight kernel size must be positive, got %dx%d" % (kh, kw))
    check_extent(stride, "stride")
    check_extent(padding, "padding")
    check_extent(dilation, "dilation")
    check_index32(x.shape, "x")
    check_index32(weight.shape, "weight")
    full_h = conv_transpose_out_size(
        x.shape[2], kh, stride[0], padding[0], output_padding[0], dilation[0]
    )
    full_w = conv_transpose_out_size(
        x.shape[3], kw, stride[1], padding[1], output_padding[1], dilation[1]
    )
    if violated(full_h <= 0) or violated(full_w <= 0):
        raise ValueError(
            "conv_transpose2d output would be %dx%d for input %s, weight %s"
            % (full_h, full_w, sizes_str(x.shape), sizes_str(weight.shape))
        )
    check_extent(
        full_h + padding[0] + dilation[0] * kh,
        "the full output height plus padding and dilated kernel",
    )
    check_extent(
        full_w + padding[1] + dilation[1] * kw,
        "the full output width plus padding and dilated kernel",
    )
    crop = resolve_crop(crop, full_h, full_w)
    check_index32((x.shape[0], c_out, crop[2], crop[3]), "output")
    return stride, padding, output_padding, dilation, crop


def check_conv_transpose2d(
    x, weight, bias, stride, padding, output_padding, groups, dilation, crop
):
    """Returns the normalised ``(stride, padding, output_padding, dilation, crop)``."""
    return _conv_transpose2d(
        x, weight, bias, stride, padding, output_padding, groups, dilation, crop
    )


def check_conv_transpose2d_backward(
    grad, x, weight, stride, padding, output_padding, groups, dilation, crop
):
    """The forward's checks on x, weight and the geometry, then grad (the cropped output's shape)."""
    args = _conv_transpose2d(
        x, weight, None, stride, padding, output_padding, groups, dilation, crop
    )
    check_tensor(grad, "grad", 4)
    check_same(x, "x", grad, "grad")
    expected = (x.shape[0], weight.shape[1] * groups, args[4][2], args[4][3])
    if tuple(grad.shape) != expected:
        raise ValueError(
            "grad has shape %s, expected %s (the cropped output)"
            % (sizes_str(grad.shape), sizes_str(expected))
        )
    return args


# ---------------------------------------------------------------------------
# bilinear_upsample2d, upsample_argmax, upsample_cross_entropy
# ---------------------------------------------------------------------------


def check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale <= 0:
        raise ValueError("scale must be a positive int, got %r" % (scale,))
    return scale


def bilinear_full_size(x: torch.Tensor, scale: int) -> Tuple[int, int]:
    # depthwise deconvolution, kernel 2*scale, stride scale, no padding
    return ((x.shape[2] + 1) * scale, (x.shape[3] + 1) * scale)


def check_upsample_geometry(in_h, in_w, scale, crop):
    """scale, the full output size and the crop; returns ``(full_h, full_w, crop)``."""
    scale = check_scale(scale)
    if violated((in_h + 1) * scale > EXTENT_LIMIT) or violated((in_w + 1) * scale > EXTENT_LIMIT):
        raise ValueError(
            "scale %d with input size %dx%d gives a full output larger than 32-bit "
            "indexing allows (%d)" % (scale, in_h, in_w, EXTENT_LIMIT)
        )
    full_h, full_w = (in_h + 1) * scale, (in_w + 1) * scale
    return full_h, full_w, resolve_crop(crop, full_h, full_w)


def _row_buffers(channels, full_w) -> None:
    check_index32((2, channels, full_w), "the row buffers")


def check_bilinear_upsample2d(x, scale, crop):
    """Returns the resolved crop."""
    check_tensor(x, "x", 4)
    check_index32(x.shape, "x")
    _, _, crop = check_upsample_geometry(x.shape[2], x.shape[3], scale, crop)
    check_index32((x.shape[0], x.shape[1], crop[2], crop[3]), "output")
    return crop


def check_bilinear_upsample2d_backward(grad, in_height, in_width, scale, crop):
    check_tensor(grad, "grad", 4)
    check_index32(grad.shape, "grad")
    if in_height < 0 or in_width < 0:
        raise ValueError(
            "in_height and in_width must be non-negative, got %d and %d" % (in_height, in_width)
        )
    _, full_w, crop = check_upsample_geometry(in_height, in_width, scale, crop)
    if tuple(grad.shape[2:]) != (crop[2], crop[3]):
        raise ValueError(
            "grad of shape %s does not match the crop %dx%d"
            % (sizes_str(grad.shape), crop[2], crop[3])
        )
    check_index32((grad.shape[0], grad.shape[1], in_height, in_width), "grad_x")
    _row_buffers(grad.shape[1], full_w)
    return crop


def check_upsample_argmax(x, scale, crop):
    check_tensor(x, "x", 4)
    check_index32(x.shape, "x")
    if x.shape[1] == 0:
        raise ValueError(
            "upsample_argmax needs at least one channel, got x of shape %s" % sizes_str(x.shape)
        )
    _, full_w, crop = check_upsample_geometry(x.shape[2], x.shape[3], scale, crop)
    check_index32((x.shape[0], crop[2], crop[3]), "output")
    _row_buffers(x.shape[1], full_w)
    return crop


def check_upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction):
    """Everything but the label values (``check_target_values``); returns the resolved crop."""
    check_tensor(x, "x", 4)
    check_index32(x.shape, "x")
    check_tensor(target, "target", 3, floating=False)
    if target.dtype != torch.int64:
        raise ValueError("target must be an int64 label map, got %s" % dtype_name(target.dtype))
    if target.device != x.device:
        raise ValueError(
            "x and target must be on the same device, got %s and %s" % (x.device, target.device)
        )
    if reduction not in ("mean", "sum"):
        raise ValueError("reduction must be 'mean' or 'sum', got %r" % (reduction,))
    # (the C++ schema takes an int; Python callers could pass anything)
    if isinstance(ignore_index, bool) or not hasattr(type(ignore_index), "__index__"):
        raise ValueError("ignore_index must be an int, got %r" % (ignore_index,))
    if x.shape[1] == 0:
        raise ValueError(
            "upsample_cross_entropy needs at least one class, got x of shape %s"
            % sizes_str(x.shape)
        )
    _, full_w, crop = check_upsample_geometry(x.shape[2], x.shape[3], scale, crop)
    expected = (x.shape[0], crop[2], crop[3])
    if tuple(target.shape) != expected:
        raise ValueError(
            "target shape %s must be (N, H, W) = %s of the upsampled crop"
            % (sizes_str(target.shape), sizes_str(expected))
        )
    check_index32(target.shape, "target")
    _row_buffers(x.shape[1], full_w)
    return crop


def check_upsample_cross_entropy_backward(
    grad_loss, x, target, scale, crop, ignore_index, reduction
):
    crop = check_upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction)
    check_tensor(grad_loss, "grad_loss", floating=False)
    check_same(x, "x", grad_loss, "grad_loss")
    if grad_loss.numel() != 1:
        raise ValueError(
            "grad_loss must hold one value (the loss is a scalar), got shape %s"
            % sizes_str(grad_loss.shape)
        )
    return crop


def check_target_values(target, classes, ignore_index) -> None:
    """Every label is a class of x or ignore_index (F.cross_entropy's contract; one host sync).
    The native kernels check this; the reference leaves it to F.cross_entropy."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= classes)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target.reshape(-1)[bad.reshape(-1).to(torch.uint8).argmax()])
        raise ValueError(
            "target value %d is out of bounds: classes are [0, %d) (x has %d "
            "channels) and ignore_index is %d" % (value, classes, classes, ignore_index)
        )


# ---------------------------------------------------------------------------
# skip_add_crop and score_skip: a window of a larger map at an offset
# ---------------------------------------------------------------------------


def check_window(offset, h, w, map_h, map_w, map_name: str) -> Tuple[int, int]:
    """The h x w window at ``offset`` lies inside a map of size map_h x map_w."""
    oy, ox = pair(offset, "offset")
    if oy < 0 or ox < 0 or violated(oy + h > map_h) or violated(ox + w > map_w):
        raise ValueError(
            "offset (%d, %d) with window %dx%d lies outside %s of size %dx%d"
            % (oy, ox, h, w, map_name, map_h, map_w)
        )
    return oy, ox


def skip_window(coarse: torch.Tensor, skip_hw, offset, name: str = "skip"):
    """``check_window`` for coarse's H x W window in a map of size ``skip_hw``."""
    return check_window(offset, coarse.shape[2], coarse.shape[3], skip_hw[0], skip_hw[1], name)


def check_skip_add_crop(coarse, skip, offset) -> Tuple[int, int]:
    check_tensor(coarse, "coarse", 4)
    check_tensor(skip, "skip", 4)
    check_same(coarse, "coarse", skip, "skip")
    if coarse.shape[:2] != skip.shape[:2]:
        raise ValueError(
            "coarse %s and skip %s must agree in batch and channels"
            % (sizes_str(coarse.shape), sizes_str(skip.shape))
        )
    offset = skip_window(coarse, skip.shape[2:], offset)
    check_index32(coarse.shape, "coarse")
    check_index32(skip.shape, "skip")
    return offset


def check_skip_add_crop_backward(grad, skip_height, skip_width, offset) -> Tuple[int, int]:
    check_tensor(grad, "grad", 4)
    offset = skip_window(grad, (skip_height, skip_width), offset)
    check_index32(grad.shape, "grad")
    check_index32((grad.shape[0], grad.shape[1], skip_height, skip_width), "grad_skip")
    return offset


def _score_skip(lead, lead_name, feature, weight, bias, offset):
    check_tensor(lead, lead_name, 4)
    check_tensor(feature, "feature", 4)
    check_tensor(weight, "weight", 4)
    check_same(lead, lead_name, feature, "feature")
    check_same(lead, lead_name, weight, "weight")
    if weight.shape[2:] != (1, 1):
        raise ValueError(
            "weight must be a 1x1 convolution weight (K, C, 1, 1), got %s" % sizes_str(weight.shape)
        )
    if weight.shape[1] != feature.shape[1]:
        raise ValueError(
            "weight.shape[1] (%d) must equal feature channels (%d)"
            % (weight.shape[1], feature.shape[1])
        )
    n, k = lead.shape[:2]
    if n != feature.shape[0] or k != weight.shape[0]:
        raise ValueError(
            "%s has batch %d and %d channels, expected batch %d and %d channels "
            "(weight.shape[0])" % (lead_name, n, k, feature.shape[0], weight.shape[0])
        )
    if bias is not None:
        check_tensor(bias, "bias", 1)
        check_same(lead, lead_name, bias, "bias")
        if bias.shape[0] != k:
            raise ValueError("bias has %d elements, expected %d" % (bias.shape[0], k))
    offset = skip_window(lead, feature.shape[2:], offset, "feature")
    check_index32(lead.shape, lead_name)
    check_index32(feature.shape, "feature")
    check_index32(weight.shape, "weight")
    return offset


def check_score_skip(coarse, feature, weight, bias, offset) -> Tuple[int, int]:
    return _score_skip(coarse, "coarse", feature, weight, bias, offset)


def check_score_skip_backward(grad, feature, weight, offset) -> Tuple[int, int]:
    return _score_skip(grad, "grad", feature, weight, None, offset)
