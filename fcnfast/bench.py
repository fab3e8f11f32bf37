"""``fcnfast bench``: fcnfast's ops vs the PyTorch expressions they replace, side by side.

Every case times the PyTorch expression (the one ``fcnfast.reference`` states)
and the fcnfast op on the same inputs in the same run, interleaved, and reports
the median times, their ratio, the peak memory each allocates, and how close
fcnfast gets to the machine's floor: memory bandwidth (a large tensor copy) or
FP32 GEMM throughput (the best of a few GEMM-like workloads), both measured at
the start of the same run.

Shapes are the FCN-8s head of a 500x500 input (Caffe geometry, DESIGN.md):
score_fr 16x16, pool4 44x44 (crop 5), pool3 88x88 (crop 9), upscore2 k4 s2,
upscore_pool4 k4 s2, upscore8 k16 s8 to 568x568 cropped at 31 to 500x500.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from . import _backend, ops, reference

# FCN-8s geometry for a 500x500 input
SIZE = 500
SCORE_FR = 16
POOL4, POOL4_OFFSET, FUSE4 = 44, 5, 34
POOL3, POOL3_OFFSET, FUSE3 = 88, 9, 70
FINAL_OFFSET = 31


@dataclass
class Case:
    name: str
    classes: int
    batch: int
    torch_fn: Callable[[], object]
    fcnfast_fn: Callable[[], object]
    floor: str = ""  # "bandwidth" or "flops"
    work: float = 0.0  # bytes that must move, or useful FLOPs
    baseline: str = "PyTorch"  # what the torch side computes
    result: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], min_time: float, min_reps: int) -> List[float]:
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return times


def compare_times(fn_a, fn_b, min_time=0.3, min_reps=3, rounds=3, spread=None):
    """Median seconds of fn_a and fn_b, measured in alternating rounds (noise hits both).

    ``spread``: a list that receives max/min of fn_a's per-round medians (1.0 on a quiet
    machine; see ``BUSY_SPREAD``)."""
    fn_a()
    fn_b()  # warm-up (allocations, lazy init)
    ta, tb, rounds_a = [], [], []
    for _ in range(rounds):
        times = _median_time(fn_a, min_time / rounds, min_reps)
        rounds_a.append(statistics.median(times))
        ta += times
        tb += _median_time(fn_b, min_time / rounds, min_reps)
    if spread is not None:
        spread.append(max(rounds_a) / max(min(rounds_a), 1e-12))
    return statistics.median(ta), statistics.median(tb)


# a baseline whose round medians differ by more than this factor means a busy machine
BUSY_SPREAD = 1.5


def busy_warning(spreads: List[float], threshold: float = BUSY_SPREAD) -> Optional[str]:
    """A warning line when repeated baseline timings disagree (other work on the machine)."""
    noisy = [x for x in spreads if x > threshold]
    if not noisy:
        return None
    return (
        "fcnfast: warning: the machine looks busy: in %d of %d cases the baseline's repeated "
        "timings differ by up to %.1fx (threshold %.1fx); timings and ratios are unreliable, "
        "rerun on an idle machine" % (len(noisy), len(spreads), max(noisy), threshold)
    )


class _StderrToFile:
    """Send file descriptor 2 (C++ and Python writes alike) to a temporary file meanwhile:
    the profiler's own messages must not flood the user's terminal."""

    def __enter__(self):
        import sys
        import tempfile

        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        import sys

        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator while ``fn`` runs (profiler allocation events)."""
    import warnings

    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _StderrToFile(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
        events = prof.profiler.kineto_results.experimental_event_tree()
    allocs = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(events)
    allocs.sort()
    current = peak = 0
    for _, size in allocs:
        current += size
        peak = max(peak, current)
    return peak


def measure_floors(quick: bool = False) -> dict:
    """Copy bandwidth (bytes/s, read + write) and FP32 GEMM rate (FLOP/s) of this machine."""
    n = (1 << 24) if quick else (1 << 26)
    src = torch.ones(n)
    dst = torch.empty(n)
    t = min(_median_time(lambda: dst.copy_(src), 0.2, 5))
    bandwidth = 2 * src.numel() * 4 / t
    return {"bandwidth": bandwidth, "flops": max(_gemm_rates(quick).values())}


def _gemm_rates(quick: bool = False) -> dict:
    """FP32 FLOP/s of a few dense GEMM-like workloads; their best is the FLOP floor.

    Several because no single one reaches the FMA peak everywhere: on the idle AMD
    bench machine (2 threads) ``torch.mm`` (MKL) ran at ~220 GFLOP/s while oneDNN's
    channels-last convolutions reached ~520.
    """
    m = 1024 if quick else 2048
    a, b = torch.randn(m, m), torch.randn(m, m)
    x3 = torch.randn(1, 256, 64, 64).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(256, 256, 3, 3)
    xp = torch.randn(1, 21, 65, 65).contiguous(memory_format=torch.channels_last)
    wp = torch.randn(21 * 64, 21, 2, 2)  # the FCN-8s upscore8 phase convolution
    work = {
        "mm %dx%d" % (m, m): (lambda: torch.mm(a, b), 2 * m**3),
        "conv3x3 256ch 64x64": (lambda: F.conv2d(x3, w3), 2 * 256 * 256 * 9 * 62 * 62),
        "conv2x2 21->1344 65x65": (lambda: F.conv2d(xp, wp), 2 * 1344 * 21 * 4 * 64 * 64),
    }
    with torch.no_grad():
        return {name: flop / min(_median_time(fn, 0.2, 3)) for name, (fn, flop) in work.items()}


# ---------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------


def _bilinear_weight(c: int, k: int) -> torch.Tensor:
    return reference.bilinear_weight(c, k).contiguous()


def _grad_step(fn, inputs):
    """Forward + backward of ``fn`` with a fixed upstream gradient.

    The gradient is made once, outside the timing: in training it comes from the
    layers above, and allocating a fresh full-resolution tensor per step (page
    faults on a 21-150 MB buffer) would time the allocator, not the layer.
    """
    grads = {}

    def step():
        for t in inputs:
            t.grad = None
        out = fn()
        key = (tuple(out.shape), out.dtype)
        if key not in grads:
            grads[key] = torch.ones_like(out)
        out.backward(grads[key])

    return step


def bilinear_cases(c: int, n: int) -> List[Case]:
    x = torch.randn(n, c, FUSE3, FUSE3)
    crop = (FINAL_OFFSET, FINAL_OFFSET, SIZE, SIZE)
    w = _bilinear_weight(c, 16)
    out_bytes = n * c * SIZE * SIZE * 4 + x.numel() * 4
    deconv = lambda: F.conv_transpose2d(x, w, stride=8, groups=c)[..., 31:531, 31:531]  # noqa: E731
    interp = lambda: F.interpolate(x, size=(SIZE, SIZE), mode="bilinear")  # noqa: E731
    ours = lambda: ops.bilinear_upsample2d(x, 8, crop)  # noqa: E731
    xg = x.clone().requires_grad_()
    return [
        Case("bilinear_upsample2d x8 fwd", c, n, deconv, ours, "bandwidth", out_bytes),
        Case(
            "bilinear_upsample2d x8 fwd",
            c,
            n,
            interp,
            ours,
            "bandwidth",
            out_bytes,
            baseline="F.interpolate",
        ),
        Case(
            "bilinear_upsample2d x8 fwd+bwd",
            c,
            n,
            _grad_step(
                lambda: F.conv_transpose2d(xg, w, stride=8, groups=c)[..., 31:531, 31:531], [xg]
            ),
            _grad_step(lambda: ops.bilinear_upsample2d(xg, 8, crop), [xg]),
            "bandwidth",
            2 * out_bytes,
        ),
    ]


def deconv_cases(c: int, n: int) -> List[Case]:
    x = torch.randn(n, c, FUSE3, FUSE3, requires_grad=True)
    w = torch.randn(c, c, 16, 16, requires_grad=True)
    crop = (FINAL_OFFSET, FINAL_OFFSET, SIZE, SIZE)
    flops = (
        2.0 * n * c * c * SIZE * SIZE * 4
    )  # each output pixel gathers 2x2 taps per input channel
    fwd_t = lambda: F.conv_transpose2d(x, w, stride=8)[..., 31:531, 31:531]  # noqa: E731
    fwd_f = lambda: ops.conv_transpose2d(x, w, stride=8, crop=crop)  # noqa: E731
    xd, wd = x.detach(), w.detach()
    x2 = torch.randn(n, c, SCORE_FR, SCORE_FR)
    w2 = torch.randn(c, c, 4, 4)
    cases = [
        Case(
            "conv_transpose2d k16s8+crop fwd",
            c,
            n,
            lambda: F.conv_transpose2d(xd, wd, stride=8)[..., 31:531, 31:531],
            lambda: ops.conv_transpose2d(xd, wd, stride=8, crop=crop),
            "flops",
            flops,
        ),
    ]
    cases.append(
        Case(
            "conv_transpose2d k16s8+crop fwd+bwd",
            c,
            n,
            _grad_step(fwd_t, [x, w]),
            _grad_step(fwd_f, [x, w]),
            "flops",
            3 * flops,
        )
    )
    cases.append(
        Case(
            "conv_transpose2d k4s2 fwd",
            c,
            n,
            lambda: F.conv_transpose2d(x2, w2, stride=2),
            lambda: ops.conv_transpose2d(x2, w2, stride=2),
            "flops",
            2.0 * n * c * c * (2 * SCORE_FR + 2) ** 2 * 4,
        )
    )
    return cases


def skip_cases(c: int, n: int) -> List[Case]:
    cases = []
    for name, channels, size, offset, out in (
        ("pool4", 512, POOL4, POOL4_OFFSET, FUSE4),
        ("pool3", 256, POOL3, POOL3_OFFSET, FUSE3),
    ):
        coarse = torch.randn(n, c, out, out)
        feat = torch.randn(n, channels, size, size)
        w = torch.randn(c, channels, 1, 1)
        b = torch.randn(c)
        sl = slice(offset, offset + out)
        cases.append(
            Case(
                "score_skip %s fwd" % name,
                c,
                n,
                lambda coarse=coarse, feat=feat, w=w, b=b, sl=sl: (
                    coarse + F.conv2d(feat, w, b)[..., sl, sl]
                ),
                lambda coarse=coarse, feat=feat, w=w, b=b, offset=offset: ops.score_skip(
                    coarse, feat, w, b, 1.0, (offset, offset)
                ),
                "flops",
                2.0 * n * c * channels * out * out,
            )
        )
    coarse = torch.randn(n, c, FUSE3, FUSE3)
    skip = torch.randn(n, c, POOL3, POOL3)
    cases.append(
        Case(
            "skip_add_crop pool3 fwd",
            c,
            n,
            lambda: coarse + skip[..., 9:79, 9:79],
            lambda: ops.skip_add_crop(coarse, skip, (9, 9)),
            "bandwidth",
            3 * coarse.numel() * 4,
        )
    )
    return cases


def fused_cases(c: int, n: int) -> List[Case]:
    x = torch.randn(n, c, FUSE3, FUSE3)
    crop = (FINAL_OFFSET, FINAL_OFFSET, SIZE, SIZE)
    w = _bilinear_weight(c, 16)
    target = torch.randint(0, c, (n, SIZE, SIZE))
    target[:, :20] = 255
    xg = x.clone().requires_grad_()

    def unfused_ce():
        xg.grad = None
        up = F.conv_transpose2d(xg, w, stride=8, groups=c)[..., 31:531, 31:531]
        F.cross_entropy(up, target, ignore_index=255).backward()

    def fused_ce():
        xg.grad = None
        ops.upsample_cross_entropy(xg, target, 8, crop).backward()

    return [
        Case(
            "upsample_argmax x8",
            c,
            n,
            lambda: F.conv_transpose2d(x, w, stride=8, groups=c)[..., 31:531, 31:531].argmax(1),
            lambda: ops.upsample_argmax(x, 8, crop),
            "bandwidth",
            x.numel() * 4 + n * SIZE * SIZE * 8,
        ),
        Case(
            "upsample_cross_entropy x8 fwd+bwd",
            c,
            n,
            unfused_ce,
            fused_ce,
            "bandwidth",
            2 * x.numel() * 4 + target.numel() * 8,
        ),
    ]


class _Head(torch.nn.Module):
    """FCN-8s head after score_fr: learned upscore2/upscore_pool4/upscore8 and the two skips."""

    def __init__(self, c: int):
        super().__init__()
        bil = lambda k: torch.nn.Parameter(  # noqa: E731
            torch.eye(c)[:, :, None, None] * reference.bilinear_filter(k)
        )
        self.up2, self.up4, self.up8 = bil(4), bil(4), bil(16)
        self.w4 = torch.nn.Parameter(torch.randn(c, 512, 1, 1) * 0.01)
        self.b4 = torch.nn.Parameter(torch.zeros(c))
        self.w3 = torch.nn.Parameter(torch.randn(c, 256, 1, 1) * 0.01)
        self.b3 = torch.nn.Parameter(torch.zeros(c))

    def torch_forward(self, score, pool4, pool3):
        up2 = F.conv_transpose2d(score, self.up2, stride=2)
        fuse4 = up2 + F.conv2d(pool4, self.w4, self.b4)[..., 5 : 5 + FUSE4, 5 : 5 + FUSE4]
        up4 = F.conv_transpose2d(fuse4, self.up4, stride=2)
        fuse3 = up4 + F.conv2d(pool3, self.w3, self.b3)[..., 9 : 9 + FUSE3, 9 : 9 + FUSE3]
        return F.conv_transpose2d(fuse3, self.up8, stride=8)[..., 31:531, 31:531]

    def fcnfast_forward(self, score, pool4, pool3):
        up2 = ops.conv_transpose2d(score, self.up2, stride=2)
        fuse4 = ops.score_skip(up2, pool4, self.w4, self.b4, 1.0, (5, 5))
        up4 = ops.conv_transpose2d(fuse4, self.up4, stride=2)
        fuse3 = ops.score_skip(up4, pool3, self.w3, self.b3, 1.0, (9, 9))
        return ops.conv_transpose2d(
            fuse3, self.up8, stride=8, crop=(FINAL_OFFSET, FINAL_OFFSET, SIZE, SIZE)
        )


def head_cases(c: int, n: int) -> List[Case]:
    head = _Head(c)
    score = torch.randn(n, c, SCORE_FR, SCORE_FR, requires_grad=True)
    pool4 = torch.randn(n, 512, POOL4, POOL4, requires_grad=True)
    pool3 = torch.randn(n, 256, POOL3, POOL3, requires_grad=True)
    args = (score, pool4, pool3)
    params = list(head.parameters()) + list(args)
    flops = 2.0 * n * c * c * SIZE * SIZE * 4

    def nograd(fn):
        def run():
            with torch.no_grad():
                return fn(*args)

        return run

    return [
        Case(
            "FCN-8s head fwd",
            c,
            n,
            nograd(head.torch_forward),
            nograd(head.fcnfast_forward),
            "flops",
            flops,
        ),
        Case(
            "FCN-8s head fwd+bwd",
            c,
            n,
            _grad_step(lambda: head.torch_forward(*args), params),
            _grad_step(lambda: head.fcnfast_forward(*args), params),
            "flops",
            3 * flops,
        ),
    ]


def model_cases(c: int, n: int, size: int = 256) -> List[Case]:
    """A whole FCN-8s (tiny backbone) run with the native ops vs the reference ops."""
    try:
        from .models import fcn8s

        model = fcn8s(num_classes=c, backbone="tiny")
    except Exception:  # models not available in this build
        return []
    model.eval()
    x = torch.randn(n, 3, size, size)

    def run(backend_name, train):
        def go():
            with _backend.use_backend(backend_name):
                if train:
                    model.zero_grad(set_to_none=True)
                    model(x).sum().backward()
                else:
                    with torch.no_grad():
                        return model(x)

        return go

    return [
        Case(
            "FCN-8s tiny %dx%d fwd" % (size, size),
            c,
            n,
            run("reference", False),
            run("auto", False),
            "",
            0.0,
            baseline="reference ops",
        ),
        Case(
            "FCN-8s tiny %dx%d fwd+bwd" % (size, size),
            c,
            n,
            run("reference", True),
            run("auto", True),
            "",
            0.0,
            baseline="reference ops",
        ),
    ]


# ---------------------------------------------------------------------------
# dense CRF vs pydensecrf (issue 19, part 1)
# ---------------------------------------------------------------------------

CRF_SIZE = (240, 320)  # H, W


def pydensecrf_inference(logits, image, iterations=5):
    """pydensecrf (Kraehenbuehl's C++) on the same unaries, image and kernels as
    ``fcnfast.crf.dense_crf``'s defaults; ``None`` when pydensecrf is not installed."""
    try:
        import numpy as np
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    c, h, w = logits.shape
    unary = np.ascontiguousarray((-logits.log_softmax(0)).reshape(c, -1).numpy())
    rgb = np.ascontiguousarray(image.permute(1, 2, 0).numpy())

    def run():
        d = dcrf.DenseCRF2D(w, h, c)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=rgb, compat=10)
        return np.array(d.inference(iterations)).reshape(c, h, w)

    return run


def crf_scene(h: int, w: int, num_classes: int, seed: int = 0):
    """Discs of class colours plus noise (uint8 image) and unaries that point to them: a square
    scene of side max(h, w) (the scene of benchmarks/bench_crf.py), cropped to h x w."""
    size = max(h, w)
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
    image = image.clamp(0, 255).to(torch.uint8)
    return logits[:, :h, :w].contiguous(), image[:, :h, :w].contiguous()


def crf_cases(c: int, n: int) -> List[Case]:
    """fcnfast.crf.dense_crf vs pydensecrf, one 320x240 image, 5 iterations (batch 1 only).
    Skipped with a note when pydensecrf is not installed."""
    from . import crf

    if n != 1:
        return []
    logits, image = crf_scene(*CRF_SIZE, c)
    theirs = pydensecrf_inference(logits, image)
    if theirs is None:
        import sys

        print(
            "fcnfast bench: crf case C=%d skipped: pydensecrf is not installed "
            "(pip install pydensecrf2)" % c,
            file=sys.stderr,
        )
        return []
    return [
        Case(
            "dense_crf %dx%d 5 it" % (CRF_SIZE[1], CRF_SIZE[0]),
            c,
            n,
            theirs,
            lambda: crf.dense_crf(logits, image),
            baseline="pydensecrf",
        )
    ]


CASE_GROUPS = {
    "bilinear": bilinear_cases,
    "deconv": deconv_cases,
    "skip": skip_cases,
    "fused": fused_cases,
    "head": head_cases,
    "model": model_cases,
    "crf": crf_cases,
}


# ---------------------------------------------------------------------------
# running and reporting
# ---------------------------------------------------------------------------


def run_case(case: Case, floors: dict, min_time: float, memory: bool) -> dict:
    spread = []
    t_torch, t_ours = compare_times(
        case.torch_fn, case.fcnfast_fn, min_time=min_time, spread=spread
    )
    row = {
        "case": case.name,
        "C": case.classes,
        "N": case.batch,
        "baseline": case.baseline,
        "torch_ms": t_torch * 1e3,
        "fcnfast_ms": t_ours * 1e3,
        "ratio": t_torch / t_ours,
        "baseline_spread": spread[0],
    }
    if memory:
        row["torch_peak_mb"] = peak_memory(case.torch_fn) / 2**20
        row["fcnfast_peak_mb"] = peak_memory(case.fcnfast_fn) / 2**20
    if case.floor:
        floor_s = case.work / floors[case.floor]
        row["floor"] = case.floor
        row["pct_of_floor"] = 100.0 * floor_s / t_ours
    return row


def format_table(rows: List[dict]) -> str:
    lines = [
        "| case | C | N | baseline | baseline ms | fcnfast ms | ratio | baseline peak MB "
        "| fcnfast peak MB | % of floor |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem_t = "%.1f" % r["torch_peak_mb"] if "torch_peak_mb" in r else "-"
        mem_f = "%.1f" % r["fcnfast_peak_mb"] if "fcnfast_peak_mb" in r else "-"
        floor = "%.0f%% (%s)" % (r["pct_of_floor"], r["floor"]) if "pct_of_floor" in r else "-"
        lines.append(
            "| %s | %d | %d | %s | %.2f | %.2f | %.2fx | %s | %s | %s |"
            % (
                r["case"],
                r["C"],
                r["N"],
                r["baseline"],
                r["torch_ms"],
                r["fcnfast_ms"],
                r["ratio"],
                mem_t,
                mem_f,
                floor,
            )
        )
    return "\n".join(lines)


def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "CPU: %s; torch %s, %d threads, capability %s; fcnfast backend %s" % (
        model,
        torch.__version__,
        torch.get_num_threads(),
        torch.backends.cpu.get_cpu_capability(),
        _backend.backend(),
    )


def run(
    groups: Optional[List[str]] = None,
    classes=(21, 59, 150),
    batches=(1, 8),
    min_time: float = 0.5,
    memory: bool = True,
    quick: bool = False,
    echo=print,
) -> dict:
    groups = groups or list(CASE_GROUPS)
    floors = measure_floors(quick)
    echo(machine_description())
    echo(
        "floors: copy bandwidth %.1f GB/s, fp32 GEMM %.1f GFLOP/s"
        % (floors["bandwidth"] / 1e9, floors["flops"] / 1e9)
    )
    rows = []
    for group in groups:
        for c in classes:
            for n in batches:
                for case in CASE_GROUPS[group](c, n):
                    row = run_case(case, floors, min_time, memory)
                    rows.append(row)
                    echo(
                        "  %-40s C=%-3d N=%d  %8.2f ms -> %8.2f ms  %.2fx"
                        % (row["case"], c, n, row["torch_ms"], row["fcnfast_ms"], row["ratio"])
                    )
    warning = busy_warning([r["baseline_spread"] for r in rows])
    if warning:
        import sys

        print(warning, file=sys.stderr)
    return {
        "machine": machine_description(),
        "floors": floors,
        "rows": rows,
        "busy_warning": warning,
    }


# ---------------------------------------------------------------------------
# cold calls: the first calls of a fresh process (issue 19, part 0)
# ---------------------------------------------------------------------------

# (group, case name, baseline): the cases whose op allocates a large output; the
# fcnfast side of the two bilinear rows is the same op, timed once per process.
COLD_CASES = (
    ("bilinear", "bilinear_upsample2d x8 fwd", "PyTorch"),
    ("bilinear", "bilinear_upsample2d x8 fwd", "F.interpolate"),
    ("deconv", "conv_transpose2d k16s8+crop fwd", "PyTorch"),
    ("fused", "upsample_argmax x8", "PyTorch"),
)


def thp_settings() -> str:
    """The kernel's transparent huge page settings ("enabled=madvise defrag=madvise"), or "-"."""
    parts = []
    for name in ("enabled", "defrag"):
        try:
            with open("/sys/kernel/mm/transparent_hugepage/%s" % name) as f:
                text = f.read()
        except OSError:
            return "-"
        chosen = [w[1:-1] for w in text.split() if w.startswith("[")]
        parts.append("%s=%s" % (name, chosen[0] if chosen else text.strip()))
    return " ".join(parts)


def _cold_child(spec_json: str) -> None:
    """Runs in a fresh process: times ``calls`` consecutive calls of one side of one case
    and prints their seconds as JSON on the last line."""
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Start the thread pool on unrelated work first: the first call should time the op
    # (its allocation and page faults included), not OpenMP's start-up.
    torch.ones(1 << 20).add_(1)
    case = next(
        c
        for c in CASE_GROUPS[spec["group"]](spec["C"], spec["N"])
        if c.name == spec["case"] and c.baseline == spec["baseline"]
    )
    fn = case.fcnfast_fn if spec["side"] == "fcnfast" else case.torch_fn
    times = []
    result = None
    with torch.no_grad():
        for _ in range(spec["calls"]):
            # as in a user's loop (out = op(x)): the previous result lives until the
            # new one is returned, so the second call needs a second large buffer
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    del result
    print(json.dumps(times))


def _run_cold_child(spec: dict) -> List[float]:
    import subprocess
    import sys

    code = "import sys; from fcnfast.bench import _cold_child; _cold_child(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError("fcnfast bench --cold: the child process failed:\n%s" % proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def percentile(values: List[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def cold_stats(runs: List[List[float]]) -> dict:
    """Milliseconds over fresh processes' call series: the first call (median and worst
    over processes), the median and p99 of the later calls, the slowest call of all."""
    later = [t for run in runs for t in run[1:]] or [run[0] for run in runs]
    return {
        "first_ms": 1e3 * statistics.median(run[0] for run in runs),
        "first_max_ms": 1e3 * max(run[0] for run in runs),
        "median_ms": 1e3 * statistics.median(later),
        "p99_ms": 1e3 * percentile(later, 99),
        "max_ms": 1e3 * max(t for run in runs for t in run),
    }


def run_cold(
    classes=(21, 59, 150),
    batches=(1,),
    procs: int = 5,
    calls: int = 10,
    threads: Optional[int] = None,
    cases=COLD_CASES,
    echo=print,
) -> dict:
    """Cold-call latency: each side of each case in ``procs`` fresh processes of ``calls``
    calls each (processes of the two sides alternate, so that noise hits both)."""
    echo(machine_description())
    echo("transparent huge pages: %s" % thp_settings())
    rows = []
    for c in classes:
        for n in batches:
            ours_runs = {}  # one fcnfast series per (group, case name)
            for group, name, baseline in cases:
                base = dict(
                    group=group,
                    case=name,
                    baseline=baseline,
                    C=c,
                    N=n,
                    calls=calls,
                    threads=threads,
                )
                theirs = []
                need_ours = (group, name) not in ours_runs
                ours = []
                for _ in range(procs):
                    theirs.append(_run_cold_child(dict(base, side="torch")))
                    if need_ours:
                        ours.append(_run_cold_child(dict(base, side="fcnfast")))
                if need_ours:
                    ours_runs[(group, name)] = ours
                t, f = cold_stats(theirs), cold_stats(ours_runs[(group, name)])
                row = {
                    "case": name,
                    "C": c,
                    "N": n,
                    "baseline": baseline,
                    "procs": procs,
                    "calls": calls,
                }
                row.update({"torch_" + k: v for k, v in t.items()})
                row.update({"fcnfast_" + k: v for k, v in f.items()})
                rows.append(row)
                echo(
                    "  %-34s C=%-3d N=%d %-13s first %7.2f / %7.2f ms, median %7.2f / %7.2f, "
                    "p99 %7.2f / %7.2f"
                    % (
                        name,
                        c,
                        n,
                        baseline,
                        t["first_ms"],
                        f["first_ms"],
                        t["median_ms"],
                        f["median_ms"],
                        t["p99_ms"],
                        f["p99_ms"],
                    )
                )
    return {"machine": machine_description(), "thp": thp_settings(), "rows": rows}


def format_cold_table(rows: List[dict]) -> str:
    lines = [
        "| case | C | N | baseline | baseline first ms | baseline median ms | baseline p99 ms "
        "| fcnfast first ms | fcnfast median ms | fcnfast p99 ms | fcnfast first / median "
        "| fcnfast p99 / median |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            "| %s | %d | %d | %s | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2fx | %.2fx |"
            % (
                r["case"],
                r["C"],
                r["N"],
                r["baseline"],
                r["torch_first_ms"],
                r["torch_median_ms"],
                r["torch_p99_ms"],
                r["fcnfast_first_ms"],
                r["fcnfast_median_ms"],
                r["fcnfast_p99_ms"],
                r["fcnfast_first_ms"] / r["fcnfast_median_ms"],
                r["fcnfast_p99_ms"] / r["fcnfast_median_ms"],
            )
        )
    return "\n".join(lines)


def _cold_main(args: argparse.Namespace, classes, batches) -> int:
    """``fcnfast bench --cold``: the cold-call table instead of the steady-state one."""
    if args.cold_procs < 1 or args.cold_calls < 1:
        raise ValueError("--cold-procs and --cold-calls must be >= 1")
    result = run_cold(classes, batches, args.cold_procs, args.cold_calls, args.threads)
    table = format_cold_table(result["rows"])
    _emit(
        args,
        result,
        table,
        "# fcnfast CPU cold calls\n\n%s; transparent huge pages %s. Each side in %d fresh "
        "processes of %d calls (each keeping the previous result, as a loop does); first = "
        "median over processes of the first call; median and p99 over the later calls."
        % (result["machine"], result["thp"], args.cold_procs, args.cold_calls),
    )
    return 0


def _emit(args: argparse.Namespace, result: dict, table: str, markdown_header: str) -> None:
    """Print the table; save the result as JSON (--json) and header + table (--markdown)."""
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("%s\n\n%s\n" % (markdown_header, table))


def register_cli(subparsers) -> None:
    from .cli import HelpFormatter

    p = subparsers.add_parser(
        "bench",
        help="benchmark fcnfast's ops against PyTorch (markdown table)",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--groups",
        nargs="+",
        choices=sorted(CASE_GROUPS),
        default=None,
        help="case groups to run (default: all)",
    )
    p.add_argument("--classes", nargs="+", type=int, default=[21, 59, 150])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    p.add_argument(
        "--min-time", type=float, default=0.5, help="seconds of timing per case and side"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: as is)"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--quick", action="store_true", help="C=21, N=1, short timings")
    p.add_argument("--json", metavar="PATH", help="also save the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also save the table as a markdown file")
    p.add_argument(
        "--cold",
        action="store_true",
        help="time the first calls of fresh processes instead (first-call, median, p99 "
        "latency of the ops that allocate a large output)",
    )
    p.add_argument("--cold-procs", type=int, default=5, help="--cold: fresh processes per side")
    p.add_argument("--cold-calls", type=int, default=10, help="--cold: calls per process")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    for value, name in ((args.classes, "--classes"), (args.batch, "--batch")):
        if any(v <= 0 for v in value):
            raise ValueError("%s must be positive, got %s" % (name, value))
    if not args.min_time > 0:
        raise ValueError("--min-time must be positive, got %r" % args.min_time)
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be >= 1, got %d" % args.threads)
    for path, name in ((args.json, "--json"), (args.markdown, "--markdown")):
        # checked before minutes of timing, not after
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(
                "%s %s: directory %s does not exist"
                % (name, path, os.path.dirname(os.path.abspath(path)))
            )
    classes, batches, min_time = args.classes, args.batch, args.min_time
    if args.quick:
        classes, batches, min_time = [21], [1], min(min_time, 0.1)
    if getattr(args, "cold", False):
        return _cold_main(args, classes, batches)
    result = run(args.groups, classes, batches, min_time, not args.no_memory, args.quick)
    _emit(
        args,
        result,
        format_table(result["rows"]),
        "# fcnfast CPU benchmark\n\n%s\n\nFloors measured in the same run: copy bandwidth "
        "%.1f GB/s, fp32 GEMM %.1f GFLOP/s."
        % (result["machine"], result["floors"]["bandwidth"] / 1e9, result["floors"]["flops"] / 1e9),
    )
    return 0
