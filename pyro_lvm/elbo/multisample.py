"""Shared machinery of multi-sample bounds: per-particle, per-datapoint log importance weights."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Number

import torch
from pyro import poutine
from pyro.distributions.util import detach, is_identically_zero, scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape, warn_if_nan

from pyro_lvm.elbo.base import DerivedLossMixin

__all__ = ["LogWeights", "MultiSampleELBO", "PARTICLE_PLATE", "SamplePathScale"]

#: name of the plate that :class:`pyro.infer.ELBO` wraps around vectorized particles
PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class LogWeights:
    r"""Per-particle, per-datapoint terms of a multi-sample bound.

    Every tensor has shape ``(K, *plates)``: particles first, then the sizes of the plates that
    enclose every sample site (outermost first), typically ``(K, N)`` for the ``"data"`` plate.
    All sums run over the sites and over the dims of every other plate; the subsample scale of
    the enclosing plates is divided out (it is re-applied to the bound, after the logsumexp).

    :ivar log_w: :math:`\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k)`, with every
        gradient path (θ, φ through the sample :math:`z_k` and φ through the density).
    :ivar log_w_stop: the same with the density of each reparameterized guide site rescored
        with stopped parameters, :math:`\log p_\theta(x, z_k) - \log q_{\bar\phi}(z_k)`; only
        the pathwise gradient through :math:`z_k` reaches φ (``None`` unless requested).
    :ivar sample_path: the handle that rescales the gradient along each reparameterized
        sample path (:meth:`MultiSampleELBO.scale_sample_path`; ``None`` unless requested).
    :ivar score: :math:`\sum_s \log q_\phi(z_{k,s})` over the guide sites that are not
        reparameterized (the score-function term), or ``None`` when every site is pathwise.
    :ivar scale: the subsample scale :math:`N / B` of the enclosing plates (1 without
        subsampling).
    :ivar nonreparam_sites: names of the guide sites that need a score-function term.
    :ivar nested_shape: per (model, guide) trace pair, the weights' shape laid out like the
        sites' batch dims (size 1 for plates that do not enclose every site).
    """

    log_w: torch.Tensor
    log_w_stop: torch.Tensor | None
    sample_path: SamplePathScale | None
    score: torch.Tensor | None
    scale: float
    nonreparam_sites: tuple[str, ...]
    nested_shape: tuple[tuple[int, ...], ...] = ()

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]


class SamplePathScale:
    r"""Rescales, per particle and data point, the gradient that flows along the sample path.

    Before the model is replayed, :meth:`attach` replaces each reparameterized guide value
    :math:`z_k` by an alias :math:`z'_k` (same value): the model and the stopped guide density
    see the alias, the guide's own later computations keep :math:`z_k`. Once the weights are
    known, :meth:`MultiSampleELBO.scale_sample_path` stores a scale :math:`c_k`, and
    backpropagation multiplies the gradient arriving at every alias by :math:`c_k`. A
    surrogate :math:`\sum_k \tilde w_k \log w_k(\theta, z'_k)` thus sends
    :math:`\tilde w_k\nabla_\theta \log w_k` to θ and :math:`\tilde w_k c_k` times the
    pathwise derivative to φ, from one model pass (the tensor-hook form of DReG; Tucker et al.
    2018). Both steps are autograd functions, so :func:`torch.jit.trace` records them and a
    traced loss rescales too.
    """

    def __init__(self) -> None:
        #: per trace: the nested shape of its weights (see :class:`_Reducer`)
        self.shapes: list[tuple[int, ...]] = []
        self._scale: torch.Tensor | None = None
        self._traces = 0

    def new_trace(self) -> None:
        """Start the aliases of the next (model, guide) trace pair."""
        self._traces += 1

    def attach(self, value: torch.Tensor, event_dim: int) -> torch.Tensor:
        """The alias of a sample value through which the scaled gradient flows."""
        return _ScaledPath.apply(value, self, self._traces - 1, event_dim)

    def store(self, scale: torch.Tensor) -> None:
        """Keep a ``(K, *plates)`` scale (as is: no tensor op may run in a traced forward)."""
        self._scale = scale

    def scale_for(self, grad: torch.Tensor, trace: int, event_dim: int) -> torch.Tensor:
        """The stored scale of ``trace``, shaped to broadcast against ``grad``."""
        rows = self._scale.shape[0] // len(self.shapes)
        scale = self._scale.detach()[trace * rows : (trace + 1) * rows]
        scale = scale.reshape(self.shapes[trace])
        batch_dim = grad.dim() - event_dim
        while scale.dim() > batch_dim and scale.shape[0] == 1:
            scale = scale[0]
        if scale.dim() > batch_dim:
            raise RuntimeError(
                f"a sample value of batch shape {tuple(grad.shape[:batch_dim])} lacks the "
                f"particle or plate dims of the weights {tuple(scale.shape)}"
            )
        return scale.reshape(scale.shape + (1,) * event_dim)


class _ScaledPath(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the handle's stored scale."""

    @staticmethod
    def forward(ctx, value, handle, trace, event_dim):
        ctx.handle, ctx.trace, ctx.event_dim = handle, trace, event_dim
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.handle.scale_for(grad, ctx.trace, ctx.event_dim), None, None, None


class _StoreScale(torch.autograd.Function):
    """Identity on ``x`` whose forward stores ``scale`` in the handle (a trace keeps the op)."""

    @staticmethod
    def forward(ctx, x, scale, handle):
        handle.store(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _sample_sites(trace: Trace) -> list[tuple[str, dict]]:
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def _plate_frames(site: dict) -> set:
    return {f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE}


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and frame.full_size != frame.size


class _Reducer:
    """Sums site tensors over every dim but the particle dim and the enclosing plates' dims."""

    def __init__(self, sites: list[tuple[str, dict]]):
        frames = [_plate_frames(site) for _, site in sites]
        common = set.intersection(*frames) if frames else set()
        for (name, _), site_frames in zip(sites, frames, strict=True):
            for frame in site_frames:
                if not _is_subsampled(frame):
                    continue
                if frame not in common:
                    outside = next(
                        n for (n, _), fs in zip(sites, frames, strict=True) if frame not in fs
                    )
                    raise ValueError(
                        f"plate {frame.name!r} is subsampled but does not enclose site "
                        f"{outside!r}: a multi-sample bound combines particles per data point "
                        "of a plate that encloses every site. Either move every site inside "
                        f"plate {frame.name!r} or do not subsample it (site {name!r} is in it)."
                    )
                if not frame.vectorized:
                    raise ValueError(
                        f"plate {frame.name!r} (around site {name!r}) is subsampled but "
                        "sequential; give it a dim= so particles can be combined per data point"
                    )
        common = sorted((f for f in common if f.vectorized), key=lambda f: f.dim)
        self.scale = float(math.prod(f.full_size / f.size for f in common if _is_subsampled(f)))
        self.keep, num_particles = {f.dim: f.size for f in common}, 1
        for frame in sites[0][1]["cond_indep_stack"] if sites else ():
            if frame.name == PARTICLE_PLATE:
                self.keep[frame.dim], num_particles = frame.size, frame.size
        dims = [-d for d in self.keep] + [_dim(site["log_prob"]) for _, site in sites]
        self.nest = max(dims + [0])
        self.full_shape = tuple(self.keep.get(d, 1) for d in range(-self.nest, 0))
        self.out_shape = (num_particles,) + tuple(f.size for f in common)

    def __call__(self, tensor: torch.Tensor | Number) -> torch.Tensor | Number:
        """Divide out the subsample scale and sum over the dims of non-enclosing plates."""
        if is_identically_zero(tensor):
            return 0.0
        if self.scale != 1.0:
            tensor = tensor / self.scale
        sum_dims = [d for d in range(-tensor.dim(), 0) if d not in self.keep]
        return tensor.sum(sum_dims, keepdim=True) if sum_dims else tensor

    def finish(self, total: torch.Tensor | Number, like: torch.Tensor) -> torch.Tensor:
        """Broadcast a sum of reduced terms to shape ``(K, *plates)``."""
        if not isinstance(total, torch.Tensor):
            total = like.new_full((), float(total))
        total = total.reshape((1,) * (self.nest - total.dim()) + tuple(total.shape))
        return total.expand(self.full_shape).reshape(self.out_shape)


def refuse_enumerated(guide_trace: Trace, estimator: str) -> None:
    """Raise on a guide site marked for enumeration: multi-sample bounds sample every latent.

    :raises ValueError: naming the site, ``TraceEnum_ELBO`` and how to sample it instead.
    """
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("enumerate"):
            raise ValueError(
                f"{estimator} samples every latent, but guide site {name!r} is marked for "
                f"enumeration (infer={{'enumerate': {site['infer']['enumerate']!r}}}); train it "
                "with pyro.infer.TraceEnum_ELBO, or drop the mark to sample it with a "
                "score-function gradient"
            )


def _dim(value) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def log_weights(
    model_trace: Trace,
    guide_trace: Trace,
    stop_guide: bool = False,
) -> LogWeights:
    """Per-particle, per-datapoint log importance weights of a (model, guide) trace pair.

    :param model_trace: the model replayed against ``guide_trace`` (log-probs computed).
    :param guide_trace: the guide trace (score parts computed), subsample sites pruned.
    :param stop_guide: also compute ``log_w_stop`` (guide densities with stopped parameters).
    :raises ValueError: on subsampling in a plate that does not enclose every site.
    """
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    reduce = _Reducer(model_sites + guide_sites)
    log_p = sum((reduce(site["log_prob"]) for _, site in model_sites), 0.0)
    log_q = log_q_stop = score = 0.0
    nonreparam = []
    for name, site in guide_sites:
        score_function = site["score_parts"].score_function
        log_q = log_q + reduce(site["log_prob"])
        if not is_identically_zero(score_function):
            nonreparam.append(name)
            score = score + reduce(score_function)
            if stop_guide:
                log_q_stop = log_q_stop + reduce(site["log_prob"])
        elif stop_guide:
            stopped = detach(site["fn"]).log_prob(site["value"], *site["args"], **site["kwargs"])
            stopped = scale_and_mask(stopped, site["scale"], site["mask"])
            log_q_stop = log_q_stop + reduce(stopped)
    like = next(site["log_prob"] for _, site in model_sites + guide_sites)
    log_w = reduce.finish(log_p - log_q, like)
    log_w_stop = reduce.finish(log_p - log_q_stop, like) if stop_guide else None
    return LogWeights(
        log_w=log_w,
        log_w_stop=log_w_stop,
        sample_path=None,
        score=None if not nonreparam else reduce.finish(score, like),
        scale=reduce.scale,
        nonreparam_sites=tuple(nonreparam),
        nested_shape=(reduce.full_shape,),
    )


class MultiSampleELBO(DerivedLossMixin, ELBO):
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

    :param num_particles: number of particles ``K`` (at least ``min_particles``).
    :param max_plate_nesting: bound on nested plates (guessed by a dry run when infinite).
    :param vectorize_particles: draw the particles in one vectorized pass (default).
    :param kwargs: other :class:`pyro.infer.ELBO` keyword arguments.
    :raises ValueError: on ``num_particles`` below ``min_particles``.
    """

    #: the smallest number of particles the estimator accepts
    min_particles = 1
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
        if isinstance(num_particles, bool) or not isinstance(num_particles, int | torch.Tensor):
            raise ValueError(f"num_particles must be an integer, got {num_particles!r}")
        if int(num_particles) < self.min_particles:
            raise ValueError(
                f"{type(self).__name__} needs num_particles >= {self.min_particles}, got "
                f"{num_particles}; pass num_particles={max(self.min_particles, 2)} or more"
            )
        super().__init__(
            num_particles=int(num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            **kwargs,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """Guide trace and the model replayed on it (sample values aliased when rescaling).

        Mirrors :func:`pyro.infer.enum.get_importance_trace`.
        """
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        refuse_enumerated(guide_trace, type(self).__name__)
        handle = self._sample_path
        if handle is not None:
            handle.new_trace()
            for site in guide_trace.nodes.values():
                if (
                    site["type"] == "sample"
                    and not site["is_observed"]
                    and not site_is_subsample(site)
                    and getattr(site["fn"], "has_rsample", False)
                ):
                    site["value"] = handle.attach(site["value"], site["fn"].event_dim)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        if is_validation_enabled():
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace

    def _get_log_weights(self, model, guide, args, kwargs) -> LogWeights:
        handle = self._sample_path = SamplePathScale() if self._rescale_sample_path else None
        try:
            parts = [
                log_weights(model_trace, guide_trace, self._stop_guide)
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
        weights = self._get_log_weights(model, guide, args, kwargs)
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
