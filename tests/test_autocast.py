"""Mixed precision: every fcnfast op, layer and model under ``torch.autocast`` (bf16 and fp16).

The rules (``fcnfast._autocast.RULES``) are checked three ways: the output dtype is the one
the rule states, the result is close to the fp32 reference computed without autocast (stated
tolerances below), and the native and reference backends give the same dtypes and agree.
Gradients are taken outside the autocast region (as the PyTorch AMP recipe does) and flow
back to the fp32 leaves through the casts.

Tolerances, max abs error relative to max(1, max|fp32 reference|): single ops 2e-2 (bf16,
8 mantissa bits) and 4e-3 (fp16); whole models (every conv of the backbone in reduced
precision) 6e-2 / 1e-2; labels of ``predict`` agree with fp32 on >= 97 % (bf16) / 99 % (fp16)
of the pixels (random weights put many pixels near a tie).
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCE_ONLY
from single_thread import one_intraop_thread  # noqa: F401

import fcnfast
from fcnfast import _autocast, ops, reference
from fcnfast import nn as fnn
from fcnfast.models import fcn8s
from fcnfast.models.lite_fcn import LiteFCN

REDUCED = (torch.bfloat16, torch.float16)
OP_TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}
MODEL_TOL = {torch.bfloat16: 6e-2, torch.float16: 1e-2}
LABEL_AGREEMENT = {torch.bfloat16: 0.97, torch.float16: 0.99}
BACKENDS = ["native", "reference"]


def _backend(name):
    if name == "native" and REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    return fcnfast.use_backend(name)


def _close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol * scale, "%s: max abs error %.3g > %.3g" % (what, err, tol * scale)


# ---------------------------------------------------------------------------------------
# the ops: (name, build inputs, call, expected output dtype under autocast `amp`)
# ---------------------------------------------------------------------------------------


def _ct_inputs():
    return [torch.randn(2, 6, 7, 5), torch.randn(6, 4, 4, 4) * 0.3, torch.randn(4)]


def _ct(x, w, b):
    return ops.conv_transpose2d(x, w, b, stride=2, crop=(1, 1, 12, 9))


def _ss_inputs():
    return [
        torch.randn(2, 5, 6, 7),
        torch.randn(2, 8, 9, 10),
        torch.randn(5, 8, 1, 1) * 0.3,
        torch.randn(5),
    ]


def _ss(c, f, w, b):
    return ops.score_skip(c, f, w, b, 0.5, (1, 2))


def _ce_target():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 6, (2, 20, 17), generator=g)
    t[0, :3] = 255
    return t


OPS = {
    "conv_transpose2d": (_ct_inputs, _ct, lambda amp: amp),
    "bilinear_upsample2d": (
        lambda: [torch.randn(2, 5, 6, 7)],
        lambda x: ops.bilinear_upsample2d(x, 4, (2, 3, 20, 21)),
        lambda amp: amp,
    ),
    "skip_add_crop": (
        lambda: [torch.randn(2, 5, 6, 7), torch.randn(2, 5, 9, 10)],
        lambda c, s: ops.skip_add_crop(c, s, (2, 1)),
        lambda amp: torch.float32,
    ),
    "score_skip": (_ss_inputs, _ss, lambda amp: torch.float32),
    "upsample_cross_entropy": (
        lambda: [torch.randn(2, 6, 5, 4) * 3],
        lambda x: ops.upsample_cross_entropy(x, _ce_target(), 4, (1, 2, 20, 17)),
        lambda amp: torch.float32,
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", REDUCED, ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_op_fp32_inputs_under_autocast(name, amp, backend):
    """fp32 inputs under autocast: the rule's dtype, close to fp32, fp32 gradients close too."""
    make, fn, expected_dtype = OPS[name]
    torch.manual_seed(0)
    inputs = [t.requires_grad_() for t in make()]
    with _backend(backend):
        ref = fn(*inputs)
        ref_grads = torch.autograd.grad(ref, inputs, torch.ones_like(ref))
        with torch.autocast("cpu", dtype=amp):
            out = fn(*inputs)
        assert out.dtype == expected_dtype(amp), (name, out.dtype)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    _close(out.float(), ref, OP_TOL[amp], name)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == torch.float32
        _close(g, r, OP_TOL[amp], "%s grad %d" % (name, i))


@pytest.mark.parametrize("amp", REDUCED, ids=str)
@pytest.mark.parametrize("name", sorted(OPS))
def test_native_and_reference_agree_under_autocast(name, amp):
    """Same dtype and (within the reduced dtype's rounding) the same values on both backends,
    with reduced-precision inputs as a model hands them over (mixed with fp32 weights)."""
    make, fn, _ = OPS[name]
    torch.manual_seed(1)
    inputs = make()
    inputs[0] = inputs[0].to(amp)  # activations in the autocast dtype, weights fp32
    outs = {}
    for backend in BACKENDS:
        with _backend(backend), torch.autocast("cpu", dtype=amp):
            outs[backend] = fn(*inputs)
    assert outs["native"].dtype == outs["reference"].dtype
    _close(outs["native"].float(), outs["reference"].float(), OP_TOL[amp], name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", REDUCED, ids=str)
def test_upsample_argmax_under_autocast(amp, backend):
    """Rule float32: the labels of reduced-precision scores equal the fp32 labels of the same
    (rounded) scores; on fp32 scores they equal the fp32 reference exactly."""
    torch.manual_seed(2)
    x = torch.randn(2, 7, 6, 5)
    with _backend(backend):
        with torch.autocast("cpu", dtype=amp):
            labels = ops.upsample_argmax(x, 4, (1, 2, 20, 17))
            labels_reduced = ops.upsample_argmax(x.to(amp), 4, (1, 2, 20, 17))
    assert labels.dtype == torch.int64
    assert torch.equal(labels, reference.upsample_argmax(x, 4, (1, 2, 20, 17)))
    assert torch.equal(
        labels_reduced, reference.upsample_argmax(x.to(amp).float(), 4, (1, 2, 20, 17))
    )


@pytest.mark.parametrize("amp", REDUCED, ids=str)
def test_cross_entropy_reduced_input_gives_fp32_loss_and_reduced_grad(amp):
    torch.manual_seed(4)
    x = (torch.randn(2, 6, 5, 4) * 3).to(amp).requires_grad_()
    t = _ce_target()
    for backend in BACKENDS:
        with _backend(backend):
            with torch.autocast("cpu", dtype=amp):
                loss = ops.upsample_cross_entropy(x, t, 4, (1, 2, 20, 17))
            assert loss.dtype == torch.float32
            (g,) = torch.autograd.grad(loss, x)
            assert g.dtype == amp
            ref = reference.upsample_cross_entropy(
                x.detach().float().requires_grad_(), t, 4, (1, 2, 20, 17)
            )
            _close(loss, ref, OP_TOL[amp], "loss")


def test_dispatcher_ops_follow_the_same_rules():
    """torch.ops.fcnfast.* called directly (torch.compile / export graphs) cast as the wrappers."""
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    T = torch.ops.fcnfast
    x, w, b = _ct_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = T.conv_transpose2d(x, w, b, [2, 2], [0, 0], [0, 0], 1, [1, 1], [1, 1, 12, 9])
        assert out.dtype == torch.bfloat16
        assert T.bilinear_upsample2d(x, 2, [0, 0, 4, 4]).dtype == torch.bfloat16
        assert T.skip_add_crop(x[:, :, :3, :3].bfloat16(), x, [1, 1]).dtype == torch.float32
        loss = T.upsample_cross_entropy(
            x.bfloat16(), torch.zeros(2, 6, 4, dtype=torch.long), 2, [0, 0, 6, 4], 255, "mean"
        )
        assert loss.dtype == torch.float32
        gx, gw, gb = T.conv_transpose2d_backward(
            out,
            x.bfloat16(),
            w,
            [2, 2],
            [0, 0],
            [0, 0],
            1,
            [1, 1],
            [1, 1, 12, 9],
            [True, True, True],
        )
        assert gx.dtype == gw.dtype == torch.float32  # backward ops: the widest input dtype
    _close(out.float(), ops.conv_transpose2d(x, w, b, stride=2, crop=(1, 1, 12, 9)), 2e-2, "ct")


def test_float64_is_never_cast_down_and_outside_autocast_nothing_changes():
    x, w, b = [t.double() for t in _ct_inputs()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _ct(x, w, b).dtype == torch.float64
    x = torch.randn(1, 2, 3, 3)
    assert ops.bilinear_upsample2d(x, 2).dtype == torch.float32
    assert _autocast.cast("conv_transpose2d", "cpu", (x,))[0] is x


def test_every_registered_op_has_a_rule():
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    names = [
        n
        for n in dir(torch.ops.fcnfast)
        if not n.startswith("_")
        and isinstance(getattr(torch.ops.fcnfast, n), torch._ops.OpOverloadPacket)
    ]
    assert set(ops.__all__) <= set(names)
    for n in names:
        assert n in _autocast.RULES, n
        op = getattr(torch.ops.fcnfast, n).default
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (n, key)


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------


def _layers():
    torch.manual_seed(5)
    ct = fnn.ConvTranspose2d(6, 4, 4, stride=2)
    plain = torch.nn.ConvTranspose2d(6, 6, 8, 4, bias=False)
    with torch.no_grad():
        plain.weight.copy_(fnn.bilinear_kernel(6, 8))
    plain.weight.requires_grad_(False)
    frozen = fnn.convert(torch.nn.Sequential(plain))
    assert isinstance(frozen[0], fnn.FrozenBilinearConvTranspose2d)
    return {
        "ConvTranspose2d": (ct, lambda m, x: m(x, crop=(1, 1, 10, 8))),
        "BilinearUpsample2d_fixed": (
            fnn.BilinearUpsample2d(6, 4),
            lambda m, x: m(x, crop=(2, 2, 20, 16)),
        ),
        "BilinearUpsample2d_learned": (
            fnn.BilinearUpsample2d(6, 2, learnable=True),
            lambda m, x: m(x, crop=(1, 1, 10, 8)),
        ),
        "FrozenBilinearConvTranspose2d": (frozen, lambda m, x: m(x)),
        "BilinearInterpolate2d": (fnn.BilinearInterpolate2d(2), lambda m, x: m(x)),
        "SkipFuse": (
            fnn.SkipFuse(6, 3, scale=0.5, offset=(1, 1)),
            lambda m, x: m(torch.randn(2, 3, 3, 2), x),
        ),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", REDUCED, ids=str)
@pytest.mark.parametrize("name", sorted(_layers()))
def test_layers_under_autocast(name, amp, backend):
    layer, call = _layers()[name]
    x = torch.randn(2, 6, 5, 4, requires_grad=True)
    params = [p for p in layer.parameters() if p.requires_grad]
    with _backend(backend):
        torch.manual_seed(6)
        ref = call(layer, x)
        ref_grads = torch.autograd.grad(ref.sum(), [x] + params)
        with torch.autocast("cpu", dtype=amp):
            torch.manual_seed(6)
            out = call(layer, x)
        grads = torch.autograd.grad(out.float().sum(), [x] + params)
    assert out.dtype == (torch.float32 if name == "SkipFuse" else amp)
    _close(out.float(), ref, OP_TOL[amp], name)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        _close(g, r, OP_TOL[amp] * 2, name + " grad")


# ---------------------------------------------------------------------------------------
# whole models: forward, backward (loss), predict
# ---------------------------------------------------------------------------------------


def _randomize(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(model, name):
                torch.nn.init.normal_(getattr(model, name).weight, std=0.05)
    return model.eval()


def _models():
    return {
        "fcn8s_tiny_learned": lambda: _randomize(fcn8s(num_classes=5, backbone="tiny")),
        "fcn8s_tiny_fixed": lambda: _randomize(
            fcn8s(num_classes=5, backbone="tiny", fixed_upsampling=True)
        ),
        "lite0_fcn8s": lambda: _randomize(LiteFCN("fcn8s", 4)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", REDUCED, ids=str)
@pytest.mark.parametrize("name", sorted(_models()))
def test_model_under_autocast(name, amp, backend):
    model = _models()[name]()
    torch.manual_seed(8)
    x = torch.randn(2, 3, 45, 52)
    target = torch.randint(0, model.num_classes, (2, 45, 52))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn():
        if hasattr(model, "loss"):
            return model.loss(x, target)
        return F.cross_entropy(model(x), target)

    with _backend(backend):
        ref = model(x)
        ref_loss = loss_fn()
        ref_grads = torch.autograd.grad(ref_loss, params)
        with torch.no_grad():
            ref_labels = ref.argmax(1)
        with torch.autocast("cpu", dtype=amp):
            out = model(x)
            loss = loss_fn()
            with torch.no_grad():
                labels = (
                    model.predict(x)
                    if isinstance(model, fcnfast.models.FCN)
                    else model(x).argmax(1)
                )
        grads = torch.autograd.grad(loss, params)  # backward outside the autocast region
    assert out.dtype == amp and loss.dtype == torch.float32 and labels.dtype == torch.int64
    _close(out.float(), ref, MODEL_TOL[amp], "forward")
    _close(loss, ref_loss, MODEL_TOL[amp], "loss")
    for p, g, r in zip(params, grads, ref_grads):
        assert g.dtype == p.dtype == torch.float32
        _close(g, r, MODEL_TOL[amp], "grad")
    agree = (labels == ref_labels).double().mean().item()
    assert agree >= LABEL_AGREEMENT[amp], agree


@pytest.mark.parametrize("amp", REDUCED, ids=str)
def test_lite0_predict_under_autocast_and_backends_agree(amp):
    model = _models()["lite0_fcn8s"]()
    images = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8)
    ref = model.predict(images)
    outs = {}
    for backend in BACKENDS:
        with _backend(backend), torch.autocast("cpu", dtype=amp):
            outs[backend] = model.predict(images)
            logits = model(model.preprocess(images))
        assert logits.dtype == amp
    for labels in outs.values():
        assert labels.dtype == torch.int64 and labels.shape == ref.shape
        assert (labels == ref).double().mean().item() >= LABEL_AGREEMENT[amp]
    assert (outs["native"] == outs["reference"]).double().mean().item() >= LABEL_AGREEMENT[amp]
