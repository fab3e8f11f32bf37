"""Data layer: image/label I/O, normalisation, synthetic scenes, VOC reader and writer."""

import numpy as np
import pytest
import torch
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast.data import (
    MEAN_RGB,
    STD_RGB,
    SyntheticScenes,
    VOCSegmentation,
    image_to_tensor,
    load_image,
    load_label,
    save_label_png,
    tensor_to_image,
    voc_palette,
    write_synthetic_voc,
)

# -- palette and label PNGs -------------------------------------------------


def test_voc_palette_known_colours():
    pal = voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    # PASCAL VOC colour map values (VOCdevkit labelcolormap)
    known = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        7: (128, 128, 128),
        8: (64, 0, 0),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }
    for index, rgb in known.items():
        assert tuple(pal[index]) == rgb, index
    assert len({tuple(c) for c in pal}) == 256


def test_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, size=(17, 23)).astype(np.uint8)
    labels[3:6, 4:9] = 255
    path = tmp_path / "lab.png"
    save_label_png(torch.from_numpy(labels.astype(np.int64)), path)
    img = Image.open(path)
    assert img.mode == "P" and img.size == (23, 17)
    assert np.array_equal(
        np.asarray(img.getpalette(), dtype=np.uint8).reshape(-1, 3)[:256], voc_palette()
    )
    assert np.array_equal(load_label(path), labels)
    # the same labels written as RGB colours read back as indices
    Image.fromarray(voc_palette()[labels]).save(tmp_path / "rgb.png")
    assert np.array_equal(load_label(tmp_path / "rgb.png"), labels)


def test_label_errors(tmp_path):
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(np.full((2, 2), 300), tmp_path / "x.png")
    with pytest.raises(ValueError, match="2-D"):
        save_label_png(np.zeros((2, 2, 2)), tmp_path / "x.png")
    Image.fromarray(np.full((4, 4, 3), 7, dtype=np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="odd.png.*outside the VOC palette"):
        load_label(tmp_path / "odd.png")
    with pytest.raises(FileNotFoundError, match="absent.png"):
        load_label(tmp_path / "absent.png")


# -- images -----------------------------------------------------------------


def test_image_to_tensor_normalisation():
    image = np.array([[[255, 0, 128], [10, 20, 30]]], dtype=np.uint8)  # 1 x 2 x 3
    t = image_to_tensor(image)
    assert t.dtype == torch.float32 and t.shape == (3, 1, 2)
    for c in range(3):
        for x in range(2):
            expected = (image[0, x, c] / 255.0 - MEAN_RGB[c]) / STD_RGB[c]
            assert abs(t[c, 0, x].item() - expected) < 1e-6
    assert np.array_equal(tensor_to_image(t), image)
    with pytest.raises(ValueError, match="uint8"):
        image_to_tensor(np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        image_to_tensor(np.zeros((2, 2), dtype=np.uint8))


def test_load_image(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, size=(9, 13, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.shape == (9, 13, 3) and np.array_equal(grey[..., 2], rgb[..., 0])
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(tmp_path / "broken.jpg")
    # a truncated PNG fails when decoded, still naming the file
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png"):
        load_image(tmp_path / "cut.png")


# -- synthetic scenes ---------------------------------------------------------


def test_synthetic_deterministic_per_seed():
    a = SyntheticScenes(3, (40, 56), seed=5)
    b = SyntheticScenes(3, (40, 56), seed=5)
    c = SyntheticScenes(3, (40, 56), seed=6)
    for i in range(3):
        xa, ya = a[i]
        xb, yb = b[i]
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a[0][0], c[0][0])
    # random access: item 2 does not depend on having generated 0 and 1
    assert torch.equal(SyntheticScenes(3, (40, 56), seed=5)[2][1], a[2][1])


def test_synthetic_shapes_and_classes():
    data = SyntheticScenes(20, 48, num_classes=21, seed=0)
    assert len(data) == 20
    seen = set()
    for i in range(len(data)):
        x, y = data[i]
        assert x.shape == (3, 48, 48) and x.dtype == torch.float32
        assert y.shape == (48, 48) and y.dtype == torch.int64
        assert y.min() >= 0 and y.max() <= 20
        seen |= set(y.unique().tolist())
    assert 0 in seen and len(seen) >= 8
    # each class looks different: mean colours of two frequent classes differ clearly
    image, labels = data.scene(0)
    classes = [c for c in np.unique(labels) if c != 0]
    bg = image[labels == 0].mean(0)
    for c in classes:
        assert np.abs(image[labels == c].mean(0) - bg).max() > 20


def test_synthetic_sizes_and_ignore_border():
    rect = SyntheticScenes(2, (30, 70), num_classes=5, seed=1, ignore_border=2)
    x, y = rect[0]
    assert x.shape == (3, 30, 70) and set(y.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    ignored = y == 255
    assert ignored.any()
    # ignored pixels lie on boundaries: the un-bordered scene has two classes within 2 px
    _, plain = SyntheticScenes(2, (30, 70), num_classes=5, seed=1)[0]
    assert torch.equal(y[~ignored], plain[~ignored])
    yy, xx = torch.nonzero(ignored, as_tuple=True)
    for py, px in zip(yy.tolist(), xx.tolist()):
        window = plain[max(py - 2, 0) : py + 3, max(px - 2, 0) : px + 3]
        assert len(window.unique()) > 1
    varied = SyntheticScenes(6, 24, seed=0, max_size=(40, 50))
    sizes = {tuple(varied[i][1].shape) for i in range(6)}
    assert len(sizes) > 1 and all(24 <= h <= 40 and 24 <= w <= 50 for h, w in sizes)


def test_synthetic_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticScenes(1, 8, num_classes=1)
    with pytest.raises(ValueError, match="size"):
        SyntheticScenes(1, 0)
    with pytest.raises(ValueError, match="size"):
        SyntheticScenes(1, (3, 4, 5))
    with pytest.raises(IndexError):
        SyntheticScenes(2, 8)[2]


# -- VOC layout -------------------------------------------------------------


@pytest.fixture
def voc_root(tmp_path):
    return write_synthetic_voc(tmp_path / "VOC2012", num_train=4, num_val=2, size=(24, 32), seed=3)


def test_voc_reader_reads_written_scenes(voc_root):
    train = VOCSegmentation(voc_root, "train")
    val = VOCSegmentation(voc_root, "val")
    assert len(train) == 4 and len(val) == 2
    assert (
        voc_root / "ImageSets/Segmentation/trainval.txt"
    ).read_text().split() == train.ids + val.ids
    scenes = SyntheticScenes(6, (24, 32), seed=3)
    for i in range(2):
        x, y = val[i]
        image, labels = scenes.scene(4 + i)
        assert x.shape == (3, 24, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and np.array_equal(y.numpy(), labels)  # PNG is lossless
        decoded = tensor_to_image(x).astype(int)
        assert np.abs(decoded - image).mean() < 6  # JPEG quality 95
    # a VOCdevkit parent folder works too, and a transform maps the pair
    nested = voc_root.parent / "devkit_parent"
    (nested / "VOCdevkit").mkdir(parents=True)
    (nested / "VOCdevkit" / "VOC2012").symlink_to(voc_root)
    flipped = VOCSegmentation(nested, "train", transform=lambda x, y: (x.flip(-1), y.flip(-1)))
    assert torch.equal(flipped[1][1], train[1][1].flip(-1))


def test_voc_errors(voc_root):
    data = VOCSegmentation(voc_root, "train")
    image_path, label_path = data.paths(0)
    image_path.unlink()
    with pytest.raises(FileNotFoundError, match=image_path.name):
        data[0]
    _, label_path = data.paths(1)
    label_path.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=label_path.name):
        data[1]
    _, label_path = data.paths(2)
    save_label_png(np.zeros((10, 10), dtype=np.uint8), label_path)
    with pytest.raises(ValueError, match="is 24x32 but its label .*%s is 10x10" % label_path.name):
        data[2]
    _, label_path = data.paths(3)
    label_path.unlink()
    with pytest.raises(FileNotFoundError, match=label_path.name):
        data[3]
    with pytest.raises(FileNotFoundError, match="test.txt"):
        VOCSegmentation(voc_root, "test")
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        VOCSegmentation(voc_root.parent / "no_such_root")
    (voc_root / "ImageSets/Segmentation/empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt"):
        VOCSegmentation(voc_root, "empty")
