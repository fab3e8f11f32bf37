"""Issue 16, item 4: tiled inference gives exactly the whole-image labels (odd sizes), and a
halo smaller than the receptive field would not."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast import cli
from fcnfast.models import build_model
from fcnfast.tiling import output_stride, receptive_halo, tiled_labels, tiles


def _randomize(state, seed=0):
    """Random weights everywhere (the score layers start at zero: every label would be 0)."""
    g = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if value.dim() == 4:  # conv / deconv weight: He-like scale
            fan_in = value[0].numel()
            value.copy_(torch.randn(value.shape, generator=g) * (2.0 / fan_in) ** 0.5)
        elif key.endswith("running_var"):
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        elif key.endswith("weight"):  # batch norm scale
            value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        else:  # biases, running means
            value.copy_(torch.randn(value.shape, generator=g) * 0.01)
    return state


def _model(name, seed=0, fixed=False):
    model = build_model(name, num_classes=5, backbone="tiny", fixed_upsampling=fixed).eval()
    state = _randomize(model.state_dict(), seed)
    if fixed:  # keep the frozen bilinear upsampling bilinear
        state = {k: v for k, v in state.items() if "upscore" not in k}
    model.load_state_dict(state, strict=False)
    return model


def test_halo_and_stride_of_the_fcns():
    model = _model("fcn8s")
    assert output_stride(model) == 32
    halo = receptive_halo(model)
    assert halo % 32 == 0 and halo >= 404 // 2  # fc6 sees 404 px in VGG16's geometry


def test_tiles_cover_the_image_once():
    cover = np.zeros((301, 257), np.int32)
    for (y0, _, x0, _), (cy0, cy1, cx0, cx1) in tiles(301, 257, 100, 64, 32):
        assert y0 % 32 == 0 and x0 % 32 == 0
        cover[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1] += 1
    assert (cover == 1).all()


@pytest.mark.parametrize(
    "name,fixed,size", [("fcn8s", False, (717, 651)), ("fcn32s", True, (653, 709))]
)
def test_tiled_equals_whole_image_on_odd_sizes(name, fixed, size):
    model = _model(name, fixed=fixed)
    h, w = size
    x = torch.randn(1, 3, h, w) * 2
    # structure, so that the labels are not one class everywhere
    x[:, 0, : h // 2] += 3
    x[:, 1, :, w // 3 :] -= 3
    whole = model.predict(x)[0].numpy().astype(np.uint8)
    assert len(np.unique(whole)) > 1

    def window(y0, y1, x0, x1):
        return x[:, :, y0:y1, x0:x1]

    tiled = tiled_labels(model, h, w, window, tile=224)  # 3 x 3 tiles, inner ones fully inside
    assert np.array_equal(tiled, whole)
    # the test can fail: a halo of one stride misses context and changes labels
    short = tiled_labels(model, h, w, window, tile=224, halo=32)
    assert not np.array_equal(short, whole)


def _predict_tiled_equals_whole(args, tile, tmp_path, capsys):
    """``fcnfast predict`` (``args``) with ``--tile 0`` and ``--tile <tile>``: the same label map,
    holding more than one class."""
    assert cli.main([*args, "-o", str(tmp_path / "whole.png"), "--tile", "0"]) == 0
    assert cli.main([*args, "-o", str(tmp_path / "tiled.png"), "--tile", str(tile)]) == 0
    assert "[tiles of %d]" % tile in capsys.readouterr().out
    whole = np.asarray(Image.open(tmp_path / "whole.png"))
    assert len(np.unique(whole)) > 1
    assert np.array_equal(whole, np.asarray(Image.open(tmp_path / "tiled.png")))


def test_predict_and_eval_tile_flag_equal_whole_image(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY_TRAIN_ARGS, "--out", str(out)]) == 0
    from fcnfast.train import save_checkpoint

    ckpt = str(out / "checkpoint.pt")
    state = torch.load(ckpt, weights_only=True)
    _randomize(state["model"], seed=1)  # so that the label maps are not one class everywhere
    save_checkpoint(state, ckpt)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (611, 589, 3), dtype=np.uint8)
    image[:300] //= 3
    Image.fromarray(image).save(tmp_path / "big.png")
    _predict_tiled_equals_whole(
        ["predict", str(tmp_path / "big.png"), "--checkpoint", ckpt, "--quiet"],
        200,
        tmp_path,
        capsys,
    )
    # eval: the same scores tiled and whole (synthetic validation scenes are 36 px: one tile
    # each, so compare on a VOC folder of bigger images)
    from fcnfast.data import write_synthetic_voc

    voc = write_synthetic_voc(
        tmp_path / "voc", num_train=1, num_val=1, size=(301, 333), num_classes=4, seed=2
    )
    scores = []
    for tile in ("0", "96"):
        assert (
            cli.main(
                [
                    "eval",
                    "--checkpoint",
                    ckpt,
                    "--data",
                    str(voc),
                    "--json",
                    "--quiet",
                    "--tile",
                    tile,
                ]
            )
            == 0
        )
        scores.append(capsys.readouterr().out)
    assert scores[0] == scores[1]
    assert 0.0 < json.loads(scores[0])["fcn"]["pixel_acc"] < 1.0


def test_tiled_crf_is_bounded_and_whole_image_crf_with_one_tile():
    from fcnfast import crf

    model = _model("fcn8s", seed=3)
    h, w = 97, 131
    image = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, h, w), dtype=np.uint8))[
        None
    ]
    x = (image.float() / 255 - 0.45) / 0.25

    def window(y0, y1, x0, x1):
        return x[:, :, y0:y1, x0:x1]

    def refine(logits, y0, y1, x0, x1):
        assert logits.shape[-2:] == (y1 - y0, x1 - x0)
        return crf.dense_crf(logits, image[:, :, y0:y1, x0:x1]).argmax(1)[0]

    with torch.no_grad():
        whole = crf.dense_crf(model(x), image).argmax(1)[0].numpy()
    one_tile = tiled_labels(model, h, w, window, tile=160, crf=refine)
    assert np.array_equal(one_tile, whole)
    sizes = []

    def refine_logged(logits, y0, y1, x0, x1):
        sizes.append((y1 - y0, x1 - x0))
        return refine(logits, y0, y1, x0, x1)

    tiled = tiled_labels(model, h, w, window, tile=32, crf=refine_logged, crf_halo=16)
    assert tiled.shape == (h, w) and len(sizes) == 4 * 5
    assert max(a for a, _ in sizes) <= 32 + 2 * 16  # the CRF sees the tile + its halo only
    assert (tiled == whole).mean() > 0.5


def _camvid_like(h, w, seed=0):
    """A smooth random uint8 image (structure at 8 px scale, like a photo), (1, 3, h, w)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g) * 255
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").to(torch.uint8)


def test_lite0_tiled_equals_whole_image_on_odd_sizes():
    """The shipped EfficientNet-Lite0 FCN-8s (TF SAME padding, pad to 32): 851 px receptive
    field, halo 512; with 512 px tiles the windows are cut inside the image on both sides."""
    from fcnfast.models.pretrained import pretrained

    model = pretrained("fcn8s_lite0_camvid").eval()
    assert model.receptive_field() == (851, 32) and receptive_halo(model) == 512
    h, w = 613, 1085
    image = _camvid_like(h, w)
    whole = model.predict(image)[0].numpy().astype(np.uint8)
    assert len(np.unique(whole)) > 1

    def window(y0, y1, x0, x1):
        return image[:, :, y0:y1, x0:x1]

    plan = list(tiles(h, w, 512, receptive_halo(model), 32))
    assert any(x0 > 0 for (_, _, x0, _), _ in plan) and any(x1 < w for (_, _, _, x1), _ in plan)
    assert np.array_equal(tiled_labels(model, h, w, window, tile=512), whole)
    short = tiled_labels(model, h, w, window, tile=512, halo=64)
    assert not np.array_equal(short, whole)


def test_lite0_predict_and_eval_tile_flag(tmp_path, capsys):
    """CLI wiring for the shipped model: --tile gives the whole-image labels and scores."""
    image = _camvid_like(181, 243, seed=1)[0].permute(1, 2, 0).numpy()
    Image.fromarray(image).save(tmp_path / "street.png")
    _predict_tiled_equals_whole(
        ["predict", str(tmp_path / "street.png"), "--model", "fcn8s_lite0_camvid", "--quiet"],
        64,
        tmp_path,
        capsys,
    )
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "labels").mkdir()
    Image.fromarray(image).save(tmp_path / "set" / "images" / "a.png")
    Image.fromarray((np.arange(181 * 243) % 11).astype(np.uint8).reshape(181, 243)).save(
        tmp_path / "set" / "labels" / "a.png"
    )
    scores = []
    for tile in ("0", "64"):
        assert (
            cli.main(
                [
                    "eval",
                    "--model",
                    "fcn8s_lite0_camvid",
                    "--data",
                    str(tmp_path / "set"),
                    "--json",
                    "--quiet",
                    "--tile",
                    tile,
                ]
            )
            == 0
        )
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0] == scores[1] and 0.0 < scores[0]["fcn"]["pixel_acc"] < 1.0
