"""The parts of a training run that ``fit`` and ``fit_local`` assemble alike."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim

from pyro_lvm.capture_policy import SWITCH_BACKENDS
from pyro_lvm.train.callbacks import Callback, JSONLinesLogger, TensorBoardLogger, as_callbacks
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.history import FitHistory
from pyro_lvm.train.loop import Checkpointer

__all__ = [
    "check_counts",
    "check_extra",
    "check_optimizer",
    "make_callbacks",
    "make_checkpointer",
    "make_stepper",
    "start_history",
]

#: the file name of the JSON-lines metrics log in a run's ``log_dir``
METRICS_FILE = "metrics.jsonl"


def check_counts(num_epochs: Any, batch_size: Any) -> None:
    """Refuse a negative or fractional ``num_epochs`` and a ``batch_size`` below 1."""
    if int(num_epochs) != num_epochs or num_epochs < 0:
        raise ValueError(f"num_epochs must be a non-negative integer, got {num_epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")


def check_extra(extra: Any) -> None:
    """Fail now, rather than at the first checkpoint, on metadata that JSON cannot hold."""
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serializable with finite numbers: {e}") from e


def check_optimizer(optimizer: PyroOptim | None, lr: float = 1e-3) -> PyroOptim:
    """``optimizer``, or ``pyro.optim.Adam({"lr": lr})`` when it is ``None``.

    :raises ValueError: on anything but a ``pyro.optim.PyroOptim``.
    """
    if optimizer is None:
        return pyro.optim.Adam({"lr": lr})
    if not isinstance(optimizer, PyroOptim):
        raise ValueError(
            f"optimizer must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{'lr': 1e-3}})), "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def make_stepper(
    model: Callable,
    guide: Callable,
    optimizer: PyroOptim,
    estimator: ELBO,
    fast: bool,
    backend: str = "auto",
    planned_steps: int | None = None,
) -> tuple[Any, Any]:
    """The object that takes steps and the one that holds the optimizer state.

    ``fast``: a :class:`~pyro_lvm.train.FastSVI` (with ``backend`` and the run's
    ``planned_steps``, for its Inductor decision), which holds its fused optimizer's state
    itself; otherwise ``pyro.infer.SVI``, whose state is in the ``PyroOptim``.

    :raises ValueError: on an unknown ``backend``, also with ``fast=False``.
    """
    if backend not in SWITCH_BACKENDS:
        raise ValueError(f"backend must be one of {SWITCH_BACKENDS}, got {backend!r}")
    if fast:
        svi = FastSVI(
            model, guide, optimizer, estimator, backend=backend, planned_steps=planned_steps
        )
        return svi, svi
    return SVI(model, guide, optimizer, loss=estimator), optimizer


def make_callbacks(
    callbacks: Sequence[Callback | Callable[[FitHistory], Any]],
    log_dir: str | os.PathLike | None,
    tensorboard: bool,
) -> list[Callback]:
    """The user's callbacks (plain functions run per epoch), then the run folder's loggers:
    ``log_dir/metrics.jsonl`` (:class:`~pyro_lvm.train.callbacks.JSONLinesLogger`) and, with
    ``tensorboard``, event files in ``log_dir/tensorboard``.

    :raises ValueError: on ``tensorboard=True`` without a ``log_dir``.
    :raises ImportError: on ``tensorboard=True`` without the ``tensorboard`` package.
    """
    out = as_callbacks(callbacks)
    if tensorboard and log_dir is None:
        raise ValueError("tensorboard=True needs log_dir=, the folder the event files go to")
    if log_dir is not None:
        out.append(JSONLinesLogger(Path(log_dir) / METRICS_FILE))
        if tensorboard:
            out.append(TensorBoardLogger(Path(log_dir) / "tensorboard"))
    return out


def make_checkpointer(
    checkpoint: str | os.PathLike | None,
    *,
    model: Any,
    guide: Any,
    optimizer_state: Any,
    estimator: ELBO,
    loss_name: str,
    num_particles: int,
    batch_size: int,
    seed: int,
    num_data: int,
    fast: bool,
    extra: dict[str, Any] | None,
    device: Any,
    config: dict[str, Any] | None = None,
    cls: type[Checkpointer] = Checkpointer,
) -> Checkpointer | None:
    """The run's :class:`~pyro_lvm.train.loop.Checkpointer` (``None`` without a path).

    Its configuration, which a resume must match, is what fixes the minibatch order and the
    loss scale: loss name, particles, batch size, seed, data size, and whether FastSVI runs
    (the two paths keep optimizer state in different layouts); ``config`` adds a loop's own
    settings. ``cls`` is the checkpointer class (a sharded guide's gathers its rows).
    """
    if checkpoint is None:
        return None
    settings = {
        **(config or {}),
        "loss": loss_name,
        "num_particles": int(getattr(estimator, "num_particles", num_particles)),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_data": int(num_data),
        "fast": bool(fast),
    }
    return cls(
        checkpoint, model=model, guide=guide, optimizer=optimizer_state, estimator=estimator,
        config=settings, extra=extra, map_location=device,
    )  # fmt: skip


def start_history(
    checkpointer: Checkpointer | None, resume: bool, seed: int, num_data: int, batch_size: int
) -> FitHistory:
    """The history to continue: restored with the whole state from the checkpoint when
    ``resume``, else a new one (and Pyro's generators seeded with ``seed``).

    :raises ValueError: on ``resume`` without a checkpoint path.
    """
    if resume:
        if checkpointer is None:
            raise ValueError("resume=True needs the checkpoint path to resume from")
        return checkpointer.restore()
    pyro.set_rng_seed(seed)
    return FitHistory(num_data=num_data, batch_size=int(batch_size))
