"""Build an FCN from a torchvision-format VGG16 ``state_dict`` (local file or dict).

Key mapping (torchvision ``vgg16()`` -> FCN):

* ``features.N.weight`` / ``features.N.bias`` -> ``features.N.*`` unchanged (the
  FCN backbone keeps torchvision's indices; only conv1_1's padding and the
  pooling rounding differ, which carry no weights);
* ``classifier.0`` (fc6, Linear 25088 -> 4096) -> ``fc6`` (Conv2d 512 -> 4096,
  7x7): the weight is reshaped to (4096, 512, 7, 7), which is exactly how
  ``torch.flatten`` orders a (512, 7, 7) pool5 (channel-major, then row, column);
* ``classifier.3`` (fc7, Linear 4096 -> 4096) -> ``fc7`` (Conv2d 1x1);
* ``classifier.6`` (the 1000-class layer) is not used: the score layers start at zero.

Expected input normalisation is the torchvision one (see ``fcnfast.data.image_to_tensor``).
"""

from __future__ import annotations

import os
from typing import Dict, Mapping

import torch

from .backbones import VGG16_LAYOUT
from .fcn import FCN, build_model

__all__ = ["load_vgg16", "vgg16_key_map"]


def _conv_indices():
    index = 0
    for convs in VGG16_LAYOUT:
        for _ in range(convs):
            yield index
            index += 2  # conv, relu
        index += 1  # max-pool


def vgg16_key_map() -> Dict[str, str]:
    """torchvision VGG16 key -> FCN parameter name."""
    mapping = {}
    for i in _conv_indices():
        for p in ("weight", "bias"):
            mapping["features.%d.%s" % (i, p)] = "features.%d.%s" % (i, p)
    for src, dst in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        for p in ("weight", "bias"):
            mapping["%s.%s" % (src, p)] = "%s.%s" % (dst, p)
    return mapping


def _read_state_dict(path_or_state_dict, source: str) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    else:
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise FileNotFoundError("VGG16 weights file not found: %s" % path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt/foreign files
            raise ValueError("cannot read VGG16 weights from %s: %s" % (path, exc)) from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError("%s does not hold a state dict (got %s)" % (source, type(state).__name__))
    return state


def load_vgg16(
    path_or_state_dict, num_classes: int = 21, model: str = "fcn8s", **model_kwargs
) -> FCN:
    """An FCN (``build_model(model, num_classes=..., **model_kwargs)``) whose conv1_1 .. fc7
    come from a torchvision-format VGG16 state dict (a path to a ``torch.save`` file, or the dict).

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` naming the file for an
    unreadable one, for missing keys (listed) and for shape mismatches (key and both shapes).
    """
    source = (
        "state dict" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)
    )
    state = _read_state_dict(path_or_state_dict, source)
    fcn = build_model(model, num_classes=num_classes, **model_kwargs)
    if fcn.spec.batch_norm:
        raise ValueError(
            "backbone %r has batch norm layers; a VGG16 state dict fits only "
            "backbones without batch norm (e.g. 'vgg16')" % fcn.spec.name
        )
    mapping = vgg16_key_map()
    missing = [key for key in mapping if key not in state]
    if missing:
        raise ValueError(
            "%s is not a torchvision VGG16 state dict: missing keys %s"
            % (source, ", ".join(missing))
        )
    targets = dict(fcn.named_parameters())
    with torch.no_grad():
        for key, name in mapping.items():
            value = state[key]
            target = targets[name]
            if not isinstance(value, torch.Tensor):
                raise ValueError("%s: %s is not a tensor" % (source, key))
            if value.numel() != target.numel() or (
                value.dim() == target.dim() and value.shape != target.shape
            ):
                raise ValueError(
                    "%s: %s has shape %s, the FCN's %s needs %s"
                    % (source, key, tuple(value.shape), name, tuple(target.shape))
                )
            target.copy_(value.reshape(target.shape))
    return fcn
