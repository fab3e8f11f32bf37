"""The training checkpoint: what a run saves besides the weights (RNG states of every process,
the run files, the history on resume) and ``load_model`` for a trained model.

The file format (``CHECKPOINT_FORMAT``, atomic ``save_checkpoint``, checked
``load_checkpoint``) is ``fcnfast.checkpoints``'; it is re-exported here.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from ..checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from .config import TrainConfig, build_model_from_config
from .distributed import Dist

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "RUN_FILES",
    "existing_run",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
    "set_aside_later_history",
]

RUN_FILES = ("checkpoint.pt", "history.jsonl")


def existing_run(out) -> list:
    """The run files (checkpoint.pt, history.jsonl) already in directory ``out``.

    Args:
        out (str or Path): a run's output directory (need not exist).

    Returns:
        list: the names of ``RUN_FILES`` present there.
    """
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def rng_state() -> dict:
    """This process's torch, NumPy, Python (and CUDA) generator states, in a form
    ``torch.load(weights_only=True)`` reads back.

    Returns:
        dict: ``set_rng_state``'s argument.
    """
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators from ``state`` (``rng_state``'s result).

    Args:
        state (dict): the saved states (CUDA ones only when CUDA is available).
    """
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx: Dist) -> list:
    """Every process's ``rng_state()`` (a collective: all processes call it).

    Args:
        ctx (Dist): the process group's view.

    Returns:
        list: one state per rank.
    """
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states[0] = rng_state()
    return states


def load_model(path, device="cpu"):
    """The model of a training checkpoint (``fcnfast train``).

    Args:
        path (str or Path): the checkpoint file.
        device: where the model goes (default ``"cpu"``).

    Returns:
        tuple: (model in eval mode, the checkpoint dict).
    """
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_model_from_config(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ValueError(
            "checkpoint %s does not fit model %s/%s: %s" % (path, cfg.model, cfg.backbone, exc)
        ) from exc
    return model.to(device).eval(), ckpt


def set_aside_later_history(out: Path, epoch: int, say: Callable[[str], None]) -> None:
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
    say(
        "history.jsonl: %d record(s) after epoch %d moved to history.superseded.jsonl "
        "(they are trained again now)" % (len(later), epoch)
    )


def fcnfast_version() -> str:
    """``fcnfast.__version__`` (stored in every checkpoint)."""
    from .. import __version__

    return __version__
