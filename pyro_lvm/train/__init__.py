"""Training: one loop (:func:`fit`; :func:`fit_local` is its per-datapoint variant), the fast
captured step (:class:`FastSVI`), callbacks, early stopping and divergence rules, and
data-parallel training (:mod:`pyro_lvm.train.distributed`).

Checkpoints, the run's history and :func:`load_run` live in :mod:`pyro_lvm.runs`; the
per-datapoint inner loop in :mod:`pyro_lvm.inner_loop`; devices in :mod:`pyro_lvm.device`.
The names a training script needs from them are importable from here too.
"""

from pyro_lvm.device import resolve_device
from pyro_lvm.elbo.stateful import StatefulEstimator, resolve_estimator
from pyro_lvm.inner_loop import LocalOptResult, optimize_local
from pyro_lvm.runs import (
    CheckpointError,
    FitHistory,
    Run,
    atomic_save,
    load_checkpoint,
    load_run,
    read_checkpoint,
    save_checkpoint,
)
from pyro_lvm.train.callbacks import Callback, EpochCallback, JSONLinesLogger, TensorBoardLogger
from pyro_lvm.train.divergence import DivergenceError, DivergenceRule
from pyro_lvm.train.early_stopping import EarlyStopping
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.fit import NonFiniteLossError, fit
from pyro_lvm.train.optim import NormalizedGradientAdam, normalized_gradient_adam
from pyro_lvm.train.per_datapoint import fit_local

__all__ = [
    "Callback",
    "CheckpointError",
    "DivergenceError",
    "DivergenceRule",
    "EarlyStopping",
    "EpochCallback",
    "FastSVI",
    "FitHistory",
    "JSONLinesLogger",
    "LocalOptResult",
    "NonFiniteLossError",
    "NormalizedGradientAdam",
    "Run",
    "StatefulEstimator",
    "TensorBoardLogger",
    "atomic_save",
    "fit",
    "fit_local",
    "load_checkpoint",
    "load_run",
    "normalized_gradient_adam",
    "optimize_local",
    "read_checkpoint",
    "resolve_device",
    "resolve_estimator",
    "save_checkpoint",
]
