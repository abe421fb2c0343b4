"""NormalizedGradientAdam: Adam on per-tensor unit-norm gradients, in SVI, FastSVI and fit."""

import pyro
import pytest
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.models import VAE
from pyro_lvm.train import FastSVI, NormalizedGradientAdam, fit, normalized_gradient_adam


def _two_params():
    torch.manual_seed(0)
    return torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))


def _grads(step):
    g = torch.Generator().manual_seed(step)
    # tensors whose gradient scales differ by 1e4 and change from step to step
    return torch.randn(3, 4, generator=g) * 1e3 * (step + 1), torch.randn(5, generator=g) * 0.1


@pytest.mark.parametrize("foreach", [False, True])
def test_step_is_adams_step_on_the_normalized_gradient(foreach):
    ours, ref = _two_params(), _two_params()
    opt = NormalizedGradientAdam(ours, lr=0.01, foreach=foreach)
    ref_opt = torch.optim.Adam(ref, lr=0.01)
    for step in range(4):
        for p, q, g in zip(ours, ref, _grads(step), strict=True):
            p.grad = g.clone()
            q.grad = g / (g.norm() + 1e-7)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_a_rescaled_loss_gives_the_same_steps_and_a_zero_gradient_no_step():
    runs = []
    for scale in (1.0, 1e4):
        params = _two_params()
        opt = NormalizedGradientAdam(params, lr=0.05)
        for step in range(3):
            for p, g in zip(params, _grads(step), strict=True):
                p.grad = scale * g
            opt.step()
        runs.append(params)
    for p, q in zip(*runs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    w = torch.nn.Parameter(torch.ones(3))
    opt = NormalizedGradientAdam([w], lr=0.1)
    w.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(w, torch.ones(3))  # no NaN from 0 / 0
    with pytest.raises(ValueError, match="norm_eps"):
        NormalizedGradientAdam([w], norm_eps=0.0)


def _vae():
    pyro.clear_param_store()
    torch.manual_seed(1)
    return VAE(8, 2, hidden=(6,))


def test_fast_svi_and_pyro_svi_take_the_same_steps():
    x = torch.bernoulli(torch.full((16, 8), 0.4), generator=torch.Generator().manual_seed(2))
    finals = []
    for step_cls in (pyro.infer.SVI, FastSVI):
        vae = _vae()
        svi = step_cls(
            vae, vae.guide, normalized_gradient_adam({"lr": 0.01}), make_estimator("elbo")
        )
        pyro.set_rng_seed(3)
        losses = [svi.step(x) for _ in range(5)]
        finals.append((losses, [p.detach().clone() for p in vae.parameters()]))
    (l1, p1), (l2, p2) = finals
    assert l1 == pytest.approx(l2, rel=1e-5)
    for a, b in zip(p1, p2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True])
def test_fit_resumes_its_moments_exactly(tmp_path, fast):
    x = torch.bernoulli(torch.full((40, 8), 0.4), generator=torch.Generator().manual_seed(4))
    kw = dict(batch_size=10, progress=False, seed=5, fast=fast)
    straight = fit(
        *_pair(), x, num_epochs=3, optimizer=normalized_gradient_adam({"lr": 0.02}), **kw
    )
    path = tmp_path / "run.pt"
    fit(
        *_pair(),
        x,
        num_epochs=1,
        optimizer=normalized_gradient_adam({"lr": 0.02}),
        checkpoint=path,
        **kw,
    )
    resumed = fit(
        *_pair(),
        x,
        num_epochs=3,
        optimizer=normalized_gradient_adam({"lr": 0.02}),
        checkpoint=path,
        resume=True,
        **kw,
    )
    assert resumed.step_losses == straight.step_losses


def _pair():
    vae = _vae()
    return vae, vae.guide
