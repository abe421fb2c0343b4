"""``pyro-lvm variance``: gradient-estimator variance tables and plots for one scenario."""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from pyro_lvm.provenance import provenance
from pyro_lvm.variance.compare import compare_estimators, markdown_table, write_results
from pyro_lvm.variance.plots import (
    plot_metric_vs_particles,
    plot_metric_vs_step,
    plot_testbed,
    plot_variance_across_stages,
)
from pyro_lvm.variance.scenarios import (
    bernoulli_scenario,
    discrete_scenario,
    linear_gaussian_scenario,
    vae_mnist_scenarios,
)
from pyro_lvm.variance.testbed import ESTIMATOR_KINDS, testbed_rows
from pyro_lvm.variance.training import moments_during_training, particles_for_cost

__all__ = ["DEFAULT_ESTIMATORS", "add_variance_arguments", "run_variance", "variance_main"]

SCENARIOS = ("gaussian-testbed", "linear-gaussian", "vae-mnist", "discrete", "bernoulli")
#: scenarios whose particle counts are model evaluations (every estimator at equal cost)
EQUAL_COST = ("bernoulli",)
DEFAULT_PARTICLES = {"bernoulli": (6, 12)}
DEFAULT_ESTIMATORS = {
    "gaussian-testbed": ESTIMATOR_KINDS,
    "linear-gaussian": ("elbo", "stl", "iwae", "iwae-dreg"),
    "vae-mnist": ("elbo", "stl", "iwae", "iwae-dreg"),
    "discrete": (
        "score-function",
        "score-function-avg-baseline",
        "score-function-loo-baseline",
        "score-function-nvil",
        "vimco",
    ),
    "bernoulli": (
        "score-function-avg-baseline",
        "score-function-loo-baseline",
        "score-function-nvil",
        "vimco",
        "arm",
        "disarm",
        "rebar",
        "relax",
    ),
}
TESTBED_COLUMNS = (
    "function",
    "k",
    "parameter",
    "estimator",
    "variance",
    "exact_variance",
    "variance_rel_se",
    "mean",
    "exact_mean",
    "num_draws",
)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _ints_or_zero(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from err
    if not values or min(values) < 0 or values != sorted(values):
        raise argparse.ArgumentTypeError(f"expected increasing steps >= 0, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        msg = f"expected comma-separated numbers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from err


def add_variance_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``pyro-lvm variance`` to ``parser``."""
    from pyro_lvm.cli.parser import seed_int

    parser.add_argument(
        "--scenario", choices=SCENARIOS, default="gaussian-testbed", help="what to measure"
    )
    parser.add_argument(
        "--estimators",
        default=None,
        help="comma-separated registry names (testbed: score-function,pathwise); "
        "default depends on the scenario",
    )
    parser.add_argument(
        "--particles",
        type=_ints,
        default=None,
        help="K, e.g. 1,10,100 (default); bernoulli: model evaluations per step, every "
        "estimator at equal cost (default 6,12)",
    )
    parser.add_argument(
        "--train-steps",
        type=_ints_or_zero,
        default=None,
        help="also train each estimator (at the smallest K) and measure it after these SVI "
        "steps, e.g. 0,100,500: learned baselines and control variates measured trained",
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="--train-steps: Adam's rate")
    parser.add_argument(
        "--draws", type=int, default=None, help="draws R (default 100000 testbed, else 100)"
    )
    parser.add_argument("--out", default="runs/variance", help="output folder")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument(
        "--distances",
        type=_floats,
        default=[1.0, 0.3, 0.1, 0.0],
        help="linear-gaussian: distances of q from the exact posterior (0 = exact)",
    )
    parser.add_argument("--checkpoints", default="", help="vae-mnist: comma-separated checkpoints")
    parser.add_argument("--data-root", default=None, help="vae-mnist: data folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run_variance(
    scenario: str,
    out: str | os.PathLike,
    estimators: Sequence[str] | None = None,
    particles: Sequence[int] | None = None,
    num_draws: int | None = None,
    seed: int = 0,
    distances: Sequence[float] = (1.0, 0.3, 0.1, 0.0),
    checkpoints: Sequence[str] = (),
    data_root: str | None = None,
    progress: bool = True,
    scenario_kwargs: dict | None = None,
    train_steps: Sequence[int] | None = None,
    lr: float = 1e-3,
) -> dict:
    """Run one scenario, write ``results.json``, ``results.md`` and PNG plots into ``out``.

    With ``train_steps``, each estimator (at the smallest K; for ``bernoulli`` the smallest
    number of evaluations) is also trained on the scenario by SVI and measured after those
    steps (:func:`~pyro_lvm.variance.training.moments_during_training`), written to
    ``training.json``/``training.md`` with ``variance_vs_step.png`` and ``snr_vs_step.png``.

    :param scenario_kwargs: extra keyword arguments of :func:`linear_gaussian_scenario` or
        :func:`discrete_scenario` (sizes).
    :returns: ``{"rows": [...], "skipped": reason or None, "files": [...]}``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")
    estimators = list(estimators or DEFAULT_ESTIMATORS[scenario])
    particles = list(particles or DEFAULT_PARTICLES.get(scenario, (1, 10, 100)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    meta = {"scenario": scenario, "seed": seed, "estimators": estimators}
    meta["provenance"] = provenance()
    files: list[str] = []
    if scenario == "gaussian-testbed":
        unknown = sorted(set(estimators) - set(ESTIMATOR_KINDS))
        if unknown:
            raise ValueError(f"the testbed knows estimators {ESTIMATOR_KINDS}, not {unknown}")
        rows = testbed_rows(num_draws=num_draws or 100_000, estimators=estimators)
        write_results(rows, out, {**meta, "particles": [1]}, TESTBED_COLUMNS)
        plot_testbed(rows, out / "testbed.png")
        files = ["results.json", "results.md", "testbed.png"]
        return {"rows": rows, "skipped": None, "files": files}

    draws = num_draws or 100
    meta.update(particles=list(particles), num_draws=draws)
    rows: list[dict] = []
    kw = dict(scenario_kwargs or {})
    if scenario == "linear-gaussian":
        builders = [
            lambda d=d: linear_gaussian_scenario(distance=d, seed=seed, **kw) for d in distances
        ]
    elif scenario == "discrete":
        builders = [lambda: discrete_scenario(seed=seed, **kw)]
    elif scenario == "bernoulli":
        builders = [lambda: bernoulli_scenario(seed=seed, **kw)]
    else:
        paths = [c for c in checkpoints if c]
        _, reason = vae_mnist_scenarios(paths, data_root)
        if reason:
            write_results([], out, {**meta, "skipped": reason})
            return {"rows": [], "skipped": reason, "files": ["results.json", "results.md"]}
        # rebuild each stage right before it runs: PyroModule parameters are looked up in the
        # param store by name, so stages must not coexist
        builders = [lambda p=p: vae_mnist_scenarios([p], data_root)[0][0] for p in paths]
    per_stage: list[list[dict]] = []
    for build in builders:
        stage_rows = compare_estimators(
            build(), estimators, particles, draws, seed, progress, scenario in EQUAL_COST
        )
        per_stage.append(stage_rows)
        rows.extend(stage_rows)
    write_results(rows, out, meta)
    files += ["results.json", "results.md"]
    first = per_stage[0]
    plot_metric_vs_particles(first, "variance", out / "variance_vs_K.png", first[0]["scenario"])
    plot_metric_vs_particles(first, "snr_mean", out / "snr_vs_K.png", first[0]["scenario"])
    files += ["variance_vs_K.png", "snr_vs_K.png"]
    if len(per_stage) > 1:
        k0 = min(particles)
        plot_variance_across_stages(
            [r for r in rows if r["num_particles"] == k0], path=out / "variance_across_stages.png"
        )
        files.append("variance_across_stages.png")
    if train_steps:
        files += _training(builders[0], scenario, estimators, min(particles), train_steps, out,
                           dict(meta, num_draws=draws, lr=lr), draws, lr, seed)  # fmt: skip
    return {"rows": rows, "skipped": None, "files": files}


def _training(build, scenario, estimators, k, steps, out: Path, meta, draws, lr, seed) -> list:
    """Train-and-measure rows of every estimator (see :func:`run_variance`); file names."""
    rows: list[dict] = []
    for name in estimators:
        kk = particles_for_cost(name, k) if scenario in EQUAL_COST else k
        try:
            rows += moments_during_training(build, name, kk, steps, draws, lr=lr, seed=seed)
        except ValueError as err:  # e.g. a leave-one-out baseline at K = 1
            warnings.warn(f"skipping {name} during training: {err}", stacklevel=2)
    write_results(rows, out / "training", {**meta, "steps": list(steps)})
    title = f"{scenario}: guide gradient during training"
    plot_metric_vs_step(rows, "variance", path=out / "variance_vs_step.png", title=title)
    plot_metric_vs_step(rows, "snr_mean", path=out / "snr_vs_step.png", title=title)
    return ["training/results.json", "training/results.md", "variance_vs_step.png",
            "snr_vs_step.png"]  # fmt: skip


def variance_main(args: argparse.Namespace) -> int:
    """Run ``pyro-lvm variance`` from parsed arguments; print the table; return 0.

    :raises ValueError: when the scenario can measure nothing (e.g. ``vae-mnist`` without the
        data or checkpoints), so the command exits non-zero rather than 0 with a "skipped".
    """
    estimators = [e.strip() for e in args.estimators.split(",")] if args.estimators else None
    result = run_variance(
        args.scenario,
        args.out,
        estimators,
        args.particles,
        args.draws,
        args.seed,
        args.distances,
        [c.strip() for c in args.checkpoints.split(",")],
        args.data_root,
        progress=not args.no_progress,
        train_steps=args.train_steps,
        lr=args.lr,
    )
    if result["skipped"]:  # nothing of what was asked could be measured: a usage error
        raise ValueError(
            f"--scenario {args.scenario} measured nothing: {result['skipped']} (the reason is "
            f"also in {args.out}/results.json)"
        )
    columns = TESTBED_COLUMNS if args.scenario == "gaussian-testbed" else None
    print(markdown_table(result["rows"], columns), end="")
    print(f"wrote {', '.join(result['files'])} to {args.out}")
    return 0
