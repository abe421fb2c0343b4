"""``pyro-lvm train --nproc N``: start the processes through ``torch.distributed.run``."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["launch", "torchrun_args"]


def torchrun_args(nproc: int, argv: Sequence[str]) -> list[str]:
    """``torchrun``'s arguments for ``pyro-lvm <argv>`` in ``nproc`` local processes."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    return ["--standalone", f"--nproc-per-node={int(nproc)}", "--module", "pyro_lvm", *rest]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``pyro-lvm <argv>`` in ``nproc`` processes on this machine through
    :func:`torch.distributed.run.run` (``torchrun --standalone --nproc-per-node nproc -m
    pyro_lvm <argv>``), with ``--nproc`` removed from ``argv``. Returns the exit status.

    For several machines call ``torchrun`` itself (README, "Distributed training").
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(torchrun_args(nproc, argv))
    try:
        run(args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r}: exit code {f.exitcode}" for r, f in e.failures.items())
        print(f"pyro-lvm: a training process failed ({failures}); see its error above")
        return 1
    return 0
