"""The estimator registry: one registration per name, carrying its category and capabilities.

Register a class (or any factory ``f(num_particles=..., **kwargs) -> ELBO``) with the
:func:`register` decorator; :data:`ESTIMATORS`, :func:`make_estimator`, the CLI's choices,
:func:`estimator_table` (the README's table) and the contract tests all derive from it::

    @register("my-bound", "bound", sites="reparam")
    class MyBound(MultiSampleELBO):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from pyro.infer import ELBO

from pyro_lvm.elbo.pyro_elbos import Trace_ELBO, TraceMeanField_ELBO

__all__ = [
    "CATEGORIES",
    "ESTIMATORS",
    "SITES",
    "SPECS",
    "EstimatorSpec",
    "estimator_table",
    "make_estimator",
    "names",
    "register",
]

#: what an estimator's value is: the ELBO itself; a multi-sample bound (the ELBO at K = 1,
#: between the ELBO and log p(x) for K > 1); an objective that is not a bound on log p(x)
#: (a divergence between aggregate posterior and prior); the ELBO with an MCMC-refined model
#: gradient (neither an ELBO gradient nor a bound's).
CATEGORIES = ("elbo", "bound", "divergence", "refined")

#: which guide sites an estimator handles: ``"any"`` (reparameterized ones pathwise, the
#: others by score function), ``"reparam"`` (every guide site needs ``rsample``) or
#: ``"bernoulli"`` (Bernoulli sites by the method's own estimator, reparameterized ones
#: pathwise, any other site refused).
SITES = ("any", "reparam", "bernoulli")


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator.

    :ivar name: the registry name (CLI ``--estimator``).
    :ivar factory: ``f(num_particles=1, **kwargs) -> ELBO``.
    :ivar category: one of :data:`CATEGORIES`.
    :ivar sites: one of :data:`SITES`.
    :ivar min_particles: the smallest K it accepts.
    :ivar summary: one line for the docs table.
    :ivar module: the module that defines the registered class or function.
    """

    name: str
    factory: Callable[..., ELBO]
    category: str
    sites: str
    min_particles: int
    summary: str
    module: str = ""


#: name -> :class:`EstimatorSpec`, in registration order
SPECS: dict[str, EstimatorSpec] = {}

#: name -> factory ``f(num_particles=1, **kwargs) -> ELBO``; ``kwargs`` are Pyro's ``ELBO``
#: arguments plus the estimator's own (e.g. ``baseline_beta``). Every factory vectorizes the
#: particles; ``max_plate_nesting`` is guessed on the first call as Pyro does, unless given.
ESTIMATORS: dict[str, Callable[..., ELBO]] = {}


def register(
    name: str,
    category: str,
    *,
    sites: str = "any",
    min_particles: int | None = None,
    summary: str | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., ELBO]], Callable[..., ELBO]]:
    """Class/factory decorator registering ``name``; returns the decorated object unchanged.

    :param name: the registry name, unique.
    :param category: one of :data:`CATEGORIES`.
    :param sites: one of :data:`SITES`.
    :param min_particles: the smallest K (default: the class's ``min_particles``, else 1).
    :param summary: a line for the docs table (default: the first line of the docstring).
    :param defaults: keyword arguments bound into the factory (one class, several names).
    :raises ValueError: on a taken name, an unknown category or site kind.
    """
    if name in SPECS:
        raise ValueError(f"estimator {name!r} is registered already; choose another name")
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if sites not in SITES:
        raise ValueError(f"sites must be one of {SITES}, got {sites!r}")

    def decorate(target: Callable[..., ELBO]) -> Callable[..., ELBO]:
        factory = partial(target, **defaults) if defaults else target
        doc = (getattr(target, "__doc__", None) or name).strip().splitlines()[0]
        SPECS[name] = EstimatorSpec(
            name=name,
            factory=factory,
            category=category,
            sites=sites,
            min_particles=int(
                min_particles if min_particles is not None else getattr(target, "min_particles", 1)
            ),
            summary=summary or doc,
            module=getattr(getattr(target, "func", target), "__module__", "") or "",
        )
        ESTIMATORS[name] = factory
        return target

    return decorate


def names(category: str) -> frozenset[str]:
    """The registered names of one category (see :data:`CATEGORIES`)."""
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    return frozenset(n for n, spec in SPECS.items() if spec.category == category)


_LEGACY = {
    "ELBO_NAMES": "elbo",
    "BOUND_NAMES": "bound",
    "DIVERGENCE_NAMES": "divergence",
    "REFINED_NAMES": "refined",
}


def __getattr__(attr: str) -> frozenset[str]:
    # ELBO_NAMES, BOUND_NAMES, ...: derived from the registrations when asked for
    if attr in _LEGACY:
        return names(_LEGACY[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def make_estimator(name: str, num_particles: int = 1, **kwargs: Any) -> ELBO:
    """Build the estimator registered as ``name`` with ``num_particles`` particles.

    :param name: a key of :data:`ESTIMATORS`.
    :param num_particles: K ≥ the estimator's ``min_particles``.
    :param kwargs: passed to the factory (Pyro's ``ELBO`` keyword arguments and the
        estimator's own).
    :raises ValueError: for an unknown name (the message lists the known ones) or a bad K.

    Example::

        elbo = make_estimator("score-function-loo-baseline", num_particles=8)
    """
    if name not in SPECS:
        raise ValueError(f"unknown estimator {name!r}; choose one of: {', '.join(sorted(SPECS))}")
    if isinstance(num_particles, bool) or int(num_particles) != num_particles:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles!r}")
    if int(num_particles) < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")
    spec = SPECS[name]
    if int(num_particles) < spec.min_particles:
        raise ValueError(
            f"{name!r} needs num_particles >= {spec.min_particles}, got {num_particles}; pass "
            f"num_particles={spec.min_particles} or more"
        )
    return spec.factory(num_particles=int(num_particles), **kwargs)


def estimator_table(only: Iterable[str] | None = None) -> str:
    """The registry as a markdown table (name, category, guide sites, K, summary).

    :param only: the names to list, in registration order (default: all).
    """
    rows = [
        "| name | category | guide sites | K | what it is |",
        "| --- | --- | --- | --- | --- |",
    ]
    keep = None if only is None else set(only)
    for spec in SPECS.values():
        if keep is not None and spec.name not in keep:
            continue
        k = f"≥ {spec.min_particles}"
        rows.append(f"| `{spec.name}` | {spec.category} | {spec.sites} | {k} | {spec.summary} |")
    return "\n".join(rows)


def _pyro_elbo(cls: type[ELBO], num_particles: int = 1, **kwargs: Any) -> ELBO:
    kwargs.setdefault("vectorize_particles", True)
    return cls(num_particles=num_particles, **kwargs)


register("elbo", "elbo", summary="Pyro's `Trace_ELBO`")(partial(_pyro_elbo, Trace_ELBO))
register(
    "elbo-analytic-kl",
    "elbo",
    sites="reparam",
    summary="Pyro's `TraceMeanField_ELBO` (analytic KL where registered)",
)(partial(_pyro_elbo, TraceMeanField_ELBO))
