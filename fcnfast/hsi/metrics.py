"""HSI classification scores, computed on the test pixels only.

``confusion[i, j]`` counts test pixels of true class ``i`` predicted as ``j`` (0-based classes).

* overall accuracy  OA = trace(M) / sum(M)
* per-class accuracy  acc_i = M[i, i] / sum_j M[i, j]  (recall; classes without test pixels: NaN)
* average accuracy  AA = mean of the defined per-class accuracies
* Cohen's kappa  = (OA - p_e) / (1 - p_e),  p_e = sum_i rows_i * cols_i / sum(M)^2
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from ..metrics import confusion_matrix as _confusion_matrix

__all__ = ["confusion_matrix", "classification_scores"]


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts ``M[t, p]`` of test pixels of class ``t`` predicted as ``p``.

    ``fcnfast.metrics.confusion_matrix`` with every pixel counted (no ignore label) and a NumPy
    result: the same argument order (ground truth first, as scikit-learn's) and rows = truth.

    Args:
        truth (array): 0-based true classes.
        pred (array): 0-based predicted classes, as many as ``truth``.
        num_classes (int): K; labels lie in ``[0, K)``.

    Returns:
        np.ndarray: the (K, K) int64 matrix.
    """
    truth = np.asarray(truth).ravel()
    pred = np.asarray(pred).ravel()
    if truth.shape != pred.shape:
        raise ValueError(
            "truth and pred must have the same number of pixels, got %d and %d"
            % (truth.size, pred.size)
        )
    return _confusion_matrix(truth, pred, num_classes, ignore_index=None).numpy()


def classification_scores(confusion: np.ndarray) -> Dict[str, object]:
    """OA, AA, kappa and per-class accuracy from a confusion matrix (see the module docstring).

    Args:
        confusion (array): a (K, K) matrix, rows = truth (``confusion_matrix``).

    Returns:
        dict: ``overall_accuracy``, ``average_accuracy``, ``kappa`` (floats),
        ``per_class_accuracy`` (a list, NaN for classes without test pixels) and ``confusion``
        (the matrix as lists).
    """
    m = np.asarray(confusion, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError("confusion must be a square matrix, got shape %s" % (m.shape,))
    total = m.sum()
    if total == 0:
        raise ValueError("confusion matrix is empty (no test pixels)")
    rows, cols = m.sum(1), m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(rows > 0, np.diag(m) / rows, np.nan)
    oa = np.trace(m) / total
    expected = float(rows @ cols) / total**2
    kappa = (oa - expected) / (1 - expected) if expected < 1 else 1.0
    return {
        "overall_accuracy": float(oa),
        "average_accuracy": float(np.nanmean(per_class)),
        "kappa": float(kappa),
        "per_class_accuracy": per_class.tolist(),
        "confusion": np.asarray(confusion).tolist(),
    }
