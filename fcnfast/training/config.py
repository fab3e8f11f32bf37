"""``TrainConfig``, the optimiser presets, and the model / optimiser a config builds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = [
    "OPTIMIZER_PRESETS",
    "TrainConfig",
    "build_optimizer",
    "build_model_from_config",
    "resume_conflicts",
]

# Defaults each optimiser name fills in for the TrainConfig fields left at None.
OPTIMIZER_PRESETS = {
    "sgd": dict(lr=1e-2, momentum=0.9, weight_decay=5e-4, batch_size=4, loss="mean"),
    "adam": dict(lr=1e-3, momentum=0.0, weight_decay=0.0, batch_size=4, loss="mean"),
    # FCN paper / Caffe solver: unnormalised (summed) loss, hence the tiny learning rate.
    "caffe": dict(lr=1e-10, momentum=0.99, weight_decay=5e-4, batch_size=1, loss="sum"),
}


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint).

    ``lr``, ``momentum``, ``weight_decay``, ``batch_size`` and ``loss`` left at None take
    the values of ``OPTIMIZER_PRESETS[optimizer]`` (see ``resolved()``).
    """

    data: str = "synthetic"  # "synthetic" or a VOC-format directory
    model: str = "fcn8s"
    backbone: str = "tiny"
    num_classes: int = 21
    fixed_upsampling: bool = False
    dropout: float = 0.5  # fc6/fc7 element-wise dropout (the paper's 0.5)
    epochs: int = 1
    optimizer: str = "sgd"  # sgd | adam | caffe
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    loss: Optional[str] = None  # mean | sum
    seed: int = 0
    # synthetic data (SyntheticScenes): training / validation image counts, side length
    train_images: int = 64
    val_images: int = 16
    image_size: int = 64
    ignore_border: int = 0  # label pixels this close to another class 255 (VOC-like)
    data_seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    # runtime (not part of the experiment's identity)
    out: Optional[str] = None  # directory for checkpoint.pt and history.jsonl
    device: str = "auto"
    num_workers: int = 0
    save_every: int = 0  # also checkpoint every N steps (0: only after each epoch)
    max_steps: Optional[int] = None  # stop after this many steps in total
    time_limit: Optional[float] = None  # stop training after this many seconds (checked each step)
    validate: bool = True
    quiet: bool = False

    RUNTIME_FIELDS = (
        "epochs",
        "out",
        "device",
        "num_workers",
        "save_every",
        "max_steps",
        "time_limit",
        "validate",
        "quiet",
    )
    # may differ from the checkpoint on resume: the runtime fields and the learning rate
    # (set on the restored optimiser); every other field defines the experiment
    RESUME_SAFE_FIELDS = RUNTIME_FIELDS + ("lr",)

    def resolved(self) -> "TrainConfig":
        """A copy with the optimiser preset filled in and every value checked."""
        if self.optimizer not in OPTIMIZER_PRESETS:
            raise ValueError(
                "optimizer must be one of %s, got %r" % (sorted(OPTIMIZER_PRESETS), self.optimizer)
            )
        preset = OPTIMIZER_PRESETS[self.optimizer]
        cfg = dataclasses.replace(
            self, **{k: v for k, v in preset.items() if getattr(self, k) is None}
        )
        if cfg.loss not in ("mean", "sum"):
            raise ValueError("loss must be 'mean' or 'sum', got %r" % (cfg.loss,))
        for name in ("epochs", "batch_size", "num_classes", "train_images", "image_size"):
            if getattr(cfg, name) <= 0:
                raise ValueError("%s must be positive, got %r" % (name, getattr(cfg, name)))
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1), got %r" % (cfg.dropout,))
        for name in ("val_images", "num_workers", "save_every", "ignore_border"):
            if getattr(cfg, name) < 0:
                raise ValueError("%s must be >= 0, got %r" % (name, getattr(cfg, name)))
        if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
            raise ValueError("lr must be a positive number, got %r" % (cfg.lr,))
        for name in ("max_steps", "time_limit"):
            if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
                raise ValueError("%s must be positive, got %r" % (name, getattr(cfg, name)))
        return cfg

    def to_dict(self) -> dict:
        """The fields as a dict (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """The config of ``values`` (a checkpoint's ``config``); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser of ``cfg`` over the trainable parameters of ``model``.

    Args:
        model (nn.Module): the model; parameters with ``requires_grad=False`` are left out.
        cfg (TrainConfig): a resolved config (``cfg.resolved()``): ``optimizer`` (``adam``,
            else SGD), ``lr``, ``momentum``, ``weight_decay``.

    Returns:
        torch.optim.Optimizer: ``Adam`` or ``SGD``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_model_from_config(cfg: TrainConfig) -> nn.Module:
    """The (untrained) model ``cfg`` describes.

    Args:
        cfg (TrainConfig): ``model``, ``backbone``, ``num_classes``, ``fixed_upsampling``,
            ``dropout``.

    Returns:
        nn.Module: ``fcnfast.models.build_model(cfg.model, ...)``.
    """
    from ..models import build_model

    return build_model(
        cfg.model,
        num_classes=cfg.num_classes,
        backbone=cfg.backbone,
        fixed_upsampling=cfg.fixed_upsampling,
        dropout=cfg.dropout,
    )


def resume_conflicts(saved: dict, requested: dict) -> list:
    """Settings in ``requested`` ({field: value}, those the user gave explicitly) that differ
    from the checkpoint's config ``saved`` and may not change on resume (everything but
    ``TrainConfig.RESUME_SAFE_FIELDS``).

    Args:
        saved (dict): the checkpoint's ``config``.
        requested (dict): {field: value} the user gave explicitly (None values are skipped).

    Returns:
        list: ``"field: checkpoint X, given Y"`` strings, empty when resuming is safe.
    """
    resolved = TrainConfig.from_dict(saved).resolved()
    out = []
    for key, value in requested.items():
        if key in TrainConfig.RESUME_SAFE_FIELDS or value is None:
            continue
        have = getattr(resolved, key)
        if key == "data" and "synthetic" not in (have, value):
            if Path(have).resolve() == Path(value).resolve():  # the same folder, spelt otherwise
                continue
        if have != value:
            out.append("%s: checkpoint %r, given %r" % (key.replace("_", "-"), have, value))
    return out
