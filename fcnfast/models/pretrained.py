"""Trained models that ship with fcnfast (offline: the weights are package data, nothing is downloaded).

``pretrained("fcn8s_lite0_camvid")`` -> a ``LiteFCN`` in eval mode with
``class_names``, ``palette`` and ``predict(uint8 images)``. The weights are
stored in fp16 (``fcnfast/weights/<name>.pt``) and loaded as fp32; the model
card next to them (``<name>.md``) says what they were trained on and how.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

import torch

from .lite_fcn import LiteFCN

__all__ = ["PRETRAINED", "pretrained", "export_pretrained", "weights_path"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"

# name -> description (the file is WEIGHTS_DIR / name + ".pt")
PRETRAINED: Dict[str, str] = {
    "fcn8s_lite0_camvid": "FCN-8s on EfficientNet-Lite0, trained on CamVid (11 classes, 480x360); "
    "research use (CamVid's licence: CC BY-NC 4.0)",
}


def weights_path(name: str) -> Path:
    if name not in PRETRAINED:
        raise ValueError("unknown pretrained model %r; available: %s" % (name, sorted(PRETRAINED)))
    return WEIGHTS_DIR / ("%s.pt" % name)


def pretrained(name: str = "fcn8s_lite0_camvid", device="cpu") -> LiteFCN:
    """Load a shipped model (fp32, eval mode, on ``device``)."""
    path = weights_path(name)
    if not path.is_file():
        raise FileNotFoundError(
            "the weights of %r are missing from this installation: %s" % (name, path)
        )
    blob = torch.load(path, map_location="cpu", weights_only=True)
    cfg = blob["config"]
    model = LiteFCN(
        cfg["variant"], cfg["num_classes"], pretrained=False, class_names=cfg.get("class_names")
    )
    state = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
    model.load_state_dict(state)
    model.palette = tuple(tuple(c) for c in blob["palette"]) if blob.get("palette") else None
    model.trained_on = blob.get("trained_on")
    return model.eval().to(device)


def export_pretrained(
    checkpoint: os.PathLike, path: os.PathLike, palette=None, trained_on: Optional[str] = None
) -> Path:
    """Write a ``fcnfast finetune`` checkpoint's model as a small fp16 weights file ``path``."""
    # the developer's own (trusted) run file: a full unpickle also reads checkpoints written
    # before finetune checkpoints carried the fcnfast format tag
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    half = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    blob = {
        "state_dict": half,
        "config": cfg,
        "palette": [list(c) for c in palette] if palette is not None else None,
        "trained_on": trained_on,
    }
    path = Path(path)
    torch.save(blob, path)
    return path
