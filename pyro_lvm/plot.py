"""Matplotlib figures: training curves, image grids, reconstructions, latents, 1-D posteriors.

Every function builds a new :class:`~matplotlib.figure.Figure` without ``pyplot`` state (safe
under the Agg backend and in threads), returns it, and saves it when ``path`` is given.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = [
    "plot_class_samples",
    "plot_completions",
    "plot_interpolations",
    "plot_rate_distortion",
    "plot_density_approximations",
    "plot_image_grid",
    "plot_latent_scatter",
    "plot_reconstructions",
    "plot_training_curves",
]


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=float)
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    return array


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_training_curves(history: Any, path: str | os.PathLike | None = None) -> Figure:
    """Training loss and validation ELBO per epoch, side by side.

    :param history: a :class:`pyro_lvm.train.FitHistory` (attributes ``epoch_losses`` and
        ``valid_elbos``), any object with attributes ``train_loss`` and ``valid_elbo``, or a
        mapping with either pair of keys; one value per epoch. The validation list may be
        empty or hold ``None``/``nan`` for epochs without validation.
    :param path: optional file to save the figure to.
    :raises ValueError: if the training losses are missing or empty.
    """

    def get(*names: str):
        for name in names:
            value = (
                history.get(name) if isinstance(history, Mapping) else getattr(history, name, None)
            )
            if value is not None:
                return value
        return None

    train = get("train_loss", "epoch_losses")
    if train is None or len(train) == 0:
        raise ValueError(
            "history needs non-empty training losses (one per epoch): pass a FitHistory or "
            "a dict {'train_loss': [...], 'valid_elbo': [...]}"
        )
    valid = [np.nan if v is None else float(v) for v in (get("valid_elbo", "valid_elbos") or [])]
    fig = Figure(figsize=(9, 3.5))
    ax_train, ax_valid = fig.subplots(1, 2)
    epochs = np.arange(1, len(train) + 1)
    ax_train.plot(epochs, _to_numpy(train, "train_loss"), marker=".")
    ax_train.set(xlabel="epoch", ylabel="loss (negative bound)", title="training loss")
    if valid:
        ax_valid.plot(np.arange(1, len(valid) + 1), valid, marker=".", color="C1")
    ax_valid.set(xlabel="epoch", ylabel="ELBO per data point", title="validation ELBO")
    return _finish(fig, path)


def plot_image_grid(
    images: Any,
    image_shape: Sequence[int] = (28, 28),
    nrow: int | None = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Tile flattened or 2-D gray images into one grid (a single axes).

    :param images: array or tensor of shape ``(n, H*W)`` or ``(n, H, W)``.
    :param image_shape: ``(H, W)``.
    :param nrow: images per row; ``ceil(sqrt(n))`` by default.
    :param path: optional file to save the figure to.
    :param title: optional title.
    :raises ValueError: if the images do not have ``H*W`` pixels each.
    """
    array = _to_numpy(images, "images")
    h, w = (int(s) for s in image_shape)
    if array.ndim not in (2, 3) or array[0].size != h * w:
        raise ValueError(
            f"images must have shape (n, {h * w}) or (n, {h}, {w}) for image_shape="
            f"{(h, w)}; got {array.shape}. Pass the right image_shape."
        )
    array = array.reshape(-1, h, w)
    n = array.shape[0]
    nrow = int(nrow) if nrow else math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be positive, got {nrow}")
    ncol_rows = math.ceil(n / nrow)
    grid = np.full((ncol_rows * (h + 1) + 1, nrow * (w + 1) + 1), np.nan)
    for i, image in enumerate(array):
        r, c = divmod(i, nrow)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    fig = Figure(figsize=(max(2.0, 0.6 * nrow), max(2.0, 0.6 * ncol_rows) + 0.4))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray_r", interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return _finish(fig, path)


def plot_reconstructions(
    x: Any,
    x_rec: Any,
    image_shape: Sequence[int] = (28, 28),
    path: str | os.PathLike | None = None,
) -> Figure:
    """Originals (top row) above their reconstructions (bottom row), one axes per image.

    :param x: ``(n, H*W)`` originals.
    :param x_rec: ``(n, H*W)`` reconstructions (e.g. ``VAE.reconstruct(x)``).
    :param image_shape: ``(H, W)``.
    :param path: optional file to save the figure to.
    :raises ValueError: if the shapes differ or do not match ``image_shape``.
    """
    a, b = _to_numpy(x, "x"), _to_numpy(x_rec, "x_rec")
    h, w = (int(s) for s in image_shape)
    if a.shape != b.shape or a.ndim < 2 or a[0].size != h * w:
        raise ValueError(
            f"x and x_rec must have the same shape (n, {h * w}); got {a.shape} and {b.shape}"
        )
    n = a.shape[0]
    fig = Figure(figsize=(max(2.0, 1.0 * n), 2.3))
    axes = np.atleast_2d(fig.subplots(2, n, squeeze=False))
    for i in range(n):
        for row, data in enumerate((a, b)):
            axes[row, i].imshow(data[i].reshape(h, w), cmap="gray_r", interpolation="nearest")
            axes[row, i].set_axis_off()
    axes[0, 0].set_title("data", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    return _finish(fig, path)


def plot_latent_scatter(
    z: Any,
    labels: Any = None,
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """Scatter of 2-D latent codes, colored by ``labels`` when given.

    If ``z`` has more than two columns, the first two are plotted and the title says so.

    :param z: ``(n, d)`` latent codes, ``d >= 2`` (e.g. the means of q(z | x)).
    :param labels: optional ``(n,)`` class labels.
    :param path: optional file to save the figure to.
    :param title: optional title.
    :raises ValueError: if ``z`` is not ``(n, d >= 2)`` or ``labels`` has the wrong length.
    """
    array = _to_numpy(z, "z")
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"z must have shape (n, d) with d >= 2, got {array.shape}")
    title = title or "latent codes"
    if array.shape[1] > 2:
        title += f" (first 2 of {array.shape[1]} dims)"
    fig = Figure(figsize=(4.5, 4))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(array[:, 0], array[:, 1], s=6, alpha=0.7)
    else:
        lab = _to_numpy(labels, "labels").reshape(-1)
        if lab.shape[0] != array.shape[0]:
            raise ValueError(f"labels has {lab.shape[0]} entries for {array.shape[0]} codes")
        sc = ax.scatter(array[:, 0], array[:, 1], c=lab, cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="label")
    ax.set(xlabel="$z_1$", ylabel="$z_2$", title=title)
    return _finish(fig, path)


def plot_density_approximations(
    grid: Any,
    target: Any,
    approximations: Mapping[str, Any],
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """A 1-D density (e.g. the posterior p(z | x)) and approximations q(z) on one grid.

    The lecture's figure: a posterior with candidate Gaussians; the legend carries whatever
    the caller puts in the names (e.g. each q's ELBO and KL).

    :param grid: ``(G,)`` points.
    :param target: ``(G,)`` target density values on ``grid``.
    :param approximations: name -> ``(G,)`` density values.
    :param path: optional file to save the figure to.
    :param title: optional title.
    :raises ValueError: if an array's length differs from the grid's.
    """
    z = _to_numpy(grid, "grid").reshape(-1)
    curves = {
        "target": _to_numpy(target, "target"),
        **{name: _to_numpy(values, name) for name, values in approximations.items()},
    }
    for name, values in curves.items():
        if values.shape != z.shape:
            raise ValueError(f"{name} has shape {values.shape}; it must match the grid {z.shape}")
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.fill_between(z, curves.pop("target"), color="0.8", label="p(z | x)")
    for i, (name, values) in enumerate(curves.items()):
        ax.plot(z, values, color=f"C{i}", label=name)
    ax.set(xlabel="z", ylabel="density", title=title or "posterior and approximations")
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_rate_distortion(
    points: Mapping[float, Any], ax=None, path: str | os.PathLike | None = None
):
    """Plot D against R, one labelled point per β, with the ELBO isolines R + D = const.

    :param points: β ↦ :class:`~pyro_lvm.evaluate.RateDistortion` (``rate``, ``distortion``).
    :param ax: axes to draw into; a new figure otherwise.
    :param path: optional PNG path (only when the figure is new).
    :returns: the matplotlib axes.
    """
    if not points:
        raise ValueError("points is empty: pass {beta: rate_distortion(...)} for several betas")
    fig = None
    if ax is None:
        fig = Figure(figsize=(5, 4))
        ax = fig.subplots()
    betas = sorted(points)
    r = [points[b].rate for b in betas]
    d = [points[b].distortion for b in betas]
    ax.plot(r, d, "o-")
    for b, ri, di in zip(betas, r, d, strict=True):
        ax.annotate(f"β={b:g}", (ri, di), textcoords="offset points", xytext=(4, 4))
    totals = [ri + di for ri, di in zip(r, d, strict=True)]
    lo, hi = min(totals), max(totals)
    for level in np.linspace(lo, hi, 3):
        grid = np.linspace(0, level, 50)
        ax.plot(grid, level - grid, ":", color="grey", lw=0.8)
    ax.set_xlabel("rate R (nats)")
    ax.set_ylabel("distortion D (nats)")
    ax.set_title("rate-distortion (Alemi et al. 2018)")
    if fig is not None:
        _finish(fig, path)
    return ax


def _image_rows(
    rows: np.ndarray,
    image_shape: Sequence[int],
    labels: Sequence[str],
    path: str | os.PathLike | None,
    title: str | None,
) -> Figure:
    """One row of images per entry of ``rows`` (shape ``(R, K, H*W)``), labelled on the left."""
    h, w = (int(s) for s in image_shape)
    if rows.ndim != 3 or rows.shape[-1] != h * w:
        raise ValueError(
            f"images must have shape (rows, columns, {h * w}) for image_shape={(h, w)}; got "
            f"{rows.shape}. Pass the right image_shape."
        )
    r, k = rows.shape[:2]
    fig = Figure(figsize=(max(2.0, 0.7 * k + 0.8), max(1.2, 0.7 * r + (0.4 if title else 0))))
    axes = fig.subplots(r, k, squeeze=False)
    for i in range(r):
        for j in range(k):
            axes[i, j].imshow(rows[i, j].reshape(h, w), cmap="gray_r", interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        if labels:
            axes[i, 0].set_ylabel(labels[i], fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    return _finish(fig, path)


def plot_interpolations(
    paths: Any,
    image_shape: Sequence[int] = (28, 28),
    path: str | os.PathLike | None = None,
    title: str | None = "latent interpolation",
) -> Figure:
    """One row per pair: the images decoded along a latent path, ``x_a`` left, ``x_b`` right.

    :param paths: ``(S, H*W)`` or ``(n, S, H*W)``, e.g. from
        :func:`~pyro_lvm.evaluate.interpolate`.
    """
    array = _to_numpy(paths, "paths")
    array = array[None] if array.ndim == 2 else array
    return _image_rows(array, image_shape, [f"pair {i}" for i in range(len(array))], path, title)


def plot_class_samples(
    samples: Any,
    image_shape: Sequence[int] = (28, 28),
    path: str | os.PathLike | None = None,
    title: str | None = "class-conditional samples",
) -> Figure:
    """One row per class c of samples x ~ p(x | y = c), shape ``(C, n, H*W)``
    (:func:`~pyro_lvm.evaluate.class_samples`)."""
    array = _to_numpy(samples, "samples")
    return _image_rows(array, image_shape, [f"y={c}" for c in range(len(array))], path, title)


def plot_completions(
    truth: Any,
    completions: Any,
    observed_mask: Any,
    image_shape: Sequence[int] = (28, 28),
    path: str | os.PathLike | None = None,
    title: str | None = "completions from the observed quadrant",
) -> Figure:
    """Columns of data points: the truth, the input (unobserved pixels at 0.5), then completions.

    :param truth: ``(n, H*W)`` images.
    :param completions: ``(S, n, H*W)`` (:func:`~pyro_lvm.evaluate.complete_quadrants`).
    :param observed_mask: ``(H*W,)`` booleans, true on the observed pixels
        (:func:`~pyro_lvm.data.quadrant_mask`).
    """
    x, comp = _to_numpy(truth, "truth"), _to_numpy(completions, "completions")
    mask = _to_numpy(observed_mask, "observed_mask").astype(bool)
    if comp.ndim != 3 or comp.shape[1:] != x.shape or mask.shape != x.shape[1:]:
        raise ValueError(
            f"need truth (n, P), completions (S, n, P) and observed_mask (P,); got {x.shape}, "
            f"{comp.shape} and {mask.shape}"
        )
    given = np.where(mask, x, 0.5)
    rows = np.concatenate([x[:, None], given[:, None], comp.transpose(1, 0, 2)], axis=1)
    fig = _image_rows(rows.transpose(1, 0, 2), image_shape, [], None, title)
    labels = ["truth", "input", *[f"sample {s + 1}" for s in range(comp.shape[0])]]
    for ax, label in zip(fig.axes[:: x.shape[0]], labels, strict=True):
        ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    return _finish(fig, path)
