"""The quadrant-completion task: one quadrant of an image observed, the other three predicted."""

from __future__ import annotations

import math

import torch

__all__ = ["join_quadrants", "quadrant_mask", "split_quadrants"]


def quadrant_mask(side: int, observed: tuple[int, ...] = (0,)) -> torch.Tensor:
    """A boolean ``(side * side,)`` mask of the pixels in the ``observed`` quadrants.

    Quadrants are numbered row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right;
    ``side`` must be even.
    """
    if side < 2 or side % 2:
        raise ValueError(f"side must be an even image width, got {side}")
    if not observed or any(q not in (0, 1, 2, 3) for q in observed) or len(set(observed)) > 3:
        raise ValueError(f"observed must name 1 to 3 quadrants among 0..3, got {observed!r}")
    half = side // 2
    rows = torch.arange(side).unsqueeze(1) >= half
    cols = torch.arange(side).unsqueeze(0) >= half
    quadrant = (2 * rows + cols).reshape(-1)
    return torch.isin(quadrant, torch.tensor(sorted(observed)))


def _side(images: torch.Tensor) -> int:
    side = math.isqrt(images.shape[-1])
    if side * side != images.shape[-1]:
        raise ValueError(f"images must be flattened squares, got {images.shape[-1]} pixels")
    return side


def split_quadrants(images: torch.Tensor, observed: tuple[int, ...] = (0,)) -> dict:
    r"""Named data ``{"x": the unobserved pixels, "c": the observed ones}`` of flat images.

    The conditional task of Sohn et al. (2015, section 5.1): predict :math:`x` (the other
    quadrants) given :math:`c` (``observed``, top-left by default), a one-to-many mapping
    that a conditional VAE p(x | c) = ∫ p(x | z, c) p(z | c) dz can represent and a
    deterministic regressor cannot.

    References:

    1. K. Sohn, H. Lee, X. Yan (2015). Learning Structured Output Representation using
       Deep Conditional Generative Models. NeurIPS.
    """
    mask = quadrant_mask(_side(images), observed).to(images.device)
    return {"x": images[..., ~mask], "c": images[..., mask]}


def join_quadrants(
    x: torch.Tensor, c: torch.Tensor, observed: tuple[int, ...] = (0,)
) -> torch.Tensor:
    """The flat images whose pixels :func:`split_quadrants` split into ``x`` and ``c``."""
    side = math.isqrt(x.shape[-1] + c.shape[-1])
    mask = quadrant_mask(side, observed).to(x.device)
    out = x.new_empty(*torch.broadcast_shapes(x.shape[:-1], c.shape[:-1]), side * side)
    out[..., mask] = c.to(x.dtype).expand(*out.shape[:-1], c.shape[-1])
    out[..., ~mask] = x.expand(*out.shape[:-1], x.shape[-1])
    return out
