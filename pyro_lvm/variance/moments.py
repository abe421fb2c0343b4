"""Gradient moments of a Pyro estimator: mean, variance, SNR, bias and cost per parameter group."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from tqdm import tqdm

from pyro_lvm.capture.policy import policy_for
from pyro_lvm.capture.record import NEEDS_TENSORS, input_key

__all__ = ["GradientMoments", "GroupMoments", "gradient_moments", "parameter_groups"]


@dataclass
class GroupMoments:
    r"""Moments of R gradient draws :math:`g_1, \dots, g_R \in \mathbb R^P` of one parameter group.

    :ivar mean: :math:`\bar g`, shape ``(P,)``.
    :ivar variance: :math:`\operatorname{tr}\widehat{\mathrm{Cov}}[g]`, the sum of the unbiased
        per-coordinate sample variances (the expected squared distance to the mean).
    :ivar snr: per-coordinate :math:`|\bar g_p| / \hat s_p`, shape ``(P,)``.
    :ivar bias: :math:`\|\bar g - g^\star\|` against a reference gradient, else ``None``.
    :ivar bias_se: standard error of the bias norm's components, :math:`\sqrt{\mathrm{tr}/R}`.
    """

    group: str
    num_params: int
    mean: torch.Tensor
    variance: float
    snr: torch.Tensor
    bias: float | None = None
    bias_se: float | None = None

    @property
    def snr_mean(self) -> float:
        """Average per-coordinate SNR (the summary of Rainforth et al. 2018, arXiv:1802.04537)."""
        return float(self.snr.mean())

    @property
    def snr_median(self) -> float:
        return float(self.snr.median())


@dataclass
class GradientMoments:
    """What :func:`gradient_moments` measured; :meth:`rows` flattens it into plain dicts.

    ``path`` is ``"traced"`` or ``"loop"`` (then ``reason`` says why);
    ``seconds_per_draw`` is the steady-state cost of draws 2..R, ``setup_seconds`` the rest.
    """

    estimator: str
    num_particles: int
    num_draws: int
    path: str
    seconds_per_draw: float
    groups: dict[str, GroupMoments]
    draws: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: why ``path`` is ``"loop"`` (``None`` on the traced path)
    reason: str | None = None
    #: one-off cost before the timed draws: the first (validated) draw, tracing, verification
    setup_seconds: float = 0.0

    def rows(self, **extra) -> list[dict]:
        """One plain dict per group: mean norm, variance, SNR, bias, seconds, variance × time."""
        out = []
        for name, g in self.groups.items():
            out.append(
                {
                    **extra,
                    "estimator": self.estimator,
                    "num_particles": self.num_particles,
                    "group": name,
                    "num_params": g.num_params,
                    "mean_norm": float(g.mean.norm()),
                    "variance": g.variance,
                    "snr_mean": g.snr_mean,
                    "snr_median": g.snr_median,
                    "bias": g.bias,
                    "bias_se": g.bias_se,
                    "seconds_per_draw": self.seconds_per_draw,
                    "work_normalized_variance": g.variance * self.seconds_per_draw,
                    "num_draws": self.num_draws,
                    "path": self.path,
                    "path_reason": self.reason,
                }
            )
        return out


def _param_sites(fn: Callable, args, kwargs) -> dict[str, torch.Tensor]:
    trace = poutine.trace(fn, param_only=True).get_trace(*args, **kwargs)
    return {name: site["value"].unconstrained() for name, site in trace.nodes.items()}


def parameter_groups(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, list[str]]:
    """Default groups: ``"guide"`` (the variational parameters λ) and ``"model"`` (θ).

    Parameters are found the way :class:`pyro.infer.SVI` finds them, from ``param`` sites
    recorded while running each program once; a parameter that both use counts as guide.
    """
    guide_names = list(_param_sites(guide, args, kwargs))
    model_names = [n for n in _param_sites(model, args, kwargs) if n not in guide_names]
    groups = {"guide": guide_names, "model": model_names}
    return {k: v for k, v in groups.items() if v}


def _loop_draw(estimator: ELBO, model, guide, names, params, args, kwargs) -> list[torch.Tensor]:
    """One gradient draw: ``differentiable_loss`` when the estimator has it, else
    ``loss_and_grads`` (e.g. ``TraceGraph_ELBO``) read from ``.grad``."""
    if callable(getattr(estimator, "differentiable_loss", None)):
        loss = estimator.differentiable_loss(model, guide, *args, **kwargs)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    else:
        for p in params:
            p.grad = None
        estimator.loss_and_grads(model, guide, *args, **kwargs)
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
    missing = [n for n, g in zip(names, grads, strict=True) if g is None]
    if missing:
        raise ValueError(
            f"parameters {missing} received no gradient: they are unused by the loss, or the "
            "param store holds stale tensors of an earlier module with the same names "
            "(call pyro.clear_param_store() before building the model and guide)"
        )
    return [g.detach() for g in grads]


def _compile(estimator: ELBO, model, guide, params, args, kwargs, rtol: float | None):
    """The verified graph of ``differentiable_loss`` and its gradient, from the estimator's
    capture policy (:func:`~pyro_lvm.capture.policy_for`: captured and verified as a
    dry run, cached per model, guide, parameters and input signature).

    Returns ``(draw, None)``, ``draw()`` giving one gradient draw, or ``(None, reason)``. The
    dry run restores the random state and the estimator's state, so the draws that follow are
    those of the plain loop. Other parameters of the param store (e.g. a baseline network) are
    inputs too; they get no gradient and stay unperturbed.
    """
    if kwargs:
        return None, NEEDS_TENSORS
    policy = policy_for(estimator)
    if rtol is not None and policy.rtol != rtol:  # another tolerance: graphs verified anew
        policy.rtol = rtol
        policy.entries.clear()
    ours = {id(p) for p in params}
    store = pyro.get_param_store().named_parameters()
    others = [(n, t) for n, t in store if t.requires_grad and id(t) not in ours]
    extra = [t for _, t in others]
    key = ("moments", id(model), id(guide), tuple(n for n, _ in others), input_key(args, {}))
    key = (*key, tuple(id(p) for p in params))

    def fn(*data):
        return estimator.differentiable_loss(model, guide, *data)

    keep = (model, guide, *params)
    if policy.prepare(key, fn, params, args, others=extra, keep=keep) is None:
        entry = policy.entries.get(key)
        return None, policy.reason or (entry.reason if entry is not None else None)
    return lambda: policy.run(key, params, extra, args)[1], None


def gradient_moments(
    estimator: ELBO,
    model: Callable,
    guide: Callable,
    *args,
    num_draws: int = 100,
    groups: Mapping[str, Sequence[str]] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    seed: int | None = None,
    name: str | None = None,
    keep_draws: bool = False,
    progress: bool = False,
    jit: bool = True,
    rtol: float | None = None,
    **kwargs,
) -> GradientMoments:
    r"""Draw R gradient estimates of ``estimator``'s loss and summarise them per parameter group.

    Each draw is :math:`g_r = \nabla_\phi \hat L_r` with fresh randomness. For every group
    (default: ``"guide"`` and ``"model"``, see :func:`parameter_groups`) the result holds

    .. math::

        \bar g = \frac1R\sum_r g_r,\quad
        V = \sum_p \frac{1}{R-1}\sum_r (g_{rp} - \bar g_p)^2,\quad
        \mathrm{SNR}_p = \frac{|\bar g_p|}{\sqrt{V_p}},\quad
        \text{bias} = \|\bar g - g^\star\|,

    the wall time per draw :math:`t` and the work-normalized variance :math:`V t`
    (Glynn & Whitt 1992; Mohamed et al. 2020, arXiv:1906.10652, section 9).

    **Draws.** Each draw is one call of ``differentiable_loss`` and one backward pass (or
    ``loss_and_grads`` for estimators without it, e.g. ``TraceGraph_ELBO``); the K particles
    inside a draw are vectorized by the estimator itself. The first draw runs with Pyro's
    validation as the caller set it, the others with validation off. Then, with ``jit``, the
    loss and its gradient are captured once by :mod:`pyro_lvm.capture` as a function of the
    parameters and the data (its random ops draw fresh noise at every call, from the same
    global generator and in the same order as the eager code) and verified against the
    eager loss and gradient under common random states, at perturbed and at the current
    parameters; a verified graph computes draws 2..R (``result.path == "traced"``), else
    the eager loop does (``"loop"``, with ``result.reason``). Capture restores the random
    state and the
    estimator's ``state_dict`` (where it has one), so both paths give the same draws under
    one seed, to rounding. An estimator whose Python-side state changes its gradient (a
    decaying-average baseline) fails the verification and keeps the loop.

    Not used: one vectorized pass over R replicas gives only the *sum* of the per-draw
    gradients, and separating them (one backward per draw through the whole batched graph,
    or ``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps R backward passes of
    that one graph) costs O(R^2); the per-draw variant measured ~40x slower than the loop.

    .. note:: Small models spend their time in per-op overhead. On a loaded CPU, ops that
        open an OpenMP/MKL parallel region (``tril``, ``solve_triangular``, ``log`` of the
        Gaussian guide) can wait milliseconds each for the other threads; there, calling
        ``torch.set_num_threads(1)`` in the script (not done here: it is the caller's
        setting) made 1000 draws ~20-50x faster (e.g. 1.4 s instead of 58 s for
        ``make_estimator("elbo", 10)`` on the 10-d LinearGaussian scenario).

    **Common random numbers.** With ``seed`` the RNG is reset first, so estimators that sample
    the same sites in the same order see the same noise, whichever path each takes.

    :param estimator: a ``pyro.infer.ELBO`` instance.
    :param model: model ``(x, idx=None)``; ``args``/``kwargs`` are passed to both programs.
    :param guide: guide with the same signature.
    :param num_draws: R, at least 2.
    :param groups: ``{group: [param names]}``; defaults to :func:`parameter_groups`.
    :param reference: ``{group: exact gradient}`` (flattened, in the order of the group's
        names) to report the bias against.
    :param name: label stored in the rows (defaults to the estimator's class name).
    :param keep_draws: keep the ``(R, P)`` draws per group in ``result.draws``.
    :param progress: show a tqdm progress bar.
    :param jit: try the verified captured loss; ``False`` forces the loop.
    :param rtol: relative tolerance of the verification (default
        :math:`0.01\sqrt{\epsilon}` of the dtype: 1.5e-10 in float64, 3.5e-6 in float32).

    Example::

        m = gradient_moments(make_estimator("elbo", 10), model, guide, x, num_draws=1000)
        m.groups["guide"].variance, m.groups["guide"].snr_mean
    """
    if int(num_draws) < 2:
        raise ValueError(f"num_draws must be at least 2 to estimate a variance, got {num_draws}")
    num_draws = int(num_draws)
    if rtol is not None and not rtol > 0:
        raise ValueError(f"rtol must be positive (or None for the default), got {rtol}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    if groups is None:
        groups = parameter_groups(model, guide, *args, **kwargs)
    sites = {**_param_sites(model, args, kwargs), **_param_sites(guide, args, kwargs)}
    for group, names in groups.items():
        missing = [n for n in names if n not in sites]
        if missing or not names:
            raise ValueError(
                f"group {group!r} names parameters {missing or names} that neither the model "
                f"nor the guide uses; known parameters: {sorted(sites)}"
            )
    order = [n for names in groups.values() for n in names]
    order = list(dict.fromkeys(order))
    params = [sites[n] for n in order]
    label = name or type(estimator).__name__
    start = time.perf_counter()
    chunks = [_loop_draw(estimator, model, guide, order, params, args, kwargs)]
    with pyro.validation_enabled(False):
        compiled, reason = None, "jit=False"
        if jit:
            compiled, reason = _compile(estimator, model, guide, params, args, kwargs, rtol)
        setup = time.perf_counter() - start
        start = time.perf_counter()
        bar = tqdm(range(num_draws - 1), disable=not progress, desc=label, leave=False)
        for _ in bar:
            if compiled is not None:
                chunks.append(compiled())
            else:
                chunks.append(_loop_draw(estimator, model, guide, order, params, args, kwargs))
        seconds = (time.perf_counter() - start) / (num_draws - 1)
    flat = {
        n: torch.stack([c[i] for c in chunks]).reshape(num_draws, -1) for i, n in enumerate(order)
    }

    out: dict[str, GroupMoments] = {}
    draws: dict[str, torch.Tensor] = {}
    for group, names in groups.items():
        g = torch.cat([flat[n] for n in names], dim=-1)
        mean, var = g.mean(0), g.var(0)
        snr = mean.abs() / var.sqrt().clamp_min(torch.finfo(var.dtype).tiny)
        moments = GroupMoments(group, g.shape[-1], mean, float(var.sum()), snr)
        if reference is not None and group in reference:
            ref = torch.as_tensor(reference[group], dtype=g.dtype).reshape(-1)
            if ref.shape != mean.shape:
                raise ValueError(
                    f"reference for group {group!r} has {ref.numel()} entries, the group has "
                    f"{mean.numel()}; flatten the exact gradient in the group's name order"
                )
            moments.bias = float((mean - ref).norm())
            moments.bias_se = math.sqrt(moments.variance / num_draws)
        out[group] = moments
        if keep_draws:
            draws[group] = g
    num_particles = int(getattr(estimator, "num_particles", 1))
    path = "loop" if compiled is None else "traced"
    return GradientMoments(
        label, num_particles, num_draws, path, seconds, out, draws, reason, setup
    )
