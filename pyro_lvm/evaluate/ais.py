"""Annealed importance sampling for log p(x), and its reverse on simulated data (BDMC)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_lvm.elbo.base import PARTICLE_PLATE
from pyro_lvm.elbo.log_weights import log_weights
from pyro_lvm.elbo.multisample import _chunks, guess_max_plate_nesting
from pyro_lvm.elbo.traces import importance_traces
from pyro_lvm.hmc import hmc_transition
from pyro_lvm.validation import check_positive, check_rows

__all__ = [
    "AISResult",
    "BDMCResult",
    "ais_log_likelihood",
    "ais_summary",
    "bdmc_summary",
    "annealing_schedule",
    "bdmc",
]


def annealing_schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0):
    r"""Inverse temperatures :math:`0 = \beta_0 < \dots < \beta_M = 1`, shape ``(M + 1,)``.

    ``"linear"`` spaces them evenly; ``"sigmoid"`` (Grosse et al. 2015) uses
    :math:`\tilde\beta_m = \sigma(\delta(2m/M - 1))` rescaled to [0, 1], denser at both ends.
    """
    check_positive(num_steps=num_steps)
    grid = torch.linspace(0, 1, int(num_steps) + 1, dtype=torch.float64)
    if kind == "linear":
        return grid
    if kind != "sigmoid":
        raise ValueError(f"schedule must be 'linear' or 'sigmoid', got {kind!r}")
    s = torch.sigmoid(sharpness * (2 * grid - 1))
    return (s - s[0]) / (s[-1] - s[0])


@dataclass
class AISResult:
    """Per-datapoint AIS output.

    :ivar log_likelihood: :math:`\\log \\frac1S \\sum_s w_s`, shape ``(N,)``.
    :ivar log_weights: per-chain log weights, shape ``(S, N)``.
    :ivar acceptance: mean Metropolis acceptance per data point, ``(N,)``.
    :ivar step_size: final (adapted) HMC step size per data point, ``(N,)``.
    """

    log_likelihood: torch.Tensor
    log_weights: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor


@dataclass
class BDMCResult:
    """A bidirectional Monte Carlo sandwich on simulated data (Grosse et al. 2015).

    :ivar x: the simulated data, shape of the template.
    :ivar lower: forward AIS, a stochastic lower bound on log p(x), ``(N,)``.
    :ivar upper: reverse AIS from the exact posterior sample, a stochastic upper bound.
    """

    x: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        """``upper - lower`` per data point: bounds the error of either estimate."""
        return self.upper - self.lower


class _Annealer:
    """The geometric path log f_β = log p₀(z) + β [log p(x, z) − log p₀(z)], on one chunk.

    Both terms come from the log-weight engine (:func:`~pyro_lvm.elbo.log_weights`) with the
    chains as its particles and p₀ as its proposal: the guide, or the model's own latent sites
    (the prior); ``log_q`` is log p₀ and ``log_w`` the log ratio, per (chain, data point).
    """

    def __init__(self, model, guide, x, idx, num_chains, nesting):
        self.model, self.guide, self.x, self.idx = model, guide, x, idx
        self.num_chains, self.nesting = num_chains, nesting
        self.latents: list[str] = []

    def _chains(self, fn):
        def run(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, self.num_chains, dim=-(self.nesting + 1)):
                return fn(*args, **kwargs)

        return run

    def _trace(self, fn, values: dict | None = None):
        if values is not None:
            fn = poutine.condition(fn, data=values)
        trace = poutine.trace(self._chains(fn)).get_trace(self.x, self.idx)
        return prune_subsample_sites(trace)

    def initial(self) -> dict[str, torch.Tensor]:
        """z₀ ~ p₀: the prior (the model's latent sites) or the guide. A guide's draw is the
        pair that the estimators build and check (:func:`~pyro_lvm.elbo.traces.importance_traces`,
        strict): the structure is static, so later conditioned pairs are not checked again."""
        with poutine.block(), torch.no_grad():
            if self.guide is None:
                trace = self._trace(self.model)
            else:
                _, trace = importance_traces(
                    self._chains(self.model),
                    self._chains(self.guide),
                    (self.x, self.idx),
                    {},
                    self.nesting + 1,
                    strict=True,
                    enumerated="allow",
                )
        z = {
            name: site["value"].detach()
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        }
        self.latents = list(z)
        return z

    def parts(self, values: dict) -> dict[str, torch.Tensor]:
        """log p₀, the log ratio ℓ = log p(x, z) − log p₀ and both gradients, at ``values``."""
        with torch.enable_grad(), poutine.block():
            leaves = {k: v.detach().requires_grad_() for k, v in values.items()}
            model_trace = self._trace(self.model, leaves)
            if self.guide is None:  # the prior: the model's latent sites are the proposal
                proposal = model_trace.copy()
                for name, site in model_trace.nodes.items():
                    if site["type"] == "sample" and name not in leaves:
                        proposal.remove_node(name)
            else:
                proposal = self._trace(self.guide, leaves)
            model_trace.compute_log_prob()
            proposal.compute_score_parts()
            weights = log_weights(model_trace, proposal, estimator="AIS")
            rows = self.x.shape[0]
            base, ratio = weights.per_row(rows, weights.log_q), weights.per_row(rows)
            names = list(leaves)
            g_base = torch.autograd.grad(base.sum(), list(leaves.values()), retain_graph=True)
            g_ratio = torch.autograd.grad(ratio.sum(), list(leaves.values()))
        out = {"base": base.detach(), "ratio": ratio.detach()}
        out.update({f"g_base/{k}": g for k, g in zip(names, g_base, strict=True)})
        out.update({f"g_ratio/{k}": g for k, g in zip(names, g_ratio, strict=True)})
        return out

    def potential(self, beta: float) -> Callable:
        """``values -> (U_β, ∇U_β, parts)`` for the HMC kernel."""

        def fn(values):
            parts = self.parts(values)
            return self._energy(parts, beta) + (parts,)

        return fn

    def _energy(self, parts: dict, beta: float):
        u = -(parts["base"] + beta * parts["ratio"])
        grad = {k: -(parts[f"g_base/{k}"] + beta * parts[f"g_ratio/{k}"]) for k in self.latents}
        return u, grad


def _anneal(annealer, z, betas, step_size, num_leapfrog, adapt, target_accept):
    """Run the transitions at betas[1:-1] and accumulate Σ (β_m − β_{m−1}) ℓ(z_{m−1})."""
    parts = annealer.parts(z)
    log_w = torch.zeros_like(parts["ratio"])
    eps = step_size.clone()
    accepted = torch.zeros_like(eps)
    for m in range(1, len(betas)):
        log_w = log_w + (betas[m] - betas[m - 1]) * parts["ratio"]
        if m == len(betas) - 1:
            break
        beta = float(betas[m])
        u, grad = annealer._energy(parts, beta)
        z, _, _, parts, prob = hmc_transition(
            z, u, grad, parts, annealer.potential(beta), eps, num_leapfrog
        )
        rate = prob.mean(0)
        accepted = accepted + rate
        if adapt:
            eps = eps * torch.exp(0.5 * (rate - target_accept))
    return log_w, accepted / max(len(betas) - 2, 1), eps


def ais_log_likelihood(
    model: Callable,
    x: torch.Tensor,
    guide: Callable | None = None,
    num_steps: int = 500,
    num_chains: int = 16,
    num_leapfrog: int = 10,
    step_size: float = 0.1,
    adapt_step_size: bool = True,
    target_accept: float = 0.65,
    schedule: str = "sigmoid",
    data_chunk: int | None = 1000,
    idx: torch.Tensor | None = None,
    return_result: bool = False,
) -> torch.Tensor | AISResult:
    r"""Annealed importance sampling estimate of log p(x_i) per data point (Neal 2001).

    Anneal from :math:`p_0` (the prior, or the guide q(z | x) when given) to the posterior
    along the geometric path :math:`f_\beta(z) = p_0(z)^{1 - \beta} p(x, z)^\beta`,
    :math:`0 = \beta_0 < \dots < \beta_M = 1` (:func:`annealing_schedule`), with one HMC
    transition (``num_leapfrog`` leapfrog steps, :func:`pyro_lvm.hmc.hmc_transition`)
    leaving each :math:`f_{\beta_m}` invariant. Each chain's weight

    .. math::

        \log w = \sum_{m=1}^{M} (\beta_m - \beta_{m-1})
        \big[\log p(x, z_{m-1}) - \log p_0(z_{m-1})\big]

    is unbiased for p(x), so :math:`\log \frac1S \sum_s w_s` is a stochastic lower bound
    (Wu et al. 2017, arXiv:1611.04273, for decoder-based models). The step size is adapted
    per data point towards ``target_accept`` after each transition (ε ← ε exp(½(a − a*)),
    from the chains' mean acceptance), which makes the transitions depend on the run; the
    bias this adds was not measurable in the tests (see :func:`bdmc`).

    Chains and data points are vectorized (a chain plate left of the data plate, as in
    :func:`~pyro_lvm.evaluate.log_likelihood`); ``data_chunk`` rows run at a time; the
    only Python loop is over the M temperatures. Runs without parameter gradients.

    :param model: ``model(x, idx=None)`` with continuous latents in its data plate (the plate
        enclosing every site, one entry per row of x), read by the log-weight engine.
    :param x: data, points along dim 0.
    :param guide: optional q(z | x) as the starting distribution (must be reparameterizable
        so that its density can be rescored).
    :param num_steps: M, the number of intermediate distributions.
    :param num_chains: S chains per data point.
    :param num_leapfrog: leapfrog steps per transition.
    :param step_size: initial ε.
    :param adapt_step_size: adapt ε per data point.
    :param target_accept: a* in (0, 1).
    :param schedule: ``"sigmoid"`` or ``"linear"``.
    :param data_chunk: rows per chunk; all rows when ``None``.
    :param idx: optional dataset indices of the rows (per-datapoint guides).
    :param return_result: return an :class:`AISResult` instead of the ``(N,)`` tensor.
    """
    check_positive(num_chains=num_chains, num_leapfrog=num_leapfrog, data_chunk=data_chunk)
    if not (step_size > 0 and math.isfinite(step_size)) or not 0 < target_accept < 1:
        raise ValueError(
            f"need step_size > 0 and 0 < target_accept < 1, got {step_size}, {target_accept}"
        )
    betas = annealing_schedule(num_steps, schedule)
    results = []
    for rows, annealer in _chunked(model, guide, x, idx, num_chains, data_chunk):
        z = annealer.initial()
        eps = x.new_full((x[rows].shape[0],), float(step_size))
        log_w, acc, eps = _anneal(
            annealer, z, betas, eps, num_leapfrog, adapt_step_size, target_accept
        )
        results.append((log_w, acc, eps))
    log_w = torch.cat([r[0] for r in results], dim=1)
    out = AISResult(
        log_likelihood=log_w.logsumexp(0) - math.log(num_chains),
        log_weights=log_w,
        acceptance=torch.cat([r[1] for r in results]),
        step_size=torch.cat([r[2] for r in results]),
    )
    return out if return_result else out.log_likelihood


def _chunked(model, guide, x, idx, num_chains, data_chunk):
    check_rows(x)
    first = next(_chunks(x.shape[0], data_chunk))
    nesting = guess_max_plate_nesting(
        model, guide if guide is not None else model, x[first], None if idx is None else idx[first]
    )
    for rows in _chunks(x.shape[0], data_chunk):
        ic = None if idx is None else idx[rows]
        yield rows, _Annealer(model, guide, x[rows], ic, num_chains, nesting)


def bdmc(
    model: Callable,
    x_template: torch.Tensor,
    num_steps: int = 500,
    num_chains: int = 16,
    guide: Callable | None = None,
    **kwargs,
) -> BDMCResult:
    r"""Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015, arXiv:1511.02543).

    Simulate :math:`(z^*, x) \sim p(z) p(x \mid z)` (the model run with its observed site
    unconditioned, one draw per row of ``x_template``), then run forward AIS on ``x``
    (:func:`ais_log_likelihood`: a stochastic lower bound) and reverse AIS from
    :math:`z^*`, an exact posterior sample, down to :math:`p_0`:

    .. math::

        \log w_{\mathrm{rev}} = \sum_{m=M}^{1} (\beta_{m-1} - \beta_m)\,\ell(z_m),
        \qquad \mathbb E[w_{\mathrm{rev}}] = 1 / p(x),

    so :math:`-\log \frac1S \sum_s w_{\mathrm{rev},s}` is a stochastic upper bound. The
    sandwich closes as M grows; its width bounds the error of AIS on data like ``x``.
    Keyword arguments are those of :func:`ais_log_likelihood` (except ``data_chunk``: one
    chunk).
    """
    with torch.no_grad(), poutine.block():
        template = poutine.trace(model).get_trace(x_template)
        names = [n for n, s in template.nodes.items() if s["type"] == "sample" and s["is_observed"]]
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x_template)
    observed = [trace.nodes[n] for n in names]
    if len(observed) != 1 or observed[0]["value"].shape != x_template.shape:
        raise ValueError(
            "bdmc simulates data from a model with exactly one observed site shaped like "
            f"x_template {tuple(x_template.shape)}; found {names}"
        )
    x = observed[0]["value"].detach()
    truth = {
        name: site["value"].detach()
        for name, site in prune_subsample_sites(trace).nodes.items()
        if site["type"] == "sample" and name not in names
    }
    lower = ais_log_likelihood(
        model, x, guide=guide, num_steps=num_steps, num_chains=num_chains, data_chunk=None,
        **kwargs,
    )  # fmt: skip
    step_size = kwargs.get("step_size", 0.1)
    betas = annealing_schedule(num_steps, kwargs.get("schedule", "sigmoid")).flip(0)
    _, annealer = next(_chunked(model, guide, x, None, num_chains, None))
    annealer.latents = list(truth)
    z = {k: v.expand(num_chains, *v.shape).clone() for k, v in truth.items()}
    eps = x.new_full((x.shape[0],), float(step_size))
    log_w, _, _ = _anneal(
        annealer, z, betas, eps, kwargs.get("num_leapfrog", 10),
        kwargs.get("adapt_step_size", True), kwargs.get("target_accept", 0.65),
    )  # fmt: skip
    upper = -(log_w.logsumexp(0) - math.log(num_chains))
    return BDMCResult(x=x, lower=lower, upper=upper)


def ais_summary(
    model: Callable, x: torch.Tensor, num_steps: int, num_chains: int, **kwargs
) -> dict:
    """Mean AIS log-likelihood of ``x`` with its standard error and budget, as plain numbers.

    What ``pyro-lvm evaluate --method ais`` reports; ``kwargs`` go to
    :func:`ais_log_likelihood`.
    """
    start = time.perf_counter()
    result = ais_log_likelihood(
        model, x, num_steps=num_steps, num_chains=num_chains, return_result=True, **kwargs
    )
    values = result.log_likelihood
    return {
        "ais_log_likelihood": float(values.mean()),
        "ais_log_likelihood_stderr": float(values.std() / len(values) ** 0.5)
        if len(values) > 1
        else 0.0,
        "ais_steps": int(num_steps),
        "ais_chains": int(num_chains),
        "ais_acceptance": float(result.acceptance.mean()),
        "ais_seconds": time.perf_counter() - start,
        "method": "ais",
        "num_points": len(x),
    }


def bdmc_summary(
    model: Callable, x: torch.Tensor, num_steps: int, num_chains: int, **kwargs
) -> dict:
    """The BDMC sandwich on data simulated from ``model`` (shaped like ``x``), as plain
    numbers: what ``pyro-lvm evaluate --method bdmc`` reports; ``kwargs`` go to :func:`bdmc`.

    The mean gap ``upper - lower`` bounds the error of the AIS estimate on data of this model
    (Grosse et al. 2015); the data points are simulated, so ``x`` gives their shape only.
    """
    start = time.perf_counter()
    result = bdmc(model, x, num_steps=num_steps, num_chains=num_chains, **kwargs)
    n = len(result.lower)

    def se(values: torch.Tensor) -> float:
        return float(values.std() / n**0.5) if n > 1 else 0.0

    return {
        "bdmc_lower": float(result.lower.mean()),
        "bdmc_lower_stderr": se(result.lower),
        "bdmc_upper": float(result.upper.mean()),
        "bdmc_upper_stderr": se(result.upper),
        "bdmc_gap": float(result.gap.mean()),
        "ais_steps": int(num_steps),
        "ais_chains": int(num_chains),
        "bdmc_seconds": time.perf_counter() - start,
        "method": "bdmc",
        "num_points": n,
    }
