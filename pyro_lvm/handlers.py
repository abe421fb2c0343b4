"""KL weight (β) handlers with linear and cyclical warm-up schedules, and the free-bits ELBO.

Both wrap any estimator (:class:`~pyro_lvm.elbo.handled.HandledELBO`): the KL weight scales
the latent sites' log-densities, free bits (:mod:`pyro_lvm.elbo.handled`) floor their KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger

from pyro_lvm.capture.record import RuntimeInputs
from pyro_lvm.elbo.handled import FreeBitsELBO, FreeBitsMessenger, HandledELBO, free_bits
from pyro_lvm.elbo.traits import EstimatorTraits, traits_of

__all__ = [
    "FreeBitsELBO",
    "FreeBitsMessenger",
    "KLWeightMessenger",
    "KLWeightedELBO",
    "cyclical_schedule",
    "free_bits",
    "kl_weight",
    "linear_schedule",
]

Beta = float | Callable[[], float]


class KLWeightMessenger(Messenger):
    r"""Scale the log-density of every *latent* sample site by β (observed sites untouched).

    Applied to both the model and the guide, the ELBO becomes the β-weighted objective

    .. math::

        \mathcal L_\beta = \mathbb E_q[\log p(x \mid z)] - \beta\,
        \mathbb E_q[\log q(z \mid x) - \log p(z)],

    the β-VAE of Higgins et al. (2017) and, with β rising from 0 to 1, the KL warm-up of
    Bowman et al. (2016, arXiv:1511.06349) and Sønderby et al. (2016, arXiv:1602.02282).
    Since it acts on ``msg["scale"]`` like :class:`pyro.poutine.scale`, every estimator sees
    it: single-sample ELBOs get exactly L_β; multi-sample bounds weigh the latent terms of
    their log-weights by β.

    :param beta: a non-negative float, or a zero-argument callable returning the current β
        (e.g. a schedule from :func:`linear_schedule` or :func:`cyclical_schedule`), read
        at every site.
    :param sites: names of the latent sites to weigh (default: every latent site).
    """

    def __init__(self, beta: Beta = 1.0, sites: set[str] | None = None):
        super().__init__()
        if not callable(beta):
            _check_beta(beta)
        self.beta, self.sites = beta, None if sites is None else set(sites)
        # a tensor that stands in for the schedule while a loss is captured (KLWeightedELBO)
        self._beta_input: torch.Tensor | None = None

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"]:
            return
        if self.sites is not None and msg["name"] not in self.sites:
            return
        if self._beta_input is not None:
            msg["scale"] = self._beta_input * msg["scale"]
            return
        beta = self.beta() if callable(self.beta) else self.beta
        if is_validation_enabled():
            _check_beta(beta)
        msg["scale"] = beta * msg["scale"]


def kl_weight(fn: Callable | None = None, beta: Beta = 1.0, sites: set[str] | None = None):
    """Handler form of :class:`KLWeightMessenger`: ``kl_weight(model, beta)`` wraps ``model``.

    Wrap the model *and* the guide with the same β::

        schedule = linear_schedule(num_steps=1000)
        svi = SVI(kl_weight(model, schedule), kl_weight(guide, schedule), optim, Trace_ELBO())
        for step in range(2000):
            svi.step(x)
            schedule.step()
    """
    messenger = KLWeightMessenger(beta, sites)
    return messenger if fn is None else messenger(fn)


def _check_beta(beta) -> None:
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
        raise ValueError(f"beta must be a finite non-negative number, got {beta!r}")


class _Schedule:
    """A step counter with ``__call__() -> β``; call ``.step()`` once per optimizer step."""

    def __init__(self) -> None:
        self.t = 0

    def step(self) -> None:
        self.t += 1

    def value(self, t: int) -> float:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self) -> float:
        return self.value(self.t)


class _Linear(_Schedule):
    def __init__(self, num_steps: int, start: float, end: float):
        super().__init__()
        self.num_steps, self.start, self.end = num_steps, start, end

    def value(self, t: int) -> float:
        frac = min(t / self.num_steps, 1.0)
        return self.start + frac * (self.end - self.start)

    def __repr__(self) -> str:
        return f"linear_schedule(num_steps={self.num_steps}, start={self.start}, end={self.end})"


class _Cyclical(_Schedule):
    def __init__(self, period: int, ratio: float, start: float, end: float):
        super().__init__()
        self.period, self.ratio, self.start, self.end = period, ratio, start, end

    def value(self, t: int) -> float:
        tau = (t % self.period) / self.period
        frac = min(tau / self.ratio, 1.0)
        return self.start + frac * (self.end - self.start)

    def __repr__(self) -> str:
        return f"cyclical_schedule(period={self.period}, ratio={self.ratio})"


def linear_schedule(num_steps: int, start: float = 0.0, end: float = 1.0) -> _Schedule:
    r"""Linear KL warm-up: β_t = start + min(t / T, 1) (end − start) (Bowman et al. 2016).

    :param num_steps: T, steps to go from ``start`` to ``end``.
    :returns: a callable schedule with ``.step()`` and ``.t`` (the step count).
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
    _check_beta(start), _check_beta(end)
    return _Linear(int(num_steps), float(start), float(end))


def cyclical_schedule(
    period: int, ratio: float = 0.5, start: float = 0.0, end: float = 1.0
) -> _Schedule:
    r"""Cyclical annealing (Fu et al. 2019, arXiv:1903.10145).

    .. math:: \beta_t = \mathrm{start} + \min\bigl(\tfrac{(t \bmod M)/M}{R}, 1\bigr)
        (\mathrm{end} - \mathrm{start}),

    rising linearly for a fraction R of each cycle of M steps, then held at ``end``.

    :param period: M, steps per cycle.
    :param ratio: R in (0, 1], the rising fraction of a cycle.
    """
    if int(period) < 1:
        raise ValueError(f"period must be a positive integer, got {period}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    _check_beta(start), _check_beta(end)
    return _Cyclical(int(period), float(ratio), float(start), float(end))


class KLWeightedELBO(HandledELBO, RuntimeInputs):
    r"""Estimator option: any estimator run on ``kl_weight(model, β)``, ``kl_weight(guide, β)``.

    Equivalent to wrapping the model and guide by hand (see :class:`KLWeightMessenger`), but
    the model and guide stay plain modules, so training loops that checkpoint their state
    dicts (e.g. :func:`pyro_lvm.train.fit` with ``loss=KLWeightedELBO(...)``) keep working,
    and a schedule's β reaches a captured loss as a tensor input (it implements
    :class:`~pyro_lvm.capture.RuntimeInputs`), so ``fit``'s captured step follows the
    schedule (wrapped by hand, β is frozen in a graph until
    :class:`~pyro_lvm.train.FastSVI`'s periodic check drops it).

    :param base: the wrapped estimator (its particles and plate settings are reused).
    :param beta: a float or a schedule (zero-argument callable).
    :param sites: latent sites to weigh (default: all).
    """

    def __init__(self, base: ELBO, beta: Beta = 1.0, sites: set[str] | None = None):
        super().__init__(base)
        self.messenger = KLWeightMessenger(beta, sites)

    @property
    def traits(self) -> EstimatorTraits:
        """The wrapped estimator's traits; a schedule's step is state kept across steps. A
        schedule's β is not frozen by a graph: it enters the captured loss as a tensor input
        (:meth:`runtime_inputs`), so capture is the base's to decide."""
        base = traits_of(self.base)
        return replace(base, stateful=base.stateful or isinstance(self.messenger.beta, _Schedule))

    def runtime_inputs(self) -> tuple[torch.Tensor, ...]:
        """The current β as a 0-dim tensor when β is a schedule, else ``()``.

        The capture engine (:mod:`pyro_lvm.capture`) reads these before every captured call
        and passes them to the graph, which was captured reading them through
        :meth:`using_runtime_inputs`; so a captured loss follows the schedule instead of
        keeping the β it was captured with.
        """
        beta = self.messenger.beta
        if not callable(beta):
            return ()
        value = beta()
        _check_beta(value)
        return (torch.tensor(float(value), dtype=torch.get_default_dtype()),)

    @contextmanager
    def using_runtime_inputs(self, values: Sequence[torch.Tensor]) -> Iterator[None]:
        """Weigh the latent sites by ``values[0]`` (a tensor β) instead of the schedule."""
        if not values:
            yield
            return
        (beta,) = values
        self.messenger._beta_input = beta
        try:
            yield
        finally:
            self.messenger._beta_input = None

    def _wrap(self, model, guide):
        return self.messenger(model), self.messenger(guide)

    def state_dict(self) -> dict[str, Any]:
        """The base's state and, for a schedule, its step count ``beta_step`` (an int)."""
        state = super().state_dict()
        beta = self.messenger.beta
        if isinstance(beta, _Schedule):
            state["beta_step"] = int(beta.t)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly (the schedule's step included)."""
        super().load_state_dict(state)
        if "beta_step" in state:
            self.messenger.beta.t = int(state["beta_step"])
