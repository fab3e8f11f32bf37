"""Thread safety and leaks of the native ops.

* Several Python threads calling every op (forward + backward) at once get
  the reference results, and bitwise the same results as a single thread
  (the kernels are deterministic gathers).
* 100k repeated small calls (forward + backward, and error paths) keep the
  resident set size flat after a warm-up.
"""

import gc
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import REFERENCE_ONLY, assert_close_scaled
from op_cases import Case, check_case, fcn_cases, forward_backward, native_ops

from fcnfast import ops

THREADS = 8
ROUNDS = 3  # calls of each case per thread


def _require_native_ops():
    if REFERENCE_ONLY:
        pytest.skip("FCNFAST_BACKEND=reference")
    names = native_ops()
    if not names:
        pytest.skip("no native CPU kernels in this build")
    return names


def concurrency_cases(names):
    cases = [
        c
        for c in fcn_cases(16, 16) + fcn_cases(11, 19, dtype=torch.float64, seed=1)
        if c.op in names
    ]
    assert {c.op for c in cases} == set(names)
    return cases


def _same(a, b):
    return torch.equal(a, b) if a is not None and b is not None else (a is None and b is None)


def test_threads_match_reference_and_single_thread():
    names = _require_native_ops()
    cases = concurrency_cases(names)
    for case in cases:  # single thread: native vs reference
        assert check_case(case) == "native", case.describe()
    expected = [forward_backward(ops, case) for case in cases]

    def worker(index):
        mismatches = []
        for round_ in range(ROUNDS):
            for k in range(len(cases)):
                i = (k + index + round_) % len(cases)  # threads run different ops at once
                out, grads = forward_backward(ops, cases[i])
                out_e, grads_e = expected[i]
                if not (_same(out, out_e) and all(_same(g, e) for g, e in zip(grads, grads_e))):
                    mismatches.append(cases[i].describe())
        return mismatches

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(worker, range(THREADS)))
    mismatched = sorted({m for r in results for m in r})
    assert not mismatched, "results under %d threads differ from a single thread:\n%s" % (
        THREADS,
        "\n".join(mismatched),
    )


def test_threads_with_own_intra_op_threads():
    """Threads that also change torch's intra-op thread count, as data loaders do."""
    names = _require_native_ops()
    cases = concurrency_cases(names)
    previous = torch.get_num_threads()

    def worker(index):
        torch.set_num_threads(1 + index % 2)
        for case in cases:
            out, grads = forward_backward(ops, case)
            out_r, grads_r = forward_backward(__import__("fcnfast").reference, case)
            if case.op == "upsample_argmax":
                assert torch.equal(out, out_r), case.describe()
                continue
            assert_close_scaled(out, out_r, what=case.describe())
            for g, gr in zip(grads, grads_r):
                assert_close_scaled(g, gr, what="grad of " + case.describe())
        return True

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert all(pool.map(worker, range(4)))
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------------
# leaks
# ---------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def tiny_cases(names):
    def r(*shape):
        return torch.randn(shape)

    target = torch.randint(0, 3, (1, 4, 4))
    target[0, 0] = 255
    all_cases = [
        Case(
            "conv_transpose2d",
            (r(1, 2, 3, 3), r(2, 2, 2, 2), r(2)),
            dict(stride=2, crop=(1, 1, 4, 4)),
        ),
        Case("bilinear_upsample2d", (r(1, 2, 3, 3),), dict(scale=2, crop=(1, 1, 5, 5))),
        Case("skip_add_crop", (r(1, 2, 3, 3), r(1, 2, 5, 5)), dict(offset=(1, 2))),
        Case(
            "score_skip", (r(1, 2, 3, 3), r(1, 3, 5, 5), r(2, 3, 1, 1), r(2)), dict(offset=(1, 1))
        ),
        Case("upsample_argmax", (r(1, 3, 3, 3),), dict(scale=2, crop=(1, 1, 4, 4))),
        Case("upsample_cross_entropy", (r(1, 3, 3, 3), target), dict(scale=2, crop=(1, 1, 4, 4))),
    ]
    return [c for c in all_cases if c.op in names]


def _bad_calls(names):
    """Direct native calls that raise in C++ (error paths must not leak either)."""
    calls = []
    if "skip_add_crop" in names:
        calls.append(
            lambda: torch.ops.fcnfast.skip_add_crop(
                torch.ones(1, 1, 4, 4), torch.ones(1, 1, 5, 5), [3, 3]
            )
        )
    if "bilinear_upsample2d" in names:
        calls.append(
            lambda: torch.ops.fcnfast.bilinear_upsample2d(torch.ones(1, 1, 2, 2), 2, [0, 0, 99, 1])
        )
    if "conv_transpose2d" in names:
        calls.append(
            lambda: torch.ops.fcnfast.conv_transpose2d(
                torch.ones(1, 2, 2, 2),
                torch.ones(2, 1, 2, 2),
                None,
                [0, 1],
                [0, 0],
                [0, 0],
                1,
                [1, 1],
                [0, 0, 1, 1],
            )
        )
    return calls


CALLS = int(os.environ.get("FCNFAST_LEAK_CALLS", "100000"))
RSS_TOLERANCE = 4 << 20  # bytes


def test_repeated_calls_keep_rss_flat(record_property):
    names = _require_native_ops()
    cases = tiny_cases(names)
    bad = _bad_calls(names)

    def run(count):
        for i in range(count):
            forward_backward(ops, cases[i % len(cases)])
            if bad and i % 10 == 0:
                try:
                    bad[(i // 10) % len(bad)]()
                except (ValueError, RuntimeError):
                    pass
                else:
                    raise AssertionError("a bad call did not raise")

    run(CALLS // 20)  # warm-up: allocator caches, autograd graph pools
    gc.collect()
    before = rss_bytes()
    start = time.perf_counter()
    run(CALLS)
    elapsed = time.perf_counter() - start
    gc.collect()
    after = rss_bytes()
    growth = after - before
    record_property("rss_before_mb", round(before / 2**20, 2))
    record_property("rss_growth_kb", round(growth / 1024, 1))
    record_property("calls_per_s", round(CALLS / elapsed))
    print(
        "RSS %.1f MB -> %.1f MB (%+.1f kB) over %d calls of %s (+%d failing calls), %.1f s"
        % (
            before / 2**20,
            after / 2**20,
            growth / 1024,
            CALLS,
            [c.op for c in cases],
            CALLS // 10 if bad else 0,
            elapsed,
        )
    )
    assert growth <= RSS_TOLERANCE, "RSS grew by %.1f MB over %d calls (leak?)" % (
        growth / 2**20,
        CALLS,
    )
