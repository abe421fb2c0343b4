"""Time one SVI step of pyro_lvm against its peers: NumPyro, Pyro, hand-written PyTorch, GEMMs.

One process, one thread (``torch.set_num_threads(1)``, XLA's CPU client on one thread), pinned
to one core with ``--core`` (or ``taskset``). For each group (architecture 784-H-Z, particles K,
bound) every path runs ``--steps`` steps per repeat, interleaved in an order rotated from repeat
to repeat (:func:`speed.time_group`); a path's figure is its median ms/step over repeats and
the median, over repeats, of its ratio to the hand-written PyTorch step of the same repeat.

Paths (a Bernoulli VAE with a one-hidden-layer ReLU MLP encoder and decoder, batch 100,
Adam 1e-3, K particles vectorized, the same plain ``model``/``guide`` pair for every Pyro path):

- ``gemm-floor``: the step's matrix multiplies alone (forward and backward, no bias, no
  pointwise work): the floor a step cannot beat on this core;
- ``torch-eager`` (the reference) and ``torch-compile`` (``torch.compile`` of the loss and of
  the optimizer step): the hand-written step with ``Adam(fused=True)``, ``--no-compile`` skips
  the latter; ``torch-foreach``: the same with ``Adam(foreach=True)`` (the reference before
  branch i26b, 2026-12-06; PyTorch's default Adam on CPU is the slower per-tensor loop);
- ``numpyro``: ``jax.jit(SVI.update)`` with ``Trace_ELBO(num_particles=K)`` or, for the
  ``iwae`` bound, ``RenyiELBO(alpha=0)``. Optional: ``pip install -e ".[peers]"`` (numpyro,
  jax); without it the path is skipped with a message;
- ``pyro-trace`` and ``pyro-jit``: ``pyro.infer.SVI`` with ``Trace_ELBO`` / ``JitTrace_ELBO``
  (the ``iwae`` bound: ``RenyiELBO(alpha=0)``, no Jit variant);
- ``fast-short``: ``FastSVI`` as a short run gets it (no plan: the aten graph);
- ``fast-long``: ``FastSVI`` as ``fit`` runs it for ``--planned-steps`` steps
  (``backend="auto"``, which compiles with Inductor where it pays);
- ``fast-inductor``: ``FastSVI(backend="inductor")``, the whole step compiled whatever the
  plan (``--no-inductor`` skips it);
- ``fast-loss-graph`` (``--loss-graph``): ``FastSVI``'s path of a ``before_update`` hook (a
  graph of the loss and gradients, then the eager optimizer, ``Adam(fused=True)`` since
  branch i26b (2026-12-06); before, ``foreach``: the path before the whole-step graph), for an A/B.

``--scheduler`` adds ``fast-scheduler`` and ``pyro-scheduler``: ``FastSVI`` and
``pyro.infer.SVI`` with ``pyro.optim.ExponentialLR`` over Adam, stepped every 10 steps (the
aten graph for ``FastSVI``; before 2026-12-06 it fell back to Pyro's SVI).

``--profile N`` adds torch.profiler's table of each path's top operators over N steps.

    taskset -c 1 python benchmarks/peers.py --json peers.json   # full run
    python benchmarks/peers.py --smoke                           # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from functools import partial

os.environ.setdefault(  # XLA on one thread, as torch (before jax is imported)
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pyro.infer import SVI, JitTrace_ELBO, RenyiELBO, Trace_ELBO  # noqa: E402
from speed import time_group, use_param_store  # noqa: E402

from pyro_lvm.elbo import make_estimator  # noqa: E402
from pyro_lvm.provenance import provenance  # noqa: E402
from pyro_lvm.train.fast import FastSVI  # noqa: E402

LR, BATCH, X_DIM = 1e-3, 100, 784
WARMUP = 30  # FastSVI: record, capture, verify, the Inductor decision (20) and its verify


DEVICE = torch.device("cpu")


def networks(hidden: int, z_dim: int, seed: int = 0):
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(
        torch.nn.Linear(X_DIM, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2 * z_dim)
    )
    dec = torch.nn.Sequential(
        torch.nn.Linear(z_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, X_DIM)
    )
    return enc.to(DEVICE), dec.to(DEVICE)


def pyro_pair(hidden: int, z_dim: int):
    """The plain model/guide pair of Pyro's VAE tutorial (``pyro.module`` + a data plate)."""
    enc, dec = networks(hidden, z_dim)

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", x.shape[0]):
            zero = x.new_zeros(x.shape[0], z_dim)
            z = pyro.sample("z", dist.Normal(zero, 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", x.shape[0]):
            loc, raw = enc(x).split(z_dim, dim=-1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    return model, guide


def torch_step(
    hidden: int, z_dim: int, x: torch.Tensor, k: int, bound: str, compile_=False, fused=True
):
    """The hand-written step: one Adam (``fused=True``, PyTorch's fastest Adam on CPU and
    CUDA; ``fused=False``: ``foreach=True``), the K-particle ELBO or IWAE bound."""
    enc, dec = networks(hidden, z_dim)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=LR, **({"fused": True} if fused else {"foreach": True}))

    def loss_fn(x, eps):
        loc, raw = enc(x).split(z_dim, dim=-1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * eps
        log_px = -F.binary_cross_entropy_with_logits(
            dec(z), x.expand(k, *x.shape), reduction="none"
        ).sum(-1)
        log_w = log_px + (-0.5 * z.square() + 0.5 * eps.square() + scale.log()).sum(-1)
        if bound == "iwae":
            return -(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(k)))).sum()
        return -log_w.mean(0).sum()

    run_loss, run_opt = loss_fn, opt.step
    if compile_:
        run_loss, run_opt = torch.compile(loss_fn), torch.compile(opt.step)

    def step() -> float:
        eps = torch.randn(k, x.shape[0], z_dim, device=x.device)
        loss = run_loss(x, eps)
        loss.backward()
        run_opt()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def gemm_floor(hidden: int, z_dim: int, k: int):
    """The step's GEMMs alone: forward, gradient of the weights and of each layer's input
    (not of the data). Returns ``(step, flops)``."""
    layers = [(BATCH, X_DIM, hidden, False), (BATCH, hidden, 2 * z_dim, True)]
    layers += [(BATCH * k, z_dim, hidden, True), (BATCH * k, hidden, X_DIM, True)]
    mats, flops = [], 0
    for m, n_in, n_out, grad_input in layers:
        a, w, g = (torch.randn(*s, device=DEVICE) for s in ((m, n_in), (n_in, n_out), (m, n_out)))
        mats.append((a, w, g, grad_input))
        flops += 2 * m * n_in * n_out * (3 if grad_input else 2)

    def step() -> float:
        for a, w, g, grad_input in mats:
            torch.mm(a, w)
            torch.mm(a.t(), g)
            if grad_input:
                torch.mm(g, w.t())
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return 0.0

    return step, flops


def numpyro_step(hidden: int, z_dim: int, x: torch.Tensor, k: int, bound: str):
    """``jax.jit(SVI.update)`` of the same VAE, or ``None`` when NumPyro is not installed."""
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import SVI as NSVI
        from numpyro.infer import RenyiELBO as NRenyi
        from numpyro.infer import Trace_ELBO as NTrace
        from numpyro.optim import Adam as NAdam
    except ImportError:
        return None
    if DEVICE.type != "cpu" and jax.default_backend() == "cpu":
        return None  # jax without its CUDA build: a CPU step beside GPU ones says nothing
    enc, dec = networks(hidden, z_dim)
    init = {f"enc{i}": m for i, m in enumerate(enc) if isinstance(m, torch.nn.Linear)}
    init |= {f"dec{i}": m for i, m in enumerate(dec) if isinstance(m, torch.nn.Linear)}
    as_jax = lambda t: jnp.asarray(t.detach().cpu().numpy())  # noqa: E731
    init = {n: (as_jax(m.weight.T), as_jax(m.bias)) for n, m in init.items()}

    def mlp(prefix, h, names):
        for i, name in enumerate(names):
            w0, b0 = init[name]
            h = h @ numpyro.param(f"{name}.w", w0) + numpyro.param(f"{name}.b", b0)
            h = jax.nn.relu(h) if i == 0 else h
        return h

    def model(x):
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", ndist.Normal(jnp.zeros((x.shape[0], z_dim)), 1.0).to_event(1))
            logits = mlp("dec", z, ["dec0", "dec2"])
            numpyro.sample("x", ndist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        with numpyro.plate("data", x.shape[0]):
            out = mlp("enc", x, ["enc0", "enc2"])
            loc, raw = out[..., :z_dim], out[..., z_dim:]
            numpyro.sample("z", ndist.Normal(loc, jax.nn.softplus(raw) + 1e-4).to_event(1))

    elbo = NRenyi(alpha=0, num_particles=k) if bound == "iwae" else NTrace(num_particles=k)
    svi = NSVI(model, guide, NAdam(LR), elbo)
    xj = jnp.asarray(x.cpu().numpy())
    state = [svi.init(jax.random.PRNGKey(0), xj)]
    update = jax.jit(svi.update)

    def step() -> float:
        state[0], loss = update(state[0], xj)
        return float(loss.block_until_ready())

    return step


def scheduled_step(hidden, z_dim, x, k, bound, fast: bool):
    """A step of ``FastSVI`` (aten graph) or Pyro's ``SVI`` with a ``pyro.optim`` scheduler
    (``ExponentialLR`` over Adam), which the step function steps every 10 calls."""
    model, guide = pyro_pair(hidden, z_dim)
    sched = pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": LR}, "gamma": 0.999}
    )
    if fast:
        svi = FastSVI(model, guide, sched, make_estimator(bound, k), backend="aten")
    else:
        svi = SVI(model, guide, sched, make_estimator(bound, k))
    calls = [0]

    def step() -> float:
        loss = svi.step(x)
        calls[0] += 1
        if calls[0] % 10 == 0:
            sched.step()
        return loss

    if fast:
        step.svi = svi  # type: ignore[attr-defined]
    return step


def pyro_step(hidden, z_dim, x, k, bound, jit=False):
    model, guide = pyro_pair(hidden, z_dim)
    kw = {"num_particles": k, "vectorize_particles": True, "max_plate_nesting": 1}
    if bound == "iwae":
        loss = RenyiELBO(alpha=0, **kw)
    else:
        loss = (JitTrace_ELBO if jit else Trace_ELBO)(**kw)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
    return lambda: svi.step(x)


def fast_step(hidden, z_dim, x, k, bound, planned, backend="auto", loss_graph=False):
    model, guide = pyro_pair(hidden, z_dim)
    svi = FastSVI(
        model, guide, pyro.optim.Adam({"lr": LR}), make_estimator(bound, k),
        planned_steps=planned, backend=backend,
    )  # fmt: skip
    if loss_graph:  # a no-op hook keeps the gradients outside the graph (eager update)
        svi.before_update = lambda params: None
    step = lambda: svi.step(x)  # noqa: E731
    step.warmup_steps = WARMUP  # type: ignore[attr-defined]
    step.svi = svi  # type: ignore[attr-defined]
    return step


def profile(paths: dict, steps: int) -> dict:
    """Where each path's time goes: torch.profiler's table of the top operators by self CPU
    time over ``steps`` steps (after the timing, so graphs are warm)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for name, fn in paths.items():
        if name.endswith(("numpyro", "gemm-floor")):
            continue
        use_param_store(name)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        out[name] = table
        print(f"--- {name}\n{table}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--archs", default="784-400-50,784-200-20")
    p.add_argument("--groups", default="1:elbo,50:elbo,50:iwae", help="K:bound, comma separated")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--planned-steps", type=int, default=10_000)
    p.add_argument("--core", type=int, default=None, help="pin this process to one core")
    p.add_argument("--no-compile", action="store_true", help="skip torch-compile")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--no-inductor", action="store_true", help="skip fast-inductor")
    p.add_argument(
        "--loss-graph", action="store_true", help="add fast-loss-graph (graph of loss and "
        "gradients, eager optimizer step: FastSVI's short-run path before the whole step)"
    )  # fmt: skip
    p.add_argument(
        "--scheduler", action="store_true", help="add fast-scheduler and pyro-scheduler "
        "(pyro.optim.ExponentialLR, stepped every 10 steps)"
    )  # fmt: skip
    p.add_argument("--profile", type=int, default=0, help="profile N steps of each path")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.core is not None:
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.smoke:
        args.archs, args.groups, args.repeats, args.steps = "784-20-4", "2:elbo,2:iwae", 2, 2
        args.planned_steps, args.no_compile, args.no_inductor = 100, True, True
        args.scheduler = True
    gen = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((BATCH, X_DIM), 0.13), generator=gen).to(DEVICE)
    rows, profiles = [], {}
    for arch in args.archs.split(","):
        _, hidden, z_dim = map(int, arch.split("-"))
        for group in args.groups.split(","):
            k, bound = int(group.split(":")[0]), group.split(":")[1]
            pyro.set_rng_seed(0)
            floor, flops = gemm_floor(hidden, z_dim, k)
            paths = {"torch-eager": torch_step(hidden, z_dim, x, k, bound), "gemm-floor": floor}
            paths["torch-foreach"] = torch_step(hidden, z_dim, x, k, bound, fused=False)
            if not args.no_compile:
                paths["torch-compile"] = torch_step(hidden, z_dim, x, k, bound, compile_=True)
            nstep = numpyro_step(hidden, z_dim, x, k, bound)
            if nstep is None:
                print("numpyro: skipped (not installed: pip install -e '.[peers]'; or no CUDA jax)")
            else:
                paths["numpyro"] = nstep
            spec = (hidden, z_dim, x, k, bound)
            for name, make in (
                ("pyro-trace", partial(pyro_step, *spec)),
                ("pyro-jit", partial(pyro_step, *spec, jit=True)),
                ("fast-short", partial(fast_step, *spec, None)),
                ("fast-long", partial(fast_step, *spec, args.planned_steps)),
                ("fast-inductor", partial(fast_step, *spec, None, "inductor")),
                ("fast-loss-graph", partial(fast_step, *spec, None, loss_graph=True)),
                ("fast-scheduler", partial(scheduled_step, *spec, fast=True)),
                ("pyro-scheduler", partial(scheduled_step, *spec, fast=False)),
            ):
                if name == "fast-loss-graph" and not args.loss_graph:
                    continue
                if name.endswith("-scheduler") and not args.scheduler:
                    continue
                if name == "fast-inductor" and args.no_inductor:
                    continue
                if name == "pyro-jit" and bound == "iwae":
                    continue
                use_param_store(f"{arch}/{group}/{name}")
                paths[name] = make()
            # time_group swaps param stores by path name: give each its own
            named = {f"{arch}/{group}/{n}": f for n, f in paths.items()}
            tic = time.perf_counter()
            out = time_group(named, args.steps, args.repeats, f"{arch}/{group}/torch-eager")
            print(f"{arch} K={k} {bound}: {time.perf_counter() - tic:.0f} s", flush=True)
            if args.profile:
                profiles[f"{arch}/{group}"] = profile(named, args.profile)
            for full, (ms, ratio, spread) in out.items():
                fn = named[full]
                svi = getattr(fn, "svi", None)
                row = {
                    "arch": arch, "k": k, "bound": bound, "path": full.split("/")[-1],
                    "ms_per_step": ms, "ratio": ratio, "ratio_iqr": list(spread),
                    "warmup_s": getattr(fn, "warmup_s", None),
                    "gemm_gflop": flops / 1e9 if full.endswith("gemm-floor") else None,
                }  # fmt: skip
                if svi is not None:
                    (entry,) = svi.policy.entries.values() or [None]
                    row["graph"] = None if entry is None else entry.captured.backend
                    row["whole_step"] = entry is not None and entry.captured.whole_step
                    row["jit_reason"], row["step_reason"] = svi.jit_reason, svi.step_reason
                rows.append(row)
    floor = {(r["arch"], r["k"], r["bound"]): r["ms_per_step"] for r in rows
             if r["path"] == "gemm-floor"}  # fmt: skip
    for r in rows:
        r["x_floor"] = r["ms_per_step"] / floor[(r["arch"], r["k"], r["bound"])]
    head = ("arch", "K", "bound", "path", "ms/step", "ratio", "x floor")
    print("{:<12} {:>3} {:<5} {:<14} {:>8} {:>6} {:>7}".format(*head))
    for r in rows:
        print(
            f"{r['arch']:<12} {r['k']:>3} {r['bound']:<5} {r['path']:<14} "
            f"{r['ms_per_step']:>8.2f} {r['ratio']:>6.2f} {r['x_floor']:>7.2f}"
        )
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
        + (f", {torch.cuda.get_device_name()}" if DEVICE.type == "cuda" else ""),
        "load": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "provenance": provenance(),
        "rows": rows,
        "profiles": profiles,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


if __name__ == "__main__":
    main()
