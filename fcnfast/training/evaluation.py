"""Evaluation: ONE confusion matrix over a whole validation set (summed over processes), from
which the FCN paper's four metrics follow (``fcnfast.metrics``); optionally tiled, optionally
with a dense-CRF refinement."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..metrics import confusion_matrix
from .config import TrainConfig
from .data import pad_collate
from .distributed import Dist, all_reduce_sum

__all__ = ["evaluate", "crf_labels", "val_loader"]


def evaluate(
    model: nn.Module,
    loader,
    num_classes: int,
    device=None,
    progress: bool = False,
    crf: Optional[Callable] = None,
    ctx: Optional[Dist] = None,
    tile: Optional[int] = 0,
):
    """Confusion matrix of ``model`` over every batch of ``loader`` (summed over processes).

    Args:
        model (nn.Module): an fcnfast FCN (``predict`` is used without ``crf``); its train/eval
            mode is restored afterwards.
        loader: (images, labels) batches.
        num_classes (int): K.
        device: where to run (default: the model's).
        progress (bool): show a progress bar (only on a TTY, only on rank 0).
        crf (callable, optional): ``crf(logits, images) -> (N, H, W) labels`` (e.g.
            ``crf_labels``); a second matrix for the refined labels is returned as well.
        ctx (Dist, optional): the process group's view (``fcnfast.training.distributed``);
            the matrices are summed over its processes.
        tile (int or None): run each image tile by tile (``fcnfast.tiling``; labels equal to
            the whole-image ones, the CRF per tile); None: tiles of ``tiling.DEFAULT_TILE`` for
            images above ``tiling.AUTO_TILE_PIXELS`` pixels; 0: never.

    Returns:
        Tensor or tuple: the (K, K) int64 matrix on the CPU (rows = ground truth,
        ``fcnfast.metrics.confusion_matrix``), or ``(conf, conf_crf)`` with ``crf``.
    """
    from tqdm.auto import tqdm

    device = device or next(model.parameters()).device
    ctx = ctx or Dist()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    conf_crf = torch.zeros_like(conf) if crf is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets in tqdm(
                loader,
                desc="validate",
                leave=False,
                disable=None if progress and ctx.main else True,
            ):
                images, targets = images.to(device), targets.to(device)
                use_tile = _tiling().tile_for(model, images.shape[-2], images.shape[-1], tile)
                if use_tile:
                    for i in range(images.shape[0]):
                        _tiled_confusion(
                            model,
                            images[i : i + 1],
                            targets[i : i + 1],
                            num_classes,
                            use_tile,
                            conf,
                            crf,
                            conf_crf,
                        )
                    continue
                if crf is None:
                    confusion_matrix(targets, model.predict(images), num_classes, out=conf)
                    continue
                logits = model(images)
                confusion_matrix(targets, logits.argmax(1), num_classes, out=conf)
                confusion_matrix(targets, crf(logits, images), num_classes, out=conf_crf)
    finally:
        model.train(was_training)
    all_reduce_sum(conf, ctx)
    if conf_crf is None:
        return conf.cpu()
    return conf.cpu(), all_reduce_sum(conf_crf, ctx).cpu()


def _tiling():
    from .. import tiling

    return tiling


def _tiled_confusion(model, image, target, num_classes, tile, conf, crf, conf_crf) -> None:
    """Add one image's tiled labels (and, with ``crf``, its per-tile CRF labels) to the matrices."""
    height, width = image.shape[-2:]

    def window(y0, y1, x0, x1):
        return image[:, :, y0:y1, x0:x1]

    labels = _tiling().tiled_labels(model, height, width, window, tile=tile)
    confusion_matrix(
        target, torch.from_numpy(labels).to(target.device).long()[None], num_classes, out=conf
    )
    if crf is not None:

        def refine(logits, y0, y1, x0, x1):
            return crf(logits, image[:, :, y0:y1, x0:x1])[0]

        refined = _tiling().tiled_labels(model, height, width, window, tile=tile, crf=refine)
        confusion_matrix(
            target,
            torch.from_numpy(refined).to(target.device).long()[None],
            num_classes,
            out=conf_crf,
        )


def crf_labels(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Labels after ``fcnfast.crf.dense_crf`` refinement of ``logits``.

    Args:
        logits (Tensor): (N, C, H, W) scores.
        images (Tensor): the (N, 3, H, W) RGB input, normalised by ``data.image_to_tensor``.

    Returns:
        Tensor: (N, H, W) int64 labels.

    Raises:
        ImportError: ``fcnfast.crf`` is not available.
    """
    from .. import crf
    from ..data import tensor_to_image

    raw = torch.stack([torch.from_numpy(tensor_to_image(im)).permute(2, 0, 1) for im in images])
    return crf.dense_crf(logits, raw.to(logits.device)).argmax(1)


def val_loader(val_set, cfg: TrainConfig, ctx: Dist, device: torch.device):
    """The validation DataLoader of this process: a disjoint shard of ``val_set`` (no padding
    duplicates, unlike DistributedSampler), batches of ``cfg.batch_size`` (``pad_collate``)."""
    shard = Subset(val_set, range(ctx.rank, len(val_set), ctx.world)) if ctx.world > 1 else val_set
    return DataLoader(
        shard,
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        collate_fn=pad_collate,
        pin_memory=device.type == "cuda",
    )
