"""Gradient moments of several estimators across particle counts: rows, JSON, markdown."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from pyro.infer import ELBO

from pyro_lvm.elbo import make_estimator
from pyro_lvm.variance.moments import gradient_moments, parameter_groups
from pyro_lvm.variance.scenarios import Scenario
from pyro_lvm.variance.training import particles_for_cost

__all__ = ["compare_estimators", "markdown_table", "write_results"]


def compare_estimators(
    scenario: Scenario | Callable[[], Scenario],
    estimators: Sequence[str | ELBO],
    particles: Sequence[int] = (1, 10),
    num_draws: int = 100,
    seed: int = 0,
    progress: bool = False,
    equal_cost: bool = False,
) -> list[dict]:
    """Gradient moments of every estimator at every particle count on one scenario.

    With ``equal_cost`` the ``particles`` are numbers of **model evaluations** per step and
    each registry name gets the K that costs that many
    (:func:`~pyro_lvm.variance.training.particles_for_cost`: K/2 antithetic pairs for ARM and
    DisARM, K/3 for REBAR and RELAX); rows carry ``evaluations`` and pairs that do not fit
    are skipped with a warning.

    Every (estimator, K) pair starts from the same seed, so estimators that sample the same
    sites see common random numbers. Registry names are built with
    :func:`~pyro_lvm.elbo.make_estimator` at each K; instances are used as they are (their own
    K) once. When the scenario knows its exact ELBO gradient, rows carry the bias against it
    (against the *ELBO* gradient: multi-sample bounds such as IWAE or VIMCO target another
    objective, so their "bias" measures that difference, not an error).

    Estimators that reject a K (leave-one-out baselines at K = 1) are skipped with a warning.

    :param scenario: a :class:`Scenario`, or a zero-argument builder (called once).
    :returns: plain-dict rows (see :meth:`GradientMoments.rows`) with ``scenario`` and the
        scenario's ``info`` fields added.
    """
    if not estimators:
        raise ValueError("estimators is empty: pass registry names (see pyro_lvm.elbo.ESTIMATORS)")
    if not particles or any(int(k) < 1 for k in particles):
        raise ValueError(f"particles must be positive integers, got {list(particles)}")
    if callable(scenario) and not isinstance(scenario, Scenario):
        scenario = scenario()
    groups = parameter_groups(scenario.model, scenario.guide, *scenario.args)
    reference = scenario.exact_gradient(groups)
    rows: list[dict] = []
    for est in estimators:
        for k in particles if isinstance(est, str) else (None,):
            evaluations = k
            try:
                if equal_cost and isinstance(est, str):
                    k = particles_for_cost(est, int(evaluations))
                estimator = make_estimator(est, int(k)) if isinstance(est, str) else est
            except ValueError as err:  # e.g. a leave-one-out baseline at K = 1
                warnings.warn(f"skipping {est} at K={k}: {err}", stacklevel=2)
                continue
            label = est if isinstance(est, str) else type(est).__name__
            result = gradient_moments(
                estimator,
                scenario.model,
                scenario.guide,
                *scenario.args,
                num_draws=num_draws,
                groups=groups,
                reference=reference,
                seed=seed,
                name=label,
                progress=progress,
            )
            extra = {"evaluations": evaluations} if equal_cost else {}
            rows.extend(result.rows(scenario=scenario.name, **extra, **scenario.info))
    return rows


_DEFAULT_COLUMNS = (
    "scenario",
    "estimator",
    "num_particles",
    "evaluations",
    "step",
    "group",
    "variance",
    "snr_mean",
    "bias",
    "seconds_per_draw",
    "work_normalized_variance",
)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    if columns is None:
        columns = [c for c in _DEFAULT_COLUMNS if c in rows[0]] or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    rows: Sequence[dict],
    out_dir: str | os.PathLike,
    meta: dict | None = None,
    columns: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/results.json`` (``{"meta": ..., "rows": [...]}``) and
    ``out_dir/results.md``; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"meta": meta or {}, "rows": list(rows)}, indent=1, default=str)
    )
    (out / "results.md").write_text(markdown_table(rows, columns))
    return out
