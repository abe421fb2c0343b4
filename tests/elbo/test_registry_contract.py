"""The contract every registered estimator keeps: SVI, shapes, gradients, subsampling, agreement."""

import math

import pyro
import pytest
import torch
from pyro.infer import ELBO, SVI
from torch import nn

from pyro_lvm.elbo import ELBO_NAMES, ESTIMATORS, make_estimator
from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import LinearGaussian

NAMES = sorted(ESTIMATORS)
REQUIRED = {
    "elbo",
    "elbo-analytic-kl",
    "score-function",
    "score-function-avg-baseline",
    "score-function-loo-baseline",
    "stl",
    "iwae",
    "iwae-stl",
    "iwae-dreg",
    "vimco",
    "renyi",
}
NUM_DATA, BATCH = 12, 4


def _setup():
    model = LinearGaussian(3, 2, noise_scale=0.8, num_data=NUM_DATA)
    guide = AmortizedGaussianGuide(3, 2, encoder=nn.Linear(3, 4), num_data=NUM_DATA)
    data = model.sample(NUM_DATA)
    return model, guide, data


def _param_grads():
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained().grad for name in store.keys()}


def test_registry_holds_the_required_names():
    assert REQUIRED <= set(ESTIMATORS)
    assert ELBO_NAMES <= set(ESTIMATORS)


@pytest.mark.parametrize("name", NAMES)
def test_svi_step_with_subsampling(name):
    model, guide, data = _setup()
    elbo = make_estimator(name, num_particles=3)
    assert isinstance(elbo, ELBO)
    assert elbo.vectorize_particles
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    for step in range(2):
        idx = torch.arange(step * BATCH, (step + 1) * BATCH)
        loss = svi.step(data[idx], idx)
        assert isinstance(loss, float) and math.isfinite(loss)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_receives_a_gradient(name):
    model, guide, data = _setup()
    elbo = make_estimator(name, num_particles=3)
    idx = torch.arange(BATCH)
    loss = elbo.differentiable_loss(model, guide, data[idx], idx)
    assert loss.shape == () and loss.requires_grad
    loss.backward()
    grads = _param_grads()
    assert {"weight", "bias"} <= {k.split(".")[-1] for k in grads}
    assert len(grads) >= 4  # model W, b and encoder weight, bias at least
    for key, grad in grads.items():
        assert grad is not None, f"{name}: no gradient for {key}"
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name}: {key}"


@pytest.mark.parametrize("name", NAMES)
def test_loss_methods_agree_under_one_seed(name):
    model, guide, data = _setup()
    elbo = make_estimator(name, num_particles=3)
    values = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(4)
        value = getattr(elbo, method)(model, guide, data[:BATCH], torch.arange(BATCH))
        values.append(float(torch.as_tensor(value).detach()))
    assert values == pytest.approx([values[0]] * 3, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_subsample_scale_is_exact(name):
    """Under one seed, the loss on a minibatch with idx is N/B times the unscaled loss."""
    model, guide, data = _setup()
    elbo = make_estimator(name, num_particles=3)
    x, idx = data[:BATCH], torch.arange(BATCH)
    pyro.set_rng_seed(9)
    scaled = elbo.loss(model, guide, x, idx)
    pyro.set_rng_seed(9)
    plain = elbo.loss(model, guide, x)
    assert scaled == pytest.approx(NUM_DATA / BATCH * plain, rel=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_factory_accepts_pyro_keyword_arguments(name):
    elbo = ESTIMATORS[name](num_particles=2, max_plate_nesting=1, retain_graph=True)
    assert elbo.num_particles == 2 and elbo.retain_graph


def test_make_estimator_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown estimator 'nope'.*elbo"):
        make_estimator("nope")
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match="num_particles"):
            make_estimator("elbo", num_particles=bad)
    with pytest.raises(ValueError, match="num_particles >= 2"):
        make_estimator("score-function-loo-baseline", num_particles=1)
