"""Training: one loop (:func:`fit`, :func:`fit_local`), its history, callbacks, safe resumable
checkpoints and devices."""

from pyro_lvm.train.callbacks import Callback, EpochCallback, JSONLinesLogger, TensorBoardLogger
from pyro_lvm.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pyro_lvm.train.device import resolve_device
from pyro_lvm.train.divergence import DivergenceError, DivergenceRule
from pyro_lvm.train.early_stopping import EarlyStopping
from pyro_lvm.train.estimators import StatefulEstimator, resolve_estimator
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.fit import NonFiniteLossError, fit
from pyro_lvm.train.fit_local import LocalOptResult, optimize_local
from pyro_lvm.train.history import FitHistory
from pyro_lvm.train.optim import NormalizedGradientAdam, normalized_gradient_adam
from pyro_lvm.train.per_datapoint import fit_local
from pyro_lvm.train.runs import Run, load_run

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
