"""Pictures of label maps: a colour overlay on the image with a class legend."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .data.images import IGNORE_INDEX, voc_palette

__all__ = ["colorize", "overlay_with_legend"]


def _palette(palette: Optional[Sequence[Sequence[int]]]) -> np.ndarray:
    colours = voc_palette()
    if palette is not None:
        given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        colours[: len(given)] = given
    return colours


def colorize(labels: np.ndarray, palette=None) -> np.ndarray:
    """The colour picture of a label map (the ignore label is black).

    Args:
        labels (ndarray): (H, W) integer labels (values clipped to 0..255).
        palette (sequence of (r, g, b), optional): colours of the first classes; the others
            keep the PASCAL VOC palette.

    Returns:
        ndarray: (H, W, 3) uint8 colours.
    """
    colours = _palette(palette).copy()
    colours[IGNORE_INDEX] = 0
    return colours[np.asarray(labels, dtype=np.int64).clip(0, 255)]


def overlay_with_legend(
    image: np.ndarray,
    labels: np.ndarray,
    palette=None,
    class_names: Optional[Sequence[str]] = None,
    alpha: float = 0.55,
    only_present: bool = False,
) -> Image.Image:
    """``image`` blended with the label colours, and a legend column at the right.

    Args:
        image (ndarray): (H, W, 3) uint8 RGB.
        labels (ndarray): (H, W) integer labels; the ignore label leaves the image as it is.
        palette (sequence of (r, g, b), optional): as for ``colorize``.
        class_names (sequence of str, optional): legend names (default: the class numbers).
        alpha (float): weight of the label colour in the blend.
        only_present (bool): list only the classes that occur in ``labels``.

    Returns:
        PIL.Image.Image: the overlay, ``H x (W + legend width)`` (taller when the legend is).
    """
    image = np.asarray(image, dtype=np.uint8)
    labels = np.asarray(labels)
    if image.shape[:2] != labels.shape:
        raise ValueError(
            "image is %dx%d but labels are %dx%d"
            % (image.shape[0], image.shape[1], labels.shape[0], labels.shape[1])
        )
    colours = _palette(palette)
    blend = image.astype(np.float32) * (1 - alpha) + colorize(labels, palette) * alpha
    valid = labels != IGNORE_INDEX
    out = np.where(valid[..., None], blend, image).round().astype(np.uint8)
    count = int(labels[valid].max()) + 1 if valid.any() else 0
    if class_names is not None:
        count = len(class_names)
    names = list(class_names) if class_names is not None else [str(i) for i in range(count)]
    shown = [i for i in range(count) if not only_present or (labels == i).any()]
    font = ImageFont.load_default()
    row = 16
    width = 24 + max([len(names[i]) for i in shown] + [4]) * 7
    canvas = Image.new(
        "RGB", (out.shape[1] + width, max(out.shape[0], row * len(shown) + 8)), (255, 255, 255)
    )
    canvas.paste(Image.fromarray(out), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = out.shape[1] + 6
    for k, index in enumerate(shown):
        y = 4 + k * row
        draw.rectangle(
            [x0, y + 2, x0 + 11, y + 13],
            fill=tuple(int(c) for c in colours[index]),
            outline=(0, 0, 0),
        )
        draw.text((x0 + 16, y + 2), names[index], fill=(0, 0, 0), font=font)
    return canvas
