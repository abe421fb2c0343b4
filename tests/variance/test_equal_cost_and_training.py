"""The bernoulli scenario, equal-cost comparisons and moments measured along training."""

import json

import pytest
import torch

from pyro_lvm.cli.variance import run_variance
from pyro_lvm.variance import compare_estimators
from pyro_lvm.variance.scenarios import bernoulli_scenario
from pyro_lvm.variance.training import moments_during_training, particles_for_cost


def test_particles_for_cost():
    assert particles_for_cost("disarm", 6) == 3
    assert particles_for_cost("relax", 6) == 2
    assert particles_for_cost("score-function-loo-baseline", 6) == 6
    with pytest.raises(ValueError, match="multiple of 3"):
        particles_for_cost("rebar", 4)
    with pytest.raises(ValueError, match="K >= 2"):
        particles_for_cost("vimco", 1)


def test_bernoulli_scenario_exact_gradient_matches_an_unbiased_estimator():
    """DisARM's mean gradient lies within 4.5 standard errors of the enumerated one, per
    coordinate (the scenario's exact gradient is right, or DisARM and it agree by chance)."""
    scenario = bernoulli_scenario(num_latents=3, num_points=4, hidden=(4,))
    rows = compare_estimators(scenario, ["disarm"], [40], num_draws=60, equal_cost=True)
    guide = next(r for r in rows if r["group"] == "guide")
    assert guide["num_particles"] == 20 and guide["evaluations"] == 40
    # bias_se is the standard error of each component: the norm of P components of pure
    # noise is about sqrt(P) se; 4.5 se per component bounds it loosely
    assert guide["bias"] < 4.5 * guide["bias_se"] * guide["num_params"] ** 0.5
    assert guide["mean_norm"] > 10 * guide["bias_se"]


def test_bernoulli_scenario_refuses_too_many_latents():
    with pytest.raises(ValueError, match="1..12"):
        bernoulli_scenario(num_latents=20)


def test_nvil_is_measured_trained():
    """After training, NVIL's measured guide-gradient variance is far below its variance at
    step 0, where its baseline network is untrained (the figure issue 27 found misleading)."""
    torch.set_default_dtype(torch.float32)
    rows = moments_during_training(
        lambda: bernoulli_scenario(num_latents=4, num_points=16, hidden=(8,)),
        "score-function-nvil", 1, steps=(0, 300), num_draws=40, lr=3e-2,
    )  # fmt: skip
    guide = {r["step"]: r for r in rows if r["group"] == "guide"}
    assert set(guide) == {0, 300}
    assert guide[300]["variance"] < 0.5 * guide[0]["variance"], guide


def test_cli_bernoulli_with_training_writes_tables_and_plots(tmp_path):
    torch.set_default_dtype(torch.float32)
    result = run_variance(
        "bernoulli", tmp_path, ["disarm", "relax", "vimco"], [6], num_draws=4, progress=False,
        scenario_kwargs={"num_latents": 3, "num_points": 4, "hidden": (4,)}, train_steps=[0, 2],
    )  # fmt: skip
    for name in result["files"]:
        assert (tmp_path / name).is_file(), name
    rows = json.loads((tmp_path / "training" / "results.json").read_text())["rows"]
    assert {(r["estimator"], r["num_particles"], r["step"]) for r in rows} >= {
        ("disarm", 3, 0),
        ("relax", 2, 2),
        ("vimco", 6, 2),
    }
