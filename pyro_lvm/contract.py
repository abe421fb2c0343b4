r"""The model contract: what ``fit``, ``fit_local``, the estimators and the evaluations need of a
model and its guide, in one place.

A **program** (model or guide) is any Pyro program, a function or a ``PyroModule``, called as

.. code-block:: python

    program(x)                       # as in Pyro's tutorials
    program(x, idx=None)             # idx: the minibatch's indices in the data set
    program(x, idx=None, **named)    # further per-datapoint tensors (labels, masks, ...)

``x`` is a minibatch, data points along dim 0. Its data points live in a **data plate**: a
``pyro.plate`` over the minibatch's rows that encloses every observed site (and every local
latent). Two forms are served:

- a plate that scales itself, :func:`pyro_lvm.plates.data_plate` ``(x, idx, num_data)``, i.e.
  ``pyro.plate("data", N, subsample=idx)``: Pyro multiplies the minibatch's log-densities by
  :math:`N / B`;
- a plain ``pyro.plate("data", x.shape[0])``: the training loop multiplies the log-densities
  of the sites inside *that plate only* by :math:`N / B` (never global latents, never
  parameters), so every minibatch loss estimates the full-data loss
  (:func:`pyro_lvm.contract.scaled_programs`).

``num_data`` (optional attribute): the data set size :math:`N` a self-scaling program needs
for its plate. ``None`` until ``fit`` sets it from the training set; a value that disagrees
with the training set is refused. A program that holds another program (a VAE and its
guide, a semi-amortized guide and its encoder) keeps theirs equal with :class:`SharesNumData`.

The **guide** has the same latent sites, in the same plates, as its model
(:func:`pyro_lvm.validation.check_site_match`), and takes the same arguments.

Programs built by the library record their constructor and its arguments
(:mod:`pyro_lvm.spec`), so that a run comes back with :func:`pyro_lvm.load_run`; a user's
program does when it is built with :func:`pyro_lvm.spec.build` from an importable factory.

The checks that a pair meets the contract, which the training loop runs once before its first
step, live here too: :func:`set_num_data` and :func:`scaled_programs`. (The data themselves are
checked by :mod:`pyro_lvm.validation`.)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import pyro
import pyro.poutine as poutine
import torch

from pyro_lvm.plates import ScaleDataPlate

__all__ = [
    "DATA_PLATE",
    "Program",
    "SharesNumData",
    "as_program",
    "scaled_programs",
    "set_num_data",
    "takes_idx",
]

#: the name of the data plate the library's own programs use (a user's may differ)
DATA_PLATE = "data"


@runtime_checkable
class Program(Protocol):
    """A model or guide in the form the library calls (:func:`as_program` makes one)."""

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, **named: Any) -> Any: ...


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return None  # cannot be inspected (a builtin): trusted to take idx


def takes_idx(fn: Callable) -> bool:
    """Whether ``fn`` takes a second positional argument (or ``idx=``, or ``*args``)."""
    params = _parameters(fn)
    if params is None or "idx" in params:
        return True
    positional = [
        p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 or any(
        p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()
    )


class _DropIdx:
    """``fn(x, **named)`` called as ``(x, idx=None, **named)``: ``idx`` is dropped."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, **named: Any) -> Any:
        return self.fn(x, **named)

    def __repr__(self) -> str:
        return f"as_program({self.fn!r})"


def as_program(fn: Callable) -> Callable:
    """``fn`` in the form ``(x, idx=None, **named)``: ``fn`` itself when it takes ``idx``, else
    a wrapper that drops it (a program written as ``model(x)``).

    :raises ValueError: when ``fn`` is not callable.
    """
    if not callable(fn):
        raise ValueError(f"a model or guide must be callable, got {type(fn).__name__}")
    return fn if takes_idx(fn) else _DropIdx(fn)


class SharesNumData:
    """Mixin: a ``num_data`` attribute kept equal in the sub-programs named by
    ``_num_data_shared`` (attribute names), e.g. a VAE's ``"guide"``.

    The value itself is stored in the first of them that has a ``num_data`` attribute when
    ``_num_data_owner`` is set (a guide that wraps an encoder guide reads it from there), else
    on the object.
    """

    _num_data_shared: tuple[str, ...] = ("guide",)
    _num_data_owner: str | None = None

    @property
    def num_data(self) -> int | None:
        if self._num_data_owner is not None:
            return getattr(getattr(self, self._num_data_owner), "num_data", None)
        return self.__dict__.get("_num_data")

    @num_data.setter
    def num_data(self, value: int | None) -> None:
        if self._num_data_owner is None:
            self.__dict__["_num_data"] = value
        for name in self._num_data_shared:
            part = getattr(self, name, None)
            if part is not None and hasattr(part, "num_data"):
                part.num_data = value


def set_num_data(model: Any, guide: Any, num_data: int) -> None:
    """Fill a ``num_data`` attribute that is ``None``; refuse one that disagrees."""
    for what, obj in (("model", model), ("guide", guide)):
        value = getattr(obj, "num_data", None)
        if value is not None and value != num_data:
            raise ValueError(
                f"the {what} has num_data={value} but the training set has {num_data} points; "
                f"build it with num_data=None (fit sets it) or num_data={num_data}"
            )
    for obj in (model, guide):
        if hasattr(obj, "num_data") and obj.num_data is None:
            obj.num_data = num_data


def _trace(fn: Callable, x: torch.Tensor, idx: torch.Tensor, named: dict) -> Any:
    """A trace of ``fn(x, idx, **named)`` under saved and restored RNG states."""
    rng = pyro.util.get_rng_state()
    try:
        return poutine.trace(fn).get_trace(x, idx, **named)
    finally:
        pyro.util.set_rng_state(rng)


def _unscaled(site: dict, expected: float) -> bool:
    scale = site["scale"]  # a Python float (a float32 tensor of it would round)
    if torch.is_tensor(scale) and scale.numel() != 1:
        return False
    return not math.isclose(float(scale), expected, rel_tol=1e-6)


def _common(sites: list[dict], keep: Callable) -> set[str]:
    """The names of the vectorized plates that enclose every site and satisfy ``keep``."""
    names = None
    for site in sites:
        found = {f.name for f in site["cond_indep_stack"] if f.vectorized and keep(f)}
        names = found if names is None else names & found
    return names or set()


class _Scaled:
    """A program whose plain data plate is scaled by N/B when called with ``idx``
    (:class:`~pyro_lvm.plates.ScaleDataPlate`); with ``idx=None`` (evaluation on a chunk) it
    runs unscaled, as :func:`~pyro_lvm.plates.data_plate` does."""

    def __init__(self, fn: Callable, plate: str, num_data: int):
        self.fn, self.plate, self.num_data = fn, plate, int(num_data)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, **named: Any) -> Any:
        if idx is None:
            return self.fn(x, idx, **named)
        with ScaleDataPlate(self.plate, self.num_data):
            return self.fn(x, idx, **named)

    def __repr__(self) -> str:
        return f"scaled({self.fn!r}, plate={self.plate!r})"


def scaled_programs(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx: torch.Tensor,
    num_data: int,
    named: dict | None = None,
) -> tuple[Callable, Callable]:
    """Model and guide whose minibatch losses estimate the full-data loss.

    Traced once on a minibatch ``(x, idx)`` of ``num_data`` points (random state restored),
    the observed sites must carry the scale :math:`N / B`. A model that scales itself
    (:func:`~pyro_lvm.plates.data_plate`, ``subsample=``) and a guide that does too are
    returned unchanged. Otherwise the *data plate* is the plate that encloses every observed
    site, is not subsampled and has B elements (``pyro.plate("data", x.shape[0])``, as in
    Pyro's tutorials); model and guide are then wrapped so that the sites inside that plate
    alone get :math:`N / B` (:class:`~pyro_lvm.plates.ScaleDataPlate`).

    :param model: ``model(x, idx=None, **named)`` (see :func:`~pyro_lvm.contract.as_program`).
    :param guide: ``guide(x, idx=None, **named)``.
    :returns: ``(model, guide)``, wrapped or not.
    :raises ValueError: when the model observes nothing, or no such plate is found (the
        message names what was looked for), or the scales still disagree after wrapping.
    """
    named = named or {}
    batch, expected = len(idx), num_data / len(idx)
    trace = _trace(model, x, idx, named)
    observed = [s for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site; observe the data with obs=x")
    if expected == 1:
        return model, guide  # a full batch: nothing to scale
    if not any(_unscaled(s, expected) for s in observed):
        # the model scales itself; a guide written with a plain plate of that name is scaled
        plates = _common(observed, lambda f: f.size == batch and f.full_size == num_data)
        unscaled_guide = any(
            f.name in plates and f.full_size in (None, f.size)
            for s in _trace(guide, x, idx, named).nodes.values()
            if s["type"] == "sample" and not s["is_observed"]
            for f in s["cond_indep_stack"]
        )
        if not unscaled_guide:
            return model, guide
    else:
        plates = _common(observed, lambda f: f.size == batch and f.full_size in (None, f.size))
    if len(plates) > 1 and DATA_PLATE in plates:
        plates = {DATA_PLATE}
    if len(plates) != 1:
        bad = ", ".join(f"{s['name']} (scale {float(s['scale']):g})" for s in observed)
        raise ValueError(
            f"cannot find the data plate: looked for one pyro.plate of size {batch} (the "
            f"minibatch's length) that encloses every observed site, or observed sites scaled "
            f"by num_data / batch = {expected:g}; found {sorted(plates) or 'no such plate'} "
            f"for the observed sites {bad}. Put the observations in "
            f"pyro.plate('data', x.shape[0]) (the loop scales it) or in "
            f"pyro_lvm.plates.data_plate(x, idx, num_data) (it scales itself)"
        )
    plate = plates.pop()
    model, guide = _Scaled(model, plate, num_data), _Scaled(guide, plate, num_data)
    nodes = _trace(model, x, idx, named).nodes
    wrong = [s["name"] for s in observed if _unscaled(nodes[s["name"]], expected)]
    if wrong:
        raise ValueError(
            f"observed sites {wrong} are outside the data plate {plate!r}, so they cannot be "
            "scaled to the full data set; put every observation in that plate"
        )
    return model, guide
