"""Figures for gradient-variance results: variance and SNR vs K, across training, the testbed."""

from __future__ import annotations

import os
from collections.abc import Sequence

from matplotlib.figure import Figure

__all__ = [
    "plot_metric_vs_particles",
    "plot_metric_vs_step",
    "plot_testbed",
    "plot_variance_across_stages",
]


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def plot_metric_vs_particles(
    rows: Sequence[dict],
    metric: str = "variance",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """``metric`` (``"variance"`` or ``"snr_mean"``) against K on log-log axes, one line per
    estimator, one panel per parameter group (rows from :func:`compare_estimators`)."""
    if not rows:
        raise ValueError("no rows to plot: run compare_estimators first")
    groups = sorted({r["group"] for r in rows})
    fig = Figure(figsize=(4.5 * len(groups), 3.6))
    for i, group in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for est in dict.fromkeys(r["estimator"] for r in rows):
            sel = sorted(
                (r["num_particles"], r[metric])
                for r in rows
                if r["group"] == group and r["estimator"] == est and r[metric] > 0
            )
            if sel:
                ax.plot(*zip(*sel, strict=True), marker="o", label=est)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("particles K")
        ax.set_ylabel({"snr_mean": "mean SNR per coordinate"}.get(metric, metric))
        ax.set_title(f"{group} gradient" if title is None else f"{title}: {group}")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_metric_vs_step(
    rows: Sequence[dict],
    metric: str = "variance",
    group: str = "guide",
    path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Figure:
    """``metric`` of one parameter group against the training step, one line per estimator
    (rows from :func:`~pyro_lvm.variance.training.moments_during_training`), log y axis."""
    sel = [r for r in rows if r["group"] == group]
    if not sel:
        raise ValueError(f"no rows of group {group!r} to plot")
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for est in dict.fromkeys((r["estimator"], r["num_particles"]) for r in sel):
        pts = sorted(
            (r["step"], r[metric])
            for r in sel
            if (r["estimator"], r["num_particles"]) == est and r[metric] > 0
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=f"{est[0]} K={est[1]}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel({"snr_mean": "mean SNR per coordinate"}.get(metric, metric))
    ax.set_title(title or f"{group} gradient during training")
    ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_variance_across_stages(
    rows: Sequence[dict], stage_key: str = "scenario", path: str | os.PathLike | None = None
) -> Figure:
    """Gradient variance per estimator across scenarios ordered as given (training stages, or
    the distance of q from the posterior), one panel per parameter group, log y axis."""
    if not rows:
        raise ValueError("no rows to plot")
    stages = list(dict.fromkeys(str(r[stage_key]) for r in rows))
    groups = sorted({r["group"] for r in rows})
    fig = Figure(figsize=(4.5 * len(groups), 3.6))
    for i, group in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for est in dict.fromkeys((r["estimator"], r["num_particles"]) for r in rows):
            ys = {
                str(r[stage_key]): r["variance"]
                for r in rows
                if r["group"] == group and (r["estimator"], r["num_particles"]) == est
            }
            xs = [j for j, s in enumerate(stages) if s in ys]
            ys_plot = [max(ys[stages[j]], 1e-30) for j in xs]
            ax.plot(xs, ys_plot, marker="o", label=f"{est[0]} K={est[1]}")
        ax.set_xticks(range(len(stages)), stages, rotation=20, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("variance (trace)")
        ax.set_title(f"{group} gradient")
        ax.legend(fontsize=7)
    return _finish(fig, path)


def plot_testbed(rows: Sequence[dict], path: str | os.PathLike | None = None) -> Figure:
    """Measured (markers) and exact (lines) single-sample variances on the Gaussian testbed:
    one panel per (cost function, parameter), k on the x axis, log y axis."""
    if not rows:
        raise ValueError("no testbed rows to plot: run testbed_rows first")
    functions = list(dict.fromkeys(r["function"] for r in rows))
    params = list(dict.fromkeys(r["parameter"] for r in rows))
    fig = Figure(figsize=(3.6 * len(functions), 3.0 * len(params)))
    labels = {"square": "(x-k)^2", "exp": "exp(-k x^2)", "cos": "cos(k x)"}
    for i, p in enumerate(params):
        for j, f in enumerate(functions):
            ax = fig.add_subplot(len(params), len(functions), i * len(functions) + j + 1)
            for est, color in (("score-function", "C0"), ("pathwise", "C1")):
                sel = sorted(
                    (r["k"], r["variance"], r["exact_variance"])
                    for r in rows
                    if r["function"] == f and r["parameter"] == p and r["estimator"] == est
                )
                if not sel:
                    continue
                k, measured, exact = zip(*sel, strict=True)
                ax.plot(k, exact, color=color, label=f"{est} exact")
                ax.plot(k, measured, "o", color=color, ms=4, label=f"{est} measured")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("k")
            ax.set_title(f"{labels.get(f, f)}, d/d{p}", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    return _finish(fig, path)
