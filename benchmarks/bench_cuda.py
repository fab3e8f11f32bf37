"""GPU benchmarks: PyTorch vs fcnfast per op on FCN-8s shapes (500x500 input).

Run on a CUDA machine after building fcnfast with CUDA (benchmarks/gpu_check.sh
does both):

    python benchmarks/bench_cuda.py [--out benchmarks/results] [--dtype float32] [--batch 1 8]

Timing: CUDA events around each call, after warm-up, median of many repeats,
``torch.cuda.synchronize()`` before reading the events; cudnn.benchmark=True so
PyTorch's convolutions run their best algorithm. Inputs are random (never zeros).
Memory-bound ops are also reported as a share of the device-to-device copy
bandwidth measured in the same run (bytes read + bytes written, each tensor
counted once). The table is printed and written to ``<out>/<gpu-name>.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys

import torch
import torch.nn.functional as F

import fcnfast
from fcnfast import ops, reference


def time_ms(fn, warmup=5, repeat=50):
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs():
    """Device-to-device copy of 1 GiB: (read + written) bytes / time."""
    n = 2**28  # float32 elements = 1 GiB
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda dst=dst, src=src: dst.copy_(src), warmup=3, repeat=20)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def bilinear_weight(channels, scale, dtype, device):
    return reference.bilinear_weight(channels, 2 * scale, dtype, device).contiguous()


def cases(batch, dtype, dev="cuda"):
    """(name, pytorch fn, fcnfast fn, bytes moved by fcnfast or None)."""
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (
            torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).mul_(scale).to(dtype)
        )

    n, c = batch, 21
    # FCN-8s on 500x500: score_fr 16x16 -> upscore2 34x34 (+ score_pool4 crop 5 of 44x44)
    # -> upscore_pool4 70x70 (+ score_pool3 crop 9 of 88x88) -> upscore8 crop 31 -> 500x500
    s16 = randn(n, c, 16, 16)
    s70 = randn(n, c, 70, 70)
    pool3 = randn(n, 256, 88, 88)
    w_pool3 = randn(c, 256, 1, 1, scale=0.05)
    b_pool3 = randn(c)
    score_pool3 = randn(n, c, 88, 88)
    w_up8 = randn(c, c, 16, 16, scale=0.05)
    w_up2 = randn(c, c, 4, 4, scale=0.1)
    target = torch.randint(0, c, (n, 500, 500), generator=g, device=dev)
    target[:, :40] = 255
    crop8 = (31, 31, 500, 500)
    bw8 = bilinear_weight(c, 8, dtype, dev)
    out500 = torch.empty(n, c, 500, 500, device=dev, dtype=dtype)
    grad500 = randn(n, c, 500, 500)

    def torch_up8(x):
        return F.conv_transpose2d(x, bw8, stride=8, groups=c)[..., 31:531, 31:531]

    yield (
        "bilinear upscore8 fwd (frozen)",
        lambda: torch_up8(s70),
        lambda: ops.bilinear_upsample2d(s70, 8, crop8),
        nbytes(s70, out500),
    )

    x_req = s70.detach().requires_grad_()

    def torch_up8_bwd():
        torch.autograd.grad(torch_up8(x_req), x_req, grad500)

    def fcn_up8_bwd():
        torch.autograd.grad(ops.bilinear_upsample2d(x_req, 8, crop8), x_req, grad500)

    yield (
        "bilinear upscore8 fwd+bwd (frozen)",
        torch_up8_bwd,
        fcn_up8_bwd,
        nbytes(s70, out500) + nbytes(grad500, s70),
    )

    # PyTorch's own bilinear resize: its backward scatters with atomics (nondeterministic);
    # fcnfast's backward is a deterministic gather (different op, same output size)
    def torch_interp_bwd():
        y = F.interpolate(x_req, size=(500, 500), mode="bilinear", align_corners=False)
        torch.autograd.grad(y, x_req, grad500)

    yield (
        "bilinear bwd: F.interpolate (atomics) vs fcnfast (gather)",
        torch_interp_bwd,
        fcn_up8_bwd,
        None,
    )

    yield (
        "upsample_argmax 500x500",
        lambda: torch_up8(s70).argmax(1),
        lambda: ops.upsample_argmax(s70, 8, crop8),
        nbytes(s70) + n * 500 * 500 * 8,
    )

    def torch_ce():
        loss = F.cross_entropy(torch_up8(x_req), target, ignore_index=255)
        torch.autograd.grad(loss, x_req)

    def fcn_ce():
        loss = ops.upsample_cross_entropy(x_req, target, 8, crop8)
        torch.autograd.grad(loss, x_req)

    yield ("upsample_cross_entropy fwd+bwd", torch_ce, fcn_ce, None)

    # learned deconvolutions (FCN "upscore" layers trained, as in the paper's runs)
    w8 = w_up8.detach().requires_grad_()

    def torch_deconv8():
        return F.conv_transpose2d(s70, w_up8, stride=8)[..., 31:531, 31:531]

    yield (
        "learned deconv 21->21 k16 s8 fwd (crop 31)",
        torch_deconv8,
        lambda: ops.conv_transpose2d(s70, w_up8, stride=8, crop=crop8),
        None,
    )

    def torch_deconv8_bwd():
        y = F.conv_transpose2d(x_req, w8, stride=8)[..., 31:531, 31:531]
        torch.autograd.grad(y, (x_req, w8), grad500)

    def fcn_deconv8_bwd():
        y = ops.conv_transpose2d(x_req, w8, stride=8, crop=crop8)
        torch.autograd.grad(y, (x_req, w8), grad500)

    yield ("learned deconv k16 s8 fwd+bwd", torch_deconv8_bwd, fcn_deconv8_bwd, None)

    yield (
        "learned deconv 21->21 k4 s2 fwd (upscore2)",
        lambda: F.conv_transpose2d(s16, w_up2, stride=2),
        lambda: ops.conv_transpose2d(s16, w_up2, stride=2),
        None,
    )

    # skip steps at 1/8 resolution
    yield (
        "skip_add_crop (score_pool3 crop 9)",
        lambda: s70 + score_pool3[..., 9:79, 9:79],
        lambda: ops.skip_add_crop(s70, score_pool3, (9, 9)),
        3 * nbytes(s70),
    )
    yield (
        "score_skip (pool3 256->21, crop 9)",
        lambda: s70 + F.conv2d(pool3, w_pool3, b_pool3)[..., 9:79, 9:79],
        lambda: ops.score_skip(s70, pool3, w_pool3, b_pool3, 1.0, (9, 9)),
        nbytes(s70) * 2 + n * 256 * 70 * 70 * pool3.element_size(),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth_gbs()
    info = fcnfast.build_info()
    lines = [
        "# fcnfast CUDA benchmarks: %s" % name,
        "",
        "torch %s, CUDA %s, fcnfast %s, CUDA backend `%s`, dtype %s, cudnn.benchmark=True. "
        "Median of %d CUDA-event timings after warm-up. Device-to-device copy bandwidth "
        "(read + write) measured in this run: **%.0f GB/s**."
        % (
            torch.__version__,
            torch.version.cuda,
            info["version"],
            fcnfast.backend("cuda"),
            args.dtype,
            args.repeat,
            copy_gbs,
        ),
        "",
        "| batch | op (FCN-8s, 500x500 input) | PyTorch ms | fcnfast ms | speed-up | "
        "fcnfast GB/s | % of copy BW | PyTorch peak MiB | fcnfast peak MiB |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    failed = 0
    for batch in args.batch:
        for label, torch_fn, fcn_fn, moved in cases(batch, dtype):
            try:
                t_ms = time_ms(torch_fn, repeat=args.repeat)
                f_ms = time_ms(fcn_fn, repeat=args.repeat)
                t_mem, f_mem = peak_mib(torch_fn), peak_mib(fcn_fn)
            except Exception as exc:  # one failing case must not lose the others' numbers
                failed += 1
                row = "| %d | %s | error: %s |  |  |  |  |  |  |" % (
                    batch,
                    label,
                    str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__,
                )
                lines.append(row)
                print(row, flush=True)
                continue
            if moved:
                gbs = moved / (f_ms * 1e-3) / 1e9
                bw = "%.0f" % gbs
                pct = "%.0f%%" % (100 * gbs / copy_gbs)
            else:
                bw = pct = "-"
            row = "| %d | %s | %.3f | %.3f | %.2fx | %s | %s | %.1f | %.1f |" % (
                batch,
                label,
                t_ms,
                f_ms,
                t_ms / f_ms,
                bw,
                pct,
                t_mem,
                f_mem,
            )
            lines.append(row)
            print(row, flush=True)
    lines += [
        "",
        "Speed-up = PyTorch ms / fcnfast ms (> 1: fcnfast faster). The PyTorch "
        "expressions are the reference ones (`fcnfast.reference`), the crop a view.",
    ]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") + ".md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("written:", path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
