"""Image-completion helpers: ELBO of fixed Bernoulli q against exact enumeration, encoders."""

import pytest
import torch

from pyro_lvm.completion import (
    AmortizedBernoulliGuide,
    bottom_half_observed,
    complete,
    downsample_to_digits,
    fit_regression_encoder,
    fixed_bernoulli_elbo,
)
from pyro_lvm.models import BernoulliMixture, CompletionModel
from tests.models.test_bernoulli_mixture import _all_binary, _tiny_mixture


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CompletionModel(_tiny_mixture(), bottom_half_observed(2, 3))


def _exact_elbo(model, probs, x_obs):
    """Σ_z q(z) [log p(z, x_o) − log q(z)] by enumerating all 2^3 latent images."""
    zs = _all_binary(model.latent_dim)  # (8, 3)
    q = torch.distributions.Bernoulli(probs=probs).log_prob(zs[:, None]).sum(-1)  # (8, B)
    full = x_obs.new_zeros(zs.shape[0], x_obs.shape[0], 6)
    full[..., ~model.observed] = zs[:, None]
    full[..., model.observed] = x_obs
    log_joint = model.mixture.log_prob(full)
    return (q.exp() * (log_joint - q)).sum(0)


def test_mask_is_the_bottom_half():
    assert bottom_half_observed(2, 3).tolist() == [False] * 3 + [True] * 3
    assert bottom_half_observed().sum() == 392
    with pytest.raises(ValueError, match="height"):
        bottom_half_observed(1, 5)


def test_fixed_bernoulli_elbo_matches_enumeration_and_bounds_the_evidence(model):
    x_obs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    probs = torch.tensor([[0.2, 0.7, 0.5], [0.9, 0.1, 0.4]])
    elbo, se = fixed_bernoulli_elbo(model, probs, x_obs, num_samples=4000)
    exact = _exact_elbo(model, probs, x_obs)
    assert ((elbo - exact).abs() < 4.5 * se).all()
    assert (exact <= model.log_evidence(x_obs) + 1e-12).all()
    # with q = the exact posterior marginals of a one-component mixture the bound is tight
    one = BernoulliMixture(1, 6)
    one.probs.copy_(torch.rand(1, 6) * 0.8 + 0.1)
    exact_model = CompletionModel(one, model.observed)
    q_star = exact_model.posterior_marginals(x_obs)
    elbo, _ = fixed_bernoulli_elbo(exact_model, q_star, x_obs, num_samples=50)
    torch.testing.assert_close(elbo, exact_model.log_evidence(x_obs))


def test_point_mass_q_is_allowed_and_bad_probs_are_not(model):
    x_obs = torch.tensor([[1.0, 0.0, 1.0]])
    elbo, se = fixed_bernoulli_elbo(model, 1.0, x_obs, num_samples=10)
    torch.testing.assert_close(elbo, _exact_elbo(model, torch.ones(1, 3), x_obs))
    assert se.item() < 1e-12  # a point mass: every weight is the same
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fixed_bernoulli_elbo(model, 1.5, x_obs)


def test_regression_encoder_learns_its_targets():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((64, 4), 0.5))
    targets = torch.stack([x[:, 0], 1 - x[:, 1]], -1) * 0.8 + 0.1  # a function of x
    guide = AmortizedBernoulliGuide(4, 2, hidden=(16,))
    losses = fit_regression_encoder(guide, x, targets, epochs=300, lr=1e-2, batch_size=16)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(guide.probs(x), targets, atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="targets must have shape"):
        fit_regression_encoder(guide, x, targets[:, :1])


def test_complete_and_downsample():
    model = CompletionModel(_tiny_mixture(), bottom_half_observed(2, 3))
    full = complete(model, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]]))
    assert full.tolist() == [[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]]
    x = torch.zeros(2, 784)
    x[1].view(28, 28)[4:24, 4:24] = 1.0  # the whole digit box set
    small = downsample_to_digits(x)
    assert small.shape == (2, 64) and small[0].sum() == 0 and small[1].sum() == 64
    with pytest.raises(ValueError, match="28x28"):
        downsample_to_digits(torch.zeros(1, 64))
