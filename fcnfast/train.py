"""Training and evaluation of fcnfast's FCN models.

* Loss: per-pixel softmax cross-entropy with ignore label 255 (``fcnfast.losses``), averaged over the
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
  CPU, nccl on GPU). Only rank 0 prints and writes files. ``FCNFAST_DIST_TIMEOUT``
  (seconds) bounds how long a collective waits for a lost peer.

This module is the public entry point; the code lives in ``fcnfast.training`` (one module
per concern: config, data, distributed, checkpointing, evaluation, loop) and
``fcnfast.losses`` / ``fcnfast.checkpoints``.
"""

from __future__ import annotations

from .losses import IGNORE_INDEX, segmentation_loss
from .training.checkpointing import (
    CHECKPOINT_FORMAT,
    RUN_FILES,
    existing_run,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from .training.config import (
    OPTIMIZER_PRESETS,
    TrainConfig,
    build_model_from_config,
    build_optimizer,
    resume_conflicts,
)
from .training.data import check_labels, make_dataset, make_datasets, pad_collate
from .training.evaluation import crf_labels, evaluate
from .training.loop import TrainResult, train

__all__ = [
    "IGNORE_INDEX",
    "CHECKPOINT_FORMAT",
    "RUN_FILES",
    "OPTIMIZER_PRESETS",
    "TrainConfig",
    "TrainResult",
    "build_model_from_config",
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
