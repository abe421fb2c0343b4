"""One builder of the model/guide trace pair: every estimator (and AIS, the semi-amortized
guide) makes every check Pyro's ``Trace_ELBO`` makes under validation: sites, guide plates
missing from the model, event dims and shapes; the importance-weight estimators refuse what
Pyro only warns about where their weights would be wrong."""

from __future__ import annotations

import contextlib
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.elbo import ESTIMATORS, SPECS, make_estimator
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.evaluate import ais_log_likelihood

NAMES = sorted(ESTIMATORS)
# the MMD objectives compare latents across a data plate and NVIL reads a data matrix: the
# plate-less models here are refused by them before any trace is built
NEEDS_DATA = {"mmd-vae", "wae-mmd", "score-function-nvil"}
RUNS = [n for n in NAMES if n not in NEEDS_DATA]


def _model():
    pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def _guide_extra_plate():
    with pyro.plate("extra", 1):
        pyro.sample("z", dist.Normal(0.3, 1.0))


def _guide_extra_site():
    pyro.sample("z", dist.Normal(0.3, 1.0))
    pyro.sample("w", dist.Normal(0.0, 1.0))


def _guide_missing_site():
    pass


def _event_model():
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def _event_guide():
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0))  # batch (2,), event dim 0


def _flag(estimator, model, guide) -> str:
    """How ``estimator`` reacts: ``"error: ..."`` (a ``ValueError``), else ``"warning: ..."``
    (Pyro's validation warnings, whatever happens after them), else ``"silent"``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            estimator.loss(model, guide)
        except ValueError as e:
            return f"error: {e}"
        except Exception:  # noqa: BLE001 - a crash after the warning (Pyro's classes)
            pass
    found = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    return f"warning: {' | '.join(found)}" if found else "silent"


def test_pyro_flags_each_of_these():
    assert "plate statements in guide but not model" in _flag(
        Trace_ELBO(), _model, _guide_extra_plate
    )
    assert "in guide but not model" in _flag(Trace_ELBO(), _model, _guide_extra_site)
    assert "in model but not guide" in _flag(Trace_ELBO(), _model, _guide_missing_site)
    assert "event_dims disagree" in _flag(Trace_ELBO(), _event_model, _event_guide)


@pytest.mark.parametrize("name", RUNS)
def test_a_guide_plate_missing_from_the_model_is_flagged_as_pyro_flags_it(name):
    """Pyro checks the plates on the unpruned traces; a check after pruning the subsample
    sites (what the multi-sample bounds did) never sees them."""
    got = _flag(make_estimator(name, max(SPECS[name].min_particles, 2)), _model, _guide_extra_plate)
    assert "plate statements in guide but not model" in got, got


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("guide", [_guide_extra_site, _guide_missing_site])
def test_a_site_mismatch_is_flagged(name, guide):
    est = make_estimator(name, max(SPECS[name].min_particles, 2))
    got = _flag(est, _model, guide)
    assert "but not" in got or "mismatch" in got, got
    if SPECS[name].category in ("bound", "refined"):  # weights or MCMC from the guide's draws:
        assert got.startswith("error: model/guide mismatch"), got  # an error, not a warning


@pytest.mark.parametrize("name", RUNS)
def test_an_event_dim_mismatch_is_refused(name):
    got = _flag(make_estimator(name, max(SPECS[name].min_particles, 2)), _event_model, _event_guide)
    assert got.startswith("error:") and ("event_dim" in got or "shape" in got), got


def test_the_builder_is_pyros_own_when_nothing_is_customized():
    def model():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Normal(0.5, 1.0))

    from pyro.infer.enum import get_importance_trace

    pyro.set_rng_seed(0)
    ours = importance_traces(model, guide, (), {}, 1)
    pyro.set_rng_seed(0)
    pyros = get_importance_trace("flat", 1, model, guide, (), {})
    for a, b in zip(ours, pyros, strict=True):
        assert list(a.nodes) == list(b.nodes)
        assert torch.equal(a.nodes["z"]["log_prob"], b.nodes["z"]["log_prob"])


def test_ais_checks_its_pair_with_the_same_builder():
    def model(x, idx=None):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, idx=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model/guide mismatch"):
        ais_log_likelihood(model, torch.zeros(2), guide, num_steps=2, num_chains=2)

    def plate_guide(x, idx=None):  # a plate the model lacks: Pyro warns, the old check did not
        with pyro.plate("extra", 1, dim=-2), pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    # (the guide's extra batch dim is then refused by AIS itself)
    with (
        pytest.warns(UserWarning, match="plate statements in guide but not model"),
        contextlib.suppress(ValueError),
    ):
        ais_log_likelihood(model, torch.zeros(2), plate_guide, num_steps=2, num_chains=2)
