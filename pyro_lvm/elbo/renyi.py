"""The Rényi-α bound of Li & Turner (2016), per data point, as a multi-sample ELBO."""

from __future__ import annotations

import math

from pyro_lvm.elbo.iwae import IWAE

__all__ = ["RenyiBound"]


class RenyiBound(IWAE):
    r"""The variational Rényi bound, Monte Carlo estimated with ``K`` particles per data point.

    .. math::

        \mathcal L_\alpha(x_i) = \frac{1}{1-\alpha} \log \frac1K \sum_{k=1}^K w_k^{1-\alpha},
        \qquad w_k = \frac{p_\theta(x_i, z_k)}{q_\phi(z_k \mid x_i)},\; z_k \sim q_\phi.

    ``alpha = 0`` is the IWAE bound; as ``alpha → 1`` it approaches the ELBO (use
    :class:`pyro.infer.Trace_ELBO` at ``alpha = 1``); for ``alpha > 0`` its expectation is
    still a lower bound of :math:`\log p(x_i)`. With :math:`\tilde w_k \propto w_k^{1-\alpha}`
    the reparameterized gradient is :math:`\sum_k \tilde w_k \nabla \log w_k`, score-function
    sites use the learning signal :math:`\hat{\mathcal L}_\alpha`, and ``gradient="dreg"``
    weights the guide's pathwise term by :math:`\alpha \tilde w_k + (1-\alpha) \tilde w_k^2`
    (the doubly reparameterized form, Tucker et al. 2018, eq. for general α). Unlike Pyro's
    ``RenyiELBO`` (pyro issue #3104), the logsumexp runs over unscaled per-datapoint weights,
    so the bound is right for local latents under subsampling.

    :param alpha: order α; any finite value ``>= 0`` other than 1.
    :param num_particles: ``K >= 1``.
    :param gradient: ``"reparam"``, ``"stl"`` or ``"dreg"`` (see :class:`~pyro_lvm.elbo.iwae.IWAE`).
    :param kwargs: other :class:`pyro.infer.ELBO` keyword arguments.
    :raises ValueError: on ``alpha == 1``, a negative or non-finite ``alpha``, or bad ``K``.

    Example::

        elbo = RenyiBound(alpha=0.5, num_particles=10)

    References:

    1. Y. Li, R. E. Turner (2016). Rényi Divergence Variational Inference. arXiv:1602.02311.
    2. G. Tucker, D. Lawson, S. Gu, C. J. Maddison (2018). Doubly Reparameterized Gradient
       Estimators for Monte Carlo Objectives. arXiv:1810.04152.
    """

    def __init__(
        self, alpha: float = 0.5, num_particles: int = 2, gradient: str = "reparam", **kwargs
    ):
        alpha = float(alpha)
        if alpha == 1.0:
            raise ValueError(
                "alpha = 1 is the ELBO, where this bound is 0/0; use pyro.infer.Trace_ELBO "
                "(or pass alpha != 1)"
            )
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(
                f"alpha must be finite and >= 0 for a lower bound of log p(x), got {alpha}; "
                "pass alpha in [0, 1) (0 is IWAE) or > 1"
            )
        self._alpha = alpha
        super().__init__(num_particles=num_particles, gradient=gradient, **kwargs)

    @property
    def alpha(self) -> float:
        """The Rényi order α."""
        return self._alpha

    def __repr__(self) -> str:
        return (
            f"RenyiBound(alpha={self._alpha}, num_particles={self.num_particles}, "
            f"gradient={self.gradient!r})"
        )
