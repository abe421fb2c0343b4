"""The VAE subcommands of ``pyro-lvm``: quickstart and train (``train --model`` and the
commands on a run folder are in :mod:`pyro_lvm.cli.runs`).

Imported only when one of them runs (see :data:`pyro_lvm.cli.parser.COMMANDS`); heavy imports
(torch, Pyro, matplotlib) happen inside the functions.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from pyro_lvm.cli.common import (
    DATASETS,
    add_device_argument,
    check_tensorboard,
    load_split,
    print_table,
    write_json,
)
from pyro_lvm.cli.parser import CLIError, int_list, positive_float, positive_int, seed_int
from pyro_lvm.provenance import provenance

__all__ = ["add_quickstart_arguments", "add_train_arguments", "cmd_quickstart", "cmd_train"]

#: ``pyro-lvm train``'s default test evaluation, sized so that ``--epochs 1`` on MNIST takes
#: about a minute on 2 CPU cores (benchmarks/RESULTS.md); ``--full-eval`` for the full one
TRAIN_EVALUATION = (100, 5000)  # (K, test points)


def _evaluate_test(args: argparse.Namespace, vae, x_test, device) -> dict:
    """The test evaluation sized by --eval-samples/--eval-points, or the full one."""
    from pyro_lvm.evaluate.report import FULL_EVAL_SAMPLES, evaluate_vae

    k, n = args.eval_samples, min(args.eval_points or len(x_test), len(x_test))
    if args.full_eval:
        k, n = FULL_EVAL_SAMPLES, len(x_test)
    hint = "" if args.full_eval else f"; --full-eval for K={FULL_EVAL_SAMPLES} on all"
    return evaluate_vae(
        vae, x_test[:n], k, device=device, progress=not args.quiet, of=len(x_test), hint=hint
    )


def _save_figures(vae, history, x, labels, image_shape, out: Path) -> list[str]:
    import matplotlib
    import torch

    matplotlib.use("Agg")

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
    from pyro_lvm.runs.folder import epochs_to_resume, prepare_run_folder
    from pyro_lvm.train import fit, resolve_device

    check_tensorboard(args)
    out = prepare_run_folder(out, resume=args.resume, force=args.force)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    x_train, _, image_shape = load_split(dataset, "train", args.data_root)
    x_valid, _, _ = load_split(dataset, "valid", args.data_root)
    x_test, test_labels, _ = load_split(dataset, "test", args.data_root)
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
    checkpoint = out / "checkpoint.pt"
    resumed_from = epochs_to_resume(checkpoint, config, args.epochs, args.resume)
    vae = VAE(
        config["x_dim"], config["z_dim"], tuple(config["hidden"]), network=NETWORKS[args.network]
    )
    device = resolve_device(args.device)
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
        resume=args.resume,
        progress=not args.quiet,
        extra={"config": config},
        device=device,
        log_dir=out,
        tensorboard=args.tensorboard,
        backend=args.backend,
    )
    seconds = time.perf_counter() - start
    if torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
        return {}  # a data-parallel run (issue 17): rank 0 alone evaluates and writes outputs
    vae.eval()
    metrics = _evaluate_test(args, vae, x_test, device)
    # what was used: a resume runs only with the checkpoint's settings (resume_mismatch)
    metrics.update(
        train_seconds=seconds,
        epochs=history.epochs,
        config=config,
        resumed_from_epoch=resumed_from,
        nproc=getattr(args, "nproc", 1),
        provenance=provenance(),
    )
    write_json(out / "metrics.json", metrics)
    write_json(out / "history.json", history.to_dict())
    vae.cpu()
    figures = _save_figures(vae, history, x_test, test_labels, image_shape, out)
    torch.set_grad_enabled(True)
    print_table(metrics, out, ["checkpoint.pt", "metrics.json", "history.json", *figures])
    return metrics


def cmd_quickstart(args: argparse.Namespace) -> int:
    """Train a small VAE on the bundled binarized digits and write metrics, checkpoint, figures."""
    _train(args, dataset="digits", out=Path(args.out))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:  # start the processes (issue 17)
        from pyro_lvm.cli.launch import launch

        return launch(args.nproc, args.argv)
    if args.model is not None:  # a user's factory (pyro_lvm.cli.runs)
        from pyro_lvm.cli.runs import train_model

        train_model(args, Path(args.out))
        return 0
    if args.model_args != "{}" or args.data is not None:
        flag = "--model-args" if args.model_args != "{}" else "--data"
        raise CLIError(f"{flag} goes with --model package.module:factory; add --model")
    _train(args, dataset=args.dataset, out=Path(args.out))
    return 0


def _add_training_arguments(
    p: argparse.ArgumentParser, *, epochs: int, z_dim: int, hidden: str, evaluation: tuple
) -> None:
    eval_samples, eval_points = evaluation
    from pyro_lvm.elbo import ESTIMATORS
    from pyro_lvm.nn import NETWORKS

    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--z-dim", type=positive_int, default=z_dim, help="latent dimension")
    p.add_argument(
        "--hidden",
        type=int_list,
        default=hidden,
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
    p.add_argument("--particles", type=positive_int, default=1, help="particles K per datum")
    p.add_argument("--epochs", type=positive_int, default=epochs, help="total training epochs")
    p.add_argument("--batch-size", type=positive_int, default=100, help="minibatch size")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (also the batch order)")
    p.add_argument(
        "--eval-samples",
        type=positive_int,
        default=eval_samples,
        help="importance samples K for the test log-likelihood",
    )
    p.add_argument(
        "--eval-points",
        type=positive_int,
        default=eval_points,
        help="evaluate the first N test points (None: all)",
    )
    p.add_argument(
        "--full-eval",
        action="store_true",
        help="the full test evaluation: K=5000 on every test point "
        "(overrides --eval-samples and --eval-points)",
    )
    p.add_argument("--data-root", default=None, help="folder with the data (or PYRO_LVM_DATA)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to OUT/tensorboard (needs tensorboard)",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "aten", "inductor"),
        default="auto",
        help="captured loss: Inductor once the run is long enough to pay its compile (auto)",
    )
    add_device_argument(p)
    runs = p.add_mutually_exclusive_group()
    runs.add_argument(
        "--resume", action="store_true", help="continue the run in OUT from its checkpoint"
    )
    runs.add_argument(
        "--force", action="store_true", help="replace a run already in OUT (its files are removed)"
    )


def add_quickstart_arguments(p: argparse.ArgumentParser) -> None:
    _add_training_arguments(p, epochs=150, z_dim=4, hidden="128", evaluation=(1000, None))


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="training data")
    _add_training_arguments(p, epochs=10, z_dim=50, hidden="400", evaluation=TRAIN_EVALUATION)
    p.add_argument(
        "--model",
        default=None,
        help="train what package.module:factory(**MODEL_ARGS) returns, a (model, guide) pair or "
        "a PyroModule with a .guide, instead of the built-in VAE",
    )
    p.add_argument(
        "--model-args", default="{}", help="the factory's keyword arguments as a JSON object"
    )
    p.add_argument(
        "--data",
        default=None,
        help="with --model: an .npz file of training points (array 'x'; further arrays go to "
        "the model as keyword arguments) instead of --dataset",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="data-parallel processes on this machine (through torch.distributed.run); "
        "--batch-size stays the global minibatch",
    )
