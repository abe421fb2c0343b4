"""VIMCO and IWAE (leave-one-out baseline) on DiscreteVAE: the encoder gradient is unbiased for
the exact IWAE-bound gradient, computed by enumerating every tuple of K particles of L one-hot
latents (issue 21 saw VIMCO train a collapsed discrete VAE; this rules out a biased gradient at
that model's shape: several categorical latents in one event)."""

import itertools
import math

import pyro
import pytest
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.models import DiscreteVAE

Z = 4.5  # per coordinate; about 130 coordinates, family-wise false alarm about 1e-3
L, C, K = 2, 3, 3  # (C^L)^K = 729 particle tuples
R, S = 200, 40  # replicates of the data point per call, calls


@pytest.fixture(scope="module")
def setup():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pyro.clear_param_store()
        torch.manual_seed(1)
        x1 = torch.bernoulli(torch.full((1, 10), 0.4))
        vae = DiscreteVAE(
            10, num_latents=L, latent="categorical", num_categories=C, hidden=(6,), num_data=R
        )
        encoder = [p for n, p in vae.named_parameters() if n.startswith("encoder")]
        one_hot = torch.nn.functional.one_hot
        configs = torch.stack(
            [one_hot(torch.tensor(c), C) for c in itertools.product(range(C), repeat=L)]
        )
        configs = configs.double()[:, None]  # (C^L, 1, L, C)
        log_q = vae.posterior(x1).log_prob(configs)[:, 0]
        log_p = vae.prior(1, x1).log_prob(configs)[:, 0] + vae.decode(configs).log_prob(x1)[:, 0]
        tuples = torch.tensor(list(itertools.product(range(len(configs)), repeat=K)))
        weights = log_q[tuples].sum(-1).exp()  # q of each tuple of K independent particles
        bound = (weights * (torch.logsumexp((log_p - log_q)[tuples], -1) - math.log(K))).sum()
        exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-bound, encoder)])
        yield vae, encoder, x1.expand(R, 10).clone(), exact
    finally:
        torch.set_default_dtype(dtype)


@pytest.mark.parametrize("name", ["vimco", "iwae"])
def test_encoder_gradient_is_unbiased_for_the_exact_iwae_gradient(setup, name):
    vae, encoder, x, exact = setup
    estimator = make_estimator(name, K)
    draws = []
    for s in range(S):
        pyro.set_rng_seed(100 + s)
        loss = estimator.differentiable_loss(vae, vae.guide, x) / R
        draws.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, encoder)]))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / S**0.5
    random = se > 0  # weights of hidden units the ReLU switched off have no gradient at all
    assert torch.equal(mean[~random], exact[~random])
    assert ((mean - exact)[random].abs() <= Z * se[random]).all()
    assert (exact[random].abs() > Z * se[random]).any()  # a target the test can miss
