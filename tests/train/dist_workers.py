"""Processes for tests/train/test_distributed.py: a spawn helper, tiny models, the workers.

The exactness checks use common random numbers: the guide's noise for data point i is row i
of a fixed table (:class:`CRNNormal`), so one process at batch B and two at B/2 draw the same
noise for the same point and their updates agree to rounding.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from pyro_lvm.guides.local import LocalGuide
from pyro_lvm.plates import data_plate

N, B, DX, DZ, KMAX = 16, 8, 3, 2, 5
EPOCHS, HALF = 10, 5  # 2 steps per epoch: 20 steps


def data() -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(N, DX, generator=g, dtype=torch.float64)


def noise_table() -> torch.Tensor:
    g = torch.Generator().manual_seed(12)
    return torch.randn(KMAX, N, DZ, generator=g, dtype=torch.float64)


class CRNNormal(dist.Normal):
    """A Normal whose sample is ``loc + scale * noise``, ``noise`` fixed per data point:
    shape ``(KMAX, batch, DZ)``; its first ``K`` rows are the ``K`` particles."""

    def __init__(self, loc, scale, noise, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return CRNNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.noise)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = self.noise[0] if len(shape) == 2 else self.noise[: shape[0]]
        return self.loc + self.scale * eps.expand(shape)

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.rsample(sample_shape)


def model(x, idx=None):
    w = pyro.param("w", lambda: 0.5 * torch.ones(DZ, DX))
    b = pyro.param("b", lambda: torch.zeros(DX))
    with data_plate(x, idx, N if idx is not None else None):
        z = pyro.sample("z", dist.Normal(torch.zeros(DZ), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w + b, 0.5).to_event(1), obs=x)


def _encoder(x):
    a = pyro.param("a", lambda: 0.1 * torch.ones(DX, DZ))
    c = pyro.param("c", lambda: torch.zeros(DZ))
    s = pyro.param("s", lambda: torch.ones(DZ), constraint=constraints.positive)
    return x @ a + c, s


def crn_guide(x, idx=None):
    loc, s = _encoder(x)
    rows = torch.arange(len(x)) if idx is None else idx
    with data_plate(x, idx, N if idx is not None else None):
        pyro.sample("z", CRNNormal(loc, s, noise_table()[:, rows]).to_event(1))


def mc_guide(x, idx=None):
    loc, s = _encoder(x)
    with data_plate(x, idx, N if idx is not None else None):
        pyro.sample("z", dist.Normal(loc, s).to_event(1))


class GapGuide:
    """``mc_guide`` with ``params(x) -> (loc, scale)``, as ``inference_gaps`` needs."""

    def params(self, x):
        loc, s = _encoder(x)
        return loc, s.expand(loc.shape)

    def __call__(self, x, idx=None):
        return mc_guide(x, idx)


def delta_guide(x, idx=None):
    loc, _ = _encoder(x)
    with data_plate(x, idx, N if idx is not None else None):
        pyro.sample("z", dist.Delta(loc, event_dim=1))


class LocalDeltaGuide(LocalGuide):
    """φ^i is a point estimate of z_i: the ELBO is log p(x_i, φ^i), a deterministic gradient."""

    local_names = ("loc",)

    def __init__(self, num_data: int):
        super().__init__(num_data, DZ)
        self.loc = PyroParam(torch.zeros(num_data, DZ), event_dim=1)

    def distribution(self, loc):
        return dist.Delta(loc, event_dim=1)


def snapshot() -> torch.Tensor:
    """Every parameter of the param store (constrained), flattened in name order."""
    store = pyro.get_param_store()
    return torch.cat([store[n].detach().reshape(-1) for n in sorted(store.keys())])


# ---------------------------------------------------------------------------- spawning
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, size, port, out, timeout, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    from pyro_lvm.process_group import init_distributed

    try:
        init_distributed(timeout=timeout)
        result = fn(rank, size, *args)
        torch.save(result, Path(out) / f"{rank}.pt")
    except BaseException:
        (Path(out) / f"{rank}.err").write_text(traceback.format_exc())
        os._exit(1)
    torch.distributed.destroy_process_group()


def spawn(fn, size: int, out: Path, *args, timeout: float = 30.0, wait: float = 110.0):
    """Run ``fn(rank, size, *args)`` in ``size`` fresh processes joined by gloo on localhost.

    Returns ``(results, errors, exitcodes, seconds)``: per rank the returned object (or
    ``None``), the traceback text (or ``None``), the exit code, and the wall time each took.
    """
    out.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, size, port, str(out), timeout, args))
        for r in range(size)
    ]
    tic = time.monotonic()
    for p in procs:
        p.start()
    seconds = []
    for p in procs:
        p.join(max(1.0, wait - (time.monotonic() - tic)))
        seconds.append(time.monotonic() - tic)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results, errors = [], []
    for r in range(size):
        f, e = out / f"{r}.pt", out / f"{r}.err"
        results.append(torch.load(f, weights_only=False) if f.exists() else None)
        errors.append(e.read_text() if e.exists() else None)
    return results, errors, [p.exitcode for p in procs], seconds


# ---------------------------------------------------------------------------- runs
def clipped():
    """Adam with a gradient-norm clip that is active on this problem."""
    return pyro.optim.Adam({"lr": 0.05}, {"clip_norm": 0.5})


#: plain SGD's step is proportional to the gradient, so a wrong gradient scale (a summed
#: instead of weighted all-reduce, a wrong world size) shows in the iterates; Adam is nearly
#: invariant to a uniform scale and hides it (doubling every gradient moved Adam's snapshots
#: by 1.2e-8 relative, SGD's by 0.18)
SGD_LR = 0.002
#: a per-parameter clip that binds on some parameters and steps but not all, so a doubled
#: gradient still moves the iterates (by 0.06 relative here; a clip binding everywhere
#: would normalize the scale away)
SGD_CLIP = 2.0


def sgd(clip_norm: float | None = None):
    """Plain SGD (no momentum), optionally with pyro.optim's per-parameter norm clip."""
    return pyro.optim.SGD({"lr": SGD_LR}, {"clip_norm": clip_norm} if clip_norm else None)


def run_fit(
    loss, k, epochs, path=None, resume=False, guide=crn_guide, callbacks=(), optimizer=None, **kw
):
    """fit of the CRN pair; returns (per-epoch snapshots, step losses, validation bounds)."""
    from pyro_lvm.train import fit

    pyro.clear_param_store()
    snaps = []

    def record(history):
        snaps.append(snapshot())

    history = fit(
        model, guide, data(), loss=loss, num_particles=k, num_epochs=epochs, batch_size=B,
        optimizer=optimizer or pyro.optim.Adam({"lr": 0.05}), seed=1, progress=False,
        checkpoint=path, resume=resume, callbacks=[record, *callbacks], **kw,
    )  # fmt: skip
    return torch.stack(snaps) if snaps else None, history.step_losses, history.valid_elbos


def count_reduces(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and how many gradient all-reduces (buckets) it ran."""
    from pyro_lvm.train.distributed import GradientSync

    calls = []
    original = GradientSync._reduce

    def counted(flat):
        calls.append(flat.numel())
        return original(flat)

    GradientSync._reduce = staticmethod(counted)
    try:
        return fn(*args, **kwargs), len(calls)
    finally:
        GradientSync._reduce = staticmethod(original)


def run_local(epochs, path=None, resume=False, batch_size=B):
    """fit_local of the model with a point-estimate local guide (sharded in a group)."""
    from pyro_lvm.process_group import rank_and_size
    from pyro_lvm.train import fit_local
    from pyro_lvm.train.distributed.sharded import ShardedLocalGuide, shard_size

    pyro.clear_param_store()
    guide = LocalDeltaGuide(N)
    if rank_and_size()[1] > 1:
        guide = ShardedLocalGuide(LocalDeltaGuide(shard_size(N)), N)
    history = fit_local(
        model, guide, data(), loss="elbo", num_epochs=epochs, batch_size=batch_size, lr=0.05,
        inner_lr=0.1, inner_max_steps=5, inner_tol=0.0, seed=1, progress=False,
        checkpoint=path, resume=resume,
    )  # fmt: skip
    return history.step_losses


ESTIMATORS = (("elbo", 1), ("iwae-dreg", 5), ("score-function-loo-baseline", 4))
#: a small inference_gaps run (q* by 20 inner steps, 100 samples per ELBO)
GAPS = dict(num_samples=50, elbo_samples=100, num_particles=2, max_steps=20, lr=0.05)


def exact_worker(rank, size, folder):
    """Everything the two-process run of the tests computes (one spawn)."""
    from pyro_lvm.evaluate import elbo_decomposition, inference_gaps, log_likelihood
    from pyro_lvm.evaluate.distributed import distributed_evaluate

    folder = Path(folder)
    out = {}
    x = data()
    for loss, k in ESTIMATORS:
        out[loss], out[f"{loss}_reduces"] = count_reduces(run_fit, loss, k, EPOCHS)
        if loss == "elbo":  # evaluation order: log p(x) of a point-estimate guide is exact
            out["ll"] = distributed_evaluate(log_likelihood, model, delta_guide, x, num_samples=3)
            out["decomposition"] = distributed_evaluate(elbo_decomposition, model, delta_guide, x)
            pyro.set_rng_seed(7 + rank)
            out["gaps"] = distributed_evaluate(inference_gaps, model, GapGuide(), x, **GAPS)
    # pyro's SVI: one torch optimizer per parameter, the all-reduce still once per step
    out["elbo_svi"], out["svi_reduces"] = count_reduces(run_fit, "elbo", 1, EPOCHS, fast=False)
    # gradient clipping (FastSVI steps through pyro SVI): pyro.optim clips the reduced gradient
    out["elbo_clip"], out["clip_reduces"] = count_reduces(
        run_fit, "elbo", 1, EPOCHS, optimizer=clipped()
    )
    # plain SGD, where a gradient scale bug shows, for every estimator; then SGD with a clip
    for loss, k in ESTIMATORS:
        out[f"{loss}_sgd"] = run_fit(loss, k, EPOCHS, optimizer=sgd())
    out["elbo_sgd_clip"] = run_fit("elbo", 1, EPOCHS, optimizer=sgd(SGD_CLIP))
    out["local"] = run_local(EPOCHS, folder / "local2.pt")
    out["local_b2"] = run_local(2, batch_size=2)  # a process often owns no point of a batch
    # resume 1 -> 2 (checkpoints written by one process) and 2 -> 1 (written here)
    out["resume_fit"] = run_fit("elbo", 1, EPOCHS, folder / "fit1.pt", resume=True)
    run_fit("elbo", 1, HALF, folder / "fit2.pt")
    out["resume_local"] = run_local(EPOCHS, folder / "local1.pt", resume=True)
    run_local(HALF, folder / "local2half.pt")
    out["resume_fault"] = run_fit("elbo", 1, EPOCHS, folder / "fault.pt", resume=True)
    # ordinary seeding: train with Monte Carlo noise, then a distributed per-point bound
    # validation split across processes: deterministic with a point-estimate guide
    out["delta_valid"] = run_fit("elbo", 1, EPOCHS, guide=delta_guide, valid_data=x)
    pyro.set_rng_seed(5)
    run_fit("elbo", 1, EPOCHS, guide=mc_guide)
    out["mc_elbo"] = distributed_evaluate(elbo_decomposition, model, mc_guide, x, num_samples=200)
    return out


def fault_worker(rank, size, path, kill_epoch):
    """Rank 1 kills itself with SIGKILL at the end of epoch ``kill_epoch``; rank 0 reports."""
    from pyro_lvm.process_group import DistributedError

    def killer(history):
        if rank == 1 and history.epochs == kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        run_fit("elbo", 1, EPOCHS, path, callbacks=[killer])
    except DistributedError as e:
        return {"error": str(e), "time": time.monotonic()}
    return {"error": None, "time": time.monotonic()}
