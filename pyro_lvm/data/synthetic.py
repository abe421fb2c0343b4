"""Synthetic data with known latents: Gaussian mixtures and linear-Gaussian models."""

from __future__ import annotations

import numbers
from typing import Any

import torch

__all__ = ["sample_gaussian_mixture", "sample_linear_gaussian"]


def _generator(seed: int | None) -> torch.Generator | None:
    """A local generator seeded with ``seed``; ``None`` means the global RNG."""
    if seed is None:
        return None
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _check_n(n: int) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer number of samples, got {n!r}")
    return int(n)


def sample_gaussian_mixture(
    n: int,
    weights: torch.Tensor,
    locs: torch.Tensor,
    scales: torch.Tensor | float,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw ``n`` points from a mixture of diagonal Gaussians, with their components.

    .. math::

        z_i \sim \mathrm{Categorical}(\pi), \qquad
        x_i \mid z_i \sim \mathcal N(\mu_{z_i}, \mathrm{diag}\,\sigma_{z_i}^2),

    the generative process of :class:`pyro_lvm.models.GaussianMixture`. The weights are
    normalized, as ``torch.distributions.Categorical(probs=...)`` does.

    With an integer ``seed`` the draw uses a private ``torch.Generator``: the result is a
    pure function of the arguments and the global RNG is not touched. With ``seed=None``
    it uses the global RNG (so ``pyro.set_rng_seed`` governs it).

    :param n: number of points.
    :param weights: mixture weights :math:`\pi`, shape ``(C,)``, non-negative with a
        positive sum.
    :param locs: component means :math:`\mu`, shape ``(C, D)``.
    :param scales: component standard deviations :math:`\sigma`, positive, broadcastable
        to ``(C, D)`` (a float, ``(C, 1)`` or ``(D,)``).
    :param seed: seed of the private generator, or ``None``.
    :returns: ``(x, z)``: ``x`` of shape ``(n, D)`` and dtype ``torch.get_default_dtype()``,
        ``z`` a ``LongTensor`` of shape ``(n,)`` with the component of each point.
    :raises ValueError: on shapes that do not match, negative or non-finite weights, or
        non-positive scales.

    Example::

        x, z = sample_gaussian_mixture(500, torch.tensor([0.3, 0.7]),
                                       torch.tensor([[-2.0], [2.0]]), 0.5, seed=1)
    """
    n = _check_n(n)
    dtype = torch.get_default_dtype()
    weights = torch.as_tensor(weights, dtype=dtype)
    locs = torch.as_tensor(locs, dtype=dtype)
    scales = torch.as_tensor(scales, dtype=dtype)
    if locs.dim() != 2 or weights.shape != (locs.shape[0],):
        raise ValueError(
            f"locs must have shape (C, D) and weights shape (C,); got locs of shape "
            f"{tuple(locs.shape)} and weights of shape {tuple(weights.shape)}"
        )
    try:
        scales = scales.expand_as(locs)
    except RuntimeError as err:
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not broadcast to locs' shape "
            f"{tuple(locs.shape)}; pass a float, (C, 1), (D,) or (C, D)"
        ) from err
    if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative, with a positive sum: {weights}")
    if not (scales > 0).all() or not torch.isfinite(scales).all():
        raise ValueError("scales must be positive and finite")
    gen = _generator(seed)
    z = torch.multinomial(weights, n, replacement=True, generator=gen)
    noise = torch.randn(n, locs.shape[1], generator=gen, dtype=dtype)
    return locs[z] + scales[z] * noise, z


@torch.no_grad()
def sample_linear_gaussian(
    model: Any, n: int, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Draw ``n`` points from a :class:`~pyro_lvm.models.LinearGaussian`, with their latents.

    .. math::

        z_i \sim \mathcal N(0, I_d), \qquad x_i = W z_i + b + \sigma \varepsilon_i, \quad
        \varepsilon_i \sim \mathcal N(0, I_D),

    using the model's current ``weight`` (:math:`W`), ``bias`` (:math:`b`) and
    ``noise_scale`` (:math:`\sigma`); the result carries no gradient. Unlike
    ``model.sample`` it returns ``z`` and, with an integer ``seed``, uses a private
    ``torch.Generator`` (reproducible, global RNG untouched); ``seed=None`` uses the global
    RNG. Marginally :math:`x_i \sim \mathcal N(b, W W^\top + \sigma^2 I)`, the model's
    :meth:`~pyro_lvm.models.LinearGaussian.marginal` (probabilistic PCA, Tipping & Bishop
    1999).

    :param model: the model (any object with ``weight`` ``(D, d)``, ``bias`` ``(D,)`` and
        a scalar ``noise_scale``).
    :param n: number of points.
    :param seed: seed of the private generator, or ``None``.
    :returns: ``(x, z)`` of shapes ``(n, D)`` and ``(n, d)``, in the model's dtype.
    :raises ValueError: if ``model`` lacks those attributes or they have other shapes.

    References:

    1. M. E. Tipping, C. M. Bishop (1999). Probabilistic Principal Component Analysis.
       JRSS B 61(3).
    """
    n = _check_n(n)
    try:
        weight, bias = model.weight.detach(), model.bias.detach()
        noise_scale = torch.as_tensor(model.noise_scale).detach()
    except AttributeError as err:
        raise ValueError(
            f"model must be a LinearGaussian (weight, bias, noise_scale); got "
            f"{type(model).__name__}: {err}"
        ) from err
    if weight.dim() != 2 or bias.shape != weight.shape[:1] or noise_scale.numel() != 1:
        raise ValueError(
            f"expected weight (D, d), bias (D,) and a scalar noise_scale; got "
            f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(noise_scale.shape)}"
        )
    gen = _generator(seed)
    x_dim, z_dim = weight.shape
    z = torch.randn(n, z_dim, generator=gen, dtype=weight.dtype)
    eps = torch.randn(n, x_dim, generator=gen, dtype=weight.dtype)
    return z @ weight.T + bias + noise_scale.reshape(()) * eps, z
