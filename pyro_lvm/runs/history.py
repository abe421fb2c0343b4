"""The record of a training run: per-step and per-epoch losses, validation bounds, time."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FitHistory"]


@dataclass
class FitHistory:
    r"""What :func:`~pyro_lvm.train.fit` and :func:`~pyro_lvm.train.fit_local` report, every
    loss **per data point**.

    With the data plate subsampled by ``idx`` (see :func:`~pyro_lvm.plates.data_plate`) the
    SVI loss of a minibatch :math:`b` of size :math:`|b|` out of :math:`N` points is
    :math:`\frac{N}{|b|} \sum_{i \in b} -\widehat{\mathcal L}_i` (global terms once), so the
    value recorded per step is

    .. math::

        \ell_b = \frac{\text{loss}_b}{N} = \frac{1}{|b|} \sum_{i \in b} -\widehat{\mathcal L}_i ,

    the minibatch mean of the estimated negative bound per data point. The epoch value is the
    size-weighted mean :math:`\sum_b |b|\, \ell_b / \sum_b |b|` over the epoch's steps
    (parameters move during the epoch, so it is a running average, not the end-of-epoch
    bound). The validation value is the bound itself (positive direction),
    :math:`\frac{1}{M} \sum_{j=1}^{M} \widehat{\mathcal L}_j` over the ``M`` validation points,
    computed with the training estimator's ``loss`` and no subsampling.

    :ivar step_losses: :math:`\ell_b` for every optimization step, in order.
    :ivar epoch_losses: the mean training loss per data point of each epoch.
    :ivar valid_elbos: the validation bound per data point after each epoch (empty when no
        validation data was given).
    :ivar epochs: number of completed epochs.
    :ivar seconds: wall-clock seconds spent training (summed over resumed runs).
    :ivar num_data: the training-set size :math:`N`.
    :ivar batch_size: the minibatch size.
    :ivar step_metrics: further per-step values by name, e.g. ``fit_local``'s
        ``"inner_steps"`` (mean inner steps per data point of the minibatch) and
        ``"fraction_converged"``.
    :ivar epoch_metrics: their size-weighted means per epoch, as for ``epoch_losses``.
    """

    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    valid_elbos: list[float] = field(default_factory=list)
    epochs: int = 0
    seconds: float = 0.0
    num_data: int | None = None
    batch_size: int | None = None
    step_metrics: dict[str, list[float]] = field(default_factory=dict)
    epoch_metrics: dict[str, list[float]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        """Number of optimization steps taken."""
        return len(self.step_losses)

    @property
    def best_valid_elbo(self) -> float:
        """The highest finite validation bound so far (``nan`` when there is none)."""
        finite = [v for v in self.valid_elbos if math.isfinite(v)]
        return max(finite) if finite else math.nan

    def to_dict(self) -> dict[str, Any]:
        """A dict of plain Python values (lists of floats, ints), safe for ``weights_only``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> FitHistory:
        """Inverse of :meth:`to_dict`.

        The metric dicts may be absent (histories written before they existed).

        :raises ValueError: when a key is missing or unknown.
        """
        names = {f for f in cls.__dataclass_fields__}
        optional = {"step_metrics", "epoch_metrics"}
        if not isinstance(state, dict) or not names - optional <= set(state) <= names:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"a FitHistory state needs exactly the keys {sorted(names)}, got {got}"
            )
        return cls(
            step_losses=[float(v) for v in state["step_losses"]],
            epoch_losses=[float(v) for v in state["epoch_losses"]],
            valid_elbos=[float(v) for v in state["valid_elbos"]],
            epochs=int(state["epochs"]),
            seconds=float(state["seconds"]),
            num_data=None if state["num_data"] is None else int(state["num_data"]),
            batch_size=None if state["batch_size"] is None else int(state["batch_size"]),
            step_metrics=_metrics(state.get("step_metrics", {})),
            epoch_metrics=_metrics(state.get("epoch_metrics", {})),
        )

    def record_step(self, loss: float, metrics: dict[str, float] | None = None) -> None:
        """Append one step's loss per data point and its further metrics."""
        self.step_losses.append(float(loss))
        for name, value in (metrics or {}).items():
            self.step_metrics.setdefault(name, []).append(float(value))

    def record_epoch(self, loss: float, metrics: dict[str, float] | None = None) -> None:
        """Append one epoch's mean loss per data point and its further metrics; count it."""
        self.epoch_losses.append(float(loss))
        for name, value in (metrics or {}).items():
            self.epoch_metrics.setdefault(name, []).append(float(value))
        self.epochs += 1


def _metrics(state: dict[str, Any]) -> dict[str, list[float]]:
    return {str(name): [float(v) for v in values] for name, values in state.items()}
