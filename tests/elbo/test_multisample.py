"""Multi-sample bounds: shared test programs (plain Pyro), exact identities and bad input."""

from __future__ import annotations

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.util import detach
from pyro.infer import SVI, RenyiELBO, Trace_ELBO
from torch.distributions import constraints

from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.renyi import RenyiBound
from pyro_lvm.elbo.vimco import VIMCO
from pyro_lvm.guides.amortized import AmortizedGaussianGuide
from pyro_lvm.models import LinearGaussian

ESTIMATOR_FACTORIES = [
    functools.partial(IWAE, 4, gradient="reparam", max_plate_nesting=1),
    functools.partial(IWAE, 4, gradient="stl", max_plate_nesting=1),
    functools.partial(IWAE, 4, gradient="dreg", max_plate_nesting=1),
    functools.partial(VIMCO, 4, max_plate_nesting=1),
    functools.partial(RenyiBound, 0.5, 4, max_plate_nesting=1),
    functools.partial(RenyiBound, 0.5, 4, gradient="dreg", max_plate_nesting=1),
]
ESTIMATOR_IDS = ["iwae", "iwae-stl", "iwae-dreg", "vimco", "renyi", "renyi-dreg"]

X_DIM, Z_DIM, NOISE = 3, 2, 0.7


def lg_params(num_rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Initial values: model W, b and per-row guide loc / scale (all rows alike)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W": torch.randn(X_DIM, Z_DIM, generator=g),
        "b": 0.3 * torch.randn(X_DIM, generator=g),
        "loc": (0.5 * torch.randn(Z_DIM, generator=g)).expand(num_rows, Z_DIM).clone(),
        "scale": (0.6 + 0.3 * torch.rand(Z_DIM, generator=g)).expand(num_rows, Z_DIM).clone(),
    }


def lg_model(x, idx=None, num_data=None, init=None):
    """z ~ N(0, I), x | z ~ N(W z + b, NOISE² I) in the data plate; W, b are pyro.params."""
    init = init or {}
    W = pyro.param("W", lambda: init["W"])
    b = pyro.param("b", lambda: init["b"])
    size = x.shape[0] if idx is None else num_data
    with pyro.plate("data", size, subsample=idx, dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T + b, NOISE).to_event(1), obs=x)


def lg_guide(x, idx=None, num_data=None, init=None):
    """q(z_i) = N(loc_i, diag scale_i²) with full-size local parameters sliced by idx."""
    init = init or {}
    loc = pyro.param("loc", lambda: init["loc"])
    scale = pyro.param("scale", lambda: init["scale"], constraint=constraints.positive)
    size = x.shape[0] if idx is None else num_data
    with pyro.plate("data", size, subsample=idx, dim=-1) as i:
        pyro.sample("z", dist.Normal(loc[i], scale[i]).to_event(1))


def lg_log_joint(x, z, W, b):
    """log p(x, z) in plain torch, for z of shape (..., Z_DIM)."""
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    lik = torch.distributions.Normal(z @ W.T + b, NOISE).log_prob(x).sum(-1)
    return prior + lik


def lg_data(num_rows: int, seed: int = 2) -> torch.Tensor:
    """One data point repeated ``num_rows`` times (every row an independent replicate)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, X_DIM, generator=g).expand(num_rows, X_DIM).clone()


# a discrete latent with closed-form evidence by enumeration
NUM_CATS = 3


def cat_params(num_rows: int) -> dict[str, torch.Tensor]:
    return {
        "locs": torch.tensor([-1.0, 0.5, 2.0]),
        "prior_logits": torch.tensor([0.2, -0.1, 0.0]),
        "logits": torch.tensor([0.3, -0.4, 0.1]).expand(num_rows, NUM_CATS).clone(),
    }


def cat_model(x, idx=None, init=None):
    """c ~ Categorical(softmax(prior_logits)), x | c ~ N(locs[c], 1)."""
    init = init or {}
    locs = pyro.param("locs", lambda: init["locs"])
    prior_logits = pyro.param("prior_logits", lambda: init["prior_logits"])
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("c", dist.Categorical(logits=prior_logits))
        pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)


def cat_guide(x, idx=None, init=None):
    """q(c_i) = Categorical(logits_i), per-row logits."""
    init = init or {}
    logits = pyro.param("logits", lambda: init["logits"])
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("c", dist.Categorical(logits=logits))


def cat_exact_iwae(x0, params, K):
    """Exact E_q[log (1/K) Σ_k w_k] for one data point by enumerating all C^K particle tuples."""
    log_q = torch.log_softmax(params["logits"], -1)
    log_prior = torch.log_softmax(params["prior_logits"], -1)
    log_w = log_prior + torch.distributions.Normal(params["locs"], 1.0).log_prob(x0) - log_q
    grids = torch.cartesian_prod(*[torch.arange(NUM_CATS)] * K).reshape(-1, K)
    lw = log_w[grids]
    bound = lw.logsumexp(-1) - torch.log(torch.tensor(float(K)))
    prob = log_q[grids].sum(-1).exp()
    return (prob * bound).sum()


# ---------------------------------------------------------------------------------------------
# tools


def bind(fn, **kw):
    return functools.partial(fn, **kw)


def loss_and_grad(elbo, model, guide, *args, seed=0, **kwargs):
    """differentiable_loss and the gradients of every param-store parameter, under one seed."""
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    names, params = zip(*pyro.get_param_store().named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    zero = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return loss.detach(), dict(zip(names, zero, strict=True))


def assert_grads_close(a, b, atol=1e-10, rtol=1e-8, names=None):
    for name in names or a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=rtol), (name, a[name], b[name])


def lg_pair(num_rows, **kw):
    init = lg_params(num_rows)
    return bind(lg_model, init=init, **kw), bind(lg_guide, init=init, **kw)


# ---------------------------------------------------------------------------------------------
# exact identities


def test_iwae_k1_equals_trace_elbo():
    x = lg_data(5) + torch.linspace(0, 1, 5).unsqueeze(-1)
    model, guide = lg_pair(5)
    ref = Trace_ELBO(num_particles=1, max_plate_nesting=1, vectorize_particles=True)
    ref_loss, ref_grad = loss_and_grad(ref, model, guide, x)
    loss, grad = loss_and_grad(IWAE(num_particles=1, max_plate_nesting=1), model, guide, x)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert_grads_close(grad, ref_grad)


def trace_stl_grad(model, guide, x, seed=0):
    """Trace_ELBO with the guide density rescored with detached parameters (Roeder et al.)."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    site = guide_trace.nodes["z"]
    log_q_stop = detach(site["fn"]).log_prob(site["value"]).sum()
    surrogate = model_trace.log_prob_sum() - log_q_stop
    names, params = zip(*pyro.get_param_store().named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(-surrogate, params), strict=True))


def test_dreg_k1_equals_trace_stl():
    x = lg_data(4) + torch.linspace(-1, 1, 4).unsqueeze(-1)
    model, guide = lg_pair(4)
    _, dreg = loss_and_grad(IWAE(1, gradient="dreg", max_plate_nesting=1), model, guide, x)
    _, stl = loss_and_grad(IWAE(1, gradient="stl", max_plate_nesting=1), model, guide, x)
    ref = trace_stl_grad(model, guide, x)
    assert_grads_close(dreg, ref)
    assert_grads_close(stl, ref)


def test_iwae_equals_pyro_renyi_alpha0():
    x = lg_data(6) + torch.linspace(0, 2, 6).unsqueeze(-1)
    model, guide = lg_pair(6)
    loss, grad = loss_and_grad(IWAE(5, max_plate_nesting=1), model, guide, x)
    pyro.set_rng_seed(0)
    ref = RenyiELBO(alpha=0, num_particles=5, max_plate_nesting=1, vectorize_particles=True)
    ref_loss = ref.loss_and_grads(model, guide, x)
    ref_grad = {n: p.grad for n, p in pyro.get_param_store().named_parameters()}
    assert abs(loss.item() - ref_loss) < 1e-10 * abs(ref_loss)
    assert_grads_close(grad, ref_grad)


@pytest.mark.parametrize("gradient", ["reparam", "stl", "dreg"])
def test_model_gradient_same_for_every_mode(gradient):
    x = lg_data(5) + torch.linspace(0, 1, 5).unsqueeze(-1)
    model, guide = lg_pair(5)
    loss, grad = loss_and_grad(IWAE(6, gradient=gradient, max_plate_nesting=1), model, guide, x)
    ref_loss, ref = loss_and_grad(IWAE(6, max_plate_nesting=1), model, guide, x)
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert_grads_close(grad, ref, names=["W", "b"])
    if gradient != "reparam":  # the guide gradients do differ, so the check above can fail
        assert not torch.allclose(grad["loc"], ref["loc"])


@pytest.mark.parametrize("elbo_fn", ESTIMATOR_FACTORIES, ids=ESTIMATOR_IDS)
def test_loss_methods_agree(elbo_fn):
    x = lg_data(4) + torch.linspace(0, 1, 4).unsqueeze(-1)
    model, guide = lg_pair(4)
    elbo = elbo_fn()
    loss, grad = loss_and_grad(elbo, model, guide, x)
    pyro.set_rng_seed(0)
    assert elbo.loss(model, guide, x) == pytest.approx(loss.item(), rel=1e-12)
    pyro.set_rng_seed(0)
    value = elbo.loss_and_grads(model, guide, x)
    assert value == pytest.approx(loss.item(), rel=1e-12)
    for name, param in pyro.get_param_store().named_parameters():
        assert torch.allclose(param.grad, grad[name], atol=1e-12), name


@pytest.mark.parametrize("elbo_fn", ESTIMATOR_FACTORIES, ids=ESTIMATOR_IDS)
def test_subsample_scale_applied_after_logsumexp(elbo_fn):
    # a minibatch of B rows drawn from N: same particle draws as the unsubsampled batch, so
    # the subsampled loss is exactly N / B times the batch loss (Pyro's RenyiELBO is not)
    num_data, idx = 12, torch.tensor([3, 7, 8])
    init = lg_params(num_data)
    init["loc"] = init["loc"] + torch.linspace(-1, 1, num_data).unsqueeze(-1)
    x = lg_data(3) + torch.tensor([[0.0], [1.0], [-0.5]])
    sub_model = bind(lg_model, init=init, num_data=num_data)
    sub_guide = bind(lg_guide, init=init, num_data=num_data)
    sub, sub_grad = loss_and_grad(elbo_fn(), sub_model, sub_guide, x, idx)
    pyro.clear_param_store()
    batch_init = dict(init, loc=init["loc"][idx], scale=init["scale"][idx])
    full, full_grad = loss_and_grad(
        elbo_fn(), bind(lg_model, init=batch_init), bind(lg_guide, init=batch_init), x
    )
    assert torch.allclose(sub, num_data / 3 * full, rtol=1e-12)
    assert torch.allclose(sub_grad["W"], num_data / 3 * full_grad["W"], rtol=1e-10)
    assert torch.allclose(sub_grad["loc"][idx], num_data / 3 * full_grad["loc"], rtol=1e-10)


def exact_posterior_params(num_rows):
    """LinearGaussian with orthogonal columns of W: a diagonal exact posterior for q."""
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    lg = LinearGaussian(
        X_DIM, Z_DIM, noise_scale=NOISE, weight=W, bias=torch.tensor([0.1, -0.2, 0.3])
    )
    x = lg_data(num_rows) + torch.linspace(-1, 1, num_rows).unsqueeze(-1)
    post = lg.posterior(x)
    init = {
        "W": W,
        "b": lg.bias.detach(),
        "loc": post.loc.detach(),
        "scale": post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt().detach(),
    }
    assert torch.allclose(post.covariance_matrix, torch.diag_embed(init["scale"] ** 2))
    return x, init, lg.log_evidence(x).detach()


@pytest.mark.parametrize("gradient", ["stl", "dreg"])
def test_exact_posterior_zero_guide_gradient(gradient):
    x, init, log_px = exact_posterior_params(5)
    model, guide = bind(lg_model, init=init), bind(lg_guide, init=init)
    loss, grad = loss_and_grad(IWAE(7, gradient=gradient), model, guide, x)
    assert torch.allclose(-loss, log_px.sum(), rtol=1e-12)  # every weight equals p(x)
    assert grad["loc"].abs().max() < 1e-10 and grad["scale"].abs().max() < 1e-10
    _, reparam = loss_and_grad(IWAE(7), model, guide, x)  # not zero: the test can fail
    assert reparam["scale"].abs().max() > 1e-2


def test_subsampled_equals_full_when_weights_equal():
    # q = exact posterior on duplicated data: every weight is p(x), whatever the draws
    x, init, log_px = exact_posterior_params(1)
    num_data = 8
    init = {
        k: (v.expand(num_data, *v.shape[1:]) if k in ("loc", "scale") else v)
        for k, v in init.items()
    }
    xs = x.expand(num_data, X_DIM)
    full = IWAE(4).loss(bind(lg_model, init=init), bind(lg_guide, init=init), xs)
    idx = torch.tensor([1, 6])
    model = bind(lg_model, init=init, num_data=num_data)
    guide = bind(lg_guide, init=init, num_data=num_data)
    sub = IWAE(4).loss(model, guide, xs[idx], idx)
    assert sub == pytest.approx(full, rel=1e-12)
    assert full == pytest.approx(-num_data * log_px.item(), rel=1e-12)


def test_sequential_particles_stack_like_vectorized():
    """Both layouts give log_w[k, i] = log p(x_i, z_ki) - log q(z_ki) for the k-th draw of the
    guide, particles first: checked against the closed-form densities of the recorded draws
    (the two layouts draw different numbers from one seed, so each has its own reference)."""
    x = lg_data(3)
    init = lg_params(3)
    model, guide = lg_pair(3)
    for estimator in (IWAE(3, vectorize_particles=False), IWAE(3)):
        draws = []

        def recorded(*args, draws=draws, **kwargs):
            trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
            draws.append(trace.nodes["z"]["value"].detach())

        pyro.set_rng_seed(0)
        log_w = estimator._get_log_weights(model, recorded, (x,), {}).log_w.detach()
        # the last guide run(s) drew the particles (a first dry run may guess the plate nesting)
        z = draws[-1] if draws[-1].dim() == 3 else torch.stack(draws[-3:])  # (K, N, Z_DIM)
        assert log_w.shape == z.shape[:2] == (3, 3)
        prior = dist.Normal(torch.zeros(Z_DIM), 1.0).log_prob(z).sum(-1)
        lik = dist.Normal(z @ init["W"].T + init["b"], NOISE).log_prob(x).sum(-1)
        log_q = dist.Normal(init["loc"], init["scale"]).log_prob(z).sum(-1)
        torch.testing.assert_close(log_w, prior + lik - log_q, rtol=1e-12, atol=1e-12)
        assert len(set(log_w.reshape(-1).tolist())) == 9  # every entry its own draw


def test_svi_with_pyro_lvm_modules():
    lg = LinearGaussian(X_DIM, Z_DIM, num_data=20)
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, hidden=(8,), num_data=20)
    data = lg.sample(20)
    svi = SVI(lg, guide, pyro.optim.Adam({"lr": 1e-2}), IWAE(4, gradient="dreg"))
    idx = torch.arange(5)
    losses = [svi.step(data[idx], idx) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(p.grad is not None for p in guide.parameters())


# ---------------------------------------------------------------------------------------------
# bad input


def test_dreg_on_discrete_site_raises():
    x = torch.tensor([0.1, 1.5, -0.3])
    init = cat_params(3)
    with pytest.raises(ValueError, match="'c'.*gradient='reparam'"):
        IWAE(3, gradient="dreg").loss(bind(cat_model, init=init), bind(cat_guide, init=init), x)


def global_model(x, idx=None):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 10, subsample=idx, dim=-1):
        pyro.sample("x", dist.Normal(g, 1.0), obs=x)


def global_guide(x, idx=None):
    pyro.sample("g", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))


@pytest.mark.parametrize("cls", [IWAE, VIMCO, RenyiBound])
def test_subsampling_outside_common_plate_raises(cls):
    x, idx = torch.tensor([0.5, 1.0]), torch.tensor([2, 5])
    with pytest.raises(ValueError, match="'data' is subsampled but does not enclose site 'g'"):
        cls(num_particles=3).loss(global_model, global_guide, x, idx)
    # without subsampling the global latent is shared: one logsumexp over particles
    assert cls(num_particles=3).loss(global_model, global_guide, torch.randn(10)) > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: IWAE(num_particles=0), "num_particles >= 1"),
        (lambda: IWAE(num_particles=2.5), "integer"),
        (lambda: IWAE(gradient="path"), "unknown gradient 'path'"),
        (lambda: VIMCO(num_particles=1), "num_particles >= 2"),
        (lambda: VIMCO(4, gradient="dreg"), "DReG"),
        (lambda: RenyiBound(alpha=1.0), "Trace_ELBO"),
        (lambda: RenyiBound(alpha=-0.5), "alpha must be finite and >= 0"),
        (lambda: RenyiBound(alpha=float("nan")), "alpha must be finite"),
    ],
)
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
