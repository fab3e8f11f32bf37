"""The shipped CamVid model (fcnfast.models.pretrained("fcn8s_lite0_camvid")) and the CLI paths
that use it."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from single_thread import one_intraop_thread  # noqa: F401 (autouse fixture)

from fcnfast.cli import main
from fcnfast.data.layouts import CAMVID_CLASSES, CamVid

CAMVID = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid"
# The shipped model must segment CamVid val images at least this well (mean IoU over the 3
# images' pooled confusion). Its full-val mean IoU is in benchmarks/results/camvid.md; 3 images
# hold few pixels of the small classes, so the floor sits well below it.
SHIPPED_MIOU_FLOOR = 0.45


def _shipped_available():
    from fcnfast.models.pretrained import weights_path

    return weights_path("fcn8s_lite0_camvid").is_file()


def test_shipped_model_file_is_small_and_described():
    from fcnfast.models.pretrained import weights_path

    path = weights_path("fcn8s_lite0_camvid")
    assert path.is_file(), "the CamVid model must ship with the package: %s" % path
    assert path.stat().st_size <= 10 * 2**20
    card = path.with_suffix(".md").read_text()
    assert "CamVid" in card and "fcnfast finetune" in card


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid (absent here)")
def test_shipped_model_segments_camvid_val_images():
    from fcnfast.metrics import confusion_matrix, segmentation_scores
    from fcnfast.models import pretrained

    model = pretrained("fcn8s_lite0_camvid")
    assert model.class_names == CAMVID_CLASSES
    ds = CamVid(CAMVID, "val")
    conf = torch.zeros(11, 11, dtype=torch.int64)
    for index in (0, 50, 100):
        image, label = ds[index]
        labels = model.predict(image[None])
        assert labels.shape == (1, 360, 480)
        conf += confusion_matrix(label[None], labels, 11)
    assert segmentation_scores(conf)["mean_iu"] >= SHIPPED_MIOU_FLOOR


def test_predict_cli_with_shipped_model(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    assert (
        main(
            [
                "predict",
                str(tmp_path / "in.png"),
                "-o",
                str(tmp_path / "labels.png"),
                "--model",
                "fcn8s_lite0_camvid",
                "--overlay",
                str(tmp_path / "over.png"),
            ]
        )
        == 0
    )
    labels = Image.open(tmp_path / "labels.png")
    assert labels.mode == "P" and labels.size == (61, 45)
    palette = np.asarray(labels.getpalette(), np.uint8).reshape(-1, 3)
    assert tuple(palette[0]) == (128, 128, 128)  # CamVid's Sky colour, not VOC's
    overlay = Image.open(tmp_path / "over.png")
    assert overlay.size[1] >= 45 and overlay.size[0] > 61  # image + legend column
    assert "fcn8s_lite0_camvid" not in capsys.readouterr().err
