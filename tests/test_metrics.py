"""fcnfast.metrics against confusion matrices and scores worked out by hand."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fcnfast.metrics import confusion_matrix, format_scores, plot_confusion, segmentation_scores

# 3 classes, one ignored pixel (255). Hand-counted (rows = ground truth, cols = prediction):
#   gt 0: predicted 0,0,1  -> [2, 1, 0]
#   gt 1: predicted 1,2    -> [0, 1, 1]
#   gt 2: predicted 2      -> [0, 0, 1]
TARGET = torch.tensor([[0, 0, 0], [1, 1, 2], [255, 255, 255]])
PRED = torch.tensor([[0, 0, 1], [1, 2, 2], [0, 1, 2]])
EXPECTED_CONF = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_confusion_matrix_by_hand():
    conf = confusion_matrix(TARGET, PRED, 3)
    assert conf.dtype == torch.int64
    assert conf.tolist() == EXPECTED_CONF


def test_scores_by_hand():
    s = segmentation_scores(torch.tensor(EXPECTED_CONF))
    # pixel acc = (2+1+1)/6
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    # class acc 2/3, 1/2, 1/1
    assert s["mean_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # IU: 2/(3+2-2), 1/(2+2-1), 1/(1+2-1)
    assert s["per_class_iu"] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    assert s["mean_iu"] == pytest.approx(0.5)
    # fw IU: 3/6*2/3 + 2/6*1/3 + 1/6*1/2 = 19/36
    assert s["fw_iu"] == pytest.approx(19 / 36)


def test_absent_classes_follow_fcn_score_py():
    # 5 classes; gt has only class 0, prediction uses 0 and 3; classes 1, 2, 4 appear nowhere.
    conf = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 3]), 5)
    assert conf[0].tolist() == [1, 0, 0, 1, 0] and conf.sum() == 2
    s = segmentation_scores(conf)
    assert s["pixel_acc"] == pytest.approx(0.5)
    assert s["mean_acc"] == pytest.approx(0.5)  # only class 0 has ground truth
    iu = s["per_class_iu"]
    assert iu[0] == pytest.approx(0.5) and iu[3] == 0.0  # predicted-only class counts as 0
    assert all(math.isnan(iu[i]) for i in (1, 2, 4))  # absent from both: left out
    assert s["mean_iu"] == pytest.approx(0.25)
    assert s["fw_iu"] == pytest.approx(0.5)


def test_accumulates_over_batches_like_one_matrix():
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 4, (6, 5, 7), generator=g)
    target = torch.randint(0, 4, (6, 5, 7), generator=g)
    target[0, 0, :3] = 255
    acc = torch.zeros(4, 4, dtype=torch.int64)
    for i in range(6):
        out = confusion_matrix(target[i], pred[i], 4, out=acc)
        assert out is acc
    whole = confusion_matrix(target, pred, 4)
    assert torch.equal(acc, whole)
    assert whole.sum() == 6 * 5 * 7 - 3
    # brute-force count
    manual = np.zeros((4, 4), dtype=np.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            manual[t, p] += 1
    assert whole.numpy().tolist() == manual.tolist()


def test_perfect_prediction_scores_one():
    labels = torch.tensor([[0, 1], [2, 2]])
    s = segmentation_scores(confusion_matrix(labels, labels, 3))
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"):
        assert s[key] == 1.0
    assert "mean IU 1.0000" in format_scores(s)


def test_empty_matrix_is_nan():
    s = segmentation_scores(torch.zeros(3, 3, dtype=torch.int64))
    assert all(math.isnan(s[k]) for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu"))


@pytest.mark.parametrize(
    "pred,target,match",
    [
        (torch.tensor([0, 3]), torch.tensor([0, 1]), "pred labels"),
        (torch.tensor([0, 1]), torch.tensor([0, 7]), "target labels"),
        (torch.tensor([0, 1]), torch.tensor([0, -1]), "target labels"),
        (torch.tensor([0, 1]), torch.tensor([0, 1, 1]), "shape"),
        (torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), "integer"),
    ],
)
def test_bad_labels_raise(pred, target, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(target, pred, 3)


def test_plot_confusion_writes_png(tmp_path):
    path = tmp_path / "conf.png"
    plot_confusion(torch.tensor(EXPECTED_CONF), path, class_names=["a", "b", "c"])
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    with pytest.raises(ValueError, match="class_names"):
        plot_confusion(torch.tensor(EXPECTED_CONF), tmp_path / "x.png", class_names=["a"])
