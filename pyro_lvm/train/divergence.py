"""Divergence detection: stop a run whose loss grows by orders of magnitude over its recent best."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyro_lvm.validation import InputError

__all__ = [
    "DEFAULT_DIVERGENCE",
    "DivergenceError",
    "DivergenceMonitor",
    "DivergenceRule",
    "RunFailedError",
]


class RunFailedError(FloatingPointError):
    """A training run stopped at a bad step; the base of the loop's guards' errors.

    :ivar epoch: the epoch (1-based) of the failing step.
    :ivar step: the step (1-based) within that epoch.
    :ivar checkpoint: the last good checkpoint file, or ``None`` when none was written.
    """

    def __init__(self, message: str, epoch: int, step: int, checkpoint: Path | None):
        super().__init__(message)
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


class DivergenceError(RunFailedError):
    """The training loss diverged (see :class:`DivergenceRule`); the run was stopped."""


@dataclass(frozen=True)
class DivergenceRule:
    r"""When a finite training loss counts as diverged.

    With :math:`\ell_t` the loss per data point of step :math:`t` and
    :math:`\ell^* = \min_{t - w \le s < t} \ell_s` its best over the last :math:`w` =
    ``window`` steps, step :math:`t` has diverged when

    .. math::

        \ell_t - \ell^* > (\text{factor} - 1)\,\max(|\ell^*|, \text{min\_scale}),

    i.e. for a positive loss when :math:`\ell_t > \text{factor} \cdot \ell^*` (three orders of
    magnitude by default). The absolute value and ``min_scale`` (in nats per data point) make
    the rule meaningful for losses near zero or negative (a Gaussian likelihood's negative
    log-density). Ordinary noise, annealing schedules and the first epochs' fast descent stay
    far below it; a learning rate too large for the model (losses of :math:`10^{30}` after a
    few steps) crosses it within steps, before the parameters overflow to NaN. Non-finite
    losses are the training loop's own guard.

    :param factor: the growth that counts as divergence, > 1.
    :param window: steps over which the best loss is taken, ≥ 1.
    :param min_scale: the smallest loss magnitude the growth is measured against, > 0.
    """

    factor: float = 1e3
    window: int = 1000
    min_scale: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.factor) and self.factor > 1):
            raise InputError(
                f"DivergenceRule.factor must be a finite number > 1, got {self.factor}"
            )
        if int(self.window) != self.window or self.window < 1:
            raise InputError(f"DivergenceRule.window must be a positive integer, got {self.window}")
        if not (math.isfinite(self.min_scale) and self.min_scale > 0):
            raise InputError(f"DivergenceRule.min_scale must be positive, got {self.min_scale}")

    def diverged(self, value: float, best: float) -> bool:
        """Whether ``value`` has diverged from the recent ``best``."""
        return value - best > (self.factor - 1.0) * max(abs(best), self.min_scale)


#: the rule ``fit`` and ``fit_local`` apply unless told otherwise
DEFAULT_DIVERGENCE = DivergenceRule()


class DivergenceMonitor:
    """Applies a :class:`DivergenceRule` step by step (``None`` as the rule disables it).

    :param rule: the rule, or ``None`` for no checking.
    :param recent: losses already recorded (a resumed run's step losses), so a resumed run
        decides exactly as the uninterrupted one would.
    :param what: the loop's name in messages (``"fit"``, ``"fit_local"``).
    """

    def __init__(
        self, rule: DivergenceRule | None, recent: Iterable[float] = (), what: str = "fit"
    ):
        if rule is not None and not isinstance(rule, DivergenceRule):
            raise InputError(
                f"divergence must be a pyro_lvm.train.DivergenceRule or None, got {rule!r}"
            )
        self.rule, self.what = rule, what
        window = 1 if rule is None else int(rule.window)
        self.recent: deque[float] = deque((v for v in recent if math.isfinite(v)), maxlen=window)

    def check(self, value: float, *, epoch: int, step: int, checkpoint: Path | str | None) -> None:
        """Record a finite step loss; raise :class:`DivergenceError` if it diverged.

        :param value: the step's loss per data point.
        :param epoch: the epoch (1-based), for the message.
        :param step: the step within the epoch (1-based), for the message.
        :param checkpoint: the last good checkpoint, which the error names and which is kept.
        """
        if self.rule is None or not math.isfinite(value):
            return
        if self.recent:
            best = min(self.recent)
            if self.rule.diverged(value, best):
                kept = (
                    f"the last good checkpoint {checkpoint} is kept"
                    if checkpoint
                    else "no checkpoint was written"
                )
                raise DivergenceError(
                    f"{self.what} diverged at epoch {epoch}, step {step}: loss {value:.4g} per "
                    f"data point against a recent best of {best:.4g} (more than "
                    f"{self.rule.factor:g}x, see DivergenceRule); {kept}; lower the learning "
                    "rate",
                    epoch=epoch,
                    step=step,
                    checkpoint=None if checkpoint is None else Path(checkpoint),
                )
        self.recent.append(value)
