"""IWAE: the bound rises with K to log p(x); its gradient estimators have the right means.

Statistical tests use float64 and a tolerance of z = 4.5 standard errors (two-sided false
alarm rate about 7e-6 per comparison). Rows of the data are replicates of one data point with
their own (equal) guide parameters, so the gradient for ``loc[i]`` is the i-th independent
draw of the per-datapoint gradient estimator.
"""

from __future__ import annotations

import functools
import math

import pyro
import torch

from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.models import LinearGaussian
from tests.elbo.test_multisample import (
    NOISE,
    X_DIM,
    Z_DIM,
    lg_data,
    lg_guide,
    lg_log_joint,
    lg_model,
    lg_params,
    loss_and_grad,
)

Z = 4.5
REF_DRAWS = 100_000


def guide_grads(gradient, num_rows, K, seed=0):
    """Per-row gradients of the negative bound w.r.t. loc and log σ: shape (rows, 2 * d).

    The param store holds σ unconstrained (log σ), so its gradient is d/d log σ.
    """
    init = lg_params(num_rows)
    model = functools.partial(lg_model, init=init)
    guide = functools.partial(lg_guide, init=init)
    pyro.clear_param_store()
    _, grad = loss_and_grad(
        IWAE(K, gradient=gradient, max_plate_nesting=1), model, guide, lg_data(num_rows), seed=seed
    )
    return torch.cat([grad["loc"], grad["scale"]], -1), init


def reference_grad(init, K, gradient, num_draws=REF_DRAWS, seed=123):
    """Plain-torch mean of the per-datapoint gradient estimator over many independent draws."""
    g = torch.Generator().manual_seed(seed)
    x = lg_data(1)[0]
    loc = init["loc"][0].clone().requires_grad_()
    log_scale = init["scale"][0].log().clone().requires_grad_()
    eps = torch.randn(num_draws, K, Z_DIM, generator=g)
    z = loc + log_scale.exp() * eps
    log_p = lg_log_joint(x, z, init["W"], init["b"])
    if gradient == "reparam":
        log_q = torch.distributions.Normal(loc, log_scale.exp()).log_prob(z).sum(-1)
    else:
        log_q = (
            torch.distributions.Normal(loc.detach(), log_scale.exp().detach()).log_prob(z).sum(-1)
        )
    log_w = log_p - log_q
    w = torch.softmax(log_w, -1).detach()
    if gradient == "reparam":
        per_draw = -(log_w.logsumexp(-1) - math.log(K))
    elif gradient == "stl":
        per_draw = -(w * log_w).sum(-1)
    grads = torch.autograd.grad(per_draw.sum(), [loc, log_scale])
    return torch.cat(grads) / num_draws


def test_reparam_gradient_matches_plain_torch_reference():
    K, rows = 4, 4000
    grad, init = guide_grads("reparam", rows, K)
    ref = reference_grad(init, K, "reparam")
    # SE of the difference; the reference's own SE is that of the same estimator at REF_DRAWS
    se = grad.std(0) / rows**0.5 * (1 + rows / REF_DRAWS) ** 0.5
    assert (grad.mean(0) - ref).abs().lt(Z * se).all(), (grad.mean(0), ref, se)
    assert ref.abs().gt(Z * se).any()  # non-trivial target


def test_stl_gradient_matches_its_plain_torch_reference():
    K, rows = 4, 4000
    grad, init = guide_grads("stl", rows, K)
    ref = reference_grad(init, K, "stl")
    # SE of the difference; the reference's own SE is that of the same estimator at REF_DRAWS
    se = grad.std(0) / rows**0.5 * (1 + rows / REF_DRAWS) ** 0.5
    assert (grad.mean(0) - ref).abs().lt(Z * se).all(), (grad.mean(0), ref, se)


def test_dreg_is_unbiased_for_the_iwae_gradient():
    # same draws, so the per-row difference has mean zero and a small spread
    K, rows = 4, 4000
    dreg, _ = guide_grads("dreg", rows, K)
    reparam, _ = guide_grads("reparam", rows, K)
    diff = dreg - reparam
    se = diff.std(0) / rows**0.5
    assert diff.mean(0).abs().lt(Z * se).all(), (diff.mean(0), se)
    # and DReG has the lower variance (Tucker et al. 2018), here by a wide margin
    assert (dreg.var(0) < reparam.var(0)).all()


def test_stl_is_biased_for_k_above_one():
    # Tucker et al. (2018, section 3): STL drops a term whose mean is not zero for K > 1
    K, rows = 4, 4000
    stl, _ = guide_grads("stl", rows, K)
    dreg, _ = guide_grads("dreg", rows, K)
    diff = stl - dreg
    se = diff.std(0) / rows**0.5
    assert diff.mean(0).abs().gt(Z * se).any(), (diff.mean(0), se)


def test_bound_increases_with_k_towards_log_evidence():
    lg = LinearGaussian(X_DIM, Z_DIM, noise_scale=NOISE, weight=lg_params(1)["W"])
    x0 = lg_data(1)
    log_px = lg.log_evidence(x0).item()
    rows, reps = 500, 8
    init = lg_params(rows)
    means, ses = [], []
    for K in (1, 4, 32):
        estimates = []
        for r in range(reps):
            pyro.clear_param_store()
            pyro.set_rng_seed(r)
            guide = functools.partial(lg_guide, init=init)
            estimates.append(-IWAE(K, max_plate_nesting=1).loss(lg, guide, lg_data(rows)) / rows)
        est = torch.tensor(estimates)
        means.append(est.mean().item())
        ses.append(est.std().item() / reps**0.5)
    for i in range(1, len(means)):
        assert means[i] > means[i - 1] - Z * math.hypot(ses[i], ses[i - 1])  # monotone
        assert means[i] < log_px + Z * ses[i]  # a lower bound
    assert means[-1] - means[0] > Z * math.hypot(ses[0], ses[-1])  # strictly tighter
    assert log_px - means[-1] < 0.5 * (log_px - means[0])  # closes most of the gap


def test_dreg_at_one_particle_is_stl_draw_for_draw():
    """At K = 1, w̃ = 1: DReG's path scale α + (1 - α) w̃ is 1 and the estimator is STL's."""
    from pyro_lvm.elbo import STL, RenyiBound

    init = lg_params(5)
    for dreg in (
        IWAE(1, gradient="dreg", max_plate_nesting=1),
        RenyiBound(0.5, 1, "dreg", max_plate_nesting=1),
    ):
        results = []
        for est in (dreg, STL(1, max_plate_nesting=1)):
            model = functools.partial(lg_model, init=init)
            guide = functools.partial(lg_guide, init=init)
            pyro.clear_param_store()
            results.append(loss_and_grad(est, model, guide, lg_data(5), seed=11))
        (loss_a, grad_a), (loss_b, grad_b) = results
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=0)
        assert grad_a.keys() == grad_b.keys()
        for name in grad_a:
            torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-12, atol=1e-14)
