"""The one capture policy: shared per estimator, failures per signature, the Inductor cache."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.capture.inductor import _record, cache_dir, graph_hash, inductor_pays, is_cached
from pyro_lvm.capture.policy import CapturePolicy, policy_for
from pyro_lvm.capture.record import capture


def _problem():
    loc = torch.zeros(3, requires_grad=True)

    def fn(x):
        return (x - loc).square().sum()

    return loc, fn, torch.randn(4, 3)


def test_policy_for_is_one_per_estimator_and_fails_per_signature():
    elbo, other = Trace_ELBO(), Trace_ELBO()
    assert policy_for(elbo) is policy_for(elbo) and policy_for(other) is not policy_for(elbo)
    policy = policy_for(elbo)
    loc, fn, x = _problem()
    assert policy.prepare("good", fn, [loc], (x,)) is not None
    frozen = lambda x: float(fn(x)) + fn(x) - fn(x).detach()  # noqa: E731  # a Python number
    assert policy.prepare("frozen", frozen, [loc], (x,)) is None
    assert "capture failed" in policy.entries["frozen"].reason
    assert policy.graph("good") is not None and policy.reason is None  # the other one stays


def test_a_stepper_policy_falls_back_for_good():
    policy = CapturePolicy(Trace_ELBO(), label="test")
    loc, fn, x = _problem()
    policy.capture("a", fn, [loc], (x,))
    assert policy.drifted("a", 2.0, 1.0, "at step 9") and "at step 9" in policy.reason
    assert policy.graph("a") is None and not policy.entries
    with pytest.raises(ValueError, match="backend must be one of"):
        CapturePolicy(Trace_ELBO(), backend="jit")


def test_a_recorded_compile_is_priced_as_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    loc, fn, x = _problem()
    fx = capture(fn, [loc], (x,)).fx
    assert cache_dir() == str(tmp_path) and not is_cached(fx)
    steps = 1e4
    assert inductor_pays(fx, steps)[1] == inductor_pays(fx, steps, cached=False)[1]
    _record(fx)
    assert is_cached(fx) and graph_hash(fx) in (tmp_path / "pyro_lvm_compiled.txt").read_text()
    assert "cached compile" in inductor_pays(fx, steps)[1]
    # the break-even point moves by the ratio of the two per-node compile costs
    pyro.set_rng_seed(0)
    needed = [s for s in (10.0**e for e in range(0, 14)) if inductor_pays(fx, s, False)[0]][0]
    cheap = [s for s in (10.0**e for e in range(0, 14)) if inductor_pays(fx, s, True)[0]][0]
    assert cheap < needed
