"""``fit_local``: the per-datapoint SVI algorithm on the shared training loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from pyro.infer import ELBO

from pyro_lvm.data import Minibatches, check_accepts, split_named
from pyro_lvm.guides.local import LocalGuide
from pyro_lvm.train.build import (
    check_counts,
    check_extra,
    check_optimizer,
    make_callbacks,
    make_checkpointer,
    make_stepper,
    start_history,
)
from pyro_lvm.train.checks import set_num_data
from pyro_lvm.train.device import DeviceLike, device_scope, resolve_device, to_device
from pyro_lvm.train.distributed_loop import DataParallel
from pyro_lvm.train.divergence import DEFAULT_DIVERGENCE, DivergenceMonitor, DivergenceRule
from pyro_lvm.train.estimators import resolve_estimator
from pyro_lvm.train.fit_local import optimize_local
from pyro_lvm.train.history import FitHistory
from pyro_lvm.train.loop import Batch, Checkpointer, Loop, StepResult, run, svi_step
from pyro_lvm.train.sharded import ShardedCheckpointer, ShardedLocalGuide
from pyro_lvm.validation import check_rows, validate_inputs

__all__ = ["fit_local"]


def _theta_pair(model: Callable, guide: LocalGuide) -> tuple[Callable, Callable]:
    """Model and guide for the θ step: ``(x, idx, *rows, **kw)``, the guide reading its
    minibatch rows from ``rows`` (held constant), so the step differentiates θ only and any
    capture of the loss takes the rows as inputs, not as frozen constants."""
    names = guide.local_names

    def theta_model(x, idx, *rows, **kwargs):
        return model(x, idx, **kwargs)

    def theta_guide(x, idx, *rows, **kwargs):
        with guide.local_override(**dict(zip(names, rows, strict=True))):
            return guide(x, idx, **kwargs)

    return theta_model, theta_guide


def fit_local(
    model: Callable,
    guide: LocalGuide,
    data: torch.Tensor,
    loss: str | ELBO = "elbo",
    num_particles: int = 1,
    num_epochs: int = 1,
    batch_size: int = 100,
    optimizer: pyro.optim.PyroOptim | None = None,
    lr: float = 1e-3,
    inner_lr: float = 0.05,
    inner_max_steps: int = 100,
    inner_tol: float = 1e-3,
    inner_lr_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    extra: dict[str, Any] | None = None,
    fast: bool = True,
    divergence: DivergenceRule | None = DEFAULT_DIVERGENCE,
    device: DeviceLike = None,
    log_dir: str | os.PathLike | None = None,
    tensorboard: bool = False,
    backend: str = "auto",
) -> FitHistory:
    r"""The per-datapoint SVI algorithm (warm-started local optima, then a θ step).

    For every minibatch :math:`B` (indices ``idx``):

    1. :math:`\varphi^{i,*} \leftarrow \arg\max_{\varphi^i} \mathcal L(\theta, \varphi^i; x^i)`
       for :math:`i \in B` by :func:`optimize_local` (θ fixed, started at the previous
       epoch's :math:`\varphi^{i,*}`);
    2. :math:`\theta \leftarrow \theta + \rho\, \widehat{\nabla_\theta}
       \tfrac{N}{|B|} \sum_{i \in B} \mathcal L(\theta, \varphi^{i,*}; x^i)`.

    Because φ^{i,*} is (near) optimal, step 2 follows the gradient of
    :math:`\sum_i \max_{\varphi^i} \mathcal L` (envelope theorem), the objective of
    variational EM (Neal & Hinton 1998; Hoffman et al. 2013, arXiv:1206.7051).

    Step 2 is the shared SVI step (:func:`~pyro_lvm.train.loop.svi_step`) with the rows
    φ^{i,*} passed as constant inputs; the loop around it is the one of
    :func:`~pyro_lvm.train.fit` (:func:`pyro_lvm.train.loop.run`): the same history,
    non-finite-loss guard, callbacks, logs, progress bar and checkpoints. A checkpoint holds
    the local parameters (they are the guide's), so a resumed run repeats the steps of an
    uninterrupted one exactly. The history's ``step_metrics`` and ``epoch_metrics`` hold
    ``"inner_steps"`` (mean inner steps per data point) and ``"fraction_converged"``.

    :param model: model ``model(x, idx=None)`` whose data plate has ``num_data = len(data)``.
    :param guide: a :class:`~pyro_lvm.guides.LocalGuide` with ``num_data = len(data)``.
    :param data: the dataset, data points along dim 0.
    :param loss: estimator name (see :data:`pyro_lvm.elbo.ESTIMATORS`) or an ELBO instance.
    :param num_particles: particles when ``loss`` is a name (refused with an instance).
    :param num_epochs: passes over the data (a resumed run continues up to this number).
    :param batch_size: minibatch size; under ``torchrun`` (or an initialized process group)
        the **global** minibatch: each process runs the inner loop on the points of it that
        it owns (``i % W == rank``) and the θ gradients are all-reduced; the guide must then
        be a :class:`~pyro_lvm.train.sharded.ShardedLocalGuide` (each process holds the rows
        of its own points), and the checkpoint gathers them into one file that resumes with
        any number of processes.
    :param optimizer: Pyro optimizer for θ (default ``pyro.optim.Adam({"lr": lr})``).
    :param lr: θ learning rate when ``optimizer`` is not given.
    :param inner_lr: Adam learning rate of the inner loop.
    :param inner_max_steps: inner step cap.
    :param inner_tol: inner relative-change tolerance.
    :param inner_lr_decay: inner Robbins-Monro decay (see :func:`optimize_local`).
    :param seed: seeds Pyro's generators at the start of a fresh run, and the minibatch order.
    :param progress: show a tqdm bar with the loss, inner steps and the fraction converged.
    :param checkpoint, resume, callbacks, extra, fast, device, log_dir, tensorboard: as in
        :func:`~pyro_lvm.train.fit`; ``backend`` too (the θ step's captured loss).
    :param divergence: when the θ-step loss counts as diverged
        (:class:`~pyro_lvm.train.divergence.DivergenceRule`); ``None`` disables the check.
    :return: the :class:`~pyro_lvm.train.FitHistory`.
    :raises ValueError: on bad arguments, a guide or model of another size than ``data``, or a
        checkpoint written with other settings.
    :raises InputError: on bad data, a guide whose sites differ from the model's, or a bad
        learning rate (:func:`~pyro_lvm.validation.validate_inputs`).
    :raises DivergenceError: when the loss diverges.
    """
    data, named = split_named(data, "data")  # a tensor, or named tensors (pyro_lvm.data.named)
    check_rows(data, "data")
    for what, fn in (("model", model), ("guide", guide)):
        check_accepts(fn, named, what)
    if not isinstance(guide, LocalGuide):
        raise ValueError(f"fit_local needs a LocalGuide, got {type(guide).__name__}")
    if guide.num_data != len(data):
        raise ValueError(
            f"the guide holds {guide.num_data} rows but the data has {len(data)} points; build "
            f"the guide with num_data=len(data)"
        )
    check_counts(num_epochs, batch_size)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs the checkpoint path to resume from")
    check_extra(extra)
    device = resolve_device(device)
    par = DataParallel(len(data), int(batch_size), owned=True, device=device)
    if par.active and not isinstance(guide, ShardedLocalGuide):
        raise ValueError(
            f"fit_local with {par.size} processes needs a sharded guide: "
            "ShardedLocalGuide(YourLocalGuide(shard_size(len(data)), ...), len(data)), so each "
            "process holds the local parameters of its own points only"
        )
    device = par.cuda_device(device)  # local rank k drives GPU k
    estimator, loss_name = resolve_estimator(loss, num_particles)
    optim = check_optimizer(optimizer, lr)
    set_num_data(model, guide, len(data))  # the plate scales the traced minibatch
    head = torch.arange(min(int(batch_size), len(data)))
    head = head[par.rows(head)] if par.active else head  # points this process owns
    data, _ = validate_inputs(
        model, guide, data, idx=head, optimizer=optim, rates={"inner_lr": inner_lr},
        name="data", **named,
    )  # fmt: skip
    callbacks = make_callbacks(callbacks, log_dir, tensorboard)
    batches = Minibatches({"x": data, **named}, int(batch_size), shuffle=True, seed=seed)
    to_device(device, model, guide)
    planned = int(num_epochs) * len(batches)  # for FastSVI(backend="auto"); same on every rank
    theta_model, theta_guide = _theta_pair(model, guide)
    stepper, optimizer_state = make_stepper(
        theta_model, theta_guide, optim, estimator, fast, backend, planned
    )
    inner = dict(lr=inner_lr, max_steps=inner_max_steps, tol=inner_tol, lr_decay=inner_lr_decay)
    checkpointer = make_checkpointer(
        checkpoint, model=model, guide=guide, optimizer_state=optimizer_state,
        estimator=estimator, loss_name=loss_name, num_particles=num_particles,
        batch_size=batch_size, seed=seed, num_data=batches.num_data, fast=fast, extra=extra,
        device=device, config={"algorithm": "fit_local",
                               "inner": {k: float(v) for k, v in inner.items()}},
        # a sharded guide's rows are gathered into one file
        cls=ShardedCheckpointer if isinstance(guide, ShardedLocalGuide) else Checkpointer,
    )  # fmt: skip
    history = start_history(checkpointer, resume, seed, batches.num_data, batch_size)
    target = data.device if device is None else device

    def own_point() -> Batch:
        """Point ``rank`` (this process owns it): what a step whose shard is empty steps on,
        with weight 0, and what the start traces."""
        own = torch.tensor([par.rank])
        kwargs = {k: v[own].to(target) for k, v in named.items()}
        return Batch((data[own].to(target), own.to(target)), kwargs, 1)

    def theta_args(x, idx):
        rows = guide.local_rows(idx)
        return (x, idx, *(guide.unconstrained(n).detach()[rows] for n in guide.local_names))

    def step(batch: Batch) -> StepResult:
        if batch.size == 0:  # this process owns none of the global batch
            batch, metrics = own_point(), {"inner_steps": 0.0, "fraction_converged": 0.0}
        else:
            x, idx = batch.args
            res = optimize_local(model, guide, x, idx, estimator, named=batch.kwargs, **inner)
            metrics = {
                "inner_steps": float(res.steps.double().mean()),
                "fraction_converged": res.fraction_converged,
            }
        batch.args = theta_args(*batch.args[:2])
        return StepResult(svi_step(stepper, batch, par.hooks), metrics)

    if par.active:  # every process starts from rank 0's θ
        with device_scope(device):
            first = own_point()
            par.start(theta_model, theta_guide, theta_args(*first.args), first.kwargs, seed,
                      history.epochs)  # fmt: skip

    loop = Loop(
        step=step,
        data=data,
        batches=batches,
        num_epochs=int(num_epochs),
        device=device,
        checkpointer=checkpointer,
        callbacks=callbacks,
        progress=progress,
        desc="fit_local",
        divergence=DivergenceMonitor(divergence, history.step_losses, what="fit_local"),
        parallel=par if par.active else None,
    )
    return run(loop, history)
