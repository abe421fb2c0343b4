"""Filtering variational objectives (FIVO): SMC bounds on log p(x_{1:T}) as a Pyro ELBO."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.util import warn_if_nan

from pyro_lvm.elbo.base import Estimator
from pyro_lvm.elbo.iwae import IWAE
from pyro_lvm.elbo.multisample import PARTICLE_PLATE, log_weights
from pyro_lvm.elbo.registry import register
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.elbo.traits import EstimatorTraits
from pyro_lvm.sequential import SequentialProgram, check_sequences, is_sequential

__all__ = ["FIVO", "RESAMPLING", "SMCResult", "effective_sample_size", "resample"]

RESAMPLING = ("multinomial", "systematic", "none")


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    r"""ESS :math:`(\sum_k w_k)^2 / \sum_k w_k^2` per column of ``log_w`` (shape ``(K, N)``)."""
    return (2 * log_w.logsumexp(0) - (2 * log_w).logsumexp(0)).exp()


def resample(log_w: torch.Tensor, method: str = "multinomial") -> torch.Tensor:
    r"""Ancestor indices ``a`` of shape ``(K, N)``: column n resamples the K particles of n.

    ``"multinomial"`` draws :math:`a_k \sim \mathrm{Categorical}(\bar w)` independently;
    ``"systematic"`` uses one uniform per column, :math:`a_k = F^{-1}((k + u) / K)` with
    :math:`F` the cumulative normalized weights (Kitagawa 1996). Both are unbiased: the
    expected number of copies of particle k is :math:`K \bar w_k`.

    :param log_w: unnormalized log weights ``(K, N)`` (no gradient is taken).
    :param method: ``"multinomial"`` or ``"systematic"``.
    """
    k, n = log_w.shape
    probs = torch.softmax(log_w.detach(), dim=0).T  # (N, K)
    if method == "multinomial":
        return torch.multinomial(probs, k, replacement=True).T
    if method == "systematic":
        cdf = probs.cumsum(-1)
        cdf = torch.cat([cdf[:, :-1], torch.ones_like(cdf[:, -1:])], dim=-1)
        u = (torch.rand(n, 1, dtype=probs.dtype, device=probs.device) + torch.arange(k)) / k
        return torch.searchsorted(cdf, u).clamp(max=k - 1).T
    raise ValueError(f"resampling must be 'multinomial' or 'systematic', got {method!r}")


def _reindex(state: dict, ancestors: torch.Tensor) -> None:
    """Replace every state tensor of leading shape ``(K, N)`` by its resampled copy."""
    k, n = ancestors.shape
    for key, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[:2] == (k, n):
            index = ancestors.reshape(k, n, *[1] * (value.dim() - 2)).expand_as(value)
            state[key] = value.gather(0, index)


@dataclass
class SMCResult:
    """What one SMC sweep returns (all per sequence, for the current batch).

    :ivar log_z: :math:`\\log \\hat Z` per sequence, shape ``(N,)`` (differentiable).
    :ivar scale: the data plate's subsample scale N/B.
    :ivar ess: effective sample size before each resampling decision, ``(T, N)``.
    :ivar resampled: whether sequence n resampled after step t, ``(T, N)`` bool.
    """

    log_z: torch.Tensor
    scale: float
    ess: torch.Tensor
    resampled: torch.Tensor


@register(
    "fivo",
    summary="filtering variational objective: SMC over time steps (Maddison et al. 2017)",
)
@register(
    "sequence-iwae",
    resampling="none",
    summary="the IWAE bound over whole sequences: FIVO without resampling",
)
class FIVO(Estimator, ELBO):
    r"""The filtering variational objective: log of an SMC estimate of :math:`p(x_{1:T})`.

    For a step-wise model and guide (the :class:`~pyro_lvm.models.SequentialProgram`
    convention) run K particles per sequence; at step t each particle draws
    :math:`z_t^k \sim q(z_t \mid z_{t-1}^k, x)` and gets the incremental weight
    :math:`\alpha_t^k = p(z_t^k, x_t \mid z_{t-1}^k) / q(z_t^k \mid z_{t-1}^k, x)`. When the
    ESS of a sequence's accumulated weights falls below ``ess_threshold · K`` its particles
    are resampled (ancestor indices re-index every ``(K, N, ...)`` tensor in the model's and
    the guide's ``state``) and the weights reset. The bound is

    .. math::

        \mathcal L_{\mathrm{FIVO}} = \mathbb E\Big[\log \prod_{j} \frac1K \sum_{k=1}^K
        w_{j}^k\Big] \le \log p(x_{1:T}),

    the product over the resampling epochs j (the last ends at T), with :math:`w_j^k` the
    product of the epoch's incremental weights (Maddison et al. 2017, arXiv:1705.09279;
    Le et al. 2018, AESMC, arXiv:1705.10306; Naesseth et al. 2018, VSMC, arXiv:1705.11140).
    :math:`\hat Z` is unbiased for :math:`p(x)` under either resampling scheme.

    **Gradient.** The surrogate is :math:`\log \hat Z` itself with the ancestor indices
    treated as constants: reparameterized paths through every sample and through the
    weights are kept, the score-function terms of the resampling steps,
    :math:`\sum_t \nabla \log P(a_t \mid w_t)\,\log\hat Z`, are dropped, as in Maddison et
    al. (their high variance outweighs their small bias). The gradient is therefore biased
    whenever resampling happens; without resampling (``resampling="none"``, or an ESS that
    never falls below the threshold) it is the unbiased reparameterized gradient of the
    sequence IWAE bound, of which this estimator is then an exact copy draw for draw.

    ``loss(model, guide, x, idx=None, mask=None)`` takes sequences ``x`` of shape
    ``(N, T, ...)`` with time along dim 1 and calls ``step(state, x[:, t], t, idx)``;
    ``mask`` (bool, ``(N, T)``, ``True`` on real steps, e.g. ``arange(T) < lengths[:, None]``)
    wraps each step in ``poutine.mask``, so padded steps add nothing to any weight.
    Particles and sequences are vectorized (one batched pass per step, the particle plate
    left of the data plate); the only Python loop is over time. A model and guide without
    ``init``/``step`` are treated as one step, which makes FIVO equal to the IWAE bound.

    .. warning:: Guide sites must be reparameterized; states must hold per-particle tensors
        with the particles first (shape ``(K, N, ...)``), everything else is not resampled.

    :param num_particles: K ≥ 1.
    :param resampling: ``"multinomial"``, ``"systematic"`` or ``"none"`` (sequence IWAE).
    :param ess_threshold: resample when ESS < threshold · K (in (0, 1]; 1 resamples at
        nearly every step).
    :param max_plate_nesting: plates inside each step (1: the data plate).
    :param kwargs: other :class:`pyro.infer.ELBO` arguments; particles are always vectorized.
    """

    #: whether to resample is decided in Python from the weights at every step, which a
    #: captured graph would freeze (:mod:`pyro_lvm.capture`): FastSVI and ``optimize_local``
    #: run this loss eagerly. Guide sites of a whole-program model are handled as IWAE
    #: handles them; a step-wise one needs reparameterized sites.
    traits = EstimatorTraits(category="bound", capturable=False, gradient="smc")

    # the registry calls this at import time, before mutmut's trampolines exist
    # pragma: no mutate start
    @classmethod
    def configured_traits(cls, resampling: str = "multinomial", **config: Any) -> EstimatorTraits:
        """Without resampling the gradient is the unbiased pathwise one of the sequence IWAE
        bound; with resampling its terms are dropped (``"smc"``, biased)."""
        return replace(cls.traits, gradient="reparam" if resampling == "none" else "smc")

    # pragma: no mutate end

    def __init__(
        self,
        num_particles: int = 4,
        resampling: str = "multinomial",
        ess_threshold: float = 0.5,
        max_plate_nesting: float = 1,
        vectorize_particles: bool = True,
        **kwargs,
    ):
        if resampling not in RESAMPLING:
            raise ValueError(f"resampling must be one of {RESAMPLING}, got {resampling!r}")
        if not 0 < ess_threshold <= 1:
            raise ValueError(f"ess_threshold must lie in (0, 1], got {ess_threshold}")
        if not vectorize_particles:
            raise ValueError("FIVO always vectorizes its particles; drop vectorize_particles")
        if not math.isfinite(max_plate_nesting):
            max_plate_nesting = 1
        self.traits = self.configured_traits(resampling=resampling)
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            **kwargs,
        )
        self.resampling, self.ess_threshold = resampling, float(ess_threshold)
        # Pyro's ELBO counts the particle plate in max_plate_nesting; the steps' own plates:
        self._step_nesting = int(max_plate_nesting)
        # a whole-program model is one step: its SMC bound is the IWAE bound, so it runs on
        # the multi-sample engine (any plate nesting, every site kind, the empty model)
        self._whole_program = IWAE(num_particles=self.num_particles)

    def __repr__(self) -> str:
        return (
            f"FIVO(num_particles={self.num_particles}, resampling={self.resampling!r}, "
            f"ess_threshold={self.ess_threshold})"
        )

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("FIVO traces one time step at a time; see FIVO.smc")

    # -- one step ------------------------------------------------------------------------
    def _weights(self, model, guide, args, kwargs=None):
        """Incremental log weights ``(K, N)`` and the subsample scale of one (guide, model) pass."""
        kwargs = kwargs or {}
        k, nesting = self.num_particles, self._step_nesting

        def vectorized(fn):  # the particle plate inside replay, as in Pyro's vectorized ELBOs
            def run(*args, **kwargs):
                with _particles(k, nesting):
                    return fn(*args, **kwargs)

            return run

        model_trace, guide_trace = importance_traces(
            vectorized(model),
            vectorized(guide),
            args,
            kwargs,
            nesting + 1,
            strict=True,
            enumerated="refuse",
        )
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise ValueError(
                    f"FIVO needs a reparameterized guide, but site {name!r} is not "
                    "(its distribution has no rsample); use a continuous guide or an "
                    "estimator with score-function gradients (vimco)"
                )
        weights = log_weights(model_trace, guide_trace)
        return weights.log_w.reshape(self.num_particles, -1), weights.scale

    # -- the sweep -----------------------------------------------------------------------
    def smc(self, model, guide, x, idx=None, mask=None) -> SMCResult:
        """Run one SMC sweep over the batch of sequences ``x``; see :class:`SMCResult`."""
        model = model.obj if isinstance(model, SequentialProgram) else model
        guide = guide.obj if isinstance(guide, SequentialProgram) else guide
        if not (is_sequential(model) and is_sequential(guide)):
            raise ValueError(
                "FIVO.smc needs a step-wise model and guide (init/step methods) for both; "
                f"got {type(model).__name__} and {type(guide).__name__}"
            )
        mask = check_sequences(x, mask)
        k, num_steps = self.num_particles, x.shape[1]
        model_state: dict = {}
        guide_state: dict = {}
        with _particles(k, self._step_nesting):
            guide.init(guide_state, x, idx)
            model.init(model_state, x, idx)
        log_w = log_z = 0.0
        ess, resampled = [], []
        scale = 1.0
        for t in range(num_steps):
            masked = nullcontext() if mask is None else poutine.mask(mask=mask[:, t])

            def guide_step(t=t, masked=masked):
                with masked:
                    return guide.step(guide_state, x[:, t], t, idx)

            def model_step(t=t, masked=masked):
                with masked:
                    return model.step(model_state, x[:, t], t, idx)

            increment, scale = self._weights(model_step, guide_step, ())
            log_w = log_w + increment
            ess_t = effective_sample_size(log_w.detach())
            do = ess_t < self.ess_threshold * k
            if self.resampling == "none" or t == num_steps - 1:
                do = torch.zeros_like(do)
            ess.append(ess_t)
            resampled.append(do)
            if do.any():
                ancestors = resample(log_w, self.resampling)
                keep = torch.arange(k, device=ancestors.device).unsqueeze(-1)
                ancestors = torch.where(do, ancestors, keep)
                epoch = log_w.logsumexp(0) - math.log(k)
                log_z = log_z + torch.where(do, epoch, torch.zeros_like(epoch))
                log_w = torch.where(do, torch.zeros_like(log_w), log_w)
                _reindex(model_state, ancestors)
                _reindex(guide_state, ancestors)
        log_z = log_z + log_w.logsumexp(0) - math.log(k)
        return SMCResult(log_z, scale, torch.stack(ess), torch.stack(resampled))

    def log_marginal(self, model, guide, *args, **kwargs) -> tuple[torch.Tensor, float]:
        """Per-datapoint :math:`\\log \\hat Z` (shape ``(N,)``) and the subsample scale."""
        if is_sequential(model) or isinstance(model, SequentialProgram):
            x, idx, mask = _parse(args, kwargs)
            result = self.smc(model, guide, x, idx, mask)
            return result.log_z, result.scale
        if is_sequential(guide) or isinstance(guide, SequentialProgram):
            raise ValueError("FIVO got a step-wise guide for a whole-program model; wrap both")
        log_w, scale = self._weights(model, guide, args, kwargs)
        return log_w.logsumexp(0) - math.log(self.num_particles), scale

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """:math:`-\\frac{N}{B} \\sum_i \\log \\hat Z_i` (the primary method)."""
        if not (is_sequential(model) or isinstance(model, SequentialProgram)):
            if is_sequential(guide) or isinstance(guide, SequentialProgram):
                raise ValueError("FIVO got a step-wise guide for a whole-program model; wrap both")
            return self._whole_program.differentiable_loss(model, guide, *args, **kwargs)
        log_z, scale = self.log_marginal(model, guide, *args, **kwargs)
        loss = -scale * log_z.sum()
        warn_if_nan(loss, "loss")
        return loss


def _particles(num_particles: int, max_plate_nesting: float) -> pyro.plate:
    """The vectorized particle plate, left of the ``max_plate_nesting`` plates of a step."""
    return pyro.plate(PARTICLE_PLATE, num_particles, dim=-(int(max_plate_nesting) + 1))


def _parse(args: tuple, kwargs: dict):
    names = ("x", "idx", "mask")
    if len(args) > len(names) or set(kwargs) - set(names) or not (args or "x" in kwargs):
        raise ValueError(
            "FIVO.loss takes (model, guide, x, idx=None, mask=None); got "
            f"{len(args)} positional arguments and keywords {sorted(kwargs)}"
        )
    values = dict(zip(names, args, strict=False)) | kwargs
    return values["x"], values.get("idx"), values.get("mask")
