"""Time and peak memory of ``fcnfast predict`` on one big image (issue 16: 8000x8000 in <= 2 GB,
with --crf <= 3 GB).

    python benchmarks/large_images.py --size 8000 [--crf] [--threads 2] [--out DIR]
    python benchmarks/large_images.py --size 8000 --model fcn8s_lite0_camvid [--crf]

Each measured command runs in its own child process; its peak resident set size is the
kernel's ``ru_maxrss`` of that child (getrusage RUSAGE_CHILDREN after it exits, read as a
difference is impossible, so every measurement uses a fresh helper process: this script
re-runs itself with ``--child``). The image is a synthetic JPEG (random blocks and noise),
the model a tiny-backbone FCN-8s checkpoint trained for one step (the weights do not change
the cost), or with ``--model`` a shipped model (the CamVid EfficientNet-Lite0 FCN-8s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def make_inputs(out: Path, size: int, need_checkpoint: bool = True) -> tuple:
    import numpy as np
    from PIL import Image

    image = out / ("big_%d.jpg" % size)
    if not image.exists():
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, (size // 64 + 1, size // 64 + 1, 3), dtype=np.uint8)
        array = np.repeat(np.repeat(blocks, 64, 0), 64, 1)[:size, :size]
        Image.fromarray(array).save(image, quality=90)
        del array
    ckpt = out / "run" / "checkpoint.pt"
    if need_checkpoint and not ckpt.exists():
        from fcnfast import cli

        assert (
            cli.main(
                [
                    "train",
                    "--epochs",
                    "1",
                    "--max-steps",
                    "1",
                    "--train-images",
                    "1",
                    "--val-images",
                    "0",
                    "--image-size",
                    "64",
                    "--num-classes",
                    "21",
                    "--batch-size",
                    "1",
                    "--quiet",
                    "--overwrite",
                    "--out",
                    str(out / "run"),
                ]
            )
            == 0
        )
    return image, ckpt


def measure(args: list, threads: int) -> dict:
    """Run ``python -m fcnfast ARGS`` in a child that reports its own peak RSS."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit("failed (%d): %s\n%s" % (proc.returncode, " ".join(args), proc.stderr))
    peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return {"args": args, "seconds": round(seconds, 1), "peak_rss_mb": round(peak)}


def child(args_json: str) -> None:
    """Run the command in a grandchild and print its peak RSS (this process stays small)."""
    args = json.loads(args_json)
    proc = subprocess.run([sys.executable, "-m", "fcnfast", *args], stdout=subprocess.DEVNULL)
    if proc.returncode:
        sys.exit(proc.returncode)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024.0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=8000)
    p.add_argument("--crf", action="store_true", help="also measure predict --crf")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extra", nargs="*", default=[], help="more predict arguments")
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="a shipped model (e.g. fcn8s_lite0_camvid) instead of the tiny FCN-8s",
    )
    p.add_argument("--out", default="large_images_out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        return child(a.child)
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    image, ckpt = make_inputs(out, a.size, need_checkpoint=a.model is None)
    which = ["--model", a.model] if a.model else ["--checkpoint", str(ckpt)]
    runs = [["predict", str(image), "-o", str(out / "labels.png"), *which, "--quiet", *a.extra]]
    if a.crf:
        runs.append(runs[0] + ["--crf", "-o", str(out / "labels_crf.png")])
    for args in runs:
        result = measure(args, a.threads)
        result.update(size=a.size, threads=a.threads, model=a.model or "fcn8s tiny")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
