"""GaussianMixture: enumeration gives the exact evidence; EM increases it monotonically."""

import pyro
import torch
from pyro.infer import TraceEnum_ELBO

from pyro_lvm.models import GaussianMixture


def _truth():
    return GaussianMixture(
        3,
        2,
        locs=torch.tensor([[-3.0, 0.0], [0.0, 3.0], [3.0, 0.0]]),
        scales=torch.full((3, 2), 0.5),
        weights=torch.tensor([0.2, 0.3, 0.5]),
    )


def test_enumeration_equals_exact_evidence():
    truth = _truth()
    x = truth.sample(40)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(truth, lambda x, idx=None: None, x)
    torch.testing.assert_close(-loss, truth.log_evidence(x).sum().item())


def test_evidence_by_brute_force_sum():
    truth = _truth()
    x = truth.sample(5)
    manual = torch.stack(
        [
            truth.weights[k].log()
            + torch.distributions.Normal(truth.locs[k], truth.scales[k]).log_prob(x).sum(-1)
            for k in range(3)
        ],
        -1,
    ).logsumexp(-1)
    torch.testing.assert_close(truth.log_evidence(x), manual)
    torch.testing.assert_close(truth.posterior(x).probs.sum(-1), torch.ones(5))


def test_em_is_monotone_and_recovers_the_components():
    truth = _truth()
    x = truth.sample(3000)
    pyro.set_rng_seed(3)
    fitted = GaussianMixture(3, 2)
    history = fitted.fit_em(x, num_steps=200)
    assert all(b >= a - 1e-9 for a, b in zip(history, history[1:], strict=False))
    assert history[-1] >= truth.log_evidence(x).mean().item() - 0.01
    order = fitted.locs[:, 0].argsort()
    torch.testing.assert_close(fitted.locs[order].detach(), truth.locs.detach(), atol=0.1, rtol=0)


def test_elbo_with_exact_posterior_equals_evidence():
    """EM's E-step: q = p(z|x) makes the ELBO equal log p(x)."""
    truth = _truth()
    x = truth.sample(30)
    post = truth.posterior(x)
    log_joint = truth.component_log_prob(x)
    elbo = (post.probs * (log_joint - post.logits.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(elbo, truth.log_evidence(x))
