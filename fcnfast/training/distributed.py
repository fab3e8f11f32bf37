"""Data-parallel set-up for processes started by ``torchrun`` and the collectives the loop uses.

The process group is created from torchrun's environment (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ...): gloo on the CPU, nccl on CUDA. ``FCNFAST_DIST_TIMEOUT`` (seconds, default
torch's own, 10-30 minutes) bounds how long a collective waits for a lost peer before failing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["Dist", "init_distributed", "average_buffers", "all_reduce_sum", "pick_device"]


@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank (its GPU), and whether
    ``init_distributed`` created the process group (and so must destroy it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    """Join the process group of a torchrun launch (``WORLD_SIZE`` > 1), creating it unless
    one exists already.

    Args:
        device_type (str): ``"cuda"`` (nccl backend) or ``"cpu"`` (gloo).

    Returns:
        Dist: rank 0 of 1 without torchrun; else this process's rank, world size, local rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    owns = False
    if not dist.is_initialized():
        # FCNFAST_DIST_TIMEOUT (seconds): how long a collective may wait for a lost peer
        # before failing (unset: torch's default, 10-30 minutes); see the README's table
        timeout = os.environ.get("FCNFAST_DIST_TIMEOUT")
        dist.init_process_group(
            backend="nccl" if device_type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=float(timeout)) if timeout else None,
        )
        owns = True
    return Dist(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns
    )


def average_buffers(model: nn.Module, ctx: Dist) -> None:
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


def all_reduce_sum(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    """Sum ``t`` in place over the processes (nothing with one process); returns ``t``."""
    if ctx.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def pick_device(name: str, ctx: Optional[Dist] = None) -> torch.device:
    """``name`` as a torch.device.

    Args:
        name (str): ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        ctx (Dist, optional): a plain ``cuda`` becomes ``cuda:<local rank>``.

    Returns:
        torch.device: the device, with an index for CUDA.

    Raises:
        ValueError: naming the value when it is not a device this torch can use (unknown
            name, no CUDA, index out of range).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            "--device %r is not a device name (expected auto, cpu, cuda or cuda:N)" % (name,)
        ) from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError("--device %r: fcnfast runs on cpu or cuda, not %s" % (name, device.type))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device %r: this torch %s has no usable CUDA device "
                "(torch.cuda.is_available() is False); use --device cpu" % (name, torch.__version__)
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                "--device %r: only %d CUDA device(s) present" % (name, torch.cuda.device_count())
            )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ctx.local_rank if ctx else torch.cuda.current_device())
    return device
