"""Deep Markov model: neural transitions and Bernoulli or Gaussian emissions, step-wise."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_lvm.sequential import MarkovStateSpaceModel

__all__ = ["DeepMarkovModel", "GatedTransition"]

EMISSIONS = ("bernoulli", "gaussian")


class GatedTransition(nn.Module):
    r"""Gated transition of Krishnan et al. (2017): a learned mix of linear and nonlinear.

    .. math::

        g = \sigma(\mathrm{MLP}_g(z)), \quad
        \mu = (1 - g) \odot L z + g \odot \mathrm{MLP}_h(z), \quad
        \sigma = \mathrm{softplus}(W\, \mathrm{relu}(\mathrm{MLP}_h(z))) .

    ``L`` starts at the identity, so an untrained model drifts slowly.
    """

    def __init__(self, z_dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.proposed = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, z_dim))
        self.linear = nn.Linear(z_dim, z_dim)
        self.scale = nn.Linear(z_dim, z_dim)
        nn.init.eye_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.gate(z))
        proposed = self.proposed(z)
        loc = (1 - gate) * self.linear(z) + gate * proposed
        return loc, F.softplus(self.scale(F.relu(proposed))) + 1e-4


class DeepMarkovModel(MarkovStateSpaceModel):
    r"""Deep Markov model (Krishnan, Shalit & Sontag 2017, arXiv:1609.09869), step-wise.

    .. math::

        z_t \mid z_{t-1} \sim \mathcal N(\mu_\theta(z_{t-1}), \mathrm{diag}\,
        \sigma_\theta^2(z_{t-1})), \qquad
        x_t \mid z_t \sim \mathrm{Bernoulli}(\mathrm{logits}_\theta(z_t))
        \ \text{or}\ \mathcal N(\mu_\theta(z_t), \mathrm{diag}\, s^2),

    with :math:`z_0` a learned vector, the transition :class:`GatedTransition` and the
    emission an MLP. It follows the step-wise convention of
    :class:`~pyro_lvm.models.SequentialProgram` (sites ``"z_t"``, ``"x_t"`` in the
    ``"data"`` plate; ``state["z"]`` the previous latent), so it runs under SMC
    (:class:`pyro_lvm.elbo.FIVO`) and, wrapped, under every other estimator. Pair it with
    :class:`pyro_lvm.guides.RNNGuide`.

    :param x_dim: observation size per step.
    :param z_dim: latent size per step.
    :param hidden: hidden width of the transition and emission networks.
    :param emission: ``"bernoulli"`` (binary data) or ``"gaussian"`` (a learned diagonal scale).
    :param num_data: dataset size, needed when called with ``idx``.
    :param name: prefix of the parameters in Pyro's param store.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: int = 64,
        emission: str = "bernoulli",
        num_data: int | None = None,
        name: str = "dmm",
    ):
        super().__init__()
        if emission not in EMISSIONS:
            raise ValueError(f"emission must be one of {EMISSIONS}, got {emission!r}")
        if min(x_dim, z_dim, hidden) < 1:
            raise ValueError(f"x_dim, z_dim, hidden must be positive: {x_dim, z_dim, hidden}")
        self.x_dim, self.z_dim, self.emission_kind = x_dim, z_dim, emission
        self.num_data, self.name = num_data, name
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.transition = GatedTransition(z_dim, hidden)
        self.emitter = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, x_dim),
        )  # fmt: skip
        self.log_scale = nn.Parameter(torch.zeros(x_dim)) if emission == "gaussian" else None

    def transition_dist(self, z_prev: torch.Tensor | None) -> dist.Distribution:
        """p(z_t | z_{t-1}), with z_0 the learned start when ``z_prev`` is ``None``."""
        loc, scale = self.transition(self.z_0 if z_prev is None else z_prev)
        return dist.Normal(loc, scale).to_event(1)

    def emission_dist(self, z: torch.Tensor) -> dist.Distribution:
        """p(x_t | z_t)."""
        out = self.emitter(z)
        if self.log_scale is None:
            return dist.Bernoulli(logits=out).to_event(1)
        return dist.Normal(out, self.log_scale.exp().expand_as(out)).to_event(1)
