"""VIMCO on a discrete latent: unbiased for the exact IWAE gradient (by enumeration), z = 4.5."""

from __future__ import annotations

import functools

import pyro
import pytest
import torch

from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.renyi import RenyiBound
from pyro_lvm.elbo.vimco import VIMCO
from tests.elbo.test_multisample import (
    cat_exact_iwae,
    cat_guide,
    cat_model,
    cat_params,
    loss_and_grad,
)

Z = 4.5
K = 3
X0 = 0.8


def per_row_logit_grads(elbo, rows, seed=0):
    init = cat_params(rows)
    model = functools.partial(cat_model, init=init)
    guide = functools.partial(cat_guide, init=init)
    pyro.clear_param_store()
    loss, grad = loss_and_grad(elbo, model, guide, torch.full((rows,), X0), seed=seed)
    return loss, grad, init


def exact_logit_grad():
    params = {k: v.clone() for k, v in cat_params(1).items()}
    logits = params["logits"][0].clone().requires_grad_()
    params["logits"] = logits
    bound = cat_exact_iwae(torch.tensor(X0), params, K)
    return bound.detach(), torch.autograd.grad(-bound, logits)[0]


@pytest.mark.parametrize(
    "make",
    [
        lambda: VIMCO(K, max_plate_nesting=1),
        lambda: IWAE(K, max_plate_nesting=1),
        lambda: IWAE(K, score_baseline="none", max_plate_nesting=1),
        lambda: RenyiBound(0.0, K, max_plate_nesting=1),
    ],
    ids=["vimco", "iwae-loo", "iwae-no-baseline", "renyi-alpha0"],
)
def test_mean_gradient_equals_exact_iwae_gradient(make):
    rows = 4000
    loss, grad, _ = per_row_logit_grads(make(), rows)
    bound, exact = exact_logit_grad()
    g = grad["logits"]
    se = g.std(0) / rows**0.5
    assert (g.mean(0) - exact).abs().lt(Z * se).all(), (g.mean(0), exact, se)
    assert exact.abs().gt(Z * se).any()  # a non-trivial target


def test_vimco_has_lower_variance_than_plain_score_function():
    rows = 4000
    _, vimco, _ = per_row_logit_grads(VIMCO(K, max_plate_nesting=1), rows)
    _, plain, _ = per_row_logit_grads(IWAE(K, score_baseline="none", max_plate_nesting=1), rows)
    assert (vimco["logits"].var(0) < plain["logits"].var(0)).all()


def test_iwae_and_renyi_at_discrete_sites_are_vimco_under_one_seed():
    """The leave-one-out score term is the default of the whole Rényi family (α = 0: VIMCO)."""
    _, vimco, _ = per_row_logit_grads(VIMCO(K, max_plate_nesting=1), 7)
    for other in (IWAE(K, max_plate_nesting=1), RenyiBound(0.0, K, max_plate_nesting=1)):
        _, grads, _ = per_row_logit_grads(other, 7)
        for name, value in vimco.items():
            assert torch.allclose(grads[name], value, rtol=1e-10, atol=1e-12), name


def test_model_gradients_equal_iwae_under_one_seed():
    _, vimco, _ = per_row_logit_grads(VIMCO(K, max_plate_nesting=1), 7)
    _, iwae, _ = per_row_logit_grads(IWAE(K, score_baseline="none", max_plate_nesting=1), 7)
    for name in ("locs", "prior_logits"):
        assert torch.allclose(vimco[name], iwae[name], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(vimco["logits"], iwae["logits"])


def test_leave_one_out_signal_matches_definition():
    log_w = torch.tensor([[0.1, -2.0], [1.5, 0.3], [-0.7, 0.9]])
    bound = log_w.logsumexp(0) - torch.log(torch.tensor(3.0))
    signal = VIMCO(3)._learning_signal(log_w, bound)
    for k in range(3):
        others = torch.cat([log_w[:k], log_w[k + 1 :]])
        replaced = torch.cat([log_w[:k], others.mean(0, keepdim=True), log_w[k + 1 :]])
        expected = bound - (replaced.logsumexp(0) - torch.log(torch.tensor(3.0)))
        assert torch.allclose(signal[k], expected, rtol=1e-12)


def _exact_renyi_logit_grad(alpha):
    """Exact ∇ E_q[(1/(1-α)) log (1/K) Σ_k w_k^{1-α}] for one row, by enumerating C^K tuples."""
    params = cat_params(1)
    logits = params["logits"][0].clone().requires_grad_()
    log_q = torch.log_softmax(logits, -1)
    log_prior = torch.log_softmax(params["prior_logits"], -1)
    log_w = log_prior + torch.distributions.Normal(params["locs"], 1.0).log_prob(torch.tensor(X0))
    log_w = log_w - log_q
    grids = torch.cartesian_prod(*[torch.arange(3)] * K).reshape(-1, K)
    scaled = (1 - alpha) * log_w[grids]
    bound = (scaled.logsumexp(-1) - torch.log(torch.tensor(float(K)))) / (1 - alpha)
    value = (log_q[grids].sum(-1).exp() * bound).sum()
    return torch.autograd.grad(-value, logits)[0]


def test_renyi_with_leave_one_out_is_unbiased_and_as_quiet_as_vimco():
    """α = 0.5 at a discrete site: the mean gradient is the exact Rényi gradient (z = 4.5 per
    coordinate) and the leave-one-out term cuts the variance of the raw bound signal."""
    rows = 4000
    _, loo, _ = per_row_logit_grads(RenyiBound(0.5, K, max_plate_nesting=1), rows)
    _, raw, _ = per_row_logit_grads(
        RenyiBound(0.5, K, score_baseline="none", max_plate_nesting=1), rows
    )
    exact = _exact_renyi_logit_grad(0.5)
    g = loo["logits"]
    se = g.std(0) / rows**0.5
    assert (g.mean(0) - exact).abs().lt(Z * se).all(), (g.mean(0), exact, se)
    assert exact.abs().gt(Z * se).any()
    assert (loo["logits"].var(0) < raw["logits"].var(0)).all()
