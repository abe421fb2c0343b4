"""Gradient moments on scenarios with exact gradients: identities first, then statistics."""

import json

import pytest
import torch
from pyro.infer import TraceGraph_ELBO

from pyro_lvm.elbo import make_estimator
from pyro_lvm.variance import (
    compare_estimators,
    discrete_scenario,
    gradient_moments,
    linear_gaussian_scenario,
    parameter_groups,
    vae_mnist_scenarios,
)
from pyro_lvm.variance.cli import run_variance


def _small_lg(distance):
    return linear_gaussian_scenario(x_dim=4, z_dim=2, num_points=5, distance=distance)


def test_stl_and_dreg_guide_variance_is_zero_at_the_posterior():
    sc = _small_lg(0.0)
    for name in ("stl", "iwae-dreg"):
        m = gradient_moments(make_estimator(name, 3), sc.model, sc.guide, *sc.args, num_draws=4)
        assert m.groups["guide"].variance == pytest.approx(0.0, abs=1e-20)
    m = gradient_moments(make_estimator("elbo", 3), sc.model, sc.guide, *sc.args, num_draws=4)
    assert m.groups["guide"].variance > 1e-3


def test_common_random_numbers_and_draw_shapes():
    sc = _small_lg(0.5)
    a = gradient_moments(
        make_estimator("elbo", 2),
        sc.model,
        sc.guide,
        *sc.args,
        num_draws=3,
        seed=7,
        keep_draws=True,
    )
    b = gradient_moments(
        make_estimator("elbo", 2),
        sc.model,
        sc.guide,
        *sc.args,
        num_draws=3,
        seed=7,
        keep_draws=True,
    )
    groups = parameter_groups(sc.model, sc.guide, *sc.args)
    assert set(groups) == {"guide", "model"}
    for g in groups:
        assert torch.equal(a.draws[g], b.draws[g])
        assert a.draws[g].shape == (3, a.groups[g].num_params)
        assert a.groups[g].variance == pytest.approx(float(a.draws[g].var(0).sum()))


def test_elbo_gradient_unbiased_against_exact():
    # bias norm against the closed-form ELBO gradient: each coordinate's error is
    # ~N(0, v_p / R), so ||bias||^2 / (tr / R) has mean 1; 4.5^2 is far in its tail.
    sc = _small_lg(0.5)
    groups = parameter_groups(sc.model, sc.guide, *sc.args)
    ref = sc.exact_gradient(groups)
    m = gradient_moments(
        make_estimator("elbo", 4), sc.model, sc.guide, *sc.args, num_draws=40, reference=ref
    )
    for g in m.groups.values():
        assert g.bias < 4.5 * g.bias_se


def test_tracegraph_loop_path_is_unbiased():
    # TraceGraph_ELBO has no differentiable_loss: the loop reads .grad. The exact gradient
    # of the discrete scenario (sum over components) is the target of both estimators.
    sc = discrete_scenario(num_points=6)
    groups = parameter_groups(sc.model, sc.guide, *sc.args)
    ref = sc.exact_gradient(groups)
    m = gradient_moments(
        TraceGraph_ELBO(), sc.model, sc.guide, *sc.args, num_draws=30, reference=ref
    )
    assert m.path == "loop"
    assert m.groups["model"].bias < 4.5 * m.groups["model"].bias_se
    assert m.groups["guide"].bias < 4.5 * m.groups["guide"].bias_se


def test_bad_input_and_skips(tmp_path):
    sc = _small_lg(0.5)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_moments(make_estimator("elbo"), sc.model, sc.guide, *sc.args, num_draws=1)
    with pytest.raises(ValueError, match="neither the model"):
        gradient_moments(
            make_estimator("elbo"), sc.model, sc.guide, *sc.args, groups={"g": ["nope"]}
        )
    scenarios, reason = vae_mnist_scenarios([tmp_path / "missing.pt"], data_root=tmp_path)
    assert scenarios == [] and "binarized_mnist.npz" in reason


def test_compare_and_cli_outputs(tmp_path):
    rows = compare_estimators(
        lambda: _small_lg(1.0), ["elbo", "iwae-dreg"], particles=(1, 2), num_draws=3
    )
    assert {(r["estimator"], r["num_particles"]) for r in rows} == {
        ("elbo", 1),
        ("elbo", 2),
        ("iwae-dreg", 1),
        ("iwae-dreg", 2),
    }
    out = tmp_path / "tb"
    result = run_variance("gaussian-testbed", out, num_draws=500, progress=False)
    data = json.loads((out / "results.json").read_text())
    assert len(data["rows"]) == len(result["rows"]) > 0
    assert (out / "testbed.png").stat().st_size > 0 and (out / "results.md").exists()
    out = tmp_path / "lg"
    run_variance(
        "discrete",
        out,
        ["score-function", "score-function-loo-baseline"],
        (2, 3),
        3,
        progress=False,
    )
    for name in ("results.json", "results.md", "variance_vs_K.png", "snr_vs_K.png"):
        assert (out / name).exists()
