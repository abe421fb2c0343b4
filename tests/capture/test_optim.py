"""The whole SVI step as one graph: the same iterates as pyro's SVI, verified, exact on resume."""

import io
import warnings

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_lvm.capture.optim import StepRule, step_rule
from pyro_lvm.elbo import make_estimator
from pyro_lvm.models import VAE
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.optim import normalized_gradient_adam

N, B, STEPS = 40, 10, 9

OPTIMS = {
    "adam": lambda: pyro.optim.Adam({"lr": 0.05}),
    "adamw": lambda: pyro.optim.AdamW({"lr": 0.05, "weight_decay": 0.1}),
    "sgd-nesterov": lambda: pyro.optim.SGD(
        {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
    ),
    "clipped-adam": lambda: pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.95, "clip_norm": 1.0}),
    "adam-clip-norm": lambda: pyro.optim.Adam({"lr": 0.05}, {"clip_norm": 0.5}),
    "sgd-clip-value": lambda: pyro.optim.SGD({"lr": 0.01}, {"clip_value": 0.05}),
    # two parameter groups (rates by name) and L2 weight decay: one fused call per group
    "adam-groups-l2": lambda: pyro.optim.Adam(
        lambda name: {"lr": 0.05 if name.endswith("weight") else 0.02, "weight_decay": 0.1}
    ),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _batches(steps=STEPS):
    gen = torch.Generator().manual_seed(1)
    data = torch.bernoulli(torch.full((N, 10), 0.3), generator=gen)
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:B]
        yield data[idx], idx


def _run(cls, optim, steps=STEPS, **kw):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    svi = cls(vae, vae.guide, optim, make_estimator("iwae", 3), **kw)
    losses = [svi.step(x, idx) for x, idx in _batches(steps)]
    return losses, [p.detach().clone() for p in vae.parameters()], svi


KERNELS = {"adam": "_fused_adam_", "adamw": "_fused_adamw_", "sgd-nesterov": "_fused_sgd_"}
KERNELS.update({"adam-clip-norm": "_fused_adam_", "sgd-clip-value": "_fused_sgd_"})
KERNELS["adam-groups-l2"] = "_fused_adam_"


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("name", list(OPTIMS))
def test_the_whole_step_graph_takes_pyro_svis_steps(name, fused, monkeypatch):
    """Loss, gradient, clipping and the optimizer's update in one verified graph: the losses
    and iterates of pyro's SVI (one torch optimizer per parameter) to float64 rounding; with
    a ``fused=True`` optimizer the graph calls its fused kernel (ClippedAdam has none)."""
    monkeypatch.setattr(FastSVI, "fused", fused)
    ref_losses, ref_params, _ = _run(SVI, OPTIMS[name]())
    losses, params, svi = _run(FastSVI, OPTIMS[name]())
    (entry,) = svi.policy.entries.values()
    assert svi.jit_reason is None and svi.step_reason is None and entry.captured.whole_step
    kernel = KERNELS.get(name) if fused else None
    assert bool(svi.optimizer.param_groups[0].get("fused")) == (kernel is not None)
    assert (entry.rule.fused is not None) == (kernel is not None)
    code = entry.captured.fx.code
    assert (f"aten.{kernel}.tensor_lr" in code) if kernel else ("_fused_" not in code)
    assert code.count(".tensor_lr(") == (len(svi.optimizer.param_groups) if kernel else 0)
    assert svi.traced_steps == STEPS - 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_an_optimizer_without_a_rule_keeps_the_loss_graph_and_an_eager_update(caplog):
    ref_losses, ref_params, _ = _run(SVI, normalized_gradient_adam({"lr": 0.05}))
    losses, params, svi = _run(FastSVI, normalized_gradient_adam({"lr": 0.05}))
    assert "NormalizedGradientAdam has no whole-step rule" in svi.step_reason
    (entry,) = svi.policy.entries.values()
    assert not entry.captured.whole_step and svi.traced_steps == STEPS - 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_the_learning_rate_is_an_input_of_the_graph():
    """A schedule that moves the rate of the fused optimizer between steps is followed by the
    captured step (a frozen rate would leave the eager run's iterates)."""
    runs = []
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = VAE(10, 2, (8,), num_data=N)
        svi = FastSVI(
            vae, vae.guide, pyro.optim.Adam({"lr": 0.05}), make_estimator("elbo"), jit=jit
        )
        for step, (x, idx) in enumerate(_batches()):
            svi.step(x, idx)
            for group in svi.optimizer.param_groups:
                group["lr"] = 0.05 * 0.5 ** (step + 1)
        runs.append([p.detach().clone() for p in vae.parameters()])
    assert svi.traced_steps == STEPS - 3 and svi.policy.entries
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_a_wrong_fused_rule_fails_the_verification_and_runs_eagerly(monkeypatch):
    """A planted bug (the fused Adam call without the step count's increment, so a stale bias
    correction) is caught before the graph is used."""

    def stale_step(self, params, grads, tensors, lr, which):
        n = len(params)
        self.fused(
            params, grads, tensors[n : 2 * n], tensors[2 * n :], [], tensors[:n], lr=lr[0],
            beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False,
        )  # fmt: skip

    ref_losses, ref_params, _ = _run(SVI, OPTIMS["adam"]())
    monkeypatch.setattr(StepRule, "_fused", stale_step)
    losses, params, svi = _run(FastSVI, OPTIMS["adam"]())
    assert "optimizer update) differs" in svi.jit_reason and svi.traced_steps == 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)


def test_a_wrong_rule_fails_the_verification_and_runs_eagerly(monkeypatch):
    """A planted bug (Adam without its bias correction) is caught before the graph is used."""
    monkeypatch.setattr(FastSVI, "fused", False)  # the foreach rule

    def no_bias_correction(self, params, grads, tensors, lr, n):
        steps, exp_avgs, exp_avg_sqs = tensors[:n], tensors[n : 2 * n], tensors[2 * n :]
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, grads, 0.1)
        torch._foreach_mul_(exp_avg_sqs, 0.999)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=0.001)
        denom = torch._foreach_add(torch._foreach_sqrt(exp_avg_sqs), 1e-8)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -lr)

    ref_losses, ref_params, _ = _run(SVI, OPTIMS["adam"]())
    monkeypatch.setattr(StepRule, "_adam", no_bias_correction)
    losses, params, svi = _run(FastSVI, OPTIMS["adam"]())
    assert "optimizer update) differs" in svi.jit_reason and svi.traced_steps == 0
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)


def test_a_gradient_hook_keeps_the_gradients_outside_the_graph():
    seen = []
    pyro.clear_param_store()
    vae = VAE(10, 2, (8,), num_data=N)
    svi = FastSVI(vae, vae.guide, OPTIMS["adam"](), make_estimator("elbo"))
    svi.before_update = lambda params: seen.append(len(params))
    for x, idx in _batches():
        svi.step(x, idx)
    assert "before_update" in svi.step_reason and len(seen) == STEPS
    assert svi.traced_steps == STEPS - 3


@pytest.mark.parametrize(
    "name, fused",
    [("adam", True), ("adam", False), ("adamw", True), ("clipped-adam", True)]
    + [("sgd-nesterov", True), ("sgd-clip-value", True)],
)
def test_resume_of_whole_steps_is_bit_exact(name, fused, monkeypatch):
    monkeypatch.setattr(FastSVI, "fused", fused)
    stop = 5
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    svi = FastSVI(vae, vae.guide, OPTIMS[name](), make_estimator("iwae", 3), check_every=4)
    batches, straight = list(_batches()), []
    for step, (x, idx) in enumerate(batches):
        if step == stop:
            params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
            saved = io.BytesIO()
            torch.save(svi.get_state(), saved)
            rng = pyro.util.get_rng_state()
        straight.append(svi.step(x, idx))
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    vae2 = VAE(10, 2, (8,), num_data=N)
    vae2.load_state_dict(params)
    svi2 = FastSVI(vae2, vae2.guide, OPTIMS[name](), make_estimator("iwae", 3), check_every=4)
    saved.seek(0)
    svi2.set_state(torch.load(saved, weights_only=True))
    pyro.util.set_rng_state(rng)
    assert [svi2.step(x, idx) for x, idx in batches[stop:]] == straight[stop:]
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), vae2.parameters(), strict=True))
    assert svi2.traced_steps == svi.traced_steps


def test_step_rule_names_what_it_cannot_do():
    p = torch.zeros(3, requires_grad=True)
    assert "amsgrad" in step_rule(torch.optim.Adam([p], amsgrad=True), [p])
    assert "no parameter has optimizer state" in step_rule(torch.optim.Adam([p]), [p])
    assert "has no whole-step rule" in step_rule(torch.optim.Adagrad([p]), [p])


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd-nesterov", "sgd-clip-value"])
def test_inductor_compiles_the_fused_whole_step(name):
    """The fused kernels (no fake kernel of their ``tensor_lr`` overloads in torch) reach
    Inductor as custom operators: the compiled whole step is verified and takes pyro's SVI
    steps to Inductor's rounding."""
    ref_losses, ref_params, _ = _run(SVI, OPTIMS[name]())
    losses, params, svi = _run(FastSVI, OPTIMS[name](), backend="inductor")
    ((key, entry),) = svi.policy.entries.items()
    assert svi.policy.inductor[key] is None and entry.captured.backend == "inductor"
    assert entry.captured.verified and entry.rule.fused is not None
    assert "_fused_" in entry.aten.fx.code and svi.traced_steps == STEPS - 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-7, atol=0)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-10)


def test_the_optimizer_is_fused_only_where_torch_has_the_kernel():
    """PyTorch checks a fused optimizer's devices at its first step, so FastSVI checks first:
    CPU floats get the fused kernel; another device (here ``meta``) gets ``foreach``."""
    vae = VAE(10, 2, (8,), num_data=N)
    svi = FastSVI(vae, vae.guide, OPTIMS["adam"](), make_estimator("elbo"))
    cpu = svi._build(torch.optim.Adam, {"params": [torch.zeros(2, requires_grad=True)]})
    meta = torch.zeros(2, device="meta", requires_grad=True)
    other = svi._build(torch.optim.Adam, {"params": [meta]})
    assert cpu.param_groups[0]["fused"] and not other.param_groups[0]["fused"]
    assert other.param_groups[0]["foreach"]


SCHEDULERS = {
    "exponential": lambda: pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.7}
    ),
    "lambda-sgd": lambda: pyro.optim.LambdaLR(
        {
            "optimizer": torch.optim.SGD,
            "optim_args": {"lr": 0.02, "momentum": 0.9},
            "lr_lambda": _halving,
        }
    ),  # fmt: skip
    "plateau": lambda: pyro.optim.ReduceLROnPlateau(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "factor": 0.5, "patience": 0}
    ),  # fmt: skip
}


def _halving(epoch):
    return 0.5**epoch


def _scheduled_run(cls, name, steps=STEPS, every=2, start=0, svi=None, vae=None):
    """``steps`` steps, the pyro scheduler stepped after every ``every``-th one (with the
    step's loss as ``ReduceLROnPlateau``'s metric), as a Pyro tutorial writes it."""
    if svi is None:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = VAE(10, 2, (8,), num_data=N)
        svi = cls(vae, vae.guide, SCHEDULERS[name](), make_estimator("iwae", 3))
    losses = []
    for step, (x, idx) in enumerate(list(_batches(steps))[start:], start=start):
        losses.append(svi.step(x, idx))
        if step % every == every - 1:
            svi.optim.step(*([losses[-1]] if name == "plateau" else []))
    return losses, vae, svi


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_a_pyro_scheduler_drives_the_whole_step_graph_as_pyros_svi(name):
    """A ``pyro.optim`` scheduler (per-parameter torch schedulers in Pyro) drives FastSVI's
    one fused optimizer through one torch scheduler: the same rates, losses and iterates as
    pyro's SVI, with the update in the graph (its rate an input: a frozen rate would leave
    Pyro's iterates after the first scheduler step)."""
    ref_losses, ref_vae, _ = _scheduled_run(SVI, name)
    losses, vae, svi = _scheduled_run(FastSVI, name)
    (entry,) = svi.policy.entries.values()
    assert svi.fallback_reason is None and svi.jit_reason is None and svi.step_reason is None
    assert entry.captured.whole_step and svi.traced_steps == STEPS - 3
    assert svi.scheduler is not None and list(svi.optim.optim_objs.values()) == [svi.scheduler]
    rates = {g["lr"] for g in svi.optimizer.param_groups}
    assert rates < {0.05, 0.02}.union(rates) and not rates & {0.05, 0.02}  # the rate moved
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-10, atol=0)
    for p, q in zip(vae.parameters(), ref_vae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_resume_with_a_pyro_scheduler_is_bit_exact(name):
    """The torch scheduler's position is saved with the optimizer: a run resumed at step 5
    (mid-schedule) takes the floats of the uninterrupted one."""
    stop = 5
    straight, vae, svi = _scheduled_run(FastSVI, name, steps=stop)
    params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    saved = io.BytesIO()
    torch.save(svi.get_state(), saved)
    rng = pyro.util.get_rng_state()
    rest, vae, _ = _scheduled_run(FastSVI, name, start=stop, svi=svi, vae=vae)
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    vae2 = VAE(10, 2, (8,), num_data=N)
    vae2.load_state_dict(params)
    svi2 = FastSVI(vae2, vae2.guide, SCHEDULERS[name](), make_estimator("iwae", 3))
    saved.seek(0)
    svi2.set_state(torch.load(saved, weights_only=True))
    pyro.util.set_rng_state(rng)
    resumed, vae2, _ = _scheduled_run(FastSVI, name, start=stop, svi=svi2, vae=vae2)
    assert resumed == rest
    assert all(torch.equal(p, q) for p, q in zip(vae.parameters(), vae2.parameters(), strict=True))


def test_the_state_of_a_scheduled_fastsvi_before_its_first_step_round_trips():
    """A checkpoint written before the first step (no optimizer, no scheduler yet) loads into
    a fresh FastSVI with the same scheduler, which then takes the uninterrupted run's steps."""
    straight, _, _ = _scheduled_run(FastSVI, "exponential")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    vae = VAE(10, 2, (8,), num_data=N)
    fresh = FastSVI(vae, vae.guide, SCHEDULERS["exponential"](), make_estimator("iwae", 3))
    state = fresh.get_state()
    assert state["scheduler"] is None
    svi = FastSVI(vae, vae.guide, SCHEDULERS["exponential"](), make_estimator("iwae", 3))
    svi.set_state(state)
    losses, _, _ = _scheduled_run(FastSVI, "exponential", svi=svi, vae=vae)
    assert losses == straight
