"""Training: minibatch SVI (:func:`fit`), its history, and safe resumable checkpoints."""

from pyro_lvm.train.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pyro_lvm.train.divergence import DivergenceError, DivergenceRule
from pyro_lvm.train.early_stopping import EarlyStopping
from pyro_lvm.train.fast import FastSVI
from pyro_lvm.train.fit import NonFiniteLossError, fit
from pyro_lvm.train.fit_local import LocalFitHistory, LocalOptResult, fit_local, optimize_local
from pyro_lvm.train.history import FitHistory
from pyro_lvm.train.optim import NormalizedGradientAdam, normalized_gradient_adam
from pyro_lvm.train.restore import vae_config, vae_from_checkpoint

__all__ = [
    "CheckpointError",
    "DivergenceError",
    "DivergenceRule",
    "EarlyStopping",
    "FastSVI",
    "FitHistory",
    "NonFiniteLossError",
    "NormalizedGradientAdam",
    "atomic_save",
    "fit",
    "fit_local",
    "optimize_local",
    "LocalFitHistory",
    "LocalOptResult",
    "load_checkpoint",
    "normalized_gradient_adam",
    "read_checkpoint",
    "save_checkpoint",
    "vae_config",
    "vae_from_checkpoint",
]
