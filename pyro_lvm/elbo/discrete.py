r"""Shared machinery of the coupled-sample estimators for Bernoulli guide sites (ARM, DisARM,
REBAR, RELAX): correlated runs of the model and guide, and the learning signal per site.

These estimators evaluate the learning signal :math:`f(b) = \log p(x, b) - \log q(b)` at
several *coupled* values of the discrete guide sites (an antithetic pair, or a hard sample
and two relaxations of it) with everything else held equal. :class:`CoupledELBO` does this
by running the guide (wrapped in the vectorized-particle plate) several times from **one
random state**: each run draws the same uniforms :math:`u` at every Bernoulli site (the
handler :class:`SetBernoulli` draws them) and the same noise :math:`\epsilon` at every
reparameterized site, while the handler sets the Bernoulli values from :math:`u` and the
site's logits :math:`\alpha` as the estimator chooses. The model is replayed on each guide
trace. Reparameterized sites are therefore handled pathwise, shared by all runs.

The estimate of :math:`\partial \mathcal L / \partial \alpha` at each Bernoulli site,
:math:`\hat g_\alpha`, enters the surrogate as :math:`\alpha \cdot \mathrm{stop}(\hat g_\alpha)`
so that it reaches the guide's parameters by the chain rule; the pathwise part of the
surrogate is the model's log-density and the reparameterized guide sites' negative
log-density. Signals are Rao-Blackwellized by plates as in
:class:`~pyro_lvm.elbo.ScoreFunctionELBO`: site s sees only the terms in its plate slice.

.. warning:: The Bernoulli sites' logits must not depend on another Bernoulli site's value
    (one layer of discrete latents, possibly under reparameterized ones): the runs are
    checked to see equal logits, and a guide that breaks this raises a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer.util import MultiFrameTensor, get_plate_stacks, is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan
from torch.distributions import Bernoulli

from pyro_lvm.elbo.base import PARTICLE_PLATE, SurrogateELBO

__all__ = ["EPS", "CoupledELBO", "Run", "SetBernoulli", "bernoulli_logits", "masked", "spread"]

#: uniforms are kept in [EPS, 1 - EPS] so that their logits stay finite
EPS = 1e-6

Choice = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]


def bernoulli_logits(fn: Any) -> torch.Tensor | None:
    """The logits of a (possibly ``Independent``, expanded or masked) Bernoulli, else ``None``,
    broadcast to the distribution's full shape (batch + event)."""
    inner = fn
    while not isinstance(inner, Bernoulli):
        inner = getattr(inner, "base_dist", None)
        if inner is None:
            return None
    return inner.logits.expand(fn.shape())


def spread(terms: MultiFrameTensor, site: dict) -> torch.Tensor:
    """The terms summed to the plates of ``site`` (Rao-Blackwellized by plates), broadcast to
    the site's full shape (batch + event) to multiply elementwise with its logits."""
    f = torch.as_tensor(terms.sum_to(site["cond_indep_stack"]))
    event = len(site["fn"].event_shape)
    f = f.reshape(f.shape + (1,) * event)
    return f.expand(site["fn"].shape())


def masked(value: torch.Tensor, site: dict) -> torch.Tensor:
    """``value`` (of the site's full shape) with the elements of a masked-out batch entry
    zeroed (``poutine.mask``)."""
    mask = site["mask"]
    if mask is None or isinstance(mask, bool):
        return value if mask is None or mask else torch.zeros_like(value)
    event = len(site["fn"].event_shape)
    return value * mask.reshape(mask.shape + (1,) * event).to(value.dtype)


class SetBernoulli(Messenger):
    r"""At every unobserved Bernoulli sample site, draw :math:`u \sim U(0, 1)` of the site's
    shape and set the value to ``choose(name, u, logits)``; record ``(u, logits)`` by name.

    The uniforms come from the global random stream, in the same order and shapes as the
    guide's other draws, so two runs started from one random state see equal :math:`u` and
    equal reparameterization noise.
    """

    def __init__(self, choose: Choice):
        super().__init__()
        self.choose = choose
        self.records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or msg["value"] is not None or isinstance(msg["fn"], _Subsample):
            return
        logits = bernoulli_logits(msg["fn"])
        if logits is None:
            return
        u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device)
        u = u.clamp(EPS, 1.0 - EPS)
        msg["value"] = self.choose(msg["name"], u, logits)
        self.records[msg["name"]] = (u, logits)


class Run:
    """One run of the guide and the model replayed on it: traces, Bernoulli records, and the
    log-ratio terms by plate stack (a :class:`~pyro.infer.util.MultiFrameTensor`)."""

    def __init__(self, model_trace, guide_trace, records: dict, size: int):
        self.model_trace, self.guide_trace, self.records, self.size = (
            model_trace,
            guide_trace,
            records,
            size,
        )
        stacks = get_plate_stacks(model_trace)
        self.log_r = MultiFrameTensor()
        self.elbo = 0.0
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            term = site["log_prob"]
            self.elbo = self.elbo + site["log_prob_sum"]
            if not site["is_observed"]:
                term = term - guide_trace.nodes[name]["log_prob"]
                self.elbo = self.elbo - guide_trace.nodes[name]["log_prob_sum"]
            self.log_r.add((stacks[name], term))
        self.elbo = torch.as_tensor(self.elbo)

    def signal(self, name: str) -> torch.Tensor:
        """:math:`f` summed to the plates of guide site ``name`` (:func:`spread`)."""
        return spread(self.log_r, self.guide_trace.nodes[name])

    def pathwise(self) -> torch.Tensor:
        """The model's log-density minus the non-Bernoulli guide sites' (live, pathwise)."""
        total = 0.0
        for site in self.model_trace.nodes.values():
            if site["type"] == "sample":
                total = total + site["log_prob_sum"]
        for name, site in self.guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and name not in self.records:
                total = total - site["log_prob_sum"]
        return torch.as_tensor(total)


class CoupledELBO(SurrogateELBO):
    r"""Base of the estimators that evaluate coupled runs (module docstring).

    Subclass contract: implement :meth:`_estimate`, returning the ELBO estimate (a detached
    scalar), the surrogate whose gradient is the estimator's (to be *maximized*) and a
    scalar whose gradient trains the estimator's own parameters (to be minimized; zero if
    none). :meth:`_run` draws one coupled run. ``loss``, ``differentiable_loss`` and
    ``loss_and_grads`` derive from :meth:`differentiable_loss`.

    :param num_particles: K independent draws of the method's basic unit (its cost in model
        evaluations is :attr:`evaluations_per_particle` times K); vectorized.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.
    """

    traits = replace(SurrogateELBO.traits, sites="bernoulli")

    #: model evaluations (runs of model and guide) per particle
    evaluations_per_particle = 1

    def __init__(self, num_particles: int = 1, **kwargs: Any):
        kwargs.setdefault("vectorize_particles", True)
        if not kwargs["vectorize_particles"]:
            raise ValueError(
                f"{type(self).__name__} needs vectorize_particles=True (its coupled runs share "
                "one random state per vectorized batch of particles)"
            )
        super().__init__(num_particles=num_particles, **kwargs)

    def _vectorized(self, fn):
        if self.num_particles == 1:
            return fn
        return pyro.plate(PARTICLE_PLATE, self.num_particles, dim=-self.max_plate_nesting)(fn)

    def _run(self, model, guide, args, kwargs, choose: Choice, relaxed: bool = False) -> Run:
        """One run of the guide under :class:`SetBernoulli` (``choose``) and of the model
        replayed on it. With ``relaxed`` the Bernoulli values may lie in (0, 1): support
        checks are off and those guide sites are scored with stopped parameters (a fixed
        function of the value, as a control variate must be)."""
        handler = SetBernoulli(choose)
        validate = is_validation_enabled() and not relaxed
        with pyro.validation_enabled(validate):
            guide_trace = poutine.trace(handler(self._vectorized(guide))).get_trace(*args, **kwargs)
            model_trace = poutine.trace(
                poutine.replay(self._vectorized(model), trace=guide_trace)
            ).get_trace(*args, **kwargs)
            if validate:
                check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
                check_if_enumerated(guide_trace)
            guide_trace = prune_subsample_sites(guide_trace)
            model_trace = prune_subsample_sites(model_trace)
            model_trace.compute_log_prob()
            for name, site in guide_trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"]:
                    continue
                if name in handler.records:
                    if not relaxed:
                        continue
                    log_q = detach(site["fn"]).log_prob(site["value"])
                    site["log_prob"] = scale_and_mask(log_q, site["scale"], site["mask"])
                    site["log_prob_sum"] = site["log_prob"].sum()
                elif not site["fn"].has_rsample:
                    raise ValueError(
                        f"{self} handles Bernoulli guide sites and reparameterized ones; site "
                        f"{name!r} ({type(site['fn']).__name__}) is neither. Use "
                        "'score-function-loo-baseline' or 'vimco' for other discrete sites"
                    )
            guide_trace.compute_log_prob()
            if validate:
                for trace in (model_trace, guide_trace):
                    for site in trace.nodes.values():
                        if site["type"] == "sample":
                            check_site_shape(site, self.max_plate_nesting)
        return Run(model_trace, guide_trace, handler.records, self.num_particles)

    @staticmethod
    def _rng_state() -> tuple:
        """The global random state (CPU, and every CUDA device once CUDA is in use)."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_rng_state(state: tuple) -> None:
        cpu, cuda = state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    def _check_coupled(self, first: Run, other: Run) -> None:
        """Raise unless the runs saw the same Bernoulli sites with equal logits."""
        same = first.records.keys() == other.records.keys() and all(
            torch.equal(first.records[n][1].detach(), other.records[n][1].detach())
            for n in first.records
        )
        if not same:
            raise ValueError(
                f"{self}: the logits of a Bernoulli guide site depend on another Bernoulli "
                "site's value (layered discrete latents), which this estimator does not "
                "couple; use 'score-function-loo-baseline' or 'vimco'"
            )

    def _estimate(self, model, guide, args, kwargs) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative ELBO estimate as a tensor whose gradient is the estimator's (plus,
        for estimators with parameters of their own, the gradient of their objective)."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        self._prepare(model, guide, args, kwargs)
        elbo, surrogate, own = self._estimate(model, guide, args, kwargs)
        surrogate = torch.as_tensor(surrogate)
        loss = -torch.as_tensor(elbo, dtype=surrogate.dtype).detach()
        warn_if_nan(loss, "loss")
        own = torch.as_tensor(own, dtype=surrogate.dtype)
        return loss - (surrogate - surrogate.detach()) + (own - own.detach())
