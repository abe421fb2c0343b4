"""Semi-amortized guide: T = 0 is the encoder, refinement raises the ELBO, gradients flow."""

import pytest
import torch
from pyro import poutine

from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import log_importance_weights
from pyro_lvm.guides import AmortizedGaussianGuide, SemiAmortizedGuide
from pyro_lvm.models import LinearGaussian


def _setup(n=10):
    model = LinearGaussian(4, 2, noise_scale=0.5)
    x = model.sample(n)
    enc = AmortizedGaussianGuide(4, 2, hidden=(8,))
    return model, x, enc


def test_zero_steps_is_the_encoder_and_inner_sites_are_hidden():
    model, x, enc = _setup()
    sa = SemiAmortizedGuide(model, enc, eval_steps=0, train_steps=0)
    tr = poutine.trace(sa).get_trace(x)
    ref = enc.posterior(x)
    assert torch.allclose(tr.nodes["z"]["fn"].log_prob(tr.nodes["z"]["value"]),
                          ref.log_prob(tr.nodes["z"]["value"]))  # fmt: skip
    sa.eval_steps = 3
    sa.eval()
    tr = poutine.trace(sa).get_trace(x)
    samples = [name for name, site in tr.nodes.items() if site["type"] == "sample"]
    assert samples == ["data", "z"]  # the inner ELBO's sites never reach outer handlers
    with pytest.raises(ValueError, match="params"):
        SemiAmortizedGuide(model, lambda x, idx=None: None)


def test_refinement_raises_the_elbo():
    model, x, enc = _setup()
    sa = SemiAmortizedGuide(model, enc, eval_steps=20, step_size=0.05, num_particles=2)
    sa.eval()
    k = 400
    lw_enc = log_importance_weights(model, enc, x, k)
    lw_sa = log_importance_weights(model, sa, x, k)
    diff = lw_sa.mean(0) - lw_enc.mean(0)
    se = (lw_sa.var(0) / k + lw_enc.var(0) / k).sqrt()
    # independent samples: each point's improvement is significant at z = 4.5
    assert torch.all(diff > 4.5 * se)
    # and the refined loc moved toward the exact posterior mean
    post = model.posterior(x).loc.detach()
    with torch.no_grad():
        loc0, _ = enc.params(x)
    loc_t, _ = sa.refine(x)
    assert float((loc_t.detach() - post).norm()) < float((loc0 - post).norm())


def test_gradients_flow_through_refinement():
    model, x, enc = _setup(6)
    elbo = make_estimator("elbo", num_particles=2)
    grads = {}
    for differentiable in (True, False):
        sa = SemiAmortizedGuide(model, enc, train_steps=3, step_size=0.1,
                                differentiable=differentiable)  # fmt: skip
        sa.train()
        torch.manual_seed(3)
        loss = elbo.differentiable_loss(model, sa, x)
        grads[differentiable] = torch.autograd.grad(loss, list(enc.parameters()))
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads[differentiable])
    # the unrolled gradient includes the Jacobian of the steps; straight-through does not
    assert not all(torch.allclose(a, b) for a, b in zip(grads[True], grads[False], strict=False))


@pytest.mark.parametrize("num_particles", [1, 5])
def test_each_refinement_step_traces_the_model_once_for_all_particles(num_particles):
    """K particles are one vectorized trace per step (not K traces, nor K² as before)."""
    model, x, enc = _setup()
    calls = []

    def counted(x, idx=None):
        calls.append(x.shape)
        return model(x, idx)

    sa = SemiAmortizedGuide(counted, enc, eval_steps=3, num_particles=num_particles)
    sa.eval()
    sa.refine(x)
    calls.clear()
    loc, scale = sa.refine(x)
    assert len(calls) == 3 and loc.shape == (10, 2) and scale.shape == (10, 2)


def test_inner_loss_must_be_an_elbo_or_a_per_point_bound():
    model, x, enc = _setup(4)
    for name in ("iwae-dreg", "fivo", "nope"):
        with pytest.raises(ValueError, match="inner_loss must name an ELBO estimator or a multi"):
            SemiAmortizedGuide(model, enc, inner_loss=name, num_particles=3)
    with pytest.raises(ValueError, match="num_particles"):
        SemiAmortizedGuide(model, enc, inner_loss="vimco", num_particles=1)


@pytest.mark.parametrize("name", ["iwae", "iwae-stl", "renyi", "vimco"])
def test_a_bound_as_inner_loss_is_the_bound_of_the_copies_as_particles(name):
    """The K copies of each data point are that point's K particles: the inner loss and its
    gradient equal the bound's with a particle plate, under one seed (the same draws: the
    copies are laid out particle-major, as the plate's sample is)."""
    import pyro
    import pyro.distributions as dist
    import torch.nn.functional as F

    from pyro_lvm.plates import data_plate

    model, x, enc = _setup(5)
    sa = SemiAmortizedGuide(model, enc, inner_loss=name, num_particles=3)
    loc, raw = (t.detach().requires_grad_() for t in enc.params(x))

    def guide(x, idx=None):
        with data_plate(x):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))

    pyro.set_rng_seed(4)
    inner = sa._inner_loss(x, loc, raw)
    got = torch.autograd.grad(inner, [loc, raw])
    pyro.set_rng_seed(4)
    ref_loss = make_estimator(name, 3).differentiable_loss(model, guide, x)
    ref = torch.autograd.grad(ref_loss, [loc, raw])
    torch.testing.assert_close(inner, ref_loss)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
