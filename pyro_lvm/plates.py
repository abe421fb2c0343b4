"""The data plate shared by every model and guide: full batch or subsample by index."""

from __future__ import annotations

import pyro
import torch
from pyro.poutine.messenger import Messenger

__all__ = ["ScaleDataPlate", "data_plate"]


def data_plate(x: torch.Tensor, idx: torch.Tensor | None = None, num_data: int | None = None):
    """Return ``pyro.plate("data", ...)`` for a minibatch ``x``.

    With ``idx=None`` the plate covers exactly the rows of ``x`` (no subsample scaling).
    With ``idx`` (the rows' indices in a dataset of ``num_data`` points) the plate has size
    ``num_data`` and subsamples ``idx``, so Pyro scales the log-likelihood by
    ``num_data / len(idx)`` and per-datapoint guides can slice their parameters with ``idx``.

    :param x: minibatch, data points along dim 0.
    :param idx: indices of the rows of ``x`` in the dataset, or ``None``.
    :param num_data: dataset size; required when ``idx`` is given.
    :raises ValueError: on an ``idx`` whose length differs from ``len(x)``, or a missing
        ``num_data``.
    """
    # sizes as Python ints: a tensor size makes Pyro build the plate's scale as a tensor in
    # every step (a few ops per site, and a multiply of each log-density even when the
    # scale is 1)
    if idx is None:
        n = int(x.shape[0])
        return pyro.plate("data", n, subsample_size=n, dim=-1)
    idx = torch.as_tensor(idx, dtype=torch.long, device=x.device)
    if idx.dim() != 1 or idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"idx must be a 1-d tensor with one index per row of x; got idx of shape "
            f"{tuple(idx.shape)} for x of shape {tuple(x.shape)}"
        )
    if num_data is None:
        raise ValueError(
            "idx was given but num_data is unknown: construct the model and guide with "
            "num_data=len(dataset) (or set .num_data) so the plate can scale the minibatch"
        )
    return pyro.plate("data", num_data, subsample=idx, subsample_size=int(idx.shape[0]), dim=-1)


class ScaleDataPlate(Messenger):
    r"""Scale the sample sites inside the plain plate ``name`` by ``num_data / size``.

    A plate ``pyro.plate(name, B)`` over a minibatch of B of N data points (not subsampled:
    its frame's ``size`` equals its ``full_size``) gets the factor :math:`N / B` on every
    sample site it encloses, latent or observed, as a subsampled plate would have; sites
    outside it (global latents) and parameters are untouched, and a plate that subsamples
    (``subsample=`` or :func:`data_plate` with ``idx``) already scales itself and is left
    alone. The scale is a Python number from the plate's size, so a captured graph keeps it
    per input shape.

    :param name: the data plate's name.
    :param num_data: the data set size N.
    """

    def __init__(self, name: str, num_data: int):
        super().__init__()
        self.name, self.num_data = name, int(num_data)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample":
            return
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.name and frame.full_size in (None, frame.size):
                msg["scale"] = msg["scale"] * (self.num_data / int(frame.size))
                return
