"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One PyTorch CPU thread for the test: tiny networks run faster on one thread, the few cores
    are shared by the whole test run, and CPU results stay exactly reproducible."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
