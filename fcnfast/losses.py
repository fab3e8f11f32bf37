"""The ignore label and the one per-pixel segmentation loss of fcnfast.

* ``IGNORE_INDEX`` (255): the label of pixels that no loss or metric counts (VOC's object
  outlines, void classes, padding). Datasets, the loss, the metrics and the HSI package all
  use this one constant.
* ``segmentation_loss(model, images, targets)``: per-pixel softmax cross-entropy of a
  segmentation model. ``FCN.loss``, ``LiteFCN.loss`` and the trainer (``fcnfast.train``) all
  call it. When the model's final upsampling is bilinear and takes no gradient (the model
  says so through ``frozen_bilinear_upsampling()``) it runs the fused
  ``ops.upsample_cross_entropy`` on the coarse scores: the full-resolution logits and their
  gradient are never held in memory.

This module imports only ``fcnfast.ops``: the models, the data and the training loop can all
import it without an import cycle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["IGNORE_INDEX", "segmentation_loss"]

IGNORE_INDEX = 255


def segmentation_loss(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-pixel softmax cross-entropy of ``model`` on ``images`` against ``targets``.

    Args:
        model (nn.Module): a segmentation model returning (N, C, H, W) logits. If it has a
            ``frozen_bilinear_upsampling()`` method returning True (``FCN`` with
            ``fixed_upsampling``, or a learned final upsampling still equal to the bilinear
            kernel that takes no gradient), the fused ``ops.upsample_cross_entropy`` runs on
            ``model.coarse_scores(images)`` instead of ``model(images)``; the value is the same.
        images (Tensor): the (N, C_in, H, W) input batch.
        targets (Tensor): (N, H, W) int64 labels; ``ignore_index`` marks pixels not counted.
        reduction (str): ``"mean"`` over the counted pixels, or ``"sum"`` (Caffe's
            unnormalised loss).
        ignore_index (int): the label that is not counted (default ``IGNORE_INDEX``, 255).

    Returns:
        Tensor: the scalar loss.
    """
    frozen = getattr(model, "frozen_bilinear_upsampling", None)
    if frozen is not None and frozen():
        scores, crop = model.coarse_scores(images)
        return ops.upsample_cross_entropy(
            scores, targets, model.upscale, crop, ignore_index=ignore_index, reduction=reduction
        )
    return F.cross_entropy(model(images), targets, ignore_index=ignore_index, reduction=reduction)
