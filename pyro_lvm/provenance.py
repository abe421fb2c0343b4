"""Where a figure came from: the date, machine, versions and commit of a run.

Every benchmark writes :func:`provenance` beside its rows, and ``pyro-lvm train`` writes it
into the run folder's ``metrics.json``, so a number can be traced to the code and the
machine that produced it (and timings compared only between like machines).
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyro
import torch

__all__ = ["git_commit", "provenance"]


def git_commit(folder: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``folder`` (default: this package's source tree), with
    ``+dirty`` appended when tracked files have uncommitted changes; ``None`` outside a git
    checkout, for an installed copy that its enclosing repository does not track (e.g. a
    virtual environment inside another project), or without ``git``."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        if folder == Path(__file__).resolve().parent:  # this package's own source, tracked
            tracked = subprocess.run(
                ["git", "ls-files", "--error-unmatch", Path(__file__).name],
                cwd=folder, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if tracked.returncode != 0:  # installed into a folder of some other repository
                return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def provenance() -> dict[str, Any]:
    """The run's record: UTC date, platform, processor, CPU count, torch threads, 1-minute
    load average (where the OS reports it), Python, torch, Pyro and pyro_lvm versions, the
    CUDA device when one is available, and :func:`git_commit`."""
    from pyro_lvm import __version__

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_lvm": __version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
    }
