"""Helpers of :class:`~pyro_lvm.train.fast.FastSVI`: record a run's structure, trace a loss."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Number
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.messenger import Messenger

__all__ = [
    "Recorder",
    "default_rtol",
    "input_key",
    "perturbed",
    "tensors_agree",
    "trace_inputs",
    "traceable_torch_item",
    "using_trace_inputs",
]


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


def trace_inputs(loss: ELBO) -> tuple[torch.Tensor, ...]:
    """The tensors ``loss`` reads afresh at every step (``loss.trace_inputs()``, e.g. the
    current β of a KL schedule), which a traced loss must take as inputs; ``()`` if none."""
    get = getattr(loss, "trace_inputs", None)
    return () if get is None else tuple(get())


@contextmanager
def using_trace_inputs(loss: ELBO, values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Make ``loss`` read ``values`` (the traced function's inputs) instead of computing them."""
    use = getattr(loss, "using_trace_inputs", None)
    if use is None or not values:
        yield
        return
    with use(values):
        yield


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


def default_rtol(dtype: torch.dtype) -> float:
    """Relative tolerance of a trace verification: 1% of √ε of ``dtype``."""
    return 0.01 * torch.finfo(dtype).eps ** 0.5


def tensors_agree(
    value: torch.Tensor,
    reference: torch.Tensor,
    grads: Sequence[torch.Tensor | None],
    reference_grads: Sequence[torch.Tensor | None],
    rtol: float,
) -> bool:
    """Whether a traced loss and its gradients match the eager ones.

    Values compare at ``rtol``; each gradient at ``rtol`` with an absolute floor of ``rtol``
    times the reference gradient's largest entry. A gradient present on one side only is a
    mismatch.
    """
    close = bool(torch.allclose(value.detach(), reference.detach().to(value.dtype), rtol=rtol))
    for g, h in zip(grads, reference_grads, strict=True):
        if (g is None) != (h is None):
            return False
        if g is not None:
            close &= bool(torch.allclose(g, h, rtol=rtol, atol=rtol * float(h.abs().max())))
    return close


@contextmanager
def perturbed(tensors: Sequence[torch.Tensor], shift: float = 0.0) -> Iterator[None]:
    """Move ``tensors`` in place to ``t (1 + 0.3 ε) + shift ε`` and restore them on exit.

    ε is standard normal from a private generator (seed 0), so the random stream of the run
    is untouched. Python numbers computed from tensors (``float(t)``, ``t.item()``) are
    constants in a trace; a verification at the moved point sees them. ``shift`` moves
    entries that are exactly zero too.
    """
    saved = [t.detach().clone() for t in tensors]
    device = tensors[0].device if tensors else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for t in tensors:
            noise = torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)
            t.mul_(1 + 0.3 * noise).add_(shift * noise)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, v in zip(tensors, saved, strict=True):
                t.copy_(v)
