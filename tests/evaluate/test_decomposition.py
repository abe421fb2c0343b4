"""ELBO decomposition: exact identities, then analytic vs Monte Carlo terms within Z·SE.

Z = 4.5 standard errors (two-sided false-alarm rate ~7e-6 per assertion).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.evaluate import ELBODecomposition, elbo_decomposition, elbo_estimate
from pyro_lvm.plates import data_plate
from tests.evaluate.conftest import ExactPosteriorGuide, MeanFieldGuide, closed_form_elbo

Z = 4.5


def _within_se(estimate: torch.Tensor, reference: torch.Tensor) -> None:
    """Mean difference of independent per-row estimates is within Z standard errors of 0."""
    diff = estimate - reference
    se = diff.std() / diff.numel() ** 0.5
    assert diff.mean().abs() < Z * se, (diff.mean(), se)


def test_fields_and_exact_identities(linear_gaussian):
    model, x = linear_gaussian
    guide = MeanFieldGuide(model)
    d = elbo_decomposition(model, guide, x, num_samples=3)
    assert isinstance(d, ELBODecomposition)
    assert d.kl_method == {"z": "analytic"}
    for value in (d.elbo, d.reconstruction, d.kl, d.rate_bits, d.kl_per_site["z"]):
        assert value.shape == (x.shape[0],)
    torch.testing.assert_close(d.elbo, d.reconstruction - d.kl)
    torch.testing.assert_close(d.rate_bits, d.kl / math.log(2))
    # the analytic KL(q || p(z)) is exactly the closed form, whatever the samples
    _, _, kl = closed_form_elbo(model, guide.mvn(x), x)
    torch.testing.assert_close(d.kl, kl.detach())
    summary = d.summary()
    assert set(summary) == {"elbo", "reconstruction", "kl", "rate_bits"}
    assert summary["kl"] == pytest.approx(float(d.kl.mean()))


def test_monte_carlo_decomposition_equals_elbo_estimate(linear_gaussian):
    """Forced Monte Carlo KL: recon - KL is the mean log weight of the same particles."""
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.4)
    pyro.set_rng_seed(5)
    d = elbo_decomposition(model, guide, x, num_samples=20, sample_chunk=6, analytic_kl=False)
    pyro.set_rng_seed(5)
    elbo = elbo_estimate(model, guide, x, num_samples=20, sample_chunk=6)
    assert d.kl_method == {"z": "monte-carlo"}
    torch.testing.assert_close(d.elbo, elbo)


def test_terms_match_closed_form_within_se(linear_gaussian):
    """One particle per row over many replicated rows: independent unbiased estimates."""
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.3)
    xs = x.repeat(40, 1)  # 960 rows, one particle each
    elbo, recon, kl = (t.detach() for t in closed_form_elbo(model, guide.mvn(xs), xs))
    analytic = elbo_decomposition(model, guide, xs, num_samples=1)
    mc = elbo_decomposition(model, guide, xs, num_samples=1, analytic_kl=False)
    _within_se(analytic.reconstruction, recon)
    _within_se(analytic.elbo, elbo)
    _within_se(mc.kl, kl)
    _within_se(mc.elbo, elbo)
    # and the ELBO identity: log p(x) - ELBO = KL(q || p(z|x)) > 0
    gap = model.log_evidence(xs).detach() - analytic.elbo
    _within_se(gap, torch.distributions.kl_divergence(guide.mvn(xs), model.posterior(xs)).detach())


def test_mixture_discrete_latent(mixture):
    """Categorical q = p(z|x): analytic KL registered; MC agrees within SE; ELBO = log p(x)."""
    model, x = mixture
    xs = x.repeat(50, 1)
    guide = ExactPosteriorGuide(model)
    analytic = elbo_decomposition(model, guide, xs, num_samples=1)
    mc = elbo_decomposition(model, guide, xs, num_samples=1, analytic_kl=False)
    assert analytic.kl_method == {"z": "analytic"}
    _within_se(mc.kl, analytic.kl)
    _within_se(analytic.elbo, model.log_evidence(xs).detach())


def test_dependent_prior_uses_monte_carlo(linear_gaussian):
    """A prior that depends on another latent is not given an analytic KL."""
    _, x = linear_gaussian

    def model(x, idx=None):
        with data_plate(x, idx):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            b = pyro.sample("b", dist.Normal(a, 1.0))
            pyro.sample("x", dist.Normal(b.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide(x, idx=None):
        with data_plate(x, idx):
            pyro.sample("a", dist.Normal(x.mean(-1), 0.5))
            pyro.sample("b", dist.Normal(x.mean(-1), 0.5))

    d = elbo_decomposition(model, guide, x, num_samples=4)
    assert d.kl_method == {"a": "analytic", "b": "monte-carlo"}
    torch.testing.assert_close(d.kl, d.kl_per_site["a"] + d.kl_per_site["b"])


def test_mismatch_raises(linear_gaussian):
    model, x = linear_gaussian
    with pytest.raises(ValueError, match="no guide site"):
        elbo_decomposition(model, lambda x, idx=None: None, x)
