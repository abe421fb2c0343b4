"""Checks of the model and data that the training loop runs once, before its first step.

(The data themselves are checked by :mod:`pyro_lvm.validation`: ``check_rows`` first, then
``validate_inputs``.)"""

from __future__ import annotations

import math
from typing import Any

import pyro
import pyro.poutine as poutine
import torch

__all__ = ["check_subsampling", "set_num_data"]


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


def check_subsampling(
    model: Any, x: torch.Tensor, idx: torch.Tensor, num_data: int, named: dict | None = None
) -> None:
    """Check that the model scales a minibatch's likelihood by ``num_data / len(idx)``.

    Losses are reported per data point as ``loss / num_data``, which is right only when the
    observed sites sit in ``data_plate(x, idx, num_data)``. The trace runs under saved and
    restored RNG states, so it does not change the random stream of the run.
    """
    rng = pyro.util.get_rng_state()
    try:
        trace = poutine.trace(model).get_trace(x, idx, **(named or {}))
    finally:
        pyro.util.set_rng_state(rng)
    expected = num_data / len(idx)
    observed = [s for s in trace.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    if not observed:
        raise ValueError("the model has no observed sample site; observe the data with obs=x")
    bad = [
        f"{s['name']} (scale {float(s['scale']):g})"
        for s in observed
        if torch.as_tensor(s["scale"]).numel() == 1
        and not math.isclose(float(s["scale"]), expected, rel_tol=1e-9)
    ]
    if bad:
        raise ValueError(
            f"observed sites {', '.join(bad)} are not scaled by num_data / batch = {expected:g}; "
            "put the observations in pyro_lvm.plates.data_plate(x, idx, num_data) so minibatch "
            "losses estimate the full-data loss"
        )
