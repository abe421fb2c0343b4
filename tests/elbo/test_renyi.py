"""Rényi-α bound: α = 0 is IWAE, α → 1 the ELBO, monotone in α; DReG unbiased (z = 4.5)."""

from __future__ import annotations

import functools

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.renyi import RenyiBound
from tests.elbo.test_multisample import (
    assert_grads_close,
    lg_data,
    lg_guide,
    lg_model,
    lg_params,
    loss_and_grad,
)

Z = 4.5


def pair(rows):
    init = lg_params(rows)
    return functools.partial(lg_model, init=init), functools.partial(lg_guide, init=init)


def data(rows):
    return lg_data(rows) + torch.linspace(-1, 1, rows).unsqueeze(-1)


@pytest.mark.parametrize("gradient", ["reparam", "stl", "dreg"])
def test_alpha_zero_equals_iwae(gradient):
    model, guide = pair(5)
    loss, grad = loss_and_grad(
        RenyiBound(0.0, 6, gradient, max_plate_nesting=1), model, guide, data(5)
    )
    ref_loss, ref = loss_and_grad(IWAE(6, gradient, max_plate_nesting=1), model, guide, data(5))
    assert torch.allclose(loss, ref_loss, rtol=1e-12)
    assert_grads_close(grad, ref)


def test_alpha_near_one_approaches_trace_elbo():
    model, guide = pair(5)
    eps = 1e-7
    loss, grad = loss_and_grad(RenyiBound(1 - eps, 4, max_plate_nesting=1), model, guide, data(5))
    ref = Trace_ELBO(num_particles=4, max_plate_nesting=1, vectorize_particles=True)
    ref_loss, ref_grad = loss_and_grad(ref, model, guide, data(5))
    # the error is O(eps * variance of log w): first order in (1 - alpha)
    assert torch.allclose(loss, ref_loss, rtol=1e-5)
    assert_grads_close(grad, ref_grad, atol=1e-5, rtol=1e-5)


def test_estimate_decreases_in_alpha_for_fixed_draws():
    # (1 / (1 - α)) log mean w^(1-α) is the log of a power mean of order 1 - α
    model, guide = pair(4)
    bounds = []
    for alpha in (0.0, 0.3, 0.7, 0.999, 2.0, 5.0):
        pyro.set_rng_seed(0)
        bounds.append(-RenyiBound(alpha, 8, max_plate_nesting=1).loss(model, guide, data(4)))
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False)), bounds


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_dreg_is_unbiased_for_the_renyi_gradient(alpha):
    rows, K = 4000, 4
    init = lg_params(rows)
    model = functools.partial(lg_model, init=init)
    guide = functools.partial(lg_guide, init=init)
    grads = {}
    for gradient in ("reparam", "dreg"):
        pyro.clear_param_store()
        elbo = RenyiBound(alpha, K, gradient, max_plate_nesting=1)
        _, grad = loss_and_grad(elbo, model, guide, lg_data(rows))
        grads[gradient] = torch.cat([grad["loc"], grad["scale"]], -1)
    diff = grads["dreg"] - grads["reparam"]
    se = diff.std(0) / rows**0.5
    assert diff.mean(0).abs().lt(Z * se).all(), (diff.mean(0), se)
    assert grads["reparam"].mean(0).abs().gt(Z * se).any()  # a non-trivial target
