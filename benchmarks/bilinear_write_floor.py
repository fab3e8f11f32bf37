"""Bilinear x8 forward against the write floor of its own output: ``fill_`` and ``copy_``.

    python benchmarks/bilinear_write_floor.py [--threads 1 2] [--classes 21 59 150]

For the FCN-8s final upsampling (x of shape (1, C, 70, 70), crop (31, 31, 500, 500): a
C x 500 x 500 float32 output) it times, per thread count, the median of 30 calls of
``ops.bilinear_upsample2d`` and, on a tensor of the same size, ``fill_`` (writes only: the
store floor) and ``copy_`` (read + write). Outputs of 59-150 MB do not fit a 32 MB L3 cache,
so their floor is the machine's store bandwidth, not a cache-resident copy.
"""

from __future__ import annotations

import argparse
import os

import _common  # benchmarks/_common.py: the machine line, median_ms
import torch

from fcnfast import ops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 59, 150])
    args = parser.parse_args(argv)
    print(_common.machine(", load average %s" % " ".join("%.1f" % v for v in os.getloadavg())))
    print(
        "| threads | C | output MB | op ms | op GB/s written | fill_ GB/s | op / fill_ | copy_ GB/s (r+w) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for c in args.classes:
            x = torch.randn(1, c, 70, 70)
            upsample = lambda x=x: ops.bilinear_upsample2d(x, 8, crop=(31, 31, 500, 500))  # noqa: E731
            out = upsample()
            dst, src = torch.empty_like(out), torch.randn_like(out)
            mb = out.numel() * out.element_size() / 1e6
            t_op = _common.median_ms(upsample, calls=30, warmup=5)
            t_fill = _common.median_ms(lambda dst=dst: dst.fill_(1.0), calls=30, warmup=5)
            t_copy = _common.median_ms(lambda dst=dst, src=src: dst.copy_(src), calls=30, warmup=5)
            print(
                "| %d | %d | %.0f | %.2f | %.1f | %.1f | %.0f%% | %.1f |"
                % (
                    threads,
                    c,
                    mb,
                    t_op,
                    mb / t_op,
                    mb / t_fill,
                    100 * t_fill / t_op,
                    2 * mb / t_copy,
                )
            )


if __name__ == "__main__":
    main()
