"""Argument sets for every fcnfast op and a native-vs-reference checker.

Shared by the reliability tests (fuzz, concurrency) and the ``.ci`` scripts
(sanitizer and wheel smoke runs on FCN shapes). A :class:`Case` holds *leaf*
tensors plus an optional view per leaf (channels_last copy, strided slice,
transpose, stride-0 expand), so an op sees exotic memory layouts while the
gradients are still taken with respect to plain leaves and can be compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from fcnfast import _backend, ops, reference

from conftest import TOLERANCE, assert_close_scaled

OPS = tuple(ops.__all__)  # conv_transpose2d, bilinear_upsample2d, skip_add_crop, score_skip, ...

# ops whose output has no gradient
NOT_DIFFERENTIABLE = ("upsample_argmax",)

REDUCED = (torch.bfloat16, torch.float16)
# PyTorch 2.13's own bf16 conv_transpose2d on CPU is unsafe as an oracle: with channels_last
# inputs and groups > 1 its weight gradient is uninitialised memory and some shapes (e.g. an
# empty crop) segfault in backward. bf16 cases of that op are judged against fp64 only.
UNSAFE_REDUCED_REFERENCE = ("conv_transpose2d",)

LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "expanded")

View = Optional[Callable[[torch.Tensor], torch.Tensor]]


def native_ops() -> List[str]:
    """The ops that have a native CPU kernel in this build."""
    return [op for op in OPS if _backend.has_kernel(op, "cpu")]


def layout_view(shape: Sequence[int], layout: str, expand_dims: Sequence[bool] = ()):
    """``(base_shape, view)`` such that ``view(base)`` has ``shape`` and the memory layout.

    ``channels_last`` (4-D only) copies into NHWC strides; ``sliced`` takes
    every other element along the middle dims and drops a leading column along
    the last (non-contiguous, storage offset); ``permuted`` stores the last two
    dims swapped (4-D only); ``expanded`` broadcasts the dims flagged in
    ``expand_dims`` from size 1 (stride 0, overlapping memory).
    """
    shape = tuple(int(s) for s in shape)
    nd = len(shape)
    if layout == "contiguous" or (layout in ("channels_last", "permuted") and nd != 4):
        return shape, None
    if layout == "channels_last":
        return shape, LayoutView(layout, lambda t: t.contiguous(memory_format=torch.channels_last))
    if layout == "permuted":
        return shape[:2] + (shape[3], shape[2]), LayoutView(layout, lambda t: t.transpose(2, 3))
    if layout == "sliced":
        if nd == 1:
            return (2 * shape[0],), LayoutView(layout, lambda t: t[::2])
        base = (shape[0],) + tuple(2 * s for s in shape[1:-1]) + (shape[-1] + 1,)
        index = (slice(None),) + (slice(None, None, 2),) * (nd - 2) + (slice(1, None),)
        return base, LayoutView(layout, lambda t: t[index])
    if layout == "expanded":
        flags = tuple(expand_dims) + (False,) * (nd - len(expand_dims))
        base = tuple(1 if f else s for s, f in zip(shape, flags))
        return base, LayoutView("expanded%s" % (base,), lambda t: t.expand(shape))
    raise ValueError("unknown layout %r" % (layout,))


class LayoutView:
    """A named leaf -> argument transform (the name shows in failure reports)."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, t):
        return self.fn(t)

    def __repr__(self):
        return self.name


@dataclass
class Case:
    """One call ``getattr(impl, op)(*tensors, **params)``.

    ``leaves`` are the tensors created by the test (``None`` for an absent
    optional tensor such as ``bias``); ``views[i]`` turns leaf ``i`` into the
    argument the op sees. Floating leaves get gradients unless the op is not
    differentiable.
    """
    op: str
    leaves: Tuple[Optional[torch.Tensor], ...]
    params: dict
    views: Tuple[View, ...] = ()
    seed: int = 0
    exact_labels: bool = False  # upsample_argmax: the reference's ties are exact
    label: str = ""

    def __post_init__(self):
        if len(self.views) < len(self.leaves):
            self.views = tuple(self.views) + (None,) * (len(self.leaves) - len(self.views))

    @property
    def dtype(self) -> torch.dtype:
        return self.leaves[0].dtype

    def astype(self, dtype: torch.dtype) -> "Case":
        leaves = tuple(t.to(dtype) if t is not None and t.is_floating_point() else t
                       for t in self.leaves)
        return replace(self, leaves=leaves)

    def describe(self) -> str:
        def one(t, v):
            if t is None:
                return "None"
            return "%s%s%s" % (tuple(t.shape), str(t.dtype).replace("torch.", " "),
                               "" if v is None else " %r" % (v,))
        return "%s(%s, %s, seed=%d%s)%s" % (
            self.op, ", ".join(one(t, v) for t, v in zip(self.leaves, self.views)), self.params,
            self.seed, ", exact_labels" if self.exact_labels else "",
            " [%s]" % self.label if self.label else "")

    __repr__ = describe

    def _repr_pretty_(self, printer, cycle):  # hypothesis prints falsifying examples with this
        printer.text(self.describe())


def forward_backward(impl, case: Case, grad_dtype: Optional[torch.dtype] = None):
    """Run ``case`` with ``impl`` (``fcnfast.ops`` or ``fcnfast.reference``).

    Returns ``(output, grads)``: one gradient (or None) per floating leaf. The
    output gradient is drawn from ``case.seed`` in fp64 and rounded to
    ``grad_dtype`` (default: the case dtype) so runs in different precisions
    see the same values.
    """
    differentiable = case.op not in NOT_DIFFERENTIABLE
    leaves = [None if t is None else
              t.detach().clone().requires_grad_(differentiable and t.is_floating_point())
              for t in case.leaves]
    args = [t if (t is None or v is None) else v(t) for t, v in zip(leaves, case.views)]
    out = getattr(impl, case.op)(*args, **case.params)
    # gradients with respect to the arguments the op saw (views included): comparing the
    # gradient of a stride-0 leaf would compare PyTorch's sum over the broadcast instead
    wrt = [a for a, t in zip(args, leaves) if t is not None and t.requires_grad]
    if not out.requires_grad:  # e.g. the reference's empty output for C == 0: no gradient
        return out, [None] * len(wrt)
    g = torch.Generator().manual_seed(case.seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_out = grad_out.to(grad_dtype or case.dtype).to(out.dtype)
    grads = torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
    return out.detach(), list(grads)


def check_case(case: Case) -> str:
    """Assert that ``fcnfast.ops`` matches ``fcnfast.reference`` on ``case``,
    output and every gradient. Returns which path ran (``native``/``reference``)."""
    path = "native" if _backend.has_kernel(case.op, "cpu") else "reference"
    out_n, grads_n = forward_backward(ops, case)
    if case.dtype in REDUCED and case.op in UNSAFE_REDUCED_REFERENCE:
        out_r, grads_r = None, [None] * len(grads_n)
    else:
        out_r, grads_r = forward_backward(reference, case)
    if case.op == "upsample_argmax":
        check_labels(case, out_n, out_r)
        return path
    if case.dtype in REDUCED:
        truth, grads_t = forward_backward(reference, case.astype(torch.float64), case.dtype)
        check_reduced(out_n, out_r, truth, case.dtype, "output")
        for i, (gn, gr, gt) in enumerate(zip(grads_n, grads_r, grads_t)):
            check_grad_presence(gn, gt, i)
            if gt is not None:
                check_reduced(gn, gr, gt, case.dtype, "grad %d" % i)
        return path
    assert_close_scaled(out_n, out_r, what="output")
    assert len(grads_n) == len(grads_r), "gradient count %d != %d" % (len(grads_n), len(grads_r))
    for i, (gn, gr) in enumerate(zip(grads_n, grads_r)):
        check_grad_presence(gn, gr, i)
        if gr is not None:
            assert_close_scaled(gn, gr, what="grad %d" % i)
    return path


def check_grad_presence(gn, gr, i):
    if gr is None:
        assert gn is None or not gn.any(), "grad %d: the reference has none" % i
    else:
        assert gn is not None, "grad %d missing" % i


def check_reduced(native, ref, truth, dtype, what):
    """bf16/fp16: the native result must be within the dtype tolerance of the
    exact (fp64) result. Where PyTorch's own reduced-precision result is worse
    than that but still sane (within 10x), twice its error is allowed.
    The truth, not the reference, is the oracle: PyTorch 2.13's bf16
    channels_last grouped conv_transpose2d weight gradient is garbage."""
    assert native.shape == truth.shape, "%s shape %s != %s" % (what, native.shape, truth.shape)
    assert native.dtype == dtype, "%s dtype %s != %s" % (what, native.dtype, dtype)
    if truth.numel() == 0:
        return
    n = native.double()
    r = truth if ref is None else ref.double()  # no reference: its error counts as 0
    assert torch.equal(torch.isnan(n), torch.isnan(truth)), "%s NaN pattern differs" % what
    finite = torch.isfinite(truth)
    assert torch.equal(n[~finite].nan_to_num(0), truth[~finite].nan_to_num(0)), "%s Inf differs" % what
    if not finite.any():
        return
    scale = max(1.0, truth[finite].abs().max().item())
    tol = TOLERANCE[dtype] * scale
    err_n = (n[finite] - truth[finite]).abs().max().item()
    err_r = (r[finite] - truth[finite]).abs().max().item()
    bound = max(tol, 2 * err_r) if err_r <= 10 * tol else tol
    assert err_n <= bound, ("%s (%s) max error vs fp64 %.3g > %.3g (reference error %.3g, scale %.3g)"
                            % (what, dtype, err_n, bound, err_r, scale))


def check_labels(case: Case, labels_n, labels_r):
    """upsample_argmax: every native label must score the maximum of the exact
    (fp64) upsampled scores up to the dtype tolerance; NaN pixels and, for exact
    cases, all pixels must equal the reference labels."""
    assert labels_n.dtype == torch.int64, "labels dtype %s" % labels_n.dtype
    assert labels_n.shape == labels_r.shape, "labels shape %s != %s" % (labels_n.shape,
                                                                       labels_r.shape)
    if labels_n.numel() == 0:
        return
    if case.exact_labels:
        assert torch.equal(labels_n, labels_r), "labels differ from the reference (exact ties)"
        return
    x = case.views[0](case.leaves[0].double()) if case.views[0] else case.leaves[0].double()
    scores = reference.bilinear_upsample2d(x, **case.params)
    nan = torch.isnan(scores).any(1)
    assert torch.equal(labels_n[nan], labels_r[nan]), "labels differ at NaN pixels"
    ok = ~nan
    assert labels_n.min() >= 0 and labels_n.max() < scores.shape[1], "label out of range"
    top = scores.max(1).values
    picked = scores.gather(1, labels_n.unsqueeze(1)).squeeze(1)
    finite = ok & torch.isfinite(top)
    assert torch.equal(picked[ok & ~finite], top[ok & ~finite]), "labels differ at Inf pixels"
    if finite.any():
        scale = max(1.0, top[finite].abs().max().item())
        gap = (top - picked)[finite].max().item()
        assert gap <= TOLERANCE[case.dtype] * scale, (
            "a native label scores %.3g below the maximum (tolerance %.3g)"
            % (gap, TOLERANCE[case.dtype] * scale))


# ---------------------------------------------------------------------------
# FCN geometry (Caffe voc-fcn8s, ceil-mode pooling) for shape-realistic cases
# ---------------------------------------------------------------------------

def fcn8s_sizes(height: int, width: int):
    """Spatial sizes along the FCN-8s graph for an input of ``height`` x ``width``."""
    def pool(s):
        return math.ceil(s / 2)

    def chain(s):
        s = s + 2 * 100 - 2          # conv1_1 pad 100 (3x3), conv1_2 pad 1
        p1 = pool(s)
        p2 = pool(p1)
        p3 = pool(p2)
        p4 = pool(p3)
        p5 = pool(p4)
        fc = p5 - 6                  # fc6 7x7 valid
        up2 = (fc - 1) * 2 + 4       # upscore2 k4 s2
        up4 = (up2 - 1) * 2 + 4      # upscore_pool4 k4 s2
        return dict(pool3=p3, pool4=p4, score=fc, up2=up2, up4=up4, up32=(fc - 1) * 32 + 64)
    return chain(height), chain(width)


def fcn_cases(height: int = 64, width: int = 64, num_classes: int = 21, seed: int = 0,
              dtype=torch.float32) -> List[Case]:
    """Every op on the FCN-8s / FCN-32s shapes of a ``height`` x ``width`` image
    (512/256-channel pool4/pool3 features, 21 classes, the paper's crops)."""
    gh, gw = fcn8s_sizes(height, width)
    g = torch.Generator().manual_seed(seed)
    C = num_classes

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    score = randn(1, C, gh["score"], gw["score"])
    up2 = randn(1, C, gh["up2"], gw["up2"])
    up4 = randn(1, C, gh["up4"], gw["up4"])
    pool4 = randn(1, 512, gh["pool4"], gw["pool4"])
    pool3 = randn(1, 256, gh["pool3"], gw["pool3"])
    target = torch.randint(0, C, (1, height, width), generator=g)
    target[:, : height // 4] = 255
    bilinear4 = reference.bilinear_filter(4, dtype).expand(C, 1, 4, 4).clone()
    crop8 = (31, 31, height, width)
    crop32 = (19, 19, height, width)
    return [
        Case("conv_transpose2d", (score, randn(C, C, 4, 4), None), dict(stride=2), seed=seed,
             label="upscore2"),
        Case("conv_transpose2d", (up2, bilinear4, None), dict(stride=2, groups=C), seed=seed,
             label="upscore_pool4 depthwise"),
        Case("conv_transpose2d", (up4, randn(C, C, 16, 16), randn(C)), dict(stride=8, crop=crop8),
             seed=seed, label="upscore8 + crop 31"),
        Case("bilinear_upsample2d", (up4,), dict(scale=8, crop=crop8), seed=seed,
             label="upscore8 crop 31"),
        Case("bilinear_upsample2d", (score,), dict(scale=32, crop=crop32), seed=seed,
             label="FCN-32s upscore crop 19"),
        Case("skip_add_crop", (up2, randn(1, C, gh["pool4"], gw["pool4"])), dict(offset=(5, 5)),
             seed=seed, label="score_pool4c"),
        Case("score_skip", (up2, pool4, randn(C, 512, 1, 1), randn(C)),
             dict(scale=0.01, offset=(5, 5)), seed=seed, label="at-once pool4"),
        Case("score_skip", (up4, pool3, randn(C, 256, 1, 1), None),
             dict(scale=1e-4, offset=(9, 9)), seed=seed, label="at-once pool3"),
        Case("upsample_argmax", (up4,), dict(scale=8, crop=crop8), seed=seed, label="predict"),
        Case("upsample_cross_entropy", (up4, target), dict(scale=8, crop=crop8, reduction="sum"),
             seed=seed, label="Caffe loss"),
        Case("upsample_cross_entropy", (up4, target), dict(scale=8, crop=crop8), seed=seed,
             label="mean loss"),
    ]
