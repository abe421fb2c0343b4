r"""What the training loop asks of a ``torch.distributed`` process group: :class:`DataParallel`.

A run with :math:`W` processes splits every **global** minibatch :math:`b` (``batch_size``
points, the same permutation in every process) into shards :math:`b_r`, one per process.
Process :math:`r` steps on its shard with the data plate's subsample scale :math:`N/|b_r|` and
weights its gradient by :math:`w_r = |b_r|/|b|` before the all-reduce
(:class:`~pyro_lvm.train.distributed.GradientSync`), so

.. math::

    \sum_r w_r\, \frac{N}{|b_r|} \sum_{i \in b_r} \nabla \widehat{\mathcal L}_i
    = \frac{N}{|b|} \sum_{i \in b} \nabla \widehat{\mathcal L}_i ,

the single-process gradient at the global batch. The loop's seams (see
:mod:`pyro_lvm.train.loop`) use this object as follows; each is the identity in one process,
where the loop does not hold one at all:

- :meth:`DataParallel.shard`: a :class:`~pyro_lvm.train.step.Batch` (positional tensors and
  named per-datapoint keyword tensors alike) to this process's rows;
- :meth:`DataParallel.reduce`: the step's loss and metrics to their global-batch values
  :math:`\sum_r w_r v_r` (one all-reduce), so every process records the same history and the
  non-finite and divergence guards decide alike;
- :attr:`DataParallel.hooks`: the gradient all-reduce, a ``before_update`` hook of
  :func:`~pyro_lvm.train.step.svi_step` (run once per step);
- :meth:`DataParallel.mean`: a validation bound per data point from contiguous pieces;
- :meth:`DataParallel.agree`: a stop asked by any process stops all of them;
- :meth:`DataParallel.save`: rank 0 writes the checkpoint, then every process waits for it.

Estimators that couple the points of a minibatch (MMD/InfoVAE, baselines averaged over the
batch) are not exact across world sizes: their gradient is not a sum over points.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
from pyro import poutine

from pyro_lvm.process_group import (
    all_reduce_sum,
    collective_device,
    guarded,
    init_distributed,
    rank_and_size,
)
from pyro_lvm.train.distributed.sync import GradientSync

__all__ = ["DataParallel", "barrier"]


def _seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def barrier() -> None:
    """Wait for every process of the default group (nothing without one)."""
    if rank_and_size()[1] > 1:
        all_reduce_sum(torch.zeros(1, dtype=torch.float64), "a barrier")


class DataParallel:
    r"""The loop's view of the process group (see the module docstring).

    ``batch_size`` is the **global** minibatch: with :math:`W` processes each takes a shard of
    about ``batch_size / W`` points of every minibatch, so a run's result does not depend on
    :math:`W` beyond rounding and random numbers.

    :param num_data: training-set size.
    :param batch_size: the global minibatch size.
    :param owned: shard by ownership (``index % W == rank``, the layout of
        :class:`~pyro_lvm.train.distributed.ShardedLocalGuide`) instead of contiguous pieces; a
        process may then own no point of a minibatch (its shard has ``size`` 0).
    :param device: the training device (NCCL for CUDA, gloo otherwise).
    :raises ValueError: when some minibatch would leave a process without data (contiguous
        shards only).
    """

    def __init__(
        self, num_data: int, batch_size: int, owned: bool = False, device: Any = None
    ) -> None:
        init_distributed(device=device)
        self.rank, self.size = rank_and_size()
        self.owned = owned
        self.sync = GradientSync(())
        last = num_data % batch_size
        if self.size > num_data:
            raise ValueError(
                f"{self.size} processes for {num_data} data points: every process needs at "
                "least one point; use at most num_data processes"
            )
        if (
            self.size > 1
            and not owned
            and (min(batch_size, num_data) < self.size or 0 < last < self.size)
        ):
            raise ValueError(
                f"with {self.size} processes every minibatch needs at least {self.size} points, "
                f"but batch_size={batch_size} on {num_data} points leaves a minibatch of "
                f"{last or num_data}; choose batch_size (the global minibatch) so that it and "
                f"num_data % batch_size (when not 0) are at least {self.size}"
            )

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, logs and shows progress."""
        return self.rank == 0

    @property
    def hooks(self) -> list[Callable[[list[torch.Tensor]], None]]:
        """The ``before_update`` hooks of a step: the gradient all-reduce (none in one process)."""
        return [self.sync] if self.active else []

    def cuda_device(self, device: torch.device | None) -> torch.device | None:
        """``cuda:LOCAL_RANK`` for a CUDA ``device`` in a multi-process run (local rank ``k``
        drives GPU ``k``); any other device unchanged."""
        if self.active and device is not None and device.type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def start(
        self,
        model: Any,
        guide: Any,
        args: tuple,
        kwargs: dict[str, torch.Tensor],
        seed: int,
        epoch: int,
        exclude: Iterable[str] = (),
        context: Callable[[], Any] | None = None,
    ) -> None:
        """Make every process start from rank 0's parameters, with its own random stream.

        Runs the guide and the model once on ``(*args, **kwargs)`` (random state restored) so
        that lazily created parameters exist, broadcasts each of them (sorted by name, except
        ``exclude``) and the modules' buffers from rank 0, records their names for the
        gradient all-reduce, and reseeds ranks above 0 from ``(seed, epoch, rank)`` (rank 0
        keeps its stream, so the one-process run is rank 0's). Non-zero ranks log errors only.

        :param context: a context manager factory around the traced calls (a local guide's
            ``local_override``), or ``None``.
        """
        if not self.active:
            return
        rng = pyro.util.get_rng_state()
        try:
            with poutine.trace(param_only=True) as capture, torch.no_grad():
                with context() if context is not None else nullcontext():
                    guide(*args, **kwargs)
                    model(*args, **kwargs)
        finally:
            pyro.util.set_rng_state(rng)
        names = sorted(set(capture.trace.nodes) - set(exclude))
        self.sync.names = names
        live = dict(pyro.get_param_store().named_parameters())
        tensors = [live[n] for n in names]
        for m in (model, guide):
            if isinstance(m, torch.nn.Module):
                tensors += [b for _, b in sorted(m.named_buffers())]
        with torch.no_grad():
            for t in tensors:
                buffer = t.detach().to(collective_device(), copy=True)
                guarded("the initial parameter broadcast", dist.broadcast, buffer, src=0)
                t.detach().copy_(buffer)
        if self.rank > 0:
            pyro.set_rng_seed(_seed(seed, epoch, self.rank))
            logging.getLogger("pyro_lvm").setLevel(logging.ERROR)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The positions in ``idx`` (a global minibatch's dataset indices) that this process
        steps on: a contiguous piece, or the owned indices (``idx % W == rank``)."""
        if self.owned:
            return torch.nonzero(idx % self.size == self.rank).reshape(-1)
        pieces = torch.tensor_split(torch.arange(len(idx), device=idx.device), self.size)
        return pieces[self.rank]

    def shard(self, batch: Any) -> Any:
        """This process's rows of ``batch`` (a :class:`~pyro_lvm.train.step.Batch` whose
        ``args`` are ``(x, idx, ...)``; every positional and keyword tensor is sliced alike);
        sets the gradient weight :math:`w_r = |b_r|/|b|`."""
        if not self.active:
            return batch
        keep = self.rows(batch.args[1])
        args = tuple(a[keep.to(a.device)] for a in batch.args)
        kwargs = {k: v[keep.to(v.device)] for k, v in batch.kwargs.items()}
        self.sync.weight = len(keep) / batch.size
        return replace(batch, args=args, kwargs=kwargs, size=len(keep))

    def reduce(self, values: list[float]) -> list[float]:
        r"""The global minibatch's values :math:`\sum_r w_r v_r` of per-shard ``values`` (a
        loss scaled for the full data, means over the shard's points); one all-reduce."""
        if not self.active:
            return list(values)
        local = torch.tensor([float(v) * self.sync.weight for v in values], dtype=torch.float64)
        return all_reduce_sum(local, "the loss all-reduce").tolist()

    def mean(self, fn: Callable[[slice], float], n: int) -> float:
        """A per-point mean over ``n`` points from contiguous pieces: ``fn(rows)`` is the mean
        over ``rows`` (a slice); the pieces' means are combined, weighted by their sizes."""
        if not self.active:
            return fn(slice(0, n))
        sizes = [len(p) for p in torch.tensor_split(torch.arange(n), self.size)]
        start = sum(sizes[: self.rank])
        local = sizes[self.rank]
        value = fn(slice(start, start + local)) * local / n if local else 0.0
        return float(all_reduce_sum(torch.tensor([value], dtype=torch.float64), "a mean")[0])

    def agree(self, flag: bool) -> bool:
        """Whether any process says ``flag`` (e.g. a callback asking to stop)."""
        if not self.active:
            return bool(flag)
        total = all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64), "a stop vote")
        return bool(total[0] > 0)

    def save(self, checkpointer: Any, history: Any) -> None:
        """Write a checkpoint: rank 0 alone (every process for a ``collective`` checkpointer,
        which gathers shards itself), then a barrier, so the file is complete for all."""
        if getattr(checkpointer, "collective", False) or self.is_main:
            checkpointer.save(history)
        checkpointer.last_good = checkpointer.path
        barrier()
