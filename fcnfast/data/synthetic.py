"""Deterministic synthetic segmentation scenes (no downloads), VOC-like.

Each scene is a textured, low-saturation background (class 0) with one to
several objects -- ellipses, rectangles and triangles, randomly rotated,
possibly overlapping -- of classes 1..num_classes-1. Every class has a fixed
appearance, the same for every seed: a saturated hue (classes spread around
the colour wheel, alternating brightness) and a texture (flat, stripes,
checkerboard or spots, with a class-specific period and orientation), so a
small FCN can learn it. Scenes vary in brightness and pixel noise. With
``ignore_border=w`` every pixel within ``w`` pixels (Chebyshev distance) of a
different class is labelled 255 (ignored), like VOC's object outlines.

Scene ``i`` of ``SyntheticScenes(..., seed=s)`` depends only on (s, i, size,
num_classes, options): the dataset is deterministic and random-access.
"""

from __future__ import annotations

import colorsys
import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from .images import IGNORE_INDEX, image_to_tensor

__all__ = ["SyntheticScenes", "class_appearance", "render_scene"]

Size = Union[int, Sequence[int]]

_TEXTURES = ("flat", "stripes", "checker", "spots")


def _size_pair(size: Size, name: str = "size") -> Tuple[int, int]:
    if isinstance(size, bool):
        raise ValueError("%s must be an int or (H, W), got %r" % (name, size))
    if isinstance(size, int):
        pair = (size, size)
    else:
        try:
            pair = tuple(int(v) for v in size)
        except TypeError:
            raise ValueError("%s must be an int or (H, W), got %r" % (name, size)) from None
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError("%s must be a positive int or (H, W), got %r" % (name, size))
    return pair


def class_appearance(cls: int, num_classes: int):
    """(rgb in [0, 1], texture name, period in pixels, orientation in radians) of class ``cls`` >= 1."""
    k = num_classes - 1
    hue = ((cls - 1) * 0.618033988749895) % 1.0 if k > 6 else (cls - 1) / max(k, 1)
    value = 0.95 if cls % 2 else 0.7
    saturation = 0.9 if cls % 3 else 0.65
    rgb = np.array(colorsys.hsv_to_rgb(hue, saturation, value))
    texture = _TEXTURES[cls % len(_TEXTURES)]
    period = 4.0 + 2.0 * (cls % 3)
    angle = math.pi * ((cls * 0.37) % 1.0)
    return rgb, texture, period, angle


def _texture(kind: str, yy, xx, period: float, angle: float, phase: float) -> np.ndarray:
    """Brightness modulation in [0.65, 1] for a texture kind."""
    if kind == "flat":
        return np.ones_like(yy)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == "stripes":
        wave = 0.5 + 0.5 * np.sin(2 * math.pi * u / period + phase)
    elif kind == "checker":
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        wave = ((np.floor(u / period + phase) + np.floor(v / period)) % 2).astype(np.float64)
    else:  # spots
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        wave = (
            (np.sin(2 * math.pi * u / period + phase) * np.sin(2 * math.pi * v / period)) > 0.3
        ).astype(np.float64)
    return 0.65 + 0.35 * wave


def _shape_mask(rng: np.random.Generator, yy, xx, height: int, width: int) -> np.ndarray:
    extent = min(height, width)
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    ry, rx = rng.uniform(0.12, 0.35, size=2) * extent + 1.0
    angle = rng.uniform(0, math.pi)
    u = (xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)
    v = -(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)
    kind = rng.integers(3)
    if kind == 0:  # ellipse
        return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    if kind == 1:  # rectangle
        return (np.abs(u) <= rx) & (np.abs(v) <= ry)
    # triangle: three vertices around the centre, inside all three half-planes
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=3))
    angles = angles[0] + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, size=3)
    radius = max(rx, ry) * 1.2
    px, py = cx + radius * np.cos(angles), cy + radius * np.sin(angles)
    inside = np.ones_like(xx, dtype=bool)
    for i in range(3):
        j = (i + 1) % 3
        cross = (px[j] - px[i]) * (yy - py[i]) - (py[j] - py[i]) * (xx - px[i])
        inside &= cross >= 0
    return inside


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth low-saturation noise texture, (H, W, 3) in [0, 1]."""
    base = rng.uniform(0.3, 0.6) + rng.uniform(-0.05, 0.05, size=3)
    noise = rng.standard_normal((height, width))
    blob = ndimage.gaussian_filter(noise, sigma=rng.uniform(2.0, 5.0), mode="wrap")
    blob /= blob.std() + 1e-8
    return np.clip(base[None, None, :] + 0.08 * blob[..., None], 0.0, 1.0)


def render_scene(
    rng: np.random.Generator,
    height: int,
    width: int,
    num_classes: int,
    max_objects: int = 4,
    ignore_border: int = 0,
    noise: float = 0.03,
):
    """One scene: (uint8 (H, W, 3) RGB image, uint8 (H, W) labels)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    image = _background(rng, height, width)
    labels = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(1, num_classes))
        mask = _shape_mask(rng, yy, xx, height, width)
        rgb, kind, period, angle = class_appearance(cls, num_classes)
        shade = _texture(kind, yy, xx, period, angle, rng.uniform(0, 2 * math.pi))
        image[mask] = (shade[..., None] * rgb[None, None, :])[mask]
        labels[mask] = cls
    if ignore_border > 0:
        size = 2 * ignore_border + 1
        edge = ndimage.grey_dilation(labels, size=(size, size)) != ndimage.grey_erosion(
            labels, size=(size, size)
        )
        labels[edge] = IGNORE_INDEX  # pixels within ignore_border of another class
    image = image * rng.uniform(0.85, 1.15) + noise * rng.standard_normal(image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8), labels


class SyntheticScenes(Dataset):
    """``num_images`` deterministic synthetic scenes of ``size`` (int or (H, W)).

    Yields ``(image float32 (3, H, W), label int64 (H, W))``, the image
    normalised by ``image_to_tensor``; class 0 is background, 255 is ignore.
    ``max_size`` (int or (H, W)) draws each scene's height and width uniformly
    between ``size`` and ``max_size``. ``scene(i)`` gives the raw uint8 arrays.
    ``transform(image, label)``, if given, maps the tensor pair.
    """

    def __init__(
        self,
        num_images: int,
        size: Size,
        num_classes: int = 21,
        seed: int = 0,
        max_objects: int = 4,
        ignore_border: int = 0,
        noise: float = 0.03,
        max_size: Optional[Size] = None,
        transform=None,
    ):
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise ValueError("num_images must be a non-negative int, got %r" % (num_images,))
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, int)
            or not 2 <= num_classes <= 255
        ):
            raise ValueError("num_classes must be an int in 2..255, got %r" % (num_classes,))
        if max_objects < 1:
            raise ValueError("max_objects must be >= 1, got %r" % (max_objects,))
        if ignore_border < 0:
            raise ValueError("ignore_border must be >= 0, got %r" % (ignore_border,))
        self.num_images = num_images
        self.size = _size_pair(size)
        self.max_size = self.size if max_size is None else _size_pair(max_size, "max_size")
        if self.max_size[0] < self.size[0] or self.max_size[1] < self.size[1]:
            raise ValueError("max_size %s must be >= size %s" % (self.max_size, self.size))
        self.num_classes = num_classes
        self.seed = int(seed)
        self.max_objects = int(max_objects)
        self.ignore_border = int(ignore_border)
        self.noise = float(noise)
        self.transform = transform

    def __len__(self) -> int:
        return self.num_images

    def scene(self, index: int):
        """Scene ``index`` as (uint8 (H, W, 3) RGB, uint8 (H, W) labels)."""
        if not -self.num_images <= index < self.num_images:
            raise IndexError("scene index %d out of range for %d images" % (index, self.num_images))
        index %= self.num_images
        rng = np.random.default_rng([self.seed, index])
        height = int(rng.integers(self.size[0], self.max_size[0] + 1))
        width = int(rng.integers(self.size[1], self.max_size[1] + 1))
        return render_scene(
            rng, height, width, self.num_classes, self.max_objects, self.ignore_border, self.noise
        )

    def __getitem__(self, index: int):
        image, labels = self.scene(index)
        pair = image_to_tensor(image), torch.from_numpy(labels.astype(np.int64))
        return self.transform(*pair) if self.transform is not None else pair
