"""The shared training loop: estimator state in checkpoints, exact resume of fit and fit_local,
callbacks per step and per epoch, metrics logs, gradient hooks, devices."""

import json

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_lvm.data import Minibatches
from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.handlers import KLWeightedELBO, linear_schedule
from pyro_lvm.models import VAE, LinearGaussian
from pyro_lvm.train import (
    Callback,
    FitHistory,
    NonFiniteLossError,
    StatefulEstimator,
    fit,
    fit_local,
    load_checkpoint,
    read_checkpoint,
    resolve_device,
    resolve_estimator,
    save_checkpoint,
)
from pyro_lvm.train.loop import epoch_order, iterate_batches
from pyro_lvm.train.step import Batch, svi_step


class Counting(Trace_ELBO):
    """A stateful estimator: the loss is scaled by 1 + 1/(1 + t), t the number of calls.

    A resumed run that did not restore t would take other steps than an uninterrupted one.
    Its state is Python-side, so a captured (traced) loss must not freeze it.
    """

    capturable = False

    def __init__(self):
        super().__init__(vectorize_particles=True, max_plate_nesting=1)
        self.calls = torch.zeros(())

    def differentiable_loss(self, model, guide, *args, **kwargs):
        self.calls += 1
        scale = 1.0 + 1.0 / (1.0 + self.calls)
        return scale * super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())

    def state_dict(self):
        return {"calls": self.calls.clone()}

    def load_state_dict(self, state):
        self.calls = state["calls"].clone()


def _data(n=40, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, d), 0.3, dtype=torch.float64), generator=gen)


def _vae(init_seed=0):
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    vae = VAE(6, 2, hidden=(8,)).double()
    return vae, vae.guide


def _run_in_two(tmp_path, make_pair, make_loss, epochs=4, split=2, **kw):
    """Uninterrupted history, resumed history (a fresh process: new objects, other seeds)."""
    kw = dict(batch_size=16, progress=False, seed=3, **kw)
    straight = fit(*make_pair(0), _data(), loss=make_loss(), num_epochs=epochs, **kw)
    path = tmp_path / "run.pt"
    fit(*make_pair(0), _data(), loss=make_loss(), num_epochs=split, checkpoint=path, **kw)
    pyro.set_rng_seed(99)
    resumed = fit(
        *make_pair(1), _data(), loss=make_loss(), num_epochs=epochs, checkpoint=path,
        resume=True, **kw,
    )  # fmt: skip
    return straight, resumed


def test_a_stateful_estimator_is_a_protocol_and_resumes_exactly(tmp_path):
    assert isinstance(Counting(), StatefulEstimator)
    assert not isinstance(Trace_ELBO(), StatefulEstimator)
    straight, resumed = _run_in_two(tmp_path, _vae, Counting, fast=False)
    assert resumed.step_losses == straight.step_losses
    assert resumed.epoch_losses == straight.epoch_losses
    state = read_checkpoint(tmp_path / "run.pt")["estimator"]
    assert state == {"calls": torch.tensor(4.0 * 3)}  # 4 epochs of 3 steps, no validation


def test_without_its_state_the_resumed_run_would_differ(tmp_path):
    """The test above can fail: dropping the state changes the resumed steps."""

    class Forgetful(Counting):
        def load_state_dict(self, state):
            pass

    straight, resumed = _run_in_two(tmp_path, _vae, Forgetful, fast=False)
    assert resumed.step_losses[:6] == straight.step_losses[:6]
    assert resumed.step_losses[6:] != straight.step_losses[6:]


def test_resume_refuses_estimator_state_the_estimator_cannot_take(tmp_path):
    path = tmp_path / "run.pt"
    kw = dict(batch_size=16, progress=False, fast=False, checkpoint=path)
    fit(*_vae(), _data(), loss=Counting(), num_epochs=1, **kw)
    stateless = type("Counting", (Trace_ELBO,), {})()  # same name, keeps no state
    with pytest.raises(ValueError, match="holds estimator state .* keeps none"):
        fit(*_vae(), _data(), loss=stateless, num_epochs=2, resume=True, **kw)

    class Other(Counting):
        def load_state_dict(self, state):
            self.other = state["other"]

    Other.__name__ = "Counting"
    with pytest.raises(ValueError, match="does not fit Counting .*KeyError"):
        fit(*_vae(), _data(), loss=Other(), num_epochs=2, resume=True, **kw)


class StepSchedule(Callback):
    def __init__(self, schedule):
        self.schedule = schedule

    def on_step(self, history):
        self.schedule.step()


@pytest.mark.parametrize(
    "name", ["score-function-avg-baseline", "score-function-nvil", "hmc-refined", "kl-warm-up"]
)
def test_registered_stateful_estimators_resume_exactly(tmp_path, name):
    """Needs the estimators' state_dict/load_state_dict (issue 18) for every name."""
    schedule = {}

    def make_loss():
        if name != "kl-warm-up":
            return make_estimator(name, 2)
        schedule["s"] = linear_schedule(num_steps=10)
        return KLWeightedELBO(make_estimator("elbo", 2), schedule["s"])

    def callbacks():
        return [StepSchedule(schedule["s"])] if name == "kl-warm-up" else []

    kw = dict(batch_size=16, progress=False, seed=3, num_epochs=2, valid_data=_data(8, seed=1))
    straight = fit(*_vae(0), _data(), loss=make_loss(), callbacks=callbacks(), **kw)
    path = tmp_path / "run.pt"
    half = {**kw, "num_epochs": 1}
    fit(*_vae(0), _data(), loss=make_loss(), callbacks=callbacks(), checkpoint=path, **half)
    pyro.set_rng_seed(5)
    resumed = fit(
        *_vae(1), _data(), loss=make_loss(), callbacks=callbacks(), checkpoint=path, resume=True,
        **kw,
    )  # fmt: skip
    assert resumed.step_losses == straight.step_losses
    assert resumed.valid_elbos == straight.valid_elbos


def _local_pair(n=32, init_seed=0):
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    return LinearGaussian(4, 1, noise_scale=0.5, learn_noise=True), LocalGaussianGuide(n, 1)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "svi"])
def test_fit_local_checkpoints_and_resumes_exactly(tmp_path, fast):
    x = LinearGaussian(4, 1, noise_scale=0.5).sample(32).detach()
    kw = dict(batch_size=8, lr=0.05, inner_max_steps=5, progress=False, fast=fast, seed=2)
    straight = fit_local(*_local_pair(), x, Counting(), num_epochs=3, **kw)
    path = tmp_path / "local.pt"
    first = _local_pair()
    fit_local(*first, x, Counting(), num_epochs=1, checkpoint=path, **kw)
    resumed = fit_local(
        *_local_pair(init_seed=1), x, Counting(), num_epochs=3, checkpoint=path, resume=True, **kw
    )
    assert resumed.step_losses == straight.step_losses
    assert resumed.epoch_metrics == straight.epoch_metrics
    assert set(resumed.step_metrics) == {"inner_steps", "fraction_converged"}
    assert len(resumed.step_metrics["inner_steps"]) == resumed.steps == 12
    # the local parameters are in the checkpoint, and another loop's checkpoint is refused
    assert any("loc" in k for k in read_checkpoint(path)["param_store"]["values"])
    with pytest.raises(ValueError, match="same settings"):
        fit(*_local_pair(), x, num_epochs=4, checkpoint=path, resume=True, progress=False)


def test_both_loops_treat_num_particles_alike():
    x = torch.randn(8, 4)
    for train in (fit, fit_local):
        with pytest.raises(ValueError, match="num_particles applies to a loss given by name"):
            train(*_local_pair(8), x, loss=Trace_ELBO(), num_particles=4, progress=False)
    a, _ = resolve_estimator("score-function-avg-baseline")
    b, _ = resolve_estimator("score-function-avg-baseline")
    assert a is not b  # no cache shares a stateful estimator between models


def test_fit_local_stops_on_a_non_finite_loss():
    x = torch.randn(8, 4)
    model, guide = _local_pair(8)
    fit_local(model, guide, x, batch_size=8, inner_max_steps=2, progress=False)
    with torch.no_grad():  # parameters that went bad, not bad data (validation refuses that)
        model.weight.fill_(float("nan"))
    with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError, match="step 1 of 1"):
        fit_local(model, guide, x, batch_size=8, inner_max_steps=2, progress=False)


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_start(self, history):
        self.events.append(("start", history.epochs))

    def on_step(self, history):
        self.events.append(("step", history.steps))

    def on_epoch(self, history):
        self.events.append(("epoch", history.epochs))
        return history.epochs == 2

    def on_end(self, history):
        self.events.append(("end", history.epochs))


def test_callbacks_run_per_step_and_per_epoch_and_stop_at_an_epoch():
    rec, plain = Recorder(), []
    history = fit(
        *_vae(), _data(), batch_size=16, num_epochs=5, progress=False,
        callbacks=[rec, lambda h: plain.append(h.epochs)],
    )  # fmt: skip
    steps = [("step", s) for s in (1, 2, 3)]
    later = [("step", s) for s in (4, 5, 6)]
    assert rec.events == [("start", 0), *steps, ("epoch", 1), *later, ("epoch", 2), ("end", 2)]
    assert plain == [1, 2] and history.epochs == 2


def test_metrics_log_has_every_step_and_epoch_and_is_cut_back_on_resume(tmp_path):
    kw = dict(batch_size=16, progress=False, log_dir=tmp_path, valid_data=_data(8, seed=1))
    path = tmp_path / "run.pt"
    history = fit(*_vae(), _data(), num_epochs=2, checkpoint=path, **kw)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["event"] == "step"]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["loss"] for r in steps] == history.step_losses
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and steps[3]["epoch"] == 2
    assert [r["valid_elbo"] for r in epochs] == history.valid_elbos
    assert [r["loss"] for r in epochs] == history.epoch_losses
    # an interrupted run wrote epoch 3 after the checkpoint of epoch 2 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "epoch", "epoch": 3, "loss": 0.0}) + "\n")
    resumed = fit(*_vae(), _data(), num_epochs=3, checkpoint=path, resume=True, **kw)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if r["event"] == "epoch"]
    assert [r["loss"] for r in epochs] == resumed.epoch_losses  # ... which is replaced
    assert len([r for r in lines if r["event"] == "step"]) == 9


def test_tensorboard_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = fit(
        *_vae(), _data(), batch_size=16, num_epochs=2, progress=False, log_dir=tmp_path,
        tensorboard=True,
    )  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    values = [e.value for e in events.Scalars("train/step_loss")]
    assert values == pytest.approx(history.step_losses, rel=1e-6)


def test_tensorboard_needs_a_log_dir():
    with pytest.raises(ValueError, match="needs log_dir"):
        fit(*_vae(), _data(), tensorboard=True, progress=False)


@pytest.mark.parametrize("stepper", ["pyro-svi", "fast-svi", "fast-svi-clipped"])
def test_before_update_hooks_see_the_gradients_before_the_step(stepper):
    """With plain SGD a step moves the parameters by -lr times the gradient: a hook that zeroes
    the gradients before the step leaves every parameter bit-identical, one that runs after
    the step (or not at all) does not. Four steps cover FastSVI's general, capture, verify and
    traced paths; the clipped optimizer sends FastSVI through pyro SVI's optimizer call."""
    from pyro_lvm.train import FastSVI

    vae, guide = _vae()
    vae.num_data = guide.num_data = 8
    clip = {"clip_norm": 10.0} if stepper == "fast-svi-clipped" else None
    optim = pyro.optim.SGD({"lr": 0.1}, clip)
    cls = pyro.infer.SVI if stepper == "pyro-svi" else FastSVI
    svi = cls(vae, guide, optim, Trace_ELBO())
    x = _data(8)
    batch = Batch((x, torch.arange(8)), {}, 8)
    svi_step(svi, batch)  # creates the optimizers
    seen = []

    def zero(params):
        seen.append(all(p.grad is not None for p in params) and len(params) > 0)
        for p in params:
            p.grad.zero_()

    before = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    for _ in range(4):
        svi_step(svi, batch, before_update=[zero])
    assert len(seen) == 4 and all(seen)  # once per step, with the parameters' gradients
    after = vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the zeroed step moved none
    # the hook is gone after the step, and a step's own gradient moves the parameters
    svi_step(svi, batch)
    assert len(seen) == 4
    assert any(not torch.equal(before[k], vae.state_dict()[k]) for k in before)


def test_before_update_hooks_get_each_parameter_with_a_gradient_once():
    """The hook's list holds every parameter with a gradient, once each, and none without
    (an unused parameter of the store has no gradient). Mutation testing (mutmut) found the
    list's filters untested: duplicates or gradient-less entries survived."""
    vae, guide = _vae()
    vae.num_data = guide.num_data = 8
    pyro.param("unused", torch.zeros(3))  # in the store, never reached by the step
    svi = pyro.infer.SVI(vae, guide, pyro.optim.SGD({"lr": 0.1}), Trace_ELBO())
    batch = Batch((_data(8), torch.arange(8)), {}, 8)
    svi_step(svi, batch)
    lists = []
    svi_step(svi, batch, before_update=[lambda params: lists.append(list(params))])
    (params,) = lists
    with_grad = [p for _, p in pyro.get_param_store().named_parameters() if p.grad is not None]
    assert len({id(p) for p in params}) == len(params)  # no parameter twice
    assert {id(p) for p in params} == {id(p) for p in with_grad}
    assert all(p.grad is not None for p in params)
    assert len(params) == len(list(vae.parameters()))


def test_clipping_sees_the_hooked_gradient():
    """pyro.optim clips each parameter's gradient and then steps it: a hook that scales every
    gradient by 1e3 runs before that, so every parameter's SGD step is still at most lr times
    the clip norm. (A hook run at the first torch optimizer's step, after pyro.optim clipped
    that parameter, lets its step grow 1e3-fold; mutmut found this untested.)"""
    vae, guide = _vae()
    vae.num_data = guide.num_data = 8
    lr, clip = 0.1, 0.5
    svi = pyro.infer.SVI(vae, guide, pyro.optim.SGD({"lr": lr}, {"clip_norm": clip}), Trace_ELBO())
    batch = Batch((_data(8), torch.arange(8)), {}, 8)
    svi_step(svi, batch)

    def scale(params):
        for p in params:
            p.grad.mul_(1e3)

    before = {n: p.detach().clone() for n, p in vae.named_parameters()}
    svi_step(svi, batch, before_update=[scale])
    steps = {n: float((p.detach() - before[n]).norm()) for n, p in vae.named_parameters()}
    assert max(steps.values()) <= lr * clip * (1 + 1e-9), steps
    assert max(steps.values()) > 0.5 * lr * clip  # the scaled gradients were clipped


def test_svi_step_passes_the_batch_keyword_arguments():
    """``svi_step`` calls ``step(*args, **kwargs)``: a keyword the model reads changes the loss
    exactly as a direct call does."""

    def model(x, shift=0.0):
        loc = pyro.param("loc", torch.zeros(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", pyro.distributions.Normal(loc + shift, 1.0).to_event(1), obs=x)

    def guide(x, shift=0.0):
        pass

    x = torch.ones(4, 2)
    losses = []
    for kwargs in ({"shift": 3.0}, {}):
        pyro.clear_param_store()
        svi = pyro.infer.SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), Trace_ELBO())
        losses.append(svi_step(svi, Batch((x,), kwargs, 4)))
    pyro.clear_param_store()
    svi = pyro.infer.SVI(model, guide, pyro.optim.SGD({"lr": 0.0}), Trace_ELBO())
    assert losses[0] == svi.step(x, shift=3.0) and losses[0] != losses[1]


def test_data_order_is_drawn_on_the_cpu_whatever_the_device():
    x = _data(10)
    batches = Minibatches(x, 4, seed=7)
    order = epoch_order(batches, 3)
    assert order.device.type == "cpu" and torch.equal(order, batches.permutation(3))
    meta = list(iterate_batches(x, order, 4, torch.device("meta")))
    cpu = list(iterate_batches(x, order, 4, None))
    assert [b.size for b in meta] == [4, 4, 2]
    assert all(b.args[0].is_meta and b.args[1].is_meta for b in meta)
    assert torch.equal(torch.cat([b.args[1] for b in cpu]), order)


def test_fit_on_a_device_object_equals_fit_without_one():
    a = fit(*_vae(), _data(), batch_size=16, num_epochs=2, progress=False)
    b = fit(*_vae(), _data(), batch_size=16, num_epochs=2, progress=False, device="cpu")
    c = fit(
        *_vae(), _data(), batch_size=16, num_epochs=2, progress=False,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert a.step_losses == b.step_losses == c.step_losses
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="does not have"):
            fit(*_vae(), _data(), device="cuda", progress=False)


def test_checkpoints_load_onto_a_given_device(tmp_path):
    vae, guide = _vae()
    path = save_checkpoint(
        tmp_path / "c.pt", model=vae, guide=guide, optimizer=None, epoch=1,
        history=FitHistory(), estimator=Counting(),
    )  # fmt: skip
    state = read_checkpoint(path, map_location="meta")
    assert all(v.is_meta for v in state["model"].values())
    assert state["estimator"]["calls"].is_meta
    assert state["rng"]["torch"].device.type == "cpu"  # generators are read on the CPU
    est = Counting()
    est.calls += 7
    load_checkpoint(path, model=vae, estimator=est, map_location=torch.device("cpu"))
    assert est.calls.item() == 0.0


def test_version_1_checkpoints_still_load(tmp_path):
    vae, guide = _vae()
    path = save_checkpoint(tmp_path / "c.pt", model=vae, guide=guide, optimizer=None, epoch=1)
    state = torch.load(path, weights_only=True)
    state["version"] = 1
    del state["estimator"]
    torch.save(state, path)
    assert read_checkpoint(path)["estimator"] is None
    load_checkpoint(path, model=vae, estimator=Counting())  # nothing to restore: no error
