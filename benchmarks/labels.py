"""Issue 21 figures: M2 accuracy vs labels, CVAE quadrant completion, discrete latents, conv VAE.

Usage (each part writes ``OUT/<part>.json`` and prints a markdown table)::

    python benchmarks/labels.py m2 [--smoke]
    python benchmarks/labels.py cvae [--smoke]
    python benchmarks/labels.py discrete [--smoke]
    python benchmarks/labels.py conv [--smoke]

Runs on one thread (``torch.set_num_threads(1)``) so that the figures come from one core.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch

from pyro_lvm.cli.recipes import train_cvae, train_m2
from pyro_lvm.data import labelled_digits, load_binarized_mnist, load_digits, split_quadrants
from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import elbo_estimate, log_likelihood
from pyro_lvm.models import VAE, DiscreteVAE, TemperatureSchedule
from pyro_lvm.nn import NETWORKS, mlp
from pyro_lvm.provenance import provenance
from pyro_lvm.train import fit
from pyro_lvm.variance import gradient_moments


def _meta(args) -> dict:
    return {"smoke": args.smoke, "seed": args.seed, **provenance()}


def _table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plain_classifier(num_labelled: int, seed: int, steps: int, hidden=(256,)) -> float:
    """Test accuracy of M2's classifier network trained by cross-entropy on the labels alone."""
    torch.manual_seed(seed)
    train, test = labelled_digits("train", num_labelled, seed=seed), labelled_digits("test")
    x, y = train["x"][train["y_mask"]], train["y"][train["y_mask"]]
    net = mlp(64, list(hidden), 10)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float((net(test["x"]).argmax(-1) == test["y"]).double().mean())


def run_m2(args) -> tuple[list[dict], list[str]]:
    labels = [50, 100] if args.smoke else args.labels
    seeds = [args.seed] if args.smoke else [args.seed + i for i in range(args.seeds)]
    epochs = 2 if args.smoke else 60
    rows = []
    for n in labels:
        for seed in seeds:
            _, m = train_m2(n, num_epochs=epochs, seed=seed)
            rows.append(
                {
                    "labels": n,
                    "seed": seed,
                    "m2_accuracy": m["test_accuracy"],
                    "classifier_accuracy": plain_classifier(n, seed, 20 if args.smoke else 500),
                    "m2_test_log_px": m["test_log_likelihood"],
                    "epochs": epochs,
                    "m2_seconds": m["train_seconds"],
                }
            )
            print(rows[-1], flush=True)
    cols = ["labels", "seed", "m2_accuracy", "classifier_accuracy", "m2_test_log_px", "m2_seconds"]
    return rows, cols


def run_cvae(args) -> tuple[list[dict], list[str]]:
    dataset = "digits" if args.smoke else "mnist"
    epochs = 1 if args.smoke else args.epochs or 10
    num_test = 100 if args.smoke else 2000
    rows = []
    _, m = train_cvae(
        dataset, num_epochs=epochs, num_test=num_test, seed=args.seed, num_samples=100
    )
    rows.append({"model": "CVAE", **m})
    # the deterministic baseline of Sohn et al.: p(x | c) = Bernoulli(f(c)), no latent
    pyro.set_rng_seed(args.seed)
    load = load_digits if dataset == "digits" else load_binarized_mnist
    train, test = split_quadrants(load("train")), split_quadrants(load("test")[:num_test])
    net = mlp(train["c"].shape[1], [500], train["x"].shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    tic = time.perf_counter()
    for _ in range(epochs):
        for idx in torch.randperm(len(train["x"])).split(100):
            opt.zero_grad()
            logits = net(train["c"][idx])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                logits, train["x"][idx], reduction="sum"
            )
            loss.backward()
            opt.step()
    with torch.no_grad():
        nll = torch.nn.functional.binary_cross_entropy_with_logits(
            net(test["c"]), test["x"], reduction="none"
        ).sum(-1)
    rows.append(
        {
            "model": "deterministic NN",
            "epochs": epochs,
            "train_seconds": time.perf_counter() - tic,
            "test_conditional_log_likelihood": -float(nll.mean()),
            "test_conditional_log_likelihood_stderr": float(nll.std() / len(nll) ** 0.5),
            "num_test": len(nll),
        }
    )
    cols = ["model", "epochs", "test_conditional_log_likelihood"]
    cols += ["test_conditional_log_likelihood_stderr", "num_test", "train_seconds"]
    return rows, cols


DISCRETE_RUNS = [
    # (label, estimator name, K, relaxed)
    ("score function", "score-function", 1, False),
    ("score function + NVIL baseline", "score-function-nvil", 1, False),
    ("score function + leave-one-out, K=5", "score-function-loo-baseline", 5, False),
    ("VIMCO, K=5", "vimco", 5, False),
    ("relaxed (Concrete), tau 1 -> 0.5", "elbo", 1, True),
]


def run_discrete(args) -> tuple[list[dict], list[str]]:
    epochs = 2 if args.smoke else 100
    x, x_test = load_digits("train"), load_digits("test")
    batch = x[:100]
    rows = []
    if args.smoke:
        x, x_test, batch = x[:100], x_test[:20], batch[:20]
    latents = [("bernoulli", 16)] if args.smoke else [("bernoulli", 16), ("categorical", 8)]
    runs = DISCRETE_RUNS[1::3] if args.smoke else DISCRETE_RUNS
    for latent, width in latents:
        for label, name, k, relaxed in runs:
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            vae = DiscreteVAE(64, width, latent=latent, num_categories=4, relaxed=relaxed)
            callbacks = [TemperatureSchedule(vae, 1.0, 0.5, 0.03)] if relaxed else []
            tic = time.perf_counter()
            fit(
                vae,
                vae.guide,
                x,
                loss=name,
                num_particles=k,
                optimizer=pyro.optim.Adam({"lr": 1e-3}),
                num_epochs=epochs,
                seed=args.seed,
                callbacks=callbacks,
                fast=not relaxed,  # the temperature is a Python number a trace would freeze
                progress=False,
            )
            seconds = time.perf_counter() - tic
            # the gradient of the training estimator at the trained parameters (R draws)
            moments = gradient_moments(
                make_estimator(name, k), vae, vae.guide, batch, num_draws=5 if args.smoke else 200,
                seed=args.seed, jit=False,
            )  # fmt: skip
            vae.relaxed = False  # every bound below is the discrete model's
            elbo = elbo_estimate(vae, vae.guide, x_test, 100)
            ll = log_likelihood(vae, vae.guide, x_test, 20 if args.smoke else 1000)
            rows.append(
                {
                    "latent": f"{latent} {width}" + ("x4" if latent == "categorical" else ""),
                    "estimator": label,
                    "test_elbo": float(elbo.mean()),
                    "test_log_px_is1000": float(ll.mean()),
                    "guide_grad_variance": moments.groups["guide"].variance,
                    "guide_snr_mean": moments.groups["guide"].snr_mean,
                    "model_grad_variance": moments.groups["model"].variance,
                    "epochs": epochs,
                    "train_seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    cols = ["latent", "estimator", "test_elbo", "test_log_px_is1000", "guide_grad_variance"]
    cols += ["guide_snr_mean", "model_grad_variance", "train_seconds"]
    return rows, cols


def run_conv(args) -> tuple[list[dict], list[str]]:
    dataset = "digits" if args.smoke else "mnist"
    epochs = 1 if args.smoke else args.epochs or 5
    load = load_digits if dataset == "digits" else load_binarized_mnist
    x, x_test = load("train"), load("test")[: 100 if args.smoke else 2000]
    rows = []
    for network, hidden in (("conv", (32, 64)), ("mlp", (400,))):
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        vae = VAE(x.shape[1], 32, hidden, network=NETWORKS[network])
        tic = time.perf_counter()
        fit(vae, vae.guide, x, num_epochs=epochs, seed=args.seed, progress=False)
        seconds = time.perf_counter() - tic
        ll = log_likelihood(vae, vae.guide, x_test, 100, sample_chunk=25, data_chunk=500)
        params = sum(p.numel() for p in vae.parameters())
        rows.append(
            {
                "dataset": dataset,
                "network": f"{network} {hidden}",
                "params": params,
                "epochs": epochs,
                "test_elbo": float(elbo_estimate(vae, vae.guide, x_test, 10).mean()),
                "test_log_px_is100": float(ll.mean()),
                "num_test": len(ll),
                "train_seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    cols = ["dataset", "network", "params", "epochs", "test_elbo", "test_log_px_is100"]
    return rows, cols + ["num_test", "train_seconds"]


PARTS = {"m2": run_m2, "cvae": run_cvae, "discrete": run_discrete, "conv": run_conv}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="cvae/conv epochs")
    parser.add_argument("--labels", type=int, nargs="+", default=[50, 100, 300, 1000], help="m2")
    parser.add_argument("--seeds", type=int, default=3, help="m2: seeds per label count")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "labels"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, cols = PARTS[args.part](args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": _meta(args), "rows": rows, "columns": cols}
    (out / f"{args.part}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(_table(rows, cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
