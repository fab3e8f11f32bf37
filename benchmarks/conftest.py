"""pytest-benchmark setup for benchmarks/bench_*.py.

Run (from the repository root, after building the extension):

    python -m pytest benchmarks/ --benchmark-only --benchmark-group-by=group \
        --benchmark-columns=min,median,rounds

Each benchmark group holds the PyTorch expression and the fcnfast op on the same
inputs, so the ratio of their medians is the speed-up on this machine.
FCNFAST_BENCH_THREADS sets torch's intra-op threads (default: torch's choice);
the thread count, backend and CPU capability are stored in each result's
extra_info.
"""

import os

import pytest
import torch

import fcnfast


def pytest_collect_file(file_path, parent):
    # benchmark files are named bench_*.py so the test run never collects them;
    # a file named on the command line is collected by pytest itself
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    threads = os.environ.get("FCNFAST_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


@pytest.fixture
def bench(benchmark):
    """``benchmark`` with the run's settings recorded; call ``bench(group, fn)``."""

    def run(group, fn):
        benchmark.group = group
        benchmark.extra_info.update(
            threads=torch.get_num_threads(),
            backend=fcnfast.backend(),
            cpu_capability=torch.backends.cpu.get_cpu_capability(),
        )
        fn()  # warm-up: allocations, lazy initialisation
        return benchmark(fn)

    return run
