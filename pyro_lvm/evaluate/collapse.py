"""Posterior-collapse diagnostics: active units, KL per dimension, I(x; z), rate-distortion."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

__all__ = [
    "ActiveUnits",
    "RateDistortion",
    "active_units",
    "kl_per_dimension",
    "mutual_information",
    "rate_distortion",
]

Posterior = Callable[[torch.Tensor], dist.Distribution]


@dataclass
class ActiveUnits:
    """Result of :func:`active_units`: the count, the per-unit activity, the mask."""

    num_active: int
    activity: torch.Tensor
    active: torch.Tensor
    threshold: float


@dataclass
class RateDistortion:
    """Per-data-point rate R = E KL(q(z|x) ‖ p(z)) and distortion D = −E log p(x|z), in nats,
    with their standard errors; −(R + D) is the ELBO."""

    rate: float
    distortion: float
    rate_se: float
    distortion_se: float

    @property
    def elbo(self) -> float:
        return -(self.rate + self.distortion)


def _posterior_mean(q: dist.Distribution, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E_q[z] per data point and the variance of that estimate (zero when exact)."""
    try:
        mean = q.mean
        return mean, torch.zeros_like(mean)
    except (NotImplementedError, AttributeError):
        z = q.sample((num_samples,))
        return z.mean(0), z.var(0, unbiased=True) / num_samples


@torch.no_grad()
def active_units(
    posterior: Posterior, x: torch.Tensor, threshold: float = 0.01, num_samples: int = 256
) -> ActiveUnits:
    r"""Active units (Burda et al. 2016, arXiv:1509.00519, section 5.2).

    .. math:: A_u = \mathrm{Cov}_x\bigl(\mathbb E_{q(z \mid x)}[z_u]\bigr) > 0.01,

    the variance across data points of the posterior mean of unit u; an inactive unit's
    posterior does not depend on x (it has collapsed to the prior or to a constant). When q
    has no closed-form mean (flows), E_q[z_u] is a Monte Carlo average of S samples and the
    activity is corrected for its noise, Var_x(ẑ_u) − mean_x Var(ẑ_u), an unbiased estimate.

    :param posterior: x ↦ q(z | x) with event shape ``(D,)``, e.g. ``guide.posterior``.
    :param x: data, ``(N, x_dim)`` with N ≥ 2.
    :param threshold: the activity threshold (0.01 in the paper).
    :param num_samples: S, Monte Carlo samples for the mean when ``q.mean`` is unavailable.
    """
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 data points to measure a covariance, got {x.shape[0]}")
    means, noise = _posterior_mean(posterior(x), num_samples)
    n = means.shape[0]
    activity = means.reshape(n, -1).var(dim=0, unbiased=True) - noise.reshape(n, -1).mean(0)
    active = activity > threshold
    return ActiveUnits(int(active.sum()), activity, active, threshold)


def _factorized_normal(d: dist.Distribution, name: str) -> dist.Normal:
    base = d.base_dist if isinstance(d, dist.Independent) else d
    if not isinstance(base, dist.Normal):
        raise ValueError(
            f"kl_per_dimension needs a factorized Gaussian {name} (Normal(...).to_event(1)), got "
            f"{type(d).__name__}; use rate_distortion for the total KL of other families"
        )
    return base


@torch.no_grad()
def kl_per_dimension(
    posterior: Posterior, prior: dist.Distribution, x: torch.Tensor
) -> torch.Tensor:
    r"""Mean over the data of the analytic KL of each latent dimension, ``(D,)`` nats.

    .. math:: \mathrm{KL}_u = \frac1N \sum_i \mathrm{KL}\bigl(q(z_u \mid x_i) \,\|\, p(z_u)\bigr)

    Collapsed units have KL_u ≈ 0 (Sønderby et al. 2016, arXiv:1602.02282). Both q and p
    must be factorized Gaussians.

    :param posterior: x ↦ q(z | x).
    :param prior: p(z), e.g. ``vae.prior()``.
    :param x: data ``(N, x_dim)``.
    """
    q = _factorized_normal(posterior(x), "posterior")
    p = _factorized_normal(prior, "prior")
    return torch.distributions.kl_divergence(q, p).reshape(x.shape[0], -1).mean(0)


@torch.no_grad()
def mutual_information(posterior: Posterior, x: torch.Tensor) -> tuple[float, float]:
    r"""I(x; z) under the encoder's joint p_D(x) q(z | x), with its standard error.

    .. math::

        I_q(x; z) = \mathbb E_{x} \mathbb E_{q(z \mid x)}\bigl[\log q(z \mid x)
        - \log q(z)\bigr], \qquad q(z) \approx \frac1N \sum_{j=1}^N q(z \mid x_j),

    one z_i ~ q(z | x_i) per data point, the aggregate posterior q(z) estimated by the
    mixture over the batch (Hoffman & Johnson 2016, "ELBO surgery"; He et al. 2019,
    arXiv:1901.05534). The estimate is at most log N; use a large batch.

    :param posterior: x ↦ q(z | x) that can score any z (e.g. a Gaussian guide).
    :param x: data ``(N, x_dim)``.
    :returns: ``(estimate, standard_error)`` in nats.
    """
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 data points, got {n}")
    q = posterior(x)
    z = q.sample()  # (N, D)
    log_q_own = q.log_prob(z)  # (N,)
    shape = (n,) + (1,) * len(q.batch_shape) + tuple(q.event_shape)
    log_q_all = q.log_prob(z.reshape(shape))  # (N_z, N_x)
    log_q_agg = torch.logsumexp(log_q_all, dim=-1) - math.log(n)
    terms = log_q_own - log_q_agg
    return terms.mean().item(), (terms.std() / math.sqrt(n)).item()


@torch.no_grad()
def rate_distortion(model, guide, x: torch.Tensor, num_samples: int = 1) -> RateDistortion:
    r"""Rate and distortion of a model/guide pair on ``x`` (Alemi et al. 2018, arXiv:1711.00464).

    .. math::

        R = \mathbb E_{q(z \mid x)}[\log q(z \mid x) - \log p(z)], \qquad
        D = -\mathbb E_{q(z \mid x)}[\log p(x \mid z)],

    Monte Carlo over ``num_samples`` draws, averaged over data points (latent sites'
    densities make up R, observed sites' make up D), so any model/guide pair works,
    including hierarchical ones. Plot R against D across β with :func:`plot_rate_distortion`.
    """
    rates, dists = [], []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        rate = torch.zeros(x.shape[0], dtype=x.dtype)
        distortion = torch.zeros(x.shape[0], dtype=x.dtype)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            lp = site["unscaled_log_prob"]
            if lp.shape != (x.shape[0],):
                raise ValueError(
                    f"site {name!r} has log-density shape {tuple(lp.shape)}; rate_distortion "
                    "needs every site in the data plate with batch shape (N,)"
                )
            if site["is_observed"]:
                distortion = distortion - lp
            else:
                rate = rate + guide_trace.nodes[name]["unscaled_log_prob"] - lp
        rates.append(rate)
        dists.append(distortion)
    r, d = torch.stack(rates).mean(0), torch.stack(dists).mean(0)
    se = math.sqrt(x.shape[0])
    return RateDistortion(
        r.mean().item(), d.mean().item(), r.std().item() / se, d.std().item() / se
    )
