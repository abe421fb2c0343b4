"""One model/guide check (pyro_lvm.validation.check_site_match) for the entry points, the
multi-sample bounds, evaluation and AIS: one rule, one message."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal

from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import log_importance_weights
from pyro_lvm.validation import InputError, check_site_match, validate_inputs


def _x():
    return torch.tensor([[0.3], [-1.2], [0.8], [2.0]])


def _model(x, idx=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1), 1.0).to_event(1), obs=x)


def _wrong_guide(x, idx=None):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("w", dist.Normal(0.0, 1.0))


def _message(fn) -> str:
    with pytest.raises(InputError) as info:
        fn()
    return str(info.value)


def test_the_entry_check_and_the_engine_raise_the_same_message():
    X = _x()
    at_entry = _message(lambda: validate_inputs(_model, _wrong_guide, X))
    in_bound = _message(lambda: make_estimator("iwae", 2).loss(_model, _wrong_guide, X))
    in_evaluation = _message(lambda: log_importance_weights(_model, _wrong_guide, X, 2))
    assert at_entry == in_bound == in_evaluation
    assert "unobserved model sites ['z'] have no guide site and guide sample sites ['w']" in (
        at_entry
    )


def _enumerated_model(x, idx=None):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(2.0 * c.unsqueeze(-1), 1.0).to_event(1), obs=x)


def _empty_guide(x, idx=None):
    pass


def test_model_enumerated_sites_pass_the_entry_check_and_are_refused_by_weights():
    X = _x()
    guide_trace = poutine.trace(_empty_guide).get_trace(X)
    model_trace = poutine.trace(poutine.replay(_enumerated_model, guide_trace)).get_trace(X)
    check_site_match(model_trace, guide_trace)  # TraceEnum_ELBO marginalizes 'c'
    message = _message(lambda: check_site_match(model_trace, guide_trace, enumerated=False))
    assert "sites ['c'] are enumerated by the model" in message and "TraceEnum_ELBO" in message
    assert _message(lambda: make_estimator("vimco", 2).loss(_enumerated_model, _empty_guide, X))


def _global_model(x):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc, scale), obs=x)


def test_auxiliary_guide_sites_are_accepted_everywhere():
    """Pyro's AutoMultivariateNormal draws an auxiliary site the model lacks; the importance
    weights score it (its Delta sites carry the Jacobian), so IWAE at K = 1 is the ELBO."""
    x = _x().squeeze(-1)
    guide = AutoMultivariateNormal(_global_model)
    pyro.set_rng_seed(0)
    iwae = make_estimator("iwae", 1).loss(_global_model, guide, x)
    pyro.set_rng_seed(0)
    assert iwae == pytest.approx(Trace_ELBO().loss(_global_model, guide, x), rel=1e-6)
