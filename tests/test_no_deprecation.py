"""No deprecation warning reaches a user of fit, FastSVI, the inner loop or gradient_moments.

The captured paths run here (fit's default FastSVI step with a KL schedule, the per-datapoint
inner loop, gradient_moments' captured draws), with every warning recorded: none may be a
``DeprecationWarning``, ``PendingDeprecationWarning`` or ``FutureWarning`` from any module
(the earlier ``torch.jit.trace`` engine raised one on every trace), and none may come from a
``pyro_lvm`` module other than a deliberate ``UserWarning``.
"""

import warnings

import pyro
import torch

from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.handlers import KLWeightedELBO, linear_schedule
from pyro_lvm.inner_loop import optimize_local
from pyro_lvm.models import VAE
from pyro_lvm.train import FastSVI, fit
from pyro_lvm.variance import gradient_moments

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def test_captured_paths_raise_no_deprecation_warning():
    data = torch.bernoulli(torch.full((40, 8), 0.4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae = VAE(8, 2, (6,))
        fit(vae, vae.guide, data, loss="iwae-dreg", num_particles=3, batch_size=10, progress=False)
        m = gradient_moments(make_estimator("elbo", 2), vae, vae.guide, data[:10], num_draws=4)
        pyro.clear_param_store()  # the modules below reuse the parameter names
        schedule = linear_schedule(num_steps=10)
        other = VAE(8, 2, (6,))
        loss = KLWeightedELBO(make_estimator("elbo"), schedule)
        svi = FastSVI(other, other.guide, pyro.optim.Adam({"lr": 1e-2}), loss)
        for _ in range(6):
            svi.step(data[:10])
            schedule.step()
        local = VAE(8, 2, (6,), num_data=40)
        idx = torch.arange(10)
        pyro.clear_param_store()
        optimize_local(local, LocalGaussianGuide(40, 2), data[:10], idx, max_steps=4, tol=0.0)
    assert svi.traced_steps == 3 and m.path == "traced"  # the captured paths did run
    bad = [
        f"{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, DEPRECATIONS) or "pyro_lvm" in w.filename
    ]
    assert not bad, "\n".join(bad)
