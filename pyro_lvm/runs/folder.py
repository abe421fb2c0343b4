"""Output folders of ``pyro-lvm train``: never overwrite a run silently, resume only what matches.

A folder holds a run when it has a checkpoint or metrics. Training into it needs
``--resume`` (continue the checkpoint, with the settings it was trained with) or ``--force``
(start over: the old run's files are removed first, so no stale figure or metric survives
beside the new checkpoint). Standard library only; the checkpoint is read (with torch) only
when a run resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "RUN_FILES",
    "RESUME_FLAGS",
    "RunFolderError",
    "epochs_to_resume",
    "prepare_run_folder",
    "resume_mismatch",
]

#: what a training run writes into its folder (removed by ``--force``)
RUN_FILES = (
    "checkpoint.pt",
    "metrics.json",
    "history.json",
    "training_curves.png",
    "samples.png",
    "reconstructions.png",
    "latents.png",
)

#: the checkpoint's configuration keys a resume must match, with the flag that sets each
RESUME_FLAGS = {
    "model": "--model",
    "model_args": "--model-args",
    "data": "--data",
    "dataset": "--dataset",
    "z_dim": "--z-dim",
    "hidden": "--hidden",
    "network": "--network",
    "estimator": "--estimator",
    "num_particles": "--particles",
    "lr": "--lr",
    "batch_size": "--batch-size",
    "seed": "--seed",
}


class RunFolderError(ValueError):
    """An output folder that cannot be used as asked (one line, naming the fix)."""


def _flag_value(value: Any) -> str:
    if isinstance(value, dict):
        import json

        return "'" + json.dumps(value, sort_keys=True) + "'"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def prepare_run_folder(out: str | Path, *, resume: bool, force: bool) -> Path:
    """Check ``out`` for a training run and create it; with ``force`` remove an old run.

    :returns: the folder.
    :raises RunFolderError: when ``out`` is a file, holds a run and neither ``resume`` nor
        ``force`` is set, lacks the checkpoint ``resume`` needs, or both flags are given.
    """
    out = Path(out)
    if resume and force:
        raise RunFolderError("--resume and --force contradict each other; pass one of them")
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file; give a folder (it is created if missing)")
    present = [name for name in RUN_FILES[:2] if (out / name).exists()]
    if resume and not (out / "checkpoint.pt").is_file():
        raise RunFolderError(
            f"--resume: {out} holds no checkpoint.pt to continue; drop --resume to start a run"
        )
    if present and not resume and not force:
        raise RunFolderError(
            f"{out} already holds a run ({', '.join(present)}); pass --resume to continue it, "
            "--force to replace it, or choose another --out"
        )
    if force:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_mismatch(
    saved: Mapping[str, Any], requested: Mapping[str, Any], epochs_done: int, epochs: int
) -> str | None:
    """Why a resume with ``requested`` settings cannot continue a checkpoint, or ``None``.

    :param saved: the configuration stored in the checkpoint (``extra={"config": ...}``).
    :param requested: the configuration the command line asks for (same keys).
    :param epochs_done: epochs the checkpoint has completed.
    :param epochs: the requested total number of epochs.
    :returns: one line naming the differing flags and the values that match the checkpoint.
    """
    differ = [
        key
        for key in RESUME_FLAGS
        if key in saved and key in requested and _same(saved[key], requested[key]) is False
    ]
    problems = []
    if differ:
        asked = " ".join(f"{RESUME_FLAGS[k]} {_flag_value(requested[k])}" for k in differ)
        match = " ".join(f"{RESUME_FLAGS[k]} {_flag_value(saved[k])}" for k in differ)
        problems.append(
            f"the checkpoint was trained with {match}, not {asked}; resume with {match} "
            "(or start over with --force)"
        )
    if epochs < epochs_done:
        problems.append(
            f"the checkpoint has {epochs_done} epochs done but --epochs is {epochs}; pass "
            f"--epochs {epochs_done} or more"
        )
    return "--resume: " + "; ".join(problems) if problems else None


def epochs_to_resume(
    checkpoint: Path, requested: Mapping[str, Any], epochs: int, resume: bool
) -> int:
    """The epochs a ``--resume`` run continues from (0 without ``resume``).

    :param checkpoint: the run folder's ``checkpoint.pt``.
    :param requested: the configuration the command line asks for.
    :param epochs: the requested total number of epochs.
    :raises RunFolderError: with :func:`resume_mismatch`'s line when the checkpoint was trained
        with other settings or has more epochs done than ``epochs``.
    """
    if not resume:
        return 0
    from pyro_lvm.runs.checkpoint import read_checkpoint  # heavy: only when resuming

    saved = read_checkpoint(checkpoint)
    done = int(saved["epoch"])
    saved_config = (saved["metadata"].get("extra") or {}).get("config") or {}
    problem = resume_mismatch(saved_config, requested, done, epochs)
    if problem:
        raise RunFolderError(problem)
    return done


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b) if isinstance(a, (list, tuple)) else False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b
