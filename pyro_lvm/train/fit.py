"""Minibatch SVI training with per-epoch validation and resumable, safe checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, SVI
from pyro.optim import PyroOptim
from tqdm import tqdm

from pyro_lvm.data import Minibatches, check_accepts, named_chunks, split_named
from pyro_lvm.elbo import make_estimator
from pyro_lvm.train.checkpoint import load_checkpoint, save_checkpoint
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.history import FitHistory

__all__ = ["NonFiniteLossError", "fit"]

Callback = Callable[[FitHistory], Any]


class NonFiniteLossError(FloatingPointError):
    """A training step returned a NaN or infinite loss.

    :ivar epoch: the epoch (1-based) of the failing step.
    :ivar step: the step (1-based) within that epoch.
    :ivar checkpoint: the last good checkpoint file, or ``None`` when none was written.
    """

    def __init__(self, message: str, epoch: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


def _resolve_loss(loss: str | ELBO, num_particles: int) -> tuple[ELBO, str]:
    if isinstance(loss, ELBO):
        if num_particles != 1:
            raise ValueError(
                "num_particles applies to a loss given by name; construct the ELBO instance "
                f"with num_particles={num_particles} instead"
            )
        return loss, type(loss).__name__
    if isinstance(loss, str):
        return make_estimator(loss, num_particles=num_particles), loss
    raise ValueError(
        f"loss must be an estimator name (see pyro_lvm.elbo.ESTIMATORS) or a pyro.infer.ELBO, "
        f"got {type(loss).__name__}"
    )


def _set_num_data(model: Any, guide: Any, num_data: int) -> None:
    """Fill a ``num_data`` attribute that is ``None``; refuse one that disagrees."""
    for what, obj in (("model", model), ("guide", guide)):
        value = getattr(obj, "num_data", None)
        if value is not None and value != num_data:
            raise ValueError(
                f"the {what} has num_data={value} but the training set has {num_data} points; "
                f"build it with num_data=None (fit sets it) or num_data={num_data}"
            )
    for obj in (model, guide):
        if hasattr(obj, "num_data") and obj.num_data is None:
            obj.num_data = num_data


def _check_subsampling(
    model: Any, x: torch.Tensor, idx: torch.Tensor, num_data: int, named: dict | None = None
) -> None:
    """Check that the model scales a minibatch's likelihood by ``num_data / len(idx)``.

    Losses are reported per data point as ``loss / num_data``, which is right only when the
    observed sites sit in ``data_plate(x, idx, num_data)``. The trace runs under saved and
    restored RNG states, so it does not change the random stream of the run.
    """
    rng = pyro.util.get_rng_state()
    try:
        trace = poutine.trace(model).get_trace(x, idx, **(named or {}))
    finally:
        pyro.util.set_rng_state(rng)
    expected = num_data / len(idx)
    observed = [s for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site; observe the data with obs=x")
    bad = [
        f"{s['name']} (scale {float(s['scale']):g})"
        for s in observed
        if torch.as_tensor(s["scale"]).numel() == 1
        and not math.isclose(float(s["scale"]), expected, rel_tol=1e-9)
    ]
    if bad:
        raise ValueError(
            f"observed sites {', '.join(bad)} are not scaled by num_data / batch = {expected:g}; "
            "put the observations in pyro_lvm.plates.data_plate(x, idx, num_data) so minibatch "
            "losses estimate the full-data loss"
        )


@torch.no_grad()
def _valid_elbo(estimator: ELBO, model: Any, guide: Any, x: torch.Tensor, chunk: int) -> float:
    """The bound per data point on ``x``, full batches of ``chunk`` rows, ``idx=None``."""
    chunks = list(named_chunks(x, chunk))  # a tensor, or named tensors passed as kwargs
    total = sum(estimator.loss(model, guide, xc, **kw) for xc, kw in chunks)
    return -float(total) / sum(len(xc) for xc, _ in chunks)


def _check_data(name: str, x: Any) -> None:
    x = split_named(x, name)[0]  # a tensor, or a mapping of named tensors with "x"
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be a tensor with data points along dim 0, got {x!r:.80}")


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    train_data: torch.Tensor,
    *,
    loss: str | ELBO = "elbo",
    num_particles: int = 1,
    optimizer: PyroOptim | None = None,
    num_epochs: int = 10,
    batch_size: int = 100,
    valid_data: torch.Tensor | None = None,
    valid_loss: str | ELBO | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    extra: dict[str, Any] | None = None,
    fast: bool = True,
) -> FitHistory:
    r"""Train ``model`` and ``guide`` by stochastic variational inference on minibatches.

    Each step runs ``pyro.infer.SVI.step(x_b, idx_b)`` on a minibatch from
    :class:`~pyro_lvm.data.Minibatches` (shuffled, order a function of ``(seed, epoch)``), a
    stochastic gradient step on the estimator's bound

    .. math::

        \mathcal L(\theta, \lambda) = \sum_{i=1}^{N} \mathbb E_{q_\lambda(z_i \mid x_i)}
        \big[\log p_\theta(x_i, z_i) - \log q_\lambda(z_i \mid x_i)\big]
        \approx \frac{N}{|b|} \sum_{i \in b} \widehat{\mathcal L}_i

    (Hoffman et al. 2013, arXiv:1206.7051; Kingma & Welling 2014, arXiv:1312.6114). Losses are
    reported **per data point**, exactly as described in :class:`FitHistory`. After each epoch:
    the validation bound per data point (``idx=None``, chunks of ``batch_size``, no gradient),
    the ``callbacks``, then the checkpoint.

    :param model: ``model(x, idx=None)`` with its observations in
        :func:`~pyro_lvm.plates.data_plate` (checked once on the first minibatch).
    :param guide: ``guide(x, idx=None)``.
    :param train_data: training set, data points along dim 0: a tensor, or a mapping of named
        per-datapoint tensors ``{"x": x, "y": y, ...}`` sliced by the same indices, whose
        entries other than ``"x"`` reach model and guide as keyword arguments.
    :param loss: an estimator name from :data:`pyro_lvm.elbo.ESTIMATORS` or a
        ``pyro.infer.ELBO`` instance.
    :param num_particles: particles of a named estimator.
    :param optimizer: any ``pyro.optim.PyroOptim``; ``pyro.optim.Adam({"lr": 1e-3})`` by
        default.
    :param num_epochs: total number of epochs (a resumed run continues up to this number).
    :param batch_size: minibatch size (the last minibatch of an epoch may be smaller).
    :param valid_data: optional validation set (a tensor or named tensors, as ``train_data``).
    :param valid_loss: the estimator of the validation bound (a name, with ``num_particles``
        particles, or an instance); by default the training ``loss``. Pass the plain bound when
        training with a surrogate, e.g. ``loss=KLWeightedELBO(base, schedule)`` with
        ``valid_loss=base``, so that early stopping compares the same bound in every epoch.
    :param seed: seeds Pyro's generators at the start of a fresh run, and the minibatch order.
    :param checkpoint: file written atomically (see :func:`save_checkpoint`) after every
        epoch; never overwritten with non-finite parameters.
    :param resume: restore the model, guide, param store, optimizer, RNG and history from
        ``checkpoint`` and continue with the next epoch; the steps are then exactly those of an
        uninterrupted run.
    :param progress: show a tqdm bar with the epoch's running loss.
    :param callbacks: functions ``f(history)`` called after each epoch (before the checkpoint
        is written); a truthy return value stops training after that epoch.
    :param extra: JSON-serializable metadata stored in the checkpoint (e.g. model config).
    :param fast: step with :class:`~pyro_lvm.train.fast.FastSVI` (one fused optimizer,
        validation off after the first step, a traced loss where it provably matches; it falls
        back to the general path with a logged reason for dynamic models). ``False`` uses
        ``pyro.infer.SVI``; both give the same losses to float tolerance.
    :returns: the :class:`FitHistory`, including the epochs of a resumed checkpoint.
    :raises NonFiniteLossError: on a NaN or infinite loss; the message names the epoch, the
        step and the last good checkpoint (the in-memory parameters are then unusable).
    :raises ValueError: on bad arguments, a ``num_data`` attribute that disagrees with the
        training set, a model that does not subsample by ``idx``, or a checkpoint written with
        another ``batch_size``, ``seed``, loss or training-set size.
    :raises FileNotFoundError: with ``resume=True`` when the checkpoint does not exist (pass
        ``resume=os.path.exists(path)`` to start fresh in that case).

    Example::

        vae = VAE(x_dim=784, z_dim=20)
        history = fit(vae, vae.guide, x_train, valid_data=x_valid, num_epochs=5,
                      checkpoint="vae.pt")
        history = fit(vae, vae.guide, x_train, num_epochs=10, checkpoint="vae.pt", resume=True)
    """
    _check_data("train_data", train_data)
    if valid_data is not None:
        _check_data("valid_data", valid_data)
    if int(num_epochs) != num_epochs or num_epochs < 0:
        raise ValueError(f"num_epochs must be a non-negative integer, got {num_epochs}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    estimator, loss_name = _resolve_loss(loss, num_particles)
    if valid_loss is None:
        valid_estimator = estimator
    elif isinstance(valid_loss, ELBO):
        valid_estimator = valid_loss
    else:
        valid_estimator = _resolve_loss(valid_loss, num_particles)[0]
    if optimizer is None:
        optimizer = pyro.optim.Adam({"lr": 1e-3})
    if not isinstance(optimizer, PyroOptim):
        raise ValueError(
            f"optimizer must be a pyro.optim.PyroOptim (e.g. pyro.optim.Adam({{'lr': 1e-3}})), "
            f"got {type(optimizer).__name__}"
        )
    callbacks = list(callbacks)
    try:  # fail now rather than at the first checkpoint
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must be JSON-serializable with finite numbers: {e}") from e
    batches = Minibatches(train_data, int(batch_size), shuffle=True, seed=seed, drop_last=False)
    num_data = batches.num_data
    _set_num_data(model, guide, num_data)
    for what, fn in (("model", model), ("guide", guide)):
        check_accepts(fn, batches.names, what)
    config = {
        "loss": loss_name,
        "num_particles": int(getattr(estimator, "num_particles", num_particles)),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_data": int(num_data),
        "fast": bool(fast),  # the two paths keep optimizer state in different layouts
    }
    path = None if checkpoint is None else Path(checkpoint)
    last_good: Path | None = None
    if fast:
        svi = FastSVI(model, guide, optimizer, estimator)
        optimizer_state = svi  # its fused torch optimizer holds the moments
    else:
        svi = SVI(model, guide, optimizer, loss=estimator)
        optimizer_state = optimizer
    if resume:
        state = load_checkpoint(path, model=model, guide=guide, optimizer=optimizer_state)
        saved = state["metadata"].get("fit", {})
        if saved != config:
            raise ValueError(
                f"{path} was written by fit with {saved}, but this call has {config}; resume "
                "with the same settings (they fix the minibatch order and the loss scale)"
            )
        history = state["history"]
        start, last_good = state["epoch"], path
    else:
        pyro.set_rng_seed(seed)
        history = FitHistory(num_data=num_data, batch_size=int(batch_size))
        start = 0
    first = min(int(batch_size), num_data)
    head = torch.arange(first)
    _check_subsampling(model, batches.x[:first], head, num_data, batches.named(head))

    steps_per_epoch = len(batches)
    bar = tqdm(
        total=num_epochs * steps_per_epoch,
        initial=min(start, num_epochs) * steps_per_epoch,
        disable=not progress,
        desc="fit",
        unit="step",
    )
    try:
        for epoch in range(start, num_epochs):
            tic = time.perf_counter()
            batches.set_epoch(epoch)
            total, seen = 0.0, 0
            for step, (x, idx) in enumerate(batches, start=1):
                value = svi.step(x, idx, **batches.named(idx)) / num_data
                if not math.isfinite(value):
                    where = (
                        f"{last_good} (epoch {history.epochs})"
                        if last_good
                        else "none (no checkpoint was written)"
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss {value} at epoch {epoch + 1}, step {step} of "
                        f"{steps_per_epoch} (global step {history.steps + 1}); the parameters "
                        f"are no longer usable. Last good checkpoint: {where}",
                        epoch=epoch + 1,
                        step=step,
                        checkpoint=last_good,
                    )
                history.step_losses.append(value)
                total, seen = total + value * len(idx), seen + len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{total / seen:.4g}", refresh=False)
            history.epoch_losses.append(total / seen)
            if valid_data is not None:
                history.valid_elbos.append(
                    _valid_elbo(valid_estimator, model, guide, valid_data, int(batch_size))
                )
            history.epochs = epoch + 1
            history.seconds += time.perf_counter() - tic
            stop = any([bool(callback(history)) for callback in callbacks])
            if path is not None:
                save_checkpoint(
                    path,
                    model=model,
                    guide=guide,
                    optimizer=optimizer_state,
                    epoch=epoch + 1,
                    history=history,
                    extra={"fit": config, "extra": extra},
                )
                last_good = path
            if stop:
                break
    finally:
        bar.close()
    return history
