"""Argument sets for every fcnfast op and a native-vs-reference checker.

Shared by the reliability tests (fuzz, concurrency) and the ``.ci`` scripts
(sanitizer and wheel smoke runs on FCN shapes); ``ORACLE_CASES`` and
``oracle_tests`` give the per-op test files their device-parametrised fp64-oracle
tests, and the upsampling ops' tests share a few shapes and error cases.

A :class:`Case` holds *leaf* tensors plus an optional view per leaf (channels_last
copy, strided slice, transpose, stride-0 expand), so an op sees exotic memory
layouts while the gradients are still taken with respect to plain leaves and can
be compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from conftest import TOLERANCE, assert_close_scaled, tolerance

from fcnfast import _backend, ops, reference

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
        leaves = tuple(
            t.to(dtype) if t is not None and t.is_floating_point() else t for t in self.leaves
        )
        return replace(self, leaves=leaves)

    def describe(self) -> str:
        def one(t, v):
            if t is None:
                return "None"
            return "%s%s%s" % (
                tuple(t.shape),
                str(t.dtype).replace("torch.", " "),
                "" if v is None else " %r" % (v,),
            )

        return "%s(%s, %s, seed=%d%s)%s" % (
            self.op,
            ", ".join(one(t, v) for t, v in zip(self.leaves, self.views)),
            self.params,
            self.seed,
            ", exact_labels" if self.exact_labels else "",
            " [%s]" % self.label if self.label else "",
        )

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
    leaves = [
        None
        if t is None
        else t.detach().clone().requires_grad_(differentiable and t.is_floating_point())
        for t in case.leaves
    ]
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
    assert torch.equal(n[~finite].nan_to_num(0), truth[~finite].nan_to_num(0)), (
        "%s Inf differs" % what
    )
    if not finite.any():
        return
    scale = max(1.0, truth[finite].abs().max().item())
    tol = TOLERANCE[dtype] * scale
    err_n = (n[finite] - truth[finite]).abs().max().item()
    err_r = (r[finite] - truth[finite]).abs().max().item()
    bound = max(tol, 2 * err_r) if err_r <= 10 * tol else tol
    assert err_n <= bound, (
        "%s (%s) max error vs fp64 %.3g > %.3g (reference error %.3g, scale %.3g)"
        % (what, dtype, err_n, bound, err_r, scale)
    )


def check_labels(case: Case, labels_n, labels_r):
    """upsample_argmax: every native label must score the maximum of the exact
    (fp64) upsampled scores up to the dtype tolerance; NaN pixels and, for exact
    cases, all pixels must equal the reference labels."""
    assert labels_n.dtype == torch.int64, "labels dtype %s" % labels_n.dtype
    assert labels_n.shape == labels_r.shape, "labels shape %s != %s" % (
        labels_n.shape,
        labels_r.shape,
    )
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
            % (gap, TOLERANCE[case.dtype] * scale)
        )


# ---------------------------------------------------------------------------
# FCN geometry (Caffe voc-fcn8s, ceil-mode pooling) for shape-realistic cases
# ---------------------------------------------------------------------------


def fcn8s_sizes(height: int, width: int):
    """Spatial sizes along the FCN-8s graph for an input of ``height`` x ``width``."""

    def pool(s):
        return math.ceil(s / 2)

    def chain(s):
        s = s + 2 * 100 - 2  # conv1_1 pad 100 (3x3), conv1_2 pad 1
        p1 = pool(s)
        p2 = pool(p1)
        p3 = pool(p2)
        p4 = pool(p3)
        p5 = pool(p4)
        fc = p5 - 6  # fc6 7x7 valid
        up2 = (fc - 1) * 2 + 4  # upscore2 k4 s2
        up4 = (up2 - 1) * 2 + 4  # upscore_pool4 k4 s2
        return dict(pool3=p3, pool4=p4, score=fc, up2=up2, up4=up4, up32=(fc - 1) * 32 + 64)

    return chain(height), chain(width)


def fcn_cases(
    height: int = 64, width: int = 64, num_classes: int = 21, seed: int = 0, dtype=torch.float32
) -> List[Case]:
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
        Case(
            "conv_transpose2d",
            (score, randn(C, C, 4, 4), None),
            dict(stride=2),
            seed=seed,
            label="upscore2",
        ),
        Case(
            "conv_transpose2d",
            (up2, bilinear4, None),
            dict(stride=2, groups=C),
            seed=seed,
            label="upscore_pool4 depthwise",
        ),
        Case(
            "conv_transpose2d",
            (up4, randn(C, C, 16, 16), randn(C)),
            dict(stride=8, crop=crop8),
            seed=seed,
            label="upscore8 + crop 31",
        ),
        Case(
            "bilinear_upsample2d",
            (up4,),
            dict(scale=8, crop=crop8),
            seed=seed,
            label="upscore8 crop 31",
        ),
        Case(
            "bilinear_upsample2d",
            (score,),
            dict(scale=32, crop=crop32),
            seed=seed,
            label="FCN-32s upscore crop 19",
        ),
        Case(
            "skip_add_crop",
            (up2, randn(1, C, gh["pool4"], gw["pool4"])),
            dict(offset=(5, 5)),
            seed=seed,
            label="score_pool4c",
        ),
        Case(
            "score_skip",
            (up2, pool4, randn(C, 512, 1, 1), randn(C)),
            dict(scale=0.01, offset=(5, 5)),
            seed=seed,
            label="at-once pool4",
        ),
        Case(
            "score_skip",
            (up4, pool3, randn(C, 256, 1, 1), None),
            dict(scale=1e-4, offset=(9, 9)),
            seed=seed,
            label="at-once pool3",
        ),
        Case("upsample_argmax", (up4,), dict(scale=8, crop=crop8), seed=seed, label="predict"),
        Case(
            "upsample_cross_entropy",
            (up4, target),
            dict(scale=8, crop=crop8, reduction="sum"),
            seed=seed,
            label="Caffe loss",
        ),
        Case(
            "upsample_cross_entropy",
            (up4, target),
            dict(scale=8, crop=crop8),
            seed=seed,
            label="mean loss",
        ),
    ]


# ---------------------------------------------------------------------------
# fp64-oracle cases (formerly tests/test_cuda.py): every op and gradient on a device,
# for float32/float64/float16/bfloat16, against fcnfast.reference run on the CPU in
# float64 on the same (dtype-rounded) inputs; tolerances scale with the reduction length
# ---------------------------------------------------------------------------

ORACLE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ORACLE_DTYPE_IDS = ["f32", "f64", "f16", "bf16"]


def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def oracle_target(n, h, w, classes, ignore=255, frac=0.1):
    t = torch.randint(0, classes, (n, h, w))
    t[torch.rand(n, h, w) < frac] = ignore
    return t


# name: (op, make() -> fp64 CPU inputs by argument name, other arguments); FCN geometry first
ORACLE_CASES = {
    # learned FCN-8s upscore2 (k4 s2, no crop) and upscore8 (k16 s8, crop 31)
    "deconv-upscore2": (
        "conv_transpose2d",
        lambda: dict(x=_randn(2, 21, 8, 9), weight=_randn(21, 21, 4, 4) * 0.1, bias=None),
        dict(stride=2),
    ),
    "deconv-upscore8": (
        "conv_transpose2d",
        lambda: dict(x=_randn(1, 21, 12, 11), weight=_randn(21, 21, 16, 16) * 0.1, bias=_randn(21)),
        dict(stride=8, crop=(31, 31, 64, 60)),
    ),
    "deconv-upscore32": (
        "conv_transpose2d",
        lambda: dict(x=_randn(1, 5, 4, 5), weight=_randn(5, 5, 64, 64) * 0.1, bias=None),
        dict(stride=32, crop=(19, 19, 100, 120)),
    ),
    # everything else the geometry allows: groups, dilation, padding, output_padding, rect kernel
    "deconv-general": (
        "conv_transpose2d",
        lambda: dict(x=_randn(2, 6, 5, 7), weight=_randn(6, 2, 3, 4), bias=_randn(6)),
        dict(
            stride=(3, 2),
            padding=(1, 2),
            output_padding=(1, 0),
            groups=3,
            dilation=(2, 1),
            crop=(1, 2, 11, 9),
        ),
    ),
    "deconv-stride1": (
        "conv_transpose2d",
        lambda: dict(x=_randn(2, 4, 6, 6), weight=_randn(4, 3, 3, 3), bias=None),
        dict(stride=1, padding=1),
    ),
    "bilinear-s2": ("bilinear_upsample2d", lambda: dict(x=_randn(2, 21, 7, 9)), dict(scale=2)),
    "bilinear-s8-crop31": (
        "bilinear_upsample2d",
        lambda: dict(x=_randn(2, 21, 9, 10)),
        dict(scale=8, crop=(31, 31, 40, 50)),
    ),
    "bilinear-s32-crop19": (
        "bilinear_upsample2d",
        lambda: dict(x=_randn(1, 3, 4, 4)),
        dict(scale=32, crop=(19, 19, 100, 90)),
    ),
    "skip-crop5": (
        "skip_add_crop",
        lambda: dict(coarse=_randn(2, 21, 10, 12), skip=_randn(2, 21, 20, 22)),
        dict(offset=(5, 5)),
    ),
    "skip-crop9-rect": (
        "skip_add_crop",
        lambda: dict(coarse=_randn(1, 21, 17, 9), skip=_randn(1, 21, 35, 19)),
        dict(offset=(9, 3)),
    ),
    "score-pool4": (
        "score_skip",
        lambda: dict(
            coarse=_randn(2, 21, 10, 12),
            feature=_randn(2, 64, 20, 22),
            weight=_randn(21, 64, 1, 1) * 0.1,
            bias=_randn(21),
        ),
        dict(offset=(5, 5)),
    ),
    "score-pool3-atonce": (
        "score_skip",
        lambda: dict(
            coarse=_randn(1, 21, 9, 8),
            feature=_randn(1, 48, 27, 26),
            weight=_randn(21, 48, 1, 1),
            bias=None,
        ),
        dict(scale=0.0001 * 1e3, offset=(9, 9)),
    ),
    "ce-s8-mean": (
        "upsample_cross_entropy",
        lambda: dict(x=_randn(2, 21, 6, 7) * 2, target=oracle_target(2, 40, 44, 21)),
        dict(scale=8, crop=(3, 5, 40, 44), reduction="mean"),
    ),
    "ce-s4-sum": (
        "upsample_cross_entropy",
        lambda: dict(x=_randn(1, 5, 5, 6), target=oracle_target(1, 24, 28, 5, ignore=-1)),
        dict(scale=4, crop=None, ignore_index=-1, reduction="sum"),
    ),
}

# the cases whose fp64 gradcheck / gradgradcheck run (on shrunk inputs: see small_grad_case)
GRADCHECK_CASES = ["deconv-general", "bilinear-s8-crop31", "skip-crop5", "score-pool4", "ce-s4-sum"]


def oracle_case_names(op: str, exclude: Sequence[str] = ()) -> List[str]:
    return [name for name, case in ORACLE_CASES.items() if case[0] == op and name not in exclude]


def materialise(tensors, dtype, device):
    """Floating tensors cast to ``dtype`` (the values the op sees); for the oracle
    (device="cpu64") kept at those rounded values but in float64."""
    out = {}
    for k, t in tensors.items():
        if t is None or not t.is_floating_point():
            out[k] = None if t is None else t.to("cpu" if device == "cpu64" else device)
            continue
        t = t.to(dtype)
        t = t.double() if device == "cpu64" else t.to(device)
        out[k] = t.requires_grad_()
    return out


def oracle_fn(op, dtype):
    if op != "upsample_cross_entropy":
        return getattr(reference, op)

    def cross_entropy(x, target, scale, crop=None, ignore_index=255, reduction="mean"):
        # the unfused expression stores the upsampled scores in dtype before the softmax;
        # round them the same way (straight-through, so the gradient is not rounded)
        z = reference.bilinear_upsample2d(x, scale, crop)
        z = z + (z.to(dtype).double() - z).detach()
        return torch.nn.functional.cross_entropy(
            z, target, ignore_index=ignore_index, reduction=reduction
        )

    return cross_entropy


def run_with_grads(fn, args, kwargs, grad_out):
    """``fn(**args, **kwargs)`` and the gradient of every argument that requires one."""
    out = fn(**args, **kwargs)
    wrt = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out.to(out.dtype).to(out.device))
    return out.detach(), dict(zip(wrt, grads))


def reduction_terms(op, t, kwargs, what, out_shape):
    """Products summed per element of output ``what`` ("output" or an input's gradient):
    the tolerance grows with it (conftest.tolerance)."""
    if op == "conv_transpose2d":
        w, groups = t["weight"], kwargs.get("groups", 1)
        stride = kwargs.get("stride", 1)
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        kh, kw = w.shape[2:]
        return {
            "output": w.shape[0] // groups * -(-kh // sh) * -(-kw // sw),
            "x": w.shape[1] * kh * kw,
            "weight": t["x"][:, 0].numel(),
            "bias": out_shape[0] * out_shape[2] * out_shape[3],
        }.get(what, 1)
    if op == "bilinear_upsample2d":
        return 4 if what == "output" else 4 * kwargs["scale"] ** 2
    if op == "score_skip":
        return {
            "output": t["feature"].shape[1],
            "feature": t["weight"].shape[0],
            "weight": t["coarse"][:, 0].numel(),
            "bias": t["coarse"][:, 0].numel(),
        }.get(what, 1)
    if op == "upsample_cross_entropy":
        c = t["x"].shape[1]
        return t["target"].numel() * c if what == "output" else 4 * kwargs["scale"] ** 2 * c
    return 1


def assert_close_to_oracle(actual, oracle, dtype, what, terms=1):
    assert actual.dtype == dtype, "%s dtype %s != %s" % (what, actual.dtype, dtype)
    assert actual.shape == oracle.shape, "%s shape %s != %s" % (what, actual.shape, oracle.shape)
    if oracle.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), oracle.detach().double().cpu()
    assert torch.isfinite(a).all(), "%s has non-finite values" % what
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    tol = tolerance(dtype, terms)
    assert err <= tol * scale, (
        "%s max abs error %.3g > %.3g (scale %.3g, dtype %s, %d-term sums)"
        % (what, err, tol * scale, scale, dtype, terms)
    )


def check_oracle_case(name, dtype, device):
    """Op ``name`` of ORACLE_CASES on ``device`` in ``dtype``: output and every gradient
    against the fp64 CPU reference on the same rounded inputs."""
    op, make, kwargs = ORACLE_CASES[name]
    tensors = make()
    native_args = materialise(tensors, dtype, device)
    oracle_args = materialise(tensors, dtype, "cpu64")
    out_shape = oracle_fn(op, dtype)(**oracle_args, **kwargs).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(dtype)
    out, grads = run_with_grads(getattr(ops, op), native_args, kwargs, grad_out)
    assert out.device.type == torch.device(device).type
    ref_out, ref_grads = run_with_grads(
        oracle_fn(op, dtype), oracle_args, kwargs, grad_out.double()
    )
    assert_close_to_oracle(
        out,
        ref_out,
        dtype,
        "%s output" % name,
        reduction_terms(op, tensors, kwargs, "output", out.shape),
    )
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert_close_to_oracle(
            grads[k],
            ref_grads[k],
            dtype,
            "%s grad %s" % (name, k),
            reduction_terms(op, tensors, kwargs, k, out.shape),
        )
    return out, grads


def check_matches_cpu_backend(name, device):
    """``device`` and the CPU backend (native where built, else reference) agree in float32."""
    op, make, kwargs = ORACLE_CASES[name]
    tensors = make()
    g = torch.randn(
        oracle_fn(op, torch.float32)(
            **materialise(tensors, torch.float32, "cpu64"), **kwargs
        ).shape,
        dtype=torch.float64,
    )
    out_d, grads_d = run_with_grads(
        getattr(ops, op), materialise(tensors, torch.float32, device), kwargs, g
    )
    out_h, grads_h = run_with_grads(
        getattr(ops, op), materialise(tensors, torch.float32, "cpu"), kwargs, g
    )
    assert out_d.device.type == torch.device(device).type
    assert_close_to_oracle(out_d, out_h, torch.float32, "output")
    for k in grads_h:
        assert_close_to_oracle(grads_d[k], grads_h[k], torch.float32, "grad %s" % k)


def check_empty_batch(name, device):
    """The case with an empty batch: an empty output on ``device``, all-zero gradients."""
    op, make, kwargs = ORACLE_CASES[name]
    batched = ("x", "coarse", "skip", "feature")
    tensors = {k: (v[:0] if k in batched else v) for k, v in make().items()}
    args = materialise(tensors, torch.float32, device)
    out = getattr(ops, op)(**args, **kwargs)
    assert out.shape[0] == 0 and out.device.type == torch.device(device).type
    out.sum().backward()
    for k, v in args.items():
        if v is not None and v.requires_grad and v.grad is not None:
            assert not v.grad.any(), k


def small_grad_case(name, device):
    """``(fn, inputs)`` for fp64 gradcheck of ORACLE_CASES[name] on ``device``, shrunk
    (gradcheck is O(numel^2))."""
    op, make, kwargs = ORACLE_CASES[name]
    tensors = make()
    if op == "bilinear_upsample2d":
        tensors, kwargs = dict(x=_randn(1, 2, 3, 4)), dict(scale=4, crop=(3, 2, 12, 14))
    elif op == "skip_add_crop":
        tensors = dict(coarse=_randn(1, 2, 3, 4), skip=_randn(1, 2, 9, 9))
    elif op == "score_skip":
        tensors = dict(
            coarse=_randn(1, 3, 3, 4),
            feature=_randn(1, 4, 9, 9),
            weight=_randn(3, 4, 1, 1),
            bias=_randn(3),
        )
    elif op == "upsample_cross_entropy":
        tensors = dict(x=_randn(1, 3, 2, 3), target=oracle_target(1, 12, 16, 3, ignore=-1))
    args = materialise(tensors, torch.float64, device)
    names = [k for k, v in args.items() if v is not None and v.requires_grad]

    def fn(*grad_inputs):
        call = dict(args, **dict(zip(names, grad_inputs)))
        return getattr(ops, op)(**call, **kwargs)

    return fn, [args[k] for k in names]


def check_gradcheck_fp64(name, device):
    fn, inputs = small_grad_case(name, device)
    assert torch.autograd.gradcheck(fn, inputs)


def check_gradgradcheck_fp64(name, device):
    """Double backward (the autograd formulas call the backward ops on ``device``), with
    warnings as errors: an op without an autograd kernel would warn and give zeros."""
    import warnings

    fn, inputs = small_grad_case(name, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradgradcheck(fn, inputs)


def oracle_tests(op: str) -> dict:
    """The device-parametrised ORACLE_CASES tests of ``op``, for a per-op test module:
    ``globals().update(oracle_tests(OP))``. fp64 gradcheck/gradgradcheck and the
    comparison with the CPU backend run on accelerators only (the CPU gradchecks are the
    per-op ``test_gradcheck_fp64`` and test_double_backward.py; the CPU needs no
    comparison with itself)."""
    import pytest
    from conftest import ACCELERATORS, require_native

    names = oracle_case_names(op)
    if not names:
        return {}

    @pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=ORACLE_DTYPE_IDS)
    @pytest.mark.parametrize("name", names)
    def test_matches_fp64_oracle(name, dtype, device):
        require_native(op, device)
        check_oracle_case(name, dtype, device)

    def device_test(check, case_names, devices=None):
        """A test of ``check(name, device)`` over ``case_names``, on ``devices`` (default:
        the ``device`` fixture)."""

        @pytest.mark.parametrize("name", case_names)
        def test(name, device):
            require_native(op, device)
            check(name, device)

        return test if devices is None else pytest.mark.parametrize("device", devices)(test)

    tests = dict(
        test_matches_fp64_oracle=test_matches_fp64_oracle,
        test_matches_cpu_backend=device_test(check_matches_cpu_backend, names, ACCELERATORS),
    )
    if op != "upsample_cross_entropy":  # (a loss has no batch dimension to be empty)
        tests["test_empty_batch_case"] = device_test(check_empty_batch, names)
    grad = [n for n in GRADCHECK_CASES if n in names]
    if grad:
        tests["test_gradcheck_fp64_case"] = device_test(check_gradcheck_fp64, grad, ACCELERATORS)
        tests["test_gradgradcheck_fp64_case"] = device_test(
            check_gradgradcheck_fp64, grad, ACCELERATORS
        )
    return tests


# ---------------------------------------------------------------------------
# shared by the upsampling ops' tests (bilinear_upsample2d, upsample_argmax,
# upsample_cross_entropy)
# ---------------------------------------------------------------------------

# the FCN heads' final upsampling (DESIGN.md): FCN-8s x8 crop 31, FCN-16s x16 crop 27,
# FCN-32s x32 crop 19
FCN_HEAD_OFFSET = {8: 31, 16: 27, 32: 19}


def head_shape(n, c, h, w, scale, out_h, out_w):
    """``(N, C, H, W, scale, crop)`` of an FCN head's upsampling to ``out_h`` x ``out_w``."""
    offset = FCN_HEAD_OFFSET[scale]
    return (n, c, h, w, scale, (offset, offset, out_h, out_w))


# (N, C, H, W, scale, crop): odd scale without a crop; scale 1 with a crop
UPSAMPLE_GENERIC_SHAPES = [(3, 4, 5, 7, 3, None), (2, 3, 6, 4, 1, (0, 1, 6, 4))]


def bottom_right_shape(n, c, h, w, scale, out_h, out_w):
    """A crop of ``out_h`` x ``out_w`` at the bottom-right corner of the full output
    ((H + 1) * scale x (W + 1) * scale)."""
    return (n, c, h, w, scale, ((h + 1) * scale - out_h, (w + 1) * scale - out_w, out_h, out_w))


def upsample_shapes(heads, bottom_right, one_pixel):
    """``(N, C, H, W, scale, crop)`` geometries of an upsampling op's tests: the FCN heads
    (``head_shape`` arguments), UPSAMPLE_GENERIC_SHAPES, a crop at the bottom-right edge
    (``bottom_right_shape`` arguments) and a one-pixel crop."""
    return (
        [head_shape(*h) for h in heads]
        + UPSAMPLE_GENERIC_SHAPES
        + [bottom_right_shape(*bottom_right), one_pixel]
    )


# (kwargs, match): errors every upsampling op raises alike, on x (1, 3, 4, 4), scale 4
UPSAMPLE_ERRORS = [
    (dict(scale=0), "scale must be a positive int"),
    (dict(crop=(0, 0, 21, 5)), "lies outside the full output"),
    (dict(x=torch.randn(4, 4)), "x must be a 4-D"),
    (dict(x=torch.randint(0, 3, (1, 3, 4, 4))), "x must be a floating"),
]


def check_upsample_error(fn, kwargs, match):
    """``fn(x, scale, crop)`` with ``kwargs`` replacing the valid x (1, 3, 4, 4), scale 4,
    crop None raises a ValueError matching ``match``."""
    import pytest

    args = dict(x=torch.randn(1, 3, 4, 4), scale=4, crop=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fn(args["x"], args["scale"], args["crop"])
