"""Estimator-variance benchmark (issue #4): testbed, LinearGaussian, discrete latents, VAE-MNIST.

    python benchmarks/variance.py --out benchmarks/results/variance          # full (~10 min)
    python benchmarks/variance.py --smoke --out /tmp/variance-smoke          # < 30 s

Writes one folder per scenario (results.json, results.md, PNG plots) and summary.json /
summary.md with the known results checked: pathwise vs score function on the testbed,
baseline variance-reduction factors, STL guide variance as q approaches the posterior, and
the IWAE / DReG encoder SNR as K grows. ``--checkpoints a.pt,b.pt`` adds the VAE-MNIST
scenario at those training stages (skipped, with the reason, when data or files are absent).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pyro_lvm.cli.variance import run_variance
from pyro_lvm.elbo import make_estimator
from pyro_lvm.provenance import provenance
from pyro_lvm.variance import gradient_moments, linear_gaussian_scenario


def _pick(rows, **where):
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/variance")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite")
    p.add_argument("--draws", type=int, default=200, help="gradient draws per (estimator, K)")
    p.add_argument("--checkpoints", default="", help="VAE checkpoints (training stages)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: draws on tiny tensors lose to thread contention; "
        "0 keeps torch's default)",
    )
    args = p.parse_args()
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    torch.set_default_dtype(torch.float64)
    out = Path(args.out)
    smoke = args.smoke
    draws = 3 if smoke else args.draws
    ks = (1, 2) if smoke else (1, 10, 100)
    # a small LinearGaussian (5-d x, 2-d z, 4 points) with q at distance 0.2 from the posterior:
    # close enough that the IWAE encoder-gradient signal shrinks with K (Rainforth et al. 2018)
    small = {"x_dim": 5, "z_dim": 2, "num_points": 4}
    t0 = time.perf_counter()
    summary: dict = {
        "meta": {
            "smoke": smoke,
            "draws": draws,
            "particles": list(ks),
            "seed": args.seed,
            **provenance(),
        }
    }
    progress = not smoke

    tb = run_variance(
        "gaussian-testbed",
        out / "gaussian-testbed",
        num_draws=2000 if smoke else 100_000,
        seed=args.seed,
        progress=progress,
    )
    worst = max(abs(r["variance"] / r["exact_variance"] - 1) for r in tb["rows"])
    sq = _pick(tb["rows"], function="square", parameter="mu")
    cos = _pick(tb["rows"], function="cos", parameter="mu", k=10.0)
    ratio = {r["estimator"]: r["exact_variance"] for r in cos}
    summary["testbed"] = {
        "max_relative_error_vs_closed_form": worst,
        "square_pathwise_wins_everywhere": all(
            a["variance"] < b["variance"]
            for a in _pick(sq, estimator="pathwise")
            for b in _pick(sq, estimator="score-function", k=a["k"])
        ),
        "cos_k10_sf_over_pathwise_variance": ratio["score-function"] / ratio["pathwise"],
    }

    lg = run_variance(
        "linear-gaussian",
        out / "linear-gaussian",
        ["elbo", "stl", "iwae", "iwae-dreg"],
        ks,
        draws,
        args.seed,
        distances=(0.2,),
        progress=progress,
        scenario_kwargs=small,
    )
    snr = {
        est: {
            r["num_particles"]: r["snr_mean"]
            for r in _pick(lg["rows"], estimator=est, group="guide")
        }
        for est in ("iwae", "iwae-dreg")
    }
    summary["iwae_vs_dreg_guide_snr"] = snr

    stl = run_variance(
        "linear-gaussian",
        out / "stl-near-posterior",
        ["elbo", "stl"],
        (1,),
        draws,
        args.seed,
        distances=(1.0, 0.0) if smoke else (1.0, 0.3, 0.1, 0.03, 0.0),
        progress=progress,
        scenario_kwargs=small,
    )
    summary["stl_guide_variance_by_distance"] = {
        r["distance"]: {
            e: x["variance"]
            for e in ("elbo", "stl")
            for x in _pick(stl["rows"], estimator=e, group="guide", distance=r["distance"])
        }
        for r in stl["rows"]
    }

    dks = (2,) if smoke else (2, 10, 50)
    disc = run_variance(
        "discrete", out / "discrete", None, dks, draws, args.seed, progress=progress
    )
    base = {
        r["num_particles"]: r["variance"]
        for r in _pick(disc["rows"], estimator="score-function", group="guide")
    }
    summary["baseline_variance_reduction_factor"] = {
        est: {
            r["num_particles"]: base[r["num_particles"]] / r["variance"]
            for r in _pick(disc["rows"], estimator=est, group="guide")
        }
        for est in ("score-function-avg-baseline", "score-function-loo-baseline", "vimco")
    }

    sc = linear_gaussian_scenario(x_dim=20, z_dim=10, num_points=32, distance=1.0)
    n_perf = 5 if smoke else 200
    start = time.perf_counter()
    gradient_moments(make_estimator("elbo", 10), sc.model, sc.guide, *sc.args, num_draws=n_perf)
    summary["perf_linear_gaussian_K10 (20-d x, 10-d z, 32 points)"] = {
        "draws": n_perf,
        "seconds_per_1000_draws": (time.perf_counter() - start) * 1000 / n_perf,
    }

    ckpts = [c for c in args.checkpoints.split(",") if c]
    vae = run_variance(
        "vae-mnist",
        out / "vae-mnist",
        ["elbo", "stl", "iwae", "iwae-dreg"],
        (1, 10) if not smoke else (1,),
        draws,
        args.seed,
        checkpoints=ckpts,
        progress=progress,
    )
    summary["vae_mnist"] = {"skipped": vae["skipped"], "rows": len(vae["rows"])}
    summary["meta"]["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
