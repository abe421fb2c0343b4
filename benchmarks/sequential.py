"""A deep Markov model trained with ELBO, IWAE and FIVO; test log-likelihood bounds.

Two sequential datasets: statically binarized MNIST read row by row (28 steps of 28 binary
pixels, ``--dataset mnist-rows``, from ``$PYRO_LVM_DATA``) and sequences drawn from a
linear-Gaussian state-space model (``--dataset ssm``: its exact log-likelihood, by the
Kalman filter, is reported beside the DMM's). The DMM (:class:`pyro_lvm.models.DeepMarkovModel`)
and its smoothing guide (:class:`pyro_lvm.guides.RNNGuide`, backward GRU) are trained with
``pyro.infer.SVI`` and the registered estimator for a fixed wall-clock budget; the test
split is then scored with two lower bounds on log p(x_{1:T}): the sequence IWAE bound
(importance sampling of whole sequences) and FIVO (SMC), both with ``--eval-particles``.

    python benchmarks/sequential.py --dataset mnist-rows --estimator fivo --particles 4 \
        --budget 420 --json benchmarks/results/sequential/mnist-rows-fivo.json
    python benchmarks/sequential.py --smoke --json /tmp/seq.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI

from pyro_lvm.data import Minibatches, load_mnist_rows, sample_ssm_sequences
from pyro_lvm.elbo import FIVO, make_estimator
from pyro_lvm.guides import RNNGuide
from pyro_lvm.models import DeepMarkovModel, LinearGaussianSSM, SequentialProgram
from pyro_lvm.provenance import provenance

ESTIMATOR_NAMES = {"elbo": "elbo", "iwae": "iwae", "fivo": "fivo"}


def _data(args):
    if args.dataset == "mnist-rows":
        if args.smoke:
            x = (torch.rand(200, 28, 28) < 0.3).float()
            return x[:150], x[150:], None
        train, test = load_mnist_rows("train"), load_mnist_rows("test")
        return train[: args.train_n], test[: args.test_n], None
    torch.manual_seed(1234)
    ssm = LinearGaussianSSM(2, 4, transition=torch.tensor([[0.95, 0.2], [-0.2, 0.95]]))
    n_train, n_test = (150, 50) if args.smoke else (args.train_n, args.test_n)
    train = sample_ssm_sequences(ssm, n_train, args.steps, seed=1)
    test = sample_ssm_sequences(ssm, n_test, args.steps, seed=2)
    return train, test, ssm


@torch.no_grad()
def _score(model, guide, x, num_particles, chunk):
    """Per-sequence sequence-IWAE and FIVO bounds, in chunks of ``chunk`` sequences."""
    out = {"is": [], "fivo": []}
    for name, est in (
        ("is", FIVO(num_particles, resampling="none")),
        ("fivo", FIVO(num_particles)),
    ):
        for start in range(0, len(x), chunk):
            log_z, _ = est.log_marginal(model, guide, x[start : start + chunk])
            out[name].append(log_z)
    return {k: torch.cat(v) for k, v in out.items()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=("mnist-rows", "ssm"), default="mnist-rows")
    p.add_argument("--estimator", choices=sorted(ESTIMATOR_NAMES), default="fivo")
    p.add_argument("--particles", type=int, default=4, help="K for training")
    p.add_argument("--budget", type=float, default=420.0, help="training seconds")
    p.add_argument("--max-epochs", type=int, default=1000)
    p.add_argument(
        "--max-steps", type=int, default=None,
        help="stop after this many SVI steps (the same for every estimator: a fair budget on a "
        "shared machine); --budget then only caps the wall time",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--z-dim", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--train-n", type=int, default=50000)
    p.add_argument("--test-n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25, help="sequence length (ssm only)")
    p.add_argument("--eval-particles", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    if args.smoke:
        args.budget, args.eval_particles, args.hidden = 1.0, 8, 16
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    train, test, ssm = _data(args)
    x_dim = train.shape[-1]
    emission = "bernoulli" if args.dataset == "mnist-rows" else "gaussian"
    dmm = DeepMarkovModel(x_dim, args.z_dim, args.hidden, emission=emission, num_data=len(train))
    rnn = RNNGuide(x_dim, args.z_dim, args.hidden, direction="backward", num_data=len(train))
    model, guide = SequentialProgram(dmm), SequentialProgram(rnn)
    elbo = make_estimator(ESTIMATOR_NAMES[args.estimator], num_particles=args.particles)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": args.lr, "clip_norm": 10.0}), elbo)
    batches = Minibatches(train.reshape(len(train), -1), args.batch_size, seed=args.seed)
    max_steps = math.inf if args.max_steps is None else args.max_steps
    start, cpu, steps, epochs, history = time.perf_counter(), time.process_time(), 0, 0, []

    def done() -> bool:
        return time.perf_counter() - start >= args.budget or steps >= max_steps

    while not done() and epochs < args.max_epochs:
        total = 0.0
        for xb, idx in batches:
            total += svi.step(xb.reshape(-1, *train.shape[1:]), idx)
            steps += 1
            if done():
                break
        epochs += 1
        history.append(total / len(train))
    train_seconds, train_cpu = time.perf_counter() - start, time.process_time() - cpu
    dmm.num_data = rnn.num_data = None
    t0 = time.perf_counter()
    scores = _score(dmm, rnn, test, args.eval_particles, 100)
    result = {
        "dataset": args.dataset,
        "estimator": args.estimator,
        "particles": args.particles,
        "budget_seconds": args.budget,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu,
        "steps": steps,
        "epochs_started": epochs,
        "eval_seconds": time.perf_counter() - t0,
        "eval_particles": args.eval_particles,
        "test_n": len(test),
        "test_is": scores["is"].mean().item(),
        "test_is_se": scores["is"].std().item() / math.sqrt(len(test)),
        "test_fivo": scores["fivo"].mean().item(),
        "test_fivo_se": scores["fivo"].std().item() / math.sqrt(len(test)),
        "train_loss_per_epoch": history,
        "args": {k: str(v) for k, v in vars(args).items()},
        "provenance": provenance(),
    }
    if ssm is not None:
        result["test_exact_true_model"] = ssm.log_evidence(test).mean().item()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{args.dataset} {args.estimator} K={args.particles}: {steps} steps in "
        f"{train_seconds:.0f}s ({train_cpu:.0f}s CPU); "
        f"test IS {result['test_is']:.2f} ± {result['test_is_se']:.2f}, "
        f"FIVO {result['test_fivo']:.2f} ± {result['test_fivo_se']:.2f} "
        f"(K={args.eval_particles})"
        + (f"; true model {result['test_exact_true_model']:.2f}" if ssm is not None else "")
    )
    return result


if __name__ == "__main__":
    main()
