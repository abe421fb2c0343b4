"""Time one SVI step of every training path against a hand-written PyTorch VAE step.

Interleaved, repeated measurements in one process: for each repeat, every path of a group
(architecture, K) runs ``--steps`` steps in turn, in an order rotated from repeat to repeat;
a path's figure is the median over repeats of ms/step, and its ratio is the median over
repeats of (path / reference) within the repeat, which cancels most of the drift of a shared
machine. ``--json PATH`` writes one row per path. ``fast/*`` is ``FastSVI``'s default
(``backend="auto"`` with no planned run length: the aten graph); ``fast-inductor/*``
(``--inductor``) compiles every graph with Inductor; ``fast-auto/*`` (``--auto``) plans for
``--planned-steps`` and so times what the ``auto`` policy picks for a run that long (column
``backend_used``).

    python benchmarks/speed.py --json speed.json            # full run
    python benchmarks/speed.py --smoke                      # seconds, for the tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from functools import partial

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_lvm.capture.policy import AUTO_AFTER
from pyro_lvm.elbo import ESTIMATORS, make_estimator
from pyro_lvm.evaluate.loglik import log_likelihood
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.handlers import KLWeightedELBO, linear_schedule
from pyro_lvm.inner_loop import optimize_local
from pyro_lvm.models import VAE
from pyro_lvm.provenance import provenance
from pyro_lvm.train import fit
from pyro_lvm.train.fast import FastSVI

LR = 1e-3
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def reference_step(vae: VAE, x: torch.Tensor, k: int) -> Callable[[], float]:
    """Hand-written K-particle ELBO step: same networks, one Adam(foreach) over all params."""
    enc, dec, zd = vae.guide.encoder, vae.decoder, vae.z_dim
    min_scale = vae.guide.min_scale
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=LR, foreach=True)

    def step() -> float:
        loc, raw = enc(x).split(zd, dim=-1)
        scale = F.softplus(raw) + min_scale
        eps = torch.randn((k, *loc.shape), dtype=loc.dtype)
        z = loc + scale * eps
        log_px = -F.binary_cross_entropy_with_logits(
            dec(z), x.expand(k, *x.shape), reduction="none"
        )
        log_pz = -0.5 * z.square() - HALF_LOG_2PI
        log_qz = -0.5 * eps.square() - scale.log() - HALF_LOG_2PI
        loss = -(log_px.sum() + (log_pz - log_qz).sum()) / k
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def svi_step(svi_cls, vae: VAE, x: torch.Tensor, loss, **kw) -> Callable[[], float]:
    svi = svi_cls(vae, vae.guide, pyro.optim.Adam({"lr": LR}), loss, **kw)

    def step() -> float:
        return svi.step(x)

    step.svi = svi  # type: ignore[attr-defined]
    return step


def warmup_step(vae: VAE, x: torch.Tensor, k: int) -> Callable[[], float]:
    """FastSVI on the ELBO under a linear KL warm-up (β moves every step): the schedule's β
    is an input of the traced loss, so this path stays traced. β starts at 0.5, not 0: with
    β near 0 the posterior scales of the repeated benchmark batch collapse and subnormal
    floats slow every kernel, which would time the model's state, not the schedule."""
    schedule = linear_schedule(num_steps=100_000, start=0.5)
    loss = KLWeightedELBO(make_estimator("elbo", k), schedule)
    svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": LR}), loss)

    def step() -> float:
        value = svi.step(x)
        schedule.step()
        return value

    step.svi = svi  # type: ignore[attr-defined]
    return step


def fit_step(vae: VAE, data: torch.Tensor, name: str, k: int, batch: int) -> Callable[[], float]:
    """One call of ``fit`` for one epoch over ``data``; reports per-step time via the caller."""
    vae.num_data = None

    def run() -> float:
        vae.num_data = None
        h = fit(
            vae,
            vae.guide,
            data,
            loss=name,
            num_particles=k,
            num_epochs=1,
            batch_size=batch,
            progress=False,
            optimizer=pyro.optim.Adam({"lr": LR}),
        )
        return h.epoch_losses[-1]

    run.steps_per_call = max(1, data.shape[0] // batch)  # type: ignore[attr-defined]
    return run


_STORES: dict[str, tuple[dict, dict, dict]] = {}


def use_param_store(name: str) -> None:
    """Give each path its own parameters: swap the global param store's tables (their
    PyroModules share site names, and JitTrace_ELBO looks parameters up by name)."""
    ps = pyro.get_param_store()
    ps._params, ps._param_to_name, ps._constraints = _STORES.setdefault(name, ({}, {}, {}))


#: the clock of time_group: wall time, or this thread's CPU time (``--clock cpu``), which a
#: shared machine disturbs much less (with ``--threads 1`` every kernel runs in this thread)
CLOCK = time.perf_counter


def time_group(paths: dict[str, Callable], steps: int, repeats: int, ref: str) -> dict:
    """Interleaved timing; returns name -> (median ms/step, median ratio, ratio spread).

    The first 8 steps of each path (record, capture, verify, ...; ``fn.warmup_steps`` where
    set) are timed apart, in wall time, as ``fn.warmup_s``: the first-step cost."""
    for name, fn in paths.items():  # warm up (captures losses, builds optimizers)
        use_param_store(name)
        tic = time.perf_counter()  # wall time: Inductor compiles in worker processes
        first = getattr(fn, "warmup_steps", 8)
        for _ in range(first if getattr(fn, "steps_per_call", None) is None else 1):
            fn()
        fn.warmup_s = time.perf_counter() - tic  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {n: [] for n in paths}
    names = list(paths)
    for rep in range(repeats):
        # rotate the order so no path always runs first (or after the same neighbour)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            fn = paths[name]
            use_param_store(name)
            calls = 1 if getattr(fn, "steps_per_call", None) else steps
            n = getattr(fn, "steps_per_call", steps)
            tic = CLOCK()
            for _ in range(calls):
                fn()
            times[name].append((CLOCK() - tic) / n * 1e3)
    out = {}
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times[ref], strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[name] = (statistics.median(ts), statistics.median(ratios), (q[0], q[2]))
    return out


class PeakRSS:
    """Peak resident memory above the start, sampled every 2 ms from /proc (Linux)."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def gib(self) -> float:
        return (self.peak - self.base) / 2**30


@torch.no_grad()
def reference_loglik(
    vae: VAE, x: torch.Tensor, num_samples: int, chunk: int, data_chunk: int
) -> torch.Tensor:
    """Hand-written batched importance sampling: streaming logsumexp over sample chunks."""
    out = []
    for xb in x.split(data_chunk):
        loc, scale = vae.guide.params(xb)
        acc = torch.full((xb.shape[0],), -math.inf, dtype=xb.dtype)
        for start in range(0, num_samples, chunk):
            k = min(chunk, num_samples - start)
            eps = torch.randn((k, *loc.shape), dtype=loc.dtype)
            z = loc + scale * eps
            log_px = -F.binary_cross_entropy_with_logits(
                vae.decoder(z), xb.expand(k, *xb.shape), reduction="none"
            ).sum(-1)
            log_w = log_px - 0.5 * z.square().sum(-1) + (0.5 * eps.square() + scale.log()).sum(-1)
            acc = torch.logaddexp(acc, log_w.logsumexp(0))
        out.append(acc - math.log(num_samples))
    return torch.cat(out)


def eval_rows(vae: VAE, x: torch.Tensor, a: argparse.Namespace) -> list[dict]:
    """Importance-sampled log-likelihood: time, peak memory, mean estimate, vs the reference."""
    k, repeats = a.eval_samples, max(1, min(3, a.repeats))
    fns = {
        "torch-reference": lambda: reference_loglik(vae, x, k, a.eval_chunk, a.eval_data_chunk),
        "log_likelihood": lambda: log_likelihood(
            vae, vae.guide, x, k, sample_chunk=a.eval_chunk, data_chunk=a.eval_data_chunk
        ),
    }
    times: dict[str, list[float]] = {n: [] for n in fns}
    peaks: dict[str, float] = {}
    means: dict[str, float] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            with PeakRSS() as mem:
                tic = time.perf_counter()
                means[name] = float(fn().mean())
                times[name].append(time.perf_counter() - tic)
            peaks[name] = max(peaks.get(name, 0.0), mem.gib)
    rows = []
    for name, ts in times.items():
        ratios = [t / r for t, r in zip(ts, times["torch-reference"], strict=True)]
        med = statistics.median(ts)
        rows.append(
            {
                "name": f"eval/{name}",
                "num_particles": k,
                "group": f"eval N={x.shape[0]}",
                "ms_per_step": med * 1e3,
                "ratio": statistics.median(ratios),
                "points_x_samples_per_s": x.shape[0] * k / med,
                "peak_mem_gib": peaks[name],
                "mean_log_likelihood": means[name],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds, no data file")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--steps", type=int, default=20, help="steps per path per repeat")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--ks", default="1,10,50")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--eval-points", type=int, default=10000)
    p.add_argument("--eval-samples", type=int, default=5000)
    p.add_argument("--eval-chunk", type=int, default=100, help="particles per vectorized pass")
    p.add_argument("--eval-data-chunk", type=int, default=1000, help="rows per pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimators", default="", help="comma-separated subset of ESTIMATORS")
    p.add_argument(
        "--inductor",
        default="",
        help="estimators to time with FastSVI(backend='inductor') too (rows fast-inductor/*)",
    )
    p.add_argument(
        "--auto",
        default="",
        help="estimators to time with FastSVI(backend='auto', planned_steps=--planned-steps) "
        "too (rows fast-auto/*; warmed up past the Inductor decision)",
    )
    p.add_argument(
        "--planned-steps",
        type=int,
        default=50_000,
        help="the run length fast-auto/* plans for (default: 100 MNIST epochs of 500 steps)",
    )
    p.add_argument("--no-fit", action="store_true", help="skip the fit/* rows")
    p.add_argument("--device", default="cpu", help="torch device of every path, e.g. cuda")
    p.add_argument("--synthetic", action="store_true", help="random images of MNIST's shape")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this thread's CPU time (with --threads 1, steadier on a shared machine)",
    )
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="only the importance-sampling rows")
    a = p.parse_args(argv)
    global CLOCK
    CLOCK = time.thread_time if a.clock == "cpu" else time.perf_counter
    warnings.simplefilter("ignore")
    torch.set_default_dtype(torch.float32)
    pyro.set_rng_seed(a.seed)
    batch = 100
    if a.smoke:
        a.steps, a.repeats, a.ks, a.threads = 2, 2, "1,3", a.threads or 1
        a.eval_points, a.eval_samples, a.eval_chunk = 20, 30, 10
        archs = {"784-40-5": ((40,), 5)}
        train = torch.bernoulli(torch.full((400, 784), 0.3))
        test = train[: a.eval_points]
        names = ["elbo", "iwae-dreg"]
    else:
        if a.synthetic:  # MNIST's shape, Bernoulli(0.3) pixels: the timing is the same
            train = torch.bernoulli(torch.full((50_000, 784), 0.3))
            test = torch.bernoulli(torch.full((a.eval_points, 784), 0.3))
        else:
            from pyro_lvm.data import load_binarized_mnist

            train = load_binarized_mnist("train").float()
            test = load_binarized_mnist("test").float()[: a.eval_points]
        archs = {"784-400-50": ((400,), 50), "784-200-20": ((200,), 20)}
        names = a.estimators.split(",") if a.estimators else sorted(ESTIMATORS)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device != "cpu":  # every tensor the paths create lands there (as mnist_nll.py)
        torch.set_default_device(a.device)
        train, test = train.to(a.device), test.to(a.device)
    x = train[:batch]
    ks = [int(k) for k in a.ks.split(",") if k]
    rows: list[dict] = []
    for arch, (hidden, zd) in {} if a.eval_only else archs.items():
        for k in ks if arch == next(iter(archs)) else ks[:1]:
            vae = partial(VAE, 784, zd, hidden)
            paths: dict[str, Callable] = {"torch-reference": reference_step(vae(), x, k)}
            fits: dict[str, Callable] = {}
            pyro_kw = {"num_particles": k, "vectorize_particles": True, "max_plate_nesting": 1}
            paths["pyro/Trace_ELBO"] = svi_step(SVI, vae(), x, Trace_ELBO(**pyro_kw))
            paths["pyro/TraceMeanField_ELBO"] = svi_step(
                SVI, vae(), x, TraceMeanField_ELBO(**pyro_kw)
            )
            paths["pyro/JitTrace_ELBO"] = svi_step(
                SVI, vae(), x, JitTrace_ELBO(ignore_jit_warnings=True, **pyro_kw)
            )
            for name in names:
                try:
                    make_estimator(name, k)
                except ValueError:  # e.g. leave-one-out baselines need K >= 2
                    continue
                paths[f"fast/{name}"] = svi_step(FastSVI, vae(), x, make_estimator(name, k))
                if name in a.inductor.split(","):
                    paths[f"fast-inductor/{name}"] = svi_step(
                        FastSVI, vae(), x, make_estimator(name, k), backend="inductor"
                    )
                if name in a.auto.split(","):
                    paths[f"fast-auto/{name}"] = svi_step(
                        FastSVI, vae(), x, make_estimator(name, k), planned_steps=a.planned_steps
                    )
                    paths[f"fast-auto/{name}"].warmup_steps = AUTO_AFTER + 2
                if not a.no_fit:
                    fits[f"fit/{name}"] = fit_step(vae(), train[: batch * a.steps], name, k, batch)
            if "elbo" in names:
                paths["fast/elbo+kl-warm-up"] = warmup_step(vae(), x, k)
            res = time_group(paths, a.steps, a.repeats, "torch-reference")
            # whole fit calls churn the allocator and slow whatever runs next, so they are
            # timed in a second pass, against the reference again
            if fits:
                fits["torch-reference"] = paths["torch-reference"]
                fit_res = time_group(fits, a.steps, a.repeats, "torch-reference")
                res.update((n, v) for n, v in fit_res.items() if n != "torch-reference")
            paths.update(fits)
            _STORES.clear()
            pyro.clear_param_store()
            for name, (ms, ratio, (lo, hi)) in res.items():
                row = {
                    "name": name,
                    "num_particles": k,
                    "group": f"{arch} K={k}",
                    "ms_per_step": ms,
                    "ratio": ratio,
                    "ratio_q25": lo,
                    "ratio_q75": hi,
                    "warmup_s": getattr(paths[name], "warmup_s", None),
                }
                svi = getattr(paths[name], "svi", None)
                if isinstance(svi, FastSVI):
                    row["traced"] = svi.traced_steps > 0
                    row["jit_reason"], row["fallback_reason"] = svi.jit_reason, svi.fallback_reason
                    why = svi.get_state()["schedule"]["inductor"]  # signature -> reason or None
                    row["backend_used"] = "inductor" if None in why.values() else "aten"
                    row["inductor_reason"] = next(iter(why.values()), None)
                rows.append(row)
    hidden, zd = next(iter(archs.values()))
    if a.eval_only:
        rows += eval_rows(VAE(784, zd, hidden), test, a)
        return _report(rows, a)
    # the per-datapoint inner loop: ms per inner step of optimize_local
    vae = VAE(784, zd, hidden, num_data=train.shape[0])
    local = LocalGaussianGuide(train.shape[0], zd)
    idx = torch.arange(batch)
    ts = []
    for _ in range(a.repeats):
        tic = time.perf_counter()
        optimize_local(vae, local, x, idx, max_steps=a.steps, tol=0.0)
        ts.append((time.perf_counter() - tic) / a.steps * 1e3)
    rows.append(
        {
            "name": "inner/optimize_local",
            "num_particles": 1,
            "group": "inner loop",
            "ms_per_step": statistics.median(ts),
            "ratio": None,
        }
    )
    if not a.skip_eval:
        rows += eval_rows(VAE(784, zd, hidden), test, a)
    return _report(rows, a)


def _report(rows: list[dict], a: argparse.Namespace) -> list[dict]:
    """Print the table and write the JSON (``--json``)."""
    print(
        f"{'group':18s} {'path':34s} {'ms/step':>9s} {'ratio':>7s}  {'q25-q75':>13s} "
        f"{'8 first':>8s}"
    )
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:7.3f}"
        spread = f"{r['ratio_q25']:.3f}-{r['ratio_q75']:.3f}" if "ratio_q25" in r else ""
        if r.get("warmup_s") is not None:
            spread += f" {r['warmup_s']:7.2f}s"
        extra = (
            f"  {r['points_x_samples_per_s']:.3g} pts*samples/s, peak {r['peak_mem_gib']:.3f} GiB, "
            f"mean log p(x) {r['mean_log_likelihood']:.2f}"
            if "peak_mem_gib" in r
            else ""
        )
        if "traced" in r:
            extra = (
                f"  traced ({r['backend_used']})"
                if r["traced"]
                else f"  eager ({r['jit_reason'] or r['fallback_reason']})"
            )
        head = f"{r['group']:18s} {r['name']:34s} {r['ms_per_step']:9.2f}"
        print(f"{head} {ratio:>7s}  {spread:>13s}{extra}")
    if a.json:
        meta = {"argv": vars(a), **provenance(), "load_avg": os.getloadavg()}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
