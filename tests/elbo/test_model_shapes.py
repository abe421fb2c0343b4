"""Every registered estimator on the model shapes of Pyro's own inference tests.

Shapes (after ``pyro/tests/infer/test_valid_models.py`` and ``test_gradient.py``): nested
plates, a subsampled plate with scaling, automatic ``dim`` allocation, masks, ``pyro.factor``,
a global latent above a local plate, a sequential plate, a discrete latent, a guide built on
Pyro's ``Planar`` flow (no inverse: STL, DReG and the score function rescore it by the
linearized inverse of ``pyro_lvm.elbo.rescore``); and models Pyro rejects. Each estimator
either agrees with Pyro's ``Trace_ELBO`` gradient in expectation or refuses the model with a
``ValueError`` listed in :data:`REFUSALS`; a rejected model is rejected by every estimator.

Vectorized z-test: each model runs R independent replicates inside an outer plate, with its
own copy of every parameter (a leading dim of size R), so one call gives R independent
gradient draws. Estimator and reference run under one seed (common random numbers), and per
coordinate the mean of the R paired differences must stay within Z = 5 standard errors
(R = 300; two-sided normal false-alarm rate 5.7e-7 per coordinate, ~2e-4 over the ~400
coordinates here). Seeds are fixed, so the outcome is deterministic.
Estimators whose expectation is not the ELBO at their smallest K run in their ELBO
configuration (``mmd-vae`` with α = 0, λ = 1; ``wae-mmd`` with λ = 0 against the KL-free
objective; ``hmc-refined`` with no HMC step); ``vimco`` (K ≥ 2) is compared with IWAE's plain
estimator at the same K, and the bounds also run at K = 3 against it where their expectation is
the IWAE gradient.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms.planar import ConditionedPlanar
from pyro.infer import Trace_ELBO

from pyro_lvm.elbo import ESTIMATORS, SPECS, make_estimator
from pyro_lvm.handlers import KLWeightedELBO

R = 300  # replicates per call
Z = 5.0
NAMES = sorted(ESTIMATORS)
X3 = torch.tensor([0.4, -1.1, 2.0])
X23 = torch.tensor([[0.4, -1.1, 2.0], [1.3, 0.2, -0.6]])
X6 = torch.tensor([0.4, -1.1, 2.0, 1.3, 0.2, -0.6])


def rep():
    return pyro.plate("rep", R, dim=-3)


def _p(name, shape, value):
    """A per-replicate parameter: leading dim R, ``shape`` broadcasting with the plates."""
    return pyro.param(name, lambda: torch.full((R, *shape), float(value)))


def _scale(name, shape):
    return pyro.param(
        name, lambda: torch.full((R, *shape), 0.8), constraint=dist.constraints.positive
    )


# ----- the shapes ------------------------------------------------------------------------


def nested_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.7), obs=X23)


def nested_guide(x):
    loc, scale = _p("q_loc", (2, 3), 0.1), _scale("q_scale", (2, 3))
    with rep(), pyro.plate("outer", 2, dim=-2), pyro.plate("inner", 3, dim=-1):
        pyro.sample("z", dist.Normal(loc, scale))


SUBSAMPLE = torch.tensor([1, 4, 5])  # fixed, so replicates are independent given it


def subsample_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("data", 6, subsample=SUBSAMPLE, dim=-1) as i:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.7), obs=X6[i])


def subsample_guide(x):
    loc, scale = _p("q_loc", (1, 6), 0.1), _scale("q_scale", (1, 6))
    with rep(), pyro.plate("data", 6, subsample=SUBSAMPLE, dim=-1) as i:
        pyro.sample("z", dist.Normal(loc[..., i], scale[..., i]))


def auto_dim_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("a", 3), pyro.plate("b", 2):  # dims allocated: a -1, b -2
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.7), obs=X23)


def auto_dim_guide(x):
    loc, scale = _p("q_loc", (2, 3), 0.1), _scale("q_scale", (2, 3))
    with rep(), pyro.plate("a", 3), pyro.plate("b", 2):
        pyro.sample("z", dist.Normal(loc, scale))


MASK = torch.tensor([True, False, True])


def mask_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("data", 3, dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        with poutine.mask(mask=MASK):
            pyro.sample("x", dist.Normal(z, 0.7), obs=X3)


def local_guide(x):
    loc, scale = _p("q_loc", (1, 3), 0.1), _scale("q_scale", (1, 3))
    with rep(), pyro.plate("data", 3, dim=-1):
        pyro.sample("z", dist.Normal(loc, scale))


def factor_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("data", 3, dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.factor("f", -0.5 * (z - X3).pow(2) / 0.49)


def global_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep():
        g = pyro.sample("g", dist.Normal(loc, 1.0))
        with pyro.plate("data", 3, dim=-1):
            z = pyro.sample("z", dist.Normal(g, 1.0))
            pyro.sample("x", dist.Normal(z, 0.7), obs=X3)


def global_guide(x):
    g_loc, g_scale = _p("g_loc", (1, 1), 0.0), _scale("g_scale", (1, 1))
    loc, scale = _p("q_loc", (1, 3), 0.1), _scale("q_scale", (1, 3))
    with rep():
        pyro.sample("g", dist.Normal(g_loc, g_scale))
        with pyro.plate("data", 3, dim=-1):
            pyro.sample("z", dist.Normal(loc, scale))


def sequential_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep():
        for i in pyro.plate("seq", 3):
            z = pyro.sample(f"z_{i}", dist.Normal(loc, 1.0))
            pyro.sample(f"x_{i}", dist.Normal(z, 0.7), obs=X3[i])


def sequential_guide(x):
    loc, scale = _p("q_loc", (1, 3), 0.1), _scale("q_scale", (1, 3))
    with rep():
        for i in pyro.plate("seq", 3):
            pyro.sample(f"z_{i}", dist.Normal(loc[..., i : i + 1], scale[..., i : i + 1]))


def discrete_model(x):
    loc = _p("m_loc", (1, 1), 0.3)
    with rep(), pyro.plate("data", 3, dim=-1):
        z = pyro.sample("z", dist.Bernoulli(0.4))
        pyro.sample("x", dist.Normal(loc + 1.5 * z, 0.7), obs=X3)


def discrete_guide(x):
    logit = _p("q_logit", (1, 3), 0.2)
    with rep(), pyro.plate("data", 3, dim=-1):
        pyro.sample("z", dist.Bernoulli(logits=logit))


X32 = torch.tensor([[0.4, -1.1], [2.0, 1.3], [0.2, -0.6]])


def _per_rep(name, values):
    return pyro.param(name, lambda: torch.tensor(values).expand(R, 1, 1, len(values)).clone())


def flow_model(x):
    loc = _p("m_loc", (1, 1, 1), 0.3)
    with rep(), pyro.plate("data", 3, dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0).expand([R, 1, 3, 2]).to_event(1))
        pyro.sample("x", dist.Normal(z, 0.7).to_event(1), obs=X32)


def planar_guide(x):
    """Pyro's Planar transform (no inverse; caches its sample by identity) on a Gaussian."""
    loc, scale = _p("q_loc", (1, 3, 2), 0.1), _scale("q_scale", (1, 3, 2))
    params = _per_rep("bias", [0.2]), _per_rep("u", [0.9, -0.4]), _per_rep("w", [0.5, 0.8])
    with rep(), pyro.plate("data", 3, dim=-1):
        base = dist.Normal(loc, scale).to_event(1)
        pyro.sample("z", dist.TransformedDistribution(base, [ConditionedPlanar(params)]))


SHAPES = {
    "nested-plates": (nested_model, nested_guide),
    "subsample-scaled": (subsample_model, subsample_guide),
    "auto-dims": (auto_dim_model, auto_dim_guide),
    "mask": (mask_model, local_guide),
    "factor": (factor_model, local_guide),
    "global-and-local": (global_model, global_guide),
    "sequential-plate": (sequential_model, sequential_guide),
    "discrete": (discrete_model, discrete_guide),
    "planar-flow": (flow_model, planar_guide),
}

X_ARG = X3.unsqueeze(-1)  # the models' first argument: a (3, 1) data matrix (NVIL's input)

#: (name, shape) -> the refusal expected (a regex of the ValueError/NotImplementedError)
REFUSALS = {
    **{(name, "discrete"): "reparam" for name in NAMES if SPECS[name].sites == "reparam"},
    # NVIL's b(x) has one value per row of the (3, 1) data matrix; it refuses learning signals
    # it does not broadcast to (a global site's, a sequential plate's scalar sites)
    ("score-function-nvil", "global-and-local"): "does not broadcast",
    ("score-function-nvil", "sequential-plate"): "does not broadcast",
}


# ----- configurations and the z-test -----------------------------------------------------


def _estimator(name: str, k: int):
    if name == "mmd-vae":
        return make_estimator(name, k, alpha=0.0, lam=1.0)  # the ELBO: no MMD term
    if name == "wae-mmd":
        return make_estimator(name, k, lam=0.0)  # reconstruction only
    if name == "hmc-refined":
        return make_estimator(name, k, num_hmc_steps=0)
    return make_estimator(name, k)


def _reference(name: str, k: int):
    if name == "wae-mmd":
        return KLWeightedELBO(make_estimator("elbo", k), 0.0)
    if k > 1 and SPECS[name].category == "bound":
        return make_estimator("iwae", k, score_baseline="none")
    return make_estimator("elbo", k)


def _draws(estimator, shape: str, seed: int) -> dict[str, torch.Tensor]:
    """R independent gradient draws per parameter, as ``(R, numel)`` matrices."""
    model, guide = SHAPES[shape]
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    loss = estimator.differentiable_loss(model, guide, X_ARG)
    # the shapes' per-replicate parameters (shared estimator parameters: an NVIL baseline
    # network, REBAR's and RELAX's control variates, are left out)
    store = {
        name: p
        for name, p in pyro.get_param_store().named_parameters()
        if not name.startswith(("nvil_baseline", "rebar_", "relax_"))
    }
    grads = torch.autograd.grad(loss, list(store.values()), allow_unused=True)
    return {
        name: (torch.zeros_like(p) if g is None else g).reshape(R, -1)
        for (name, p), g in zip(store.items(), grads, strict=True)
    }


def _agree(a: dict, b: dict, label: str) -> None:
    """Paired z-test: draw r of both comes from replicate r under one seed (common random
    numbers), so the R differences are independent and their mean must be 0 within Z se."""
    assert a.keys() == b.keys(), label
    nontrivial = False
    for param in a:
        d = a[param] - b[param]
        diff, se = d.mean(0), d.std(0) / R**0.5
        assert (diff.abs() <= Z * se + 1e-9).all(), (label, param, diff, se)
        nontrivial |= bool((b[param].mean(0).abs() > Z * b[param].std(0) / R**0.5).any())
    assert nontrivial, f"{label}: no gradient coordinate distinguishable from zero"


def _run_or_refuse(name: str, shape: str, k: int) -> None:
    estimator = _estimator(name, k)
    expected = REFUSALS.get((name, shape))
    if expected is not None:
        with pytest.raises((ValueError, NotImplementedError), match=expected):
            _draws(estimator, shape, seed=1)
        return
    _agree(_draws(estimator, shape, seed=1), _draws(_reference(name, k), shape, seed=1), name)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("name", NAMES)
def test_agrees_with_trace_elbo_or_refuses(name, shape):
    _run_or_refuse(name, shape, SPECS[name].min_particles)


@pytest.mark.parametrize("shape", ["nested-plates", "global-and-local", "discrete", "planar-flow"])
@pytest.mark.parametrize("name", ["iwae", "iwae-dreg", "vimco"])
def test_bounds_at_three_particles_agree_with_the_plain_iwae_estimator(name, shape):
    _run_or_refuse(name, shape, 3)


# ----- models Pyro rejects ---------------------------------------------------------------


def batch_mismatch_model(x):
    with pyro.plate("data", 3, dim=-1):
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0))


def batch_mismatch_guide(x):
    with pyro.plate("data", 3, dim=-1):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))


def shape_mismatch_model(x):
    pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))


def shape_mismatch_guide(x):
    pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def guide_plate_model(x):
    pyro.sample("z", dist.Normal(0.0, 1.0))


def guide_plate_guide(x):
    with pyro.plate("extra", 2, dim=-1):
        pyro.sample("z", dist.Normal(0.0, 1.0))


INVALID = {
    "batch-shape-mismatch": (batch_mismatch_model, batch_mismatch_guide),
    "model-guide-shapes-disagree": (shape_mismatch_model, shape_mismatch_guide),
    "guide-plate-not-in-model": (guide_plate_model, guide_plate_guide),
}


@pytest.mark.parametrize("shape", sorted(INVALID))
def test_pyro_rejects_these(shape):
    model, guide = INVALID[shape]
    with pytest.raises(ValueError):
        Trace_ELBO().loss(model, guide, X_ARG)


@pytest.mark.parametrize("shape", sorted(INVALID))
@pytest.mark.parametrize("name", NAMES)
def test_every_estimator_rejects_what_pyro_rejects(name, shape):
    model, guide = INVALID[shape]
    with pytest.raises(ValueError):
        make_estimator(name, max(SPECS[name].min_particles, 2)).loss(model, guide, X_ARG)
