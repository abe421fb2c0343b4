"""Rescoring flows without an inverse (pyro_lvm.elbo.rescore): exact values, exact first
derivatives against an independent inverse, zero STL/DReG variance at the exact posterior,
and clear refusals where the linearized inverse cannot apply."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.elbo.base import rescored_log_prob
from pyro_lvm.elbo.rescore import CannotRescore, rescorable

D = 3


@pytest.fixture(autouse=True)
def _float64():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def _flow(*transforms):
    base = dist.Normal(torch.full((D,), 0.3), torch.full((D,), 1.2)).to_event(1)
    return dist.TransformedDistribution(base, list(transforms))


def _planar(seed: int) -> T.Planar:
    torch.manual_seed(seed)
    t = T.Planar(D)
    t.bias.data.fill_(0.4)
    t.u.data.mul_(3.0)  # a clearly nonlinear map
    return t


@pytest.mark.parametrize("stop", [True, False])
def test_value_is_exactly_the_guides_log_prob_and_its_cache_is_untouched(stop):
    q = _flow(_planar(0), T.ComposeTransform([T.Radial(D), _planar(1)]), T.Radial(D))
    wrapped = q.expand([4, 5]).to_event(1).mask(torch.tensor([True, False, True, True]))
    z = wrapped.rsample((2,))
    log_q = wrapped.log_prob(z)
    value = z if stop else z.detach()
    assert torch.equal(rescorable(wrapped, stop).log_prob(value), log_q)
    assert wrapped.log_prob(z) is not log_q and torch.equal(wrapped.log_prob(z), log_q)


@pytest.mark.parametrize("stop", [True, False])
def test_exact_inverses_mix_with_linearized_ones(stop):
    """An invertible transform after a Planar one is inverted exactly (to rounding)."""
    q = _flow(_planar(0), T.affine_autoregressive(D), T.Radial(D))
    z = q.rsample((4,))
    log_q = q.log_prob(z)
    got = rescorable(q, stop).log_prob(z if stop else z.detach())
    assert torch.allclose(got, log_q, rtol=1e-12, atol=1e-12)


def _planar_inverse(t: T.Planar, y: torch.Tensor) -> torch.Tensor:
    """Planar's inverse by Newton's method on a = w.x + b (monotone, since w.u_hat > -1):
    a + c tanh(a) = w.y + b with c = w.u_hat, then x = y - u_hat tanh(a). Differentiating
    through the converged iterations gives the implicit-function derivatives."""
    u_hat = t.u_hat(t.u, t.w)
    c, target = t.w @ u_hat, y @ t.w + t.bias
    a = target.detach().clone()
    for _ in range(60):
        a = a - (a + c * torch.tanh(a) - target) / (1 + c * (1 - torch.tanh(a) ** 2))
    return y - u_hat * torch.tanh(a).unsqueeze(-1)


def _radial_inverse(t: T.Radial, y: torch.Tensor) -> torch.Tensor:
    """Radial's inverse in closed form: with d = y - x0, rho = |d| and r = |x - x0|,
    r + beta r / (alpha + r) = rho is a quadratic in r; then x = x0 + d / (1 + beta h(r))."""
    x0, alpha = t.x0, torch.nn.functional.softplus(t.alpha_prime)
    beta = -alpha + torch.nn.functional.softplus(t.beta_prime)
    d = y - x0
    rho = d.norm(dim=-1, keepdim=True)
    b = alpha + beta - rho
    r = (-b + (b * b + 4 * rho * alpha).sqrt()) / 2
    return x0 + d / (1 + beta / (alpha + r))


def _radial(seed: int) -> T.Radial:
    torch.manual_seed(seed)
    t = T.Radial(D)
    t.beta_prime.data.fill_(1.5)  # a clearly nonlinear map
    return t


INVERSES = {"planar": (_planar, _planar_inverse), "radial": (_radial, _radial_inverse)}


def _exact_log_q(t, inverse, base, z: torch.Tensor) -> torch.Tensor:
    """log q(z) through the exact inverse; log|det J| from the transform's own formula (on a
    copy sharing the parameters, so the flow's own cache is left alone)."""
    x = inverse(t, z)
    scratch = copy.copy(t)
    scratch._call(x)  # sets scratch._cached_logDetJ at x
    return base.log_prob(x) - scratch._cached_logDetJ


@pytest.mark.parametrize("flow", sorted(INVERSES))
def test_first_derivatives_equal_those_of_the_true_inverse(flow):
    """d/dz with parameters stopped (STL, DReG) and d/dphi at a fixed z (score function)
    agree with autograd through an exact inverse, to rounding."""
    make, inverse = INVERSES[flow]
    t = make(2)
    q = _flow(t)
    z = q.rsample((6,))
    z_leaf = z.detach().requires_grad_()
    exact = _exact_log_q(t, inverse, q.base_dist, z_leaf).sum()
    params = list(t.parameters())
    ref_z, *ref_phi = torch.autograd.grad(exact, [z_leaf] + params)
    assert torch.allclose(exact, q.log_prob(z).sum(), atol=1e-10)  # the reference is right

    # stopped parameters: only z carries a gradient; the chain rule through z = T(x0)
    stopped = rescorable(q, stop=True).log_prob(z_leaf).sum()
    (got_z,) = torch.autograd.grad(stopped, [z_leaf])
    assert torch.allclose(got_z, ref_z, rtol=1e-9, atol=1e-10)
    # live parameters at the detached sample
    live = rescorable(q, stop=False).log_prob(z.detach()).sum()
    got_phi = torch.autograd.grad(live, params)
    for got, ref in zip(got_phi, ref_phi, strict=True):
        assert torch.allclose(got, ref, rtol=1e-9, atol=1e-10)
    assert max(ref.abs().max() for ref in ref_phi) > 1e-3  # the check is not vacuous


class _NoInverseAffineAutoregressive(T.AffineAutoregressive):
    """Pyro's affine autoregressive transform with its inverse removed, as Planar's is."""

    def _inverse(self, y):
        raise KeyError("no inverse")


def test_linearized_and_exact_inverse_give_the_same_gradients():
    """An invertible flow scored through the linearized inverse gives the gradients of its
    exact inverse, stopped and live."""
    torch.manual_seed(3)
    exact = T.affine_autoregressive(D)
    for p in exact.parameters():
        p.data.normal_(0, 0.3)
    linearized = _NoInverseAffineAutoregressive(exact.arn)
    grads = []
    for t in (exact, linearized):
        q = _flow(t)
        torch.manual_seed(4)
        z = q.rsample((5,))
        stopped = rescorable(q, stop=True).log_prob(z).sum()
        live = rescorable(q, stop=False).log_prob(z.detach()).sum()
        params = list(exact.parameters())
        grads.append(torch.autograd.grad(stopped, params) + torch.autograd.grad(live, params))
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)
    assert max(g.abs().max() for g in grads[0]) > 1e-3


@pytest.mark.parametrize("name", ["stl", "iwae-stl", "iwae-dreg"])
def test_path_gradients_vanish_at_the_exact_posterior(name):
    """When q is the exact posterior, log p(x, z) - log q(z) is constant in z: STL's and
    DReG's gradient of every flow parameter is zero for every sample (up to rounding),
    while the reparameterized ELBO gradient is not."""
    guide_flow = _planar(5)
    model_flow = _planar(5)  # the same parameters; the model scores z by the exact inverse
    base = dist.Normal(torch.full((D,), 0.3), torch.full((D,), 1.2)).to_event(1)

    def model():
        z = pyro.sample("z", dist.ImproperUniform(dist.constraints.real_vector, (), (D,)))
        pyro.factor("log_p", _exact_log_q(model_flow, _planar_inverse, base, z) + 2.0)

    def guide():
        pyro.module("flow", guide_flow)
        pyro.sample("z", dist.TransformedDistribution(base, [guide_flow]))

    for p in model_flow.parameters():
        p.requires_grad_(False)
    params = list(guide_flow.parameters())
    pyro.set_rng_seed(6)
    loss = make_estimator(name, 4).differentiable_loss(model, guide)
    assert loss.item() == pytest.approx(-2.0, abs=1e-9)
    for g in torch.autograd.grad(loss, params):
        assert g.abs().max() < 1e-8
    pyro.set_rng_seed(6)
    loss = make_estimator("elbo", 4).differentiable_loss(model, guide)
    assert max(g.abs().max() for g in torch.autograd.grad(loss, params)) > 1e-3


def _site(fn, value, name="z"):
    return {"name": name, "fn": fn, "value": value, "args": (), "kwargs": {}}


def test_a_transform_whose_cache_holds_another_sample_is_refused():
    t = _planar(7)
    q = _flow(t)
    z = q.rsample()
    q.rsample()  # the transform now caches another sample
    with pytest.raises(ValueError, match="site 'z'.*cache holds another sample"):
        rescored_log_prob(_site(q, z), z, stop=True, estimator="STL")


def test_a_transform_with_no_inverse_and_no_cache_is_refused():
    class NoCache(T.Planar):
        def __init__(self):
            super().__init__(D)
            self._cache_size = 0

    q = _flow(NoCache())
    z = q.rsample()
    with pytest.raises(CannotRescore, match="cached no sample"):
        rescorable(q, stop=False).log_prob(z.detach())
