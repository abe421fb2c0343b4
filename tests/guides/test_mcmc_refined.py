"""HMC-refined posteriors (Hoffman 2017): gradient identities, invariance of the posterior."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.elbo.hmc_refined import HMCRefinedELBO
from pyro_lvm.models import VAE, LinearGaussian
from pyro_lvm.plates import data_plate

Z_CRIT = 4.5
X_DIM, Z_DIM = 6, 2


def _vae():
    vae = VAE(X_DIM, Z_DIM, hidden=(8,))
    return vae, torch.bernoulli(torch.full((5, X_DIM), 0.5))


def _grads(module, loss):
    params = [p for _, p in module.named_parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_zero_steps_is_trace_elbo():
    vae, x = _vae()
    pyro.set_rng_seed(0)
    ref = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(0)
    ours = HMCRefinedELBO(num_hmc_steps=0).differentiable_loss(vae, vae.guide, x)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(_grads(vae, ours), _grads(vae, ref), strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_decoder_from_refined_sample_encoder_from_elbo():
    vae, x = _vae()
    est = HMCRefinedELBO(num_hmc_steps=3, num_leapfrog=2, step_size=0.2, adapt_step_size=False)
    pyro.set_rng_seed(1)
    loss = est.differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(1)
    elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(vae, vae.guide, x)
    torch.testing.assert_close(loss, elbo)  # the value is -ELBO(z0)
    # encoder: the ELBO gradient
    for a, b in zip(_grads(vae.guide, loss), _grads(vae.guide, elbo), strict=True):
        torch.testing.assert_close(a, b)
    # decoder: -∇θ log p(x, z_T) at the refined sample
    z_t = est.last_refined
    assert not torch.equal(z_t["z"], pyro.poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"])
    target = -HMCRefinedELBO.log_joint(vae, z_t, (x,), {}, scaled=True)
    for a, b in zip(_grads(vae.decoder, loss), _grads(vae.decoder, target), strict=True):
        torch.testing.assert_close(a, b)
    assert 0.0 <= est.acceptance_rate <= 1.0 and est.acceptance_history == [est.acceptance_rate]


def test_refinement_leaves_the_exact_posterior_invariant():
    """Chains started at exact posterior samples stay distributed as p(z | x)."""
    model = LinearGaussian(4, 2, noise_scale=0.8)
    x = model.sample(1).expand(2000, -1)
    post = model.posterior(x)
    est = HMCRefinedELBO(num_hmc_steps=4, num_leapfrog=3, step_size=0.3)
    with torch.no_grad():
        z0 = post.sample()
    z_t, rate = est.refine(model, {"z": z0}, (x,), {})
    z = z_t["z"]
    assert 0.3 < rate.mean() <= 1.0
    mean, cov = post.mean[0], post.covariance_matrix[0]
    n = z.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((z.mean(0) - mean).abs() < Z_CRIT * se_mean).all()
    var = z.var(0)
    se_var = cov.diagonal() * math.sqrt(2 / (n - 1))  # Gaussian sampling variance of s²
    assert ((var - cov.diagonal()).abs() < Z_CRIT * se_var).all()
    assert not torch.equal(z, z0)


def test_refinement_moves_towards_the_posterior():
    model = LinearGaussian(4, 2, noise_scale=0.8)
    x = model.sample(1).expand(500, -1)
    post = model.posterior(x)
    start = post.mean + 3.0
    est = HMCRefinedELBO(num_hmc_steps=10, num_leapfrog=5, step_size=0.2)
    z_t, _ = est.refine(model, {"z": start}, (x,), {})
    before = (start - post.mean).norm(dim=-1).mean()
    after = (z_t["z"] - post.mean).norm(dim=-1).mean()
    assert after < before / 2


def test_svi_step_adapts_step_size():
    vae, x = _vae()
    est = HMCRefinedELBO(num_hmc_steps=2, step_size=5.0, target_accept=0.8)
    svi = pyro.infer.SVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-2}), est)
    for _ in range(3):
        assert math.isfinite(svi.step(x))
    assert est.step_size < 5.0 and len(est.acceptance_history) == 3


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="num_leapfrog"):
        HMCRefinedELBO(num_leapfrog=0)
    with pytest.raises(ValueError, match="step_size"):
        HMCRefinedELBO(step_size=0.0)
    with pytest.raises(ValueError, match="target_accept"):
        HMCRefinedELBO(target_accept=1.0)


def _shifted_guide(model, shift):
    """A reparameterized mean-field guide: the exact posterior's marginals, mean + ``shift``."""

    def guide(x, idx=None):
        post = model.posterior(x)
        loc = (post.mean + shift).detach()
        scale = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt().detach()
        with data_plate(x, idx, None):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def _shifted_guide_sample(model, x, shift, k):
    post = model.posterior(x)
    loc = post.mean + shift
    scale = post.covariance_matrix.diagonal(dim1=-2, dim2=-1).sqrt()
    return loc + scale * torch.randn(k, *loc.shape)


def test_vectorized_particles_give_the_fisher_identity_gradient():
    """∇_b log p(x) = E_{p(z|x)}[∇_b log p(x, z)] (Fisher's identity), in closed form here.

    From a guide shifted two posterior SDs off, K = 3 vectorized particles × 1500 chains of
    HMC reach the exact posterior: the decoder's bias gradient matches the exact ∇_b log p(x)
    within the standard error, while the ELBO's gradient at the unrefined z₀ misses it by far.
    """
    torch.manual_seed(3)
    model = LinearGaussian(4, 2, noise_scale=0.8)
    n, k = 1500, 3
    x = model.sample(1).expand(n, -1)
    guide = _shifted_guide(model, 0.6)
    est = make_estimator(
        "hmc-refined", num_particles=k, num_hmc_steps=20, num_leapfrog=5, step_size=0.25
    )
    est.adapt_step_size = False
    assert est.vectorize_particles
    loss = est.differentiable_loss(model, guide, x)
    (grad_b,) = torch.autograd.grad(loss, [model.bias])
    z_t = est.last_refined["z"]
    assert z_t.shape == (k, n, 2)
    var = model.noise_scale**2
    per_chain = (x - z_t @ model.weight.T - model.bias) / var  # ∇_b log p(x, z_T), (k, n, 4)
    # exact identity: the loss's bias gradient is minus the sum over chains, divided by K
    torch.testing.assert_close(grad_b, -per_chain.sum((0, 1)) / k, rtol=1e-10, atol=1e-10)
    bias = model.bias.detach().requires_grad_()
    marginal = pyro.distributions.MultivariateNormal(bias, model.marginal().covariance_matrix)
    (exact,) = torch.autograd.grad(marginal.log_prob(x[0]), [bias])
    flat = per_chain.reshape(-1, 4).detach()
    se = flat.std(0) / flat.shape[0] ** 0.5
    assert ((flat.mean(0) - exact).abs() < Z_CRIT * se).all(), (flat.mean(0), exact, se)
    with torch.no_grad():
        z0 = _shifted_guide_sample(model, x, 0.6, k)
    naive = ((x - z0 @ model.weight.T - model.bias) / var).reshape(-1, 4)
    assert ((naive.mean(0) - exact).abs() > 10 * se).any()
    assert 0.3 < est.acceptance_rate <= 1.0


def test_sites_outside_the_data_plate_are_refused():
    def model(x):
        scale = pyro.sample("s", dist.LogNormal(0.0, 1.0))  # a global latent: one chain for all
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, scale), obs=x)

    def guide(x):
        pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    est = HMCRefinedELBO(num_hmc_steps=1)
    with pytest.raises(ValueError, match="data plate"):
        est.differentiable_loss(model, guide, torch.randn(5))


def test_fast_svi_runs_it_eagerly():
    """A trace would freeze the adapted step size: FastSVI must leave this loss eager."""
    from pyro_lvm.train import FastSVI

    vae, x = _vae()
    est = make_estimator("hmc-refined", num_particles=2, num_hmc_steps=2, step_size=5.0)
    svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-2}), est)
    for _ in range(4):
        assert math.isfinite(svi.step(x))
    assert "capturable" in svi.jit_reason and svi.traced_steps == 0
    assert len(est.acceptance_history) == 4 and est.step_size < 5.0
