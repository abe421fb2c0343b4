"""Closed-form moments of the Gaussian testbed: quadrature, exact identities, Monte Carlo."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from pyro_lvm.variance import exact_moments, sample_gradients
from pyro_lvm.variance import testbed_rows as make_testbed_rows

CASES = [
    (f, k, e, p)
    for f, ks in (("square", (0.0, 3.0)), ("exp", (0.5, 3.0)), ("cos", (1.0, 3.0)))
    for k in ks
    for e in ("score-function", "pathwise")
    for p in ("mu", "sigma")
]
MU, SIGMA = 0.7, 1.3


def _estimator(f, k, e, p, eps):
    x = MU + SIGMA * eps
    cost = {"square": (x - k) ** 2, "exp": np.exp(-k * x**2), "cos": np.cos(k * x)}[f]
    dcost = {"square": 2 * (x - k), "exp": -2 * k * x * np.exp(-k * x**2)}.get(f)
    dcost = -k * np.sin(k * x) if f == "cos" else dcost
    if e == "score-function":
        return cost * (eps / SIGMA if p == "mu" else (eps**2 - 1) / SIGMA)
    return dcost if p == "mu" else dcost * eps


@pytest.mark.parametrize("f,k,e,p", CASES)
def test_closed_form_matches_quadrature(f, k, e, p):
    # adaptive quadrature of E[g] and E[g^2] against the N(0, 1) density
    phi = 1 / math.sqrt(2 * math.pi)

    def moment(power):
        integrand = lambda t: _estimator(f, k, e, p, t) ** power * phi * math.exp(-t * t / 2)  # noqa: E731
        return quad(
            integrand, -40, 40, points=[(0 - MU) / SIGMA], limit=500, epsabs=1e-13, epsrel=1e-12
        )[0]

    mean = moment(1)
    var = moment(2) - mean**2
    exact = exact_moments(f, k, MU, SIGMA, e, p)
    assert exact.mean == pytest.approx(mean, rel=1e-9, abs=1e-12)
    assert exact.variance == pytest.approx(var, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k", [0.3, 2.0])
def test_means_are_the_textbook_derivatives(k):
    # d/dmu and d/dsigma of E cos(kx) = cos(k mu) e^{-k^2 s^2 / 2} and of
    # E exp(-k x^2) = (1 + 2 k s^2)^{-1/2} exp(-k mu^2 / (1 + 2 k s^2)), by autograd.
    mu = torch.tensor(MU, requires_grad=True)
    s = torch.tensor(SIGMA, requires_grad=True)
    closed = {
        "cos": torch.cos(k * mu) * torch.exp(-(k**2) * s**2 / 2),
        "exp": (1 + 2 * k * s**2) ** -0.5 * torch.exp(-k * mu**2 / (1 + 2 * k * s**2)),
        "square": (mu - k) ** 2 + s**2,
    }
    for f, value in closed.items():
        d_mu, d_s = torch.autograd.grad(value, (mu, s))
        for e in ("score-function", "pathwise"):
            assert exact_moments(f, k, MU, SIGMA, e, "mu").mean == pytest.approx(float(d_mu))
            assert exact_moments(f, k, MU, SIGMA, e, "sigma").mean == pytest.approx(float(d_s))


def test_square_pathwise_identities():
    # f' = 2(x - k): Var = 4 sigma^2 for mu; Var[2 (a + s eps) eps] = 4 a^2 + 8 s^2 for sigma.
    a = MU - 2.0
    assert exact_moments("square", 2.0, MU, SIGMA, "pathwise", "mu").variance == pytest.approx(
        4 * SIGMA**2
    )
    v = exact_moments("square", 2.0, MU, SIGMA, "pathwise", "sigma").variance
    assert v == pytest.approx(4 * a**2 + 8 * SIGMA**2)


@pytest.mark.parametrize("f,k", [("square", 3.0), ("exp", 1.0), ("cos", 3.0)])
def test_sampled_variance_within_standard_error(f, k):
    # z = 4.5 standard errors of the sample variance (two-sided false alarm ~7e-6 per check).
    n = 20_000
    for e in ("score-function", "pathwise"):
        draws = sample_gradients(f, k, MU, SIGMA, e, n)
        for p in ("mu", "sigma"):
            exact = exact_moments(f, k, MU, SIGMA, e, p)
            rel = float(draws[p].var()) / exact.variance - 1
            assert abs(rel) < 4.5 * exact.variance_rel_se(n), (f, k, e, p, rel)
            se_mean = math.sqrt(exact.variance / n)
            assert abs(float(draws[p].mean()) - exact.mean) < 4.5 * se_mean


def test_default_rows_and_known_ordering():
    rows = make_testbed_rows(num_draws=2000)
    keys = {
        "function",
        "k",
        "mu",
        "sigma",
        "estimator",
        "parameter",
        "variance",
        "exact_variance",
        "num_draws",
    }
    assert all(keys <= set(r) for r in rows)
    assert {r["function"] for r in rows} == {"square", "exp", "cos"}

    def exact(f, k, e, p):
        return next(
            r["exact_variance"]
            for r in rows
            if (r["function"], r["k"], r["estimator"], r["parameter"]) == (f, k, e, p)
        )

    for k in {r["k"] for r in rows if r["function"] == "square"}:
        assert exact("square", k, "pathwise", "mu") < exact("square", k, "score-function", "mu")
    assert exact("cos", 10.0, "score-function", "mu") < exact("cos", 10.0, "pathwise", "mu")


def test_bad_input():
    with pytest.raises(ValueError, match="sigma must be positive"):
        exact_moments("cos", 1.0, 0.0, -1.0, "pathwise", "mu")
    with pytest.raises(ValueError, match="unknown cost function"):
        exact_moments("tan", 1.0, 0.0, 1.0, "pathwise", "mu")
    with pytest.raises(ValueError, match="unknown estimator"):
        sample_gradients("cos", 1.0, 0.0, 1.0, "reinforce", 10)
