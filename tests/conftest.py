"""Fixtures shared by every test module (toy models live in :mod:`tests.toys`)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_session():
    """One intra-op thread: the tensors are tiny and several test runs share 2 cores, where more threads only add
    synchronisation cost (10-40x slower measured). Session-wide, so module-scoped fixtures (a reference training
    run) use it too and compare bit for bit with the runs made inside tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread(_one_thread_session):
    """Each test starts with one thread, even after a test that set its own (a training run's ``threads``)."""
    torch.set_num_threads(1)
