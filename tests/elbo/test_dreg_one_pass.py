"""One-pass DReG equals the two-pass formula draw for draw; negligible weights are flushed.

The reference is Tucker et al.'s (2018) surrogate written out with a second model pass on
detached samples,

    s = Σ_k w_k² [log p(x, z_k) − log q_φ̄(z_k)] + Σ_k (w_k − w_k²) log p(x, z̄_k),

on a two-layer model with a hierarchical guide q(z1 | x) q(z2 | z1, x), so the sample path of
z1 runs both directly into the model and through z2. ``max_plate_nesting=2`` puts the
particles at dim -3, so the weights must broadcast over a size-1 plate dim as well.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.util import detach
from torch.distributions import constraints

from pyro_lvm.elbo.iwae import IWAE, flush_negligible
from pyro_lvm.elbo.renyi import RenyiBound
from tests.elbo.test_multisample import loss_and_grad

N, X_DIM, Z1, Z2, K = 5, 3, 2, 2, 4


def model(x):
    W = pyro.param("W", lambda: torch.linspace(-1, 1, X_DIM * Z2).reshape(X_DIM, Z2))
    V = pyro.param("V", lambda: torch.tensor([[0.5, -0.3], [0.2, 0.8]]))
    with pyro.plate("data", x.shape[0], dim=-1):
        z1 = pyro.sample("z1", dist.Normal(torch.zeros(Z1), 1.0).to_event(1))
        z2 = pyro.sample("z2", dist.Normal(torch.tanh(z1) @ V, 0.8).to_event(1))
        pyro.sample("x", dist.Normal(z2 @ W.T, 0.5).to_event(1), obs=x)


def guide(x):
    A = pyro.param("A", lambda: torch.full((X_DIM, Z1), 0.3))
    s1 = pyro.param("s1", lambda: torch.tensor([0.7, 0.9]), constraint=constraints.positive)
    a = pyro.param("a", lambda: torch.tensor([0.4, -0.6]))
    s2 = pyro.param("s2", lambda: torch.tensor([0.5, 0.6]), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        z1 = pyro.sample("z1", dist.Normal(x @ A, s1).to_event(1))
        pyro.sample("z2", dist.Normal(a * z1 + x[..., :Z2], s2).to_event(1))


NESTING = 2


def _log_joint(trace):
    return sum(
        site["fn"].log_prob(site["value"])
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )


def two_pass_dreg_loss(x, vectorize, alpha=0.0, seed=0):
    """The reference surrogate with a second model pass on detached samples."""
    pyro.set_rng_seed(seed)

    def particles(fn):
        if not vectorize:
            return fn

        def wrapped(*args):
            with pyro.plate("num_particles_vectorized", K, dim=-(NESTING + 1)):
                return fn(*args)

        return wrapped

    traces = []
    for _ in range(1 if vectorize else K):
        guide_trace = poutine.trace(particles(guide)).get_trace(x)
        model_trace = poutine.trace(poutine.replay(particles(model), guide_trace)).get_trace(x)
        frozen = poutine.Trace()
        for name, site in guide_trace.nodes.items():
            site = dict(site)
            if site["type"] == "sample":
                site["value"] = site["value"].detach()
            frozen.add_node(name, **site)
        detached_trace = poutine.trace(poutine.replay(particles(model), frozen)).get_trace(x)
        log_q_stop = sum(
            detach(s["fn"]).log_prob(s["value"])
            for s in guide_trace.nodes.values()
            if s["type"] == "sample"
        )
        traces.append((_log_joint(model_trace) - log_q_stop, _log_joint(detached_trace)))
    log_w = torch.cat([t[0].reshape(-1, x.shape[0]) for t in traces])
    log_p_detached = torch.cat([t[1].reshape(-1, x.shape[0]) for t in traces])
    w = torch.softmax((1 - alpha) * log_w.detach(), 0)
    w_guide = alpha * w + (1 - alpha) * w**2
    surrogate = (w_guide * log_w).sum(0) + ((w - w_guide) * log_p_detached).sum(0)
    return -surrogate.sum()


def _x():
    return torch.linspace(-1.5, 2.0, N * X_DIM).reshape(N, X_DIM).sin()


def _grads(loss):
    names, params = zip(*pyro.get_param_store().named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("alpha", [0.0, 0.5], ids=["iwae", "renyi-0.5"])
def test_one_pass_dreg_equals_two_pass_formula(vectorize, alpha):
    x = _x()
    pyro.clear_param_store()
    ref = _grads(two_pass_dreg_loss(x, vectorize, alpha))
    if alpha == 0.0:
        elbo = IWAE(K, gradient="dreg", max_plate_nesting=NESTING, vectorize_particles=vectorize)
    else:
        elbo = RenyiBound(
            alpha, K, gradient="dreg", max_plate_nesting=NESTING, vectorize_particles=vectorize
        )
    _, grads = loss_and_grad(elbo, model, guide, x)
    assert set(grads) == set(ref) == {"W", "V", "A", "s1", "a", "s2"}
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)
    assert all(ref[name].abs().max() > 1e-3 for name in ref)  # every gradient is non-trivial


def test_captured_one_pass_dreg_rescales_too():
    from pyro_lvm.capture.record import capture

    x = _x()
    pyro.clear_param_store()
    elbo = IWAE(K, gradient="dreg", max_plate_nesting=NESTING)
    pyro.set_rng_seed(0)
    elbo.differentiable_loss(model, guide, x)  # create the parameters
    names, params = zip(*pyro.get_param_store().named_parameters(), strict=True)

    def fn(data):
        return elbo.differentiable_loss(model, guide, data)

    captured = capture(fn, params, (x,), owner=elbo)
    for seed in (1, 2):  # new draws: the backward of the graph applies the new scales
        pyro.set_rng_seed(seed)
        _, got = captured(params, (), (x,))
        pyro.set_rng_seed(seed)
        want = torch.autograd.grad(two_pass_dreg_loss(x, True, seed=seed), params)
        for name, g, h in zip(names, got, want, strict=True):
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12, msg=name)


def test_flush_negligible_zeroes_only_weights_below_eps_squared():
    for dtype in (torch.float32, torch.float64):
        cut = torch.finfo(dtype).eps ** 2
        w = torch.tensor([1.0, 2 * cut, 0.5 * cut, 1e-40, 0.0], dtype=dtype)
        assert flush_negligible(w).tolist() == [1.0, 2 * cut, 0.0, 0.0, 0.0]


def test_iwae_gradient_is_the_bound_gradient_when_nothing_is_flushed():
    x = _x()
    pyro.clear_param_store()
    elbo = IWAE(K, max_plate_nesting=NESTING)
    pyro.set_rng_seed(0)
    weights = elbo._get_log_weights(model, guide, (x,), {})
    assert torch.softmax(weights.log_w.detach(), 0).min() > torch.finfo(x.dtype).eps ** 2
    direct = -(weights.log_w.logsumexp(0)).sum()
    want = _grads(direct)
    pyro.set_rng_seed(0)
    _, got = loss_and_grad(elbo, model, guide, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_flushing_leaves_the_float32_gradient_unchanged():
    # a guide far from the posterior spreads the log weights over tens of nats
    x = (20 * _x()).float()
    torch.set_default_dtype(torch.float32)
    try:
        pyro.clear_param_store()
        elbo = IWAE(64, max_plate_nesting=NESTING)
        pyro.set_rng_seed(0)
        log_w = elbo._get_log_weights(model, guide, (x,), {}).log_w
        w = torch.softmax(log_w.detach(), 0)
        assert (w < torch.finfo(torch.float32).eps ** 2).float().mean() > 0.2
        unflushed = _grads(-(w * log_w).sum())
        pyro.set_rng_seed(0)
        bound = _grads(-elbo._get_log_weights(model, guide, (x,), {}).log_w.logsumexp(0).sum())
        _, got = loss_and_grad(elbo, model, guide, x, seed=0)
        for name in got:
            # flushing changes nothing at float32 precision; logsumexp's own backward rounds
            # differently (a few float32 ulps of the summed gradient)
            torch.testing.assert_close(got[name], unflushed[name], rtol=1e-6, atol=0, msg=name)
            err = (got[name] - bound[name]).abs().max() / bound[name].abs().max()
            assert err < 1e-4, (name, err)
    finally:
        torch.set_default_dtype(torch.float64)
