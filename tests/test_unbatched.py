"""Unbatched (C, H, W) input, as ``torch.nn.ConvTranspose2d`` accepts it (issue 12).

Every op and every ``fcnfast.nn`` layer: the unbatched call equals the batched call on
``x.unsqueeze(0)`` with the batch dimension removed, output and gradients (bitwise: the
same kernels run on a view), on the native and the reference backend; the reference
equals PyTorch's own functional ops on the 3-D tensors; mixed or wrong ranks are refused.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled, require_native

import fcnfast
from fcnfast import nn as fnn
from fcnfast import ops, reference

T64 = torch.float64


def _r(*shape):
    return torch.randn(*shape, dtype=T64)


def _ce_target(*shape):
    target = torch.randint(0, 3, shape)
    target.view(-1)[::4] = 255
    return target


# (op, floating inputs of the unbatched call (C, ., .), other arguments, keyword arguments)
CASES = [
    (
        "conv_transpose2d",
        [_r(4, 3, 5), _r(4, 3, 3, 2), _r(6)],
        dict(stride=(2, 1), padding=1, output_padding=(1, 0), groups=2, dilation=(1, 2)),
        None,
    ),
    ("conv_transpose2d", [_r(3, 4, 4), _r(3, 2, 4, 4)], dict(stride=2, crop=(1, 2, 6, 5)), None),
    ("bilinear_upsample2d", [_r(3, 4, 5)], dict(scale=4, crop=(3, 2, 12, 13)), None),
    ("bilinear_upsample2d", [_r(2, 3, 3)], dict(scale=2), None),
    ("skip_add_crop", [_r(3, 4, 5), _r(3, 7, 9)], dict(offset=(2, 3)), None),
    (
        "score_skip",
        [_r(3, 4, 5), _r(6, 7, 9), _r(3, 6, 1, 1), _r(3)],
        dict(scale=0.5, offset=(1, 2)),
        None,
    ),
    (
        "upsample_cross_entropy",
        [_r(3, 4, 5)],
        dict(scale=4, crop=(3, 2, 12, 13)),
        _ce_target(12, 13),
    ),
    ("upsample_cross_entropy", [_r(3, 2, 3)], dict(scale=2, reduction="sum"), _ce_target(6, 8)),
]
# which floating inputs carry the batch dimension (weights and biases do not)
BATCHED_INPUTS = {
    "conv_transpose2d": 1,
    "bilinear_upsample2d": 1,
    "skip_add_crop": 2,
    "score_skip": 2,
    "upsample_cross_entropy": 1,
    "upsample_argmax": 1,
}
IDS = ["%s-%d" % (c[0], i) for i, c in enumerate(CASES)]


def _call(impl, op, inputs, kwargs, target, batched):
    n = BATCHED_INPUTS[op]
    args = [t.unsqueeze(0) if batched and i < n else t for i, t in enumerate(inputs)]
    if target is not None:
        args.insert(1, target.unsqueeze(0) if batched else target)
    out = getattr(impl, op)(*args, **kwargs)
    return out.squeeze(0) if batched and out.dim() > 0 else out


def _run(impl, op, inputs, kwargs, target, batched):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = _call(impl, op, leaves, kwargs, target, batched)
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("op,inputs,kwargs,target", CASES, ids=IDS)
def test_unbatched_equals_batched(op, inputs, kwargs, target, backend):
    if backend == "native":
        require_native(op)
    with fcnfast.use_backend(backend):
        out, grads = _run(ops, op, inputs, kwargs, target, batched=False)
        out_b, grads_b = _run(ops, op, inputs, kwargs, target, batched=True)
    assert out.shape == out_b.shape and out.dim() == (0 if op == "upsample_cross_entropy" else 3)
    assert torch.equal(out, out_b)
    for g, gb in zip(grads, grads_b):
        assert torch.equal(g, gb)


@pytest.mark.parametrize("op,inputs,kwargs,target", CASES, ids=IDS)
def test_unbatched_native_matches_reference(op, inputs, kwargs, target):
    require_native(op)
    out, grads = _run(ops, op, inputs, kwargs, target, batched=False)
    out_r, grads_r = _run(reference, op, inputs, kwargs, target, batched=False)
    assert_close_scaled(out, out_r)
    for i, (g, gr) in enumerate(zip(grads, grads_r)):
        assert_close_scaled(g, gr, what="grad %d" % i)


@pytest.mark.parametrize("op,inputs,kwargs,target", CASES, ids=IDS)
def test_unbatched_double_backward(op, inputs, kwargs, target):
    """Second-order gradients of the unbatched call equal the reference's."""
    require_native(op)

    def second(impl):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = _call(impl, op, leaves, kwargs, target, batched=False)
        first = torch.autograd.grad((out.sin() * out).sum(), leaves, create_graph=True)
        return torch.autograd.grad(sum(f.pow(2).sum() for f in first), leaves, allow_unused=True)

    for i, (a, e) in enumerate(zip(second(ops), second(reference))):
        if e is None:
            assert a is None or not a.any()
        else:
            assert_close_scaled(a, e, what="second-order grad %d" % i)


def test_reference_unbatched_is_pytorch_on_3d():
    """The reference's unbatched results are PyTorch's functional ops on the 3-D tensors."""
    x, w, b = _r(4, 3, 5), _r(4, 3, 3, 2), _r(6)
    kw = dict(stride=(2, 1), padding=1, output_padding=(1, 0), groups=2, dilation=(1, 2))
    assert torch.equal(reference.conv_transpose2d(x, w, b, **kw), F.conv_transpose2d(x, w, b, **kw))
    coarse, feature, weight = _r(3, 4, 5), _r(6, 7, 9), _r(3, 6, 1, 1)
    assert torch.equal(
        reference.score_skip(coarse, feature, weight, None, 0.5, (1, 2)),
        coarse + F.conv2d(feature * 0.5, weight)[..., 1:5, 2:7],
    )
    target = _ce_target(6, 8)
    x = _r(3, 2, 3)
    up = reference.bilinear_upsample2d(x, 2)
    assert up.shape == (3, 6, 8)
    # F.cross_entropy reads a 3-D input as (N, C, d): the unbatched image is a batch of one
    torch.testing.assert_close(
        reference.upsample_cross_entropy(x, target, 2),
        F.cross_entropy(up[None], target[None], ignore_index=255),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_unbatched_argmax(backend):
    if backend == "native":
        require_native("upsample_argmax")
    x = _r(5, 3, 4)
    with fcnfast.use_backend(backend):
        labels = ops.upsample_argmax(x, 4, (1, 2, 13, 15))
        batched = ops.upsample_argmax(x.unsqueeze(0), 4, (1, 2, 13, 15))
    assert labels.shape == (13, 15) and labels.dtype == torch.int64
    assert torch.equal(labels, batched.squeeze(0))
    assert torch.equal(labels, reference.bilinear_upsample2d(x, 4, (1, 2, 13, 15)).argmax(0))


@pytest.mark.parametrize("impl", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda m: m.conv_transpose2d(_r(2, 1, 3, 4, 4), _r(3, 2, 2, 2)),
            r"x must be a 4-D tensor .* or a 3-D",
        ),
        (lambda m: m.conv_transpose2d(_r(4, 4), _r(3, 2, 2, 2)), r"x must be a 4-D tensor"),
        (lambda m: m.bilinear_upsample2d(_r(4), 2), r"x must be a 4-D tensor"),
        (lambda m: m.upsample_argmax(_r(1, 1, 2, 4, 4), 2), r"x must be a 4-D tensor"),
        (
            lambda m: m.skip_add_crop(_r(3, 2, 2), _r(1, 3, 4, 4), (0, 0)),
            r"coarse \(3, 2, 2\) and skip \(1, 3, 4, 4\) must both have a batch dimension or both be unbatched",
        ),
        (lambda m: m.skip_add_crop(_r(1, 3, 2, 2), _r(3, 4, 4), (0, 0)), r"must both have a batch"),
        (
            lambda m: m.score_skip(_r(3, 2, 2), _r(1, 4, 4, 4), _r(3, 4, 1, 1)),
            r"coarse .* and feature .* must both",
        ),
        (lambda m: m.score_skip(_r(3, 2, 2), _r(4, 4, 4), _r(3, 4)), r"weight must be a 4-D"),
        (
            lambda m: m.upsample_cross_entropy(_r(3, 2, 2), _ce_target(1, 4, 4), 2, (0, 0, 4, 4)),
            r"x \(3, 2, 2\) and target \(1, 4, 4\) must both have a batch dimension",
        ),
        (
            lambda m: m.upsample_cross_entropy(_r(1, 3, 2, 2), _ce_target(4, 4), 2, (0, 0, 4, 4)),
            r"must both have a batch dimension",
        ),
        (
            lambda m: m.upsample_cross_entropy(_r(3, 2, 2), _ce_target(4, 5), 2, (0, 0, 4, 4)),
            r"target shape \[1, 4, 5\] must be \(N, H, W\) = \[1, 4, 4\]",
        ),
        (
            lambda m: m.upsample_cross_entropy(_r(3, 2, 2), _ce_target(4), 2),
            r"target must be a 3-D tensor \(N, H, W\) or a 2-D",
        ),
        (
            lambda m: m.conv_transpose2d(_r(3, 4, 4), _r(2, 2, 2, 2)),
            r"weight.shape\[0\] \(2\) must equal the input channels x.shape\[1\] \(3\)",
        ),
    ],
)
def test_unbatched_errors(impl, call, match):
    with pytest.raises(ValueError, match=match):
        call(impl)


# ---------------------------------------------------------------------------
# fcnfast.nn layers
# ---------------------------------------------------------------------------


def _layer_pair(layer, *inputs):
    """(unbatched output, batched output squeezed), with the gradients of both."""
    results = []
    for batched in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        args = [t.unsqueeze(0) if batched else t for t in leaves]
        out = layer(*args)
        out = out.squeeze(0) if batched else out
        params = [p for p in layer.parameters()]
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), leaves + params)
        results.append((out.detach(), grads))
    return results


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nn_layers_unbatched(backend):
    if backend == "native":
        require_native("conv_transpose2d")
    torch.manual_seed(0)
    layers = [
        (
            fnn.ConvTranspose2d(4, 6, (3, 2), stride=(2, 1), padding=1, groups=2, dilation=(1, 2)),
            [_r(4, 3, 5)],
        ),
        (fnn.BilinearUpsample2d(3, 4), [_r(3, 4, 5)]),
        (fnn.BilinearUpsample2d(3, 2, learnable=True), [_r(3, 4, 5)]),
        (fnn.SkipFuse(6, 3, scale=0.5, offset=(1, 2)), [_r(3, 4, 5), _r(6, 7, 9)]),
    ]
    with fcnfast.use_backend(backend):
        for layer, inputs in layers:
            layer = layer.double()
            (out, grads), (out_b, grads_b) = _layer_pair(layer, *inputs)
            assert out.dim() == 3 and torch.equal(out, out_b), layer
            assert all(torch.equal(g, gb) for g, gb in zip(grads, grads_b)), layer


@pytest.mark.parametrize("output_size", [None, (9, 8), (6, 10, 7), [10, 8]])
def test_conv_transpose_layer_unbatched_output_size(output_size):
    """output_size for an unbatched input (with or without the channel dim) as in PyTorch."""
    require_native("conv_transpose2d")
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).double()
    mine = fnn.ConvTranspose2d(4, 6, 3, stride=2, padding=1).double()
    mine.load_state_dict(theirs.state_dict())
    x = _r(4, 5, 4)
    expected = theirs(x, output_size)
    got = mine(x, output_size)
    assert got.shape == expected.shape and got.dim() == 3
    assert_close_scaled(got, expected)
    assert torch.equal(
        got,
        mine(
            x.unsqueeze(0),
            output_size and ((1,) + tuple(output_size) if len(output_size) == 3 else output_size),
        ).squeeze(0),
    )


def test_conv_transpose_layer_unbatched_crop():
    require_native("conv_transpose2d")
    layer = fnn.ConvTranspose2d(3, 2, 4, stride=2).double()
    x = _r(3, 5, 5)
    out = layer(x, crop=(1, 2, 6, 7))
    assert out.shape == (2, 6, 7)
    assert_close_scaled(out, layer(x, crop=None)[:, 1:7, 2:9])


def test_bilinear_layer_checks_unbatched_channels():
    with pytest.raises(ValueError, match="x has 4 channels, BilinearUpsample2d expects 3"):
        fnn.BilinearUpsample2d(3, 2)(_r(4, 5, 5))
