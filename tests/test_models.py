"""FCN models: geometry (Caffe crop offsets, same-size output for every input size),
upsampling semantics, native-vs-reference agreement, load_vgg16."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_scaled
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

import fcnfast
from fcnfast import reference
from fcnfast.models import (
    BACKBONES,
    FCN,
    BackboneSpec,
    build_model,
    fcn8s,
    fcn8s_atonce,
    load_vgg16,
)
from fcnfast.models.vgg import vgg16_key_map

VARIANTS = ["fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"]

# Caffe voc-fcn*s crop offsets (DESIGN.md), typed in independently of the model code
CAFFE_OFFSETS = {
    "fcn32s": {"upscore": 19},
    "fcn16s": {"score_pool4": 5, "upscore16": 27},
    "fcn8s": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
    "fcn8s_atonce": {"score_pool4": 5, "score_pool3": 9, "upscore8": 31},
}
UPSCALE = {"fcn32s": 32, "fcn16s": 16, "fcn8s": 8, "fcn8s_atonce": 8}


def randomize(model: FCN, std: float = 0.05, seed: int = 0, upsampling: bool = True) -> FCN:
    """Non-zero score layers (and perturbed learned upsampling), so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    prefixes = ("score", "upscore") if upsampling else ("score",)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * std)
    return model


def meta_model(variant, **kw):
    with torch.device("meta"):
        return build_model(variant, **kw)


# -- geometry ---------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vgg16", "tiny", "small"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_crop_offsets_equal_caffe_constants(variant, backbone):
    model = meta_model(variant, backbone=backbone)
    assert model.offsets == CAFFE_OFFSETS[variant]
    assert model.upscale == UPSCALE[variant]
    for name in ("score_pool4", "score_pool3"):
        if name in CAFFE_OFFSETS[variant]:
            assert getattr(model, name).offset == (CAFFE_OFFSETS[variant][name],) * 2


def test_vgg16_layout():
    model = meta_model("fcn8s")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    pools = [m for m in model.features if isinstance(m, torch.nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert convs[0].padding == (100, 100) and all(c.padding == (1, 1) for c in convs[1:])
    assert len(pools) == 5 and all(
        p.ceil_mode and p.kernel_size == 2 and p.stride == 2 for p in pools
    )
    assert tuple(model.fc6.weight.shape) == (4096, 512, 7, 7)
    assert tuple(model.fc7.weight.shape) == (4096, 4096, 1, 1)
    assert tuple(model.score_fr.weight.shape) == (21, 4096, 1, 1)
    # element-wise (not channel) dropout 0.5 after fc6 and fc7
    for drop in (model.drop6, model.drop7):
        assert type(drop) is torch.nn.Dropout and drop.p == 0.5
    # 134.5M parameters like Caffe's FCN-8s (VGG16 without fc8, plus the score/upscore layers)
    assert abs(sum(p.numel() for p in model.parameters()) - 134_489_759) == 0


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_every_size_1_to_600_keeps_shape_vgg16_meta(variant):
    """Shape-only (meta device) run of the full VGG16 FCNs for every size 1..600: the crop
    windows fit (ops validate them) and the output is H x W. Rectangular pairs cover both axes.
    (fcn8s_atonce has fcn8s' geometry.)"""
    model = meta_model(variant, fixed_upsampling=(variant == "fcn16s"))
    for h in range(1, 601):
        w = 601 - h
        out = model(torch.empty(1, 3, h, w, device="meta"))
        assert tuple(out.shape) == (1, 21, h, w), (h, w)


def test_every_small_size_keeps_shape_tiny():
    torch.manual_seed(0)
    model = randomize(fcn8s(num_classes=2, in_channels=1, backbone="tiny")).eval()
    with torch.no_grad():
        for h in range(1, 41):
            w = 41 - h  # every height and every width 1..40 once
            out = model(torch.randn(1, 1, h, w))
            assert out.shape == (1, 2, h, w)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_larger_sizes_keep_shape_tiny(variant):
    model = build_model(variant, num_classes=3, backbone="tiny").eval()
    with torch.no_grad():
        for size in [(97, 3), (5, 255), (333, 17), (2, 599), (600, 9), (131, 129)]:
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 3) + size


def test_full_vgg16_runs():
    model = randomize(fcn8s()).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 3, 2))
    assert out.shape == (1, 21, 3, 2) and torch.isfinite(out).all()


# -- upsampling and prediction ---------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_fixed_upsampling_forward_is_bilinear_of_coarse_scores(variant):
    model = randomize(build_model(variant, num_classes=4, backbone="tiny", fixed_upsampling=True))
    model.eval()
    assert model.fixed_upsampling and model.final_upsample.weight is None
    x = torch.randn(2, 3, 45, 38)
    scores, crop = model.coarse_scores(x)
    final_offset = max(CAFFE_OFFSETS[variant].values())
    assert crop == (final_offset, final_offset, 45, 38)
    expected = reference.bilinear_upsample2d(scores, UPSCALE[variant], crop)
    assert_close_scaled(model(x), expected)
    # frozen final layer: no parameters named like the final upsampling
    final = {32: "upscore.", 16: "upscore16.", 8: "upscore8."}[UPSCALE[variant]]
    assert not any(n.startswith(final) for n, _ in model.named_parameters())


def test_fixed_upsampling_crop_offsets():
    for variant, offsets in CAFFE_OFFSETS.items():
        model = build_model(variant, num_classes=2, backbone="tiny", fixed_upsampling=True)
        _, crop = model.coarse_scores(torch.randn(1, 3, 20, 30))
        final = max(offsets.values())
        assert crop == (final, final, 20, 30)


@pytest.mark.parametrize("variant", VARIANTS)
def test_learned_upsampling_starts_bilinear(variant):
    """Learned deconvolutions start as the Caffe bilinear filter, so at initialisation the
    learned model computes the same function as the fixed one."""
    learned = build_model(variant, num_classes=3, backbone="tiny").eval()
    fixed = build_model(
        variant, num_classes=3, backbone="tiny", fixed_upsampling=True, fixed_skip_upsampling=True
    ).eval()
    # the k=4 filter of the 2x layers, written out: 1-D [1, 3, 3, 1] / 4
    f4 = torch.tensor([0.25, 0.75, 0.75, 0.25])
    for name, module in learned.named_modules():
        if isinstance(module, fcnfast.nn.BilinearUpsample2d):
            assert module.learnable
            k = 2 * module.scale
            w = module.weight.detach()
            assert w.shape == (3, 3, k, k)
            off_diagonal = w.clone()
            off_diagonal[range(3), range(3)] = 0
            assert not off_diagonal.any(), name
            if k == 4:
                assert torch.allclose(w[1, 1], torch.outer(f4, f4))
            centre = (k - 1) / 2
            ramp = 1 - (torch.arange(k) - centre).abs() / (k // 2)
            assert torch.allclose(w[2, 2], torch.outer(ramp, ramp))
    randomize(learned, std=0.3, upsampling=False)
    fixed.load_state_dict({k: v for k, v in learned.state_dict().items() if "upscore" not in k})
    x = torch.randn(1, 3, 29, 35)
    with torch.no_grad():
        out = learned(x)
        assert out.abs().max() > 1e-3
        assert_close_scaled(out, fixed(x))


@pytest.mark.parametrize(
    "variant,fixed", [("fcn32s", True), ("fcn16s", False), ("fcn8s", True), ("fcn8s_atonce", False)]
)
def test_predict_is_argmax_of_forward(variant, fixed):
    model = randomize(
        build_model(variant, num_classes=5, backbone="tiny", fixed_upsampling=fixed), std=2.0
    ).eval()
    with torch.no_grad():
        # no class favoured everywhere: no bias, and no response to the features' common mode
        model.score_fr.bias.zero_()
        model.score_fr.weight.sub_(model.score_fr.weight.mean(1, keepdim=True))
    x = torch.randn(2, 3, 45, 70)  # large enough for a 2x3 score map even for FCN-32s
    labels = model.predict(x)
    assert labels.dtype == torch.int64 and labels.shape == (2, 45, 70)
    with torch.no_grad():
        assert torch.equal(labels, model(x).argmax(1))
    assert len(labels.unique()) > 1  # a real label map, not a constant


@pytest.mark.parametrize("fixed", [False, True])
def test_loss_matches_cross_entropy_of_forward(fixed):
    model = randomize(fcn8s(num_classes=4, backbone="tiny", fixed_upsampling=fixed), std=0.5).eval()
    x = torch.randn(2, 3, 20, 16)
    target = torch.randint(0, 4, (2, 20, 16))
    target[:, :3] = 255
    for reduction in ("mean", "sum"):
        expected = F.cross_entropy(model(x), target, ignore_index=255, reduction=reduction)
        assert_close_scaled(model.loss(x, target, reduction=reduction), expected)


def test_atonce_scales_pool4_and_pool3():
    torch.manual_seed(0)
    atonce = randomize(fcn8s_atonce(num_classes=3, backbone="tiny"), std=0.5).eval()
    assert atonce.score_pool4.scale == 0.01 and atonce.score_pool3.scale == 0.0001
    plain = fcn8s(num_classes=3, backbone="tiny").eval()
    assert plain.score_pool4.scale == 1.0 and plain.score_pool3.scale == 1.0
    # FCN-8s with the score weights pre-multiplied by the at-once scales is the same function
    state = atonce.state_dict()
    state["score_pool4.weight"] = state["score_pool4.weight"] * 0.01
    state["score_pool3.weight"] = state["score_pool3.weight"] * 0.0001
    plain.load_state_dict(state)
    x = torch.randn(1, 3, 30, 24)
    with torch.no_grad():
        out = atonce(x)
        assert_close_scaled(plain(x), out)
        # and the scaling matters: unscaled weights give a different output
        plain.load_state_dict(atonce.state_dict())
        assert (plain(x) - out).abs().max() > 1e-3


def test_score_layers_start_at_zero():
    model = fcn8s(num_classes=4, backbone="tiny")
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model, name)
        assert not layer.weight.any() and not layer.bias.any()
    assert model.features[0].weight.std() > 0


def test_in_channels_5():
    model = randomize(fcn8s(num_classes=6, in_channels=5, backbone="tiny")).eval()
    assert model.features[0].weight.shape[1] == 5
    out = model(torch.randn(2, 5, 23, 31))
    assert out.shape == (2, 6, 23, 31)
    with pytest.raises(ValueError, match=r"\(N, 5, H, W\)"):
        model(torch.randn(2, 3, 23, 31))


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("fcn4s")
    with pytest.raises(ValueError, match="backbone must be one of"):
        fcn8s(backbone="resnet")
    with pytest.raises(ValueError, match="num_classes"):
        fcn8s(num_classes=0, backbone="tiny")
    with pytest.raises(ValueError, match="in_channels"):
        fcn8s(in_channels=0, backbone="tiny")
    with pytest.raises(ValueError, match="positive height"):
        fcn8s(backbone="tiny")(torch.randn(1, 3, 0, 5))


def test_build_model_names():
    for name, cls_variant in [
        ("fcn32s", "fcn32s"),
        ("FCN-16s", "fcn16s"),
        ("fcn8s-atonce", "fcn8s_atonce"),
    ]:
        assert build_model(name, backbone="tiny").variant == cls_variant


# -- native vs reference -----------------------------------------------------


@pytest.mark.parametrize(
    "variant,fixed", [("fcn32s", False), ("fcn16s", True), ("fcn8s", False), ("fcn8s_atonce", True)]
)
def test_native_and_reference_agree_on_whole_model(variant, fixed):
    """Outputs and every parameter/input gradient agree between the backends (fp64).
    Passes trivially while no native kernel is built; meaningful once they are."""
    model = (
        randomize(
            build_model(variant, num_classes=4, backbone="tiny", fixed_upsampling=fixed), std=0.3
        )
        .double()
        .eval()
    )
    x0 = torch.randn(2, 3, 21, 19, dtype=torch.float64)
    g = torch.randn(2, 4, 21, 19, dtype=torch.float64)

    def run():
        x = x0.clone().requires_grad_(True)
        model.zero_grad()
        out = model(x)
        out.backward(g)
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_n, gx_n, gp_n = run()
    with fcnfast.use_backend("reference"):
        out_r, gx_r, gp_r = run()
    assert_close_scaled(out_n, out_r, what="output")
    assert_close_scaled(gx_n, gx_r, what="grad x")
    assert gp_n.keys() == gp_r.keys()
    for name in gp_r:
        assert_close_scaled(gp_n[name], gp_r[name], what="grad " + name)
    assert gp_r["score_fr.weight"].abs().max() > 0


# -- load_vgg16 --------------------------------------------------------------

NARROW = BackboneSpec("narrow", (4, 8, 16, 32, 32), 64)  # VGG16 layers, no batch norm


def torchvision_vgg16_state(spec=NARROW, seed=0):
    """A random state dict with torchvision ``vgg16()`` keys and shapes (for the given widths)."""
    g = torch.Generator().manual_seed(seed)
    state, channels, index = {}, 3, 0
    for convs, width in zip((2, 2, 3, 3, 3), spec.widths):
        for _ in range(convs):
            state["features.%d.weight" % index] = (
                torch.randn(width, channels, 3, 3, generator=g) * 0.2
            )
            state["features.%d.bias" % index] = torch.randn(width, generator=g) * 0.1
            channels = width
            index += 2
        index += 1
    fc = spec.fc_width
    state["classifier.0.weight"] = torch.randn(fc, channels * 49, generator=g) * 0.05
    state["classifier.0.bias"] = torch.randn(fc, generator=g) * 0.1
    state["classifier.3.weight"] = torch.randn(fc, fc, generator=g) * 0.1
    state["classifier.3.bias"] = torch.randn(fc, generator=g) * 0.1
    state["classifier.6.weight"] = torch.randn(1000, fc, generator=g)
    state["classifier.6.bias"] = torch.randn(1000, generator=g)
    return state


def plain_vgg_classifier_fc7(state, image):
    """torchvision VGG16 up to fc7 (padding 1, floor pooling, Linear layers), from the state dict."""
    h, index = image, 0
    for convs in (2, 2, 3, 3, 3):
        for _ in range(convs):
            h = F.relu(
                F.conv2d(
                    h,
                    state["features.%d.weight" % index],
                    state["features.%d.bias" % index],
                    padding=1,
                )
            )
            index += 2
        h = F.max_pool2d(h, 2, 2)
        index += 1
    pool5 = h
    fc6 = F.relu(
        F.linear(pool5.flatten(1), state["classifier.0.weight"], state["classifier.0.bias"])
    )
    fc7 = F.relu(F.linear(fc6, state["classifier.3.weight"], state["classifier.3.bias"]))
    return pool5, fc6, fc7


def test_load_vgg16_round_trip(tmp_path):
    state = torchvision_vgg16_state()
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = load_vgg16(path, num_classes=5, model="fcn16s", backbone=NARROW).eval()
    assert model.variant == "fcn16s" and model.num_classes == 5
    params = dict(model.named_parameters())
    for key in state:
        if key.startswith("features."):
            assert torch.equal(params[key], state[key])
    assert torch.equal(params["fc6.weight"].flatten(1), state["classifier.0.weight"])
    assert torch.equal(params["fc7.weight"].flatten(1), state["classifier.3.weight"])
    # the FCN's fc6/fc7 convolutions compute the classifier's Linear layers on a 7x7 pool5
    image = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        pool5, fc6, fc7 = plain_vgg_classifier_fc7(state, image)
        assert pool5.shape[-2:] == (7, 7)
        conv6 = F.relu(model.fc6(pool5))
        conv7 = F.relu(model.fc7(conv6))
    assert conv6.shape[-2:] == (1, 1)
    assert_close_scaled(conv6.flatten(1), fc6)
    assert_close_scaled(conv7.flatten(1), fc7)
    # and the same weights from an in-memory dict (wrapped as a checkpoint)
    again = load_vgg16({"state_dict": state}, num_classes=5, model="fcn16s", backbone=NARROW)
    assert torch.equal(again.fc6.weight, model.fc6.weight)


def test_load_vgg16_key_map_covers_vgg16():
    keys = vgg16_key_map()
    assert len(keys) == 2 * 13 + 4
    conv_indices = sorted({int(k.split(".")[1]) for k in keys if k.startswith("features.")})
    assert conv_indices == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    model = meta_model("fcn8s")
    params = dict(model.named_parameters())
    for dst in keys.values():
        assert dst in params, dst


def test_load_vgg16_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg16(missing, backbone=NARROW)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a torch file")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_vgg16(corrupt, backbone=NARROW)
    state = torchvision_vgg16_state()
    del state["features.12.bias"], state["classifier.3.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth.*features\.12\.bias.*classifier\.3\.weight"):
        load_vgg16(tmp_path / "partial.pth", backbone=NARROW)
    wrong = torchvision_vgg16_state(BACKBONES["small"])  # right keys, other widths
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(
        ValueError, match=r"wrong.pth: features\.0\.weight has shape \(8, 3, 3, 3\)"
    ):
        load_vgg16(tmp_path / "wrong.pth", backbone=NARROW)
    with pytest.raises(ValueError, match="features.0.weight"):
        load_vgg16(torchvision_vgg16_state(), in_channels=4, backbone=NARROW)
    with pytest.raises(ValueError, match="batch norm"):
        load_vgg16(torchvision_vgg16_state(), backbone="tiny")


def test_tiny_backbone_layout():
    model = fcn8s(backbone="tiny")
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [4] * 2 + [8] * 2 + [16] * 3 + [32] * 6
    assert len(norms) == 13 and convs[0].padding == (100, 100)
    assert model.fc6.kernel_size == (7, 7) and model.fc6.out_channels == 128
    assert model.drop6.p == 0.1 and fcn8s(backbone="tiny", dropout=0.5).drop7.p == 0.5


def test_channels_last_gives_the_same_output_and_gradients():
    model = randomize(fcn8s(num_classes=3, backbone="tiny", fixed_upsampling=True), std=0.3).eval()
    x = torch.randn(2, 3, 26, 31)
    target = torch.randint(0, 3, (2, 26, 31))

    def run(m, inp):
        m.zero_grad()
        out = m(inp)
        m.loss(inp, target).backward()
        return out.detach().contiguous(), m.score_pool3.weight.grad.clone()

    out, grad = run(model, x)
    model = model.to(memory_format=torch.channels_last)
    out_cl, grad_cl = run(model, x.contiguous(memory_format=torch.channels_last))
    assert_close_scaled(out_cl, out)
    assert_close_scaled(grad_cl, grad)


# -- fused defaults: the final upsampling decides ----------------------------------------


def _spy(monkeypatch, name):
    from fcnfast.models import fcn as fcn_module

    calls = []
    real = getattr(fcn_module.ops, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(fcn_module.ops, name, spy)
    return calls


def test_learned_final_still_bilinear_uses_the_fused_ops(monkeypatch):
    """A learned final upsampling whose weight is still the bilinear kernel: predict runs
    upsample_argmax; loss runs upsample_cross_entropy once the weight takes no gradient."""
    model = randomize(fcn8s(num_classes=4, backbone="tiny"), std=0.5).eval()
    with torch.no_grad():
        model.upscore8.weight.copy_(fcnfast.nn.bilinear_kernel(4, 16))
    x = torch.randn(3, 3, 30, 26)
    target = torch.randint(0, 4, (3, 30, 26))
    argmax_calls = _spy(monkeypatch, "upsample_argmax")
    ce_calls = _spy(monkeypatch, "upsample_cross_entropy")
    with torch.no_grad():
        assert torch.equal(model.predict(x), model(x).argmax(1))
    assert argmax_calls == ["upsample_argmax"]
    expected = F.cross_entropy(model(x), target, ignore_index=255)
    loss = model.loss(x, target)  # the weight takes a gradient: unfused
    assert ce_calls == [] and loss.requires_grad
    assert torch.autograd.grad(loss, model.upscore8.weight)[0].abs().max() > 0
    model.upscore8.weight.requires_grad_(False)
    assert_close_scaled(model.loss(x, target), expected.detach())
    assert ce_calls == ["upsample_cross_entropy"]


def test_trained_final_predict_is_chunked_and_exact(monkeypatch):

    model = randomize(fcn8s(num_classes=5, backbone="tiny"), std=1.0).eval()
    argmax_calls = _spy(monkeypatch, "upsample_argmax")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 37, 41)
        with torch.no_grad():
            assert torch.equal(model.predict(x), model(x).argmax(1))
    assert argmax_calls == []


def test_label_map_equals_argmax_with_ties():
    from fcnfast.models.fcn import label_map

    scores = torch.randint(0, 3, (2, 6, 9, 11)).float()  # many ties: lowest index wins
    assert torch.equal(label_map(scores), scores.argmax(1))
    assert torch.equal(label_map(scores.bfloat16()), scores.bfloat16().argmax(1))
