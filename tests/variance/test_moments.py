"""Gradient moments on scenarios with exact gradients: identities first, then statistics."""

import json
import math
from statistics import NormalDist

import pyro
import pytest
import torch
from pyro.infer import TraceGraph_ELBO
from pyro.infer.util import is_validation_enabled

from pyro_lvm.cli.variance import run_variance
from pyro_lvm.elbo import make_estimator
from pyro_lvm.variance import (
    compare_estimators,
    discrete_scenario,
    gradient_moments,
    linear_gaussian_scenario,
    parameter_groups,
    vae_mnist_scenarios,
)


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
    assert a.path == b.path == "traced" and a.reason is None
    for g in groups:
        assert torch.equal(a.draws[g], b.draws[g])
        assert a.draws[g].shape == (3, a.groups[g].num_params)
        assert a.groups[g].variance == pytest.approx(float(a.draws[g].var(0).sum()))


Z = 4.5  # two-sided false-alarm rate 6.8e-6 per coordinate


def _assert_unbiased_per_coordinate(m, ref, powered=("guide", "model")):
    r"""Each coordinate's mean within Z SE of the exact gradient, with power in the groups
    ``powered``.

    The bias *norm* against :math:`\sqrt{\mathrm{tr}/R}` lets a low-variance coordinate be
    off by many of its own SEs when another coordinate dominates the trace (9 to 20 SE here),
    so the test is per coordinate, on the kept draws. Power: some coordinate has
    0.35 |exact| > 2 Z SE, so a group's gradient 35% too small (or zero) is off there by more
    than 2 Z SE and is detected.
    """
    for group, draws in m.draws.items():
        target = ref[group]
        mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
        bad = (mean - target).abs() > Z * se + 1e-12
        assert not bad.any(), f"{group}: mean {mean[bad]} vs exact {target[bad]} (SE {se[bad]})"
        if group in powered:
            power = float((0.35 * target.abs() / se).nan_to_num(0.0).max())
            assert power > 2 * Z, f"{group}: a 35% error is only {power:.1f} SE"
        # the reported bias is the norm of the same error (an identity)
        assert m.groups[group].bias == pytest.approx(float((mean - target).norm()), rel=1e-9)


def test_elbo_gradient_unbiased_against_exact():
    sc = _small_lg(0.5)
    groups = parameter_groups(sc.model, sc.guide, *sc.args)
    ref = sc.exact_gradient(groups)
    m = gradient_moments(
        make_estimator("elbo", 4), sc.model, sc.guide, *sc.args, num_draws=100, reference=ref,
        keep_draws=True,
    )  # fmt: skip
    _assert_unbiased_per_coordinate(m, ref)


def test_tracegraph_loop_path_is_unbiased():
    # TraceGraph_ELBO has no differentiable_loss: the loop reads .grad. The exact gradient
    # of the discrete scenario (sum over components) is the target of both estimators.
    sc = discrete_scenario(num_points=6)
    groups = parameter_groups(sc.model, sc.guide, *sc.args)
    ref = sc.exact_gradient(groups)
    m = gradient_moments(
        TraceGraph_ELBO(), sc.model, sc.guide, *sc.args, num_draws=100, reference=ref,
        keep_draws=True,
    )  # fmt: skip
    assert m.path == "loop" and "no differentiable_loss" in m.reason
    # the score-function guide gradient here has |exact|/SE of 6.7 at 300 draws: power for a
    # 35% guide error would take thousands of draws, so the power claim is the model's
    _assert_unbiased_per_coordinate(m, ref, powered=("model",))


def test_bad_input_and_skips(tmp_path):
    sc = _small_lg(0.5)
    with pytest.raises(ValueError, match="num_draws"):
        gradient_moments(make_estimator("elbo"), sc.model, sc.guide, *sc.args, num_draws=1)
    with pytest.raises(ValueError, match="rtol must be positive"):
        gradient_moments(make_estimator("elbo"), sc.model, sc.guide, *sc.args, rtol=0.0)
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


# ---------------------------------------------------------------- traced path vs loop


@pytest.mark.parametrize("name", ["elbo", "iwae", "iwae-dreg", "stl"])
def test_traced_draws_equal_loop_draws_under_one_seed(name):
    # tracing restores the random state, and the traced graph draws its noise from the same
    # generator in the same order as the eager code: the draws agree to rounding
    sc = _small_lg(0.5)
    kw = dict(num_draws=6, seed=3, keep_draws=True)
    traced = gradient_moments(make_estimator(name, 3), sc.model, sc.guide, *sc.args, **kw)
    loop = gradient_moments(make_estimator(name, 3), sc.model, sc.guide, *sc.args, jit=False, **kw)
    assert (traced.path, traced.reason) == ("traced", None)
    assert (loop.path, loop.reason) == ("loop", "jit=False")
    for g in loop.draws:
        assert torch.allclose(traced.draws[g], loop.draws[g], rtol=1e-10, atol=1e-12)
        assert traced.draws[g].std(0).sum() > 0  # fresh noise at every traced draw


def test_traced_draws_match_loop_in_distribution():
    # independent seeds, R draws per path. Means: per coordinate the difference is
    # ~N(0, (s_t^2 + s_l^2) / R); z from a family-wise false-alarm rate of 1e-4 over all
    # coordinates (Bonferroni). Variance tr Cov: its SE is std_r ||g_r - mean||^2 / sqrt(R)
    # (delta method, no Gaussian assumption); z = 4.5 (two-sided false alarm ~7e-6).
    sc = _small_lg(0.5)
    num = 80
    runs = [
        gradient_moments(
            make_estimator("iwae", 3),
            sc.model,
            sc.guide,
            *sc.args,
            num_draws=num,
            seed=seed,
            jit=jit,
            keep_draws=True,
        )
        for seed, jit in ((11, True), (12, False))
    ]
    assert [r.path for r in runs] == ["traced", "loop"]
    coords = sum(g.shape[-1] for g in runs[0].draws.values())
    z_mean = NormalDist().inv_cdf(1 - 1e-4 / (2 * coords))
    for g in runs[0].draws:
        t, lp = runs[0].draws[g], runs[1].draws[g]
        se = ((t.var(0) + lp.var(0)) / num).sqrt()
        assert ((t.mean(0) - lp.mean(0)).abs() <= z_mean * se).all()
        dev_t = (t - t.mean(0)).pow(2).sum(-1)
        dev_l = (lp - lp.mean(0)).pow(2).sum(-1)
        se_v = math.sqrt((dev_t.var() + dev_l.var()) / num)
        assert abs(runs[0].groups[g].variance - runs[1].groups[g].variance) <= 4.5 * se_v


def test_stateful_estimator_falls_back_with_the_loops_draws():
    # the decaying-average baseline lives in Python: the estimator says it cannot be
    # captured, and the loop runs; the estimator's state is restored, so
    # the draws are those of the plain loop under the same seed
    sc = discrete_scenario(num_points=6)
    kw = dict(num_draws=5, seed=5, keep_draws=True)
    est = make_estimator("score-function-avg-baseline", 2)
    tried = gradient_moments(est, sc.model, sc.guide, *sc.args, **kw)
    assert tried.path == "loop" and "keeps Python state across steps" in tried.reason
    assert tried.rows()[0]["path_reason"] == tried.reason
    plain = make_estimator("score-function-avg-baseline", 2)
    loop = gradient_moments(plain, sc.model, sc.guide, *sc.args, jit=False, **kw)
    for g in loop.draws:
        assert torch.equal(tried.draws[g], loop.draws[g])
    assert torch.equal(est.averages.averages["z"], plain.averages.averages["z"])


def test_untraceable_arguments_and_validation_on_first_draw_only():
    sc = _small_lg(0.5)
    seen = []

    def model(x, idx=None):
        seen.append(is_validation_enabled())
        return sc.model(x, idx)

    m = gradient_moments(make_estimator("elbo", 2), model, sc.guide, *sc.args, None, num_draws=4)
    assert m.path == "loop" and "positional tensor arguments" in m.reason
    # two param-only runs (groups, sites), the estimator's max_plate_nesting dry run and the
    # first draw validated, then three without
    assert seen == [True] * 4 + [False] * 3
    with pyro.validation_enabled(False):
        m = gradient_moments(make_estimator("elbo", 2), sc.model, sc.guide, *sc.args, num_draws=3)
    assert m.path == "traced" and m.setup_seconds > 0
