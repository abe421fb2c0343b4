"""Linear-Gaussian latent variable model: exact evidence and posterior, the test reference."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_lvm.plates import data_plate

__all__ = ["LinearGaussian"]


class LinearGaussian(PyroModule):
    r"""Probabilistic PCA / factor-analysis style model with closed-form inference.

    .. math::

        z \sim \mathcal N(0, I_d), \qquad x \mid z \sim \mathcal N(W z + b, \sigma^2 I_D).

    The evidence and the posterior are Gaussian:

    .. math::

        p(x) = \mathcal N(x; b, W W^\top + \sigma^2 I), \qquad
        p(z \mid x) = \mathcal N\big(\Sigma W^\top (x - b) / \sigma^2,\ \Sigma\big),
        \quad \Sigma = (I + W^\top W / \sigma^2)^{-1}.

    ``W``, ``b`` and (if ``learn_noise``) ``sigma`` are the model parameters θ.

    :param x_dim: observed dimension ``D``.
    :param z_dim: latent dimension ``d``.
    :param noise_scale: initial σ.
    :param weight: optional initial ``W`` of shape ``(D, d)``; random N(0, 1/d) otherwise.
    :param bias: optional initial ``b`` of shape ``(D,)``; zeros otherwise.
    :param learn_noise: whether σ is a learnable parameter.
    :param num_data: dataset size, needed when the model is called with ``idx``.

    Example::

        model = LinearGaussian(5, 2)
        x = model.sample(100)
        model.log_evidence(x)  # shape (100,)
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        noise_scale: float = 1.0,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        learn_noise: bool = False,
        num_data: int | None = None,
    ):
        super().__init__()
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim and z_dim must be positive, got {x_dim} and {z_dim}")
        if noise_scale <= 0:
            raise ValueError(f"noise_scale must be positive, got {noise_scale}")
        self.x_dim, self.z_dim, self.num_data = x_dim, z_dim, num_data
        if weight is None:
            weight = torch.randn(x_dim, z_dim) / z_dim**0.5
        if bias is None:
            bias = torch.zeros(x_dim)
        if weight.shape != (x_dim, z_dim) or bias.shape != (x_dim,):
            raise ValueError(
                f"weight must have shape {(x_dim, z_dim)} and bias {(x_dim,)}; "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.weight = torch.nn.Parameter(weight.clone())
        self.bias = torch.nn.Parameter(bias.clone())
        noise = torch.as_tensor(float(noise_scale), dtype=self.weight.dtype)
        if learn_noise:
            self.noise_scale = PyroParam(noise, constraint=constraints.positive)
        else:
            self.register_buffer("noise_scale", noise)

    def prior(self) -> dist.Distribution:
        """p(z) = N(0, I_d) as an event of size ``z_dim``."""
        zeros = self.weight.new_zeros(self.z_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """p(x | z) = N(W z + b, σ² I) for ``z`` of any batch shape."""
        loc = z @ self.weight.T + self.bias
        return dist.Normal(loc, self.noise_scale.expand_as(loc)).to_event(1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model: sample ``"z"`` and observe ``"x"`` inside the ``"data"`` plate."""
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(z), obs=x)
        return z

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, W Wᵀ + σ² I)."""
        cov = self.weight @ self.weight.T
        cov = cov + self.noise_scale**2 * torch.eye(self.x_dim, dtype=cov.dtype)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) for each row of ``x`` (shape ``(N,)``)."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact p(z | x): a MultivariateNormal with batch shape ``(N,)``."""
        var = self.noise_scale**2
        precision = (
            torch.eye(self.z_dim, dtype=self.weight.dtype) + self.weight.T @ self.weight / var
        )
        cov = torch.linalg.inv(precision)
        cov = 0.5 * (cov + cov.T)
        loc = (x - self.bias) @ self.weight @ cov.T / var
        return dist.MultivariateNormal(loc, covariance_matrix=cov.expand(x.shape[0], -1, -1))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` data points by ancestral sampling."""
        z = self.prior().sample((n,))
        return self.likelihood(z).sample()
