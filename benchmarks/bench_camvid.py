"""CamVid model: validation accuracy (with and without dense CRF) and inference speed.

    python benchmarks/bench_camvid.py --data ../shared/data/camvid --accuracy --speed \
        --markdown benchmarks/results/camvid_measured.md --figure benchmarks/results/camvid.png

--accuracy  mean IoU, per-class IoU, pixel accuracy over the val split of the shipped
            ``fcn8s_lite0_camvid`` (or ``--checkpoint`` of ``fcnfast finetune``), without and
            with ``fcnfast.crf.dense_crf`` refinement.
--speed     per-image inference (``model.predict`` on one 480x360 uint8 image, label map
            out) in fresh processes, one per configuration: fcnfast's native ops vs the same
            model under ``fcnfast.use_backend("reference")``, each in fp32 and under bf16
            autocast; first call, median and p99 of ``--calls`` calls, images/s, and the
            process's peak RSS (VmHWM).
--train-step  one training step (forward, backward, AdamW; batch 8 of 288x384 crops, the
            recipe's) in fp32 and under bf16 autocast, interleaved in one process: median of
            --calls steps each.
--figure    input / ground truth / prediction / prediction + CRF for 3 val images.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common  # benchmarks/_common.py: the machine line
import torch


def load(checkpoint=None):
    from fcnfast.models import pretrained
    from fcnfast.models.lite_fcn import LiteFCN

    if checkpoint is None:
        return pretrained("fcn8s_lite0_camvid")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["model_config"]
    model = LiteFCN(cfg["variant"], cfg["num_classes"], class_names=cfg["class_names"])
    model.load_state_dict(state["model"])
    return model.eval()


def accuracy(args) -> dict:
    from fcnfast.data.layouts import CamVid
    from fcnfast.finetune import evaluate_lite, iou_table

    model = load(args.checkpoint)
    val = CamVid(args.data, "val")
    t0 = time.time()
    result = evaluate_lite(model, val, 11, crf=args.crf, progress=True)
    out = {
        "images": len(val),
        "seconds": round(time.time() - t0, 1),
        "fcn": result["scores"],
        "table": iou_table(result["confusion"], val.class_names),
    }
    if args.crf:
        out["fcn+crf"] = result["scores_crf"]
        out["table_crf"] = iou_table(result["confusion_crf"], val.class_names)
    return out


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def speed_child(args) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    import fcnfast
    from fcnfast.data.layouts import CamVid

    torch.set_num_threads(args.threads)
    model = load(args.checkpoint)
    image = CamVid(args.data, "val")[0][0][None]
    times = []
    context = fcnfast.use_backend("reference") if args.backend == "reference" else _null()
    with context:
        for _ in range(args.calls):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                model.predict(image)
            times.append(time.perf_counter() - t)
    steady = sorted(times[1:])
    p99 = steady[min(len(steady) - 1, int(round(0.99 * (len(steady) - 1))))]
    print(
        json.dumps(
            {
                "backend": args.backend,
                "bf16": args.bf16,
                "first_ms": times[0] * 1e3,
                "median_ms": statistics.median(steady) * 1e3,
                "p99_ms": p99 * 1e3,
                "images_per_s": 1.0 / statistics.median(steady),
                "peak_rss_mb": _peak_rss_mb(),
            }
        )
    )


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def speed(args) -> list:
    rows = []
    for backend in ("native", "reference"):
        for bf16 in (False, True):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--backend",
                backend,
                "--data",
                args.data,
                "--threads",
                str(args.threads),
                "--calls",
                str(args.calls),
            ]
            if bf16:
                cmd.append("--bf16")
            if args.checkpoint:
                cmd += ["--checkpoint", args.checkpoint]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    return rows


def train_step(args) -> dict:
    import torch.nn.functional as F

    from fcnfast.models.lite_fcn import LiteFCN

    model = LiteFCN("fcn8s", 11).train()
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 288, 384), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 11, (8, 288, 384), generator=g)
    times = {False: [], True: []}
    for _ in range(args.calls):
        for bf16 in (False, True):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(model.preprocess(images))
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[bf16].append(time.perf_counter() - t)
    out = {("bf16" if k else "fp32"): statistics.median(v[1:]) for k, v in times.items()}
    print(
        "training step (batch 8, 288x384): fp32 %.2f s, bf16 autocast %.2f s"
        % (out["fp32"], out["bf16"])
    )
    return out


def figure(args, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Patch

    from fcnfast.crf import dense_crf
    from fcnfast.data.layouts import CAMVID_PALETTE, CamVid
    from fcnfast.visualize import colorize

    model = load(args.checkpoint)
    val = CamVid(args.data, "val")
    picks = (3, 40, 77)
    fig, axes = plt.subplots(len(picks), 4, figsize=(16, 3.3 * len(picks)))
    for row, index in enumerate(picks):
        image, label = val[index]
        with torch.no_grad():
            logits = model(model.preprocess(image[None]))
        pred = logits.argmax(1)[0].numpy()
        refined = dense_crf(logits[0], image).argmax(0).numpy()
        panels = [
            image.permute(1, 2, 0).numpy(),
            colorize(label.numpy(), CAMVID_PALETTE),
            colorize(pred, CAMVID_PALETTE),
            colorize(refined, CAMVID_PALETTE),
        ]
        titles = [
            "val image %d" % index,
            "ground truth (black: void)",
            "FCN-8s Lite0",
            "FCN-8s Lite0 + dense CRF",
        ]
        for col, (panel, title) in enumerate(zip(panels, titles)):
            axes[row, col].imshow(panel)
            axes[row, col].set_title(title)
            axes[row, col].axis("off")
    handles = [
        Patch(color=np.array(c) / 255, label=n) for c, n in zip(CAMVID_PALETTE, val.class_names)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=11, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=70)


def machine() -> str:
    return _common.machine(", load average %s" % " ".join("%.2f" % v for v in os.getloadavg()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid")
    )
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--accuracy", action="store_true")
    p.add_argument("--crf", action="store_true", help="with --accuracy: also score the CRF")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--train-step", action="store_true")
    p.add_argument("--figure", default=None)
    p.add_argument("--json", default=None, help="write the results as JSON")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=12)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", default="native", help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        speed_child(args)
        return
    torch.set_num_threads(args.threads)
    results = {"machine": machine()}
    if args.accuracy:
        results["accuracy"] = acc = accuracy(args)
        print(acc["table"])
        print({k: v for k, v in acc["fcn"].items() if k != "per_class_iu"})
        if "fcn+crf" in acc:
            print(acc["table_crf"])
            print({k: v for k, v in acc["fcn+crf"].items() if k != "per_class_iu"})
    if args.speed:
        results["speed"] = speed(args)
    if args.train_step:
        results["train_step"] = train_step(args)
    if args.figure:
        figure(args, args.figure)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
