"""Train/test splits of the labelled pixels of a hyperspectral scene (boolean (H, W) masks).

* ``random_split`` -- the common (optimistic) protocol: a fixed number or fraction of labelled
  pixels per class, drawn at random; train and test pixels are interleaved, so a w x w patch around
  a test pixel usually contains training pixels.
* ``block_split`` -- spatially disjoint: whole square blocks go to training, and test pixels closer
  than ``buffer`` pixels (Chebyshev distance, i.e. inside the square window) to any training pixel
  are dropped, so with ``buffer >= patch radius`` no training patch contains a test pixel.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

__all__ = ["random_split", "block_split", "mask_indices"]


def _labelled_classes(gt: np.ndarray) -> np.ndarray:
    if gt.ndim != 2:
        raise ValueError("gt must be a 2-D (H, W) label map, got shape %s" % (gt.shape,))
    classes = np.unique(gt[gt > 0])
    if classes.size == 0:
        raise ValueError("gt has no labelled pixels (all labels are 0)")
    return classes


def random_split(gt: np.ndarray, train_per_class=0.1, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Random per-class split: ``train_per_class`` pixels of every class for training (an int: that
    many, at most all but one; a float in (0, 1): that fraction, at least one), the other labelled
    pixels for testing. Returns ``(train_mask, test_mask)`` boolean ``(H, W)``."""
    classes = _labelled_classes(gt)
    is_fraction = isinstance(train_per_class, float)
    if is_fraction and not 0 < train_per_class < 1:
        raise ValueError("train_per_class as a fraction must be in (0, 1), got %r" % train_per_class)
    if not is_fraction and int(train_per_class) < 1:
        raise ValueError("train_per_class must be a positive count or a fraction, got %r"
                         % train_per_class)
    rng = np.random.default_rng(seed)
    flat = gt.ravel()
    train = np.zeros(flat.shape, dtype=bool)
    for c in classes:
        idx = np.flatnonzero(flat == c)
        n = (max(1, int(round(train_per_class * idx.size))) if is_fraction
             else min(int(train_per_class), idx.size - 1))
        train[rng.choice(idx, size=n, replace=False)] = True
    train = train.reshape(gt.shape)
    return train, (gt > 0) & ~train


def block_split(gt: np.ndarray, train_fraction: float = 0.3, block: int = 24, buffer: int = 5,
                seed: int = 0, attempts: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """Spatially disjoint split by square blocks.

    The scene is tiled into ``block`` x ``block`` tiles, visited in random order; a tile goes to
    training when all its labelled pixels belong to classes still below ``train_fraction`` of
    their labelled pixels (so a class overshoots by at most one tile). Test pixels are the remaining labelled pixels farther than ``buffer`` pixels
    (Chebyshev distance) from every training pixel. Retries other orders until every class has
    both training and test pixels, else raises ``ValueError``.
    """
    classes = _labelled_classes(gt)
    if not 0 < train_fraction < 1:
        raise ValueError("train_fraction must be in (0, 1), got %r" % train_fraction)
    if block < 1 or buffer < 0:
        raise ValueError("block must be >= 1 and buffer >= 0, got block=%r buffer=%r" % (block, buffer))
    h, w = gt.shape
    tiles = [(y, x) for y in range(0, h, block) for x in range(0, w, block)]
    total = np.bincount(gt.ravel(), minlength=classes.max() + 1)
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        train = np.zeros(gt.shape, dtype=bool)
        taken = np.zeros_like(total)
        for i in rng.permutation(len(tiles)):
            y, x = tiles[i]
            counts = np.bincount(gt[y:y + block, x:x + block].ravel(), minlength=total.size)
            counts[0] = 0
            wanted = taken < train_fraction * total
            if counts[wanted].sum() > 0 and counts[~wanted].sum() == 0:
                train[y:y + block, x:x + block] = True
                taken += counts
        train &= gt > 0
        test = (gt > 0) & ~_dilate(train, buffer)
        if all(train[gt == c].any() and test[gt == c].any() for c in classes):
            return train, test
    raise ValueError("block_split found no split with training and test pixels in every class "
                     "after %d attempts (block=%d, buffer=%d, train_fraction=%g); try smaller blocks"
                     % (attempts, block, buffer, train_fraction))


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask.copy()
    return ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant", cval=False)


def mask_indices(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` int64 arrays of the True pixels of a boolean mask."""
    rows, cols = np.nonzero(mask)
    return rows.astype(np.int64), cols.astype(np.int64)
