"""FastSVI: the same losses and iterates as pyro.infer.SVI, a logged fallback when dynamic."""

import copy
import io
import logging
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_lvm.capture.record import RuntimeInputs
from pyro_lvm.elbo import ESTIMATORS, make_estimator, traits_of
from pyro_lvm.handlers import KLWeightedELBO, kl_weight
from pyro_lvm.models import VAE
from pyro_lvm.train.fast import FastSVI

PATHWISE = [n for n in ("elbo", "elbo-analytic-kl", "stl", "iwae", "iwae-stl", "iwae-dreg")]
N, B, STEPS = 60, 12, 7


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _batches():
    gen = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.full((N, 10), 0.3), generator=gen)
    for _ in range(STEPS):
        idx = torch.randperm(N, generator=gen)[:B]
        yield data[idx], idx


def _run(cls, name, num_particles=3, optim=None, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    optim = optim or pyro.optim.Adam({"lr": 0.05})
    svi = cls(vae, vae.guide, optim, make_estimator(name, num_particles), **kw)
    losses = [svi.step(x, idx) for x, idx in _batches()]
    return losses, [p.detach().clone() for p in vae.parameters()], svi


@pytest.mark.parametrize("name", [n for n in PATHWISE if n in ESTIMATORS])
def test_same_losses_and_iterates_as_svi(name):
    ref_losses, ref_params, _ = _run(SVI, name)
    losses, params, svi = _run(FastSVI, name)
    assert svi.fallback_reason is None
    assert svi.jit_reason is None and svi.traced_steps == STEPS - 3  # general, trace, verify
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


class _FrozenValueELBO(Trace_ELBO):
    """Right gradient, but a loss value that passes through NumPy (a graph freezes it)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        return float(loss.detach().numpy()) + (loss - loss.detach())


class _ItemELBO(Trace_ELBO):
    """A loss value read with ``.item()``: the capture itself refuses it."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        return loss.item() + (loss - loss.detach())


def test_a_value_read_with_item_fails_the_capture_and_runs_eagerly():
    results = []
    for cls in (SVI, FastSVI):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = VAE(10, 2, (8,), num_data=N)
        svi = cls(vae, vae.guide, pyro.optim.Adam({"lr": 0.05}), _ItemELBO())
        results.append([svi.step(x, idx) for x, idx in _batches()])
    assert svi.jit_reason.startswith("capture failed") and svi.traced_steps == 0
    expected, got = torch.tensor(results[0]), torch.tensor(results[1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_verification_rejects_a_trace_that_freezes_the_value():
    results = []
    for cls in (SVI, FastSVI):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = VAE(10, 2, (8,), num_data=N)
        svi = cls(vae, vae.guide, pyro.optim.Adam({"lr": 0.05}), _FrozenValueELBO())
        results.append([svi.step(x, idx) for x, idx in _batches()])
    assert "differs" in svi.jit_reason and svi.traced_steps == 0
    expected, got = torch.tensor(results[0]), torch.tensor(results[1])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)


def test_eager_lean_path_and_check_every_match_svi():
    ref_losses, ref_params, _ = _run(SVI, "elbo")
    for kw in ({"jit": False}, {"check_every": 2}):
        losses, params, svi = _run(FastSVI, "elbo", **kw)
        assert svi.fallback_reason is None
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0
        )
        for p, q in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert svi.traced_steps == 2  # steps 4 and 6 traced, steps 5 and 7 checked eagerly


def test_per_parameter_optim_args_match_svi():
    def args(name):
        return {"lr": 0.1 if "decoder" in name else 0.01}

    ref_losses, ref_params, _ = _run(SVI, "elbo", optim=pyro.optim.Adam(args))
    losses, params, svi = _run(FastSVI, "elbo", optim=pyro.optim.Adam(args))
    assert len(svi.optimizer.param_groups) == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


class _Dynamic:
    """A model/guide pair that gains a latent site (or a parameter) once ``switched``."""

    def __init__(self, new_param):
        self.switched, self.new_param = False, new_param

    def model(self, x):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(self, x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        if self.switched and self.new_param:
            loc = loc + pyro.param("shift", torch.zeros(()))
        with pyro.plate("data", x.shape[0], dim=-1):
            if self.switched and not self.new_param:
                pyro.sample("w", dist.Normal(0.0, 1.0))
            pyro.sample("z", dist.Normal(loc, 1.0))


def _dynamic_run(cls, new_param, switch_after, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    dyn = _Dynamic(new_param)
    svi = cls(dyn.model, dyn.guide, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO(), **kw)
    x, losses = torch.randn(5), []
    for step in range(8):
        dyn.switched = step >= switch_after
        losses.append(svi.step(x))
    return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}, svi


@pytest.mark.parametrize("new_param", [False, True], ids=["new-site", "new-param"])
def test_dynamic_model_falls_back_with_logged_reason(new_param, caplog):
    """Eager lean path: the change is seen at once and the run equals pyro's SVI."""
    ref_losses, ref_params, _ = _dynamic_run(SVI, new_param, 3)
    with caplog.at_level(logging.WARNING, logger="pyro_lvm.train.fast"):
        losses, params, svi = _dynamic_run(FastSVI, new_param, 3, jit=False)
    assert ("new parameter" if new_param else "sample sites changed") in svi.fallback_reason
    assert any("falls back" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    assert params.keys() == ref_params.keys()
    for k in params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=1e-9, atol=1e-12)


def test_dynamic_model_under_trace_is_caught_at_the_next_check():
    """Traced steps cannot see a change; the eager check every ``check_every`` steps does."""
    _, _, svi = _dynamic_run(FastSVI, False, 4, check_every=6)
    assert svi.traced_steps == 2  # steps 4 and 5 (1: general, 2: trace, 3: verify, 6: check)
    assert "sample sites changed" in svi.fallback_reason and svi.jit_reason is not None


def _shape_batches(steps=15):
    """Minibatches of 12, 12, 12, 12, 2 points (a short last batch): two input signatures."""
    gen = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.full((50, 10), 0.3), generator=gen)
    perm = torch.cat([torch.randperm(50, generator=gen) for _ in range(steps // 5 + 1)])
    starts = [12 * (s % 5) + 50 * (s // 5) for s in range(steps)]
    out = []
    for s, a in zip(range(steps), starts, strict=True):
        idx = perm[a : a + (2 if s % 5 == 4 else 12)]
        out.append((data[idx % 50], idx % 50))
    return out


def _new_svi(loss, **kw):
    pyro.clear_param_store()
    vae = VAE(10, 2, (8,), num_data=50)
    return vae, FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 0.05}), loss, **kw)


def _straight_and_resumed(loss_fn, stop, steps=15, resume_as=None, **kw):
    """Losses, final parameters and ``FastSVI`` of a straight run, and of runs stopped after
    ``stop`` steps and resumed in fresh objects (``resume_as``: ``(loss_fn, kwargs)`` pairs,
    by default the straight run's) through a ``weights_only`` round trip of ``get_state``."""
    batches = _shape_batches(steps)
    pyro.set_rng_seed(0)
    vae, svi = _new_svi(loss_fn(), **kw)
    losses = []
    for step, (x, idx) in enumerate(batches):
        if step == stop:  # a snapshot: parameters, optimizer and schedule, random state
            params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
            saved = io.BytesIO()
            torch.save(svi.get_state(), saved)  # a deep copy of the live state
            rng = pyro.util.get_rng_state()
        losses.append(svi.step(x, idx))
    runs = [(losses[stop:], list(vae.parameters()), svi)]
    for resume_fn, resume_kw in resume_as or [(loss_fn, kw)]:
        pyro.set_rng_seed(123)  # fresh objects get another initialization
        vae2, svi2 = _new_svi(resume_fn(), **resume_kw)
        vae2.load_state_dict(params)
        saved.seek(0)
        svi2.set_state(torch.load(saved, weights_only=True))
        pyro.util.set_rng_state(rng)
        resumed = [svi2.step(x, idx) for x, idx in batches[stop:]]
        runs.append((resumed, list(vae2.parameters()), svi2))
    return runs


# With check_every=3 and 20 steps, key A (12 points) is recorded at step 1, traced at 2,
# verified at 3, then runs traced except at the eager checks 6, 9, 12, 18; key B (2 points) is
# recorded at step 5, traced at 10, verified at 15 and runs traced at 20.
@pytest.mark.parametrize(
    "stop",
    [1, 2, 4, 6, 11, 16],
    ids=[
        "A-before-compile",
        "A-before-verify",
        "A-traced-after-a-check",
        "A-traced-B-before-compile",
        "A-at-check-B-before-verify",
        "A-traced-B-traced",
    ],
)
def test_resume_is_bit_exact(stop):
    (expected, params, svi), (resumed, params2, svi2) = _straight_and_resumed(
        lambda: make_estimator("iwae", 3), stop, steps=20, check_every=3
    )
    assert resumed == expected
    assert all(torch.equal(p, q) for p, q in zip(params, params2, strict=True))
    assert svi.traced_steps == svi2.traced_steps == 9 + 1
    assert svi2.jit_reason is None and svi2.fallback_reason is None


def test_resume_keeps_the_eager_path_of_a_rejected_trace():
    """``jit_reason`` is saved: the resumed run stays eager, as the uninterrupted one."""
    (expected, params, svi), (resumed, params2, svi2) = _straight_and_resumed(_FrozenValueELBO, 8)
    assert "differs" in svi.jit_reason and svi2.jit_reason == svi.jit_reason
    assert svi2.traced_steps == 0 and resumed == expected
    assert all(torch.equal(p, q) for p, q in zip(params, params2, strict=True))


def test_dry_verification_that_fails_leaves_no_trace():
    """A saved state that says "verified" with a trace that the dry run rejects: jit is turned
    off and the steps equal those of an eager run (the dry run changed no number)."""
    resume_as = [(_FrozenValueELBO, {}), (_FrozenValueELBO, {"jit": False})]
    _, (resumed, params, svi), (eager, eager_params, _) = _straight_and_resumed(
        Trace_ELBO, 6, resume_as=resume_as
    )
    assert "differs" in svi.jit_reason and svi.traced_steps == 2  # the saved count
    assert resumed == eager
    assert all(torch.equal(p, q) for p, q in zip(params, eager_params, strict=True))


def test_state_is_plain_and_carries_the_reasons():
    """``get_state`` survives ``weights_only`` loading and restores counts and reasons at once;
    a bare torch ``state_dict`` restores the moments only."""
    batches = _shape_batches(6)
    _, svi = _new_svi(_FrozenValueELBO())
    for x, idx in batches:
        svi.step(x, idx)
    state = svi.get_state()
    assert state["schedule"]["steps"] == 6 and sorted(state["schedule"]["seen"].values()) == [1, 5]
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    assert loaded["schedule"] == state["schedule"]
    _, svi2 = _new_svi(_FrozenValueELBO())
    svi2.set_state(loaded)
    assert "differs" in svi.jit_reason and svi2.jit_reason == svi.jit_reason
    assert svi2.get_state()["schedule"] == state["schedule"]

    _, _, dynamic = _dynamic_run(FastSVI, True, 3, jit=False)
    fresh = FastSVI(lambda x: None, lambda x: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO())
    fresh.set_state(copy.deepcopy(dynamic.get_state()))
    assert "new parameter" in fresh.fallback_reason and fresh.jit_reason == "jit=False"

    _, svi3 = _new_svi(Trace_ELBO())
    svi3.set_state(copy.deepcopy(state["optimizer"]))
    svi3.step(*batches[0])
    assert svi3.optimizer.state_dict()["state"][0]["step"] == 6 + 1
    assert svi3.get_state()["schedule"]["steps"] == 1 and svi3.jit_reason is None


def test_bad_arguments_raise():
    vae = VAE(10, 2, (8,))
    adam = pyro.optim.Adam({"lr": 0.1})
    with pytest.raises(ValueError, match="PyroOptim"):
        FastSVI(vae, vae.guide, torch.optim.Adam, Trace_ELBO())
    with pytest.raises(ValueError, match="ELBO"):
        FastSVI(vae, vae.guide, adam, "elbo")
    with pytest.raises(ValueError, match="check_every"):
        FastSVI(vae, vae.guide, adam, Trace_ELBO(), check_every=0)
    with pytest.raises(ValueError, match="pyro.optim state"):
        FastSVI(vae, vae.guide, adam, Trace_ELBO()).set_state({"decoder.0.weight": {}})
    sched = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {}, "gamma": 1})
    lean_state = FastSVI(vae, vae.guide, adam, Trace_ELBO()).get_state()
    with pytest.raises(ValueError, match="has no learning-rate scheduler"):
        FastSVI(vae, vae.guide, sched, Trace_ELBO()).set_state(lean_state)
    with pytest.raises(ValueError, match="holds learning-rate scheduler"):
        FastSVI(vae, vae.guide, adam, Trace_ELBO()).set_state({**lean_state, "scheduler": {}})


def _kl_schedule_run(cls, by_hand, change_before, **kw):
    """Seven steps whose KL weight β drops from 1 to 0.5 just before step ``change_before``:
    with ``by_hand`` the model and guide are wrapped with ``kl_weight``, else the estimator is
    a ``KLWeightedELBO``."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    state = {"beta": 1.0}

    def beta():
        return state["beta"]

    if by_hand:
        model, guide, loss = kl_weight(vae, beta), kl_weight(vae.guide, beta), Trace_ELBO()
    else:
        model, guide, loss = vae, vae.guide, KLWeightedELBO(Trace_ELBO(), beta)
    svi = cls(model, guide, pyro.optim.Adam({"lr": 0.05}), loss, **kw)
    losses = []
    for step, (x, idx) in enumerate(_batches(), start=1):
        if step == change_before:
            state["beta"] = 0.5
        losses.append(svi.step(x, idx))
    return losses, svi


def test_a_kl_schedule_estimator_is_traced_with_beta_as_an_input():
    assert isinstance(KLWeightedELBO(Trace_ELBO(), 0.5), RuntimeInputs)
    assert KLWeightedELBO(Trace_ELBO(), 0.5).runtime_inputs() == ()
    (beta,) = KLWeightedELBO(Trace_ELBO(), lambda: 0.25).runtime_inputs()
    assert beta.shape == () and float(beta) == 0.25
    assert traits_of(KLWeightedELBO(Trace_ELBO(), lambda: 0.5)).capturable
    assert not traits_of(KLWeightedELBO(make_estimator("hmc-refined"), 0.5)).capturable
    # steps: 1 record, 2 trace, 3 verify, 4-7 traced; β drops to 0.5 before step 5
    expected, _ = _kl_schedule_run(SVI, by_hand=False, change_before=5)
    got, svi = _kl_schedule_run(FastSVI, by_hand=False, change_before=5)
    assert svi.jit_reason is None and svi.traced_steps == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-10, atol=0)
    # the check step (here step 6, after the change) finds the trace still in agreement
    got, svi = _kl_schedule_run(FastSVI, by_hand=False, change_before=5, check_every=3)
    assert svi.jit_reason is None and svi.traced_steps == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-10, atol=0)


def test_a_trace_that_froze_a_schedule_is_dropped_at_the_next_check():
    # steps: 1 record, 2 trace, 3 verify, 4-5 traced, 6 check (β changed before it), 7 eager
    expected, _ = _kl_schedule_run(SVI, by_hand=True, change_before=6)
    got, svi = _kl_schedule_run(FastSVI, by_hand=True, change_before=6, check_every=3)
    assert svi.traced_steps == 2 and "stopped matching" in svi.jit_reason
    assert svi.fallback_reason is None
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-10, atol=0)
    # a change between checks is seen at the next one; step 5 ran on the stale trace (β = 1)
    stale, svi = _kl_schedule_run(FastSVI, by_hand=True, change_before=5, check_every=3)
    fresh, _ = _kl_schedule_run(SVI, by_hand=True, change_before=5)
    assert svi.traced_steps == 2 and "stopped matching" in svi.jit_reason
    assert stale[4] == pytest.approx(expected[4], rel=1e-10)
    assert stale[4] != pytest.approx(fresh[4], rel=1e-6)


@pytest.mark.parametrize("offset, kept", [(0.5, True), (2.0, False)])
def test_the_check_tolerance_scales_with_the_verified_loss(monkeypatch, offset, kept):
    """Rounding differs between trace and eager by ~ε times the loss's *terms*; when they
    cancel, |loss| shrinks but the difference does not. The check's tolerance is relative to
    the larger of |loss| now and |loss| at verification, and that scale is saved."""
    from pyro_lvm.capture.verification import default_rtol

    # steps: 1 record, 2 trace, 3 verify, 4-5 traced, 6 check
    batches = list(_batches())[:6]
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(), check_every=3)
    for x, idx in batches[:5]:
        svi.step(x, idx)
    (key,) = svi.policy.scale
    scale = svi.policy.scale[key]
    rtol = default_rtol(torch.get_default_dtype())
    assert scale > 0 and svi.traced_steps == 2

    # the graph is off by `offset` times the check's tolerance, rtol × (verified |loss|),
    # which is far above rtol × |loss| for a loss near zero
    def off(key, wrt, others, data):
        return offset * rtol * scale

    monkeypatch.setattr(FastSVI, "_eager", lambda self, a, k, validate: (0.0, _recording(self)))
    monkeypatch.setattr(svi.policy, "probe", off)
    svi.step(*batches[5])
    assert (svi.jit_reason is None) == kept
    if kept:
        assert svi.get_state()["schedule"]["check_scale"] == {key: scale}


def _recording(svi):
    """A Recorder whose sites and parameters match the object's first step."""
    from pyro_lvm.capture.record import Recorder

    rec = Recorder().__enter__()
    rec.__exit__(None, None, None)
    (structure,) = svi._structure.values()
    rec.sites, rec.params = list(structure), dict(svi._params)
    return rec
