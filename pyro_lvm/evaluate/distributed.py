r"""Per-datapoint evaluation split across the processes of a ``torch.distributed`` run.

Every evaluation here returns one value per data point (``log_likelihood``), or a dataclass of
such tensors (``elbo_decomposition``, ``inference_gaps``). With :math:`W` processes,
:func:`distributed_evaluate` gives rank :math:`r` the :math:`r`-th of :math:`W` contiguous
pieces of ``x`` (``torch.tensor_split``), runs the evaluation on it, and all-gathers the
results so that every process holds the per-datapoint values of all of ``x`` in the original
order. Scalar summaries that are means over the points (``inference_gaps``' ``inner_steps``)
are combined as the size-weighted mean; other scalars (``num_samples``, methods by name) are
the same in every process and kept.

The random draws of each process are its own (under ``fit`` every rank above 0 has its own
stream), so per-datapoint Monte Carlo estimates are independent across processes, as in one
process.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pyro_lvm.process_group import collective_device, guarded, rank_and_size

__all__ = ["distributed_evaluate"]

R = TypeVar("R")


def _sizes(n: int, size: int) -> list[int]:
    return [len(part) for part in torch.tensor_split(torch.arange(n), size)]


def _gather(value: Any, sizes: list[int], rank: int) -> Any:
    n_local, n = sizes[rank], sum(sizes)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: _gather(getattr(value, f.name), sizes, rank) for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **fields)
    if isinstance(value, dict):
        return {k: _gather(v, sizes, rank) for k, v in value.items()}
    if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == n_local:
        rows = max(sizes)
        padded = torch.zeros(
            (rows, *value.shape[1:]), dtype=value.dtype, device=collective_device()
        )
        padded[:n_local] = value.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        guarded("the evaluation all-gather", dist.all_gather, parts, padded)
        out = torch.cat([p[:k] for p, k in zip(parts, sizes, strict=True)])
        return out.to(value.device)
    if isinstance(value, float) or (torch.is_tensor(value) and value.dim() == 0):
        total = torch.tensor(
            [float(value) * n_local / n], dtype=torch.float64, device=collective_device()
        )
        guarded("the evaluation all-reduce", dist.all_reduce, total)
        return float(total[0]) if isinstance(value, float) else total[0].to(value)
    return value


def distributed_evaluate(
    fn: Callable[..., R],
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    *args: Any,
    idx: torch.Tensor | None = None,
    **kwargs: Any,
) -> R:
    """``fn(model, guide, x, *args, **kwargs)`` with the data points split across processes.

    :param fn: a per-datapoint evaluation: :func:`~pyro_lvm.evaluate.log_likelihood`,
        :func:`~pyro_lvm.evaluate.elbo_decomposition`, :func:`~pyro_lvm.evaluate.inference_gaps`
        or any function of the same shape (per-datapoint tensors along dim 0).
    :param model: the model.
    :param guide: the guide.
    :param x: all data points; every process passes the same ``x``.
    :param idx: dataset indices of ``x`` (for per-datapoint guides), split with it; passed to
        ``fn`` only when given.
    :returns: what ``fn`` returns for all of ``x``, on every process, in the order of ``x``.
        In one process (no process group) this is ``fn`` itself.
    :raises DistributedError: when another process fails during the gather.

    Example::

        ll = distributed_evaluate(log_likelihood, vae, vae.guide, x_test, num_samples=5000)
    """
    if idx is not None:
        kwargs["idx"] = idx
    rank, size = rank_and_size()
    if size == 1:
        return fn(model, guide, x, *args, **kwargs)
    sizes = _sizes(len(x), size)
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    if idx is not None:
        kwargs["idx"] = idx[rows]
    return _gather(fn(model, guide, x[rows], *args, **kwargs), sizes, rank)
