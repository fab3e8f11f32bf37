"""Tiled inference for big images: the same labels as the whole-image pass, in bounded memory.

An FCN output pixel depends only on the input pixels inside its receptive field, and the
network is exactly shift-equivariant for shifts that are multiples of its output stride
(the stride of pool5, 32: every pooling grid and every fixed crop offset moves by whole
cells). So the image is cut into ``tile x tile`` cores whose origins are multiples of the
stride; each core is computed from a window that extends it by ``halo`` pixels on every side
(clipped at the image border, where the whole-image pass sees the same zero padding) and only
the core's labels are kept. With ``halo`` at least the receptive-field radius (rounded up to a
multiple of the stride, see ``receptive_halo``) every kept pixel sees exactly the inputs it
sees in the whole-image pass, so the labels are equal (tests/test_tiling.py checks this on
odd sizes, and that a too small halo does change them).

Memory: the input stays uint8 (or whatever the caller slices windows from), the label map is
uint8, and only one window's activations exist at a time.

The dense CRF (``crf=...``) runs per tile as well, on the tile plus ``CRF_HALO`` pixels of
context (logits from the tile's full CNN window, core kept). This bounds its memory but is an approximation of the whole-image CRF: pixels of
different windows exchange no messages. The CNN labels are exact; the CRF ones are not.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
from torch import nn

__all__ = [
    "AUTO_TILE_PIXELS",
    "DEFAULT_TILE",
    "receptive_halo",
    "output_stride",
    "tiles",
    "tiled_labels",
    "conv_receptive_field",
    "default_tile",
    "tile_for",
]

# images with more pixels than this are tiled automatically by predict/eval (--tile 0: never)
AUTO_TILE_PIXELS = 2048 * 2048
DEFAULT_TILE = 1024


def _pairs(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _walk(model: nn.Module) -> Tuple[int, int]:
    """(receptive field size, stride) of the network's coarsest features, in input pixels.

    A model may state its own (``receptive_field()``, e.g. ``LiteFCN``); otherwise the
    VGG-style FCNs of ``fcnfast train`` (``features`` + ``fc6``) are walked layer by layer."""
    own = getattr(model, "receptive_field", None)
    if callable(own):
        return own()
    features = getattr(model, "features", None)
    fc6 = getattr(model, "fc6", None)
    if features is None or fc6 is None:
        raise ValueError(
            "tiling needs an fcnfast FCN (a VGG-style FCN with features + fc6, or "
            "a model with receptive_field()), got %s" % type(model).__name__
        )
    return conv_receptive_field(list(features) + [fc6])


def conv_receptive_field(layers) -> Tuple[int, int]:
    """(receptive field size, stride) of a chain of ``nn.Conv2d`` / ``nn.MaxPool2d`` layers
    applied in the given order (other modules -- activations, norms -- do not widen it)."""
    size, jump = 1, 1
    for module in layers:
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            k = _pairs(module.kernel_size)[0]
            s = _pairs(module.stride)[0]
            d = _pairs(getattr(module, "dilation", 1))[0]
            size += (k - 1) * d * jump
            jump *= s
    return size, jump


def default_tile(model: nn.Module) -> int:
    """The tile side used when none is given: ``model.preferred_tile`` if the model states
    one (a memory-hungry backbone prefers smaller windows), else ``DEFAULT_TILE``."""
    return int(getattr(model, "preferred_tile", DEFAULT_TILE))


def tile_for(model: nn.Module, height: int, width: int, tile: Optional[int] = None) -> int:
    """The tile side for an image: ``tile`` if given (0: whole image), else
    ``default_tile(model)`` above ``AUTO_TILE_PIXELS`` pixels and 0 (whole image) below."""
    if tile is not None:
        return tile
    return default_tile(model) if height * width > AUTO_TILE_PIXELS else 0


def output_stride(model: nn.Module) -> int:
    """The coarsest stride of the network (32 for every FCN here): tile origins align to it."""
    return _walk(model)[1]


def receptive_halo(model: nn.Module) -> int:
    """Pixels of context each side of a tile so that its labels equal the whole-image ones.

    The fc6 receptive field radius, plus the reach of the upsampling deconvolutions (each
    kernel 2*s spans two cells of its input: at most the input stride per deconvolution, and
    the deconvolutions' input strides 32 + 16 + 8 sum to less than 2 * 32), rounded up to a
    multiple of the output stride."""
    size, jump = _walk(model)
    reach = size / 2.0 + 2 * jump
    return int(math.ceil(reach / jump) * jump)


def tiles(
    height: int, width: int, tile: int, halo: int, stride: int
) -> Iterator[Tuple[Tuple[int, int, int, int], Tuple[int, int, int, int]]]:
    """((y0, y1, x0, x1) window, (cy0, cy1, cx0, cx1) core in window coordinates) for each tile.

    Core origins are multiples of ``tile`` (itself rounded up to a multiple of ``stride``);
    window origins are multiples of ``stride`` (``halo`` is)."""
    tile = int(math.ceil(tile / stride) * stride)
    halo = int(math.ceil(halo / stride) * stride)
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            y0, x0 = max(0, y - halo), max(0, x - halo)
            y1, x1 = min(height, y + tile + halo), min(width, x + tile + halo)
            yield (
                (y0, y1, x0, x1),
                (y - y0, min(y + tile, height) - y0, x - x0, min(x + tile, width) - x0),
            )


# context (pixels each side of a tile) the per-tile CRF sees: the default bilateral spatial
# std is 80 px, so 128 px keeps most of the appearance kernel's mass near the tile border
CRF_HALO = 128


def tiled_labels(
    model: nn.Module,
    height: int,
    width: int,
    window: Callable[[int, int, int, int], torch.Tensor],
    tile: int = DEFAULT_TILE,
    halo: Optional[int] = None,
    crf: Optional[Callable] = None,
    progress: bool = False,
    desc: str = "tiles",
    crf_halo: int = CRF_HALO,
) -> np.ndarray:
    """(H, W) uint8 labels of ``model`` computed tile by tile.

    ``window(y0, y1, x0, x1)`` returns the model input of that window, (1, C, y1-y0, x1-x0),
    on the model's device: what ``model.predict`` takes (the normalised float image for the
    VGG-style FCNs, the uint8 RGB image for ``LiteFCN``). ``crf(logits, y0, y1, x0, x1) -> (h, w) labels``: refine the
    logits of the tile plus ``crf_halo`` pixels around it (clipped to the window), given with
    their image coordinates (see the module notes: an approximation of the whole-image CRF;
    with one tile covering the image it is the whole-image CRF)."""
    from tqdm.auto import tqdm

    if tile <= 0:
        raise ValueError("tile must be positive, got %r" % (tile,))
    stride = output_stride(model)
    halo = receptive_halo(model) if halo is None else halo
    if getattr(model, "num_classes", 0) > 256:
        raise ValueError("tiled labels are uint8: at most 256 classes, got %d" % model.num_classes)
    out = np.empty((height, width), dtype=np.uint8)
    plan = list(tiles(height, width, tile, halo, stride))
    with torch.no_grad():
        for (y0, y1, x0, x1), (cy0, cy1, cx0, cx1) in tqdm(
            plan, desc=desc, leave=False, disable=None if progress else True
        ):
            x = window(y0, y1, x0, x1)
            if crf is None:
                labels = model.predict(x)[0]
            else:
                # uint8 windows are raw images (LiteFCN): its forward takes the normalised input
                logits = model(model.preprocess(x) if x.dtype == torch.uint8 else x)
                h, w = logits.shape[-2:]
                oy0, ox0 = max(0, cy0 - crf_halo), max(0, cx0 - crf_halo)
                oy1, ox1 = min(h, cy1 + crf_halo), min(w, cx1 + crf_halo)
                logits = logits[:, :, oy0:oy1, ox0:ox1].contiguous()
                refined = crf(logits, y0 + oy0, y0 + oy1, x0 + ox0, x0 + ox1)
                del logits
                labels = torch.zeros((h, w), dtype=refined.dtype, device=refined.device)
                labels[oy0:oy1, ox0:ox1] = refined
            out[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1] = (
                labels[cy0:cy1, cx0:cx1].to(torch.uint8).cpu().numpy()
            )
            del x, labels
            _release_free_memory()
    return out


def _release_free_memory() -> None:
    """Give the last window's freed memory back to the system (the native output cache, then
    glibc's heap via ``malloc_trim``).

    Windows of different sizes leave holes in glibc's heap that later windows do not fit, so
    the resident size crept up by ~0.1 GB per window (an 8000 px image: 2.2 GB and rising with
    768 px tiles of the Lite0 model); trimming keeps it at one window's working set. A no-op
    where the C library has no ``malloc_trim``."""
    _clear_output_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _clear_output_cache() -> None:
    """Empty the native ops' cache of freed large outputs (``csrc/cpu/large_output``): windows
    differ in size, so its blocks would rarely be reused and only hold memory."""
    try:
        from . import _C
    except ImportError:  # the reference backend only
        return
    clear = getattr(_C, "cpu_output_cache_clear", None)
    if clear is not None:
        clear()


def _malloc_trim():
    global _TRIM
    if _TRIM is False:
        import ctypes
        import ctypes.util

        try:
            _TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = None
    return _TRIM


_TRIM = False  # not looked up yet
