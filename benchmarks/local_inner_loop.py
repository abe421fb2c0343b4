"""Throughput of the per-datapoint inner loop against a hand-written PyTorch loop.

Both optimize the same thing: the mean-field Gaussian φ^i = (μ_i, log σ_i) of a minibatch
of B data points under a fixed VAE decoder (θ frozen), reparameterized ELBO gradients
(``--particles`` vectorized samples), Adam, per-datapoint relative-change tracking and
masking of converged rows.
``pyro_lvm`` runs :func:`pyro_lvm.inner_loop.optimize_local` with the registry's
``"elbo"`` estimator on a :class:`pyro_lvm.guides.LocalGaussianGuide`; the reference is a
plain tensor program. The figure is data-point inner steps per second (median over repeats)
and the median over repeats of the per-repeat ratio, measured alternately in one process.

    python benchmarks/local_inner_loop.py --json local_inner_loop.json
    python benchmarks/local_inner_loop.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

from pyro_lvm.elbo import make_estimator
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.inner_loop import optimize_local
from pyro_lvm.models import VAE
from pyro_lvm.provenance import provenance


def reference_loop(vae, x, loc0, log_scale0, lr, steps, tol, particles=1, fused=False):
    """Hand-written equivalent of optimize_local for the VAE with a Gaussian local guide.

    ``fused=False`` evaluates the same densities as the model (torch.distributions Normal and
    Bernoulli), so the timing difference is the library's machinery; ``fused=True`` writes
    log p(x | z) as one fused cross-entropy, faster than ``Bernoulli.log_prob`` itself.
    """
    loc = loc0.clone().requires_grad_()
    log_scale = log_scale0.clone().requires_grad_()
    optim = torch.optim.Adam([loc, log_scale], lr=lr)
    active = torch.ones(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        scale = log_scale.exp()
        z = loc + scale * torch.randn((particles,) + loc.shape)
        logits = vae.decoder(z)
        if fused:
            bce = F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
            log_px = -bce.sum(-1)
            log_pz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_qz = -0.5 * ((z - loc) / scale) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
            log_qz = log_qz.sum(-1)
        else:
            log_px = dist.Bernoulli(logits=logits, validate_args=False).log_prob(x).sum(-1)
            log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
        loss = -(log_px + log_pz - log_qz).sum() / particles
        grads = torch.autograd.grad(loss, [loc, log_scale])
        old = [loc.detach().clone(), log_scale.detach().clone()]
        loc.grad, log_scale.grad = grads
        optim.step()
        with torch.no_grad():
            change = torch.zeros(x.shape[0])
            norm = torch.zeros(x.shape[0])
            for leaf, prev in zip((loc, log_scale), old, strict=False):
                leaf.copy_(torch.where(active[:, None], leaf, prev))
                change += (leaf - prev).pow(2).sum(-1)
                norm += prev.pow(2).sum(-1)
            active &= change.sqrt() >= tol * norm.sqrt().clamp(min=1.0)
        if not bool(active.any()):
            break
    return loc.detach(), log_scale.detach()


def pyro_loop(vae, guide, x, lr, steps, tol, estimator):
    return optimize_local(vae, guide, x, None, estimator, lr=lr, max_steps=steps, tol=tol)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="data points B")
    parser.add_argument("--steps", type=int, default=50, help="inner steps per repeat")
    parser.add_argument("--particles", type=int, default=1, help="vectorized ELBO particles")
    parser.add_argument("--z-dim", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--x-dim", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this thread's CPU time (with --threads 1, steadier on a shared machine)",
    )
    args = parser.parse_args(argv)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    if args.smoke:
        args.batch, args.steps, args.repeats, args.hidden, args.x_dim = 32, 5, 2, 32, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float32)
    pyro.set_rng_seed(args.seed)
    warnings.filterwarnings("ignore", message=".*was not registered in the param store.*")
    pyro.enable_validation(False)
    vae = VAE(args.x_dim, args.z_dim, hidden=(args.hidden,))
    # θ keeps requires_grad (as inside fit_local); both loops differentiate only φ
    x = torch.bernoulli(torch.full((args.batch, args.x_dim), 0.2))
    tol = 0.0  # run every step in both loops: the figure is steps per second
    times = {"pyro_lvm": [], "reference": [], "reference_fused": []}
    # one guide and one estimator, as in fit_local: the traced inner loss is built and
    # verified in the first (discarded) round and reused after
    guide = LocalGaussianGuide(args.batch, args.z_dim)
    estimator = make_estimator("elbo", args.particles)
    for _ in range(args.repeats + 1):  # the first round warms up and is discarded
        with torch.no_grad():  # every round starts from φ = (0, log σ = 0)
            guide.set_params(loc=torch.zeros(args.batch, args.z_dim),
                             scale=torch.zeros(args.batch, args.z_dim))  # fmt: skip
        t0 = clock()
        pyro_loop(vae, guide, x, 0.05, args.steps, tol, estimator)
        t1 = clock()
        zeros = torch.zeros(args.batch, args.z_dim)
        reference_loop(vae, x, zeros, zeros, 0.05, args.steps, tol, args.particles)
        t2 = clock()
        reference_loop(vae, x, zeros, zeros, 0.05, args.steps, tol, args.particles, fused=True)
        t3 = clock()
        times["pyro_lvm"].append(t1 - t0)
        times["reference"].append(t2 - t1)
        times["reference_fused"].append(t3 - t2)
    rates = {k: args.batch * args.steps / statistics.median(v[1:]) for k, v in times.items()}
    # median of the per-repeat ratios (as benchmarks/speed.py): drift between repeats cancels
    ratio, ratio_fused = (
        statistics.median(r / p for r, p in zip(times[k][1:], times["pyro_lvm"][1:], strict=True))
        for k in ("reference", "reference_fused")
    )
    result = {
        "benchmark": "local_inner_loop",
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "seed": args.seed,
        "datapoint_steps_per_second": rates,
        "ratio_pyro_lvm_over_reference": ratio,
        "ratio_pyro_lvm_over_reference_fused": ratio_fused,
        "seconds_per_repeat": times,
        "provenance": provenance(),
    }
    print(f"{'loop':<16} {'datapoint-steps/s':>18}")
    for k, v in rates.items():
        print(f"{k:<16} {v:18.0f}")
    print(f"ratio pyro_lvm / reference: {ratio:.3f} (fused reference: {ratio_fused:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
