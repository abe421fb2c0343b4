"""MMD objectives: the U-statistic against closed forms, identities with Trace_ELBO, contract."""

import math

import pyro
import pytest
import torch

from pyro_lvm.elbo.mmd import MMDELBO, WAEMMD, InfoVAE, mmd
from pyro_lvm.models import VAE, HierarchicalVAE

Z_CRIT = 4.5  # two-sided false-alarm rate ~7e-6 per check
X_DIM, Z_DIM = 6, 2


def _stats(values):
    """Mean of independent repeated estimates and its standard error."""
    return values.mean(), values.std() / math.sqrt(values.numel())


def test_mmd_of_identical_distributions_is_zero_in_expectation():
    mean, se = _stats(mmd(torch.randn(300, 50, 2), torch.randn(300, 60, 2)))
    assert abs(mean) < Z_CRIT * se


@pytest.mark.parametrize("shift,h", [(0.5, 1.0), (1.5, 0.7)])
def test_mmd_gaussian_shift_closed_form(shift, h):
    """RBF MMD² between N(0,1) and N(m,1): 2 h/√(h²+2) (1 - exp(-m²/(2(h²+2))))."""
    expected = 2 * h / math.sqrt(h**2 + 2) * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2))))
    mean, se = _stats(mmd(torch.randn(400, 40, 1), shift + torch.randn(400, 40, 1), "rbf", h))
    assert abs(mean - expected) < Z_CRIT * se
    assert se < expected / 5  # the test has power to see the shift


def test_mmd_imq_identical_and_shifted():
    same, se_same = _stats(mmd(torch.randn(200, 40, 2), torch.randn(200, 40, 2), "imq"))
    diff, se_diff = _stats(mmd(torch.randn(200, 40, 2), 2 + torch.randn(200, 40, 2), "imq"))
    assert abs(same) < Z_CRIT * se_same
    assert diff > Z_CRIT * se_diff


def _vae():
    return VAE(X_DIM, Z_DIM, hidden=(8,)), torch.bernoulli(torch.full((6, X_DIM), 0.5))


def test_zero_mmd_weight_is_trace_elbo():
    vae, x = _vae()
    ref = pyro.infer.Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(0)
    a = ref.differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(0)
    b = MMDELBO(kl_weight=1.0, mmd_weight=0.0, num_particles=3).differentiable_loss(
        vae, vae.guide, x
    )
    torch.testing.assert_close(a, b)


def test_mmd_term_is_weighted_penalty():
    """loss(w) - loss(0) = w N MMD²(zq, zp) at the same guide and prior samples."""
    vae, x = _vae()
    pyro.set_rng_seed(0)
    base = MMDELBO(1.0, 0.0).differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(0)
    full = MMDELBO(1.0, 3.0).differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        zq = vae.guide.posterior(x).sample()
        zp = vae.prior().sample((6,))
    torch.testing.assert_close(full - base, 3.0 * 6 * mmd(zq, zp).detach(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: InfoVAE(num_particles=2),
        lambda: WAEMMD(),
        lambda: MMDELBO(0.5, 2.0, "imq", bandwidth=0.5),
    ],
)
def test_contract_loss_agreement_and_gradients(make):
    vae, x = _vae()
    est = make()
    pyro.set_rng_seed(3)
    d = est.differentiable_loss(vae, vae.guide, x)
    pyro.set_rng_seed(3)
    loss = est.loss(vae, vae.guide, x)
    pyro.set_rng_seed(3)
    lg = est.loss_and_grads(vae, vae.guide, x)
    assert d.item() == pytest.approx(loss, rel=1e-12) and lg == pytest.approx(loss, rel=1e-12)
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    svi = pyro.infer.SVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-2}), est)
    assert math.isfinite(svi.step(x))


def test_hierarchical_joint_latents():
    """WAE-MMD on two latent levels compares the *joint* (z2, z1) of the guide with the joint of
    the prior: under one seed the loss is -log p(x | z) + λ N MMD²(joint q draws, joint prior
    draws), rebuilt here from the traces (the guide, the model replayed on it, a prior draw)."""
    from pyro.poutine.util import prune_subsample_sites

    hvae = HierarchicalVAE(X_DIM, 3, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, X_DIM), 0.5))
    est = WAEMMD(lam=7.0, num_particles=1)
    pyro.set_rng_seed(4)
    loss = est.differentiable_loss(hvae, hvae.guide, x)
    loss.backward()
    pyro.set_rng_seed(4)
    with torch.no_grad():
        guide_trace = pyro.poutine.trace(hvae.guide).get_trace(x)
        replayed = pyro.poutine.replay(hvae, trace=guide_trace)
        model_trace = prune_subsample_sites(pyro.poutine.trace(replayed).get_trace(x))
        prior_trace = pyro.poutine.trace(hvae).get_trace(x)
    sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
    latents = [s["name"] for s in sites if not s["is_observed"]]
    assert sorted(latents) == ["z1", "z2"]
    zq = torch.cat([guide_trace.nodes[n]["value"].reshape(5, -1) for n in latents], -1)
    zp = torch.cat([prior_trace.nodes[n]["value"].reshape(5, -1) for n in latents], -1)
    assert zq.shape == (5, 3 + 2)
    recon = -sum(s["fn"].log_prob(s["value"]).sum() for s in sites if s["is_observed"])
    expected = recon + 7.0 * 5 * mmd(zq, zp, "imq")
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


def test_info_vae_weights():
    est = InfoVAE(alpha=0.5, lam=10.0)
    assert est.kl_weight == 0.5 and est.mmd_weight == 9.5
    assert WAEMMD(lam=7.0).kl_weight == 0.0


def test_registry_names():
    from pyro_lvm.elbo import ESTIMATORS, make_estimator

    assert {"mmd-vae", "wae-mmd"} <= set(ESTIMATORS)  # a dropped registration fails
    assert isinstance(make_estimator("mmd-vae", 2), InfoVAE)
    assert isinstance(make_estimator("wae-mmd", 1), WAEMMD)


def test_batched_equals_loop():
    x, y = torch.randn(3, 5, 2), torch.randn(3, 4, 2)
    batched = mmd(x, y, "imq")
    torch.testing.assert_close(
        batched, torch.stack([mmd(a, b, "imq") for a, b in zip(x, y, strict=True)])
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kernel"):
        mmd(torch.zeros(3, 1), torch.zeros(3, 1), kernel="poly")
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.zeros(1, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="sample matrices"):
        mmd(torch.zeros(3, 1), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="sample matrices"):
        mmd(torch.zeros(3), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="mmd_weight"):
        MMDELBO(1.0, -1.0)
    with pytest.raises(ValueError, match="alpha"):
        InfoVAE(alpha=2.0)
