"""Sequential datasets: binarized MNIST read row by row, and a synthetic linear-Gaussian SSM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyro_lvm.data.mnist import load_binarized_mnist

__all__ = ["load_mnist_rows", "sample_ssm_sequences"]


def load_mnist_rows(split: str = "train", root: str | Path | None = None) -> torch.Tensor:
    """Statically binarized MNIST as sequences: 28 steps of 28 pixels, shape ``(N, 28, 28)``.

    Step t is image row t (top to bottom), the sequential-MNIST reading of the sequence-model
    literature (e.g. Le et al. 2018, AESMC). Loaded and validated by
    :func:`~pyro_lvm.data.load_binarized_mnist` (same ``split`` and ``root``).
    """
    return load_binarized_mnist(split, root=root).reshape(-1, 28, 28)


def sample_ssm_sequences(model: Any, n: int, num_steps: int, seed: int | None = 0) -> torch.Tensor:
    """``n`` sequences of ``num_steps`` steps from a linear-Gaussian SSM, shape ``(n, T, D)``.

    ``model`` is a :class:`~pyro_lvm.models.LinearGaussianSSM` (any object whose
    ``sample(n, num_steps)`` draws sequences; the data layer imports no model).

    A synthetic dataset whose exact log-likelihood is known (``model.log_evidence``). With an
    integer ``seed`` the global RNG is forked, so the draw is reproducible and leaves the
    caller's RNG untouched.
    """
    if int(n) < 1 or int(num_steps) < 1:
        raise ValueError(f"n and num_steps must be positive, got {n} and {num_steps}")
    if seed is None:
        return model.sample(int(n), int(num_steps))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.sample(int(n), int(num_steps))
