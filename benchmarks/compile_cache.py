"""First-run and cached-run Inductor compile time of FastSVI's whole-step graph.

Runs the same FastSVI (``backend="inductor"``, a 784-H-Z VAE, batch 100) in two fresh
processes that share one Inductor cache folder (``$TORCHINDUCTOR_CACHE_DIR``, a new
temporary folder unless ``--cache-dir`` is given): the first compiles, the second finds the
FX-graph and AOTAutograd caches filled. Prints and writes (``--json``) the compile seconds of
each and what ``backend="auto"`` would decide in each case.

    python benchmarks/compile_cache.py --json compile_cache.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def child(arch: str, k: int) -> dict:
    import pyro
    import torch

    from pyro_lvm.capture.inductor import inductor_pays
    from pyro_lvm.elbo import make_estimator
    from pyro_lvm.models import VAE
    from pyro_lvm.train.fast import FastSVI

    torch.set_num_threads(1)
    _, hidden, z_dim = map(int, arch.split("-"))
    pyro.set_rng_seed(0)
    vae = VAE(784, z_dim, (hidden,))
    svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_estimator("elbo", k))
    x = torch.bernoulli(torch.full((100, 784), 0.13))
    for _ in range(3):  # record, capture, verify
        svi.step(x)
    (key,) = svi.policy.entries
    fx = svi.policy.entries[key].captured.fx
    decision = inductor_pays(fx, 10_000)
    tic = time.perf_counter()
    svi.policy.promote(key, [*(p for p in svi.policy.entries[key].rule.params), x])
    seconds = time.perf_counter() - tic
    ok = svi.policy.entries[key].captured.backend == "inductor"
    return {"compile_s": seconds, "compiled": ok, "auto_pays_10k": decision}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="784-400-50")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.arch, args.k)))
        return {}
    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor_cache_")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    runs = []
    for which in ("first", "cached"):
        cmd = [sys.executable, __file__, "--child", "--arch", args.arch, "--k", str(args.k)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        runs.append({"run": which, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(f"{which}: compile {runs[-1]['compile_s']:.1f} s; auto at 10k steps: "
              f"{runs[-1]['auto_pays_10k'][1]}")  # fmt: skip
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result = {"arch": args.arch, "k": args.k, "cache_dir": cache, "runs": runs,
              "load": os.getloadavg(), "date": date}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
