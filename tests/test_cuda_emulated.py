"""The CUDA kernels run on the CPU, through the CuPy backend's launch code.

``tests/cuda_emulator/emulator.cpp`` compiles ``csrc/cuda/*.cu`` with the host
compiler (the kernel-only branch NVRTC compiles) and runs each launch block by
block with ``kBlock`` real threads, ``__syncthreads`` a barrier. Here the CuPy
backend (``fcnfast._cupy``) launches through it instead of CuPy, so the kernel
arithmetic, the launch arguments, the grid rules and the multi-kernel sequences
(cross-entropy passes, block reductions) are checked against the CPU ops
without a GPU. What it cannot check: GPU memory, streams, devices, NVCC code
generation and the compiled binding -- those are tests/test_cuda.py's.
Skipped without g++ or the CUDA headers (cuda_fp16.h).
"""
import contextlib
import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from fcnfast import _cupy

from conftest import TOLERANCE, require_native

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    include = _cupy.cuda_include_dir()
    root = _cupy.source_dir()
    source = os.path.join(HERE, "cuda_emulator", "emulator.cpp")
    if cxx is None or include is None or root is None or not os.path.isfile(source):
        pytest.skip("needs g++, the CUDA headers (cuda_fp16.h), the CUDA sources and "
                    "tests/cuda_emulator/emulator.cpp")
    lib = str(tmp_path_factory.mktemp("emu") / "emulator.so")
    proc = subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-I" + root,
                           "-isystem", include, source, "-o", lib], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(lib)


@pytest.fixture
def emulated_cupy(emulator, monkeypatch):
    """Route fcnfast._cupy's launches to the emulator (CPU tensors, host pointers)."""
    def launch(filename, kernel, dtype, device, grid, args):
        values = [ctypes.create_string_buffer(a.tobytes(), a.nbytes) for a in args]
        pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        rc = emulator.fcn_emu_launch(_cupy.name_expression(kernel, dtype).encode(), pointers,
                                     ctypes.c_uint(grid))
        assert rc == 0, "emulator has no kernel %s" % _cupy.name_expression(kernel, dtype)

    monkeypatch.setattr(_cupy, "_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(_cupy, "_device", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(_cupy, "_launch", launch)
    return _cupy.IMPLS


def _calls():
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x, w, b = randn(2, 6, 5, 7), randn(6, 2, 3, 4, scale=0.5), randn(6)
    geom = ([3, 2], [1, 2], [1, 0], 3, [2, 1], [1, 2, 11, 9])
    fcn = ([8, 8], [0, 0], [0, 0], 1, [1, 1], [5, 3, 30, 28])  # learned upscore8, cropped
    xs, ws = randn(1, 4, 4, 4), randn(4, 4, 16, 16, scale=0.1)
    u, crop = randn(2, 3, 4, 5), [3, 2, 12, 14]
    skip, feature, wsk = randn(2, 3, 9, 9), randn(2, 7, 9, 9), randn(3, 7, 1, 1)
    target = torch.randint(0, 3, (2, 12, 14), generator=g)
    target[0, :3] = 255
    mask = [True, True, True]
    return [
        ("conv_transpose2d", (x, w, b) + geom),
        ("conv_transpose2d_backward", (randn(2, 6, 11, 9), x, w) + geom + (mask,)),
        ("conv_transpose2d", (xs, ws, None) + fcn),
        ("conv_transpose2d_backward", (randn(1, 4, 30, 28), xs, ws) + fcn + (mask,)),
        ("conv_transpose2d_backward", (randn(2, 6, 11, 9), x, w) + geom + ([False, True, False],)),
        ("bilinear_upsample2d", (u, 4, crop)),
        ("bilinear_upsample2d_backward", (randn(2, 3, 12, 14), 4, 5, 4, crop)),
        ("skip_add_crop", (u, skip, [2, 3])),
        ("skip_add_crop_backward", (u, 9, 9, [2, 3])),
        ("score_skip", (u, feature, wsk, randn(3), 0.5, [2, 3])),
        ("score_skip", (u, feature, wsk, None, 1.0, [0, 0])),
        ("score_skip_backward", (u, feature, wsk, 0.5, [2, 3], mask)),
        ("upsample_argmax", (u, 4, crop)),
        ("upsample_cross_entropy", (u * 3, target, 4, crop, 255, "mean")),
        ("upsample_cross_entropy", (u * 3, target, 4, crop, 255, "sum")),
        ("upsample_cross_entropy_backward", (torch.tensor(0.7, dtype=torch.float64), u * 3,
                                             target, 4, crop, 255, "mean")),
        ("upsample_cross_entropy_backward", (torch.tensor(1.3, dtype=torch.float64), u * 3,
                                             target, 4, crop, 255, "sum")),
    ]


def _close(actual, expected, dtype, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel() == 0:
        return
    if expected.dtype == torch.int64:
        assert torch.equal(actual, expected), what
        return
    a, e = actual.double(), expected.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= TOLERANCE[dtype] * scale, "%s: max abs error %.3g (scale %.3g)" % (what, err,
                                                                                  scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64", "f16", "bf16"])
def test_emulated_kernels_match_cpu_ops(emulated_cupy, dtype):
    for i, (op, args) in enumerate(_calls()):
        require_native(op)
        args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        expected = getattr(torch.ops.fcnfast, op)(*args)
        got = emulated_cupy[op](*args)
        if isinstance(expected, torch.Tensor):
            expected, got = [expected], [got]
        for j, (e, a) in enumerate(zip(expected, got)):
            _close(a, e, dtype, "%s (call %d, output %d, %s)" % (op, i, j, dtype))
