"""Estimators of the ELBO and of tighter bounds, as ``pyro.infer.ELBO`` subclasses.

``ESTIMATORS`` maps a name to a factory ``f(num_particles=1, **pyro_elbo_kwargs) -> ELBO``.
"""

from pyro_lvm.elbo.registry import ESTIMATORS, make_estimator

__all__ = ["ESTIMATORS", "make_estimator"]
