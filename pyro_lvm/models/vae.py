"""The variational autoencoder as an infinite mixture: z ~ p(z), x | z ~ p_θ(x | z)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.contract import SharesNumData
from pyro_lvm.guides.amortized import AmortizedGaussianGuide
from pyro_lvm.models.priors import StandardNormalPrior
from pyro_lvm.nn import NetworkFactory, mlp
from pyro_lvm.plates import data_plate

__all__ = ["VAE", "observation_distribution"]

Likelihood = Literal["bernoulli", "gaussian"]


def observation_distribution(
    out: torch.Tensor, likelihood: Likelihood, min_scale: float = 1e-3
) -> dist.Distribution:
    """p(x | ·) from a decoder's output: Bernoulli logits, or Gaussian (loc, raw scale) halves.

    The Gaussian's standard deviation is ``softplus(raw) + min_scale``; the event is the last dim.
    """
    if likelihood == "bernoulli":
        return dist.Bernoulli(logits=out, validate_args=False).to_event(1)
    loc, raw_scale = out.chunk(2, dim=-1)
    return dist.Normal(loc, F.softplus(raw_scale) + min_scale).to_event(1)


class VAE(SharesNumData, PyroModule):
    r"""A VAE model p_θ(x, z) = p(z) p_θ(x | z) with a matching amortized guide.

    .. math::

        z \sim p(z) \;(\text{default } \mathcal N(0, I)), \qquad
        x \mid z \sim \mathrm{Bernoulli}(\mathrm{sigmoid}(g_\theta(z)))
        \ \text{or}\ \mathcal N(\mu_\theta(z), \mathrm{diag}\,\sigma_\theta^2(z)),

    so p_θ(x) = ∫ p(z) p_θ(x | z) dz is an infinite mixture. Calling the module runs the model
    (sites ``"z"`` and ``"x"`` in the ``"data"`` plate); ``vae.guide`` is the guide::

        vae = VAE(x_dim=64, z_dim=2, hidden=(128,))
        svi = pyro.infer.SVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
        svi.step(x)

    :param x_dim: data dimension.
    :param z_dim: latent dimension.
    :param hidden: decoder hidden widths (the default encoder mirrors them).
    :param likelihood: ``"bernoulli"`` for binary data, ``"gaussian"`` for continuous data.
    :param prior: a module whose ``forward()`` returns p(z); N(0, I) by default.
    :param guide: a guide module with the contract ``guide(x, idx=None)``; an
        :class:`~pyro_lvm.guides.AmortizedGaussianGuide` by default.
    :param min_scale: lower bound on the Gaussian decoder's standard deviation.
    :param num_data: dataset size, needed when called with ``idx`` (kept in sync with the guide).
    :param network: builds the decoder and the default encoder, ``network(in, hidden, out)``;
        e.g. :func:`~pyro_lvm.nn.gated_mlp` for the VampPrior paper's gated layers.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200,),
        likelihood: Likelihood = "bernoulli",
        prior: nn.Module | None = None,
        guide: nn.Module | None = None,
        min_scale: float = 1e-3,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        self.x_dim, self.z_dim, self.hidden = x_dim, z_dim, tuple(hidden)
        self.likelihood, self.min_scale = likelihood, min_scale
        out = x_dim if likelihood == "bernoulli" else 2 * x_dim
        self.decoder = network(z_dim, list(reversed(self.hidden)), out)
        self.prior = StandardNormalPrior(z_dim) if prior is None else prior
        if guide is None:
            guide = AmortizedGaussianGuide(x_dim, z_dim, self.hidden, network=network)
        self.guide = guide
        self.num_data = num_data

    def decode(self, z: torch.Tensor) -> dist.Distribution:
        """p_θ(x | z) for ``z`` of any batch shape, with event shape ``(x_dim,)``."""
        return observation_distribution(self.decoder(z), self.likelihood, self.min_scale)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model: ``z ~ p(z)``, ``x ~ p_θ(x | z)`` inside the ``"data"`` plate."""
        if x.shape[-1] != self.x_dim:
            raise ValueError(
                f"x has {x.shape[-1]} features but the VAE was built with x_dim={self.x_dim}"
            )
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decode(z), obs=x)
        return z

    def encode(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x) from the guide (requires a guide with a ``posterior(x)`` method)."""
        return self.guide.posterior(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_z: bool = False) -> torch.Tensor:
        """Mean of p_θ(x | z) at z = the mean of q(z | x) (or a sample when ``sample_z``)."""
        q = self.encode(x)
        z = q.sample() if sample_z else q.mean
        return self.decode(z).mean

    @torch.no_grad()
    def sample(self, n: int, mean: bool = True) -> torch.Tensor:
        """Ancestral sampling: z ~ p(z), then x ~ p_θ(x | z) (its mean when ``mean``)."""
        z = self.prior().sample((n,))
        px = self.decode(z)
        return px.mean if mean else px.sample()
