"""Estimators declared in one place: every registered estimator declares its traits, and every
consumer (registry, capture engine, checkpoints, variance tools, semi-amortized guide) reads
them through ``traits_of`` and agrees with what the estimator does."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceGraph_ELBO, TraceMeanField_ELBO

from pyro_lvm.capture.record import not_capturable
from pyro_lvm.elbo import (
    ESTIMATORS,
    FIVO,
    SPECS,
    STL,
    Estimator,
    EstimatorTraits,
    SurrogateELBO,
    make_estimator,
    register,
    traits_of,
)
from pyro_lvm.elbo.stateful import get_estimator_state, set_estimator_state
from pyro_lvm.elbo.traits import CATEGORIES, SITES
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.guides.semi_amortized import _plate_free_bound
from pyro_lvm.handlers import FreeBitsELBO, KLWeightedELBO, linear_schedule
from pyro_lvm.models import LinearGaussian
from pyro_lvm.variance import gradient_moments

NAMES = sorted(ESTIMATORS)
N, B = 8, 4


def _k(name: str) -> int:
    return max(SPECS[name].min_particles, 2)


def _setup():
    model = LinearGaussian(3, 2, noise_scale=0.8, num_data=N)
    guide = AmortizedGaussianGuide(3, 2, encoder=torch.nn.Linear(3, 4), num_data=N)
    return model, guide, model.sample(N)


# ----- every registered estimator declares its traits, and its instances carry them -------


@pytest.mark.parametrize("name", NAMES)
def test_every_registered_estimator_declares_traits_its_instances_carry(name):
    traits = SPECS[name].traits
    assert isinstance(traits, EstimatorTraits)
    assert traits.category in CATEGORIES and traits.sites in SITES
    est = make_estimator(name, _k(name))
    assert traits_of(est) == traits
    # no second spelling of a trait outside the declaration (old-style class attributes)
    assert getattr(est, "capturable", traits.capturable) == traits.capturable
    assert getattr(est, "min_particles", traits.min_particles) == traits.min_particles


@pytest.mark.parametrize("name", NAMES)
def test_the_capture_engine_reads_the_traits(name):
    est = make_estimator(name, _k(name))
    assert (not_capturable(est) is None) == traits_of(est).capturable


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_read_the_traits(name):
    """A stateful estimator's state is saved; a stateless one saves None and loses nothing:
    after a gradient step its state_dict (if any) holds no value."""
    model, guide, x = _setup()
    est = make_estimator(name, _k(name))
    est.loss_and_grads(model, guide, x[:B], torch.arange(B))
    state = get_estimator_state(est)
    if traits_of(est).stateful:
        assert isinstance(state, dict)
        fresh = make_estimator(name, _k(name))
        set_estimator_state(fresh, state)
    else:
        assert state is None
        leftover = est.state_dict() if hasattr(est, "state_dict") else {}
        assert not any(v for v in leftover.values() if not isinstance(v, dict)), leftover


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n].traits.capturable])
def test_a_capturable_estimator_changes_no_state_on_the_gradient_path(name):
    """What a captured graph would freeze must not change: the state after a gradient step
    equals the state before it (on a model whose sites carry no baseline options)."""
    model, guide, x = _setup()
    est = make_estimator(name, _k(name))
    before = est.state_dict() if traits_of(est).stateful else {}
    est.loss_and_grads(model, guide, x[:B], torch.arange(B))
    after = est.state_dict() if traits_of(est).stateful else {}
    assert repr(before) == repr(after)


@pytest.mark.parametrize("name", [n for n in NAMES if SPECS[n].min_particles > 1])
def test_min_particles_is_checked_by_the_class_too(name):
    """The registry and the constructor refuse the same K: one declaration."""
    with pytest.raises(ValueError, match="num_particles"):
        SPECS[name].factory(num_particles=SPECS[name].min_particles - 1)


@pytest.mark.parametrize("name", NAMES)
def test_the_variance_tools_read_the_traits(name):
    """gradient_moments refuses to capture exactly the estimators whose traits say so."""
    model, guide, x = _setup()
    est = make_estimator(name, _k(name))
    result = gradient_moments(est, model, guide, x[:B], torch.arange(B), num_draws=3, seed=0)
    refused = result.path == "loop" and "capturable=False" in (result.reason or "")
    assert refused == (not traits_of(est).capturable), result.reason


def test_the_semi_amortized_guide_reads_the_gradient_kind():
    bounds = [n for n in NAMES if SPECS[n].category == "bound"]
    for name in bounds:
        if SPECS[name].traits.gradient == "dreg":
            assert not _plate_free_bound(name)
    assert _plate_free_bound("iwae") and not _plate_free_bound("iwae-dreg")


# ----- Pyro's own ELBOs, wrappers and users' own classes -----------------------------------


def test_pyro_elbos_and_wrappers():
    assert traits_of(pyro.infer.Trace_ELBO()) == EstimatorTraits()
    assert traits_of(TraceMeanField_ELBO()).sites == "reparam"
    assert not traits_of(TraceGraph_ELBO()).capturable  # no differentiable_loss
    avg = make_estimator("score-function-avg-baseline")
    assert traits_of(KLWeightedELBO(avg, 0.5)) == traits_of(avg)
    assert not traits_of(FreeBitsELBO(0.1, base=make_estimator("hmc-refined"))).capturable
    scheduled = traits_of(KLWeightedELBO(pyro.infer.Trace_ELBO(), linear_schedule(10)))
    assert scheduled.stateful and scheduled.capturable  # β reaches a graph as an input
    assert not traits_of(KLWeightedELBO(pyro.infer.Trace_ELBO(), 0.5)).stateful


def test_a_users_own_elbo_is_read_from_what_it_shows():
    class Counting(pyro.infer.Trace_ELBO):
        capturable = False

        def state_dict(self):
            return {"calls": 1}

        def load_state_dict(self, state):
            pass

    class Plain:  # an object with loss_and_grads only
        def loss_and_grads(self, model, guide, *args, **kwargs):
            return 0.0

    assert traits_of(Counting()) == EstimatorTraits(stateful=True, capturable=False)
    assert traits_of(Plain()) == EstimatorTraits(capturable=False)  # no differentiable_loss


def test_a_subclass_that_keeps_state_is_declared_stateful_once():
    class WithState(STL):
        def state_dict(self):
            return {"t": 0}

    assert WithState.traits == replace(STL.traits, stateful=True, capturable=False)
    assert traits_of(WithState()).stateful and not_capturable(WithState()) is not None


def test_a_registration_may_narrow_the_class_traits_for_its_name():
    register("test-narrow", "bound", sites="reparam", min_particles=3)(STL)
    try:
        traits = SPECS["test-narrow"].traits
        assert traits == replace(STL.traits, category="bound", sites="reparam", min_particles=3)
        assert traits_of(make_estimator("test-narrow", 3)) == traits
        with pytest.raises(ValueError, match="num_particles >= 3"):
            make_estimator("test-narrow", 2)
    finally:
        SPECS.pop("test-narrow"), ESTIMATORS.pop("test-narrow")


def test_bad_traits_are_refused():
    with pytest.raises(ValueError, match="category"):
        EstimatorTraits(category="nope")
    with pytest.raises(ValueError, match="sites"):
        EstimatorTraits(sites="continuous")
    with pytest.raises(ValueError, match="min_particles"):
        EstimatorTraits(min_particles=0)
    with pytest.raises(ValueError, match="gradient"):
        EstimatorTraits(gradient="Not A Kind")


def test_checkpoints_of_stateless_estimators_written_before_traits_still_load():
    est = make_estimator("iwae", 2)
    set_estimator_state(est, {})  # what every Estimator wrote before
    set_estimator_state(KLWeightedELBO(est, 0.5), {"base": {}})
    with pytest.raises(ValueError, match="keeps none"):
        set_estimator_state(est, {"step_size": 0.1})


# ----- FIVO stands on the same base -------------------------------------------------------


def test_fivo_stands_on_the_estimator_base():
    assert issubclass(FIVO, Estimator)
    for method in ("loss", "loss_and_grads", "state_dict", "load_state_dict"):
        assert getattr(FIVO, method) is getattr(Estimator, method), method
    assert traits_of(FIVO(2)).gradient == "smc"
    assert traits_of(FIVO(2, resampling="none")).gradient == "reparam"
    with pytest.raises(ValueError, match="keeps no state"):
        FIVO(2).load_state_dict({"x": 1})


GUIDE = Path(__file__).parents[2] / "docs" / "guides" / "writing_an_estimator.md"


def test_the_guides_example_runs_and_registers_once():
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert blocks
    before = set(SPECS)
    try:
        for index, code in enumerate(blocks):
            exec(compile(code, f"writing_an_estimator.md example {index}", "exec"), {})
        (name,) = set(SPECS) - before
        est = make_estimator(name, 2)
        model, guide, x = _setup()
        assert torch.isfinite(torch.as_tensor(est.loss(model, guide, x)))
        with pytest.raises(ValueError, match="num_particles >= 2"):
            make_estimator(name, 1)
    finally:
        for name in set(SPECS) - before:
            SPECS.pop(name), ESTIMATORS.pop(name)


def test_a_new_estimator_is_one_class_and_one_registration():
    """The docs' example (docs/guides/writing_an_estimator.md): declared traits, registered,
    built by name, its traits read by every consumer."""

    @register("test-half-elbo", summary="half the ELBO (a test)")
    class HalfELBO(SurrogateELBO):
        traits = replace(SurrogateELBO.traits, sites="reparam")

        def _differentiable_loss_particle(self, model_trace, guide_trace):
            elbo = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
            return -0.5 * elbo.detach(), -0.5 * elbo

    try:
        est = make_estimator("test-half-elbo", 2)
        assert traits_of(est) == SPECS["test-half-elbo"].traits == HalfELBO.traits
        assert not_capturable(est) is None and get_estimator_state(est) is None

        def model():
            pyro.sample("z", dist.Normal(0.0, 1.0))

        def guide():
            pyro.sample("z", dist.Normal(0.5, 1.0))

        pyro.set_rng_seed(0)
        half = est.loss(model, guide)
        pyro.set_rng_seed(0)
        assert half == pytest.approx(0.5 * make_estimator("elbo", 2).loss(model, guide))
    finally:
        SPECS.pop("test-half-elbo"), ESTIMATORS.pop("test-half-elbo")
