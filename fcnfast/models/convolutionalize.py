"""Turn a patch classifier (conv features + Flatten + Linear head) into a fully convolutional net.

The FCN paper's first step: a fully connected layer that sees the whole ``C x h x w`` feature map
*is* a convolution with an ``h x w`` kernel, and every later fully connected layer is a 1x1
convolution. The converted net takes any input size and returns a score map whose pixel ``(i, j)``
is the classifier's output for the ``input_size`` window whose top-left corner is
``(i * stride, j * stride)`` -- all windows at once, with the overlapping work shared.
"""

from __future__ import annotations

import copy
import warnings
from typing import Sequence

import torch
from torch import nn

__all__ = ["convolutionalize"]

# modules that act element-wise (or per channel) and therefore work unchanged on (N, C, H, W)
_POINTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.ReLU6,
    nn.Identity,
    nn.Dropout,
)


def _flat_modules(module: nn.Module):
    for child in module.children():
        if isinstance(child, nn.Sequential):
            yield from _flat_modules(child)
        else:
            yield child


def _linear_as_conv(linear: nn.Linear, channels: int, kernel: Sequence[int]) -> nn.Conv2d:
    kh, kw = kernel
    if linear.in_features != channels * kh * kw:
        raise ValueError(
            "Linear(in_features=%d) does not match the %dx%dx%d feature map before it"
            % (linear.in_features, channels, kh, kw)
        )
    conv = nn.Conv2d(channels, linear.out_features, (kh, kw), bias=linear.bias is not None)
    conv = conv.to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        # Flatten orders features as (C, h, w): exactly the conv weight layout
        conv.weight.copy_(linear.weight.reshape(linear.out_features, channels, kh, kw))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


def _batchnorm1d_as_2d(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    ref = next(t for t in bn.state_dict().values() if t.is_floating_point())
    bn2 = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    bn2 = bn2.to(device=ref.device, dtype=ref.dtype)
    bn2.load_state_dict(bn.state_dict())
    return bn2


def _softmax_over_channels(module):
    if module.dim not in (1, -1):
        raise ValueError(
            "%s(dim=%s) after Flatten cannot be convolutionalized (needs dim=1 or -1)"
            % (type(module).__name__, module.dim)
        )
    return type(module)(dim=1)


def _feature_shape(features: nn.Sequential, input_shape) -> torch.Size:
    """Dry run of the layers before Flatten on one zero input, in eval mode (no BN stat updates)."""
    modes = [m.training for m in features.modules()]
    features.eval()
    try:
        ref = next(iter(features.parameters()), None)
        kw = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        with torch.no_grad():
            out = features(torch.zeros((1,) + tuple(input_shape), **kw))
    finally:
        for m, mode in zip(features.modules(), modes):
            m.training = mode
    if out.dim() != 4:
        raise ValueError(
            "the layers before Flatten must return (N, C, H, W), got shape %s" % (tuple(out.shape),)
        )
    return out.shape[1:]


def _input_channels(modules) -> int:
    for m in modules:
        if hasattr(m, "in_channels"):
            return int(m.in_channels)
    raise ValueError(
        "cannot infer the input channels: pass input_size as (channels, height, width)"
    )


def _is_padded(m: nn.Module) -> bool:
    if not isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return False
    if isinstance(m.padding, str):
        return m.padding != "valid"
    padding = (m.padding,) if isinstance(m.padding, int) else m.padding
    return any(p != 0 for p in padding)


def _stride(modules) -> int:
    stride_y = stride_x = 1
    for m in modules:
        s = getattr(m, "stride", 1)
        s = (s, s) if isinstance(s, int) else tuple(s)
        stride_y, stride_x = stride_y * s[0], stride_x * s[1]
    return (stride_y, stride_x)


def convolutionalize(classifier: nn.Module, input_size) -> nn.Sequential:
    """Equivalent fully convolutional version of ``classifier`` (an ``nn.Sequential``).

    ``classifier`` = spatial layers (Conv2d, pooling, BatchNorm2d, activations ...), one
    ``nn.Flatten()``, then a head of ``nn.Linear`` layers with element-wise layers (ReLU, Dropout,
    BatchNorm1d, Softmax(dim=1)) between them; nested ``nn.Sequential`` blocks are flattened.
    ``input_size`` is the window it classifies: ``(height, width)`` or ``(channels, height, width)``.

    The first Linear becomes a Conv2d whose kernel is the feature map's ``(h, w)`` at
    ``input_size`` (found by a dry run), with the weight reshaped to ``(out, C, h, w)``; later
    Linears become 1x1 Conv2d, BatchNorm1d becomes BatchNorm2d with the same statistics. Weights
    are copied; ``classifier`` is not modified. The result (attributes ``window`` and ``stride``)
    maps an ``(N, C, H, W)`` input to ``(N, K, (H - h_in) // sy + 1, (W - w_in) // sx + 1)``
    where output ``(i, j)`` equals ``classifier`` on the window at ``(i * sy, j * sx)`` -- exactly
    so (up to float summation order) when the spatial layers use no padding and pooling divides
    evenly; padded convolutions see zeros at a window's border but real pixels in the dense run,
    so a warning is issued for them.
    """
    if not isinstance(classifier, nn.Sequential):
        raise ValueError(
            "convolutionalize expects an nn.Sequential classifier, got %s"
            % type(classifier).__name__
        )
    modules = list(_flat_modules(classifier))
    flat_at = [i for i, m in enumerate(modules) if isinstance(m, nn.Flatten)]
    if len(flat_at) != 1:
        raise ValueError(
            "the classifier must contain exactly one nn.Flatten, found %d" % len(flat_at)
        )
    flatten = modules[flat_at[0]]
    if flatten.start_dim != 1 or flatten.end_dim != -1:
        raise ValueError(
            "nn.Flatten must use start_dim=1, end_dim=-1, got %d, %d"
            % (flatten.start_dim, flatten.end_dim)
        )
    body = [copy.deepcopy(m) for m in modules[: flat_at[0]]]
    head = modules[flat_at[0] + 1 :]
    if not any(isinstance(m, nn.Linear) for m in head):
        raise ValueError("the classifier has no nn.Linear after its nn.Flatten")

    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (_input_channels(body + head),) + size
    if len(size) != 3 or min(size) <= 0:
        raise ValueError(
            "input_size must be (height, width) or (channels, height, width) of positive "
            "ints, got %r" % (input_size,)
        )
    for m in body:
        if _is_padded(m):
            warnings.warn(
                "convolutionalize: %r is padded; the dense output matches the classifier "
                "on windows only away from zero-padding effects" % m,
                stacklevel=2,
            )
    features = nn.Sequential(*body)
    channels, fh, fw = _feature_shape(features, size)

    converted = []
    first = True
    for m in head:
        if isinstance(m, nn.Linear):
            converted.append(_linear_as_conv(m, channels, (fh, fw) if first else (1, 1)))
            channels, first = m.out_features, False
        elif isinstance(m, nn.BatchNorm1d):
            converted.append(_batchnorm1d_as_2d(m))
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            converted.append(_softmax_over_channels(m))
        elif isinstance(m, _POINTWISE):
            converted.append(copy.deepcopy(m))
        else:
            raise ValueError(
                "cannot convolutionalize %r after nn.Flatten (supported: Linear, "
                "BatchNorm1d, Softmax/LogSoftmax(dim=1) and element-wise layers)" % m
            )
    net = nn.Sequential(*body, *converted)
    net.window = size[1:]
    net.stride = _stride(body)
    net.train(classifier.training)
    return net
