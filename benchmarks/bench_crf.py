"""Benchmark fcnfast.crf.dense_crf (native permutohedral mean field).

Plain script (also usable under pytest-benchmark: ``pytest benchmarks/bench_crf.py``):

    python benchmarks/bench_crf.py                     # 21 classes, 5 iterations, 125^2 .. 1000^2
    python benchmarks/bench_crf.py --threads 1 --sizes 500
    taskset -c 0 python benchmarks/bench_crf.py --threads 1   # pin to one core

Prints, per image size, the median wall time and the median process CPU time (all threads; with
other jobs on the machine the wall time is inflated by waiting, the CPU time much less), the time
per pixel (linear scaling shows as a flat column) and the load average. The O(P^2) pure-PyTorch
reference runs in the same process at small sizes for the speed ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fcnfast import crf


def scene(size: int, num_classes: int, seed: int = 0):
    """A synthetic photo-like scene: overlapping discs of class colours plus noise, and logits."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(size, size, dtype=torch.long)
    for k in range(12):
        cy, cx = torch.randint(0, size, (2,), generator=g).tolist()
        r = int(torch.randint(size // 10 + 1, size // 3 + 2, (1,), generator=g))
        labels[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = k % num_classes
    colours = torch.rand(num_classes, 3, generator=g) * 255
    image = colours[labels].permute(2, 0, 1) + torch.randn(3, size, size, generator=g) * 8
    logits = torch.randn(num_classes, size, size, generator=g)
    logits += 2.0 * torch.nn.functional.one_hot(labels, num_classes).permute(2, 0, 1)
    return logits, image.clamp(0, 255).to(torch.uint8)


def measure(fn, repeat: int):
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def run(sizes, num_classes, iterations, repeat, reference_sizes):
    print("dense_crf: %d classes, %d iterations, torch threads %d, cpus %s, loadavg %s"
          % (num_classes, iterations, torch.get_num_threads(), len(os.sched_getaffinity(0)),
             " ".join("%.1f" % v for v in os.getloadavg())))
    for size in reference_sizes:
        logits, image = scene(size, num_classes)
        native = measure(lambda: crf.dense_crf(logits, image, iterations=iterations), repeat)
        ref = measure(lambda: crf.dense_crf_reference(logits, image, iterations=iterations), repeat)
        print("  %4dx%-4d reference (O(P^2)) wall %.4f s, native wall %.4f s: %.1fx faster"
              % (size, size, ref[0], native[0], ref[0] / native[0]))
    print("  %9s %9s %10s %10s %14s %9s" % ("size", "pixels", "wall s", "cpu s", "wall ns/pixel",
                                            "loadavg"))
    rows = []
    for size in sizes:
        logits, image = scene(size, num_classes)
        wall, cpu = measure(lambda: crf.dense_crf(logits, image, iterations=iterations), repeat)
        rows.append((size, wall, cpu))
        print("  %4dx%-4d %9d %10.3f %10.3f %14.1f %9.1f"
              % (size, size, size * size, wall, cpu, 1e9 * wall / (size * size),
                 os.getloadavg()[0]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[125, 250, 500, 1000])
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=[32, 48])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.sizes, args.classes, args.iterations, args.repeat, args.reference_sizes)


def test_dense_crf_500(benchmark):
    """pytest-benchmark entry: one 500x500 image, 21 classes, 5 iterations."""
    logits, image = scene(500, 21)
    benchmark.group = "dense_crf"
    benchmark.pedantic(lambda: crf.dense_crf(logits, image), rounds=3, warmup_rounds=1)


if __name__ == "__main__":
    main()
