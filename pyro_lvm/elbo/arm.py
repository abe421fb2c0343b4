r"""ARM: the augment-REINFORCE-merge estimator for Bernoulli guide sites (antithetic pairs)."""

from __future__ import annotations

from dataclasses import replace

import torch

from pyro_lvm.elbo.discrete import CoupledELBO, masked
from pyro_lvm.elbo.registry import register

__all__ = ["ARM"]

_SUMMARY = (
    "ARM: antithetic pair per particle at Bernoulli guide sites (2 model evaluations), "
    "reparameterized sites pathwise"
)


@register("arm", summary=_SUMMARY)
class ARM(CoupledELBO):
    r"""The ELBO with augment-REINFORCE-merge gradients at Bernoulli guide sites.

    For :math:`b \sim \mathrm{Bernoulli}(\sigma(\alpha))` (logits α, elementwise) and a
    learning signal f, draw :math:`u \sim U(0, 1)^d` and evaluate the antithetic pair

    .. math::

        b = \mathbb 1[u < \sigma(\alpha)], \qquad
        \tilde b = \mathbb 1[1 - u < \sigma(\alpha)]

    (both distributed as q). ARM (Yin & Zhou 2019, eq. 5) is the unbiased estimate

    .. math::

        \hat g^{\mathrm{ARM}}_\alpha = \big(f(\tilde b) - f(b)\big)\,(u - \tfrac12),
        \qquad \mathbb E_u\big[\hat g^{\mathrm{ARM}}_\alpha\big]
        = \nabla_\alpha \mathbb E_{q_\alpha}[f(b)].

    Here :math:`f = \log p(x, \cdot) - \log q(\cdot)`, Rao-Blackwellized by plates, and the
    pair shares every other random draw, so reparameterized guide sites are differentiated
    pathwise in both runs (the surrogate is their average). One particle is one pair: the
    cost is **two** model evaluations per particle (:attr:`evaluations_per_particle`); the
    loss is the mean of the ELBO estimates of both runs over the K pairs.

    Bernoulli sites only (any ``Independent``/expanded/masked wrapping): the categorical
    extension (ARSM, Yin et al. 2019, arXiv:1905.01413) is not implemented, so other guide
    sites without ``rsample`` are refused with a ``ValueError``. The Bernoulli sites' logits
    must not depend on each other's values (one discrete layer); see
    :mod:`pyro_lvm.elbo.discrete`.

    :param num_particles: K antithetic pairs (2K model evaluations), vectorized.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.

    Example::

        svi = SVI(model, guide, Adam({"lr": 1e-3}), ARM(num_particles=4))

    References:

    1. Yin & Zhou (2019), *ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary
       Networks*, ICLR, arXiv:1807.11143.
    2. Dong, Mnih & Tucker (2020), *DisARM: An Antithetic Gradient Estimator for Binary
       Latent Variables*, NeurIPS, arXiv:2006.10680.
    """

    traits = replace(CoupledELBO.traits, gradient="arm")

    evaluations_per_particle = 2

    def _weights(self, u, alpha, f, f_tilde, b, b_tilde) -> torch.Tensor:
        """The estimate of ∂E[f]/∂α per element (ARM)."""
        return (f_tilde - f) * (u - 0.5)

    def _estimate(self, model, guide, args, kwargs):
        start = self._rng_state()
        first = self._run(model, guide, args, kwargs, lambda _, u, a: (u < a.sigmoid()).to(u))
        end = self._rng_state()
        self._set_rng_state(start)
        # 1[1 - u < sigma(a)] == 1[u > sigma(-a)]
        second = self._run(model, guide, args, kwargs, lambda _, u, a: (u > (-a).sigmoid()).to(u))
        self._set_rng_state(end)
        self._check_coupled(first, second)
        size = 2 * self.num_particles
        elbo = (first.elbo + second.elbo).detach() / size
        surrogate = (first.pathwise() + second.pathwise()) / size
        for name, (u, alpha) in first.records.items():
            site = first.guide_trace.nodes[name]
            g = self._weights(
                u,
                alpha.detach(),
                first.signal(name).detach(),
                second.signal(name).detach(),
                site["value"],
                second.guide_trace.nodes[name]["value"],
            )
            surrogate = surrogate + (alpha * masked(g, site)).sum() / self.num_particles
        return elbo, surrogate, 0.0
