"""Autouse fixture for CPU-heavy model/data tests (import it into a test module)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_intraop_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, OpenMP spin-waiting makes many
    small convolutions tens of times slower with 2 threads than with 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
