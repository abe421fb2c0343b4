"""A distributed run end to end: data-parallel ``fit``, resume, distributed evaluation.

Start it with ``torchrun`` (any number of processes; one process works too):

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_digits.py --out runs/dist

Every process runs this same script. ``fit`` finds the process group in torchrun's
environment, trains on its shard of each global minibatch and all-reduces the gradients;
rank 0 alone shows progress and writes the checkpoint. The script then resumes the run for
more epochs from that checkpoint (possible with another number of processes) and computes the
importance-sampled log-likelihood of the test digits with the points split across processes
(:func:`pyro_lvm.evaluate.distributed.distributed_evaluate`). Rank 0 writes ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyro
import torch

from pyro_lvm.data import load_digits
from pyro_lvm.evaluate import log_likelihood
from pyro_lvm.evaluate.distributed import distributed_evaluate
from pyro_lvm.models import VAE
from pyro_lvm.process_group import init_distributed
from pyro_lvm.train import fit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=20, help="epochs of the first part")
    p.add_argument("--more", type=int, default=10, help="epochs added by the resumed part")
    p.add_argument("--batch-size", type=int, default=100, help="the global minibatch")
    p.add_argument("--num-samples", type=int, default=500)
    args = p.parse_args(argv)
    rank, size = init_distributed()  # what fit would do by itself; here for rank and size
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x, x_test = load_digits("train"), load_digits("test")
    pyro.set_rng_seed(0)
    vae = VAE(x.shape[1], 4, hidden=(128,))
    kw = dict(batch_size=args.batch_size, loss="iwae", num_particles=5, progress=rank == 0)
    kw.update(optimizer=pyro.optim.Adam({"lr": 3e-3}), checkpoint=out / "checkpoint.pt")
    first = fit(vae, vae.guide, x, num_epochs=args.epochs, **kw)
    # a restarted job (possibly with another --nproc-per-node) continues the same run
    pyro.clear_param_store()
    vae = VAE(x.shape[1], 4, hidden=(128,))
    history = fit(vae, vae.guide, x, num_epochs=args.epochs + args.more, resume=True, **kw)
    ll = distributed_evaluate(log_likelihood, vae, vae.guide, x_test, num_samples=args.num_samples)
    summary = {
        "processes": size,
        "epochs": history.epochs,
        "train_loss_first_part": first.epoch_losses[-1],
        "train_loss": history.epoch_losses[-1],
        "test_log_likelihood": float(ll.mean()),
        "test_log_likelihood_se": float(ll.std() / len(ll) ** 0.5),
        "test_points": len(ll),
    }
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
