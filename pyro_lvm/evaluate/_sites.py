"""Per-site, per-datapoint log-densities for annealed importance sampling (:mod:`.ais`).

AIS evaluates the model's sites one by one along its annealing path, not as importance
weights, so it reads a site's log-density per (chain, data point) here; the multi-sample
bounds and the IS log-likelihood use :mod:`pyro_lvm.elbo.log_weights` instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro import poutine


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be a positive integer (or None), got {value}")


def _guess_max_plate_nesting(model: Callable, guide: Callable, x, idx) -> int:
    """Deepest plate nesting of one unvectorized (guide, replayed model) pass, RNG untouched."""
    with torch.random.fork_rng(devices=[]), poutine.block():
        guide_trace = poutine.trace(guide).get_trace(x, idx)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, idx)
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
