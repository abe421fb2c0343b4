"""Using a trained model: latent interpolation, reconstructions, conditional samples."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pyro_lvm.data.quadrants import join_quadrants, split_quadrants

__all__ = ["class_samples", "complete_quadrants", "interpolate", "reconstructions"]


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(x, dtype=torch.get_default_dtype())
    return (x.unsqueeze(0), True) if x.dim() == 1 else (x, False)


@torch.no_grad()
def interpolate(
    vae: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8, spherical: bool = False
) -> torch.Tensor:
    r"""Decoded means along the path between the posterior means of ``x_a`` and ``x_b``.

    With :math:`z_a, z_b` the means of q(z | x_a), q(z | x_b) and :math:`t_s = s / (S-1)`,

    .. math::

        z_s = (1 - t_s)\, z_a + t_s\, z_b
        \quad\text{or (spherical)}\quad
        z_s = \frac{\sin((1-t_s)\omega)\, z_a + \sin(t_s \omega)\, z_b}{\sin \omega},
        \ \cos\omega = \frac{z_a \cdot z_b}{\lVert z_a\rVert \lVert z_b\rVert},

    and the result is :math:`\mathbb E[x \mid z_s]`; the spherical path (White 2016,
    arXiv:1609.04468) keeps the norm typical of a Gaussian prior.

    :param vae: a model with ``encode(x)`` (returning q(z | x)) and ``decode(z)``, e.g.
        :class:`~pyro_lvm.models.VAE`.
    :param x_a: one point ``(D,)`` or rows ``(n, D)``.
    :param x_b: as ``x_a``.
    :param steps: S ≥ 2, points on the path including both ends.
    :param spherical: interpolate on the great circle instead of the chord.
    :returns: ``(S, D)`` for single points, ``(n, S, D)`` for rows.
    :raises ValueError: on fewer than 2 steps, mismatched shapes, or a model without
        ``encode``/``decode``.
    """
    if int(steps) < 2:
        raise ValueError(f"steps must be at least 2 (both end points), got {steps}")
    if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
        raise ValueError(
            f"{type(vae).__name__} has no encode/decode pair; interpolate needs a VAE-like model"
        )
    (a, single), (b, _) = _rows(x_a), _rows(x_b)
    if a.shape != b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {a.shape} and {b.shape}")
    z_a, z_b = vae.encode(a).mean, vae.encode(b).mean
    t = torch.linspace(0, 1, int(steps), dtype=z_a.dtype).reshape(1, -1, 1)
    za, zb = z_a.unsqueeze(1), z_b.unsqueeze(1)
    if spherical:
        cos = torch.nn.functional.cosine_similarity(za, zb, dim=-1).unsqueeze(-1)
        omega = cos.clamp(-1 + 1e-7, 1 - 1e-7).acos()
        z = (torch.sin((1 - t) * omega) * za + torch.sin(t * omega) * zb) / torch.sin(omega)
    else:
        z = (1 - t) * za + t * zb
    out = vae.decode(z).mean
    return out[0] if single else out


@torch.no_grad()
def reconstructions(
    model: Any, x: torch.Tensor, indices: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x[indices], model.reconstruct(x[indices]))``: chosen points and their reconstructions.

    :raises ValueError: on an index outside ``0..len(x)-1`` or a model without ``reconstruct``.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    if idx.numel() == 0 or int(idx.min()) < -len(x) or int(idx.max()) >= len(x):
        raise ValueError(
            f"indices must be non-empty and within 0..{len(x) - 1}, got {list(indices)}"
        )
    if not hasattr(model, "reconstruct"):
        raise ValueError(f"{type(model).__name__} has no reconstruct(x) method")
    chosen = x[idx]
    return chosen, model.reconstruct(chosen)


@torch.no_grad()
def class_samples(m2: Any, per_class: int = 8, mean: bool = True) -> torch.Tensor:
    """Class-conditional samples of an :class:`~pyro_lvm.models.M2`: ``(C, per_class, D)``.

    Row c holds x ~ p(x | y = c, z) (its mean by default) for ``per_class`` draws z ~ p(z).
    """
    y = torch.arange(m2.num_classes).repeat_interleave(int(per_class))
    return m2.sample(y, mean=mean).reshape(m2.num_classes, int(per_class), -1)


@torch.no_grad()
def complete_quadrants(
    cvae: Any,
    images: torch.Tensor,
    observed: tuple[int, ...] = (0,),
    num_samples: int = 4,
    mean: bool = True,
) -> torch.Tensor:
    """Images completed by a :class:`~pyro_lvm.models.ConditionalVAE` from their ``observed``
    quadrants: ``(num_samples, n, side * side)``, each a draw z ~ p(z | c) decoded."""
    c = split_quadrants(images, observed)["c"]
    x = cvae.sample(c, num_samples=int(num_samples), mean=mean)
    return join_quadrants(x, c, observed)
