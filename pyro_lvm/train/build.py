"""The parts of a training run that ``fit`` and ``fit_local`` assemble alike."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim

from pyro_lvm.capture.policy import SWITCH_BACKENDS
from pyro_lvm.contract import as_program
from pyro_lvm.data import Minibatches, check_accepts, split_named
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.train.callbacks import Callback, JSONLinesLogger, TensorBoardLogger, as_callbacks
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.loop import Checkpointer
from pyro_lvm.validation import check_rows, validate_inputs

__all__ = [
    "Setup",
    "check_counts",
    "check_extra",
    "check_optimizer",
    "make_callbacks",
    "make_checkpointer",
    "make_stepper",
    "prepare_run",
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


@dataclass
class Setup:
    """What :func:`prepare_run` assembled for one training run.

    :ivar model, guide: the programs to step, in the form ``(x, idx=None, **named)``, their
        plain data plate scaled by N/B (:func:`~pyro_lvm.contract.scaled_programs`).
    :ivar data, named: the checked training tensor and its named per-datapoint tensors.
    :ivar valid_data, valid_named: likewise for the validation set (``None``, ``{}``).
    :ivar estimator, loss_name: the training estimator and the name checkpoints record.
    :ivar device: the training device; ``par``: the data-parallel group (identity in one
        process); ``batches``: the minibatches; ``callbacks``: user callbacks and loggers.
    :ivar stepper: takes the steps; ``checkpointer``: writes the checkpoints (or ``None``);
        ``history``: the history to continue.
    """

    model: Callable
    guide: Callable
    data: torch.Tensor
    named: dict[str, torch.Tensor]
    valid_data: torch.Tensor | None
    valid_named: dict[str, torch.Tensor]
    estimator: ELBO
    loss_name: str
    device: Any
    par: Any
    batches: Minibatches
    callbacks: list[Callback]
    stepper: Any = None
    checkpointer: Checkpointer | None = None
    history: FitHistory | None = None

    def target(self) -> Any:
        """Where minibatches go: the device, or the data's own."""
        return self.data.device if self.device is None else self.device


def prepare_run(
    model: Callable,
    guide: Callable,
    data: Any,
    *,
    what: str,
    loss: str | ELBO,
    num_particles: int,
    optimizer: PyroOptim | None,
    lr: float,
    num_epochs: int,
    batch_size: int,
    seed: int,
    checkpoint: str | os.PathLike | None,
    resume: bool,
    callbacks: Sequence[Any],
    extra: dict[str, Any] | None,
    fast: bool,
    device: Any,
    log_dir: str | os.PathLike | None,
    tensorboard: bool,
    backend: str,
    valid_data: Any = None,
    rates: dict[str, float] | None = None,
    owned: bool = False,
    check: Callable[[Any], None] | None = None,
    step_programs: Callable[[Callable, Callable], tuple[Callable, Callable]] | None = None,
    config: dict[str, Any] | None = None,
    checkpointer_cls: type[Checkpointer] = Checkpointer,
) -> Setup:
    """Assemble a training run the same way for :func:`~pyro_lvm.train.fit` and
    :func:`~pyro_lvm.train.fit_local`: the checks of the arguments, data and programs, the
    estimator, optimizer, minibatches, data-parallel group, device, the data plate's scale,
    the stepper, the checkpointer and the history (restored on ``resume``).

    :param what: ``"fit"`` or ``"fit_local"`` (messages); ``data``: a tensor or named tensors
        (``"train_data"`` is its name in messages for ``fit``, ``"data"`` otherwise).
    :param lr: the learning rate of the default optimizer (``pyro.optim.Adam``).
    :param rates: further learning rates to check (``{"inner_lr": ...}``).
    :param owned: each process steps on the points it owns (``fit_local``).
    :param check: ``check(par)`` runs further checks of the caller once the group is known.
    :param step_programs: maps the (scaled) model and guide to the programs the stepper runs.
    :param config: the loop's own settings stored in (and matched by) the checkpoint.
    :param checkpointer_cls: the checkpointer class.
    """
    from pyro_lvm.contract import scaled_programs, set_num_data
    from pyro_lvm.device import device_scope, resolve_device, to_device
    from pyro_lvm.elbo import prepare_for_fit
    from pyro_lvm.elbo.stateful import resolve_estimator
    from pyro_lvm.runs.load import input_record
    from pyro_lvm.train.distributed.data_parallel import DataParallel

    name = "train_data" if what == "fit" else "data"
    data, named = split_named(data, name)  # a tensor, or named tensors (pyro_lvm.data.named)
    valid_named: dict[str, torch.Tensor] = {}
    if valid_data is not None:
        valid_data, valid_named = split_named(valid_data, "valid_data")
    check_rows(data, name)
    if valid_data is not None:
        check_rows(valid_data, "valid_data")
    for role, fn in (("model", model), ("guide", guide)):
        check_accepts(fn, named, role)
    check_counts(num_epochs, batch_size)
    check_extra(extra)
    device = resolve_device(device)
    num_data, batch_size = len(data), int(batch_size)
    par = DataParallel(num_data, batch_size, owned=owned, device=device)
    if check is not None:
        check(par)
    device = par.cuda_device(device)  # local rank k drives GPU k
    estimator, loss_name = resolve_estimator(loss, num_particles)
    # Pyro ELBOs whose loss is not a bound are adapted, those that cannot train refused
    estimator = prepare_for_fit(estimator, num_data, batch_size)
    optimizer = check_optimizer(optimizer, lr)
    set_num_data(model, guide, num_data)  # a self-scaling plate needs N
    programs = as_program(model), as_program(guide)  # (x), (x, idx) and (x, idx, **named)
    head = torch.arange(min(batch_size, num_data))
    head = head[par.rows(head)] if owned and par.active else head  # points this process owns
    data, valid_data = validate_inputs(
        *programs, data, idx=head, valid_data=valid_data, optimizer=optimizer, rates=rates,
        name=name, **named,
    )  # fmt: skip
    setup = Setup(
        *programs, data, named, valid_data, valid_named, estimator, loss_name, device, par,
        Minibatches({"x": data, **named}, batch_size, shuffle=True, seed=seed),
        make_callbacks(callbacks, log_dir, tensorboard),
    )  # fmt: skip
    to_device(device, model, guide)
    with device_scope(device):  # the plain data plate of a tutorial-style model gets N / B
        target = setup.target()
        kwargs = {k: v.to(target) for k, v in setup.batches.named(head).items()}
        setup.model, setup.guide = scaled_programs(
            *programs, data[head].to(target), head.to(target), num_data, kwargs
        )
    stepped = (setup.model, setup.guide)
    if step_programs is not None:
        stepped = step_programs(*stepped)
    planned = int(num_epochs) * len(setup.batches)  # for FastSVI(backend="auto")
    setup.stepper, optimizer_state = make_stepper(
        *stepped, optimizer, estimator, fast, backend, planned
    )
    setup.checkpointer = make_checkpointer(
        checkpoint, model=model, guide=guide, optimizer_state=optimizer_state,
        estimator=estimator, loss_name=loss_name, num_particles=num_particles,
        batch_size=batch_size, seed=seed, num_data=num_data, fast=fast, extra=extra,
        device=device, config=config, cls=checkpointer_cls,
    )  # fmt: skip
    if setup.checkpointer is not None:  # what load_run runs the programs on once
        setup.checkpointer.program["input"] = input_record(data, named)
    setup.history = start_history(setup.checkpointer, resume, seed, num_data, batch_size)
    return setup
