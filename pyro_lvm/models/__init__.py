"""Latent variable models: Pyro programs ``model(x, idx=None)`` with latent site ``"z"``."""

from pyro_lvm.models.linear_gaussian import LinearGaussian
from pyro_lvm.models.mixture import GaussianMixture
from pyro_lvm.models.priors import StandardNormalPrior
from pyro_lvm.models.vae import VAE

__all__ = ["GaussianMixture", "LinearGaussian", "StandardNormalPrior", "VAE"]
