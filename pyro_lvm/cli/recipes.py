"""Recipes for labelled and conditional data (M2, CVAE) and the ``inspect``/``conditional`` CLI.

Each recipe trains with :func:`~pyro_lvm.train.fit` on named tensors, evaluates, and writes
JSON plus a figure; the benchmarks (``benchmarks/labels.py``) and the CLI both call them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import pyro
from pyro.infer import TraceEnum_ELBO

__all__ = ["train_cvae", "train_m2"]


def _write(out: Path | None, name: str, payload: dict) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def train_m2(
    num_labelled: int,
    *,
    z_dim: int = 16,
    hidden: tuple[int, ...] = (256,),
    num_epochs: int = 50,
    batch_size: int = 100,
    lr: float = 3e-3,
    alpha: float | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[Any, dict]:
    """Train :class:`~pyro_lvm.models.M2` on the digits with ``num_labelled`` labels.

    The split is :func:`~pyro_lvm.data.labelled_digits` (balanced, seeded by ``seed``); the
    loss ``TraceEnum_ELBO`` enumerates the hidden labels. Returns ``(m2, metrics)`` with the
    test accuracy of q(y | x) and the test log p(x) (IS, K = 100, labels not given). With
    ``out``, writes ``checkpoint.pt``, ``metrics.json`` and ``class_samples.png`` there.
    """
    from pyro_lvm import plot
    from pyro_lvm.data import labelled_digits
    from pyro_lvm.evaluate import class_samples, log_likelihood
    from pyro_lvm.models import M2
    from pyro_lvm.train import fit

    out = None if out is None else Path(out)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    train = labelled_digits("train", num_labelled, seed=seed)
    test = labelled_digits("test")
    m2 = M2(64, 10, z_dim, hidden, num_labelled=num_labelled, alpha=alpha)
    tic = time.perf_counter()
    history = fit(
        m2,
        m2.guide,
        train,
        loss=TraceEnum_ELBO(max_plate_nesting=1),
        optimizer=pyro.optim.Adam({"lr": lr}),
        num_epochs=num_epochs,
        batch_size=batch_size,
        seed=seed,
        checkpoint=None if out is None else out / "checkpoint.pt",
        resume=resume,
        progress=progress,
    )
    metrics = {
        "model": "m2",
        "num_labelled": num_labelled,
        "epochs": history.epochs,
        "train_seconds": time.perf_counter() - tic,
        "test_accuracy": m2.accuracy(test["x"], test["y"]),
        "test_log_likelihood": float(log_likelihood(m2, m2.guide, test["x"], 100).mean()),
        "seed": seed,
    }
    _write(out, "metrics.json", metrics)
    if out is not None:
        plot.plot_class_samples(class_samples(m2, 8), (8, 8), path=out / "class_samples.png")
    return m2, metrics


def train_cvae(
    dataset: str = "digits",
    *,
    observed: tuple[int, ...] = (0,),
    z_dim: int = 16,
    hidden: tuple[int, ...] = (500,),
    num_epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    num_samples: int = 100,
    num_test: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
) -> tuple[Any, dict]:
    """Train a :class:`~pyro_lvm.models.ConditionalVAE` on quadrant completion.

    ``dataset`` is ``"digits"`` or ``"mnist"`` (binarized); the input c is the ``observed``
    quadrants, the output x the others. Returns ``(cvae, metrics)`` with the test
    conditional log-likelihood :math:`\\log p(x \\mid c)` by importance sampling (K =
    ``num_samples``) on the first ``num_test`` test images. With ``out``, writes
    ``checkpoint.pt``, ``metrics.json`` and ``completions.png``.
    """
    from pyro_lvm import plot
    from pyro_lvm.data import load_binarized_mnist, load_digits, quadrant_mask, split_quadrants
    from pyro_lvm.evaluate import complete_quadrants, log_likelihood
    from pyro_lvm.models import ConditionalVAE
    from pyro_lvm.train import fit

    if dataset not in ("digits", "mnist"):
        raise ValueError(f"dataset must be 'digits' or 'mnist', got {dataset!r}")
    out = None if out is None else Path(out)
    load = load_digits if dataset == "digits" else lambda s: load_binarized_mnist(s, root=data_root)
    side = 8 if dataset == "digits" else 28
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    train, test_images = split_quadrants(load("train"), observed), load("test")[:num_test]
    test = split_quadrants(test_images, observed)
    cvae = ConditionalVAE(train["x"].shape[1], train["c"].shape[1], z_dim, hidden)
    tic = time.perf_counter()
    history = fit(
        cvae,
        cvae.guide,
        train,
        optimizer=pyro.optim.Adam({"lr": lr}),
        num_epochs=num_epochs,
        batch_size=batch_size,
        seed=seed,
        checkpoint=None if out is None else out / "checkpoint.pt",
        resume=resume,
        progress=progress,
    )
    seconds = time.perf_counter() - tic
    cll = log_likelihood(cvae, cvae.guide, test, num_samples, sample_chunk=50, data_chunk=500)
    metrics = {
        "model": "cvae",
        "dataset": dataset,
        "observed_quadrants": list(observed),
        "epochs": history.epochs,
        "train_seconds": seconds,
        "test_conditional_log_likelihood": float(cll.mean()),
        "test_conditional_log_likelihood_stderr": float(cll.std() / len(cll) ** 0.5),
        "num_samples": num_samples,
        "num_test": len(cll),
        "seed": seed,
    }
    _write(out, "metrics.json", metrics)
    if out is not None:
        shown = test_images[:8]
        plot.plot_completions(
            shown,
            complete_quadrants(cvae, shown, observed, 4),
            quadrant_mask(side, observed),
            (side, side),
            path=out / "completions.png",
        )
    return cvae, metrics


def add_conditional_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-lvm conditional``."""
    from pyro_lvm.cli.parser import positive_int, seed_int

    p.add_argument("--model", choices=("m2", "cvae"), required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", type=positive_int, default=100, help="M2: labelled training digits")
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits", help="CVAE data")
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--data-root", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def conditional_main(args: argparse.Namespace) -> int:
    """``pyro-lvm conditional``: train M2 or a CVAE, print and write metrics and a figure."""
    from pyro_lvm.cli.parser import CLIError

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CLIError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    common = dict(seed=args.seed, out=args.out, resume=args.resume, progress=not args.quiet)
    if args.epochs is not None:
        common["num_epochs"] = args.epochs
    if args.model == "m2":
        _, metrics = train_m2(args.labels, **common)
        figure = "class_samples.png"
    else:
        _, metrics = train_cvae(args.dataset, data_root=args.data_root, **common)
        figure = "completions.png"
    for key, value in sorted(metrics.items()):
        print(f"{key:<40} {value}")
    print(f"outputs in {args.out}: metrics.json {figure} checkpoint.pt")
    return 0


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``pyro-lvm inspect``."""
    p.add_argument("run", help="a run folder written by pyro-lvm train (or its checkpoint)")
    p.add_argument("--data", default=None, help=".npz file of the points (array 'x')")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--reconstruct", default="0,1,2,3,4,5,6,7", help="indices, comma separated")
    p.add_argument(
        "--interpolate", default="0,1", help="pairs of indices a,b[,c,d...] to interpolate"
    )
    p.add_argument("--steps", type=int, default=8, help="points on each interpolation path")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's)")


def _indices(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def inspect_main(args: argparse.Namespace) -> int:
    """``pyro-lvm inspect``: reconstructions of chosen indices and latent interpolations."""
    from pyro_lvm import plot
    from pyro_lvm.cli.parser import CLIError
    from pyro_lvm.cli.runs import restore, run_data
    from pyro_lvm.evaluate import interpolate, reconstructions

    run = restore(args.run)
    vae = run.model
    missing = [m for m in ("encode", "decode") if not callable(getattr(vae, m, None))]
    if missing:
        raise CLIError(
            f"the model of {run.folder} ({type(vae).__name__}) has no {' or '.join(missing)} "
            "method; `pyro-lvm inspect` needs encode(x) -> q(z|x) and decode(z) -> p(x|z)"
        )
    x, _, shape = run_data(run, args.split, args.data, args.data_root)
    if isinstance(x, dict) or not shape:
        raise CLIError(f"{run.folder}: inspect draws images; the run records no image shape")
    shape = tuple(shape)
    out = Path(args.out) if args.out else run.folder
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    chosen, rec = reconstructions(vae, x, _indices(args.reconstruct))
    plot.plot_reconstructions(chosen, rec, shape, path=out / "reconstructions_chosen.png")
    pairs = _indices(args.interpolate)
    if len(pairs) < 2 or len(pairs) % 2:
        raise ValueError(f"--interpolate needs pairs of indices, got {args.interpolate!r}")
    if any(not 0 <= i < len(x) for i in pairs):
        raise ValueError(f"--interpolate indices must lie in 0..{len(x) - 1}, got {pairs}")
    paths = interpolate(vae, x[pairs[0::2]], x[pairs[1::2]], args.steps)
    plot.plot_interpolations(paths, shape, path=out / "interpolation.png")
    print(f"wrote {out / 'reconstructions_chosen.png'} and {out / 'interpolation.png'}")
    return 0
