"""Images per second of data-parallel ``fit`` with 1 and with N processes (one thread each).

A 784-400-50 VAE (Bernoulli decoder) trained by ``fit`` with the IWAE bound at K particles on
random binary images (the speed does not depend on their values), the same **global** batch
for every world size. Each process is started with ``torch.multiprocessing`` (gloo on
localhost) and uses one thread. A run times the epochs after the first (which traces and
verifies the step) with an epoch callback; the world sizes are interleaved repeat by repeat
(1, N, 1, N, ...) so that the load of a shared machine falls on both, and the speed-up is the
median over repeats of rate(N) / rate(1) within the repeat. The one-process run is the plain
path (no process group); with ``--nproc 1`` the compared run is a process group of world size
1 (NCCL with ``--device cuda``), which checks that the distributed path costs nothing there.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json     # full run
    python benchmarks/scaling.py --smoke                                    # seconds
    python benchmarks/scaling.py --device cuda --nproc 1                    # one GPU, NCCL
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from pyro_lvm.provenance import provenance


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, size, group, device, port, k, batch, steps, epochs, hidden, z_dim, queue):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    import pyro

    from pyro_lvm.models import VAE
    from pyro_lvm.process_group import init_distributed
    from pyro_lvm.train import fit

    if group and size == 1:  # a group of one: what torchrun --nproc-per-node 1 gives
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)
        torch.distributed.init_process_group(backend, rank=0, world_size=1)
    elif group:
        init_distributed(device=torch.device(device))
    pyro.set_rng_seed(0)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(steps * batch, 784, generator=g) < 0.13).float()
    vae = VAE(784, z_dim, hidden=(hidden,))
    stamps: list[float] = []
    fit(
        vae, vae.guide, x, loss="iwae", num_particles=k, batch_size=batch, num_epochs=epochs,
        progress=False, callbacks=[lambda history: stamps.append(time.perf_counter())],
        device=device,
    )  # fmt: skip
    if rank == 0:
        queue.put((epochs - 1) * steps * batch / (stamps[-1] - stamps[0]))
    if group:  # leave together: a peer closing its connections early aborts gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def images_per_second(size: int, k: int, args: argparse.Namespace, group: bool = True) -> float:
    """One timed run of ``size`` processes (``group``: in a process group, even of one);
    returns images per second (global)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    steps = args.steps_k1 if k == 1 else args.steps
    mp.start_processes(
        _worker,
        args=(
            size,
            group,
            args.device,
            _port(),
            k,
            args.batch_size,
            steps,
            args.epochs,
            args.hidden,
            args.z_dim,
            queue,
        ),
        nprocs=size,
        start_method="spawn",
    )  # (rank, *args); joins and raises if a process fails
    return float(queue.get())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--particles", default="1,50", help="comma-separated K values")
    p.add_argument(
        "--nproc", type=int, default=2, help="the world size compared with one plain process"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (NCCL for the group)")
    p.add_argument("--batch-size", type=int, default=100, help="the global minibatch")
    p.add_argument("--steps", type=int, default=8, help="steps per epoch at K > 1")
    p.add_argument("--steps-k1", type=int, default=60, help="steps per epoch at K = 1")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (the first untimed)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--z-dim", type=int, default=50)
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = p.parse_args(argv)
    if args.smoke:
        args.particles, args.steps, args.steps_k1, args.epochs = "1,3", 2, 2, 2
        args.repeats, args.hidden, args.z_dim, args.batch_size = 1, 16, 4, 8
    # the compared run: N processes, or with --nproc 1 a process group of one
    key = f"images_per_s_{args.nproc}" if args.nproc > 1 else "images_per_s_1_group"
    label = f"{args.nproc} processes" if args.nproc > 1 else "group of 1"
    rows = []
    for k in (int(v) for v in args.particles.split(",")):
        one, many, ratios = [], [], []
        for _ in range(args.repeats):
            one.append(images_per_second(1, k, args, group=False))
            many.append(images_per_second(args.nproc, k, args))
            ratios.append(many[-1] / one[-1])
        row = {
            "K": k,
            "images_per_s_1": statistics.median(one),
            key: statistics.median(many),
            "speedup": statistics.median(ratios),
            "ratios": ratios,
        }
        rows.append(row)
        print(
            f"K={k:<3} 1 process {row['images_per_s_1']:8.1f} img/s   {label} "
            f"{row[key]:8.1f} img/s   speed-up {row['speedup']:.2f}x "
            f"(repeats {', '.join(f'{r:.2f}' for r in ratios)})",
            flush=True,
        )
    result = {
        "benchmark": "scaling",
        "config": vars(args),
        "rows": rows,
        "provenance": provenance(),
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
