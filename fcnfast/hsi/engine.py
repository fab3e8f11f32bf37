"""Training and full-scene inference for the patch CNN, its dense conversion and the HSI FCN.

Scenes are float32 tensors ``(B, H, W)`` (bands first); targets are int64 ``(H, W)`` with the
0-based class of every training pixel and ``IGNORE_INDEX`` (255, ``fcnfast.losses``) elsewhere.
Both trainers use Adam, random flips / 90-degree rotations, and are deterministic for a given
seed (single process, CPU).
"""

from __future__ import annotations

import time
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import IGNORE_INDEX
from ..models.convolutionalize import convolutionalize
from .models import extract_patches, reflect_pad

__all__ = [
    "IGNORE_INDEX",
    "train_patch_cnn",
    "predict_patches",
    "predict_dense",
    "train_fcn",
    "predict_fcn",
    "timed",
]


def timed(fn, *args, **kwargs):
    """``(result, seconds)`` of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _adam_one_cycle(model: nn.Module, lr: float, weight_decay: float, total_steps: int):
    """(Adam, OneCycleLR): warm-up to ``lr``, then cosine decay to ~0 over ``total_steps``."""
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)


def _update(opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss`` and one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def _augment(x: torch.Tensor, y: Optional[torch.Tensor], g: torch.Generator, noise: float = 0.0):
    """The same random flip / rot90 of the last two dims of ``x`` (and ``y``); with ``noise`` > 0
    also a random brightness factor in [1 - noise/2, 1 + noise/2] per sample and additive
    Gaussian noise of standard deviation ``noise`` (inputs are normalised to unit variance)."""
    if noise > 0:
        shape = (x.shape[0],) + (1,) * (x.dim() - 1) if x.dim() == 4 else (1,) * x.dim()
        x = x * (1 + noise * (torch.rand(shape, generator=g) - 0.5))
        x = x + noise * torch.randn(x.shape, generator=g)
    k = int(torch.randint(4, (1,), generator=g))
    if x.shape[-1] != x.shape[-2]:
        k = k // 2 * 2  # keep the shape of non-square inputs (crops are stacked)
    flip = bool(torch.randint(2, (1,), generator=g))
    x = torch.rot90(x, k, (-2, -1))
    y = torch.rot90(y, k, (-2, -1)) if y is not None else None
    if flip:
        x = x.flip(-1)
        y = y.flip(-1) if y is not None else None
    return x, y


def train_patch_cnn(
    model: nn.Module,
    scene: torch.Tensor,
    target: torch.Tensor,
    epochs: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    noise: float = 0.0,
    seed: int = 0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """Minibatches of ``window x window`` patches (gathered on the fly from the reflect-padded
    scene, never stored) around the training pixels, each batch randomly flipped / rotated by a
    multiple of 90 degrees; cross-entropy on the centre label; Adam with a one-cycle schedule
    (warm-up to ``lr``, cosine decay to ~0 over ``epochs``)."""
    g = torch.Generator().manual_seed(seed)
    padded = reflect_pad(scene, model.window // 2)
    rows, cols = torch.nonzero(target != IGNORE_INDEX, as_tuple=True)
    labels = target[rows, cols]
    per_epoch = sum(1 for s in range(0, rows.numel(), batch_size) if rows.numel() - s >= 2)
    opt, sched = _adam_one_cycle(model, lr, weight_decay, max(1, epochs * per_epoch))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(rows.numel(), generator=g)
        for start in range(0, order.numel(), batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2:  # BatchNorm needs more than one sample
                continue
            patches, _ = _augment(
                extract_patches(padded, rows[idx], cols[idx], model.window), None, g, noise
            )
            _update(
                opt,
                sched,
                F.cross_entropy(model(patches), labels[idx], label_smoothing=label_smoothing),
            )
    return model.eval()


@torch.inference_mode()
def predict_patches(model: nn.Module, scene: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """``(K, H, W)`` logits: the patch classifier run on the patch around every pixel."""
    model.eval()
    _, h, w = scene.shape
    padded = reflect_pad(scene, model.window // 2)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    out = torch.empty(h * w, model.num_classes)
    for start in range(0, h * w, batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = model(extract_patches(padded, rows[sl], cols[sl], model.window))
    return out.t().reshape(model.num_classes, h, w)


@torch.inference_mode()
def predict_dense(model: nn.Module, scene: torch.Tensor) -> torch.Tensor:
    """``(K, H, W)`` logits of the patch classifier on every pixel, computed by its
    convolutionalized version in one pass over the reflect-padded scene."""
    dense = convolutionalize(model.eval(), (scene.shape[0], model.window, model.window)).eval()
    return dense(reflect_pad(scene, model.window // 2)[None])[0]


def _random_crop(h: int, w: int, crop: int, g: torch.Generator) -> Tuple[slice, slice]:
    top = int(torch.randint(h - min(crop, h) + 1, (1,), generator=g))
    left = int(torch.randint(w - min(crop, w) + 1, (1,), generator=g))
    return slice(top, top + crop), slice(left, left + crop)


def train_fcn(
    model: nn.Module,
    scene: torch.Tensor,
    target: torch.Tensor,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    crop: int = 160,
    batch_size: int = 2,
    noise: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """The FCN on the whole scene (or, for scenes larger than ``crop``, random ``crop x crop``
    windows holding training pixels); the loss is the cross-entropy over the training pixels only
    (``ignore_index=IGNORE_INDEX``). One step = one augmented scene (or ``batch_size`` crops)."""
    g = torch.Generator().manual_seed(seed)
    _, h, w = scene.shape
    opt, sched = _adam_one_cycle(model, lr, weight_decay, max(steps, 1))
    whole = h <= crop and w <= crop
    model.train()
    for _ in range(steps):
        xs, ys = [], []
        while len(xs) < (1 if whole else batch_size):
            sy, sx = (slice(None), slice(None)) if whole else _random_crop(h, w, crop, g)
            y = target[sy, sx]
            if not whole and not (y != IGNORE_INDEX).any():
                continue
            x, y = _augment(scene[:, sy, sx], y, g, noise)
            xs.append(x)
            ys.append(y)
        _update(
            opt,
            sched,
            F.cross_entropy(model(torch.stack(xs)), torch.stack(ys), ignore_index=IGNORE_INDEX),
        )
    return model.eval()


@torch.inference_mode()
def predict_fcn(model: nn.Module, scene: torch.Tensor) -> torch.Tensor:
    """``(K, H, W)`` logits of the FCN on the whole scene in one forward pass."""
    return model.eval()(scene[None])[0]
