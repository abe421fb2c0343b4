"""The ``pyro-lvm`` subcommands on a run: ``train --model`` (a user's factory), and ``evaluate``
and ``sample`` on a run folder, for every model that :func:`pyro_lvm.load_run` restores.

Imported only when one of them runs; heavy imports happen inside the functions.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pyro_lvm.cli.common import (
    add_device_argument,
    check_tensorboard,
    load_split,
    output_folder,
    print_table,
    write_json,
)
from pyro_lvm.cli.parser import CLIError, positive_int, seed_int
from pyro_lvm.provenance import provenance

__all__ = [
    "add_evaluate_arguments",
    "add_sample_arguments",
    "cmd_evaluate",
    "cmd_sample",
    "data_file",
    "restore",
    "run_data",
    "train_model",
]

#: flags of the built-in VAE that ``train --model`` does not take (the factory's arguments go
#: in ``--model-args``)
VAE_FLAGS = ("--z-dim", "--hidden", "--network")


def restore(path: str, flag: str = "RUN") -> Any:
    """:func:`pyro_lvm.load_run` of a run folder or checkpoint given on the command line."""
    from pyro_lvm.runs.load import checkpoint_path, load_run

    return load_run(checkpoint_path(path, flag))


def run_data(run: Any, split: str, data: str | None, data_root: str | None):
    """The data a command evaluates a run on: ``--data FILE.npz`` when given, else the split
    of the built-in data set the run was trained on. Returns ``(data, labels, image_shape)``;
    ``data`` is a tensor or named tensors; :func:`data_file` says which were used.

    :raises CLIError: when neither is known (naming ``--data``).
    """
    from pyro_lvm.data.named import read_named_npz

    config = run.extra.get("config") or {}
    shape = config.get("image_shape")
    data = data_file(run, data)
    if data is not None:
        named = read_named_npz(data)  # the file's points, whatever --split says
        _check_width(run, named["x"], f"--data {data}")
        return (named["x"] if len(named) == 1 else named), named.get("y"), shape
    if config.get("dataset"):
        x, labels, image_shape = load_split(config["dataset"], split, data_root)
        _check_width(run, x, f"the {config['dataset']} data set")
        return x, labels, shape or image_shape
    raise CLIError(
        f"{run.checkpoint} records no built-in data set (trained on a file or from Python); "
        "pass --data FILE.npz with the points to use (an array 'x', more arrays as the "
        "model's keyword arguments)"
    )


def data_file(run: Any, data: str | None) -> str | None:
    """``--data``, or else the file the run was trained on (``train --data``) when it exists."""
    recorded = (run.extra.get("config") or {}).get("data")
    if data is None and recorded and Path(recorded).is_file():
        return recorded
    return data


def _check_width(run: Any, x: Any, what: str) -> None:
    """Refuse data whose points differ in shape from those the run was trained on."""
    recorded = ((run.record or {}).get("input") or {}).get("x", {}).get("shape")
    if recorded is None and "x_dim" in (run.extra.get("config") or {}):
        recorded = [run.extra["config"]["x_dim"]]  # a run of the previous format
    if recorded is not None and list(x.shape[1:]) != list(recorded):
        raise CLIError(
            f"{what} has points of shape {tuple(x.shape[1:])} but the run in {run.folder} was "
            f"trained on points of shape {tuple(recorded)}; give data of that shape"
        )


def _model_and_guide(built: Any, target: str) -> tuple[Any, Any]:
    if isinstance(built, tuple) and len(built) == 2:
        return built
    if callable(built) and callable(getattr(built, "guide", None)):
        return built, built.guide
    raise CLIError(
        f"--model {target} returned {type(built).__name__}; the factory must return a "
        "(model, guide) pair or a PyroModule with a .guide"
    )


def train_model(args: argparse.Namespace, out: Path) -> dict:
    """``pyro-lvm train --model package.module:factory``: build ``factory(**model_args)``
    (recorded, so the run comes back with :func:`pyro_lvm.load_run`), train it with ``fit`` on
    ``--data`` or ``--dataset``, evaluate it on the test split (or the training file) and write
    the run folder."""
    import pyro
    import torch

    from pyro_lvm.data.named import read_named_npz
    from pyro_lvm.runs.folder import epochs_to_resume, prepare_run_folder
    from pyro_lvm.spec import RecordError, build
    from pyro_lvm.train import fit, resolve_device

    given = [f for f in VAE_FLAGS if any(a == f or a.startswith(f + "=") for a in args.argv)]
    if given:
        raise CLIError(
            f"{given[0]} configures the built-in VAE; with --model pass the factory's arguments "
            "as --model-args '{\"name\": value}'"
        )
    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as e:
        raise CLIError(
            f"--model-args is not JSON ({e}); e.g. --model-args '{{\"z_dim\": 8}}'"
        ) from None
    if not isinstance(model_args, dict):
        raise CLIError(
            f"--model-args must be a JSON object of keyword arguments, got {model_args!r}"
        )
    check_tensorboard(args)
    out = prepare_run_folder(out, resume=args.resume, force=args.force)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    try:
        model, guide = _model_and_guide(build(args.model, **model_args), args.model)
    except RecordError as e:  # not importable, or --model-args it does not take
        raise CLIError(f"--model {args.model}: {e}") from None
    if args.data is not None:
        train = read_named_npz(args.data)
        valid, test = None, train
        source = {"data": str(Path(args.data).resolve())}
    else:
        train, _, shape = load_split(args.dataset, "train", args.data_root)
        valid, _, _ = load_split(args.dataset, "valid", args.data_root)
        test, _, _ = load_split(args.dataset, "test", args.data_root)
        source = {"dataset": args.dataset, "image_shape": list(shape)}
    config = dict(
        **source, model=args.model, model_args=model_args, estimator=args.estimator,
        num_particles=args.particles, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
    )  # fmt: skip
    checkpoint = out / "checkpoint.pt"
    resumed_from = epochs_to_resume(checkpoint, config, args.epochs, args.resume)
    device = resolve_device(args.device)
    start = time.perf_counter()
    history = fit(
        model, guide, train, loss=args.estimator, num_particles=args.particles, lr=args.lr,
        num_epochs=args.epochs, batch_size=args.batch_size, valid_data=valid, seed=args.seed,
        checkpoint=checkpoint, resume=args.resume, progress=not args.quiet,
        extra={"config": config}, device=device, log_dir=out, tensorboard=args.tensorboard,
        backend=args.backend,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # rank 0 alone evaluates and writes outputs
    metrics = evaluate_program(model, guide, test, args.eval_samples, args.eval_points)
    metrics.update(
        train_seconds=seconds, epochs=history.epochs, config=config, nproc=args.nproc,
        resumed_from_epoch=resumed_from, provenance=provenance(),
    )  # fmt: skip
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history.to_dict())
    written = ["checkpoint.pt", "metrics.json", "history.json"]
    if history.epoch_losses:
        import matplotlib

        matplotlib.use("Agg")
        from pyro_lvm import plot

        plot.plot_training_curves(history, path=out / "training_curves.png")
        written.append("training_curves.png")
    print_table(metrics, out, written)
    return metrics


def evaluate_program(model: Any, guide: Any, data: Any, num_samples: int, n: int | None) -> dict:
    """ELBO (one sample per point) and the IS log-likelihood with K = ``num_samples`` of the
    first ``n`` points of ``data`` (a tensor or named tensors), per data point."""
    import torch

    from pyro_lvm.evaluate.loglik import elbo_estimate, log_likelihood

    if isinstance(data, dict):
        n = min(n or len(data["x"]), len(data["x"]))
        data = {k: v[:n] for k, v in data.items()}
    else:
        n = min(n or len(data), len(data))
        data = data[:n]
    with torch.no_grad():
        elbo = elbo_estimate(model, guide, data, num_samples=1)
        loglik = log_likelihood(model, guide, data, num_samples=num_samples)
    se = float(loglik.std() / len(loglik) ** 0.5) if len(loglik) > 1 else 0.0
    return {
        "elbo": float(elbo.mean()),
        "log_likelihood": float(loglik.mean()),
        "log_likelihood_stderr": se,
        "num_samples": int(num_samples),
        "num_points": int(n),
    }


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``pyro-lvm evaluate RUN``: the bound and log-likelihood of a restored run."""
    from pyro_lvm.evaluate.report import evaluate_vae
    from pyro_lvm.train import resolve_device

    run = restore(args.run)
    out = output_folder(args.out, run.folder)  # before the long work
    data, _, _ = run_data(run, args.split, args.data, args.data_root)
    x = data["x"] if isinstance(data, dict) else data
    device, total = resolve_device(args.device), len(x)
    model, guide = run.model, run.guide
    if args.method in ("ais", "bdmc"):  # annealed importance sampling from the prior
        if isinstance(data, dict):
            raise CLIError(f"--method {args.method} takes unlabelled data ('x' alone)")
        from pyro_lvm.evaluate.ais import ais_summary, bdmc_summary

        x = x[: args.n].to(device)
        if hasattr(model, "to"):
            model.to(device)
        summary = ais_summary if args.method == "ais" else bdmc_summary
        metrics = summary(model, x, args.ais_steps, args.ais_chains)
    elif getattr(model, "guide", None) is guide and hasattr(model, "decode"):  # a VAE
        metrics = evaluate_vae(
            model, x[: args.n], args.num_samples, device=device, split=args.split, of=total,
            progress=not args.quiet,
        )  # fmt: skip
    else:
        metrics = evaluate_program(model, guide, data, args.num_samples, args.n)
    source = data_file(run, args.data)
    name = f"evaluation_{args.split if source is None else Path(source).stem}.json"
    metrics.update(
        split=args.split, checkpoint=str(run.checkpoint), data=source, provenance=provenance()
    )
    write_json(out / name, metrics)
    print_table(metrics, out, [name])
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """``pyro-lvm sample RUN``: a PNG grid of samples from a restored run's model."""
    import matplotlib
    import pyro

    matplotlib.use("Agg")

    from pyro_lvm import plot

    run = restore(args.run)
    sample = getattr(run.model, "sample", None)
    if not callable(sample):
        raise CLIError(
            f"the model of {run.folder} ({type(run.model).__name__}) has no sample(n) method, so "
            "`pyro-lvm sample` cannot draw from it; give the model a sample(n, mean=True) method"
        )
    shape = (run.extra.get("config") or {}).get("image_shape")
    if not shape:
        raise CLIError(
            f"{run.folder} records no image shape for its data; sample draws image grids only"
        )
    out = Path(args.out)
    if out.is_dir():
        raise CLIError(f"--out {out} is a folder; give the PNG file to write")
    pyro.set_rng_seed(args.seed)
    images = sample(args.n, mean=not args.binary)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot.plot_image_grid(
        images, image_shape=tuple(shape), path=out, title=f"{args.n} ancestral samples"
    )
    print(f"wrote {out}")
    return 0


def _add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", help="a run folder written by `pyro-lvm train --out` (or its checkpoint file)"
    )


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:

    _add_run_argument(p)
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="data")
    p.add_argument(
        "--data", default=None, help=".npz file of the points to evaluate (default: the run's "
        "built-in data set's --split)",
    )  # fmt: skip
    p.add_argument("--num-samples", type=positive_int, default=1000, help="importance samples K")
    p.add_argument(
        "--method", choices=("is", "ais", "bdmc"), default="is",
        help="log-likelihood by importance sampling (K = --num-samples), AIS from the prior, or "
        "BDMC (forward and reverse AIS on data simulated from the model: a sandwich)",
    )  # fmt: skip
    p.add_argument("--ais-steps", type=positive_int, default=500, help="AIS temperatures M")
    p.add_argument("--ais-chains", type=positive_int, default=16, help="AIS chains per point")
    p.add_argument("--n", type=positive_int, default=None, help="evaluate the first n points")
    p.add_argument("--data-root", default=None, help="folder with the data (or PYRO_LVM_DATA)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_argument(p)


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_argument(p)
    p.add_argument("--n", type=positive_int, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="PNG path")
    p.add_argument("--binary", action="store_true", help="draw x ~ p(x|z), not its mean")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed")
