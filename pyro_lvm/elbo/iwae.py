"""The importance weighted bound (IWAE): the Rényi bound at α = 0."""

from __future__ import annotations

from pyro_lvm.elbo.registry import register
from pyro_lvm.elbo.renyi import GRADIENTS, RenyiBound, flush_negligible

__all__ = ["GRADIENTS", "IWAE", "flush_negligible"]


@register(
    "iwae-dreg",
    gradient="dreg",
    summary=("IWAE with doubly reparameterized gradients (Tucker et al. 2018)"),
)
@register("iwae-stl", gradient="stl", summary="IWAE with sticking-the-landing gradients")
@register("iwae", gradient="reparam", summary="importance weighted bound (Burda et al. 2015)")
class IWAE(RenyiBound):
    r"""The ``K``-sample importance weighted bound of Burda et al. (2015), per data point.

    .. math::

        \mathcal L_K(x_i) = \mathbb E\Big[\log \frac1K \sum_{k=1}^K w_k\Big]
        \;\le\; \log p_\theta(x_i), \qquad w_k = \frac{p_\theta(x_i, z_k)}{q_\phi(z_k \mid x_i)},

    increasing in ``K`` and equal to the ELBO at ``K = 1``: :class:`~pyro_lvm.elbo.RenyiBound`
    at α = 0, whose docstring describes the gradients (``"reparam"``, ``"stl"``, ``"dreg"``,
    and the leave-one-out score-function term at guide sites without ``rsample``).

    :param num_particles: ``K >= 1``.
    :param gradient: ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param kwargs: :class:`~pyro_lvm.elbo.RenyiBound` and :class:`pyro.infer.ELBO` arguments.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                             IWAE(num_particles=8, gradient="dreg"))

    References:

    1. Y. Burda, R. Grosse, R. Salakhutdinov (2015). Importance Weighted Autoencoders.
       arXiv:1509.00519.
    """

    def __init__(self, num_particles: int = 2, gradient: str = "reparam", **kwargs):
        super().__init__(0.0, num_particles=num_particles, gradient=gradient, **kwargs)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_particles={self.num_particles}, gradient={self.gradient!r})"
        )
