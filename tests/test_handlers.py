"""KL weight handler, warm-up schedules and the free-bits ELBO."""

import pyro
import pyro.poutine as poutine
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_lvm.elbo import ESTIMATORS, make_estimator
from pyro_lvm.handlers import (
    FreeBitsELBO,
    KLWeightedELBO,
    KLWeightMessenger,
    cyclical_schedule,
    kl_weight,
    linear_schedule,
)
from pyro_lvm.models import VAE, HierarchicalVAE

X_DIM, Z_DIM = 6, 3


@pytest.fixture
def vae_and_x():
    vae = VAE(X_DIM, Z_DIM, hidden=(8,))
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5))
    return vae, x


def _recon_and_kl(vae, x, seed):
    """-E log p(x|z) at the guide's sample drawn under ``seed``, and the analytic KL."""
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        q = vae.guide.posterior(x)
        z = q.sample()
        recon = -vae.decode(z).log_prob(x).sum()
        kl = kl_divergence(q, vae.prior().expand(q.batch_shape)).sum()
    return recon.item(), kl.item()


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0, 2.5])
def test_beta_scales_exactly_the_latent_terms(vae_and_x, beta):
    """Under kl_weight(β), TraceMeanField's loss is -E log p(x|z) + β KL (analytic)."""
    vae, x = vae_and_x
    elbo = pyro.infer.TraceMeanField_ELBO()
    pyro.set_rng_seed(4)
    loss = elbo.loss(kl_weight(vae, beta), kl_weight(vae.guide, beta), x)
    recon, kl = _recon_and_kl(vae, x, 4)
    assert loss == pytest.approx(recon + beta * kl, rel=1e-10)


def test_beta_with_monte_carlo_kl(vae_and_x):
    """Trace_ELBO under β: recon + β (log q - log p) at the same sample."""
    vae, x = vae_and_x
    pyro.set_rng_seed(7)
    loss = pyro.infer.Trace_ELBO().loss(kl_weight(vae, 0.4), kl_weight(vae.guide, 0.4), x)
    pyro.set_rng_seed(7)
    with torch.no_grad():
        q = vae.guide.posterior(x)
        z = q.sample()
        expected = (
            -vae.decode(z).log_prob(x).sum() + 0.4 * (q.log_prob(z) - vae.prior().log_prob(z)).sum()
        )
    assert loss == pytest.approx(expected.item(), rel=1e-10)


def test_sites_filter_and_observed_untouched():
    hvae = HierarchicalVAE(X_DIM, 3, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((4, X_DIM), 0.5))
    with KLWeightMessenger(0.5, sites={"z2"}):
        trace = poutine.trace(hvae).get_trace(x)
    assert trace.nodes["z2"]["scale"] == 0.5
    assert trace.nodes["z1"]["scale"] == 1.0
    assert trace.nodes["x"]["scale"] == 1.0


def test_schedules():
    lin = linear_schedule(10)
    values = []
    for _ in range(13):
        values.append(lin())
        lin.step()
    assert values[0] == 0.0 and values[5] == 0.5 and values[10:] == [1.0] * 3
    cyc = cyclical_schedule(period=4, ratio=0.5)
    values = []
    for _ in range(8):
        values.append(cyc())
        cyc.step()
    assert values == [0.0, 0.5, 1.0, 1.0] * 2
    assert "linear_schedule" in repr(lin) and "cyclical_schedule" in repr(cyc)


def test_schedule_drives_svi(vae_and_x):
    """The handler reads β at every call: the loss at β_t matches a fixed-β loss."""
    vae, x = vae_and_x
    sched = linear_schedule(4)
    sched.step()  # β = 0.25
    pyro.set_rng_seed(3)
    a = pyro.infer.TraceMeanField_ELBO().loss(kl_weight(vae, sched), kl_weight(vae.guide, sched), x)
    pyro.set_rng_seed(3)
    b = pyro.infer.TraceMeanField_ELBO().loss(kl_weight(vae, 0.25), kl_weight(vae.guide, 0.25), x)
    assert a == b
    svi = pyro.infer.SVI(
        kl_weight(vae, sched),
        kl_weight(vae.guide, sched),
        pyro.optim.Adam({"lr": 1e-2}),
        pyro.infer.Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1),
    )
    assert torch.isfinite(torch.tensor(svi.step(x)))


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_weighted_estimator_equals_wrapping_by_hand(vae_and_x, name):
    """KL weighting composes with every registered estimator (e.g. STL with a warm-up)."""
    vae, x = vae_and_x
    base = make_estimator(name, num_particles=3)
    est = KLWeightedELBO(base, 0.3)
    assert est.num_particles == 3 and est.vectorize_particles == base.vectorize_particles
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(6)
        values.append(float(torch.as_tensor(getattr(est, method)(vae, vae.guide, x)).detach()))
    pyro.set_rng_seed(6)
    by_hand = base.loss(kl_weight(vae, 0.3), kl_weight(vae.guide, 0.3), x)
    assert values == pytest.approx([by_hand] * 3, rel=1e-12)


def test_free_bits_zero_is_the_elbo(vae_and_x):
    vae, x = vae_and_x
    elbo = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    a = elbo.differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(1)
    b = FreeBitsELBO(0.0, num_particles=3).differentiable_loss(vae, vae.guide, x)
    torch.testing.assert_close(a, b)
    pyro.set_rng_seed(1)
    c = FreeBitsELBO(0.0, num_particles=3).loss(vae, vae.guide, x)
    assert c == pytest.approx(a.item(), rel=1e-12)


def test_free_bits_large_floor_is_recon_plus_constant(vae_and_x):
    """With λ above every unit's KL, the loss is -E log p(x|z) + N D λ."""
    vae, x = vae_and_x
    lam = 1e3
    pyro.set_rng_seed(2)
    loss = FreeBitsELBO(lam).differentiable_loss(vae, vae.guide, x)
    recon, _ = _recon_and_kl(vae, x, 2)
    assert loss.item() == pytest.approx(recon + 5 * Z_DIM * lam, rel=1e-12)


def test_free_bits_subsampled_uses_dataset_size(vae_and_x):
    vae, x = vae_and_x
    vae.num_data = 50
    pyro.set_rng_seed(2)
    loss = FreeBitsELBO(1e3).differentiable_loss(vae, vae.guide, x, torch.arange(5))
    recon, _ = _recon_and_kl(vae, x, 2)
    assert loss.item() == pytest.approx(10 * recon + 50 * Z_DIM * 1e3, rel=1e-12)


def test_bad_inputs_raise(vae_and_x):
    vae, x = vae_and_x
    with pytest.raises(ValueError, match="beta"):
        KLWeightMessenger(-1.0)
    with pytest.raises(ValueError, match="beta"):
        pyro.infer.Trace_ELBO().loss(kl_weight(vae, lambda: -2.0), vae.guide, x)
    with pytest.raises(ValueError, match="num_steps"):
        linear_schedule(0)
    with pytest.raises(ValueError, match="ratio"):
        cyclical_schedule(10, ratio=0.0)
    with pytest.raises(ValueError, match="free_bits"):
        FreeBitsELBO(-1.0)
    with pytest.raises(ValueError, match="base"):
        KLWeightedELBO("elbo", 0.5)
