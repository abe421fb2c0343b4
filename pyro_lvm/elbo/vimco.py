"""VIMCO: the multi-sample score-function estimator with leave-one-out control variates."""

from __future__ import annotations

import math

import torch

from pyro_lvm.elbo.iwae import IWAE

__all__ = ["VIMCO"]


class VIMCO(IWAE):
    r"""Variational inference for Monte Carlo objectives (Mnih & Rezende 2016).

    The objective is the IWAE bound :math:`\mathcal L_K(x_i) = \mathbb E \log \frac1K
    \sum_k w_k` (see :class:`~pyro_lvm.elbo.iwae.IWAE`); for guide sites without ``rsample``
    (discrete latents) the gradient is

    .. math::

        \nabla_\phi \mathcal L_K \approx \sum_k \big(\hat{\mathcal L} - \hat{\mathcal L}_{-k}\big)
        \nabla_\phi \log q_\phi(z_k \mid x_i) + \sum_k \tilde w_k \nabla_\phi \log w_k,
        \qquad \hat{\mathcal L}_{-k} = \log \frac1K \Big(\sum_{j \ne k} w_j + \hat w_{-k}\Big),

    with :math:`\log \hat w_{-k} = \frac{1}{K-1} \sum_{j \ne k} \log w_j` (the geometric mean
    of the other weights). The baseline :math:`\hat{\mathcal L}_{-k}` does not depend on
    :math:`z_k`, so the estimator stays unbiased, and it tracks :math:`\hat{\mathcal L}` so the
    learning signal of each particle is its own contribution. Reparameterized guide sites take
    the pathwise gradient (``gradient="reparam"`` or ``"stl"``); θ receives
    :math:`\sum_k \tilde w_k \nabla_\theta \log p_\theta(x_i, z_k)`.

    :param num_particles: ``K >= 2`` (the leave-one-out baseline needs another particle).
    :param gradient: ``"reparam"`` or ``"stl"`` for the reparameterized sites, if any.
    :param kwargs: :class:`~pyro_lvm.elbo.iwae.IWAE` / :class:`pyro.infer.ELBO` arguments.
    :raises ValueError: on ``num_particles < 2`` or ``gradient="dreg"``.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), VIMCO(num_particles=5))

    References:

    1. A. Mnih, D. J. Rezende (2016). Variational Inference for Monte Carlo Objectives.
       arXiv:1602.06725.
    2. Y. Burda, R. Grosse, R. Salakhutdinov (2015). Importance Weighted Autoencoders.
       arXiv:1509.00519.
    """

    min_particles = 2

    def __init__(self, num_particles: int = 2, gradient: str = "reparam", **kwargs):
        if gradient == "dreg":
            raise ValueError(
                "VIMCO targets guide sites without rsample, which DReG cannot handle; use "
                "gradient='reparam' or 'stl' here, or IWAE(gradient='dreg') for continuous guides"
            )
        super().__init__(num_particles=num_particles, gradient=gradient, **kwargs)

    def _learning_signal(self, log_w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """:math:`\\hat{\\mathcal L} - \\hat{\\mathcal L}_{-k}` for each particle ``k``."""
        k = log_w.shape[0]
        loo_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # log of geometric mean
        # row j holds the K log-weights with particle j replaced by its baseline
        eye = torch.eye(k, dtype=torch.bool, device=log_w.device)
        eye = eye.reshape((k, k) + (1,) * (log_w.dim() - 1))
        replaced = torch.where(eye, loo_mean.unsqueeze(1), log_w.unsqueeze(0))
        baseline = replaced.logsumexp(1) - math.log(k)
        return bound - baseline
