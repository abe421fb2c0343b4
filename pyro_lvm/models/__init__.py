"""Latent variable models: Pyro programs ``model(x, idx=None)`` with latent site ``"z"``."""

from pyro_lvm.models.bernoulli_mixture import BernoulliMixture, CompletionModel
from pyro_lvm.models.linear_gaussian import LinearGaussian
from pyro_lvm.models.mixture import GaussianMixture
from pyro_lvm.models.priors import StandardNormalPrior
from pyro_lvm.models.vae import VAE

__all__ = ["GaussianMixture", "LinearGaussian", "StandardNormalPrior", "VAE"]
__all__ += ["BernoulliMixture", "CompletionModel"]
from pyro_lvm.models.hierarchical import HierarchicalGuide, HierarchicalVAE  # noqa: E402
from pyro_lvm.models.priors import MixtureOfGaussiansPrior, VampPrior  # noqa: E402

__all__ += ["HierarchicalGuide", "HierarchicalVAE", "MixtureOfGaussiansPrior", "VampPrior"]
from pyro_lvm.models.conditional import ConditionalVAE  # noqa: E402
from pyro_lvm.models.discrete import DiscreteVAE, TemperatureSchedule  # noqa: E402
from pyro_lvm.models.semi_supervised import M2  # noqa: E402

__all__ += ["ConditionalVAE", "DiscreteVAE", "M2", "TemperatureSchedule"]

from pyro_lvm.models.dmm import DeepMarkovModel  # noqa: E402
from pyro_lvm.models.ssm import LinearGaussianSSM, SSMPosterior  # noqa: E402
from pyro_lvm.sequential import SequentialProgram  # noqa: E402

__all__ += ["DeepMarkovModel", "LinearGaussianSSM", "SSMPosterior", "SequentialProgram"]

# every model and guide class records the call that built it, so a run comes back with
# pyro_lvm.load_run (pyro_lvm.spec)
import torch as _torch  # noqa: E402

from pyro_lvm.spec import recorded as _recorded  # noqa: E402

for _cls in [globals()[_name] for _name in __all__]:
    if isinstance(_cls, type) and issubclass(_cls, _torch.nn.Module):
        _recorded(_cls)
