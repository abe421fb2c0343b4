"""Checks of the model and data that the training loop runs once, before its first step.

(The data themselves are checked by :mod:`pyro_lvm.validation`: ``check_rows`` first, then
``validate_inputs``.)"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

from pyro_lvm.contract import DATA_PLATE
from pyro_lvm.plates import ScaleDataPlate

__all__ = ["scaled_programs", "set_num_data"]


def set_num_data(model: Any, guide: Any, num_data: int) -> None:
    """Fill a ``num_data`` attribute that is ``None``; refuse one that disagrees."""
    for what, obj in (("model", model), ("guide", guide)):
        value = getattr(obj, "num_data", None)
        if value is not None and value != num_data:
            raise ValueError(
                f"the {what} has num_data={value} but the training set has {num_data} points; "
                f"build it with num_data=None (fit sets it) or num_data={num_data}"
            )
    for obj in (model, guide):
        if hasattr(obj, "num_data") and obj.num_data is None:
            obj.num_data = num_data


def _trace(fn: Callable, x: torch.Tensor, idx: torch.Tensor, named: dict) -> Any:
    """A trace of ``fn(x, idx, **named)`` under saved and restored RNG states."""
    rng = pyro.util.get_rng_state()
    try:
        return poutine.trace(fn).get_trace(x, idx, **named)
    finally:
        pyro.util.set_rng_state(rng)


def _unscaled(site: dict, expected: float) -> bool:
    scale = site["scale"]  # a Python float (a float32 tensor of it would round)
    if torch.is_tensor(scale) and scale.numel() != 1:
        return False
    return not math.isclose(float(scale), expected, rel_tol=1e-6)


def _common(sites: list[dict], keep: Callable) -> set[str]:
    """The names of the vectorized plates that enclose every site and satisfy ``keep``."""
    names = None
    for site in sites:
        found = {f.name for f in site["cond_indep_stack"] if f.vectorized and keep(f)}
        names = found if names is None else names & found
    return names or set()


class _Scaled:
    """A program whose plain data plate is scaled by N/B when called with ``idx``
    (:class:`~pyro_lvm.plates.ScaleDataPlate`); with ``idx=None`` (evaluation on a chunk) it
    runs unscaled, as :func:`~pyro_lvm.plates.data_plate` does."""

    def __init__(self, fn: Callable, plate: str, num_data: int):
        self.fn, self.plate, self.num_data = fn, plate, int(num_data)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor | None = None, **named: Any) -> Any:
        if idx is None:
            return self.fn(x, idx, **named)
        with ScaleDataPlate(self.plate, self.num_data):
            return self.fn(x, idx, **named)

    def __repr__(self) -> str:
        return f"scaled({self.fn!r}, plate={self.plate!r})"


def scaled_programs(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx: torch.Tensor,
    num_data: int,
    named: dict | None = None,
) -> tuple[Callable, Callable]:
    """Model and guide whose minibatch losses estimate the full-data loss.

    Traced once on a minibatch ``(x, idx)`` of ``num_data`` points (random state restored),
    the observed sites must carry the scale :math:`N / B`. A model that scales itself
    (:func:`~pyro_lvm.plates.data_plate`, ``subsample=``) and a guide that does too are
    returned unchanged. Otherwise the *data plate* is the plate that encloses every observed
    site, is not subsampled and has B elements (``pyro.plate("data", x.shape[0])``, as in
    Pyro's tutorials); model and guide are then wrapped so that the sites inside that plate
    alone get :math:`N / B` (:class:`~pyro_lvm.plates.ScaleDataPlate`).

    :param model: ``model(x, idx=None, **named)`` (see :func:`~pyro_lvm.contract.as_program`).
    :param guide: ``guide(x, idx=None, **named)``.
    :returns: ``(model, guide)``, wrapped or not.
    :raises ValueError: when the model observes nothing, or no such plate is found (the
        message names what was looked for), or the scales still disagree after wrapping.
    """
    named = named or {}
    batch, expected = len(idx), num_data / len(idx)
    trace = _trace(model, x, idx, named)
    observed = [s for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site; observe the data with obs=x")
    if expected == 1:
        return model, guide  # a full batch: nothing to scale
    if not any(_unscaled(s, expected) for s in observed):
        # the model scales itself; a guide written with a plain plate of that name is scaled
        plates = _common(observed, lambda f: f.size == batch and f.full_size == num_data)
        unscaled_guide = any(
            f.name in plates and f.full_size in (None, f.size)
            for s in _trace(guide, x, idx, named).nodes.values()
            if s["type"] == "sample" and not s["is_observed"]
            for f in s["cond_indep_stack"]
        )
        if not unscaled_guide:
            return model, guide
    else:
        plates = _common(observed, lambda f: f.size == batch and f.full_size in (None, f.size))
    if len(plates) > 1 and DATA_PLATE in plates:
        plates = {DATA_PLATE}
    if len(plates) != 1:
        bad = ", ".join(f"{s['name']} (scale {float(s['scale']):g})" for s in observed)
        raise ValueError(
            f"cannot find the data plate: looked for one pyro.plate of size {batch} (the "
            f"minibatch's length) that encloses every observed site, or observed sites scaled "
            f"by num_data / batch = {expected:g}; found {sorted(plates) or 'no such plate'} "
            f"for the observed sites {bad}. Put the observations in "
            f"pyro.plate('data', x.shape[0]) (the loop scales it) or in "
            f"pyro_lvm.plates.data_plate(x, idx, num_data) (it scales itself)"
        )
    plate = plates.pop()
    model, guide = _Scaled(model, plate, num_data), _Scaled(guide, plate, num_data)
    nodes = _trace(model, x, idx, named).nodes
    wrong = [s["name"] for s in observed if _unscaled(nodes[s["name"]], expected)]
    if wrong:
        raise ValueError(
            f"observed sites {wrong} are outside the data plate {plate!r}, so they cannot be "
            "scaled to the full data set; put every observation in that plate"
        )
    return model, guide
