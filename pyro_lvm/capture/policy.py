r"""The one capture policy: capture, verify, cache, re-check, Inductor and fall-back, in one object.

:mod:`pyro_lvm.capture` records a graph and checks it once; :mod:`pyro_lvm.capture.inductor`
compiles one; :mod:`pyro_lvm.capture.optim` writes an optimizer's update so that the graph is
the whole step. :class:`CapturePolicy` decides *when* each of them runs, for every caller:
:class:`~pyro_lvm.train.FastSVI` (one policy per stepper, whole steps), the per-datapoint inner
loop :func:`~pyro_lvm.train.optimize_local` and :func:`~pyro_lvm.variance.gradient_moments`
(loss and gradients; one policy per estimator, :func:`policy_for`). Per input signature
(``key``) it holds an :class:`Entry`:

1. **Capture** (:meth:`CapturePolicy.capture`) under a random state of its own; a whole step's
   capture is a dry run (parameters and optimizer state restored).
2. **Verify** (:meth:`CapturePolicy.verify`): under one random state, the graph and the eager
   code agree at a perturbed and at the current point (:func:`~pyro_lvm.capture.verify`; for
   a whole step :func:`verify_step` compares the updated parameters and optimizer state).
   :meth:`CapturePolicy.prepare` does both as a dry run, for callers without a schedule.
3. **Re-check** (:meth:`CapturePolicy.drifted`): an eager value against the graph's, to the
   verification's tolerance times the larger of ``|loss|`` now and at verification.
4. **Inductor** (:meth:`CapturePolicy.decide`): compiled where
   :func:`~pyro_lvm.capture.inductor_pays` over the projected remaining steps, then
   verified at its rounding tolerance; a failure keeps the verified aten graph.
5. **Fall back** on any failure, with the reason logged: for the signature (``per_key``) or,
   for a stepper whose steps must all take one path, for good (:attr:`CapturePolicy.reason`).

For a stepper the mode of the ``n``-th step with a signature (:meth:`CapturePolicy.mode`) is a
function of saved counts and decisions (:meth:`CapturePolicy.state_dict`), so that a resumed
run repeats the uninterrupted one (:meth:`CapturePolicy.catch_up` redoes the capture and
verifications of earlier steps as dry runs):

======================  =====================================================================
``n``-th step with key  mode
======================  =====================================================================
1                       record (the caller's eager step, validation as the user set it)
2                       ``compile``: eager step, then capture
3                       ``verify`` (the step taken is the eager one)
≥ 4                     ``traced``, every ``check_every``-th global step ``check``
``switch_at``           after the step: the Inductor decision (``"inductor"``: at n = 4,
                        ``"auto"``: at n = :data:`AUTO_AFTER`, when it pays)
``switch_at + 1``       ``verify`` the Inductor graph
======================  =====================================================================

Inductor's own caches (FX graph and AOTAutograd) keep compiled kernels on disk, in
``$TORCHINDUCTOR_CACHE_DIR`` (default ``/tmp/torchinductor_$USER``); :func:`cache_dir` names
the folder and :data:`~pyro_lvm.capture.inductor.COST` prices a compile found there as cheap.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import pyro
import torch

from pyro_lvm.capture.inductor import cache_dir, compile_inductor, inductor_pays
from pyro_lvm.capture.optim import StepRule, verify_step
from pyro_lvm.capture.record import (
    Captured,
    CaptureError,
    capture,
    get_rng_state,
    not_capturable,
    set_rng_state,
)
from pyro_lvm.capture.verification import default_rtol, verify
from pyro_lvm.elbo.traits import traits_of

__all__ = [
    "AUTO_AFTER",
    "SWITCH_BACKENDS",
    "CapturePolicy",
    "Entry",
    "cache_dir",
    "keeps_state",
    "policy_for",
]

logger = logging.getLogger(__name__)

#: ``backend="auto"`` decides on Inductor at this step with a signature
AUTO_AFTER = 20
SWITCH_BACKENDS = ("aten", "inductor", "auto")
_SWITCH_AT = {"aten": None, "inductor": 4, "auto": AUTO_AFTER}


def keeps_state(estimator: Any) -> bool:
    """Whether ``estimator`` keeps state across steps that a dry run must restore: its
    declared traits (:func:`~pyro_lvm.elbo.traits.traits_of`). The one place the policy asks
    this."""
    return traits_of(estimator).stateful


@dataclass
class Entry:
    """The graph of one input signature: ``captured`` (``None``: the signature runs eagerly,
    for ``reason``), the names of what it reads (``names``), the optimizer ``rule`` of a whole
    step, objects whose ids the key holds (``keep``), the aten graph under an Inductor one."""

    captured: Captured | None
    names: list = None
    rule: StepRule | None = None
    keep: Any = None
    aten: Captured | None = None
    reason: str | None = None


class CapturePolicy:
    """Captured graphs of one ``owner`` (an estimator), by input signature, and their policy.

    :param owner: the estimator (read for run-time inputs, capturability and its state).
    :param backend: one of :data:`SWITCH_BACKENDS`.
    :param rtol: the verification tolerance; ``None``: each graph's own.
    :param check_every: a stepper's re-check period (global steps).
    :param planned_steps: the run's total steps, for ``backend="auto"``.
    :param per_key: a failure turns off one signature (else every one, for good).
    :param max_entries: signatures kept (oldest dropped), ``None``: all.
    :param label: who uses it, for the log.
    """

    def __init__(
        self,
        owner: Any,
        *,
        backend: str = "aten",
        rtol: float | None = None,
        check_every: int = 100,
        planned_steps: int | None = None,
        per_key: bool = False,
        max_entries: int | None = None,
        label: str = "capture",
    ):
        if backend not in SWITCH_BACKENDS:
            raise ValueError(f"backend must be one of {SWITCH_BACKENDS}, got {backend!r}")
        self.owner, self.backend, self.rtol, self.check_every = owner, backend, rtol, check_every
        self.planned_steps, self.per_key, self.max_entries = planned_steps, per_key, max_entries
        self.label = label
        #: why nothing is captured (``None`` while allowed)
        self.reason: str | None = not_capturable(owner)
        self.entries: dict[Any, Entry] = {}
        self.scale: dict[str, float] = {}  # key -> |loss| at verification (saved)
        self.inductor: dict[str, str | None] = {}  # key -> None: switched; else why not (saved)

    # ------------------------------------------------------------------ fall-back
    def disable(self, reason: str) -> None:
        """Capture nothing more (logged once); drop every graph."""
        if self.reason is None:
            self.reason = reason
            logger.info("%s does not capture: %s", self.label, reason)
        self.entries.clear()

    def fail(self, key: Any, reason: str) -> None:
        """A failure of ``key``'s graph: that signature runs eagerly (``per_key``), else all."""
        if not self.per_key:
            return self.disable(reason)
        logger.info("%s runs %s eagerly: %s", self.label, type(self.owner).__name__, reason)
        keep = self.entries.get(key, Entry(None)).keep
        self._store(key, Entry(None, [], keep=keep, reason=reason))

    def _store(self, key: Any, entry: Entry) -> None:
        self.entries.pop(key, None)
        self.entries[key] = entry
        while self.max_entries is not None and len(self.entries) > self.max_entries:
            del self.entries[next(iter(self.entries))]  # the oldest: it holds programs alive

    def graph(self, key: Any) -> Captured | None:
        """The graph in use for ``key`` (``None``: none, or the signature runs eagerly)."""
        entry = self.entries.get(key) if self.reason is None else None
        return None if entry is None else entry.captured

    # ------------------------------------------------------------------ capture and verify
    def capture(
        self, key, fn, wrt, data, *, others=(), names=(), keep=None, rule=None
    ) -> Captured | None:
        """Capture ``fn`` (loss and gradient; with a ``rule`` the whole step, as a dry run)."""
        if self.reason is not None:
            return None
        snapshot = rule.snapshot() if rule is not None else None
        try:
            if rule is None:
                captured = capture(fn, wrt, data, others=others, owner=self.owner)
            else:
                captured = capture(
                    fn, wrt, data, others=others, owner=self.owner, update=rule.update,
                    state=rule.state(),
                )  # fmt: skip
        except CaptureError as e:
            self.fail(key, str(e))
            return None
        finally:
            if rule is not None:
                rule.restore(snapshot)
        self._store(key, Entry(captured, list(names), rule, keep))
        return captured

    def verify(self, key, fn, wrt, data, *, others=(), keep=True) -> tuple | None:
        """Verify ``key``'s graph; ``(eager value, eager gradients or None for a whole step)``
        of the step it took (kept unless ``keep=False``), or ``None`` when it failed."""
        entry = self.entries[key]
        captured = entry.captured
        try:
            if captured.whole_step:
                out = verify_step(captured, fn, entry.rule, wrt, data, others, self.rtol, keep)
            else:
                out = verify(captured, fn, wrt, data, others=others, rtol=self.rtol)
        except CaptureError as e:
            if captured.backend == "inductor":  # keep the verified aten graph
                self._refuse(key, f"the Inductor graph failed its verification: {e}")
                entry.captured, entry.aten = entry.aten, None
            else:
                self.fail(key, str(e))
            return None
        self.scale.setdefault(str(key), captured.scale)
        return out

    def prepare(self, key, fn, wrt, data, *, others=(), names=(), keep=None) -> Captured | None:
        """The verified graph of ``key``: cached, else captured and verified as a dry run."""
        if self.reason is not None:
            return None
        if key not in self.entries:
            with self.dry_run(wrt), pyro.validation_enabled(False):
                if self.capture(key, fn, wrt, data, others=others, names=names, keep=keep):
                    self.verify(key, fn, wrt, data, others=others, keep=False)
        return self.graph(key)

    def run(self, key, wrt, others, data) -> tuple[torch.Tensor, list]:
        """One replay of ``key``'s graph: the value and the gradients (``[]`` for a whole step,
        which has updated the parameters and the optimizer state)."""
        entry = self.entries[key]
        state = entry.rule.state() if entry.rule is not None else ()
        return entry.captured(wrt, others, data, state)

    def probe(self, key, wrt, others, data) -> float:
        """The graph's loss value, with nothing changed (random state, a whole step undone)."""
        entry, rng = self.entries[key], get_rng_state()
        snapshot = entry.rule.snapshot() if entry.rule is not None else None
        try:
            return float(self.run(key, wrt, others, data)[0])
        finally:
            set_rng_state(rng)
            if snapshot is not None:
                entry.rule.restore(snapshot)

    def drifted(self, key, graph_value: float, eager_value: float, where: str) -> bool:
        """Whether ``key``'s graph no longer matches eager code (same random state); such a
        graph is dropped (a Python value it froze, e.g. a KL weight by hand, changed)."""
        captured = self.entries[key].captured
        captured.scale = max(captured.scale, self.scale.get(str(key), 0.0))
        rtol = self.rtol or captured.rtol or default_rtol(torch.get_default_dtype())
        if abs(graph_value - eager_value) <= rtol * max(abs(eager_value), captured.scale):
            return False
        self.fail(
            key,
            f"the captured loss stopped matching the eager one {where}: a Python value it froze "
            "(e.g. a KL weight schedule) has changed since capture; it runs eagerly from here",
        )
        return True

    # ------------------------------------------------------------------ a stepper's schedule
    @property
    def switch_at(self) -> int | None:
        """The step with a signature after which the Inductor decision is taken."""
        return _SWITCH_AT[self.backend]

    def mode(self, key: str, n: int, steps: int) -> str:
        """The mode of the ``n``-th (≥ 2) step with ``key``, the ``steps``-th in all."""
        if self.reason is not None:
            return "lean"
        if n <= 3:
            return "compile" if n == 2 else "verify"
        at = self.switch_at
        if at is not None and n == at + 1 and key in self.inductor and self.inductor[key] is None:
            return "verify"
        return "traced" if steps % self.check_every else "check"

    def _refuse(self, key: str, reason: str) -> None:
        self.inductor[key] = reason
        logger.info("%s keeps the aten graph of %s: %s", self.label, key, reason)

    def decides(self, key: str, n: int) -> bool:
        """Whether the Inductor decision for ``key`` is taken after its ``n``-th step."""
        return n == self.switch_at and self.graph(key) is not None and key not in self.inductor

    def decide(self, key: str, inputs: Sequence, remaining: float) -> None:
        """Decide, record and (when it pays) compile ``key``'s Inductor graph; ``inputs`` are
        the graph's (wrt, others, data), ``remaining`` the projected further steps with it."""
        if self.backend == "inductor":
            why = "backend='inductor'"
        elif self.planned_steps is None:
            return self._refuse(key, "no planned_steps, so no projection of the remaining steps")
        else:
            pays, why = inductor_pays(self.entries[key].captured.fx, remaining)
            if not pays:
                return self._refuse(key, why)
        self.inductor[key] = None
        logger.info("%s compiles %s with Inductor: %s", self.label, key, why)
        self.promote(key, inputs)

    def promote(self, key: str, inputs: Sequence) -> None:
        """Compile ``key``'s aten graph with Inductor (a dry run; the aten graph is kept)."""
        entry = self.entries[key]
        rule = entry.rule
        snapshot = rule.snapshot() if rule is not None else None
        try:
            state = rule.state() if rule is not None else []
            compiled = compile_inductor(entry.captured, [*inputs, *state])
        except CaptureError as e:
            return self._refuse(key, str(e))
        finally:
            if rule is not None:
                rule.restore(snapshot)
        compiled.whole_step = entry.captured.whole_step
        entry.aten, entry.captured = entry.captured, compiled

    def catch_up(self, key, n, steps, fn, wrt, data, *, names=(), rule=None) -> None:
        """Redo as dry runs the graph work of steps ``1..n-1`` with ``key`` that this object did
        not do (restored by :meth:`load_state_dict`): capture, Inductor compile, verifications."""
        if self.mode(key, n, steps) not in ("verify", "traced", "check"):
            return
        if key not in self.entries:
            self.capture(key, fn, wrt, data, names=names, rule=rule)
        at, entry = self.switch_at, self.entries.get(key)
        switched = key in self.inductor and self.inductor[key] is None
        if entry is not None and switched and at is not None and n > at:
            if entry.captured is not None and entry.captured.backend == "aten":
                self.promote(key, [*wrt, *data])
        for _ in range(2):  # the Inductor graph, then (if it fails) the aten graph under it
            if self.graph(key) is None or self.mode(key, n, steps) not in ("traced", "check"):
                return
            if not self.entries[key].captured.verified:
                with self.dry_run(wrt), pyro.validation_enabled(False):
                    self.verify(key, fn, wrt, data, keep=False)

    @contextmanager
    def dry_run(self, params: Sequence[torch.Tensor] = ()) -> Iterator[None]:
        """Restore the random state, the ``.grad`` of ``params`` and the estimator's state kept
        across steps (:func:`keeps_state`) on exit."""
        rng, grads = get_rng_state(), [(p, p.grad) for p in params]
        stateful = keeps_state(self.owner)
        saved = copy.deepcopy(self.owner.state_dict()) if stateful else None
        try:
            yield
        finally:
            for p, g in grads:
                p.grad = g
            if stateful:
                self.owner.load_state_dict(saved)
            set_rng_state(rng)

    def state_dict(self) -> dict:
        """The saved decisions: ``check_scale`` (``|loss|`` at verification) and ``inductor``."""
        return {"check_scale": dict(self.scale), "inductor": dict(self.inductor)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (keys absent from older checkpoints default to empty)."""
        self.scale = {str(k): float(v) for k, v in state.get("check_scale", {}).items()}
        self.inductor = {
            str(k): None if v is None else str(v) for k, v in state.get("inductor", {}).items()
        }
        self.entries.clear()


_POLICIES: WeakKeyDictionary = WeakKeyDictionary()


def policy_for(estimator: Any, max_entries: int = 8) -> CapturePolicy:
    """The shared per-estimator policy of callers without a schedule of their own (the inner
    loop, gradient moments): one graph per signature, failures per signature, at most
    ``max_entries`` signatures (each holds its model and guide alive)."""
    if estimator not in _POLICIES:
        _POLICIES[estimator] = CapturePolicy(
            estimator, per_key=True, max_entries=max_entries, label=type(estimator).__name__
        )
    return _POLICIES[estimator]
