"""A training run and what keeps it: safe checkpoints (atomic writes, ``weights_only``
loading, the full training state), the run's history, ``pyro-lvm train``'s output folders, and
:func:`load_run`, which brings a run back in one call."""

from pyro_lvm.runs.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pyro_lvm.runs.folder import RunFolderError, prepare_run_folder
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.runs.load import Run, load_run

__all__ = [
    "CheckpointError",
    "FitHistory",
    "Run",
    "RunFolderError",
    "atomic_save",
    "load_checkpoint",
    "load_run",
    "prepare_run_folder",
    "read_checkpoint",
    "save_checkpoint",
]
