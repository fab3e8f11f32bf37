"""The two HSI classifiers compared by ``fcnfast hsi``.

* ``PatchCNN`` -- today's method: a ``w x w x bands`` patch around each pixel (reflect padding at the
  scene border), valid 3x3 convolutions, ``Flatten`` and ``Linear`` layers. No padding and no
  pooling, so ``fcnfast.models.convolutionalize`` turns it into an exactly equivalent dense net.
* ``HSIFCN`` -- an FCN-8s-style encoder-decoder on the whole scene (``in_channels = bands``): two
  2x2 poolings, a class-score map at 1/4 resolution, then two x2 bilinear-initialised upsamplings
  (``fcnfast.nn.BilinearUpsample2d``) each fused with the 1x1 score of the matching encoder feature
  (``fcnfast.nn.SkipFuse``). Output ``(N, K, H, W)`` for any ``H, W``.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BilinearUpsample2d, SkipFuse

__all__ = ["PatchCNN", "HSIFCN", "reflect_pad", "extract_patches", "receptive_field"]


def _conv_bn_relu(cin: int, cout: int, padding: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _spectral(bands: int, width: int) -> nn.Sequential:
    """1x1 conv mixing the bands: most of the input is spectral, this keeps the 3x3 convs narrow."""
    return _conv_bn_relu(bands, width, padding=0, kernel=1)


class PatchCNN(nn.Sequential):
    """Patch classifier ``(N, bands, w, w) -> (N, K)`` logits.

    A 1x1 spectral conv (bands -> ``width``), then ``(w - 5) // 2`` valid 3x3 conv+BN+ReLU blocks
    shrinking the patch to 5x5 (w=11: three blocks; w=5: none), then
    ``Flatten -> Linear(width*25, hidden) -> ReLU -> Dropout -> Linear(hidden, K)``.
    ``window`` must be odd and >= 5.
    """

    def __init__(
        self,
        bands: int,
        num_classes: int,
        window: int = 11,
        width: int = 16,
        hidden: int = 32,
        dropout: float = 0.5,
    ):
        if window < 5 or window % 2 == 0:
            raise ValueError("window must be odd and >= 5, got %d" % window)
        layers = [_spectral(bands, width)]
        for _ in range((window - 5) // 2):
            layers.append(_conv_bn_relu(width, width, padding=0))
        super().__init__(
            *layers,
            nn.Flatten(),
            nn.Linear(width * 25, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.window = window
        self.bands = bands
        self.num_classes = num_classes
        self.config = dict(
            bands=bands,
            num_classes=num_classes,
            window=window,
            width=width,
            hidden=hidden,
            dropout=dropout,
        )


class HSIFCN(nn.Module):
    """Whole-scene FCN ``(N, bands, H, W) -> (N, K, H, W)`` logits (any H, W).

    1x1 spectral conv (``width``), enc1 (3x3, ``width``) at 1/1 -> pool -> enc2 (3x3, 2*width) at 1/2 -> pool -> enc3 (two 3x3,
    2*width) at 1/4 -> 1x1 score -> [x2 upsample, + score(enc2)] -> [x2 upsample, + score(enc1)].
    Max-pooling uses ``ceil_mode=True`` (Caffe's rounding), so odd sizes work; each x2 upsampling
    (kernel 4, stride 2) is cropped by 1 pixel, which aligns the centre of pooled cell ``i``
    (input pixel ``2i + 0.5``) with its upsampled position.
    """

    def __init__(
        self,
        bands: int,
        num_classes: int,
        width: int = 16,
        dropout: float = 0.2,
        learnable_upsampling: bool = True,
    ):
        super().__init__()
        self.enc1 = nn.Sequential(_spectral(bands, width), _conv_bn_relu(width, width, padding=1))
        self.enc2 = _conv_bn_relu(width, 2 * width, padding=1)
        self.enc3 = nn.Sequential(
            _conv_bn_relu(2 * width, 2 * width, padding=1),
            _conv_bn_relu(2 * width, 2 * width, padding=1),
        )
        self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.drop = nn.Dropout2d(dropout)
        self.score = nn.Conv2d(2 * width, num_classes, 1)
        self.up2 = BilinearUpsample2d(num_classes, 2, learnable=learnable_upsampling)
        self.skip2 = SkipFuse(2 * width, num_classes)
        self.up1 = BilinearUpsample2d(num_classes, 2, learnable=learnable_upsampling)
        self.skip1 = SkipFuse(width, num_classes)
        self.bands = bands
        self.num_classes = num_classes
        self.config = dict(
            bands=bands,
            num_classes=num_classes,
            width=width,
            dropout=dropout,
            learnable_upsampling=learnable_upsampling,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.enc1(x)
        f2 = self.enc2(self.pool(f1))
        f3 = self.enc3(self.pool(f2))
        s = self.score(self.drop(f3))
        s = self.skip2(self.up2(s, crop=(1, 1) + tuple(f2.shape[-2:])), self.drop(f2))
        s = self.skip1(self.up1(s, crop=(1, 1) + tuple(f1.shape[-2:])), self.drop(f1))
        return s

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x).argmax(1)


def reflect_pad(scene: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, H, W)`` or ``(N, B, H, W)`` scene reflect-padded by ``radius`` on each side."""
    if radius == 0:
        return scene
    if radius >= min(scene.shape[-2:]):
        raise ValueError(
            "reflect padding of %d needs a scene larger than %d pixels, got %s"
            % (radius, radius, tuple(scene.shape[-2:]))
        )
    batched = scene.dim() == 4
    out = F.pad(scene if batched else scene[None], (radius,) * 4, mode="reflect")
    return out if batched else out[0]


def extract_patches(
    padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, window: int
) -> torch.Tensor:
    """``(N, B, w, w)`` patches of a ``(B, H + w - 1, W + w - 1)`` padded scene; patch ``n`` is
    centred on scene pixel ``(rows[n], cols[n])``, i.e. ``padded[:, r:r+w, c:c+w]``."""
    offsets = torch.arange(window, device=padded.device)
    r = (rows[:, None] + offsets)[:, :, None]  # (N, w, 1)
    c = (cols[:, None] + offsets)[:, None, :]  # (N, 1, w)
    return padded[:, r, c].permute(1, 0, 2, 3)  # (B, N, w, w) -> (N, B, w, w)


def receptive_field(model: nn.Module, bands: int, size: int = 96) -> Tuple[int, int]:
    """Measured receptive field ``(h, w)`` of a dense model: the bounding box of the input pixels
    whose gradient on the centre output pixel is non-zero (eval mode, random fp64 inputs)."""
    model = model.double().eval()
    hit = torch.zeros(size, size, dtype=torch.bool)
    try:
        for seed in range(3):
            x = torch.randn(
                1,
                bands,
                size,
                size,
                dtype=torch.float64,
                generator=torch.Generator().manual_seed(seed),
                requires_grad=True,
            )
            out = model(x)
            cy, cx = out.shape[-2] // 2, out.shape[-1] // 2
            out[0, :, cy, cx].sum().backward()
            hit |= x.grad[0].abs().sum(0) > 0
    finally:
        model.float()
    rows = torch.nonzero(hit.any(1)).flatten()
    cols = torch.nonzero(hit.any(0)).flatten()
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
