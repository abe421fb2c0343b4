"""Estimators of the ELBO and of tighter bounds, as ``pyro.infer.ELBO`` subclasses.

Every estimator derives from one family base (:mod:`pyro_lvm.elbo.base`) and is registered
once with :func:`register`; ``ESTIMATORS`` maps a name to a factory
``f(num_particles=1, **pyro_elbo_kwargs) -> ELBO`` and :data:`SPECS` holds its traits. What
an estimator instance is and can do (:class:`EstimatorTraits`) is asked with
:func:`traits_of`.
"""

from pyro_lvm.elbo.arm import ARM
from pyro_lvm.elbo.base import (
    Estimator,
    SurrogateELBO,
)
from pyro_lvm.elbo.baselines import DecayingAverageBaseline, NVILBaseline
from pyro_lvm.elbo.disarm import DisARM
from pyro_lvm.elbo.fivo import FIVO
from pyro_lvm.elbo.hmc_refined import HMCRefinedELBO
from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.mmd import MMDELBO, WAEMMD, InfoVAE, mmd
from pyro_lvm.elbo.multisample import (
    LogWeights,
    MultiSampleELBO,
    iter_importance_weights,
    log_weights,
)
from pyro_lvm.elbo.pyro_elbos import prepare_for_fit
from pyro_lvm.elbo.rebar import REBAR
from pyro_lvm.elbo.registry import (
    ESTIMATORS,
    SPECS,
    EstimatorSpec,
    estimator_table,
    make_estimator,
    names,
    register,
)
from pyro_lvm.elbo.relax import RELAX
from pyro_lvm.elbo.renyi import RenyiBound
from pyro_lvm.elbo.score_function import ScoreFunctionELBO
from pyro_lvm.elbo.stl import STL
from pyro_lvm.elbo.traits import EstimatorTraits, traits_of
from pyro_lvm.elbo.vimco import VIMCO

#: the names whose objective is the ELBO itself (their mean gradient is the ELBO's)
ELBO_NAMES = names("elbo")
#: the names of multi-sample bounds: ELBO at K = 1, between the ELBO and log p(x) for K > 1
BOUND_NAMES = names("bound")
#: objectives that are not bounds on log p(x) (InfoVAE, WAE)
DIVERGENCE_NAMES = names("divergence")
#: the ELBO's value with an MCMC-refined model gradient
REFINED_NAMES = names("refined")

__all__ = [
    "ARM",
    "BOUND_NAMES",
    "DIVERGENCE_NAMES",
    "DecayingAverageBaseline",
    "DisARM",
    "ELBO_NAMES",
    "ESTIMATORS",
    "Estimator",
    "EstimatorSpec",
    "EstimatorTraits",
    "FIVO",
    "HMCRefinedELBO",
    "IWAE",
    "InfoVAE",
    "LogWeights",
    "MMDELBO",
    "MultiSampleELBO",
    "NVILBaseline",
    "REBAR",
    "REFINED_NAMES",
    "RELAX",
    "RenyiBound",
    "SPECS",
    "STL",
    "ScoreFunctionELBO",
    "SurrogateELBO",
    "VIMCO",
    "WAEMMD",
    "estimator_table",
    "iter_importance_weights",
    "log_weights",
    "make_estimator",
    "mmd",
    "names",
    "prepare_for_fit",
    "register",
    "traits_of",
]
