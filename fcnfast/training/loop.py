"""The training loop: ``train(cfg)`` and its steps.

``train`` resolves the config (from a checkpoint on resume), loads and checks the data, joins
the process group, builds (or restores) model and optimiser, then runs epochs of steps; after
each epoch it validates, logs, appends to ``history.jsonl`` and writes a checkpoint. The state
those steps share is one ``_Run``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import ops
from ..losses import segmentation_loss
from ..metrics import format_scores, segmentation_scores
from .checkpointing import (
    CHECKPOINT_FORMAT,
    fcnfast_version,
    gather_rng_states,
    load_checkpoint,
    save_checkpoint,
    set_aside_later_history,
    set_rng_state,
)
from .config import TrainConfig, build_model_from_config, build_optimizer
from .data import SkipSampler, check_labels, make_datasets, pad_collate
from .distributed import Dist, all_reduce_sum, average_buffers, init_distributed, pick_device
from .evaluation import evaluate, val_loader

__all__ = ["TrainResult", "train"]


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model, the resolved config, the loss of every step,
    the per-epoch history records, the last validation confusion matrix, the checkpoint path
    (None without ``out``) and the wall time in seconds."""

    model: nn.Module
    config: TrainConfig
    losses: list = field(default_factory=list)  # (step, loss) of every step this run took
    history: list = field(default_factory=list)  # per-epoch dicts (loss, metrics)
    conf: Optional[torch.Tensor] = None  # last validation confusion matrix
    checkpoint: Optional[Path] = None
    seconds: float = 0.0


class LossModule(nn.Module):
    """model + loss in one forward, so DistributedDataParallel sees the whole step
    (``coarse_scores`` is not ``forward`` and would bypass DDP's gradient hooks)."""

    def __init__(self, model: nn.Module, reduction: str):
        super().__init__()
        self.model = model
        self.reduction = reduction

    def forward(self, images, targets):
        return segmentation_loss(self.model, images, targets, self.reduction)


@dataclass
class _Run:
    """What the steps of one ``train`` call share."""

    cfg: TrainConfig
    ctx: Dist
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    say: Callable[[str], None]
    start_time: float
    result: TrainResult
    run_id: str = ""
    out: Optional[Path] = None
    step_module: Optional[nn.Module] = None
    sampler: Optional[DistributedSampler] = None
    val_loader: Optional[DataLoader] = None
    progress_off: Optional[bool] = None  # None: auto (off when not a TTY)
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    resumed_loss: list = field(default_factory=lambda: [0.0, 0.0])


def train(cfg: TrainConfig, resume=None, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data``; resume from checkpoint ``resume`` if given.

    On resume the checkpoint's config defines the experiment (model, data, optimiser,
    seed); ``cfg`` only contributes the runtime fields (epochs, out, device, ...) and may
    change the learning rate.

    Args:
        cfg (TrainConfig): the run.
        resume (str or Path, optional): a checkpoint to continue from; the next step is the
            one the uninterrupted run would have taken.
        log (callable): receives each progress line (only rank 0 logs).

    Returns:
        TrainResult: the model, the resolved config, the losses of every step, the per-epoch
        history, the last validation confusion matrix and the checkpoint path.
    """
    start_time = time.perf_counter()
    cfg, ckpt, new_lr = _resolve_config(cfg, resume)
    train_set, val_set = _load_data(cfg)  # before any process group exists: errors exit cleanly
    ctx, device = _join(cfg)
    run = _build(cfg, ctx, device, log, start_time)
    _describe(run, train_set, val_set)
    if ckpt is not None:
        _restore(run, ckpt, resume, new_lr)
    elif ctx.world > 1:
        torch.manual_seed(cfg.seed + 7919 * ctx.rank)  # independent dropout per process
    _prepare_loop(run, train_set, val_set)
    try:
        while run.epoch < cfg.epochs:
            loss_sum, stopped = _train_epoch(run, train_set)
            if run.batch_in_epoch < math.ceil(len(run.sampler) / cfg.batch_size):
                _stopped_mid_epoch(run, loss_sum)  # a limit was reached
                break
            _end_epoch(run, loss_sum)
            if stopped:
                break
    finally:
        _leave(ctx)
    run.result.seconds = time.perf_counter() - start_time
    return run.result


# -- the steps of train() ---------------------------------------------------


def _resolve_config(cfg: TrainConfig, resume):
    """(resolved config, checkpoint or None, new learning rate or None): on resume the
    checkpoint's config with ``cfg``'s runtime fields (and its lr, a safe change)."""
    ckpt = None
    new_lr = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        saved = TrainConfig.from_dict(ckpt["config"])
        if cfg.lr is not None and saved.lr is not None and cfg.lr != saved.lr:
            new_lr = cfg.lr  # a safe change: applied to the restored optimiser
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in TrainConfig.RUNTIME_FIELDS})
        if new_lr is not None:
            cfg.lr = new_lr
    return cfg.resolved(), ckpt, new_lr


def _load_data(cfg: TrainConfig):
    """The (train, validation) datasets, their labels checked against ``num_classes``."""
    train_set, val_set = make_datasets(cfg)
    check_labels(train_set, cfg.num_classes, "training")
    if cfg.validate:
        check_labels(val_set, cfg.num_classes, "validation")
    return train_set, val_set


def _join(cfg: TrainConfig):
    """(Dist, device): the process group of a torchrun launch and this process's device."""
    ctx = init_distributed(pick_device(cfg.device).type)
    device = pick_device(cfg.device, ctx)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return ctx, device


def _build(cfg: TrainConfig, ctx: Dist, device: torch.device, log, start_time: float) -> _Run:
    """Seed every generator, build model and optimiser (identical initial weights on every
    process)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    model = build_model_from_config(cfg).to(device)
    return _Run(
        cfg=cfg,
        ctx=ctx,
        device=device,
        model=model,
        optimizer=build_optimizer(model, cfg),
        say=log if ctx.main else (lambda message: None),
        start_time=start_time,
        result=TrainResult(model=model, config=cfg),
    )


def _describe(run: _Run, train_set, val_set) -> None:
    cfg = run.cfg
    run.say(
        "fcnfast train: %s/%s, %d classes%s | data %s (%d train, %d val images) | %s lr %g "
        "momentum %g weight decay %g batch %d loss %s | %d epochs | %s, %d threads | out %s"
        % (
            cfg.model,
            cfg.backbone,
            cfg.num_classes,
            ", fixed upsampling" if cfg.fixed_upsampling else "",
            cfg.data,
            len(train_set),
            len(val_set),
            cfg.optimizer,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            cfg.batch_size,
            cfg.loss,
            cfg.epochs,
            run.device,
            torch.get_num_threads(),
            cfg.out or "(none)",
        )
    )


def _restore(run: _Run, ckpt: dict, resume, new_lr: Optional[float]) -> None:
    """Weights, optimiser, position, epoch loss and RNG states from checkpoint ``ckpt``."""
    cfg, say = run.cfg, run.say
    try:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ValueError(
            "checkpoint %s does not fit model %s/%s: %s"
            % (resume, cfg.model, cfg.backbone, str(exc).split("\n")[0])
        ) from exc
    if new_lr is not None:
        for group in run.optimizer.param_groups:
            group["lr"] = new_lr
        say("learning rate changed to %g on resume" % new_lr)
    run.epoch, run.batch_in_epoch, run.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
    run.resumed_loss = ckpt["epoch_loss"]
    run.run_id = ckpt.get("run_id") or ""  # the run keeps its id across resumes
    rng = ckpt["rng"]
    set_rng_state(rng[run.ctx.rank] if len(rng) == run.ctx.world else rng[0])
    say("resumed from %s at epoch %d, step %d" % (resume, run.epoch + 1, run.step))
    if cfg.out and run.ctx.main:
        set_aside_later_history(Path(cfg.out), run.epoch, say)
    if run.epoch >= cfg.epochs:
        say(
            "the checkpoint has already trained %d epochs (>= epochs=%d): nothing to do"
            % (run.epoch, cfg.epochs)
        )


def _prepare_loop(run: _Run, train_set, val_set) -> None:
    """The run id, the (DDP-wrapped) loss module, the sampler and the validation loader."""
    cfg, ctx = run.cfg, run.ctx
    # one id per run, kept across resumes: every history record names the run it belongs to
    run.run_id = run.run_id or "%s-%s" % (
        datetime.datetime.now().strftime("%Y%m%dT%H%M%S"),
        uuid.uuid4().hex[:8],
    )
    run.step_module = LossModule(run.model, cfg.loss)
    if ctx.world > 1:
        run.step_module = nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    run.sampler = DistributedSampler(
        train_set, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=cfg.seed
    )
    run.val_loader = (
        val_loader(val_set, cfg, ctx, run.device) if cfg.validate and len(val_set) else None
    )
    run.out = Path(cfg.out) if cfg.out else None
    run.progress_off = True if (cfg.quiet or not ctx.main) else None


def _train_epoch(run: _Run, train_set):
    """The remaining steps of epoch ``run.epoch``: (loss sum and count as a tensor, whether a
    limit (max_steps, time_limit) stopped it)."""
    from tqdm.auto import tqdm

    cfg, ctx, device = run.cfg, run.ctx, run.device
    run.sampler.set_epoch(run.epoch)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=SkipSampler(run.sampler, run.batch_in_epoch * cfg.batch_size),
        num_workers=cfg.num_workers,
        collate_fn=pad_collate,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed + run.epoch),
    )
    run.model.train()
    # a mid-epoch checkpoint holds the all-reduced partial sum: rank 0 carries it
    loss_sum = torch.tensor(
        run.resumed_loss if run.batch_in_epoch and ctx.main else [0.0, 0.0],
        dtype=torch.float64,
        device=device,
    )
    bar = tqdm(
        loader,
        desc="epoch %d/%d" % (run.epoch + 1, cfg.epochs),
        leave=False,
        disable=run.progress_off,
    )
    stop = False
    for images, targets in bar:
        value = _step(run, images, targets)
        loss_sum += torch.tensor([value, 1.0], dtype=torch.float64, device=device)
        bar.set_postfix(loss="%.4g" % value, refresh=False)
        if cfg.save_every and run.step % cfg.save_every == 0:
            _checkpoint(run, run.epoch, run.batch_in_epoch, loss_sum)
        stop = _should_stop(run.step, cfg, run.start_time, ctx, device)
        if stop:
            break
    bar.close()
    if device.type == "cuda":
        # CUDA checks the labels on the device and reports a bad one at the next loss call:
        # the epoch's last step has none, so wait for its check here
        ops.check_pending_errors()
    return loss_sum, stop


def _step(run: _Run, images: torch.Tensor, targets: torch.Tensor) -> float:
    """One optimiser step on a batch; returns its loss."""
    images = images.to(run.device, non_blocking=True)
    targets = targets.to(run.device, non_blocking=True)
    run.optimizer.zero_grad(set_to_none=True)
    loss = run.step_module(images, targets)
    loss.backward()
    run.optimizer.step()
    run.step += 1
    run.batch_in_epoch += 1
    value = loss.item()
    run.result.losses.append((run.step, value))
    return value


def _stopped_mid_epoch(run: _Run, loss_sum: torch.Tensor) -> None:
    cfg = run.cfg
    _checkpoint(run, run.epoch, run.batch_in_epoch, loss_sum)
    run.say(
        "stopped at step %d (epoch %d, batch %d): %s reached"
        % (
            run.step,
            run.epoch + 1,
            run.batch_in_epoch,
            "max_steps"
            if cfg.max_steps is not None and run.step >= cfg.max_steps
            else "time_limit",
        )
    )


def _end_epoch(run: _Run, loss_sum: torch.Tensor) -> None:
    """Close a finished epoch: mean loss, validation, log line, checkpoint, history record."""
    cfg, ctx, result = run.cfg, run.ctx, run.result
    run.epoch += 1
    run.batch_in_epoch = 0
    record = {"run": run.run_id, "epoch": run.epoch, "step": run.step}
    all_reduce_sum(loss_sum, ctx)
    if loss_sum[1] > 0:
        record["loss"] = float(loss_sum[0] / loss_sum[1])
    metrics = None
    if run.val_loader is not None:
        conf = evaluate(
            run.model,
            run.val_loader,
            cfg.num_classes,
            run.device,
            progress=run.progress_off is None,
            ctx=ctx,
        )
        metrics = segmentation_scores(conf)
        result.conf = conf
        record.update({k: metrics[k] for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")})
    record["seconds"] = round(time.perf_counter() - run.start_time, 3)
    result.history.append(record)
    run.say(
        "epoch %d/%d  step %d  loss %.4g%s"
        % (
            run.epoch,
            cfg.epochs,
            run.step,
            record.get("loss", float("nan")),
            ("  " + format_scores(metrics)) if metrics else "",
        )
    )
    _checkpoint(run, run.epoch, 0, torch.zeros(2, dtype=torch.float64, device=run.device), metrics)
    if run.out is not None and ctx.main:
        with open(run.out / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def _checkpoint(
    run: _Run,
    epoch_done: int,
    batches_done: int,
    epoch_loss: torch.Tensor,
    metrics: Optional[dict] = None,
) -> None:
    """Write ``checkpoint.pt`` (rank 0). Collectives first: every process takes part."""
    ctx = run.ctx
    average_buffers(run.model, ctx)
    rng_states = gather_rng_states(ctx)
    epoch_loss = all_reduce_sum(epoch_loss.clone(), ctx)
    if run.out is None or not ctx.main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "epoch": epoch_done,
        "batch_in_epoch": batches_done,
        "step": run.step,
        "epoch_loss": epoch_loss.tolist(),  # (sum, count) of this epoch's losses so far
        "rng": rng_states,
        "config": run.cfg.to_dict(),
        "metrics": metrics,
        "confusion": run.result.conf if metrics is not None else None,
        "fcnfast_version": fcnfast_version(),
        "run_id": run.run_id,
    }
    run.result.checkpoint = save_checkpoint(state, run.out / "checkpoint.pt")


def _leave(ctx: Dist) -> None:
    """Tear down the process group this run created (after a barrier when all went well)."""
    if ctx.owns_group:
        if sys.exc_info()[0] is None:
            # leave together: a process that tears down while its peer still finishes
            # its last checkpoint/file writes can leave the peer blocked in the teardown
            dist.barrier()
        dist.destroy_process_group()


def _should_stop(step: int, cfg: TrainConfig, start_time: float, ctx: Dist, device) -> bool:
    """max_steps or time_limit reached (the time is rank 0's, so all processes agree)."""
    if cfg.max_steps is not None and step >= cfg.max_steps:
        return True
    if cfg.time_limit is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - start_time > cfg.time_limit)], device=device)
    if ctx.world > 1:
        dist.broadcast(flag, src=0)
    return bool(flag.item())
