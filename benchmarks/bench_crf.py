"""Benchmark fcnfast.crf.dense_crf (native permutohedral mean field) against pydensecrf.

Plain script (also usable under pytest-benchmark: ``pytest benchmarks/bench_crf.py``):

    python benchmarks/bench_crf.py                           # 320x240 .. 1000x1000, 21 labels
    python benchmarks/bench_crf.py --sizes 320x240 500 --seeds 0 1 --repeat 7
    taskset -c 0 python benchmarks/bench_crf.py --threads 1  # fcnfast pinned to one core

Per image size and scene, side by side in the same process, interleaved round by round:
pydensecrf (Kraehenbuehl's C++, single-threaded; ``pip install pydensecrf2``, skipped with a
note when absent) and fcnfast with 1 and 2 torch threads, on the same unaries, image and kernels
(Gaussian sxy 3 weight 3, bilateral sxy 80 srgb 13 weight 10, 5 iterations). Times are the best
of ``--repeat`` rounds (wall clock; the process CPU time too, less inflated by other jobs), the
fcnfast first call in the process separately (fresh buffers: page faults), the time per pixel
(linear scaling shows as a flat column), the label agreement with pydensecrf and the load average.
The O(P^2) pure-PyTorch reference runs at small sizes for a correctness-scale comparison.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fcnfast import crf
from fcnfast.bench import crf_scene, pydensecrf_inference


def scene(size: int, num_classes: int, seed: int = 0):
    """A square synthetic photo-like scene (see fcnfast.bench.crf_scene) and its logits."""
    return crf_scene(size, size, num_classes, seed)


def parse_size(text: str):
    """'500' -> (500, 500); '320x240' (width x height) -> (240, 320) as (H, W)."""
    if "x" in text:
        w, h = (int(v) for v in text.split("x"))
        return h, w
    return int(text), int(text)


def best_times(fns, repeat: int):
    """Best wall and CPU time of each fn, running them interleaved round by round."""
    walls = [float("inf")] * len(fns)
    cpus = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, (fn, threads) in enumerate(fns):
            torch.set_num_threads(threads)
            w, c = time.perf_counter(), time.process_time()
            fn()
            walls[k] = min(walls[k], time.perf_counter() - w)
            cpus[k] = min(cpus[k], time.process_time() - c)
    return walls, cpus


def run(sizes, num_classes, iterations, repeat, seeds, threads, reference_sizes):
    load = lambda: " ".join("%.1f" % v for v in os.getloadavg())  # noqa: E731
    print(
        "dense_crf: %d labels, %d iterations, fcnfast threads %s, cpus %d, loadavg %s"
        % (num_classes, iterations, threads, len(os.sched_getaffinity(0)), load())
    )
    for size in reference_sizes:
        logits, image = scene(size, num_classes)
        (ref, ours), _ = best_times(
            [
                (
                    lambda logits=logits, image=image: crf.dense_crf_reference(
                        logits, image, iterations=iterations
                    ),
                    1,
                ),
                (
                    lambda logits=logits, image=image: crf.dense_crf(
                        logits, image, iterations=iterations
                    ),
                    1,
                ),
            ],
            repeat,
        )
        print(
            "  %dx%d O(P^2) reference %.4f s, native %.4f s: %.1fx"
            % (size, size, ref, ours, ref / ours)
        )
    header = ["size", "scene", "pydensecrf s (cpu)"]
    header += ["fcnfast %dT s (cpu)" % t for t in threads]
    header += ["x vs pydensecrf %dT" % t for t in threads]
    header += ["fcnfast 1st call s", "ns/pixel %dT" % threads[0], "labels agree", "loadavg"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for h, w in sizes:
        for seed in seeds:
            logits, image = crf_scene(h, w, num_classes, seed)
            ours = lambda logits=logits, image=image: crf.dense_crf(  # noqa: E731
                logits, image, iterations=iterations
            )
            torch.set_num_threads(threads[0])
            start = time.perf_counter()
            q = ours()
            first = time.perf_counter() - start
            theirs = pydensecrf_inference(logits, image, iterations)
            fns = [(ours, t) for t in threads] + ([(theirs, 1)] if theirs else [])
            walls, cpus = best_times(fns, repeat)
            if theirs:
                agree = (torch.from_numpy(theirs()).argmax(0) == q.argmax(0)).double().mean()
                cells = ["%.3f (%.3f)" % (walls[-1], cpus[-1])]
            else:
                agree, cells = float("nan"), ["not installed"]
            cells += ["%.3f (%.3f)" % (walls[k], cpus[k]) for k in range(len(threads))]
            cells += [
                "%.2fx" % (walls[-1] / walls[k]) if theirs else "-" for k in range(len(threads))
            ]
            cells += [
                "%.3f" % first,
                "%.0f" % (1e9 * walls[0] / (h * w)),
                "%.4f%%" % (100 * float(agree)),
                load(),
            ]
            print("| %dx%d | %d | %s |" % (w, h, seed, " | ".join(cells)), flush=True)
            rows.append((h, w, seed, walls, cpus, float(agree)))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", nargs="+", default=["320x240", "250", "500", "1000"], help="N (square) or WxH"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="scenes (seed 0 is the 500x500 scene of earlier results)",
    )
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="fcnfast thread counts to time"
    )
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    run(
        [parse_size(s) for s in args.sizes],
        args.classes,
        args.iterations,
        args.repeat,
        args.seeds,
        args.threads,
        args.reference_sizes,
    )


def test_dense_crf_500(benchmark):
    """pytest-benchmark entry: one 500x500 image, 21 classes, 5 iterations."""
    logits, image = scene(500, 21)
    benchmark.group = "dense_crf"
    benchmark.pedantic(lambda: crf.dense_crf(logits, image), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
