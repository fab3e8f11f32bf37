"""Checkpoint files: fcnfast's format, and loading models from fcnfast's and wkentaro/pytorch-fcn's.

* ``save_checkpoint(state, path)`` / ``load_checkpoint(path)`` -- the file format of every
  fcnfast checkpoint (``fcnfast train`` and ``fcnfast finetune``): a ``torch.save``d dict with
  ``format == CHECKPOINT_FORMAT``, written atomically, read with errors that name the file.
* ``load_model(path)`` -- the model of a checkpoint written by ``fcnfast train`` or
  ``fcnfast finetune`` (in eval mode), or of a wkentaro/pytorch-fcn ``.pth`` file.
* ``pytorch_fcn_key_map(model)`` / ``load_pytorch_fcn(model, state_dict)`` /
  ``from_pytorch_fcn(state_dict)`` -- wkentaro/pytorch-fcn's ``FCN32s``, ``FCN16s``,
  ``FCN8s`` and ``FCN8sAtOnce`` name their layers ``conv1_1`` ... ``conv5_3``, ``fc6``,
  ``fc7``, ``score_fr``, ``score_pool4``, ``score_pool3``, ``upscore``, ``upscore2``,
  ``upscore16``, ``upscore8``, ``upscore_pool4``. fcnfast's ``FCN`` has the same geometry
  (pad 100, ceil-mode pooling, crops 5/9 and 19/27/31), keeps the VGG16 convolutions in
  ``features`` (torchvision indices) and uses the same names for the rest, so the mapping is
  ``convB_I -> features.<index>`` and the identity elsewhere; the outputs are equal.
  ``FCN8s`` and ``FCN8sAtOnce`` have the same keys (they differ only in the pool4/pool3
  scaling of ``forward``), so an FCN-8s file needs ``variant="fcn8s"`` or ``"fcn8s_atonce"``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from .nn import bilinear_kernel

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "pytorch_fcn_key_map",
    "load_pytorch_fcn",
    "from_pytorch_fcn",
    "is_pytorch_fcn_state_dict",
]

CHECKPOINT_FORMAT = "fcnfast-checkpoint-1"


def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace``d over ``path``. A failure at any
    point leaves an existing checkpoint at ``path`` untouched.

    Args:
        state (dict): what to save (fcnfast's own checkpoints carry
            ``"format": CHECKPOINT_FORMAT``).
        path (str or Path): the file; missing parent directories are created.

    Returns:
        Path: ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    # make the rename itself durable (POSIX); not possible on every platform
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path, map_location="cpu"):
    """``torch.load`` of ``path`` (weights only); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError("checkpoint not found: %s" % path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, wrong format ...
        raise ValueError(
            "cannot read checkpoint %s (corrupt or not a torch checkpoint): %s" % (path, exc)
        ) from exc


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; errors name the file.

    Args:
        path (str or Path): the checkpoint file.
        map_location: where tensors go (``torch.load``'s argument, default ``"cpu"``).

    Returns:
        dict: the saved state (``state["format"] == CHECKPOINT_FORMAT``).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is unreadable or not an fcnfast checkpoint.
    """
    path = Path(path)
    state = _read(path, map_location)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            "%s is not an fcnfast checkpoint (missing format %r)" % (path, CHECKPOINT_FORMAT)
        )
    return state


_VGG_CONVS = [(b, i) for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]
_FINAL = {
    "fcn32s": "upscore",
    "fcn16s": "upscore16",
    "fcn8s": "upscore8",
    "fcn8s_atonce": "upscore8",
}


def pytorch_fcn_key_map(model) -> Dict[str, str]:
    """``{pytorch-fcn key: fcnfast key}`` for an fcnfast ``FCN`` without batch norm."""
    from .models.fcn import FCN

    if not isinstance(model, FCN):
        raise ValueError(
            "model must be an fcnfast FCN (fcn32s/16s/8s/8s_atonce), got %s" % type(model).__name__
        )
    if model.spec.batch_norm:
        raise ValueError(
            "pytorch-fcn checkpoints have no batch norm; backbone %r has it (use "
            "backbone='vgg16', or 'small' for the width-reduced net)" % model.spec.name
        )
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    mapping = {}
    for (block, idx), index in zip(_VGG_CONVS, convs):
        for p in ("weight", "bias"):
            mapping["conv%d_%d.%s" % (block, idx, p)] = "features.%d.%s" % (index, p)
    own = set(model.state_dict())
    for key in own:
        if not key.startswith("features."):
            mapping[key] = key
    return mapping


def is_pytorch_fcn_state_dict(state: Mapping) -> bool:
    return isinstance(state, Mapping) and "conv1_1.weight" in state and "score_fr.weight" in state


def _unwrap(state):
    # pytorch-fcn's trainer saves {"model_state_dict": ..., "optim_state_dict": ..., ...}
    if isinstance(state, Mapping) and "model_state_dict" in state:
        state = state["model_state_dict"]
    if not is_pytorch_fcn_state_dict(state):
        raise ValueError(
            "not a wkentaro/pytorch-fcn state_dict (no conv1_1.weight / score_fr.weight keys)"
        )
    return state


def load_pytorch_fcn(model, state_dict: Mapping) -> None:
    """Load a wkentaro/pytorch-fcn ``FCN32s/16s/8s/8sAtOnce`` state_dict into ``model``.

    Every key must match in name (after the mapping) and shape. A model with
    ``fixed_upsampling=True`` has no weight for its final upsampling: the file's must then be
    the bilinear kernel (pytorch-fcn freezes it), else ``ValueError``.
    """
    state = _unwrap(state_dict)
    mapping = pytorch_fcn_key_map(model)
    own = model.state_dict()
    final = _FINAL[model.variant]
    converted, unexpected = {}, []
    for key, value in state.items():
        if key not in mapping:
            if key == final + ".weight" and model.fixed_upsampling:
                expected = bilinear_kernel(model.num_classes, 2 * model.upscale, value.dtype)
                if tuple(value.shape) != tuple(expected.shape) or not torch.allclose(
                    value, expected, atol=1e-6
                ):
                    raise ValueError(
                        "%s is not the bilinear kernel, but the model has "
                        "fixed_upsampling=True: build it with "
                        "fixed_upsampling=False to load learned weights" % key
                    )
                continue
            unexpected.append(key)
            continue
        converted[mapping[key]] = value
    missing = sorted(set(own) - set(converted))
    mismatched = sorted(
        "%s: %s in the file, %s in the model" % (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    )
    if unexpected or missing or mismatched:
        raise ValueError(
            "pytorch-fcn state_dict does not fit %s (%s backbone): unexpected %s, "
            "missing %s, shape mismatch %s"
            % (model.variant, model.spec.name, sorted(unexpected), missing, mismatched)
        )
    model.load_state_dict(converted)


def from_pytorch_fcn(
    state_dict: Mapping, variant: Optional[str] = None, fixed_upsampling: bool = False
):
    """Build the fcnfast ``FCN`` of a wkentaro/pytorch-fcn state_dict and load it.

    The variant comes from the keys (``upscore`` -> fcn32s, ``upscore16`` -> fcn16s); an
    FCN-8s file needs ``variant="fcn8s"`` or ``"fcn8s_atonce"``. The backbone is ``"vgg16"``
    when the widths are VGG16's, ``"small"`` for its 1/8 widths, else a custom spec.
    """
    from .models.backbones import BACKBONES, BackboneSpec
    from .models.fcn import FCN

    state = _unwrap(state_dict)
    if "upscore8.weight" in state:
        if variant not in ("fcn8s", "fcn8s_atonce"):
            raise ValueError(
                "an FCN-8s state_dict needs variant='fcn8s' or 'fcn8s_atonce' (the "
                "two have the same keys), got variant=%r" % (variant,)
            )
    else:
        found = "fcn16s" if "upscore16.weight" in state else "fcn32s"
        if variant is not None and variant != found:
            raise ValueError("variant=%r but the state_dict is an %s" % (variant, found))
        variant = found
    widths = tuple(int(state["conv%d_1.weight" % b].shape[0]) for b in range(1, 6))
    fc = int(state["fc6.weight"].shape[0])
    backbone = next(
        (
            name
            for name, spec in BACKBONES.items()
            if not spec.batch_norm and spec.widths == widths and spec.fc_width == fc
        ),
        None,
    ) or BackboneSpec("custom", widths, fc)
    model = FCN(
        variant,
        num_classes=int(state["score_fr.weight"].shape[0]),
        in_channels=int(state["conv1_1.weight"].shape[1]),
        backbone=backbone,
        fixed_upsampling=fixed_upsampling,
    )
    load_pytorch_fcn(model, state)
    return model.eval()


def load_model(checkpoint, device="cpu", variant: Optional[str] = None) -> nn.Module:
    """The model stored in ``checkpoint``, in eval mode on ``device``.

    Reads checkpoints of ``fcnfast train`` (FCN-32s/16s/8s on VGG backbones), of
    ``fcnfast finetune`` (Lite0 FCNs) and wkentaro/pytorch-fcn ``.pth`` files (their
    ``FCN8s``/``FCN8sAtOnce`` need ``variant``). Errors name the file.
    """
    from .finetune import load_finetuned
    from .train import load_model as load_trained

    path = Path(checkpoint)
    state = _read(path)
    if isinstance(state, Mapping) and state.get("format") == CHECKPOINT_FORMAT:
        if state.get("kind") == "finetune":
            return load_finetuned(path, device)
        return load_trained(path, device)[0]
    try:
        return from_pytorch_fcn(state, variant).to(device)
    except ValueError as exc:
        raise ValueError("%s: %s" % (path, exc)) from None
