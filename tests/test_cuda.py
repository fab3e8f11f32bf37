"""CUDA kernels (compiled extension or CuPy JIT) against the reference.

The GPU tests are skipped without a CUDA device. They compare every op and
every gradient on CUDA, for float32/float64/float16/bfloat16 and FCN shapes,
with ``fcnfast.reference`` run on the CPU in float64 on the same (dtype-rounded)
inputs as the oracle; check bitwise determinism (also under
``torch.use_deterministic_algorithms(True)``), a non-default stream, the device
guard (a second GPU), contiguity, empty batches and CPU/CUDA mixes.

The CUDA backend under test is the compiled one when the extension was built
with CUDA, else CuPy; ``FCNFAST_CUDA_BACKEND=cupy`` forces CuPy
(``test_cupy_backend_suite`` reruns this file that way in a subprocess).

The last tests need no GPU: the CUDA sources the CuPy backend compiles are
found and list the kernels it launches, they compile with NVRTC (when libnvrtc
is installed, e.g. the nvidia-cuda-nvrtc wheel) through the same name
expressions, and ``setup.py build_py`` ships them in the package.
"""
import contextlib
import ctypes
import glob
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fcnfast
from fcnfast import _backend, _cupy, ops, reference

from conftest import TOLERANCE, require_native, tolerance

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f64", "f16", "bf16"]


def _expected_cuda_backend():
    if _cupy.requested() == "cupy":
        return "cupy"
    return "native" if fcnfast.build_info().get("compiled_cuda") else "cupy"


def _require_cuda_kernel(op):
    require_native(op, "cuda")
    assert fcnfast.backend("cuda") == _expected_cuda_backend(), fcnfast.build_info()


# ---------------------------------------------------------------------------
# cases: op, fp64 CPU input tensors, other arguments (FCN geometry first)
# ---------------------------------------------------------------------------

def _randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _target(n, h, w, classes, ignore=255, frac=0.1):
    t = torch.randint(0, classes, (n, h, w))
    t[torch.rand(n, h, w) < frac] = ignore
    return t


CASES = {
    # learned FCN-8s upscore2 (k4 s2, no crop) and upscore8 (k16 s8, crop 31)
    "deconv-upscore2": ("conv_transpose2d",
                        lambda: dict(x=_randn(2, 21, 8, 9), weight=_randn(21, 21, 4, 4) * 0.1,
                                     bias=None), dict(stride=2)),
    "deconv-upscore8": ("conv_transpose2d",
                        lambda: dict(x=_randn(1, 21, 12, 11), weight=_randn(21, 21, 16, 16) * 0.1,
                                     bias=_randn(21)), dict(stride=8, crop=(31, 31, 64, 60))),
    "deconv-upscore32": ("conv_transpose2d",
                         lambda: dict(x=_randn(1, 5, 4, 5), weight=_randn(5, 5, 64, 64) * 0.1,
                                      bias=None), dict(stride=32, crop=(19, 19, 100, 120))),
    # everything else the geometry allows: groups, dilation, padding, output_padding, rect kernel
    "deconv-general": ("conv_transpose2d",
                       lambda: dict(x=_randn(2, 6, 5, 7), weight=_randn(6, 2, 3, 4),
                                    bias=_randn(6)),
                       dict(stride=(3, 2), padding=(1, 2), output_padding=(1, 0), groups=3,
                            dilation=(2, 1), crop=(1, 2, 11, 9))),
    "deconv-stride1": ("conv_transpose2d",
                       lambda: dict(x=_randn(2, 4, 6, 6), weight=_randn(4, 3, 3, 3), bias=None),
                       dict(stride=1, padding=1)),
    "bilinear-s2": ("bilinear_upsample2d", lambda: dict(x=_randn(2, 21, 7, 9)), dict(scale=2)),
    "bilinear-s8-crop31": ("bilinear_upsample2d", lambda: dict(x=_randn(2, 21, 9, 10)),
                           dict(scale=8, crop=(31, 31, 40, 50))),
    "bilinear-s32-crop19": ("bilinear_upsample2d", lambda: dict(x=_randn(1, 3, 4, 4)),
                            dict(scale=32, crop=(19, 19, 100, 90))),
    "skip-crop5": ("skip_add_crop",
                   lambda: dict(coarse=_randn(2, 21, 10, 12), skip=_randn(2, 21, 20, 22)),
                   dict(offset=(5, 5))),
    "skip-crop9-rect": ("skip_add_crop",
                        lambda: dict(coarse=_randn(1, 21, 17, 9), skip=_randn(1, 21, 35, 19)),
                        dict(offset=(9, 3))),
    "score-pool4": ("score_skip",
                    lambda: dict(coarse=_randn(2, 21, 10, 12), feature=_randn(2, 64, 20, 22),
                                 weight=_randn(21, 64, 1, 1) * 0.1, bias=_randn(21)),
                    dict(offset=(5, 5))),
    "score-pool3-atonce": ("score_skip",
                           lambda: dict(coarse=_randn(1, 21, 9, 8), feature=_randn(1, 48, 27, 26),
                                        weight=_randn(21, 48, 1, 1), bias=None),
                           dict(scale=0.0001 * 1e3, offset=(9, 9))),
    "ce-s8-mean": ("upsample_cross_entropy",
                   lambda: dict(x=_randn(2, 21, 6, 7) * 2, target=_target(2, 40, 44, 21)),
                   dict(scale=8, crop=(3, 5, 40, 44), reduction="mean")),
    "ce-s4-sum": ("upsample_cross_entropy",
                  lambda: dict(x=_randn(1, 5, 5, 6), target=_target(1, 24, 28, 5, ignore=-1)),
                  dict(scale=4, crop=None, ignore_index=-1, reduction="sum")),
}


def _materialise(tensors, dtype, device):
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


def _oracle_fn(op, dtype):
    if op != "upsample_cross_entropy":
        return getattr(reference, op)

    def cross_entropy(x, target, scale, crop=None, ignore_index=255, reduction="mean"):
        # the unfused expression stores the upsampled scores in dtype before the softmax;
        # round them the same way (straight-through, so the gradient is not rounded)
        z = reference.bilinear_upsample2d(x, scale, crop)
        z = z + (z.to(dtype).double() - z).detach()
        return F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
    return cross_entropy


def _run(fn, args, kwargs, grad_out):
    out = fn(**args, **kwargs)
    wrt = {k: v for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out.to(out.dtype).to(out.device))
    return out.detach(), dict(zip(wrt, grads))


def _reduction_terms(op, t, kwargs, what, out_shape):
    """Products summed per element of output ``what`` ("output" or an input's gradient):
    the tolerance grows with it (conftest.tolerance)."""
    if op == "conv_transpose2d":
        w, groups = t["weight"], kwargs.get("groups", 1)
        stride = kwargs.get("stride", 1)
        sh, sw = (stride, stride) if isinstance(stride, int) else stride
        kh, kw = w.shape[2:]
        return {"output": w.shape[0] // groups * -(-kh // sh) * -(-kw // sw),
                "x": w.shape[1] * kh * kw,
                "weight": t["x"][:, 0].numel(),
                "bias": out_shape[0] * out_shape[2] * out_shape[3]}.get(what, 1)
    if op == "bilinear_upsample2d":
        return 4 if what == "output" else 4 * kwargs["scale"] ** 2
    if op == "score_skip":
        return {"output": t["feature"].shape[1], "feature": t["weight"].shape[0],
                "weight": t["coarse"][:, 0].numel(), "bias": t["coarse"][:, 0].numel()}.get(what, 1)
    if op == "upsample_cross_entropy":
        c = t["x"].shape[1]
        return t["target"].numel() * c if what == "output" else 4 * kwargs["scale"] ** 2 * c
    return 1


def _assert_close_to_oracle(actual, oracle, dtype, what, terms=1):
    assert actual.dtype == dtype, "%s dtype %s != %s" % (what, actual.dtype, dtype)
    assert actual.shape == oracle.shape, "%s shape %s != %s" % (what, actual.shape, oracle.shape)
    if oracle.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), oracle.detach().double()
    assert torch.isfinite(a).all(), "%s has non-finite values" % what
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    tol = tolerance(dtype, terms)
    assert err <= tol * scale, (
        "%s max abs error %.3g > %.3g (scale %.3g, dtype %s, %d-term sums)"
        % (what, err, tol * scale, scale, dtype, terms))


def _check_case(name, dtype, device="cuda"):
    op, make, kwargs = CASES[name]
    tensors = make()
    native_args = _materialise(tensors, dtype, device)
    oracle_args = _materialise(tensors, dtype, "cpu64")
    out_shape = _oracle_fn(op, dtype)(**oracle_args, **kwargs).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64).to(dtype)
    out, grads = _run(getattr(ops, op), native_args, kwargs, grad_out)
    assert out.device.type == torch.device(device).type
    ref_out, ref_grads = _run(_oracle_fn(op, dtype), oracle_args, kwargs, grad_out.double())
    _assert_close_to_oracle(out, ref_out, dtype, "%s output" % name,
                            _reduction_terms(op, tensors, kwargs, "output", out.shape))
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        _assert_close_to_oracle(grads[k], ref_grads[k], dtype, "%s grad %s" % (name, k),
                                _reduction_terms(op, tensors, kwargs, k, out.shape))
    return out, grads


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name", list(CASES))
def test_op_and_grads_match_reference(name, dtype):
    _require_cuda_kernel(CASES[name][0])
    _check_case(name, dtype)


@needs_cuda
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_cpu_backend(name):
    """CUDA and CPU (native where built, else reference) agree in float32."""
    op, make, kwargs = CASES[name]
    _require_cuda_kernel(op)
    tensors = make()
    g = torch.randn(_oracle_fn(op, torch.float32)(**_materialise(tensors, torch.float32, "cpu64"),
                                                   **kwargs).shape, dtype=torch.float64)
    out_c, grads_c = _run(getattr(ops, op), _materialise(tensors, torch.float32, "cuda"), kwargs, g)
    out_h, grads_h = _run(getattr(ops, op), _materialise(tensors, torch.float32, "cpu"), kwargs, g)
    _assert_close_to_oracle(out_c, out_h, torch.float32, "output")
    for k in grads_h:
        _assert_close_to_oracle(grads_c[k], grads_h[k], torch.float32, "grad %s" % k)


ARGMAX_CASES = [
    # (N, C, H, W, scale, crop)
    (2, 21, 6, 7, 8, (31, 31, 20, 25)),
    (1, 21, 4, 4, 32, (19, 19, 100, 90)),
    (3, 5, 5, 6, 2, None),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", ARGMAX_CASES)
def test_upsample_argmax(case, dtype):
    _require_cuda_kernel("upsample_argmax")
    n, c, h, w, scale, crop = case
    x = _randn(n, c, h, w).to(dtype)
    labels = ops.upsample_argmax(x.cuda(), scale, crop)
    assert labels.dtype == torch.int64 and labels.device.type == "cuda"
    scores = reference.bilinear_upsample2d(x.double(), scale, crop)
    assert labels.shape == scores.shape[:1] + scores.shape[2:]
    labels = labels.cpu()
    assert labels.min() >= 0 and labels.max() < c
    # the chosen class scores the maximum up to the dtype's rounding (near-ties may differ)
    best = scores.max(1).values
    chosen = scores.gather(1, labels.unsqueeze(1)).squeeze(1)
    tol = TOLERANCE[dtype] * max(1.0, scores.abs().max().item())
    assert (best - chosen).max().item() <= tol
    if dtype == torch.float64:
        assert torch.equal(labels, scores.argmax(1))


@needs_cuda
def test_upsample_argmax_ties_and_nan_follow_torch_argmax():
    _require_cuda_kernel("upsample_argmax")
    x = torch.zeros(1, 4, 3, 3, device="cuda")
    assert torch.equal(ops.upsample_argmax(x, 2), torch.zeros(1, 8, 8, dtype=torch.int64,
                                                              device="cuda"))
    x[0, 2, 1, 1] = float("nan")
    expected = reference.upsample_argmax(x.cpu(), 2)
    assert torch.equal(ops.upsample_argmax(x, 2).cpu(), expected)


GRADCHECK_CASES = ["deconv-general", "bilinear-s8-crop31", "skip-crop5", "score-pool4",
                   "ce-s4-sum"]


@needs_cuda
@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradcheck_fp64(name):
    fn, inputs = _small_grad_case(name)
    assert torch.autograd.gradcheck(fn, inputs)


@needs_cuda
@pytest.mark.parametrize("name", GRADCHECK_CASES)
def test_gradgradcheck_fp64(name):
    """Double backward on CUDA (the autograd formulas call the CUDA backward ops), with
    warnings as errors: an op without an autograd kernel would warn and give zeros."""
    import warnings
    fn, inputs = _small_grad_case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradgradcheck(fn, inputs)


def _small_grad_case(name):
    op, make, kwargs = CASES[name]
    _require_cuda_kernel(op)
    tensors = make()
    # shrink: gradcheck is O(numel^2)
    if op == "bilinear_upsample2d":
        tensors, kwargs = dict(x=_randn(1, 2, 3, 4)), dict(scale=4, crop=(3, 2, 12, 14))
    elif op == "skip_add_crop":
        tensors = dict(coarse=_randn(1, 2, 3, 4), skip=_randn(1, 2, 9, 9))
    elif op == "score_skip":
        tensors = dict(coarse=_randn(1, 3, 3, 4), feature=_randn(1, 4, 9, 9),
                       weight=_randn(3, 4, 1, 1), bias=_randn(3))
    elif op == "upsample_cross_entropy":
        tensors = dict(x=_randn(1, 3, 2, 3), target=_target(1, 12, 16, 3, ignore=-1))
    args = _materialise(tensors, torch.float64, "cuda")
    names = [k for k, v in args.items() if v is not None and v.requires_grad]

    def fn(*grad_inputs):
        call = dict(args, **dict(zip(names, grad_inputs)))
        return getattr(ops, op)(**call, **kwargs)
    return fn, [args[k] for k in names]


@needs_cuda
def test_opcheck_cuda():
    _require_cuda_kernel("conv_transpose2d")
    x = torch.randn(2, 4, 5, 6, device="cuda", requires_grad=True)
    w = torch.randn(4, 3, 4, 4, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fcnfast.conv_transpose2d.default,
                          (x, w, None, [2, 2], [0, 0], [0, 0], 1, [1, 1], [1, 1, 8, 9]))
    torch.library.opcheck(torch.ops.fcnfast.bilinear_upsample2d.default, (x, 4, [3, 3, 17, 20]))
    torch.library.opcheck(torch.ops.fcnfast.skip_add_crop.default,
                          (x[:, :, :3, :3].contiguous(), x, [1, 2]))
    t = torch.randint(0, 4, (2, 17, 20), device="cuda")
    torch.library.opcheck(torch.ops.fcnfast.upsample_cross_entropy.default,
                          (x, t, 4, [3, 3, 17, 20], 255, "mean"))
    torch.library.opcheck(torch.ops.fcnfast.upsample_argmax.default, (x, 4, [3, 3, 17, 20]))


@needs_cuda
@pytest.mark.parametrize("name", ["deconv-upscore8", "bilinear-s8-crop31", "skip-crop5",
                                  "score-pool4", "ce-s8-mean"])
def test_noncontiguous_inputs(name):
    op, make, kwargs = CASES[name]
    _require_cuda_kernel(op)
    tensors = make()
    base = _materialise(tensors, torch.float32, "cuda")
    strided = {}
    for k, v in base.items():
        if v is not None and v.is_floating_point() and v.dim() == 4:
            v = v.detach().to(memory_format=torch.channels_last).requires_grad_()
        strided[k] = v
    g = torch.randn(getattr(ops, op)(**base, **kwargs).shape, dtype=torch.float64)
    out_a, grads_a = _run(getattr(ops, op), base, kwargs, g)
    out_b, grads_b = _run(getattr(ops, op), strided, kwargs, g)
    assert torch.equal(out_a, out_b)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


@needs_cuda
@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("ce-")])
def test_empty_batch(name):
    op, make, kwargs = CASES[name]
    _require_cuda_kernel(op)
    batched = ("x", "coarse", "skip", "feature")
    tensors = {k: (v[:0] if k in batched else v) for k, v in make().items()}
    args = _materialise(tensors, torch.float32, "cuda")
    out = getattr(ops, op)(**args, **kwargs)
    assert out.shape[0] == 0 and out.device.type == "cuda"
    out.sum().backward()
    for k, v in args.items():
        if v is not None and v.requires_grad and v.grad is not None:
            assert not v.grad.any(), k


@needs_cuda
def test_cross_entropy_all_ignored_matches_torch():
    _require_cuda_kernel("upsample_cross_entropy")
    x = torch.randn(1, 3, 2, 2, device="cuda", requires_grad=True)
    t = torch.full((1, 6, 6), 255, device="cuda")
    for reduction in ("mean", "sum"):
        loss = ops.upsample_cross_entropy(x, t, 2, reduction=reduction)
        expected = reference.upsample_cross_entropy(x.detach().cpu(), t.cpu(), 2,
                                                    reduction=reduction)
        assert torch.equal(torch.isnan(loss).cpu(), torch.isnan(expected))
        (g,) = torch.autograd.grad(loss, x)
        assert torch.equal(g, torch.zeros_like(g))


@needs_cuda
def test_cross_entropy_bad_label_is_an_error():
    _require_cuda_kernel("upsample_cross_entropy")
    x = torch.randn(1, 3, 2, 2, device="cuda")
    t = torch.zeros(1, 6, 6, dtype=torch.int64, device="cuda")
    t[0, 1, 1] = 3
    with pytest.raises(ValueError, match="outside"):
        torch.ops.fcnfast.upsample_cross_entropy(x, t, 2, [0, 0, 6, 6], 255, "mean")


# ---------------------------------------------------------------------------
# determinism, streams, devices, errors
# ---------------------------------------------------------------------------

def _fcn8s_workload(device="cuda"):
    """FCN-8s head on a 500x500 image: the 1/8 score map (70x70, fuse_pool3), pool3 features,
    a learned k16 s8 deconvolution, a fused loss over the full 500x500 labels."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 21, 34, 34, generator=g)
    w = torch.randn(21, 21, 16, 16, generator=g) * 0.05
    coarse = torch.randn(1, 21, 70, 70, generator=g)
    pool3 = torch.randn(1, 256, 88, 88, generator=g)
    ws = torch.randn(21, 256, 1, 1, generator=g) * 0.05
    target = torch.randint(0, 21, (1, 500, 500), generator=g)
    target[:, :50] = 255
    tensors = [t.to(device).requires_grad_() for t in (x, w, coarse, pool3, ws)]
    return tensors, target.to(device)


def _fcn8s_step(tensors, target):
    x, w, coarse, pool3, ws = tensors
    fused = ops.score_skip(coarse, pool3, ws, None, 0.0001, (9, 9))
    up = ops.conv_transpose2d(x, w, stride=8, crop=(31, 31, 128, 128))
    loss = ops.upsample_cross_entropy(fused, target, 8, (31, 31, 500, 500))
    skip = ops.skip_add_crop(up[..., :64, :64], up, (3, 3))
    bil = ops.bilinear_upsample2d(skip, 2, (1, 1, 100, 100))
    total = loss + bil.square().mean()
    grads = torch.autograd.grad(total, tensors)
    labels = ops.upsample_argmax(fused, 8, (31, 31, 500, 500))
    return [total.detach(), labels] + list(grads)


@needs_cuda
def test_backward_bitwise_deterministic():
    _require_cuda_kernel("conv_transpose2d")
    tensors, target = _fcn8s_workload()
    first = _fcn8s_step(tensors, target)
    second = _fcn8s_step(tensors, target)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        third = _fcn8s_step(tensors, target)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, third):
        assert torch.equal(a, b)


@needs_cuda
def test_non_default_stream():
    _require_cuda_kernel("conv_transpose2d")
    tensors, target = _fcn8s_workload()
    expected = _fcn8s_step(tensors, target)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # produce the inputs on the side stream right before use: a kernel launched on the
        # default stream instead would race with these writes
        fresh = [(t.detach() * 1.0).requires_grad_() for t in tensors]
        got = _fcn8s_step(fresh, target)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_guard():
    _require_cuda_kernel("conv_transpose2d")
    tensors, target = _fcn8s_workload("cuda:0")
    expected = _fcn8s_step(tensors, target)
    assert torch.cuda.current_device() == 0
    moved = [t.detach().to("cuda:1").requires_grad_() for t in tensors]
    got = _fcn8s_step(moved, target.to("cuda:1"))
    for a, b in zip(expected, got):
        assert b.device == torch.device("cuda:1")
        assert torch.equal(a, b.to("cuda:0"))


MIXES = {
    "skip_add_crop": lambda c, g: torch.ops.fcnfast.skip_add_crop(
        torch.randn(1, 2, 3, 3, device=g), torch.randn(1, 2, 5, 5, device=c), [1, 1]),
    "score_skip": lambda c, g: torch.ops.fcnfast.score_skip(
        torch.randn(1, 2, 3, 3, device=g), torch.randn(1, 4, 5, 5, device=g),
        torch.randn(2, 4, 1, 1, device=c), None, 1.0, [1, 1]),
    "conv_transpose2d": lambda c, g: torch.ops.fcnfast.conv_transpose2d(
        torch.randn(1, 2, 3, 3, device=g), torch.randn(2, 2, 4, 4, device=c), None, [2, 2],
        [0, 0], [0, 0], 1, [1, 1], [0, 0, 8, 8]),
    "conv_transpose2d_bias": lambda c, g: torch.ops.fcnfast.conv_transpose2d(
        torch.randn(1, 2, 3, 3, device=g), torch.randn(2, 2, 4, 4, device=g),
        torch.randn(2, device=c), [2, 2], [0, 0], [0, 0], 1, [1, 1], [0, 0, 8, 8]),
    "upsample_cross_entropy": lambda c, g: torch.ops.fcnfast.upsample_cross_entropy(
        torch.randn(1, 2, 3, 3, device=g), torch.zeros(1, 8, 8, dtype=torch.int64, device=c),
        2, [0, 0, 8, 8], 255, "mean"),
}


@needs_cuda
@pytest.mark.parametrize("name", list(MIXES))
def test_cpu_cuda_mix_is_a_clear_error(name):
    _require_cuda_kernel("skip_add_crop")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        MIXES[name]("cpu", "cuda")
    # the public wrappers reject it before dispatching
    with pytest.raises(ValueError, match="same device"):
        ops.skip_add_crop(torch.randn(1, 2, 3, 3, device="cuda"), torch.randn(1, 2, 5, 5), (1, 1))


@needs_cuda
def test_cupy_matches_compiled():
    """The CuPy-compiled kernels agree with the nvcc-compiled ones (same source)."""
    if not _cupy.available():
        pytest.skip("CuPy is not installed")
    if not fcnfast.build_info().get("compiled_cuda") or _cupy.requested() == "cupy":
        pytest.skip("the extension has no compiled CUDA kernels to compare with")
    tensors, target = _fcn8s_workload()
    x, w, coarse, pool3, ws = [t.detach() for t in tensors]
    crop = [31, 31, 500, 500]
    calls = [
        ("conv_transpose2d", (x, w, None, [8, 8], [0, 0], [0, 0], 1, [1, 1], [31, 31, 128, 128])),
        ("score_skip", (coarse, pool3, ws, None, 0.0001, [9, 9])),
        ("score_skip_backward", (coarse, pool3, ws, 0.0001, [9, 9], [True, True, True])),
        ("bilinear_upsample2d", (coarse, 8, crop)),
        ("bilinear_upsample2d_backward", (torch.randn(1, 21, 500, 500, device="cuda"), 70, 70, 8,
                                          crop)),
        ("skip_add_crop", (x, coarse, [9, 9])),
        ("upsample_argmax", (coarse, 8, crop)),
        ("upsample_cross_entropy", (coarse, target, 8, crop, 255, "mean")),
        ("upsample_cross_entropy_backward",
         (torch.ones((), device="cuda"), coarse, target, 8, crop, 255, "sum")),
        ("conv_transpose2d_backward",
         (torch.randn(1, 21, 128, 128, device="cuda"), x, w, [8, 8], [0, 0], [0, 0], 1, [1, 1],
          [31, 31, 128, 128], [True, True, True])),
    ]
    for name, args in calls:
        compiled = getattr(torch.ops.fcnfast, name)(*args)
        jit = _cupy.IMPLS[name](*args)
        for a, b in zip(*(([compiled], [jit]) if isinstance(compiled, torch.Tensor)
                          else (compiled, jit))):
            if a.dtype == torch.int64:
                assert (a != b).float().mean().item() < 1e-3, name  # near-ties only
            else:
                _assert_close_to_oracle(b, a.double().cpu(), a.dtype, name)


@needs_cuda
def test_cupy_backend_suite():
    """Rerun this file with FCNFAST_CUDA_BACKEND=cupy (the JIT path for CPU-only wheels)."""
    if _cupy.requested() == "cupy":
        pytest.skip("already running with the CuPy backend")
    if not _cupy.available():
        pytest.skip("CuPy is not installed")
    env = dict(os.environ, FCNFAST_CUDA_BACKEND="cupy")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           __file__, "-k", "not cupy_backend_suite"],
                          env=env, cwd=os.path.dirname(__file__), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------------------
# no GPU needed: the sources the CuPy backend compiles
# ---------------------------------------------------------------------------

def _kernels_in(root, filename, seen=None):
    """__global__ kernels defined in a source and the csrc headers it includes."""
    seen = set() if seen is None else seen
    path = os.path.join(root, filename)
    if path in seen or not os.path.isfile(path):
        return set()
    seen.add(path)
    text = open(path).read()
    names = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", text))
    for inc in re.findall(r'#include\s+"([^"]+)"', text):
        names |= _kernels_in(root, inc, seen)
    return names


def test_cuda_sources_list_their_kernels():
    root = _cupy.source_dir()
    assert root is not None, "csrc/ (or fcnfast/_csrc) with the CUDA sources not found"
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(root, "cuda", "*.cu"))}
    assert on_disk == set(_cupy.KERNELS), "fcnfast/_cupy.py KERNELS is out of date"
    for filename, kernels in _cupy.KERNELS.items():
        # every kernel the file defines is launchable, and every listed kernel is compiled
        own = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(",
                             _cupy.read_source(filename, root)))
        assert own <= set(kernels) <= _kernels_in(root, os.path.join("cuda", filename)), filename
    # the CuPy backend implements every op the compiled CUDA binding registers
    bindings = os.path.join(root, "cuda", "bindings_cuda.cpp")
    if os.path.isfile(bindings):  # source checkout (wheels ship no .cpp)
        registered = set(re.findall(r'm\.impl\("(\w+)"', open(bindings).read()))
        assert set(_cupy.IMPLS) == registered and len(registered) == 11


def _load_nvrtc():
    candidates = []
    for entry in sys.path:
        candidates += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib", "libnvrtc.so*")))
    candidates += ["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"]
    for path in candidates:
        if "builtins" in path or "alt" in os.path.basename(path):
            continue
        try:
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so*")):
                if "alt" not in os.path.basename(builtins):
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _nvrtc_compile(lib, source, name, options, name_expressions):
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None,
                                  None) == 0
    try:
        for expr in name_expressions:
            assert lib.nvrtcAddNameExpression(prog, expr.encode()) == 0
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if rc == 0:
            for expr in name_expressions:
                ptr = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, expr.encode(), ctypes.byref(ptr)) == 0
                lowered[expr] = ptr.value.decode()
        return rc, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def test_sources_compile_with_nvrtc():
    """The exact source, options and name expressions the CuPy backend uses compile with
    NVRTC, warning-free, for every dtype (no GPU needed, only libnvrtc)."""
    lib = _load_nvrtc()
    include = _cupy.cuda_include_dir()
    if lib is None or include is None:
        pytest.skip("libnvrtc or the CUDA headers (cuda_fp16.h) not found")
    root = _cupy.source_dir()
    options = list(_cupy.compile_options(root)) + ["-I" + include, "-arch=compute_80"]
    for filename, kernels in _cupy.KERNELS.items():
        # all dtypes in one program (CuPy compiles one per dtype; the instantiations are
        # independent)
        exprs = [_cupy.name_expression(k, dt) for k in kernels for dt in _cupy.TYPE_NAMES]
        rc, log, lowered = _nvrtc_compile(lib, _cupy.read_source(filename, root), filename,
                                          options, exprs)
        assert rc == 0, "%s:\n%s" % (filename, log)
        assert "warning" not in log, "%s:\n%s" % (filename, log)
        assert set(lowered) == set(exprs) and all(v.startswith("_Z") for v in lowered.values())


def _kernel_params(kernel, filename):
    """Parameter kinds of a kernel as declared in its source: ptr, acc, i64 or i32."""
    root = _cupy.source_dir()
    text = _cupy.read_source(filename, root) + open(os.path.join(root, "cuda",
                                                                 "kernel_utils.cuh")).read()
    for name, body in re.findall(r"#define (\w+)\s*((?:[^\n]*\\\n)*[^\n]*)", text):
        text = text.replace(name, body.replace("\\\n", " ")) if name.endswith("_PARAMS") else text
    match = re.search(r"__global__\s+void\s+%s\s*\(([^)]*)\)" % kernel, text)
    assert match, kernel
    kinds = []
    for param in match.group(1).split(","):
        if "*" in param:
            kinds.append("ptr")
        elif "AccOf<T>::type" in param:
            kinds.append("acc")
        elif "int64_t" in param:
            kinds.append("i64")
        else:
            assert re.match(r"\s*int\s+\w+\s*$", param), param
            kinds.append("i32")
    return kinds


def _cupy_calls():
    x, w, b = torch.randn(2, 6, 5, 7), torch.randn(6, 2, 3, 4), torch.randn(6)
    geom = ([3, 2], [1, 2], [1, 0], 3, [2, 1], [1, 2, 11, 9])
    u, crop = torch.randn(2, 3, 4, 5), [3, 2, 12, 14]
    skip, feature, ws = torch.randn(2, 3, 9, 9), torch.randn(2, 7, 9, 9), torch.randn(3, 7, 1, 1)
    target = torch.randint(0, 3, (2, 12, 14))
    target[0, 0] = 255
    mask = [True, True, True]
    return [
        ("conv_transpose2d", (x, w, b) + geom),
        ("conv_transpose2d_backward", (torch.randn(2, 6, 11, 9), x, w) + geom + (mask,)),
        ("bilinear_upsample2d", (u, 4, crop)),
        ("bilinear_upsample2d_backward", (torch.randn(2, 3, 12, 14), 4, 5, 4, crop)),
        ("skip_add_crop", (u, skip, [2, 3])),
        ("skip_add_crop_backward", (u, 9, 9, [2, 3])),
        ("score_skip", (u, feature, ws, torch.randn(3), 0.5, [2, 3])),
        ("score_skip_backward", (u, feature, ws, 0.5, [2, 3], mask)),
        ("upsample_argmax", (u, 4, crop)),
        ("upsample_cross_entropy", (u, target, 4, crop, 255, "mean")),
        ("upsample_cross_entropy_backward", (torch.ones(()), u, target, 4, crop, 255, "sum")),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_cupy_launch_arguments_match_kernel_signatures(dtype, monkeypatch):
    """Run every CuPy op implementation on the CPU with the launch replaced by a recorder:
    each launch names a kernel its file compiles, and passes exactly the parameters the kernel
    declares, with the matching scalar types (a mismatch would be silent garbage on the GPU)."""
    np = pytest.importorskip("numpy")
    launches = []
    monkeypatch.setattr(_cupy, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_cupy, "_device", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(_cupy, "_launch", lambda *a: launches.append(a))
    acc = np.float64 if dtype == torch.float64 else np.float32
    expected_type = {"ptr": np.uint64, "acc": acc, "i64": np.int64, "i32": np.int32}
    launched = set()
    for op, args in _cupy_calls():
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args)
        del launches[:]
        _cupy.IMPLS[op](*args)
        assert launches, op
        for filename, kernel, kdtype, device, grid, kargs in launches:
            assert kernel in _cupy.KERNELS[filename] and kdtype == dtype, (op, kernel)
            assert isinstance(grid, int) and grid >= 1, (op, kernel, grid)
            kinds = _kernel_params(kernel, filename)
            assert len(kargs) == len(kinds), (op, kernel, len(kargs), kinds)
            for i, (arg, kind) in enumerate(zip(kargs, kinds)):
                assert type(arg) is expected_type[kind], (op, kernel, i, type(arg), kind)
            launched.add(kernel)
    every = {k for kernels in _cupy.KERNELS.values() for k in kernels}
    assert launched == every


def test_build_py_ships_cuda_sources(tmp_path):
    """``setup.py build_py`` copies the .cu sources and headers into fcnfast/_csrc."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(repo, "setup.py")):
        pytest.skip("not running from a source checkout")
    env = dict(os.environ, FCNFAST_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib",
                           str(tmp_path)], cwd=repo, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = tmp_path / "fcnfast" / "_csrc"
    for filename in _cupy.KERNELS:
        assert (shipped / "cuda" / filename).is_file(), filename
    for header in ("cuda/kernel_utils.cuh", "cuda/launchers.h", "common/geometry.h"):
        assert (shipped / header).is_file(), header
    assert (tmp_path / "fcnfast" / "_cupy.py").is_file()


def test_backend_reports_per_device():
    assert fcnfast.backend("cpu") == fcnfast.backend()
    cuda_backend = fcnfast.backend("cuda")
    assert cuda_backend in ("native", "cupy", "reference")
    if fcnfast.backend() == "reference":
        assert cuda_backend == "reference"
    elif not HAS_CUDA and not fcnfast.build_info()["compiled_cuda"]:
        assert cuda_backend == "reference"
    with fcnfast.use_backend("reference"):
        assert fcnfast.backend("cuda") == "reference"


def test_no_cuda_kernels_warns_once():
    """Extension without CUDA kernels and no CuPy: CUDA tensors get the reference, one warning."""
    if fcnfast.backend() != "native" or fcnfast.build_info()["compiled_cuda"] or _cupy.available():
        pytest.skip("only for a CPU-only build without CuPy")
    code = ("import warnings, fcnfast\n"
            "from fcnfast import _backend\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    found = [_backend.has_kernel('skip_add_crop', 'cuda') for _ in range(3)]\n"
            "print(found, fcnfast.backend('cuda'), "
            "sum('CUDA tensors run the pure-PyTorch reference' in str(x.message) for x in w))\n")
    env = dict(os.environ)
    env.pop("FCNFAST_CUDA_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[False,", "False,", "False]", "reference", "1"], out.stdout


def test_bad_cuda_backend_env_is_clear():
    env = dict(os.environ, FCNFAST_CUDA_BACKEND="fast")
    env.pop("FCNFAST_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", "import fcnfast; fcnfast.backend('cuda')"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "FCNFAST_CUDA_BACKEND must be one of" in out.stderr


@needs_cuda
@pytest.mark.parametrize("call", [
    # 1 * 1 * 2^40 * 2^40 wraps to 0 in int64: the product must be checked without overflow
    lambda: ops.skip_add_crop_backward(torch.zeros(1, 1, 2, 2, device="cuda"), 2 ** 40, 2 ** 40,
                                       (0, 0)),
    lambda: torch.ops.fcnfast.bilinear_upsample2d_backward(
        torch.zeros(1, 1, 4, 4, device="cuda"), 2 ** 40, 2 ** 40, 2, [0, 0, 4, 4]),
], ids=["skip_add_crop_backward", "bilinear_upsample2d_backward"])
def test_huge_argument_sizes_are_refused_not_wrapped(call):
    """Sizes from arguments multiply past int64 before the 32-bit check (issue 17, item 4)."""
    _require_cuda_kernel("skip_add_crop_backward")
    with pytest.raises(ValueError, match="32-bit indexing"):
        call()
