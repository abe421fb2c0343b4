"""The log-weight engine: per-particle, per-datapoint log importance weights of a trace pair.

One home for the plates that enclose every site and the subsample scale divided out before
the particles are combined (the model/guide check is
:func:`pyro_lvm.validation.check_site_match`): used by every multi-sample bound
(:class:`~pyro_lvm.elbo.multisample.MultiSampleELBO`) and by :mod:`pyro_lvm.evaluate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Number

import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

from pyro_lvm.elbo.base import PARTICLE_PLATE, stopped_log_prob

__all__ = ["ALIAS", "LogWeights", "SamplePathScale", "log_weights"]

#: key of a guide site holding the alias of its value that the model saw (DReG)
ALIAS = "_pyro_lvm_path_alias"


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
    :ivar log_q: :math:`\log q_\phi(z_k)`, the proposal's log-density alone (what annealing
        from the guide or the prior needs, :mod:`pyro_lvm.evaluate.ais`).
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
    log_q: torch.Tensor | None = field(default=None, repr=False)
    reducer: _Reducer | None = field(default=None, repr=False)
    #: the (model, guide) trace pairs the weights come from
    traces: tuple[tuple[Trace, Trace], ...] = field(default=(), repr=False)

    @property
    def num_particles(self) -> int:
        return self.log_w.shape[0]

    def per_datapoint(self, site: dict, value: torch.Tensor) -> torch.Tensor:
        """A tensor of ``site``'s batch shape (a log-density, a KL) as ``(K, *plates)``:
        masked, summed over the other plates, the subsample scale left out."""
        value = scale_and_mask(value, site["scale"], site["mask"])
        return self.reducer.finish(self.reducer(value), self.log_w)

    def per_row(self, rows: int, term: torch.Tensor | None = None) -> torch.Tensor:
        """``log_w`` (or a ``term`` of its shape) as ``(K, rows)``: the outermost plate
        enclosing every site must have one entry per data row; inner plates are summed.

        :raises ValueError: naming the sites outside such a plate (a global latent).
        """
        log_w = self.log_w
        if log_w.dim() < 2 or log_w.shape[1] != rows:
            outside = sorted(
                name
                for name, fs in self.reducer.site_frames.items()
                if not any(f.size == rows for f in fs)
            )
            raise ValueError(
                f"sample site(s) {outside} are outside the data plate (no plate of size {rows}, "
                "the rows of x, encloses them), so they have no per-datapoint log-probability "
                "(a global latent couples all data points); put every site inside "
                "pyro_lvm.plates.data_plate or make it a parameter for evaluation"
            )
        term = log_w if term is None else term
        return term.reshape(log_w.shape[0], rows, -1).sum(-1)

    def per_datapoint_scaled(self, site: dict) -> torch.Tensor:
        """The site's (scaled) ``log_prob`` as ``(K, *plates)``, scale divided out."""
        return self.reducer.finish(self.reducer(site["log_prob"]), self.log_w)


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
    2018). Both steps are autograd functions, so :mod:`pyro_lvm.capture` records their
    backward too and a captured loss rescales as well.
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
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic")
    ]


def _plate_frames(site: dict) -> set:
    return {f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE}


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and frame.full_size != frame.size


class _Reducer:
    """Sums site tensors over every dim but the particle dim and the enclosing plates' dims."""

    def __init__(self, sites: list[tuple[str, dict]]):
        frames = [_plate_frames(site) for _, site in sites]
        #: site name -> the plates around it (particles excluded)
        self.site_frames = {name: fs for (name, _), fs in zip(sites, frames, strict=True)}
        common = set.intersection(*frames) if frames else set()
        for (name, _), site_frames in zip(sites, frames, strict=True):
            for frame in site_frames:
                if not _is_subsampled(frame):
                    continue
                if not frame.vectorized:
                    raise ValueError(
                        f"plate {frame.name!r} (around site {name!r}) is subsampled and "
                        "sequential (iterated in Python): a multi-sample bound combines particles "
                        "per data point of a vectorized plate. Use `with pyro.plate(...)` (give "
                        "it a dim=) instead of iterating over it, or do not subsample it"
                    )
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


def _dim(value) -> int:
    return value.dim() if isinstance(value, torch.Tensor) else 0


def log_weights(
    model_trace: Trace,
    guide_trace: Trace,
    stop_guide: bool = False,
    estimator: str = "this estimator",
) -> LogWeights:
    """Per-particle, per-datapoint log importance weights of a (model, guide) trace pair.

    :param model_trace: the model replayed against ``guide_trace`` (log-probs computed).
    :param guide_trace: the guide trace (score parts computed), subsample sites pruned.
    :param stop_guide: also compute ``log_w_stop`` (guide densities with stopped parameters).
    :param estimator: the caller's name, for error messages.
    :raises ValueError: on subsampling in a plate that does not enclose every site, or a
        guide density that cannot be rescored with stopped parameters.
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
            # Pyro leaves the score function unscaled and unmasked (ScoreParts.scale_and_mask):
            # scale and mask it as the log-density is, so that the reducer's division by the
            # subsample scale leaves it unscaled like every other per-datapoint term
            score = score + reduce(scale_and_mask(score_function, site["scale"], site["mask"]))
            if stop_guide:
                log_q_stop = log_q_stop + reduce(site["log_prob"])
        elif stop_guide:
            stopped = stopped_log_prob(site, estimator, site.get(ALIAS))
            log_q_stop = log_q_stop + reduce(stopped)
    # an empty model and guide: log w = 0 for every particle (the bound is 0, as Trace_ELBO's)
    like = next((site["log_prob"] for _, site in model_sites + guide_sites), torch.zeros(()))
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
        log_q=reduce.finish(log_q, like),
        reducer=reduce,
        traces=((model_trace, guide_trace),),
    )
