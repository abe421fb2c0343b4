"""The ELBO split into reconstruction and KL (rate) terms, per data point and per site."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample

from pyro_lvm.elbo.multisample import iter_importance_weights

__all__ = ["ELBODecomposition", "elbo_decomposition"]


@dataclass
class ELBODecomposition:
    r"""Per-datapoint terms of :math:`\mathrm{ELBO} = \mathrm{reconstruction} - \mathrm{KL}`.

    :ivar elbo: ELBO estimate per data point, shape ``(N,)``.
    :ivar reconstruction: :math:`\mathbb E_q[\log p(x \mid z)]` summed over observed sites.
    :ivar kl: :math:`\mathrm{KL}(q(z \mid x) \,\|\, p(z))` summed over latent sites.
    :ivar rate_bits: ``kl / ln 2``, the rate in bits (Alemi et al. 2018, arXiv:1711.00464).
    :ivar kl_per_site: each latent site's KL, shape ``(N,)``.
    :ivar kl_method: each latent site's KL method, ``"analytic"`` or ``"monte-carlo"``.
    """

    elbo: torch.Tensor
    reconstruction: torch.Tensor
    kl: torch.Tensor
    rate_bits: torch.Tensor
    kl_per_site: dict[str, torch.Tensor] = field(default_factory=dict)
    kl_method: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        """Means over data points: ``elbo``, ``reconstruction``, ``kl``, ``rate_bits``."""
        return {
            name: float(getattr(self, name).mean())
            for name in ("elbo", "reconstruction", "kl", "rate_bits")
        }


def _independent_priors(model: Callable, x: torch.Tensor, idx) -> set[str] | None:
    """Latent sites whose prior depends on no other latent site, or ``None`` if unknown."""
    try:
        with torch.random.fork_rng(devices=[]):
            deps = get_dependencies(model, (x, idx))["prior_dependencies"]
    except Exception:  # provenance tracking fails on some ops; fall back to Monte Carlo
        return None
    return {name for name, upstream in deps.items() if set(upstream) <= {name}}


@torch.no_grad()
def elbo_decomposition(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 1,
    sample_chunk: int | None = None,
    data_chunk: int | None = None,
    idx: torch.Tensor | None = None,
    analytic_kl: bool = True,
    max_plate_nesting: int | None = None,
) -> ELBODecomposition:
    r"""Split the per-datapoint ELBO into reconstruction and KL terms.

    .. math::

        \mathrm{ELBO}(x) = \underbrace{\mathbb E_{q(z \mid x)}[\log p(x \mid z)]}_{
        \text{reconstruction}} - \underbrace{\mathrm{KL}(q(z \mid x) \,\|\, p(z))}_{
        \text{rate}} = \log p(x) - \mathrm{KL}(q(z \mid x) \,\|\, p(z \mid x)),

    each expectation estimated with K = ``num_samples`` vectorized particles. A latent
    site's KL is analytic, ``torch.distributions.kl_divergence(q_site, p_site)``, when the
    pair is registered and the site's prior depends on no other latent (checked with
    :func:`pyro.infer.inspect.get_dependencies`); otherwise it is the Monte Carlo estimate
    :math:`\frac1K \sum_k \log q(z_k) - \log p(z_k)`. ``kl_method`` records which. The
    split follows Hoffman & Johnson (2016), "ELBO surgery", and Alemi et al. (2018),
    arXiv:1711.00464 (rate and distortion).

    :param model: a model ``model(x, idx=None)`` with its sites in its data plate.
    :param guide: the matching guide.
    :param x: data, points along dim 0.
    :param num_samples: K, particles for the expectations.
    :param sample_chunk: particles per vectorized trace (all at once when ``None``).
    :param data_chunk: rows per trace (all rows when ``None``).
    :param idx: optional dataset indices of the rows of ``x`` (for per-datapoint guides).
    :param analytic_kl: set ``False`` to force Monte Carlo KL for every site.
    :param max_plate_nesting: the model's plate nesting, guessed when ``None``.
    :raises ValueError: on a model/guide mismatch or a site outside the data plate.
    """
    n = x.shape[0] if torch.is_tensor(x) and x.dim() > 0 else 0
    analytic_sites: set[str] | None = set()
    if analytic_kl and n > 0:
        analytic_sites = _independent_priors(model, x[:1], None if idx is None else idx[:1])
    recon = None
    kl_sites: dict[str, torch.Tensor] = {}
    methods: dict[str, str] = {}
    for rows, weights in iter_importance_weights(
        model, guide, x, num_samples, sample_chunk, data_chunk, idx, max_plate_nesting
    ):
        if recon is None:
            recon = x.new_zeros(n)
        n_rows = rows.stop - rows.start
        ((model_trace, guide_trace),) = weights.traces
        for name, site in model_trace.nodes.items():
            if (
                site["type"] != "sample"
                or site_is_subsample(site)
                or site["infer"].get("_deterministic")
            ):
                continue
            log_p = weights.per_row(n_rows, weights.per_datapoint_scaled(site))
            if site["is_observed"]:
                recon[rows] += log_p.sum(0)
                continue
            guide_site = guide_trace.nodes[name]
            term = None
            if analytic_sites and name in analytic_sites and methods.get(name) != "monte-carlo":
                try:
                    kl_site = kl_divergence(guide_site["fn"], site["fn"])
                    term = weights.per_row(n_rows, weights.per_datapoint(site, kl_site))
                except NotImplementedError:  # pair not registered
                    term = None
            methods[name] = "monte-carlo" if term is None else "analytic"
            if term is None:
                log_q = weights.per_row(n_rows, weights.per_datapoint_scaled(guide_site))
                term = log_q - log_p
            kl_sites.setdefault(name, x.new_zeros(n))[rows] += term.sum(0)
    recon = recon / num_samples
    kl_sites = {name: value / num_samples for name, value in kl_sites.items()}
    kl = sum(kl_sites.values(), x.new_zeros(n))
    return ELBODecomposition(
        elbo=recon - kl,
        reconstruction=recon,
        kl=kl,
        rate_bits=kl / math.log(2.0),
        kl_per_site=kl_sites,
        kl_method=methods,
    )
