"""Distributions that Pyro lacks in the form latent variable models need them."""

from __future__ import annotations

import math

import torch
from pyro.distributions import Categorical, Normal, TorchDistribution
from torch.distributions import constraints

__all__ = ["DiagonalNormalMixture"]


class DiagonalNormalMixture(TorchDistribution):
    r"""A mixture of K diagonal Gaussians in D dimensions, scored with two matrix products.

    .. math::

        \log p(z) = \operatorname{logsumexp}_k \Bigl(\log \pi_k - \sum_d \log \sigma_{kd}
        - \tfrac D2 \log 2\pi - \tfrac12 \sum_d \frac{(z_d - \mu_{kd})^2}{\sigma_{kd}^2}\Bigr),

    with the Mahalanobis term expanded as
    :math:`(z^2) W^\top - 2 z (\mu \odot W)^\top + \sum_d \mu^2 \odot W`, where
    :math:`W = \sigma^{-2}`. For N values that is two ``(N, D) × (D, K)`` products instead of
    an ``(N, K, D)`` broadcast, which is what makes the VampPrior (K = 500 pseudo-inputs)
    affordable: ``MixtureSameFamily`` spends most of a training step, and nearly all of a
    K = 5000 importance-sampled evaluation, in elementwise ops on that broadcast. The expansion
    cancels terms of size μ²/σ², so it is computed in float64 whatever the input dtype and the
    result is cast back.

    The mixture has batch shape ``()`` (or the shape it was expanded to; every batch entry is
    the same mixture) and event shape ``(D,)``. Sampling picks a component, then draws from it;
    it is not reparameterized.

    :param logits: unnormalized log mixture weights ``(K,)``.
    :param loc: component means ``(K, D)``.
    :param scale: component standard deviations ``(K, D)``, positive.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        logits: torch.Tensor,
        loc: torch.Tensor,
        scale: torch.Tensor,
        batch_shape: torch.Size | tuple[int, ...] = (),
        validate_args: bool | None = None,
    ):
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(
                "DiagonalNormalMixture needs loc and scale of shape (K, D) and logits of shape "
                f"(K,); got loc {tuple(loc.shape)}, scale {tuple(scale.shape)}, logits "
                f"{tuple(logits.shape)}"
            )
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    @property
    def mixture_distribution(self) -> Categorical:
        """The component weights, as in ``MixtureSameFamily``."""
        return Categorical(logits=self.logits)

    @property
    def component_distribution(self):
        """The K components, batch shape ``(K,)``, as in ``MixtureSameFamily``."""
        return Normal(self.loc, self.scale).to_event(1)

    def expand(self, batch_shape, _instance=None) -> DiagonalNormalMixture:
        return DiagonalNormalMixture(
            self.logits, self.loc, self.scale, torch.Size(batch_shape), validate_args=False
        )

    @property
    def mean(self) -> torch.Tensor:
        weights = self.logits.softmax(-1).unsqueeze(-1)
        return (weights * self.loc).sum(0).expand(self.batch_shape + self.event_shape)

    @property
    def variance(self) -> torch.Tensor:
        weights = self.logits.softmax(-1).unsqueeze(-1)
        second = (weights * (self.scale.pow(2) + self.loc.pow(2))).sum(0)
        mean = (weights * self.loc).sum(0)
        return (second - mean.pow(2)).expand(self.batch_shape + self.event_shape)

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            k = Categorical(logits=self.logits).sample(shape[:-1])
            noise = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
            return self.loc[k] + self.scale[k] * noise

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        flat = value.reshape(-1, value.shape[-1]).double()
        precision = self.scale.double().pow(-2)  # (K, D)
        loc = self.loc.double()
        mahalanobis = (
            flat.pow(2) @ precision.T
            - 2 * flat @ (loc * precision).T
            + (loc.pow(2) * precision).sum(-1)
        ).clamp(min=0)  # (N, K); rounding can take a tiny distance below zero
        log_norm = -self.scale.double().log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        log_weights = self.logits.double().log_softmax(-1)
        log_p = torch.logsumexp(log_weights + log_norm - 0.5 * mahalanobis, dim=-1)
        log_p = log_p.to(value.dtype).reshape(value.shape[:-1])
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))
