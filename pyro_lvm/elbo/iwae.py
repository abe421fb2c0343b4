"""The importance weighted bound (IWAE) with reparameterized, STL and DReG gradients."""

from __future__ import annotations

import math

import torch

from pyro_lvm.elbo.multisample import LogWeights, MultiSampleELBO

__all__ = ["GRADIENTS", "IWAE", "flush_negligible"]

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
    DReG takes one model pass: its surrogate is
    :math:`s_i = \sum_k \tilde w_k^{\perp} [\log p_\theta(x_i, z'_k) - \log q_{\bar\phi}(z'_k)]`
    on aliases :math:`z'_k` of the samples whose incoming gradient is multiplied by
    :math:`\tilde w_k^{\perp}` in the backward pass
    (:class:`~pyro_lvm.elbo.multisample.SamplePathScale`), so the sample path carries
    :math:`\tilde w_k^2` and θ carries :math:`\tilde w_k`. Normalized weights below
    :math:`\epsilon^2` of the dtype are set to zero in every surrogate
    (:func:`flush_negligible`).
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

    @property
    def _rescale_sample_path(self) -> bool:
        # At K = 1 the normalized weight is exactly 1, so DReG's path scale α + (1 - α) w̃ is
        # exactly 1 and the estimator is STL's: skip the path-scaling machinery.
        return self.gradient == "dreg" and self.num_particles > 1

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
        if weights.num_particles == 1:
            # K = 1: the normalized weight is exactly 1 and the bound is log w, the ELBO
            # (for every α); skip the softmax and logsumexp, whose ops cost per step.
            bound = weights.log_w[0]
            stopped = self.gradient != "reparam"
            surrogate = (weights.log_w_stop if stopped else weights.log_w)[0]
        else:
            bound, surrogate = self._multi_particle(weights)
        if weights.score is not None:
            signal = self._learning_signal(weights.log_w.detach(), bound.detach())
            surrogate = surrogate + (signal * weights.score).sum(0)
        return bound, surrogate

    def _multi_particle(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Bound and surrogate (before any score-function term) for K ≥ 2 particles."""
        one_minus_alpha = 1.0 - self._alpha
        scaled = one_minus_alpha * weights.log_w
        bound = (scaled.logsumexp(0) - math.log(weights.num_particles)) / one_minus_alpha
        w = flush_negligible(torch.softmax(scaled, dim=0).detach())
        if self.gradient == "reparam":
            # d bound / d log w_k = w_k: the bound's gradient, with negligible weights flushed
            surrogate = (w * weights.log_w).sum(0)
        elif self.gradient == "stl":
            surrogate = (w * weights.log_w_stop).sum(0)
        else:
            # θ takes w_k; the sample path takes d w_k / d z_k ∝ alpha w_k + (1 - alpha) w_k^2
            # (Tucker et al. 2018), i.e. w_k times the path scale below
            surrogate = (w * weights.log_w_stop).sum(0)
            path_scale = self._alpha + one_minus_alpha * w
            surrogate = self.scale_sample_path(weights, surrogate, path_scale)
        return bound, surrogate


def flush_negligible(weights: torch.Tensor) -> torch.Tensor:
    r"""Set normalized importance weights below :math:`\epsilon^2` to zero.

    :math:`\epsilon` is the machine epsilon of the dtype (so the cut is 1.4e-14 in float32,
    4.9e-32 in float64). The heaviest particle's weight is at least 1/K, so such a particle's
    share of a gradient sum is below ε² K relative to the heaviest one's: far below the dtype's
    rounding unless its own gradient is about 1/(ε K) times larger (tested: the float32
    gradient does not change). Left alone, it scales its whole backward pass down into subnormal
    floats, which x86 CPUs process one to two orders of magnitude more slowly: untrained
    IWAE models on MNIST, whose log weights spread over hundreds of nats, took 1.4-6x the
    time per step because of it.
    """
    cut = torch.finfo(weights.dtype).eps ** 2
    return torch.where(weights < cut, torch.zeros_like(weights), weights)
