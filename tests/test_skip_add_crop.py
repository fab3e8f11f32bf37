import pytest
import torch
from conftest import compare_forward_backward, require_native
from op_cases import oracle_tests

import fcnfast
from fcnfast import ops, reference

OP = "skip_add_crop"

SHAPES = [
    # (N, C, H, W, SH, SW, oy, ox)
    (1, 21, 34, 34, 44, 44, 5, 5),  # FCN-16s/8s score_pool4 crop 5
    (2, 21, 64, 64, 82, 82, 9, 9),  # score_pool3 crop 9
    (3, 3, 7, 5, 7, 5, 0, 0),  # window = whole skip
    (0, 4, 3, 3, 5, 5, 1, 2),  # empty batch
    (2, 1, 1, 1, 9, 9, 8, 8),  # 1 pixel in the corner
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, device):
    require_native(OP, device)
    n, c, h, w, sh, sw, oy, ox = shape
    coarse = torch.randn(n, c, h, w, dtype=dtype, requires_grad=True)
    skip = torch.randn(n, c, sh, sw, dtype=dtype, requires_grad=True)
    compare_forward_backward(
        lambda a, b: ops.skip_add_crop(a, b, (oy, ox)),
        lambda a, b: reference.skip_add_crop(a, b, (oy, ox)),
        [coarse, skip],
        device=device,
    )


def test_channels_last_and_noncontiguous(device):
    require_native(OP, device)
    coarse = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    skip = torch.randn(2, 5, 12, 20)[..., ::2].requires_grad_()
    compare_forward_backward(
        lambda a, b: ops.skip_add_crop(a, b, (3, 1)),
        lambda a, b: reference.skip_add_crop(a, b, (3, 1)),
        [coarse, skip],
        device=device,
    )


def test_gradcheck_fp64(device):
    require_native(OP, device)
    coarse = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    skip = torch.randn(2, 3, 7, 8, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.skip_add_crop(a, b, (2, 1)), (coarse, skip))


def test_opcheck(device):
    require_native(OP, device)
    coarse = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    skip = torch.randn(2, 3, 7, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fcnfast.skip_add_crop.default, (coarse, skip, [2, 1]))
    grad = torch.randn(2, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.fcnfast.skip_add_crop_backward.default, (grad, 7, 8, [2, 1]))
    # a window of a grad-requiring skip, offset (1, 2) (formerly test_cuda.test_opcheck_cuda)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fcnfast.skip_add_crop.default, (x[:, :, :3, :3].contiguous(), x, [1, 2])
    )


globals().update(oracle_tests(OP))  # ORACLE_CASES on every device (formerly test_cuda.py)


def test_compile_fullgraph():
    require_native(OP)
    coarse, skip = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 6, 6)
    fn = torch.compile(lambda a, b: fcnfast.skip_add_crop(a, b, (1, 2)), fullgraph=True)
    torch.testing.assert_close(fn(coarse, skip), reference.skip_add_crop(coarse, skip, (1, 2)))


def test_backward_is_deterministic(device):
    require_native(OP, device)
    coarse = torch.randn(2, 21, 34, 34, device=device, requires_grad=True)
    skip = torch.randn(2, 21, 44, 44, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        out = ops.skip_add_crop(coarse, skip, (5, 5))
        grads.append(torch.autograd.grad(out, (coarse, skip), torch.ones_like(out)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("impl", [ops, reference])
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(offset=(-1, 0)), "offset"),
        (dict(offset=(0, 5)), "offset"),
        (dict(skip=torch.randn(1, 2, 8, 8)), "batch and channels"),
        (dict(skip=torch.randn(1, 3, 8, 8, dtype=torch.float64)), "dtype"),
        (dict(skip=torch.randn(8, 8)), "skip must be a 4-D"),
        (dict(coarse=torch.randint(0, 3, (1, 3, 4, 4))), "coarse must be a floating"),
    ],
)
def test_errors(impl, kwargs, match):
    args = dict(coarse=torch.randn(1, 3, 4, 4), skip=torch.randn(1, 3, 8, 8), offset=(1, 1))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        impl.skip_add_crop(args["coarse"], args["skip"], args["offset"])


def test_native_checks_direct_call():
    """The C++ side validates too (torch.ops called directly, bypassing Python checks)."""
    require_native(OP)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.fcnfast.skip_add_crop(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 5, 5), [2, 2])
