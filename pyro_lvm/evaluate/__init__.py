"""Evaluation: importance-sampled log-likelihood, ELBO decomposition (later: gaps, collapse)."""

from pyro_lvm.evaluate.decomposition import ELBODecomposition, elbo_decomposition
from pyro_lvm.evaluate.loglik import elbo_estimate, log_importance_weights, log_likelihood

__all__ = [
    "ELBODecomposition",
    "elbo_decomposition",
    "elbo_estimate",
    "log_importance_weights",
    "log_likelihood",
]
