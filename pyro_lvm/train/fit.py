"""Minibatch SVI training (:func:`fit`): the training loop of :mod:`pyro_lvm.train.loop`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from pyro_lvm.device import DeviceLike, device_scope
from pyro_lvm.elbo import prepare_for_fit
from pyro_lvm.elbo.stateful import resolve_estimator
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.train.build import prepare_run
from pyro_lvm.train.callbacks import Callback
from pyro_lvm.train.divergence import DEFAULT_DIVERGENCE, DivergenceMonitor, DivergenceRule
from pyro_lvm.train.loop import Loop, NonFiniteLossError, StepResult, run
from pyro_lvm.train.loop import validate as validation_bound
from pyro_lvm.train.step import svi_step

__all__ = ["NonFiniteLossError", "fit"]


def _valid_estimator(valid_loss: str | ELBO | None, estimator: ELBO, num_particles: int) -> ELBO:
    if valid_loss is None:
        return estimator
    if isinstance(valid_loss, ELBO):
        return prepare_for_fit(valid_loss)
    return resolve_estimator(valid_loss, num_particles)[0]


def fit(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    train_data: torch.Tensor,
    *,
    loss: str | ELBO = "elbo",
    num_particles: int = 1,
    optimizer: PyroOptim | None = None,
    lr: float = 1e-3,
    num_epochs: int = 10,
    batch_size: int = 100,
    valid_data: torch.Tensor | None = None,
    valid_loss: str | ELBO | None = None,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    callbacks: Sequence[Callback | Callable[[FitHistory], Any]] = (),
    extra: dict[str, Any] | None = None,
    fast: bool = True,
    device: DeviceLike = None,
    log_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    divergence: DivergenceRule | None = DEFAULT_DIVERGENCE,
    backend: str = "auto",
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
    the ``callbacks``, then the checkpoint. The loop itself (shared with :func:`fit_local`) is
    :func:`pyro_lvm.train.loop.run`.

    :param model: a Pyro program ``model(x)``, ``model(x, idx=None)`` or
        ``model(x, idx=None, **named)`` (the contract of :mod:`pyro_lvm.contract`): its
        observations in a data plate that scales itself
        (:func:`~pyro_lvm.plates.data_plate`), or in a plain ``pyro.plate("data",
        x.shape[0])`` that the loop scales by N/B (the sites inside it only); checked once on
        the first minibatch.
    :param guide: the guide, with the same signature rules.
    :param train_data: training set, data points along dim 0: a tensor, or a mapping of named
        per-datapoint tensors ``{"x": x, "y": y, ...}`` sliced by the same indices, whose
        entries other than ``"x"`` reach model and guide as keyword arguments.
    :param loss: an estimator name from :data:`pyro_lvm.elbo.ESTIMATORS` or a
        ``pyro.infer.ELBO`` instance.
    :param num_particles: particles of a named estimator.
    :param optimizer: any ``pyro.optim.PyroOptim``; ``pyro.optim.Adam({"lr": lr})`` by
        default.
    :param lr: the learning rate of the default optimizer (as in :func:`fit_local`).
    :param num_epochs: total number of epochs (a resumed run continues up to this number).
    :param batch_size: minibatch size (the last minibatch of an epoch may be smaller). Under
        ``torchrun`` (or any initialized process group) this is the **global** minibatch: each
        of the W processes steps on its shard of about ``batch_size / W`` points and the
        gradients are all-reduced (:mod:`pyro_lvm.train.distributed`), so the update is
        the single-process one; rank 0 alone shows progress, logs and writes checkpoints.
    :param valid_data: optional validation set (a tensor or named tensors, as ``train_data``).
    :param valid_loss: the estimator of the validation bound (a name, with ``num_particles``
        particles, or an instance); by default the training ``loss``. Pass the plain bound when
        training with a surrogate, e.g. ``loss=KLWeightedELBO(base, schedule)`` with
        ``valid_loss=base``, so that early stopping compares the same bound in every epoch.
    :param seed: seeds Pyro's generators at the start of a fresh run, and the minibatch order.
    :param checkpoint: file written atomically (see :func:`save_checkpoint`) after every
        epoch; never overwritten with non-finite parameters.
    :param resume: restore the model, guide, param store, optimizer, estimator state (see
        :class:`~pyro_lvm.elbo.stateful.StatefulEstimator`), RNG and history from
        ``checkpoint`` and continue with the next epoch; the steps are then exactly those of an
        uninterrupted run.
    :param progress: show a tqdm bar with the epoch's running loss.
    :param callbacks: :class:`~pyro_lvm.train.callbacks.Callback` objects (hooks per step and
        per epoch) or plain functions ``f(history)`` called after each epoch (before the
        checkpoint is written); a truthy return after an epoch stops training there.
    :param extra: JSON-serializable metadata stored in the checkpoint (e.g. model config).
    :param fast: step with :class:`~pyro_lvm.train.fast.FastSVI` (one fused optimizer,
        validation off after the first step, a traced loss where it provably matches; it falls
        back to the general path with a logged reason for dynamic models). ``False`` uses
        ``pyro.infer.SVI``; both give the same losses to float tolerance.
    :param device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``: the model and
        guide modules are moved there (in place), each minibatch is copied there, and
        parameters created during training land there. The minibatch order is still drawn on
        the CPU, so it is the same on every device. ``None``: leave everything where it is.
    :param log_dir: the run folder: ``metrics.jsonl`` there gets a line per step and per epoch
        (:class:`~pyro_lvm.train.callbacks.JSONLinesLogger`).
    :param tensorboard: also write TensorBoard event files to ``log_dir/tensorboard`` (needs
        the optional ``tensorboard`` package).
    :param divergence: when a finite loss counts as diverged (by default, growth by a factor
        of 1000 over the best of the last 1000 steps, see
        :class:`~pyro_lvm.train.divergence.DivergenceRule`); ``None`` disables the check.
    :param backend: the captured loss's backend with ``fast=True``: ``"auto"`` (Inductor once
        the run's remaining steps pay for its compile, see
        :class:`~pyro_lvm.train.fast.FastSVI`), ``"aten"`` or ``"inductor"``.
    :returns: the :class:`FitHistory`, including the epochs of a resumed checkpoint.
    :raises NonFiniteLossError: on a NaN or infinite loss; the message names the epoch, the
        step and the last good checkpoint (the in-memory parameters are then unusable).
    :raises DivergenceError: when the loss diverges by the ``divergence`` rule; likewise.
    :raises InputError: on bad data (NaN, inf, values outside the likelihood's support), a
        guide whose latent sites differ from the model's, or a non-positive learning rate;
        checked once before the first step (:func:`~pyro_lvm.validation.validate_inputs`).
    :raises ValueError: on bad arguments, a ``num_data`` attribute that disagrees with the
        training set, a model whose data plate cannot be found (the message names what was
        looked for), or a checkpoint written with another ``batch_size``, ``seed``, loss or
        training-set size.
    :raises FileNotFoundError: with ``resume=True`` when the checkpoint does not exist (pass
        ``resume=os.path.exists(path)`` to start fresh in that case).

    Example::

        vae = VAE(x_dim=784, z_dim=20)
        history = fit(vae, vae.guide, x_train, valid_data=x_valid, num_epochs=5,
                      checkpoint="vae.pt")
        history = fit(vae, vae.guide, x_train, num_epochs=10, checkpoint="vae.pt", resume=True)
    """
    setup = prepare_run(
        model, guide, train_data, what="fit", loss=loss, num_particles=num_particles,
        optimizer=optimizer, lr=lr, num_epochs=num_epochs, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, resume=resume, callbacks=callbacks, extra=extra, fast=fast,
        device=device, log_dir=log_dir, tensorboard=tensorboard, backend=backend,
        valid_data=valid_data,
    )  # fmt: skip
    model, guide, device, par = setup.model, setup.guide, setup.device, setup.par
    valid_estimator = _valid_estimator(valid_loss, setup.estimator, num_particles)
    with device_scope(device):
        head = torch.arange(min(int(batch_size), setup.batches.num_data))
        args = (setup.data[head].to(setup.target()), head.to(setup.target()))
        head_kwargs = {k: v.to(setup.target()) for k, v in setup.batches.named(head).items()}
        par.start(model, guide, args, head_kwargs, seed, setup.history.epochs)  # rank 0's θ
    validate = None
    valid_data, valid_named = setup.valid_data, setup.valid_named
    if valid_data is not None:
        chunk = int(batch_size)

        def bound(rows: slice) -> float:
            named = {k: v[rows] for k, v in valid_named.items()}
            return validation_bound(
                valid_estimator, model, guide, valid_data[rows], chunk, device, named
            )

        def validate() -> float:  # processes take contiguous pieces
            return par.mean(bound, len(valid_data))

    loop = Loop(
        step=lambda batch: StepResult(svi_step(setup.stepper, batch, par.hooks)),
        data=setup.data,
        batches=setup.batches,
        num_epochs=int(num_epochs),
        device=device,
        validate=validate,
        checkpointer=setup.checkpointer,
        callbacks=setup.callbacks,
        progress=progress,
        desc="fit",
        divergence=DivergenceMonitor(divergence, setup.history.step_losses, what="fit"),
        parallel=par if par.active else None,
    )
    return run(loop, setup.history)
