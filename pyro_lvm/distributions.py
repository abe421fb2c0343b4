"""Distributions that Pyro lacks in the form latent variable models need them."""

from __future__ import annotations

import math

import torch
from pyro.distributions import Categorical, Normal, TorchDistribution
from torch.distributions import constraints

__all__ = ["DiagonalNormalMixture", "PathwiseNormal", "StandardNormal"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class StandardNormal(Normal):
    r"""N(0, 1) scored as :math:`\log p(z) = -z^2/2 - \log\sqrt{2\pi}`.

    ``Normal(zeros, ones)`` with a log-density of two elementwise ops instead of the generic
    formula's seven (which square, divide by and take the log of the unit scale), fewer
    again in the backward pass; it matters in a traced K = 1 training step, where such
    small ops are a visible share of the time (benchmarks/RESULTS.md, section 2). Construct it
    as ``StandardNormal(zeros, ones)``; with validation on, ``log_prob`` checks that ``loc``
    is 0 and ``scale`` is 1. Everything else (sampling, KL divergences, ``expand``) is
    ``Normal``'s.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
            if not (bool((self.loc == 0).all()) and bool((self.scale == 1).all())):
                raise ValueError(
                    "StandardNormal needs loc = 0 and scale = 1; use pyro.distributions.Normal "
                    "for any other parameters"
                )
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        return (-0.5 * value.square() - _LOG_SQRT_2PI).expand(shape)


class PathwiseNormal(Normal):
    r"""A Normal whose reparameterized sample is scored through its own noise.

    ``rsample`` draws :math:`z = \mu + \sigma\varepsilon` with the same random numbers as
    ``Normal`` and remembers ε; ``log_prob`` of *that* tensor is then

    .. math:: \log q(z) = -\tfrac12 \varepsilon^2 - \log\sigma - \log\sqrt{2\pi},

    equal in value to Normal's :math:`-(z-\mu)^2 / 2\sigma^2 - \log\sigma - \log\sqrt{2\pi}`
    and in its total derivative with respect to (μ, σ) through the sample path, which is what
    a pathwise ELBO or IWAE gradient needs (the two terms of ∂/∂μ cancel exactly; those of
    ∂/∂σ leave :math:`-1/\sigma`). It costs three ops instead of seven, and the backward
    pass fewer again. Any other value, and a copy of the distribution (e.g.
    ``pyro.distributions.util.detach``, which STL and DReG use to score with stopped
    parameters: its remembered sample is a detached copy, never the live one), takes
    ``Normal``'s formula, so the partial derivative with respect to the sample is kept
    wherever an estimator asks for it.

    .. warning:: ``log_prob(z)`` of the remembered sample does not depend on z as a tensor:
        differentiating it with respect to z alone (with μ and σ held) gives zero. Estimators
        that need that partial must score a detached copy, as STL and DReG do.
    """

    def rsample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        # the draws of Normal.rsample (torch's _standard_normal is ``empty(shape).normal_()``)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        value = self.loc + eps * self.scale
        self._pathwise = (value, eps)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        remembered = getattr(self, "_pathwise", None)
        if remembered is None or value is not remembered[0]:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        return -0.5 * remembered[1].square() - self.scale.log() - _LOG_SQRT_2PI


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
