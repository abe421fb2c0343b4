"""The per-datapoint SVI algorithm: frozen θ, masking, warm starts, θ steps, discrete latents."""

import functools

import pyro
import pytest
import torch

from pyro_lvm.evaluate import elbo_estimate
from pyro_lvm.guides import LocalBernoulliGuide, LocalGaussianGuide
from pyro_lvm.models import BernoulliMixture, CompletionModel, LinearGaussian
from pyro_lvm.train import fit_local, optimize_local


def test_inner_loop_freezes_theta_and_only_touches_idx():
    n = 8
    model = LinearGaussian(3, 2, num_data=n)
    x = model.sample(n)
    guide = LocalGaussianGuide(n, 2)
    w0 = model.weight.detach().clone()
    idx = torch.tensor([1, 5, 6])
    before = guide.params()
    res = optimize_local(model, guide, x[idx], idx, "elbo", num_particles=4, max_steps=20)
    after = guide.params()
    assert model.weight.grad is None and torch.equal(model.weight.detach(), w0)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    for name in guide.local_names:
        assert torch.equal(after[name][rest], before[name][rest])
        assert not torch.equal(after[name][idx], before[name][idx])
    assert res.steps.shape == (3,) and int(res.steps.max()) <= 20


def test_converged_rows_stop_moving():
    n = 6
    model = LinearGaussian(3, 2, num_data=n)
    x = model.sample(n)
    guide = LocalGaussianGuide(n, 2)
    # rows 0-2 start far from their optimum, rows 3-5 start there: the latter stop first
    post = model.posterior(x)
    var = 1.0 / torch.diagonal(post.precision_matrix, dim1=-2, dim2=-1)
    init = post.loc.clone()
    init[:3] += 3.0
    guide.set_params(loc=init, scale=var.sqrt().log())
    trajectory = []

    def record(step, active):
        trajectory.append((active.clone(), guide.unconstrained("loc").detach().clone()))

    res = optimize_local(
        model, guide, x, None, "elbo-analytic-kl", num_particles=64, lr=0.02, max_steps=80,
        tol=5e-3, callback=record,
    )  # fmt: skip
    assert bool(res.converged[3:].all())
    assert bool((res.steps[3:] < res.steps[:3]).all())
    # once a row is inactive its parameters are never written again
    for (active, _), (_, loc) in zip(trajectory[:-1], trajectory[1:], strict=False):
        assert torch.equal(loc[~active], trajectory[-1][1][~active])
    assert torch.all((guide.params()["loc"][3:] - post.loc[3:]).abs() < 0.1)


def test_fit_local_increases_evidence_and_warm_starts():
    n = 64
    truth = LinearGaussian(4, 1, noise_scale=0.5)
    x = truth.sample(n)
    model = LinearGaussian(4, 1, noise_scale=0.5, num_data=n)
    guide = LocalGaussianGuide(n, 1)
    before = float(model.log_evidence(x).mean().detach())
    hist = fit_local(
        model, guide, x, "elbo-analytic-kl", num_particles=8, num_epochs=3, batch_size=16,
        lr=0.05, inner_lr=0.1, inner_max_steps=30, inner_tol=5e-3, progress=False,
    )  # fmt: skip
    after = float(model.log_evidence(x).mean().detach())
    inner_steps = hist.epoch_metrics["inner_steps"]
    assert len(hist.epoch_losses) == len(inner_steps) == hist.epochs == 3
    assert after > before + 0.5
    # warm starts: later epochs need fewer inner steps than the first
    assert inner_steps[-1] < inner_steps[0]
    # the reported loss is a per-datapoint negative ELBO, so it bounds -log p(x)
    assert hist.epoch_losses[-1] > -after - 0.5
    with pytest.raises(ValueError, match="num_data"):
        fit_local(model, LocalGaussianGuide(n + 1, 1), x, progress=False)


def test_score_function_on_discrete_latents_approaches_evidence():
    torch.manual_seed(1)
    mix = BernoulliMixture(3, 8)
    mix.weights.copy_(torch.tensor([0.5, 0.3, 0.2]))
    mix.probs.copy_(torch.rand(3, 8) * 0.9 + 0.05)
    observed = torch.arange(8) >= 4
    x_obs = mix.distribution(observed).sample((5,))
    model = CompletionModel(mix, observed)
    guide = LocalBernoulliGuide(5, 4)
    k = 2000
    elbo0 = elbo_estimate(model, guide, x_obs, num_samples=k)
    res = optimize_local(
        model, guide, x_obs, None, "score-function-loo-baseline", num_particles=16, lr=0.1,
        max_steps=150, tol=0.0,
    )  # fmt: skip
    assert not bool(res.converged.any())
    elbo1 = elbo_estimate(model, guide, x_obs, num_samples=k)
    log_px = model.log_evidence(x_obs)
    # per-point SE of a k-sample ELBO estimate is below 3 / sqrt(k) here (log-weights within
    # a few nats); z = 4.5
    se = 3.0 / k**0.5
    assert bool((elbo1 <= log_px + 4.5 * se).all())
    assert float((elbo1 - elbo0).mean()) > 0.1
    # mean-field Bernoulli cannot be exact for a mixture posterior, but it is close
    assert float((log_px - elbo1).mean()) < 0.5


def test_inner_loop_benchmark_smoke(tmp_path, monkeypatch):
    import json
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "local_inner_loop.py"
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [str(script), "--smoke", "--json", str(out)])
    dtype = torch.get_default_dtype()
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_default_dtype(dtype)
        pyro.enable_validation(True)
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    rates = result["datapoint_steps_per_second"]
    assert set(rates) == {"pyro_lvm", "reference", "reference_fused"}
    assert all(v > 0 for v in rates.values()) and result["seed"] == 0


def _small_vae_and_batch():
    """A 6-2-5 VAE over 12 data points and a minibatch of 5 of them (seeded)."""
    from pyro_lvm.models import VAE

    n, idx = 12, torch.tensor([0, 3, 4, 7, 9])
    pyro.set_rng_seed(0)
    vae = VAE(6, 2, (5,), num_data=n)
    return n, idx, vae, torch.bernoulli(torch.full((n, 6), 0.4))[idx]


@pytest.mark.parametrize("name", ["elbo", "iwae-dreg", "score-function"])
def test_traced_inner_loop_matches_the_eager_one(name):
    from pyro_lvm.capture.policy import policy_for
    from pyro_lvm.elbo import make_estimator

    n, idx, vae, x = _small_vae_and_batch()
    results = {}
    for jit in (False, True):
        estimator = make_estimator(name, 3)
        pyro.set_rng_seed(1)
        guide = LocalGaussianGuide(n, 2, name=f"local_{jit}")  # its own param-store entries
        for _ in range(2):  # the second call reuses the first call's trace
            res = optimize_local(
                vae, guide, x, idx, estimator, lr=0.05, max_steps=6, tol=0.0, jit=jit
            )
        results[jit] = (guide.params(), res.loss)
        entries = policy_for(estimator).entries
        assert (len(entries) == 1 and next(iter(entries.values())).captured is not None) == jit
    (eager, eager_loss), (traced, traced_loss) = results[False], results[True]
    assert traced_loss == pytest.approx(eager_loss, rel=1e-9)
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key], rtol=1e-9, atol=1e-12)


def test_inner_trace_that_disagrees_is_not_used():
    from pyro_lvm.capture.policy import policy_for
    from pyro_lvm.models import VAE

    class FrozenValueELBO(pyro.infer.Trace_ELBO):
        """Right gradient, but a value that goes through NumPy (a graph freezes it)."""

        def differentiable_loss(self, model, guide, *args, **kwargs):
            loss = super().differentiable_loss(model, guide, *args, **kwargs)
            return float(loss.detach().numpy()) + (loss - loss.detach())

    n = 8
    vae = VAE(6, 2, (5,), num_data=n)
    x = torch.bernoulli(torch.full((n, 6), 0.4))
    estimator = FrozenValueELBO()
    optimize_local(vae, LocalGaussianGuide(n, 2), x, None, estimator, max_steps=4, tol=0.0)
    (entry,) = policy_for(estimator).entries.values()
    assert entry.captured is None  # verification rejected the trace: eager path


def test_inner_trace_cache_is_bounded():
    from pyro_lvm.capture.policy import policy_for
    from pyro_lvm.elbo import make_estimator
    from pyro_lvm.models import VAE

    n = 12
    vae = VAE(4, 2, (3,), num_data=n)
    guide = LocalGaussianGuide(n, 2, name="bounded")
    x = torch.bernoulli(torch.full((n, 4), 0.4))
    estimator = make_estimator("elbo", 1)
    policy = policy_for(estimator)
    for b in range(2, 2 + policy.max_entries + 3):  # one signature per batch size
        optimize_local(vae, guide, x[:b], torch.arange(b), estimator, max_steps=3, tol=0.0)
    assert len(policy.entries) == policy.max_entries
    assert all(entry.captured is not None for entry in policy.entries.values())


def _inner_runs_as_beta_changes(by_hand: bool):
    """``optimize_local`` twice on one minibatch, β = 1 then 0.2, eagerly and traced.

    With ``by_hand`` the model is wrapped with ``kl_weight`` (a Python number a trace
    freezes; it weighs log p(z) only, enough to move the loss), else the estimator is a
    scheduled ``KLWeightedELBO``. Returns ``{jit: (guide params, losses)}`` and the traced
    run's estimator.
    """
    from pyro_lvm.handlers import KLWeightedELBO, kl_weight

    n, idx, vae, x = _small_vae_and_batch()
    results = {}
    for jit in (False, True):
        state = {"beta": 1.0}
        beta = functools.partial(state.__getitem__, "beta")
        estimator = pyro.infer.Trace_ELBO(num_particles=2)
        model = kl_weight(vae, beta) if by_hand else vae
        if not by_hand:
            estimator = KLWeightedELBO(estimator, beta)
        pyro.set_rng_seed(1)
        guide = LocalGaussianGuide(n, 2, name=f"beta_{by_hand}_{jit}")
        losses = []
        for b in (1.0, 0.2):  # the second call reuses the first call's trace
            state["beta"] = b
            res = optimize_local(model, guide, x, idx, estimator, max_steps=5, tol=0.0, jit=jit)
            losses.append(res.loss)
        results[jit] = (guide.params(), losses)
    (eager, eager_losses), (traced, traced_losses) = results[False], results[True]
    assert traced_losses == pytest.approx(eager_losses, rel=1e-9)
    assert eager_losses[1] != pytest.approx(eager_losses[0], rel=1e-5)
    for key in eager:
        torch.testing.assert_close(traced[key], eager[key], rtol=1e-9, atol=1e-12)
    return estimator


def test_inner_trace_follows_a_kl_schedule():
    """A scheduled β enters the traced inner loss as an input: after β changes, the reused
    trace gives the eager loop's leaves and loss (a frozen β would not)."""
    from pyro_lvm.capture.policy import policy_for

    estimator = _inner_runs_as_beta_changes(by_hand=False)
    (entry,) = policy_for(estimator).entries.values()
    assert entry.captured is not None  # kept, and it followed the schedule


def test_a_reused_inner_trace_that_froze_a_value_is_dropped():
    """A weight applied by hand is frozen in a trace; the first (eager) step of the next call
    compares the reused trace with it and drops it, so the loop matches the eager one."""
    from pyro_lvm.capture.policy import policy_for

    estimator = _inner_runs_as_beta_changes(by_hand=True)
    (entry,) = policy_for(estimator).entries.values()
    assert entry.captured is None  # dropped at the second call's first step
