"""score_skip (1x1 score conv on the kept window + add): native CPU kernels vs fcnfast.reference.

The fp32 window GEMM has two CPU paths: fcnfast's AVX-512 kernel (where the CPU has
AVX-512F) and ATen's convolution (FCNFAST_NO_AVX512=1); the `gemm` fixture runs the
forward tests on both, and on "cuda" (the CUDA kernels, where a CUDA device is present;
the CPU reference is the oracle).
"""

import pytest
import torch
from conftest import (
    assert_close_scaled,
    assert_output_mask,
    compare_forward_backward,
    leaves_on,
    require_native,
    variant_device,
    with_cuda,
)
from op_cases import oracle_tests

import fcnfast
from fcnfast import ops, reference

OP = "score_skip"

SHAPES = [
    # (N, C, K, H, W, FH, FW, oy, ox, scale)
    (1, 64, 21, 34, 34, 44, 44, 5, 5, 1.0),  # FCN score_pool4 (channels reduced), crop 5
    (1, 32, 21, 70, 70, 88, 88, 9, 9, 1e-4),  # score_pool3 crop 9, at-once scaling
    (2, 16, 59, 9, 7, 12, 11, 2, 3, 0.01),  # odd sizes, more classes than channels
    (3, 5, 3, 4, 4, 4, 4, 0, 0, 2.0),  # window = whole feature
    (0, 4, 3, 3, 3, 5, 5, 1, 2, 1.0),  # empty batch
    (2, 3, 2, 1, 1, 9, 9, 8, 8, 1.0),  # 1 pixel in the corner
    (2, 3, 2, 0, 4, 9, 9, 9, 1, 1.0),  # 0-row window at the bottom edge
    (2, 7, 25, 5, 13, 6, 15, 1, 1, 0.5),  # K = 2 * 12 + 1 rows, 65 pixels: 1-lane tail
    (1, 9, 12, 4, 8, 4, 8, 0, 0, 1.0),  # exactly one 12-row, 32-pixel block
    (2, 5, 13, 19, 7, 23, 10, 3, 2, 0.5),  # 133 pixels: a 128-pixel panel + 5, rows of 7
]


@pytest.fixture(params=with_cuda("avx512", "aten"))
def gemm(request, monkeypatch):
    if request.param != "cuda":
        monkeypatch.setenv("FCNFAST_NO_AVX512", "1" if request.param == "aten" else "0")
    return request.param


def _make(shape, dtype=torch.float32, bias=True):
    n, c, k, h, w, fh, fw, oy, ox, scale = shape
    coarse = torch.randn(n, k, h, w, dtype=dtype, requires_grad=True)
    feature = torch.randn(n, c, fh, fw, dtype=dtype, requires_grad=True)
    weight = (torch.randn(k, c, 1, 1, dtype=dtype) / c**0.5).requires_grad_()
    b = torch.randn(k, dtype=dtype, requires_grad=True) if bias else None
    return coarse, feature, weight, b, scale, (oy, ox)


def _compare(coarse, feature, weight, b, scale, offset, device="cpu"):
    if b is None:

        def call(impl):
            return lambda c, f, w: impl.score_skip(c, f, w, None, scale, offset)

        return compare_forward_backward(
            call(ops), call(reference), [coarse, feature, weight], device=device
        )

    def call(impl):
        return lambda c, f, w, b_: impl.score_skip(c, f, w, b_, scale, offset)

    return compare_forward_backward(
        call(ops), call(reference), [coarse, feature, weight, b], device=device
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(i) for i in range(len(SHAPES))])
def test_matches_reference(shape, dtype, gemm):
    require_native(OP, variant_device(gemm))
    _compare(*_make(shape, dtype, bias=shape[0] != 1), device=variant_device(gemm))


@pytest.mark.parametrize("classes", [21, 150])
def test_fcn_pool4_full_channels(classes, gemm):
    """The real FCN-8s score_pool4 shape: 512 channels, 21 classes."""
    require_native(OP, variant_device(gemm))
    _compare(*_make((1, 512, classes, 34, 34, 44, 44, 5, 5, 1.0)), device=variant_device(gemm))


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]])
def test_bfloat16(shape, gemm):
    device = variant_device(gemm)
    require_native(OP, device)
    coarse, feature, weight, b, scale, offset = _make(shape, torch.bfloat16)
    on_device = leaves_on(device, coarse, feature, weight, b)
    out = ops.score_skip(*on_device, scale, offset)
    assert out.dtype == torch.bfloat16 and out.device.type == device
    args32 = [t.detach().float().requires_grad_() for t in (coarse, feature, weight, b)]
    ref = reference.score_skip(*args32, scale, offset)
    assert_close_scaled(out.float().cpu(), ref, dtype=torch.bfloat16)
    grad = torch.randn(out.shape, dtype=torch.bfloat16)
    grads = torch.autograd.grad(out, on_device, grad.to(device))
    grads_ref = torch.autograd.grad(ref, args32, grad.float())
    for name, gn, gr in zip(("coarse", "feature", "weight", "bias"), grads, grads_ref):
        assert gn.dtype == torch.bfloat16
        assert_close_scaled(gn.float().cpu(), gr, dtype=torch.bfloat16, what="grad " + name)


def test_channels_last_and_noncontiguous(device):
    require_native(OP, device)
    coarse = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last).requires_grad_()
    feature = torch.randn(2, 7, 9, 20)[..., ::2].requires_grad_()
    weight = torch.randn(7, 4, 1, 1).transpose(0, 1).requires_grad_()
    b = torch.randn(8)[::2].requires_grad_()
    assert not feature.is_contiguous() and not weight.is_contiguous() and not b.is_contiguous()
    _compare(coarse, feature, weight, b, 0.5, (3, 2), device)


@pytest.mark.parametrize(
    "mask",
    [(True, False, False), (False, True, False), (False, False, True), (False, False, False)],
)
def test_backward_output_mask(mask, device):
    require_native(OP, device)
    coarse, feature, weight, b, scale, offset = _make(SHAPES[2], torch.float64)
    out = reference.score_skip(coarse, feature, weight, b, scale, offset)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (feature, weight, b), grad)
    got = torch.ops.fcnfast.score_skip_backward(
        grad.to(device),
        feature.detach().to(device),
        weight.detach().to(device),
        scale,
        list(offset),
        list(mask),
    )
    assert_output_mask(mask, got, expected)


def test_gradcheck_fp64(device):
    require_native(OP, device)
    coarse, feature, weight, b, scale, offset = _make(
        (2, 3, 2, 3, 4, 5, 6, 1, 2, 0.5), torch.float64
    )
    assert torch.autograd.gradcheck(
        lambda c, f, w, b_: ops.score_skip(c, f, w, b_, scale, offset),
        tuple(leaves_on(device, coarse, feature, weight, b)),
    )


def test_opcheck(device):
    require_native(OP, device)
    coarse, feature, weight, b, scale, offset = _make((2, 3, 2, 3, 4, 5, 6, 1, 2, 0.5))
    coarse, feature, weight, b = leaves_on(device, coarse, feature, weight, b)
    torch.library.opcheck(
        torch.ops.fcnfast.score_skip.default, (coarse, feature, weight, b, scale, list(offset))
    )
    torch.library.opcheck(
        torch.ops.fcnfast.score_skip.default, (coarse, feature, weight, None, scale, list(offset))
    )
    grad = torch.randn(coarse.shape, device=device)
    for mask in ([True, True, True], [True, False, True]):
        torch.library.opcheck(
            torch.ops.fcnfast.score_skip_backward.default,
            (grad, feature.detach(), weight.detach(), scale, list(offset), mask),
        )


def test_compile_fullgraph():
    require_native(OP)
    coarse, feature, weight, b, scale, offset = _make((1, 3, 2, 3, 4, 5, 6, 1, 2, 0.5))
    fn = torch.compile(
        lambda *a: fcnfast.score_skip(*a, scale=scale, offset=offset), fullgraph=True
    )
    with torch.no_grad():
        torch.testing.assert_close(
            fn(coarse, feature, weight, b),
            reference.score_skip(coarse, feature, weight, b, scale, offset),
        )


def test_backward_is_deterministic(device):
    require_native(OP, device)
    coarse, feature, weight, b, scale, offset = _make((2, 64, 21, 34, 34, 44, 44, 5, 5, 1.0))
    coarse, feature, weight, b = leaves_on(device, coarse, feature, weight, b)
    grads = []
    for _ in range(2):
        out = ops.score_skip(coarse, feature, weight, b, scale, offset)
        grads.append(torch.autograd.grad(out, (coarse, feature, weight, b), torch.ones_like(out)))
    assert all(torch.equal(a, c) for a, c in zip(*grads))


globals().update(oracle_tests(OP))  # ORACLE_CASES on every device (formerly test_cuda.py)


ERRORS = [
    (dict(offset=(-1, 0)), "offset"),
    (dict(offset=(0, 5)), "offset .* lies outside feature"),
    (dict(feature=torch.randn(1, 5, 8, 8)), r"weight.shape\[1\] \(4\) must equal feature channels"),
    (dict(feature=torch.randn(2, 4, 8, 8)), r"channels \(weight.shape\[0\]\)"),
    (dict(coarse=torch.randn(1, 2, 4, 4)), r"channels \(weight.shape\[0\]\)"),
    (dict(feature=torch.randn(1, 4, 8, 8, dtype=torch.float64)), "dtype"),
    (dict(weight=torch.randn(3, 4, 1, 1, dtype=torch.float64)), "dtype"),
    (dict(weight=torch.randn(3, 4, 3, 3)), r"1x1 convolution weight"),
    (dict(feature=torch.randn(8, 8)), "feature must be a 4-D"),
    (dict(weight=torch.randn(3, 4)), "weight must be a 4-D"),
    (dict(coarse=torch.randint(0, 3, (1, 3, 4, 4))), "coarse must be a floating"),
    (dict(bias=torch.randn(4)), "bias has 4 elements"),
    (dict(bias=torch.randn(3, dtype=torch.float64)), "dtype"),
]


@pytest.mark.parametrize("impl", ["ops", "reference", "native"])
@pytest.mark.parametrize("kwargs,match", ERRORS, ids=[m for _, m in ERRORS])
def test_errors(impl, kwargs, match):
    """Same rejection from the Python wrapper, the reference and the C++ op called directly."""
    if impl == "native":
        require_native(OP)
    args = dict(
        coarse=torch.randn(1, 3, 4, 4),
        feature=torch.randn(1, 4, 8, 8),
        weight=torch.randn(3, 4, 1, 1),
        bias=torch.randn(3),
        offset=(1, 1),
    )
    args.update(kwargs)
    if impl == "native":
        fn = lambda c, f, w, b, o: torch.ops.fcnfast.score_skip(c, f, w, b, 1.0, list(o))  # noqa: E731
    else:
        mod = ops if impl == "ops" else reference
        fn = lambda c, f, w, b, o: mod.score_skip(c, f, w, b, 1.0, o)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        fn(args["coarse"], args["feature"], args["weight"], args["bias"], args["offset"])


def test_backward_errors():
    require_native(OP)
    feature, weight = torch.randn(1, 4, 8, 8), torch.randn(3, 4, 1, 1)
    with pytest.raises(ValueError, match=r"channels \(weight.shape\[0\]\)"):
        torch.ops.fcnfast.score_skip_backward(
            torch.randn(1, 2, 4, 4), feature, weight, 1.0, [1, 1], [True, True, True]
        )
    with pytest.raises(ValueError, match="offset"):
        torch.ops.fcnfast.score_skip_backward(
            torch.randn(1, 3, 4, 4), feature, weight, 1.0, [5, 1], [True, True, True]
        )
