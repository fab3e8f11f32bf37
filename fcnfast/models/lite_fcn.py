"""FCN-32s / 16s / 8s heads on the EfficientNet-Lite0 backbone (``backbone="lite0"``).

The FCN recipe applied to a modern ImageNet classifier: the classifier's last
feature map (stride 32, 1280 channels after ``_conv_head``) is scored by a 1x1
convolution (``score_fr``), upsampled 2x by a learned deconvolution initialised
as bilinear interpolation and fused with a 1x1 score of the stride-16 features
(``score_pool4``, after block 10, 112 channels); FCN-8s repeats that with the
stride-8 features (``score_pool3``, after block 4, 40 channels), and the
final learned deconvolution upsamples to the input size. Every upsampling,
crop and skip fusion runs through fcnfast's ops (``conv_transpose2d`` with a
fused crop, ``score_skip``).

Geometry. The Lite0 backbone pads its input at the bottom/right to a multiple
of 32 and uses TensorFlow's SAME padding, so cell ``y`` of the stride-``s``
features is centred on input pixel ``s*y + s - 1`` (see
``fcnfast.models.efficientnet``). An upsampling by ``f`` therefore uses an
odd kernel ``2f - 1`` (a tent, i.e. exact linear interpolation; the Caffe
bilinear filler gives it for odd sizes) whose centre tap lands on a cell
centre, and the crops are whole pixels:

* 2x (k3 s2) from stride 2s to stride s: output ``1 + y`` is centred on
  ``s*y + s - 1``, the stride-s cell ``y`` -> crop offset 1;
* final ``f``x (k ``2f-1``, stride ``f``) from stride f: output ``y`` is
  centred on pixel ``y`` -> crop offset 0, height/width of the input.

The even ``2f`` kernels of the VGG FCNs would put every output half a pixel
off the feature grid here (they rely on VGG's 2x2 pooling and the pad of 100).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..losses import IGNORE_INDEX, segmentation_loss
from ..nn import ConvTranspose2d, NoScript, SkipFuse, bilinear_kernel
from .efficientnet import (
    LITE0_FEATURE_CHANNELS,
    EfficientNetLite0,
    lite0_state_dict_from_package,
    load_lite0_state_dict,
    normalize_uint8,
)
from .fcn import chunked_argmax

__all__ = ["LiteFCN", "LITE_VARIANTS"]

# variant -> (final upsampling factor, skip taps fused in order)
LITE_VARIANTS = {
    "fcn32s": (32, ()),
    "fcn16s": (16, ("stride16",)),
    "fcn8s": (8, ("stride16", "stride8")),
}
_SKIP_NAMES = {"stride16": ("upscore2", "score_pool4"), "stride8": ("upscore_pool4", "score_pool3")}


def _learned_upsampling(channels: int, factor: int) -> ConvTranspose2d:
    """A (C, C, 2f-1, 2f-1) deconvolution, stride f, no bias, initialised to linear interpolation."""
    kernel = 2 * factor - 1
    layer = ConvTranspose2d(channels, channels, kernel, stride=factor, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, kernel))
    return layer


class LiteFCN(nn.Module, NoScript):
    """FCN-32s/16s/8s on EfficientNet-Lite0; see the module docstring for the geometry.

    ``forward(x)`` takes *normalised* float input (``normalize_uint8``) of shape
    (N, 3, H, W), any H, W >= 1, and returns (N, num_classes, H, W) logits.
    ``predict(images)`` takes uint8 RGB (N, 3, H, W) (or (3, H, W)) and returns
    int64 labels (N, H, W): the model carries its own preprocessing.
    ``class_names`` (optional) names the classes.
    """

    backbone_name = "lite0"

    def __init__(
        self,
        variant: str = "fcn8s",
        num_classes: int = 21,
        pretrained: bool = False,
        class_names: Optional[Sequence[str]] = None,
        drop_connect_rate: float = 0.2,
        dropout: float = 0.1,
    ):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(
                "variant must be one of %s for backbone 'lite0', got %r"
                % (sorted(LITE_VARIANTS), variant)
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError("num_classes must be a positive int, got %r" % (num_classes,))
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                "class_names has %d names for num_classes=%d" % (len(class_names), num_classes)
            )
        self.variant = variant
        self.num_classes = num_classes
        self.in_channels = 3
        self.class_names = tuple(class_names) if class_names is not None else None
        self.upscale, self.skips = LITE_VARIANTS[variant]
        self.backbone = EfficientNetLite0(drop_connect_rate=drop_connect_rate)
        if pretrained:
            load_lite0_state_dict(self.backbone, lite0_state_dict_from_package())
        del self.backbone._fc  # the ImageNet classifier is not part of the FCN
        self.drop = nn.Dropout2d(dropout)
        self.score_fr = nn.Conv2d(LITE0_FEATURE_CHANNELS["stride32"], num_classes, 1)
        for tap in self.skips:
            up_name, score_name = _SKIP_NAMES[tap]
            setattr(self, up_name, _learned_upsampling(num_classes, 2))
            setattr(self, score_name, SkipFuse(LITE0_FEATURE_CHANNELS[tap], num_classes))
        self.upscore = _learned_upsampling(num_classes, self.upscale)
        for name in ("score_fr", "score_pool4", "score_pool3"):  # FCN: score layers start at zero
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)
                nn.init.zeros_(getattr(self, name).bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                "x must be a (N, 3, H, W) tensor, got %s"
                % (tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError("x must have a positive height and width, got %s" % (tuple(x.shape),))

    def coarse_scores(
        self, x: torch.Tensor, backbone: Optional[nn.Module] = None
    ) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
        """Scores at stride ``upscale`` and the crop of the final upsampling.

        ``backbone``: another backbone computing the same features (``predict`` passes the
        batch-norm-folded copy ``self.backbone.folded()``).
        """
        self._check_input(x)
        features, _ = (backbone or self.backbone).forward_features(x)
        # under torch.autocast the heads follow fcnfast's per-op rules (fcnfast._autocast):
        # the deconvolutions and 1x1 score convolutions run in the autocast dtype
        scores = self.score_fr(self.drop(features["stride32"]))
        for tap in self.skips:
            up_name, score_name = _SKIP_NAMES[tap]
            skip = features[tap]
            crop = (1, 1, skip.shape[2], skip.shape[3])
            scores = getattr(self, score_name)(getattr(self, up_name)(scores, crop=crop), skip)
        return scores, (0, 0, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, crop = self.coarse_scores(x)
        return self.upscore(scores, crop=crop)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) -> the normalised float input of ``forward``."""
        return normalize_uint8(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB (N, 3, H, W) or (3, H, W), any size -> int64 labels (N, H, W) or (H, W)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
            raise ValueError(
                "images must be a uint8 RGB tensor (N, 3, H, W), got %s"
                % (images.dtype if isinstance(images, torch.Tensor) else type(images).__name__)
            )
        single = images.dim() == 3
        batch = images.unsqueeze(0) if single else images
        param = next(self.parameters())
        # in eval mode the backbone's batch norms are folded into its convolutions (a cached copy)
        backbone = None if self.backbone.training else self.backbone.folded()
        scores, crop = self.coarse_scores(self.preprocess(batch.to(param.device)), backbone)
        labels = chunked_argmax(self.upscore, scores, crop)  # one image's scores at a time
        return labels[0] if single else labels

    def loss(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """``F.cross_entropy(forward(x), target, ignore_index=ignore_index, reduction=reduction)``
        (``fcnfast.losses.segmentation_loss``).

        The final deconvolution is learned (k ``2f-1``), so the fused bilinear
        ``ops.upsample_cross_entropy`` does not apply here; the loss takes the logits.

        Args:
            x (Tensor): the normalised (N, 3, H, W) input (``preprocess``).
            target (Tensor): (N, H, W) int64 labels.
            ignore_index (int): the label not counted (default ``IGNORE_INDEX``, 255).
            reduction (str): ``"mean"`` over the counted pixels or ``"sum"``.

        Returns:
            Tensor: the scalar loss.
        """
        return segmentation_loss(self, x, target, reduction=reduction, ignore_index=ignore_index)

    # tiles of 768 px (windows of 768 + 2 * 512 halo): a 2048 px window of this backbone holds
    # ~1.4 GB of activations (96 expanded channels at stride 2), too much for a 2 GB budget
    preferred_tile = 768

    def receptive_field(self) -> Tuple[int, int]:
        """(receptive field size, stride) of the stride-32 features in input pixels (851, 32):
        what ``fcnfast.tiling`` needs for tiles whose labels equal the whole-image ones.

        TF SAME padding keeps each field centred on its cell (see the module docstring), and
        the score layers are 1x1, so the backbone's convolutions in order give it exactly."""
        from ..tiling import conv_receptive_field

        return conv_receptive_field(m for m in self.backbone.modules() if isinstance(m, nn.Conv2d))

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]

    def extra_repr(self) -> str:
        return "variant=%s, num_classes=%d, backbone=lite0" % (self.variant, self.num_classes)

    def config(self) -> Dict[str, object]:
        return {
            "variant": self.variant,
            "num_classes": self.num_classes,
            "backbone": "lite0",
            "class_names": list(self.class_names) if self.class_names else None,
        }
