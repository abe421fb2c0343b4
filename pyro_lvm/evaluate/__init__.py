"""Evaluation: IS and AIS (BDMC) log-likelihood, ELBO decomposition, gaps, collapse."""

from pyro_lvm.evaluate.ais import (
    AISResult,
    BDMCResult,
    ais_log_likelihood,
    annealing_schedule,
    bdmc,
)
from pyro_lvm.evaluate.collapse import (
    ActiveUnits,
    RateDistortion,
    active_units,
    kl_per_dimension,
    mutual_information,
    rate_distortion,
)
from pyro_lvm.evaluate.decomposition import ELBODecomposition, elbo_decomposition
from pyro_lvm.evaluate.gaps import GapResult, inference_gaps
from pyro_lvm.evaluate.latent import (
    class_samples,
    complete_quadrants,
    interpolate,
    reconstructions,
)
from pyro_lvm.evaluate.loglik import elbo_estimate, log_importance_weights, log_likelihood

__all__ = [
    "AISResult",
    "BDMCResult",
    "ais_log_likelihood",
    "annealing_schedule",
    "bdmc",
    "ActiveUnits",
    "ELBODecomposition",
    "GapResult",
    "inference_gaps",
    "RateDistortion",
    "active_units",
    "elbo_decomposition",
    "elbo_estimate",
    "kl_per_dimension",
    "log_importance_weights",
    "log_likelihood",
    "mutual_information",
    "rate_distortion",
    "class_samples",
    "complete_quadrants",
    "interpolate",
    "reconstructions",
]
