"""The datasets of a ``TrainConfig``, the label scan before training, and batching."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Sampler

from ..losses import IGNORE_INDEX
from .config import TrainConfig

__all__ = ["make_dataset", "make_datasets", "check_labels", "pad_collate", "SkipSampler"]


def make_dataset(cfg: TrainConfig, part: str):
    """The ``"train"`` or ``"val"`` dataset of ``cfg``.

    Args:
        cfg (TrainConfig): ``data`` is ``"synthetic"`` (``SyntheticScenes``, validation scenes
            from a disjoint seed) or a dataset directory (VOC, list-file or images/ + labels/).
        part (str): ``"train"`` or ``"val"``.

    Returns:
        Dataset: (image tensor, label tensor) pairs.
    """
    from .. import data

    if part not in ("train", "val"):
        raise ValueError("part must be 'train' or 'val', got %r" % (part,))
    if cfg.data == "synthetic":
        # a disjoint seed: validation scenes are never training scenes
        seed = cfg.data_seed if part == "train" else cfg.data_seed + 1_000_003
        count = cfg.train_images if part == "train" else cfg.val_images
        return data.SyntheticScenes(
            count,
            cfg.image_size,
            seed=seed,
            num_classes=cfg.num_classes,
            ignore_border=cfg.ignore_border,
        )
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(
            "data directory not found: %s (use 'synthetic' or a dataset "
            "directory: VOC, list-file or images/ + labels/)" % cfg.data
        )
    from ..data.layouts import NormalizedImages, detect_layout, open_segmentation

    split = cfg.train_split if part == "train" else cfg.val_split
    if detect_layout(cfg.data, split) == "voc":
        return data.VOCSegmentation(cfg.data, split)
    return NormalizedImages(open_segmentation(cfg.data, split, num_classes=cfg.num_classes))


def check_labels(
    dataset, num_classes: int, name: str = "data", source: Optional[str] = None
) -> None:
    """Scan every label of ``dataset`` before training.

    Synthetic scenes are generated for ``num_classes`` and need no scan. Only label files are
    read (no images) where the dataset exposes ``paths(i)``.

    Args:
        dataset: the dataset (or a ``Subset``/wrapper with ``base``).
        num_classes (int): classes run 0 .. num_classes - 1 (``IGNORE_INDEX``, 255, is allowed).
        name (str): the dataset's name in the message (``"training"``, ``"validation"``).
        source (str, optional): where ``num_classes`` came from, for the message (default:
            ``--num-classes N``).

    Raises:
        ValueError: naming the first file that holds a class >= ``num_classes``, with the
            largest class found.
    """
    from ..data import SyntheticScenes
    from ..data.images import load_label

    base = getattr(dataset, "base", dataset)
    if isinstance(base, SyntheticScenes) or len(base) == 0:
        return
    void_ids = tuple(getattr(base, "void_ids", ()) or ())
    largest, first_bad = -1, None
    for index in range(len(base)):
        if hasattr(base, "paths"):
            label_path = base.paths(index)[1]
            labels = load_label(label_path)
        else:  # pragma: no cover - every fcnfast dataset has paths()
            label_path, labels = "item %d" % index, base.raw(index)[1]
        for void in void_ids:
            labels = np.where(labels == void, IGNORE_INDEX, labels)
        valid = labels[labels != IGNORE_INDEX]
        top = int(valid.max()) if valid.size else -1
        if top >= num_classes and first_bad is None:
            first_bad = label_path
        largest = max(largest, top)
    if first_bad is not None:
        raise ValueError(
            "%s but the %s labels hold class %d (first in %s); %s"
            % (
                source or "--num-classes %d" % num_classes,
                name,
                largest,
                first_bad,
                "use --num-classes %d or more" % (largest + 1)
                if source is None
                else "classes run 0..%d (255 = ignore)" % (num_classes - 1),
            )
        )


def make_datasets(cfg: TrainConfig):
    """Both datasets of ``cfg``.

    Args:
        cfg (TrainConfig): see ``make_dataset``.

    Returns:
        tuple: (train dataset, validation dataset).
    """
    return make_dataset(cfg, "train"), make_dataset(cfg, "val")


def pad_collate(batch):
    """Stack (image, label) pairs; images of different sizes are padded at the bottom/right
    (image with 0, label with ``IGNORE_INDEX``, so padding never counts).

    Args:
        batch (list): (image (C, H, W), label (H, W)) pairs.

    Returns:
        tuple: (images (N, C, H, W), labels (N, H, W)).
    """
    images, labels = zip(*batch)
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    if all(im.shape[-2:] == (height, width) for im in images):
        return torch.stack(images), torch.stack(labels)
    out_images = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    out_labels = labels[0].new_full((len(labels), height, width), IGNORE_INDEX)
    for i, (im, lab) in enumerate(zip(images, labels)):
        out_images[i, :, : im.shape[-2], : im.shape[-1]] = im
        out_labels[i, : lab.shape[-2], : lab.shape[-1]] = lab
    return out_images, out_labels


class SkipSampler(Sampler):
    """The indices of ``sampler`` after the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)
