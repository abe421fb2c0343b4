"""Priors p(z) for latent variable models: modules whose ``forward()`` returns a distribution."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from pyro_lvm.distributions import DiagonalNormalMixture, StandardNormal

__all__ = ["MixtureOfGaussiansPrior", "StandardNormalPrior", "VampPrior"]


class StandardNormalPrior(PyroModule):
    """p(z) = N(0, I): the VAE's default prior, an event of size ``z_dim``, batch shape ()."""

    def __init__(self, z_dim: int):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be positive, got {z_dim}")
        self.z_dim = z_dim
        self.register_buffer("_zeros", torch.zeros(z_dim))

    def forward(self) -> dist.Distribution:
        return StandardNormal(self._zeros, torch.ones_like(self._zeros)).to_event(1)


class MixtureOfGaussiansPrior(PyroModule):
    r"""A learned mixture of K diagonal Gaussians, p(z) = Σ_k π_k N(z; μ_k, diag σ_k²).

    .. math::

        \log p(z) = \operatorname{logsumexp}_k \bigl(\log \pi_k
        + \log \mathcal N(z; \mu_k, \mathrm{diag}\,\sigma_k^2)\bigr),
        \quad \pi = \mathrm{softmax}(a), \ \sigma = \mathrm{softplus}(\rho) + \sigma_{\min}.

    A flexible prior lets the aggregate posterior settle where it wants (Dilokthanakul et al.
    2016, arXiv:1611.02648; Tomczak & Welling 2018, arXiv:1705.07120, section 3).

    :param z_dim: latent dimension D.
    :param num_components: number of components K.
    :param init_scale: spread of the random initial means.
    :param min_scale: σ_min, keeps components from collapsing.
    """

    def __init__(
        self, z_dim: int, num_components: int = 10, init_scale: float = 1.0, min_scale: float = 1e-3
    ):
        super().__init__()
        if z_dim < 1 or num_components < 1:
            raise ValueError(
                f"z_dim and num_components must be positive, got {z_dim} and {num_components}"
            )
        self.z_dim, self.num_components, self.min_scale = z_dim, num_components, min_scale
        self.logits = torch.nn.Parameter(torch.zeros(num_components))
        self.locs = torch.nn.Parameter(init_scale * torch.randn(num_components, z_dim))
        inv_softplus_one = math.log(math.expm1(1.0 - min_scale))
        self.raw_scales = torch.nn.Parameter(torch.full((num_components, z_dim), inv_softplus_one))

    def forward(self) -> dist.Distribution:
        scales = F.softplus(self.raw_scales) + self.min_scale
        return DiagonalNormalMixture(self.logits, self.locs, scales)


class VampPrior(PyroModule):
    r"""The VampPrior: a uniform mixture of the encoder's posteriors at K learned pseudo-inputs.

    .. math::

        p_\lambda(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k),

    the variational mixture of posteriors prior of Tomczak & Welling (2018,
    arXiv:1705.07120), which approximates the optimal prior (the aggregate posterior) and
    couples prior and encoder. The encoder is *referenced*, not owned: its parameters belong
    to the guide (``VAE(prior=VampPrior(guide.posterior, ...), guide=guide)``).

    .. warning:: ``posterior(u)`` must return a distribution with batch shape ``(K,)`` and
        event shape ``(D,)`` that can score any value (a diagonal Gaussian guide does; a
        flow posterior, which scores only its own samples, does not).

    :param posterior: the encoder's q(z | x) as a function of a batch of inputs, e.g.
        ``guide.posterior``.
    :param x_dim: data dimension (size of a pseudo-input).
    :param num_pseudo: number of pseudo-inputs K.
    :param init: optional ``(K, x_dim)`` initial pseudo-inputs (e.g. random training points);
        by default N(0.5, 0.01²) as in the paper's binary-data experiments.
    :param pseudo_input_range: ``(low, high)`` clips the pseudo-inputs to the data's range
        before they reach the encoder, u_k = clamp(w_k, low, high), as the paper's Hardtanh(0, 1)
        does for binary images; ``None`` (default) leaves them unconstrained. Unlike Hardtanh,
        the clamp passes the gradient *at* the bounds, so pseudo-inputs initialized at training
        images (pixels exactly 0 or 1) can still move inward; one pushed past a bound stops
        there. ``init`` must lie within the range.
    """

    def __init__(
        self,
        posterior: Callable[[torch.Tensor], dist.Distribution],
        x_dim: int,
        num_pseudo: int = 500,
        init: torch.Tensor | None = None,
        pseudo_input_range: tuple[float, float] | None = None,
    ):
        super().__init__()
        if not callable(posterior) or isinstance(posterior, torch.nn.Module):
            raise ValueError(
                "posterior must be the encoder's q(z | x) method (e.g. guide.posterior), not a "
                "module: the VampPrior references the encoder without owning its parameters"
            )
        if init is None:
            if x_dim < 1 or num_pseudo < 1:
                raise ValueError(
                    f"x_dim and num_pseudo must be positive, got {x_dim} and {num_pseudo}"
                )
            init = 0.5 + 0.01 * torch.randn(num_pseudo, x_dim)
        if init.dim() != 2 or init.shape[-1] != x_dim:
            raise ValueError(f"init must have shape (num_pseudo, {x_dim}), got {tuple(init.shape)}")
        if pseudo_input_range is not None:
            low, high = (float(v) for v in pseudo_input_range)
            if not low < high:
                raise ValueError(f"pseudo_input_range needs low < high, got ({low}, {high})")
            if init.min().item() < low or init.max().item() > high:
                raise ValueError(
                    f"init lies in [{init.min().item():.3g}, {init.max().item():.3g}], outside "
                    f"pseudo_input_range ({low}, {high}), where the clamp would pass no gradient; "
                    "rescale init into the range"
                )
            pseudo_input_range = (low, high)
        object.__setattr__(self, "_posterior", posterior)
        self.x_dim, self.num_pseudo = x_dim, init.shape[0]
        self.pseudo_input_range = pseudo_input_range
        self.pseudo_inputs = torch.nn.Parameter(init.detach().clone())

    @property
    def inputs(self) -> torch.Tensor:
        """The pseudo-inputs u_1..u_K the encoder sees: ``pseudo_inputs`` clipped to the range."""
        if self.pseudo_input_range is None:
            return self.pseudo_inputs
        return self.pseudo_inputs.clamp(*self.pseudo_input_range)

    def forward(self) -> dist.Distribution:
        components = self._posterior(self.inputs)
        if tuple(components.batch_shape) != (self.num_pseudo,) or len(components.event_shape) != 1:
            raise ValueError(
                f"posterior(pseudo_inputs) must have batch shape ({self.num_pseudo},) and event "
                f"shape (D,); got {tuple(components.batch_shape)} and "
                f"{tuple(components.event_shape)}"
            )
        logits = torch.zeros(self.num_pseudo, dtype=self.pseudo_inputs.dtype)
        if _is_diagonal_normal(components):
            # the usual encoder: score with matrix products, not a (N, K, D) broadcast
            base = components.base_dist
            return DiagonalNormalMixture(logits, base.loc, base.scale)
        return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


def _is_diagonal_normal(d: dist.Distribution) -> bool:
    return (
        isinstance(d, dist.Independent)
        and isinstance(d.base_dist, torch.distributions.Normal)
        and d.reinterpreted_batch_ndims == 1
        and d.base_dist.loc.dim() == 2
        and d.base_dist.loc.shape == d.base_dist.scale.shape
    )
