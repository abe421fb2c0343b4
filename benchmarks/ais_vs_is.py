"""AIS beside importance sampling on a trained MNIST VAE: estimate, time and memory per image.

Loads a ``pyro-lvm train`` checkpoint, takes the first ``--n`` test images and estimates
log p(x) with :func:`pyro_lvm.evaluate.log_likelihood` (IS from the encoder, K samples)
and :func:`pyro_lvm.evaluate.ais_log_likelihood` (AIS from the prior, M temperatures,
S chains, HMC with L leapfrog steps), recording wall time and peak resident memory of
each (sampled every 2 ms, as in ``speed.py``). Optionally a BDMC sandwich on data simulated
from the same model (``--bdmc-n``).

    python benchmarks/ais_vs_is.py --checkpoint runs/vae/checkpoint.pt --n 100 \
        --is-samples 5000 --ais-steps 1000 --json benchmarks/results/ais/ais_vs_is.json
    python benchmarks/ais_vs_is.py --smoke --json /tmp/ais.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import PeakRSS  # noqa: E402

from pyro_lvm.data import load_binarized_mnist, load_digits  # noqa: E402
from pyro_lvm.evaluate import ais_log_likelihood, bdmc, log_likelihood  # noqa: E402
from pyro_lvm.models import VAE  # noqa: E402


def _timed(fn):
    with PeakRSS() as mem:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    return value, seconds, mem.gib


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--n", type=int, default=100, help="test images")
    p.add_argument("--is-samples", type=int, default=5000)
    p.add_argument("--ais-steps", type=int, default=1000)
    p.add_argument("--ais-chains", type=int, default=16)
    p.add_argument("--leapfrog", type=int, default=10)
    p.add_argument("--bdmc-n", type=int, default=0, help="simulated images for a BDMC sandwich")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pyro.set_rng_seed(a.seed)
    if a.checkpoint is None and not a.smoke:
        p.error("--checkpoint is required (a pyro-lvm train checkpoint), or pass --smoke")
    if a.smoke:
        vae = VAE(64, 2, hidden=(16,))
        x = load_digits("test")[: min(a.n, 10)]
        a.is_samples, a.ais_steps, a.ais_chains, a.leapfrog = 50, 10, 2, 2
        a.bdmc_n = min(a.bdmc_n, 5) or 5
    else:
        from pyro_lvm import load_run

        vae = load_run(a.checkpoint).model
        x = load_binarized_mnist("test")[: a.n]
    is_est, is_s, is_mem = _timed(
        lambda: log_likelihood(vae, vae.guide, x, num_samples=a.is_samples, data_chunk=100)
    )
    ais, ais_s, ais_mem = _timed(
        lambda: ais_log_likelihood(
            vae,
            x,
            num_steps=a.ais_steps,
            num_chains=a.ais_chains,
            num_leapfrog=a.leapfrog,
            data_chunk=100,
            return_result=True,
        )  # fmt: skip
    )
    n = len(x)
    rows = {
        "is": {
            "log_likelihood": is_est.mean().item(),
            "se": is_est.std().item() / n**0.5,
            "seconds_per_image": is_s / n,
            "peak_gib": is_mem,
            "budget": f"K={a.is_samples}",
        },
        "ais": {
            "log_likelihood": ais.log_likelihood.mean().item(),
            "se": ais.log_likelihood.std().item() / n**0.5,
            "seconds_per_image": ais_s / n,
            "peak_gib": ais_mem,
            "acceptance": ais.acceptance.mean().item(),
            "budget": f"M={a.ais_steps}, S={a.ais_chains}, L={a.leapfrog}",
        },
        "ais_minus_is_per_image": {
            "mean": (ais.log_likelihood - is_est).mean().item(),
            "se": (ais.log_likelihood - is_est).std().item() / n**0.5,
        },
    }
    if a.bdmc_n:
        template = x[: a.bdmc_n]
        sandwich = bdmc(
            vae, template, num_steps=a.ais_steps, num_chains=a.ais_chains,
            num_leapfrog=a.leapfrog,
        )  # fmt: skip
        rows["bdmc"] = {
            "n": a.bdmc_n,
            "lower": sandwich.lower.mean().item(),
            "upper": sandwich.upper.mean().item(),
            "gap": sandwich.gap.mean().item(),
        }
    result = {
        "rows": rows,
        "n": n,
        "args": {k: str(v) for k, v in vars(a).items()},
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads": a.threads,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("is", "ais"):
        r = rows[name]
        print(
            f"{name:>4}: {r['log_likelihood']:.2f} ± {r['se']:.2f}  "
            f"{r['seconds_per_image']:.3f} s/image  peak {r['peak_gib']:.2f} GiB  ({r['budget']})"
        )
    if "bdmc" in rows:
        print(f"bdmc: lower {rows['bdmc']['lower']:.2f} upper {rows['bdmc']['upper']:.2f}")
    return result


if __name__ == "__main__":
    main()
