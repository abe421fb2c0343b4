r"""The ``torch.distributed`` process group as the library sees it: rank and size, starting
the group, and collectives that fail with a clear error instead of hanging.

Training (:mod:`pyro_lvm.train.distributed`) and evaluation
(:mod:`pyro_lvm.evaluate.distributed`) both build on this module; it knows nothing of either.
Collectives use the process group's timeout (``PYRO_LVM_DIST_TIMEOUT`` seconds when this module
creates the group, 300 by default); a process that dies makes the others raise
:class:`DistributedError` instead of hanging.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "collective_device",
    "guarded",
    "all_reduce_sum",
    "init_distributed",
    "rank_and_size",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: seconds a collective waits for the other processes, when this module creates the group
DEFAULT_TIMEOUT = 300.0


class DistributedError(RuntimeError):
    """A collective operation failed: another process exited or stopped responding."""


def rank_and_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _timeout() -> float:
    value = os.environ.get("PYRO_LVM_DIST_TIMEOUT", str(DEFAULT_TIMEOUT))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(
            f"PYRO_LVM_DIST_TIMEOUT must be a positive number of seconds, got {value!r}"
        )
    return seconds


def init_distributed(
    backend: str | None = None, timeout: float | None = None, device: torch.device | None = None
) -> tuple[int, int]:
    """Create the default process group from ``torchrun``'s environment, if there is one.

    Does nothing when a group exists already or when ``WORLD_SIZE`` is unset or 1 (a single
    process then runs the plain, non-distributed path). Otherwise it reads ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``env://``), uses NCCL when the training
    device (``device``, else the default device) is CUDA (after
    ``torch.cuda.set_device(LOCAL_RANK)``, so local rank ``k`` drives GPU ``k``) and gloo
    otherwise.

    :param backend: ``"gloo"`` or ``"nccl"`` to override the choice.
    :param timeout: seconds a collective waits for a peer (default ``PYRO_LVM_DIST_TIMEOUT``
        or 300).
    :param device: the training device (``fit``'s ``device=``).
    :returns: ``(rank, world_size)``.
    """
    if not dist.is_available() or dist.is_initialized():
        return rank_and_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    seconds = _timeout() if timeout is None else float(timeout)
    if backend is None:
        kind = (torch.get_default_device() if device is None else torch.device(device)).type
        backend = "nccl" if kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    return rank_and_size()


def guarded(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one collective; turn a backend failure into a :class:`DistributedError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError, gloo "Connection closed by peer", timeouts
        rank, size = rank_and_size()
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {rank} of {size}: {what} failed ({first[:200]}); another process exited or "
            "did not respond within the process group's timeout (PYRO_LVM_DIST_TIMEOUT). Restart "
            "the run with resume from the last checkpoint"
        ) from e


def collective_device() -> torch.device:
    """Where collectives run: the current CUDA device under NCCL, else the CPU (gloo)."""
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def all_reduce_sum(values: torch.Tensor, what: str) -> torch.Tensor:
    """The elementwise sum of ``values`` over all processes (a new tensor, on its device)."""
    if rank_and_size()[1] == 1:
        return values.clone()
    buffer = values.detach().to(collective_device(), copy=True)
    guarded(what, dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)
