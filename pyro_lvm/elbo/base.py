r"""The estimator family base: derived loss methods, estimator state, stopped rescoring.

Every registered estimator derives from :class:`Estimator` through one of two family bases:

- :class:`SurrogateELBO` (single-sample surrogates: STL, score function, MMD/WAE,
  HMC-refined) implements ``_differentiable_loss_particle(model_trace, guide_trace)``;
- :class:`~pyro_lvm.elbo.multisample.MultiSampleELBO` (multi-sample bounds: Rényi/IWAE,
  VIMCO) implements ``_bound_and_surrogate(weights)``.

What each estimator is and can do (category, guide sites, particles, state, capture,
gradient) is its class attribute ``traits`` (:mod:`pyro_lvm.elbo.traits`); its trace pairs
come from the one builder :func:`~pyro_lvm.elbo.traces.importance_traces`.

In both, ``differentiable_loss`` is the single source of truth; :meth:`Estimator.loss` and
:meth:`Estimator.loss_and_grads` derive from it, so the three agree under one seed.
State kept across steps (baselines, an adapted step size) is updated only on the
gradient path: :meth:`Estimator.loss` runs with the state frozen, and
:meth:`Estimator.state_dict` / :meth:`Estimator.load_state_dict` round-trip it as plain
tensors, floats and ints.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.util import warn_if_nan

from pyro_lvm.elbo.rescore import RESCORE_FAILURES, rescorable
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.elbo.traits import EstimatorTraits

__all__ = [
    "DetachSamples",
    "Estimator",
    "PARTICLE_PLATE",
    "RNGNeutralGuess",
    "SurrogateELBO",
    "check_num_particles",
    "particle_dim",
    "require_reparameterized",
    "rescored_log_prob",
    "stopped_log_prob",
]

#: name of the plate that :class:`pyro.infer.ELBO` wraps around vectorized particles
PARTICLE_PLATE = "num_particles_vectorized"


def check_num_particles(num_particles: Any, minimum: int = 1, remedy: str = "") -> int:
    """Return ``num_particles`` as an ``int`` or raise a ``ValueError`` naming the fix.

    :param num_particles: the requested number of particles K.
    :param minimum: the smallest K the estimator supports.
    :param remedy: extra advice appended to the error message.
    """
    if isinstance(num_particles, bool) or int(num_particles) != num_particles:
        raise ValueError(f"num_particles must be an integer, got {num_particles!r}")
    if int(num_particles) < minimum:
        raise ValueError(
            f"num_particles={num_particles} is too small: this estimator needs "
            f"num_particles >= {minimum}; pass num_particles={max(minimum, 2)} or more. "
            f"{remedy}".rstrip()
        )
    return int(num_particles)


def particle_dim(site: dict) -> int | None:
    """The batch dim of the vectorized-particle plate at a trace site, or ``None``."""
    for frame in site["cond_indep_stack"]:
        if frame.name == PARTICLE_PLATE and frame.vectorized:
            return frame.dim
    return None


def stopped_log_prob(site: dict, estimator: str, value: torch.Tensor | None = None):
    r"""The site's scaled, masked :math:`\log q_{\bar\phi}(z)`: its density with every
    parameter detached, at its sample (or ``value``, numerically equal to it) with the
    sample's gradient path kept. Flows without an inverse (Pyro's ``Planar``, ``Radial``)
    are rescored by the linearized inverse of :mod:`pyro_lvm.elbo.rescore`.

    :raises ValueError: when the distribution cannot score the value with stopped parameters
        (:func:`~pyro_lvm.elbo.rescore.rescorable` names why).
    """
    value = site["value"] if value is None else value
    log_q = rescored_log_prob(site, value, stop=True, estimator=estimator)
    return scale_and_mask(log_q, site["scale"], site["mask"])


def rescored_log_prob(site: dict, value: torch.Tensor, stop: bool, estimator: str) -> torch.Tensor:
    """The guide site's unscaled log-density at ``value`` (numerically its sample), with the
    parameters stopped or live (:func:`~pyro_lvm.elbo.rescore.rescorable`).

    :raises ValueError: naming the site, why it cannot be rescored and what to use instead.
    """
    try:
        fn = rescorable(site["fn"], stop)
        return fn.log_prob(value, *site["args"], **site["kwargs"])
    except RESCORE_FAILURES as e:
        params = "stopped" if stop else "live"
        raise ValueError(
            f"{estimator} rescores guide site {site['name']!r} with {params} parameters at a "
            f"value it did not just draw, which its distribution ({type(site['fn']).__name__}) "
            f"cannot score ({type(e).__name__}: {e}). Use 'elbo' or 'iwae' (which score the "
            "sample itself), or an invertible transform (e.g. affine_autoregressive)"
        ) from e


def require_reparameterized(guide_trace, estimator: str) -> None:
    """Raise a ``ValueError`` naming the guide sites that are not fully reparameterized:
    no ``rsample``, or ``score_parts`` with a score-function term (rejection samplers)."""
    bad = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], _Subsample):
            continue
        parts = site.get("score_parts")
        if not site["fn"].has_rsample or (
            parts is not None and not is_identically_zero(parts.score_function)
        ):
            bad.append(name)
    if bad:
        raise ValueError(
            f"{estimator} needs fully reparameterized guide sites, but {bad} have no rsample or "
            "carry a score-function term (e.g. a rejection sampler); use 'elbo', 'iwae' or "
            "'vimco', which add the score-function term"
        )


class DetachSamples(Messenger):
    """Draw every unobserved sample site, then cut its value from the autograd graph.

    Inside this handler a reparameterizable site behaves like a non-reparameterizable one:
    ``z = stop_gradient(rsample())``, so gradients of ``log q(z)`` flow only through the
    distribution's parameters (the score). Values set by inner handlers (``replay``,
    ``condition``) are detached as well; subsample sites are left alone.
    """

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or isinstance(msg["fn"], _Subsample):
            return
        if msg["value"] is None:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
        msg["value"] = msg["value"].detach()


class RNGNeutralGuess:
    """Mixin: Pyro's first-call guess of ``max_plate_nesting`` (a dry run of the model and
    guide) without drawing from the caller's random stream, so that the first call gives the
    same sample as every later one under one seed. Pyro's INFO line announcing the guess is
    kept out of the user's output (it would print once per estimator and run)."""

    def _guess_max_plate_nesting(self, model, guide, args, kwargs) -> None:
        elbo_logger = logging.getLogger("pyro.infer.elbo")
        level = elbo_logger.level
        elbo_logger.setLevel(max(level, logging.WARNING))
        try:
            with torch.random.fork_rng(devices=[]):
                super()._guess_max_plate_nesting(model, guide, args, kwargs)
        finally:
            elbo_logger.setLevel(level)


class Estimator(RNGNeutralGuess):
    r"""Mixin of every registered estimator (put it before the ``pyro.infer.ELBO`` class).

    Subclass contract: implement ``differentiable_loss`` (the family bases do, from one
    smaller method each); :meth:`loss` and :meth:`loss_and_grads` derive from it. Declare
    what the estimator is and can do in the class attribute :attr:`traits` (an
    :class:`~pyro_lvm.elbo.traits.EstimatorTraits`; replace the fields that differ from the
    base's), and, when they depend on constructor arguments, override
    :meth:`configured_traits` and set ``self.traits = self.configured_traits(...)`` before
    calling ``super().__init__``. Estimators that keep state across steps declare
    ``stateful=True``, update it only while :attr:`updates_state` is true and override
    :meth:`state_dict` / :meth:`load_state_dict`; :meth:`loss` freezes the state.

    ``max_plate_nesting`` is guessed on the first call, as Pyro guesses it, unless given;
    the dry run does not consume the caller's random stream.

    :param num_particles: K, at least ``traits.min_particles``; vectorized by default.
    :param kwargs: Pyro's ``ELBO`` keyword arguments.
    :raises ValueError: on K below ``traits.min_particles``.
    """

    #: what this estimator is and can do; read through :func:`~pyro_lvm.elbo.traits_of`
    traits: EstimatorTraits = EstimatorTraits()
    #: advice appended to the error on too few particles
    _particles_remedy = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides :meth:`state_dict` without declaring its own
        :attr:`traits` keeps state: its traits become ``stateful=True, capturable=False``,
        read once here (the rule the capture engine and checkpoints used to apply)."""
        super().__init_subclass__(**kwargs)
        if "traits" not in cls.__dict__ and "state_dict" in cls.__dict__:
            cls.traits = replace(cls.traits, stateful=True, capturable=False)

    # the registry calls this at import time, before mutmut's trampolines exist
    # pragma: no mutate start
    @classmethod
    def configured_traits(cls, **config: Any) -> EstimatorTraits:
        """The traits of an instance built with the constructor arguments ``config`` (the
        registry calls it with a registration's bound arguments); default :attr:`traits`."""
        return cls.traits

    # pragma: no mutate end

    def __init__(self, num_particles: int = 1, **kwargs: Any):
        kwargs.setdefault("vectorize_particles", True)
        num_particles = check_num_particles(
            num_particles, self.traits.min_particles, self._particles_remedy
        )
        super().__init__(num_particles=num_particles, **kwargs)
        self._update_state = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_particles={self.num_particles})"

    @property
    def updates_state(self) -> bool:
        """Whether this call may update state kept across steps (false inside :meth:`loss`)."""
        return self._update_state

    @contextmanager
    def frozen_state(self) -> Iterator[None]:
        """Run the block without updating any state kept across steps."""
        update, self._update_state = self._update_state, False
        try:
            yield
        finally:
            self._update_state = update

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound estimate as a float; no gradient, no state update."""
        with torch.no_grad(), self.frozen_state():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagate :meth:`differentiable_loss` and return its value as a float."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def state_dict(self) -> dict[str, Any]:
        """State kept across steps, as plain tensors, floats and ints (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly.

        :raises ValueError: on keys this estimator does not keep.
        """
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(
                f"{type(self).__name__} keeps no state named {sorted(unknown)}; pass the "
                "state_dict() of an estimator of the same kind"
            )


class SurrogateELBO(Estimator, Trace_ELBO):
    r"""Single-sample family base: a ``Trace_ELBO`` whose :meth:`differentiable_loss` is primary.

    Subclass contract: implement ``_differentiable_loss_particle(model_trace, guide_trace)``
    returning ``(loss, surrogate_loss)`` for one (possibly vectorized) particle, where
    ``loss`` is the negative bound estimate (a float or a detached tensor) and
    ``surrogate_loss`` carries the gradient; optionally :meth:`_prepare`, run once per call
    before the particles are drawn. :meth:`differentiable_loss` averages over particles
    and returns the splice

    .. math::

        \hat L = \mathrm{loss} + (\mathrm{surrogate} - \mathrm{stop}(\mathrm{surrogate})),

    whose value is the loss and whose gradient is the estimator's.
    """

    def _prepare(self, model, guide, args: tuple, kwargs: dict) -> None:
        """Hook run once per call before the particles are drawn (default: nothing)."""

    def _get_trace(self, model, guide, args, kwargs):
        """One particle's (model, guide) trace pair: Pyro's own, through the library's one
        builder (:func:`~pyro_lvm.elbo.traces.importance_traces`), as ``Trace_ELBO`` builds it."""
        return importance_traces(model, guide, args, kwargs, self.max_plate_nesting)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound estimate as a tensor whose gradient is the estimator's."""
        self._prepare(model, guide, args, kwargs)
        loss = 0.0
        surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_p, surrogate_p = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        surrogate = torch.as_tensor(surrogate)
        loss = torch.as_tensor(loss, dtype=surrogate.dtype).detach()
        warn_if_nan(loss, "loss")
        return loss + (surrogate - surrogate.detach())
