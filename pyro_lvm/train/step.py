r"""One gradient step of the training loop: :func:`svi_step`, with ``before_update`` hooks.

A hook sees the gradients of a step after the backward pass and before the optimizer changes
any parameter, and may rewrite them in place: the seam where data-parallel training
(:mod:`pyro_lvm.train.distributed`) all-reduces them. It runs **once per step**, whatever
the stepper:

- a ``pyro.infer.SVI`` calls its ``pyro.optim`` optimizer with the step's parameters; that
  optimizer clips each parameter's gradient and then steps one torch optimizer per parameter.
  The hook runs before that call, so clipping sees the hooked (e.g. all-reduced) gradient, as
  it would in one process;
- FastSVI's lean path calls it (its ``before_update``, set for this step only) before its one
  fused torch optimizer steps; while a hook is set, its captured graphs stop at the gradients
  rather than running the whole step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import SVI

__all__ = ["Batch", "GradientHook", "svi_step"]

#: a ``before_update`` hook: called with the parameters that have gradients
GradientHook = Callable[[list[torch.Tensor]], None]


@dataclass
class Batch:
    """One minibatch as a step sees it: ``step(*args, **kwargs)``; ``size`` data points."""

    args: tuple
    kwargs: dict[str, Any] = field(default_factory=dict)
    size: int = 0


def _with_grad(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters with a gradient: those of ``params``, then the param store's others."""
    params = [p for p in params if p.grad is not None]
    ids = {id(p) for p in params}
    store = pyro.get_param_store().named_parameters()
    return params + [p for _, p in store if p.grad is not None and id(p) not in ids]


class _HookedOptim:
    """A ``pyro.optim`` optimizer whose call runs ``before`` first, with the parameters that
    have gradients: the seam before Pyro's per-parameter gradient clipping and steps."""

    def __init__(self, optim: Any, before: Callable[[list[torch.Tensor]], None]):
        self.optim, self.before = optim, before

    def __call__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        params = list(params)
        self.before(_with_grad(params))
        self.optim(params, *args, **kwargs)


@contextlib.contextmanager
def _before_update(stepper: Any, hooks: Sequence[GradientHook]) -> Iterator[None]:
    if not hooks:
        yield
        return

    def run(params: list[torch.Tensor]) -> None:
        for hook in hooks:
            hook(params)

    # Pyro's SVI calls its PyroOptim once per step, which clips each parameter's gradient
    # before stepping it: the hooks run before it
    if isinstance(stepper, SVI):
        svi = stepper
        original, svi.optim = svi.optim, _HookedOptim(svi.optim, run)
        try:
            yield
        finally:
            svi.optim = original
        return

    # FastSVI's lean path: it calls the hook before its update (and, while one is set, its
    # graphs capture the loss and gradients only, so the gradients exist to be hooked)
    stepper.before_update = lambda params: run(_with_grad(params))
    try:
        yield
    finally:
        stepper.before_update = None


def svi_step(stepper: Any, batch: Batch, before_update: Sequence[GradientHook] = ()) -> float:
    """``stepper.step(*batch.args, **batch.kwargs)``: one gradient step, the SVI loss back.

    ``stepper`` is a :class:`~pyro_lvm.train.FastSVI` or a ``pyro.infer.SVI``. Each hook of
    ``before_update`` is called once per step with the parameters that have gradients, after
    the backward pass and before the optimizer updates or clips any of them, and may change
    the gradients in place: for a ``pyro.infer.SVI`` before its ``pyro.optim`` call, for a
    FastSVI before its gradient clipping and fused optimizer step
    (:attr:`~pyro_lvm.train.FastSVI.before_update`); active during this step only.
    """
    with _before_update(stepper, before_update):
        return stepper.step(*batch.args, **batch.kwargs)
