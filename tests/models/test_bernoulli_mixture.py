"""Mixture of multivariate Bernoullis and the completion model against brute-force enumeration."""

import itertools

import pytest
import torch
from pyro import poutine

from pyro_lvm.models import BernoulliMixture, CompletionModel
from pyro_lvm.models.bernoulli_mixture import MultivariateBernoulliMixture


def _tiny_mixture(d=6, c=3):
    mix = BernoulliMixture(c, d)
    mix.weights.copy_(torch.tensor([0.5, 0.3, 0.2])[:c])
    mix.probs.copy_(torch.rand(c, d) * 0.9 + 0.05)
    return mix


def _all_binary(d):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)))


def _brute_log_prob(mix, x):
    # log Σ_c π_c Π_j Bernoulli(x_j; μ_cj), one factor at a time
    terms = []
    for c in range(mix.num_components):
        lp = torch.distributions.Bernoulli(probs=mix.probs[c]).log_prob(x).sum(-1)
        terms.append(mix.weights[c].log() + lp)
    return torch.stack(terms, -1).logsumexp(-1)


def test_log_prob_matches_enumeration():
    mix = _tiny_mixture()
    x = _all_binary(6)
    lp = mix.log_prob(x)
    assert torch.allclose(lp, _brute_log_prob(mix, x))
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    mask = torch.tensor([True, False, True, True, False, False])
    # the marginal over masked pixels equals the sum of the joint over the others
    joint = lp.exp().reshape(2, 2, 2, 2, 2, 2)
    marg = joint.sum(dim=(1, 4, 5)).reshape(-1)
    xo = _all_binary(3)
    x_full = torch.zeros(8, 6)
    x_full[:, mask] = xo
    assert torch.allclose(mix.log_prob(x_full, mask), marg.log())


def test_completion_model_is_exact():
    mix = _tiny_mixture()
    observed = torch.tensor([False, False, False, True, True, True])
    model = CompletionModel(mix, observed)
    x_obs = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    zs = _all_binary(3)
    # log p(z, x_o) from the Pyro model's trace, for every z
    log_joint = []
    for z in zs:
        cond = poutine.condition(model, data={"z": z.expand(2, 3)})
        tr = poutine.trace(cond).get_trace(x_obs)
        tr.compute_log_prob()
        log_joint.append(tr.nodes["z"]["log_prob"] + tr.nodes["x"]["log_prob"])
    log_joint = torch.stack(log_joint, -1)  # (2, 8)
    # brute force on the full mixture
    full = torch.cat([zs.expand(2, 8, 3), x_obs[:, None].expand(2, 8, 3)], -1)
    assert torch.allclose(log_joint, _brute_log_prob(mix, full))
    log_evidence = log_joint.logsumexp(-1)
    assert torch.allclose(model.log_evidence(x_obs), log_evidence)
    post = (log_joint - log_evidence[:, None]).exp()
    assert torch.allclose(model.posterior(x_obs).log_prob(zs[:, None]).T.exp(), post)
    assert torch.allclose(model.posterior_marginals(x_obs), post @ zs)
    with pytest.raises(ValueError, match="observed pixels"):
        model(torch.zeros(2, 4))


def test_sample_frequencies():
    d = MultivariateBernoulliMixture(
        torch.tensor([0.0, 1.0]), torch.tensor([[0.9, 0.1], [0.2, 0.7]])
    )
    n = 20000
    s = d.sample((n,))
    probs = d.log_prob(_all_binary(2)).exp()
    freq = torch.stack([(s == v).all(-1).double().mean() for v in _all_binary(2)])
    se = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs() < 4.5 * se)  # false alarm ~ 3e-5 per cell


def test_em_increases_likelihood_and_recovers():
    true = _tiny_mixture(d=12, c=2)
    true.weights.copy_(torch.tensor([0.6, 0.4]))
    true.probs.copy_(torch.tensor([[0.9] * 6 + [0.1] * 6, [0.1] * 6 + [0.9] * 6]))
    x = true.distribution().sample((4000,))
    mix = BernoulliMixture(2, 12).fit_em(x, num_iters=100, tol=1e-10)
    hist = torch.tensor(mix.history)
    assert bool(
        (hist[1:] - hist[:-1] >= -1e-9).all()
    )  # MAP-EM; the prior term is negligible at N = 4000
    order = mix.weights.argsort(descending=True)
    # SE of a component mean from ~2000 points is <= 0.011; z = 4.5
    assert torch.allclose(mix.probs[order], true.probs, atol=4.5 * 0.011)
    assert torch.allclose(mix.weights[order], true.weights, atol=4.5 * (0.24 / 4000) ** 0.5)
