"""Shared test helpers: native-vs-reference comparison with per-dtype tolerances."""

import os

import pytest
import torch

import fcnfast
from fcnfast import _backend, _cupy

# fp32: max abs error <= 1e-5 relative to the output scale; fp64: <= 1e-10 (DESIGN.md)
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-3,
}

# unit roundoff of the accumulator each dtype's kernels sum in (fp16/bf16 accumulate in fp32)
_ACC_EPS = {
    torch.float64: torch.finfo(torch.float64).eps,
    torch.float32: torch.finfo(torch.float32).eps,
    torch.bfloat16: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float32).eps,
}


def tolerance(dtype, terms=1):
    """Relative tolerance for an output whose elements each sum ``terms`` products.

    The rounding error of a sum grows with its length: as sqrt(terms) * eps for
    rounding errors of random sign (the probabilistic bound of Higham & Mary
    that PyTorch's own tests lean on when they scale atol with the reduction
    size). So the tolerance is the fixed TOLERANCE[dtype] or, for a long
    reduction, 2 * eps_acc * sqrt(terms), whichever is larger. For float32 the
    fixed 1e-5 holds up to ~1,700 terms; the upscore32 grad_x (20,480 terms)
    gets 3.4e-5 (its worst error over 20 seeds was 4.5e-6). Short reductions are
    held to exactly the old tolerance.
    """
    return max(TOLERANCE[dtype], 2.0 * _ACC_EPS[dtype] * max(1, terms) ** 0.5)


REFERENCE_ONLY = os.environ.get("FCNFAST_BACKEND", "").lower() == "reference"

# The smallest end-to-end CLI training run (``train``): one epoch on 2 + 1 synthetic
# 36-pixel images, 4 classes, batch 2, no progress output (test_cli_errors, test_cli_runs,
# test_images_io, test_tiling).
TINY_TRAIN_ARGS = (
    "--epochs",
    "1",
    "--train-images",
    "2",
    "--val-images",
    "1",
    "--image-size",
    "36",
    "--num-classes",
    "4",
    "--optimizer",
    "adam",
    "--batch-size",
    "2",
    "--quiet",
)

# ---------------------------------------------------------------------------
# devices: every op test takes the ``device`` fixture ("cpu" always, "cuda" where
# a CUDA device and CUDA kernels exist, else skipped with the reason)
# ---------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()


def _cuda_skip_reason():
    if not HAS_CUDA:
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not fcnfast.build_info().get("compiled_cuda") and not _cupy.available():
        return "no CUDA kernels: the extension was built without CUDA and CuPy is not installed"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
# the ``cuda`` marker (pyproject.toml) selects these: pytest -m cuda / -m "not cuda"
CUDA = pytest.param(
    "cuda",
    id="cuda",
    marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=str(CUDA_SKIP_REASON)),
    ],
)
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
ACCELERATORS = [CUDA]  # comparisons of a device with the CPU backend


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def with_cuda(*cpu_variants):
    """Params of a fixture that runs a test on each CPU variant of a kernel (selected by
    environment switches) and on "cuda"."""
    return list(cpu_variants) + [pytest.param("cuda", marks=CUDA.marks)]


def variant_device(variant: str) -> str:
    return "cuda" if variant == "cuda" else "cpu"


def leaves_on(device, *tensors):
    """Leaf copies on ``device`` (None stays None), requiring grad as the originals do."""
    return [
        None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)
        for t in tensors
    ]


def expected_cuda_backend() -> str:
    """The CUDA backend under test: the compiled kernels when the extension has them,
    else CuPy; ``FCNFAST_CUDA_BACKEND=cupy`` forces CuPy."""
    if _cupy.requested() == "cupy":
        return "cupy"
    return "native" if fcnfast.build_info().get("compiled_cuda") else "cupy"


def require_native(op: str, device: str = "cpu") -> None:
    """Fail (not skip) when the native kernel for ``op`` is missing: otherwise a
    native-vs-reference test would silently compare the reference with itself.
    On CUDA the backend must also be the expected one (compiled, else CuPy)."""
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    device = torch.device(device).type
    assert _backend.has_kernel(op, device), (
        "native kernel fcnfast::%s for %s is not available (backend=%s, build_info=%s)"
        % (op, device, fcnfast.backend(device), fcnfast.build_info())
    )
    if device == "cuda":
        assert fcnfast.backend("cuda") == expected_cuda_backend(), fcnfast.build_info()


def assert_close_scaled(actual, expected, dtype=None, what="output"):
    """max|actual - expected| <= tol * max(1, max|expected|)."""
    dtype = dtype or expected.dtype
    assert actual.shape == expected.shape, "%s shape %s != %s" % (
        what,
        actual.shape,
        expected.shape,
    )
    assert actual.dtype == expected.dtype, "%s dtype %s != %s" % (
        what,
        actual.dtype,
        expected.dtype,
    )
    if expected.numel() == 0:
        return
    a, e = actual.double(), expected.double()
    # NaN/Inf must appear in the same places
    assert torch.equal(torch.isnan(a), torch.isnan(e)), "%s NaN pattern differs" % what
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite].nan_to_num(0), e[~finite].nan_to_num(0)), "%s Inf differs" % what
    if finite.any():
        scale = max(1.0, e[finite].abs().max().item())
        err = (a[finite] - e[finite]).abs().max().item()
        assert err <= TOLERANCE[dtype] * scale, (
            "%s max abs error %.3g > %.3g (scale %.3g, dtype %s)"
            % (what, err, TOLERANCE[dtype] * scale, scale, dtype)
        )


def assert_output_mask(mask, got, expected):
    """A backward op's results for ``output_mask``: the entries not asked for are empty,
    the others (on any device) match ``expected``."""
    for wanted, g, e in zip(mask, got, expected):
        if wanted:
            assert_close_scaled(g.cpu(), e)
        else:
            assert g.numel() == 0


def copy_leaf(t, device="cpu"):
    """A leaf copy of ``t`` on ``device`` with the same strides (``clone``/``to`` would
    make a sliced view contiguous), requiring grad as ``t`` does. Overlapping
    (stride-0) tensors are copied contiguous."""
    if 0 in t.stride() and t.numel() > 1:
        out = t.detach().contiguous().to(device)
    else:
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
        out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def compare_forward_backward(native_fn, reference_fn, inputs, grad_seed=0, device="cpu"):
    """Run both functions on copies of ``inputs`` with the same memory layout (tensors
    requiring grad get a gradient), compare outputs and every input gradient.
    ``native_fn`` runs on ``device``, ``reference_fn`` (the oracle) on the CPU; the
    results are compared on the CPU."""

    def run(fn, dev):
        args = [copy_leaf(t, dev) if isinstance(t, torch.Tensor) else t for t in inputs]
        out = fn(*args)
        grads = []
        if out.requires_grad:
            g = torch.Generator().manual_seed(grad_seed)
            grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
            wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            grads = torch.autograd.grad(out, wrt, grad_out.to(out.device), allow_unused=True)
            grads = [None if g_ is None else g_.cpu() for g_ in grads]
        return out.detach().cpu(), grads

    out_n, grads_n = run(native_fn, device)
    out_r, grads_r = run(reference_fn, "cpu")
    assert_close_scaled(out_n, out_r, what="output")
    for i, (gn, gr) in enumerate(zip(grads_n, grads_r)):
        if gr is None:
            assert gn is None or not gn.any(), "grad %d: reference has none" % i
            continue
        assert gn is not None, "grad %d missing" % i
        assert_close_scaled(gn, gr, what="grad %d" % i)
    return out_n, out_r


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _conv_transpose_kernels_on_every_shape(monkeypatch):
    """conv_transpose2d's own CPU kernels on every shape: by default small float32
    deconvolutions at stride <= 2 go to ATen's (FCNFAST_CONV_TRANSPOSE_ATEN); the "aten" path
    of test_conv_transpose2d.py turns that route back on."""
    monkeypatch.setenv("FCNFAST_CONV_TRANSPOSE_ATEN", "0")
