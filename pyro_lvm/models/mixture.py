"""Finite mixture of Gaussians: exact evidence by enumeration, and EM."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints

from pyro_lvm.plates import data_plate

__all__ = ["GaussianMixture"]


class GaussianMixture(PyroModule):
    r"""The lecture's finite mixture of diagonal Gaussians.

    .. math::

        z \sim \mathrm{Categorical}(\pi), \qquad
        x \mid z \sim \mathcal N(\mu_z, \mathrm{diag}\,\sigma_z^2), \qquad
        p(x) = \sum_{k=1}^{C} \pi_k\, \mathcal N(x; \mu_k, \mathrm{diag}\,\sigma_k^2).

    The latent site ``"z"`` is marked for parallel enumeration, so ``TraceEnum_ELBO`` with an
    empty guide computes the exact ``log p(x)``. :meth:`em_step` is variational EM with
    q(z) set to the exact posterior, where the ELBO equals ``log p(x)`` (Dempster et al. 1977).

    :param num_components: number of components ``C``.
    :param x_dim: data dimension.
    :param locs: optional initial means ``(C, x_dim)``; random N(0, 1) otherwise.
    :param scales: optional initial standard deviations ``(C, x_dim)``; ones otherwise.
    :param weights: optional initial mixture weights ``(C,)``; uniform otherwise.
    :param num_data: dataset size, needed when the model is called with ``idx``.
    """

    def __init__(
        self,
        num_components: int,
        x_dim: int,
        locs: torch.Tensor | None = None,
        scales: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        num_data: int | None = None,
    ):
        super().__init__()
        if num_components < 1 or x_dim < 1:
            raise ValueError(
                f"num_components and x_dim must be positive, got {num_components} and {x_dim}"
            )
        self.num_components, self.x_dim, self.num_data = num_components, x_dim, num_data
        shape = (num_components, x_dim)
        locs = torch.randn(shape) if locs is None else torch.as_tensor(locs)
        scales = torch.ones(shape) if scales is None else torch.as_tensor(scales)
        if weights is None:
            weights = torch.full((num_components,), 1.0 / num_components)
        weights = torch.as_tensor(weights)
        if locs.shape != shape or scales.shape != shape or weights.shape != (num_components,):
            raise ValueError(
                f"expected locs and scales of shape {shape} and weights of shape "
                f"{(num_components,)}; got {tuple(locs.shape)}, {tuple(scales.shape)}, "
                f"{tuple(weights.shape)}"
            )
        self.locs = torch.nn.Parameter(locs.clone().to(torch.get_default_dtype()))
        self.scales = PyroParam(
            scales.clone().to(torch.get_default_dtype()), constraint=constraints.positive
        )
        self.weights = PyroParam(
            weights.clone().to(torch.get_default_dtype()), constraint=constraints.simplex
        )

    def component_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log π_k + log N(x; μ_k, σ_k²) for each row and component: shape ``(N, C)``."""
        comp = dist.Normal(self.locs, self.scales).to_event(1)
        return comp.log_prob(x.unsqueeze(-2)) + self.weights.log()

    def log_evidence(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) per row (shape ``(N,)``)."""
        return self.component_log_prob(x).logsumexp(-1)

    def posterior(self, x: torch.Tensor) -> dist.Categorical:
        """Exact p(z | x): responsibilities as a Categorical with batch shape ``(N,)``."""
        return dist.Categorical(logits=self.component_log_prob(x))

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The model: ``"z"`` (enumerable) then ``"x"`` inside the ``"data"`` plate."""
        with data_plate(x, idx, self.num_data):
            z = pyro.sample("z", dist.Categorical(self.weights), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(self.locs[z], self.scales[z]).to_event(1), obs=x)
        return z

    @torch.no_grad()
    def em_step(self, x: torch.Tensor, min_scale: float = 1e-3) -> torch.Tensor:
        """One EM step on ``x``; returns the mean log p(x) before the update.

        E-step: q(z_i) = p(z_i | x_i), so the ELBO equals log p(x_i). M-step: the closed-form
        maximizers of the expected complete-data log-likelihood.
        """
        log_joint = self.component_log_prob(x)
        log_px = log_joint.logsumexp(-1)
        resp = (log_joint - log_px.unsqueeze(-1)).exp()  # (N, C)
        counts = resp.sum(0).clamp_min(1e-12)
        locs = resp.T @ x / counts.unsqueeze(-1)
        var = resp.T @ x.pow(2) / counts.unsqueeze(-1) - locs.pow(2)
        self.locs.data.copy_(locs)
        self.scales = var.clamp_min(min_scale**2).sqrt()
        self.weights = counts / counts.sum()
        return log_px.mean()

    def fit_em(self, x: torch.Tensor, num_steps: int = 100, tol: float = 1e-6) -> list[float]:
        """Run EM until the mean log-likelihood improves by less than ``tol``; return its path."""
        history: list[float] = []
        for _ in range(num_steps):
            history.append(float(self.em_step(x)))
            if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
                break
        return history

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Draw ``n`` points by ancestral sampling."""
        z = dist.Categorical(self.weights).sample((n,))
        return dist.Normal(self.locs[z], self.scales[z]).sample()
