"""One table of bad arguments, run against every backend: the same exception, the same words.

Each op validates its arguments in one C++ function per op (csrc/host/op_checks.h, run by the
CPU kernels and by the CUDA bindings) and in its Python twin (fcnfast/_geometry.py, run by the
reference, the public ops and the CuPy backend). This table holds them to one another: every
row is called on

* ``native``: the CPU dispatcher op ``torch.ops.fcnfast.<op>`` called directly (no Python
  pre-checks), i.e. op_checks.h;
* ``reference`` and ``ops``: ``fcnfast.reference.<op>`` and the public ``fcnfast.ops.<op>``
  (forward ops only: they have no backward entry points);
* ``cupy-emulated``: the CuPy backend's op (``fcnfast._cupy.IMPLS``) on CPU tensors, its
  device indirection pointed at the CPU as tests/test_cuda_emulated.py does; the checks run
  before any launch, so no emulator library is needed;
* ``cuda``: the compiled CUDA op on CUDA tensors (only with a GPU and a CUDA build).

and must raise the row's exception type with exactly the row's message (the C++ "fcnfast: "
prefix and a C++ stack trace suffix removed).

Not reachable here: the compiled CUDA bindings (csrc/cuda/bindings_cuda.cpp) on a machine
without a GPU. The CUDA emulator (tests/cuda_emulator) compiles the torch-free .cu launchers
with the host compiler; the bindings need ATen's CUDA context, c10::cuda and a CUDA build of
torch to link and CUDA tensors to be dispatched to, none of which exist in a CPU torch. Their
checks are nevertheless covered: they are the op_checks.h functions the ``native`` column
runs, plus the one CUDA-only line (the lead tensor is on CUDA), and ``.ci/cuda_compile_check``
compiles them. The ``cuda`` column runs them for real where a GPU is present.

Exceptions to "every backend", each stated in its row:

* a wrong number of dimensions of an op's lead tensor: the public ops and the reference accept
  unbatched input too, so they word that check as "a 4-D tensor (N, C, H, W) or a 3-D tensor
  (C, H, W)" (``wrapper=``);
* arguments of the wrong Python type (a float scale or ignore_index): the dispatcher's schema
  refuses those before any fcnfast code runs, with its own words (``python_only``);
* out-of-range labels of upsample_cross_entropy: a data check of the kernels; the reference
  leaves it to ``F.cross_entropy`` (IndexError / RuntimeError, tests/test_upsample_cross_entropy);
  the compiled CUDA forward checks them on the device without a host sync: it returns a NaN loss
  and a later call (or ``fcnfast.ops.check_pending_errors()``) raises this row's message with a
  note that an earlier call's device-side check found it (tests/test_cuda.py), so the ``cuda``
  column runs these rows with ``FCNFAST_CUDA_SYNC_CHECKS=1``, the immediate check
  (``cuda_sync_checks``); the CUDA backward (compiled and CuPy) does not check them -- a host
  check is a device sync and the forward of the same step did it -- and gives NaN gradients for
  them instead (tests/test_cuda_emulated.py, tests/test_upsample_cross_entropy.py);
* mixed devices on the CPU: the dispatcher sends a call with a meta tensor to the fake kernel,
  so the native op never sees it (the CUDA column checks cpu-vs-cuda instead).
"""

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple
from unittest import mock

import pytest
import torch

from fcnfast import _backend, _cupy, ops, reference

BIG = 2**18  # a BIG x BIG plane has 2**36 elements
HUGE = 2**30  # one past the extent limit (2**30 - 1)
LIMIT = "more than 32-bit indexing allows (2147483647)"
EXTENT = "larger than 32-bit indexing allows (1073741823)"
FLOATING = "must be a floating tensor (float32, float64, bfloat16, float16), got "
FORWARD = (
    "conv_transpose2d",
    "bilinear_upsample2d",
    "skip_add_crop",
    "score_skip",
    "upsample_argmax",
    "upsample_cross_entropy",
)


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def big(*shape, dtype=torch.float32, device="cpu", value=0):
    """A stride-0 view of ``prod(shape)`` elements backed by one: nothing large is allocated."""
    return torch.full((1,) * len(shape), value, dtype=dtype, device=device).expand(shape)


def unbatched_words(name, shape, dims="C, H, W"):
    n = len(dims.split(","))
    return (
        "%s must be a %d-D tensor (N, %s) or a %d-D tensor (%s) without the batch dimension, "
        "got shape %s" % (name, n + 1, dims, n, dims, tuple(shape))
    )


# ---- the valid calls each row changes one thing of (positional, in schema order) ----------


def conv(d, **kw):
    a = dict(
        x=t(1, 4, 6, 6, device=d),
        weight=t(4, 2, 3, 3, device=d),
        bias=t(2, device=d),
        stride=[2, 2],
        padding=[0, 0],
        output_padding=[0, 0],
        groups=1,
        dilation=[1, 1],
        crop=[0, 0, 13, 13],
    )
    a.update(kw)
    return tuple(a.values())


def conv_bw(d, **kw):
    a = dict(
        grad=t(1, 2, 13, 13, device=d),
        x=t(1, 4, 6, 6, device=d),
        weight=t(4, 2, 3, 3, device=d),
        stride=[2, 2],
        padding=[0, 0],
        output_padding=[0, 0],
        groups=1,
        dilation=[1, 1],
        crop=[0, 0, 13, 13],
        mask=[True, True, True],
    )
    a.update(kw)
    return tuple(a.values())


def up(d, **kw):
    a = dict(x=t(1, 3, 4, 4, device=d), scale=4, crop=[0, 0, 20, 20])
    a.update(kw)
    return tuple(a.values())


def up_bw(d, **kw):
    a = dict(grad=t(1, 3, 20, 20, device=d), in_height=4, in_width=4, scale=4, crop=[0, 0, 20, 20])
    a.update(kw)
    return tuple(a.values())


def ce(d, **kw):
    a = dict(
        x=t(1, 3, 4, 4, device=d),
        target=torch.zeros(1, 20, 20, dtype=torch.int64, device=d),
        scale=4,
        crop=[0, 0, 20, 20],
        ignore_index=255,
        reduction="mean",
    )
    a.update(kw)
    return tuple(a.values())


def ce_bw(d, **kw):
    a = dict(
        grad_loss=torch.ones((), device=d),
        x=t(1, 3, 4, 4, device=d),
        target=torch.zeros(1, 20, 20, dtype=torch.int64, device=d),
        scale=4,
        crop=[0, 0, 20, 20],
        ignore_index=255,
        reduction="mean",
    )
    a.update(kw)
    return tuple(a.values())


def sac(d, **kw):
    a = dict(coarse=t(1, 3, 4, 4, device=d), skip=t(1, 3, 8, 8, device=d), offset=[2, 2])
    a.update(kw)
    return tuple(a.values())


def sac_bw(d, **kw):
    a = dict(grad=t(1, 3, 4, 4, device=d), skip_height=8, skip_width=8, offset=[2, 2])
    a.update(kw)
    return tuple(a.values())


def ss(d, **kw):
    a = dict(
        coarse=t(1, 2, 4, 4, device=d),
        feature=t(1, 5, 8, 8, device=d),
        weight=t(2, 5, 1, 1, device=d),
        bias=t(2, device=d),
        scale=1.0,
        offset=[2, 2],
    )
    a.update(kw)
    return tuple(a.values())


def ss_bw(d, **kw):
    a = dict(
        grad=t(1, 2, 4, 4, device=d),
        feature=t(1, 5, 8, 8, device=d),
        weight=t(2, 5, 1, 1, device=d),
        scale=1.0,
        offset=[2, 2],
        mask=[True, True, True],
    )
    a.update(kw)
    return tuple(a.values())


@dataclass
class Row:
    id: str
    op: str
    build: Callable[[str], Tuple]
    message: str
    exc: type = ValueError
    wrapper: Optional[str] = None  # the public ops' and the reference's words (unbatched input)
    python_only: bool = False  # the dispatcher's schema refuses it first
    skip: Tuple[str, ...] = ()  # backends the row does not apply to (see the module doc)
    cuda_sync_checks: bool = False  # the cuda column sets FCNFAST_CUDA_SYNC_CHECKS=1 (module doc)


def _rows():
    R = Row
    rows = []
    # ---- conv_transpose2d ----
    rows += [
        R(
            "ct-x-dtype",
            "conv_transpose2d",
            lambda d: conv(d, x=t(1, 4, 6, 6, dtype=torch.int32, device=d)),
            "x " + FLOATING + "Int",
        ),
        R(
            "ct-x-dim",
            "conv_transpose2d",
            lambda d: conv(d, x=t(1, 1, 4, 6, 6, device=d)),
            "x must be a 4-D tensor, got shape [1, 1, 4, 6, 6]",
            wrapper=unbatched_words("x", (1, 1, 4, 6, 6)),
        ),
        R(
            "ct-weight-dim",
            "conv_transpose2d",
            lambda d: conv(d, weight=t(4, 2, 3, device=d)),
            "weight must be a 4-D tensor, got shape [4, 2, 3]",
        ),
        R(
            "ct-weight-dtype",
            "conv_transpose2d",
            lambda d: conv(d, weight=t(4, 2, 3, 3, dtype=torch.float64, device=d)),
            "x and weight must have the same dtype, got Float and Double",
        ),
        R(
            "ct-bias-dim",
            "conv_transpose2d",
            lambda d: conv(d, bias=t(2, 1, device=d)),
            "bias must be a 1-D tensor, got shape [2, 1]",
        ),
        R(
            "ct-bias-size",
            "conv_transpose2d",
            lambda d: conv(d, bias=t(3, device=d)),
            "bias has 3 elements, expected the output channels 2",
        ),
        R(
            "ct-stride-0",
            "conv_transpose2d",
            lambda d: conv(d, stride=[0, 0]),
            "stride must be positive, got (0, 0)",
        ),
        R(
            "ct-stride-neg",
            "conv_transpose2d",
            lambda d: conv(d, stride=[2, -1]),
            "stride must be positive, got (2, -1)",
        ),
        R(
            "ct-stride-3",
            "conv_transpose2d",
            lambda d: conv(d, stride=[1, 2, 3]),
            "stride must be an int or a pair of ints, got [1, 2, 3]",
        ),
        R(
            "ct-padding",
            "conv_transpose2d",
            lambda d: conv(d, padding=[-1, 0]),
            "padding must be non-negative, got (-1, 0)",
        ),
        R(
            "ct-output-padding-neg",
            "conv_transpose2d",
            lambda d: conv(d, output_padding=[0, -1]),
            "output_padding must be non-negative, got (0, -1)",
        ),
        R(
            "ct-output-padding-big",
            "conv_transpose2d",
            lambda d: conv(d, output_padding=[2, 0]),
            "output_padding (2, 0) must be smaller than stride (2, 2) or dilation (1, 1)",
        ),
        R(
            "ct-dilation",
            "conv_transpose2d",
            lambda d: conv(d, dilation=[0, 1]),
            "dilation must be positive, got (0, 1)",
        ),
        R(
            "ct-groups-0",
            "conv_transpose2d",
            lambda d: conv(d, groups=0),
            "groups must be a positive int, got 0",
        ),
        R(
            "ct-groups-divide",
            "conv_transpose2d",
            lambda d: conv(d, groups=3),
            "groups (3) must divide the input channels (4)",
        ),
        R(
            "ct-weight-channels",
            "conv_transpose2d",
            lambda d: conv(d, weight=t(3, 2, 3, 3, device=d)),
            "weight.shape[0] (3) must equal the input channels x.shape[1] (4)",
        ),
        R(
            "ct-kernel-0",
            "conv_transpose2d",
            lambda d: conv(d, weight=t(4, 2, 0, 3, device=d)),
            "weight kernel size must be positive, got 0x3",
        ),
        R(
            "ct-empty-output",
            "conv_transpose2d",
            lambda d: conv(d, padding=[9, 9]),
            "conv_transpose2d output would be -5x-5 for input [1, 4, 6, 6], weight [4, 2, 3, 3]",
        ),
        R(
            "ct-crop-outside",
            "conv_transpose2d",
            lambda d: conv(d, crop=[0, 0, 14, 13]),
            "crop (top=0, left=0, height=14, width=13) lies outside the full output of size 13x13",
        ),
        R(
            "ct-crop-negative",
            "conv_transpose2d",
            lambda d: conv(d, crop=[-1, 0, 2, 2]),
            "crop (top=-1, left=0, height=2, width=2) lies outside the full output of size 13x13",
        ),
        R(
            "ct-crop-3",
            "conv_transpose2d",
            lambda d: conv(d, crop=[0, 0, 13]),
            "crop must be (top, left, height, width), got [0, 0, 13]",
        ),
        R(
            "ct-stride-extent",
            "conv_transpose2d",
            lambda d: conv(d, stride=[HUGE, 1], crop=[0, 0, 1, 1]),
            "stride (1073741824, 1) is " + EXTENT,
        ),
        R(
            "ct-padding-extent",
            "conv_transpose2d",
            lambda d: conv(d, padding=[0, HUGE], crop=[0, 0, 1, 1]),
            "padding (0, 1073741824) is " + EXTENT,
        ),
        R(
            "ct-dilation-extent",
            "conv_transpose2d",
            lambda d: conv(d, dilation=[HUGE, 1], crop=[0, 0, 1, 1]),
            "dilation (1073741824, 1) is " + EXTENT,
        ),
        R(
            "ct-full-extent",
            "conv_transpose2d",
            lambda d: conv(
                d,
                x=t(1, 4, 3, 3, device=d),
                weight=t(4, 2, 1, 1, device=d),
                stride=[2**29, 1],
                crop=[0, 0, 1, 1],
            ),
            "the full output height plus padding and dilated kernel 1073741826 is " + EXTENT,
        ),
        R(
            "ct-x-numel",
            "conv_transpose2d",
            lambda d: conv(d, x=big(1, 4, BIG, BIG, device=d), crop=[0, 0, 1, 1]),
            "x of size [1, 4, 262144, 262144] has 274877906944 elements, " + LIMIT,
        ),
        R(
            "ct-output-numel",
            "conv_transpose2d",
            lambda d: conv(
                d,
                x=t(1, 1, 2, 2, device=d),
                weight=t(1, 1, 1, 1, device=d),
                bias=None,
                stride=[2**20, 2**20],
                crop=[0, 0, 2**20 + 1, 2**20 + 1],
            ),
            "output of size [1, 1, 1048577, 1048577] has 1099513724929 elements, " + LIMIT,
        ),
        R(
            "ct-x-weight-device",
            "conv_transpose2d",
            lambda d: conv(d, weight=t(4, 2, 3, 3, device="meta")),
            "x and weight must be on the same device, got cpu and meta",
            skip=("native", "cuda"),
        ),
    ]
    rows += [
        R(
            "ctb-grad-shape",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, grad=t(1, 2, 13, 12, device=d)),
            "grad has shape [1, 2, 13, 12], expected [1, 2, 13, 13] (the cropped output)",
        ),
        R(
            "ctb-grad-dtype",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, grad=t(1, 2, 13, 13, dtype=torch.float64, device=d)),
            "x and grad must have the same dtype, got Float and Double",
        ),
        R(
            "ctb-grad-dim",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, grad=t(2, 13, 13, device=d)),
            "grad must be a 4-D tensor, got shape [2, 13, 13]",
        ),
        R(
            "ctb-x-dtype",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, x=t(1, 4, 6, 6, dtype=torch.int64, device=d)),
            "x " + FLOATING + "Long",
        ),
        R(
            "ctb-stride",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, stride=[0, 2]),
            "stride must be positive, got (0, 2)",
        ),
        R(
            "ctb-crop",
            "conv_transpose2d_backward",
            lambda d: conv_bw(d, crop=[1, 0, 13, 13]),
            "crop (top=1, left=0, height=13, width=13) lies outside the full output of size 13x13",
        ),
    ]
    # ---- bilinear_upsample2d and upsample_argmax (the same checks) ----
    for op, p in (("bilinear_upsample2d", "bu"), ("upsample_argmax", "ua")):
        rows += [
            R(
                p + "-x-dtype",
                op,
                lambda d: up(d, x=t(1, 3, 4, 4, dtype=torch.int64, device=d)),
                "x " + FLOATING + "Long",
            ),
            R(
                p + "-x-dim",
                op,
                lambda d: up(d, x=t(1, 1, 3, 4, 4, device=d)),
                "x must be a 4-D tensor, got shape [1, 1, 3, 4, 4]",
                wrapper=unbatched_words("x", (1, 1, 3, 4, 4)),
            ),
            R(p + "-scale-0", op, lambda d: up(d, scale=0), "scale must be a positive int, got 0"),
            R(
                p + "-scale-neg",
                op,
                lambda d: up(d, scale=-2),
                "scale must be a positive int, got -2",
            ),
            R(
                p + "-scale-float",
                op,
                lambda d: up(d, scale=2.5),
                "scale must be a positive int, got 2.5",
                python_only=True,
            ),
            R(
                p + "-crop-outside",
                op,
                lambda d: up(d, crop=[0, 0, 21, 20]),
                "crop (top=0, left=0, height=21, width=20) lies outside the full output of size 20x20",
            ),
            R(
                p + "-crop-negative",
                op,
                lambda d: up(d, crop=[0, -1, 2, 2]),
                "crop (top=0, left=-1, height=2, width=2) lies outside the full output of size 20x20",
            ),
            R(
                p + "-scale-extent",
                op,
                lambda d: up(d, scale=HUGE, crop=[0, 0, 1, 1]),
                "scale 1073741824 with input size 4x4 gives a full output " + EXTENT,
            ),
            R(
                p + "-x-numel",
                op,
                lambda d: up(d, x=big(1, 3, BIG, BIG, device=d), scale=2, crop=[0, 0, 1, 1]),
                "x of size [1, 3, 262144, 262144] has 206158430208 elements, " + LIMIT,
            ),
        ]
    rows += [
        R(
            "bu-output-numel",
            "bilinear_upsample2d",
            lambda d: up(d, x=t(1, 1, 2, 2, device=d), scale=BIG, crop=[0, 0, 3 * BIG, 3 * BIG]),
            "output of size [1, 1, 786432, 786432] has 618475290624 elements, " + LIMIT,
        ),
        R(
            "ua-output-numel",
            "upsample_argmax",
            lambda d: up(d, x=t(1, 2, 2, 2, device=d), scale=BIG, crop=[0, 0, 3 * BIG, 3 * BIG]),
            "output of size [1, 786432, 786432] has 618475290624 elements, " + LIMIT,
        ),
        R(
            "ua-no-channel",
            "upsample_argmax",
            lambda d: up(d, x=t(1, 0, 4, 4, device=d)),
            "upsample_argmax needs at least one channel, got x of shape [1, 0, 4, 4]",
        ),
        R(
            "ua-row-buffers",
            "upsample_argmax",
            lambda d: up(d, x=big(1, 2**20, 1, 1, device=d), scale=2**10, crop=[0, 0, 1, 1]),
            "the row buffers of size [2, 1048576, 2048] has 4294967296 elements, " + LIMIT,
        ),
    ]
    rows += [
        R(
            "bub-grad-shape",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, grad=t(1, 3, 2, 3, device=d), crop=[0, 0, 3, 2]),
            "grad of shape [1, 3, 2, 3] does not match the crop 3x2",
        ),
        R(
            "bub-in-size",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, in_height=-1),
            "in_height and in_width must be non-negative, got -1 and 4",
        ),
        R(
            "bub-grad-dim",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, grad=t(3, 20, 20, device=d)),
            "grad must be a 4-D tensor, got shape [3, 20, 20]",
        ),
        R(
            "bub-grad-dtype",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, grad=t(1, 3, 20, 20, dtype=torch.int32, device=d)),
            "grad " + FLOATING + "Int",
        ),
        R(
            "bub-scale",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, scale=0),
            "scale must be a positive int, got 0",
        ),
        R(
            "bub-scale-extent",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(d, grad=t(1, 3, 1, 1, device=d), scale=HUGE, crop=[0, 0, 1, 1]),
            "scale 1073741824 with input size 4x4 gives a full output " + EXTENT,
        ),
        R(
            "bub-grad-x-numel",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(
                d,
                grad=t(1, 1, 1, 1, device=d),
                in_height=2**17,
                in_width=2**17,
                scale=1,
                crop=[0, 0, 1, 1],
            ),
            "grad_x of size [1, 1, 131072, 131072] has 17179869184 elements, " + LIMIT,
        ),
        R(
            "bub-row-buffers",
            "bilinear_upsample2d_backward",
            lambda d: up_bw(
                d,
                grad=big(1, 2**20, 1, 1, device=d),
                in_height=1,
                in_width=1,
                scale=2**10,
                crop=[0, 0, 1, 1],
            ),
            "the row buffers of size [2, 1048576, 2048] has 4294967296 elements, " + LIMIT,
        ),
    ]
    # ---- upsample_cross_entropy ----
    rows += [
        R(
            "ce-x-dtype",
            "upsample_cross_entropy",
            lambda d: ce(d, x=t(1, 3, 4, 4, dtype=torch.int64, device=d)),
            "x " + FLOATING + "Long",
        ),
        R(
            "ce-x-dim",
            "upsample_cross_entropy",
            lambda d: ce(d, x=t(1, 1, 3, 4, 4, device=d)),
            "x must be a 4-D tensor, got shape [1, 1, 3, 4, 4]",
            wrapper=unbatched_words("x", (1, 1, 3, 4, 4)),
        ),
        R(
            "ce-target-dtype",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.zeros(1, 20, 20, dtype=torch.int32, device=d)),
            "target must be an int64 label map, got Int",
        ),
        R(
            "ce-target-dim",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.zeros(1, 1, 20, 20, dtype=torch.int64, device=d)),
            "target must be a 3-D tensor, got shape [1, 1, 20, 20]",
            wrapper=unbatched_words("target", (1, 1, 20, 20), "H, W"),
        ),
        R(
            "ce-target-shape",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.zeros(1, 20, 19, dtype=torch.int64, device=d)),
            "target shape [1, 20, 19] must be (N, H, W) = [1, 20, 20] of the upsampled crop",
        ),
        R(
            "ce-target-batch",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.zeros(2, 20, 20, dtype=torch.int64, device=d)),
            "target shape [2, 20, 20] must be (N, H, W) = [1, 20, 20] of the upsampled crop",
        ),
        R(
            "ce-target-device",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.zeros(1, 20, 20, dtype=torch.int64, device="meta")),
            "x and target must be on the same device, got cpu and meta",
            skip=("native", "cuda"),
        ),
        R(
            "ce-reduction",
            "upsample_cross_entropy",
            lambda d: ce(d, reduction="none"),
            "reduction must be 'mean' or 'sum', got 'none'",
        ),
        R(
            "ce-ignore-index",
            "upsample_cross_entropy",
            lambda d: ce(d, ignore_index=1.5),
            "ignore_index must be an int, got 1.5",
            python_only=True,
        ),
        R(
            "ce-scale",
            "upsample_cross_entropy",
            lambda d: ce(d, scale=0),
            "scale must be a positive int, got 0",
        ),
        R(
            "ce-crop",
            "upsample_cross_entropy",
            lambda d: ce(d, crop=[0, 0, 21, 20]),
            "crop (top=0, left=0, height=21, width=20) lies outside the full output of size 20x20",
        ),
        R(
            "ce-no-class",
            "upsample_cross_entropy",
            lambda d: ce(d, x=t(1, 0, 4, 4, device=d)),
            "upsample_cross_entropy needs at least one class, got x of shape [1, 0, 4, 4]",
        ),
        R(
            "ce-label",
            "upsample_cross_entropy",
            lambda d: ce(d, target=torch.full((1, 20, 20), 3, dtype=torch.int64, device=d)),
            "target value 3 is out of bounds: classes are [0, 3) (x has 3 channels) and "
            "ignore_index is 255",
            skip=("reference",),
            cuda_sync_checks=True,
        ),
        R(
            "ce-label-negative",
            "upsample_cross_entropy",
            lambda d: ce(
                d,
                target=torch.full((1, 20, 20), -1, dtype=torch.int64, device=d),
                ignore_index=-100,
            ),
            "target value -1 is out of bounds: classes are [0, 3) (x has 3 channels) and "
            "ignore_index is -100",
            skip=("reference",),
            cuda_sync_checks=True,
        ),
        R(
            "ce-target-numel",
            "upsample_cross_entropy",
            lambda d: ce(
                d,
                x=t(1, 2, 2, 2, device=d),
                target=big(1, 3 * BIG, 3 * BIG, dtype=torch.int64, device=d),
                scale=BIG,
                crop=[0, 0, 3 * BIG, 3 * BIG],
            ),
            "target of size [1, 786432, 786432] has 618475290624 elements, " + LIMIT,
        ),
        R(
            "ce-row-buffers",
            "upsample_cross_entropy",
            lambda d: ce(
                d,
                x=big(1, 2**20, 1, 1, device=d),
                target=torch.zeros(1, 1, 1, dtype=torch.int64, device=d),
                scale=2**10,
                crop=[0, 0, 1, 1],
            ),
            "the row buffers of size [2, 1048576, 2048] has 4294967296 elements, " + LIMIT,
        ),
    ]
    rows += [
        R(
            "ceb-grad-loss-size",
            "upsample_cross_entropy_backward",
            lambda d: ce_bw(d, grad_loss=torch.ones(2, device=d)),
            "grad_loss must hold one value (the loss is a scalar), got shape [2]",
        ),
        R(
            "ceb-grad-loss-dtype",
            "upsample_cross_entropy_backward",
            lambda d: ce_bw(d, grad_loss=torch.ones((), dtype=torch.float64, device=d)),
            "x and grad_loss must have the same dtype, got Float and Double",
        ),
        R(
            "ceb-reduction",
            "upsample_cross_entropy_backward",
            lambda d: ce_bw(d, reduction="max"),
            "reduction must be 'mean' or 'sum', got 'max'",
        ),
        R(
            "ceb-label",
            "upsample_cross_entropy_backward",
            lambda d: ce_bw(d, target=torch.full((1, 20, 20), 7, dtype=torch.int64, device=d)),
            "target value 7 is out of bounds: classes are [0, 3) (x has 3 channels) and "
            "ignore_index is 255",
            skip=("cupy-emulated", "cuda"),
        ),
    ]
    # ---- skip_add_crop ----
    rows += [
        R(
            "sa-coarse-dtype",
            "skip_add_crop",
            lambda d: sac(d, coarse=t(1, 3, 4, 4, dtype=torch.int32, device=d)),
            "coarse " + FLOATING + "Int",
        ),
        R(
            "sa-skip-dim",
            "skip_add_crop",
            lambda d: sac(d, skip=t(1, 1, 3, 8, 8, device=d)),
            "skip must be a 4-D tensor, got shape [1, 1, 3, 8, 8]",
            wrapper=unbatched_words("skip", (1, 1, 3, 8, 8)),
        ),
        R(
            "sa-skip-dtype",
            "skip_add_crop",
            lambda d: sac(d, skip=t(1, 3, 8, 8, dtype=torch.float64, device=d)),
            "coarse and skip must have the same dtype, got Float and Double",
        ),
        R(
            "sa-skip-device",
            "skip_add_crop",
            lambda d: sac(d, skip=t(1, 3, 8, 8, device="meta")),
            "coarse and skip must be on the same device, got cpu and meta",
            skip=("native", "cuda"),
        ),
        R(
            "sa-channels",
            "skip_add_crop",
            lambda d: sac(d, skip=t(1, 2, 8, 8, device=d)),
            "coarse [1, 3, 4, 4] and skip [1, 2, 8, 8] must agree in batch and channels",
        ),
        R(
            "sa-batch",
            "skip_add_crop",
            lambda d: sac(d, skip=t(2, 3, 8, 8, device=d)),
            "coarse [1, 3, 4, 4] and skip [2, 3, 8, 8] must agree in batch and channels",
        ),
        R(
            "sa-offset-outside",
            "skip_add_crop",
            lambda d: sac(d, offset=[5, 0]),
            "offset (5, 0) with window 4x4 lies outside skip of size 8x8",
        ),
        R(
            "sa-offset-negative",
            "skip_add_crop",
            lambda d: sac(d, offset=[0, -1]),
            "offset (0, -1) with window 4x4 lies outside skip of size 8x8",
        ),
        R(
            "sa-offset-3",
            "skip_add_crop",
            lambda d: sac(d, offset=[0, 1, 2]),
            "offset must be an int or a pair of ints, got [0, 1, 2]",
        ),
        R(
            "sa-coarse-numel",
            "skip_add_crop",
            lambda d: sac(
                d,
                coarse=big(1, 1, BIG, BIG, device=d),
                skip=big(1, 1, BIG, BIG, device=d),
                offset=[0, 0],
            ),
            "coarse of size [1, 1, 262144, 262144] has 68719476736 elements, " + LIMIT,
        ),
    ]
    rows += [
        R(
            "sab-offset",
            "skip_add_crop_backward",
            lambda d: sac_bw(d, offset=[5, 0]),
            "offset (5, 0) with window 4x4 lies outside skip of size 8x8",
        ),
        R(
            "sab-skip-size",
            "skip_add_crop_backward",
            lambda d: sac_bw(d, skip_height=-1, offset=[0, 0]),
            "offset (0, 0) with window 4x4 lies outside skip of size -1x8",
        ),
        R(
            "sab-grad-dtype",
            "skip_add_crop_backward",
            lambda d: sac_bw(d, grad=t(1, 3, 4, 4, dtype=torch.int32, device=d)),
            "grad " + FLOATING + "Int",
        ),
        R(
            "sab-grad-skip-numel",
            "skip_add_crop_backward",
            lambda d: sac_bw(
                d, grad=t(1, 1, 1, 1, device=d), skip_height=BIG, skip_width=BIG, offset=[0, 0]
            ),
            "grad_skip of size [1, 1, 262144, 262144] has 68719476736 elements, " + LIMIT,
        ),
    ]
    # ---- score_skip ----
    rows += [
        R(
            "ss-coarse-dtype",
            "score_skip",
            lambda d: ss(d, coarse=t(1, 2, 4, 4, dtype=torch.int32, device=d)),
            "coarse " + FLOATING + "Int",
        ),
        R(
            "ss-feature-dim",
            "score_skip",
            lambda d: ss(d, feature=t(1, 1, 5, 8, 8, device=d)),
            "feature must be a 4-D tensor, got shape [1, 1, 5, 8, 8]",
            wrapper=unbatched_words("feature", (1, 1, 5, 8, 8)),
        ),
        R(
            "ss-feature-dtype",
            "score_skip",
            lambda d: ss(d, feature=t(1, 5, 8, 8, dtype=torch.float64, device=d)),
            "coarse and feature must have the same dtype, got Float and Double",
        ),
        R(
            "ss-weight-dtype",
            "score_skip",
            lambda d: ss(d, weight=t(2, 5, 1, 1, dtype=torch.float64, device=d)),
            "coarse and weight must have the same dtype, got Float and Double",
        ),
        R(
            "ss-weight-device",
            "score_skip",
            lambda d: ss(d, weight=t(2, 5, 1, 1, device="meta")),
            "coarse and weight must be on the same device, got cpu and meta",
            skip=("native", "cuda"),
        ),
        R(
            "ss-weight-kernel",
            "score_skip",
            lambda d: ss(d, weight=t(2, 5, 3, 3, device=d)),
            "weight must be a 1x1 convolution weight (K, C, 1, 1), got [2, 5, 3, 3]",
        ),
        R(
            "ss-weight-channels",
            "score_skip",
            lambda d: ss(d, weight=t(2, 4, 1, 1, device=d)),
            "weight.shape[1] (4) must equal feature channels (5)",
        ),
        R(
            "ss-classes",
            "score_skip",
            lambda d: ss(d, weight=t(3, 5, 1, 1, device=d), bias=t(3, device=d)),
            "coarse has batch 1 and 2 channels, expected batch 1 and 3 channels (weight.shape[0])",
        ),
        R(
            "ss-batch",
            "score_skip",
            lambda d: ss(d, feature=t(2, 5, 8, 8, device=d)),
            "coarse has batch 1 and 2 channels, expected batch 2 and 2 channels (weight.shape[0])",
        ),
        R(
            "ss-bias-size",
            "score_skip",
            lambda d: ss(d, bias=t(3, device=d)),
            "bias has 3 elements, expected 2",
        ),
        R(
            "ss-bias-dim",
            "score_skip",
            lambda d: ss(d, bias=t(2, 1, device=d)),
            "bias must be a 1-D tensor, got shape [2, 1]",
        ),
        R(
            "ss-offset",
            "score_skip",
            lambda d: ss(d, offset=[5, 5]),
            "offset (5, 5) with window 4x4 lies outside feature of size 8x8",
        ),
        R(
            "ss-coarse-numel",
            "score_skip",
            lambda d: ss(
                d,
                coarse=big(1, 1, BIG, BIG, device=d),
                feature=big(1, 1, BIG, BIG, device=d),
                weight=t(1, 1, 1, 1, device=d),
                bias=None,
                offset=[0, 0],
            ),
            "coarse of size [1, 1, 262144, 262144] has 68719476736 elements, " + LIMIT,
        ),
        R(
            "ss-feature-numel",
            "score_skip",
            lambda d: ss(
                d,
                coarse=t(1, 1, 1, 1, device=d),
                feature=big(1, 1, BIG, BIG, device=d),
                weight=t(1, 1, 1, 1, device=d),
                bias=None,
                offset=[0, 0],
            ),
            "feature of size [1, 1, 262144, 262144] has 68719476736 elements, " + LIMIT,
        ),
    ]
    rows += [
        R(
            "ssb-classes",
            "score_skip_backward",
            lambda d: ss_bw(d, grad=t(1, 3, 4, 4, device=d)),
            "grad has batch 1 and 3 channels, expected batch 1 and 2 channels (weight.shape[0])",
        ),
        R(
            "ssb-offset",
            "score_skip_backward",
            lambda d: ss_bw(d, offset=[0, 5]),
            "offset (0, 5) with window 4x4 lies outside feature of size 8x8",
        ),
        R(
            "ssb-grad-dtype",
            "score_skip_backward",
            lambda d: ss_bw(d, grad=t(1, 2, 4, 4, dtype=torch.float64, device=d)),
            "grad and feature must have the same dtype, got Double and Float",
        ),
    ]
    return rows


ROWS = _rows()
BACKENDS = ["native", "reference", "ops", "cupy-emulated", "cuda"]


def _normalise(message: str) -> str:
    message = message.split("\nException raised from")[0]
    return re.sub(r"^fcnfast: ", "", message.strip())


@contextlib.contextmanager
def _cupy_on_cpu():
    """fcnfast._cupy's device indirections pointed at the CPU (as tests/test_cuda_emulated.py)."""
    saved = _cupy._DEVICE_TYPE, _cupy._device
    _cupy._DEVICE_TYPE, _cupy._device = "cpu", lambda t: contextlib.nullcontext()
    try:
        yield
    finally:
        _cupy._DEVICE_TYPE, _cupy._device = saved


def _call(backend, row):
    if backend in ("reference", "ops"):
        return getattr(reference if backend == "reference" else ops, row.op)(*row.build("cpu"))
    if backend == "cupy-emulated":
        with _cupy_on_cpu():
            return _cupy.IMPLS[row.op](*row.build("cpu"))
    device = "cuda" if backend == "cuda" else "cpu"
    if backend == "cuda" and not (
        torch.cuda.is_available() and _backend.has_kernel(row.op, "cuda")
    ):
        pytest.skip("no GPU with fcnfast's CUDA kernels here")
    if backend == "native" and not _backend.has_kernel(row.op, "cpu"):
        pytest.skip("the native extension is not built")
    # the CUDA binding reads FCNFAST_CUDA_SYNC_CHECKS on every call
    sync = {"FCNFAST_CUDA_SYNC_CHECKS": "1"} if backend == "cuda" and row.cuda_sync_checks else {}
    with mock.patch.dict(os.environ, sync):
        return getattr(torch.ops.fcnfast, row.op)(*row.build(device))


def _applies(row, backend) -> bool:
    """Whether the table runs this row on this backend. Not generated (rather than skipped):
    backward ops on reference/ops (no such entry points), a row's stated exceptions
    (``row.skip``), and argument types the dispatcher's schema refuses before any fcnfast code
    runs (``python_only``) on the dispatcher backends -- see the module docstring."""
    if backend in ("reference", "ops") and row.op not in FORWARD:
        return False
    if backend in row.skip:
        return False
    return not (row.python_only and backend in ("native", "cuda"))


CASES = [
    pytest.param(row, backend, id="%s-%s" % (row.id, backend))
    for row in ROWS
    for backend in BACKENDS
    if _applies(row, backend)
]


@pytest.mark.parametrize("row,backend", CASES)
def test_error_table(row, backend):
    expected = row.message
    if row.wrapper is not None and backend in ("reference", "ops"):
        expected = row.wrapper
    if backend == "cuda":
        expected = expected.replace("got cpu and", "got cuda:0 and")
    with pytest.raises(Exception) as info:
        _call(backend, row)
    assert type(info.value) is row.exc, "%s raised %s: %s" % (
        backend,
        type(info.value).__name__,
        info.value,
    )
    assert _normalise(str(info.value)) == expected


def test_table_covers_every_op():
    """Every dispatcher op with argument checks has rows, the backward ops included."""
    ops_in_table = {r.op for r in ROWS}
    assert set(_cupy.IMPLS) <= ops_in_table
