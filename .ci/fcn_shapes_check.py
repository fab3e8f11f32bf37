"""Run every fcnfast op forward + backward on FCN-8s / FCN-32s shapes and compare with the reference.

Used by .ci/sanitize (under ASan/UBSan: no invalid read or write on the real FCN geometry) and
.ci/wheel_check (smoke test of an installed wheel, run from outside the source tree).

    python .ci/fcn_shapes_check.py [--sizes 64x64,37x53,1x1] [--allow-reference]

Exits non-zero when an op differs from the reference or, unless --allow-reference, has no
native CPU kernel.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/ only (op_cases, conftest): fcnfast itself must come from the installed package
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402
from op_cases import OPS, check_case, fcn_cases, native_ops  # noqa: E402

import fcnfast  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="64x64,37x53,1x1",
        help="comma-separated HxW input image sizes (default %(default)s)",
    )
    parser.add_argument(
        "--allow-reference", action="store_true", help="do not fail when an op has no native kernel"
    )
    args = parser.parse_args(argv)
    info = fcnfast.build_info()
    print(
        "fcnfast %s from %s: backend=%s sanitize=%s torch=%s"
        % (
            info["version"],
            os.path.dirname(fcnfast.__file__),
            info["backend"],
            info.get("sanitize"),
            info["torch"],
        )
    )
    missing = [op for op in OPS if op not in native_ops()]
    if missing:
        print("no native CPU kernel for: %s" % ", ".join(missing))
        if not args.allow_reference:
            return 1
    count, start = 0, time.time()
    for size in args.sizes.split(","):
        h, w = (int(v) for v in size.split("x"))
        for dtype in (torch.float32, torch.float64):
            for case in fcn_cases(h, w, dtype=dtype, seed=h * 1000 + w):
                path = check_case(case)
                count += 1
                print("ok %-9s %s" % (path, case.describe()))
    print(
        "fcn shapes check: %d cases (%s) passed in %.1f s"
        % (count, args.sizes, time.time() - start)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
