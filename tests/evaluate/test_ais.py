"""AIS and BDMC against LinearGaussian's exact evidence; the shared HMC kernel's invariance.

Tolerances: the 0.05-nat criterion of issue #20 on the mean over data points; z = 4.5
for the kernel's moment test (false-alarm rate about 7e-6 per comparison).
"""

import pyro
import pytest
import torch

from pyro_lvm.evaluate import ais_log_likelihood, annealing_schedule, bdmc
from pyro_lvm.hmc import hmc_transition
from pyro_lvm.models import LinearGaussian
from pyro_lvm.plates import data_plate

from .conftest import ExactPosteriorGuide


@pytest.fixture
def model():
    torch.manual_seed(1)
    return LinearGaussian(4, 2, noise_scale=0.7)


def test_schedules_run_from_zero_to_one():
    for kind in ("linear", "sigmoid"):
        betas = annealing_schedule(10, kind)
        assert betas.shape == (11,) and betas[0] == 0 and betas[-1] == 1
        assert (betas.diff() > 0).all()
    with pytest.raises(ValueError, match="schedule"):
        annealing_schedule(10, "cosine")


def test_hmc_kernel_leaves_the_target_invariant():
    """Start 4000 chains at exact N(mu, diag(s^2)) draws; after 3 transitions (per-chain step
    sizes) the sample mean and variance still match, within 4.5 standard errors."""
    mu, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 2.0])

    def potential(values):
        z = values["z"]
        return (0.5 * ((z - mu) / s).pow(2).sum(-1), {"z": (z - mu) / s**2}, {})

    z = {"z": mu + s * torch.randn(4000, 2)}
    u, grad, _ = potential(z)
    eps = torch.rand(4000) * 0.6 + 0.1
    for _ in range(3):
        z, u, grad, _, prob = hmc_transition(z, u, grad, {}, potential, eps, 4)
    assert 0.3 < prob.mean() < 1
    draws = z["z"]
    assert ((draws.mean(0) - mu).abs() < 4.5 * s / 4000**0.5).all()
    var_se = s**2 * (2 / 4000) ** 0.5
    assert ((draws.var(0) - s**2).abs() < 4.5 * var_se).all()


def test_ais_from_the_exact_posterior_is_exact(model):
    """With p0 = p(z | x) every increment is log p(x): the estimate is exact for any M."""
    x = model.sample(5)
    est = ais_log_likelihood(model, x, guide=ExactPosteriorGuide(model), num_steps=3, num_chains=2)
    torch.testing.assert_close(est, model.log_evidence(x).detach())


def test_one_step_ais_is_importance_sampling_from_the_same_engine(model):
    """M = 1: no transition runs, and each chain's weight is the importance weight
    log p(x, z) - log q(z) of the guide's draw: the evaluation engine's, under one seed."""
    from pyro_lvm.evaluate import log_importance_weights

    from .conftest import MeanFieldGuide

    x, guide = model.sample(6), MeanFieldGuide(model)
    pyro.set_rng_seed(3)
    ais = ais_log_likelihood(model, x, guide=guide, num_steps=1, num_chains=4, return_result=True)
    pyro.set_rng_seed(3)
    assert torch.equal(ais.log_weights, log_importance_weights(model, guide, x, num_samples=4))


def test_ais_from_the_prior_is_within_five_hundredths_of_a_nat(model):
    x = model.sample(30)
    result = ais_log_likelihood(
        model, x, num_steps=100, num_chains=16, num_leapfrog=5, data_chunk=16,
        return_result=True,
    )  # fmt: skip
    assert result.log_weights.shape == (16, 30) and result.step_size.shape == (30,)
    error = result.log_likelihood - model.log_evidence(x).detach()
    assert abs(error.mean()) < 0.05
    assert 0.4 < result.acceptance.mean() < 0.95


def test_bdmc_sandwich_closes_as_the_path_lengthens(model):
    x_template = torch.zeros(30, 4)
    gaps = {}
    for steps in (4, 64):
        pyro.set_rng_seed(steps)
        result = bdmc(model, x_template, num_steps=steps, num_chains=8, num_leapfrog=5)
        exact = model.log_evidence(result.x).detach()
        lower, upper = (result.lower - exact).mean(), (result.upper - exact).mean()
        gaps[steps] = result.gap.mean().item()
        assert lower < 0.05 and upper > -0.05, (steps, lower, upper)
    assert gaps[64] < gaps[4] / 5 and gaps[64] < 0.1, gaps


def test_bad_input_is_named(model):
    x = model.sample(3)
    with pytest.raises(ValueError, match="step_size"):
        ais_log_likelihood(model, x, step_size=-1.0)
    with pytest.raises(ValueError, match="num_chains"):
        ais_log_likelihood(model, x, num_chains=0)

    def two_observed(x, idx=None):
        with data_plate(x):
            z = pyro.sample("z", model.prior())
            pyro.sample("x", model.likelihood(z), obs=x)
            pyro.sample("y", model.likelihood(z), obs=x)

    with pytest.raises(ValueError, match="exactly one observed site"):
        bdmc(two_observed, x, num_steps=2)


def test_cli_evaluate_method_ais(tmp_path, capsys):
    import json

    from pyro_lvm.cli.parser import main

    out = tmp_path / "run"
    assert main(["quickstart", "--out", str(out), "--epochs", "1", "--eval-samples", "5"]) == 0
    args = ["evaluate", str(out / "checkpoint.pt"), "--method", "ais", "--ais-steps", "20"]
    assert main([*args, "--ais-chains", "4", "--n", "10", "--out", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "evaluation_test.json").read_text())
    assert metrics["method"] == "ais" and metrics["ais_steps"] == 20 and metrics["num_points"] == 10
    assert metrics["ais_log_likelihood"] < 0 and 0 < metrics["ais_acceptance"] <= 1
    assert "AIS M=20" in capsys.readouterr().out
