"""Callbacks of the training loop: per step and per epoch; JSON-lines and TensorBoard loggers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pyro_lvm.runs.history import FitHistory

__all__ = ["Callback", "EpochCallback", "JSONLinesLogger", "TensorBoardLogger", "as_callbacks"]


class Callback:
    """Base class of the hooks that :func:`~pyro_lvm.train.fit` and
    :func:`~pyro_lvm.train.fit_local` call; override any of them.

    The loop calls, in order: :meth:`on_start` once (after a resume, the restored history
    holds the finished epochs), :meth:`on_step` after every optimization step, :meth:`on_epoch`
    after every epoch (after validation, before the checkpoint is written), and :meth:`on_end`
    once when the loop ends, normally or by an exception. Every hook receives the live
    :class:`~pyro_lvm.train.FitHistory`: the step just taken is ``history.step_losses[-1]``
    (its further metrics ``history.step_metrics[name][-1]``), the epoch just finished is
    epoch ``history.epochs``.

    A truthy return of :meth:`on_epoch` stops training after that epoch (its checkpoint is
    still written); the return values of the other hooks are ignored, so a run only stops at
    an epoch boundary, where a checkpoint can resume it exactly.

    In a multi-process run (:mod:`pyro_lvm.train.distributed.data_parallel`) every process runs the
    callbacks on the same (all-reduced) history, except those whose class sets ``main_only =
    True`` (the loggers, which write files): rank 0 alone runs them.

    Example: a KL warm-up stepped once per optimization step::

        class StepSchedule(Callback):
            def __init__(self, schedule):
                self.schedule = schedule

            def on_step(self, history):
                self.schedule.step()
    """

    #: run on rank 0 only in a multi-process run (callbacks that write files)
    main_only: bool = False

    def on_start(self, history: FitHistory) -> None:
        """Before the first step of this call (``history.epochs`` epochs are already done)."""

    def on_step(self, history: FitHistory) -> None:
        """After every optimization step."""

    def on_epoch(self, history: FitHistory) -> bool | None:
        """After every epoch; a truthy value stops training."""
        return None

    def on_end(self, history: FitHistory) -> None:
        """When the loop ends (also on an exception): close files here."""


class EpochCallback(Callback):
    """A plain function ``f(history)`` called after every epoch (the ``callbacks=`` of old);
    a truthy return value stops training."""

    def __init__(self, fn: Callable[[FitHistory], Any]):
        if not callable(fn):
            raise ValueError(f"a callback must be callable or a Callback, got {fn!r:.80}")
        self.fn = fn

    def on_epoch(self, history: FitHistory) -> bool:
        return bool(self.fn(history))

    def __repr__(self) -> str:
        return f"EpochCallback({self.fn!r})"


def as_callbacks(callbacks: Iterable[Callback | Callable[[FitHistory], Any]]) -> list[Callback]:
    """``Callback`` objects as they are, plain functions wrapped as :class:`EpochCallback`."""
    return [c if isinstance(c, Callback) else EpochCallback(c) for c in callbacks]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN


class JSONLinesLogger(Callback):
    """Write one JSON object per line to ``path``: every step and every epoch.

    Step lines: ``{"event": "step", "epoch": e, "step": t, "loss": ℓ, ...step metrics}`` with
    ``t`` the global step (1-based) and ``e`` the epoch it belongs to (1-based). Epoch lines:
    ``{"event": "epoch", "epoch": e, "step": t, "loss": ..., "valid_elbo": ..., "seconds":
    ..., ...epoch metrics}``; ``valid_elbo`` is present when validation ran. Losses are per
    data point (see :class:`~pyro_lvm.train.FitHistory`); non-finite values are written as
    ``null``.

    A fresh run (no finished epoch) starts a new file. A resumed run keeps the lines of the
    epochs the checkpoint holds and drops later ones (written by the interrupted run after its
    last checkpoint), so the file always describes one run. Lines are flushed after every
    epoch.

    :param path: the ``.jsonl`` file.
    :param every: write a step line every this many steps (epoch lines always).
    """

    main_only = True

    def __init__(self, path: str | os.PathLike, every: int = 1):
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.path, self.every = Path(path), int(every)
        self._file = None

    def on_start(self, history: FitHistory) -> None:
        kept = []
        if history.epochs > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash: nothing after it is kept
                if record.get("epoch", math.inf) > history.epochs:
                    break
                kept.append(line + "\n")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w")  # noqa: SIM115 - closed in on_end
        self._file.writelines(kept)

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")

    def on_step(self, history: FitHistory) -> None:
        if history.steps % self.every:
            return
        record = {"event": "step", "epoch": history.epochs + 1, "step": history.steps}
        record["loss"] = _finite(history.step_losses[-1])
        record.update({k: _finite(v[-1]) for k, v in history.step_metrics.items()})
        self._write(record)

    def on_epoch(self, history: FitHistory) -> None:
        record = {"event": "epoch", "epoch": history.epochs, "step": history.steps}
        record["loss"] = _finite(history.epoch_losses[-1])
        if len(history.valid_elbos) == history.epochs:
            record["valid_elbo"] = _finite(history.valid_elbos[-1])
        record["seconds"] = history.seconds
        record.update({k: _finite(v[-1]) for k, v in history.epoch_metrics.items()})
        self._write(record)
        self._file.flush()

    def on_end(self, history: FitHistory) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardLogger(Callback):
    """Scalars for TensorBoard through ``torch.utils.tensorboard.SummaryWriter``.

    Needs the optional ``tensorboard`` package (``pip install pyro-lvm[tensorboard]``).
    Tags: ``train/step_loss`` and ``step/<metric>`` per global step; ``train/epoch_loss``,
    ``valid/elbo`` and ``epoch/<metric>`` per epoch. Losses are per data point. A resumed run
    writes to the same folder; TensorBoard shows the latest value of a repeated step.

    :param log_dir: the folder of the event files.
    :param every: write step scalars every this many steps.
    :raises ImportError: when ``tensorboard`` is not installed (the message names the extra).
    """

    main_only = True

    def __init__(self, log_dir: str | os.PathLike, every: int = 1):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "TensorBoard logging needs the tensorboard package: pip install tensorboard "
                "(or pyro-lvm[tensorboard])"
            ) from e
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer, got {every}")
        self.log_dir, self.every = Path(log_dir), int(every)
        self._writer_class = SummaryWriter
        self.writer = None

    def on_start(self, history: FitHistory) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir))

    def on_step(self, history: FitHistory) -> None:
        if history.steps % self.every:
            return
        self.writer.add_scalar("train/step_loss", history.step_losses[-1], history.steps)
        for name, values in history.step_metrics.items():
            self.writer.add_scalar(f"step/{name}", values[-1], history.steps)

    def on_epoch(self, history: FitHistory) -> None:
        epoch = history.epochs
        self.writer.add_scalar("train/epoch_loss", history.epoch_losses[-1], epoch)
        if len(history.valid_elbos) == epoch:
            self.writer.add_scalar("valid/elbo", history.valid_elbos[-1], epoch)
        for name, values in history.epoch_metrics.items():
            self.writer.add_scalar(f"epoch/{name}", values[-1], epoch)
        self.writer.flush()

    def on_end(self, history: FitHistory) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
