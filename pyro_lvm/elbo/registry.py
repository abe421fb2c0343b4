"""The estimator registry: one registration per name; what each can do comes from its traits.

Register a class (or any factory ``f(num_particles=..., **kwargs) -> ELBO``) with the
:func:`register` decorator; :data:`ESTIMATORS`, :func:`make_estimator`, the CLI's choices,
:func:`estimator_table` (the README's table) and the contract tests all derive from it. What
the estimator is and can do (category, guide sites, particles, state, capture, gradient) is
the class's :class:`~pyro_lvm.elbo.traits.EstimatorTraits`, read with the registration's
bound arguments::

    @register("my-bound", summary="my multi-sample bound")
    class MyBound(MultiSampleELBO):
        traits = replace(MultiSampleELBO.traits, sites="reparam")
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from pyro.infer import ELBO

from pyro_lvm.elbo.pyro_elbos import Trace_ELBO, TraceMeanField_ELBO
from pyro_lvm.elbo.traits import CATEGORIES, SITES, EstimatorTraits, declared_traits, traits_of

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


@dataclass(frozen=True)
class EstimatorSpec:
    """One registered estimator.

    :ivar name: the registry name (CLI ``--estimator``).
    :ivar factory: ``f(num_particles=1, **kwargs) -> ELBO``.
    :ivar traits: what every instance the factory builds is and can do
        (``traits_of(factory(...)) == traits``, a contract test checks it).
    :ivar summary: one line for the docs table.
    :ivar module: the module that defines the registered class or function.
    """

    name: str
    factory: Callable[..., ELBO]
    traits: EstimatorTraits
    summary: str
    module: str = ""

    @property
    def category(self) -> str:
        """``traits.category``."""
        return self.traits.category

    @property
    def sites(self) -> str:
        """``traits.sites``."""
        return self.traits.sites

    @property
    def min_particles(self) -> int:
        """``traits.min_particles``."""
        return self.traits.min_particles


#: name -> :class:`EstimatorSpec`, in registration order
SPECS: dict[str, EstimatorSpec] = {}

#: name -> factory ``f(num_particles=1, **kwargs) -> ELBO``; ``kwargs`` are Pyro's ``ELBO``
#: arguments plus the estimator's own (e.g. ``baseline_beta``). Every factory vectorizes the
#: particles; ``max_plate_nesting`` is guessed on the first call as Pyro does, unless given.
ESTIMATORS: dict[str, Callable[..., ELBO]] = {}


def _stamped(factory: Callable[..., ELBO], traits: EstimatorTraits) -> Callable[..., ELBO]:
    """A factory whose instances carry ``traits`` (a registration that narrows its class's)."""

    def build(*args: Any, **kwargs: Any) -> ELBO:
        estimator = factory(*args, **kwargs)
        estimator.traits = traits
        return estimator

    return build


def register(
    name: str,
    category: str | None = None,
    *,
    sites: str | None = None,
    min_particles: int | None = None,
    summary: str | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., ELBO]], Callable[..., ELBO]]:
    """Class/factory decorator registering ``name``; returns the decorated object unchanged.

    The name's traits are the class's (:func:`~pyro_lvm.elbo.traits.declared_traits` with
    ``defaults`` as its constructor arguments); a factory that is not such a class is built
    once, with ``min_particles`` particles, and asked (:func:`~pyro_lvm.elbo.traits_of`).
    ``category``, ``sites`` and ``min_particles``, where given, replace the corresponding
    traits for this name only (its instances carry the result); leave them out when the
    class declares them.

    :param name: the registry name, unique.
    :param category: one of :data:`CATEGORIES` (default: the class's).
    :param sites: one of :data:`SITES` (default: the class's).
    :param min_particles: the smallest K (default: the class's).
    :param summary: a line for the docs table (default: the first line of the docstring).
    :param defaults: keyword arguments bound into the factory (one class, several names).
    :raises ValueError: on a taken name, an unknown category or site kind.
    """
    if name in SPECS:
        raise ValueError(f"estimator {name!r} is registered already; choose another name")
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    if sites is not None and sites not in SITES:
        raise ValueError(f"sites must be one of {SITES}, got {sites!r}")
    given = {"category": category, "sites": sites, "min_particles": min_particles}
    overrides = {k: v for k, v in given.items() if v is not None}

    def decorate(target: Callable[..., ELBO]) -> Callable[..., ELBO]:
        factory = partial(target, **defaults) if defaults else target
        declared = declared_traits(target, **defaults) if isinstance(target, type) else None
        if declared is None:
            declared = traits_of(factory(num_particles=int(min_particles or 1)))
        traits = replace(declared, **overrides)
        if traits != declared:
            factory = _stamped(factory, traits)
        doc = (getattr(target, "__doc__", None) or name).strip().splitlines()[0]
        SPECS[name] = EstimatorSpec(
            name=name,
            factory=factory,
            traits=traits,
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


register("elbo", summary="Pyro's `Trace_ELBO`", vectorize_particles=True)(Trace_ELBO)
register(
    "elbo-analytic-kl",
    summary="Pyro's `TraceMeanField_ELBO` (analytic KL where registered)",
    vectorize_particles=True,
)(TraceMeanField_ELBO)
