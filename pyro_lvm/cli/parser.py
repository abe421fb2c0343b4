"""Command-line interface: ``pyro-lvm quickstart|train|evaluate|sample|variance|gaps``.

One parser tree, built lazily: ``pyro-lvm --help`` imports no subcommand (no torch, no
Pyro), and ``pyro-lvm CMD ...`` imports only what ``CMD`` needs (see :data:`COMMANDS`).
Every error the library raises for bad input or a failed run is printed as one line with a
non-zero exit status (:func:`main`), never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "COMMANDS",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "CLIError",
    "build_parser",
    "int_list",
    "main",
    "positive_float",
    "positive_int",
]

#: exit status of a user error (bad argument, data, checkpoint or folder) and of a failed run
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default (none for required options and plain flags)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers (layer widths)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


#: the largest count a flag takes (a signed 64-bit integer, what torch indexes with)
MAX_COUNT = 2**63 - 1
#: the largest seed (NumPy's generator takes seeds below 2**32)
MAX_SEED = 2**32 - 1


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 that fits a signed 64-bit integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer up to 2**63 - 1, got {text!r}"
        )
    return value


def seed_int(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**32 - 1]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in 0..{MAX_SEED}, got {text!r}")
    return value


#: the subcommands: name -> (help, "module:add_arguments", "module:run"). The modules are
#: imported only when the subcommand runs (or shows its own help), so ``pyro-lvm --help``
#: stays fast; a new subcommand is one entry here.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": (
        "train a VAE on the bundled 8x8 digits (minutes, CPU)",
        "pyro_lvm.cli.train:add_quickstart_arguments",
        "pyro_lvm.cli.train:cmd_quickstart",
    ),
    "train": (
        "train a VAE, or your model (--model package.module:factory), with any estimator",
        "pyro_lvm.cli.train:add_train_arguments",
        "pyro_lvm.cli.train:cmd_train",
    ),
    "evaluate": (
        "test ELBO and log-likelihood (IS, AIS or BDMC) of a run folder",
        "pyro_lvm.cli.runs:add_evaluate_arguments",
        "pyro_lvm.cli.runs:cmd_evaluate",
    ),
    "sample": (
        "a PNG grid of ancestral samples from a run folder",
        "pyro_lvm.cli.runs:add_sample_arguments",
        "pyro_lvm.cli.runs:cmd_sample",
    ),
    "variance": (
        "variance, SNR and cost of gradient estimators side by side",
        "pyro_lvm.cli.variance:add_variance_arguments",
        "pyro_lvm.cli.variance:variance_main",
    ),
    "gaps": (
        "approximation and amortization gaps of a trained VAE checkpoint",
        "pyro_lvm.cli.gaps:add_gaps_arguments",
        "pyro_lvm.cli.gaps:gaps_main",
    ),
    "conditional": (
        "train M2 (few labels) or a conditional VAE (quadrant completion) and plot samples",
        "pyro_lvm.cli.recipes:add_conditional_arguments",
        "pyro_lvm.cli.recipes:conditional_main",
    ),
    "inspect": (
        "reconstructions of chosen images and latent interpolations from a VAE checkpoint",
        "pyro_lvm.cli.recipes:add_inspect_arguments",
        "pyro_lvm.cli.recipes:inspect_main",
    ),
}


def _resolve(target: str) -> Callable:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``pyro-lvm`` parser tree.

    :param commands: the subcommands whose arguments are added (their modules imported);
        every subcommand when ``None``. The others appear in the help by name only.
    """
    parser = argparse.ArgumentParser(
        prog="pyro-lvm",
        description="Latent variable models and variational inference on Pyro.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if commands is None else set(commands)
    for name, (help_, adder, runner) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=_Formatter)
        if name in wanted:
            _resolve(adder)(p)
            p.set_defaults(func=runner)
    return parser


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, however the message was wrapped


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-lvm``; returns the exit status.

    A user error (a bad argument, data, checkpoint or output folder: ``ValueError`` and its
    subclasses ``InputError``, ``CheckpointError``, ``RunFolderError``, or ``OSError``) exits
    with 2, a failed run (a non-finite or diverged loss, ``FloatingPointError``) with 1, an
    interrupt with 130; each prints one line ``pyro-lvm CMD: error: ...``. Any other exception
    is a bug: one line as well, and its traceback when ``PYRO_LVM_TRACEBACK=1``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for `train --nproc N` to start its processes with
    func: Callable[[argparse.Namespace], int] = _resolve(args.func)
    prefix = f"pyro-lvm {args.command}"
    try:
        return int(func(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        print(f"{prefix}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except FloatingPointError as err:  # NonFiniteLossError, DivergenceError
        print(f"{prefix}: failed: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(
            f"{prefix}: interrupted (a checkpoint, if any, holds the last epoch)", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get("PYRO_LVM_TRACEBACK"):
            raise
        print(
            f"{prefix}: internal error: {type(err).__name__}: {_one_line(err)} (a bug: rerun "
            "with PYRO_LVM_TRACEBACK=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
