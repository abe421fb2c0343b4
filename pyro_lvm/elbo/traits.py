r"""What an estimator is and can do, declared once: :class:`EstimatorTraits` and :func:`traits_of`.

Every consumer that must know something about an estimator asks :func:`traits_of`: the
training loop and checkpoints (does it keep state?), the capture engine (may its loss be
recorded as a graph?), the variance tools, the semi-amortized guide (which gradient?), the
registry's table and the contract tests (category, guide sites, particles). The answer is
declared in one place per class:

- an estimator class of this library declares a class attribute ``traits`` (the family bases
  declare theirs; a subclass replaces the fields it changes with :func:`dataclasses.replace`),
  and a class whose capabilities depend on its configuration (a baseline, a gradient mode)
  overrides the classmethod ``configured_traits(**config)``, which its ``__init__`` calls;
- Pyro's own ELBOs are declared in :data:`PYRO_TRAITS` (looked up along the MRO);
- wrappers (:class:`~pyro_lvm.elbo.handled.HandledELBO`, :class:`~pyro_lvm.handlers.KLWeightedELBO`)
  answer with their base's traits;
- any other ``pyro.infer.ELBO`` (a user's own class) is read once by :func:`observed_traits`
  from what it shows: ``state_dict``/``load_state_dict`` (stateful), ``capturable`` and
  ``differentiable_loss`` (capturable), the duck-typed protocol of
  :class:`~pyro_lvm.elbo.stateful.StatefulEstimator`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import pyro.infer

__all__ = [
    "CATEGORIES",
    "EstimatorTraits",
    "GRADIENT_KINDS",
    "PYRO_TRAITS",
    "SITES",
    "declared_traits",
    "observed_traits",
    "traits_of",
]

#: what an estimator's value is: the ELBO itself; a multi-sample bound (the ELBO at K = 1,
#: between the ELBO and log p(x) for K > 1); an objective that is not a bound on log p(x)
#: (a divergence between aggregate posterior and prior); the ELBO with an MCMC-refined model
#: gradient (neither an ELBO gradient nor a bound's).
CATEGORIES = ("elbo", "bound", "divergence", "refined")

#: which guide sites an estimator handles: ``"any"`` (reparameterized ones pathwise, the
#: others by score function), ``"reparam"`` (every guide site needs ``rsample``), or
#: ``"bernoulli"`` (Bernoulli sites by the estimator's own method, reparameterized ones
#: pathwise, any other site refused: ARM, DisARM, REBAR, RELAX).
SITES = ("any", "reparam", "bernoulli")

#: the gradient kinds of the library's estimators (a new estimator may name its own):
#: ``"reparam"`` pathwise where a site has ``rsample``, score function elsewhere;
#: ``"score"`` score function at every site; ``"stl"`` sticking the landing; ``"dreg"``
#: doubly reparameterized; ``"refined"`` an MCMC-refined model gradient; ``"smc"`` pathwise
#: through an SMC sweep with the resampling terms dropped (biased); ``"enum"`` exact
#: enumeration; ``"wake-sleep"`` reweighted wake-sleep; ``"tail-adaptive"`` the tail-adaptive
#: f-divergence.
GRADIENT_KINDS = (
    "reparam",
    "score",
    "stl",
    "dreg",
    "refined",
    "smc",
    "enum",
    "wake-sleep",
    "tail-adaptive",
)

_KIND = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class EstimatorTraits:
    """What an estimator is and can do.

    :ivar category: one of :data:`CATEGORIES`.
    :ivar sites: one of :data:`SITES`.
    :ivar min_particles: the smallest K it accepts (checked by its constructor and by
        :func:`~pyro_lvm.elbo.make_estimator`).
    :ivar stateful: it keeps state across steps outside Pyro's param store
        (``state_dict``/``load_state_dict``), which checkpoints save and which capture and
        variance measurements restore after their dry runs.
    :ivar capturable: :mod:`pyro_lvm.capture` may record its ``differentiable_loss`` as a
        graph: no decision or state update in Python between steps that a graph would freeze
        (state that reaches the graph as :class:`~pyro_lvm.capture.RuntimeInputs`, a KL
        schedule's step, may be both stateful and capturable).
    :ivar gradient: its gradient kind, one of :data:`GRADIENT_KINDS` or a new lower-case name.
    :raises ValueError: on a value outside these sets.
    """

    category: str = "elbo"
    sites: str = "any"
    min_particles: int = 1
    stateful: bool = False
    capturable: bool = True
    gradient: str = "reparam"

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}, got {self.category!r}")
        if self.sites not in SITES:
            raise ValueError(f"sites must be one of {SITES}, got {self.sites!r}")
        if isinstance(self.min_particles, bool) or int(self.min_particles) != self.min_particles:
            raise ValueError(f"min_particles must be an integer, got {self.min_particles!r}")
        if self.min_particles < 1:
            raise ValueError(f"min_particles must be at least 1, got {self.min_particles}")
        object.__setattr__(self, "min_particles", int(self.min_particles))
        if not isinstance(self.gradient, str) or not _KIND.match(self.gradient):
            raise ValueError(
                f"gradient must be a lower-case name such as {GRADIENT_KINDS[:4]}, "
                f"got {self.gradient!r}"
            )


_ELBO = EstimatorTraits()

#: Pyro's own ELBOs, found along an instance's MRO (subclasses inherit their entry).
PYRO_TRAITS: dict[type, EstimatorTraits] = {
    pyro.infer.Trace_ELBO: _ELBO,
    pyro.infer.TraceMeanField_ELBO: replace(_ELBO, sites="reparam"),
    pyro.infer.TraceGraph_ELBO: replace(_ELBO, capturable=False),
    pyro.infer.TraceEnum_ELBO: replace(_ELBO, gradient="enum"),
    pyro.infer.RenyiELBO: replace(_ELBO, category="bound", capturable=False),
    pyro.infer.ReweightedWakeSleep: replace(
        _ELBO, category="bound", capturable=False, gradient="wake-sleep"
    ),
    pyro.infer.TraceTailAdaptive_ELBO: replace(
        _ELBO, sites="reparam", min_particles=2, gradient="tail-adaptive"
    ),
}


def observed_traits(estimator: Any) -> EstimatorTraits:
    """The traits of an ELBO that declares none (a user's own class), read from what it shows:

    stateful when it has both ``state_dict`` and ``load_state_dict``; capturable when it has
    ``differentiable_loss`` and does not set ``capturable = False`` (a stateful one is captured
    with its state restored after each dry run, unless it says so).
    """
    stateful = all(callable(getattr(estimator, m, None)) for m in ("state_dict", "load_state_dict"))
    capturable = callable(getattr(estimator, "differentiable_loss", None)) and bool(
        getattr(estimator, "capturable", True)
    )
    return EstimatorTraits(stateful=stateful, capturable=capturable)


def declared_traits(cls: type, **config: Any) -> EstimatorTraits | None:
    """The traits a class declares for the constructor arguments ``config`` (``None`` when it
    declares none): its ``configured_traits(**config)``, its ``traits`` attribute, or its
    entry of :data:`PYRO_TRAITS` along the MRO."""
    configured = getattr(cls, "configured_traits", None)
    if configured is not None:
        return configured(**config)
    traits = getattr(cls, "traits", None)
    if isinstance(traits, EstimatorTraits):
        return traits
    return _pyro_traits(cls)


def _pyro_traits(obj: Any) -> EstimatorTraits | None:
    """The :data:`PYRO_TRAITS` entry of a Pyro class (or instance) or of a subclass of one; a
    subclass that adds state or refuses capture (a user's own) says so by the methods and
    attribute :func:`observed_traits` reads."""
    cls = obj if isinstance(obj, type) else type(obj)
    for base in cls.__mro__:
        if base in PYRO_TRAITS:
            entry, seen = PYRO_TRAITS[base], observed_traits(obj)
            return replace(
                entry,
                stateful=entry.stateful or seen.stateful,
                capturable=entry.capturable and seen.capturable,
            )
    return None


def traits_of(estimator: Any) -> EstimatorTraits:
    """What ``estimator`` (an instance) is and can do: the one accessor every consumer calls.

    An instance's ``traits`` attribute (set by its class, its configuration, a wrapper or the
    registration that built it) comes first, then Pyro's own classes (:data:`PYRO_TRAITS`),
    then :func:`observed_traits` (which also corrects a Pyro class's entry for a subclass that
    adds state or sets ``capturable = False``).

    Example::

        >>> traits_of(make_estimator("score-function-avg-baseline")).stateful
        True
    """
    traits = getattr(estimator, "traits", None)
    if isinstance(traits, EstimatorTraits):
        return traits
    return _pyro_traits(estimator) or observed_traits(estimator)
