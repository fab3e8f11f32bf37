"""FCN-32s, FCN-16s, FCN-8s and at-once FCN-8s (Long, Shelhamer & Darrell, CVPR 2015).

The geometry is the Caffe reference nets' (``voc-fcn32s``, ``voc-fcn16s``,
``voc-fcn8s``, ``voc-fcn8s-atonce``): a VGG16 backbone with ``conv1_1``
padded by 100 and ceil-mode pooling, ``fc6``/``fc7`` as 7x7 / 1x1
convolutions, a 1x1 ``score_fr``, and

* FCN-32s: ``upscore`` (k64 s32), crop 19;
* FCN-16s: ``upscore2`` (k4 s2), ``score_pool4`` cropped at 5 and added,
  ``upscore16`` (k32 s16), crop 27;
* FCN-8s: as FCN-16s up to the pool4 fusion, then ``upscore_pool4`` (k4 s2),
  ``score_pool3`` cropped at 9 and added, ``upscore8`` (k16 s8), crop 31;
* at-once FCN-8s: FCN-8s with pool4 scaled by 0.01 and pool3 by 0.0001
  before scoring (so all streams can be trained together from the start).

The crop offsets are not typed in: ``FCN.__init__`` derives them from the
layers' kernels, strides and paddings (the coordinate mapping of Caffe's
``coord_map.py``), so they also hold for the width-reduced backbones; the
tests check they equal the Caffe constants above. The output has the input's
height and width for every input size.

Upsampling (``fixed_upsampling``). The CVPR paper (Sec. 4.3, "Upsampling"):
"the final layer deconvolutional filters are fixed to bilinear interpolation,
while intermediate upsampling layers are initialized to bilinear upsampling,
and then learned". The later reference Caffe nets freeze all of them.

* ``fixed_upsampling=False`` (default): every upsampling layer is a learned
  (C, C, 2s, 2s) deconvolution without bias initialised to bilinear
  interpolation (``fcnfast.nn.BilinearUpsample2d(learnable=True)``).
* ``fixed_upsampling=True``: the final ``upscore``/``upscore16``/``upscore8``
  is the frozen analytic bilinear op (no parameters), as in the paper; the
  intermediate 2x layers stay learned unless ``fixed_skip_upsampling=True``
  (the reference Caffe nets: everything frozen). With the final layer frozen
  (or learned, still bilinear and ``requires_grad=False``), ``predict`` uses
  ``ops.upsample_argmax`` and ``loss`` uses ``ops.upsample_cross_entropy`` on
  the coarse scores, so the full-resolution C x H x W scores are never held; a
  trained final layer's ``predict`` holds one image's scores at a time.

Score layers (``score_fr``, ``score_pool4``, ``score_pool3``) start at zero,
as in the FCN reference code; backbone convolutions use He initialisation
(replace them with ``load_vgg16`` for ImageNet weights); batch-norm layers of
the ``"tiny"`` backbone start as the identity. ``dropout=None`` takes the
backbone's default (0.5 for VGG16 as in Caffe, element-wise).
"""

from __future__ import annotations

from fractions import Fraction
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..losses import IGNORE_INDEX, segmentation_loss
from ..nn import BilinearUpsample2d, NoScript, SkipFuse, bilinear_kernel
from .backbones import backbone_spec, make_fc, make_features, pool_indices

__all__ = ["FCN", "VARIANTS", "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce", "build_model"]

# variant -> (final upsampling stride, skip streams fused, feature scale per skip)
VARIANTS = {
    "fcn32s": (32, (), {}),
    "fcn16s": (16, (4,), {4: 1.0}),
    "fcn8s": (8, (4, 3), {4: 1.0, 3: 1.0}),
    "fcn8s_atonce": (8, (4, 3), {4: 0.01, 3: 0.0001}),
}

_FINAL_NAME = {32: "upscore", 16: "upscore16", 8: "upscore8"}


def label_map(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(1)`` for (N, C, H, W) scores, reduced over channels stored innermost.

    PyTorch's ``argmax(1)`` on NCHW walks the channel axis at stride H*W; the same reduction
    on a channels-innermost copy is several times faster on CPU (same ties: lowest index).
    """
    return scores.permute(0, 2, 3, 1).contiguous().argmax(-1)


def chunked_argmax(upsample, scores: torch.Tensor, crop) -> torch.Tensor:
    """``upsample(scores, crop=crop).argmax(1)`` holding one image's C x H x W scores at a time.

    ``upsample`` is a final deconvolution layer taking ``crop=(top, left, h, w)`` (fcnfast's
    ``ConvTranspose2d`` / learned ``BilinearUpsample2d``): a learned final layer has no fused
    label-map op, so the scores of each image are computed (fused crop) and at once reduced
    to labels by ``label_map``.
    """
    top, left, h, w = (int(v) for v in crop)
    n = scores.shape[0]
    if n <= 1 or torch.compiler.is_compiling():
        return label_map(upsample(scores, crop=(top, left, h, w)))
    labels = torch.empty((n, h, w), dtype=torch.int64, device=scores.device)
    for i in range(n):
        labels[i] = label_map(upsample(scores[i : i + 1], crop=(top, left, h, w)))[0]
    return labels


def is_bilinear_upsampling(layer, scale: int) -> bool:
    """True when ``layer`` (a final upsampling) computes ``ops.bilinear_upsample2d(x, scale)``:
    the frozen analytic layer, or a learned one whose (C, C, 2s, 2s) weight is still exactly the
    diagonal bilinear kernel. Not decided while ``torch.compile`` traces (False there)."""
    weight = getattr(layer, "weight", None)
    if weight is None:
        return True
    if torch.compiler.is_compiling() or tuple(weight.shape[2:]) != (2 * scale, 2 * scale):
        return False
    if weight.shape[0] != weight.shape[1] or getattr(layer, "bias", None) is not None:
        return False
    expected = bilinear_kernel(weight.shape[0], 2 * scale, weight.dtype).to(weight.device)
    return bool(torch.equal(weight.detach(), expected))


# ---------------------------------------------------------------------------
# coordinate maps: index y of a blob sits at input coordinate a*y + b
# ---------------------------------------------------------------------------

CoordMap = Tuple[Fraction, Fraction]


def _through_conv(cmap: CoordMap, kernel: int, stride: int, padding: int) -> CoordMap:
    # conv / pool output y covers input cells stride*y - padding .. + kernel-1; its centre:
    a, b = cmap
    return a * stride, b + a * (Fraction(kernel - 1, 2) - padding)


def _through_deconv(cmap: CoordMap, kernel: int, stride: int) -> CoordMap:
    # deconvolution (no padding): output y is centred on input (y - (kernel-1)/2) / stride
    a, b = cmap
    return a / stride, b - a * Fraction(kernel - 1, 2) / stride


def _layer_geometry(module) -> Optional[Tuple[int, int, int]]:
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        k, s, p = (module.kernel_size, module.stride, module.padding)
        k, s, p = (v if isinstance(v, int) else v[0] for v in (k, s, p))
        return k, s, p
    return None


def _crop_offset(cropped: CoordMap, reference: CoordMap, what: str) -> int:
    """Offset o such that ``cropped[o + y]`` and ``reference[y]`` are the same place."""
    if cropped[0] != reference[0]:
        raise AssertionError(
            "%s: blobs have different strides %s and %s" % (what, cropped[0], reference[0])
        )
    offset = (reference[1] - cropped[1]) / cropped[0]
    if offset.denominator != 1 or offset < 0:
        raise AssertionError("%s: crop offset %s is not a non-negative integer" % (what, offset))
    return int(offset)


class FCN(nn.Module, NoScript):
    """A fully convolutional network of one of the ``VARIANTS``; see the module docstring.

    ``forward(x)`` -> (N, num_classes, H, W) logits for x of shape
    (N, in_channels, H, W), any H, W >= 1. ``coarse_scores(x)`` -> (scores,
    crop) with ``forward(x) == <final upsampling>(scores, crop=crop)``;
    ``upscale`` is the final stride; ``predict(x)`` the int64 label map.
    """

    def __init__(
        self,
        variant: str = "fcn8s",
        num_classes: int = 21,
        in_channels: int = 3,
        backbone="vgg16",
        fixed_upsampling: bool = False,
        fixed_skip_upsampling: bool = False,
        dropout: Optional[float] = None,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError("variant must be one of %s, got %r" % (sorted(VARIANTS), variant))
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError("num_classes must be a positive int, got %r" % (num_classes,))
        self.spec = backbone_spec(backbone)
        dropout = self.spec.dropout if dropout is None else dropout
        if not 0.0 <= dropout < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (dropout,))
        self.variant = variant
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.fixed_upsampling = bool(fixed_upsampling)
        self.fixed_skip_upsampling = bool(fixed_skip_upsampling)
        self.upscale, self.skips, scales = VARIANTS[variant]

        self.features = make_features(self.spec, in_channels)
        self.pool_index = pool_indices(self.features)  # pool1 .. pool5
        self.fc6, self.drop6, self.fc7, self.drop7 = make_fc(self.spec, dropout)
        self.score_fr = nn.Conv2d(self.spec.fc_width, num_classes, 1)
        learn_skip = not self.fixed_skip_upsampling
        if 4 in self.skips:
            self.upscore2 = BilinearUpsample2d(num_classes, 2, learnable=learn_skip)
            self.score_pool4 = SkipFuse(self.spec.widths[3], num_classes, scale=scales[4])
        if 3 in self.skips:
            self.upscore_pool4 = BilinearUpsample2d(num_classes, 2, learnable=learn_skip)
            self.score_pool3 = SkipFuse(self.spec.widths[2], num_classes, scale=scales[3])
        setattr(
            self,
            _FINAL_NAME[self.upscale],
            BilinearUpsample2d(num_classes, self.upscale, learnable=not self.fixed_upsampling),
        )
        self.offsets = self._derive_offsets()
        for name in ("score_pool4", "score_pool3"):
            if hasattr(self, name):
                getattr(self, name).offset = (self.offsets[name],) * 2
        self.reset_parameters()

    # -- construction ------------------------------------------------------

    @property
    def final_upsample(self) -> BilinearUpsample2d:
        return getattr(self, _FINAL_NAME[self.upscale])

    def _derive_offsets(self) -> Dict[str, int]:
        """Crop offsets from the layers' geometry (Caffe's ``coord_map``)."""
        cmap: CoordMap = (Fraction(1), Fraction(0))
        maps = {}
        for index, module in enumerate(self.features):
            geometry = _layer_geometry(module)
            if geometry is not None:
                cmap = _through_conv(cmap, *geometry)
            if index in self.pool_index:
                maps["pool%d" % (self.pool_index.index(index) + 1)] = cmap
        for fc in (self.fc6, self.fc7, self.score_fr):
            cmap = _through_conv(cmap, *_layer_geometry(fc))
        offsets = {}
        if 4 in self.skips:
            cmap = _through_deconv(cmap, 4, 2)
            offsets["score_pool4"] = _crop_offset(maps["pool4"], cmap, "score_pool4")
        if 3 in self.skips:
            cmap = _through_deconv(cmap, 4, 2)
            offsets["score_pool3"] = _crop_offset(maps["pool3"], cmap, "score_pool3")
        cmap = _through_deconv(cmap, 2 * self.upscale, self.upscale)
        offsets[_FINAL_NAME[self.upscale]] = _crop_offset(
            cmap, (Fraction(1), Fraction(0)), _FINAL_NAME[self.upscale]
        )
        return offsets

    @property
    def crop_offset(self) -> int:
        """Offset of the final crop (19, 27, 31 for FCN-32s/16s/8s)."""
        return self.offsets[_FINAL_NAME[self.upscale]]

    def reset_parameters(self) -> None:
        for module in list(self.features) + [self.fc6, self.fc7]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        for name in ("score_fr", "score_pool4", "score_pool3"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name).weight)
                nn.init.zeros_(getattr(self, name).bias)

    # -- computation -------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                "x must be a (N, %d, H, W) tensor, got %s"
                % (
                    self.in_channels,
                    tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__,
                )
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError("x must have a positive height and width, got %s" % (tuple(x.shape),))

    def coarse_scores(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
        """Scores before the final upsampling and the crop that upsampling takes.

        ``forward(x) == self.final_upsample(scores, crop=crop)``; with
        ``fixed_upsampling`` that is ``ops.bilinear_upsample2d(scores, self.upscale, crop)``.
        """
        self._check_input(x)
        end3, end4 = self.pool_index[2] + 1, self.pool_index[3] + 1
        pool3 = self.features[:end3](x)
        pool4 = self.features[end3:end4](pool3)
        pool5 = self.features[end4:](pool4)
        h = self.drop6(F.relu(self.fc6(pool5), inplace=True))
        h = self.drop7(F.relu(self.fc7(h), inplace=True))
        scores = self.score_fr(h)
        if 4 in self.skips:
            scores = self.score_pool4(self.upscore2(scores), pool4)
        if 3 in self.skips:
            scores = self.score_pool3(self.upscore_pool4(scores), pool3)
        offset = self.crop_offset
        return scores, (offset, offset, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, crop = self.coarse_scores(x)
        return self.final_upsample(scores, crop=crop)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W) int64 labels, ``forward(x).argmax(1)`` (call ``eval()`` first).

        The C x H x W scores are never held: when the final upsampling is bilinear (frozen,
        or learned but still the bilinear kernel) the label map comes from
        ``ops.upsample_argmax`` on the coarse scores; otherwise from ``chunked_argmax`` (the
        learned deconvolution one image at a time, each reduced to labels at once).
        """
        scores, crop = self.coarse_scores(x)
        if is_bilinear_upsampling(self.final_upsample, self.upscale):
            return ops.upsample_argmax(scores, self.upscale, crop)
        return chunked_argmax(self.final_upsample, scores, crop)

    def frozen_bilinear_upsampling(self) -> bool:
        """True when the final upsampling is bilinear and takes no gradient here
        (``fixed_upsampling``, or a learned layer with the bilinear weight and
        ``requires_grad=False`` or grad disabled): the loss can then run the fused
        ``ops.upsample_cross_entropy`` on the coarse scores (``fcnfast.losses``).

        Returns:
            bool: whether ``fcnfast.losses.segmentation_loss`` takes the fused path.
        """
        final = self.final_upsample
        weight = getattr(final, "weight", None)
        return (
            weight is None or not (weight.requires_grad and torch.is_grad_enabled())
        ) and is_bilinear_upsampling(final, self.upscale)

    def loss(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Per-pixel softmax cross-entropy of ``forward(x)`` against ``target``
        (``fcnfast.losses.segmentation_loss``).

        When the final upsampling is bilinear and takes no gradient
        (``frozen_bilinear_upsampling()``) it runs the fused ``ops.upsample_cross_entropy``
        on the coarse scores (no full-resolution logits).

        Args:
            x (Tensor): the (N, in_channels, H, W) input.
            target (Tensor): (N, H, W) int64 labels.
            ignore_index (int): the label not counted (default ``IGNORE_INDEX``, 255).
            reduction (str): ``"mean"`` over the counted pixels or ``"sum"`` (Caffe's
                unnormalised loss).

        Returns:
            Tensor: the scalar loss.
        """
        return segmentation_loss(self, x, target, reduction=reduction, ignore_index=ignore_index)

    def extra_repr(self) -> str:
        return (
            "variant=%s, num_classes=%d, in_channels=%d, backbone=%s, fixed_upsampling=%s, "
            "fixed_skip_upsampling=%s"
            % (
                self.variant,
                self.num_classes,
                self.in_channels,
                self.spec.name,
                self.fixed_upsampling,
                self.fixed_skip_upsampling,
            )
        )


def fcn32s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone="vgg16",
    fixed_upsampling: bool = False,
    pretrained: bool = False,
    **kwargs,
):
    """FCN-32s: score_fr upsampled 32x (k64), crop 19."""
    return _build(
        "fcn32s", num_classes, in_channels, backbone, fixed_upsampling, pretrained, kwargs
    )


def fcn16s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone="vgg16",
    fixed_upsampling: bool = False,
    pretrained: bool = False,
    **kwargs,
):
    """FCN-16s: 2x score_fr + score_pool4 (crop 5), upsampled 16x (k32), crop 27."""
    return _build(
        "fcn16s", num_classes, in_channels, backbone, fixed_upsampling, pretrained, kwargs
    )


def fcn8s(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone="vgg16",
    fixed_upsampling: bool = False,
    pretrained: bool = False,
    **kwargs,
):
    """FCN-8s: FCN-16s' fusion, 2x, + score_pool3 (crop 9), upsampled 8x (k16), crop 31."""
    return _build("fcn8s", num_classes, in_channels, backbone, fixed_upsampling, pretrained, kwargs)


def fcn8s_atonce(
    num_classes: int = 21,
    in_channels: int = 3,
    backbone="vgg16",
    fixed_upsampling: bool = False,
    **kwargs,
) -> FCN:
    """At-once FCN-8s: FCN-8s with pool4 scaled by 0.01 and pool3 by 0.0001 before scoring."""
    return FCN("fcn8s_atonce", num_classes, in_channels, backbone, fixed_upsampling, **kwargs)


_BUILDER_DOC = """

    ``backbone="lite0"`` builds the EfficientNet-Lite0 variant (``LiteFCN``;
    ``pretrained=True`` loads its ImageNet weights); ``pretrained`` is only for lite0.

    Args:
        num_classes (int): output classes, background included (default 21, VOC).
        in_channels (int): input channels (3; lite0 takes RGB only).
        backbone (str or BackboneSpec): ``"vgg16"`` (the paper's), ``"small"``, ``"tiny"``
            (width-reduced), or ``"lite0"``.
        fixed_upsampling (bool): freeze the final upsampling to bilinear (not for lite0).
        pretrained (bool): lite0's ImageNet weights (lite0 only).
        **kwargs: passed to ``FCN`` / ``LiteFCN`` (e.g. ``dropout``).

    Returns:
        FCN or LiteFCN: the model (train mode).
    """
for _builder in (fcn32s, fcn16s, fcn8s):
    if _builder.__doc__:  # None under python -OO
        _builder.__doc__ += _BUILDER_DOC


def _build(variant, num_classes, in_channels, backbone, fixed_upsampling, pretrained, kwargs):
    """A VGG-style ``FCN``, or a ``LiteFCN`` for ``backbone="lite0"``."""
    if backbone != "lite0":
        if pretrained:
            raise ValueError(
                "pretrained=True needs backbone='lite0' (for VGG16 ImageNet weights "
                "use fcnfast.models.load_vgg16), got backbone=%r" % (backbone,)
            )
        return FCN(variant, num_classes, in_channels, backbone, fixed_upsampling, **kwargs)
    from .lite_fcn import LiteFCN

    if in_channels != 3:
        raise ValueError(
            "backbone='lite0' takes RGB input (in_channels=3), got %r" % (in_channels,)
        )
    if fixed_upsampling:
        raise ValueError("backbone='lite0' has learned upsampling only (fixed_upsampling=False)")
    return LiteFCN(variant, num_classes, pretrained=pretrained, **kwargs)


_BUILDERS = {"fcn32s": fcn32s, "fcn16s": fcn16s, "fcn8s": fcn8s, "fcn8s_atonce": fcn8s_atonce}


def build_model(name: str, **kwargs) -> FCN:
    """``build_model("fcn8s", num_classes=21, in_channels=3, backbone="vgg16", fixed_upsampling=False)``.

    Names: fcn32s, fcn16s, fcn8s, fcn8s_atonce (``-`` is accepted for ``_``).
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    builders = {n.replace("_", ""): b for n, b in _BUILDERS.items()}
    if key not in builders:
        raise ValueError("model must be one of %s, got %r" % (sorted(_BUILDERS), name))
    return builders[key](**kwargs)
