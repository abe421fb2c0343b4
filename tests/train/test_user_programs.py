"""Any Pyro program trains in ``fit`` and ``fit_local``: the signatures ``(x)``,
``(x, idx=None)`` and ``(x, idx=None, **named)``, and a plain ``pyro.plate("data", B)`` scaled
to the full data set by the loop (issue 25, item 1)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_lvm.train.build as build
from pyro_lvm.evaluate.loglik import log_importance_weights
from pyro_lvm.guides import AmortizedGaussianGuide, LocalGaussianGuide
from pyro_lvm.models import LinearGaussian
from pyro_lvm.train import fit, fit_local
from tests.user_models.tutorial_vae import make


def _binary(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(4, d, generator=g)
    return torch.bernoulli(probs[torch.randint(0, 4, (n,), generator=g)], generator=g)


def test_tutorial_vae_epoch_loss_is_the_full_data_elbo_per_point(monkeypatch):
    """With a learning rate of ~0 an epoch visits every point once with fixed parameters, so its
    per-point loss estimates -ELBO(full data) / N, with the standard error of one particle per
    point; unscaled minibatches would report B/N of it (here 1/4)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = make(z_dim=3, hidden_dim=16)
    x = _binary(400, 784)
    steppers = []
    original = build.make_stepper
    monkeypatch.setattr(
        build, "make_stepper", lambda *a, **k: steppers.append(original(*a, **k)) or steppers[-1]
    )
    history = fit(model, guide, x, num_epochs=1, batch_size=100, lr=1e-12, progress=False, seed=1)
    svi = steppers[0][0]
    assert svi.fallback_reason is None and svi.traced_steps > 0  # the capture engine serves it
    with torch.no_grad():
        log_w = log_importance_weights(model, guide, x, num_samples=200)  # (K, N) ELBO terms
    per_point = log_w.mean(0)  # E_q[log p(x_i, z) - log q(z | x_i)], 200 particles each
    reference = -float(per_point.mean())
    se_epoch = float(log_w.var(0).sum().sqrt()) / len(x)  # one particle per point
    se_reference = se_epoch / math.sqrt(200)
    tol = 4 * math.hypot(se_epoch, se_reference)
    assert abs(history.epoch_losses[0] - reference) < tol, (history.epoch_losses, reference, tol)
    assert abs(history.epoch_losses[0] * 4 - reference) > 10 * tol  # the test can fail


def _lg_programs(lg: LinearGaussian):
    def model_x(x):  # a plain plate: LinearGaussian with idx=None does not subsample
        return lg(x)

    def model_named(x, idx=None, shift=None):
        return lg(x - shift[:, None])

    return model_x, model_named


def test_signatures_and_plain_plates_train_as_self_scaling_ones():
    """fit on ``model(x)`` (a plain data plate the loop scales) gives exactly the losses of the
    same model scaling itself through ``idx``; the ``**named`` form trains as well."""
    x = torch.randn(60, 5)
    runs = []
    for which in ("library", "x", "named"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        lg = LinearGaussian(5, 2, learn_noise=True)
        guide = AmortizedGaussianGuide(5, 2, hidden=(8,))
        model_x, model_named = _lg_programs(lg)
        model = {"library": lg, "x": model_x, "named": model_named}[which]
        data = {"x": x, "shift": torch.zeros(60)} if which == "named" else x
        if which == "named":

            def guide(x, idx=None, shift=None, guide_fn=guide):  # a plain plate as well
                return guide_fn(x)

        runs.append(fit(model, guide, data, num_epochs=2, batch_size=20, progress=False))
    for other in runs[1:]:
        assert other.step_losses == pytest.approx(runs[0].step_losses, rel=1e-5)


def test_fit_local_scales_a_plain_plate_model():
    x = torch.randn(40, 5)
    runs = []
    for plain in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        lg = LinearGaussian(5, 2)
        model = _lg_programs(lg)[0] if plain else lg
        guide = LocalGaussianGuide(40, 2)
        runs.append(
            fit_local(model, guide, x, num_epochs=1, batch_size=10, inner_max_steps=3,
                      progress=False)
        )  # fmt: skip
    assert runs[1].step_losses == pytest.approx(runs[0].step_losses, rel=1e-5)


def test_global_latents_are_not_scaled():
    """Only the sites inside the data plate get N/B: a global latent keeps scale 1."""
    from pyro import poutine

    from pyro_lvm.contract import as_program, scaled_programs

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).expand([x.shape[0], 1]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    x = torch.randn(10, 1)
    scaled, _ = scaled_programs(as_program(model), as_program(guide), x, torch.arange(10), 50)
    trace = poutine.trace(scaled).get_trace(x, torch.arange(10))
    assert float(trace.nodes["x"]["scale"]) == 5.0 and float(trace.nodes["mu"]["scale"]) == 1.0
    history = fit(model, guide, torch.randn(50, 1), num_epochs=1, batch_size=10,
                  progress=False)  # fmt: skip
    assert len(history.step_losses) == 5


def test_the_tutorial_vae_with_a_pyro_scheduler_takes_pyro_svis_steps():
    """Pyro's VAE tutorial's pair with a ``pyro.optim`` scheduler stepped by hand, as the
    tutorials do: ``FastSVI`` runs the whole step as a graph and takes ``SVI``'s steps."""
    from pyro.infer import SVI, Trace_ELBO

    from pyro_lvm.train import FastSVI

    x = torch.bernoulli(torch.full((32, 784), 0.2))
    runs = {}
    for cls in (SVI, FastSVI):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model, guide = make(z_dim=4, hidden_dim=16)
        sched = pyro.optim.ExponentialLR(
            {"optimizer": torch.optim.Adam, "optim_args": {"lr": 1e-2}, "gamma": 0.5}
        )
        svi = cls(model, guide, sched, Trace_ELBO())
        losses = []
        for step in range(12):
            losses.append(svi.step(x))
            if step % 3 == 2:
                sched.step()
        runs[cls] = (losses, svi)
    fast = runs[FastSVI][1]
    assert fast.traced_steps == 9 and fast.fallback_reason is None and fast.step_reason is None
    torch.testing.assert_close(
        torch.tensor(runs[FastSVI][0]), torch.tensor(runs[SVI][0]), rtol=1e-10, atol=0
    )
