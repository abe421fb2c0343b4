"""Shared references for the evaluation tests: LinearGaussian with exact and mean-field guides."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_lvm.models import GaussianMixture, LinearGaussian
from pyro_lvm.plates import data_plate


class ExactPosteriorGuide:
    """q(z | x) = p(z | x) of a model with a ``posterior(x)`` method, in the data plate."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x, idx=None):
        with data_plate(x, idx):
            pyro.sample("z", self.model.posterior(x))


class MeanFieldGuide:
    """q(z | x) = N(posterior mean, (inflate * posterior marginal sd)²), diagonal."""

    def __init__(self, model, inflate=1.2):
        self.model, self.inflate = model, inflate

    def distribution(self, x):
        post = self.model.posterior(x)
        return dist.Normal(post.mean, self.inflate * post.variance.sqrt()).to_event(1)

    def mvn(self, x):
        """The same q as a MultivariateNormal (for torch's closed-form KL to the posterior)."""
        q = self.distribution(x).base_dist
        return dist.MultivariateNormal(q.loc, scale_tril=torch.diag_embed(q.scale))

    def __call__(self, x, idx=None):
        with data_plate(x, idx):
            pyro.sample("z", self.distribution(x))


@pytest.fixture
def linear_gaussian():
    """A LinearGaussian (D=4, d=2, σ=0.7) with a correlated posterior and 24 data points."""
    weight = torch.tensor([[1.0, 0.5], [0.3, -1.2], [0.8, 0.9], [-0.4, 0.2]])
    model = LinearGaussian(4, 2, noise_scale=0.7, weight=weight, bias=torch.linspace(-1, 1, 4))
    x = model.sample(24)
    return model, x


@pytest.fixture
def mixture():
    """A 3-component GaussianMixture in 2-D and 16 data points."""
    locs = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]])
    model = GaussianMixture(3, 2, locs=locs, scales=torch.full((3, 2), 0.9))
    return model, model.sample(16)


def closed_form_elbo(model: LinearGaussian, q: dist.MultivariateNormal, x: torch.Tensor):
    r"""E_q[log p(x|z)] + E_q[log p(z)] + H[q] for a Gaussian q on LinearGaussian.

    Returns ``(elbo, reconstruction, kl_to_prior)`` per data point.
    """
    w, b, s2 = model.weight, model.bias, model.noise_scale**2
    m, cov = q.mean, q.covariance_matrix
    resid = x - m @ w.T - b
    trace_wsw = torch.einsum("ij,njk,ik->n", w, cov, w)
    d_x, d_z = x.shape[-1], m.shape[-1]
    recon = -0.5 * d_x * torch.log(2 * torch.pi * s2) - (resid.pow(2).sum(-1) + trace_wsw) / (
        2 * s2
    )
    log_prior = -0.5 * d_z * torch.log(torch.tensor(2 * torch.pi)) - 0.5 * (
        m.pow(2).sum(-1) + torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
    )
    elbo = recon + log_prior + q.entropy()
    return elbo, recon, recon - elbo
