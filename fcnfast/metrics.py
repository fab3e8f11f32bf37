"""Semantic segmentation metrics of the FCN paper (Long, Shelhamer & Darrell, 2015, section 5).

All four scores come from ONE confusion matrix summed over the whole evaluation set
(rows = ground truth, columns = prediction), exactly as the FCN reference ``score.py``:

* pixel accuracy      ``sum_i n_ii / sum_i t_i``
* mean accuracy       ``(1/n_cl) sum_i n_ii / t_i``
* mean IU             ``(1/n_cl) sum_i n_ii / (t_i + sum_j n_ji - n_ii)``
* frequency weighted  ``(sum_k t_k)^-1 sum_i t_i n_ii / (t_i + sum_j n_ji - n_ii)``

where ``n_ij`` counts pixels of class ``i`` predicted as ``j`` and ``t_i = sum_j n_ij``.
A class whose denominator is zero (absent from both prediction and ground truth, or for
the accuracy absent from the ground truth) is NaN and left out of the means (``nanmean``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .losses import IGNORE_INDEX

__all__ = ["confusion_matrix", "segmentation_scores", "format_scores", "plot_confusion"]


def confusion_matrix(
    target,
    pred,
    num_classes: int,
    ignore_index: Optional[int] = IGNORE_INDEX,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Counts ``conf[t, p]`` of pixels with true label ``t`` predicted as ``p``.

    The argument order is scikit-learn's ``confusion_matrix(y_true, y_pred)``: ground truth
    first, and rows are ground truth, columns prediction (``fcnfast.hsi.metrics`` uses the
    same function and convention).

    Args:
        target (Tensor or array): integer ground-truth labels, any shape.
        pred (Tensor or array): integer predicted labels, the shape of ``target``.
        num_classes (int): the number of classes K; labels lie in ``[0, K)``.
        ignore_index (int or None): pixels whose target equals it are skipped (default
            ``IGNORE_INDEX``, 255); None: every pixel counts.
        out (Tensor, optional): a previous (K, K) result to add to in place (accumulating
            over a validation set).

    Returns:
        Tensor: the (K, K) int64 matrix (``out`` when given).

    Raises:
        ValueError: shapes differ, labels are not integers, or a label (other than an ignored
            target) lies outside ``[0, K)``.
    """
    pred = torch.as_tensor(pred)
    target = torch.as_tensor(target)
    if num_classes <= 0:
        raise ValueError("num_classes must be positive, got %d" % num_classes)
    if pred.shape != target.shape:
        raise ValueError(
            "pred shape %s and target shape %s differ" % (tuple(pred.shape), tuple(target.shape))
        )
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError(
            "pred and target must be integer label maps, got %s and %s" % (pred.dtype, target.dtype)
        )
    target = target.reshape(-1).to(pred.device, torch.int64)
    pred = pred.reshape(-1).to(torch.int64)
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    for name, labels in (("target", target), ("pred", pred)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                "%s labels must lie in [0, %d)%s, found %d..%d"
                % (
                    name,
                    num_classes,
                    "" if ignore_index is None else " or equal ignore_index=%d" % ignore_index,
                    labels.min(),
                    labels.max(),
                )
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    conf = counts.reshape(num_classes, num_classes)
    if out is None:
        return conf
    if out.shape != conf.shape:
        raise ValueError("out has shape %s, expected %s" % (tuple(out.shape), tuple(conf.shape)))
    out += conf.to(out.device, out.dtype)
    return out


def segmentation_scores(conf) -> dict:
    """The FCN paper's four metrics from a confusion matrix (see the module docstring).

    Args:
        conf (Tensor or array): a (K, K) matrix, rows = ground truth, columns = prediction
            (``confusion_matrix``).

    Returns:
        dict: ``pixel_acc``, ``mean_acc``, ``mean_iu``, ``fw_iu`` (floats; NaN for an empty
        matrix) and ``per_class_iu`` (a list, NaN for classes absent from both prediction and
        ground truth).
    """
    hist = torch.as_tensor(conf).detach().cpu().double().numpy()
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1]:
        raise ValueError("conf must be a square matrix, got shape %s" % (hist.shape,))
    diag = np.diag(hist)
    gt_total = hist.sum(1)
    union = gt_total + hist.sum(0) - diag
    total = hist.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        class_acc = diag / gt_total
        iu = diag / union
    present = gt_total > 0
    freq = gt_total / total if total > 0 else np.zeros_like(gt_total)
    return {
        "pixel_acc": float(diag.sum() / total) if total > 0 else float("nan"),
        "mean_acc": _nanmean(class_acc),
        "mean_iu": _nanmean(iu),
        "fw_iu": float((freq[present] * iu[present]).sum()) if total > 0 else float("nan"),
        "per_class_iu": [float(v) for v in iu],
    }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def format_scores(scores: dict, prefix: str = "") -> str:
    """One line with the four metrics, e.g. ``pixel acc 0.9512  mean acc ...``.

    Args:
        scores (dict): ``segmentation_scores``' result.
        prefix (str): put in front of the line.

    Returns:
        str: the line.
    """
    return prefix + "  ".join(
        "%s %.4f" % (label, scores[key])
        for key, label in (
            ("pixel_acc", "pixel acc"),
            ("mean_acc", "mean acc"),
            ("mean_iu", "mean IU"),
            ("fw_iu", "f.w. IU"),
        )
    )


def plot_confusion(
    conf,
    path,
    class_names: Optional[Sequence[str]] = None,
    title: str = "confusion matrix (rows: ground truth, normalised)",
) -> None:
    """Save a row-normalised confusion matrix image (PNG or any matplotlib format) to ``path``.

    Uses matplotlib's Agg canvas directly, so it never touches the global pyplot backend.

    Args:
        conf (Tensor or array): a (K, K) matrix, rows = ground truth (``confusion_matrix``).
        path (str or Path): the image file; the format follows its suffix.
        class_names (sequence of str, optional): K tick labels (default 0 .. K-1).
        title (str): the figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = torch.as_tensor(conf).detach().cpu().double().numpy()
    n = hist.shape[0]
    if class_names is not None and len(class_names) != n:
        raise ValueError(
            "class_names has %d entries, the matrix has %d classes" % (len(class_names), n)
        )
    rows = hist.sum(1, keepdims=True)
    normalised = np.divide(hist, rows, out=np.zeros_like(hist), where=rows > 0)
    size = min(12.0, 3.0 + 0.35 * n)
    fig = Figure(figsize=(size + 1.0, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
