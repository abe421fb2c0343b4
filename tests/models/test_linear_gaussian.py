"""LinearGaussian: exact evidence and posterior against brute-force identities."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.models import LinearGaussian


@pytest.fixture
def model():
    torch.manual_seed(1)
    return LinearGaussian(4, 2, noise_scale=0.7, bias=torch.randn(4))


def test_bayes_rule_holds_exactly(model):
    """log p(z) + log p(x|z) - log p(z|x) = log p(x) for every z."""
    x = model.sample(20)
    z = torch.randn(7, 20, 2)
    post = model.posterior(x)
    joint = model.prior().log_prob(z) + model.likelihood(z).log_prob(x)
    torch.testing.assert_close(joint - post.log_prob(z), model.log_evidence(x).expand(7, 20))


def test_evidence_matches_monte_carlo_of_the_prior(model):
    x = model.sample(3)
    z = model.prior().sample((200_000,)).unsqueeze(1)
    log_w = model.likelihood(z).log_prob(x)
    mc = log_w.logsumexp(0) - torch.log(torch.tensor(200_000.0))
    # relative SE of the mean weight, then delta method on the log.
    w = (log_w - log_w.max(0).values).exp()
    se = (w.std(0) / w.mean(0)) / 200_000**0.5
    assert ((mc - model.log_evidence(x)).abs() < 4.5 * se + 1e-9).all()


def test_trace_elbo_with_exact_posterior_guide_equals_evidence(model):
    x = model.sample(10)

    def guide(x, idx=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", model.posterior(x))

    loss = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    torch.testing.assert_close(-loss.loss(model, guide, x), model.log_evidence(x).sum().item())


def test_subsampled_plate_scales_the_likelihood(model):
    model.num_data = 100
    x = model.sample(10)
    tr = pyro.poutine.trace(model).get_trace(x, torch.arange(10))
    tr.compute_log_prob()
    assert tr.nodes["x"]["scale"] == pytest.approx(10.0)


def test_idx_without_num_data_is_an_error(model):
    with pytest.raises(ValueError, match="num_data"):
        model(model.sample(3), torch.arange(3))


@pytest.mark.parametrize("kwargs", [dict(x_dim=0, z_dim=1), dict(x_dim=2, z_dim=1, noise_scale=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LinearGaussian(**kwargs)


def test_learned_noise_is_a_parameter():
    model = LinearGaussian(3, 1, learn_noise=True)
    names = {name for name, _ in model.named_parameters()}
    assert "noise_scale_unconstrained" in names
