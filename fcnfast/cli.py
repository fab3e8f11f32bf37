"""The ``fcnfast`` command line: demo, train, eval, predict, info (+ hsi, bench when present).

Expected failures (bad arguments, missing or unreadable files) print one line
``fcnfast: error: ...`` on stderr and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

MODELS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce")
BACKBONES = ("tiny", "small", "vgg16")

# modules that may add their own subcommand through register_cli(subparsers)
_PLUGINS = ("fcnfast.hsi", "fcnfast.bench", "fcnfast.finetune", "fcnfast.export")


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
            raise argparse.ArgumentTypeError("expected %s, got %r" % (kind.__name__, text))
        if not math.isfinite(value) or (value <= minimum if strict else value < minimum):
            raise argparse.ArgumentTypeError("must be %s %s, got %r"
                                             % (">" if strict else ">=", minimum, text))
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


pos_int, pos_float = _number(int, 0, True), _number(float, 0, True)
nonneg_int, nonneg_float = _number(int, 0, False), _number(float, 0, False)


# ---------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcnfast",
        description="Fully convolutional networks (FCN) with fast native kernels.")
    parser.add_argument("--version", action="version", version="%(prog)s " + _version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_predict(sub)
    p = sub.add_parser("info", help="version, backend and how the extension was built")
    p.add_argument("--json", action="store_true", help="print the build info as JSON")
    p.set_defaults(func=cmd_info)
    _add_plugins(sub)
    return parser


def _add_demo(sub) -> None:
    from .demo import DEMO_DEFAULTS as d

    p = sub.add_parser("demo", help="train a small FCN-8s on synthetic scenes on the CPU, "
                       "evaluate it and time fcnfast's kernels against the reference ops")
    p.add_argument("--out", default="demo_out", help="output directory (default: ./demo_out)")
    p.add_argument("--epochs", type=pos_int, default=d["epochs"],
                   help="training epochs (default: %(default)s)")
    p.add_argument("--minutes", type=pos_float, default=d["minutes"],
                   help="stop training after this many minutes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="default: %(default)s")
    p.add_argument("--images", type=pos_int, default=d["train_images"],
                   help="synthetic training images (default: %(default)s)")
    p.add_argument("--val-images", type=pos_int, default=d["val_images"],
                   help="synthetic validation images (default: %(default)s)")
    p.add_argument("--size", type=pos_int, default=d["image_size"],
                   help="image side in pixels (default: %(default)s)")
    p.add_argument("--threads", type=pos_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-timing", action="store_true",
                   help="skip the native-vs-reference timing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train an FCN")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (default) or a VOC-format directory (JPEGImages/, "
                        "SegmentationClass/, ImageSets/Segmentation/)")
    p.add_argument("--num-classes", type=pos_int, default=21,
                   help="classes including background (default: %(default)s)")
    p.add_argument("--image-size", type=pos_int, default=64,
                   help="synthetic image side (default: %(default)s)")
    p.add_argument("--model", choices=MODELS, default="fcn8s")
    p.add_argument("--backbone", choices=BACKBONES, default="tiny",
                   help="vgg16 is the paper's network; tiny/small are width-reduced for CPUs")
    p.add_argument("--fixed-upsampling", action="store_true",
                   help="freeze the final upsampling to bilinear (fused upsample+loss kernel)")
    p.add_argument("--dropout", type=nonneg_float, default=0.5,
                   help="fc6/fc7 dropout probability (default: %(default)s, as the paper)")
    p.add_argument("--epochs", type=pos_int, default=1)
    p.add_argument("--batch-size", type=pos_int, default=None,
                   help="per process; default: the optimizer preset's (4; caffe: 1)")
    p.add_argument("--optimizer", choices=("sgd", "adam", "caffe"), default="sgd",
                   help="caffe = the FCN paper's SGD recipe: lr 1e-10, momentum 0.99, "
                        "weight decay 5e-4, batch 1, summed loss")
    p.add_argument("--lr", type=pos_float, default=None, help="default: the preset's")
    p.add_argument("--momentum", type=nonneg_float, default=None)
    p.add_argument("--weight-decay", type=nonneg_float, default=None)
    p.add_argument("--loss", choices=("mean", "sum"), default=None,
                   help="mean over labelled pixels, or Caffe's unnormalised sum")
    p.add_argument("--train-images", type=pos_int, default=64, help="synthetic training images")
    p.add_argument("--val-images", type=nonneg_int, default=16,
                   help="synthetic validation images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/train",
                   help="directory for checkpoint.pt and history.jsonl (default: %(default)s)")
    p.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue from a checkpoint (its model/data/optimizer settings win)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--num-workers", type=nonneg_int, default=0)
    p.add_argument("--save-every", type=nonneg_int, default=0,
                   help="also checkpoint every N steps")
    p.add_argument("--max-steps", type=pos_int, default=None)
    p.add_argument("--no-validate", action="store_true", help="skip the per-epoch validation")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="the FCN paper's four metrics of a checkpoint or shipped model")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of fcnfast train")
    which.add_argument("--model", metavar="NAME",
                       help="a model shipped with fcnfast, e.g. fcn8s_lite0_camvid (needs --data)")
    p.add_argument("--data", default=None,
                   help="'synthetic' or a dataset directory: VOC, list-file (<split>.txt, e.g. "
                        "CamVid) or images/ + labels/ (default: the checkpoint's data)")
    p.add_argument("--split", default=None, help="split (default: the checkpoint's val split; "
                                                 "'val' with --model)")
    p.add_argument("--batch-size", type=pos_int, default=1)
    p.add_argument("--crf", action="store_true", help="also score dense-CRF-refined labels")
    p.add_argument("--confusion", metavar="PNG", default=None,
                   help="save a confusion-matrix plot")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="label map of one image (palette PNG)")
    p.add_argument("image", help="input image (any size, any format Pillow reads)")
    p.add_argument("-o", "--output", required=True, metavar="LABELS.png")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="CKPT", help="a checkpoint of fcnfast train")
    which.add_argument("--model", metavar="NAME",
                       help="a model shipped with fcnfast, e.g. fcn8s_lite0_camvid")
    p.add_argument("--overlay", metavar="PNG", default=None,
                   help="also write the image blended with the label colours and a class legend")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    p.add_argument("--device", default="auto")
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
        data=args.data, model=args.model, backbone=args.backbone,
        num_classes=args.num_classes, fixed_upsampling=args.fixed_upsampling,
        dropout=args.dropout,
        epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, batch_size=args.batch_size, loss=args.loss,
        seed=args.seed, train_images=args.train_images, val_images=args.val_images,
        image_size=args.image_size, data_seed=args.data_seed, out=args.out,
        device=args.device, num_workers=args.num_workers, save_every=args.save_every,
        max_steps=args.max_steps, validate=not args.no_validate, quiet=args.quiet)
    if args.resume is not None and not Path(args.resume).is_file():
        raise FileNotFoundError("checkpoint not found: %s" % args.resume)
    result = train(cfg, resume=args.resume)
    if result.checkpoint is not None:
        print("checkpoint: %s  (%.1f s)" % (result.checkpoint, result.seconds))
    return 0


def _require_crf():
    try:
        importlib.import_module("fcnfast.crf")
    except ImportError as exc:
        raise UsageError("--crf needs the fcnfast.crf module, which is not available (%s)"
                         % exc) from exc


def cmd_eval(args) -> int:
    from torch.utils.data import DataLoader

    from .metrics import format_scores, plot_confusion, segmentation_scores
    from .train import (TrainConfig, _pick_device, crf_labels, evaluate, load_model,
                        make_dataset, pad_collate)

    if args.crf:
        _require_crf()
    if args.model is not None or _is_finetuned(args.checkpoint):
        return _eval_shipped(args)
    device = _pick_device(args.device)
    model, ckpt = load_model(args.checkpoint, device)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if args.data is not None:
        cfg.data = args.data
    if args.split is not None:
        cfg.val_split = args.split
    val_set = make_dataset(cfg, "val")
    if len(val_set) == 0:
        raise ValueError("the evaluation set %s is empty" % cfg.data)
    loader = DataLoader(val_set, batch_size=args.batch_size, collate_fn=pad_collate)
    out = evaluate(model, loader, cfg.num_classes, device, progress=not args.quiet,
                   crf=crf_labels if args.crf else None)
    conf, conf_crf = out if args.crf else (out, None)
    scores = {"fcn": segmentation_scores(conf)}
    if conf_crf is not None:
        scores["fcn+crf"] = segmentation_scores(conf_crf)
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        print("%s on %s (%d images, %d classes)" % (args.checkpoint, cfg.data, len(val_set),
                                                   cfg.num_classes))
        for name, s in scores.items():
            print(format_scores(s, prefix="%-8s " % name))
    if args.confusion:
        plot_confusion(conf, args.confusion, _class_names(cfg.num_classes))
        print("confusion matrix: %s" % args.confusion)
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
    result = evaluate_lite(model, dataset, model.num_classes, crf=args.crf,
                           progress=not args.quiet)
    scores = {"fcn": result["scores"]}
    if args.crf:
        scores["fcn+crf"] = result["scores_crf"]
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        print("%s on %s (%d images, %d classes)" % (name, args.data, len(dataset),
                                                   model.num_classes))
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


def cmd_predict(args) -> int:
    import torch

    from .data import image_to_tensor, load_image, save_label_png
    from .train import _pick_device, load_model

    if args.crf:
        _require_crf()
    output = Path(args.output)
    for path in (output, Path(args.overlay) if args.overlay else None):
        if path is not None and not path.parent.is_dir():
            raise FileNotFoundError("output directory does not exist: %s" % path.parent)
    device = _pick_device(args.device)
    image = load_image(args.image)
    raw = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).to(device)
    palette = class_names = None
    lite = args.model is not None or _is_finetuned(args.checkpoint)
    if lite:
        model = _lite_model(args, device)
        palette, class_names = model.palette, model.class_names
        x = model.preprocess(raw)
    else:
        model, _ = load_model(args.checkpoint, device)
        x = image_to_tensor(image).unsqueeze(0).to(device)
    with torch.no_grad():
        if args.crf:
            from . import crf

            labels = crf.dense_crf(model(x), raw).argmax(1)[0]
        elif lite:
            labels = model.predict(raw)[0]
        else:
            labels = model.predict(x)[0]
    labels = labels.cpu()
    save_label_png(labels, output, palette=palette)
    names = list(class_names or _class_names(model.num_classes)
                 or [str(c) for c in range(model.num_classes)])
    counts = torch.bincount(labels.flatten(), minlength=model.num_classes)
    present = ", ".join("%s %.1f%%" % (names[c], 100.0 * n / labels.numel())
                        for c, n in enumerate(counts.tolist()) if n)
    print("%s: %dx%d labels -> %s  (%s)" % (args.image, labels.shape[1], labels.shape[0], output,
                                           present))
    if args.overlay:
        from .visualize import overlay_with_legend

        overlay_with_legend(image, labels.numpy(), palette, names).save(args.overlay)
        print("overlay: %s" % args.overlay)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, epochs=args.epochs, minutes=args.minutes, seed=args.seed,
             train_images=args.images, val_images=args.val_images, image_size=args.size, threads=args.threads,
             timing=not args.no_timing, quiet=args.quiet)
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

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError) as exc:
        print("fcnfast: error: %s" % _one_line(exc), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fcnfast: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())
