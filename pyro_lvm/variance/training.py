r"""Gradient moments along the course of training, with each estimator's learned parts trained.

A variance figure taken at initialization says little about estimators that learn: an NVIL
baseline network or a RELAX surrogate starts untrained, so measured there it equals (or is
worse than) no control variate at all. :func:`moments_during_training` trains the scenario's
model and guide with one estimator *instance* by ``pyro.infer.SVI`` and measures the
gradient moments of that same instance (its baseline, control-variate scale, temperature and
surrogate network as trained so far) at several steps, with the estimator's state frozen
while it is measured. The model and guide move too, so every row is the variance *at that
point of training*, the quantity that decides how fast training goes (Rainforth et al. 2018
track the encoder's gradient SNR the same way).

References:

1. Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), *Tighter Variational Bounds
   are Not Necessarily Better*, ICML, arXiv:1802.04537.
2. Mnih & Gregor (2014), *Neural Variational Inference and Learning in Belief Networks*,
   arXiv:1402.0030.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pyro
from pyro.infer import SVI

from pyro_lvm.elbo import make_estimator
from pyro_lvm.variance.moments import gradient_moments, parameter_groups
from pyro_lvm.variance.scenarios import Scenario

__all__ = ["evaluations_per_particle", "moments_during_training", "particles_for_cost"]


def evaluations_per_particle(name: str) -> int:
    """Model evaluations one particle of the registered estimator ``name`` costs (2 for an
    antithetic pair, 3 for REBAR/RELAX's hard and two relaxed runs, else 1)."""
    from pyro_lvm.elbo.registry import SPECS

    if name not in SPECS:
        raise ValueError(f"unknown estimator {name!r}")
    target = SPECS[name].factory
    target = getattr(target, "func", target)
    return int(getattr(target, "evaluations_per_particle", 1))


def particles_for_cost(name: str, evaluations: int) -> int:
    """The K of estimator ``name`` that costs ``evaluations`` model evaluations per step.

    :raises ValueError: when ``evaluations`` is not a multiple of the estimator's cost per
        particle or gives fewer particles than it needs.
    """
    per = evaluations_per_particle(name)
    from pyro_lvm.elbo.registry import SPECS

    k, rest = divmod(int(evaluations), per)
    if rest or k < SPECS[name].min_particles:
        raise ValueError(
            f"{name} costs {per} model evaluations per particle and needs K >= "
            f"{SPECS[name].min_particles}: {evaluations} evaluations do not fit; use a "
            f"multiple of {per} that is at least {per * SPECS[name].min_particles}"
        )
    return k


def moments_during_training(
    scenario: Scenario | Callable[[], Scenario],
    estimator: str,
    num_particles: int,
    steps: Sequence[int] = (0, 100, 500),
    num_draws: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
    **estimator_kwargs,
) -> list[dict]:
    """Train with one estimator and measure its gradient moments at ``steps``.

    Step 0 is before any update (learned control variates untrained). Every SVI step uses
    the scenario's full data (``scenario.args``); the optimizer is Adam at ``lr`` for every
    parameter, the estimator's own included. Measurements use :func:`gradient_moments`
    with ``seed + step`` (common random numbers across estimators at one step) on the
    trained instance, its state frozen (:meth:`~pyro_lvm.elbo.base.Estimator.frozen_state`).

    :param scenario: a :class:`Scenario` or a zero-argument builder (called once; it
        should clear the param store, as the built-in scenarios do).
    :param estimator: a registry name.
    :param num_particles: its K.
    :param steps: the SVI steps after which to measure, increasing, non-negative.
    :param num_draws: gradient draws R per measurement.
    :param lr: Adam's learning rate.
    :param seed: the seed of training and of the measurements.
    :returns: rows of :meth:`GradientMoments.rows` with ``step``, ``scenario`` and the
        scenario's ``info`` added.
    """
    steps = [int(s) for s in steps]
    if not steps or steps != sorted(steps) or steps[0] < 0:
        raise ValueError(f"steps must be non-negative and increasing, got {steps}")
    if callable(scenario) and not isinstance(scenario, Scenario):
        scenario = scenario()
    pyro.set_rng_seed(seed)
    elbo = make_estimator(estimator, num_particles, **estimator_kwargs)
    groups = parameter_groups(scenario.model, scenario.guide, *scenario.args)
    reference = scenario.exact_gradient(groups)
    svi = SVI(scenario.model, scenario.guide, pyro.optim.Adam({"lr": lr}), elbo)
    rows, done = [], 0
    for step in steps:
        for _ in range(step - done):
            svi.step(*scenario.args)
        done = step
        if step > 0 and reference is not None:
            reference = scenario.exact_gradient(groups)
        frozen = getattr(elbo, "frozen_state", contextlib.nullcontext)
        with frozen():
            result = gradient_moments(
                elbo, scenario.model, scenario.guide, *scenario.args, num_draws=num_draws,
                groups=groups, reference=reference, seed=seed + step, name=estimator, jit=False,
            )  # fmt: skip
        loss = elbo.loss(scenario.model, scenario.guide, *scenario.args)
        rows.extend(
            result.rows(scenario=scenario.name, step=step, train_loss=loss, **scenario.info)
        )
    return rows
