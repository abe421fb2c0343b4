"""Evaluation and the multi-sample bounds share one log-weight engine: identities."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.elbo import IWAE, iter_importance_weights
from pyro_lvm.evaluate import elbo_decomposition, log_importance_weights, log_likelihood
from tests.evaluate.conftest import MeanFieldGuide


def _renamed(model):
    """The model and exact guide with the data plate named "rows" and the observation split
    into an inner plate of pixels (dim -2 rows, dim -1 pixels)."""

    def m(x, idx=None):
        with pyro.plate("rows", x.shape[0], dim=-2):
            z = pyro.sample("z", model.prior().expand([x.shape[0], 1]))
            mean = (z @ model.weight.T + model.bias).squeeze(-2)
            with pyro.plate("pixels", x.shape[-1], dim=-1):
                pyro.sample("x", dist.Normal(mean, model.noise_scale), obs=x)

    def g(x, idx=None):
        with pyro.plate("rows", x.shape[0], dim=-2):
            post = model.posterior(x)
            q = dist.MultivariateNormal(
                post.loc.unsqueeze(-2), scale_tril=post.scale_tril.unsqueeze(-3)
            )
            pyro.sample("z", q)

    return m, g


def test_any_plate_name_and_inner_plates_give_the_exact_evidence(linear_gaussian):
    """No plate name is special: "rows" with an inner "pixels" plate, exact guide, any K."""
    model, x = linear_gaussian
    m, g = _renamed(model)
    est = log_likelihood(m, g, x, num_samples=7, sample_chunk=3, data_chunk=10)
    torch.testing.assert_close(est, model.log_evidence(x), rtol=1e-10, atol=1e-10)


def test_given_max_plate_nesting_equals_the_guess(linear_gaussian):
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.5)  # weights that vary: a swap of draws shows
    pyro.set_rng_seed(3)
    guessed = log_importance_weights(model, guide, x, 5)
    pyro.set_rng_seed(3)
    given = log_importance_weights(model, guide, x, 5, max_plate_nesting=1)
    torch.testing.assert_close(guessed, given, rtol=0, atol=0)


def test_evaluation_weights_are_the_bounds_weights(linear_gaussian):
    """Under one seed, the IWAE loss is minus the sum of the per-datapoint logmeanexp of the
    weights that evaluation reads from the engine. The guide is not the posterior, so the
    weights differ across particles and the logmeanexp is strictly above their mean: an IWAE
    that averaged log-weights (the ELBO) would be off by that Jensen gap."""
    model, x = linear_gaussian
    guide = MeanFieldGuide(model, inflate=1.5)
    pyro.set_rng_seed(5)
    ((rows, weights),) = list(iter_importance_weights(model, guide, x, 6))
    log_w = weights.per_row(x.shape[0])
    pyro.set_rng_seed(5)
    loss = IWAE(6).loss(model, guide, x)
    bound = log_w.logsumexp(0) - torch.log(torch.tensor(6.0))
    gap = float((bound - log_w.mean(0)).sum())
    assert gap > 1.0  # 10.1 nats over 24 points, against a tolerance of 1.4e-10 below
    assert loss == pytest.approx(-bound.sum().item(), rel=1e-12)
    assert rows == slice(0, x.shape[0])


def test_decomposition_with_a_renamed_plate(linear_gaussian):
    model, x = linear_gaussian
    m, g = _renamed(model)
    dec = elbo_decomposition(m, g, x, num_samples=4)
    assert dec.elbo.shape == (x.shape[0],)
    torch.testing.assert_close(dec.elbo, dec.reconstruction - dec.kl)
