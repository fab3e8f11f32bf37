"""Fine-tuning a pretrained FCN on real images: the recipe behind the shipped CamVid model.

``fcnfast finetune --data DIR`` (see ``fcnfast finetune --help``) trains a
``LiteFCN`` (EfficientNet-Lite0 with ImageNet weights, FCN-8s heads) on a
segmentation dataset in any layout ``fcnfast.data.open_segmentation`` reads:

* augmentation: random scale (``--scale-min``..``--scale-max``), random crop
  (padded with the ignore label), horizontal flip, light colour jitter
  (brightness / contrast / saturation);
* loss: per-pixel cross-entropy over non-void pixels, optionally weighted by
  median-frequency balancing (Eigen & Fergus 2015; SegNet's CamVid recipe):
  ``w_c = median(f) / f_c`` with ``f_c`` the frequency of class c over the
  images that contain it;
* optimiser: AdamW (or SGD with momentum) with a linear warm-up and a poly
  (power 0.9) or cosine decay per step; the backbone's learning rate is
  ``--backbone-lr-scale`` times the heads';
* optional bf16 autocast on CPU (``--bf16``: backbone and heads, the heads by fcnfast's per-op
  autocast rules in ``fcnfast._autocast``; the loss in fp32);
* per-epoch validation with the per-class IoU table, the best epoch (by val
  mean IoU) kept as ``best.pt``; ``last.pt`` written atomically after every
  epoch and on ``--minutes`` expiry; ``--resume`` continues exactly (model,
  optimiser, step, RNG states, history).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from .data.layouts import open_segmentation
from .losses import IGNORE_INDEX
from .metrics import confusion_matrix, segmentation_scores
from .models.lite_fcn import LiteFCN
from .training.checkpointing import rng_state, set_rng_state

__all__ = [
    "FinetuneConfig",
    "Augment",
    "median_frequency_weights",
    "finetune",
    "evaluate_lite",
    "iou_table",
    "load_finetuned",
    "is_finetune_checkpoint",
]


@dataclass
class FinetuneConfig:
    data: str
    out: str = "runs/finetune"
    variant: str = "fcn8s"
    pretrained: bool = True
    epochs: int = 40
    batch_size: int = 8
    crop: Sequence[int] = (288, 384)
    scale_min: float = 0.75
    scale_max: float = 1.5
    jitter: float = 0.2
    optimizer: str = "adamw"
    lr: float = 2e-3
    backbone_lr_scale: float = 0.5
    weight_decay: float = 1e-4
    schedule: str = "poly"
    warmup_steps: int = 50
    class_weights: str = "median-sqrt"  # "median", "median-sqrt" or "none"
    bf16: bool = False
    threads: Optional[int] = None
    seed: int = 0
    minutes: Optional[float] = None
    val_every: int = 2
    num_workers: int = 1
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: Optional[int] = None
    max_val_images: Optional[int] = None
    dropout: float = 0.1
    drop_connect_rate: float = 0.2
    history: List[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("history")
        d["crop"] = list(self.crop)
        return d


class Augment:
    """Random scale, crop (padding with the ignore label), flip and colour jitter of a uint8 pair."""

    def __init__(self, crop: Sequence[int], scale_min: float, scale_max: float, jitter: float):
        self.crop = (int(crop[0]), int(crop[1]))
        self.scale_min, self.scale_max, self.jitter = scale_min, scale_max, jitter

    def __call__(self, image: torch.Tensor, label: torch.Tensor):
        scale = random.uniform(self.scale_min, self.scale_max)
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        img = F.interpolate(
            image[None].float(),
            size=(nh, nw),
            mode="bilinear",
            align_corners=False,
            antialias=scale < 1,
        )[0]
        lab = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ch, cw = self.crop
        pad_h, pad_w = max(0, ch - nh), max(0, cw - nw)
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), value=127.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = random.randint(0, img.shape[1] - ch)
        left = random.randint(0, img.shape[2] - cw)
        img = img[:, top : top + ch, left : left + cw]
        lab = lab[top : top + ch, left : left + cw]
        if random.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.jitter > 0:
            img = self._colour(img)
        return img.clamp_(0, 255).round_().to(torch.uint8), lab.contiguous()

    def _colour(self, img: torch.Tensor) -> torch.Tensor:
        j = self.jitter
        brightness = random.uniform(1 - j, 1 + j)
        contrast = random.uniform(1 - j, 1 + j)
        saturation = random.uniform(1 - j, 1 + j)
        img = img * brightness
        mean = img.mean()
        img = (img - mean) * contrast + mean
        grey = img.mean(0, keepdim=True)
        return (img - grey) * saturation + grey


class _Transformed(Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return self.transform(*self.base[index])


class _Subset(Dataset):
    def __init__(self, base, count: Optional[int]):
        self.base = base
        self.count = len(base) if count is None else min(count, len(base))
        self.class_names = getattr(base, "class_names", None)
        self.num_classes = getattr(base, "num_classes", None)

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.base[index]

    def raw(self, index):
        return self.base.raw(index)


def median_frequency_weights(dataset, num_classes: int) -> torch.Tensor:
    """Median-frequency balancing: ``median(f) / f_c``, ``f_c`` = pixels of c / pixels of the images holding c."""
    pixels = np.zeros(num_classes, dtype=np.float64)
    present_pixels = np.zeros(num_classes, dtype=np.float64)
    for index in range(len(dataset)):
        _, labels = dataset.raw(index)
        valid = labels[labels != IGNORE_INDEX]
        counts = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
        pixels += counts
        present_pixels += (counts > 0) * labels.size
    freq = np.where(present_pixels > 0, pixels / np.maximum(present_pixels, 1), 0.0)
    positive = freq[freq > 0]
    weights = np.where(freq > 0, np.median(positive) / np.maximum(freq, 1e-12), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def iou_table(confusion: torch.Tensor, class_names: Optional[Sequence[str]]) -> str:
    """A plain-text per-class IoU / accuracy table from a (C, C) confusion (rows = truth)."""
    conf = confusion.double()
    tp = conf.diag()
    iou = tp / (conf.sum(0) + conf.sum(1) - tp).clamp(min=1)
    acc = tp / conf.sum(1).clamp(min=1)
    names = list(class_names) if class_names else [str(i) for i in range(conf.shape[0])]
    width = max(len(n) for n in names)
    lines = ["%-*s  %6s  %6s" % (width, "class", "IoU", "acc")]
    for name, i, a in zip(names, iou.tolist(), acc.tolist()):
        lines.append("%-*s  %6.1f  %6.1f" % (width, name, 100 * i, 100 * a))
    return "\n".join(lines)


@torch.no_grad()
def evaluate_lite(
    model: LiteFCN,
    dataset,
    num_classes: int,
    crf: bool = False,
    progress: bool = False,
    bf16: bool = False,
    tile: Optional[int] = 0,
) -> Dict[str, object]:
    """Confusion matrix and the FCN paper's metrics over ``dataset`` (uint8 items), one image at a time.

    ``tile``: run each image tile by tile (``fcnfast.tiling``: labels equal to the whole-image
    ones, the CRF per tile); None: tiles of ``tiling.default_tile(model)`` for images above
    ``tiling.AUTO_TILE_PIXELS`` pixels; 0: never."""
    from tqdm import tqdm

    from . import tiling

    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    conf_crf = torch.zeros_like(conf) if crf else None
    for index in tqdm(range(len(dataset)), disable=not progress, desc="val", leave=False):
        image, label = dataset[index]
        height, width = image.shape[-2:]
        use_tile = tiling.tile_for(model, height, width, tile)
        if use_tile:
            _tiled_lite_confusion(model, image, label, use_tile, crf, conf, conf_crf)
            continue
        x = model.preprocess(image[None])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        conf += confusion_matrix(label[None], logits.argmax(1), num_classes)
        if crf:
            from .crf import dense_crf

            refined = dense_crf(logits[0].float(), image)
            conf_crf += confusion_matrix(label[None], refined.argmax(0)[None], num_classes)
    result = {"confusion": conf, "scores": segmentation_scores(conf)}
    if crf:
        result["confusion_crf"] = conf_crf
        result["scores_crf"] = segmentation_scores(conf_crf)
    return result


def _tiled_lite_confusion(
    model: LiteFCN, image, label, tile: int, crf: bool, conf, conf_crf
) -> None:
    """Add one uint8 image's tiled labels (and per-tile CRF labels) to the confusion matrices."""
    from . import tiling

    height, width = image.shape[-2:]

    def window(y0, y1, x0, x1):
        return image[None, :, y0:y1, x0:x1]

    labels = tiling.tiled_labels(model, height, width, window, tile=tile)
    conf += confusion_matrix(label[None], torch.from_numpy(labels).long()[None], conf.shape[0])
    if crf:
        from .crf import dense_crf

        def refine(logits, y0, y1, x0, x1):
            return dense_crf(logits[0].float(), image[:, y0:y1, x0:x1]).argmax(0)

        refined = tiling.tiled_labels(model, height, width, window, tile=tile, crf=refine)
        conf_crf += confusion_matrix(
            label[None], torch.from_numpy(refined).long()[None], conf.shape[0]
        )


def _lr_factor(step: int, total: int, cfg: FinetuneConfig, time_progress: float = 0.0) -> float:
    """Warm-up, then poly/cosine decay over max(step progress, time progress) (see ``--minutes``)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    progress = min(1.0, max(progress, time_progress))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return (1 - progress) ** 0.9


def is_finetune_checkpoint(path) -> bool:
    """Whether ``path`` is a checkpoint written by ``fcnfast finetune`` (a ``LiteFCN``)."""
    try:
        return load_checkpoint(path).get("kind") == "finetune"
    except (ValueError, FileNotFoundError):
        return False


def load_finetuned(path, device="cpu") -> LiteFCN:
    """The ``LiteFCN`` of a ``fcnfast finetune`` checkpoint, in eval mode on ``device``."""
    state = load_checkpoint(path)
    if state.get("kind") != "finetune":
        raise ValueError("%s is not a checkpoint of fcnfast finetune" % path)
    cfg = state["model_config"]
    model = LiteFCN(cfg["variant"], cfg["num_classes"], class_names=cfg.get("class_names"))
    model.load_state_dict(state["model"])
    model.palette = None
    return model.eval().to(device)


def build_optimizer(model: LiteFCN, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = [
        {
            "params": list(model.backbone_parameters()),
            "lr": cfg.lr * cfg.backbone_lr_scale,
            "base_lr": cfg.lr * cfg.backbone_lr_scale,
        },
        {"params": model.head_parameters(), "lr": cfg.lr, "base_lr": cfg.lr},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError("optimizer must be 'adamw' or 'sgd', got %r" % (cfg.optimizer,))


def finetune(
    cfg: FinetuneConfig,
    resume: Optional[str] = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict:
    """Train per ``cfg``; returns the history (one dict per epoch) and the best val scores."""
    from tqdm import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    train_base = _Subset(open_segmentation(cfg.data, cfg.train_split), cfg.max_train_images)
    val_set = _Subset(open_segmentation(cfg.data, cfg.val_split), cfg.max_val_images)
    num_classes = train_base.num_classes
    if num_classes is None:
        raise ValueError("the dataset at %s does not state its number of classes" % cfg.data)
    class_names = train_base.class_names

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = LiteFCN(
        cfg.variant,
        num_classes,
        pretrained=cfg.pretrained and resume is None,
        class_names=class_names,
        drop_connect_rate=cfg.drop_connect_rate,
        dropout=cfg.dropout,
    )
    optimizer = build_optimizer(model, cfg)
    if cfg.class_weights in ("median", "median-sqrt"):
        weights = median_frequency_weights(train_base, num_classes)
        if cfg.class_weights == "median-sqrt":
            weights = weights.sqrt()
    elif cfg.class_weights == "none":
        weights = None
    else:
        raise ValueError(
            "class_weights must be 'median', 'median-sqrt' or 'none', got %r" % (cfg.class_weights,)
        )
    start_epoch, step, best, trained_seconds = 0, 0, {"miou": -1.0, "epoch": None}, 0.0
    history: List[dict] = []
    if resume is not None:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        best, history = state["best"], state["history"]
        trained_seconds = state.get("trained_seconds", 0.0)
        weights = state["class_weights"]
        set_rng_state(state["rng"])
        log("resumed from %s at epoch %d (step %d)" % (resume, start_epoch, step))
    if weights is not None:
        log(
            "class weights (%s): " % cfg.class_weights
            + ", ".join(
                "%s %.2f" % (n, w)
                for n, w in zip(class_names or range(num_classes), weights.tolist())
            )
        )

    augment = Augment(cfg.crop, cfg.scale_min, cfg.scale_max, cfg.jitter)
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(train_base) // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    started = time.time()
    log(
        "finetune: %s lite0 %s, %d classes, %d train / %d val images, crop %s, batch %d, %s lr %g "
        "(backbone x%g), %s schedule, %d epochs (%d steps), bf16 %s, threads %d"
        % (
            cfg.variant,
            "ImageNet" if cfg.pretrained else "scratch",
            num_classes,
            len(train_base),
            len(val_set),
            tuple(cfg.crop),
            cfg.batch_size,
            cfg.optimizer,
            cfg.lr,
            cfg.backbone_lr_scale,
            cfg.schedule,
            cfg.epochs,
            total_steps,
            cfg.bf16,
            torch.get_num_threads(),
        )
    )

    def save(path: Path, epoch: int):
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "kind": "finetune",
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step": step,
                "best": best,
                "history": history,
                "class_weights": weights,
                "rng": rng_state(),
                "trained_seconds": trained_seconds,
                "config": cfg.to_dict(),
                "model_config": model.config(),
            },
            path,
        )

    stopped = False
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        # one permutation per epoch from a generator seeded by (seed, epoch): resumable exactly
        order = torch.randperm(
            len(train_base), generator=loader_gen.manual_seed(cfg.seed * 1000 + epoch)
        )
        loader = DataLoader(
            _Transformed(train_base, augment),
            batch_size=cfg.batch_size,
            sampler=order.tolist(),
            drop_last=True,
            num_workers=cfg.num_workers,
            worker_init_fn=_seed_worker,
            persistent_workers=False,
            generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch),
        )
        epoch_loss, seen, t0 = 0.0, 0, time.time()
        bar = tqdm(
            loader, desc="epoch %d/%d" % (epoch + 1, cfg.epochs), disable=not progress, leave=False
        )
        for images, labels in bar:
            t_step = time.time()
            time_progress = trained_seconds / (60 * cfg.minutes) if cfg.minutes else 0.0
            if time_progress >= 1.0:
                stopped = True
                break
            factor = _lr_factor(step, total_steps, cfg, time_progress)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(model.preprocess(images))
            loss = F.cross_entropy(
                logits.float(), labels, weight=weights, ignore_index=IGNORE_INDEX
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_loss += loss.item() * images.shape[0]
            seen += images.shape[0]
            bar.set_postfix(loss="%.3f" % loss.item())
            trained_seconds += time.time() - t_step
        record = {
            "epoch": epoch + 1,
            "step": step,
            "loss": epoch_loss / max(seen, 1),
            "train_seconds": round(time.time() - t0, 1),
            "lr": optimizer.param_groups[1]["lr"],
        }
        last_epoch = stopped or epoch + 1 == cfg.epochs
        if cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
            t1 = time.time()
            result = evaluate_lite(model, val_set, num_classes, progress=progress, bf16=cfg.bf16)
            scores = result["scores"]
            record.update({"val_" + k: float(v) for k, v in scores.items() if k != "per_class_iu"})
            record["val_seconds"] = round(time.time() - t1, 1)
            record["val_iou"] = scores["per_class_iu"]
            log(iou_table(result["confusion"], class_names))
            if scores["mean_iu"] > best["miou"]:
                best = {"miou": float(scores["mean_iu"]), "epoch": epoch + 1}
                save(out / "best.pt", epoch + 1)
        history.append(record)
        log(json.dumps({k: v for k, v in record.items() if k != "val_iou"}))
        save(out / "last.pt", epoch + 1)
        with open(out / "history.json", "w") as fh:
            json.dump({"config": cfg.to_dict(), "history": history, "best": best}, fh, indent=1)
        if stopped:
            log(
                "training time budget of %g minutes used up in epoch %d (the learning rate "
                "schedule ended with it)" % (cfg.minutes, epoch + 1)
            )
            break
    log(
        "done: best val mean IoU %.4f at epoch %s, %.1f min"
        % (best["miou"], best["epoch"], (time.time() - started) / 60)
    )
    return {"history": history, "best": best}


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# ---------------------------------------------------------------------------
# command line: fcnfast finetune
# ---------------------------------------------------------------------------


def register_cli(sub) -> None:
    """Add ``fcnfast finetune`` to the ``fcnfast`` command line."""
    from .cli import HelpFormatter, nonneg_float, nonneg_int, pos_float, pos_int

    d = FinetuneConfig(data="")
    p = sub.add_parser(
        "finetune",
        help="fine-tune an ImageNet-pretrained Lite0 FCN on real images",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="dataset folder: list-file (<split>.txt, e.g. CamVid), images/+labels/ or VOC",
    )
    p.add_argument("--out", default=d.out, help="run directory (last.pt, best.pt, history.json)")
    p.add_argument(
        "--model", dest="variant", choices=("fcn32s", "fcn16s", "fcn8s"), default=d.variant
    )
    p.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="start from random weights instead of ImageNet",
    )
    p.add_argument("--epochs", type=pos_int, default=d.epochs)
    p.add_argument("--batch-size", type=pos_int, default=d.batch_size)
    p.add_argument("--crop", type=pos_int, nargs=2, default=list(d.crop), metavar=("H", "W"))
    p.add_argument("--scale-min", type=pos_float, default=d.scale_min)
    p.add_argument("--scale-max", type=pos_float, default=d.scale_max)
    p.add_argument(
        "--jitter",
        type=nonneg_float,
        default=d.jitter,
        help="colour jitter strength (brightness/contrast/saturation)",
    )
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=d.optimizer)
    p.add_argument("--lr", type=pos_float, default=d.lr, help="heads' learning rate")
    p.add_argument("--backbone-lr-scale", type=nonneg_float, default=d.backbone_lr_scale)
    p.add_argument("--weight-decay", type=nonneg_float, default=d.weight_decay)
    p.add_argument("--schedule", choices=("poly", "cosine"), default=d.schedule)
    p.add_argument("--warmup-steps", type=nonneg_int, default=d.warmup_steps)
    p.add_argument(
        "--class-weights",
        choices=("median", "median-sqrt", "none"),
        default=d.class_weights,
        help="median-frequency balancing (SegNet), its square root (milder), or none",
    )
    p.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (backbone and FCN heads; loss in fp32)"
    )
    p.add_argument("--threads", type=pos_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--minutes",
        type=pos_float,
        default=None,
        help="training-time budget (validation excluded): the learning-rate schedule "
        "decays over max(steps done / all steps, minutes used / budget) and "
        "training stops when the budget is used up",
    )
    p.add_argument(
        "--val-every",
        type=nonneg_int,
        default=d.val_every,
        help="validate every N epochs (0: never)",
    )
    p.add_argument("--num-workers", type=nonneg_int, default=d.num_workers)
    p.add_argument("--max-train-images", type=pos_int, default=None)
    p.add_argument("--max-val-images", type=pos_int, default=None)
    p.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue a run from its last.pt (its settings; only %s may be given "
        "anew)" % ", ".join("--" + f.replace("_", "-") for f in RESUME_SAFE_FIELDS),
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in --out (last.pt, best.pt, history.json)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_finetune)


# files of a finetune run directory; --out refuses a directory holding any of them (unless
# --resume continues that run, or --overwrite)
RUN_FILES = ("last.pt", "best.pt", "history.json")
# settings that may change when a run is resumed; any other one given explicitly must match
RESUME_SAFE_FIELDS = (
    "epochs",
    "lr",
    "minutes",
    "val_every",
    "num_workers",
    "threads",
    "out",
    "max_val_images",
)


def _cmd_finetune(args) -> int:
    from .cli import UsageError

    fields = FinetuneConfig.__dataclass_fields__
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    explicit = {k for k in getattr(args, "_explicit", set()) if k in fields}
    if args.resume is None:
        cfg = FinetuneConfig(**options)
    else:
        cfg = _resumed_config(args.resume, {k: options[k] for k in explicit if k in options})
    _claim_out_dir(Path(cfg.out), args.resume, args.overwrite, UsageError)
    finetune(cfg, resume=args.resume, progress=not args.quiet)
    return 0


def _resumed_config(resume: str, requested: dict) -> FinetuneConfig:
    """The checkpoint's settings with the explicitly given safe ones applied (``--out``
    defaults to the checkpoint's directory); a conflicting setting stops with the list."""
    from .cli import UsageError

    if not Path(resume).is_file():
        raise FileNotFoundError("checkpoint not found: %s" % resume)
    state = load_checkpoint(resume)
    if state.get("kind") != "finetune":
        raise UsageError("--resume %s is not a checkpoint of fcnfast finetune" % resume)
    saved = dict(state["config"])
    conflicts = []
    for key, value in sorted(requested.items()):
        if key in RESUME_SAFE_FIELDS:
            continue
        have = saved.get(key)
        same = (
            list(have) == list(value)
            if key == "crop"
            else Path(have).resolve() == Path(value).resolve()
            if key == "data"
            else have == value
        )
        if not same:
            conflicts.append("%s: checkpoint %r, given %r" % (key.replace("_", "-"), have, value))
    if conflicts:
        raise UsageError(
            "--resume %s: settings differ from the checkpoint (only %s may change): "
            "%s"
            % (
                resume,
                ", ".join(f.replace("_", "-") for f in RESUME_SAFE_FIELDS),
                "; ".join(conflicts),
            )
        )
    saved.update(requested)
    if "out" not in requested:
        saved["out"] = str(Path(resume).parent)  # continue the run where it lives
    known = FinetuneConfig.__dataclass_fields__
    return FinetuneConfig(**{k: v for k, v in saved.items() if k in known})


def _claim_out_dir(out: Path, resume: Optional[str], overwrite: bool, error) -> None:
    """Refuse an ``--out`` that holds another run: nothing a user trained is replaced silently."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError("--out %s exists and is not a directory" % out)
    held = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if not held:
        return
    if resume is not None and out.resolve() == Path(resume).resolve().parent:
        return  # continuing this very run
    if not overwrite:
        hint = (
            "resume into its own directory (--out %s)" % Path(resume).parent
            if resume
            else "pass --resume %s to continue it" % (out / "last.pt")
        )
        raise error(
            "--out %s already holds a finetune run (%s); %s, choose another --out, or "
            "pass --overwrite" % (out, ", ".join(held), hint)
        )
    for name in held:
        (out / name).unlink()
    print("fcnfast: --overwrite: removed %s from %s" % (", ".join(held), out), file=sys.stderr)
