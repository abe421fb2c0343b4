r"""Data parallelism on ``torch.distributed``: the process group, guarded collectives and the
gradient all-reduce. What the training loop asks of the group (shards, reduced losses, agreed
stops, rank-0 checkpoints) is :class:`~pyro_lvm.train.distributed_loop.DataParallel`.

A run with :math:`W` processes (started by ``torchrun``, or any script that initialized the
default process group) splits every **global** minibatch :math:`b` of ``batch_size`` points into
:math:`W` contiguous shards :math:`b_r`. Each process evaluates its estimator on its shard with
the data plate's usual subsample scale :math:`N/|b_r|`, so its gradient :math:`g_r` estimates
the full-data gradient. The gradients are then combined by one bucketed all-reduce

.. math::

    g = \sum_{r=1}^{W} \frac{|b_r|}{|b|}\, g_r
      = \frac{N}{|b|} \sum_{i \in b} \nabla \widehat{\mathcal L}_i ,

which is the single-process gradient at the global batch :math:`b` exactly (up to rounding),
for any estimator whose bound is a sum over data points (every estimator here that combines
particles per data point; not a batch-coupled one such as MMD). Every process then takes the
same optimizer step, so parameters stay identical without being broadcast again.

Why not :class:`torch.nn.parallel.DistributedDataParallel`: Pyro parameters need not live in
an ``nn.Module`` (``pyro.param``, per-site baselines) and the step is driven by an ELBO, not by a
module's ``forward``; the all-reduce therefore runs on the parameter-store tensors, between the
backward pass and the optimizer step (the ``before_update`` hook of
:func:`~pyro_lvm.train.loop.svi_step`, once per step), which covers every parameter a step
touches.

Collectives use the process group's timeout (``PYRO_LVM_DIST_TIMEOUT`` seconds when this module
creates the group, 300 by default); a process that dies makes the others raise
:class:`DistributedError` instead of hanging.

References:

1. Li et al. (2020), *PyTorch Distributed: Experiences on Accelerating Data Parallel Training*,
   VLDB 13 (arXiv:2006.15704): bucketed gradient all-reduce.
2. Goyal et al. (2017), *Accurate, Large Minibatch SGD*, arXiv:1706.02677.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import pyro
import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "GradientSync",
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


def _guarded(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
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


def _device() -> torch.device:
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
    buffer = values.detach().to(_device(), copy=True)
    _guarded(what, dist.all_reduce, buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


class GradientSync:
    r"""Replace each parameter's gradient by :math:`\sum_r w_r g_r`, one bucketed all-reduce.

    The parameters are those named in ``names`` (the same list in every process, in sorted
    order); a ``.grad`` that is ``None`` counts as zero, and a parameter that no process reached
    keeps ``None`` (so the optimizer skips it, as a single process would). Gradients are
    flattened into buckets of at most ``bucket_mb`` megabytes per dtype, each all-reduced
    once, with the reached-flags appended to the first bucket.

    :param names: param-store names of the parameters to synchronize.
    :param bucket_mb: bucket size.
    :ivar weight: this process's :math:`w_r = |b_r| / |b|`, set before each step.
    """

    def __init__(self, names: Iterable[str], bucket_mb: float = 25.0):
        #: the parameters all-reduced at every step, sorted (``DataParallel.start`` sets them)
        self.names = sorted(set(names))
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.weight = 1.0

    def _params(self, given: Iterable[torch.Tensor] | Mapping[str, torch.Tensor]) -> list:
        store = pyro.get_param_store()
        if isinstance(given, Mapping):
            by_name = dict(given)
        else:
            by_name = {store.param_name(p): p for p in given}
        unknown = sorted(set(by_name) - set(self.names))
        if unknown:
            raise DistributedError(
                f"parameters {unknown} appeared after the start of distributed training; every "
                "process must use the same parameters (create them before fit, e.g. by a first "
                "call of the model and guide)"
            )
        live = dict(store.named_parameters())
        return [by_name[n] if n in by_name else live[n] for n in self.names]

    def __call__(self, params: Iterable[torch.Tensor] | Mapping[str, torch.Tensor] = ()) -> None:
        """All-reduce the weighted gradients of ``params`` (a name → tensor map, or tensors)."""
        if rank_and_size()[1] == 1:
            return
        tensors = self._params(params)
        flags = torch.tensor([float(p.grad is not None) for p in tensors])
        buckets: list[list[int]] = []
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(tensors):
            by_dtype.setdefault(p.dtype, []).append(i)
        for members in by_dtype.values():
            current, size = [], 0
            for i in members:
                nbytes = tensors[i].numel() * tensors[i].element_size()
                if current and size + nbytes > self.bucket_bytes:
                    buckets.append(current)
                    current, size = [], 0
                current.append(i)
                size += nbytes
            buckets.append(current)
        device = _device()
        for b, members in enumerate(buckets):
            dtype = tensors[members[0]].dtype
            parts = [
                (tensors[i].grad * self.weight if tensors[i].grad is not None else
                 torch.zeros_like(tensors[i])).reshape(-1).to(device)
                for i in members
            ]  # fmt: skip
            if b == 0:
                parts.append(flags.to(device=device, dtype=dtype))
            flat = _guarded("the gradient all-reduce", self._reduce, torch.cat(parts))
            if b == 0:
                flags = flat[-len(tensors) :].cpu()
            offset = 0
            for i in members:
                p = tensors[i]
                if flags[i] > 0:
                    p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.device)
                offset += p.numel()

    @staticmethod
    def _reduce(flat: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        return flat
