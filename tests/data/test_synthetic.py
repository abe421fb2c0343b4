"""Synthetic generators: exact reproducibility, untouched global RNG, and moments.

Statistical checks use z = 4.5 standard errors per comparison (two-sided false-alarm rate
6.8e-6 each); with fewer than 30 comparisons per test the family-wise rate is below 2e-4.
"""

from __future__ import annotations

import pytest
import torch

from pyro_lvm.data import sample_gaussian_mixture, sample_linear_gaussian
from pyro_lvm.models import LinearGaussian

Z = 4.5
WEIGHTS = torch.tensor([0.2, 0.5, 0.3])
LOCS = torch.tensor([[-3.0, 0.0], [0.0, 2.0], [4.0, -1.0]])
SCALES = torch.tensor([[0.5, 1.0], [1.5, 0.3], [1.0, 2.0]])


def assert_mean_and_variance(sample: torch.Tensor, mean: torch.Tensor, var: torch.Tensor):
    """Per column of a Gaussian sample: |mean error| <= Z SE and |var error| <= Z SE."""
    n = sample.shape[0]
    assert ((sample.mean(0) - mean).abs() <= Z * (var / n).sqrt()).all()
    # Var of the unbiased sample variance of a Gaussian: 2 sigma^4 / (n - 1)
    assert ((sample.var(0) - var).abs() <= Z * var * (2 / (n - 1)) ** 0.5).all()


def test_mixture_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    x1, z1 = sample_gaussian_mixture(50, WEIGHTS, LOCS, SCALES, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    x2, z2 = sample_gaussian_mixture(50, WEIGHTS, LOCS, SCALES, seed=7)
    assert torch.equal(x1, x2) and torch.equal(z1, z2)
    x3, _ = sample_gaussian_mixture(50, WEIGHTS, LOCS, SCALES, seed=8)
    assert not torch.equal(x1, x3)
    assert x1.shape == (50, 2) and x1.dtype == torch.float64 and z1.dtype == torch.long
    torch.manual_seed(3)
    x4, _ = sample_gaussian_mixture(50, WEIGHTS, LOCS, SCALES)
    torch.manual_seed(3)
    assert torch.equal(x4, sample_gaussian_mixture(50, WEIGHTS, LOCS, SCALES)[0])


def test_mixture_scales_broadcast_and_weights_normalize():
    full = sample_gaussian_mixture(20, WEIGHTS, LOCS, torch.full((3, 2), 0.7), seed=1)
    for scales in (0.7, torch.full((3, 1), 0.7), torch.full((2,), 0.7)):
        got = sample_gaussian_mixture(20, WEIGHTS, LOCS, scales, seed=1)
        assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
    got = sample_gaussian_mixture(20, 10 * WEIGHTS, LOCS, 0.7, seed=1)
    assert torch.equal(got[1], full[1])


def test_mixture_moments():
    n = 20000
    x, z = sample_gaussian_mixture(n, WEIGHTS, LOCS, SCALES, seed=0)
    freq = torch.bincount(z, minlength=3).double() / n
    assert ((freq - WEIGHTS).abs() <= Z * (WEIGHTS * (1 - WEIGHTS) / n).sqrt()).all()
    for k in range(3):
        assert_mean_and_variance(x[z == k], LOCS[k], SCALES[k] ** 2)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, WEIGHTS, LOCS, SCALES), "n must be a positive integer"),
        ((5, WEIGHTS[:2], LOCS, SCALES), r"weights shape \(C,\)"),
        ((5, WEIGHTS, LOCS[0], SCALES), r"locs must have shape \(C, D\)"),
        ((5, WEIGHTS, LOCS, SCALES[:2]), "do not broadcast"),
        ((5, torch.tensor([0.5, -0.1, 0.6]), LOCS, SCALES), "non-negative"),
        ((5, torch.zeros(3), LOCS, SCALES), "positive sum"),
        ((5, WEIGHTS, LOCS, 0.0), "scales must be positive"),
    ],
)
def test_mixture_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sample_gaussian_mixture(*args)
    with pytest.raises(ValueError, match="seed"):
        sample_gaussian_mixture(5, WEIGHTS, LOCS, SCALES, seed=-1)


def make_model(**kwargs) -> LinearGaussian:
    weight = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    return LinearGaussian(
        3, 2, noise_scale=0.5, weight=weight, bias=torch.tensor([1.0, -2.0, 0.5]), **kwargs
    )


def test_linear_gaussian_is_reproducible_and_leaves_global_rng_alone():
    model = make_model()
    state = torch.get_rng_state()
    x1, z1 = sample_linear_gaussian(model, 40, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    x2, z2 = sample_linear_gaussian(model, 40, seed=5)
    assert torch.equal(x1, x2) and torch.equal(z1, z2)
    assert not torch.equal(x1, sample_linear_gaussian(model, 40, seed=6)[0])
    assert x1.shape == (40, 3) and z1.shape == (40, 2) and not x1.requires_grad


@pytest.mark.parametrize("learn_noise", [False, True])
def test_linear_gaussian_moments(learn_noise):
    model = make_model(learn_noise=learn_noise)
    n = 20000
    x, z = sample_linear_gaussian(model, n, seed=0)
    assert_mean_and_variance(z, torch.zeros(2), torch.ones(2))
    noise = x - z @ model.weight.detach().T - model.bias.detach()
    assert_mean_and_variance(noise, torch.zeros(3), torch.full((3,), 0.25))
    # marginal covariance W W^T + sigma^2 I; Var(S_ij) ~ (S_ii S_jj + S_ij^2) / n
    cov = model.marginal().covariance_matrix.detach()
    se = ((cov.diagonal()[:, None] * cov.diagonal()[None, :] + cov**2) / n).sqrt()
    assert ((torch.cov(x.T) - cov).abs() <= Z * se).all()


def test_linear_gaussian_bad_input():
    with pytest.raises(ValueError, match="LinearGaussian"):
        sample_linear_gaussian(object(), 5)
    with pytest.raises(ValueError, match="n must be"):
        sample_linear_gaussian(make_model(), 2.5)
