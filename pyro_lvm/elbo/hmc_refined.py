"""MCMC-refined posteriors (Hoffman 2017): HMC from q's sample gives the decoder's gradient."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from pyro_lvm.elbo.base import SurrogateELBO, require_reparameterized
from pyro_lvm.elbo.registry import register
from pyro_lvm.hmc import hmc_transition
from pyro_lvm.validation import check_site_match

__all__ = ["HMCRefinedELBO"]

_SUMMARY = "ELBO for the guide, HMC-refined posterior samples for the model (Hoffman 2017)"


@register("hmc-refined", summary=_SUMMARY)
class HMCRefinedELBO(SurrogateELBO):
    r"""ELBO for the guide, HMC-refined samples for the model (Hoffman 2017).

    Draw z₀ ~ q_φ(z | x), run T Hamiltonian Monte Carlo transitions (L leapfrog steps of
    size ε each, Metropolis-corrected per data point) targeting p_θ(z | x) ∝ p_θ(x, z),
    starting at z₀ (stopped), and reach z_T. The gradient is

    .. math::

        \nabla_\phi: \ \nabla_\phi \mathbb E_q[\log p_\theta(x, z_0) - \log q_\phi(z_0)],
        \qquad \nabla_\theta: \ \nabla_\theta \log p_\theta(x, z_T),

    from the surrogate ELBO(z₀) − log p_θ(x, ⊥z₀) + log p_θ(x, ⊥z_T) (⊥ = stop-gradient):
    the encoder learns from the ELBO as usual, while the decoder learns from samples closer to
    the exact posterior (Hoffman 2017, "Learning deep latent Gaussian models with Markov
    chain Monte Carlo", ICML, PMLR 70:1510-1519). The loss value is −ELBO(z₀).
    Every parameter the model touches counts as θ.

    After each call ``last_refined`` holds the refined latents z_T, ``acceptance_rate`` the
    mean Metropolis acceptance of the last refinement and ``acceptance_history`` all of them;
    with ``adapt_step_size`` ε is nudged multiplicatively towards ``target_accept`` after each
    gradient call (ε ← ε exp(γ (a − a*)), γ = 0.5). :meth:`loss` refines with the current ε
    and records and adapts nothing; :meth:`state_dict` holds ε.

    All K particles and B data points run as K·B independent chains in one batched leapfrog
    (particles are vectorized by default, as in every registered estimator), so the cost of a
    step is T·L batched gradient evaluations of log p_θ(x, z), with no Python loop over data
    points or particles.

    .. warning:: Every site of the model must lie in the ``"data"`` plate, so that its
        log-density has one entry per chain: shape ``(B,)``, or ``(K, B)`` with K > 1
        vectorized particles. The guide must be reparameterized.

    :param num_hmc_steps: T ≥ 0 HMC transitions (0 gives the ordinary ELBO gradient).
    :param num_leapfrog: L ≥ 1 leapfrog steps per transition.
    :param step_size: initial ε > 0.
    :param adapt_step_size: adapt ε towards ``target_accept``.
    :param target_accept: a* in (0, 1).
    """

    #: the step size adapts and the acceptance is recorded in Python between calls, which a
    #: captured graph would freeze (:mod:`pyro_lvm.capture`): the engine runs it eagerly.
    traits = replace(
        SurrogateELBO.traits,
        category="refined",
        sites="reparam",
        stateful=True,
        capturable=False,
        gradient="refined",
    )

    def __init__(
        self,
        num_hmc_steps: int = 5,
        num_leapfrog: int = 3,
        step_size: float = 0.05,
        adapt_step_size: bool = True,
        target_accept: float = 0.8,
        **kwargs,
    ):
        if int(num_hmc_steps) < 0 or int(num_leapfrog) < 1:
            raise ValueError(
                f"need num_hmc_steps >= 0 and num_leapfrog >= 1, got {num_hmc_steps} and "
                f"{num_leapfrog}"
            )
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be positive and finite, got {step_size}")
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1), got {target_accept}")
        super().__init__(**kwargs)
        self.num_hmc_steps, self.num_leapfrog = int(num_hmc_steps), int(num_leapfrog)
        self.step_size, self.adapt_step_size = float(step_size), adapt_step_size
        self.target_accept = target_accept
        self.acceptance_rate: float = float("nan")
        self.acceptance_history: list[float] = []
        self.last_refined: dict[str, torch.Tensor] = {}

    @staticmethod
    def log_joint(model, values: dict, args, kwargs, scaled: bool = False) -> torch.Tensor:
        """log p(x, z) with the latents fixed at ``values``: one entry per chain (the shape
        of every site's log-density), or the subsample-scaled total when ``scaled``."""
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        if scaled:
            return trace.log_prob_sum()
        trace.compute_log_prob()
        total = None
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["unscaled_log_prob"]
            if lp.dim() == 0 or (total is not None and lp.shape != total.shape):
                raise ValueError(
                    f"site {name!r} has log-density of shape {tuple(lp.shape)}"
                    + ("" if total is None else f", other sites {tuple(total.shape)}")
                    + "; HMC refinement needs every site in the data plate, one log-density "
                    "per chain (shape (B,), or (K, B) with vectorized particles)"
                )
            total = lp if total is None else total + lp
        if total is None:
            raise ValueError("the model has no sample sites to refine against")
        return total

    def refine(self, model, init: dict, args, kwargs) -> tuple[dict, torch.Tensor]:
        """Run the HMC transitions from ``init``; returns the final values and the per-chain
        acceptance probabilities, averaged over the transitions (shape: the chains')."""
        eps = self.step_size
        z = {k: v.detach() for k, v in init.items()}

        def potential_and_grad(values):
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_() for k, v in values.items()}
                logp = self.log_joint(model, leaves, args, kwargs)
                grads = torch.autograd.grad(logp.sum(), list(leaves.values()))
            return -logp.detach(), dict(zip(leaves, (-g for g in grads), strict=True)), {}

        accepted = 0.0
        with poutine.block():
            u, grad_u, _ = potential_and_grad(z)
            for _ in range(self.num_hmc_steps):
                z, u, grad_u, _, prob = hmc_transition(
                    z, u, grad_u, {}, potential_and_grad, eps, self.num_leapfrog
                )
                accepted = accepted + prob
        rate = accepted / max(self.num_hmc_steps, 1)
        return z, torch.as_tensor(rate)

    def state_dict(self) -> dict[str, Any]:
        """The adapted step size ε (a float)."""
        return {"step_size": float(self.step_size)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly."""
        super().load_state_dict(state)
        self.step_size = float(state["step_size"])

    def _prepare(self, model, guide, args: tuple, kwargs: dict) -> None:
        # With vectorized particles the refinement runs the model inside the same particle
        # plate as the traces, so the K·B chains are one batch.
        self._call = (model, args, kwargs)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        # the refinement conditions the model on the guide's draws: they must be its latents
        check_site_match(model_trace, guide_trace, enumerated=False)
        model, args, kwargs = self._call
        target = self._vectorized_num_particles(model) if self.vectorize_particles else model
        latents = {
            name: site["value"]
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        require_reparameterized(guide_trace, "HMCRefinedELBO")
        elbo = torch.as_tensor(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        surrogate = elbo
        if self.num_hmc_steps > 0 and latents:
            z0 = {k: v.detach() for k, v in latents.items()}
            z_t, rate = self.refine(target, z0, args, kwargs)
            surrogate = (
                surrogate
                - self.log_joint(target, z0, args, kwargs, scaled=True)
                + self.log_joint(target, z_t, args, kwargs, scaled=True)
            )
            if self.updates_state:
                self.last_refined = z_t
                self._record(rate.mean().item())
        return -elbo.detach(), -surrogate

    def _record(self, rate: float) -> None:
        self.acceptance_rate = rate
        self.acceptance_history.append(rate)
        if self.adapt_step_size:
            self.step_size *= math.exp(0.5 * (rate - self.target_accept))
