"""Shared fixtures: a clean param store, validation on, float64 by default, seeded RNG."""

import os
from pathlib import Path

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _pyro_state():
    """Each test starts with an empty param store, validation enabled, float64 and seed 0."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()


@pytest.fixture
def mnist_root() -> Path:
    """The folder holding binarized_mnist.npz, or a skip stating why it is absent."""
    root = os.environ.get("PYRO_LVM_DATA")
    if not root:
        pytest.skip("PYRO_LVM_DATA is not set: point it at a folder with binarized_mnist.npz")
    path = Path(root)
    if not (path / "binarized_mnist.npz").exists():
        pytest.skip(f"binarized_mnist.npz not found in PYRO_LVM_DATA={root}")
    return path
