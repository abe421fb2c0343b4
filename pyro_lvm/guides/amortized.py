"""Amortized Gaussian guide: one encoder f_λ(x) gives every data point its q(z | x)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from torch import nn

from pyro_lvm.distributions import PathwiseNormal
from pyro_lvm.nn import NetworkFactory, check_log_var_range, gaussian_scale, mlp
from pyro_lvm.plates import data_plate

__all__ = ["AmortizedGaussianGuide"]


class AmortizedGaussianGuide(PyroModule):
    r"""Mean-field Gaussian q(z | x) whose parameters an encoder network computes.

    .. math::

        (\mu, \rho) = f_\lambda(x), \qquad q_\lambda(z \mid x) = \mathcal N(\mu, \mathrm{diag}\,
        \sigma^2), \quad \sigma = \mathrm{softplus}(\rho) + \sigma_{\min}
        \ \text{or} \ \sigma = \exp\bigl(\tfrac12 \operatorname{clamp}(\rho, a, b)\bigr).

    Amortization replaces per-datapoint parameters φ^i with one regression ``x ↦ φ``
    (Kingma & Welling 2014, arXiv:1312.6114; Rezende et al. 2014, arXiv:1401.4082).

    :param x_dim: input dimension (ignored when ``encoder`` is given).
    :param z_dim: latent dimension.
    :param hidden: hidden widths of the default MLP encoder.
    :param encoder: optional network mapping ``x`` to ``2 * z_dim`` features (loc, raw scale).
    :param min_scale: σ_min, keeps q from collapsing to a point (softplus form only).
    :param num_data: dataset size, needed when the guide is called with ``idx``.
    :param network: builds the default encoder, ``network(x_dim, hidden, 2 * z_dim)``.
    :param log_var_range: ``(a, b)`` reads the raw scale as a log-variance clipped to [a, b],
        the VampPrior paper's Hardtanh head (``(-6.0, 2.0)`` there); see
        :func:`~pyro_lvm.nn.gaussian_scale`. ``None`` (default): softplus + σ_min.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (200,),
        encoder: nn.Module | None = None,
        min_scale: float = 1e-4,
        num_data: int | None = None,
        network: NetworkFactory = mlp,
        log_var_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.x_dim, self.z_dim, self.min_scale, self.num_data = x_dim, z_dim, min_scale, num_data
        self.log_var_range = check_log_var_range(log_var_range)
        self.encoder = network(x_dim, hidden, 2 * z_dim) if encoder is None else encoder

    def params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The variational parameters (loc, scale) = f_λ(x), each of shape ``(..., z_dim)``."""
        out = self.encoder(x)
        if out.shape[-1] != 2 * self.z_dim:
            raise ValueError(
                f"the encoder must output 2 * z_dim = {2 * self.z_dim} features (loc and raw "
                f"scale), got {out.shape[-1]}"
            )
        loc, raw_scale = out.split(self.z_dim, dim=-1)
        return loc, gaussian_scale(raw_scale, self.min_scale, self.log_var_range)

    def posterior(self, x: torch.Tensor) -> dist.Distribution:
        """q(z | x) as a distribution with batch shape ``x.shape[:-1]`` and event ``(z_dim,)``."""
        loc, scale = self.params(x)
        return PathwiseNormal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The guide: sample ``"z"`` from q(z | x) inside the ``"data"`` plate."""
        with data_plate(x, idx, self.num_data):
            return pyro.sample("z", self.posterior(x))
