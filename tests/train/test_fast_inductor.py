"""FastSVI's Inductor switch: a deterministic decision, saved in the state, so resume is exact.

The compile itself is replaced by a stand-in whose numbers differ from the aten graph's by a
factor 1 + 1e-6 (within its verification tolerance), so that every test sees *which* graph
ran each step without paying a real Inductor compile (tests/capture/test_record.py compiles one).
"""

import io
import logging
import math
import warnings

import pyro
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import pyro_lvm.capture.policy as capture_policy
from pyro_lvm.capture.inductor import accumulation_depth, inductor_pays, inductor_rtol
from pyro_lvm.capture.policy import AUTO_AFTER
from pyro_lvm.capture.record import Captured, CaptureError, capture, input_key
from pyro_lvm.capture.verification import default_rtol
from pyro_lvm.elbo import make_estimator
from pyro_lvm.models import VAE
from pyro_lvm.train import fit
from pyro_lvm.train.build import make_stepper
from pyro_lvm.train.fast import FastSVI

FACTOR = 1 + 1e-6
STEPS = AUTO_AFTER + 8  # decision after step 20, Inductor verified at 21, replayed from 22


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _stand_in(value_factor, grad_factor=FACTOR):
    """A compile whose graph scales the aten graph's value and gradients."""

    def compile_inductor(captured, inputs):
        def graph(*args):
            value, grads = captured.graph(*args)
            return value * value_factor, [None if g is None else g * grad_factor for g in grads]

        out = Captured(graph, captured.num_wrt, captured.owner, "inductor", fx=captured.fx)
        out.rtol = 1e-4
        return out

    return compile_inductor


@pytest.fixture
def compiles(monkeypatch):
    """Replace the Inductor compile by a stand-in (numbers scaled by FACTOR); record calls."""
    calls, stand_in = [], _stand_in(FACTOR)

    def fake(captured, inputs):
        calls.append(len(inputs))
        return stand_in(captured, inputs)

    monkeypatch.setattr(capture_policy, "compile_inductor", fake)
    return calls


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((12, 10), 0.3), generator=gen), torch.arange(12)


def _svi(seed=0, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = VAE(10, 2, (8,), num_data=12)
    opt = pyro.optim.Adam({"lr": 0.01})
    return vae, FastSVI(vae, vae.guide, opt, make_estimator("iwae", 2), check_every=7, **kw)


def test_accumulation_depth_and_rounding_tolerance_of_a_graph():
    """One matrix product over 10 000 terms, then a sum of 2 entries: depth 10 000 + 2, so
    rtol = 4 sqrt(10 002) ε in float32; in float64 the aten default is larger and stays."""
    graph = make_fx(lambda a, b: (a @ b).sum())(torch.ones(2, 10_000), torch.ones(10_000, 1))
    assert accumulation_depth(graph) == 10_002
    eps = torch.finfo(torch.float32).eps
    assert inductor_rtol(graph, torch.float32) == pytest.approx(4 * math.sqrt(10_002) * eps)
    assert inductor_rtol(graph, torch.float64) == default_rtol(torch.float64)


def test_pay_off_grows_with_the_remaining_steps():
    vae, _ = _svi()
    x, idx = _data()
    loss = make_estimator("elbo", 1)
    loss.differentiable_loss(vae, vae.guide, x, idx)
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    fx = capture(lambda *a: loss.differentiable_loss(vae, vae.guide, *a), params, (x, idx)).fx
    assert not inductor_pays(fx, 1000, cached=False)[0]  # a compile pays back over ages
    pays, why = inductor_pays(fx, 1e12, cached=False)
    assert pays and "projected steps" in why and "estimated compile" in why


def _losses(svi, steps):
    x, idx = _data()
    return [svi.step(x, idx) for _ in range(steps)]


@pytest.mark.parametrize("planned, switched", [(None, False), (100, False), (10**12, True)])
def test_auto_decides_once_after_its_step_and_records_why(compiles, planned, switched):
    _, aten = _svi(backend="aten")
    expected = _losses(aten, STEPS)
    _, svi = _svi(backend="auto", planned_steps=planned)
    losses = _losses(svi, STEPS)
    (key,) = svi.get_state()["schedule"]["inductor"]
    decision = svi.get_state()["schedule"]["inductor"][key]
    assert len(compiles) == switched and (decision is None) == switched
    assert losses[: AUTO_AFTER + 1] == expected[: AUTO_AFTER + 1]  # step 21 verifies, eagerly
    assert (losses[AUTO_AFTER + 1 :] != expected[AUTO_AFTER + 1 :]) == switched
    if not switched:
        assert ("planned_steps" if planned is None else "estimated compile") in decision
    assert svi.jit_reason is None and svi.traced_steps == STEPS - 3 - 4  # checks: 7 14 21 28


@pytest.mark.parametrize("stop", [15, AUTO_AFTER, AUTO_AFTER + 1, AUTO_AFTER + 5])
def test_resume_switches_at_the_same_step(compiles, stop):
    """Stopped before the decision, between decision and verification, after both; resumed
    in fresh objects whose own plan says *never* (``planned_steps=None``) unless the run
    had not decided yet: the saved decision rules, and every float equals the straight run's."""
    vae, svi = _svi(backend="auto", planned_steps=10**12)
    x, idx = _data()
    straight = []
    for step in range(STEPS):
        if step == stop:
            params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
            saved = io.BytesIO()
            torch.save(svi.get_state(), saved)
            rng = pyro.util.get_rng_state()
        straight.append(svi.step(x, idx))
    plan = 10**12 if stop < AUTO_AFTER else None
    vae2, svi2 = _svi(seed=5, backend="auto", planned_steps=plan)
    vae2.load_state_dict(params)
    saved.seek(0)
    svi2.set_state(torch.load(saved, weights_only=True))
    pyro.util.set_rng_state(rng)
    assert _losses(svi2, STEPS - stop) == straight[stop:]
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), vae2.parameters(), strict=True))
    assert svi2.get_state()["schedule"] == svi.get_state()["schedule"]


def test_a_failed_compile_or_verification_keeps_the_aten_graph(monkeypatch, caplog):
    _, aten = _svi(backend="aten")
    expected = _losses(aten, STEPS)

    def broken(captured, inputs):
        raise CaptureError("the Inductor compile failed: no C++ compiler")

    monkeypatch.setattr(capture_policy, "compile_inductor", broken)
    _, svi = _svi(backend="inductor")
    with caplog.at_level(logging.INFO, logger="pyro_lvm.capture.policy"):
        assert _losses(svi, STEPS) == expected
    key = input_key(_data(), {})
    assert "no C++ compiler" in svi.get_state()["schedule"]["inductor"][key]
    assert "no C++ compiler" in caplog.text and svi.jit_reason is None

    monkeypatch.setattr(capture_policy, "compile_inductor", _stand_in(1.01))  # 1 %: far off
    _, svi = _svi(backend="inductor")
    # step 5 verifies (eagerly, where the aten run replayed its graph), then the aten graph
    assert _losses(svi, STEPS) == pytest.approx(expected, rel=1e-5)
    assert "failed its verification" in svi.get_state()["schedule"]["inductor"][key]
    assert svi.jit_reason is None and svi.traced_steps == STEPS - 3 - 5  # 5 verifies, 4 checks


def test_fit_passes_backend_and_plan():
    vae, _ = _svi()
    x, _ = _data()
    svi, _ = make_stepper(
        vae, vae.guide, pyro.optim.Adam({}), make_estimator("elbo"), True, "inductor", 42
    )
    assert svi.backend == "inductor" and svi.planned_steps == 42
    with pytest.raises(ValueError, match="backend must be one of"):
        fit(vae, vae.guide, x, num_epochs=1, batch_size=6, progress=False, backend="jit")
