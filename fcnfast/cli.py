"""The ``fcnfast`` command line: demo, train, eval, predict, info (+ hsi, bench when present).

Expected failures (bad arguments, missing or unreadable files) print one line
``fcnfast: error: ...`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

MODELS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
BACKBONES = ("tiny", "small", "vgg16")

# modules that may add their own subcommand through register_cli(subparsers)
_PLUGINS = ("fcnfast.hsi", "fcnfast.bench", "fcnfast.finetune", "fcnfast.export")


class _Parser(argparse.ArgumentParser):
    """argparse with fcnfast's error format: one line ``fcnfast: error: ...``, exit status 2
    (the subcommand parsers, plugins' included, are of this class too)."""

    def error(self, message):
        command = self.prog.split()[1:] if self.prog.startswith("fcnfast") else []
        hint = "fcnfast %s--help" % ("".join(c + " " for c in command))
        self.exit(
            2,
            "fcnfast: error: %s%s (see %s)\n"
            % ("%s: " % " ".join(command) if command else "", " ".join(message.split()), hint),
        )


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default (also of options without a help text, and not
    twice where the text already names it); descriptions keep their own line breaks."""

    def _format_action(self, action):
        if (
            action.help is None
            and action.option_strings
            and action.default not in (None, argparse.SUPPRESS)
        ):
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False  # (0 == False: not "in")
        if "default" in text.lower() or unset or action.default == argparse.SUPPRESS:
            return text  # already stated, or nothing worth stating (an unset option / a flag)
        return super()._get_help_string(action)


class UsageError(Exception):
    """An expected, user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------
# argument types
# ---------------------------------------------------------------------------


def _number(kind, minimum, strict: bool):
    """argparse type: a finite ``kind`` > minimum (strict) or >= minimum."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                "expected %s, got %r" % (kind.__name__, text)
            ) from None
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError(
                "must be %s %s, got %r" % (">" if strict else ">=", minimum, text)
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


pos_int, pos_float = _number(int, 0, True), _number(float, 0, True)
nonneg_int, nonneg_float = _number(int, 0, False), _number(float, 0, False)


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fcnfast", description="Fully convolutional networks (FCN) with fast native kernels."
    )
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser._fcnfast_sub = sub
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    p = sub.add_parser(
        "info",
        formatter_class=HelpFormatter,
        help="version, backend and how the extension was built",
    )
    p.add_argument("--json", action="store_true", help="print the build info as JSON")
    p.set_defaults(func=cmd_info)
    _add_plugins(sub)
    return parser


def _add_demo(sub) -> None:
    from .demo import DEMO_DEFAULTS as d

    p = sub.add_parser(
        "demo",
        formatter_class=HelpFormatter,
        help="train a small FCN-8s on synthetic scenes on the CPU, "
        "evaluate it and time fcnfast's kernels against the reference ops",
    )
    p.add_argument(
        "--out",
        default="demo_out",
        help="output directory; an earlier demo's output there is replaced, another "
        "run is not (see --overwrite)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a train/finetune run found in --out"
    )
    p.add_argument(
        "--epochs", type=pos_int, default=d["epochs"], help="training epochs (default: %(default)s)"
    )
    p.add_argument(
        "--minutes",
        type=pos_float,
        default=d["minutes"],
        help="stop training after this many minutes (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="default: %(default)s")
    p.add_argument(
        "--images",
        type=pos_int,
        default=d["train_images"],
        help="synthetic training images (default: %(default)s)",
    )
    p.add_argument(
        "--val-images",
        type=pos_int,
        default=d["val_images"],
        help="synthetic validation images (default: %(default)s)",
    )
    p.add_argument(
        "--size",
        type=pos_int,
        default=d["image_size"],
        help="image side in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=pos_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument("--no-timing", action="store_true", help="skip the native-vs-reference timing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def _add_train(sub) -> None:
    p = sub.add_parser("train", formatter_class=HelpFormatter, help="train an FCN")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (default) or a VOC-format directory (JPEGImages/, "
        "SegmentationClass/, ImageSets/Segmentation/)",
    )
    p.add_argument(
        "--num-classes",
        type=pos_int,
        default=21,
        help="classes including background (default: %(default)s)",
    )
    p.add_argument(
        "--image-size", type=pos_int, default=64, help="synthetic image side (default: %(default)s)"
    )
    p.add_argument("--model", choices=MODELS, default="fcn8s")
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        default="tiny",
        help="vgg16 is the paper's network; tiny/small are width-reduced for CPUs",
    )
    p.add_argument(
        "--fixed-upsampling",
        action="store_true",
        help="freeze the final upsampling to bilinear (fused upsample+loss kernel)",
    )
    p.add_argument(
        "--dropout",
        type=nonneg_float,
        default=0.5,
        help="fc6/fc7 dropout probability (default: %(default)s, as the paper)",
    )
    p.add_argument("--epochs", type=pos_int, default=1)
    p.add_argument(
        "--batch-size",
        type=pos_int,
        default=None,
        help="per process; default: the optimizer preset's (4; caffe: 1)",
    )
    p.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "caffe"),
        default="sgd",
        help="caffe = the FCN paper's SGD recipe: lr 1e-10, momentum 0.99, "
        "weight decay 5e-4, batch 1, summed loss",
    )
    p.add_argument("--lr", type=pos_float, default=None, help="default: the preset's")
    p.add_argument("--momentum", type=nonneg_float, default=None)
    p.add_argument("--weight-decay", type=nonneg_float, default=None)
    p.add_argument(
        "--loss",
        choices=("mean", "sum"),
        default=None,
        help="mean over labelled pixels, or Caffe's unnormalised sum",
    )
    p.add_argument("--train-images", type=pos_int, default=64, help="synthetic training images")
    p.add_argument("--val-images", type=nonneg_int, default=16, help="synthetic validation images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default="runs/train",
        help="directory for checkpoint.pt and history.jsonl (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue from a checkpoint; settings given together with it must match "
        "the checkpoint, except the safe ones (epochs, lr, max-steps, save-every, "
        "device, num-workers, no-validate, quiet, out), which are applied",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run (checkpoint.pt, history.jsonl) already in --out; "
        "without it (or --resume) such a directory is refused",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--num-workers", type=nonneg_int, default=0)
    p.add_argument("--save-every", type=nonneg_int, default=0, help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=pos_int, default=None)
    p.add_argument("--no-validate", action="store_true", help="skip the per-epoch validation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        formatter_class=HelpFormatter,
        help="the FCN paper's four metrics of a checkpoint or shipped model",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of fcnfast train")
    which.add_argument(
        "--model",
        metavar="NAME",
        help="a model shipped with fcnfast, e.g. fcn8s_lite0_camvid (needs --data)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="'synthetic' or a dataset directory: VOC, list-file (<split>.txt, e.g. "
        "CamVid) or images/ + labels/ (default: the checkpoint's data)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="split (default: the checkpoint's val split; 'val' with --model)",
    )
    p.add_argument("--batch-size", type=pos_int, default=1)
    p.add_argument("--crf", action="store_true", help="also score dense-CRF-refined labels")
    p.add_argument("--confusion", metavar="PNG", default=None, help="save a confusion-matrix plot")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--json",
        action="store_true",
        help="print only the scores, as JSON, on stdout (other messages: stderr)",
    )
    _add_tiling(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _add_tiling(p) -> None:
    p.add_argument(
        "--tile",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="run the network tile by tile (N x N cores plus the receptive-field "
        "halo; labels equal to the whole-image pass); 0: never; default: "
        "tiles of %d (%d for the Lite0 models) for images above %d pixels" % (_tiling_defaults()),
    )


def _tiling_defaults():
    from .models.lite_fcn import LiteFCN
    from .tiling import AUTO_TILE_PIXELS, DEFAULT_TILE

    return DEFAULT_TILE, LiteFCN.preferred_tile, AUTO_TILE_PIXELS


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        formatter_class=HelpFormatter,
        help="label maps of images (one file, several files or a folder)",
    )
    p.add_argument(
        "image",
        nargs="+",
        help="input image(s) or a folder of images (PNG, JPEG, TIFF, BMP ...; 8/16-bit "
        "grey, RGB, RGBA, palette)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="LABELS",
        help="label map file for one image (format from the extension, lossless: "
        ".png .tif .tiff .bmp .gif); a folder (created) for several images or a "
        "folder, which receives <name>.png per image",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of fcnfast train")
    which.add_argument(
        "--model", metavar="NAME", help="a model shipped with fcnfast, e.g. fcn8s_lite0_camvid"
    )
    p.add_argument(
        "--overlay",
        metavar="IMG",
        default=None,
        help="also write the image blended with the label colours and a class legend "
        "(any format by extension, JPEG allowed); a folder with several inputs",
    )
    p.add_argument(
        "--alpha",
        choices=("black", "error"),
        default="black",
        help="images with an alpha channel: composite on black, or refuse them",
    )
    p.add_argument(
        "--crf",
        action="store_true",
        help="refine with the dense CRF (per tile when tiled: an approximation)",
    )
    _add_tiling(p)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_plugins(sub) -> None:
    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # the optional module is not part of this installation
            print("fcnfast: warning: %s unavailable: %s" % (name, exc), file=sys.stderr)
            continue
        except Exception as exc:  # a broken plugin must not take the other commands down
            print("fcnfast: warning: %s unavailable: %s" % (name, exc), file=sys.stderr)
            continue
        register = getattr(module, "register_cli", None)
        if callable(register):
            register(sub)


# ---------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------


def cmd_info(args) -> int:
    import fcnfast

    info = fcnfast.build_info()
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        print("%-*s  %s" % (width, key, value))
    return 0


def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        data=args.data,
        model=args.model,
        backbone=args.backbone,
        num_classes=args.num_classes,
        fixed_upsampling=args.fixed_upsampling,
        dropout=args.dropout,
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        loss=args.loss,
        seed=args.seed,
        train_images=args.train_images,
        val_images=args.val_images,
        image_size=args.image_size,
        data_seed=args.data_seed,
        out=args.out,
        device=args.device,
        num_workers=args.num_workers,
        save_every=args.save_every,
        max_steps=args.max_steps,
        validate=not args.no_validate,
        quiet=args.quiet,
    )
    from .train import existing_run, load_checkpoint, resume_conflicts
    from .training.distributed import pick_device

    pick_device(args.device)  # a bad --device fails now, not after loading the data
    if args.resume is not None and "out" not in getattr(args, "_explicit", set()):
        args.out = cfg.out = str(Path(args.resume).parent)  # continue the run where it lives
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError("--out %s exists and is not a directory" % out)
    held = existing_run(out)
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume)  # missing / corrupt / not ours: one line, now
        explicit = getattr(args, "_explicit", set())
        requested = {
            dest: getattr(args, dest) for dest in explicit if dest in _TRAIN_EXPERIMENT_ARGS
        }
        requested = {_TRAIN_EXPERIMENT_ARGS[d]: v for d, v in requested.items()}
        conflicts = resume_conflicts(ckpt["config"], requested)
        if conflicts:
            raise UsageError(
                "--resume %s: settings differ from the checkpoint (only epochs, lr, "
                "max-steps, save-every, device, num-workers, no-validate, quiet and "
                "out may change): %s" % (args.resume, "; ".join(conflicts))
            )
        same_run = out.resolve() == Path(args.resume).resolve().parent
        if held and not same_run and not args.overwrite:
            raise UsageError(
                "--out %s already holds another run (%s); resume into its own "
                "directory (--out %s), choose a new --out, or pass --overwrite"
                % (out, ", ".join(held), Path(args.resume).parent)
            )
        if args.overwrite and held and not same_run:
            _remove_run(out, held)
    elif held:
        if not args.overwrite:
            raise UsageError(
                "--out %s already holds a run (%s); pass --resume %s to continue "
                "it, --overwrite to replace it, or choose another --out"
                % (out, ", ".join(held), out / "checkpoint.pt")
            )
        _remove_run(out, held)
    result = train(cfg, resume=args.resume)
    if result.checkpoint is not None:
        print("checkpoint: %s  (%.1f s)" % (result.checkpoint, result.seconds))
    return 0


# train options that define the experiment: CLI dest -> TrainConfig field
_TRAIN_EXPERIMENT_ARGS = {
    "data": "data",
    "num_classes": "num_classes",
    "image_size": "image_size",
    "model": "model",
    "backbone": "backbone",
    "fixed_upsampling": "fixed_upsampling",
    "dropout": "dropout",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "lr",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "loss": "loss",
    "train_images": "train_images",
    "val_images": "val_images",
    "data_seed": "data_seed",
    "seed": "seed",
}


def _remove_run(out: Path, names) -> None:
    for name in names:
        (out / name).unlink(missing_ok=True)  # torchrun: every process passes here
    print("fcnfast: --overwrite: removed %s from %s" % (", ".join(names), out), file=sys.stderr)


def _require_crf():
    try:
        importlib.import_module("fcnfast.crf")
    except ImportError as exc:
        raise UsageError(
            "--crf needs the fcnfast.crf module, which is not available (%s)" % exc
        ) from exc


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from .metrics import format_scores, plot_confusion, segmentation_scores
    from .train import (
        TrainConfig,
        check_labels,
        crf_labels,
        evaluate,
        load_model,
        make_dataset,
        pad_collate,
    )
    from .training.distributed import pick_device

    device = pick_device(args.device)
    if args.crf:
        _require_crf()
    if args.model is not None or _is_finetuned(args.checkpoint):
        return _eval_shipped(args)
    model, ckpt = load_model(args.checkpoint, device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if args.data is not None:
        cfg.data = args.data
    if args.split is not None:
        cfg.val_split = args.split
    val_set = make_dataset(cfg, "val")
    if len(val_set) == 0:
        raise ValueError("the evaluation set %s is empty" % cfg.data)
    check_labels(
        val_set,
        cfg.num_classes,
        "evaluation",  # before any work, not mid-way
        source="the checkpoint's model has %d classes" % cfg.num_classes,
    )
    loader = DataLoader(val_set, batch_size=args.batch_size, collate_fn=pad_collate)
    out = evaluate(
        model,
        loader,
        cfg.num_classes,
        device,
        progress=not args.quiet,
        crf=crf_labels if args.crf else None,
        tile=args.tile,
    )
    conf, conf_crf = out if args.crf else (out, None)
    scores = {"fcn": segmentation_scores(conf)}
    if conf_crf is not None:
        scores["fcn+crf"] = segmentation_scores(conf_crf)
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        print(
            "%s on %s (%d images, %d classes)"
            % (args.checkpoint, cfg.data, len(val_set), cfg.num_classes)
        )
        for name, s in scores.items():
            print(format_scores(s, prefix="%-8s " % name))
    if args.confusion:
        plot_confusion(conf, args.confusion, _class_names(cfg.num_classes))
        # with --json stdout holds only the JSON document
        print("confusion matrix: %s" % args.confusion, file=sys.stderr if args.json else sys.stdout)
    return 0


def _eval_shipped(args) -> int:
    """``fcnfast eval --model NAME --data DIR`` (or a finetune checkpoint): a Lite0 FCN, uint8 input."""
    from .data.layouts import open_segmentation
    from .finetune import evaluate_lite, iou_table
    from .metrics import format_scores

    if args.data is None:
        raise UsageError("--model needs --data (the dataset directory to evaluate on)")
    model = _lite_model(args, "cpu")
    name = args.model or args.checkpoint
    dataset = open_segmentation(args.data, args.split or "val", num_classes=model.num_classes)
    result = evaluate_lite(
        model, dataset, model.num_classes, crf=args.crf, progress=not args.quiet, tile=args.tile
    )
    scores = {"fcn": result["scores"]}
    if args.crf:
        scores["fcn+crf"] = result["scores_crf"]
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        print(
            "%s on %s (%d images, %d classes)" % (name, args.data, len(dataset), model.num_classes)
        )
        print(iou_table(result["confusion"], model.class_names))
        for name, s in scores.items():
            print(format_scores(s, prefix="%-8s " % name))
    return 0


def _is_finetuned(checkpoint) -> bool:
    if checkpoint is None:
        return False
    from .finetune import is_finetune_checkpoint

    return is_finetune_checkpoint(checkpoint)


def _lite_model(args, device):
    """The shipped model ``--model NAME`` or the Lite0 FCN of a finetune ``--checkpoint``."""
    if args.model is not None:
        from .models.pretrained import pretrained

        return pretrained(args.model, device)
    from .finetune import load_finetuned

    return load_finetuned(args.checkpoint, device)


IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".gif",
    ".webp",
    ".ppm",
    ".pgm",
    ".pnm",
)


def _predict_inputs(items):
    """(list of input files, several?) from predict's positional arguments."""
    if len(items) == 1 and Path(items[0]).is_dir():
        folder = Path(items[0])
        files = sorted(
            f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise FileNotFoundError(
                "no images (%s) in folder %s" % (" ".join(IMAGE_EXTENSIONS), folder)
            )
        return files, True
    files = [Path(item) for item in items]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError("image file not found: %s" % f)
    return files, len(files) > 1


def _output_folder(path: Path, option: str) -> Path:
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            "%s %s: several inputs need an output folder, and this is a file" % (option, path)
        )
    if not path.parent.is_dir():
        raise FileNotFoundError("%s %s: its parent directory does not exist" % (option, path))
    return path


def cmd_predict(args) -> int:
    from .data.images import image_format_for, label_format_for
    from .training.distributed import pick_device

    device = pick_device(args.device)
    if args.crf:
        _require_crf()
    inputs, several = _predict_inputs(args.image)
    jobs = []  # (input, labels path, overlay path or None)
    if several:
        out_dir = _output_folder(Path(args.output), "-o/--output")
        over_dir = _output_folder(Path(args.overlay), "--overlay") if args.overlay else None
        seen = {}
        for f in inputs:
            if f.stem in seen:
                raise ValueError(
                    "inputs %s and %s would both write %s.png" % (seen[f.stem], f, out_dir / f.stem)
                )
            seen[f.stem] = f
            jobs.append(
                (
                    f,
                    out_dir / (f.stem + ".png"),
                    over_dir / (f.stem + "_overlay.png") if over_dir else None,
                )
            )
    else:
        output = Path(args.output)
        if output.is_dir():
            raise IsADirectoryError(
                "-o/--output %s is a folder; give a file name such as %s"
                % (output, output / (inputs[0].stem + ".png"))
            )
        label_format_for(output)
        if args.overlay:
            image_format_for(args.overlay, "--overlay")
        for path in (output, Path(args.overlay) if args.overlay else None):
            if path is not None and not path.parent.is_dir():
                raise FileNotFoundError("output directory does not exist: %s" % path.parent)
        jobs.append((inputs[0], output, Path(args.overlay) if args.overlay else None))
    model, lite = _predict_model(args, device)
    if several:
        Path(args.output).mkdir(exist_ok=True)
        if args.overlay:
            Path(args.overlay).mkdir(exist_ok=True)
    for image_path, output, overlay in jobs:
        _predict_one(args, model, lite, device, image_path, output, overlay)
    if several:
        print("%d label maps -> %s" % (len(jobs), args.output))
    return 0


def _predict_model(args, device):
    from .train import load_model

    lite = args.model is not None or _is_finetuned(args.checkpoint)
    if lite:
        return _lite_model(args, device), True
    return load_model(args.checkpoint, device)[0], False


def _label_counts(labels, num_classes: int):
    """Pixels per class of a uint8 label map, counted in row bands (no int64 copy of the map)."""
    import numpy as np
    import torch

    counts = np.zeros(max(256, num_classes), dtype=np.int64)
    rows = max(1, (1 << 22) // max(1, labels.shape[1]))
    for y in range(0, labels.shape[0], rows):
        counts += np.bincount(labels[y : y + rows].ravel(), minlength=counts.size)
    return torch.from_numpy(counts)


def _predict_one(args, model, lite, device, image_path, output, overlay) -> None:
    import numpy as np
    import torch

    from .data import image_to_tensor, load_image, save_label_png
    from .data.images import image_format_for

    image = load_image(image_path, alpha=args.alpha)
    height, width = image.shape[:2]
    palette = class_names = None
    if lite:
        palette, class_names = model.palette, model.class_names
    from .tiling import tile_for

    tile = tile_for(model, height, width, args.tile)
    progress = not args.quiet
    if tile:
        from .tiling import tiled_labels

        def window(y0, y1, x0, x1):  # what model.predict takes: uint8 RGB for the Lite0 models
            if lite:
                return (
                    torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1]))
                    .permute(2, 0, 1)
                    .unsqueeze(0)
                    .to(device)
                )
            return image_to_tensor(image[y0:y1, x0:x1]).unsqueeze(0).to(device)

        refine = None
        if args.crf:
            from . import crf

            def refine(logits, y0, y1, x0, x1):
                raw = (
                    torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1]))
                    .permute(2, 0, 1)
                    .unsqueeze(0)
                    .to(device)
                )
                return crf.dense_crf(logits, raw).argmax(1)[0]

        labels = torch.from_numpy(
            tiled_labels(
                model,
                height,
                width,
                window,
                tile=tile,
                crf=refine,
                progress=progress,
                desc=image_path.name,
            )
        )
    else:
        raw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).to(device)
        x = model.preprocess(raw) if lite else image_to_tensor(image).unsqueeze(0).to(device)
        with torch.no_grad():
            if args.crf:
                from . import crf

                labels = crf.dense_crf(model(x), raw).argmax(1)[0]
            elif lite:
                labels = model.predict(raw)[0]
            else:
                labels = model.predict(x)[0]
        del x, raw
        labels = labels.cpu().to(torch.uint8)
    save_label_png(labels, output, palette=palette)
    names = list(
        class_names or _class_names(model.num_classes) or [str(c) for c in range(model.num_classes)]
    )
    counts = _label_counts(labels.numpy(), model.num_classes)
    present = ", ".join(
        "%s %.1f%%" % (names[c] if c < len(names) else str(c), 100.0 * n / labels.numel())
        for c, n in enumerate(counts.tolist())
        if n
    )
    print(
        "%s: %dx%d labels -> %s%s  (%s)"
        % (image_path, width, height, output, "  [tiles of %d]" % tile if tile else "", present)
    )
    if overlay is not None:
        from .visualize import overlay_with_legend

        picture = overlay_with_legend(image, labels.numpy(), palette, names)
        picture.save(overlay, format=image_format_for(overlay, "--overlay"))
        print("overlay: %s" % overlay)


def cmd_demo(args) -> int:
    from .demo import claim_demo_dir, run_demo

    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be >= 1, got %d" % args.threads)
    try:
        claim_demo_dir(Path(args.out), args.overwrite)  # before any work
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    run_demo(
        out=args.out,
        epochs=args.epochs,
        minutes=args.minutes,
        seed=args.seed,
        train_images=args.images,
        val_images=args.val_images,
        image_size=args.size,
        threads=args.threads,
        timing=not args.no_timing,
        quiet=args.quiet,
        overwrite=args.overwrite,
    )
    return 0


def _class_names(num_classes: int):
    from .data import VOC_CLASSES

    return list(VOC_CLASSES) if num_classes == len(VOC_CLASSES) else None


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str], command) -> set:
    """The ``dest`` of every option of subcommand ``command`` that ``argv`` gives explicitly
    (so ``--resume`` can tell "--model fcn8s" from the default fcn8s)."""
    sub = getattr(parser, "_fcnfast_sub", None)
    subparser = sub.choices.get(command) if sub is not None else None
    if subparser is None:
        return set()
    options = subparser._option_string_actions
    found = set()
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        name = token.split("=", 1)[0]
        action = options.get(name)
        if action is None and name.startswith("--"):
            matches = {options[o] for o in options if o.startswith(name)}
            action = matches.pop() if len(matches) == 1 else None
        if action is not None:
            found.add(action.dest)
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._explicit = _explicit_dests(parser, argv, getattr(args, "command", None))
    try:
        return int(args.func(args) or 0)
    except (
        UsageError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        ValueError,
    ) as exc:
        print("fcnfast: error: %s" % _one_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcnfast: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen failure: still one line (exit 1)
        if os.environ.get("FCNFAST_DEBUG"):
            raise
        print(
            "fcnfast: error: %s: %s (FCNFAST_DEBUG=1 shows the traceback)"
            % (type(exc).__name__, _one_line(exc)),
            file=sys.stderr,
        )
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
