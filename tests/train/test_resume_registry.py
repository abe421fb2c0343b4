"""Exact resume for every registered estimator (issue 16): a run stopped after one epoch and
resumed in a fresh setting (new objects, another global seed) takes exactly the steps of the
uninterrupted run, ``==`` on floats, with validation between epochs (which calls ``loss()``,
so an estimator that adapted its state there would break the equality)."""

import pyro
import pytest
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.elbo.registry import SPECS
from pyro_lvm.models import VAE
from pyro_lvm.train import fit


def _data(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 6), 0.3, dtype=torch.float64), generator=gen)


def _vae(init_seed):
    pyro.clear_param_store()
    torch.manual_seed(init_seed)
    vae = VAE(6, 2, hidden=(8,)).double()
    return vae, vae.guide


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_registered_estimator_resumes_exactly(tmp_path, name):
    k = max(2, SPECS[name].min_particles)
    # 40 rows in minibatches of 16: a shorter last minibatch, i.e. two input signatures
    kw = dict(batch_size=16, progress=False, seed=3, valid_data=_data(8, seed=1))
    train = _data(40, seed=0)
    straight = fit(*_vae(0), train, loss=make_estimator(name, k), num_epochs=3, **kw)
    path = tmp_path / "run.pt"
    fit(*_vae(0), train, loss=make_estimator(name, k), num_epochs=1, checkpoint=path, **kw)
    pyro.set_rng_seed(123)
    resumed = fit(
        *_vae(1), train, loss=make_estimator(name, k), num_epochs=3, checkpoint=path,
        resume=True, **kw,
    )  # fmt: skip
    assert len(straight.step_losses) == 9
    assert resumed.step_losses == straight.step_losses
    assert resumed.valid_elbos == straight.valid_elbos
