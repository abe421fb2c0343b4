"""InfoVAE / MMD-VAE and WAE-MMD: an MMD between the minibatch's aggregate q(z) and p(z)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import pyro.poutine as poutine
import torch

from pyro_lvm.elbo.base import SurrogateELBO, require_reparameterized
from pyro_lvm.elbo.registry import register

__all__ = ["MMDELBO", "InfoVAE", "WAEMMD", "mmd"]

Kernel = Literal["rbf", "imq"]


def _kernel(a: torch.Tensor, b: torch.Tensor, kernel: Kernel, bandwidth: float) -> torch.Tensor:
    sq = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)  # cdist is slow on small inputs
    if kernel == "rbf":
        return torch.exp(-sq / (2 * bandwidth**2))
    c = 2 * a.shape[-1] * bandwidth**2
    return c / (c + sq)


def mmd(
    x: torch.Tensor, y: torch.Tensor, kernel: Kernel = "rbf", bandwidth: float | None = None
) -> torch.Tensor:
    r"""Unbiased U-statistic estimate of the squared MMD between the samples ``x`` and ``y``.

    .. math::

        \widehat{\mathrm{MMD}}^2 = \frac{1}{n(n-1)} \sum_{i \ne j} k(x_i, x_j)
        + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j) - \frac{2}{nm} \sum_{i,j} k(x_i, y_j)

    (Gretton et al. 2012, JMLR 13, eq. 3), with the Gaussian kernel
    ``k(a, b) = exp(−|a − b|² / 2h²)`` or the inverse multiquadratic kernel
    ``k(a, b) = C / (C + |a − b|²)``, C = 2 D h² (Tolstikhin et al. 2018, arXiv:1711.01558).

    :param x: ``(n, D)`` samples, n ≥ 2; leading batch dims give a batch of estimates.
    :param y: ``(m, D)`` samples, m ≥ 2 (batch dims broadcast with ``x``'s).
    :param kernel: ``"rbf"`` or ``"imq"``.
    :param bandwidth: h; by default √D (the scale of a standard normal's spread in D dims).
    """
    if x.dim() < 2 or y.dim() < 2 or x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"x and y must be (..., n, D) and (..., m, D) sample matrices, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    n, m = x.shape[-2], y.shape[-2]
    if n < 2 or m < 2:
        raise ValueError(f"the U-statistic needs at least 2 samples of each, got {n} and {m}")
    if kernel not in ("rbf", "imq"):
        raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
    h = math.sqrt(x.shape[-1]) if bandwidth is None else float(bandwidth)
    kxx, kyy, kxy = (_kernel(a, b, kernel, h) for a, b in ((x, x), (y, y), (x, y)))

    def off_diagonal_sum(k: torch.Tensor) -> torch.Tensor:
        return k.sum((-2, -1)) - k.diagonal(dim1=-2, dim2=-1).sum(-1)

    return (
        off_diagonal_sum(kxx) / (n * (n - 1))
        + off_diagonal_sum(kyy) / (m * (m - 1))
        - 2 * kxy.mean((-2, -1))
    )


class MMDELBO(SurrogateELBO):
    r"""Reconstruction + weighted KL + weighted MMD(aggregate q(z), p(z)); ELBO subclass.

    .. math::

        \mathcal J = \sum_i \bigl(-\mathbb E_q \log p(x_i \mid z)
        + w_{KL}\, \mathbb E_q[\log q(z \mid x_i) - \log p(z)]\bigr)
        + w_{MMD}\, N\, \widehat{\mathrm{MMD}}^2\bigl(\{z_i \sim q(z \mid x_i)\},
        \{z'_i \sim p(z)\}\bigr).

    Unlike :class:`pyro.infer.Trace_MMD`, which compares particles of one data point, the
    MMD here compares the minibatch's aggregate posterior q(z) = E_{p_D(x)} q(z | x) with the
    prior, the quantity InfoVAE and WAE penalize. All latent sites are concatenated per data
    point; prior samples come from running the model unconditioned on its latents (the joint
    prior of hierarchical models). N is the data plate's size, so the MMD sits on the same
    per-dataset scale as the summed log-likelihood. The loss returned is 𝒥 (an upper bound
    on −log p(x) only when w_KL = 1 and w_MMD = 0).

    :param kl_weight: w_KL ≥ 0.
    :param mmd_weight: w_MMD ≥ 0.
    :param kernel: ``"rbf"`` or ``"imq"``; see :func:`mmd`.
    :param bandwidth: kernel bandwidth h (default √D).
    """

    traits = replace(SurrogateELBO.traits, category="divergence", sites="reparam")

    def __init__(
        self,
        kl_weight: float = 1.0,
        mmd_weight: float = 1.0,
        kernel: Kernel = "rbf",
        bandwidth: float | None = None,
        **kwargs,
    ):
        for name, w in (("kl_weight", kl_weight), ("mmd_weight", mmd_weight)):
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"{name} must be a finite non-negative number, got {w}")
        if kernel not in ("rbf", "imq"):
            raise ValueError(f"kernel must be 'rbf' or 'imq', got {kernel!r}")
        super().__init__(**kwargs)
        self.kl_weight, self.mmd_weight = float(kl_weight), float(mmd_weight)
        self.kernel, self.bandwidth = kernel, bandwidth

    @staticmethod
    def _latents(trace, names: list[str]) -> torch.Tensor:
        """Latent values as ``(num_samples, D_total)``: batch dims flattened, events joined."""
        cols = []
        for name in names:
            site = trace.nodes[name]
            event = len(site["fn"].event_shape)
            value = site["value"]
            cols.append(value.reshape(*value.shape[: value.dim() - event], -1))
        batch = torch.broadcast_shapes(*(c.shape[:-1] for c in cols))
        return torch.cat([c.expand(*batch, c.shape[-1]) for c in cols], -1).reshape(
            -1, sum(c.shape[-1] for c in cols)
        )

    def _prepare(self, model, guide, args: tuple, kwargs: dict) -> None:
        self._call = (model, args, kwargs)

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        model, args, kwargs = self._call
        latents = [
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        ]
        if not latents:
            raise ValueError("the model has no latent sample site to compare with p(z)")
        term = 0.0
        for site in model_trace.nodes.values():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                term = term - site["log_prob_sum"]
            elif self.kl_weight:
                term = term - self.kl_weight * site["log_prob_sum"]
        require_reparameterized(guide_trace, type(self).__name__)
        for name in latents:
            site = guide_trace.nodes[name]
            if self.kl_weight:
                term = term + self.kl_weight * site["log_prob_sum"]
        if self.mmd_weight:
            with torch.no_grad(), poutine.block():
                prior_trace = poutine.trace(model).get_trace(*args, **kwargs)
            zq = self._latents(guide_trace, latents)
            zp = self._latents(prior_trace, latents)
            if zp.shape[0] < 2:
                raise ValueError(
                    f"the MMD compares the aggregate posterior with the prior over the data "
                    f"plate, but latent(s) {latents} have {zp.shape[0]} value per prior draw; "
                    "put them in a plate over at least 2 data points, or use 'elbo'"
                )
            # zq holds P particles x B points; the bound's terms are summed over particles
            # and divided by P by the base, so the penalty is counted P times here.
            num_particles = max(zq.shape[0] // zp.shape[0], 1)
            # the data plate's subsample scale, read at an observed site: a latent site's scale
            # also carries a KL weight (KLWeightedELBO), which must not reweigh the MMD
            observed = [
                site
                for site in model_trace.nodes.values()
                if site["type"] == "sample" and site["is_observed"]
            ]
            reference = observed[0] if observed else model_trace.nodes[latents[0]]
            scale = torch.as_tensor(reference["scale"]).mean()
            num_data = scale * zp.shape[0]
            penalty = mmd(zq, zp, self.kernel, self.bandwidth)
            term = term + self.mmd_weight * num_data * num_particles * penalty
        term = torch.as_tensor(term)
        return term.detach(), term


@register("mmd-vae", summary="InfoVAE: ELBO + λ MMD(aggregate q(z), p(z))")
class InfoVAE(MMDELBO):
    r"""InfoVAE (Zhao et al. 2017, arXiv:1706.02262, eq. 6) in its MMD form.

    .. math::

        \mathcal J = \mathbb E[-\log p(x \mid z)] + (1 - \alpha)\,\mathrm{KL}(q(z \mid x)
        \,\|\, p(z)) + (\alpha + \lambda - 1)\, \mathrm{MMD}(q(z), p(z)),

    i.e. :class:`MMDELBO` with ``kl_weight = 1 − α`` and ``mmd_weight = α + λ − 1``. The
    defaults α = 0, λ = 1000 (registered as ``"mmd-vae"``) keep the full KL and add a strong
    MMD term; α = 1 drops the KL (reconstruction + λ · MMD, the form WAE-MMD shares).
    The MMD is a minibatch-level quantity; it enters per data point, times N in total.

    :param alpha: α ≤ 1.
    :param lam: λ with α + λ ≥ 1.
    """

    def __init__(self, alpha: float = 0.0, lam: float = 1000.0, kernel: Kernel = "rbf", **kwargs):
        if alpha > 1 or alpha + lam < 1:
            raise ValueError(f"InfoVAE needs alpha <= 1 and alpha + lam >= 1, got {alpha}, {lam}")
        super().__init__(1.0 - alpha, alpha + lam - 1.0, kernel, **kwargs)
        self.alpha, self.lam = alpha, lam


@register(
    "wae-mmd",
    summary="WAE: reconstruction + λ MMD(aggregate q(z), p(z))",
)
class WAEMMD(MMDELBO):
    r"""Wasserstein autoencoder with the MMD penalty (Tolstikhin et al. 2018, arXiv:1711.01558).

    .. math::

        \mathcal J = \mathbb E[c(x, G(z))] + \lambda\, \mathrm{MMD}_k(q(z), p(z)),
        \qquad c = -\log p(x \mid z),\ k = \text{IMQ},

    i.e. :class:`MMDELBO` with ``kl_weight = 0``, ``mmd_weight = λ`` (paper: λ = 10 on MNIST).
    """

    def __init__(self, lam: float = 10.0, kernel: Kernel = "imq", **kwargs):
        super().__init__(0.0, lam, kernel, **kwargs)
        self.lam = lam
