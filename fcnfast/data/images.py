"""Image and label I/O and the input normalisation shared by every dataset and ``fcnfast predict``.

Normalisation (``image_to_tensor``): RGB, scaled to [0, 1], minus the ImageNet
mean (0.485, 0.456, 0.406), divided by the std (0.229, 0.224, 0.225) -- the
convention of torchvision's VGG16 weights, which is the format ``load_vgg16``
reads. (Caffe's BGR-minus-mean (104.007, 116.669, 122.679) matches
Caffe-converted weights instead; mixing the two would silently degrade a
pretrained backbone, so fcnfast uses the torchvision one everywhere.)
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from PIL import Image

from ..losses import IGNORE_INDEX  # the one ignore label (255), re-exported here

__all__ = [
    "MEAN_RGB",
    "STD_RGB",
    "IGNORE_INDEX",
    "VOC_CLASSES",
    "image_to_tensor",
    "tensor_to_image",
    "load_image",
    "load_image_and_label",
    "to_rgb8",
    "label_format_for",
    "image_format_for",
    "load_label",
    "save_label_png",
    "voc_palette",
]

MEAN_RGB = (0.485, 0.456, 0.406)
STD_RGB = (0.229, 0.224, 0.225)

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

PathLike = Union[str, os.PathLike]


def image_to_tensor(image) -> torch.Tensor:
    """uint8 (H, W, 3) RGB array -> float32 (3, H, W): ``(image / 255 - MEAN_RGB) / STD_RGB``."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(
            "image must be a uint8 (H, W, 3) RGB array, got %s %s" % (array.dtype, array.shape)
        )
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    return tensor.sub_(mean).div_(std).contiguous()


def tensor_to_image(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of ``image_to_tensor``: float (3, H, W) -> uint8 (H, W, 3) (rounded, clipped)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3 or tensor.shape[0] != 3:
        raise ValueError(
            "tensor must be a (3, H, W) tensor, got %s"
            % (tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor))
        )
    mean = torch.tensor(MEAN_RGB).view(3, 1, 1)
    std = torch.tensor(STD_RGB).view(3, 1, 1)
    rgb = (tensor.detach().cpu().float() * std + mean) * 255.0
    return rgb.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def _open(path: PathLike, what: str) -> Image.Image:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError("%s file not found: %s" % (what, path))
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated/corrupt files fail here, naming the file
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise ValueError("cannot read %s %s: %s" % (what, path, exc)) from exc
    return img


ALPHA_MODES = ("black", "error")


def to_rgb8(img: Image.Image, alpha: str = "black", name: str = "image") -> np.ndarray:
    """A Pillow image as uint8 (H, W, 3) RGB, for the images users have:

    * 8-bit grey (L), RGB, CMYK, YCbCr, palette (P): Pillow's conversion;
    * 16-bit / 32-bit grey (I;16, I;16B, I, F): scaled by the type's full range
      (65535 for 16-bit, which Pillow reports as I;16* or I) -- never clipped at 255;
    * an alpha channel (RGBA, LA, PA, or a palette/grey image with a transparency key):
      ``alpha="black"`` composites the image on black (transparent pixels become black),
      ``alpha="error"`` refuses with a ValueError naming the file.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError("alpha must be one of %s, got %r" % (ALPHA_MODES, alpha))
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        if alpha == "error":
            raise ValueError(
                "%s has an alpha channel (mode %s); drop --alpha error to composite "
                "it on black" % (name, img.mode)
            )
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        rgb = rgba[..., :3] * (rgba[..., 3:] / 255.0)
        return rgb.round().clip(0, 255).astype(np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(img)
        if img.mode == "F":
            finite = array[np.isfinite(array)]
            low = float(finite.min()) if finite.size else 0.0
            high = float(finite.max()) if finite.size else 1.0
            scaled = (array - low) / max(high - low, 1e-12) * 255.0
        else:
            # 16-bit data (every PNG/TIFF 16-bit grey image; Pillow opens some as mode I)
            full = (
                65535.0
                if img.mode.startswith("I;16") or array.max(initial=0) <= 65535
                else float(np.iinfo(np.int32).max)
            )
            scaled = array.astype(np.float64) / full * 255.0
        grey = np.nan_to_num(scaled).round().clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "RGB":
        return np.array(img, dtype=np.uint8)  # one copy (big images: no convert() copy first)
    return np.array(img.convert("RGB"), dtype=np.uint8)


def load_image(path: PathLike, alpha: str = "black") -> np.ndarray:
    """Read an image file as a uint8 (H, W, 3) RGB array (Pillow; see ``to_rgb8`` for the modes:
    16-bit grey is scaled by 65535, an alpha channel is composited on black or refused)."""
    img = _open(path, "image")
    try:
        return to_rgb8(img, alpha=alpha, name=os.fspath(path))
    finally:
        img.close()


# lossless formats a label map may be written to (the extension picks the format)
LABEL_FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF"}


def image_format_for(path: PathLike, what: str = "image") -> str:
    """The Pillow format an output ``path`` asks for by its extension (ValueError if none)."""
    from PIL import Image as _Image

    _Image.init()
    ext = os.path.splitext(os.fspath(path))[1].lower()
    fmt = _Image.EXTENSION.get(ext)
    if fmt is None or fmt not in _Image.SAVE:
        raise ValueError(
            "%s %s: cannot tell an image format from the extension %r (use e.g. "
            ".png, .jpg, .tif)" % (what, os.fspath(path), ext)
        )
    return fmt


def label_format_for(path: PathLike) -> str:
    """The lossless format of label-map output ``path``; ValueError for lossy/unknown ones."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in LABEL_FORMATS:
        raise ValueError(
            "label map %s: %r is not a lossless format for class indices; use one "
            "of %s (an --overlay picture may be JPEG)"
            % (os.fspath(path), ext or "(no extension)", ", ".join(sorted(LABEL_FORMATS)))
        )
    return LABEL_FORMATS[ext]


def load_image_and_label(image_path: PathLike, label_path: PathLike):
    """(uint8 (H, W, 3) RGB, uint8 (H, W) labels) of one dataset item; sizes must agree."""
    image = load_image(image_path)
    labels = load_label(label_path)
    if image.shape[:2] != labels.shape:
        raise ValueError(
            "image %s is %dx%d but its label %s is %dx%d"
            % (
                os.fspath(image_path),
                image.shape[0],
                image.shape[1],
                os.fspath(label_path),
                labels.shape[0],
                labels.shape[1],
            )
        )
    return image, labels


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, (256, 3) uint8 (index 255, "ignore", is (224, 224, 192))."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def load_label(path: PathLike) -> np.ndarray:
    """Read a label PNG as a uint8 (H, W) class-index array (255 = ignore).

    Palette ("P") and greyscale ("L") PNGs hold the indices directly; an RGB
    label is mapped back through ``voc_palette`` (unknown colours -> ValueError).
    """
    img = _open(path, "label")
    if img.mode in ("P", "L"):
        return np.asarray(img, dtype=np.uint8).copy()
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint32)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pal = voc_palette().astype(np.uint32)
        pal_codes = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        order = np.argsort(pal_codes)
        pos = np.clip(np.searchsorted(pal_codes[order], codes), 0, 255)
        found = pal_codes[order][pos] == codes
        if not found.all():
            raise ValueError("label %s has colours outside the VOC palette" % os.fspath(path))
        return order[pos].astype(np.uint8)
    raise ValueError(
        "label %s has image mode %r; expected a palette (P), L or RGB PNG"
        % (os.fspath(path), img.mode)
    )


def save_label_png(labels, path: PathLike, palette=None) -> None:
    """Write an (H, W) label map (values 0..255) as a palette image; the format follows the
    extension and must be lossless (.png, .tif/.tiff, .bmp, .gif; ValueError otherwise).

    ``palette``: a sequence of RGB triples for classes 0.. (e.g. CamVid's);
    default (and for the entries it does not cover) the VOC colours.
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 2:
        raise ValueError("labels must be a 2-D (H, W) array, got shape %s" % (array.shape,))
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            "labels must lie in 0..255 for a palette PNG, got %s..%s" % (array.min(), array.max())
        )
    array = np.ascontiguousarray(array, dtype=np.uint8)
    img = Image.frombytes("P", (array.shape[1], array.shape[0]), array.tobytes())
    colours = voc_palette()
    if palette is not None:
        given = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
        colours[: len(given)] = given
    img.putpalette(colours.reshape(-1).tolist())
    img.save(os.fspath(path), format=label_format_for(path))
