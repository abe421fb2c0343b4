r"""The capture engine: a loss *and its gradient* as one flat aten graph, verified against eager.

Pyro runs a model, a guide and an estimator as Python: messengers, trace objects and
site dictionaries cost more than the arithmetic on small models. This module records
that arithmetic once, as the graph of aten operations that the forward pass *and* the
backward pass execute, and replays it with no Python from Pyro or autograd:

.. math::

    G(w, o, d, r) = \bigl(\hat L(w, o; d, r),\; \nabla_w \hat L(w, o; d, r)\bigr),

where :math:`w` are the differentiated tensors (parameters or local leaves), :math:`o`
further tensors the programs read (other parameters), :math:`d` the data and :math:`r` the
run-time inputs of :class:`RuntimeInputs` (a KL schedule's β). The graph is built by
:func:`torch.fx.experimental.proxy_tensor.make_fx` (the capture under ``torch.compile`` and
``torch.export``) from a function that calls :func:`torch.autograd.grad`;
:mod:`pyro_lvm.capture.inductor` compiles it with Inductor where that pays. Random operations
stay operations: every call draws fresh noise from the global generator, in eager order.

The policy around it (capture once per input signature, verify against eager under one
random state, re-check on a schedule, Inductor where it pays, fall back with a logged reason)
is :class:`pyro_lvm.capture.CapturePolicy`, the one used by ``FastSVI``, the
per-datapoint inner loop and :func:`~pyro_lvm.variance.gradient_moments`. With an ``update``
(:mod:`pyro_lvm.capture.optim`) the graph is the whole SVI step: loss, gradients and the
optimizer's update of every parameter and its state.

References: Ansel et al. (2024), *PyTorch 2: Faster Machine Learning Through Dynamic Python
Bytecode Transformation and Graph Compilation*, ASPLOS (make_fx, AOTAutograd, Inductor).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from numbers import Number
from typing import Any, Protocol, runtime_checkable

import pyro
import pyro.infer.util
import pyro.util
import torch
from pyro.poutine.messenger import Messenger
from torch.fx.experimental.proxy_tensor import make_fx

from pyro_lvm.elbo.traits import traits_of

__all__ = [
    "CaptureError",
    "Captured",
    "Recorder",
    "RuntimeInputs",
    "capture",
    "capture_patches",
    "get_rng_state",
    "input_key",
    "not_capturable",
    "runtime_inputs",
    "set_rng_state",
]

NEEDS_TENSORS = "capture needs positional tensor arguments only (no keywords, no None)"
_CAPTURE_SEED = 20261203  # a random state other than any the verification uses


class CaptureError(RuntimeError):
    """Capture or verification failed; the message is the reason for the fallback."""


@runtime_checkable
class RuntimeInputs(Protocol):
    """What an estimator or handler implements to feed values that change between steps.

    A captured graph runs no Python from the estimator, so a value it computes in Python at
    every step (the β of a KL schedule, a baseline) would be frozen at its captured value.
    An estimator that implements this protocol hands such values over as tensors: the
    engine reads :meth:`runtime_inputs` before every captured call and passes them to the
    graph as inputs; while capturing, the estimator reads them back inside
    :meth:`using_runtime_inputs`. Example: :class:`~pyro_lvm.handlers.KLWeightedELBO`. An
    estimator whose Python state cannot be expressed so (an adapted HMC step size) sets
    ``capturable=False`` in its :class:`~pyro_lvm.elbo.traits.EstimatorTraits`; the engine then
    never captures it."""

    def runtime_inputs(self) -> tuple[torch.Tensor, ...]:
        """The current values, as tensors (``()`` when there are none)."""

    def using_runtime_inputs(self, values: Sequence[torch.Tensor]) -> AbstractContextManager:
        """A context in which the estimator reads ``values`` instead of computing them."""


def get_rng_state() -> dict:
    """The random state of a run: Pyro's (torch's CPU generator, ``random``, NumPy) and, once
    CUDA is initialized, every CUDA device's generator (Pyro's omits those)."""
    state = pyro.util.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state = {**state, "cuda": torch.cuda.get_rng_state_all()}
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`get_rng_state`."""
    pyro.util.set_rng_state({k: v for k, v in state.items() if k != "cuda"})
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def runtime_inputs(owner: Any) -> tuple[torch.Tensor, ...]:
    """``owner.runtime_inputs()`` for a :class:`RuntimeInputs`, else ``()``."""
    return tuple(owner.runtime_inputs()) if isinstance(owner, RuntimeInputs) else ()


def not_capturable(loss: Any) -> str | None:
    """Why ``loss`` cannot be captured (no differentiable_loss, or its traits say
    ``capturable=False``, :func:`~pyro_lvm.elbo.traits.traits_of`), or None."""
    if not callable(getattr(loss, "differentiable_loss", None)):
        return f"{type(loss).__name__} has no differentiable_loss"
    if not traits_of(loss).capturable:
        return (
            f"{type(loss).__name__} keeps Python state across steps (its traits declare "
            "capturable=False)"
        )
    return None


def _detached(x: Any) -> Any:  # torch_item while capturing: the value stays in the graph
    return x if isinstance(x, Number) else x.detach()


def _no_nan_check(value: Any, *args: Any, **kwargs: Any) -> Any:  # its test reads a value
    return value


_SWAPS = {"torch_item": (pyro.infer.util.torch_item, _detached)}
_SWAPS["warn_if_nan"] = (pyro.util.warn_if_nan, _no_nan_check)


@contextmanager
def capture_patches(owner: Any = None) -> Iterator[None]:
    """The one place where Pyro is adapted to capture; undone on exit.

    Pyro's ``torch_item`` (a Python float of the loss value, ``.item()``) and
    ``warn_if_nan`` (``if torch.isnan(x).any()``) read tensor values, which a graph cannot
    record. Every loaded module of ``pyro`` and ``pyro_lvm``, and those of ``owner``'s
    classes, that imported them gets ``torch_item`` → a detached tensor (so a loss value
    stays in the graph and ``x - torch_item(x)`` keeps its gradient) and ``warn_if_nan`` →
    the identity. Non-finite losses are still caught by the training loop's guard.
    """
    names = {c.__module__ for c in type(owner).__mro__} if owner is not None else set()
    swapped = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name.startswith("pyro") or name in names):
            continue
        for attr, (original, replacement) in _SWAPS.items():
            if getattr(module, attr, None) is original:
                setattr(module, attr, replacement)
                swapped.append((module, attr, original))
    try:
        yield
    finally:
        for module, attr, original in swapped:
            setattr(module, attr, original)


class Captured:
    """A captured loss: ``captured(wrt, others, data) -> (value, grads)`` with no autograd.
    ``fx``: the aten graph (``graph`` is it, or Inductor's compilation of it); ``rtol``: its
    verification's tolerance; ``scale``: ``|loss|`` when :func:`~pyro_lvm.capture.verify`
    accepted it (``verified``)."""

    def __init__(self, graph: Callable, num_wrt: int, owner: Any, backend: str, fx: Any = None):
        self.graph, self.num_wrt, self.owner, self.backend = graph, num_wrt, owner, backend
        self.fx = graph if fx is None else fx
        self.scale, self.verified, self.rtol = 0.0, False, None
        self._reads = isinstance(owner, RuntimeInputs)  # once: a Protocol check costs ~20 µs
        #: whether the graph is a whole step (it updates ``wrt`` and ``state`` in place and
        #: returns no gradients), see :func:`capture`'s ``update``
        self.whole_step = False

    def __call__(
        self,
        wrt: Sequence[torch.Tensor],
        others: Sequence[torch.Tensor],
        data: Sequence,
        state: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        extra = tuple(self.owner.runtime_inputs()) if self._reads else ()
        with torch.no_grad():
            value, grads = self.graph(*wrt, *others, *data, *state, *extra)
        return value, list(grads)


def capture(
    fn: Callable[..., torch.Tensor],
    wrt: Sequence[torch.Tensor],
    data: Sequence[torch.Tensor],
    *,
    others: Sequence[torch.Tensor] = (),
    owner: Any = None,
    update: Callable | None = None,
    state: Sequence[torch.Tensor] = (),
) -> Captured:
    """Capture ``fn(*data)`` (a scalar loss reading ``wrt`` and ``others`` by identity) and its
    gradient with respect to ``wrt`` as one graph; with ``update``, the whole step.

    Runs ``fn`` once, with validation off, Pyro's effects blocked, :func:`capture_patches`
    active and a random state of its own (the caller's is restored). Unused ``wrt`` get a
    ``None`` gradient. :func:`pyro_lvm.capture.compile_inductor` compiles the result.

    :param owner: the estimator, read for :class:`RuntimeInputs` and patched by
        :func:`capture_patches`.
    :param update: ``update(wrt, grads, state)``, an optimizer step written in tensor
        operations that changes ``wrt`` and ``state`` in place
        (:class:`pyro_lvm.capture.StepRule`); the graph then runs the whole step and
        returns ``(value, ())``. Call it with the same ``state`` tensors' current values.
    :raises CaptureError: naming the failure (a tensor read is data-dependent, ...).
    """
    if not all(torch.is_tensor(t) for t in (*wrt, *data)):
        raise CaptureError(NEEDS_TENSORS)
    wrt, others, data, state = list(wrt), list(others), list(data), list(state)
    extra = runtime_inputs(owner)
    n_wrt, n_in = len(wrt), len(wrt) + len(others) + len(data)
    use = getattr(owner, "using_runtime_inputs", None) if extra else None

    def both(*inputs):
        with use(inputs[n_in + len(state) :]) if use is not None else nullcontext():
            value = fn(*inputs[n_wrt + len(others) : n_in])
        grads = torch.autograd.grad(value, inputs[:n_wrt], allow_unused=True)
        if update is None:
            return value.detach(), grads
        with torch.no_grad():
            update(list(inputs[:n_wrt]), list(grads), list(inputs[n_in : n_in + len(state)]))
        return value.detach(), ()

    rng = get_rng_state()
    try:
        pyro.set_rng_seed(_CAPTURE_SEED)
        with pyro.validation_enabled(False), pyro.poutine.block(), capture_patches(owner):
            graph = make_fx(both)(*wrt, *others, *data, *state, *extra)
        _prune(graph)
    except Exception as e:  # any capture failure keeps the eager path
        raise CaptureError(f"capture failed: {type(e).__name__}: {e}") from e
    finally:
        set_rng_state(rng)
    captured = Captured(graph, n_wrt, owner, "aten")  # rtol None: default_rtol of wrt
    captured.whole_step = update is not None
    return captured


def _prune(graph: torch.fx.GraphModule) -> None:
    """Drop what a replay without autograd does not need: ``detach`` (an alias there) and
    unused nodes (random ones are impure and stay). A few per cent of a small step."""
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            graph.graph.erase_node(node)
    graph.graph.eliminate_dead_code()
    graph.recompile()


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


def input_key(args: tuple, kwargs: dict) -> str:
    """The input signature as a string (saved by checkpoints): shapes, dtypes and devices of
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
