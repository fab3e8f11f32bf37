"""Which forward route is faster for the small k4 s2 deconvolutions (FCN-8s's upscore2 on a
16x16 score map): ATen's transposed convolution + crop, or fcnfast's own kernels (the AVX-512
row kernel where it applies, else the oneDNN phase convolution). One process, the routes
alternated in rounds (the variables are read on every call), PyTorch's expression alongside;
median ms over all rounds. What ``use_aten_forward`` in csrc/cpu/conv_transpose2d.cpp decides.

    PYTHONPATH=. python benchmarks/conv_transpose_routes.py --classes 21 32 59 150 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _common  # benchmarks/_common.py: the machine line
import torch
import torch.nn.functional as F

from fcnfast import ops

ROUTES = {  # environment for each fcnfast route
    "ATen": {"FCNFAST_CONV_TRANSPOSE_ATEN": "1", "FCNFAST_NO_AVX512": "1"},
    "fcnfast kernels": {"FCNFAST_CONV_TRANSPOSE_ATEN": "0", "FCNFAST_NO_AVX512": "0"},
}


def _times(fn, calls: int):
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 32, 59, 150])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    saved = {k: os.environ.get(k) for env in ROUTES.values() for k in env}
    print(
        _common.machine(
            ", %d threads, load average %.2f %.2f %.2f" % ((args.threads,) + os.getloadavg())
        )
    )
    print("| C | PyTorch ms | %s |" % " | ".join("%s ms" % r for r in ROUTES))
    print("|---:|---:|" + "---:|" * len(ROUTES))
    try:
        for c in args.classes:
            x = torch.randn(1, c, args.size, args.size)
            w = torch.randn(c, c, 4, 4)
            times = {"PyTorch": [], **{r: [] for r in ROUTES}}
            for _ in range(args.rounds):
                times["PyTorch"] += _times(
                    lambda x=x, w=w: F.conv_transpose2d(x, w, stride=2), args.calls
                )
                for route, env in ROUTES.items():
                    os.environ.update(env)
                    times[route] += _times(
                        lambda x=x, w=w: ops.conv_transpose2d(x, w, None, 2), args.calls
                    )
            medians = [statistics.median(v) * 1e3 for v in times.values()]
            print("| %d | %s |" % (c, " | ".join("%.3f" % m for m in medians)))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    main()
