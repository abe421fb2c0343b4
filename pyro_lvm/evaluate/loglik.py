"""Per-datapoint importance-sampled log-likelihood and ELBO for any model/guide pair."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import pyro
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_site_shape

from pyro_lvm.data.named import split_named

__all__ = ["elbo_estimate", "log_importance_weights", "log_likelihood"]

_PARTICLES = "_pyro_lvm_eval_particles"


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be a positive integer (or None), got {value}")


def _guess_max_plate_nesting(model: Callable, guide: Callable, x, idx, named=None) -> int:
    """Deepest plate nesting of one unvectorized (guide, replayed model) pass, RNG untouched."""
    named = named or {}
    with torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, idx, **named)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            x, idx, **named
        )
    dims = [
        -frame.dim
        for trace in (guide_trace, model_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=1)


def _data_dim(site: dict) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == "data":
            return frame.dim
    raise ValueError(
        f"sample site {site['name']!r} is outside the 'data' plate, so it has no per-datapoint "
        "log-probability (a global latent couples all data points); put the site inside "
        "pyro_lvm.data_plate or make it a parameter for evaluation"
    )


def _check_match(model_trace: Trace, guide_trace: Trace) -> None:
    """Raise a ValueError when the guide and the model disagree on the latent sites."""
    guide_latents = {
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    model_sample = {n for n, s in model_trace.nodes.items() if s["type"] == "sample"}
    model_latents = {n for n in model_sample if not model_trace.nodes[n]["is_observed"]}
    extra = sorted(guide_latents - model_sample)
    if extra:
        raise ValueError(
            f"model/guide mismatch: guide sample sites {extra} do not appear in the model; "
            "rename them to the model's latent sites or remove them from the guide"
        )
    missing = sorted(model_latents - guide_latents)
    if missing:
        raise ValueError(
            f"model/guide mismatch: unobserved model sites {missing} have no guide site; add "
            "them to the guide (enumerated discrete latents must be sampled by the guide, or "
            "marginalized inside the model, for importance sampling)"
        )


def _per_datapoint(
    site: dict, value: torch.Tensor, particle_dim: int, shape: torch.Size
) -> torch.Tensor:
    """Sum a per-site tensor with the site's batch shape (``log_prob``, KL) to ``(S, N)``.

    Dims other than the particle and data dims (inner plates) are summed; dims of size 1
    broadcast. Masks are applied, subsample scales are not.
    """
    data_dim = _data_dim(site)
    log_p = value
    if site["mask"] is not None:
        log_p = torch.where(torch.as_tensor(site["mask"]), log_p, log_p.new_zeros(()))
    ndim = -particle_dim
    log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + tuple(log_p.shape))
    inner = [d for d in range(1, ndim) if d != ndim + data_dim]
    if inner:
        log_p = log_p.sum(inner, keepdim=True)
    log_p = log_p.reshape(log_p.shape[0], log_p.shape[ndim + data_dim])
    return log_p.expand(shape)


def _site_log_prob(site: dict, particle_dim: int, shape: torch.Size) -> torch.Tensor:
    """The site's unscaled log-probability as an ``(S, N)`` tensor."""
    return _per_datapoint(site, site["unscaled_log_prob"], particle_dim, shape)


def _vectorized_traces(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    idx,
    num_particles: int,
    max_nesting: int,
    named: dict | None = None,
) -> tuple[Trace, Trace]:
    """Guide and replayed-model traces with ``num_particles`` particles in a plate at the left."""

    def wrap(fn):
        def vectorized(*args):
            with pyro.plate(_PARTICLES, num_particles, dim=-(max_nesting + 1)):
                return fn(*args, **(named or {}))

        return vectorized

    guide_trace = poutine.trace(wrap(guide)).get_trace(x, idx)
    guide_trace.detach_()
    model_trace = poutine.trace(poutine.replay(wrap(model), trace=guide_trace)).get_trace(x, idx)
    model_trace, guide_trace = (
        prune_subsample_sites(model_trace),
        prune_subsample_sites(guide_trace),
    )
    _check_match(model_trace, guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_nesting + 1)
    return model_trace, guide_trace


def _rows(named: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in named.items()}


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    size = n if size is None else int(size)
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _iter_traces(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    sample_chunk: int | None,
    data_chunk: int | None,
    idx: torch.Tensor | None,
) -> Iterator[tuple[slice, Trace, Trace, int, torch.Size]]:
    """Yield ``(rows, model_trace, guide_trace, particle_dim, (S, len(rows)))`` per chunk."""
    _check_positive(num_samples=num_samples, sample_chunk=sample_chunk, data_chunk=data_chunk)
    if not torch.is_tensor(x):  # named tensors {"x": x, ...}: the others become kwargs
        x, named = split_named(x, "x")
    else:
        named = {}
    if not torch.is_tensor(x) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(
            f"x must be a non-empty tensor with data points along dim 0, got {x!r:.80}"
        )
    if idx is not None and len(idx) != x.shape[0]:
        raise ValueError(f"idx must hold one index per row of x; got {len(idx)} for {x.shape[0]}")
    sample_chunk = num_samples if sample_chunk is None else min(int(sample_chunk), num_samples)
    first = next(_chunks(x.shape[0], data_chunk))
    max_nesting = _guess_max_plate_nesting(
        model, guide, x[first], None if idx is None else idx[first], _rows(named, first)
    )
    for rows in _chunks(x.shape[0], data_chunk):
        xc, ic = x[rows], None if idx is None else idx[rows]
        for start in range(0, num_samples, sample_chunk):
            s = min(sample_chunk, num_samples - start)
            model_trace, guide_trace = _vectorized_traces(
                model, guide, xc, ic, s, max_nesting, _rows(named, rows)
            )
            yield rows, model_trace, guide_trace, -(max_nesting + 1), torch.Size((s, xc.shape[0]))


def _iter_log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int,
    sample_chunk: int | None,
    data_chunk: int | None,
    idx: torch.Tensor | None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(rows, log_w)`` with ``log_w`` of shape ``(S, len(rows))`` chunk by chunk."""
    for rows, model_trace, guide_trace, particle_dim, shape in _iter_traces(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx
    ):
        log_w = split_named(x, "x")[0].new_zeros(shape)
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and not site["infer"].get("_deterministic"):
                log_w = log_w + _site_log_prob(site, particle_dim, shape)
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["is_observed"]:
                log_w = log_w - _site_log_prob(site, particle_dim, shape)
        yield rows, log_w


@torch.no_grad()
def log_importance_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 100,
    sample_chunk: int | None = None,
    data_chunk: int | None = None,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The per-datapoint log importance weights, shape ``(num_samples, N)``.

    .. math::

        \log w_k^{(i)} = \log p(x_i, z_k) - \log q(z_k \mid x_i),
        \qquad z_k \sim q(\cdot \mid x_i),

    summed over every latent and observed site of the model and every latent site of the
    guide, with unscaled log-probabilities. Particles are vectorized in a plate to the
    left of the model's plates, as in ``Trace_ELBO(vectorize_particles=True)``.

    :param model: a model ``model(x, idx=None)`` whose sites lie in the ``"data"`` plate.
    :param guide: the matching guide (same latent site names).
    :param x: data, points along dim 0; or named tensors ``{"x": x, "c": c, ...}`` whose
        entries other than ``"x"`` reach model and guide as keyword arguments.
    :param num_samples: K, importance samples per data point.
    :param sample_chunk: particles traced at once (memory bound); all at once when ``None``.
    :param data_chunk: rows of ``x`` traced at once; all rows when ``None``.
    :param idx: indices of the rows of ``x`` in the dataset, passed to the model and guide
        (per-datapoint guides need them); ``None`` passes ``idx=None``.
    :raises ValueError: on a model/guide mismatch, a latent without a guide site, a site
        outside the ``"data"`` plate, or a non-positive size.
    """
    x_t = split_named(x, "x")[0] if torch.is_tensor(x) or isinstance(x, Mapping) else None
    out = None if x_t is None else x_t.new_empty(num_samples, x_t.shape[0])
    counts: dict[int, int] = {}
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx
    ):
        k = counts.get(rows.start, 0)
        out[k : k + log_w.shape[0], rows] = log_w
        counts[rows.start] = k + log_w.shape[0]
    return out


@torch.no_grad()
def log_likelihood(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 1000,
    sample_chunk: int | None = 100,
    data_chunk: int | None = 1000,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Importance-sampled estimate of log p(x_i) for each data point, shape ``(N,)``.

    .. math::

        \widehat{\log p}(x_i) = \log \frac{1}{K} \sum_{k=1}^{K}
        \frac{p(x_i, z_k)}{q(z_k \mid x_i)}, \qquad z_k \sim q(\cdot \mid x_i).

    This is the IWAE bound :math:`\mathcal L_K` evaluated once: a stochastic lower bound in
    expectation, increasing in K and consistent as K → ∞ (Burda et al. 2016,
    arXiv:1509.00519); with q = p(z | x) every weight equals p(x) and the estimate is exact
    for any K. The sum over particles is a streaming ``logaddexp`` across chunks of
    ``sample_chunk`` particles, so K = 5000 fits in memory; ``data_chunk`` bounds the rows
    traced at once. Runs under ``torch.no_grad``.

    :param model: a model ``model(x, idx=None)`` with its sites in the ``"data"`` plate;
        latent sites may have any names and there may be several.
    :param guide: the proposal q(z | x), with a sample site for every model latent.
    :param x: data, points along dim 0; or named tensors ``{"x": x, "c": c, ...}`` whose
        entries other than ``"x"`` reach model and guide as keyword arguments.
    :param num_samples: K.
    :param sample_chunk: particles per vectorized trace.
    :param data_chunk: rows per trace (default 1000: with ``sample_chunk=100`` a binarized
        MNIST pass stays near 1 GiB whatever N and K); all rows at once when ``None``.
    :param idx: optional dataset indices of the rows of ``x`` (for per-datapoint guides).
    :raises ValueError: see :func:`log_importance_weights`.

    Example::

        model = LinearGaussian(5, 2)
        x = model.sample(100)
        log_likelihood(model, guide, x, num_samples=2000)  # ≈ model.log_evidence(x)
    """
    acc = None
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx
    ):
        if acc is None:
            n = split_named(x, "x")[0].shape[0]
            acc = torch.full((n,), -math.inf, dtype=log_w.dtype, device=log_w.device)
        acc[rows] = torch.logaddexp(acc[rows], log_w.logsumexp(0))
    return acc - math.log(num_samples)


@torch.no_grad()
def elbo_estimate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 100,
    sample_chunk: int | None = 100,
    data_chunk: int | None = 1000,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Monte Carlo ELBO for each data point with K samples, shape ``(N,)``.

    .. math::

        \widehat{\mathrm{ELBO}}(x_i) = \frac{1}{K} \sum_{k=1}^{K}
        \big[\log p(x_i, z_k) - \log q(z_k \mid x_i)\big], \qquad z_k \sim q(\cdot \mid x_i),

    an unbiased estimate of :math:`\log p(x_i) - \mathrm{KL}(q(z \mid x_i) \,\|\, p(z \mid
    x_i))` (Jordan et al. 1999; Kingma & Welling 2014, arXiv:1312.6114). Parameters as in
    :func:`log_likelihood`.
    """
    acc = None
    for rows, log_w in _iter_log_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx
    ):
        if acc is None:
            acc = torch.zeros(
                split_named(x, "x")[0].shape[0], dtype=log_w.dtype, device=log_w.device
            )
        acc[rows] += log_w.sum(0)
    return acc / num_samples
