"""``pyro-lvm gaps RUN``: the approximation and amortization gaps of a trained run
(:func:`pyro_lvm.evaluate.inference_gaps`), written as ``gaps.json`` and ``gaps.txt``."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_lvm.cli.parser import seed_int
from pyro_lvm.cli.runs import restore, run_data
from pyro_lvm.evaluate.gaps import inference_gaps

__all__ = ["add_gaps_arguments", "gaps_main"]


def add_gaps_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-lvm gaps RUN``."""
    parser.add_argument("run", help="a run folder written by `pyro-lvm train` (or its checkpoint)")
    parser.add_argument("--data", default=None, help=".npz file of the points (array 'x')")
    parser.add_argument("--n", type=int, default=1000, help="number of test points")
    parser.add_argument(
        "--split", choices=("train", "valid", "test"), default="test", help="data split"
    )
    parser.add_argument("--num-samples", type=int, default=1000, help="K for log p(x)")
    parser.add_argument("--elbo-samples", type=int, default=500, help="samples per ELBO")
    parser.add_argument("--steps", type=int, default=1000, help="inner step cap for q*")
    parser.add_argument("--lr", type=float, default=0.01, help="inner learning rate")
    parser.add_argument("--particles", type=int, default=8, help="inner particles")
    parser.add_argument("--data-root", default=None, help="folder with the data (or PYRO_LVM_DATA)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument("--out", default=None, help="output folder (default: the run folder)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def gaps_main(args: argparse.Namespace) -> int:
    """Run ``pyro-lvm gaps``: restore a VAE, compute the gaps, write ``gaps.json`` and ``gaps.txt``.

    The run (a folder or checkpoint) comes back by :func:`pyro_lvm.load_run`, whatever its
    model; the points are ``--data FILE.npz`` or the split of the built-in data set it was
    trained on (:func:`pyro_lvm.cli.runs.run_data`).
    """
    for name in ("n", "num_samples", "elbo_samples", "steps", "particles"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    run = restore(args.run)
    path, model, guide = run.checkpoint, run.model, run.guide
    dataset = (run.extra.get("config") or {}).get("dataset", args.data)
    x = run_data(run, args.split, args.data, args.data_root)[0]
    if isinstance(x, dict):
        raise ValueError("pyro-lvm gaps takes unlabelled data: give --data with an array 'x' only")
    x = x[: args.n].to(torch.get_default_dtype())
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    result = inference_gaps(
        model, guide, x, num_samples=args.num_samples, elbo_samples=args.elbo_samples,
        max_steps=args.steps, lr=args.lr, num_particles=args.particles,
        progress=not getattr(args, "quiet", False),
    )  # fmt: skip
    summary = result.summary()
    summary.update(
        checkpoint=str(path), split=args.split, dataset=dataset, seed=args.seed,
        seconds=time.perf_counter() - start, steps=args.steps, lr=args.lr,
    )  # fmt: skip
    out = Path(args.out) if args.out else path.parent
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "gaps.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "gaps.txt").write_text(result.table() + "\n")
    print(result.table())
    print(f"written {out / 'gaps.json'} and {out / 'gaps.txt'}")
    return 0
