"""STL: exact identities with Trace_ELBO, zero variance at the exact posterior, mixed latents.

Statistical checks use z = 4.5 standard errors per coordinate (false-alarm rate 6.8e-6 each).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch.distributions import constraints

from pyro_lvm.elbo import STL, ScoreFunctionELBO
from pyro_lvm.models import LinearGaussian

Z = 4.5


def _exact_posterior_setup():
    # orthogonal columns of W make the exact posterior covariance diagonal (mean-field exact)
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    model = LinearGaussian(3, 2, noise_scale=0.5, weight=weight, bias=torch.tensor([0.1, 0, -0.2]))
    x = model.sample(5)
    post = model.posterior(x)
    loc0 = post.loc.detach()
    scale0 = post.covariance_matrix[0].diagonal().sqrt().detach()

    def guide(x, idx=None):
        loc = pyro.param("q_loc", loc0.clone())
        scale = pyro.param("q_scale", scale0.clone(), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide, x


def _guide_grads(elbo, model, guide, x, seed):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    loss = elbo.loss_and_grads(model, guide, x)
    store = pyro.get_param_store()
    grads = [store.get_param(k).unconstrained().grad for k in ("q_loc", "q_scale")]
    return loss, torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("seed", range(4))
def test_guide_gradient_is_zero_for_every_sample_at_exact_posterior(seed):
    model, guide, x = _exact_posterior_setup()
    _, g = _guide_grads(STL(num_particles=1, max_plate_nesting=1), model, guide, x, seed)
    assert torch.allclose(g, torch.zeros_like(g), atol=1e-10)
    # the same sample under Trace_ELBO has a nonzero (zero-mean) guide gradient
    _, g_ref = _guide_grads(Trace_ELBO(max_plate_nesting=1), model, guide, x, seed)
    assert g_ref.abs().max() > 1e-3


@pytest.mark.parametrize("num_particles", [1, 3])
def test_loss_and_model_gradient_equal_trace_elbo(num_particles):
    model, guide, x = _exact_posterior_setup()
    kw = {"num_particles": num_particles, "vectorize_particles": True, "max_plate_nesting": 1}
    results = []
    for elbo in (STL(**kw), Trace_ELBO(**kw)):
        for p in model.parameters():
            p.grad = None
        loss, _ = _guide_grads(elbo, model, guide, x, seed=7)
        results.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    elbo = STL(**kw)
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(2)
        values.append(float(torch.as_tensor(getattr(elbo, method)(model, guide, x)).detach()))
    assert values == pytest.approx([values[0]] * 3, rel=1e-12)


# A mixed model: c ~ Bernoulli(p), z ~ N(0, 1), x ~ N(z + m_c, 1) per data point, with the
# guide q(c) = Bernoulli(sigmoid(a_i)), q(z) = N(u_i, s_i). Its ELBO has a closed form.
X = torch.tensor([-1.0, 0.5, 2.5])
M = torch.tensor([-1.0, 2.0])
P = 0.3


def mixed_model(x, idx=None):
    m = pyro.param("m", M.clone())
    with pyro.plate("data", x.shape[0], dim=-1):
        c = pyro.sample("c", dist.Bernoulli(P))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + m[c.long()], 1.0), obs=x)


def mixed_guide(x, idx=None):
    a = pyro.param("a", torch.tensor([0.5, -0.3, 1.0]))
    u = pyro.param("u", torch.tensor([-0.5, 0.2, 0.8]))
    s = pyro.param("s", torch.tensor([0.7, 1.2, 0.9]), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("c", dist.Bernoulli(logits=a))
        pyro.sample("z", dist.Normal(u, s))


def mixed_exact_elbo(m, a, u, s):
    qc = torch.stack([1 - torch.sigmoid(a), torch.sigmoid(a)], -1)  # (N, 2)
    log_pc = torch.log(torch.tensor([1 - P, P]))
    ent_c = -(qc * qc.clamp_min(1e-300).log()).sum(-1)
    neg_kl_z = 0.5 * (1 + 2 * s.log() - u.pow(2) - s.pow(2))
    loglik = -0.5 * math.log(2 * math.pi) - 0.5 * (
        (X[:, None] - u[:, None] - m) ** 2 + s[:, None] ** 2
    )
    return ((qc * (log_pc + loglik)).sum(-1) + ent_c + neg_kl_z).sum()


@pytest.mark.parametrize("estimator", ["stl", "score-function"])
def test_mixed_discrete_continuous_gradient_is_unbiased(estimator):
    names = ("m", "a", "u", "s")
    mixed_guide(X)
    mixed_model(X)
    store = pyro.get_param_store()
    params = [store.get_param(k).unconstrained() for k in names]
    (-mixed_exact_elbo(*(store[k] for k in names))).backward()
    exact = torch.cat([p.grad.reshape(-1) for p in params])
    kw = {"num_particles": 32, "max_plate_nesting": 1}
    elbo = STL(**kw) if estimator == "stl" else ScoreFunctionELBO(baseline="loo", **kw)
    draws = []
    for _ in range(50):
        for p in params:
            p.grad = None
        elbo.loss_and_grads(mixed_model, mixed_guide, X)
        draws.append(torch.cat([p.grad.reshape(-1) for p in params]))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - exact).abs() <= Z * se + 1e-12).all(), (mean, exact, se)
    assert (exact.abs() / se).max() > 2 * Z
