"""VAE: shapes, both likelihoods, sampling, and an SVI step through Pyro."""

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_lvm.models import VAE


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_svi_step_trains_every_parameter(likelihood):
    vae = VAE(12, 3, hidden=(16, 8), likelihood=likelihood)
    x = torch.bernoulli(torch.full((20, 12), 0.4))
    svi = SVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    before = {k: v.detach().clone() for k, v in vae.named_parameters()}
    losses = [svi.step(x) for _ in range(30)]
    assert losses[-1] < losses[0]
    for name, value in vae.named_parameters():
        assert not torch.equal(value, before[name]), name


def test_shapes_and_ancestral_sampling():
    vae = VAE(10, 2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 10), 0.5))
    assert vae.encode(x).batch_shape == (5,) and vae.encode(x).event_shape == (2,)
    assert vae.reconstruct(x).shape == (5, 10)
    samples = vae.sample(7, mean=False)
    assert samples.shape == (7, 10) and set(samples.unique().tolist()) <= {0.0, 1.0}
    assert vae.decode(torch.zeros(3, 4, 2)).batch_shape == (3, 4)


def test_num_data_is_shared_with_the_guide():
    vae = VAE(10, 2, hidden=(8,))
    vae.num_data = 50
    assert vae.guide.num_data == 50
    tr = pyro.poutine.trace(vae.guide).get_trace(torch.zeros(5, 10), torch.arange(5))
    tr.compute_log_prob()
    assert tr.nodes["z"]["scale"] == pytest.approx(10.0)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="likelihood"):
        VAE(4, 2, likelihood="poisson")
    vae = VAE(4, 2)
    with pytest.raises(ValueError, match="x_dim=4"):
        vae(torch.zeros(3, 5))
