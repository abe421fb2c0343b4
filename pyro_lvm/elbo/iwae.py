"""The importance weighted bound (IWAE) with reparameterized, STL and DReG gradients."""

from __future__ import annotations

import math

import torch

from pyro_lvm.elbo.multisample import LogWeights, MultiSampleELBO

__all__ = ["GRADIENTS", "IWAE"]

#: the gradient estimators a multi-sample bound offers
GRADIENTS = ("reparam", "stl", "dreg")


class IWAE(MultiSampleELBO):
    r"""The ``K``-sample importance weighted bound of Burda et al. (2015), per data point.

    With :math:`z_{1:K} \sim q_\phi(\cdot \mid x_i)` independently and
    :math:`w_k = p_\theta(x_i, z_k) / q_\phi(z_k \mid x_i)`,

    .. math::

        \mathcal L_K(x_i) = \mathbb E\Big[\log \frac1K \sum_{k=1}^K w_k\Big]
        \;\le\; \log p_\theta(x_i),

    increasing in ``K`` and equal to the ELBO at ``K = 1``. Particles are combined by a
    logsumexp inside the plates that enclose every site (the ``"data"`` plate); the subsample
    scale :math:`N/B` multiplies the per-datapoint bounds afterwards. With normalized weights
    :math:`\tilde w_k = w_k / \sum_j w_j` the gradient estimators are:

    ``gradient="reparam"`` (Burda et al. 2015)
        :math:`\sum_k \tilde w_k \nabla_{\theta,\phi} \log w_k` with the sample path,
        for θ and φ.
    ``gradient="stl"`` (sticking the landing; Roeder et al. 2017)
        :math:`\sum_k \tilde w_k \frac{\partial \log w_k}{\partial z_k}
        \frac{\partial z_k}{\partial \phi}` for φ (the density is rescored with stopped
        parameters). For ``K > 1`` its expectation differs from the bound's gradient
        (Tucker et al. 2018, §3); it is zero when q is the exact posterior.
    ``gradient="dreg"`` (doubly reparameterized; Tucker et al. 2018)
        :math:`\sum_k \tilde w_k^2 \frac{\partial \log w_k}{\partial z_k}
        \frac{\partial z_k}{\partial \phi}` for φ: unbiased, and zero when q is the exact
        posterior. Needs every guide site reparameterized.

    In every mode θ receives :math:`\sum_k \tilde w_k \nabla_\theta \log p_\theta(x_i, z_k)`.
    The surrogate realizing DReG is

    .. math::

        s_i = \sum_k \tilde w_k^{\perp 2}
        \big[\log p_\theta(x_i, z_k) - \log q_{\bar\phi}(z_k)\big]
        + \sum_k \big(\tilde w_k - \tilde w_k^{2}\big)^{\perp} \log p_\theta(x_i, \bar z_k),

    whose second term restores the θ gradient with detached samples :math:`\bar z_k`.
    Guide sites without ``rsample`` (``"reparam"`` and ``"stl"``) add the score-function term
    :math:`\sum_k \ell_k^{\perp} \nabla_\phi \log q_\phi(z_k)` with learning signal
    :math:`\ell_k = \hat{\mathcal L}_K(x_i)` (:class:`~pyro_lvm.elbo.vimco.VIMCO` subtracts
    leave-one-out baselines).

    .. warning:: Every guide site must sit inside the plates the bound combines over; a plate
        that does not enclose every site must not be subsampled. STL and DReG rescore each
        guide density with all its parameters detached, which stops φ exactly when no guide
        density's parameters depend on upstream latents.

    :param num_particles: ``K >= 1``.
    :param gradient: ``"reparam"``, ``"stl"`` or ``"dreg"``.
    :param max_plate_nesting: bound on nested plates (guessed when infinite).
    :param vectorize_particles: draw the particles in one vectorized pass (default).
    :param kwargs: other :class:`pyro.infer.ELBO` keyword arguments.
    :raises ValueError: on an unknown ``gradient`` or ``num_particles < 1``; at run time on
        a non-reparameterized guide site with ``gradient="dreg"``.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                             IWAE(num_particles=8, gradient="dreg"))

    References:

    1. Y. Burda, R. Grosse, R. Salakhutdinov (2015). Importance Weighted Autoencoders.
       arXiv:1509.00519.
    2. G. Tucker, D. Lawson, S. Gu, C. J. Maddison (2018). Doubly Reparameterized Gradient
       Estimators for Monte Carlo Objectives. arXiv:1810.04152.
    3. G. Roeder, Y. Wu, D. Duvenaud (2017). Sticking the Landing: Simple, Lower-Variance
       Gradient Estimators for Variational Inference. arXiv:1703.09194.
    """

    #: Rényi order; 0 is the IWAE bound (see :class:`~pyro_lvm.elbo.renyi.RenyiBound`)
    _alpha = 0.0

    def __init__(
        self,
        num_particles: int = 2,
        gradient: str = "reparam",
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        **kwargs,
    ):
        if gradient not in GRADIENTS:
            raise ValueError(
                f"unknown gradient {gradient!r}; choose one of {', '.join(map(repr, GRADIENTS))}"
            )
        self.gradient = gradient
        self._stop_guide = gradient in ("stl", "dreg")
        self._detached_model = gradient == "dreg"
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_particles={self.num_particles}, gradient={self.gradient!r})"
        )

    def _learning_signal(self, log_w: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """Per-particle learning signal of the score-function term (shape of ``log_w``)."""
        return bound.expand_as(log_w)

    def _bound_and_surrogate(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gradient == "dreg" and weights.nonreparam_sites:
            raise ValueError(
                f"gradient='dreg' needs reparameterized guide sites, but site(s) "
                f"{', '.join(map(repr, weights.nonreparam_sites))} have no rsample; use "
                "gradient='reparam' (score function there) or VIMCO for discrete latents"
            )
        one_minus_alpha = 1.0 - self._alpha
        scaled = one_minus_alpha * weights.log_w
        bound = (scaled.logsumexp(0) - math.log(weights.num_particles)) / one_minus_alpha
        w = torch.softmax(scaled, dim=0).detach()
        if self.gradient == "reparam":
            surrogate = bound
        elif self.gradient == "stl":
            surrogate = (w * weights.log_w_stop).sum(0)
        else:
            # d w_k / d z_k = (1 - alpha) (w_k - w_k^2) d log w_k / d z_k (Tucker et al. 2018)
            w_guide = self._alpha * w + one_minus_alpha * w.pow(2)
            surrogate = (w_guide * weights.log_w_stop).sum(0)
            surrogate = surrogate + ((w - w_guide) * weights.log_p_detached).sum(0)
        if weights.score is not None:
            signal = self._learning_signal(weights.log_w.detach(), bound.detach())
            surrogate = surrogate + (signal * weights.score).sum(0)
        return bound, surrogate
