"""VGG16 backbones for the FCNs, laid out exactly like torchvision's ``vgg16().features``.

The ``features`` ``nn.Sequential`` uses the torchvision indices (conv layers at
0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28; max-pools at 4, 9, 16, 23, 30)
so a torchvision VGG16 ``state_dict`` loads into it key for key. Two things
differ from the classifier, as in the FCN paper's Caffe nets:

* ``conv1_1`` is padded by 100 pixels, so every input size -- even 1x1 --
  reaches ``fc6`` with at least 7x7 cells and the output can be cropped back
  to the input size;
* max-pooling rounds its output size up (``ceil_mode=True``), as Caffe does;
  the fixed crop offsets rely on it.

``fc6`` (7x7) and ``fc7`` (1x1) are the classifier's fully connected layers
written as convolutions, each followed by ReLU and element-wise dropout.

Backbones (``BACKBONES``):

* ``"vgg16"`` -- the paper's network: widths 64, 128, 256, 512, 512; fc 4096;
  dropout 0.5.
* ``"small"`` -- the same layers, padding and pooling (so the same geometry and
  crop offsets) with every width divided by 8: 8, 16, 32, 64, 64; fc 256.
* ``"tiny"`` -- widths divided by 16 (4, 8, 16, 32, 32; fc 128), the same
  geometry, plus batch normalisation after every convolution of conv1_1 ..
  conv5_3 and dropout 0.1: it trains from scratch (no ImageNet weights) on a
  2-core CPU in minutes on small synthetic scenes, for demos and tests. Its
  ``features`` indices differ from torchvision's because of the BN layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CeilMaxPool2d",
    "BackboneSpec",
    "BACKBONES",
    "VGG16_LAYOUT",
    "CONV1_PADDING",
    "backbone_spec",
    "make_features",
    "make_fc",
    "pool_indices",
]

# Convolutions per block of VGG16 (configuration "D").
VGG16_LAYOUT: Tuple[int, ...] = (2, 2, 3, 3, 3)
CONV1_PADDING = 100
FC6_KERNEL = 7


class CeilMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(kernel, stride, ceil_mode=True)`` (no padding) that also exports.

    Eager, it is exactly ``nn.MaxPool2d``. While torch.export / torch.compile trace with
    symbolic (dynamic) height or width it computes the same thing as a floor-mode pooling of
    the input padded by ``stride - 1`` rows/columns of ``-inf`` at the bottom/right
    (``ceil((H-k)/s) + 1 == floor((H+s-1-k)/s) + 1``, and a window never lies wholly in the
    padding): ceil mode's "does the last window start inside the input" test would otherwise
    become a guard (``2*((197 + H) // 2) < 198 + H``) that the exporter cannot prove for every
    size, and the export with dynamic height/width would fail.
    """

    def __init__(self, kernel_size: int, stride: int):
        super().__init__(kernel_size, stride=stride, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x.shape[-1], torch.SymInt) or isinstance(x.shape[-2], torch.SymInt):
            s = self.stride if isinstance(self.stride, int) else self.stride[0]
            padded = F.pad(x, (0, s - 1, 0, s - 1), value=float("-inf"))
            return F.max_pool2d(padded, self.kernel_size, self.stride)
        return super().forward(x)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    widths: Tuple[int, int, int, int, int]  # output channels of blocks 1..5
    fc_width: int  # fc6 / fc7 channels
    batch_norm: bool = False  # BatchNorm2d after each conv of conv1_1 .. conv5_3
    dropout: float = 0.5  # default element-wise dropout after fc6 and fc7


BACKBONES = {
    "vgg16": BackboneSpec("vgg16", (64, 128, 256, 512, 512), 4096),
    "small": BackboneSpec("small", (8, 16, 32, 64, 64), 256),
    "tiny": BackboneSpec("tiny", (4, 8, 16, 32, 32), 128, batch_norm=True, dropout=0.1),
}


def backbone_spec(backbone) -> BackboneSpec:
    """A ``BackboneSpec`` or one of the names in ``BACKBONES``."""
    if isinstance(backbone, BackboneSpec):
        return backbone
    try:
        return BACKBONES[backbone]
    except (KeyError, TypeError):
        raise ValueError(
            "backbone must be one of %s, got %r" % (sorted(BACKBONES), backbone)
        ) from None


def make_features(spec: BackboneSpec, in_channels: int = 3) -> nn.Sequential:
    """conv1_1 .. pool5 (torchvision's ``vgg16().features`` indices when there is no batch norm)."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels <= 0:
        raise ValueError("in_channels must be a positive int, got %r" % (in_channels,))
    layers = []
    channels = in_channels
    for block, (convs, width) in enumerate(zip(VGG16_LAYOUT, spec.widths)):
        for i in range(convs):
            padding = CONV1_PADDING if block == 0 and i == 0 else 1
            layers.append(nn.Conv2d(channels, width, 3, padding=padding))
            if spec.batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            channels = width
        layers.append(CeilMaxPool2d(2, stride=2))
    return nn.Sequential(*layers)


def pool_indices(features: nn.Sequential):
    """Indices in ``features`` of pool1 .. pool5."""
    return [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]


def make_fc(
    spec: BackboneSpec, dropout: float
) -> Tuple[nn.Conv2d, nn.Module, nn.Conv2d, nn.Module]:
    """fc6 (7x7 conv), its dropout, fc7 (1x1 conv), its dropout (element-wise, as Caffe)."""
    fc6 = nn.Conv2d(spec.widths[-1], spec.fc_width, FC6_KERNEL)
    fc7 = nn.Conv2d(spec.fc_width, spec.fc_width, 1)
    return fc6, nn.Dropout(dropout), fc7, nn.Dropout(dropout)
