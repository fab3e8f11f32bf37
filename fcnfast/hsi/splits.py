"""Train/test splits of the labelled pixels of a hyperspectral scene (boolean (H, W) masks).

* ``random_split`` -- the common (optimistic) protocol: a fixed number or fraction of labelled
  pixels per class, drawn at random; train and test pixels are interleaved, so a w x w patch around
  a test pixel usually contains training pixels.
* ``disjoint_split`` -- spatially disjoint per class (the default of ``fcnfast hsi --split
  disjoint``): for every class ``train_fraction`` of its pixels, taken as whole tiles of the class
  (random tiles, the last one cut by a straight line), then every test pixel within ``buffer``
  pixels (Chebyshev) of any training pixel is dropped. Every class gets
  training pixels; a tiny class whose pixels all fall inside the buffer has no test pixels in that
  split -- ``split_report`` says so and the scores leave it out (n/a), never count it as 0 or 100 %.
* ``block_split`` -- spatially disjoint: whole square blocks go to training, and test pixels closer
  than ``buffer`` pixels (Chebyshev distance, i.e. inside the square window) to any training pixel
  are dropped, so with ``buffer >= patch radius`` no training patch contains a test pixel.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import ndimage

__all__ = ["random_split", "disjoint_split", "block_split", "split_report", "mask_indices"]


def _labelled_classes(gt: np.ndarray) -> np.ndarray:
    if gt.ndim != 2:
        raise ValueError("gt must be a 2-D (H, W) label map, got shape %s" % (gt.shape,))
    classes = np.unique(gt[gt > 0])
    if classes.size == 0:
        raise ValueError("gt has no labelled pixels (all labels are 0)")
    return classes


def random_split(
    gt: np.ndarray, train_per_class=0.1, seed: int = 0, min_train: int = 1
) -> Tuple[np.ndarray, np.ndarray]:
    """Random per-class split: ``train_per_class`` pixels of every class for training (an int: that
    many; a float in (0, 1): that fraction rounded, at least ``min_train``; never more than all but
    one pixel of the class), the other labelled pixels for testing. Returns ``(train_mask,
    test_mask)`` boolean ``(H, W)``."""
    classes = _labelled_classes(gt)
    is_fraction = isinstance(train_per_class, float)
    if is_fraction and not 0 < train_per_class < 1:
        raise ValueError(
            "train_per_class as a fraction must be in (0, 1), got %r" % train_per_class
        )
    if not is_fraction and int(train_per_class) < 1:
        raise ValueError(
            "train_per_class must be a positive count or a fraction, got %r" % train_per_class
        )
    rng = np.random.default_rng(seed)
    flat = gt.ravel()
    train = np.zeros(flat.shape, dtype=bool)
    for c in classes:
        idx = np.flatnonzero(flat == c)
        n = (
            max(int(min_train), 1, int(round(train_per_class * idx.size)))
            if is_fraction
            else int(train_per_class)
        )
        n = max(1, min(n, idx.size - 1)) if idx.size > 1 else idx.size
        train[rng.choice(idx, size=n, replace=False)] = True
    train = train.reshape(gt.shape)
    return train, (gt > 0) & ~train


def disjoint_split(
    gt: np.ndarray,
    train_fraction: float = 0.1,
    buffer: int = 5,
    seed: int = 0,
    min_train: int = 5,
    block: int = 12,
    directions: int = 8,
) -> Tuple[np.ndarray, np.ndarray]:
    """Spatially disjoint split with a buffer that works for any class size.

    For every class ``c`` (``n_c`` pixels) it takes ``t = min(max(min_train, round(train_fraction
    * n_c)), n_c - 1)`` training pixels in whole ``block x block`` tiles: the tiles holding pixels
    of ``c`` are visited in random order and each tile's ``c`` pixels are taken while they fit in
    ``t``; the tile that would overshoot contributes only the pixels still needed, cut off by a
    straight line (the ``remaining`` pixels furthest along one of ``directions`` directions -- the
    direction that leaves the most test pixels of ``c`` after the buffer). So training pixels are
    compact groups spread over several fields of the class, never scattered single pixels. Then the
    test pixels are all labelled non-training pixels farther than ``buffer`` (Chebyshev distance)
    from *every* training pixel: with ``buffer >= patch radius`` no training patch contains a test
    pixel and no test patch a training pixel.

    Guarantees: every class has >= 1 training pixel (>= ``min_train`` when it has more pixels);
    no test pixel within ``buffer`` of a training pixel. A class can end with no test pixel (a tiny
    class whose few fields lie within the buffer of the training pixels, e.g. Indian Pines'
    Grass-pasture-mowed, 26 px in one 5x6 field); :func:`split_report` lists those, and scores must
    leave them out (n/a) rather than count them. Returns ``(train_mask, test_mask)``.
    """
    classes = _labelled_classes(gt)
    if not 0 < train_fraction < 1:
        raise ValueError("train_fraction must be in (0, 1), got %r" % train_fraction)
    if buffer < 0 or min_train < 1 or directions < 1 or block < 1:
        raise ValueError(
            "buffer must be >= 0, min_train, block and directions >= 1; got buffer=%r "
            "min_train=%r block=%r directions=%r" % (buffer, min_train, block, directions)
        )
    rng = np.random.default_rng(seed)
    h, w = gt.shape
    train = np.zeros(gt.shape, dtype=bool)
    for c in classes:
        own = gt == c
        n = int(own.sum())
        t = min(max(int(min_train), int(round(train_fraction * n))), n - 1) if n > 1 else n
        tiles = [
            (y, x)
            for y in range(0, h, block)
            for x in range(0, w, block)
            if own[y : y + block, x : x + block].any()
        ]
        mine = np.zeros(gt.shape, dtype=bool)
        taken = 0
        for i in rng.permutation(len(tiles)):
            y, x = tiles[i]
            tile = np.zeros(gt.shape, dtype=bool)
            tile[y : y + block, x : x + block] = own[y : y + block, x : x + block]
            count = int(tile.sum())
            if taken + count <= t:
                mine |= tile
                taken += count
            else:
                mine |= _cut(tile, t - taken, mine, own, buffer, directions, rng)
                taken = t
            if taken >= t:
                break
        train |= mine
    test = (gt > 0) & ~_dilate(train, buffer)
    return train, test


def _cut(candidates, need, taken, own, buffer, directions, rng) -> np.ndarray:
    """``need`` pixels of ``candidates`` on one side of a line: of ``directions`` directions, the
    one that leaves the most pixels of ``own`` outside the buffer of ``taken`` + the cut."""
    rows, cols = np.nonzero(candidates)
    offset = rng.uniform(0, 2 * np.pi)
    best, best_left = None, -1
    for d in range(directions):
        angle = offset + 2 * np.pi * d / directions
        chosen = np.argsort(rows * np.sin(angle) + cols * np.cos(angle), kind="stable")[:need]
        mask = np.zeros(candidates.shape, dtype=bool)
        mask[rows[chosen], cols[chosen]] = True
        left = int((own & ~_dilate(taken | mask, buffer)).sum())
        if left > best_left:
            best, best_left = mask, left
    return best


def split_report(gt: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    """Per-class pixel counts of a split: ``{"train": [...], "test": [...], "dropped": [...],
    "untestable": [classes with training but no test pixels], "untrained": [classes with test
    but no training pixels]}``; lists are indexed by class ``1..K`` (index 0 = class 1)."""
    k = int(gt.max())
    count = lambda m: np.bincount(gt[m], minlength=k + 1)[1:].astype(int)
    total, tr, te = count(gt > 0), count(train & (gt > 0)), count(test & (gt > 0))
    present = total > 0
    return {
        "train": tr.tolist(),
        "test": te.tolist(),
        "dropped": (total - tr - te).tolist(),
        "untestable": [int(c) + 1 for c in np.flatnonzero(present & (tr > 0) & (te == 0))],
        "untrained": [int(c) + 1 for c in np.flatnonzero(present & (tr == 0) & (te > 0))],
    }


def block_split(
    gt: np.ndarray,
    train_fraction: float = 0.3,
    block: int = 24,
    buffer: int = 5,
    seed: int = 0,
    attempts: int = 50,
) -> Tuple[np.ndarray, np.ndarray]:
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
        raise ValueError(
            "block must be >= 1 and buffer >= 0, got block=%r buffer=%r" % (block, buffer)
        )
    h, w = gt.shape
    tiles = [(y, x) for y in range(0, h, block) for x in range(0, w, block)]
    total = np.bincount(gt.ravel(), minlength=classes.max() + 1)
    rng = np.random.default_rng(seed)
    for _ in range(attempts):
        train = np.zeros(gt.shape, dtype=bool)
        taken = np.zeros_like(total)
        for i in rng.permutation(len(tiles)):
            y, x = tiles[i]
            counts = np.bincount(gt[y : y + block, x : x + block].ravel(), minlength=total.size)
            counts[0] = 0
            wanted = taken < train_fraction * total
            if counts[wanted].sum() > 0 and counts[~wanted].sum() == 0:
                train[y : y + block, x : x + block] = True
                taken += counts
        train &= gt > 0
        test = (gt > 0) & ~_dilate(train, buffer)
        if all(train[gt == c].any() and test[gt == c].any() for c in classes):
            return train, test
    raise ValueError(
        "block_split found no split with training and test pixels in every class "
        "after %d attempts (block=%d, buffer=%d, train_fraction=%g); try smaller blocks"
        % (attempts, block, buffer, train_fraction)
    )


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask.copy()
    return ndimage.maximum_filter(mask, size=2 * radius + 1, mode="constant", cval=False)


def mask_indices(mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows, cols)`` int64 arrays of the True pixels of a boolean mask."""
    rows, cols = np.nonzero(mask)
    return rows.astype(np.int64), cols.astype(np.int64)
