"""Command-line interface: ``pyro-lvm quickstart|train|evaluate|sample|variance|gaps``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

DATASETS = ("digits", "mnist")


class CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _load_split(dataset: str, split: str, root: str | None):
    from pyro_lvm import data

    if dataset == "digits":
        x, labels = data.load_digits(split, return_labels=True)
        return x, labels, (8, 8)
    if dataset == "mnist":
        return data.load_binarized_mnist(split, root=root), None, (28, 28)
    raise CLIError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _evaluate_vae(vae, x, num_samples: int) -> dict[str, float]:
    """Test ELBO, IS log-likelihood and the autoencoder decomposition, per data point."""
    from pyro_lvm.evaluate import elbo_decomposition, log_likelihood

    terms = elbo_decomposition(vae, vae.guide, x, num_samples=1)
    loglik = log_likelihood(vae, vae.guide, x, num_samples=num_samples)
    summary = {k: float(v) for k, v in terms.summary().items()}
    summary.update(
        log_likelihood=float(loglik.mean()),
        log_likelihood_stderr=float(loglik.std() / len(loglik) ** 0.5),
        num_samples=num_samples,
        num_points=len(x),
    )
    return summary


def _save_figures(vae, history, x, labels, image_shape, out: Path) -> list[str]:
    import torch

    from pyro_lvm import plot

    written = []
    if history is not None:
        plot.plot_training_curves(history, path=out / "training_curves.png")
        written.append("training_curves.png")
    plot.plot_image_grid(
        vae.sample(64),
        image_shape=image_shape,
        path=out / "samples.png",
        title="ancestral samples (mean of p(x|z))",
    )
    written.append("samples.png")
    shown = x[:16]
    plot.plot_reconstructions(
        shown, vae.reconstruct(shown), image_shape=image_shape, path=out / "reconstructions.png"
    )
    written.append("reconstructions.png")
    with torch.no_grad():
        z = vae.encode(x).mean
    plot.plot_latent_scatter(z, labels=labels, path=out / "latents.png")
    written.append("latents.png")
    return written


def _train(args: argparse.Namespace, *, dataset: str, out: Path) -> dict:
    import pyro
    import torch

    from pyro_lvm.models import VAE
    from pyro_lvm.nn import NETWORKS
    from pyro_lvm.train import fit

    out.mkdir(parents=True, exist_ok=True)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x_train, _, image_shape = _load_split(dataset, "train", args.data_root)
    x_valid, _, _ = _load_split(dataset, "valid", args.data_root)
    x_test, test_labels, _ = _load_split(dataset, "test", args.data_root)
    config = dict(
        dataset=dataset,
        x_dim=int(x_train.shape[1]),
        z_dim=args.z_dim,
        hidden=list(args.hidden),
        network=args.network,
        likelihood="bernoulli",
        estimator=args.estimator,
        num_particles=args.particles,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        image_shape=list(image_shape),
    )
    vae = VAE(
        config["x_dim"], config["z_dim"], tuple(config["hidden"]), network=NETWORKS[args.network]
    )
    checkpoint = out / "checkpoint.pt"
    start = time.perf_counter()
    history = fit(
        vae,
        vae.guide,
        x_train,
        loss=args.estimator,
        num_particles=args.particles,
        optimizer=pyro.optim.Adam({"lr": args.lr}),
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        valid_data=x_valid,
        seed=args.seed,
        checkpoint=checkpoint,
        resume=getattr(args, "resume", False),
        progress=not args.quiet,
        extra={"config": config},
    )
    seconds = time.perf_counter() - start
    vae.eval()
    metrics = _evaluate_vae(vae, x_test, args.eval_samples)
    metrics.update(train_seconds=seconds, epochs=args.epochs, config=config)
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "history.json", history.to_dict())
    figures = _save_figures(vae, history, x_test, test_labels, image_shape, out)
    torch.set_grad_enabled(True)
    _print_table(metrics, out, figures)
    return metrics


def _print_table(metrics: dict, out: Path, figures: Sequence[str] = ()) -> None:
    rows = [
        ("test ELBO (nats)", metrics.get("elbo")),
        (f"test log p(x), IS K={metrics.get('num_samples')}", metrics.get("log_likelihood")),
        (f"test log p(x), AIS M={metrics.get('ais_steps')}", metrics.get("ais_log_likelihood")),
        ("reconstruction E_q[log p(x|z)]", metrics.get("reconstruction")),
        ("KL(q(z|x) || p(z)) (nats)", metrics.get("kl")),
        ("rate (bits)", metrics.get("rate_bits")),
    ]
    for name, value in rows:
        if value is not None:
            print(f"{name:<34} {value:10.3f}")
    print(f"outputs in {out}: metrics.json {' '.join(figures)}")


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train a small VAE on the bundled binarized digits and write metrics, checkpoint, figures."""
    _train(args, dataset="digits", out=Path(args.out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _train(args, dataset=args.dataset, out=Path(args.out))
    return 0


def _restore(checkpoint_path: str):
    from pyro_lvm.train import vae_from_checkpoint

    return vae_from_checkpoint(checkpoint_path)


def cmd_evaluate(args: argparse.Namespace) -> int:
    vae, config = _restore(args.checkpoint)
    x, _, _ = _load_split(config["dataset"], args.split, args.data_root)
    if args.n is not None:
        x = x[: args.n]
    if args.method == "ais":  # issue #20: AIS instead of importance sampling
        from pyro_lvm.evaluate.ais import ais_summary

        metrics = ais_summary(vae, x, args.ais_steps, args.ais_chains)
    else:
        metrics = _evaluate_vae(vae, x, args.num_samples)
    metrics.update(split=args.split, checkpoint=str(args.checkpoint))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"evaluation_{args.split}.json", metrics)
    _print_table(metrics, out, [f"evaluation_{args.split}.json"])
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    import pyro

    from pyro_lvm import plot

    vae, config = _restore(args.checkpoint)
    pyro.set_rng_seed(args.seed)
    images = vae.sample(args.n, mean=not args.binary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot.plot_image_grid(
        images,
        image_shape=tuple(config["image_shape"]),
        path=out,
        title=f"{args.n} ancestral samples",
    )
    print(f"wrote {out}")
    return 0


def _add_training_arguments(
    p: argparse.ArgumentParser, *, epochs: int, z_dim: int, hidden: str
) -> None:
    from pyro_lvm.elbo import ESTIMATORS
    from pyro_lvm.nn import NETWORKS

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--z-dim", type=_positive_int, default=z_dim, help="latent dimension")
    p.add_argument(
        "--hidden",
        type=_int_list,
        default=_int_list(hidden),
        help="hidden widths, comma separated (decoder; the encoder mirrors them)",
    )
    p.add_argument(
        "--network",
        default="mlp",
        choices=sorted(NETWORKS),
        help="hidden layers: 'mlp' (ReLU) or 'gated' (GatedDense, as in the VampPrior paper)",
    )
    p.add_argument(
        "--estimator",
        default="elbo",
        choices=sorted(ESTIMATORS),
        help="estimator name from pyro_lvm.elbo.ESTIMATORS",
    )
    p.add_argument("--particles", type=_positive_int, default=1, help="particles K per datum")
    p.add_argument("--epochs", type=_positive_int, default=epochs)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=1000,
        help="importance samples K for the test log-likelihood",
    )
    p.add_argument("--data-root", default=None, help="folder with the data (or PYRO_LVM_DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-lvm", description="Latent variable models and variational inference on Pyro."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quickstart", help="train a VAE on the bundled 8x8 digits (minutes, CPU)")
    _add_training_arguments(p, epochs=150, z_dim=4, hidden="128")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="train a VAE with any registered estimator")
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    _add_training_arguments(p, epochs=10, z_dim=50, hidden="400")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test ELBO and IS log-likelihood of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test")
    p.add_argument("--num-samples", type=_positive_int, default=1000)
    p.add_argument(
        "--method", choices=("is", "ais"), default="is",
        help="log-likelihood by importance sampling (K = --num-samples) or AIS from the prior",
    )  # fmt: skip
    p.add_argument("--ais-steps", type=_positive_int, default=500, help="AIS temperatures M")
    p.add_argument("--ais-chains", type=_positive_int, default=16, help="AIS chains per point")
    p.add_argument("--n", type=_positive_int, default=None, help="evaluate the first n points")
    p.add_argument("--data-root", default=None)
    p.add_argument("--out", default=None, help="output folder (default: the checkpoint's)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="a PNG grid of ancestral samples from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--n", type=_positive_int, default=64)
    p.add_argument("--out", default="samples.png", help="PNG path")
    p.add_argument("--binary", action="store_true", help="draw x ~ p(x|z), not its mean")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)

    for name, module, adder, runner, help_ in _PLUGINS:
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_)
        getattr(mod, adder)(p)
        p.set_defaults(func=getattr(mod, runner))
    return parser


# Subcommands that live beside the subsystem they drive: (name, module, add-args, run, help).
_PLUGINS: list[tuple[str, str, str, str, str]] = [
    (
        "variance",
        "pyro_lvm.variance.cli",
        "add_variance_arguments",
        "variance_main",
        "variance, SNR and cost of gradient estimators side by side",
    ),
    (
        "gaps",
        "pyro_lvm.evaluate.gaps",
        "add_gaps_arguments",
        "gaps_main",
        "approximation and amortization gaps of a trained VAE checkpoint",
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyro-lvm``; returns the exit status (2 on a user error)."""
    import matplotlib

    matplotlib.use("Agg")
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        message = " ".join(str(err).split())  # one line, however the message was wrapped
        print(f"pyro-lvm {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
