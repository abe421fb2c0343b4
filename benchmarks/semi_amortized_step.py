"""How SemiAmortizedGuide's default step size was chosen: test ELBO on the bundled digits.

For VAEs trained on the bundled 8x8 digits (as ``pyro-lvm quickstart`` trains them, shorter),
refine the encoder's q(z|x) by T inner SVI steps of size eta and report the test ELBO per
point (``elbo_estimate`` with K samples) for each eta, next to the amortized one (T = 0), and
the gain over it with the standard error of the paired differences (each estimate starts
from the same random seed).
Writes benchmarks/results/semi_amortized_step.json.

    python benchmarks/semi_amortized_step.py [--epochs 40] [--seeds 0 1] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyro

from pyro_lvm.data import load_digits
from pyro_lvm.evaluate.loglik import elbo_estimate
from pyro_lvm.guides import SemiAmortizedGuide
from pyro_lvm.models import VAE
from pyro_lvm.provenance import provenance
from pyro_lvm.train import fit

ETAS = (0.003, 0.01, 0.03, 0.1, 0.3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=10, help="T, inner steps at evaluation")
    p.add_argument("--samples", type=int, default=20, help="K of the test ELBO")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    a = p.parse_args()
    x_train, x_test = load_digits("train"), load_digits("test")
    rows = []
    start = time.perf_counter()
    for seed in a.seeds:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        vae = VAE(64, 4, hidden=(128,))
        fit(vae, vae.guide, x_train, num_epochs=a.epochs, batch_size=100, seed=seed,
            progress=False)  # fmt: skip
        vae.eval()
        base = None
        for eta in (0.0, *ETAS):
            guide = vae.guide if eta == 0 else SemiAmortizedGuide(
                vae, vae.guide, eval_steps=a.steps, step_size=eta
            )  # fmt: skip
            if eta:
                guide.eval()
            pyro.set_rng_seed(100 + seed)
            elbo = elbo_estimate(vae, guide, x_test, num_samples=a.samples)
            base = elbo if base is None else base
            diff = elbo - base  # the same random numbers (seed), so the difference is paired
            rows.append({
                "gain_vs_amortized": float(diff.mean()),
                "gain_stderr": float(diff.std() / len(diff) ** 0.5),
                "seed": seed, "step_size": eta, "steps": 0 if eta == 0 else a.steps,
                "test_elbo": float(elbo.mean()),
                "stderr": float(elbo.std() / len(elbo) ** 0.5),
            })  # fmt: skip
            print(rows[-1], flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "epochs": a.epochs, "samples": a.samples, "steps": a.steps,
               "seconds": time.perf_counter() - start, "provenance": provenance()}  # fmt: skip
    (out / "semi_amortized_step.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
