"""The estimator registry: names used by the CLI, ``fit`` and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_lvm.elbo.fivo import FIVO
from pyro_lvm.elbo.hmc_refined import HMCRefinedELBO
from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.mmd import WAEMMD, InfoVAE
from pyro_lvm.elbo.renyi import RenyiBound
from pyro_lvm.elbo.score_function import ScoreFunctionELBO
from pyro_lvm.elbo.stl import STL
from pyro_lvm.elbo.vimco import VIMCO

__all__ = [
    "BOUND_NAMES",
    "DIVERGENCE_NAMES",
    "ELBO_NAMES",
    "ESTIMATORS",
    "REFINED_NAMES",
    "make_estimator",
]


def _pyro_elbo(cls: type[ELBO], num_particles: int = 1, **kwargs) -> ELBO:
    kwargs.setdefault("vectorize_particles", True)
    kwargs.setdefault("max_plate_nesting", 1)
    return cls(num_particles=num_particles, **kwargs)


#: name -> factory ``f(num_particles=1, **kwargs) -> ELBO``; ``kwargs`` are Pyro's ``ELBO``
#: arguments plus the estimator's own (e.g. ``baseline_beta``). Every factory vectorizes the
#: particles and assumes one plate (``max_plate_nesting=1``) unless told otherwise.
ESTIMATORS: dict[str, Callable[..., ELBO]] = {
    "elbo": partial(_pyro_elbo, Trace_ELBO),
    "elbo-analytic-kl": partial(_pyro_elbo, TraceMeanField_ELBO),
    "score-function": partial(_pyro_elbo, ScoreFunctionELBO, baseline="none"),
    "score-function-avg-baseline": partial(_pyro_elbo, ScoreFunctionELBO, baseline="avg"),
    "score-function-loo-baseline": partial(_pyro_elbo, ScoreFunctionELBO, baseline="loo"),
    "score-function-nvil": partial(_pyro_elbo, ScoreFunctionELBO, baseline="nvil"),
    "stl": partial(_pyro_elbo, STL),
    "iwae": partial(_pyro_elbo, IWAE, gradient="reparam"),
    "iwae-stl": partial(_pyro_elbo, IWAE, gradient="stl"),
    "iwae-dreg": partial(_pyro_elbo, IWAE, gradient="dreg"),
    "vimco": partial(_pyro_elbo, VIMCO),
    "renyi": partial(_pyro_elbo, RenyiBound),
    # Alternative objectives: MMD between the minibatch's aggregate q(z) and p(z).
    "mmd-vae": partial(_pyro_elbo, InfoVAE),
    "wae-mmd": partial(_pyro_elbo, WAEMMD),
    # The ELBO for the encoder, HMC-refined posterior samples for the decoder (Hoffman 2017).
    "hmc-refined": partial(_pyro_elbo, HMCRefinedELBO),
    # SMC bounds over sequences (step-wise models; one step otherwise): pyro_lvm.elbo.fivo.
    "fivo": partial(_pyro_elbo, FIVO),
    "sequence-iwae": partial(_pyro_elbo, FIVO, resampling="none"),
}

#: the names whose objective is the ELBO itself (their mean gradient is the ELBO's); the
#: others estimate tighter multi-sample bounds that equal the ELBO only at K = 1, except
#: the :data:`DIVERGENCE_NAMES`.
ELBO_NAMES = frozenset(
    {
        "elbo",
        "elbo-analytic-kl",
        "score-function",
        "score-function-avg-baseline",
        "score-function-loo-baseline",
        "score-function-nvil",
        "stl",
    }
)

#: objectives that are not bounds on log p(x): the ELBO's KL term replaced or joined by a
#: divergence between the aggregate posterior and the prior (InfoVAE, WAE).
DIVERGENCE_NAMES = frozenset({"mmd-vae", "wae-mmd"})

#: estimators whose value is the ELBO but whose model gradient comes from MCMC-refined
#: posterior samples: neither an ELBO gradient nor a bound's.
REFINED_NAMES = frozenset({"hmc-refined"})

#: the names of multi-sample bounds: ELBO at K = 1, between the ELBO and log p(x) for K > 1.
BOUND_NAMES = frozenset(ESTIMATORS) - ELBO_NAMES - DIVERGENCE_NAMES - REFINED_NAMES


def make_estimator(name: str, num_particles: int = 1, **kwargs) -> ELBO:
    """Build the estimator registered as ``name`` with ``num_particles`` particles.

    :param name: a key of :data:`ESTIMATORS`.
    :param num_particles: K ≥ 1 (some estimators need K ≥ 2, e.g. leave-one-out baselines).
    :param kwargs: passed to the factory (Pyro's ``ELBO`` keyword arguments and the
        estimator's own).
    :raises ValueError: for an unknown name (the message lists the known ones) or a bad K.

    Example::

        elbo = make_estimator("score-function-loo-baseline", num_particles=8)
    """
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown estimator {name!r}; choose one of: {', '.join(sorted(ESTIMATORS))}"
        )
    if isinstance(num_particles, bool) or int(num_particles) != num_particles:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    return ESTIMATORS[name](num_particles=int(num_particles), **kwargs)
