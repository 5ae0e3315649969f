"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and on a shared 2-core machine OpenMP threads
    waiting for each other behind another busy process made steps ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
