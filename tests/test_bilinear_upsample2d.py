import pytest
import torch
from conftest import assert_close_scaled, compare_forward_backward, require_native
from op_cases import UPSAMPLE_ERRORS, check_upsample_error, oracle_tests

import fcnfast
from fcnfast import ops, reference

OP = "bilinear_upsample2d"

# (N, C, H, W, scale, crop); the first three are the FCN heads' geometry (DESIGN.md:
# FCN-32s k64 s32 crop 19, FCN-16s k32 s16 crop 27, FCN-8s k16 s8 crop 31) on small maps
SHAPES = [
    (1, 3, 4, 4, 32, (19, 19, 100, 100)),
    (2, 4, 6, 5, 16, (27, 27, 60, 50)),
    (1, 5, 9, 8, 8, (31, 31, 40, 35)),
    (3, 2, 5, 7, 2, None),  # FCN upscore2 (k4 s2, no crop)
    (2, 3, 4, 6, 3, (1, 2, 10, 13)),  # odd scale
    (1, 2, 7, 3, 1, None),  # scale 1: k2 s1
    (1, 2, 3, 5, 8, (24, 40, 8, 8)),  # bottom-right corner of the full output
    (1, 2, 3, 5, 8, (0, 0, 5, 3)),  # top-left border (one tap only)
    (2, 3, 2, 2, 4, (5, 7, 1, 1)),  # one pixel
    (1, 2, 3, 3, 4, (3, 2, 0, 7)),  # zero-size crop
    (0, 3, 4, 4, 2, None),  # empty batch
    (2, 1, 1, 1, 5, None),  # 1x1 input
]


def _fwd(scale, crop):
    return (
        lambda x: ops.bilinear_upsample2d(x, scale, crop),
        lambda x: reference.bilinear_upsample2d(x, scale, crop),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    require_native(OP, device)
    n, c, h, w, scale, crop = shape
    x = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    compare_forward_backward(*_fwd(scale, crop), [x], device=device)


def test_fcn8s_head_full_size(device):
    """The FCN-8s 500x500 head: 21 classes, 70x70 scores, x8, crop 31."""
    require_native(OP, device)
    x = torch.randn(1, 21, 70, 70, requires_grad=True)
    compare_forward_backward(*_fwd(8, (31, 31, 500, 500)), [x], device=device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4], SHAPES[6]])
def test_reduced_precision_vs_fp32_reference(shape, dtype, device):
    """bf16/fp16 in and out, fp32 arithmetic inside: compared with the fp32 reference."""
    require_native(OP, device)
    n, c, h, w, scale, crop = shape
    x = torch.randn(n, c, h, w).to(dtype)
    out = ops.bilinear_upsample2d(x.to(device), scale, crop)
    assert out.dtype == dtype and out.device.type == device
    expected = reference.bilinear_upsample2d(x.float(), scale, crop)
    assert_close_scaled(out.float().cpu(), expected, dtype=dtype)
    grad = torch.randn(expected.shape)
    gx = torch.ops.fcnfast.bilinear_upsample2d_backward(
        grad.to(dtype).to(device), h, w, scale, list(crop or (0, 0, *expected.shape[2:]))
    )
    xf = x.float().requires_grad_()
    (gref,) = torch.autograd.grad(reference.bilinear_upsample2d(xf, scale, crop), xf, grad)
    assert gx.dtype == dtype
    assert_close_scaled(gx.float().cpu(), gref, dtype=dtype, what="grad")


def test_channels_last_and_noncontiguous(device):
    require_native(OP, device)
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    compare_forward_backward(*_fwd(4, (3, 2, 20, 25)), [x], device=device)
    y = torch.randn(2, 6, 12, 7)[:, ::2, ::2].requires_grad_()
    assert not y.is_contiguous()
    compare_forward_backward(*_fwd(3, None), [y], device=device)


def test_nan_and_inf_propagate_like_reference(device):
    require_native(OP, device)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    x[0, 0, 2, 2] = float("nan")
    x[0, 1, 0, 3] = float("inf")
    x[0, 2, 4, 4] = float("inf")
    x[0, 2, 4, 5] = float("-inf")  # inf - inf -> NaN where their windows overlap
    for scale, crop in [(4, None), (2, (1, 3, 9, 8))]:
        assert_close_scaled(
            ops.bilinear_upsample2d(x.to(device), scale, crop).cpu(),
            reference.bilinear_upsample2d(x, scale, crop),
        )


def test_gradcheck_fp64(device):
    require_native(OP, device)
    for shape, scale, crop in [((2, 2, 3, 4), 2, (1, 1, 5, 7)), ((1, 1, 2, 3), 3, None)]:
        x = torch.randn(*shape, dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda t, scale=scale, crop=crop: ops.bilinear_upsample2d(t, scale, crop), (x,)
        )


def test_opcheck(device):
    require_native(OP, device)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fcnfast.bilinear_upsample2d.default, (x, 3, [2, 1, 9, 11]))
    grad = torch.randn(2, 3, 9, 11, device=device)
    torch.library.opcheck(
        torch.ops.fcnfast.bilinear_upsample2d_backward.default, (grad, 4, 5, 3, [2, 1, 9, 11])
    )
    # 4 channels, x4, crop (3, 3, 17, 20) (formerly test_cuda.test_opcheck_cuda)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fcnfast.bilinear_upsample2d.default, (x, 4, [3, 3, 17, 20]))


globals().update(oracle_tests(OP))  # ORACLE_CASES on every device (formerly test_cuda.py)


def test_compile_fullgraph():
    require_native(OP)
    x = torch.randn(1, 2, 3, 3)
    fn = torch.compile(lambda t: fcnfast.bilinear_upsample2d(t, 4, (1, 2, 10, 9)), fullgraph=True)
    torch.testing.assert_close(fn(x), reference.bilinear_upsample2d(x, 4, (1, 2, 10, 9)))


def test_backward_is_deterministic_across_threads():
    require_native(OP)
    x = torch.randn(2, 21, 12, 12, requires_grad=True)
    grad = torch.randn(2, 21, 80, 81)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            out = ops.bilinear_upsample2d(x, 8, (7, 9, 80, 81))
            grads.append(torch.autograd.grad(out, x, grad)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("impl", [ops, reference])
@pytest.mark.parametrize(
    "kwargs,match",
    UPSAMPLE_ERRORS[:1]
    + [
        (dict(scale=-2), "scale must be a positive int"),
        (dict(scale=1.5), "scale must be a positive int"),
    ]
    + UPSAMPLE_ERRORS[1:2]
    + [
        (dict(crop=(-1, 0, 2, 2)), "lies outside the full output"),
        (dict(crop=(0, 0, 2)), "crop must be"),
    ]
    + UPSAMPLE_ERRORS[2:],
)
def test_errors(impl, kwargs, match):
    check_upsample_error(impl.bilinear_upsample2d, kwargs, match)


def test_native_checks_direct_call():
    """The C++ side validates too (torch.ops called directly, bypassing Python checks)."""
    require_native(OP)
    f, b = torch.ops.fcnfast.bilinear_upsample2d, torch.ops.fcnfast.bilinear_upsample2d_backward
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="scale must be a positive int, got 0"):
        f(x, 0, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="crop .* lies outside the full output of size 20x20"):
        f(x, 4, [0, 0, 21, 1])
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        f(torch.randn(3, 4, 4), 4, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        f(torch.ones(1, 3, 4, 4, dtype=torch.int32), 4, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="32-bit indexing"):
        f(x, 2**30, [0, 0, 1, 1])
    with pytest.raises(ValueError, match="does not match the crop 3x2"):
        b(torch.randn(1, 3, 2, 3), 4, 4, 4, [0, 0, 3, 2])
    with pytest.raises(ValueError, match="in_height and in_width must be non-negative"):
        b(torch.randn(1, 3, 2, 3), -1, 4, 4, [0, 0, 2, 3])
    with pytest.raises(ValueError, match="grad must be a 4-D tensor"):
        b(torch.randn(3, 2, 3), 4, 4, 4, [0, 0, 2, 3])
