"""The capture engine: a captured loss and gradient equal eager ones; its one policy's parts."""

from contextlib import contextmanager

import pyro
import pyro.distributions as dist
import pyro.infer.util
import pyro.util
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_lvm.elbo.base
from pyro_lvm.capture.inductor import compile_inductor, inductor_rtol
from pyro_lvm.capture.record import (
    CaptureError,
    RuntimeInputs,
    capture,
    capture_patches,
    get_rng_state,
    runtime_inputs,
    set_rng_state,
)
from pyro_lvm.capture.verification import drifted, verify


def _model(x):
    w = pyro.param("w", torch.tensor([0.5, -1.0]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal((z * w).sum(-1), 1.0), obs=x)


def _guide(x):
    loc = pyro.param("loc", torch.zeros(x.shape[0], 2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, 0.7).to_event(1))


def _setup(elbo):
    x = torch.tensor([0.3, -1.2, 2.0])
    elbo.differentiable_loss(_model, _guide, x)  # creates the parameters
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    return x, params, lambda data: elbo.differentiable_loss(_model, _guide, data)


def test_captured_value_and_gradients_equal_eager_under_one_seed():
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    x, params, fn = _setup(elbo)
    captured = capture(fn, params, (x,), owner=elbo)
    for seed in (1, 2):  # fresh noise at every call, drawn as the eager code draws it
        pyro.set_rng_seed(seed)
        value, grads = captured(params, (), (x,))
        pyro.set_rng_seed(seed)
        eager = fn(x)
        assert float(value) == pytest.approx(float(eager.detach()), rel=1e-12)
        for g, h in zip(grads, torch.autograd.grad(eager, params), strict=True):
            torch.testing.assert_close(g, h, rtol=1e-12, atol=1e-12)
    pyro.set_rng_seed(1)
    first = captured(params, (), (x,))[0]
    assert float(captured(params, (), (x,))[0]) != float(first)
    value, _ = verify(captured, fn, params, (x,))
    assert captured.verified and captured.scale == pytest.approx(abs(value))


def test_verification_rejects_a_frozen_value_and_capture_rejects_item():
    elbo = Trace_ELBO()
    x, params, fn = _setup(elbo)

    def frozen(data):  # a value leaving the graph through NumPy is a constant in it
        loss = fn(data)
        return float(loss.detach().numpy()) + (loss - loss.detach())

    with pytest.raises(CaptureError, match="differs from the eager one"):
        verify(capture(frozen, params, (x,)), frozen, params, (x,))
    with pytest.raises(CaptureError, match="capture failed"):
        capture(lambda data: fn(data).item() + fn(data), params, (x,))
    with pytest.raises(CaptureError, match="positional tensor"):
        capture(fn, params, (None,))


def test_capture_patches_swap_pyro_helpers_and_restore_them():
    item, nan = pyro.infer.util.torch_item, pyro.util.warn_if_nan
    with capture_patches():
        assert torch.is_tensor(pyro_lvm.elbo.base.torch_item(torch.tensor(2.0)))
        assert pyro_lvm.elbo.base.warn_if_nan is not nan
    assert pyro_lvm.elbo.base.torch_item is item and pyro_lvm.elbo.base.warn_if_nan is nan


class _Scaled(Trace_ELBO, RuntimeInputs):
    """The loss times a weight set from Python between calls, fed as a run-time input."""

    def __init__(self):
        super().__init__()
        self.weight, self._input = 1.0, None

    def runtime_inputs(self):
        return (torch.tensor(self.weight),)

    @contextmanager
    def using_runtime_inputs(self, values):
        (self._input,) = values
        try:
            yield
        finally:
            self._input = None

    def differentiable_loss(self, model, guide, *args, **kwargs):
        weight = self.weight if self._input is None else self._input
        return weight * super().differentiable_loss(model, guide, *args, **kwargs)


def test_runtime_inputs_are_read_at_every_call():
    elbo = _Scaled()
    x, params, fn = _setup(elbo)
    assert isinstance(elbo, RuntimeInputs) and runtime_inputs(Trace_ELBO()) == ()
    captured = capture(fn, params, (x,), owner=elbo)
    elbo.weight = 3.0
    pyro.set_rng_seed(0)
    value, _ = captured(params, (), (x,))
    pyro.set_rng_seed(0)
    assert float(value) == pytest.approx(float(fn(x).detach()), rel=1e-12)


def test_drift_tolerance_and_rng_round_trip():
    elbo = Trace_ELBO()
    x, params, fn = _setup(elbo)
    captured = capture(fn, params, (x,))
    captured.scale = 100.0  # |loss| at verification: the tolerance is relative to it
    assert not drifted(captured, 1.0 + 1e-9, 1.0, rtol=1e-10)
    assert drifted(captured, 1.0 + 1e-7, 1.0, rtol=1e-10)
    state = get_rng_state()
    a = torch.randn(3)
    set_rng_state(state)
    assert torch.equal(a, torch.randn(3))


def test_inductor_backend_gives_the_eager_numbers():
    """``compile_inductor`` compiles the graph with torch.compile; ``fallback_random`` keeps
    the random draws those of eager code, so one seed gives the same loss to rounding."""
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    x, params, fn = _setup(elbo)
    captured = compile_inductor(capture(fn, params, (x,), owner=elbo), [*params, x])
    value, grads = verify(captured, fn, params, (x,))
    assert captured.verified and captured.backend == "inductor"
    assert captured.rtol == inductor_rtol(captured.fx, x.dtype)  # its rounding's tolerance
