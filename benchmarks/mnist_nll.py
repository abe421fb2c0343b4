"""Static-MNIST test log-likelihood of VAE variants, beside the published numbers.

Each configuration is trained with :func:`pyro_lvm.train.fit` on statically binarized MNIST
(50,000 training images) and scored on the 10,000 test images by importance sampling,
``-log p(x) ≈ -log (1/K) Σ_k p(x, z_k) / q(z_k | x)`` with K = 5000 (Burda et al. 2016).
The model scored is the one with the best validation bound (the 10,000 validation images,
checked after every epoch); training stops after ``--patience`` epochs without a better one,
as in the papers, because these models overfit static MNIST within tens of epochs.
Training resumes from ``OUT/CONFIG.pt`` when it exists, so a long schedule can run in pieces:
``--epochs`` is the most to reach. The JSON records every figure with its budget (epochs,
best epoch, seconds), the machine, versions and the commit; absolute times hold for that
machine.

    python benchmarks/mnist_nll.py --config vae --epochs 100 --out runs/mnist_nll
    python benchmarks/mnist_nll.py --config all --epochs 2000 --out runs/mnist_nll  # resumes
    python benchmarks/mnist_nll.py --smoke --out /tmp/mnist_nll_smoke

The VampPrior paper's recipe (gated dense layers, 100 epochs of linear KL warm-up, Adam lr
5e-4, patience 50 counted after the warm-up; the validation bound is always the plain one):

    python benchmarks/mnist_nll.py --config vae --network gated --warmup-epochs 100 --lr 5e-4 \
        --patience 50 --epochs 2000 --out runs/mnist_nll_recipe

The paper's networks also clip the log-variance of every Gaussian head to [-6, 2] (Hardtanh)
and its pseudo-inputs to [0, 1], and its optimizer divides each parameter's gradient by its
norm before Adam ("AdamNormGrad"); ``--paper-heads`` and ``--optimizer adam-normgrad`` add
these. Its two-layer model gives x (or z1) and z2 their own first gated layer before a joint
one (``--input-merge branch``, hvae-vamp only), and it initialises every linear layer
He-normal (``--init he``); by default its pseudo-inputs start near 0.05 rather than at
training images (``--pseudo-init random``). ``runs/...`` folders must not mix these
choices: a resume with other ones than the checkpoint's is refused.

``--device cuda`` trains and scores on an accelerator (the permutations and pseudo-input
draws stay on the CPU, so the data order matches a CPU run; the samples come from the CUDA
generator, so the figures do not).

``--smoke`` trains every configuration for one epoch on the bundled 8x8 digits (or a slice of
MNIST with ``--smoke-mnist``) with K = 20 and small networks: a check that the script runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import pyro
import torch

from pyro_lvm.data import load_binarized_mnist, load_digits
from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import log_likelihood
from pyro_lvm.evaluate.collapse import active_units
from pyro_lvm.guides import AmortizedFlowGuide, AmortizedGaussianGuide
from pyro_lvm.handlers import KLWeightedELBO
from pyro_lvm.models import VAE, HierarchicalVAE, VampPrior
from pyro_lvm.nn import NETWORKS, NetworkFactory, he_init_, mlp
from pyro_lvm.provenance import provenance
from pyro_lvm.train import EarlyStopping, fit, normalized_gradient_adam, read_checkpoint

#: the VampPrior paper's Hardtanh bounds: log-variances of Gaussian heads, binary pseudo-inputs
PAPER_LOG_VAR_RANGE, PAPER_PSEUDO_INPUT_RANGE = (-6.0, 2.0), (0.0, 1.0)

#: the paper code's random pseudo-inputs for static MNIST: mean and standard deviation
PAPER_PSEUDO_INPUT_INIT = (0.05, 0.01)

#: ``--optimizer`` choices: name -> pyro.optim factory of ``{"lr": ...}``
OPTIMIZERS = {"adam": pyro.optim.Adam, "adam-normgrad": normalized_gradient_adam}

#: configuration -> (estimator name, particles, published NLL in nats with its source).
CONFIGS: dict[str, dict] = {
    "vae": {
        "loss": "elbo",
        "K": 1,
        "published": {
            "VampPrior paper, VAE (Tomczak & Welling 2018)": 88.56,
            "IWAE paper, VAE k=1 (Burda et al. 2016)": 88.71,
            "Rezende & Mohamed 2015, diagonal Gaussian": 89.9,
        },
    },
    "iwae-k50": {
        "loss": "iwae",
        "K": 50,
        "published": {"IWAE paper, IWAE k=50 (Burda et al. 2016)": 87.10},
    },
    "vae-vamp": {"loss": "elbo", "K": 1, "published": {"VampPrior paper, VAE + VampPrior": 85.57}},
    "hvae-vamp": {
        "loss": "elbo",
        "K": 1,
        "published": {"VampPrior paper, HVAE + VampPrior": 83.19, "VampPrior paper, HVAE": 86.05},
    },
    "vae-flow": {
        "loss": "elbo",
        "K": 1,
        "published": {"Rezende & Mohamed 2015, planar flow K=80": 85.1},
    },
}


def build(
    name: str,
    x_dim: int,
    z_dim: int,
    hidden: tuple[int, ...],
    num_pseudo: int,
    num_flows: int,
    init_inputs: torch.Tensor,
    network: NetworkFactory = mlp,
    paper_heads: bool = False,
    input_merge: str = "concat",
    init: str = "default",
    flow_hidden: tuple[int, ...] | None = None,
):
    """The model (with its guide as ``.guide``) of configuration ``name``; ``network`` builds
    every encoder and decoder (:func:`~pyro_lvm.nn.gated_mlp` for the VampPrior paper's).

    ``paper_heads`` clips the Gaussian heads' log-variances to [-6, 2] and the pseudo-inputs to
    [0, 1], as the VampPrior paper's Hardtanh layers do (not defined for the flow guide).
    ``input_merge="branch"`` gives the HVAE's two-input networks a first layer per input (the
    paper's; HVAE only); ``init="he"`` re-initialises every linear layer He-normal (the paper's).
    ``flow_hidden`` sizes each planar layer's hypernetwork (default ``(2 * z_dim,)``); ``()``
    makes the flow parameters affine in the encoder's output, as Rezende & Mohamed's.
    """
    if input_merge != "concat" and name != "hvae-vamp":
        raise ValueError(f"input_merge={input_merge!r} is defined for hvae-vamp, not {name!r}")
    model = _build(
        name,
        x_dim,
        z_dim,
        hidden,
        num_pseudo,
        num_flows,
        init_inputs,
        network,
        paper_heads,
        input_merge,
        (2 * z_dim,) if flow_hidden is None else tuple(flow_hidden),
    )
    if init == "he":
        he_init_(model)  # the guide is a submodule; pseudo-inputs are not linear layers
    elif init != "default":
        raise ValueError(f"init must be 'default' or 'he', got {init!r}")
    return model


def _build(
    name,
    x_dim,
    z_dim,
    hidden,
    num_pseudo,
    num_flows,
    init_inputs,
    network,
    paper_heads,
    input_merge,
    flow_hidden,
):
    log_var_range = PAPER_LOG_VAR_RANGE if paper_heads else None
    vamp_range = PAPER_PSEUDO_INPUT_RANGE if paper_heads else None
    if name in ("vae", "iwae-k50"):
        guide = AmortizedGaussianGuide(
            x_dim, z_dim, hidden, network=network, log_var_range=log_var_range
        )
        return VAE(x_dim, z_dim, hidden=hidden, guide=guide, network=network)
    if name == "vae-vamp":
        guide = AmortizedGaussianGuide(
            x_dim, z_dim, hidden, network=network, log_var_range=log_var_range
        )
        prior = VampPrior(
            guide.posterior, x_dim, init=init_inputs[:num_pseudo], pseudo_input_range=vamp_range
        )
        return VAE(x_dim, z_dim, hidden=hidden, prior=prior, guide=guide, network=network)
    if name == "hvae-vamp":
        hvae = HierarchicalVAE(
            x_dim,
            z_dim,
            z_dim,
            hidden=hidden,
            network=network,
            log_var_range=log_var_range,
            input_merge=input_merge,
        )
        hvae.prior = VampPrior(
            hvae.guide.posterior,
            x_dim,
            init=init_inputs[:num_pseudo],
            pseudo_input_range=vamp_range,
        )
        return hvae
    if paper_heads:
        raise ValueError(
            f"--paper-heads is defined for the Gaussian guides, not for {name!r}; drop the flag"
        )
    if name == "vae-flow":
        guide = AmortizedFlowGuide(
            x_dim,
            z_dim,
            flow="planar",
            num_flows=num_flows,
            hidden=hidden,
            context_dim=2 * z_dim,
            flow_hidden=flow_hidden,
            network=network,
        )
        return VAE(x_dim, z_dim, hidden=hidden, guide=guide, network=network)
    raise ValueError(f"unknown config {name!r}; choose from {sorted(CONFIGS)} or 'all'")


def _data(args):
    """Train, validation and test sets, and the data's name."""
    if args.smoke and not args.smoke_mnist:
        train, test = load_digits("train"), load_digits("test")
        return train[100:], train[:100], test, "digits-8x8 (smoke)"
    train = load_binarized_mnist("train", root=args.data_root)
    valid = load_binarized_mnist("valid", root=args.data_root)
    test = load_binarized_mnist("test", root=args.data_root)
    if args.smoke:
        return train[:500], valid[:100], test[:100], "static MNIST slice (smoke)"
    if args.test_points:
        test = test[: args.test_points]
    return train, valid, test, "static binarized MNIST (Larochelle & Murray 2011)"


def run_config(
    name: str, args, train: torch.Tensor, valid: torch.Tensor, test: torch.Tensor, out: Path
) -> dict:
    cfg = CONFIGS[name]
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    # drawn on the CPU, so a run on an accelerator starts from the same pseudo-inputs
    if args.pseudo_init == "data":  # random training images
        pseudo_init = train[torch.randperm(train.shape[0], device="cpu")[: args.num_pseudo]]
    else:  # the paper code's default for static MNIST: N(0.05, 0.01²), in [0, 1]
        noise = torch.randn(args.num_pseudo, train.shape[1], device="cpu")
        pseudo_init = (PAPER_PSEUDO_INPUT_INIT[0] + PAPER_PSEUDO_INPUT_INIT[1] * noise).clamp(0, 1)
        pseudo_init = pseudo_init.to(train.device)
    model = build(
        name,
        train.shape[1],
        args.z_dim,
        tuple(args.hidden),
        args.num_pseudo,
        args.num_flows,
        pseudo_init,
        network=NETWORKS[args.network],
        paper_heads=args.paper_heads,
        input_merge=args.input_merge,
        init=args.init,
        flow_hidden=args.flow_hidden,
    )
    guide = model.guide
    ckpt = out / f"{name}.pt"
    # choices a checkpoint's shapes do not reveal; older checkpoints predate both (defaults)
    recipe = {
        "paper_heads": args.paper_heads,
        "optimizer": args.optimizer,
        "input_merge": args.input_merge,
        "init": args.init,
        "pseudo_init": args.pseudo_init,
        "flow_hidden": args.flow_hidden,
    }
    done = _epochs_done(ckpt, recipe)
    steps_per_epoch = math.ceil(train.shape[0] / args.batch_size)
    state = {"epoch": done}

    def beta() -> float:  # linear KL warm-up: β = e / W in epoch e = 1..W (Tomczak & Welling)
        if args.warmup_epochs == 0:
            return 1.0
        return min(1.0, (state["epoch"] + 1) / args.warmup_epochs)

    def next_epoch(history) -> None:
        state["epoch"] = history.epochs

    loss, particles, valid_loss = cfg["loss"], cfg["K"], None
    if args.warmup_epochs:
        # train on the annealed bound, validate (and stop) on the bound itself
        valid_loss = make_estimator(loss, particles)
        loss, particles = KLWeightedELBO(valid_loss, beta), 1
    # the parameters of the best validation bound are the ones scored, as in the papers; no
    # stopping during the warm-up, whose β < 1 moves the bound for reasons of its own
    stopper = EarlyStopping(
        model,
        guide,
        out / f"{name}.best.pt",
        patience=args.patience,
        min_epochs=args.warmup_epochs,
    )
    history = fit(
        model,
        guide,
        train,
        loss=loss,
        num_particles=particles,
        optimizer=OPTIMIZERS[args.optimizer]({"lr": args.lr}),
        num_epochs=args.epochs,
        batch_size=args.batch_size,
        valid_data=valid,
        valid_loss=valid_loss,
        seed=args.seed,
        checkpoint=ckpt,
        resume=ckpt.exists(),
        progress=not args.smoke,
        callbacks=[next_epoch, stopper],
        extra={"config": name, **recipe},
    )
    best_epoch = stopper.restore()
    t0 = time.perf_counter()
    pyro.set_rng_seed(args.seed + 1)
    ll = log_likelihood(
        model,
        guide,
        test,
        num_samples=args.eval_samples,
        sample_chunk=min(args.eval_samples, 100),
        data_chunk=args.data_chunk,
    )
    eval_seconds = time.perf_counter() - t0
    top = guide.posterior  # q(z | x), or q(z2 | x) for the hierarchical model
    au = active_units(top, test[:1000], num_samples=32)
    return {
        "nll": -ll.mean().item(),
        "nll_se": (ll.std() / math.sqrt(ll.numel())).item(),
        "train_epoch_losses": history.epoch_losses[-3:],
        "epochs": history.epochs,
        "best_epoch": best_epoch,
        "best_valid_elbo": stopper.best,
        "patience": args.patience,
        "steps": history.epochs * steps_per_epoch,
        "train_seconds": history.seconds,
        "eval_seconds": eval_seconds,
        "eval_samples": args.eval_samples,
        "test_points": int(test.shape[0]),
        "active_units": au.num_active,
        "loss": cfg["loss"],
        "num_particles": cfg["K"],
        "warmup_epochs": args.warmup_epochs,
        "paper_heads": args.paper_heads,  # the optimizer's name is in setup["optimizer"]
        "input_merge": args.input_merge,
        "init": args.init,
        "pseudo_init": args.pseudo_init,
        "published": cfg["published"],
    }


def _epochs_done(ckpt: Path, recipe: dict) -> int:
    """Epochs ``ckpt`` holds (0 when absent); refuse to resume it with other choices than the
    ones it was trained with."""
    if not ckpt.exists():
        return 0
    saved_state = read_checkpoint(ckpt)
    extra = (saved_state.get("metadata") or {}).get("extra") or {}
    saved = {
        "paper_heads": extra.get("paper_heads", False),
        "optimizer": extra.get("optimizer", "adam"),
        "input_merge": extra.get("input_merge", "concat"),
        "init": extra.get("init", "default"),
        "pseudo_init": extra.get("pseudo_init", "data"),
        "flow_hidden": extra.get("flow_hidden"),
    }
    diff = {k: (saved[k], v) for k, v in recipe.items() if saved[k] != v}
    if diff:
        told = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(
            f"{ckpt} was trained with other choices ({told}); resume with the checkpoint's "
            "choices or pass another --out"
        )
    return saved_state["epoch"]


def table(results: dict) -> str:
    """A markdown table: our number and its budget beside the published numbers."""
    lines = [
        "| config | objective | -log p(x) (ours) | epochs | train time | eval time "
        "| active units | published |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        pub = "; ".join(f"{k}: {v}" for k, v in r["published"].items())
        objective = r["loss"] if r["num_particles"] == 1 else f"{r['loss']} K={r['num_particles']}"
        if r.get("architecture", {}).get("activation") == "GatedDense":
            objective += ", gated units"
        if r.get("warmup_epochs"):
            objective += f", KL warm-up {r['warmup_epochs']} ep"
        if r.get("paper_heads"):
            objective += ", clipped heads"
        if r.get("input_merge", "concat") != "concat":
            objective += f", {r['input_merge']} inputs"
        if r.get("init", "default") != "default":
            objective += f", {r['init']} init"
        if r.get("architecture", {}).get("flow_hidden") == [] and "flow" in name:
            objective += ", affine flow parameters"
        if r.get("pseudo_init", "data") != "data" and "vamp" in name:
            objective += f", {r['pseudo_init']} pseudo-inputs"
        optimizer = r.get("optimizer", {}).get("name", "adam").lower()
        if optimizer != "adam":
            objective += f", {optimizer}"
        machine = r.get("machine", {})
        where = machine.get("device", "cpu")
        where = f"{machine.get('torch_threads', '?')} thr" if where == "cpu" else where
        lines.append(
            f"| {name} | {objective} | {r['nll']:.2f} ± {r['nll_se']:.2f} | {r['epochs']} | "
            f"{r['train_seconds'] / 60:.1f} min ({where}) | {r['eval_seconds'] / 60:.1f} min "
            f"| {r['active_units']} | {pub} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        action="append",
        default=None,
        help=f"one of {sorted(CONFIGS)} or 'all' (repeatable; default all)",
    )
    p.add_argument("--epochs", type=int, default=100, help="total epochs to reach (resumes)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--z-dim", type=int, default=40)
    p.add_argument("--hidden", type=int, nargs="+", default=[300, 300])
    p.add_argument("--num-pseudo", type=int, default=500)
    p.add_argument("--num-flows", type=int, default=10)
    p.add_argument(
        "--flow-hidden",
        type=int,
        nargs="*",
        default=None,
        help="hidden widths of each planar layer's hypernetwork (default: 2 * z-dim); no "
        "value: flow parameters affine in the encoder's output (Rezende & Mohamed's)",
    )
    p.add_argument("--warmup-epochs", type=int, default=0, help="linear KL warm-up length")
    p.add_argument(
        "--network",
        default="mlp",
        choices=sorted(NETWORKS),
        help="hidden layers: 'mlp' (ReLU) or 'gated' (GatedDense, the VampPrior paper's)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=20,
        help="stop after this many epochs without a better validation bound",
    )
    p.add_argument(
        "--paper-heads",
        action="store_true",
        help="clip Gaussian heads' log-variances to [-6, 2] and pseudo-inputs to [0, 1] "
        "(the VampPrior paper's Hardtanh layers)",
    )
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=sorted(OPTIMIZERS),
        help="'adam-normgrad': Adam on per-tensor normalized gradients (the VampPrior paper's)",
    )
    p.add_argument(
        "--input-merge",
        default="concat",
        choices=("concat", "branch"),
        help="hvae-vamp's q(z1|x,z2) and p(x|z1,z2): 'branch' gives each input its own first "
        "layer before a joint one (the VampPrior paper's)",
    )
    p.add_argument(
        "--init",
        default="default",
        choices=("default", "he"),
        help="'he': He-normal weights in every linear layer (the VampPrior paper's)",
    )
    p.add_argument(
        "--pseudo-init",
        default="data",
        choices=("data", "random"),
        help="VampPrior pseudo-inputs start at random training images ('data') or at "
        "N(0.05, 0.01^2) ('random', the paper code's default for static MNIST)",
    )
    p.add_argument("--eval-samples", type=int, default=5000, help="K of the IS estimate")
    p.add_argument("--test-points", type=int, default=0, help="score the first N (0: all)")
    p.add_argument("--data-chunk", type=int, default=100)
    p.add_argument("--data-root", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--device",
        default="cpu",
        help="where to train and score: 'cpu', 'cuda' or 'cuda:N' (torch.set_default_device)",
    )
    p.add_argument("--out", default="runs/mnist_nll")
    p.add_argument("--smoke", action="store_true", help="1 epoch, tiny nets, K=20, digits")
    p.add_argument("--smoke-mnist", action="store_true", help="smoke on an MNIST slice")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.eval_samples, args.z_dim, args.hidden = 1, 20, 4, [32]
        args.num_pseudo, args.num_flows, args.batch_size = 10, 2, 100
    names = args.config or ["all"]
    names = sorted(CONFIGS) if "all" in names else names
    for n in names:
        if n not in CONFIGS:
            p.error(f"unknown config {n!r}; choose from {sorted(CONFIGS)} or 'all'")
    if args.paper_heads and "vae-flow" in names:
        p.error("--paper-heads is defined for the Gaussian guides, not for vae-flow")
    if args.input_merge != "concat" and names != ["hvae-vamp"]:
        p.error("--input-merge branch is defined for hvae-vamp only; pass --config hvae-vamp")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only 'cpu' and 'cuda' runs are supported")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.smoke:
        # Adam's second-moment buffers for always-off MNIST pixels turn subnormal and slow
        # every step (benchmarks/RESULTS.md §2); a real run owns its process and flushes them
        # (the smoke run may share a test process, whose global state it leaves alone).
        torch.set_flush_denormal(True)
    train, valid, test, data_name = _data(args)
    if device.type == "cuda":
        # every tensor the run creates (parameters, samples, indices) lands on the accelerator;
        # the process is the script's own, as with torch.set_flush_denormal above
        torch.set_default_device(device)
        train, valid, test = (t.to(device) for t in (train, valid, test))
    setup = {
        "data": data_name,
        "architecture": {
            "z_dim": args.z_dim,
            "hidden": args.hidden,
            "activation": "GatedDense" if args.network == "gated" else "ReLU",
            "num_pseudo": args.num_pseudo,
            "num_flows": args.num_flows,
            "flow_hidden": args.flow_hidden,
        },
        "optimizer": {"name": args.optimizer, "lr": args.lr, "batch_size": args.batch_size},
        "seed": args.seed,
        "smoke": args.smoke,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "provenance": provenance(),
    }
    for name in names:
        result = {**run_config(name, args, train, valid, test, out), **setup}
        _write_json_atomic(out / f"{name}.json", result)
        print(f"{name}: -log p(x) = {result['nll']:.2f}", flush=True)
    results = collect(out)
    _write_json_atomic(out / "mnist_nll.json", {"results": results})
    print(table(results))
    print(f"wrote {out / 'mnist_nll.json'}")
    return 0


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def collect(out: Path) -> dict:
    """Every configuration's result in ``out`` (one ``CONFIG.json`` each), in table order.

    Each configuration writes its own file, so runs of different configurations can share
    ``out`` from separate processes.
    """
    return {
        name: json.loads((out / f"{name}.json").read_text())
        for name in CONFIGS
        if (out / f"{name}.json").exists()
    }


if __name__ == "__main__":
    raise SystemExit(main())
