"""Deploying: ONNX (onnxruntime) and torch.export with dynamic batch/height/width, the
TorchScript refusal, wkentaro/pytorch-fcn checkpoints, fcnfast.nn.convert, load_model and
`fcnfast export`.

Every export is traced at one size and checked at *other* sizes (odd, batch 3) against the
eager fcnfast model. Models get random score / upsampling weights first: fresh FCNs have
zero score layers and would give all-zero outputs that any graph "matches".
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from single_thread import one_intraop_thread  # noqa: F401
from torch import nn

import fcnfast
from fcnfast import export as fx
from fcnfast.models import FCN, build_model
from fcnfast.nn import BilinearUpsample2d, ConvTranspose2d, SkipFuse, bilinear_kernel

onnx = pytest.importorskip("onnx", reason="the ONNX tests need `pip install fcnfast[test]`")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need `pip install fcnfast[test]`")


@pytest.fixture(autouse=True, scope="module")
def _reuse_onnx_registry():
    """Test speed only: torch.onnx.export rebuilds its torchlib registry (~8 s on a busy core)
    on every call; build it once for this module and hand each export a copy (the custom
    translations are still registered per call, by torch.onnx.export itself)."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.from_torchlib
    except (ImportError, AttributeError):  # another torch: no cache, just slower
        yield
        return
    cache = {}

    def cached(opset_version=None, **kwargs):
        key = opset_version
        if key not in cache:
            cache[key] = (
                original(opset_version=opset_version, **kwargs)
                if opset_version is not None
                else original(**kwargs)
            )
        base = cache[key]
        copy = _registration.ONNXRegistry()
        copy._opset_version = base._opset_version
        copy.functions = {k: list(v) for k, v in base.functions.items()}
        return copy

    _registration.ONNXRegistry.from_torchlib = staticmethod(cached)
    try:
        yield
    finally:
        _registration.ONNXRegistry.from_torchlib = original


EXPORT_SIZE = (2, 67, 75)  # (N, H, W) traced
CHECK_SIZES = [(3, 45, 61), (1, 33, 97), (2, 1, 1), (1, 100, 31)]  # (N, H, W) run


def randomize(model, seed=0):
    """Random score layers, perturbed (non-bilinear) learned upsampling, random BN stats."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("score_", "upscore")):
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if "upscore" in name else 0.3))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def make(variant, backbone="tiny", fixed=False, num_classes=5, seed=0):
    torch.manual_seed(seed)
    return randomize(
        build_model(variant, num_classes=num_classes, backbone=backbone, fixed_upsampling=fixed),
        seed,
    )


def inputs(n, h, w, channels=3, seed=1):
    return torch.randn(n, channels, h, w, generator=torch.Generator().manual_seed(seed + h * w + n))


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def assert_scores_close(actual, expected, what):
    actual = torch.as_tensor(actual)
    assert tuple(actual.shape) == tuple(expected.shape), "%s: shape %s != %s" % (
        what,
        tuple(actual.shape),
        tuple(expected.shape),
    )
    scale = max(1.0, expected.abs().max().item())
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= 1e-4 * scale, "%s: max abs error %.3g (scale %.3g)" % (what, err, scale)


def assert_labels_match(actual, expected, scores, what):
    """Equal labels, except where the two best classes are tied to fp32 rounding."""
    actual = torch.as_tensor(actual)
    assert actual.dtype == torch.int64 and tuple(actual.shape) == tuple(expected.shape), what
    differ = actual != expected
    if differ.any():
        top2 = scores.topk(2, dim=1).values
        gap = (top2[:, 0] - top2[:, 1])[differ]
        assert gap.max().item() <= 1e-4 * max(1.0, scores.abs().max().item()), (
            "%s: %d labels differ, not at ties" % (what, int(differ.sum()))
        )


# ---------------------------------------------------------------------------
# ONNX through onnxruntime
# ---------------------------------------------------------------------------

ZOO_CASES = [
    (v, "tiny", fixed)
    for v in ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
    for fixed in (False, True)
] + [("fcn16s", "small", False), ("fcn8s_atonce", "small", True)]
PREDICT_CASES = [("fcn8s", True), ("fcn32s", False)]


class Zoo(nn.Module):
    """Every case in one module, so one ONNX export (seconds each on a busy CPU) covers them:
    the scores of each model in ZOO_CASES, then the label maps of PREDICT_CASES."""

    def __init__(self):
        super().__init__()
        self.models = nn.ModuleList(make(*case, seed=i) for i, case in enumerate(ZOO_CASES))
        self.predictors = nn.ModuleList(
            fx.Predictor(make(v, "tiny", fixed, seed=10 + i))
            for i, (v, fixed) in enumerate(PREDICT_CASES)
        )

    def forward(self, x):
        return tuple(m(x) for m in self.models) + tuple(p(x) for p in self.predictors)


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory):
    zoo = Zoo().eval()
    names = ["scores_%d" % i for i in range(len(ZOO_CASES))] + [
        "labels_%d" % i for i in range(len(PREDICT_CASES))
    ]
    path = tmp_path_factory.mktemp("zoo") / "zoo.onnx"
    fx.export_onnx(zoo, path, inputs(*EXPORT_SIZE), output_names=names)
    return zoo, path


def test_onnx_graph_is_standard_and_dynamic(zoo_onnx):
    graph = onnx.load(str(zoo_onnx[1]))
    ops_used = {n.op_type for n in graph.graph.node}
    for op_type in ("ConvTranspose", "Slice", "Conv", "Add", "ArgMax", "MaxPool"):
        assert op_type in ops_used, (op_type, sorted(ops_used))
    domains = {n.domain for n in graph.graph.node} - {"", "ai.onnx"}
    assert not domains, "non-standard ONNX domains %s" % sorted(domains)
    onnx.checker.check_model(graph)
    dims = [d.dim_param or d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim]
    assert [isinstance(d, str) for d in dims] == [True, False, True, True], dims


@pytest.mark.parametrize("size", CHECK_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_onnx_matches_fcnfast_at_other_sizes(zoo_onnx, size):
    """Scores of every variant/backbone/upsampling and the label maps, at sizes other than
    the exported one (odd, 1x1, batch 3)."""
    zoo, path = zoo_onnx
    x = inputs(*size)
    got = session(path).run(None, {"input": x.numpy()})
    assert len(got) == len(ZOO_CASES) + len(PREDICT_CASES)
    with torch.no_grad():
        for case, model, out in zip(ZOO_CASES, zoo.models, got):
            assert_scores_close(out, model(x), "%s/%s fixed=%s at %s" % (case + (size,)))
        for case, predictor, out in zip(PREDICT_CASES, zoo.predictors, got[len(ZOO_CASES) :]):
            model = predictor.model
            assert out.dtype == np.int64
            assert_labels_match(
                out, model.predict(x), model(x), "%s predict at %s" % (case[0], size)
            )


def test_onnx_lite0(tmp_path):
    """backbone="lite0" (EfficientNet-Lite0 LiteFCN: fcnfast.nn.ConvTranspose2d with crop and
    SkipFuse after a backbone that pads to a multiple of 32)."""
    model = make("fcn8s", "lite0")
    path = tmp_path / "lite.onnx"
    fx.export_onnx(model, path, inputs(*EXPORT_SIZE))
    sess = session(path)
    for n, h, w in [(3, 45, 61), (1, 100, 31)]:
        x = inputs(n, h, w)
        with torch.no_grad():
            assert_scores_close(
                sess.run(None, {"input": x.numpy()})[0], model(x), "lite0 at %s" % ((n, h, w),)
            )


@pytest.mark.slow
def test_onnx_vgg16_fcn8s(tmp_path):
    """The paper's full-width network once (its fc6 alone is 400 MB)."""
    model = make("fcn8s", "vgg16", fixed=True, num_classes=3)
    path = tmp_path / "vgg.onnx"
    fx.export_onnx(model, path, inputs(2, 9, 11))
    x = inputs(1, 13, 7)
    (got,) = session(path).run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert_scores_close(got, model(x), "vgg16 fcn8s")


def test_onnx_each_op_translation(tmp_path):
    """Every fcnfast op alone, with dynamic sizes, against the op itself."""

    class Ops(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, bias=True)
            self.skip = SkipFuse(4, 3, scale=0.5, offset=(1, 2))

        def forward(self, x):
            h, w = x.shape[2], x.shape[3]
            a = self.up(x, crop=(1, 0, h, w))  # conv_transpose2d
            b = fcnfast.bilinear_upsample2d(a, 2, (1, 1, h, w))  # bilinear
            c = fcnfast.skip_add_crop(b[:, :, : h - 2, : w - 3], a, (1, 2))  # skip_add_crop
            d = self.skip(c, x)  # score_skip
            labels = fcnfast.upsample_argmax(d, 4, (2, 3, h, w))  # upsample_argmax
            return d, labels

    model = Ops().eval()
    with torch.no_grad():
        model.up.weight.normal_()
        model.skip.weight.normal_()
    torch.onnx.export(
        model,
        (inputs(2, 9, 11, 4),),
        str(tmp_path / "ops.onnx"),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes=fx.dynamic_shapes(),
        custom_translation_table=fx.onnx_translation_table(),
    )
    sess = session(tmp_path / "ops.onnx")
    for n, h, w in [(3, 7, 13), (1, 12, 8)]:
        x = inputs(n, h, w, 4)
        got_d, got_l = sess.run(None, {"x": x.numpy()})
        with torch.no_grad():
            d, labels = model(x)
        assert_scores_close(got_d, d, "ops at %s" % ((n, h, w),))
        assert_labels_match(
            got_l, labels, fcnfast.bilinear_upsample2d(d, 4, (2, 3, h, w)), "argmax"
        )


def test_onnx_upsample_cross_entropy(tmp_path):
    class Loss(nn.Module):
        def forward(self, x, target):
            return fcnfast.upsample_cross_entropy(
                x, target, 4, (3, 2, target.shape[1], target.shape[2]), ignore_index=255
            )

    D = torch.export.Dim
    n, h, w = D("n", min=1, max=64), D("h", min=2, max=999), D("w", min=2, max=999)
    th, tw = D("th", min=2, max=999), D("tw", min=2, max=999)
    x0 = inputs(2, 9, 11, 5)
    t0 = torch.randint(0, 5, (2, 30, 37))
    torch.onnx.export(
        Loss(),
        (x0, t0),
        str(tmp_path / "ce.onnx"),
        dynamo=True,
        input_names=["x", "target"],
        dynamic_shapes=({0: n, 2: h, 3: w}, {0: n, 1: th, 2: tw}),
        custom_translation_table=fx.onnx_translation_table(),
    )
    sess = session(tmp_path / "ce.onnx")
    for (b, hh, ww), (tth, ttw) in [((3, 7, 13), (25, 49)), ((1, 12, 8), (40, 20))]:
        x = inputs(b, hh, ww, 5)
        target = torch.randint(0, 5, (b, tth, ttw))
        target[:, ::3] = 255  # ignored pixels
        (got,) = sess.run(None, {"x": x.numpy(), "target": target.numpy()})
        expected = fcnfast.upsample_cross_entropy(x, target, 4, (3, 2, tth, ttw))
        assert_scores_close(got, expected, "cross entropy at %s" % ((b, hh, ww),))


# ---------------------------------------------------------------------------
# torch.export
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant,fixed", [("fcn8s_atonce", False), ("fcn16s", True)])
def test_torch_export_dynamic_save_load(tmp_path, variant, fixed):
    model = make(variant, "tiny", fixed)
    program = fx.export_program(model, inputs(*EXPORT_SIZE))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("fcnfast.") for t in targets), "native fcnfast ops not in the graph"
    torch.export.save(program, str(tmp_path / "m.pt2"))
    loaded = torch.export.load(str(tmp_path / "m.pt2")).module()
    for n, h, w in CHECK_SIZES:
        x = inputs(n, h, w)
        with torch.no_grad():
            expected = model(x)
            assert_scores_close(program.module()(x), expected, "program at %s" % ((n, h, w),))
            assert_scores_close(loaded(x), expected, "loaded at %s" % ((n, h, w),))


def test_torch_export_predict_path():
    model = make("fcn8s", "tiny", fixed=True)
    program = fx.export_program(model, inputs(*EXPORT_SIZE), predict=True)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fcnfast.upsample_argmax.default" in targets, sorted(targets)
    for n, h, w in CHECK_SIZES[:2]:
        x = inputs(n, h, w)
        with torch.no_grad():
            assert torch.equal(program.module()(x), model.predict(x))


def test_export_rejects_bad_example():
    model = make("fcn32s")
    with pytest.raises(ValueError, match="example"):
        fx.export_program(model, torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="example"):
        fx.export_program(model, torch.randn(3, 20, 20))
    with pytest.raises(ValueError, match="model"):
        fx.export_program("fcn8s")


# ---------------------------------------------------------------------------
# TorchScript: a clear refusal, never a size-frozen trace
# ---------------------------------------------------------------------------


class UserNet(nn.Module):
    """A user model with an fcnfast drop-in layer inside."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = ConvTranspose2d(4, 2, 4, stride=2, padding=1)

    def forward(self, x):
        return self.up(F.relu(self.conv(x)))


@pytest.mark.parametrize(
    "make_model", [lambda: make("fcn8s"), UserNet, lambda: BilinearUpsample2d(3, 2)]
)
def test_torchscript_trace_refuses(make_model):
    model = make_model().eval()
    with pytest.raises(RuntimeError, match="torch.jit.trace.*torch.export"):
        torch.jit.trace(model, inputs(1, 32, 32))


@pytest.mark.parametrize(
    "make_model", [lambda: make("fcn8s"), UserNet, lambda: nn.Sequential(nn.ReLU(), SkipFuse(3, 2))]
)
def test_torchscript_script_refuses(make_model):
    with pytest.raises(RuntimeError, match="torch.jit.script.*torch.export"):
        torch.jit.script(make_model())


def test_legacy_onnx_exporter_refuses(tmp_path):
    with pytest.raises(Exception, match="torch.export|dynamo=True"):
        torch.onnx.export(
            UserNet().eval(), (inputs(1, 16, 16),), str(tmp_path / "x.onnx"), dynamo=False
        )


def test_eager_still_runs_after_refusals():
    model = UserNet().eval()
    with pytest.raises(RuntimeError):
        torch.jit.trace(model, inputs(1, 16, 16))
    assert model(inputs(1, 17, 15)).shape == (1, 2, 18, 16)


# ---------------------------------------------------------------------------
# drop-in: output_size and state_dict, also through export
# ---------------------------------------------------------------------------


class Decoder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = layer

    def forward(self, x):
        return self.up(self.down(x), output_size=x.shape[2:])


def test_output_size_and_state_dict_through_export(tmp_path):
    torch_model = Decoder(nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)).eval()
    fast = Decoder(ConvTranspose2d(4, 2, 3, stride=2, padding=1)).eval()
    fast.load_state_dict(torch_model.state_dict())
    assert list(fast.state_dict()) == list(torch_model.state_dict())
    # a user model goes through the same helpers (any module taking one NCHW tensor)
    program = fx.export_program(fast, inputs(2, 20, 22))
    path = tmp_path / "d.onnx"
    fx.export_onnx(fast, path, inputs(2, 20, 22))
    sess = session(path)
    for n, h, w in [(3, 17, 25), (1, 30, 9), (2, 20, 22)]:
        x = inputs(n, h, w)
        with torch.no_grad():
            expected = torch_model(x)
            assert expected.shape[2:] == x.shape[2:]
            assert_scores_close(fast(x), expected, "eager")
            assert_scores_close(program.module()(x), expected, "torch.export")
        assert_scores_close(sess.run(None, {"input": x.numpy()})[0], expected, "onnx")


# ---------------------------------------------------------------------------
# wkentaro/pytorch-fcn checkpoints
# ---------------------------------------------------------------------------


class PytorchFCN(nn.Module):
    """wkentaro/pytorch-fcn's FCN32s/16s/8s/8sAtOnce (torchfcn.models), their layer names and
    forward, with the conv widths divided by ``div`` and ``fc`` fc6/fc7 channels (div=1,
    fc=4096: their exact nets; div=8, fc=256: fcnfast's "small" backbone)."""

    def __init__(self, variant, n_class=21, div=1, fc=4096):
        super().__init__()
        self.variant = variant
        widths = [64 // div, 128 // div, 256 // div, 512 // div, 512 // div]
        c = 3
        for b, n in enumerate((2, 2, 3, 3, 3), 1):
            for i in range(1, n + 1):
                setattr(
                    self,
                    "conv%d_%d" % (b, i),
                    nn.Conv2d(c, widths[b - 1], 3, padding=100 if (b, i) == (1, 1) else 1),
                )
                c = widths[b - 1]
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.fc6 = nn.Conv2d(widths[4], fc, 7)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.drop = nn.Dropout2d()
        self.score_fr = nn.Conv2d(fc, n_class, 1)
        if variant == "fcn32s":
            self.upscore = nn.ConvTranspose2d(n_class, n_class, 64, stride=32, bias=False)
        else:
            self.score_pool4 = nn.Conv2d(widths[3], n_class, 1)
            self.upscore2 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
        if variant == "fcn16s":
            self.upscore16 = nn.ConvTranspose2d(n_class, n_class, 32, stride=16, bias=False)
        if variant.startswith("fcn8s"):
            self.score_pool3 = nn.Conv2d(widths[2], n_class, 1)
            self.upscore_pool4 = nn.ConvTranspose2d(n_class, n_class, 4, stride=2, bias=False)
            self.upscore8 = nn.ConvTranspose2d(n_class, n_class, 16, stride=8, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=(2.0 / (m.weight[0].numel())) ** 0.5)
                nn.init.normal_(m.bias, std=0.1)
            if isinstance(m, nn.ConvTranspose2d):  # get_upsampling_weight + noise (learned)
                m.weight.data.copy_(
                    bilinear_kernel(n_class, m.kernel_size[0]) + 0.01 * torch.randn(m.weight.shape)
                )

    def forward(self, x):
        h = x
        for b, n in enumerate((2, 2, 3, 3, 3), 1):
            for i in range(1, n + 1):
                h = F.relu(getattr(self, "conv%d_%d" % (b, i))(h))
            h = self.pool(h)
            if b == 3:
                pool3 = h
            if b == 4:
                pool4 = h
        h = self.drop(F.relu(self.fc6(h)))
        h = self.drop(F.relu(self.fc7(h)))
        h = self.score_fr(h)
        if self.variant == "fcn32s":
            h = self.upscore(h)
            return h[:, :, 19 : 19 + x.size()[2], 19 : 19 + x.size()[3]].contiguous()
        atonce = self.variant == "fcn8s_atonce"
        h = self.upscore2(h)
        upscore2 = h
        h = self.score_pool4(pool4 * 0.01 if atonce else pool4)
        h = h[:, :, 5 : 5 + upscore2.size()[2], 5 : 5 + upscore2.size()[3]]
        h = upscore2 + h
        if self.variant == "fcn16s":
            h = self.upscore16(h)
            return h[:, :, 27 : 27 + x.size()[2], 27 : 27 + x.size()[3]].contiguous()
        h = self.upscore_pool4(h)
        upscore_pool4 = h
        h = self.score_pool3(pool3 * 0.0001 if atonce else pool3)
        h = h[:, :, 9 : 9 + upscore_pool4.size()[2], 9 : 9 + upscore_pool4.size()[3]]
        h = self.upscore8(upscore_pool4 + h)
        return h[:, :, 31 : 31 + x.size()[2], 31 : 31 + x.size()[3]].contiguous()


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"])
def test_pytorch_fcn_checkpoint_loads_with_equal_outputs(tmp_path, variant):
    from fcnfast.checkpoints import from_pytorch_fcn, load_pytorch_fcn

    torch.manual_seed(3)
    theirs = PytorchFCN(variant, n_class=4, div=8, fc=256).eval()
    path = tmp_path / ("%s_from_caffe.pth" % variant)
    torch.save(theirs.state_dict(), path)
    ours = from_pytorch_fcn(torch.load(path), variant=variant if "8s" in variant else None)
    assert ours.spec.name == "small" and ours.variant == variant and ours.num_classes == 4
    # into an explicitly built model too, and through the public load_model
    built = build_model(variant, num_classes=4, backbone="small").eval()
    load_pytorch_fcn(built, {"model_state_dict": theirs.state_dict()})  # their trainer's format
    loaded = fcnfast.load_model(path, variant=variant if "8s" in variant else None)
    for n, h, w in [(1, 37, 45), (2, 20, 13)]:
        x = inputs(n, h, w)
        with torch.no_grad():
            expected = theirs(x)
            for m in (ours, built, loaded):
                assert_scores_close(m(x), expected, "%s at %s" % (variant, (n, h, w)))


def test_pytorch_fcn_errors_and_fixed_upsampling():
    from fcnfast.checkpoints import from_pytorch_fcn, load_pytorch_fcn

    state = PytorchFCN("fcn8s", n_class=3, div=8, fc=256).state_dict()
    with pytest.raises(ValueError, match="variant='fcn8s' or 'fcn8s_atonce'"):
        from_pytorch_fcn(state)
    with pytest.raises(ValueError, match="not the bilinear kernel"):
        from_pytorch_fcn(state, "fcn8s", fixed_upsampling=True)
    with pytest.raises(ValueError, match="batch norm"):
        load_pytorch_fcn(build_model("fcn8s", num_classes=3, backbone="tiny"), state)
    with pytest.raises(ValueError, match="missing"):
        load_pytorch_fcn(build_model("fcn16s", num_classes=3, backbone="small"), state)
    # a frozen bilinear final layer (pytorch-fcn's own init) loads into the fixed path
    theirs = PytorchFCN("fcn32s", n_class=3, div=8, fc=256).eval()
    with torch.no_grad():
        theirs.upscore.weight.copy_(bilinear_kernel(3, 64))
    ours = from_pytorch_fcn(theirs.state_dict(), fixed_upsampling=True)
    assert ours.fixed_upsampling and not any("upscore" in k for k in ours.state_dict())
    x = inputs(1, 21, 30)
    with torch.no_grad():
        assert_scores_close(ours(x), theirs(x), "fixed fcn32s")


# ---------------------------------------------------------------------------
# fcnfast.nn.convert
# ---------------------------------------------------------------------------


def test_convert_swaps_layers_with_equal_outputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU())
            self.deconv = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1)
            self.upscore = nn.ConvTranspose2d(4, 4, 8, stride=4, bias=False)
            self.upscore.weight.data.copy_(bilinear_kernel(4, 8))
            self.upscore.weight.requires_grad_(False)
            self.depthwise = nn.ConvTranspose2d(4, 4, 4, stride=2, bias=False, groups=4)
            self.depthwise.weight.data.copy_(
                fcnfast.reference.bilinear_filter(4).expand(4, 1, 4, 4)
            )
            self.depthwise.weight.requires_grad_(False)
            self.interp = nn.Upsample(scale_factor=2, mode="bilinear")
            self.interp4 = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
            self.corners = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

        def forward(self, x):
            h = self.body(x)
            a = self.deconv(h, output_size=(2 * h.shape[2], 2 * h.shape[3]))
            b = self.upscore(a)
            c = self.depthwise(a)
            return a, b, c, self.interp(a), self.interp4(h), self.corners(a)

    torch.manual_seed(0)
    net = Net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = inputs(2, 29, 34)
    with torch.no_grad():
        expected = net(x)
    fcnfast.nn.convert(net)
    assert type(net.deconv) is ConvTranspose2d
    assert (
        type(net.upscore) is fcnfast.nn.FrozenBilinearConvTranspose2d
        and net.upscore.fixed_scale == 4
    )
    assert type(net.depthwise) is fcnfast.nn.FrozenBilinearConvTranspose2d
    assert type(net.interp) is fcnfast.nn.BilinearInterpolate2d and net.interp4.scale == 4
    assert type(net.corners) is nn.Upsample  # align_corners: not converted
    assert type(net.body[0]) is nn.Conv2d
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        got = net(x)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_scores_close(g, e, "output %d" % i)
    # the fixed path follows the weight: loading other weights switches to the general op
    state = net.state_dict()
    state["upscore.weight"] = state["upscore.weight"] * 2
    net.load_state_dict(state)
    assert net.upscore.fixed_scale is None
    with torch.no_grad():
        assert_scores_close(net(x)[1], 2 * expected[1], "reloaded upscore")


def test_convert_fixed_path_is_used(monkeypatch):
    m = nn.ConvTranspose2d(3, 3, 4, stride=2, bias=False)
    m.weight.data.copy_(bilinear_kernel(3, 4))
    m.weight.requires_grad_(False)
    m = fcnfast.nn.convert(m)
    calls = []
    real = fcnfast.ops.bilinear_upsample2d
    monkeypatch.setattr(
        fcnfast.ops, "bilinear_upsample2d", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    m(inputs(1, 5, 6))
    assert calls, "frozen bilinear deconvolution did not take the fixed path"
    m.weight.requires_grad_(True)  # trainable again: the general op, with weight grads
    out = m(inputs(1, 5, 6))
    out.sum().backward()
    assert m.weight.grad is not None and len(calls) == 1
    with pytest.raises(ValueError, match="module"):
        fcnfast.nn.convert("not a module")


# ---------------------------------------------------------------------------
# load_model and `fcnfast export`
# ---------------------------------------------------------------------------


def _train_checkpoint(tmp_path, model):
    from fcnfast.train import CHECKPOINT_FORMAT, TrainConfig, save_checkpoint

    cfg = TrainConfig(model="fcn16s", backbone="tiny", num_classes=model.num_classes)
    return save_checkpoint(
        {"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "model": model.state_dict()},
        tmp_path / "demo.pt",
    )


def test_load_model_reads_train_checkpoint(tmp_path):
    from fcnfast.train import TrainConfig

    cfg = TrainConfig(model="fcn16s", backbone="tiny")
    model = randomize(
        build_model(
            "fcn16s",
            num_classes=cfg.num_classes,
            backbone="tiny",
            fixed_upsampling=cfg.fixed_upsampling,
            dropout=cfg.dropout,
        )
    )
    path = _train_checkpoint(tmp_path, model)
    loaded = fcnfast.load_model(path)
    assert isinstance(loaded, FCN) and not loaded.training
    x = inputs(1, 23, 19)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(FileNotFoundError):
        fcnfast.load_model(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        fcnfast.load_model(tmp_path / "junk.pt")


def test_cli_export_onnx_and_pt2(tmp_path, capsys):
    from fcnfast.cli import main

    model = randomize(build_model("fcn16s", num_classes=21, backbone="tiny", dropout=0.1))
    ckpt = _train_checkpoint(tmp_path, model)
    assert (
        main(["export", "--format", "onnx", "--model", str(ckpt), "-o", str(tmp_path / "m.onnx")])
        == 0
    )
    assert (
        main(["export", "--format", "pt2", "--model", str(ckpt), "-o", str(tmp_path / "m.pt2")])
        == 0
    )
    assert (
        main(
            [
                "export",
                "--format",
                "pt2",
                "--model",
                "fcn8s",
                "--backbone",
                "tiny",
                "--fixed-upsampling",
                "--predict",
                "-o",
                str(tmp_path / "p.pt2"),
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    x = inputs(3, 31, 27)
    with torch.no_grad():
        expected = model(x)
    assert_scores_close(
        session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0], expected, "cli onnx"
    )
    with torch.no_grad():
        assert_scores_close(
            torch.export.load(str(tmp_path / "m.pt2")).module()(x), expected, "cli pt2"
        )
        labels = torch.export.load(str(tmp_path / "p.pt2")).module()(x)
    assert labels.shape == (3, 31, 27) and labels.dtype == torch.int64
    assert (
        main(["export", "--format", "onnx", "--model", "nonsense", "-o", str(tmp_path / "x.onnx")])
        == 2
    )
    assert "neither an existing checkpoint" in capsys.readouterr().err
