r"""FastSVI's captured losses, one per input signature, and the policy around them.

:class:`~pyro_lvm.train.FastSVI` takes the steps and holds the optimizer; this module decides
and does the graph work of each step with an input signature (``key``), as a pure function of
saved counts so that a resumed run repeats the uninterrupted one:

======================  =====================================================================
``n``-th step with key  mode
======================  =====================================================================
1                       record (FastSVI: eager, validation as the user set it)
2                       ``compile``: eager step, then :func:`~pyro_lvm.capture.capture`
3                       ``verify``: :func:`~pyro_lvm.capture.verify` the aten graph (eager step)
≥ 4                     ``traced`` (the graph), every ``check_every``-th global step ``check``
``switch_at``           after the step: the Inductor decision (``backend`` ``"inductor"``:
                        always, at n = 4; ``"auto"``: at n = :data:`AUTO_AFTER`, when
                        :func:`~pyro_lvm.capture_inductor.inductor_pays` over the projected
                        remaining steps of the signature)
``switch_at + 1``       ``verify`` the Inductor graph (eager step), at its own tolerance
                        (:func:`~pyro_lvm.capture_inductor.inductor_rtol`); on failure the
                        signature keeps its verified aten graph, with the reason logged
======================  =====================================================================

The projected remaining steps of a signature are
:math:`(\text{planned} - s)\,\frac{n_{key}}{s}` at global step :math:`s`, with ``planned`` the
run's total (``fit``: epochs × minibatches per epoch). The decision is saved per signature in
the schedule of :meth:`FastSVI.get_state` (``"inductor"``: ``None`` when switched, else the
reason), so a resumed run switches at the same step even when resumed with another plan.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pyro
import torch

from pyro_lvm.capture import (
    NEEDS_TENSORS,
    CaptureError,
    Recorder,
    capture,
    default_rtol,
    drifted,
    get_rng_state,
    set_rng_state,
    verify,
)
from pyro_lvm.capture_inductor import compile_inductor, inductor_pays
from pyro_lvm.elbo.traits import traits_of

if TYPE_CHECKING:
    from pyro_lvm.train.fast import FastSVI

__all__ = ["AUTO_AFTER", "SWITCH_BACKENDS", "SignatureGraphs"]

logger = logging.getLogger("pyro_lvm.train.fast")

#: ``backend="auto"`` decides on Inductor at this step with a signature (its fraction of the
#: run's steps is known by then), ``"inductor"`` at the first step after verification
AUTO_AFTER = 20
SWITCH_BACKENDS = ("aten", "inductor", "auto")
_SWITCH_AT = {"aten": None, "inductor": 4, "auto": AUTO_AFTER}


class SignatureGraphs:
    """The captured losses of one :class:`~pyro_lvm.train.FastSVI` (``svi``), by signature.

    :param backend: one of :data:`SWITCH_BACKENDS`.
    :param rtol: the verification tolerance; ``None``: each graph's own (aten:
        :func:`~pyro_lvm.capture.default_rtol`, Inductor: its rounding tolerance).
    :param planned_steps: the run's total number of steps, for ``backend="auto"``.
    """

    def __init__(
        self,
        svi: FastSVI,
        backend: str,
        rtol: float | None,
        check_every: int,
        planned_steps: int | None,
    ):
        self.svi, self.backend, self.rtol, self.check_every = svi, backend, rtol, check_every
        self.planned_steps = planned_steps
        self.graphs: dict[str, list] = {}  # key -> [Captured in use, parameter names]
        self.aten: dict[str, Any] = {}  # key -> its aten graph while an Inductor one is tried
        self.scale: dict[str, float] = {}  # key -> |loss| at verification (saved)
        self.inductor: dict[str, str | None] = {}  # key -> None: switched; else why not (saved)
        self._rec: Recorder | None = None

    def clear(self) -> None:
        self.graphs.clear()
        self.aten.clear()

    @property
    def switch_at(self) -> int | None:
        """The step with a signature after which the Inductor decision is taken."""
        return _SWITCH_AT[self.backend]

    def mode(self, key: str, n: int, steps: int) -> str:
        """The graph mode of the ``n``-th (≥ 2) step with ``key``, the ``steps``-th in all."""
        if self.svi.jit_reason is not None:
            return "lean"
        if n <= 3:
            return "compile" if n == 2 else "verify"
        at = self.switch_at
        if at is not None and n == at + 1 and key in self.inductor and self.inductor[key] is None:
            return "verify"
        return "traced" if steps % self.check_every else "check"

    # ------------------------------------------------------------------ capture and replay
    def _loss_fn(self, kwargs: dict) -> Callable:
        """The eager loss of ``*args``; the sample sites of its last run go to ``self._rec``."""
        svi = self.svi

        def fn(*args):
            with Recorder() as self._rec:
                return svi.loss.differentiable_loss(svi.model, svi.guide, *args, **kwargs)

        return fn

    def compile(self, key: str, args: tuple, kwargs: dict) -> None:
        """Capture the aten graph of ``key`` (restores the random state itself)."""
        if kwargs:
            self.svi._disable_jit(NEEDS_TENSORS)
            return
        names = list(self.svi._params)
        params = [self.svi._params[n] for n in names]
        try:
            captured = capture(self._loss_fn(kwargs), params, args, owner=self.svi.loss)
        except CaptureError as e:
            self.svi._disable_jit(str(e))
            return
        self.graphs[key] = [captured, names]

    def captured(self, key: str, args: tuple) -> tuple[torch.Tensor, list, list]:
        """The captured loss value, the parameters and their gradients."""
        captured, names = self.graphs[key]
        params = [self.svi._params[n] for n in names]
        value, grads = captured(params, (), args)
        return value, params, grads

    def run(self, key: str, args: tuple) -> float:
        """One captured step: the loss value, gradients written to ``.grad``."""
        value, params, grads = self.captured(key, args)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        return float(value)

    def verify(self, key: str, args: tuple, kwargs: dict) -> float:
        """:func:`~pyro_lvm.capture.verify` the graph in use; the step is the eager one."""
        captured, names = self.graphs[key]
        params = [self.svi._params[n] for n in names]
        rng = get_rng_state()
        try:
            with pyro.validation_enabled(False):
                value, grads = verify(captured, self._loss_fn(kwargs), params, args, rtol=self.rtol)
        except CaptureError as e:
            if captured.backend == "inductor":  # keep the verified aten graph
                self._refuse(key, f"the Inductor graph failed its verification: {e}")
                self.graphs[key][0] = self.aten.pop(key)
            else:
                self.svi._disable_jit(str(e))
            value = None
        if value is None:  # the step is the eager one
            for p in params:
                p.grad = None
            set_rng_state(rng)
            value, rec = self.svi._eager(args, kwargs, validate=False)
        else:
            rec = self._rec
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        if self.svi._check_structure(key, rec) and captured.verified:
            self.scale.setdefault(key, captured.scale)
        return value

    def check(self, key: str, args: tuple, kwargs: dict) -> float:
        """A periodic eager step that also compares the captured loss value with the eager one.

        The step itself (its random draws, gradient and update) is the eager one; the
        captured loss runs under the same random state. One whose value no longer agrees
        (:func:`~pyro_lvm.capture.drifted`: a Python number it froze has changed since
        capture, e.g. a KL weight schedule applied by hand with
        :func:`~pyro_lvm.handlers.kl_weight`) is dropped for good, and the reason logged.
        Frozen numbers that move the gradient only are what the perturbed verification
        before the first captured step looks for.
        """
        captured = self.graphs[key][0]
        captured.scale = max(captured.scale, self.scale.get(key, 0.0))
        rng = get_rng_state()
        traced = self.captured(key, args)[0]
        set_rng_state(rng)
        value, rec = self.svi._eager(args, kwargs, validate=False)
        rtol = self.rtol or captured.rtol or default_rtol(traced.dtype)
        if self.svi._check_structure(key, rec) and drifted(captured, float(traced), value, rtol):
            self.svi._disable_jit(
                f"the captured loss stopped matching the eager one at step {self.svi._steps}: "
                "a Python value it froze (e.g. a KL weight schedule) has changed since capture; "
                "the remaining steps run eagerly"
            )
        return value

    # ------------------------------------------------------------------ Inductor
    def _refuse(self, key: str, reason: str) -> None:
        self.inductor[key] = reason
        logger.info("FastSVI keeps the aten graph of %s: %s", key, reason)

    def decides(self, key: str, n: int) -> bool:
        """Whether the Inductor decision for ``key`` is taken after its ``n``-th step."""
        return n == self.switch_at and key in self.graphs and key not in self.inductor

    def decide(self, key: str, args: tuple) -> None:
        """Decide, record and (when it pays) compile the Inductor graph of ``key``."""
        svi = self.svi
        if self.backend == "inductor":
            why = "backend='inductor'"
        elif self.planned_steps is None:
            return self._refuse(key, "no planned_steps, so no projection of the remaining steps")
        else:
            remaining = max(0, self.planned_steps - svi._steps) * svi._seen[key] / svi._steps
            pays, why = inductor_pays(self.graphs[key][0].fx, remaining)
            if not pays:
                return self._refuse(key, why)
        self.inductor[key] = None
        logger.info("FastSVI compiles %s with Inductor: %s", key, why)
        self.promote(key, args)

    def promote(self, key: str, args: tuple) -> None:
        """Compile the aten graph of ``key`` with Inductor (kept for a failed verification)."""
        captured, names = self.graphs[key]
        try:
            compiled = compile_inductor(captured, [*(self.svi._params[n] for n in names), *args])
        except CaptureError as e:
            return self._refuse(key, str(e))
        self.aten[key] = captured
        self.graphs[key] = [compiled, names]

    # ------------------------------------------------------------------ resume
    @contextmanager
    def dry_run(self) -> Iterator[None]:
        """Restore the random state, the parameters' ``.grad`` and the estimator's state kept
        across steps (``state_dict``/``load_state_dict``, where it has them) on exit."""
        rng = get_rng_state()
        grads = [(p, p.grad) for p in self.svi._params.values()]
        loss = self.svi.loss
        stateful = traits_of(loss).stateful
        saved = copy.deepcopy(loss.state_dict()) if stateful else None
        try:
            yield
        finally:
            for p, g in grads:
                p.grad = g
            if stateful:
                loss.load_state_dict(saved)
            set_rng_state(rng)

    def catch_up(self, key: str, n: int, args: tuple, kwargs: dict) -> None:
        """Redo as dry runs the graph work of steps ``1..n-1`` with ``key`` that this object did
        not do (restored by ``set_state``): capture, the Inductor compile, the verifications."""
        steps = self.svi._steps
        if self.mode(key, n, steps) not in ("verify", "traced", "check"):
            return
        if key not in self.graphs:
            self.compile(key, args, kwargs)
        at = self.switch_at
        switched = key in self.inductor and self.inductor[key] is None
        if (
            key in self.graphs
            and switched
            and at is not None
            and n > at
            and self.graphs[key][0].backend == "aten"
        ):
            self.promote(key, args)
        for _ in range(2):  # the Inductor graph, then (if it fails) the aten graph under it
            if key not in self.graphs or self.mode(key, n, steps) not in ("traced", "check"):
                return
            if not self.graphs[key][0].verified:
                with self.dry_run():
                    self.verify(key, args, kwargs)
