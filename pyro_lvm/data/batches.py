"""Minibatches ``(x_batch, idx)`` and named entries, in an order fixed by ``(seed, epoch)``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from pyro_lvm.data.named import NamedData, split_named

__all__ = ["Minibatches"]


def _non_negative_int(name: str, value: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class Minibatches:
    r"""Iterate over a dataset in minibatches ``(x[idx], idx)``, one epoch per pass.

    ``idx`` is the ``LongTensor`` of the rows' indices in ``x``, what
    :func:`pyro_lvm.plates.data_plate` takes as ``subsample`` together with
    ``num_data = len(x)``, so that Pyro scales each minibatch's log-likelihood by
    :math:`N / |\mathrm{idx}|` and the minibatch ELBO is an unbiased estimate of the
    full-data ELBO (Hoffman et al. 2013). Every index appears exactly once per epoch
    (without ``drop_last``).

    The order of epoch :math:`e` is a permutation drawn by a private ``torch.Generator``
    seeded from ``(seed, e)`` through ``numpy.random.SeedSequence`` (well-mixed seeds for
    neighbouring pairs): a pure function of ``(seed, epoch)``, independent of the global
    RNG, so a training run resumed at epoch :math:`e` (``set_epoch(e)``) sees exactly the
    batches of the uninterrupted run. A completed pass advances the epoch by one; an
    interrupted pass (``break``) does not. Batches are index slices of the permutation: no
    Python loop over data points.

    :param x: the dataset, a 2-d tensor with data points along dim 0, or a mapping of named
        per-datapoint tensors with the observations under ``"x"`` (see
        :func:`~pyro_lvm.data.named.as_named`); the other entries are sliced by the same
        ``idx`` and returned by :meth:`named` as the step's keyword arguments.
    :param batch_size: points per batch (the last one may be smaller).
    :param shuffle: draw a permutation per epoch; otherwise ``0, 1, ..., N-1`` every epoch.
    :param seed: non-negative seed of the permutations.
    :param drop_last: drop the last, incomplete batch (if any).
    :raises ValueError: for an ``x`` that is not a non-empty 2-d tensor, a mapping whose
        entries differ in length, a ``batch_size``
        below 1, a negative seed, or ``drop_last`` with ``batch_size > len(x)`` (no batch).

    Example::

        batches = Minibatches(x, batch_size=100, seed=0)
        model = VAE(..., num_data=batches.num_data)
        for epoch in range(10):
            batches.set_epoch(epoch)  # optional here: passes advance it; needed on resume
            for x_batch, idx in batches:
                svi.step(x_batch, idx, **batches.named(idx))  # {} for a bare tensor

    References:

    1. M. D. Hoffman, D. M. Blei, C. Wang, J. Paisley (2013). Stochastic Variational
       Inference. JMLR 14. arXiv:1206.7051.
    """

    def __init__(
        self,
        x: NamedData,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if isinstance(x, Mapping):
            x, self._named = split_named(x, "the dataset")
        else:
            self._named = {}
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(
                f"x must be a 2-d tensor (data points x features), got "
                f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}; flatten images "
                "with x.reshape(len(x), -1)"
            )
        if x.shape[0] == 0:
            raise ValueError("x is empty: a dataset needs at least one data point")
        if not isinstance(batch_size, numbers.Integral) or isinstance(batch_size, bool):
            raise ValueError(f"batch_size must be an integer, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if drop_last and batch_size > x.shape[0]:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {x.shape[0]} data points, so drop_last "
                "leaves no batch; lower batch_size or set drop_last=False"
            )
        self.x = x
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = _non_negative_int("seed", seed)
        self.drop_last = bool(drop_last)
        self._epoch = 0

    @property
    def num_data(self) -> int:
        """The dataset size ``len(x)``: the ``num_data`` of the data plate."""
        return self.x.shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the entries other than ``x`` (empty for a bare tensor)."""
        return tuple(self._named)

    @property
    def named_data(self) -> dict[str, torch.Tensor]:
        """The entries other than ``x``, whole (empty for a bare tensor)."""
        return dict(self._named)

    def named(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The entries other than ``x`` at rows ``idx``: the step's keyword arguments."""
        return {k: v[idx.to(v.device)] for k, v in self._named.items()}

    @property
    def epoch(self) -> int:
        """The epoch the next pass will yield."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass yield the batches of ``epoch`` (a non-negative integer)."""
        self._epoch = _non_negative_int("epoch", epoch)

    def __len__(self) -> int:
        """Batches per epoch: ``N // batch_size`` with ``drop_last``, else the ceiling."""
        if self.drop_last:
            return self.num_data // self.batch_size
        return math.ceil(self.num_data / self.batch_size)

    def permutation(self, epoch: int | None = None) -> torch.Tensor:
        """The order of the rows in ``epoch`` (default: the current one), a CPU ``LongTensor``.

        Drawn on the CPU whatever ``torch.set_default_device`` says, so an accelerator run
        visits the rows in the same order as a CPU run.
        """
        epoch = self._epoch if epoch is None else _non_negative_int("epoch", epoch)
        if not self.shuffle:
            return torch.arange(self.num_data, device="cpu")
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, dtype=np.uint64)
        gen = torch.Generator(device="cpu").manual_seed(int(state[0]))
        return torch.randperm(self.num_data, generator=gen, device="cpu")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self.permutation().to(self.x.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idx = perm[start : start + self.batch_size]
            yield self.x[idx], idx
        self._epoch += 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_data={self.num_data}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
            f"epoch={self.epoch})"
        )
