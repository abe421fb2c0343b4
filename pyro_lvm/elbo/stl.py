"""Sticking the landing (STL): the pathwise ELBO gradient without the score term of log q."""

from __future__ import annotations

from dataclasses import replace

from pyro.distributions.util import is_identically_zero
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import torch_item

from pyro_lvm.elbo.base import SurrogateELBO, stopped_log_prob
from pyro_lvm.elbo.registry import register

__all__ = ["STL"]


@register("stl", summary="ELBO with the sticking-the-landing gradient (Roeder et al. 2017)")
class STL(SurrogateELBO):
    r"""The ELBO with the "sticking the landing" gradient of Roeder, Wu & Duvenaud (2017).

    For a reparameterized guide site :math:`z = g_\phi(\epsilon)`, the total derivative of
    :math:`\log q_\phi(z)` splits into a path term and a score term whose mean is zero.
    STL keeps only the path term by rescoring z under a copy of q with stopped parameters:

    .. math::

        \widehat{\nabla_\phi \mathcal L}
        = \nabla_\phi \big[\log p_\theta(x, g_\phi(\epsilon))
          - \log q_{\mathrm{stop}(\phi)}(g_\phi(\epsilon))\big],

    which is unbiased and has zero variance when q equals the exact posterior, since then
    :math:`\log p(x, z) - \log q(z) = \log p(x)` for every z. Sites that cannot be
    reparameterized get Pyro's plate-Rao-Blackwellized score-function term, exactly as in
    ``Trace_ELBO``; partially reparameterized sites keep ``Trace_ELBO``'s treatment.
    The loss value is the usual :math:`-\frac1K\sum_k[\log p(x, z_k) - \log q(z_k)]`.

    Only :meth:`_differentiable_loss_particle` of the family base is implemented.

    .. warning:: The stopped copy is ``pyro.distributions.util.detach(site["fn"])``
        (:func:`~pyro_lvm.elbo.base.stopped_log_prob`); flows without an inverse (Pyro's
        ``Planar``, ``Radial``) score through the linearized inverse of
        :mod:`pyro_lvm.elbo.rescore` (exact value and first derivatives). It also
        stops gradients that reach a site's distribution through *other* reparameterized
        latents (hierarchical guides ``q(z_2 | z_1)``), which biases STL there. Mean-field
        and amortized guides ``q(z | x)`` are exact.

    :param num_particles: K, vectorized by default.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.

    Example::

        svi = SVI(model, guide, Adam({"lr": 1e-2}), STL(num_particles=4))

    References:

    1. Roeder, Wu & Duvenaud (2017), *Sticking the Landing: Simple, Lower-Variance Gradient
       Estimators for Variational Inference*, arXiv:1703.09194.
    2. Tucker, Lawson, Gu & Maddison (2018), *Doubly Reparameterized Gradient Estimators for
       Monte Carlo Objectives*, arXiv:1810.04152.
    """

    traits = replace(SurrogateELBO.traits, gradient="stl")

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        surrogate = 0.0
        log_r = None
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + torch_item(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
        for site in guide_trace.nodes.values():
            if site["type"] != "sample":
                continue
            _, score_function_term, entropy_term = site["score_parts"]
            elbo = elbo - torch_item(site["log_prob_sum"])
            if not is_identically_zero(entropy_term):
                if is_identically_zero(score_function_term):
                    entropy_term = stopped_log_prob(site, "STL")
                surrogate = surrogate - entropy_term.sum()
            if not is_identically_zero(score_function_term):
                if log_r is None:
                    log_r = _compute_log_r(model_trace, guide_trace)
                signal = log_r.sum_to(site["cond_indep_stack"])
                surrogate = surrogate + (signal * score_function_term).sum()
        return -elbo, -surrogate
