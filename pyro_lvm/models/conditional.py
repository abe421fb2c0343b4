"""The conditional VAE p(x | c) = ∫ p(x | z, c) p(z | c) dz with q(z | x, c)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, pyro_method

from pyro_lvm.distributions import PathwiseNormal
from pyro_lvm.models.vae import observation_distribution
from pyro_lvm.nn import NetworkFactory, apply_to_concat, gaussian_scale, mlp
from pyro_lvm.plates import data_plate

__all__ = ["ConditionalVAE"]


class ConditionalVAE(PyroModule):
    r"""The conditional VAE of Sohn et al. (2015) with a learned conditional prior.

    .. math::

        z \mid c \sim \mathcal N(\mu_\psi(c), \mathrm{diag}\,\sigma_\psi^2(c)), \quad
        x \mid z, c \sim \mathrm{Bernoulli}(\sigma(g_\theta(z, c))); \qquad
        q_\phi(z \mid x, c) = \mathcal N(\mu_\phi(x, c), \mathrm{diag}\,\sigma_\phi^2(x, c)),

    trained on the conditional bound
    :math:`\log p(x \mid c) \ge \mathbb E_q[\log p(x \mid z, c) + \log p(z \mid c) - \log
    q(z \mid x, c)]`. The conditioning input arrives as the named tensor ``c``:
    ``model(x, idx=None, c=...)``, data ``{"x": x, "c": c}`` (e.g.
    :func:`~pyro_lvm.data.split_quadrants`), so :func:`~pyro_lvm.evaluate.log_likelihood`
    on the same mapping is the importance-sampled conditional log-likelihood
    :math:`\log \frac1K \sum_k p(x, z_k \mid c) / q(z_k \mid x, c)` (Sohn et al., eq. 7).

    :param x_dim: dimension of the predicted output x.
    :param c_dim: dimension of the conditioning input c.
    :param z_dim: latent dimension.
    :param hidden: hidden widths of the prior, recognition and generation networks.
    :param num_data: dataset size (set by :func:`~pyro_lvm.train.fit`).
    :param network: builds every network, ``network(in, hidden, out)``.

    References:

    1. K. Sohn, H. Lee, X. Yan (2015). Learning Structured Output Representation using
       Deep Conditional Generative Models. NeurIPS.
    """

    def __init__(
        self,
        x_dim: int,
        c_dim: int,
        z_dim: int = 16,
        hidden: Sequence[int] = (500,),
        num_data: int | None = None,
        network: NetworkFactory = mlp,
    ):
        super().__init__()
        self.x_dim, self.c_dim, self.z_dim, self.num_data = (
            int(x_dim),
            int(c_dim),
            int(z_dim),
            num_data,
        )
        self.prior_net = network(self.c_dim, list(hidden), 2 * self.z_dim)
        self.encoder = network(self.x_dim + self.c_dim, list(hidden), 2 * self.z_dim)
        self.decoder = network(self.z_dim + self.c_dim, list(hidden)[::-1], self.x_dim)

    @staticmethod
    def _gaussian(out: torch.Tensor) -> dist.Distribution:
        loc, raw = out.chunk(2, dim=-1)
        return PathwiseNormal(loc, gaussian_scale(raw, 1e-4)).to_event(1)

    def _check(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        if c is None:
            raise ValueError(
                "ConditionalVAE needs the conditioning input: pass data as {'x': x, 'c': c}"
            )
        if x.shape[-1] != self.x_dim or c.shape[-1] != self.c_dim or c.shape[0] != x.shape[0]:
            raise ValueError(
                f"need x of shape (N, {self.x_dim}) and c of shape (N, {self.c_dim}), got "
                f"{tuple(x.shape)} and {tuple(c.shape)}"
            )
        return c.to(x.dtype)

    def prior(self, c: torch.Tensor) -> dist.Distribution:
        """p(z | c)."""
        return self._gaussian(self.prior_net(c))

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> dist.Distribution:
        """p(x | z, c)."""
        return observation_distribution(apply_to_concat(self.decoder, c, z), "bernoulli")

    def posterior(self, x: torch.Tensor, c: torch.Tensor) -> dist.Distribution:
        """q(z | x, c)."""
        return self._gaussian(apply_to_concat(self.encoder, x, c))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None, c=None) -> torch.Tensor:
        """The model: z ~ p(z | c), x ~ p(x | z, c) in the ``"data"`` plate."""
        c = self._check(x, c)
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", self.prior(c))
            pyro.sample("x", self.decode(z, c), obs=x)
        return z

    @pyro_method
    def guide(self, x: torch.Tensor, idx: torch.Tensor | None = None, c=None) -> torch.Tensor:
        """The guide: z ~ q(z | x, c)."""
        c = self._check(x, c)
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", self.posterior(x, c))

    @torch.no_grad()
    def sample(self, c: torch.Tensor, num_samples: int = 1, mean: bool = True) -> torch.Tensor:
        """Draws of x given each row of ``c``: shape ``(num_samples, len(c), x_dim)``."""
        c = torch.as_tensor(c, dtype=torch.get_default_dtype())
        z = self.prior(c).sample((num_samples,))
        px = self.decode(z, c)
        return px.mean if mean else px.sample()
