"""Importance-sampled log-likelihood: exact identities first, then statistical checks.

Statistical tolerances are Z = 4.5 standard errors (two-sided false-alarm rate ~7e-6 each).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.evaluate import elbo_estimate, log_importance_weights, log_likelihood
from pyro_lvm.plates import data_plate
from tests.evaluate.conftest import ExactPosteriorGuide, MeanFieldGuide, closed_form_elbo

Z = 4.5


# ----- exact identities ---------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 7, 40])
@pytest.mark.parametrize("sample_chunk,data_chunk", [(None, None), (3, 5), (100, 1)])
def test_exact_posterior_guide_gives_exact_evidence(
    linear_gaussian, num_samples, sample_chunk, data_chunk
):
    """With q = p(z|x) every weight p(x,z)/q(z|x) equals p(x): zero variance for any K."""
    model, x = linear_gaussian
    est = log_likelihood(
        model, ExactPosteriorGuide(model), x, num_samples, sample_chunk, data_chunk
    )
    assert est.shape == (x.shape[0],)
    torch.testing.assert_close(est, model.log_evidence(x).detach())


@pytest.mark.parametrize("num_samples", [1, 9])
def test_exact_posterior_guide_on_mixture(mixture, num_samples):
    """Same identity for a discrete latent: GaussianMixture with q = responsibilities."""
    model, x = mixture
    est = log_likelihood(model, ExactPosteriorGuide(model), x, num_samples, sample_chunk=4)
    torch.testing.assert_close(est, model.log_evidence(x).detach())


def test_elbo_identity_closed_form(linear_gaussian):
    """log p(x) = ELBO + KL(q || p(z|x)) exactly, for a mean-field and a full-covariance q."""
    model, x = linear_gaussian
    q_mf = MeanFieldGuide(model, inflate=1.3).mvn(x)
    post = model.posterior(x)
    tril = torch.tensor([[0.6, 0.0], [-0.3, 0.4]]).expand(x.shape[0], 2, 2)
    q_full = dist.MultivariateNormal(post.mean + 0.2, scale_tril=tril)
    for q in (q_mf, q_full):
        elbo, _, _ = closed_form_elbo(model, q, x)
        kl = torch.distributions.kl_divergence(q, post)
        torch.testing.assert_close(elbo + kl, model.log_evidence(x))


def test_streaming_logsumexp_matches_one_shot(linear_gaussian):
    """Same seed and chunking: the streamed estimate equals logmeanexp of all the weights."""
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.5)
    pyro.set_rng_seed(3)
    est = log_likelihood(model, guide, x, num_samples=50, sample_chunk=7, data_chunk=5)
    pyro.set_rng_seed(3)
    log_w = log_importance_weights(model, guide, x, num_samples=50, sample_chunk=7, data_chunk=5)
    torch.testing.assert_close(est, log_w.logsumexp(0) - math.log(50))
    pyro.set_rng_seed(3)
    elbo = elbo_estimate(model, guide, x, num_samples=50, sample_chunk=7, data_chunk=5)
    torch.testing.assert_close(elbo, log_w.mean(0))


# ----- statistical checks -------------------------------------------------------------


def test_acceptance_within_005_nats_every_point(linear_gaussian):
    """Mean-field guide, K = 2000: |estimate - log p(x)| < 0.05 nats for every data point."""
    model, x = linear_gaussian
    est = log_likelihood(model, MeanFieldGuide(model, inflate=1.2), x, num_samples=2000)
    err = (est - model.log_evidence(x).detach()).abs()
    assert err.max() < 0.05, err


def test_k1_mean_is_elbo_and_bias_shrinks_with_k(linear_gaussian):
    """E[log w] = closed-form ELBO within Z·SE, and the gap log p(x) - L_K falls with K."""
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.6)
    exact = model.log_evidence(x).detach()
    elbo, _, _ = closed_form_elbo(model, guide.mvn(x), x)
    reps = 200
    log_w = log_importance_weights(model, guide, x, num_samples=reps)
    diff = log_w - elbo.detach()
    assert diff.mean().abs() < Z * diff.std() / diff.numel() ** 0.5

    gaps = {}
    for k in (1, 8, 64):
        log_w = log_importance_weights(model, guide, x, num_samples=k * reps)
        est = log_w.reshape(reps, k, -1).logsumexp(1) - math.log(k)  # reps iid L_K draws
        gap = exact - est
        gaps[k] = (gap.mean(), gap.std() / gap.numel() ** 0.5)
    assert gaps[1][0] > Z * gaps[1][1]  # a strictly loose bound at K = 1
    for small, large in ((1, 8), (8, 64)):
        (g1, s1), (g2, s2) = gaps[small], gaps[large]
        assert g1 - g2 > Z * (s1**2 + s2**2) ** 0.5, gaps
    assert gaps[64][0] > -Z * gaps[64][1]  # still a lower bound in expectation


def test_data_and_sample_chunking_agree(linear_gaussian):
    """Chunked and unchunked estimates agree within Z·SE.

    Not bitwise: chunking changes the shape of each ``sample`` call, so the same RNG stream
    is laid out over different (particle, datapoint) pairs; the estimates are two
    independent draws of the same estimator. (Identical chunking is exact, see above.)
    """
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.5)
    k = 400
    a = log_importance_weights(model, guide, x, k)
    b = log_importance_weights(model, guide, x, k, sample_chunk=30, data_chunk=7)
    # delta-method SE of log mean w per point: sd(w) / (mean(w) sqrt(K))
    se2 = sum((lw.exp().var(0) / lw.exp().mean(0) ** 2 / k) for lw in (a, b))
    diff = (a.logsumexp(0) - b.logsumexp(0)) / se2.sqrt()
    assert diff.abs().max() < Z, diff


# ----- errors -------------------------------------------------------------------------


def test_guide_site_missing_in_model(linear_gaussian):
    model, x = linear_gaussian
    base = MeanFieldGuide(model)

    def guide(x, idx=None):
        with data_plate(x, idx):
            pyro.sample("z", base.distribution(x))
            pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"guide sample sites \['w'\]"):
        log_likelihood(model, guide, x, 5)


def test_model_latent_without_guide_site(linear_gaussian):
    model, x = linear_gaussian

    def empty_guide(x, idx=None):
        pass

    with pytest.raises(ValueError, match=r"unobserved model sites \['z'\] have no guide site"):
        log_likelihood(model, empty_guide, x, 5)


def test_site_outside_data_plate(linear_gaussian):
    model, x = linear_gaussian
    base = MeanFieldGuide(model)

    def global_model(x, idx=None):
        pyro.sample("g", dist.Normal(0.0, 1.0))
        model(x, idx)

    def global_guide(x, idx=None):
        pyro.sample("g", dist.Normal(0.0, 1.0))
        base(x, idx)

    with pytest.raises(ValueError, match=r"\['g'\] are outside the data plate"):
        log_likelihood(global_model, global_guide, x, 5)


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"sample_chunk": 0}, {"data_chunk": -1}])
def test_bad_sizes(linear_gaussian, kwargs):
    model, x = linear_gaussian
    with pytest.raises(ValueError, match="positive integer"):
        log_likelihood(model, MeanFieldGuide(model), x, **kwargs)
