import functools
import math

import pytest
import torch
from conftest import assert_close_scaled, compare_forward_backward, require_native
from op_cases import oracle_tests, upsample_shapes

import fcnfast
from fcnfast import ops, reference

OP = "upsample_cross_entropy"

# (N, C, H, W, scale, crop)
SHAPES = upsample_shapes(
    # FCN-8s, FCN-32s, FCN-16s heads: (N, C, H, W, scale, out_h, out_w)
    heads=[(1, 21, 8, 8, 8, 30, 25), (2, 5, 3, 4, 32, 80, 100), (1, 6, 5, 4, 16, 50, 40)],
    bottom_right=(1, 3, 3, 3, 2, 2, 3),
    one_pixel=(2, 4, 4, 4, 4, (2, 3, 1, 1)),
)


def make_target(n, c, h, w, ignore_index=255, ignored_fraction=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignored_fraction] = ignore_index
    return target


def fns(target, scale, crop, ignore_index=255, reduction="mean"):
    """(native, reference) loss functions of x; the native one takes x's device for the
    target too."""
    return (
        lambda x: ops.upsample_cross_entropy(
            x, target.to(x.device), scale, crop, ignore_index, reduction
        ),
        lambda x: reference.upsample_cross_entropy(x, target, scale, crop, ignore_index, reduction),
    )


def crop_size(shape):
    n, c, h, w, scale, crop = shape
    return crop[2:] if crop else ((h + 1) * scale, (w + 1) * scale)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, reduction, device):
    require_native(OP, device)
    n, c, h, w, scale, crop = shape
    x = (3 * torch.randn(n, c, h, w, dtype=dtype)).requires_grad_()
    target = make_target(n, c, *crop_size(shape))
    compare_forward_backward(*fns(target, scale, crop, reduction=reduction), [x], device=device)


def test_fcn8s_head_full_size(device):
    require_native(OP, device)
    x = (3 * torch.randn(1, 21, 70, 70)).requires_grad_()
    target = make_target(1, 21, 500, 500)
    compare_forward_backward(*fns(target, 8, (31, 31, 500, 500)), [x], device=device)


@pytest.mark.parametrize(
    "ignore_index,fraction",
    [
        (255, 0.0),  # none ignored
        (255, 0.5),
        (-100, 0.3),  # F.cross_entropy's default
        (2, 0.0),  # a class index used as ignore_index: every label 2 is ignored
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignore_index(ignore_index, fraction, reduction, device):
    require_native(OP, device)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    target = make_target(2, 4, 20, 24, ignore_index, fraction, seed=3)
    compare_forward_backward(
        *fns(target, 4, (1, 2, 20, 24), ignore_index, reduction), [x], device=device
    )


@pytest.mark.parametrize("reduction,expected", [("mean", math.nan), ("sum", 0.0)])
def test_all_ignored(reduction, expected, device):
    require_native(OP, device)
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    xd = x.detach().to(device).requires_grad_()
    target = torch.full((1, 20, 20), 255)
    loss = ops.upsample_cross_entropy(xd, target.to(device), 4, None, 255, reduction)
    ref = reference.upsample_cross_entropy(x, target, 4, None, 255, reduction)
    assert loss.shape == () and loss.dtype == x.dtype and loss.device.type == device
    assert (
        (math.isnan(loss.item()) and math.isnan(ref.item()))
        if math.isnan(expected)
        else loss.item() == ref.item() == expected
    )
    (g,) = torch.autograd.grad(loss, xd)
    (gr,) = torch.autograd.grad(ref, x)
    assert torch.equal(g, torch.zeros_like(xd)) and torch.equal(gr, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch(reduction, device):
    require_native(OP, device)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    xd = x.detach().to(device).requires_grad_()
    target = torch.zeros(0, 20, 20, dtype=torch.int64)
    loss = ops.upsample_cross_entropy(xd, target.to(device), 4, None, 255, reduction)
    ref = reference.upsample_cross_entropy(x, target, 4, None, 255, reduction)
    torch.testing.assert_close(loss.cpu(), ref, equal_nan=True)
    (g,) = torch.autograd.grad(loss, xd)
    assert g.shape == x.shape


def test_bfloat16_vs_fp32_reference(device):
    require_native(OP, device)
    x = torch.randn(2, 21, 6, 5).bfloat16().requires_grad_()
    xd = x.detach().to(device).requires_grad_()
    target = make_target(2, 21, 40, 30)
    loss = ops.upsample_cross_entropy(xd, target.to(device), 8, (5, 6, 40, 30))
    (g,) = torch.autograd.grad(loss, xd)
    xf = x.detach().float().requires_grad_()
    ref = reference.upsample_cross_entropy(xf, target, 8, (5, 6, 40, 30))
    (gr,) = torch.autograd.grad(ref, xf)
    assert loss.dtype == g.dtype == torch.bfloat16
    assert_close_scaled(loss.float().cpu(), ref, dtype=torch.bfloat16, what="loss")
    assert_close_scaled(g.float().cpu(), gr, dtype=torch.bfloat16, what="grad")


def test_channels_last_and_noncontiguous(device):
    require_native(OP, device)
    x = torch.randn(2, 5, 6, 7).to(memory_format=torch.channels_last).requires_grad_()
    target = make_target(2, 5, 20, 25)
    compare_forward_backward(*fns(target, 4, (3, 2, 20, 25)), [x], device=device)
    y = torch.randn(2, 6, 12, 7)[:, ::2, ::2].requires_grad_()
    target = make_target(2, 3, 12, 21).transpose(1, 2)
    assert not target.is_contiguous()
    compare_forward_backward(*fns(target, 3, (0, 0, 21, 12)), [y], device=device)


def test_nan_and_inf_logits_like_reference(device):
    require_native(OP, device)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    x[0, 1, 2, 2] = float("nan")
    target = make_target(1, 3, 24, 24, ignored_fraction=0.0)
    for reduction in ("mean", "sum"):
        xa = x.clone().to(device).requires_grad_()
        xb = x.clone().requires_grad_()
        loss = ops.upsample_cross_entropy(xa, target.to(device), 4, None, 255, reduction)
        ref = reference.upsample_cross_entropy(xb, target, 4, None, 255, reduction)
        assert math.isnan(loss.item()) and math.isnan(ref.item())
        (g,), (gr,) = torch.autograd.grad(loss, xa), torch.autograd.grad(ref, xb)
        assert torch.equal(torch.isnan(g).cpu(), torch.isnan(gr))
    y = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    y[0, 0, 1, 1] = float("-inf")  # -inf logit: its class never the target -> finite loss
    target = torch.full((1, 24, 24), 1)
    assert_close_scaled(
        ops.upsample_cross_entropy(y.to(device), target.to(device), 4).cpu(),
        reference.upsample_cross_entropy(y, target, 4),
    )


def test_gradcheck_fp64(device):
    require_native(OP, device)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    for reduction in ("mean", "sum"):
        target = make_target(2, 3, 7, 9, seed=1).to(device)
        assert torch.autograd.gradcheck(
            lambda t, target=target, reduction=reduction: ops.upsample_cross_entropy(
                t, target, 2, (1, 1, 7, 9), 255, reduction
            ),
            (x,),
        )


def test_opcheck(device):
    require_native(OP, device)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    target = make_target(2, 3, 9, 11).to(device)
    for reduction in ("mean", "sum"):
        args = (x, target, 3, [2, 1, 9, 11], 255, reduction)
        torch.library.opcheck(torch.ops.fcnfast.upsample_cross_entropy.default, args)
        # the backward op is not itself differentiable: opcheck it on a plain x
        torch.library.opcheck(
            torch.ops.fcnfast.upsample_cross_entropy_backward.default,
            (torch.tensor(1.5, device=device), x.detach()) + args[1:],
        )
    # 4 classes, x4, crop (3, 3, 17, 20), labels 0..3 (formerly test_cuda.test_opcheck_cuda)
    x = torch.randn(2, 4, 5, 6, device=device, requires_grad=True)
    t = torch.randint(0, 4, (2, 17, 20), device=device)
    torch.library.opcheck(
        torch.ops.fcnfast.upsample_cross_entropy.default, (x, t, 4, [3, 3, 17, 20], 255, "mean")
    )


globals().update(oracle_tests(OP))  # ORACLE_CASES on every device (formerly test_cuda.py)


def test_compile_fullgraph():
    require_native(OP)
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    target = make_target(1, 4, 10, 9)
    fn = torch.compile(
        lambda t: fcnfast.upsample_cross_entropy(t, target, 4, (1, 2, 10, 9)), fullgraph=True
    )
    loss = fn(x)
    torch.testing.assert_close(loss, reference.upsample_cross_entropy(x, target, 4, (1, 2, 10, 9)))
    loss.backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_deterministic_across_runs_and_threads():
    require_native(OP)
    x = torch.randn(2, 21, 12, 12, requires_grad=True)
    target = make_target(2, 21, 80, 81)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            loss = ops.upsample_cross_entropy(x, target, 8, (7, 9, 80, 81))
            results.append((loss, torch.autograd.grad(loss, x)[0]))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


ERRORS = [
    (dict(target=torch.zeros(1, 20, 19, dtype=torch.int64)), "target shape"),
    (dict(target=torch.zeros(2, 20, 20, dtype=torch.int64)), "target shape"),
    (dict(target=torch.zeros(1, 20, 20, dtype=torch.int32)), "target must be an int64"),
    (dict(target=torch.zeros(20, dtype=torch.int64)), "target must be a 3-D"),
    (dict(target=torch.zeros(1, 20, 20, dtype=torch.int64, device="meta")), "same device"),
    (dict(reduction="none"), "reduction must be 'mean' or 'sum'"),
    (dict(scale=0), "scale must be a positive int"),
    (dict(crop=(0, 0, 21, 20)), "lies outside the full output"),
    (dict(x=torch.randn(4, 4)), "x must be a 4-D"),
]


@pytest.mark.parametrize("impl", [ops, reference])
@pytest.mark.parametrize("kwargs,match", ERRORS)
def test_errors(impl, kwargs, match):
    args = dict(
        x=torch.randn(1, 3, 4, 4),
        target=torch.zeros(1, 20, 20, dtype=torch.int64),
        scale=4,
        crop=None,
        reduction="mean",
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        impl.upsample_cross_entropy(
            args["x"], args["target"], args["scale"], args["crop"], reduction=args["reduction"]
        )


def _rejects_label(match, forward):
    """The forward rejects a bad label: at once (CPU, CuPy), or -- the compiled CUDA kernels,
    which check on the device without a host sync -- with a NaN loss and the ValueError from
    the next check (a later call, here ops.check_pending_errors)."""
    with pytest.raises(ValueError, match=match):
        loss = forward()
        assert loss.isnan(), loss
        ops.check_pending_errors()


@pytest.mark.parametrize("bad,ignore_index", [(3, 255), (-1, 255), (255, -100), (7, 7 + 1)])
def test_out_of_range_target(bad, ignore_index, device):
    require_native(OP, device)
    # every backend names the first bad label (csrc/host/op_checks.h, fcnfast/_geometry.py)
    match = "target value %d is out of bounds" % bad
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.zeros(1, 20, 20, dtype=torch.int64)
    target[0, 5, 7] = bad
    xd, td = x.detach().to(device).requires_grad_(), target.to(device)
    _rejects_label(match, lambda: ops.upsample_cross_entropy(xd, td, 4, None, ignore_index))
    _rejects_label(
        match,
        lambda: torch.ops.fcnfast.upsample_cross_entropy(
            xd, td, 4, [0, 0, 20, 20], ignore_index, "mean"
        ),
    )
    backward = functools.partial(
        torch.ops.fcnfast.upsample_cross_entropy_backward,
        torch.tensor(1.0, device=device),
        xd.detach(),
        td,
        4,
        [0, 0, 20, 20],
        ignore_index,
        "mean",
    )
    if device == "cpu":
        with pytest.raises(ValueError, match=match):
            backward()
    else:
        # the CUDA backward does not check the labels on the host (a device sync; the forward
        # of the same step did): the inputs the bad pixel reads get NaN, the others not
        grad = backward().cpu()
        near = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
        near[..., 5 // 4 - 1 : 5 // 4 + 1, 7 // 4 - 1 : 7 // 4 + 1] = True  # the 2x2 taps of (5, 7)
        assert grad[near.expand_as(grad)].isnan().all()
        assert grad[~near.expand_as(grad)].isfinite().all()
    # the reference rejects it too (on the CPU: on CUDA it would be a device-side assert)
    with pytest.raises((IndexError, RuntimeError)):
        reference.upsample_cross_entropy(x, target, 4, None, ignore_index)


def test_native_checks_direct_call():
    require_native(OP)
    f = torch.ops.fcnfast.upsample_cross_entropy
    b = torch.ops.fcnfast.upsample_cross_entropy_backward
    x = torch.randn(1, 3, 4, 4)
    t = torch.zeros(1, 20, 20, dtype=torch.int64)
    crop = [0, 0, 20, 20]
    with pytest.raises(ValueError, match=r"target shape \[1, 20, 19\] must be \(N, H, W\)"):
        f(x, t[..., :19], 4, crop, 255, "mean")
    with pytest.raises(ValueError, match="target must be an int64 label map, got Int"):
        f(x, t.int(), 4, crop, 255, "mean")
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'none'"):
        f(x, t, 4, crop, 255, "none")
    with pytest.raises(ValueError, match="scale must be a positive int, got 0"):
        f(x, t, 0, crop, 255, "mean")
    with pytest.raises(ValueError, match="crop .* lies outside"):
        f(x, t, 4, [1, 0, 20, 20], 255, "sum")
    with pytest.raises(ValueError, match="x must be a floating"):
        f(x.long(), t, 4, crop, 255, "sum")
    with pytest.raises(ValueError, match="grad_loss must hold one value"):
        b(torch.ones(2), x, t, 4, crop, 255, "mean")
    with pytest.raises(ValueError, match="reduction must be"):
        b(torch.tensor(1.0), x, t, 4, crop, 255, "max")
