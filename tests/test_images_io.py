"""Issue 16, item 3: images as users have them, output formats by extension, folder input."""

import numpy as np
import pytest
from conftest import TINY_TRAIN_ARGS
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast import cli
from fcnfast.data.images import label_format_for, load_image


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # Pillow really reads it as 16-bit
    rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (30, 40, 3)
    expected = np.round(ramp / 65535.0 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    # not "nearly all white": the middle of the ramp is mid-grey
    assert 100 < rgb[15, 20, 0] < 160 and (rgb[..., 0] == 255).mean() < 0.01


def test_16bit_tiff_and_8bit_grey(tmp_path):
    values = (np.arange(12 * 10).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.tif")
    assert np.array_equal(
        load_image(tmp_path / "g16.tif")[..., 1], np.round(values / 65535.0 * 255).astype(np.uint8)
    )
    grey = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    assert np.array_equal(load_image(tmp_path / "g8.png"), np.repeat(grey[..., None], 3, 2))


def test_rgba_is_composited_on_black_or_refused(tmp_path):
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255  # left half opaque
    rgba[:, 4:, 3] = 0  # right half transparent
    rgba[0, 0, 3] = 128  # one half-transparent pixel
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = load_image(tmp_path / "a.png")
    assert (rgb[1:, :4] == (200, 100, 50)).all()
    assert (rgb[:, 4:] == 0).all()  # transparent -> black, not the colour
    assert tuple(rgb[0, 0]) == (100, 50, 25)  # blended on black
    with pytest.raises(ValueError, match="alpha channel"):
        load_image(tmp_path / "a.png", alpha="error")


def test_palette_and_jpeg_and_rgb_tiff(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    assert np.array_equal(load_image(tmp_path / "c.tif"), rgb)
    pal = Image.fromarray(rgb).quantize(8)
    pal.save(tmp_path / "p.png")
    assert np.array_equal(load_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    assert load_image(tmp_path / "c.jpg").shape == (9, 11, 3)


@pytest.mark.parametrize(
    "name,fmt",
    [("a.png", "PNG"), ("a.TIF", "TIFF"), ("a.tiff", "TIFF"), ("a.bmp", "BMP"), ("a.gif", "GIF")],
)
def test_label_formats_follow_the_extension(name, fmt, tmp_path):
    from fcnfast.data import save_label_png

    labels = (np.arange(7 * 9) % 5).reshape(7, 9).astype(np.uint8)
    save_label_png(labels, tmp_path / name)
    with Image.open(tmp_path / name) as im:
        assert im.format == fmt and im.mode == "P"
        assert np.array_equal(np.asarray(im), labels)  # lossless


@pytest.mark.parametrize("name", ["a.jpg", "a.jpeg", "a.webp", "a", "a.xyz"])
def test_lossy_or_unknown_label_formats_are_refused(name, tmp_path):
    from fcnfast.data import save_label_png

    with pytest.raises(ValueError, match="not a lossless format"):
        label_format_for(name)
    with pytest.raises(ValueError):
        save_label_png(np.zeros((3, 3), np.uint8), tmp_path / name)
    assert not (tmp_path / name).exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", *TINY_TRAIN_ARGS, "--out", str(out)]) == 0
    return str(out / "checkpoint.pt")


def test_predict_a_folder_into_a_folder_with_overlays(checkpoint, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (21, 33, 3), dtype=np.uint8)).save(src / "one.jpg")
    Image.fromarray(rng.integers(0, 65535, (19, 17), dtype=np.uint16)).save(src / "two.tif")
    Image.fromarray(rng.integers(0, 256, (15, 16, 4), dtype=np.uint8), "RGBA").save(src / "3.png")
    (src / "readme.txt").write_text("skipped: not an image")
    out, over = tmp_path / "labels", tmp_path / "overlays"
    assert (
        cli.main(
            [
                "predict",
                str(src),
                "-o",
                str(out),
                "--overlay",
                str(over),
                "--checkpoint",
                checkpoint,
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["3.png", "one.png", "two.png"]
    with Image.open(out / "two.png") as im:
        assert im.mode == "P" and im.size == (17, 19)
    with Image.open(over / "one_overlay.png") as im:
        assert im.size[1] >= 21 and im.size[0] > 33  # the image plus a legend column
    assert "3 label maps" in capsys.readouterr().out
    # several files, the same
    out2 = tmp_path / "labels2"
    assert (
        cli.main(
            [
                "predict",
                str(src / "one.jpg"),
                str(src / "3.png"),
                "-o",
                str(out2),
                "--checkpoint",
                checkpoint,
                "--quiet",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out2.iterdir()) == ["3.png", "one.png"]
    assert np.array_equal(
        np.asarray(Image.open(out2 / "one.png")), np.asarray(Image.open(out / "one.png"))
    )


def test_predict_output_and_overlay_formats(checkpoint, tmp_path):
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (23, 29, 3), dtype=np.uint8)).save(
        image
    )
    assert (
        cli.main(
            [
                "predict",
                str(image),
                "-o",
                str(tmp_path / "l.tif"),
                "--overlay",
                str(tmp_path / "o.jpg"),
                "--checkpoint",
                checkpoint,
                "--quiet",
            ]
        )
        == 0
    )
    with Image.open(tmp_path / "l.tif") as im:
        assert im.format == "TIFF" and im.mode == "P"
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.format == "JPEG"  # JPEG bytes in a .jpg, not PNG
