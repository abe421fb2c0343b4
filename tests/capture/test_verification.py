"""Capture verification on deterministic losses: a frozen value and a frozen gradient.

A graph records Python numbers computed from tensors as constants. With random draws in the
loss, a fresh random state also exposes such a constant; these losses draw nothing (a point-mass
guide), so only the check at *perturbed parameters* can tell the graph from the eager code. At
the capture point both agree exactly. Written against public behaviour (``capture``/``verify``
and ``FastSVI``), so that they hold whatever the engine's internals become.
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_lvm.capture.record import CaptureError, capture
from pyro_lvm.capture.verification import drifted, tensors_agree, verify
from pyro_lvm.train.fast import FastSVI

X = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.4, 1.1]], dtype=torch.float64)
STEPS = 7


def _frozen_value(loss: torch.Tensor) -> torch.Tensor:
    """The value through NumPy (a constant in a graph), the gradient through the tensor."""
    return float(loss.detach().numpy()) + (loss - loss.detach())


def _frozen_gradient(loss: torch.Tensor, params) -> torch.Tensor:
    """The value right at every point, the gradient frozen at the capture point: ``p`` times a
    NumPy copy of ``∂loss/∂p`` (a constant in a graph), with its value subtracted again."""
    grads = torch.autograd.grad(loss, params, create_graph=False, retain_graph=True)
    frozen = [torch.from_numpy(g.detach().numpy().copy()) for g in grads]
    surrogate = sum((p * g).sum() for p, g in zip(params, frozen, strict=True))
    return loss.detach() + (surrogate - surrogate.detach())


def _quadratic(params):
    w, b = params
    return ((X @ w + b) ** 2).sum() + (w**2).sum()


def _params():
    return [torch.tensor([0.5, -1.0], requires_grad=True), torch.tensor(0.2, requires_grad=True)]


def test_a_faithful_deterministic_loss_is_accepted():
    params = _params()
    fn = lambda x: _quadratic(params)  # noqa: E731
    captured = capture(fn, params, (X,))
    value, grads = verify(captured, fn, params, (X,))
    assert captured.verified and value == pytest.approx(float(_quadratic(params)), rel=1e-12)


@pytest.mark.parametrize("freeze", ["value", "gradient"])
def test_verification_rejects_a_deterministic_frozen_loss_at_perturbed_parameters(freeze):
    params = _params()

    def fn(x):
        loss = _quadratic(params)
        return _frozen_value(loss) if freeze == "value" else _frozen_gradient(loss, params)

    captured = capture(fn, params, (X,))
    # at the capture point the graph and the eager code agree exactly: only a move shows it
    value, grads = captured(params, (), (X,))
    eager = fn(X)
    assert float(value) == float(eager)
    for g, h in zip(grads, torch.autograd.grad(eager, params), strict=True):
        assert torch.equal(g, h)
    with pytest.raises(CaptureError, match="at perturbed parameters"):
        verify(captured, fn, params, (X,))
    assert not captured.verified


def test_python_state_changed_since_capture_is_reported_at_the_current_parameters():
    """A Python number read at capture is a constant of the graph: once it changes, the two
    disagree at the current point too, and the error says so and why."""
    params = _params()
    state = {"weight": 1.0}
    fn = lambda x: state["weight"] * _quadratic(params)  # noqa: E731
    captured = capture(fn, params, (X,))
    state["weight"] = 2.0
    match = r"at the current parameters .*Python-side state, which a graph freezes"
    with pytest.raises(CaptureError, match=match):
        verify(captured, fn, params, (X,))


def test_a_differentiated_tensor_the_loss_does_not_read_has_no_gradient():
    params = [*_params(), torch.tensor([1.0, 2.0], requires_grad=True)]  # the last is unused
    fn = lambda x: _quadratic(params[:2])  # noqa: E731
    captured = capture(fn, params, (X,))
    value, grads = verify(captured, fn, params, (X,))
    assert captured.verified and grads[2] is None and captured(params, (), (X,))[1][2] is None


def test_an_explicit_verification_rtol_is_used():
    """A frozen term of relative size ~1e-6 is caught at the default tolerance (1.5e-10 in
    float64) and accepted at an explicit rtol=1e-3 (mutation testing found the explicit rtol
    ignorable: ``rtol and captured.rtol or default`` survived)."""
    params = _params()

    def fn(x):
        loss = _quadratic(params)
        return loss + 1e-5 * _frozen_value(params[0].sum())  # a small frozen value

    with pytest.raises(CaptureError, match="at perturbed parameters"):
        verify(capture(fn, params, (X,)), fn, params, (X,))
    captured = capture(fn, params, (X,))
    verify(captured, fn, params, (X,), rtol=1e-3)
    assert captured.verified


def test_tensors_agree_compares_values_and_gradients_at_the_given_tolerance():
    """The comparison behind verification, case by case (each case kills surviving mutants:
    ignored tolerances, a one-sided gradient or a non-finite reference accepted, lists of
    different lengths silently truncated)."""
    t = torch.tensor
    one, rtol = t(10.0), 1e-10
    g = [t([1.0, 0.0])]
    assert tensors_agree(one, one, g, g, rtol)
    assert not tensors_agree(one * (1 + 1e-7), one, g, g, rtol)  # the value's rtol is rtol
    assert not tensors_agree(one, t(float("nan")), g, g, rtol)  # non-finite: the eager path's
    assert not tensors_agree(one, one, [t([1.0 + 1e-7, 0.0])], g, rtol)  # the gradient's rtol
    assert not tensors_agree(one, one, [t([1.0, 1e-9])], g, rtol)  # floor: rtol * max|h|
    big = [t([100.0, 0.0])]
    assert tensors_agree(one, one, [t([100.0, 5e-9])], big, rtol)  # within 1e-10 * 100
    assert not tensors_agree(one, one, [None], g, rtol)  # a gradient on one side only
    assert not tensors_agree(one, one, g, [t([1.0, float("inf")])], rtol)
    with pytest.raises(ValueError):
        tensors_agree(one, one, g, [*g, *g], rtol)


def test_drift_tolerance_defaults_to_the_verification_tolerance():
    """``drifted`` without an rtol uses the captured graph's (here the dtype's default,
    1.5e-10 in float64), relative to the larger of |loss| now and at verification: a 1e-6
    relative drift is flagged, rounding (1e-13) is not. Mutation testing found a default
    rtol of 1.0 (every drift below 100% accepted) untested."""
    params = _params()
    fn = lambda x: _quadratic(params)  # noqa: E731
    captured = capture(fn, params, (X,))
    value, _ = verify(captured, fn, params, (X,))
    assert not drifted(captured, value * (1 + 1e-13), value)
    assert drifted(captured, value * (1 + 1e-6), value)
    assert drifted(captured, value * 1.5, value)
    # an explicit rtol wins; else the graph's own (an Inductor graph verifies at a looser one)
    assert not drifted(captured, value * 1.05, value, rtol=0.1)
    captured.rtol = 1e-3
    assert not drifted(captured, value * (1 + 1e-6), value)
    assert drifted(captured, value * (1 + 1e-2), value)


# ---------------------------------------------------------------- through FastSVI
def _model(x):
    w = pyro.param("w", torch.tensor([0.5, -1.0]))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z[..., None] * w, 1.0).to_event(1), obs=x)


def _guide(x):
    a = pyro.param("a", torch.tensor([0.3, 0.1]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Delta(x @ a))  # a point mass: the ELBO draws nothing


class _FrozenValueELBO(Trace_ELBO):
    def differentiable_loss(self, model, guide, *args, **kwargs):
        return _frozen_value(super().differentiable_loss(model, guide, *args, **kwargs))


class _FrozenGradientELBO(Trace_ELBO):
    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        params = [pyro.param(n).unconstrained() for n in ("a", "w")]
        return _frozen_gradient(loss, params)


def _train(cls, elbo):
    pyro.clear_param_store()
    svi = cls(_model, _guide, pyro.optim.SGD({"lr": 0.05}), elbo)
    losses = [svi.step(X) for _ in range(STEPS)]
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return svi, losses, params


def test_fast_svi_traces_the_faithful_deterministic_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svi, losses, params = _train(FastSVI, Trace_ELBO())
    _, ref_losses, ref_params = _train(SVI, Trace_ELBO())
    assert svi.jit_reason is None and svi.traced_steps > 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("elbo", [_FrozenValueELBO, _FrozenGradientELBO])
def test_fast_svi_refuses_a_deterministic_frozen_trace_and_matches_svi(elbo):
    """A traced frozen gradient would keep stepping along the first step's gradient; a traced
    frozen value would report the first step's loss. Verification must reject both."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        svi, losses, params = _train(FastSVI, elbo())
    _, ref_losses, ref_params = _train(SVI, elbo())
    assert "differs" in svi.jit_reason and svi.traced_steps == 0
    assert len(set(ref_losses)) == STEPS  # the losses change, so a frozen one would show
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for name, value in ref_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-10, atol=1e-12)
