r"""The one training loop behind :func:`~pyro_lvm.train.fit` and
:func:`~pyro_lvm.train.fit_local`.

Its pieces, each a small function with one job, in the order they run:

- :func:`epoch_order`: the permutation of an epoch, drawn on the CPU from ``(seed, epoch)``
  (so runs on any device, and every process of a distributed run, visit the same rows).
- :func:`iterate_batches`: cut the order into :class:`Batch` objects on the training device.
  A batch carries positional arguments ``(x, idx)`` and keyword arguments: *named
  per-datapoint tensors (labels, masks) are sliced with the same ``idx`` into
  ``Batch.kwargs`` here*, and every step, validation and check passes them on as
  ``model(x, idx, **kwargs)``.
- :func:`svi_step`: one step of a stepper with Pyro's ``SVI.step`` interface (``FastSVI`` or
  ``pyro.infer.SVI``). Its ``before_update`` hooks run between the backward pass and the
  optimizer update (a torch optimizer step pre-hook, once per step): the gradient all-reduce of
  data parallelism goes here.
- :func:`run_epoch`: one pass over the batches with the non-finite-loss guard, the per-step
  history, callbacks and progress bar.
- :func:`validate`: the bound per data point on held-out data.
- :class:`Checkpointer`: write and restore the complete state (model, guide, param store,
  optimizer, estimator, RNG, history) with the run's configuration.
- :func:`run`: start callbacks, epochs, validation, epoch callbacks, checkpoint, stop.

Checks of the model and data before the first step live in :mod:`pyro_lvm.contract`.

Several processes (``Loop.parallel``, see :mod:`pyro_lvm.train.distributed.data_parallel`): each
steps on its shard of every batch and records the global batch's all-reduced loss and metrics
(the same history, so the guards decide alike); rank 0 alone shows progress, runs ``main_only``
callbacks (loggers) and writes checkpoints; a stop asked by any process stops all.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pyro.infer import ELBO
from tqdm import tqdm

from pyro_lvm.data import Minibatches
from pyro_lvm.device import device_scope
from pyro_lvm.runs.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.runs.load import program_record
from pyro_lvm.train.callbacks import Callback
from pyro_lvm.train.divergence import DivergenceMonitor, RunFailedError
from pyro_lvm.train.step import Batch

__all__ = [
    "Checkpointer",
    "Loop",
    "NonFiniteLossError",
    "StepResult",
    "epoch_order",
    "iterate_batches",
    "run",
    "run_epoch",
    "validate",
]


class NonFiniteLossError(RunFailedError):
    """A training step returned a NaN or infinite loss (``epoch``, ``step`` and the last good
    ``checkpoint`` as in :class:`~pyro_lvm.train.divergence.RunFailedError`)."""


@dataclass
class StepResult:
    """What a step reports: the SVI loss of its minibatch (the estimate of the full-data loss,
    :math:`\\frac{N}{|b|}\\sum_{i \\in b} -\\widehat{\\mathcal L}_i`) and further metrics as
    means over the minibatch's data points."""

    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def epoch_order(batches: Minibatches, epoch: int) -> torch.Tensor:
    """The row order of ``epoch``: a CPU ``LongTensor``, a pure function of ``(seed, epoch)``."""
    return batches.permutation(epoch)


def iterate_batches(
    data: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    device: torch.device | None,
    named: dict[str, torch.Tensor] | None = None,
) -> Iterator[Batch]:
    """Cut ``order`` into minibatches ``Batch((x[idx], idx), {k: v[idx]})`` on ``device``
    (default: the data's); ``named`` are further per-datapoint tensors (issue 21), sliced by
    the same indices and passed as keyword arguments. Rows are gathered where the data lives,
    then moved: no Python loop over points."""
    target = data.device if device is None else device
    order = order.to(data.device)
    named = named or {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        kwargs = {k: v[idx.to(v.device)].to(target) for k, v in named.items()}
        yield Batch((data[idx].to(target), idx.to(target)), kwargs, len(idx))


@torch.no_grad()
def validate(
    estimator: ELBO,
    model: Any,
    guide: Any,
    data: torch.Tensor,
    chunk: int,
    device: torch.device | None = None,
    named: dict[str, torch.Tensor] | None = None,
) -> float:
    """The bound per data point on ``data``: ``-estimator.loss`` summed over full chunks of
    ``chunk`` rows (``idx=None``, no gradient; ``named`` tensors sliced alike and passed as
    keyword arguments), divided by the number of rows."""
    target = data.device if device is None else device
    total = 0.0
    for start in range(0, data.shape[0], chunk):
        rows = slice(start, start + chunk)
        kwargs = {k: v[rows].to(target) for k, v in (named or {}).items()}
        total += estimator.loss(model, guide, data[rows].to(target), **kwargs)
    return -float(total) / data.shape[0]


class Checkpointer:
    """Write the complete training state after each epoch; restore it to resume.

    The configuration ``config`` (batch size, seed, loss name, data size...) is stored with
    the state and must match on resume: it fixes the minibatch order and the loss scale.

    :param path: the checkpoint file.
    :param model: the model; ``guide``: the guide.
    :param optimizer: what holds the optimizer state (``FastSVI``, or the ``PyroOptim``).
    :param estimator: the training estimator (its state is saved if it keeps any).
    :param config: the run's settings (JSON values).
    :param extra: user metadata (JSON values).
    :param map_location: the device of restored tensors that create new objects.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        model: Any,
        guide: Any,
        optimizer: Any,
        estimator: Any,
        config: dict[str, Any],
        extra: dict[str, Any] | None = None,
        map_location: torch.device | None = None,
    ):
        self.path, self.model, self.guide = Path(path), model, guide
        self.optimizer, self.estimator, self.config = optimizer, estimator, config
        self.extra, self.map_location = extra, map_location
        #: the last checkpoint known to hold a good state (``None`` before one exists)
        self.last_good: Path | None = None
        #: what rebuilds the model and guide (:func:`pyro_lvm.runs.load.program_record`)
        self.program = program_record(model, guide)

    def save(self, history: FitHistory) -> None:
        """Write the state after ``history.epochs`` epochs (atomically, finite values only)."""
        save_checkpoint(
            self.path,
            model=self.model,
            guide=self.guide,
            optimizer=self.optimizer,
            epoch=history.epochs,
            history=history,
            extra={"fit": self.config, "extra": self.extra, "program": self.program},
            estimator=self.estimator,
        )
        self.last_good = self.path

    def restore(self) -> FitHistory:
        """Load the state into the live objects and return the saved history.

        :raises FileNotFoundError: when the file does not exist.
        :raises ValueError: when it was written with another configuration, or a state does
            not fit (an estimator state the estimator cannot take included).
        """
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file {self.path} does not exist")
        saved = read_checkpoint(self.path)["metadata"].get("fit", {})
        if saved != self.config:
            raise ValueError(
                f"{self.path} was written by fit with {saved}, but this call has {self.config}; "
                "resume with the same settings (they fix the minibatch order and the loss scale)"
            )
        state = load_checkpoint(
            self.path,
            model=self.model,
            guide=self.guide,
            optimizer=self.optimizer,
            estimator=self.estimator,
            map_location=self.map_location,
        )
        self.last_good = self.path
        return state["history"]


@dataclass
class Loop:
    """Everything one training run needs; :func:`run` runs it.

    :ivar step: ``step(batch) -> StepResult``, one optimization step on a minibatch.
    :ivar data: the training set; ``batches``: its :class:`~pyro_lvm.data.Minibatches`
        (order and batch size).
    :ivar num_epochs: the total epochs (a resumed run continues up to it).
    :ivar device: the training device (``None``: where the data is).
    :ivar validate: ``f() -> float``, the validation bound per data point, or ``None``.
    :ivar checkpointer: writes the state after every epoch, or ``None``.
    :ivar callbacks: :class:`~pyro_lvm.train.callbacks.Callback` objects.
    :ivar progress: show a tqdm bar; ``desc``: its label.
    :ivar divergence: stops a run whose finite loss diverged
        (:class:`~pyro_lvm.train.divergence.DivergenceMonitor`), or ``None``.
    :ivar parallel: the process group's
        :class:`~pyro_lvm.train.distributed.DataParallel` in a multi-process run, else
        ``None``.
    """

    step: Callable[[Batch], StepResult]
    data: torch.Tensor
    batches: Minibatches
    num_epochs: int
    device: torch.device | None = None
    validate: Callable[[], float] | None = None
    checkpointer: Checkpointer | None = None
    callbacks: list[Callback] = field(default_factory=list)
    progress: bool = True
    desc: str = "fit"
    divergence: DivergenceMonitor | None = None
    parallel: Any = None


def _non_finite(loop: Loop, history: FitHistory, value: float, epoch: int, step: int):
    last = None if loop.checkpointer is None else loop.checkpointer.last_good
    where = f"{last} (epoch {history.epochs})" if last else "none (no checkpoint was written)"
    return NonFiniteLossError(
        f"non-finite loss {value} at epoch {epoch + 1}, step {step} of {len(loop.batches)} "
        f"(global step {history.steps + 1}); the parameters are no longer usable. Last good "
        f"checkpoint: {where}",
        epoch=epoch + 1,
        step=step,
        checkpoint=last,
    )


def _callbacks(loop: Loop) -> list[Callback]:
    """The callbacks this process runs: all on rank 0, those not ``main_only`` elsewhere."""
    if loop.parallel is None or loop.parallel.is_main:
        return loop.callbacks
    return [c for c in loop.callbacks if not getattr(c, "main_only", False)]


def run_epoch(loop: Loop, history: FitHistory, epoch: int, bar: tqdm) -> None:
    """One pass over epoch ``epoch`` (0-based): steps, guard, per-step records and callbacks.

    Records the losses per data point :math:`\\ell_b = \\text{loss}_b / N` and the epoch's
    size-weighted means in ``history``.

    :raises NonFiniteLossError: at the first NaN or infinite loss.
    :raises DivergenceError: at the first loss that ``loop.divergence`` calls diverged.
    """
    num_data = loop.batches.num_data
    order = epoch_order(loop.batches, epoch)
    total, seen, sums = 0.0, 0, {}
    batches = iterate_batches(
        loop.data, order, loop.batches.batch_size, loop.device, loop.batches.named_data
    )
    par, callbacks = loop.parallel, _callbacks(loop)
    for step, batch in enumerate(batches, start=1):
        if par is None:
            result = loop.step(batch)
        else:  # this process's shard; the global batch's loss and metrics back
            result = loop.step(par.shard(batch))
            loss, *values = par.reduce([result.loss, *result.metrics.values()])
            result = StepResult(loss, dict(zip(result.metrics, values, strict=True)))
        value = result.loss / num_data
        if not math.isfinite(value):
            raise _non_finite(loop, history, value, epoch, step)
        if loop.divergence is not None:
            last = None if loop.checkpointer is None else loop.checkpointer.last_good
            loop.divergence.check(value, epoch=epoch + 1, step=step, checkpoint=last)
        history.record_step(value, result.metrics)
        total, seen = total + value * batch.size, seen + batch.size
        for name, metric in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + metric * batch.size
        for callback in callbacks:
            callback.on_step(history)
        bar.update(1)
        shown = {k: f"{v:.3g}" for k, v in result.metrics.items()}
        bar.set_postfix(epoch=epoch + 1, loss=f"{total / seen:.4g}", **shown, refresh=False)
    history.record_epoch(total / seen, {name: s / seen for name, s in sums.items()})


def run(loop: Loop, history: FitHistory) -> FitHistory:
    """Run the epochs after ``history.epochs`` up to ``loop.num_epochs``.

    Per epoch: :func:`run_epoch`, validation, the epochs' callbacks (a truthy one stops
    training after this epoch), the checkpoint. Everything runs under
    :func:`~pyro_lvm.device.device_scope` of the training device.
    """
    start, per_epoch = history.epochs, len(loop.batches)
    par, callbacks = loop.parallel, _callbacks(loop)
    bar = tqdm(
        total=loop.num_epochs * per_epoch,
        initial=min(start, loop.num_epochs) * per_epoch,
        disable=not loop.progress or not (par is None or par.is_main),
        desc=loop.desc,
        unit="step",
    )
    for callback in callbacks:
        callback.on_start(history)
    try:
        with device_scope(loop.device):
            for epoch in range(start, loop.num_epochs):
                tic = time.perf_counter()
                run_epoch(loop, history, epoch, bar)
                if loop.validate is not None:
                    history.valid_elbos.append(loop.validate())
                history.seconds += time.perf_counter() - tic
                stop = any([bool(c.on_epoch(history)) for c in callbacks])
                if par is not None:
                    stop = par.agree(stop)
                if loop.checkpointer is not None and par is None:
                    loop.checkpointer.save(history)
                elif loop.checkpointer is not None:  # rank 0 writes, then a barrier
                    par.save(loop.checkpointer, history)
                if stop:
                    break
    finally:
        bar.close()
        for callback in callbacks:
            callback.on_end(history)
    return history
