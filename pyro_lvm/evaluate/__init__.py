"""Evaluation: importance-sampled log-likelihood, ELBO decomposition, collapse diagnostics."""

from pyro_lvm.evaluate.collapse import (
    ActiveUnits,
    RateDistortion,
    active_units,
    kl_per_dimension,
    mutual_information,
    rate_distortion,
)
from pyro_lvm.evaluate.decomposition import ELBODecomposition, elbo_decomposition
from pyro_lvm.evaluate.loglik import elbo_estimate, log_importance_weights, log_likelihood

__all__ = [
    "ActiveUnits",
    "ELBODecomposition",
    "RateDistortion",
    "active_units",
    "elbo_decomposition",
    "elbo_estimate",
    "kl_per_dimension",
    "log_importance_weights",
    "log_likelihood",
    "mutual_information",
    "rate_distortion",
]
