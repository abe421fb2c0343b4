"""VIMCO: the multi-sample score-function estimator with leave-one-out control variates."""

from __future__ import annotations

from dataclasses import replace

from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.registry import register

__all__ = ["VIMCO"]


@register("vimco", summary="IWAE with leave-one-out control variates (Mnih & Rezende 2016)")
class VIMCO(IWAE):
    r"""Variational inference for Monte Carlo objectives (Mnih & Rezende 2016).

    The IWAE bound :math:`\mathcal L_K(x_i) = \mathbb E \log \frac1K \sum_k w_k` (see
    :class:`~pyro_lvm.elbo.IWAE`) with the leave-one-out control variate at guide sites
    without ``rsample`` (discrete latents):

    .. math::

        \nabla_\phi \mathcal L_K \approx \sum_k \big(\hat{\mathcal L} - \hat{\mathcal L}_{-k}\big)
        \nabla_\phi \log q_\phi(z_k \mid x_i) + \sum_k \tilde w_k \nabla_\phi \log w_k,
        \qquad \hat{\mathcal L}_{-k} = \log \frac1K \Big(\sum_{j \ne k} w_j + \hat w_{-k}\Big),

    with :math:`\log \hat w_{-k} = \frac{1}{K-1} \sum_{j \ne k} \log w_j` (the geometric mean
    of the other weights). It is :class:`~pyro_lvm.elbo.IWAE` with
    ``score_baseline="loo"`` required (hence K ≥ 2) and DReG refused.

    :param num_particles: ``K >= 2`` (the leave-one-out baseline needs another particle).
    :param gradient: ``"reparam"`` or ``"stl"`` for the reparameterized sites, if any.
    :param kwargs: :class:`~pyro_lvm.elbo.IWAE` / :class:`pyro.infer.ELBO` arguments.
    :raises ValueError: on ``num_particles < 2`` or ``gradient="dreg"``.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), VIMCO(num_particles=5))

    References:

    1. A. Mnih, D. J. Rezende (2016). Variational Inference for Monte Carlo Objectives.
       arXiv:1602.06725.
    """

    traits = replace(IWAE.traits, min_particles=2)
    _particles_remedy = "The leave-one-out baseline needs another particle."

    def __init__(self, num_particles: int = 2, gradient: str = "reparam", **kwargs):
        if gradient == "dreg":
            raise ValueError(
                "VIMCO targets guide sites without rsample, which DReG cannot handle; use "
                "gradient='reparam' or 'stl' here, or IWAE(gradient='dreg') for continuous guides"
            )
        kwargs["score_baseline"] = "loo"
        super().__init__(num_particles=num_particles, gradient=gradient, **kwargs)
