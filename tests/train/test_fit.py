"""fit: exact resume, per-data-point reporting, NaN handling, num_data, convergence."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch import nn

from pyro_lvm.data import Minibatches
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import VAE, LinearGaussian
from pyro_lvm.plates import data_plate
from pyro_lvm.train import FitHistory, NonFiniteLossError, fit, load_checkpoint

Z = 4.5  # two-sided false-alarm rate about 7e-6 per statistical check


def _binary_data(n=50, d=8):
    return torch.bernoulli(torch.full((n, d), 0.3, dtype=torch.float64))


def _vae_pair(init_seed):
    torch.manual_seed(init_seed)
    vae = VAE(8, 2, hidden=(12,))
    return vae, vae.guide


def _functional_pair(init_seed):
    """LinearGaussian with a PyroParam noise and a function guide with free pyro.params."""
    torch.manual_seed(init_seed)
    model = LinearGaussian(8, 2, learn_noise=True)

    def guide(x, idx=None):
        weight = pyro.param("q_weight", lambda: 0.1 * torch.randn(2, 8))
        scale = pyro.param("q_scale", lambda: torch.ones(2), constraint=constraints.positive)
        with data_plate(x, idx, model.num_data):
            pyro.sample("z", dist.Normal(x @ weight.T, scale).to_event(1))

    return model, guide


@pytest.mark.parametrize("make_pair", [_vae_pair, _functional_pair], ids=["vae", "functional"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, make_pair):
    x, x_valid = _binary_data(), _binary_data(10)
    kw = dict(batch_size=16, valid_data=x_valid, progress=False, seed=3)
    straight = fit(*make_pair(0), x, num_epochs=4, optimizer=pyro.optim.Adam({"lr": 0.02}), **kw)

    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # the global stream before fit must not matter: fit seeds it
    first = make_pair(0)
    half = fit(
        *first, x, num_epochs=2, optimizer=pyro.optim.Adam({"lr": 0.02}), checkpoint=path, **kw
    )
    assert half.epochs == 2 and half.step_losses == straight.step_losses[: half.steps]

    pyro.clear_param_store()  # a new process: fresh objects with another initialization
    pyro.set_rng_seed(7)
    resumed = fit(
        *make_pair(1),
        x,
        num_epochs=4,
        optimizer=pyro.optim.Adam({"lr": 0.02}),
        checkpoint=path,
        resume=True,
        **kw,
    )
    assert resumed.epochs == 4 and len(resumed.step_losses) == 4 * 4
    assert resumed.step_losses == straight.step_losses
    assert resumed.epoch_losses == straight.epoch_losses
    assert resumed.valid_elbos == straight.valid_elbos
    assert load_checkpoint(path)["epoch"] == 4


def _scheduled_fit(pair, x, epochs, fast, **kw):
    """``fit`` with a Pyro tutorial's scheduler: ``ExponentialLR`` stepped after every epoch."""
    sched = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.5}
    )
    history = fit(
        *pair, x, num_epochs=epochs, optimizer=sched, callbacks=[lambda h: sched.step()],
        batch_size=16, progress=False, seed=3, fast=fast, **kw,
    )  # fmt: skip
    return history, sched


def test_a_pyro_scheduler_trains_on_the_fast_path_and_resumes_exactly(tmp_path):
    """The fast path follows the scheduler as pyro's SVI does, and a run resumed mid-schedule
    (the scheduler's position in the checkpoint) reproduces the uninterrupted one."""
    x = _binary_data()
    straight, sched = _scheduled_fit(_vae_pair(0), x, 4, fast=True)
    assert {
        g["lr"] for g in sched.optim_objs[next(iter(sched.optim_objs))].optimizer.param_groups
    } == {0.05 * 0.5**4}
    pyro.clear_param_store()
    reference, _ = _scheduled_fit(_vae_pair(0), x, 4, fast=False)
    torch.testing.assert_close(
        torch.tensor(straight.step_losses), torch.tensor(reference.step_losses), rtol=1e-9, atol=0
    )
    path = tmp_path / "run.pt"
    pyro.clear_param_store()
    _scheduled_fit(_vae_pair(0), x, 2, fast=True, checkpoint=path)
    pyro.clear_param_store()
    pyro.set_rng_seed(7)
    resumed, _ = _scheduled_fit(_vae_pair(1), x, 4, fast=True, checkpoint=path, resume=True)
    assert resumed.step_losses == straight.step_losses


def test_resume_refuses_other_settings(tmp_path):
    x = _binary_data()
    path = tmp_path / "run.pt"
    fit(*_vae_pair(0), x, num_epochs=1, batch_size=16, checkpoint=path, progress=True)
    with pytest.raises(ValueError, match="resume with the same settings"):
        fit(*_vae_pair(0), x, num_epochs=2, batch_size=8, checkpoint=path, resume=True)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        fit(*_vae_pair(0), x, checkpoint=tmp_path / "missing.pt", resume=True, progress=False)


def _exact_posterior_pair(num_data):
    """LinearGaussian and its exact posterior: every ELBO sample equals log p(x) exactly."""
    model = LinearGaussian(3, 2, noise_scale=0.7)

    def guide(x, idx=None):
        with data_plate(x, idx, num_data):
            pyro.sample("z", model.posterior(x))

    return model, guide


def test_reported_losses_are_per_data_point():
    """With q = p(z|x) and lr = 0 the bound estimate is log p(x) exactly, sample by sample."""
    n, batch = 23, 5  # the last minibatch holds 3 points
    model, guide = _exact_posterior_pair(n)
    x, x_valid = model.sample(n), model.sample(7)
    history = fit(
        model,
        guide,
        x,
        num_epochs=2,
        batch_size=batch,
        optimizer=pyro.optim.SGD({"lr": 0.0}),
        valid_data=x_valid,
        progress=False,
    )
    log_px = model.log_evidence(x)
    assert history.steps == 2 * math.ceil(n / batch) and history.epochs == 2
    for epoch in range(2):  # the minibatches of fit, rebuilt from their public definition
        batches = Minibatches(x, batch, seed=0)
        batches.set_epoch(epoch)
        expected = [-log_px[idx].mean().item() for _, idx in batches]
        got = history.step_losses[epoch * 5 : (epoch + 1) * 5]
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), rtol=1e-10)
    assert torch.allclose(torch.tensor(history.epoch_losses), -log_px.mean(), rtol=1e-10)
    assert torch.allclose(
        torch.tensor(history.valid_elbos), model.log_evidence(x_valid).mean(), rtol=1e-10
    )
    assert history.num_data == n and history.batch_size == batch and history.seconds > 0


def test_history_bookkeeping_and_callbacks(tmp_path):
    x = _binary_data(40)
    seen = []

    def stop_after_two(history):
        seen.append((history.epochs, len(history.step_losses)))
        return history.epochs == 2

    history = fit(
        *_vae_pair(0),
        x,
        num_epochs=5,
        batch_size=15,
        callbacks=[stop_after_two],
        checkpoint=tmp_path / "c.pt",
        progress=False,
    )
    assert seen == [(1, 3), (2, 6)]
    assert history.epochs == 2 and history.valid_elbos == []
    sizes = torch.tensor([15.0, 15.0, 10.0])
    for e in range(2):
        steps = torch.tensor(history.step_losses[3 * e : 3 * e + 3])
        assert math.isclose(
            history.epoch_losses[e], float((steps * sizes).sum() / 40), rel_tol=1e-12
        )
    saved = load_checkpoint(tmp_path / "c.pt")
    assert saved["epoch"] == 2 and saved["history"] == history
    assert FitHistory.from_dict(history.to_dict()) == history


class _ConstantBound(pyro.infer.Trace_ELBO):
    """A stand-in estimator whose loss is 2.5 nats per data point."""

    def loss(self, model, guide, x, *args, **kwargs):
        return 2.5 * x.shape[0]


def test_the_validation_bound_uses_valid_loss():
    x = _binary_data(40)
    history = fit(
        *_vae_pair(0),
        x[:30],
        valid_data=x[30:],
        valid_loss=_ConstantBound(),
        num_epochs=2,
        batch_size=10,
        progress=False,
    )
    assert history.valid_elbos == [-2.5, -2.5]
    # by default the training estimator scores the validation set
    default = fit(*_vae_pair(0), x[:30], valid_data=x[30:], num_epochs=1, progress=False)
    assert default.valid_elbos[0] != -2.5 and math.isfinite(default.valid_elbos[0])
    with pytest.raises(ValueError, match="no-such-bound"):  # a name goes to make_estimator
        fit(*_vae_pair(0), x[:30], valid_data=x[30:], valid_loss="no-such-bound", progress=False)


def test_num_data_is_set_checked_and_subsampling_is_enforced():
    x = _binary_data(30)
    vae = VAE(8, 2, hidden=(12,))
    fit(vae, vae.guide, x, num_epochs=1, batch_size=10, progress=False)
    assert vae.num_data == 30 and vae.guide.num_data == 30
    with pytest.raises(ValueError, match="num_data=30 but the training set has 20"):
        fit(vae, vae.guide, x[:20], num_epochs=1, progress=False)
    assert vae.num_data == 30

    lg = LinearGaussian(8, 2)

    def unscaled_model(x, idx=None):  # ignores idx: its plain data plate is scaled by the loop
        return lg(x)

    guide = AmortizedGaussianGuide(8, 2, hidden=(4,))
    fit(unscaled_model, guide, x, num_epochs=1, batch_size=10, progress=False)

    def no_plate(x, idx=None):  # the observations in no plate over the minibatch
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))
        pyro.sample("x", dist.Bernoulli(probs=0.5 * torch.ones_like(x)).to_event(2), obs=x)

    def no_plate_guide(x, idx=None):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(2))

    with pytest.raises(ValueError, match="cannot find the data plate: looked for one pyro.plate"):
        fit(no_plate, no_plate_guide, x, num_epochs=1, batch_size=10, progress=False)


def test_bad_arguments_are_named():
    x = _binary_data(20)
    vae, guide = _vae_pair(0)
    for kwargs, message in [
        ({"loss": "no-such-bound"}, "unknown estimator"),
        ({"loss": pyro.infer.Trace_ELBO(), "num_particles": 3}, "num_particles applies"),
        ({"optimizer": torch.optim.Adam}, "pyro.optim.PyroOptim"),
        ({"batch_size": 0}, "batch_size"),
        ({"resume": True}, "needs the checkpoint path"),
    ]:
        with pytest.raises(ValueError, match=message):
            fit(vae, guide, x, progress=False, **kwargs)


def test_nan_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    lg = LinearGaussian(3, 1, num_data=40)
    guide = AmortizedGaussianGuide(3, 1, hidden=(4,))
    calls = {"model": 0}

    def model(x, idx=None):
        # call 1 is fit's input validation, call 2 its subsampling check, call 3 the
        # estimator's max_plate_nesting dry run, then one call per step
        calls["model"] += 1
        lg(x, idx)
        if calls["model"] == 3 + 4 + 3:  # epoch 2, step 3
            poison = dist.Unit(lg.weight.sum() * float("nan"), validate_args=False)
            pyro.sample("poison", poison, obs=poison.sample())  # pyro.factor, unvalidated

    path = tmp_path / "c.pt"
    x = lg.sample(40)
    with pytest.raises(NonFiniteLossError, match="epoch 2, step 3 of 4") as info:
        with pytest.warns(UserWarning, match="NaN"):  # Pyro's own warn_if_nan
            # The poison site appears dynamically, which only the general path runs every step.
            fit(
                model,
                guide,
                x,
                num_epochs=3,
                batch_size=10,
                checkpoint=path,
                progress=False,
                fast=False,
            )
    assert str(path) in str(info.value) and "(epoch 1)" in str(info.value)
    assert (info.value.epoch, info.value.step, info.value.checkpoint) == (2, 3, path)
    assert "global step 7" in str(info.value)
    assert not torch.isfinite(lg.weight).all()  # the bad step reached the live parameters
    saved = load_checkpoint(path)  # restores the store in place: lg.weight is good again
    assert saved["epoch"] == 1 and saved["history"].steps == 4
    assert torch.isfinite(lg.weight).all()
    assert all(torch.isfinite(v).all() for v in saved["param_store"]["values"].values())


def test_nan_loss_is_caught_on_the_fast_path(tmp_path):
    """A NaN that enters through the data stops the traced fast path at the right step."""
    lg = LinearGaussian(3, 1)
    guide = AmortizedGaussianGuide(3, 1, hidden=(4,))
    x = lg.sample(40)
    # Long enough for the fast path to trace and verify its loss before the NaN arrives.
    bad_row, epochs_clean = 5, 3
    position = int((Minibatches(x, 10, seed=0).permutation(epochs_clean) == bad_row).nonzero())
    step = position // 10 + 1

    def corrupt_after_clean_epochs(history):
        if history.epochs == epochs_clean:
            x[bad_row, 0] = float("nan")

    path = tmp_path / "c.pt"
    with pytest.raises(NonFiniteLossError, match=f"epoch {epochs_clean + 1}, step {step} of 4"):
        fit(
            lg,
            guide,
            x,
            num_epochs=6,
            batch_size=10,
            checkpoint=path,
            progress=False,
            callbacks=[corrupt_after_clean_epochs],
        )
    assert load_checkpoint(path)["epoch"] == epochs_clean


def test_training_a_linear_gaussian_closes_the_gap_to_the_exact_evidence():
    """The ELBO rises towards log p(x): the gap KL(q || p(z|x)) shrinks to near zero.

    With z_dim = 1 and a linear encoder the guide family holds the exact posterior.
    """
    truth = LinearGaussian(3, 1, noise_scale=0.5)
    x, x_valid = truth.sample(200), truth.sample(100)
    torch.manual_seed(1)
    model = LinearGaussian(3, 1, noise_scale=0.5)
    guide = AmortizedGaussianGuide(3, 1, encoder=nn.Linear(3, 2))

    def exact_elbo(data):
        """Per point: log p(x) - KL(q(z|x) || p(z|x)), both in closed form."""
        with torch.no_grad():
            loc, scale = guide.params(data)
            q = dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
            gap = torch.distributions.kl_divergence(q, model.posterior(data))
            return model.log_evidence(data) - gap, gap

    elbo0, gap0 = exact_elbo(x_valid)
    history = fit(
        model,
        guide,
        x,
        num_epochs=60,
        batch_size=50,
        optimizer=pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.985}),  # lr decays to 0.005
        valid_data=x_valid,
        progress=False,
    )
    elbo1, gap1 = exact_elbo(x_valid)
    assert elbo1.mean() > elbo0.mean()
    assert gap1.mean() < 0.02 * gap0.mean() and gap1.mean() < 0.01
    # The reported validation bound is a Monte Carlo estimate of the exact ELBO: compare
    # within Z standard errors, the variance of each point's single-sample estimate estimated
    # from 200 fresh samples.
    with torch.no_grad():
        q = guide.posterior(x_valid)
        z = q.sample((200,))
        log_w = model.prior().log_prob(z) + model.likelihood(z).log_prob(x_valid) - q.log_prob(z)
        se = log_w.var(0).sum().sqrt() / x_valid.shape[0]
    assert abs(history.valid_elbos[-1] - elbo1.mean().item()) < Z * se.item() + 1e-12
