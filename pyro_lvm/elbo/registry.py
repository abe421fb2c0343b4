"""The estimator registry: names used by the CLI, ``fit`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

__all__ = ["ESTIMATORS", "make_estimator"]


def _pyro_elbo(cls: type[ELBO], num_particles: int = 1, **kwargs) -> ELBO:
    kwargs.setdefault("vectorize_particles", True)
    kwargs.setdefault("max_plate_nesting", 1)
    return cls(num_particles=num_particles, **kwargs)


ESTIMATORS: dict[str, Callable[..., ELBO]] = {
    "elbo": partial(_pyro_elbo, Trace_ELBO),
    "elbo-analytic-kl": partial(_pyro_elbo, TraceMeanField_ELBO),
}


def make_estimator(name: str, num_particles: int = 1, **kwargs) -> ELBO:
    """Build the estimator registered as ``name`` with ``num_particles`` particles.

    :raises ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of: {', '.join(sorted(ESTIMATORS))}"
        )
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    return ESTIMATORS[name](num_particles=int(num_particles), **kwargs)
