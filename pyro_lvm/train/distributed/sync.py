r"""The gradient all-reduce of data-parallel training: :class:`GradientSync`. What the training
loop asks of the process group (shards, reduced losses, agreed stops, rank-0 checkpoints) is
:class:`~pyro_lvm.train.distributed.DataParallel`.

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
:func:`~pyro_lvm.train.step.svi_step`, once per step), which covers every parameter a step
touches.

The process group itself (rank, size, guarded collectives) is :mod:`pyro_lvm.process_group`.

References:

1. Li et al. (2020), *PyTorch Distributed: Experiences on Accelerating Data Parallel Training*,
   VLDB 13 (arXiv:2006.15704): bucketed gradient all-reduce.
2. Goyal et al. (2017), *Accurate, Large Minibatch SGD*, arXiv:1706.02677.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pyro
import torch
import torch.distributed as dist

from pyro_lvm.process_group import DistributedError, collective_device, guarded, rank_and_size

__all__ = ["GradientSync"]


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
        device = collective_device()
        for b, members in enumerate(buckets):
            dtype = tensors[members[0]].dtype
            parts = [
                (tensors[i].grad * self.weight if tensors[i].grad is not None else
                 torch.zeros_like(tensors[i])).reshape(-1).to(device)
                for i in members
            ]  # fmt: skip
            if b == 0:
                parts.append(flags.to(device=device, dtype=dtype))
            flat = guarded("the gradient all-reduce", self._reduce, torch.cat(parts))
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
