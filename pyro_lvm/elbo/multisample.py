"""Multi-sample bounds: the family base that combines K particles per data point."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from pyro.infer.elbo import ELBO
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan

from pyro_lvm.elbo.base import PARTICLE_PLATE, Estimator
from pyro_lvm.elbo.log_weights import (
    ALIAS,
    LogWeights,
    SamplePathScale,
    _StoreScale,
    log_weights,
)
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.validation import check_positive, check_rows

__all__ = [
    "LogWeights",
    "MultiSampleELBO",
    "PARTICLE_PLATE",
    "SamplePathScale",
    "guess_max_plate_nesting",
    "iter_importance_weights",
    "log_weights",
]


class MultiSampleELBO(Estimator, ELBO):
    r"""Base class of bounds that combine ``K`` particles per data point.

    A subclass implements one method, :meth:`_bound_and_surrogate`, which maps the
    :class:`LogWeights` of ``K`` particles to a per-datapoint bound estimate and a surrogate
    whose gradient is the estimator's. :meth:`differentiable_loss` (primary), :meth:`loss` and
    :meth:`loss_and_grads` derive from it:

    .. math::

        \mathcal L = -\frac{N}{B} \sum_{i \in \text{batch}}
        \big(\hat{\mathcal L}_i^{\perp} + s_i - s_i^{\perp}\big),

    with :math:`\perp` the stop-gradient and :math:`N / B` the subsample scale, applied after
    the particles are combined (NumPyro's treatment of local latents, unlike Pyro issue #3104).

    :param num_particles: number of particles ``K`` (at least ``traits.min_particles``).
    :param max_plate_nesting: bound on nested plates (guessed by a dry run when infinite).
    :param vectorize_particles: draw the particles in one vectorized pass (default).
    :param kwargs: other :class:`pyro.infer.ELBO` keyword arguments.
    :raises ValueError: on ``num_particles`` below ``traits.min_particles``.
    """

    traits = replace(Estimator.traits, category="bound")
    #: whether the estimator needs ``log_w_stop``
    _stop_guide = False
    #: whether the estimator rescales the gradient along the sample path
    #: (:meth:`scale_sample_path`)
    _rescale_sample_path = False
    _sample_path: SamplePathScale | None = None

    def __init__(
        self,
        num_particles: int = 2,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        **kwargs,
    ):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )

    #: whether a guide site marked for enumeration is refused (a bound; not evaluation)
    _refuses_enumerated = True

    def _get_trace(self, model, guide, args, kwargs):
        """Guide trace and the model replayed on it (sample values aliased when rescaling),
        built and checked by :func:`~pyro_lvm.elbo.traces.importance_traces` (strict: the
        weights need every latent drawn by the guide)."""
        return importance_traces(
            model,
            guide,
            args,
            kwargs,
            self.max_plate_nesting,
            replay=None if self._sample_path is None else self._aliased,
            strict=True,
            enumerated="refuse" if self._refuses_enumerated else "allow",
        )

    def _aliased(self, guide_trace):
        """A copy of the guide trace whose reparameterized samples are aliases (DReG): the
        model (and the stopped guide density) see the alias; the guide trace keeps the sample
        itself, which distributions may cache by identity."""
        handle = self._sample_path
        handle.new_trace()
        replayed = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if (
                site["type"] == "sample"
                and not site["is_observed"]
                and not site_is_subsample(site)
                and getattr(site["fn"], "has_rsample", False)
            ):
                site[ALIAS] = handle.attach(site["value"], site["fn"].event_dim)
                replayed.nodes[name] = dict(site, value=site[ALIAS])
        return replayed

    def importance_weights(self, model, guide, *args, **kwargs) -> LogWeights:
        """The :class:`LogWeights` of ``num_particles`` guide draws (the engine's public entry,
        used by :mod:`pyro_lvm.evaluate`); run it under ``torch.no_grad()`` to evaluate."""
        return self._get_log_weights(model, guide, args, kwargs)

    def _get_log_weights(self, model, guide, args, kwargs) -> LogWeights:
        handle = self._sample_path = SamplePathScale() if self._rescale_sample_path else None
        try:
            parts = [
                log_weights(model_trace, guide_trace, self._stop_guide, type(self).__name__)
                for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs)
            ]
        finally:
            self._sample_path = None
        if handle is not None:
            handle.shapes = [shape for p in parts for shape in p.nested_shape]
        if len(parts) == 1:
            return replace(parts[0], sample_path=handle)

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=0)

        return LogWeights(
            log_w=cat("log_w"),
            log_w_stop=cat("log_w_stop"),
            sample_path=handle,
            score=cat("score"),
            scale=parts[0].scale,
            nonreparam_sites=parts[0].nonreparam_sites,
            nested_shape=tuple(shape for p in parts for shape in p.nested_shape),
            reducer=parts[0].reducer,
            traces=tuple(pair for p in parts for pair in p.traces),
        )

    @staticmethod
    def scale_sample_path(
        weights: LogWeights, surrogate: torch.Tensor, scale: torch.Tensor
    ) -> torch.Tensor:
        """``surrogate`` unchanged, with the gradient along each sample path scaled by ``scale``.

        :param weights: log weights computed with ``_rescale_sample_path = True``.
        :param surrogate: the surrogate whose gradient is rescaled.
        :param scale: per-particle, per-datapoint factors, of shape ``weights.log_w.shape``
            (treated as constants).
        """
        if weights.sample_path is None:
            raise RuntimeError(
                f"{type(weights).__name__} carry no sample-path handle; set "
                "_rescale_sample_path = True on the estimator"
            )
        return _StoreScale.apply(surrogate, scale, weights.sample_path)

    def _bound_and_surrogate(self, weights: LogWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-datapoint bound estimate and surrogate (both of shape ``weights.log_w.shape[1:]``).

        The estimator's gradient is that of ``surrogate``; only its gradient is used.
        """
        raise NotImplementedError

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """Negative bound estimate whose gradient is the estimator's (the primary method)."""
        return self.loss_from_weights(self._get_log_weights(model, guide, args, kwargs))

    def loss_from_weights(self, weights: LogWeights) -> torch.Tensor:
        """The negative bound of given :class:`LogWeights` (particles first), its gradient the
        estimator's: what :meth:`differentiable_loss` returns for the weights it draws."""
        bound, surrogate = self._bound_and_surrogate(weights)
        if bound.shape != weights.log_w.shape[1:] or surrogate.shape != bound.shape:
            raise RuntimeError(
                f"{type(self).__name__}: bound {tuple(bound.shape)} and surrogate "
                f"{tuple(surrogate.shape)} must have the plate shape {tuple(bound.shape)}"
            )
        per_datapoint = bound.detach() + (surrogate - surrogate.detach())
        loss = -weights.scale * per_datapoint.sum()
        warn_if_nan(loss, "loss")
        return loss


class _Engine(MultiSampleELBO):
    """The multi-sample machinery without a bound: log weights for evaluation."""

    _refuses_enumerated = False

    def _bound_and_surrogate(self, weights: LogWeights):  # pragma: no cover - never a loss
        raise NotImplementedError("the evaluation engine computes weights, not a bound")


def guess_max_plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """The plate nesting of a (model, guide) pair, particles excluded, guessed by one dry run
    exactly as Pyro's ELBOs guess it, without drawing from the caller's random stream."""
    engine = _Engine(num_particles=1)  # one particle: no particle plate counted
    engine._guess_max_plate_nesting(model, guide, args, kwargs)
    return int(engine.max_plate_nesting)


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    size = n if size is None else int(size)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def iter_importance_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    sample_chunk: int | None = None,
    data_chunk: int | None = None,
    idx: torch.Tensor | None = None,
    max_plate_nesting: int | None = None,
    named: dict[str, torch.Tensor] | None = None,
) -> Iterator[tuple[slice, LogWeights]]:
    """Yield ``(rows, weights)``: the :class:`LogWeights` of up to ``sample_chunk`` guide draws
    for the rows ``x[rows]``, chunk by chunk, from the multi-sample bounds' own machinery.

    ``model(x[rows], idx[rows])`` and the guide are traced with the particles vectorized;
    :meth:`LogWeights.per_row` gives ``(K, len(rows))`` tensors. ``max_plate_nesting`` (the
    model's, particles excluded) is guessed once by a dry run, as Pyro's ELBOs do, unless
    given. ``named`` per-datapoint tensors are sliced like ``x`` and passed as keyword
    arguments. Run under ``torch.no_grad()`` to evaluate.

    :raises ValueError: on a non-positive size, an ``x`` without rows, an ``idx`` of another
        length, or (from the engine) a model/guide mismatch.
    """
    check_positive(num_samples=num_samples, sample_chunk=sample_chunk, data_chunk=data_chunk)
    check_rows(x)
    if idx is not None and len(idx) != x.shape[0]:
        raise ValueError(f"idx must hold one index per row of x; got {len(idx)} for {x.shape[0]}")
    sample_chunk = num_samples if sample_chunk is None else min(int(sample_chunk), num_samples)
    nesting = float("inf") if max_plate_nesting is None else int(max_plate_nesting) + 1
    engine = _Engine(num_particles=max(sample_chunk, 2), max_plate_nesting=nesting)
    for rows in _chunks(x.shape[0], data_chunk):
        xc, ic = x[rows], None if idx is None else idx[rows]
        kw = {k: v[rows] for k, v in (named or {}).items()}
        for start in range(0, num_samples, sample_chunk):
            engine.num_particles = min(sample_chunk, num_samples - start)
            yield rows, engine.importance_weights(model, guide, xc, ic, **kw)
