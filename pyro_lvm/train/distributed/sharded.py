r"""Per-datapoint parameters sharded over processes, and checkpoints that gather them.

With :math:`W` processes, rank :math:`r` owns the data points :math:`i \equiv r \pmod W` and
holds only their rows :math:`\varphi^i` (row :math:`\lfloor i / W \rfloor` of its shard), so
memory per process is :math:`N/W` rows and no local parameter is ever all-reduced: the inner
optimization of :func:`~pyro_lvm.inner_loop.optimize_local` touches the rows of its own
points only (:func:`~pyro_lvm.train.fit_local` shards its minibatches by ownership).

:class:`ShardedCheckpointer` gathers the shards into the full ``(N, ...)`` tensors in dataset
order and rank 0 writes them with the ordinary
:class:`~pyro_lvm.train.loop.Checkpointer`: the file is the one a single process with an
unsharded guide writes, so a run resumes with any number of processes.

References:

1. Hoffman, Blei, Wang, Paisley (2013), *Stochastic Variational Inference*, JMLR 14
   (arXiv:1206.7051): the per-datapoint (local) parameters.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.infer.util import is_validation_enabled
from torch.distributions import transform_to

from pyro_lvm.guides.local import LocalGuide
from pyro_lvm.plates import data_plate
from pyro_lvm.process_group import collective_device, guarded, rank_and_size
from pyro_lvm.runs.history import FitHistory
from pyro_lvm.spec import record_as
from pyro_lvm.train.loop import Checkpointer

__all__ = ["ShardedCheckpointer", "ShardedLocalGuide", "shard_size"]


def shard_size(num_data: int, rank: int | None = None, size: int | None = None) -> int:
    """How many data points rank ``rank`` of ``size`` owns: ``len(range(rank, num_data, size))``
    (this process of the default group when not given)."""
    if rank is None or size is None:
        rank, size = rank_and_size()
    return len(range(rank, int(num_data), size))


class ShardedLocalGuide(LocalGuide):
    r"""A :class:`~pyro_lvm.guides.LocalGuide` over N points whose rows live in a smaller one.

    ``shard`` is any local guide built with ``num_data = shard_size(N)`` rows (this process's
    points :math:`i \equiv r \pmod W`); this guide has the same sites and distribution but a
    data plate of size ``num_data = N`` and maps a dataset index :math:`i` to the shard's row
    :math:`\lfloor i / W \rfloor` (:meth:`local_rows`). The shard is held, not registered as a
    submodule: state dict, parameters and param-store names are the shard's own, i.e. those of
    the unsharded guide, which keeps checkpoints the same at every world size. In one process
    it is the shard itself. Indices owned by another rank are refused under validation. Its
    rows are read outside Pyro's param statements: it is for :func:`~pyro_lvm.train.fit_local`
    (φ through ``local_override``), not for plain SVI over φ.

    :param shard: the local guide holding this process's rows.
    :param num_data: the dataset size N.
    :raises ValueError: when ``shard.num_data`` is not this rank's share of N.

    Example::

        guide = ShardedLocalGuide(LocalGaussianGuide(shard_size(len(x)), z_dim), len(x))
        fit_local(model, guide, x, batch_size=200)  # under torchrun
    """

    def __init__(self, shard: LocalGuide, num_data: int):
        rank, size = rank_and_size()
        if shard.num_data != shard_size(num_data, rank, size):
            raise ValueError(
                f"rank {rank} of {size} owns {shard_size(num_data, rank, size)} of the "
                f"{num_data} points but the shard guide holds {shard.num_data} rows; build it "
                f"with num_data=shard_size({num_data})"
            )
        super().__init__(num_data, shard.z_shape)
        self.rank, self.size = rank, size
        self.__dict__["shard"] = shard  # not a submodule: the shard's names stay unprefixed
        self.local_names = shard.local_names
        # its checkpoint holds the unsharded guide's rows: it comes back as that guide
        record_as(self, shard, num_data=num_data)

    # the module protocol of the shard (state dict, parameters, devices)
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.shard.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        return self.shard.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator:
        return self.shard.named_parameters(*args, **kwargs)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ShardedLocalGuide:
        self.shard._apply(fn, *args, **kwargs)
        return self

    def distribution(self, **params: torch.Tensor):
        return self.shard.distribution(**params)

    def constraint(self, name: str):
        return self.shard.constraint(name)

    def unconstrained(self, name: str) -> torch.Tensor:
        """This process's rows of ``name``, shape ``(shard_size(N), *z_shape)``."""
        return self.shard.unconstrained(name)

    def local_rows(self, idx: torch.Tensor | None) -> torch.Tensor | slice:
        """The shard rows of dataset indices ``idx`` (all rows for ``None`` in one process)."""
        if idx is None:
            if self.size > 1:
                raise ValueError(
                    "a sharded local guide needs idx (dataset indices of its own points)"
                )
            return slice(None)
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self.size == 1:
            return idx
        if is_validation_enabled() and bool((idx % self.size != self.rank).any()):
            raise ValueError(
                f"rank {self.rank} of {self.size} holds the rows of indices i with i % "
                f"{self.size} == {self.rank} only; shard minibatches by ownership "
                "(DataParallel(owned=True), as fit_local does)"
            )
        return torch.div(idx, self.size, rounding_mode="floor")

    def forward(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Sample ``"z"`` from q(z; φ^{idx}) in the data plate of size N."""
        with data_plate(x, idx, self.num_data if idx is not None else None):
            if self._override is not None:
                values = self._override
            else:
                rows = self.local_rows(idx)
                values = {n: self.unconstrained(n)[rows] for n in self.local_names}
            params = {n: transform_to(self.constraint(n))(v) for n, v in values.items()}
            return pyro.sample("z", self.distribution(**params))

    def params(self, idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        rows = self.local_rows(idx)
        return {
            n: transform_to(self.constraint(n))(self.unconstrained(n).detach()[rows].clone())
            for n in self.local_names
        }

    @torch.no_grad()
    def set_params(self, idx: torch.Tensor | None = None, **unconstrained: torch.Tensor) -> None:
        rows = slice(None) if idx is None else self.local_rows(idx)  # None: all own rows
        for name, value in unconstrained.items():
            target = self.unconstrained(name)
            target[rows] = value.to(target.dtype)


def _gather(guide: ShardedLocalGuide, name: str) -> torch.Tensor | None:
    """The full ``(N, ...)`` unconstrained tensor of ``name`` on rank 0 (``None`` elsewhere)."""
    local = guide.unconstrained(name).detach()
    if guide.size == 1:
        return local.clone()
    n, size = guide.num_data, guide.size
    padded = torch.zeros((math.ceil(n / size), *local.shape[1:]), dtype=local.dtype)
    padded = padded.to(collective_device())
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)] if guide.rank == 0 else None
    guarded("the checkpoint gather", dist.gather, padded, parts, dst=0)
    if guide.rank != 0:
        return None
    full = torch.empty((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, part in enumerate(parts):
        full[r::size] = part[: shard_size(n, r, size)].to(local.device)
    return full


@contextlib.contextmanager
def _full_rows(guide: ShardedLocalGuide, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the context the shard's parameter tensors hold ``full`` (all N rows), so the
    guide's state dict and the param store look like those of the unsharded guide."""
    tensors = {n: getattr(guide.shard, n + "_unconstrained") for n in full}
    saved = {n: t.data for n, t in tensors.items()}
    try:
        for n, t in tensors.items():
            t.data = full[n]
        yield
    finally:
        for n, t in tensors.items():
            t.data = saved[n]


class ShardedCheckpointer(Checkpointer):
    """:class:`~pyro_lvm.train.loop.Checkpointer` of a run whose guide is a
    :class:`ShardedLocalGuide`: the file of an unsharded run (all N rows of every local
    parameter, in dataset order), resumable with any number of processes.

    :meth:`save` is a collective (``collective = True``: every process calls it, the loop's
    :meth:`~pyro_lvm.train.distributed.DataParallel.save` then waits on a barrier);
    rank 0 writes. :meth:`restore` runs in every process (the file must be visible to all),
    which keeps the rows it owns. Arguments as :class:`~pyro_lvm.train.loop.Checkpointer`.
    """

    collective = True

    def save(self, history: FitHistory) -> None:
        full = {n: _gather(self.guide, n) for n in self.guide.local_names}
        if self.guide.rank == 0:
            with _full_rows(self.guide, full):
                super().save(history)
        self.last_good = self.path

    def restore(self) -> FitHistory:
        guide = self.guide
        full = {}
        for n in guide.local_names:
            own = guide.unconstrained(n)
            full[n] = torch.zeros((guide.num_data, *own.shape[1:]), dtype=own.dtype)
            full[n] = full[n].to(own.device)
        with _full_rows(guide, full):
            history = super().restore()
        owned = slice(guide.rank, None, guide.size)
        guide.set_params(None, **{n: value[owned] for n, value in full.items()})
        return history
