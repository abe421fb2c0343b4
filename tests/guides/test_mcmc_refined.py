"""HMC-refined posteriors (Hoffman 2017): gradient identities, invariance of the posterior."""

import math

import pyro
import pytest
import torch

from pyro_lvm.elbo.hmc_refined import HMCRefinedELBO
from pyro_lvm.models import VAE, LinearGaussian

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
