#!/usr/bin/env bash
# One-GPU check of issue 16 (under 8 minutes on one H200): CUDA smoke of fit (amortized and
# per-datapoint) and of the capture engine, importance-sampled evaluation on the GPU,
# `pyro-lvm train --device cuda`, and benchmarks/speed.py on the GPU with Pyro's eager
# (Trace_ELBO) and JitTrace_ELBO steps beside FastSVI's captured step (aten and Inductor), and
# (issue 17) fit under an NCCL process group of world size 1 against the plain path, and
# (issue 26) benchmarks/peers.py on the GPU: FastSVI's whole-step graph (Inductor with CUDA
# graphs for the long run) beside hand-written PyTorch, Pyro and, when jax's CUDA build is
# installed there, NumPyro.
#
#   bash benchmarks/device_check.sh            # writes into $OUT (default: a fresh temp dir)
#
# Uses binarized MNIST from $PYRO_LVM_DATA when binarized_mnist.npz is there (else runs/data,
# e.g. carried to the device machine), otherwise random images of MNIST's shape. Each stage
# has its own time limit; the limits sum to 470 s, under 8 minutes. Needs `device=` in fit/fit_local and
# `--device` in the CLI (issue 16, item 6).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYRO_LVM_DATA=${PYRO_LVM_DATA:-$PWD/runs/data}
export MPLBACKEND=Agg PYTHONWARNINGS=ignore
if [ -f "$PYRO_LVM_DATA/binarized_mnist.npz" ]; then DATA=mnist; SYN=""; else DATA=synthetic; SYN=--synthetic; fi
status=0
stage() {  # stage NAME SECONDS CMD...: run with a time limit, log, remember a failure
    local name=$1 limit=$2; shift 2
    local tic=$SECONDS
    echo "== $name (limit ${limit}s)"
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - tic)) s"
    else
        echo "   FAILED (rc $?) after $((SECONDS - tic)) s; last lines:"; tail -n 15 "$OUT/$name.log"; status=1
    fi
    tail -n 40 "$OUT/$name.log" | grep -E "^(784|inner|eval|group|ok|cuda|fit|loglik|K=)" || true
}
echo "device check: data=$DATA out=$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || status=1

stage smoke 100 python - "$DATA" <<'PY'
import sys, time, torch, pyro
from pyro_lvm.elbo import make_estimator
from pyro_lvm.evaluate.loglik import log_likelihood
from pyro_lvm.guides import LocalGaussianGuide
from pyro_lvm.models import VAE
from pyro_lvm.train import FastSVI, fit, fit_local

assert torch.cuda.is_available(), "no CUDA device"
if sys.argv[1] == "mnist":
    from pyro_lvm.data import load_binarized_mnist
    train, test = load_binarized_mnist("train").float()[:10_000], load_binarized_mnist("test").float()[:1000]
else:
    train, test = torch.bernoulli(torch.full((10_000, 784), 0.3)), torch.bernoulli(torch.full((1000, 784), 0.3))
# the capture engine on the GPU: FastSVI's captured step is verified and used
pyro.set_rng_seed(0)
vae = VAE(784, 50, (400,)).cuda()
svi = FastSVI(vae, vae.guide, pyro.optim.Adam({"lr": 1e-3}), make_estimator("iwae-dreg", 10))
x = train[:100].cuda()
losses = [svi.step(x) for _ in range(20)]
assert svi.jit_reason is None and svi.traced_steps == 17, (svi.traced_steps, svi.jit_reason)
print(f"cuda FastSVI captured: {svi.traced_steps} of 20 steps, loss {losses[0]:.1f} -> {losses[-1]:.1f}")
# fit, amortized, on the GPU (data on the CPU: fit moves minibatches)
pyro.clear_param_store()
vae = VAE(784, 50, (400,))
tic = time.perf_counter()
h = fit(vae, vae.guide, train, loss="elbo", num_epochs=1, batch_size=100, progress=False, device="cuda")
assert next(vae.parameters()).is_cuda and all(map(torch.isfinite, map(torch.as_tensor, h.epoch_losses)))
print(f"fit amortized on cuda: 1 epoch of {len(train)} in {time.perf_counter() - tic:.1f} s, loss {h.epoch_losses[-1]:.2f}")
# importance-sampled log-likelihood on the GPU
tic = time.perf_counter()
ll = log_likelihood(vae, vae.guide, test.cuda(), num_samples=1000)
assert ll.is_cuda and bool(torch.isfinite(ll).all())
print(f"loglik IS K=1000 on cuda: {len(test)} points in {time.perf_counter() - tic:.1f} s, mean {float(ll.mean()):.2f}")
# per-datapoint fit on the GPU
pyro.clear_param_store()
n = 2000
model, guide = VAE(784, 20, (200,), num_data=n), LocalGaussianGuide(n, 20)
tic = time.perf_counter()
hl = fit_local(model, guide, train[:n], num_epochs=1, batch_size=200, inner_max_steps=20, progress=False, device="cuda")
print(f"fit_local on cuda: 1 epoch of {n} in {time.perf_counter() - tic:.1f} s, loss {hl.loss[-1]:.2f}")
print("ok")
PY

stage train 70 pyro-lvm train --dataset "$([ $DATA = mnist ] && echo mnist || echo digits)" --epochs 1 \
    --device cuda --out "$OUT/train" --quiet
stage speed 100 python benchmarks/speed.py --device cuda $SYN --ks 1,50 --steps 20 --repeats 5 \
    --skip-eval --no-fit --estimators elbo,iwae,iwae-dreg --inductor iwae-dreg \
    --json "$OUT/speed_cuda.json"
# issue 17: fit in a process group of world size 1 on NCCL against the plain path (one GPU:
# NCCL refuses two ranks on one device; a ratio near 1.0 says the distributed path is free)
stage scaling 60 python benchmarks/scaling.py --device cuda --nproc 1 --particles 1,50 \
    --steps 4 --steps-k1 20 --epochs 2 --repeats 1 --json "$OUT/scaling_cuda.json"
stage eval 40 python benchmarks/speed.py --device cuda $SYN --eval-only --repeats 1 \
    --eval-points 10000 --eval-samples 1000 --eval-chunk 500 --json "$OUT/eval_cuda.json"
stage peers 100 python benchmarks/peers.py --device cuda --no-compile --archs 784-400-50 \
    --groups 1:elbo,50:iwae --repeats 3 --steps 20 --planned-steps 100000 --json "$OUT/peers_cuda.json"
echo "device check $([ $status = 0 ] && echo passed || echo FAILED); logs and JSON in $OUT"
exit $status
