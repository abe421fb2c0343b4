"""The score-function (REINFORCE) ELBO estimator for every guide site, with control variates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pyro
import torch
from pyro.distributions.util import detach, scale_and_mask
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import torch_item
from torch import nn

from pyro_lvm.elbo.base import (
    DetachSamples,
    SurrogateELBO,
    particle_dim,
    rescored_log_prob,
)
from pyro_lvm.elbo.baselines import (
    BASELINES,
    DecayingAverageBaseline,
    NVILBaseline,
    baseline_options,
    leave_one_out_baseline,
)
from pyro_lvm.elbo.registry import register
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.elbo.traits import EstimatorTraits

__all__ = ["ScoreFunctionELBO"]

_NONE = "score function (REINFORCE) at every guide site, no baseline"
_AVG = "score function at every guide site, decaying-average baseline"
_LOO = "score function at every guide site, leave-one-out baseline over the K particles"
_NVIL = "score function at every guide site, learned input-dependent baseline (NVIL)"


@register("score-function-nvil", baseline="nvil", summary=_NVIL)
@register("score-function-loo-baseline", baseline="loo", summary=_LOO)
@register("score-function-avg-baseline", baseline="avg", summary=_AVG)
@register("score-function", baseline="none", summary=_NONE)
class ScoreFunctionELBO(SurrogateELBO):
    r"""The ELBO with score-function gradients at every guide site, reparameterizable or not.

    Every guide sample is drawn and then detached, :math:`z = \mathrm{stop}(z)`, so the
    gradient of the guide parameters φ comes only from the score. For a guide site s with
    plates :math:`P_s` the learning signal is Rao-Blackwellized by plates: it keeps only the
    terms of :math:`\log p(x, z) - \log q(z)` in the same plate slice (per data point inside
    the data plate, per particle),

    .. math::

        f_s = \sum_{\text{sites } t} \textstyle\sum_{P_t \setminus P_s}
              \big[\log p(t) - \log q(t)\big], \qquad
        \widehat{\nabla_\phi \mathcal L} = \sum_s \nabla_\phi \log q_\phi(z_s)\,(f_s - b_s),

    and model parameters θ get :math:`\nabla_\theta \log p_\theta(x, z)`. The loss is
    :math:`-\frac1K \sum_k [\log p(x, z_k) - \log q(z_k)]`, exactly as ``Trace_ELBO``.

    Control variates :math:`b_s` (see :mod:`pyro_lvm.elbo.baselines`):

    - ``"none"``; ``"avg"``: decaying average of :math:`f_s` (factor ``baseline_beta``);
    - ``"loo"``: leave-one-out mean over the K vectorized particles (needs K ≥ 2);
    - ``"nvil"``: a decaying average of :math:`f_s` (centring, factor ``baseline_beta``)
      plus a learned :math:`b_\psi(x)` (an :class:`NVILBaseline` built on the first call
      from ``x = args[0]`` unless ``nn_baseline`` is given), registered in the param store
      as ``nn_baseline_name`` and trained by the squared error to the centred signal
      (Mnih & Gregor 2014, section 3.3).

    A guide site with ``infer={"baseline": {...}}`` uses those options instead, with the keys
    of ``TraceGraph_ELBO`` (``use_decaying_avg_baseline``, ``baseline_beta``, ``nn_baseline``,
    ``nn_baseline_input``, ``baseline_value``). Their squared-error baseline loss enters the
    gradient only, never the loss value.

    .. warning:: The decaying averages live in this object: save them with
        :meth:`state_dict` next to the param store. :meth:`loss` does not update them.
        Guide distributions score the detached sample with live parameters; flows without
        an inverse (Pyro's ``Planar``, ``Radial``) do so by the linearized inverse of
        :mod:`pyro_lvm.elbo.rescore` (exact value and first derivatives).

    :param num_particles: K, vectorized by default.
    :param baseline: one of ``"none"``, ``"avg"``, ``"loo"``, ``"nvil"``.
    :param baseline_beta: decay β ∈ [0, 1) of ``"avg"``.
    :param nn_baseline: optional network ``x -> b(x)`` of shape ``x.shape[:-1]`` for ``"nvil"``.
    :param nn_baseline_hidden: hidden widths of the default NVIL network.
    :param nn_baseline_name: its name in the param store.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.
    :raises ValueError: on an unknown baseline, β outside [0, 1), or ``"loo"`` with K < 2 or
        unvectorized particles.

    Example::

        svi = SVI(model, guide, Adam({"lr": 1e-2}), ScoreFunctionELBO(8, baseline="loo"))

    References:

    1. Williams (1992), REINFORCE, Machine Learning 8.
    2. Ranganath, Gerrish & Blei (2014), *Black Box Variational Inference*, arXiv:1401.0118.
    3. Mnih & Gregor (2014), *Neural Variational Inference and Learning in Belief Networks*,
       arXiv:1402.0030.
    4. Schulman et al. (2015), *Gradient Estimation Using Stochastic Computation Graphs*,
       arXiv:1506.05254.
    """

    #: keeps decaying averages (``baseline="avg"`` or a site's own ``infer={"baseline": ...}``)
    #: and NVIL's network across steps: every configuration is checkpointed
    traits = replace(SurrogateELBO.traits, stateful=True, gradient="score")
    _particles_remedy = (
        "The leave-one-out baseline averages the other particles: use num_particles=K >= 2, "
        "or baseline='avg'."
    )

    # the registry calls this at import time, before mutmut's trampolines exist
    # pragma: no mutate start
    @classmethod
    def configured_traits(cls, baseline: str = "none", **config: Any) -> EstimatorTraits:
        """The class's traits for ``baseline``: the leave-one-out baseline needs K >= 2; the
        average and NVIL baselines learn in Python between steps, so they are not captured
        (without a baseline or with the leave-one-out one nothing changes between steps but
        a site's own decaying average, restored after each dry run)."""
        return replace(
            cls.traits,
            min_particles=2 if baseline == "loo" else 1,
            capturable=baseline in ("none", "loo"),
        )

    # pragma: no mutate end

    def __init__(
        self,
        num_particles: int = 1,
        baseline: str = "none",
        baseline_beta: float = 0.9,
        nn_baseline: nn.Module | None = None,
        nn_baseline_hidden: Sequence[int] = (32,),
        nn_baseline_name: str = "nvil_baseline",
        **kwargs: Any,
    ):
        if baseline not in BASELINES:
            raise ValueError(f"unknown baseline {baseline!r}; choose one of {list(BASELINES)}")
        if not 0.0 <= baseline_beta < 1.0:
            raise ValueError(f"baseline_beta must lie in [0, 1), got {baseline_beta}")
        kwargs.setdefault("vectorize_particles", True)
        self.traits = self.configured_traits(baseline=baseline)
        if baseline == "loo":
            if not kwargs["vectorize_particles"]:
                raise ValueError(
                    "baseline='loo' needs vectorize_particles=True (the particles must share "
                    "one trace)"
                )
        super().__init__(num_particles=num_particles, **kwargs)
        self.baseline = baseline
        self.baseline_beta = float(baseline_beta)
        self.nn_baseline = nn_baseline
        self.nn_baseline_hidden = tuple(nn_baseline_hidden)
        self.nn_baseline_name = nn_baseline_name
        self.averages = DecayingAverageBaseline()
        self._input: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_particles={self.num_particles}, baseline={self.baseline!r})"
        )

    def state_dict(self) -> dict[str, Any]:
        """The decaying averages and the NVIL network's weights (plain tensors).

        The NVIL weights are also in Pyro's param store (``nn_baseline_name``); a restored
        store takes precedence at the next call.
        """
        state: dict[str, Any] = {"averages": self.averages.state_dict()}
        if self.baseline == "nvil" and isinstance(self.nn_baseline, NVILBaseline):
            state["nvil_in_dim"] = int(self.nn_baseline.in_dim)
            state["nvil"] = {
                k: v.detach().clone() for k, v in self.nn_baseline.state_dict().items()
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly (builds the NVIL network if needed)."""
        unknown = set(state) - {"averages", "nvil", "nvil_in_dim"}
        if unknown:
            raise ValueError(f"ScoreFunctionELBO keeps no state named {sorted(unknown)}")
        self.averages.load_state_dict(state.get("averages", {}))
        if "nvil" in state:
            if self.nn_baseline is None:
                self.nn_baseline = NVILBaseline(int(state["nvil_in_dim"]), self.nn_baseline_hidden)
            self.nn_baseline.load_state_dict(state["nvil"])

    def _prepare(self, model, guide, args: tuple, kwargs: dict) -> None:
        if self.baseline != "nvil":
            return
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                "baseline='nvil' reads a data matrix (N, D) from the first argument of "
                f"model(x, idx), got {got}; call the estimator with x as a matrix, give the "
                "guide sites their own infer={'baseline': ...}, or use baseline='loo'"
            )
        if self.nn_baseline is None:
            # built on the first call, without consuming the caller's random stream
            with torch.random.fork_rng(devices=[]):
                self.nn_baseline = NVILBaseline(x.shape[-1], self.nn_baseline_hidden).to(x)
        if isinstance(self.nn_baseline, torch.nn.Module):  # a plain function holds no params
            # a restored param store replaces the network's parameters by the stored ones
            pyro.module(self.nn_baseline_name, self.nn_baseline, update_module_params=True)
        self._input = x.detach()

    def _get_trace(self, model, guide, args, kwargs):
        """Guide trace with detached samples and the model replayed on it, log-densities only.

        As :func:`pyro.infer.enum.get_importance_trace`, but without ``score_parts``: the
        estimator scores every site itself, and distributions that compute their score
        parts from a cached sample (rejection samplers) would refuse the detached one. Guide
        log-densities come from :func:`~pyro_lvm.elbo.base.rescored_log_prob`; built and
        checked by :func:`~pyro_lvm.elbo.traces.importance_traces`.
        """
        return importance_traces(
            model,
            DetachSamples()(guide),
            args,
            kwargs,
            self.max_plate_nesting,
            score_guide=self._score_guide,
        )

    def _score_guide(self, guide_trace) -> None:
        """Score every guide site at its detached sample with live parameters."""
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                # log q_phi at the detached sample, parameters live: flows without an inverse
                # (Planar, Radial) by the linearized inverse of pyro_lvm.elbo.rescore
                log_q = rescored_log_prob(site, site["value"], stop=False, estimator=str(self))
                site["unscaled_log_prob"] = log_q
                site["log_prob"] = scale_and_mask(log_q, site["scale"], site["mask"])
                site["log_prob_sum"] = site["log_prob"].sum()
        guide_trace.compute_log_prob()

    def _site_baseline(
        self, name: str, site: dict, signal: torch.Tensor
    ) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """The baseline b and its squared-error loss for one guide site."""
        options = baseline_options(site)
        baseline: torch.Tensor | float = 0.0
        learned = None
        if options is not None:
            if options["use_decaying_avg_baseline"]:
                baseline = self.averages(
                    name, signal, options["baseline_beta"], update=self.updates_state
                )
            if options["nn_baseline"] is not None:
                learned = options["nn_baseline"](detach(options["nn_baseline_input"]))
            elif options["baseline_value"] is not None:
                learned = options["baseline_value"]
        elif self.baseline == "avg":
            baseline = self.averages(name, signal, self.baseline_beta, update=self.updates_state)
        elif self.baseline == "loo":
            dim = particle_dim(site)
            if dim is None:
                raise ValueError(
                    f"site {name!r} is outside the vectorized particle plate: the leave-one-out "
                    "baseline needs num_particles >= 2 with vectorize_particles=True"
                )
            baseline = leave_one_out_baseline(signal, dim)
        elif self.baseline == "nvil":
            # Mnih & Gregor (2014, section 3.3): centre the signal by a running mean and learn
            # b(x) on the rest; a network alone cannot follow a signal of hundreds of nats
            baseline = self.averages(name, signal, self.baseline_beta, update=self.updates_state)
            learned = self.nn_baseline(self._input)
        if learned is None:
            return baseline, 0.0
        learned = torch.as_tensor(learned, dtype=signal.dtype)
        try:
            fits = torch.broadcast_shapes(learned.shape, signal.shape) == signal.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"site {name!r}: the learned baseline has shape {tuple(learned.shape)}, which "
                f"does not broadcast to the learning signal's shape {tuple(signal.shape)}; give "
                "the site its own infer={'baseline': ...} or use baseline='avg'"
            )
        # the network fits what the rest of the baseline leaves (as TraceGraph_ELBO's does)
        loss = (signal.detach() - baseline - learned).pow(2).sum()
        return baseline + learned, loss

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        elbo = 0.0
        surrogate = 0.0
        baseline_loss = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                elbo = elbo + torch_item(site["log_prob_sum"])
                surrogate = surrogate + site["log_prob_sum"]
        log_r = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            elbo = elbo - torch_item(site["log_prob_sum"])
            if site["is_observed"]:
                continue
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            signal = torch.as_tensor(log_r.sum_to(site["cond_indep_stack"]))
            shape = torch.broadcast_shapes(signal.shape, site["log_prob"].shape)
            signal = signal.expand(shape)
            baseline, loss_b = self._site_baseline(name, site, signal)
            score = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
            surrogate = surrogate + (score * (signal - baseline).detach()).sum()
            baseline_loss = baseline_loss + loss_b
        return -elbo, -surrogate + baseline_loss
