"""Discrete-latent estimators (issue 27): VIMCO's collapse, and the DisARM paper's comparison.

    python benchmarks/discrete_estimators.py vimco --out benchmarks/results/discrete/vimco
    python benchmarks/discrete_estimators.py mnist --steps 1000 --marks 4 --draws 20 \
        --nets linear --out benchmarks/results/discrete/mnist   # and --nets nonlinear
    python benchmarks/discrete_estimators.py mnist --smoke --out /tmp/disc   # < 1 min, digits

``vimco``: DiscreteVAE (16 Bernoulli bits, one hidden layer of 200) on the binarized digits,
trained by ``fit`` (minibatches of 100 out of 1297, so a subsample scale of 13) with VIMCO at
K = 2, 5, 20 and the leave-one-out score function at K = 5: test ELBO and mean |encoder
logit| per epoch; then the encoder gradient's SNR against K at initialization
(Rainforth et al. 2018, arXiv:1802.04537) for VIMCO and the leave-one-out score function.

``mnist``: the comparison of Dong, Mnih & Tucker (2020, arXiv:2006.10680, Fig. 2/3): a
200-bit Bernoulli latent layer on statically binarized MNIST, linear (784-200) and
nonlinear (784-200-200-200, hidden layers of 200) encoder and decoder, trained by Adam on
minibatches of 50 with every estimator at the same number of model evaluations per step
(``--evaluations``, default 6: ARM/DisARM 3 pairs, REBAR/RELAX 2 samples, the others K = 6).
Records the training ELBO (on a fixed set of 1000 training images, 1 sample each) and the
encoder gradient's variance and SNR (``gradient_moments`` of the trained estimator
instance on a fixed minibatch) at several steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro
import torch
from matplotlib.figure import Figure
from pyro.infer import SVI

from pyro_lvm.data import load_binarized_mnist, load_digits
from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate import elbo_estimate
from pyro_lvm.models import DiscreteVAE
from pyro_lvm.provenance import provenance
from pyro_lvm.train import fit
from pyro_lvm.variance import gradient_moments
from pyro_lvm.variance.training import particles_for_cost

MNIST_ESTIMATORS = (
    "disarm", "arm", "relax", "rebar", "score-function-loo-baseline", "vimco",
    "score-function-nvil",
)  # fmt: skip


def _encoder_moments(elbo, vae, x, draws, seed):
    with elbo.frozen_state():
        m = gradient_moments(elbo, vae, vae.guide, x, num_draws=draws, seed=seed, jit=False)
    g = m.groups["guide"]
    return {"variance": g.variance, "snr_mean": g.snr_mean}


def run_vimco(args) -> dict:
    x, x_test = load_digits("train"), load_digits("test")
    epochs = 2 if args.smoke else 10
    runs = [("vimco", 2), ("vimco", 5), ("vimco", 20), ("score-function-loo-baseline", 5)]
    curves = {}
    for name, k in runs:
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        vae = DiscreteVAE(64, 16)
        rec = {"elbo": [], "abs_logit": []}

        def log(history, vae=vae, rec=rec):
            with torch.no_grad():
                rec["abs_logit"].append(float(vae.encoder(x).abs().mean()))
            rec["elbo"].append(float(elbo_estimate(vae, vae.guide, x_test, 20).mean()))

        fit(vae, vae.guide, x, loss=name, num_particles=k, num_epochs=epochs, seed=args.seed,
            optimizer=pyro.optim.Adam({"lr": 1e-3}), progress=False, callbacks=[log])  # fmt: skip
        curves[f"{name} K={k}"] = rec
        print(name, k, rec["elbo"][-1], rec["abs_logit"][-1], flush=True)
    snr = {}
    ks = [2, 5] if args.smoke else [2, 5, 20, 50]
    for name in ("vimco", "score-function-loo-baseline"):
        for k in ks:
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            vae = DiscreteVAE(64, 16)
            m = _encoder_moments(make_estimator(name, k), vae, x[:100], args.draws, args.seed)
            snr.setdefault(name, []).append((k, m["snr_mean"], m["variance"]))
    fig = Figure(figsize=(13, 3.6))
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    for label, rec in curves.items():
        epochs_axis = range(1, len(rec["elbo"]) + 1)
        axes[0].plot(epochs_axis, rec["elbo"], marker="o", label=label)
        axes[1].plot(epochs_axis, rec["abs_logit"], marker="o", label=label)
    for name, pts in snr.items():
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    axes[0].set(xlabel="epoch", ylabel="test ELBO (nats)", title="DiscreteVAE, 16 bits, digits")
    axes[1].set(xlabel="epoch", ylabel="mean |encoder logit|", title="encoder saturation")
    axes[2].set(xscale="log", yscale="log", xlabel="K", ylabel="mean SNR, encoder gradient",
                title="encoder SNR at initialization")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return {"curves": curves, "snr_vs_k": snr, "figure": fig}


def _mnist_data(args):
    if args.smoke:
        x = load_digits("train")
        return x, x[:200]
    x = load_binarized_mnist("train")
    return x, x[:1000]


def run_mnist(args) -> dict:
    x, x_eval = _mnist_data(args)
    d = x.shape[-1]
    latents = 8 if args.smoke else 200
    steps = 20 if args.smoke else args.steps
    marks = sorted({0, *range(0, steps + 1, max(1, steps // args.marks))})
    x_var = x[:50]
    results = {}
    wanted = args.nets.split(",")
    nets = [n for n in (("linear", ()), ("nonlinear", (200, 200))) if n[0] in wanted]
    for net, hidden in nets:
        for name in args.estimators.split(","):
            k = particles_for_cost(name, args.evaluations)
            pyro.clear_param_store()
            pyro.set_rng_seed(args.seed)
            vae = DiscreteVAE(d, latents, hidden=hidden if not args.smoke else (16,) * len(hidden))
            elbo = make_estimator(name, k)
            svi = SVI(vae, vae.guide, pyro.optim.Adam({"lr": args.lr}), elbo)
            gen = torch.Generator().manual_seed(args.seed)
            rec = {"step": [], "elbo": [], "variance": [], "snr_mean": [], "k": k}
            tic, done = time.perf_counter(), 0
            for mark in marks:
                for _ in range(mark - done):
                    idx = torch.randint(len(x), (args.batch,), generator=gen)
                    svi.step(x[idx])
                done = mark
                with torch.no_grad():
                    value = float(elbo_estimate(vae, vae.guide, x_eval, 1).mean())
                m = _encoder_moments(elbo, vae, x_var, args.draws, args.seed + mark)
                for key, v in (("step", mark), ("elbo", value), *m.items()):
                    rec[key].append(v)
            rec["seconds"] = time.perf_counter() - tic
            results[f"{net}/{name}"] = rec
            print(net, name, k, [round(v, 1) for v in rec["elbo"]], f"{rec['seconds']:.0f}s",
                  flush=True)  # fmt: skip
    fig = Figure(figsize=(10, 3.5 * len(nets)))
    for row, (net, _) in enumerate(nets):
        ax_e = fig.add_subplot(len(nets), 2, 2 * row + 1)
        ax_v = fig.add_subplot(len(nets), 2, 2 * row + 2)
        for key, rec in results.items():
            if key.startswith(net + "/"):
                label = key.split("/")[1]
                ax_e.plot(rec["step"], rec["elbo"], marker=".", label=label)
                ax_v.plot(rec["step"], rec["variance"], marker=".", label=label)
        ax_e.set(xlabel="step", ylabel="train ELBO (1000 images)", title=f"{net}: ELBO")
        ax_v.set(xlabel="step", ylabel="encoder grad. variance", yscale="log",
                 title=f"{net}: gradient variance")  # fmt: skip
        ax_e.legend(fontsize=7)
    fig.tight_layout()
    return {"runs": results, "figure": fig}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("study", choices=("vimco", "mnist"))
    p.add_argument("--out", default="benchmarks/results/discrete")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draws", type=int, default=50, help="gradient draws per measurement")
    p.add_argument("--steps", type=int, default=1500, help="mnist: SVI steps")
    p.add_argument("--marks", type=int, default=6, help="mnist: measurements along training")
    p.add_argument("--evaluations", type=int, default=6, help="mnist: model evaluations/step")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--estimators", default=",".join(MNIST_ESTIMATORS))
    p.add_argument("--nets", default="linear,nonlinear", help="mnist: which networks")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.draws = 3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = (run_vimco if args.study == "vimco" else run_mnist)(args)
    stem = args.study if args.study == "vimco" else f"mnist_{args.nets.replace(',', '_')}"
    result.pop("figure").savefig(out / f"{stem}.png", dpi=100)
    meta = {"args": vars(args), "provenance": provenance()}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **result}, default=str))
    print(f"wrote {out}/{stem}.png and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
