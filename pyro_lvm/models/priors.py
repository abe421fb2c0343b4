"""Priors p(z) for latent variable models: modules whose ``forward()`` returns a distribution."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

__all__ = ["StandardNormalPrior"]


class StandardNormalPrior(PyroModule):
    """p(z) = N(0, I): the VAE's default prior, an event of size ``z_dim``, batch shape ()."""

    def __init__(self, z_dim: int):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.z_dim = z_dim
        self.register_buffer("_zeros", torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self._zeros, torch.ones_like(self._zeros)).to_event(1)
