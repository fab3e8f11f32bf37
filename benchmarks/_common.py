"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

import os
import platform
import time

import torch


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or ``"?"``."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return cpu


def machine(details: str) -> str:
    """``"<cpu>, <n> cores, torch <version><details>"``: the machine line of a results file.

    Args:
        details (str): appended as it is (e.g. ``", load average ..."``).

    Returns:
        str: the line.
    """
    return "%s, %d cores, torch %s%s" % (cpu_model(), os.cpu_count(), torch.__version__, details)


def median_ms(fn, calls: int, warmup: int = 1) -> float:
    """The median wall time of ``calls`` calls of ``fn`` in ms (the upper one of an even count),
    after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3
