"""``fcnfast demo``: train a small FCN-8s on synthetic scenes on the CPU, score it, draw it,
and time fcnfast's kernels against the pure-PyTorch reference ops.

Everything is generated (``SyntheticScenes``) and seeded, so two runs with the same
arguments print the same metrics (timings aside).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from . import _backend
from .metrics import format_scores, plot_confusion, segmentation_scores
from .train import (
    TrainConfig,
    build_model_from_config,
    build_optimizer,
    crf_labels,
    evaluate,
    make_dataset,
    make_datasets,
    pad_collate,
    segmentation_loss,
    train,
)

__all__ = ["DEMO_DEFAULTS", "demo_config", "run_demo", "time_backends"]

# Tuned so that on a 2-core CPU the run ends within ~5 minutes at mean IU >= 0.80 (measured:
# see the report in the README). Background + 5 object classes; pixels within 1 pixel of a
# class boundary are ignored, as VOC's outlines are.
DEMO_DEFAULTS = dict(
    epochs=8,
    minutes=4.0,  # training stops early after this long
    seed=0,
    train_images=160,
    val_images=24,
    image_size=128,
    num_classes=6,
    ignore_border=1,
    batch_size=2,
    lr=2e-3,
)


def demo_config(
    out,
    epochs: int = DEMO_DEFAULTS["epochs"],
    seed: int = DEMO_DEFAULTS["seed"],
    train_images: int = DEMO_DEFAULTS["train_images"],
    val_images: int = DEMO_DEFAULTS["val_images"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    minutes: Optional[float] = None,
    quiet: bool = False,
) -> TrainConfig:
    d = DEMO_DEFAULTS
    return TrainConfig(
        data="synthetic",
        model="fcn8s",
        backbone="tiny",
        num_classes=d["num_classes"],
        # the paper's setting: final upsampling frozen to bilinear, so training runs the
        # fused upsample + cross-entropy kernel and validation the fused upsample + argmax
        fixed_upsampling=True,
        dropout=0.0,
        epochs=epochs,
        optimizer="adam",
        lr=d["lr"],
        batch_size=d["batch_size"],
        seed=seed,
        train_images=train_images,
        val_images=val_images,
        image_size=image_size,
        ignore_border=d["ignore_border"],
        out=str(out),
        time_limit=minutes * 60.0 if minutes else None,
        quiet=quiet,
    )


def run_demo(
    out="demo_out",
    epochs: int = DEMO_DEFAULTS["epochs"],
    minutes: Optional[float] = DEMO_DEFAULTS["minutes"],
    seed: int = DEMO_DEFAULTS["seed"],
    train_images: int = DEMO_DEFAULTS["train_images"],
    val_images: int = DEMO_DEFAULTS["val_images"],
    image_size: int = DEMO_DEFAULTS["image_size"],
    threads: Optional[int] = None,
    timing: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> dict:
    """Run the demo; returns the scores, the wall time and the timing comparison.

    ``out`` may hold an earlier demo's output (replaced: a demo is made again in a minute),
    but not another run (``fcnfast train`` / ``finetune`` files): that raises
    FileExistsError unless ``overwrite``."""
    previous_threads = torch.get_num_threads()
    try:
        return _run_demo(
            out,
            epochs,
            minutes,
            seed,
            train_images,
            val_images,
            image_size,
            threads,
            timing,
            quiet,
            log,
            overwrite,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    out,
    epochs,
    minutes,
    seed,
    train_images,
    val_images,
    image_size,
    threads,
    timing,
    quiet,
    log,
    overwrite,
) -> dict:
    start = time.perf_counter()
    threads_note = _set_threads(threads)
    out = Path(out)
    claim_demo_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, epochs, seed, train_images, val_images, image_size, minutes, quiet)
    log(
        "fcnfast demo: FCN-8s (tiny backbone, %d classes) on %d synthetic %dx%d scenes, "
        "%d epochs max (%s), Adam lr %g, batch %d, seed %d, backend %s, threads %d"
        % (
            cfg.num_classes,
            cfg.train_images,
            cfg.image_size,
            cfg.image_size,
            cfg.epochs,
            "%.3g min limit" % minutes if minutes else "no time limit",
            cfg.lr,
            cfg.batch_size,
            seed,
            _backend.backend(),
            torch.get_num_threads(),
        )
        + threads_note
    )

    result = train(cfg, log=log)
    model = result.model.eval()
    val_set = make_dataset(cfg, "val")
    loader = _batches(val_set, range(len(val_set)), cfg.batch_size)
    crf = _crf_or_none()
    scores_crf = None
    if crf is None:
        conf = evaluate(model, loader, cfg.num_classes)
    else:
        conf, conf_crf = evaluate(model, loader, cfg.num_classes, crf=crf)
        scores_crf = segmentation_scores(conf_crf)
    scores = segmentation_scores(conf)
    log("validation (%d scenes, one confusion matrix):" % len(val_set))
    log(format_scores(scores, prefix="  FCN-8s      "))
    if scores_crf is not None:
        log(format_scores(scores_crf, prefix="  FCN-8s+CRF  "))
    files = _write_pictures(model, val_set, conf, out, crf)
    log("wrote " + ", ".join(str(p) for p in files))

    timings = None
    if timing:
        timings = time_backends(cfg)
        log(timings["summary"])
    seconds = time.perf_counter() - start
    log(
        "checkpoint: %s   (try: fcnfast predict %s -o labels.png --checkpoint %s)"
        % (result.checkpoint, files[0], result.checkpoint)
    )
    log(
        "demo finished in %.1f s (training %.1f s, %d steps)"
        % (seconds, result.seconds, len(result.losses))
    )
    _write_marker(out, scores, scores_crf, seconds)
    return {
        "scores": scores,
        "scores_crf": scores_crf,
        "seconds": seconds,
        "train_seconds": result.seconds,
        "steps": len(result.losses),
        "timing": timings,
        "files": files,
    }


# the demo's own record in its --out: a directory holding it may be replaced by a new demo
DEMO_MARKER = "demo.json"
# run files the demo does not replace without --overwrite unless DEMO_MARKER says they are its own
_RUN_FILES = ("checkpoint.pt", "history.jsonl", "last.pt", "best.pt", "history.json")


def claim_demo_dir(out: Path, overwrite: bool = False) -> None:
    """Make ``out`` ready for a new demo: an earlier demo's run files are removed (so its
    history is not mixed into the new one); another run's files stop the demo unless
    ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError("--out %s exists and is not a directory" % out)
    held = [name for name in _RUN_FILES if (out / name).exists()] if out.is_dir() else []
    if held and not (out / DEMO_MARKER).exists() and not overwrite:
        raise FileExistsError(
            "--out %s holds a run that the demo did not write (%s); choose "
            "another --out or pass --overwrite" % (out, ", ".join(held))
        )
    for name in held:
        (out / name).unlink()


def _write_marker(out: Path, scores: dict, scores_crf, seconds: float) -> None:
    import json

    record = {"scores": scores, "scores_crf": scores_crf, "seconds": round(seconds, 1)}
    tmp = out / (DEMO_MARKER + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=float))
    os.replace(tmp, out / DEMO_MARKER)


def _set_threads(threads: Optional[int]) -> str:
    """Use ``threads`` CPU threads; by default torch's choice, or one thread when the machine
    is already busy (load average >= cores): OpenMP threads that wait for a descheduled peer
    made the demo several times slower, not faster, on a shared 2-core machine."""
    if threads:
        torch.set_num_threads(threads)
        return ""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return ""
    cores = os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load >= cores:
        torch.set_num_threads(1)
        return " (the machine is busy, load %.1f on %d cores; --threads N overrides)" % (
            load,
            cores,
        )
    return ""


def _crf_or_none():
    try:
        from . import crf  # noqa: F401
    except ImportError:
        return None
    return crf_labels


def _batches(dataset, indices, batch_size: int):
    indices = list(indices)
    return [
        pad_collate([dataset[i] for i in indices[k : k + batch_size]])
        for k in range(0, len(indices), batch_size)
    ]


def _write_pictures(model, val_set, conf, out: Path, crf) -> list:
    """Input image, ground truth and prediction of validation scene 0, and the confusion plot."""
    from .data import VOC_CLASSES, save_label_png

    image, labels = val_set.scene(0)
    x = val_set[0][0].unsqueeze(0)
    with torch.no_grad():
        pred = model.predict(x)[0]
    paths = [out / "input.png", out / "ground_truth.png", out / "prediction.png"]
    Image.fromarray(image).save(paths[0])
    save_label_png(labels, paths[1])
    save_label_png(pred, paths[2])
    if crf is not None:
        with torch.no_grad():
            refined = crf(model(x), x)[0]
        paths.append(out / "prediction_crf.png")
        save_label_png(refined, paths[-1])
    names = list(VOC_CLASSES) if conf.shape[0] == len(VOC_CLASSES) else None
    paths.append(out / "confusion.png")
    plot_confusion(conf, paths[-1], names)
    return paths


def time_backends(cfg: TrainConfig, steps: int = 6, repeats: int = 2) -> dict:
    """Time ``steps`` identical training steps plus one validation pass with the native
    kernels and with ``fcnfast.use_backend("reference")`` (same seed, same batches; best of
    ``repeats``, interleaved so machine load hits both alike)."""
    cfg = cfg.resolved()
    if _backend.extension() is None:
        return {
            "summary": "speed: the native extension is not loaded (%s); nothing to compare"
            % _backend.build_info().get("load_error")
        }
    train_set, val_set = make_datasets(cfg)
    batches = _batches(
        train_set, range(min(len(train_set), (steps + 1) * cfg.batch_size)), cfg.batch_size
    )
    val_batches = _batches(val_set, range(len(val_set)), cfg.batch_size)
    best = {}
    losses = {}
    for _ in range(repeats):
        for name in ("native", "reference"):
            train_s, val_s, losses[name] = _time_one(cfg, name, batches, val_batches)
            old = best.get(name, (math.inf, math.inf))
            best[name] = (min(old[0], train_s), min(old[1], val_s))
    native, reference = sum(best["native"]), sum(best["reference"])
    diff = float(np.max(np.abs(np.array(losses["native"]) - np.array(losses["reference"]))))
    what = (
        "%d training steps (batch %d, %dx%d, forward+backward+Adam) + a validation pass over "
        "%d scenes, %s, same seed and batches, best of %d"
        % (
            len(batches) - 1,
            cfg.batch_size,
            cfg.image_size,
            cfg.image_size,
            len(val_set),
            cfg.model,
            repeats,
        )
    )
    summary = (
        "speed: fcnfast kernels %.2f s vs reference ops %.2f s -> %.2fx faster "
        "(training %.2fx, validation %.2fx)\n  timed: %s; max loss difference %.2g"
        % (
            native,
            reference,
            reference / native,
            best["reference"][0] / best["native"][0],
            best["reference"][1] / best["native"][1],
            what,
            diff,
        )
    )
    return {
        "native_s": native,
        "reference_s": reference,
        "speedup": reference / native,
        "train": best,
        "loss_difference": diff,
        "what": what,
        "summary": summary,
    }


def _time_one(cfg: TrainConfig, backend: str, batches, val_batches):
    with _backend.use_backend(backend):
        torch.manual_seed(cfg.seed)
        model = build_model_from_config(cfg)
        optimizer = build_optimizer(model, cfg)
        model.train()

        def step(images, targets):
            optimizer.zero_grad(set_to_none=True)
            loss = segmentation_loss(model, images, targets, cfg.loss)
            loss.backward()
            optimizer.step()
            return loss.item()

        losses = [step(*batches[0])]  # warm-up (allocator, lazy init), not timed
        start = time.perf_counter()
        losses += [step(*b) for b in batches[1:]]
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluate(model, val_batches, cfg.num_classes)
        val_s = time.perf_counter() - start
    return train_s, val_s, losses
