"""Pyro's own ELBOs in a training loop: adapt the ones whose loss is not a bound, refuse the rest.

A training loop reports ``loss_and_grads``'s value as the negative bound and calls ``loss``
for validation. Most of Pyro's ELBOs keep that contract; :func:`prepare_for_fit` adapts
the two that do not and refuses, before the first step, the ones that cannot train on
minibatches, with the reason and what to use instead.
"""

from __future__ import annotations

from typing import Any

import pyro.infer
import torch
from pyro.infer import ELBO, RenyiELBO, ReweightedWakeSleep, TraceTailAdaptive_ELBO
from pyro.infer.util import torch_item

from pyro_lvm.elbo.base import RNGNeutralGuess
from pyro_lvm.elbo.traits import PYRO_TRAITS

__all__ = [
    "TailAdaptiveWithBound",
    "TraceMeanField_ELBO",
    "Trace_ELBO",
    "WakeSleepLoss",
    "prepare_for_fit",
]


class Trace_ELBO(RNGNeutralGuess, pyro.infer.Trace_ELBO):  # noqa: N801 - Pyro's name
    """Pyro's :class:`pyro.infer.Trace_ELBO` (registered as ``"elbo"``), whose first-call
    ``max_plate_nesting`` dry run leaves the caller's random stream untouched."""


class TraceMeanField_ELBO(RNGNeutralGuess, pyro.infer.TraceMeanField_ELBO):  # noqa: N801
    """Pyro's :class:`pyro.infer.TraceMeanField_ELBO` (registered as ``"elbo-analytic-kl"``),
    with the RNG-neutral dry run of :class:`Trace_ELBO`."""


_JIT_PREFIX = "Jit"


class WakeSleepLoss(ELBO):
    r"""Pyro's :class:`~pyro.infer.ReweightedWakeSleep` reporting one number.

    Training applies Pyro's own step: the wake-θ loss (the negative IWAE estimate
    :math:`-\log \frac1K \sum_k w_k`) trains the model and the wake-φ loss the guide, in one
    backward pass of their sum, exactly as ``ReweightedWakeSleep.loss_and_grads`` does.
    The value reported is the wake-θ loss, a negative K-sample bound; :meth:`loss` returns it
    too (Pyro's returns the ``(wake_theta, phi)`` pair, which a loop cannot average).

    :param base: the ``ReweightedWakeSleep`` instance.
    """

    traits = PYRO_TRAITS[ReweightedWakeSleep]

    def __init__(self, base: ReweightedWakeSleep):
        super().__init__(
            num_particles=base.num_particles,
            max_plate_nesting=base.max_plate_nesting,
            vectorize_particles=base.vectorize_particles,
        )
        self.base = base

    def _get_trace(self, model, guide, args, kwargs):  # pragma: no cover - never traced alone
        raise NotImplementedError

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The wake-θ loss (negative K-sample bound), no gradient."""
        wake_theta, _ = self.base.loss(model, guide, *args, **kwargs)
        return torch_item(wake_theta)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Pyro's wake-θ + wake-φ backward pass; returns the wake-θ loss."""
        wake_theta, _ = self.base.loss_and_grads(model, guide, *args, **kwargs)
        return float(wake_theta)

    def state_dict(self) -> dict[str, Any]:
        """No state is kept across steps."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accept the empty state."""


class TailAdaptiveWithBound(TraceTailAdaptive_ELBO):
    r"""Pyro's :class:`~pyro.infer.TraceTailAdaptive_ELBO` whose value is the ELBO.

    The gradient is Pyro's tail-adaptive f-divergence surrogate (Wang, Liu & Liu 2018),
    unchanged; the value, which Pyro does not compute (it reports ``inf``), is the usual
    ELBO estimate :math:`-\frac1K \sum_k [\log p(x, z_k) - \log q(z_k)]` from the same
    particles: a bound a loop can report, guard and validate on.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        _, surrogate = super()._differentiable_loss_particle(model_trace, guide_trace)
        elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        return -torch_item(elbo), surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The negative ELBO estimate, no gradient."""
        with torch.no_grad():
            return pyro.infer.Trace_ELBO.loss(self, model, guide, *args, **kwargs)


def _refuse(loss: ELBO, why: str, instead: str) -> ValueError:
    return ValueError(f"{type(loss).__name__} cannot train in fit: {why}; {instead}")


def prepare_for_fit(loss: ELBO, num_data: int | None = None, batch_size: int | None = None) -> ELBO:
    """The estimator a training loop should step, called once before the first step.

    Our registered estimators and Pyro's ``Trace_ELBO``, ``TraceMeanField_ELBO``,
    ``TraceGraph_ELBO`` and ``TraceEnum_ELBO`` are returned unchanged;
    ``ReweightedWakeSleep`` becomes :class:`WakeSleepLoss` and ``TraceTailAdaptive_ELBO``
    :class:`TailAdaptiveWithBound` (same gradient, a reportable bound). Refused with a
    ``ValueError`` naming the reason and the replacement:

    - the ``Jit*`` ELBOs when ``batch_size`` does not divide ``num_data``: a trace keeps the
      first minibatch's shape and the shorter last minibatch breaks it (use the non-jit
      class; the loop captures the step itself);
    - ``RenyiELBO`` on minibatches (``batch_size < num_data``): it applies the logsumexp to
      subsample-scaled log-densities, wrong for local latents (pyro issue #3104);
    - ``ReweightedWakeSleep`` with ``insomnia < 1``: its sleep phase calls the guide with an
      ``observations=`` keyword that ``(x, idx)`` models and guides do not take.

    :param loss: the estimator.
    :param num_data: training-set size N (``None``: no minibatch checks).
    :param batch_size: minibatch size B.
    """
    minibatches = num_data is not None and batch_size is not None and batch_size < num_data
    if type(loss).__name__.startswith(_JIT_PREFIX) and type(loss).__module__.startswith("pyro."):
        if num_data is not None and batch_size is not None and num_data % batch_size:
            raise _refuse(
                loss,
                f"it traces the first minibatch's shape, and N = {num_data} is not a multiple "
                f"of batch_size = {batch_size} (the last minibatch is shorter)",
                f"use {type(loss).__name__[len(_JIT_PREFIX) :]} (fit captures the step itself) "
                "or a batch_size that divides N",
            )
        return loss
    if isinstance(loss, ReweightedWakeSleep):
        if loss.insomnia < 1.0:
            raise _refuse(
                loss,
                f"insomnia={loss.insomnia} runs the sleep phase, which calls the guide with an "
                "observations= keyword that (x, idx) guides do not take",
                "use insomnia=1.0 (wake-phi only) or make_estimator('iwae')",
            )
        return WakeSleepLoss(loss)
    if isinstance(loss, TraceTailAdaptive_ELBO) and not isinstance(loss, TailAdaptiveWithBound):
        adapted = TailAdaptiveWithBound.__new__(TailAdaptiveWithBound)
        adapted.__dict__.update(loss.__dict__)
        return adapted
    if isinstance(loss, RenyiELBO) and minibatches:
        raise _refuse(
            loss,
            "on minibatches it applies the logsumexp over particles to subsample-scaled "
            "log-densities, which is wrong for local latents (pyro issue #3104)",
            "use make_estimator('renyi', alpha=...) (pyro_lvm.elbo.RenyiBound), which combines "
            "particles per data point, or batch_size >= N",
        )
    return loss
