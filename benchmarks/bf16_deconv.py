"""The learned FCN-8s upscore8 deconvolution (k16 s8 + crop, 70x70 -> 500x500) in bfloat16:
time and error against float64, side by side with PyTorch's expression.

Rows, per class count C: PyTorch's ``F.conv_transpose2d(...)[..., 31:531, 31:531]`` in fp32 and
in bf16, and ``fcnfast.ops.conv_transpose2d`` in fp32, in bf16 on its bf16 GEMM path (oneDNN's
AVX512-BF16 kernels, fp32 accumulation; CPUs with AVX512-BF16 only) and in bf16 converted to fp32
first (``FCNFAST_NO_AVX512=1``, the path of every other CPU). The error is max |y - y64| / max |y64|
against the float64 result on the same (bf16-rounded) inputs, so it measures the arithmetic, not
the rounding of the inputs. Times: median of ``--reps`` calls after one warm-up call.

    PYTHONPATH=. python benchmarks/bf16_deconv.py --classes 21 59 150 --threads 2 [--backward]

``--backward``: forward + backward with a fixed upstream gradient instead, and the error of the
worse of the two gradients (x, weight) against float64.
"""

from __future__ import annotations

import argparse
import os

import _common  # benchmarks/_common.py: the machine line, median_ms
import torch
import torch.nn.functional as F

from fcnfast import ops

CROP = (31, 31, 500, 500)


def _rel_error(y: torch.Tensor, y64: torch.Tensor) -> float:
    return ((y.double() - y64).abs().max() / y64.abs().max()).item()


def _fcnfast(no_avx512: bool):
    def run(x, w):
        previous = os.environ.get("FCNFAST_NO_AVX512")
        os.environ["FCNFAST_NO_AVX512"] = "1" if no_avx512 else "0"
        try:
            return ops.conv_transpose2d(x, w, None, 8, crop=CROP)
        finally:
            if previous is None:
                del os.environ["FCNFAST_NO_AVX512"]
            else:
                os.environ["FCNFAST_NO_AVX512"] = previous

    return run


def _pytorch(x, w):
    top, left, h, wd = CROP
    return F.conv_transpose2d(x, w, stride=8)[..., top : top + h, left : left + wd]


def rows(c: int, reps: int, backward: bool):
    """(implementation, median ms, max relative error vs float64) per implementation; with
    ``backward`` the time of forward + backward (a fixed upstream gradient) and the error of
    the worse of grad_x and grad_weight."""
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(1, c, 70, 70, generator=gen).bfloat16()
    w = (torch.randn(c, c, 16, 16, generator=gen) / (4 * c**0.5)).bfloat16()
    upstream = torch.randn(1, c, CROP[2], CROP[3], generator=gen).bfloat16()

    def run(fn, dtype):
        xl, wl = x.to(dtype), w.to(dtype)
        if not backward:
            return lambda: fn(xl, wl)
        xl.requires_grad_()
        wl.requires_grad_()
        grad = upstream.to(dtype)
        return lambda: torch.autograd.grad(fn(xl, wl), (xl, wl), grad)

    def error(out, ref):
        if not backward:
            return _rel_error(out, ref)
        return max(_rel_error(o, r) for o, r in zip(out, ref))

    ref = run(_pytorch, torch.float64)()
    cases = [
        ("PyTorch fp32", run(_pytorch, torch.float32)),
        ("PyTorch bf16", run(_pytorch, torch.bfloat16)),
        ("fcnfast fp32", run(_fcnfast(no_avx512=False), torch.float32)),
        ("fcnfast bf16 (bf16 GEMM)", run(_fcnfast(no_avx512=False), torch.bfloat16)),
        ("fcnfast bf16 (fp32 GEMM)", run(_fcnfast(no_avx512=True), torch.bfloat16)),
    ]
    for name, fn in cases:
        yield name, _common.median_ms(fn, reps), error(fn(), ref)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 59, 150])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--backward", action="store_true", help="time forward + backward, error of the gradients"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    details = ", %d threads, avx512_bf16 %s, load average %.2f %.2f %.2f" % (
        (args.threads, "avx512_bf16" in flags) + os.getloadavg()
    )
    print(_common.machine(details))
    what = "forward + backward" if args.backward else "forward"
    print(what)
    print("| C | implementation | ms | x vs PyTorch bf16 | max rel. error vs fp64 |")
    print("|---:|---|---:|---:|---:|")
    for c in args.classes:
        results = list(rows(c, args.reps, args.backward))
        torch_bf16 = dict((name, ms) for name, ms, _ in results)["PyTorch bf16"]
        for name, ms, err in results:
            print("| %d | %s | %.1f | %.2fx | %.2e |" % (c, name, ms, torch_bf16 / ms, err))


if __name__ == "__main__":
    main()
