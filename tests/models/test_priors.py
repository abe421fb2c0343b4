"""Priors: contract per prior, closed-form log-densities of the mixture and the VampPrior."""

import math

import pyro
import pytest
import torch

from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import VAE
from pyro_lvm.models.priors import MixtureOfGaussiansPrior, StandardNormalPrior, VampPrior

X_DIM, Z_DIM = 5, 2


def _make(name):
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, hidden=(8,))
    if name == "standard":
        prior = StandardNormalPrior(Z_DIM)
    elif name == "mog":
        prior = MixtureOfGaussiansPrior(Z_DIM, num_components=3)
    else:
        prior = VampPrior(guide.posterior, X_DIM, num_pseudo=4)
    return prior, VAE(X_DIM, Z_DIM, hidden=(8,), prior=prior, guide=guide)


PRIORS = ["standard", "mog", "vamp"]


@pytest.mark.parametrize("name", PRIORS)
def test_contract(name):
    prior, vae = _make(name)
    p = prior()
    assert p.batch_shape == () and p.event_shape == (Z_DIM,)
    assert p.log_prob(torch.zeros(7, Z_DIM)).shape == (7,)
    assert vae.sample(3).shape == (3, X_DIM)
    x = torch.bernoulli(torch.full((6, X_DIM), 0.5))
    elbo = pyro.infer.Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(vae, vae.guide, x).backward()
    for pname, param in vae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname
    clone = _make(name)[0]
    clone.load_state_dict(prior.state_dict())
    z = torch.randn(4, Z_DIM)
    if name == "vamp":  # the clone references its own (different) encoder
        clone._posterior = vae.guide.posterior
    torch.testing.assert_close(clone().log_prob(z), prior().log_prob(z))
    assert type(prior).__name__ in repr(prior)


def test_mixture_log_prob_is_manual_logsumexp():
    prior = MixtureOfGaussiansPrior(Z_DIM, num_components=3)
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([0.3, -1.0, 0.5]))
        prior.raw_scales.add_(torch.randn(3, Z_DIM))
    z = torch.randn(10, Z_DIM)
    log_w = torch.log_softmax(prior.logits, 0)
    scales = torch.nn.functional.softplus(prior.raw_scales) + prior.min_scale
    comp = (
        -0.5 * ((z[:, None] - prior.locs) / scales).pow(2)
        - scales.log()
        - 0.5 * math.log(2 * math.pi)
    ).sum(-1)
    torch.testing.assert_close(prior().log_prob(z), torch.logsumexp(log_w + comp, -1))


def test_mixture_initial_scales_are_one():
    prior = MixtureOfGaussiansPrior(Z_DIM, num_components=2)
    scales = prior().component_distribution.base_dist.scale
    torch.testing.assert_close(scales, torch.ones(2, Z_DIM))


def test_vamp_prior_is_mixture_of_encoder_posteriors():
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, hidden=(8,))
    init = torch.rand(4, X_DIM)
    prior = VampPrior(guide.posterior, X_DIM, init=init)
    z = torch.randn(9, Z_DIM)
    q = guide.posterior(init)  # batch (4,)
    manual = torch.logsumexp(q.log_prob(z[:, None]), -1) - math.log(4)
    torch.testing.assert_close(prior().log_prob(z), manual)
    # the prior owns only its pseudo-inputs; the encoder stays the guide's
    assert list(dict(prior.named_parameters())) == ["pseudo_inputs"]


def test_bad_inputs_raise():
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, hidden=(8,))
    with pytest.raises(ValueError, match="num_components"):
        MixtureOfGaussiansPrior(Z_DIM, num_components=0)
    with pytest.raises(ValueError, match="guide.posterior"):
        VampPrior(guide, X_DIM)
    with pytest.raises(ValueError, match="shape"):
        VampPrior(guide.posterior, X_DIM, init=torch.zeros(3, X_DIM + 1))
    with pytest.raises(ValueError, match="batch shape"):
        VampPrior(lambda u: guide.posterior(u[0]), X_DIM, num_pseudo=3)()


def test_vamp_prior_scores_diagonal_encoders_fast_and_others_as_a_mixture():
    """A diagonal-Gaussian encoder gives the matmul-scored mixture, equal to MixtureSameFamily;
    any other posterior (here a full-covariance Gaussian) falls back to MixtureSameFamily."""
    import pyro.distributions as dist

    from pyro_lvm.distributions import DiagonalNormalMixture

    weight = torch.randn(X_DIM, Z_DIM)

    def diagonal(u):
        return dist.Normal(u @ weight, torch.nn.functional.softplus(u @ weight) + 0.1).to_event(1)

    def full(u):
        return dist.MultivariateNormal(u @ weight, torch.eye(Z_DIM).expand(u.shape[0], -1, -1))

    z = torch.randn(6, Z_DIM)
    prior = VampPrior(diagonal, X_DIM, num_pseudo=4)
    fast = prior()
    assert isinstance(fast, DiagonalNormalMixture)
    reference = dist.MixtureSameFamily(
        dist.Categorical(logits=torch.zeros(4)), diagonal(prior.pseudo_inputs)
    )
    torch.testing.assert_close(fast.log_prob(z), reference.log_prob(z))
    slow = VampPrior(full, X_DIM, num_pseudo=4)()
    assert isinstance(slow, dist.MixtureSameFamily) and slow.log_prob(z).shape == (6,)


def test_vamp_prior_clips_pseudo_inputs_and_still_moves_those_at_the_bounds():
    guide = AmortizedGaussianGuide(X_DIM, Z_DIM, hidden=(8,))
    init = torch.bernoulli(torch.full((4, X_DIM), 0.5), generator=torch.Generator().manual_seed(0))
    prior = VampPrior(guide.posterior, X_DIM, init=init, pseudo_input_range=(0.0, 1.0))
    z = torch.randn(9, Z_DIM)
    prior().log_prob(z).sum().backward()
    # training images are exactly 0 or 1: Hardtanh would pass no gradient there, the clamp does
    assert (prior.pseudo_inputs.grad != 0).all()
    with torch.no_grad():
        prior.pseudo_inputs[0, 0] = -3.0
        prior.pseudo_inputs[1, 1] = 7.0
    u = prior.inputs
    assert u[0, 0] == 0.0 and u[1, 1] == 1.0 and torch.equal(u[2:], prior.pseudo_inputs[2:])
    manual = torch.logsumexp(guide.posterior(u).log_prob(z[:, None]), -1) - math.log(4)
    torch.testing.assert_close(prior().log_prob(z), manual)
    with pytest.raises(ValueError, match="outside pseudo_input_range"):
        VampPrior(guide.posterior, X_DIM, init=init + 0.5, pseudo_input_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="low < high"):
        VampPrior(guide.posterior, X_DIM, init=init, pseudo_input_range=(1.0, 0.0))
    unclipped = VampPrior(guide.posterior, X_DIM, init=init)
    assert unclipped.inputs is unclipped.pseudo_inputs
