"""What the subcommands share: the built-in data sets, output folders, JSON files, the table
of metrics they print, and the ``--device`` and ``--tensorboard`` checks. Standard library
only at import time (``pyro-lvm --help`` imports no torch)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from pyro_lvm.cli.parser import CLIError

__all__ = [
    "DATASETS",
    "add_device_argument",
    "check_tensorboard",
    "load_split",
    "output_folder",
    "print_table",
    "write_json",
]

#: the built-in data sets of ``pyro-lvm quickstart``/``train`` (``--dataset``)
DATASETS = ("digits", "mnist")


def load_split(dataset: str, split: str, root: str | None):
    """A split of a built-in data set: ``(x, labels or None, image shape)``."""
    from pyro_lvm import data

    if dataset == "digits":
        x, labels = data.load_digits(split, return_labels=True)
        return x, labels, (8, 8)
    if dataset == "mnist":
        return data.load_binarized_mnist(split, root=root), None, (28, 28)
    raise CLIError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def check_tensorboard(args: argparse.Namespace) -> None:
    """Refuse ``--tensorboard`` without the ``tensorboard`` package before any work."""
    import importlib.util

    if getattr(args, "tensorboard", False) and importlib.util.find_spec("tensorboard") is None:
        raise CLIError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or "
            "pyro-lvm[tensorboard]), or drop --tensorboard"
        )


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON, atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def print_table(metrics: dict, out: Path, files: Sequence[str] = ()) -> None:
    """The metrics that are present, then the files written (as written)."""
    rows = [
        ("test ELBO (nats)", metrics.get("elbo")),
        (f"test log p(x), IS K={metrics.get('num_samples')}", metrics.get("log_likelihood")),
        (f"test log p(x), AIS M={metrics.get('ais_steps')}", metrics.get("ais_log_likelihood")),
        ("reconstruction E_q[log p(x|z)]", metrics.get("reconstruction")),
        ("KL(q(z|x) || p(z)) (nats)", metrics.get("kl")),
        ("rate (bits)", metrics.get("rate_bits")),
    ]
    for name, value in rows:
        if value is not None:
            print(f"{name:<34} {value:10.3f}")
    print(f"outputs in {out}: {' '.join(files)}")


def output_folder(given: str | None, default: Path) -> Path:
    """The ``--out`` folder (``default`` without one), created; a file there is refused."""
    out = Path(given) if given else default
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def add_device_argument(p: argparse.ArgumentParser) -> None:
    """The ``--device`` option of the commands that train or evaluate."""
    p.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda (or cuda:N) or auto (CUDA when available); the data order is the same "
        "on every device",
    )
