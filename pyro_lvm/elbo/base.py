"""Shared pieces of the estimators: argument checks, stopped sampling, a surrogate-first ELBO."""

from __future__ import annotations

from typing import Any

import torch
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.util import warn_if_nan

__all__ = [
    "DerivedLossMixin",
    "DetachSamples",
    "SurrogateELBO",
    "check_num_particles",
    "particle_dim",
]

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
            f"num_particles >= {minimum}. {remedy}".rstrip()
        )
    return int(num_particles)


def particle_dim(site: dict) -> int | None:
    """The batch dim of the vectorized-particle plate at a trace site, or ``None``."""
    for frame in site["cond_indep_stack"]:
        if frame.name == PARTICLE_PLATE and frame.vectorized:
            return frame.dim
    return None


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


class DerivedLossMixin:
    """``loss`` and ``loss_and_grads`` derived from ``differentiable_loss``.

    Mixed into every estimator here so that ``differentiable_loss`` is the single source of
    truth: the three methods agree under one seed by construction.
    """

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound estimate as a float (no gradient)."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagate :meth:`differentiable_loss` and return its value as a float."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


class SurrogateELBO(DerivedLossMixin, Trace_ELBO):
    r"""A ``Trace_ELBO`` whose :meth:`differentiable_loss` is the single source of truth.

    Subclass contract: implement ``_differentiable_loss_particle(model_trace, guide_trace)``
    returning ``(loss, surrogate_loss)`` for one (possibly vectorized) particle, where
    ``loss`` is the negative bound estimate and ``surrogate_loss`` carries the gradient.
    :meth:`differentiable_loss` averages over particles and returns the splice

    .. math::

        \hat L = \mathrm{loss} + (\mathrm{surrogate} - \mathrm{stop}(\mathrm{surrogate})),

    whose value is the loss and whose gradient is the estimator's. :meth:`loss` and
    :meth:`loss_and_grads` call the same code, so the three agree under one seed.
    Subclasses keeping state across steps (baselines) update it only when
    ``self._update_state`` is true, which :meth:`loss` turns off.

    Particles are vectorized by default (``vectorize_particles=True``).
    """

    def __init__(self, num_particles: int = 1, **kwargs: Any):
        kwargs.setdefault("vectorize_particles", True)
        super().__init__(num_particles=check_num_particles(num_particles), **kwargs)
        self._update_state = True

    def _prepare(self, args: tuple, kwargs: dict) -> None:
        """Hook run once per call before the particles are drawn (default: nothing)."""

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The negative bound estimate as a tensor whose gradient is the estimator's."""
        self._prepare(args, kwargs)
        loss = 0.0
        surrogate = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss_p, surrogate_p = self._differentiable_loss_particle(model_trace, guide_trace)
            loss = loss + loss_p / self.num_particles
            surrogate = surrogate + surrogate_p / self.num_particles
        surrogate = torch.as_tensor(surrogate)
        warn_if_nan(loss, "loss")
        return torch.as_tensor(loss, dtype=surrogate.dtype) + (surrogate - surrogate.detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative bound estimate as a float; no gradient, no state update."""
        update, self._update_state = self._update_state, False
        try:
            return super().loss(model, guide, *args, **kwargs)
        finally:
            self._update_state = update
