#!/usr/bin/env bash
# One row of the README's static-MNIST table on one GPU (issue 26, item 7), one row per call:
#
#   bash benchmarks/device_quality.sh ROW OUTDIR      # ROW: hvae-vamp | flow80 | iwae-k50
#
# Trains with the recipe of benchmarks/RESULTS.md §5 (gated 784-300-300 networks, 40 latents,
# linear KL warm-up over 100 epochs, Adam 5e-4, batch 100, patience 50) for a wall-clock budget
# ($BUDGET seconds, default 540 = 9 minutes), checkpointing after every epoch into OUTDIR, so a
# later call resumes where this one stopped. Then it scores the best epoch with K = 5000
# importance samples on all 10,000 test images on the GPU and writes ROW's JSON (the figure,
# its epochs, train and eval seconds, device) and checkpoint into OUTDIR. Training steps are
# FastSVI's whole-step graph (fit's default). Env: DEVICE (default cuda; `DEVICE=cpu` with
# SMOKE=1 runs a tiny CPU smoke of the same commands: 1 epoch of 500 images, K = 20), EPOCHS (the most to reach, default
# 2000), PYRO_LVM_DATA (binarized_mnist.npz).
set -uo pipefail
cd "$(dirname "$0")/.."
ROW=${1:?usage: device_quality.sh ROW OUTDIR (ROW: hvae-vamp, flow80 or iwae-k50)}
OUTDIR=${2:?usage: device_quality.sh ROW OUTDIR}
BUDGET=${BUDGET:-540}
DEVICE=${DEVICE:-cuda}
EPOCHS=${EPOCHS:-2000}
mkdir -p "$OUTDIR"
RECIPE=(--network gated --warmup-epochs 100 --lr 5e-4 --patience 50 --device "$DEVICE" --out "$OUTDIR")
case "$ROW" in
    hvae-vamp) ARGS=(--config hvae-vamp) ;;
    flow80) ARGS=(--config vae-flow --num-flows 80) ;;
    iwae-k50) ARGS=(--config iwae-k50) ;;
    *) echo "unknown ROW $ROW: one of hvae-vamp, flow80, iwae-k50" >&2; exit 2 ;;
esac
NAME=${ARGS[1]}
if [ "${SMOKE:-0}" = 1 ]; then  # seconds on a CPU: tiny networks, an MNIST slice, K=20
    RECIPE+=(--smoke --smoke-mnist --warmup-epochs 2 --patience 2)
fi
echo "device_quality: $ROW ($NAME) on $DEVICE, budget ${BUDGET}s, out $OUTDIR"
tic=$SECONDS
# 1. train until the budget runs out (SIGINT at the budget; the checkpoint of the last whole
#    epoch stays), or until patience stops it (then this call also scored it)
timeout -s INT "$BUDGET" python benchmarks/mnist_nll.py "${ARGS[@]}" "${RECIPE[@]}" \
    --epochs "$EPOCHS" > "$OUTDIR/$NAME.train.log" 2>&1
rc=$?
echo "trained for $((SECONDS - tic)) s (rc $rc); last lines:"; tail -n 5 "$OUTDIR/$NAME.train.log"
if [ "$rc" = 0 ]; then echo "finished within the budget: scored above"; exit 0; fi
# 2. score the best epoch so far: --epochs = the epochs reached means no training is left
REACHED=$(python - "$OUTDIR/$NAME.pt" <<'PY'
import sys
from pyro_lvm.train import read_checkpoint
print(read_checkpoint(sys.argv[1])["epoch"])
PY
) || { echo "no checkpoint written within the budget" >&2; exit 1; }
steps_per_s=$(python - "$OUTDIR/$NAME.train.log" "$REACHED" "$((SECONDS - tic))" <<'PY'
import sys
print(f"{int(sys.argv[2]) * 500 / max(1, int(sys.argv[3])):.0f}")  # 50,000 images / batch 100
PY
)
echo "reached epoch $REACHED (~$steps_per_s steps/s over the call, incl. start-up); scoring"
python benchmarks/mnist_nll.py "${ARGS[@]}" "${RECIPE[@]}" --epochs "$REACHED" \
    > "$OUTDIR/$NAME.eval.log" 2>&1
rc=$?
tail -n 5 "$OUTDIR/$NAME.eval.log"
exit $rc
