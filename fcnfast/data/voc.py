"""PASCAL VOC segmentation reader and a writer of synthetic datasets in the VOC layout.

Layout (``root`` is the ``VOC2012`` folder, or a folder holding ``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        palette PNG, class indices, 255 = ignore
    ImageSets/Segmentation/<split>.txt one id per line
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import VOC_CLASSES, image_to_tensor, load_image_and_label, save_label_png
from .synthetic import SyntheticScenes

__all__ = ["VOCSegmentation", "write_synthetic_voc", "read_split"]


def _resolve_root(root: Union[str, os.PathLike]) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError("VOC root directory not found: %s" % root)
    nested = root / "VOCdevkit" / "VOC2012"
    if not (root / "ImageSets").is_dir() and nested.is_dir():
        return nested
    return root


def read_split(path: Union[str, os.PathLike]) -> List[str]:
    """Image ids listed in a split file (one per line; blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError("split file not found: %s" % path)
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError("split file %s lists no images" % path)
    return ids


class VOCSegmentation(Dataset):
    """PASCAL VOC semantic segmentation: ``(image float32 (3, H, W), label int64 (H, W))``.

    Images are normalised by ``image_to_tensor``; labels are class indices with
    255 = ignore. ``transform(image, label)``, if given, maps the tensor pair.
    A missing file raises ``FileNotFoundError`` and a corrupt file or an
    image/label size mismatch ``ValueError``, each naming the file.
    """

    num_classes = 21
    class_names = VOC_CLASSES

    def __init__(self, root, split: str = "train", transform=None):
        self.root = _resolve_root(root)
        self.split = split
        self.transform = transform
        self.ids = read_split(self.root / "ImageSets" / "Segmentation" / ("%s.txt" % split))

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, index: int):
        """(image path, label path) of item ``index``."""
        image_id = self.ids[index]
        return (
            self.root / "JPEGImages" / ("%s.jpg" % image_id),
            self.root / "SegmentationClass" / ("%s.png" % image_id),
        )

    def raw(self, index: int):
        """Item ``index`` as (uint8 (H, W, 3) RGB, uint8 (H, W) labels)."""
        return load_image_and_label(*self.paths(index))

    def __getitem__(self, index: int):
        image, labels = self.raw(index)
        pair = image_to_tensor(image), torch.from_numpy(labels.astype(np.int64))
        return self.transform(*pair) if self.transform is not None else pair


def write_synthetic_voc(
    root,
    num_train: int,
    num_val: int,
    size=64,
    seed: int = 0,
    num_classes: int = 21,
    **scene_kwargs,
) -> Path:
    """Write ``SyntheticScenes`` in the VOC layout under ``root`` (created) and return it.

    Ids are ``synth_000000``...; the first ``num_train`` form ``train.txt``,
    the next ``num_val`` ``val.txt`` (and both ``trainval.txt``). Images are
    saved as JPEG (quality 95), labels as VOC palette PNGs.
    """
    root = Path(root)
    scenes = SyntheticScenes(
        num_train + num_val, size, num_classes=num_classes, seed=seed, **scene_kwargs
    )
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = ["synth_%06d" % i for i in range(len(scenes))]
    for i, image_id in enumerate(ids):
        image, labels = scenes.scene(i)
        Image.fromarray(image).save(
            root / "JPEGImages" / ("%s.jpg" % image_id), quality=95, subsampling=0
        )
        save_label_png(labels, root / "SegmentationClass" / ("%s.png" % image_id))
    splits = {"train": ids[:num_train], "val": ids[num_train:], "trainval": ids}
    for name, members in splits.items():
        (root / "ImageSets" / "Segmentation" / ("%s.txt" % name)).write_text(
            "".join(m + "\n" for m in members)
        )
    return root
