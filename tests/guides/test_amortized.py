"""AmortizedGaussianGuide's clipped log-variance head (the VampPrior paper's Hardtanh)."""

import pyro
import pytest
import torch

from pyro_lvm.guides import AmortizedGaussianGuide
from pyro_lvm.models import VAE


def test_clipped_head_gives_bounded_scales_and_trains():
    torch.manual_seed(0)
    guide = AmortizedGaussianGuide(6, 3, hidden=(8,), log_var_range=(-6.0, 2.0))
    with torch.no_grad():
        guide.encoder[-1].bias[3:] = torch.tensor([-40.0, 40.0, 0.0])
    x = torch.rand(5, 6)
    loc, scale = guide.params(x)
    raw = guide.encoder(x)[..., 3:]
    torch.testing.assert_close(scale, raw.clamp(-6.0, 2.0).mul(0.5).exp())
    assert scale[:, 0].max() <= 0.0498 and scale[:, 1].min() >= 2.718
    # the clipped coordinates pass no gradient to the head; the free one does
    scale.sum().backward()
    bias_grad = guide.encoder[-1].bias.grad[3:]
    assert bias_grad[0] == 0 and bias_grad[1] == 0 and bias_grad[2] != 0
    # a VAE with this guide steps under SVI
    pyro.clear_param_store()
    vae = VAE(6, 3, hidden=(8,), guide=guide)
    svi = pyro.infer.SVI(vae, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    assert torch.isfinite(torch.tensor(svi.step(torch.bernoulli(x))))
    with pytest.raises(ValueError, match="log_var_range"):
        AmortizedGaussianGuide(6, 3, log_var_range=(0.0, 0.0))
