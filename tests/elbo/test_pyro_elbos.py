"""Every Pyro ELBO trains through ``fit`` or is refused before the first step with a reason."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    ReweightedWakeSleep,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
)

from pyro_lvm.elbo import prepare_for_fit
from pyro_lvm.elbo.pyro_elbos import TailAdaptiveWithBound, WakeSleepLoss
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import LinearGaussian
from pyro_lvm.train import fit

N = 12

TRAIN = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "TraceMeanField_ELBO": lambda: TraceMeanField_ELBO(),
    "TraceGraph_ELBO": lambda: TraceGraph_ELBO(),
    "TraceEnum_ELBO": lambda: TraceEnum_ELBO(max_plate_nesting=1),
    "ReweightedWakeSleep": lambda: ReweightedWakeSleep(num_particles=3),
    "TraceTailAdaptive_ELBO": lambda: TraceTailAdaptive_ELBO(
        num_particles=3, vectorize_particles=True
    ),
    "JitTrace_ELBO": lambda: JitTrace_ELBO(),
    "RenyiELBO (full batch)": lambda: RenyiELBO(num_particles=2),
}


def _fit(loss, batch_size):
    model = LinearGaussian(3, 1)
    guide = AmortizedGaussianGuide(3, 1, hidden=(4,))
    x = model.sample(N)
    return fit(
        model,
        guide,
        x,
        loss=loss,
        num_epochs=2,
        batch_size=batch_size,
        valid_data=x[:6],
        progress=False,
    )


@pytest.mark.parametrize("name", sorted(TRAIN))
def test_trains_through_fit_and_reports_a_bound(name):
    batch = N if "full batch" in name else 4
    history = _fit(TRAIN[name](), batch)
    losses = history.step_losses + history.epoch_losses + history.valid_elbos
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses), losses
    assert len(history.step_losses) == 2 * (N // batch)


@pytest.mark.parametrize(
    "make, batch_size, match",
    [
        (JitTrace_ELBO, 5, "not a multiple of batch_size = 5.*use Trace_ELBO"),
        (JitTraceMeanField_ELBO, 5, "use TraceMeanField_ELBO"),
        (JitTraceGraph_ELBO, 5, "use TraceGraph_ELBO"),
        (lambda: JitTraceEnum_ELBO(max_plate_nesting=1), 5, "use TraceEnum_ELBO"),
        (lambda: RenyiELBO(num_particles=2), 4, r"pyro issue #3104.*make_estimator\('renyi'"),
        (lambda: ReweightedWakeSleep(insomnia=0.5), 4, "sleep phase.*insomnia=1.0"),
    ],
)
def test_refused_before_the_first_step_with_the_reason(make, batch_size, match):
    calls = []

    def model(x, idx=None):
        calls.append(1)
        LinearGaussian(3, 1)(x, idx)

    with pytest.raises(ValueError, match=match):
        fit(model, AmortizedGaussianGuide(3, 1), torch.randn(N, 3), loss=make(),
            batch_size=batch_size, progress=False)  # fmt: skip
    assert calls == []  # nothing ran


def test_adapters_keep_pyros_gradient_and_report_the_bound():
    model = LinearGaussian(3, 1)
    guide = AmortizedGaussianGuide(3, 1)
    x = model.sample(N)
    tail = prepare_for_fit(TraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True))
    assert isinstance(tail, TailAdaptiveWithBound)
    pyro.set_rng_seed(0)
    value = tail.loss_and_grads(model, guide, x)
    grads = [p.grad.clone() for p in guide.parameters()]
    for p in guide.parameters():
        p.grad = None
    pyro.set_rng_seed(0)
    assert TraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True).loss_and_grads(
        model, guide, x
    ) == float("inf")  # Pyro's value, which a loop cannot guard
    for p, g in zip(guide.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    pyro.set_rng_seed(0)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)  # the same dry run
    assert value == pytest.approx(elbo.loss(model, guide, x), rel=1e-12)
    rws = prepare_for_fit(ReweightedWakeSleep(num_particles=3))
    assert isinstance(rws, WakeSleepLoss)
    pyro.set_rng_seed(1)
    wake_theta = rws.loss(model, guide, x)
    pyro.set_rng_seed(1)
    assert wake_theta == ReweightedWakeSleep(num_particles=3).loss(model, guide, x)[0]
