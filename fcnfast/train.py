"""Training and evaluation of fcnfast's FCN models.

* Loss: per-pixel softmax cross-entropy with ignore label 255, averaged over the
  labelled pixels (``loss="mean"``) or summed (``loss="sum"``, Caffe's unnormalised
  loss). When a model's final upsampling is frozen (``model.fixed_upsampling``) the
  loss is ``fcnfast.ops.upsample_cross_entropy`` on ``model.coarse_scores(x)``: the
  full-resolution logits and their gradient are never held in memory.
* Optimisers: ``sgd``, ``adam`` and the paper's recipe ``caffe`` (SGD, momentum 0.99,
  lr 1e-10 with the summed loss, batch 1, weight decay 5e-4); see ``OPTIMIZER_PRESETS``.
* Validation after every epoch: the FCN paper's four metrics from ONE confusion matrix
  summed over the whole validation set (and over all processes).
* Checkpoints (model, optimiser, epoch, step, RNG states, config) are written
  atomically; ``resume`` continues so that the next step is the one the uninterrupted
  run would have taken (the data order depends only on ``seed`` and the epoch).
* Data-parallel over processes started by ``torchrun`` (DistributedDataParallel; gloo on
  CPU, nccl on GPU). Only rank 0 prints and writes files.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torch.utils.data.distributed import DistributedSampler

from . import ops
from .metrics import confusion_matrix, format_scores, segmentation_scores

__all__ = [
    "IGNORE_INDEX",
    "OPTIMIZER_PRESETS",
    "TrainConfig",
    "segmentation_loss",
    "build_optimizer",
    "make_dataset",
    "make_datasets",
    "pad_collate",
    "evaluate",
    "crf_labels",
    "save_checkpoint",
    "check_labels",
    "resume_conflicts",
    "existing_run",
    "load_checkpoint",
    "load_model",
    "train",
]

IGNORE_INDEX = 255
CHECKPOINT_FORMAT = "fcnfast-checkpoint-1"

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
    data: str = "synthetic"           # "synthetic" or a VOC-format directory
    model: str = "fcn8s"
    backbone: str = "tiny"
    num_classes: int = 21
    fixed_upsampling: bool = False
    dropout: float = 0.5              # fc6/fc7 element-wise dropout (the paper's 0.5)
    epochs: int = 1
    optimizer: str = "sgd"            # sgd | adam | caffe
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    loss: Optional[str] = None        # mean | sum
    seed: int = 0
    # synthetic data (SyntheticScenes): training / validation image counts, side length
    train_images: int = 64
    val_images: int = 16
    image_size: int = 64
    ignore_border: int = 0            # label pixels this close to another class 255 (VOC-like)
    data_seed: int = 0
    train_split: str = "train"
    val_split: str = "val"
    # runtime (not part of the experiment's identity)
    out: Optional[str] = None         # directory for checkpoint.pt and history.jsonl
    device: str = "auto"
    num_workers: int = 0
    save_every: int = 0               # also checkpoint every N steps (0: only after each epoch)
    max_steps: Optional[int] = None   # stop after this many steps in total
    time_limit: Optional[float] = None  # stop training after this many seconds (checked each step)
    validate: bool = True
    quiet: bool = False

    RUNTIME_FIELDS = ("epochs", "out", "device", "num_workers", "save_every", "max_steps",
                      "time_limit", "validate", "quiet")
    # may differ from the checkpoint on resume: the runtime fields and the learning rate
    # (set on the restored optimiser); every other field defines the experiment
    RESUME_SAFE_FIELDS = RUNTIME_FIELDS + ("lr",)

    def resolved(self) -> "TrainConfig":
        """A copy with the optimiser preset filled in and every value checked."""
        if self.optimizer not in OPTIMIZER_PRESETS:
            raise ValueError("optimizer must be one of %s, got %r"
                             % (sorted(OPTIMIZER_PRESETS), self.optimizer))
        preset = OPTIMIZER_PRESETS[self.optimizer]
        cfg = dataclasses.replace(self, **{k: v for k, v in preset.items()
                                           if getattr(self, k) is None})
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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# ---------------------------------------------------------------------------
# loss, optimiser, data
# ---------------------------------------------------------------------------

def segmentation_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor,
                      reduction: str = "mean") -> torch.Tensor:
    """Per-pixel cross-entropy of ``model`` on ``images`` (ignore label 255).

    With a frozen final upsampling the fused ``ops.upsample_cross_entropy`` runs on the
    coarse scores; otherwise ``F.cross_entropy(model(images), targets, ...)``.
    """
    if getattr(model, "fixed_upsampling", False):
        scores, crop = model.coarse_scores(images)
        return ops.upsample_cross_entropy(scores, targets, model.upscale, crop,
                                          ignore_index=IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(model(images), targets, ignore_index=IGNORE_INDEX, reduction=reduction)


class _LossModule(nn.Module):
    """model + loss in one forward, so DistributedDataParallel sees the whole step
    (``coarse_scores`` is not ``forward`` and would bypass DDP's gradient hooks)."""

    def __init__(self, model: nn.Module, reduction: str):
        super().__init__()
        self.model = model
        self.reduction = reduction

    def forward(self, images, targets):
        return segmentation_loss(self.model, images, targets, self.reduction)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def make_dataset(cfg: TrainConfig, part: str):
    """The ``"train"`` or ``"val"`` dataset of ``cfg``: SyntheticScenes or a VOC-format directory."""
    from . import data

    if part not in ("train", "val"):
        raise ValueError("part must be 'train' or 'val', got %r" % (part,))
    if cfg.data == "synthetic":
        # a disjoint seed: validation scenes are never training scenes
        seed = cfg.data_seed if part == "train" else cfg.data_seed + 1_000_003
        count = cfg.train_images if part == "train" else cfg.val_images
        return data.SyntheticScenes(count, cfg.image_size, seed=seed,
                                    num_classes=cfg.num_classes,
                                    ignore_border=cfg.ignore_border)
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError("data directory not found: %s (use 'synthetic' or a dataset "
                                "directory: VOC, list-file or images/ + labels/)" % cfg.data)
    from .data.layouts import NormalizedImages, detect_layout, open_segmentation

    split = cfg.train_split if part == "train" else cfg.val_split
    if detect_layout(cfg.data, split) == "voc":
        return data.VOCSegmentation(cfg.data, split)
    return NormalizedImages(open_segmentation(cfg.data, split, num_classes=cfg.num_classes))


def check_labels(dataset, num_classes: int, name: str = "data",
                 source: Optional[str] = None) -> None:
    """Scan every label of ``dataset`` before training: ValueError naming the first file that
    holds a class >= ``num_classes`` (255 = ignore is allowed), with the largest class found.

    Synthetic scenes are generated for ``num_classes`` and need no scan. Only label files are
    read (no images) where the dataset exposes ``paths(i)``."""
    from .data import SyntheticScenes
    from .data.images import load_label

    base = getattr(dataset, "base", dataset)
    if isinstance(base, SyntheticScenes) or len(base) == 0:
        return
    void_ids = tuple(getattr(base, "void_ids", ()) or ())
    largest, first_bad = -1, None
    for index in range(len(base)):
        if hasattr(base, "paths"):
            label_path = base.paths(index)[1]
            labels = load_label(label_path)
        else:  # pragma: no cover - every fcnfast dataset has paths()
            label_path, labels = "item %d" % index, base.raw(index)[1]
        for void in void_ids:
            labels = np.where(labels == void, IGNORE_INDEX, labels)
        valid = labels[labels != IGNORE_INDEX]
        top = int(valid.max()) if valid.size else -1
        if top >= num_classes and first_bad is None:
            first_bad = label_path
        largest = max(largest, top)
    if first_bad is not None:
        raise ValueError("%s but the %s labels hold class %d (first in %s); %s"
                         % (source or "--num-classes %d" % num_classes, name, largest, first_bad,
                            "use --num-classes %d or more" % (largest + 1) if source is None
                            else "classes run 0..%d (255 = ignore)" % (num_classes - 1)))


def resume_conflicts(saved: dict, requested: dict) -> list:
    """Settings in ``requested`` ({field: value}, those the user gave explicitly) that differ
    from the checkpoint's config ``saved`` and may not change on resume (everything but
    ``TrainConfig.RESUME_SAFE_FIELDS``), as ``"field: checkpoint X, given Y"`` strings."""
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


RUN_FILES = ("checkpoint.pt", "history.jsonl")


def existing_run(out) -> list:
    """The run files (checkpoint.pt, history.jsonl) already in directory ``out``."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def make_datasets(cfg: TrainConfig):
    """(train, validation) datasets of ``cfg``."""
    return make_dataset(cfg, "train"), make_dataset(cfg, "val")


def pad_collate(batch):
    """Stack (image, label) pairs; images of different sizes are padded at the bottom/right
    (image with 0, label with the ignore label, so padding never counts)."""
    images, labels = zip(*batch)
    height = max(im.shape[-2] for im in images)
    width = max(im.shape[-1] for im in images)
    if all(im.shape[-2:] == (height, width) for im in images):
        return torch.stack(images), torch.stack(labels)
    out_images = images[0].new_zeros((len(images), images[0].shape[0], height, width))
    out_labels = labels[0].new_full((len(labels), height, width), IGNORE_INDEX)
    for i, (im, lab) in enumerate(zip(images, labels)):
        out_images[i, :, :im.shape[-2], :im.shape[-1]] = im
        out_labels[i, :lab.shape[-2], :lab.shape[-1]] = lab
    return out_images, out_labels


class _SkipSampler(Sampler):
    """The indices of ``sampler`` after the first ``skip`` (resuming mid-epoch)."""

    def __init__(self, sampler, skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


# ---------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_type: str) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    owns = False
    if not dist.is_initialized():
        # FCNFAST_DIST_TIMEOUT (seconds): how long a collective may wait for a lost peer
        # before failing (torch's default is 10-30 minutes)
        timeout = os.environ.get("FCNFAST_DIST_TIMEOUT")
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=float(timeout))
                                if timeout else None)
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 owns)


def _average_buffers(model: nn.Module, ctx: _Dist) -> None:
    """Average floating buffers (batch-norm running statistics) over the processes.

    DDP keeps parameters identical but each process updates its running
    statistics from its own shard; averaging them before a checkpoint makes the
    replicas (and the saved model) agree.
    """
    if ctx.world <= 1:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(ctx.world)


def _all_reduce_sum(t: torch.Tensor, ctx: _Dist) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _pick_device(name: str, ctx: Optional[_Dist] = None) -> torch.device:
    """``name`` (auto, cpu, cuda, cuda:N) as a torch.device; ValueError naming the value when
    it is not a device this torch can use (unknown name, no CUDA, index out of range)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError("--device %r is not a device name (expected auto, cpu, cuda or cuda:N)"
                         % (name,)) from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError("--device %r: fcnfast runs on cpu or cuda, not %s" % (name, device.type))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device %r: this torch %s has no usable CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu"
                             % (name, torch.__version__))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError("--device %r: only %d CUDA device(s) present"
                             % (name, torch.cuda.device_count()))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank if ctx else torch.cuda.current_device())
    return device


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

def evaluate(model: nn.Module, loader, num_classes: int, device=None, progress: bool = False,
             crf: Optional[Callable] = None, ctx: Optional[_Dist] = None,
             tile: Optional[int] = 0):
    """Confusion matrix of ``model`` over every batch of ``loader`` (summed over processes).

    ``progress``: show a progress bar (only on a TTY).

    With ``crf`` (a callable ``crf(logits, images) -> (N, H, W) labels``) a second matrix
    for the CRF-refined labels is returned as well: ``(conf, conf_crf)``.

    ``tile``: run each image tile by tile (``fcnfast.tiling``; labels equal to the whole-image
    ones, the CRF per tile); None: tiles of ``tiling.DEFAULT_TILE`` for images above
    ``tiling.AUTO_TILE_PIXELS`` pixels; 0: never.
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    ctx = ctx or _Dist()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    conf_crf = torch.zeros_like(conf) if crf is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets in tqdm(loader, desc="validate", leave=False,
                                        disable=None if progress and ctx.main else True):
                images, targets = images.to(device), targets.to(device)
                use_tile = _tiling().tile_for(model, images.shape[-2], images.shape[-1], tile)
                if use_tile:
                    for i in range(images.shape[0]):
                        _tiled_confusion(model, images[i:i + 1], targets[i:i + 1], num_classes,
                                         use_tile, conf, crf, conf_crf)
                    continue
                if crf is None:
                    confusion_matrix(model.predict(images), targets, num_classes, out=conf)
                    continue
                logits = model(images)
                confusion_matrix(logits.argmax(1), targets, num_classes, out=conf)
                confusion_matrix(crf(logits, images), targets, num_classes, out=conf_crf)
    finally:
        model.train(was_training)
    _all_reduce_sum(conf, ctx)
    if conf_crf is None:
        return conf.cpu()
    return conf.cpu(), _all_reduce_sum(conf_crf, ctx).cpu()


def _tiling():
    from . import tiling

    return tiling


def _tiled_confusion(model, image, target, num_classes, tile, conf, crf, conf_crf) -> None:
    """Add one image's tiled labels (and, with ``crf``, its per-tile CRF labels) to the matrices."""
    height, width = image.shape[-2:]

    def window(y0, y1, x0, x1):
        return image[:, :, y0:y1, x0:x1]

    labels = _tiling().tiled_labels(model, height, width, window, tile=tile)
    confusion_matrix(torch.from_numpy(labels).to(target.device).long()[None], target,
                     num_classes, out=conf)
    if crf is not None:
        def refine(logits, y0, y1, x0, x1):
            return crf(logits, image[:, :, y0:y1, x0:x1])[0]

        refined = _tiling().tiled_labels(model, height, width, window, tile=tile, crf=refine)
        confusion_matrix(torch.from_numpy(refined).to(target.device).long()[None], target,
                         num_classes, out=conf_crf)


def crf_labels(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Labels after ``fcnfast.crf.dense_crf`` refinement of ``logits`` (N, C, H, W) with the
    RGB ``images`` (N, 3, H, W, normalised by ``data.image_to_tensor``).

    Raises ImportError when ``fcnfast.crf`` is not available.
    """
    from . import crf
    from .data import tensor_to_image

    raw = torch.stack([torch.from_numpy(tensor_to_image(im)).permute(2, 0, 1) for im in images])
    return crf.dense_crf(logits, raw.to(logits.device)).argmax(1)


def _val_loader(val_set, cfg: TrainConfig, ctx: _Dist, device: torch.device):
    # each process scores a disjoint shard (no padding duplicates, unlike DistributedSampler)
    shard = Subset(val_set, range(ctx.rank, len(val_set), ctx.world)) if ctx.world > 1 else val_set
    return DataLoader(shard, batch_size=cfg.batch_size, shuffle=False,
                      num_workers=cfg.num_workers, collate_fn=pad_collate,
                      pin_memory=device.type == "cuda")


# ---------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------

def save_checkpoint(state: dict, path) -> Path:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same
    directory, flushed and fsynced, then ``os.replace``d over ``path``. A failure at any
    point leaves an existing checkpoint at ``path`` untouched."""
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


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint written by ``save_checkpoint``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError("checkpoint not found: %s" % path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle errors, wrong format ...
        raise ValueError("cannot read checkpoint %s (corrupt or not a torch checkpoint): %s"
                         % (path, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("%s is not an fcnfast checkpoint (missing format %r)"
                         % (path, CHECKPOINT_FORMAT))
    return state


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                  int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(ctx: _Dist) -> list:
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states[0] = _rng_state()
    return states


def build_model_from_config(cfg: TrainConfig) -> nn.Module:
    from .models import build_model

    return build_model(cfg.model, num_classes=cfg.num_classes, backbone=cfg.backbone,
                       fixed_upsampling=cfg.fixed_upsampling, dropout=cfg.dropout)


def load_model(path, device="cpu"):
    """(model in eval mode, checkpoint dict) from a training checkpoint."""
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model_from_config(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError("checkpoint %s does not fit model %s/%s: %s"
                         % (path, cfg.model, cfg.backbone, exc)) from exc
    return model.to(device).eval(), ckpt


# ---------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------

@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    losses: list = field(default_factory=list)     # (step, loss) of every step this run took
    history: list = field(default_factory=list)    # per-epoch dicts (loss, metrics)
    conf: Optional[torch.Tensor] = None            # last validation confusion matrix
    checkpoint: Optional[Path] = None
    seconds: float = 0.0


def train(cfg: TrainConfig, resume=None, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; resume from checkpoint ``resume`` if given.

    On resume the checkpoint's config defines the experiment (model, data, optimiser,
    seed); ``cfg`` only contributes the runtime fields (epochs, out, device, ...).
    """
    from tqdm.auto import tqdm

    start_time = time.perf_counter()
    ckpt = None
    new_lr = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved = TrainConfig.from_dict(ckpt["config"])
        if cfg.lr is not None and saved.lr is not None and cfg.lr != saved.lr:
            new_lr = cfg.lr  # a safe change: applied to the restored optimiser below
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in TrainConfig.RUNTIME_FIELDS})
        if new_lr is not None:
            cfg.lr = new_lr
    cfg = cfg.resolved()
    train_set, val_set = make_datasets(cfg)  # before any process group exists: errors exit cleanly
    check_labels(train_set, cfg.num_classes, "training")
    if cfg.validate:
        check_labels(val_set, cfg.num_classes, "validation")
    device_type = _pick_device(cfg.device).type
    ctx = _init_distributed(device_type)
    device = _pick_device(cfg.device, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    say = log if ctx.main else (lambda message: None)
    say("fcnfast train: %s/%s, %d classes%s | data %s (%d train, %d val images) | %s lr %g "
        "momentum %g weight decay %g batch %d loss %s | %d epochs | %s, %d threads | out %s"
        % (cfg.model, cfg.backbone, cfg.num_classes,
           ", fixed upsampling" if cfg.fixed_upsampling else "", cfg.data, len(train_set),
           len(val_set), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size,
           cfg.loss, cfg.epochs, device, torch.get_num_threads(), cfg.out or "(none)"))

    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model_from_config(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    epoch, batch_in_epoch, step = 0, 0, 0
    resumed_loss = [0.0, 0.0]
    # one id per run, kept across resumes: every history record names the run it belongs to
    run_id = (ckpt or {}).get("run_id") or "%s-%s" % (
        datetime.datetime.now().strftime("%Y%m%dT%H%M%S"), uuid.uuid4().hex[:8])
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError("checkpoint %s does not fit model %s/%s: %s"
                             % (resume, cfg.model, cfg.backbone, str(exc).split("\n")[0])) from exc
        if new_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = new_lr
            say("learning rate changed to %g on resume" % new_lr)
        epoch, batch_in_epoch, step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        resumed_loss = ckpt["epoch_loss"]
        rng = ckpt["rng"]
        _set_rng_state(rng[ctx.rank] if len(rng) == ctx.world else rng[0])
        say("resumed from %s at epoch %d, step %d" % (resume, epoch + 1, step))
        if cfg.out and ctx.main:
            _set_aside_later_history(Path(cfg.out), epoch, say)
        if epoch >= cfg.epochs:
            say("the checkpoint has already trained %d epochs (>= epochs=%d): nothing to do"
                % (epoch, cfg.epochs))
    elif ctx.world > 1:
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # independent dropout per process

    step_module = _LossModule(model, cfg.loss)
    if ctx.world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DistributedSampler(train_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                 seed=cfg.seed)
    val_loader = _val_loader(val_set, cfg, ctx, device) if cfg.validate and len(val_set) else None
    out = Path(cfg.out) if cfg.out else None
    result = TrainResult(model=model, config=cfg)
    progress_off = True if (cfg.quiet or not ctx.main) else None  # None: auto, off when not a TTY

    def checkpoint(epoch_done: int, batches_done: int, epoch_loss, metrics=None):
        # collectives: every process takes part
        _average_buffers(model, ctx)
        rng_states = _gather_rng_states(ctx)
        epoch_loss = _all_reduce_sum(epoch_loss.clone(), ctx)
        if out is None or not ctx.main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch_done,
            "batch_in_epoch": batches_done,
            "step": step,
            "epoch_loss": epoch_loss.tolist(),  # (sum, count) of this epoch's losses so far
            "rng": rng_states,
            "config": cfg.to_dict(),
            "metrics": metrics,
            "confusion": result.conf if metrics is not None else None,
            "fcnfast_version": _version(),
            "run_id": run_id,
        }
        result.checkpoint = save_checkpoint(state, out / "checkpoint.pt")

    try:
        stop = False
        while epoch < cfg.epochs and not stop:
            sampler.set_epoch(epoch)
            loader = DataLoader(train_set, batch_size=cfg.batch_size,
                                sampler=_SkipSampler(sampler, batch_in_epoch * cfg.batch_size),
                                num_workers=cfg.num_workers, collate_fn=pad_collate,
                                pin_memory=device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed + epoch))
            model.train()
            # a mid-epoch checkpoint holds the all-reduced partial sum: rank 0 carries it
            loss_sum = torch.tensor(resumed_loss if batch_in_epoch and ctx.main else [0.0, 0.0],
                                    dtype=torch.float64, device=device)
            bar = tqdm(loader, desc="epoch %d/%d" % (epoch + 1, cfg.epochs), leave=False,
                       disable=progress_off)
            for images, targets in bar:
                images = images.to(device, non_blocking=True)
                targets = targets.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)
                loss = step_module(images, targets)
                loss.backward()
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                value = loss.item()
                result.losses.append((step, value))
                loss_sum += torch.tensor([value, 1.0], dtype=torch.float64, device=device)
                bar.set_postfix(loss="%.4g" % value, refresh=False)
                if cfg.save_every and step % cfg.save_every == 0:
                    checkpoint(epoch, batch_in_epoch, loss_sum)
                stop = _should_stop(step, cfg, start_time, ctx, device)
                if stop:
                    break
            bar.close()
            if batch_in_epoch < math.ceil(len(sampler) / cfg.batch_size):
                checkpoint(epoch, batch_in_epoch, loss_sum)  # stopped mid-epoch (limit)
                say("stopped at step %d (epoch %d, batch %d): %s reached"
                    % (step, epoch + 1, batch_in_epoch,
                       "max_steps" if cfg.max_steps is not None and step >= cfg.max_steps
                       else "time_limit"))
                break
            epoch += 1
            batch_in_epoch = 0
            record = {"run": run_id, "epoch": epoch, "step": step}
            _all_reduce_sum(loss_sum, ctx)
            if loss_sum[1] > 0:
                record["loss"] = float(loss_sum[0] / loss_sum[1])
            metrics = None
            if val_loader is not None:
                conf = evaluate(model, val_loader, cfg.num_classes, device,
                                progress=progress_off is None, ctx=ctx)
                metrics = segmentation_scores(conf)
                result.conf = conf
                record.update({k: metrics[k] for k in ("pixel_acc", "mean_acc", "mean_iu",
                                                       "fw_iu")})
            record["seconds"] = round(time.perf_counter() - start_time, 3)
            result.history.append(record)
            say("epoch %d/%d  step %d  loss %.4g%s" % (
                epoch, cfg.epochs, step, record.get("loss", float("nan")),
                ("  " + format_scores(metrics)) if metrics else ""))
            checkpoint(epoch, 0, torch.zeros(2, dtype=torch.float64, device=device), metrics)
            if out is not None and ctx.main:
                with open(out / "history.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
        dump = os.environ.get("FCNFAST_RANK_STATE_DIR")
        if dump:  # debugging/testing aid: every process saves its final weights
            torch.save(model.state_dict(), Path(dump) / ("rank%d.pt" % ctx.rank))
    finally:
        if ctx.owns_group:
            if sys.exc_info()[0] is None:
                # leave together: a process that tears down while its peer still finishes
                # its last checkpoint/file writes can leave the peer blocked in the teardown
                dist.barrier()
            dist.destroy_process_group()
    result.seconds = time.perf_counter() - start_time
    return result


def _set_aside_later_history(out: Path, epoch: int, say: Callable[[str], None]) -> None:
    """Resuming from a checkpoint older than the run's last epoch (e.g. one kept by
    ``--save-every``) redoes the later epochs: move their records out of ``history.jsonl`` (to
    ``history.superseded.jsonl``, nothing is lost) so that each epoch is recorded once."""
    path = out / "history.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep, later = [], []
    for line in lines:
        try:
            done = json.loads(line).get("epoch", 0) <= epoch
        except ValueError:
            done = True  # not ours to judge: keep it where it was
        (keep if done else later).append(line)
    if not later:
        return
    with open(out / "history.superseded.jsonl", "a") as f:
        f.write("".join(line + "\n" for line in later))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new history, never half
    say("history.jsonl: %d record(s) after epoch %d moved to history.superseded.jsonl "
        "(they are trained again now)" % (len(later), epoch))


def _should_stop(step: int, cfg: TrainConfig, start_time: float, ctx: _Dist, device) -> bool:
    """max_steps or time_limit reached (the time is rank 0's, so all processes agree)."""
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return True
    if cfg.time_limit is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - start_time > cfg.time_limit)], device=device)
    if ctx.world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _version() -> str:
    from . import __version__

    return __version__
