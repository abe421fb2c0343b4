"""Collapse diagnostics: analytic KL per unit, exact active-unit counts, I(x; z) closed form."""

import math

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.evaluate.collapse import (
    active_units,
    kl_per_dimension,
    mutual_information,
    rate_distortion,
)
from pyro_lvm.guides import AmortizedFlowGuide
from pyro_lvm.models import VAE, HierarchicalVAE
from pyro_lvm.plot import plot_rate_distortion

matplotlib.use("Agg")
Z_CRIT = 4.5
X_DIM, Z_DIM = 6, 3


def _vae():
    vae = VAE(X_DIM, Z_DIM, hidden=(8,))
    return vae, torch.bernoulli(torch.full((40, X_DIM), 0.5))


def test_kl_per_dimension_closed_form():
    vae, x = _vae()
    with torch.no_grad():
        loc, scale = vae.guide.params(x)
    manual = 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log())
    torch.testing.assert_close(
        kl_per_dimension(vae.guide.posterior, vae.prior(), x), manual.mean(0)
    )


def test_active_units_exact_count():
    """Units whose posterior mean ignores x are inactive; the others have known variance."""
    weight = torch.zeros(2 * Z_DIM, 1)
    weight[0, 0] = 1.0  # unit 0: mean = x, var over x = Var(x)
    weight[1, 0] = 0.01  # unit 1: mean = 0.01 x, variance 1e-4 Var(x) < 0.01
    encoder = torch.nn.Linear(1, 2 * Z_DIM, bias=False)
    with torch.no_grad():
        encoder.weight.copy_(weight)

    def posterior(x):
        loc, raw = encoder(x).split(Z_DIM, -1)
        return dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)

    x = torch.linspace(-2, 2, 101)[:, None]
    result = active_units(posterior, x)
    assert result.num_active == 1 and result.active.tolist() == [True, False, False]
    torch.testing.assert_close(result.activity[0], x.var())
    torch.testing.assert_close(result.activity[1], 1e-4 * x.var())


def test_active_units_by_sampling_is_noise_corrected():
    """A posterior without a closed-form mean: the Monte Carlo activity is unbiased."""

    class NoMean(dist.Normal):
        @property
        def mean(self):
            raise NotImplementedError

    loc = torch.cat([torch.linspace(-1, 1, 200)[:, None], torch.zeros(200, 1)], -1)

    def posterior(x):
        return NoMean(loc, 1.0).to_event(1)

    # Each of 50 repeats: activity of unit 1 has mean 0 and SE ~ sqrt(2/199)/S; unit 0 ≈ Var(loc).
    acts = torch.stack([active_units(posterior, loc, num_samples=16).activity for _ in range(50)])
    mean, se = acts.mean(0), acts.std(0) / math.sqrt(50)
    assert abs(mean[1]) < Z_CRIT * se[1]
    assert abs(mean[0] - loc[:, 0].var()) < Z_CRIT * se[0]
    guide = AmortizedFlowGuide(X_DIM, Z_DIM, flow="planar", num_flows=1, hidden=(8,))
    x = torch.bernoulli(torch.full((10, X_DIM), 0.5))
    assert active_units(guide.posterior, x, num_samples=8).activity.shape == (Z_DIM,)


def test_mutual_information_closed_form():
    """q(z|x) = N(a x, s²), x ~ N(0, 1): I(x; z) = ½ log(1 + a²/s²)."""
    a, s = 2.0, 0.7
    x = torch.randn(3000, 1)

    def posterior(x):
        return dist.Normal(a * x, s).to_event(1)

    estimate, se = mutual_information(posterior, x)
    expected = 0.5 * math.log(1 + a**2 / s**2)
    assert abs(estimate - expected) < Z_CRIT * se
    assert se < 0.05


def test_mutual_information_zero_when_q_ignores_x():
    estimate, se = mutual_information(
        lambda x: dist.Normal(0 * x, 1.0).to_event(1), torch.randn(500, 2)
    )
    assert estimate == pytest.approx(0.0, abs=1e-12) and se == pytest.approx(0.0, abs=1e-12)


def test_rate_distortion_sums_to_the_elbo_and_rate_matches_kl():
    vae, x = _vae()
    pyro.set_rng_seed(3)
    rd = rate_distortion(vae, vae.guide, x)
    pyro.set_rng_seed(3)
    loss = pyro.infer.Trace_ELBO().loss(vae, vae.guide, x)
    assert rd.elbo == pytest.approx(-loss / x.shape[0], rel=1e-10)
    # one data point repeated: the per-row rates are iid Monte Carlo draws of its KL
    x0 = x[:1].expand(400, -1)
    kl = kl_per_dimension(vae.guide.posterior, vae.prior(), x[:1]).sum().item()
    rd = rate_distortion(vae, vae.guide, x0)
    assert abs(rd.rate - kl) < Z_CRIT * rd.rate_se


def test_rate_distortion_hierarchical_and_plot():
    hvae = HierarchicalVAE(X_DIM, 3, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((8, X_DIM), 0.5))
    points = {b: rate_distortion(hvae, hvae.guide, x) for b in (0.5, 1.0)}
    assert all(p.rate > 0 and p.distortion > 0 for p in points.values())
    ax = plot_rate_distortion(points)
    assert ax.get_xlabel().startswith("rate")


def test_bad_inputs_raise():
    vae, x = _vae()
    with pytest.raises(ValueError, match="at least 2"):
        active_units(vae.guide.posterior, x[:1])
    with pytest.raises(ValueError, match="factorized Gaussian"):
        kl_per_dimension(vae.guide.posterior, dist.Laplace(torch.zeros(Z_DIM), 1.0).to_event(1), x)
    with pytest.raises(ValueError, match="empty"):
        plot_rate_distortion({})
