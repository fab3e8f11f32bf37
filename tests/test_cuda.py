"""CUDA-specific concerns of the CUDA kernels (compiled extension or CuPy JIT).

The op semantics on CUDA (every op and gradient against ``fcnfast.reference`` run
on the CPU, all dtypes, FCN shapes, crops, edge sizes, gradcheck, opcheck) are
tested by the per-op files (``test_<op>.py``) through the ``device`` fixture
(conftest.py) and ``op_cases.ORACLE_CASES``. This file keeps what only CUDA has:
the layout independence of results in device memory, bitwise determinism (also
under ``torch.use_deterministic_algorithms(True)``), a non-default stream, the
device guard (a second GPU), CPU/CUDA mixes, 32-bit index checks of sizes
given as arguments, and the backend selection.

The GPU tests are marked ``cuda`` and skipped without a CUDA device. The CUDA
backend under test is the compiled one when the extension was built with CUDA,
else CuPy; ``FCNFAST_CUDA_BACKEND=cupy`` forces CuPy (``test_cupy_backend_suite``
reruns the CUDA tests of this file and of the per-op files that way in a subprocess).

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
from conftest import HAS_CUDA, require_native
from op_cases import ORACLE_CASES, assert_close_to_oracle, materialise, run_with_grads

import fcnfast
from fcnfast import _cupy, ops


def needs_cuda(fn):
    """A GPU test: marked ``cuda``, skipped (with the reason) where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(fn))


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DT_IDS = ["f32", "f64", "f16", "bf16"]

# the per-op test files: their ``device`` parametrisation runs every op comparison on CUDA
OP_TEST_FILES = ["test_%s.py" % op for op in ops.__all__]


def _require_cuda_kernel(op):
    require_native(op, "cuda")  # also: the CUDA backend is the expected one (compiled, else CuPy)


@needs_cuda
@pytest.mark.parametrize(
    "name", ["deconv-upscore8", "bilinear-s8-crop31", "skip-crop5", "score-pool4", "ce-s8-mean"]
)
def test_noncontiguous_inputs(name):
    """channels_last device memory gives bitwise the same output and gradients."""
    op, make, kwargs = ORACLE_CASES[name]
    _require_cuda_kernel(op)
    tensors = make()
    base = materialise(tensors, torch.float32, "cuda")
    strided = {}
    for k, v in base.items():
        if v is not None and v.is_floating_point() and v.dim() == 4:
            v = v.detach().to(memory_format=torch.channels_last).requires_grad_()
        strided[k] = v
    g = torch.randn(getattr(ops, op)(**base, **kwargs).shape, dtype=torch.float64)
    out_a, grads_a = run_with_grads(getattr(ops, op), base, kwargs, g)
    out_b, grads_b = run_with_grads(getattr(ops, op), strided, kwargs, g)
    assert torch.equal(out_a, out_b)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


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
        torch.randn(1, 2, 3, 3, device=g), torch.randn(1, 2, 5, 5, device=c), [1, 1]
    ),
    "score_skip": lambda c, g: torch.ops.fcnfast.score_skip(
        torch.randn(1, 2, 3, 3, device=g),
        torch.randn(1, 4, 5, 5, device=g),
        torch.randn(2, 4, 1, 1, device=c),
        None,
        1.0,
        [1, 1],
    ),
    "conv_transpose2d": lambda c, g: torch.ops.fcnfast.conv_transpose2d(
        torch.randn(1, 2, 3, 3, device=g),
        torch.randn(2, 2, 4, 4, device=c),
        None,
        [2, 2],
        [0, 0],
        [0, 0],
        1,
        [1, 1],
        [0, 0, 8, 8],
    ),
    "conv_transpose2d_bias": lambda c, g: torch.ops.fcnfast.conv_transpose2d(
        torch.randn(1, 2, 3, 3, device=g),
        torch.randn(2, 2, 4, 4, device=g),
        torch.randn(2, device=c),
        [2, 2],
        [0, 0],
        [0, 0],
        1,
        [1, 1],
        [0, 0, 8, 8],
    ),
    "upsample_cross_entropy": lambda c, g: torch.ops.fcnfast.upsample_cross_entropy(
        torch.randn(1, 2, 3, 3, device=g),
        torch.zeros(1, 8, 8, dtype=torch.int64, device=c),
        2,
        [0, 0, 8, 8],
        255,
        "mean",
    ),
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


# ---- upsample_cross_entropy's label check: on the device, reported by a later call ----

BAD_LABEL = (
    "target value 3 is out of bounds: classes are [0, 3) (x has 3 channels) and ignore_index is 255"
)


@pytest.fixture
def lazy_label_checks(monkeypatch):
    """The compiled CUDA kernels with their deferred label check (the default), nothing
    pending before or after the test."""
    _require_cuda_kernel("upsample_cross_entropy")
    if fcnfast.backend("cuda") != "native":
        pytest.skip("the deferred label check is the compiled CUDA kernels' (CuPy checks at once)")
    monkeypatch.delenv("FCNFAST_CUDA_SYNC_CHECKS", raising=False)
    with contextlib.suppress(ValueError):
        ops.check_pending_errors()
    yield
    with contextlib.suppress(ValueError):
        ops.check_pending_errors()


def _ce_call(bad, reduction="mean"):
    x = torch.randn(1, 3, 4, 4, device="cuda")
    target = torch.zeros(1, 20, 20, dtype=torch.int64, device="cuda")
    if bad:
        target[0, 5, 7] = 3
    return torch.ops.fcnfast.upsample_cross_entropy(x, target, 4, [0, 0, 20, 20], 255, reduction)


@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bad_label_is_nan_then_reported_by_a_later_call(lazy_label_checks, reduction):
    """No host sync in the call: a bad label gives a NaN loss (never a finite wrong one), and
    the next call on the device, once the check has completed, raises the ops' ValueError
    (with the flat index and a note); once only."""
    loss = _ce_call(bad=True, reduction=reduction)  # returns: no sync, no error yet
    torch.cuda.synchronize()  # the check has completed
    assert loss.isnan()
    with pytest.raises(ValueError) as info:
        _ce_call(bad=False)
    message = str(info.value)
    assert BAD_LABEL in message and "flat index %d" % (5 * 20 + 7) in message, message
    assert (
        "earlier upsample_cross_entropy call" in message and "FCNFAST_CUDA_SYNC_CHECKS" in message
    )
    assert _ce_call(bad=False).isfinite()  # reported once
    ops.check_pending_errors()  # nothing left


@needs_cuda
def test_bad_label_is_reported_by_the_backward(lazy_label_checks):
    _ce_call(bad=True)
    torch.cuda.synchronize()
    x = torch.randn(1, 3, 4, 4, device="cuda")
    target = torch.zeros(1, 20, 20, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="target value 3 is out of bounds"):
        torch.ops.fcnfast.upsample_cross_entropy_backward(
            torch.ones((), device="cuda"), x, target, 4, [0, 0, 20, 20], 255, "mean"
        )


@needs_cuda
def test_check_pending_errors_waits_and_raises(lazy_label_checks):
    ops.check_pending_errors()  # nothing pending: no error
    _ce_call(bad=False)
    ops.check_pending_errors()  # good labels: no error
    loss = _ce_call(bad=True)
    with pytest.raises(ValueError, match="target value 3 is out of bounds"):
        ops.check_pending_errors()  # waits: no synchronize needed
    assert loss.isnan()
    ops.check_pending_errors()  # reported once
    # a training step: raised by its backward (if the check completed by then) or here
    x = torch.randn(1, 3, 4, 4, device="cuda", requires_grad=True)
    target = torch.zeros(1, 20, 20, dtype=torch.int64, device="cuda")
    target[0, 5, 7] = -2
    with pytest.raises(ValueError, match="target value -2 is out of bounds"):
        ops.upsample_cross_entropy(x, target, 4).backward()
        ops.check_pending_errors()


@needs_cuda
def test_sync_checks_env_raises_in_the_call(lazy_label_checks, monkeypatch):
    """FCNFAST_CUDA_SYNC_CHECKS=1: the label check before the call returns (one host sync),
    the exact message of the other backends, nothing left pending; read on every call."""
    monkeypatch.setenv("FCNFAST_CUDA_SYNC_CHECKS", "1")
    with pytest.raises(ValueError) as info:
        _ce_call(bad=True)
    assert str(info.value).split("\nException raised from")[0].strip() == "fcnfast: " + BAD_LABEL
    ops.check_pending_errors()  # nothing pending
    assert _ce_call(bad=False).isfinite()
    monkeypatch.setenv("FCNFAST_CUDA_SYNC_CHECKS", "0")
    assert _ce_call(bad=True).isnan()  # deferred again
    with pytest.raises(ValueError, match="target value 3"):
        ops.check_pending_errors()
    monkeypatch.setenv("FCNFAST_CUDA_SYNC_CHECKS", "yes")
    with pytest.raises(ValueError, match="FCNFAST_CUDA_SYNC_CHECKS must be 0 or 1, got 'yes'"):
        _ce_call(bad=False)


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
        (
            "bilinear_upsample2d_backward",
            (torch.randn(1, 21, 500, 500, device="cuda"), 70, 70, 8, crop),
        ),
        ("skip_add_crop", (x, coarse, [9, 9])),
        ("upsample_argmax", (coarse, 8, crop)),
        ("upsample_cross_entropy", (coarse, target, 8, crop, 255, "mean")),
        (
            "upsample_cross_entropy_backward",
            (torch.ones((), device="cuda"), coarse, target, 8, crop, 255, "sum"),
        ),
        (
            "conv_transpose2d_backward",
            (
                torch.randn(1, 21, 128, 128, device="cuda"),
                x,
                w,
                [8, 8],
                [0, 0],
                [0, 0],
                1,
                [1, 1],
                [31, 31, 128, 128],
                [True, True, True],
            ),
        ),
    ]
    for name, args in calls:
        compiled = getattr(torch.ops.fcnfast, name)(*args)
        jit = _cupy.IMPLS[name](*args)
        for a, b in zip(
            *(([compiled], [jit]) if isinstance(compiled, torch.Tensor) else (compiled, jit))
        ):
            if a.dtype == torch.int64:
                assert (a != b).float().mean().item() < 1e-3, name  # near-ties only
            else:
                assert_close_to_oracle(b, a.double().cpu(), a.dtype, name)


@needs_cuda
def test_cupy_backend_suite():
    """Rerun the CUDA tests (this file's and the per-op files' cuda cases) with
    FCNFAST_CUDA_BACKEND=cupy (the JIT path for CPU-only wheels)."""
    if _cupy.requested() == "cupy":
        pytest.skip("already running with the CuPy backend")
    if not _cupy.available():
        pytest.skip("CuPy is not installed")
    here = os.path.dirname(os.path.abspath(__file__))
    files = [os.path.join(here, f) for f in OP_TEST_FILES]
    assert all(os.path.isfile(f) for f in files), files
    env = dict(os.environ, FCNFAST_CUDA_BACKEND="cupy")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-m",
            "cuda",
            __file__,
        ]
        + files
        + ["-k", "not cupy_backend_suite"],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
    )
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
        own = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", _cupy.read_source(filename, root)))
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
    assert (
        lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
        == 0
    )
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
        rc, log, lowered = _nvrtc_compile(
            lib, _cupy.read_source(filename, root), filename, options, exprs
        )
        assert rc == 0, "%s:\n%s" % (filename, log)
        assert "warning" not in log, "%s:\n%s" % (filename, log)
        assert set(lowered) == set(exprs) and all(v.startswith("_Z") for v in lowered.values())


def _kernel_params(kernel, filename):
    """Parameter kinds of a kernel as declared in its source: ptr, acc, i64 or i32."""
    root = _cupy.source_dir()
    text = (
        _cupy.read_source(filename, root)
        + open(os.path.join(root, "cuda", "kernel_utils.cuh")).read()
    )
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
        args = tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args
        )
        del launches[:]
        _cupy.IMPLS[op](*args)
        assert launches, op
        for filename, kernel, kdtype, _device, grid, kargs in launches:
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
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
    )
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
    code = (
        "import warnings, fcnfast\n"
        "from fcnfast import _backend\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    found = [_backend.has_kernel('skip_add_crop', 'cuda') for _ in range(3)]\n"
        "print(found, fcnfast.backend('cuda'), "
        "sum('CUDA tensors run the pure-PyTorch reference' in str(x.message) for x in w))\n"
    )
    env = dict(os.environ)
    env.pop("FCNFAST_CUDA_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[False,", "False,", "False]", "reference", "1"], out.stdout


def test_bad_cuda_backend_env_is_clear():
    env = dict(os.environ, FCNFAST_CUDA_BACKEND="fast")
    env.pop("FCNFAST_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", "import fcnfast; fcnfast.backend('cuda')"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "FCNFAST_CUDA_BACKEND must be one of" in out.stderr


@needs_cuda
@pytest.mark.parametrize(
    "call",
    [
        # 1 * 1 * 2^40 * 2^40 wraps to 0 in int64: the product must be checked without overflow
        lambda: torch.ops.fcnfast.skip_add_crop_backward(
            torch.zeros(1, 1, 2, 2, device="cuda"), 2**40, 2**40, [0, 0]
        ),
        lambda: torch.ops.fcnfast.bilinear_upsample2d_backward(
            torch.zeros(1, 1, 4, 4, device="cuda"), 2**40, 2**40, 2, [0, 0, 4, 4]
        ),
    ],
    ids=["skip_add_crop_backward", "bilinear_upsample2d_backward"],
)
def test_huge_argument_sizes_are_refused_not_wrapped(call):
    """Sizes from arguments multiply past int64 before the 32-bit check (issue 17, item 4)."""
    _require_cuda_kernel("skip_add_crop_backward")
    with pytest.raises(ValueError, match="32-bit indexing"):
        call()
