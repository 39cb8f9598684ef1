"""Fixtures of the experiment-grid tests."""

from __future__ import annotations

import os

import pytest

from smoothtransfer.errors import UserError


@pytest.fixture(scope="session")
def data_root() -> str:
    """The shared datasets folder (grids are validated against it); skips where it or CIFAR-10 is missing."""
    from smoothtransfer.data.datasets import resolve_data_root

    try:
        root = resolve_data_root(os.environ.get("SMOOTHTRANSFER_DATA"))
    except UserError:
        pytest.skip("datasets folder not found (set SMOOTHTRANSFER_DATA)")
    if not (root / "cifar10").is_dir():
        pytest.skip(f"no cifar10 in {root}")
    return str(root)
