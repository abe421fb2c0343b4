"""Helpers of :class:`~pyro_lvm.train.fast.FastSVI`: record a run's structure, trace a loss."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Number
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger

__all__ = ["Recorder", "input_key", "traceable_torch_item"]


class Recorder(Messenger):
    """Record the structure of a run: sample sites (name, shape, observed) and parameters."""

    def __enter__(self):
        self.sites: list[tuple] = []
        self.params: dict[str, torch.Tensor] = {}
        return super().__enter__()

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample":
            value = msg["value"]
            shape = tuple(value.shape) if torch.is_tensor(value) else ()
            self.sites.append((msg["name"], shape, bool(msg["is_observed"])))
        elif msg["type"] == "param":
            value = msg["value"]
            self.params[msg["name"]] = (
                value.unconstrained() if hasattr(value, "unconstrained") else value
            )


def _detached(x: Any) -> Any:
    """``torch_item`` for tracing: a detached tensor, which a trace keeps as a value."""
    return x if isinstance(x, Number) else x.detach()


@contextmanager
def traceable_torch_item(loss: ELBO) -> Iterator[None]:
    """Swap ``torch_item`` for :func:`_detached` in the modules of ``loss``'s classes.

    Estimators written for Pyro compute their loss *value* with ``torch_item`` (a Python
    float), which :func:`torch.jit.trace` would freeze; as a detached tensor the value is
    traced, and ``x - torch_item(x)`` keeps its gradient. Restored on exit.
    """
    modules = {sys.modules.get(c.__module__) for c in type(loss).__mro__}
    swapped = [m for m in modules if m is not None and getattr(m, "torch_item", None) is torch_item]
    for m in swapped:
        m.torch_item = _detached
    try:
        yield
    finally:
        for m in swapped:
            m.torch_item = torch_item


def input_key(args: tuple, kwargs: dict) -> str:
    """The input signature as a string (it is saved by ``get_state``): shapes and dtypes of
    tensors, other hashable values by ``repr``, unhashable ones by ``id``."""

    def one(v: Any) -> Any:
        if torch.is_tensor(v):
            return ("tensor", tuple(v.shape), v.dtype, v.device)
        try:
            hash(v)
            return v
        except TypeError:
            return ("id", id(v))

    return repr((tuple(map(one, args)), tuple((k, one(v)) for k, v in sorted(kwargs.items()))))
