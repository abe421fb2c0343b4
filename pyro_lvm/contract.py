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
  (:func:`pyro_lvm.train.checks.scaled_programs`).

``num_data`` (optional attribute): the data set size :math:`N` a self-scaling program needs
for its plate. ``None`` until ``fit`` sets it from the training set; a value that disagrees
with the training set is refused. A program that holds another program (a VAE and its
guide, a semi-amortized guide and its encoder) keeps theirs equal with :class:`SharesNumData`.

The **guide** has the same latent sites, in the same plates, as its model
(:func:`pyro_lvm.validation.check_site_match`), and takes the same arguments.

Programs built by the library record their constructor and its arguments
(:mod:`pyro_lvm.spec`), so that a run comes back with :func:`pyro_lvm.load_run`; a user's
program does when it is built with :func:`pyro_lvm.spec.build` from an importable factory.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["DATA_PLATE", "Program", "SharesNumData", "as_program", "takes_idx"]

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
