"""``fit_local``: the per-datapoint SVI algorithm on the shared training loop."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import pyro
import torch
from pyro.infer import ELBO

from pyro_lvm.device import DeviceLike, device_scope
from pyro_lvm.guides.local import LocalGuide
from pyro_lvm.inner_loop import optimize_local
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.train.build import prepare_run
from pyro_lvm.train.distributed.data_parallel import DataParallel
from pyro_lvm.train.distributed.sharded import ShardedCheckpointer, ShardedLocalGuide
from pyro_lvm.train.divergence import DEFAULT_DIVERGENCE, DivergenceMonitor, DivergenceRule
from pyro_lvm.train.loop import Checkpointer, Loop, StepResult, run
from pyro_lvm.train.step import Batch, svi_step

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

    Step 2 is the shared SVI step (:func:`~pyro_lvm.train.step.svi_step`) with the rows
    φ^{i,*} passed as constant inputs; the loop around it is the one of
    :func:`~pyro_lvm.train.fit` (:func:`pyro_lvm.train.loop.run`): the same history,
    non-finite-loss guard, callbacks, logs, progress bar and checkpoints. A checkpoint holds
    the local parameters (they are the guide's), so a resumed run repeats the steps of an
    uninterrupted one exactly. The history's ``step_metrics`` and ``epoch_metrics`` hold
    ``"inner_steps"`` (mean inner steps per data point) and ``"fraction_converged"``.

    :param model: a Pyro program ``model(x)``, ``model(x, idx=None)`` or
        ``model(x, idx=None, **named)``: a self-scaling data plate with
        ``num_data = len(data)``, or a plain ``pyro.plate("data", x.shape[0])`` that the loop
        scales by N/B (:mod:`pyro_lvm.contract`).
    :param guide: a :class:`~pyro_lvm.guides.LocalGuide` with ``num_data = len(data)``.
    :param data: the dataset, data points along dim 0.
    :param loss: estimator name (see :data:`pyro_lvm.elbo.ESTIMATORS`) or an ELBO instance.
    :param num_particles: particles when ``loss`` is a name (refused with an instance).
    :param num_epochs: passes over the data (a resumed run continues up to this number).
    :param batch_size: minibatch size; under ``torchrun`` (or an initialized process group)
        the **global** minibatch: each process runs the inner loop on the points of it that
        it owns (``i % W == rank``) and the θ gradients are all-reduced; the guide must then
        be a :class:`~pyro_lvm.train.distributed.ShardedLocalGuide` (each process holds the rows
        of its own points), and the checkpoint gathers them into one file that resumes with
        any number of processes.
    :param optimizer: Pyro optimizer for θ (default ``pyro.optim.Adam({"lr": lr})``).
    :param lr: θ learning rate when ``optimizer`` is not given (as in :func:`fit`).
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
    if not isinstance(guide, LocalGuide):
        raise ValueError(f"fit_local needs a LocalGuide, got {type(guide).__name__}")
    if not isinstance(data, dict) and guide.num_data != len(data):
        raise ValueError(
            f"the guide holds {guide.num_data} rows but the data has {len(data)} points; build "
            f"the guide with num_data=len(data)"
        )

    def check_sharded(par: DataParallel) -> None:
        if par.active and not isinstance(guide, ShardedLocalGuide):
            raise ValueError(
                f"fit_local with {par.size} processes needs a sharded guide: "
                "ShardedLocalGuide(YourLocalGuide(shard_size(len(data)), ...), len(data)), so "
                "each process holds the local parameters of its own points only"
            )

    inner = dict(lr=inner_lr, max_steps=inner_max_steps, tol=inner_tol, lr_decay=inner_lr_decay)
    setup = prepare_run(
        model, guide, data, what="fit_local", loss=loss, num_particles=num_particles,
        optimizer=optimizer, lr=lr, num_epochs=num_epochs, batch_size=batch_size, seed=seed,
        checkpoint=checkpoint, resume=resume, callbacks=callbacks, extra=extra, fast=fast,
        device=device, log_dir=log_dir, tensorboard=tensorboard, backend=backend,
        rates={"inner_lr": inner_lr}, owned=True, check=check_sharded,
        step_programs=lambda m, g: _theta_pair(m, guide),
        config={"algorithm": "fit_local", "inner": {k: float(v) for k, v in inner.items()}},
        # a sharded guide's rows are gathered into one file
        checkpointer_cls=ShardedCheckpointer if isinstance(guide, ShardedLocalGuide)
        else Checkpointer,
    )  # fmt: skip
    # the local guide scales itself (data_plate); the model may have a plain data plate
    model, data, named, par = setup.model, setup.data, setup.named, setup.par
    device, estimator, stepper = setup.device, setup.estimator, setup.stepper
    history = setup.history
    theta_model, theta_guide = _theta_pair(model, guide)
    target = setup.target()

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
        batches=setup.batches,
        num_epochs=int(num_epochs),
        device=device,
        checkpointer=setup.checkpointer,
        callbacks=setup.callbacks,
        progress=progress,
        desc="fit_local",
        divergence=DivergenceMonitor(divergence, history.step_losses, what="fit_local"),
        parallel=par if par.active else None,
    )
    return run(loop, history)
