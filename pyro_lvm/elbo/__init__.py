"""Estimators of the ELBO and of tighter bounds, as ``pyro.infer.ELBO`` subclasses.

``ESTIMATORS`` maps a name to a factory ``f(num_particles=1, **pyro_elbo_kwargs) -> ELBO``.
"""

from pyro_lvm.elbo.baselines import DecayingAverageBaseline, NVILBaseline
from pyro_lvm.elbo.fivo import FIVO
from pyro_lvm.elbo.hmc_refined import HMCRefinedELBO
from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.mmd import MMDELBO, WAEMMD, InfoVAE, mmd
from pyro_lvm.elbo.registry import (
    BOUND_NAMES,
    DIVERGENCE_NAMES,
    ELBO_NAMES,
    ESTIMATORS,
    REFINED_NAMES,
    make_estimator,
)
from pyro_lvm.elbo.renyi import RenyiBound
from pyro_lvm.elbo.score_function import ScoreFunctionELBO
from pyro_lvm.elbo.stl import STL
from pyro_lvm.elbo.vimco import VIMCO

__all__ = [
    "BOUND_NAMES",
    "DIVERGENCE_NAMES",
    "DecayingAverageBaseline",
    "ELBO_NAMES",
    "ESTIMATORS",
    "FIVO",
    "HMCRefinedELBO",
    "IWAE",
    "InfoVAE",
    "MMDELBO",
    "NVILBaseline",
    "REFINED_NAMES",
    "RenyiBound",
    "STL",
    "ScoreFunctionELBO",
    "VIMCO",
    "WAEMMD",
    "make_estimator",
    "mmd",
]
