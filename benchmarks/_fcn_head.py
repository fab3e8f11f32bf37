"""Shapes and helpers shared by the bilinear/argmax/cross-entropy benchmarks.

The FCN-8s head of a 500x500 image (Caffe geometry, DESIGN.md; the numbers are
``fcnfast.bench``'s): the fused score map is 70x70, upscore8 (k16 s8) makes 568x568,
cropped at 31 to 500x500.
Classes: 21 (VOC), 59 (PASCAL-Context), 150 (ADE20K).
"""

import torch

import fcnfast
from fcnfast.bench import (
    FINAL_OFFSET,
    FUSE3,
    SIZE,
    peak_memory,  # PyTorch-allocator peak (profiler events)
)
from fcnfast.losses import IGNORE_INDEX

SCORE = FUSE3  # the fused score map (after score_pool3), 70x70
SCALE = 8  # upscore8
CROP = (FINAL_OFFSET, FINAL_OFFSET, SIZE, SIZE)
# (classes, batch); batch 8 only for VOC, which keeps the PyTorch side's
# C x 500 x 500 scores within this machine's memory
CASES = [(21, 1), (59, 1), (150, 1), (21, 8)]
IDS = ["C%d-N%d" % case for case in CASES]


def scores(classes, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(batch, classes, SCORE, SCORE, generator=g)


def labels(classes, batch, seed=1, ignored_fraction=0.1):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, classes, (batch,) + CROP[2:], generator=g)
    target[torch.rand(target.shape, generator=g) < ignored_fraction] = IGNORE_INDEX
    return target


def run(benchmark, group, fn, *args, rounds=15):
    """Time fn(*args) (pedantic: fixed rounds after warm-up), record threads and peak memory."""
    benchmark.group = group
    benchmark.extra_info.update(
        threads=torch.get_num_threads(),
        backend=fcnfast.backend(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
    )
    # peak of the PyTorch allocator; fcnfast kernels add their scratch_mb
    benchmark.extra_info["torch_peak_mb"] = round(peak_memory(lambda: fn(*args)) / 2**20, 2)
    benchmark.pedantic(fn, args=args, rounds=rounds, warmup_rounds=2, iterations=1)


def scratch_mb(floats_per_thread):
    """Kernel-internal scratch (std::vector, invisible to the profiler) of all threads, in MB."""
    return round(torch.get_num_threads() * floats_per_thread * 4 / 2**20, 2)
