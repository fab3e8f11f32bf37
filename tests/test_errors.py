"""Bad input, for every op: a clear error naming the argument, never a crash.

* Python checks (``fcnfast.ops`` and ``fcnfast.reference`` reject the same
  inputs with the same words): wrong dtype, device mix (a ``meta`` tensor next
  to a CPU tensor stands in for a second device), rank, channel mismatch,
  groups, non-positive stride, crop outside the output, ...
* C++ checks: the same kind of input passed straight to ``torch.ops.fcnfast``
  (bypassing the Python checks) when the op has a native kernel.
* 32-bit index overflow without allocating anything large: huge scales and
  strides with and without a small crop, stride-0 expanded inputs with more
  than 2**31 elements. Where a kernel would wrongly materialise such a tensor
  the allocation (hundreds of GB) fails at once instead of exhausting memory.
* NaN/Inf propagate exactly like the reference; strided, channels_last and
  overlapping (expanded) inputs give the reference result; empty batches.
* A checkpoint writer killed mid-write never replaces the last good file.
"""

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import REFERENCE_ONLY, assert_close_scaled
from op_cases import OPS, Case, check_case, layout_view

from fcnfast import _backend, ops, reference
from fcnfast import _geometry as geo

IMPLS = [pytest.param(ops, id="ops"), pytest.param(reference, id="reference")]
OVERFLOW = r"32-bit|int32|2\^31|2147483647"


def native_or_skip(op):
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    if not _backend.has_kernel(op, "cpu"):
        pytest.skip("fcnfast::%s has no native CPU kernel in this build" % op)


def randn(*shape, dtype=torch.float32):
    return torch.randn(shape, dtype=dtype)


def meta(*shape):
    return torch.empty(shape, device="meta")


def valid_args(op):
    """Keyword arguments of a small valid call of ``op``."""
    if op == "conv_transpose2d":
        return dict(
            x=randn(1, 4, 3, 3),
            weight=randn(4, 2, 3, 3),
            bias=randn(4),
            stride=2,
            padding=1,
            output_padding=1,
            groups=2,
            dilation=1,
            crop=None,
        )
    if op in ("bilinear_upsample2d", "upsample_argmax"):
        return dict(x=randn(1, 3, 4, 4), scale=2, crop=(1, 1, 6, 6))
    if op == "skip_add_crop":
        return dict(coarse=randn(1, 3, 4, 4), skip=randn(1, 3, 8, 8), offset=(1, 1))
    if op == "score_skip":
        return dict(
            coarse=randn(1, 3, 4, 4),
            feature=randn(1, 5, 8, 8),
            weight=randn(3, 5, 1, 1),
            bias=randn(3),
            scale=0.01,
            offset=(2, 3),
        )
    if op == "upsample_cross_entropy":
        return dict(
            x=randn(1, 3, 4, 4),
            target=torch.randint(0, 3, (1, 6, 6)),
            scale=2,
            crop=(1, 1, 6, 6),
            ignore_index=255,
            reduction="mean",
        )
    raise KeyError(op)


# (op, changed arguments, message pattern); every pattern names the argument
BAD_ARGS = [
    # conv_transpose2d
    (
        "conv_transpose2d",
        dict(x=torch.ones(1, 4, 3, 3, dtype=torch.int32)),
        r"x must be a floating",
    ),
    ("conv_transpose2d", dict(x=[[1.0]]), r"x must be a torch.Tensor"),
    (
        "conv_transpose2d",
        dict(weight=randn(4, 2, 3, 3, dtype=torch.float64)),
        r"x and weight must have the same dtype",
    ),
    (
        "conv_transpose2d",
        dict(bias=randn(4, dtype=torch.float64)),
        r"x and bias must have the same dtype",
    ),
    ("conv_transpose2d", dict(weight=meta(4, 2, 3, 3)), r"x and weight must be on the same device"),
    ("conv_transpose2d", dict(bias=meta(4)), r"x and bias must be on the same device"),
    ("conv_transpose2d", dict(x=randn(3, 3)), r"x must be a 4-D tensor"),
    ("conv_transpose2d", dict(weight=randn(4, 2, 3)), r"weight must be a 4-D tensor"),
    ("conv_transpose2d", dict(bias=randn(1, 4)), r"bias must be a 1-D tensor"),
    (
        "conv_transpose2d",
        dict(weight=randn(3, 2, 3, 3)),
        r"weight.shape\[0\] \(3\) must equal .*x.shape\[1\] \(4\)",
    ),
    ("conv_transpose2d", dict(groups=3, weight=randn(4, 2, 3, 3)), r"groups \(3\) must divide .*4"),
    ("conv_transpose2d", dict(groups=0), r"groups must be a positive int, got 0"),
    ("conv_transpose2d", dict(groups=-2), r"groups must be a positive int, got -2"),
    ("conv_transpose2d", dict(groups=2.0), r"groups must be a positive int"),
    ("conv_transpose2d", dict(stride=0), r"stride must be positive, got \(0, 0\)"),
    ("conv_transpose2d", dict(stride=(2, -1)), r"stride must be positive, got \(2, -1\)"),
    ("conv_transpose2d", dict(stride=(1, 2, 3)), r"stride must be an int or a pair"),
    ("conv_transpose2d", dict(dilation=0), r"dilation must be positive"),
    ("conv_transpose2d", dict(padding=-1), r"padding must be non-negative"),
    ("conv_transpose2d", dict(output_padding=-1), r"output_padding must be non-negative"),
    (
        "conv_transpose2d",
        dict(output_padding=2),
        r"output_padding \(2, 2\) must be smaller than stride",
    ),
    ("conv_transpose2d", dict(bias=randn(3)), r"bias has 3 elements, expected .* 4"),
    (
        "conv_transpose2d",
        dict(crop=(0, 0, 7, 7)),
        r"crop \(top=0, left=0, height=7, width=7\) lies outside .* 6x6",
    ),
    ("conv_transpose2d", dict(crop=(5, 0, 2, 2)), r"crop .* lies outside"),
    ("conv_transpose2d", dict(crop=(-1, 0, 2, 2)), r"crop .* lies outside"),
    ("conv_transpose2d", dict(crop=(0, 0, -1, 2)), r"crop .* lies outside"),
    ("conv_transpose2d", dict(crop=(0, 0, 2)), r"crop must be \(top, left, height, width\)"),
    ("conv_transpose2d", dict(crop=5), r"crop must be \(top, left, height, width\)"),
    (
        "conv_transpose2d",
        dict(x=randn(1, 4, 1, 1), weight=randn(4, 2, 1, 1), output_padding=0, padding=1),
        r"conv_transpose2d output would be",
    ),
    ("conv_transpose2d", dict(weight=randn(4, 2, 0, 3)), r"weight kernel size must be positive"),
    # bilinear_upsample2d / upsample_argmax share their checks
    *[
        (op, change, match)
        for op in ("bilinear_upsample2d", "upsample_argmax")
        for change, match in [
            (dict(x=torch.ones(1, 3, 4, 4, dtype=torch.int64)), r"x must be a floating"),
            (dict(x=randn(4, 4)), r"x must be a 4-D tensor"),
            (dict(x=None), r"x must be a torch.Tensor"),
            (dict(scale=0), r"scale must be a positive int, got 0"),
            (dict(scale=-2), r"scale must be a positive int, got -2"),
            (dict(scale=2.5), r"scale must be a positive int, got 2.5"),
            (dict(scale=True), r"scale must be a positive int, got True"),
            (dict(crop=(0, 0, 11, 10)), r"crop .* lies outside the full output of size 10x10"),
            (dict(crop=(0, -1, 1, 1)), r"crop .* lies outside"),
            (dict(crop=(0, 0, 1)), r"crop must be \(top, left, height, width\)"),
        ]
    ],
    # skip_add_crop
    (
        "skip_add_crop",
        dict(coarse=torch.ones(1, 3, 4, 4, dtype=torch.int32)),
        r"coarse must be a floating",
    ),
    ("skip_add_crop", dict(skip=None), r"skip must be a torch.Tensor"),
    (
        "skip_add_crop",
        dict(skip=randn(1, 3, 8, 8, dtype=torch.float64)),
        r"coarse and skip must have the same dtype",
    ),
    ("skip_add_crop", dict(skip=meta(1, 3, 8, 8)), r"coarse and skip must be on the same device"),
    ("skip_add_crop", dict(coarse=randn(4, 4)), r"coarse must be a 4-D tensor"),
    ("skip_add_crop", dict(skip=randn(1, 1, 3, 8, 8)), r"skip must be a 4-D tensor"),
    (
        "skip_add_crop",
        dict(skip=randn(1, 2, 8, 8)),
        r"coarse .* and skip .* must agree in batch and channels",
    ),
    ("skip_add_crop", dict(skip=randn(2, 3, 8, 8)), r"must agree in batch and channels"),
    (
        "skip_add_crop",
        dict(offset=(-1, 0)),
        r"offset \(-1, 0\) with window 4x4 lies outside skip of size 8x8",
    ),
    ("skip_add_crop", dict(offset=(5, 0)), r"offset \(5, 0\) .* lies outside skip"),
    ("skip_add_crop", dict(offset=(0, 1, 2)), r"offset must be an int or a pair"),
    # score_skip
    (
        "score_skip",
        dict(coarse=torch.ones(1, 3, 4, 4, dtype=torch.int32)),
        r"coarse must be a floating",
    ),
    (
        "score_skip",
        dict(feature=randn(1, 5, 8, 8, dtype=torch.float64)),
        r"coarse and feature must have the same dtype",
    ),
    (
        "score_skip",
        dict(weight=randn(3, 5, 1, 1, dtype=torch.float64)),
        r"coarse and weight must have the same dtype",
    ),
    (
        "score_skip",
        dict(bias=randn(3, dtype=torch.float64)),
        r"coarse and bias must have the same dtype",
    ),
    (
        "score_skip",
        dict(feature=meta(1, 5, 8, 8)),
        r"coarse and feature must be on the same device",
    ),
    ("score_skip", dict(weight=meta(3, 5, 1, 1)), r"coarse and weight must be on the same device"),
    ("score_skip", dict(bias=meta(3)), r"coarse and bias must be on the same device"),
    ("score_skip", dict(feature=randn(8, 8)), r"feature must be a 4-D tensor"),
    ("score_skip", dict(weight=randn(3, 5)), r"weight must be a 4-D tensor"),
    ("score_skip", dict(bias=randn(3, 1)), r"bias must be a 1-D tensor"),
    ("score_skip", dict(weight=randn(3, 5, 3, 3)), r"weight must be a 1x1 convolution weight"),
    (
        "score_skip",
        dict(weight=randn(3, 4, 1, 1)),
        r"weight.shape\[1\] \(4\) must equal feature channels \(5\)",
    ),
    (
        "score_skip",
        dict(weight=randn(2, 5, 1, 1), bias=randn(2)),
        r"coarse has batch 1 and 3 channels, expected batch 1 and 2 channels",
    ),
    ("score_skip", dict(feature=randn(2, 5, 8, 8)), r"coarse has batch 1 and .* expected batch 2"),
    ("score_skip", dict(bias=randn(4)), r"bias has 4 elements, expected 3"),
    (
        "score_skip",
        dict(offset=(5, 0)),
        r"offset \(5, 0\) with window 4x4 lies outside feature of size 8x8",
    ),
    ("score_skip", dict(offset=-1), r"offset .* lies outside feature"),
    # upsample_cross_entropy
    (
        "upsample_cross_entropy",
        dict(x=torch.ones(1, 3, 4, 4, dtype=torch.int64)),
        r"x must be a floating",
    ),
    ("upsample_cross_entropy", dict(x=randn(4, 4)), r"x must be a 4-D tensor"),
    (
        "upsample_cross_entropy",
        dict(target=torch.zeros(1, 6, 6)),
        r"target must be an int64 label map",
    ),
    (
        "upsample_cross_entropy",
        dict(target=torch.zeros(1, 6, 6, dtype=torch.int32)),
        r"target must be an int64",
    ),
    (
        "upsample_cross_entropy",
        dict(target=torch.zeros(6, dtype=torch.int64)),
        r"target must be a 3-D tensor",
    ),
    (
        "upsample_cross_entropy",
        dict(target=torch.zeros(1, 6, 6, dtype=torch.int64, device="meta")),
        r"x and target must be on the same device",
    ),
    (
        "upsample_cross_entropy",
        dict(target=torch.zeros(1, 5, 6, dtype=torch.int64)),
        r"target shape \[1, 5, 6\] must be \(N, H, W\) = \[1, 6, 6\]",
    ),
    (
        "upsample_cross_entropy",
        dict(reduction="none"),
        r"reduction must be 'mean' or 'sum', got 'none'",
    ),
    ("upsample_cross_entropy", dict(scale=0), r"scale must be a positive int"),
    (
        "upsample_cross_entropy",
        dict(crop=(5, 5, 6, 6)),
        r"crop .* lies outside the full output of size 10x10",
    ),
]


def _bad_id(entry):
    op, change, _ = entry
    return "%s-%s" % (op, "-".join("%s=%s" % (k, _short(v)) for k, v in change.items()))


def _short(v):
    if isinstance(v, torch.Tensor):
        return "%s%s%s" % (
            tuple(v.shape),
            str(v.dtype).replace("torch.", ""),
            "" if v.device.type == "cpu" else v.device.type,
        )
    return repr(v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op,change,match", BAD_ARGS, ids=[_bad_id(e) for e in BAD_ARGS])
def test_bad_argument(impl, op, change, match):
    args = valid_args(op)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        getattr(impl, op)(**args)


@pytest.mark.parametrize(
    "impl", [pytest.param(ops, id="ops"), pytest.param(reference, id="reference")]
)
def test_skip_add_crop_coarse_not_a_tensor(impl):
    with pytest.raises(ValueError, match=r"coarse must be a torch.Tensor"):
        impl.skip_add_crop([[1.0]], randn(1, 3, 8, 8), (1, 1))


@pytest.mark.parametrize("op", OPS)
def test_valid_args_are_valid(op):
    """Guard for the table above: the unchanged arguments run and agree."""
    args = valid_args(op)
    expected = getattr(reference, op)(**args)
    actual = getattr(ops, op)(**args)
    if op == "upsample_argmax":
        assert torch.equal(actual, expected)
    else:
        assert_close_scaled(actual, expected)


# ---------------------------------------------------------------------------
# C++ checks: torch.ops.fcnfast.* called directly, Python checks bypassed
# ---------------------------------------------------------------------------


def _native(name):
    return getattr(torch.ops.fcnfast, name)


def _ct(
    x=None,
    weight=None,
    bias=None,
    stride=(2, 2),
    padding=(1, 1),
    output_padding=(1, 1),
    groups=2,
    dilation=(1, 1),
    crop=(0, 0, 6, 6),
):
    x = randn(1, 4, 3, 3) if x is None else x
    weight = randn(4, 2, 3, 3) if weight is None else weight
    return _native("conv_transpose2d")(
        x,
        weight,
        bias,
        list(stride),
        list(padding),
        list(output_padding),
        groups,
        list(dilation),
        list(crop),
    )


NATIVE_BAD = [
    (
        "conv_transpose2d",
        lambda: _ct(x=torch.ones(1, 4, 3, 3, dtype=torch.int32)),
        r"x must be a floating",
    ),
    ("conv_transpose2d", lambda: _ct(weight=randn(4, 2, 3, 3, dtype=torch.float64)), r"dtype"),
    ("conv_transpose2d", lambda: _ct(x=randn(4, 3, 3)), r"x must be a 4-D"),
    ("conv_transpose2d", lambda: _ct(weight=randn(4, 2, 3)), r"weight must be a 4-D"),
    ("conv_transpose2d", lambda: _ct(weight=randn(3, 2, 3, 3)), r"weight"),
    ("conv_transpose2d", lambda: _ct(groups=3), r"groups"),
    ("conv_transpose2d", lambda: _ct(groups=0), r"groups"),
    ("conv_transpose2d", lambda: _ct(stride=(0, 2)), r"stride"),
    ("conv_transpose2d", lambda: _ct(stride=(-2, 2)), r"stride"),
    ("conv_transpose2d", lambda: _ct(dilation=(1, 0)), r"dilation"),
    ("conv_transpose2d", lambda: _ct(padding=(-1, 0)), r"padding"),
    ("conv_transpose2d", lambda: _ct(output_padding=(2, 0)), r"output_padding"),
    ("conv_transpose2d", lambda: _ct(bias=randn(3)), r"bias"),
    ("conv_transpose2d", lambda: _ct(crop=(0, 0, 7, 6)), r"crop"),
    ("conv_transpose2d", lambda: _ct(crop=(-1, 0, 2, 2)), r"crop"),
    ("conv_transpose2d", lambda: _ct(crop=(0, 0, 2)), r"crop"),
    (
        "conv_transpose2d",
        lambda: _native("conv_transpose2d_backward")(
            randn(1, 4, 5, 5),
            randn(1, 4, 3, 3),
            randn(4, 2, 3, 3),
            [2, 2],
            [1, 1],
            [1, 1],
            2,
            [1, 1],
            [0, 0, 6, 6],
            [True, True, True],
        ),
        r"grad",
    ),
    *[
        (op, fn, match)
        for op in ("bilinear_upsample2d", "upsample_argmax")
        for fn, match in [
            (
                lambda op=op: _native(op)(
                    torch.ones(1, 3, 4, 4, dtype=torch.int64), 2, [0, 0, 4, 4]
                ),
                r"x must be a floating",
            ),
            (lambda op=op: _native(op)(randn(3, 4, 4), 2, [0, 0, 4, 4]), r"x must be a 4-D"),
            (lambda op=op: _native(op)(randn(1, 3, 4, 4), 0, [0, 0, 4, 4]), r"scale"),
            (lambda op=op: _native(op)(randn(1, 3, 4, 4), -3, [0, 0, 4, 4]), r"scale"),
            (lambda op=op: _native(op)(randn(1, 3, 4, 4), 2, [0, 0, 11, 4]), r"crop"),
            (lambda op=op: _native(op)(randn(1, 3, 4, 4), 2, [-1, 0, 1, 1]), r"crop"),
        ]
    ],
    (
        "bilinear_upsample2d",
        lambda: _native("bilinear_upsample2d_backward")(randn(1, 3, 11, 4), 4, 4, 2, [0, 0, 11, 4]),
        r"crop|grad",
    ),
    (
        "skip_add_crop",
        lambda: _native("skip_add_crop")(randn(1, 3, 4, 4), randn(1, 2, 8, 8), [1, 1]),
        r"batch and channels",
    ),
    (
        "skip_add_crop",
        lambda: _native("skip_add_crop")(randn(1, 3, 4, 4), randn(1, 3, 8, 8), [5, 1]),
        r"offset",
    ),
    (
        "skip_add_crop",
        lambda: _native("skip_add_crop")(randn(1, 3, 4, 4), randn(1, 3, 8), [1, 1]),
        r"skip must be a 4-D",
    ),
    (
        "skip_add_crop",
        lambda: _native("skip_add_crop_backward")(randn(1, 3, 4, 4), 3, 8, [0, 0]),
        r"offset",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 3, 4, 4), randn(1, 5, 8, 8), randn(3, 5, 3, 3), None, 1.0, [0, 0]
        ),
        r"weight",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 3, 4, 4), randn(1, 5, 8, 8), randn(3, 4, 1, 1), None, 1.0, [0, 0]
        ),
        r"weight|feature",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 2, 4, 4), randn(1, 5, 8, 8), randn(3, 5, 1, 1), None, 1.0, [0, 0]
        ),
        r"coarse",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 3, 4, 4), randn(1, 5, 8, 8), randn(3, 5, 1, 1), randn(2), 1.0, [0, 0]
        ),
        r"bias",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 3, 4, 4), randn(1, 5, 8, 8), randn(3, 5, 1, 1), None, 1.0, [0, 6]
        ),
        r"offset",
    ),
    (
        "score_skip",
        lambda: _native("score_skip")(
            randn(1, 3, 4, 4),
            randn(1, 5, 8, 8, dtype=torch.float64),
            randn(3, 5, 1, 1),
            None,
            1.0,
            [0, 0],
        ),
        r"dtype",
    ),
    (
        "upsample_cross_entropy",
        lambda: _native("upsample_cross_entropy")(
            randn(1, 3, 4, 4), torch.zeros(1, 6, 6), 2, [1, 1, 6, 6], 255, "mean"
        ),
        r"target",
    ),
    (
        "upsample_cross_entropy",
        lambda: _native("upsample_cross_entropy")(
            randn(1, 3, 4, 4), torch.zeros(1, 5, 6, dtype=torch.int64), 2, [1, 1, 6, 6], 255, "mean"
        ),
        r"target",
    ),
    (
        "upsample_cross_entropy",
        lambda: _native("upsample_cross_entropy")(
            randn(1, 3, 4, 4), torch.zeros(1, 6, 6, dtype=torch.int64), 2, [1, 1, 6, 6], 255, "none"
        ),
        r"reduction",
    ),
    (
        "upsample_cross_entropy",
        lambda: _native("upsample_cross_entropy")(
            randn(1, 3, 4, 4), torch.zeros(1, 6, 6, dtype=torch.int64), 2, [5, 5, 6, 6], 255, "sum"
        ),
        r"crop",
    ),
    (
        "upsample_cross_entropy",
        lambda: _native("upsample_cross_entropy")(
            randn(1, 3, 4, 4),
            torch.full((1, 6, 6), 3, dtype=torch.int64),
            2,
            [1, 1, 6, 6],
            255,
            "sum",
        ),
        r"target",
    ),
]


@pytest.mark.parametrize(
    "op,call,match", NATIVE_BAD, ids=["%s-%d" % (e[0], i) for i, e in enumerate(NATIVE_BAD)]
)
def test_native_checks(op, call, match):
    """The kernels validate on their own (``torch.ops.fcnfast.*`` is public too)."""
    native_or_skip(op)
    with pytest.raises(ValueError, match=match):
        call()


def test_cross_entropy_target_out_of_range_like_reference():
    """A label >= C that is not ignore_index is an error in both implementations."""
    x, target = randn(1, 3, 4, 4), torch.full((1, 6, 6), 3, dtype=torch.int64)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        reference.upsample_cross_entropy(x, target, 2, (1, 1, 6, 6))
    native_or_skip("upsample_cross_entropy")
    with pytest.raises(ValueError, match="target value 3 is out of bounds"):
        ops.upsample_cross_entropy(x, target, 2, (1, 1, 6, 6))
    target[0, 0, 0] = -5
    with pytest.raises(ValueError, match="target value -5 is out of bounds"):
        ops.upsample_cross_entropy(x, target.clamp(max=2), 2, (1, 1, 6, 6))


def test_argmax_without_classes_is_an_error():
    x = randn(1, 0, 3, 3)
    with pytest.raises(ValueError, match="upsample_argmax needs at least one channel"):
        reference.upsample_argmax(x, 2)
    with pytest.raises(ValueError, match="upsample_argmax needs at least one channel"):
        ops.upsample_argmax(x, 2)
    native_or_skip("upsample_argmax")
    with pytest.raises(ValueError, match="upsample_argmax needs at least one channel"):
        torch.ops.fcnfast.upsample_argmax(x, 2, [0, 0, 8, 8])


# ---------------------------------------------------------------------------
# 32-bit index overflow, without allocating anything large
# ---------------------------------------------------------------------------


def huge_expanded(*shape, dtype=torch.float32, value=1.0):
    """A stride-0 view with ``prod(shape)`` elements (> 2**31) backed by one element.

    Materialising it (``.contiguous()``) would need hundreds of GB, so a kernel
    that forgets the 32-bit check fails at the allocation instead of
    exhausting memory."""
    return torch.full((1,) * len(shape), value, dtype=dtype).expand(shape)


BIG = 2**18  # a BIG x BIG plane has 2**36 elements


@pytest.fixture
def memory_cap():
    """Cap this process's address space at its current size + 4 GiB for the test.

    A kernel that allocates something proportional to a huge scale or to the
    elements of a stride-0 input must fail with an allocation error, not get
    the machine's OOM killer to end the test run. (Not under ASan, whose shadow
    memory needs the address space; .ci/sanitize caps allocations with
    ASAN_OPTIONS=max_allocation_size_mb instead.)"""
    if "asan" in os.environ.get("LD_PRELOAD", ""):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * resource.getpagesize()
    cap = current + (4 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize(
    "op,call",
    [
        (
            "conv_transpose2d",
            lambda: ops.conv_transpose2d(randn(1, 1, 2, 2), randn(1, 1, 1, 1), stride=BIG),
        ),
        (
            "conv_transpose2d",
            lambda: ops.conv_transpose2d(randn(1, 1, 2, 2), randn(1, 1, 2, 2), dilation=BIG),
        ),
        ("bilinear_upsample2d", lambda: ops.bilinear_upsample2d(randn(1, 1, 2, 2), BIG)),
        ("upsample_argmax", lambda: ops.upsample_argmax(randn(1, 2, 2, 2), BIG)),
        (
            "upsample_cross_entropy",
            lambda: ops.upsample_cross_entropy(
                randn(1, 2, 2, 2),
                huge_expanded(1, 3 * BIG, 3 * BIG, dtype=torch.int64, value=0),
                BIG,
            ),
        ),
        (
            "skip_add_crop",
            lambda: ops.skip_add_crop(
                huge_expanded(1, 1, BIG, BIG), huge_expanded(1, 1, BIG, BIG), 0
            ),
        ),
        (
            "score_skip",
            lambda: ops.score_skip(
                huge_expanded(1, 1, BIG, BIG), huge_expanded(1, 1, BIG, BIG), randn(1, 1, 1, 1)
            ),
        ),
    ],
    ids=[
        "conv-stride",
        "conv-dilation",
        "bilinear",
        "argmax",
        "cross-entropy",
        "skip-add",
        "score-skip",
    ],
)
@pytest.mark.usefixtures("memory_cap")
def test_output_too_large_for_32bit_indexing(op, call):
    """An output (or label map) of more than 2**31 elements is refused before any allocation."""
    native_or_skip(op)
    with pytest.raises(ValueError, match=OVERFLOW):
        call()


def accept_result_or_overflow_error(compute, expected, names):
    """A huge geometry with a small kept window: either the exact result or a
    ValueError that names the argument and the 32-bit limit."""
    try:
        actual = compute()
    except ValueError as exc:
        message = str(exc)
        assert any(n in message for n in names), "error does not name %s: %s" % (names, message)
        assert __import__("re").search(OVERFLOW, message), (
            "error does not state the limit: %s" % message
        )
        return "refused"
    if expected.dtype == torch.int64:
        assert torch.equal(actual, expected)
    else:
        assert_close_scaled(actual, expected)
    return "computed"


def direct_conv_transpose2d(x, weight, bias, stride, padding, dilation, groups, crop):
    """conv_transpose2d on a crop window by the definition (python ints, no big tensors)."""
    top, left, h, w = crop
    n, c_in, in_h, in_w = x.shape
    c_in_g, c_out_g, kh, kw = (
        weight.shape[0] // groups,
        weight.shape[1],
        weight.shape[2],
        weight.shape[3],
    )
    out = torch.zeros(n, c_out_g * groups, h, w, dtype=torch.float64)
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1)

    def taps(pos, k, s, p, d, size):
        found = []
        for tap in range(k):
            num = pos + p - tap * d
            if num >= 0 and num % s == 0 and num // s < size:
                found.append((tap, num // s))
        return found

    for oy in range(h):
        for ox in range(w):
            for ky, iy in taps(top + oy, kh, stride[0], padding[0], dilation[0], in_h):
                for kx, ix in taps(left + ox, kw, stride[1], padding[1], dilation[1], in_w):
                    for g in range(groups):
                        xs = x[:, g * c_in_g : (g + 1) * c_in_g, iy, ix].double()  # (n, cig)
                        ws = weight[g * c_in_g : (g + 1) * c_in_g, :, ky, kx].double()  # (cig, cog)
                        out[:, g * c_out_g : (g + 1) * c_out_g, oy, ox] += xs @ ws
    return out.to(x.dtype)


def direct_bilinear_upsample2d(x, scale, crop):
    """bilinear_upsample2d on a crop window from the 1-D Caffe filter (python ints)."""
    top, left, h, w = crop
    f, c = scale, scale - 0.5  # kernel 2*scale is even

    def taps(pos, size):
        first = max(0, (pos - 2 * scale) // scale + 1)
        return [
            (i, 1 - abs(pos - i * scale - c) / f)
            for i in range(first, min(size, pos // scale + 1))
            if 0 <= pos - i * scale < 2 * scale
        ]

    out = torch.zeros(x.shape[0], x.shape[1], h, w, dtype=torch.float64)
    for oy in range(h):
        for ox in range(w):
            for iy, wy in taps(top + oy, x.shape[2]):
                for ix, wx in taps(left + ox, x.shape[3]):
                    out[:, :, oy, ox] += x[:, :, iy, ix].double() * (wy * wx)
    return out.to(x.dtype)


def test_direct_oracles_match_reference():
    """The slow oracles used for huge geometries agree with the reference on small ones."""
    x, w, b = (
        randn(2, 4, 3, 4, dtype=torch.float64),
        randn(4, 3, 3, 2, dtype=torch.float64),
        randn(6, dtype=torch.float64),
    )
    crop = (1, 2, 4, 7)
    expected = reference.conv_transpose2d(x, w, b, (2, 3), (1, 0), 0, 2, (1, 2), crop)
    assert_close_scaled(direct_conv_transpose2d(x, w, b, (2, 3), (1, 0), (1, 2), 2, crop), expected)
    for scale in (1, 2, 3):
        expected = reference.bilinear_upsample2d(x, scale, (1, 0, 3 * scale, 2 * scale))
        assert_close_scaled(
            direct_bilinear_upsample2d(x, scale, (1, 0, 3 * scale, 2 * scale)), expected
        )


HUGE = 2**30  # positions around 2**31 and 2**32 inside a small window


@pytest.mark.parametrize(
    "stride,padding,dilation,crop",
    [
        ((HUGE, 3), (0, 0), (1, 1), (2**31 - 1, 0, 3, 4)),  # rows straddle 2**31
        ((3, HUGE), (0, 0), (1, HUGE), (1, 3 * HUGE - 1, 4, 2)),  # huge dilation too
        ((HUGE, HUGE), (HUGE - 1, HUGE - 1), (1, 1), None),  # huge padding, small output
    ],
)
@pytest.mark.usefixtures("memory_cap")
def test_huge_stride_small_crop(stride, padding, dilation, crop):
    native_or_skip("conv_transpose2d")
    x, w, b = (
        randn(1, 2, 3, 3, dtype=torch.float64),
        randn(2, 2, 2, 2, dtype=torch.float64),
        randn(2, dtype=torch.float64),
    )
    full = [
        geo.conv_transpose_out_size(x.shape[2 + a], 2, stride[a], padding[a], 0, dilation[a])
        for a in range(2)
    ]
    crop_abs = crop or (0, 0, full[0], full[1])
    expected = direct_conv_transpose2d(x, w, b, stride, padding, dilation, 1, crop_abs)
    assert expected.abs().sum() > 0, "the window should receive some taps"
    accept_result_or_overflow_error(
        lambda: ops.conv_transpose2d(x, w, b, stride, padding, 0, 1, dilation, crop),
        expected,
        ("stride", "dilation", "padding", "crop", "output"),
    )


@pytest.mark.parametrize("op", ["bilinear_upsample2d", "upsample_argmax", "upsample_cross_entropy"])
@pytest.mark.usefixtures("memory_cap")
def test_huge_scale_small_crop(op):
    """scale 2**30: kernel size 2**31 and output positions around 2**32."""
    native_or_skip(op)
    x = randn(1, 3, 3, 3, dtype=torch.float64)
    crop = (2**31 - 2, 2**32 - 3, 4, 3)
    scores = direct_bilinear_upsample2d(x, HUGE, crop)
    assert scores.abs().sum() > 0
    names = ("scale", "crop", "output", "kernel")
    if op == "bilinear_upsample2d":
        accept_result_or_overflow_error(
            lambda: ops.bilinear_upsample2d(x, HUGE, crop), scores, names
        )
    elif op == "upsample_argmax":
        accept_result_or_overflow_error(
            lambda: ops.upsample_argmax(x, HUGE, crop), scores.argmax(1), names
        )
    else:
        target = torch.tensor([[[0, 1, 2], [2, 1, 0], [255, 1, 1], [0, 0, 2]]])
        expected = torch.nn.functional.cross_entropy(scores, target, ignore_index=255)
        accept_result_or_overflow_error(
            lambda: ops.upsample_cross_entropy(x, target, HUGE, crop), expected, names
        )


@pytest.mark.parametrize(
    "op", ["bilinear_upsample2d", "upsample_argmax", "upsample_cross_entropy", "conv_transpose2d"]
)
@pytest.mark.usefixtures("memory_cap")
def test_expanded_input_beyond_32bit(op):
    """A stride-0 input with 2**36 elements and a tiny kept window: the exact
    result (ones in, a known constant out) or a ValueError naming x."""
    native_or_skip(op)
    x = huge_expanded(1, 1, BIG, BIG, dtype=torch.float64)
    crop = (BIG // 2, BIG // 2, 2, 3)
    small = torch.ones(1, 1, 4, 4, dtype=torch.float64)
    if op == "conv_transpose2d":
        w = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float64)
        expected = reference.conv_transpose2d(small, w, crop=(1, 1, 2, 3))
        compute = lambda: ops.conv_transpose2d(x, w, crop=crop)  # noqa: E731
    else:
        expected = reference.bilinear_upsample2d(small, 2, (2, 2, 2, 3))
        if op == "bilinear_upsample2d":
            compute = lambda: ops.bilinear_upsample2d(x, 2, crop)  # noqa: E731
        elif op == "upsample_argmax":
            expected = expected.argmax(1)
            compute = lambda: ops.upsample_argmax(x, 2, crop)  # noqa: E731
        else:
            target = torch.zeros(1, 2, 3, dtype=torch.int64)
            expected = torch.nn.functional.cross_entropy(expected, target)
            compute = lambda: ops.upsample_cross_entropy(x, target, 2, crop)  # noqa: E731
    accept_result_or_overflow_error(compute, expected, ("x",))


# ---------------------------------------------------------------------------
# NaN / Inf, exotic layouts, empty batches: exactly the reference
# ---------------------------------------------------------------------------


def poison(t, seed, count=3):
    """Put NaN, +Inf and -Inf at ``count`` random positions each (a copy)."""
    t = t.clone()
    if t.numel() == 0:
        return t
    g = torch.Generator().manual_seed(seed)
    flat = t.view(-1)
    for value in (float("nan"), float("inf"), float("-inf")):
        flat[torch.randint(0, t.numel(), (count,), generator=g)] = value
    return t


def special_cases(dtype):
    """One case per op whose every floating input may hold NaN/Inf. The geometry
    keeps every input element inside the kept output (no crop, window = whole
    map), so the reference's gradient never multiplies a NaN by a cropped-away
    zero that a crop-aware kernel never reads."""
    r = lambda *s: randn(*s, dtype=dtype)  # noqa: E731
    target = torch.randint(0, 4, (2, 12, 15))
    target[0, :3] = 255
    return [
        Case(
            "conv_transpose2d",
            (r(2, 4, 5, 6), r(4, 3, 3, 2), r(6)),
            dict(stride=(2, 3), padding=0, groups=2),
        ),
        Case("bilinear_upsample2d", (r(2, 4, 5, 4),), dict(scale=3)),
        Case("upsample_argmax", (r(2, 4, 5, 4),), dict(scale=3)),
        Case("upsample_cross_entropy", (r(2, 4, 3, 4), target), dict(scale=3, crop=(0, 0, 12, 15))),
        Case("skip_add_crop", (r(2, 3, 5, 6), r(2, 3, 7, 9)), dict(offset=(1, 2))),
        Case(
            "score_skip",
            (r(2, 3, 5, 6), r(2, 4, 5, 6), r(3, 4, 1, 1), r(3)),
            dict(scale=0.5, offset=(0, 0)),
        ),
    ]


def floating_arguments():
    """(op, index) for every floating input of every op's special case."""
    return [
        (case.op, i)
        for case in special_cases(torch.float32)
        for i, leaf in enumerate(case.leaves)
        if leaf.is_floating_point()
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "op,poisoned", floating_arguments(), ids=["%s-arg%d" % pair for pair in floating_arguments()]
)
def test_nan_inf_propagate_like_reference(op, poisoned, dtype):
    case = next(c for c in special_cases(dtype) if c.op == op)
    native_or_skip(op)
    leaves = list(case.leaves)
    leaves[poisoned] = poison(leaves[poisoned], seed=poisoned)
    case.leaves = tuple(leaves)
    check_case(case)


@pytest.mark.parametrize(
    "op", ["conv_transpose2d", "bilinear_upsample2d", "score_skip", "skip_add_crop"]
)
def test_nan_inf_forward_with_crop(op):
    """Forward only, NaN/Inf anywhere (also in the cropped-away part)."""
    native_or_skip(op)
    if op == "conv_transpose2d":
        args = (
            poison(randn(2, 4, 5, 6), 1),
            poison(randn(4, 3, 3, 2), 2),
            None,
            2,
            1,
            1,
            2,
            1,
            (2, 3, 6, 5),
        )
    elif op == "bilinear_upsample2d":
        args = (poison(randn(2, 4, 5, 6), 1), 4, (3, 5, 9, 7))
    elif op == "score_skip":
        args = (
            poison(randn(2, 3, 4, 5), 1),
            poison(randn(2, 4, 7, 9), 2),
            randn(3, 4, 1, 1),
            None,
            0.25,
            (2, 3),
        )
    else:
        args = (poison(randn(2, 3, 4, 5), 1), poison(randn(2, 3, 7, 9), 2), (2, 3))
    with torch.no_grad():
        assert_close_scaled(getattr(ops, op)(*args), getattr(reference, op)(*args))


LAYOUT_CASES = ["sliced", "channels_last", "permuted", "expanded"]


@pytest.mark.parametrize("layout", LAYOUT_CASES)
@pytest.mark.parametrize("op", OPS)
def test_layouts_like_reference(op, layout):
    """Non-contiguous, channels_last, transposed and overlapping stride-0 inputs
    (all arguments at once) give the reference results and gradients."""
    native_or_skip(op)
    case = next(c for c in special_cases(torch.float64) if c.op == op)
    leaves, views = [], []
    for i, t in enumerate(case.leaves):
        if t is None:
            leaves.append(None)
            views.append(None)
            continue
        # expand over the batch and every other dim where that keeps the op valid
        flags = [True, False, True, False] if t.dim() == 4 else [True] + [False] * (t.dim() - 1)
        base_shape, view = layout_view(t.shape, layout, flags)
        g = torch.Generator().manual_seed(i)
        if t.is_floating_point():
            base = torch.randn(base_shape, generator=g, dtype=t.dtype)
        else:
            base = torch.randint(0, 4, base_shape, generator=g)
        leaves.append(base)
        views.append(view)
    case.leaves, case.views = tuple(leaves), tuple(views)
    assert check_case(case) == "native"


BATCHED_ARGS = {
    "conv_transpose2d": (0,),
    "bilinear_upsample2d": (0,),
    "upsample_argmax": (0,),
    "upsample_cross_entropy": (0, 1),
    "skip_add_crop": (0, 1),
    "score_skip": (0, 1),
}


@pytest.mark.parametrize("op", OPS)
def test_empty_batch_returns_empty(op):
    native_or_skip(op)
    case = next(c for c in special_cases(torch.float32) if c.op == op)
    case.leaves = tuple(t[:0] if i in BATCHED_ARGS[op] else t for i, t in enumerate(case.leaves))
    out = getattr(ops, op)(*case.leaves, **case.params)
    expected = getattr(reference, op)(*case.leaves, **case.params)
    assert out.shape == expected.shape
    assert op == "upsample_cross_entropy" or out.numel() == 0
    check_case(case)  # also the gradients (and CE: mean over no pixels is NaN, sum is 0)


# ---------------------------------------------------------------------------
# checkpoints: a writer killed mid-write never replaces the last good file
# ---------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, torch
    from fcnfast import train
    path, size = sys.argv[1], int(sys.argv[2])
    step = 0
    while True:
        step += 1
        state = {"format": train.CHECKPOINT_FORMAT, "step": step,
                 "weights": torch.full((size,), float(step)), "tail": torch.arange(1000) + step}
        print("writing", step, flush=True)
        train.save_checkpoint(state, path)
        print("saved", step, flush=True)
""")


def test_checkpoint_killed_mid_write_keeps_last_good(tmp_path):
    from fcnfast import train

    path = tmp_path / "ckpt.pt"
    size = 8_000_000  # 32 MB of float32: a save takes long enough to be interrupted
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    kills_during_write = 0
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str(size)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            saved = 0
            for line in proc.stdout:
                word, step = line.split()
                if word == "saved":
                    saved = int(step)
                elif saved >= 1 + round_ % 2:
                    # a save has just started: kill it somewhere in the middle
                    time.sleep(0.002 * (round_ + 1))
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        last = proc.stdout.read().split()
        if "saved" not in last:
            kills_during_write += 1
        state = train.load_checkpoint(path)
        step = state["step"]
        assert step >= saved, "checkpoint went back from step %d to %d" % (saved, step)
        assert state["weights"].shape == (size,)
        assert torch.equal(state["weights"], torch.full((size,), float(step))), (
            "checkpoint of step %d is not intact" % step
        )
        assert torch.equal(state["tail"], torch.arange(1000) + step)
    assert kills_during_write >= 1, "no kill landed during a write; the test did not test anything"
