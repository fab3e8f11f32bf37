"""``fcnfast hsi``: patch CNN vs its convolutionalized version vs an FCN on one hyperspectral scene.

For every seed (split + initialisation; the scene stays fixed) it trains the patch CNN and the
FCN, classifies every pixel of the scene with (a) the patch CNN run patch by patch, (b) the same
trained patch CNN convolutionalized (one dense pass, identical predictions) and (c) the FCN,
scores the test pixels and times everything. It prints a markdown table (mean +- std over seeds)
and writes ``results.md``, ``results.json`` and class-map PNGs into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np
import torch

from ..data.hsi import describe_scene, load_hsi, normalize_bands, synthetic_scene, NORMALIZATIONS
from . import engine
from .engine import IGNORE
from .metrics import classification_scores, confusion_matrix
from .models import HSIFCN, PatchCNN, receptive_field
from .splits import block_split, random_split

__all__ = ["register_cli", "add_arguments", "run", "run_experiment"]

METHODS = ("patch", "dense", "fcn")
NAMES = {"patch": "patch CNN, patch by patch", "dense": "patch CNN, convolutionalized (dense)",
         "fcn": "HSI FCN (fcnfast.nn upsampling + skips)"}


def _size(text: str):
    parts = text.lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError("size must be N or HxW, got %r" % text) from None
    if len(dims) not in (1, 2) or min(dims) < 8:
        raise argparse.ArgumentTypeError("size must be N or HxW with sides >= 8, got %r" % text)
    return (dims[0], dims[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("scene")
    data.add_argument("--data", help=".mat file, .npy cube or directory with cube.npy + gt.npy "
                      "(default: the synthetic scene)")
    data.add_argument("--gt-path", help="ground-truth file when separate from --data")
    data.add_argument("--cube-key", help="variable name of the cube in the .mat file")
    data.add_argument("--gt-key", help="variable name of the ground truth in the .mat file")
    data.add_argument("--size", type=_size, default=(145, 145), help="synthetic scene N or HxW "
                      "(default 145: Indian-Pines-like; Pavia-like: 610x340 --bands 103)")
    data.add_argument("--bands", type=int, default=64, help="synthetic bands (default 64)")
    data.add_argument("--classes", type=int, default=12, help="synthetic classes (default 12)")
    data.add_argument("--scene-seed", type=int, default=0, help="synthetic scene seed (default 0)")
    data.add_argument("--normalization", choices=NORMALIZATIONS, default="standard",
                      help="per-band normalisation (default standard: zero mean, unit variance)")
    split = p.add_argument_group("split")
    split.add_argument("--split", choices=("block", "random"), default="block",
                       help="block: spatially disjoint with a buffer (default); random: per class")
    split.add_argument("--train-fraction", type=float, default=0.3,
                       help="fraction of labelled pixels per class for training (default 0.3)")
    split.add_argument("--block", type=int, default=24, help="block side for --split block")
    split.add_argument("--buffer", type=int, default=None,
                       help="train/test buffer in pixels (default: the patch radius)")
    train = p.add_argument_group("training")
    train.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (split + init, default 3)")
    train.add_argument("--window", type=int, default=11, help="patch size w (odd, default 11)")
    train.add_argument("--epochs", type=int, default=20, help="patch CNN epochs (default 20)")
    train.add_argument("--fcn-steps", type=int, default=300,
                       help="FCN steps, each a full augmented scene (default 300)")
    train.add_argument("--width", type=int, default=16, help="conv width of both nets (default 16)")
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="hsi_out", help="output directory (default hsi_out)")
    out.add_argument("--no-memory", action="store_true",
                     help="skip the peak-memory measurement (one subprocess per method)")


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("hsi", help="hyperspectral: patch CNN vs FCN on one scene",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _load_scene(args):
    if args.data:
        cube, gt = load_hsi(args.data, args.cube_key, args.gt_key, args.gt_path)
        source = args.data
    else:
        h, w = args.size
        cube, gt = synthetic_scene(h, w, args.bands, args.classes, seed=args.scene_seed)
        source = "synthetic (seed %d)" % args.scene_seed
    return normalize_bands(cube, args.normalization), gt, source


def _split(gt, args, seed, radius):
    if args.split == "random":
        return random_split(gt, args.train_fraction, seed=seed)
    buffer = radius if args.buffer is None else args.buffer
    return block_split(gt, args.train_fraction, args.block, buffer, seed=seed)


def _scores(logits: torch.Tensor, gt: np.ndarray, test: np.ndarray, k: int) -> Dict:
    pred = logits.argmax(0).numpy()
    scores = classification_scores(confusion_matrix(gt[test] - 1, pred[test], k))
    scores["prediction"] = pred
    return scores


def _peak_memory(method: str, model, scene: torch.Tensor) -> float:
    """Extra peak RSS (MiB) of one inference, measured by ``fcnfast.hsi._memprobe``."""
    spec = {"method": method, "config": model.config, "state_dict": model.state_dict(),
            "scene": scene, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.pt")
        torch.save(spec, path)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
            "PYTHONPATH")])), PYTHONWARNINGS="ignore")
        done = subprocess.run([sys.executable, "-m", "fcnfast.hsi._memprobe", path], env=env,
                              capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError("memory probe for %s failed: %s" % (method, done.stderr[-2000:]))
    return float(json.loads(done.stdout.strip().splitlines()[-1])["extra_peak_mb"])


def run_experiment(cube: np.ndarray, gt: np.ndarray, args, log=print) -> Dict:
    """All seeds; returns per-seed records plus the seed-0 predictions and masks."""
    k = int(gt.max())
    bands = cube.shape[2]
    scene = torch.from_numpy(np.ascontiguousarray(cube.transpose(2, 0, 1)))
    radius = args.window // 2
    records: List[Dict] = []
    first = {}
    for seed in range(args.seeds):
        train, test = _split(gt, args, seed, radius)
        target = torch.from_numpy(np.where(train, gt - 1, IGNORE))
        rec = {"seed": seed, "train_pixels": int(train.sum()), "test_pixels": int(test.sum())}

        torch.manual_seed(seed)
        patch = PatchCNN(bands, k, args.window, width=args.width)
        _, rec["patch_train_s"] = engine.timed(engine.train_patch_cnn, patch, scene, target,
                                               args.epochs, seed=seed)
        engine.predict_patches(patch, scene[:, :24, :24].contiguous())  # warm-up
        logits_patch, rec["patch_infer_s"] = engine.timed(engine.predict_patches, patch, scene)
        engine.predict_dense(patch, scene[:, :24, :24].contiguous())
        logits_dense, rec["dense_infer_s"] = engine.timed(engine.predict_dense, patch, scene)
        rec["dense_train_s"] = rec["patch_train_s"]
        rec["dense_agreement"] = float((logits_dense.argmax(0) == logits_patch.argmax(0))
                                       .double().mean())
        rec["dense_max_abs_logit_diff"] = float((logits_dense - logits_patch).abs().max())

        torch.manual_seed(seed)
        fcn = HSIFCN(bands, k, width=args.width)
        _, rec["fcn_train_s"] = engine.timed(engine.train_fcn, fcn, scene, target, args.fcn_steps,
                                             seed=seed)
        engine.predict_fcn(fcn, scene[:, :24, :24].contiguous())
        logits_fcn, rec["fcn_infer_s"] = engine.timed(engine.predict_fcn, fcn, scene)

        for name, logits in (("patch", logits_patch), ("dense", logits_dense), ("fcn", logits_fcn)):
            s = _scores(logits, gt, test, k)
            if seed == 0:
                first[name] = s.pop("prediction")
            else:
                s.pop("prediction")
            rec[name] = s
        records.append(rec)
        log("seed %d: train %d / test %d px | OA patch %.4f  dense %.4f  fcn %.4f | infer patch %.2fs "
            "dense %.3fs fcn %.3fs | dense agrees on %.4f%% of pixels (max |dlogit| %.2g)"
            % (seed, rec["train_pixels"], rec["test_pixels"], rec["patch"]["overall_accuracy"],
               rec["dense"]["overall_accuracy"], rec["fcn"]["overall_accuracy"], rec["patch_infer_s"],
               rec["dense_infer_s"], rec["fcn_infer_s"], 100 * rec["dense_agreement"],
               rec["dense_max_abs_logit_diff"]))
        if seed == 0:
            first.update(train=train, test=test, models={"patch": patch, "dense": patch, "fcn": fcn})

    memory = {}
    if not args.no_memory:
        for name in METHODS:
            memory[name] = _peak_memory(name, first["models"][name], scene)
    fcn_rf = receptive_field(HSIFCN(bands, k, width=args.width), bands)
    h, w = gt.shape
    return {"records": records, "first": first, "memory": memory, "k": k,
            "receptive_field": {"patch": (args.window, args.window),
                                "dense": (args.window, args.window), "fcn": fcn_rf},
            "storage_bytes": {"patch": h * w * args.window ** 2 * bands * 4,
                              "dense": h * w * bands * 4, "fcn": h * w * bands * 4}}


def _ms(values, scale=1.0, fmt="%.2f") -> str:
    v = np.asarray(values, dtype=np.float64) * scale
    return (fmt + " ± " + fmt) % (v.mean(), v.std(ddof=1) if v.size > 1 else 0.0)


def _table(result: Dict) -> str:
    recs = result["records"]
    patch_time = np.array([r["patch_infer_s"] for r in recs])
    lines = ["| method | receptive field | OA (%) | AA (%) | kappa | train (s) | full-scene "
             "inference (s) | inference speed-up vs patch by patch | peak extra memory, inference "
             "(MiB) | input storage (MiB) |", "|" + "---|" * 10]
    for m in METHODS:
        rf = result["receptive_field"][m]
        mem = result["memory"].get(m)
        lines.append("| %s | %dx%d | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            NAMES[m], rf[0], rf[1],
            _ms([r[m]["overall_accuracy"] for r in recs], 100),
            _ms([r[m]["average_accuracy"] for r in recs], 100),
            _ms([r[m]["kappa"] for r in recs], 1, "%.4f"),
            _ms([r[m + "_train_s"] for r in recs], 1, "%.1f") + (" (same net)" if m == "dense" else ""),
            _ms([r[m + "_infer_s"] for r in recs], 1, "%.3f"),
            _ms(patch_time / np.array([r[m + "_infer_s"] for r in recs]), 1, "%.1f") + "x",
            "%.0f" % mem if mem is not None else "not measured",
            "%.1f%s" % (result["storage_bytes"][m] / 2 ** 20,
                        " (all w x w patches)" if m == "patch" else " (the cube)")))
    return "\n".join(lines)


def _per_class_table(result: Dict) -> str:
    recs = result["records"]
    lines = ["| class | " + " | ".join(NAMES[m] for m in ("patch", "fcn")) + " |", "|---|---|---|"]
    for c in range(result["k"]):
        cells = []
        for m in ("patch", "fcn"):
            vals = [r[m]["per_class_accuracy"][c] for r in recs]
            cells.append("n/a" if np.all(np.isnan(vals)) else _ms(np.array(vals)[~np.isnan(vals)], 100))
        lines.append("| %d | %s |" % (c + 1, " | ".join(cells)))
    return "\n".join(lines)


def _palette(k: int) -> np.ndarray:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    colors = [(0, 0, 0)] + [tuple(int(255 * v) for v in cmap(i % 20)[:3]) for i in range(k)]
    return np.array(colors, dtype=np.uint8)


def save_class_map(labels: np.ndarray, path: str, k: int) -> None:
    """PNG of a 0..K label map (0 black, classes in tab20 colours)."""
    from PIL import Image

    Image.fromarray(_palette(k)[labels]).save(path)


def _write_outputs(result: Dict, gt: np.ndarray, out: str) -> Dict[str, str]:
    from PIL import Image

    os.makedirs(out, exist_ok=True)
    k = result["k"]
    first = result["first"]
    files = {"ground truth": "gt.png", "split": "split.png", "patch": "pred_patch_cnn.png",
             "dense": "pred_patch_cnn_dense.png", "fcn": "pred_fcn.png",
             "side by side": "comparison.png"}
    save_class_map(gt, os.path.join(out, files["ground truth"]), k)
    split = np.zeros(gt.shape + (3,), dtype=np.uint8)
    split[first["test"]] = (90, 90, 200)
    split[first["train"]] = (255, 200, 0)
    Image.fromarray(split).save(os.path.join(out, files["split"]))
    maps = [_palette(k)[gt], split]
    for m in METHODS:
        labels = first[m] + 1
        save_class_map(labels, os.path.join(out, files[m]), k)
        if m != "dense":
            maps.append(_palette(k)[labels])
    gap = np.full((gt.shape[0], 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for im in maps for part in (im, gap)][:-1], axis=1)
    Image.fromarray(row).save(os.path.join(out, files["side by side"]))
    return files


def _report(result: Dict, args, header: List[str], files: Dict[str, str]) -> str:
    recs = result["records"]
    agree = min(r["dense_agreement"] for r in recs)
    diff = max(r["dense_max_abs_logit_diff"] for r in recs)
    speed_dense = np.mean([r["patch_infer_s"] / r["dense_infer_s"] for r in recs])
    speed_fcn = np.mean([r["patch_infer_s"] / r["fcn_infer_s"] for r in recs])
    lines = header + ["", _table(result), "",
                      "- Convolutionalized patch CNN vs patch by patch: identical predictions on "
                      "%.4f%% of all pixels (worst seed), max |logit difference| %.2g; %.1fx faster."
                      % (100 * agree, diff, speed_dense),
                      "- FCN full-scene inference is %.1fx faster than the patch CNN patch by patch."
                      % speed_fcn,
                      "- Peak memory: growth of the resident high-water mark (ru_maxrss) during one "
                      "inference in a fresh process (fcnfast.hsi._memprobe). Input storage for the "
                      "patch method = pixels x w x w x bands x 4 bytes (the patches the patch method "
                      "stores when materialised; here they are gathered batch by batch).",
                      "- Receptive fields are measured (gradient support of one output pixel).",
                      "- Times are wall-clock on a shared CPU (torch threads: %d); noisy."
                      % torch.get_num_threads(), "",
                      "Per-class test accuracy (%, mean ± std over seeds):", "",
                      _per_class_table(result), "",
                      "Class maps (seed 0): " + ", ".join("%s: %s" % kv for kv in files.items())]
    return "\n".join(lines)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    try:
        cube, gt, source = _load_scene(args)
    except (OSError, ValueError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    header = ["# fcnfast hsi", "",
              "- scene: %s: %s" % (source, describe_scene(cube, gt)),
              "- split: %s, train fraction %g%s; seeds %d (split + init); normalization %s"
              % (args.split, args.train_fraction,
                 (", block %d, buffer %d px" % (args.block, args.window // 2 if args.buffer is None
                                                else args.buffer)) if args.split == "block" else "",
                 args.seeds, args.normalization),
              "- patch CNN: w=%d, %d epochs; FCN: %d steps; width %d"
              % (args.window, args.epochs, args.fcn_steps, args.width)]
    print("\n".join(header), flush=True)
    start = time.perf_counter()
    try:
        result = run_experiment(cube, gt, args, log=lambda s: print(s, flush=True))
    except ValueError as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    files = _write_outputs(result, gt, args.out)
    header.append("- total run time %.0f s" % (time.perf_counter() - start))
    report = _report(result, args, header, files)
    print()
    print(report[len("\n".join(header[:-1])):].lstrip("\n"))
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report + "\n")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"records": result["records"], "memory_mib": result["memory"],
                   "receptive_field": result["receptive_field"],
                   "storage_bytes": result["storage_bytes"], "args": vars(args) | {"func": None}},
                  f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcnfast hsi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
