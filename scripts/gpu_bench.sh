#!/usr/bin/env bash
# Fused-training benchmark, run once on a borrowed single-GPU machine (no network, no project install; synthetic
# data, so nothing to carry): benchmarks/fused.py on device=cuda for K = 1 4 16 64 256 (packs; one run at a time
# up to K=$MAX_SEQUENTIAL; N worker processes sharing the GPU up to K=$MAX_PROCS), then one whole 30-epoch
# `modern` run (target: <= 10 s). Fits ~10 minutes: each step has a timeout within $BUDGET seconds, and the rows
# print as they are measured, so a step cut short still leaves its finished rows in $OUT/*.log.
# Results: $OUT/benchmarks.md (docs/benchmarks.md with its fused-gpu blocks filled in: copy it back, or paste
# those blocks), $OUT/fused.log, $OUT/single.log, $OUT/machine.txt, $OUT/gpu_util.csv.
#   bash scripts/gpu_bench.sh
# CPU check of every line (no GPU): DEVICE=cpu SIZES="1 2" TRAIN=1024 VAL=256 SINGLE_TRAIN=1024 SINGLE_EPOCHS=2 \
#   PY=.venv/bin/python OUT=/tmp/gpu_bench bash scripts/gpu_bench.sh
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-560}                  # s for the whole script
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-1 4 16 64 256}
TRAIN=${TRAIN:-10240}                  # images per run incl. validation: 9,216 trained per epoch (72 steps of 128)
VAL=${VAL:-1024}
EPOCHS=${EPOCHS:-2}
PRECISION=${PRECISION:-auto}           # the modern recipe's default: bf16 autocast on CUDA
PROCS=${PROCS:-$(nproc)}               # worker processes sharing the GPU, as `lenet agent --workers N --gpus 0,0,...`
MAX_SEQUENTIAL=${MAX_SEQUENTIAL:-16}   # one at a time beyond this is linear and slow: not timed
MAX_PROCS=${MAX_PROCS:-64}
SINGLE_TRAIN=${SINGLE_TRAIN:-0}        # 0: 50,000 synthetic images (45,000 trained per epoch, as CIFAR-10)
SINGLE_VAL=${SINGLE_VAL:-5000}
SINGLE_EPOCHS=${SINGLE_EPOCHS:-30}
SINGLE_S=${SINGLE_S:-170}              # time reserved for the single run (at today's ~3 s/epoch it needs ~100 s)
PY=${PY:-python3}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
limit() { local t=$(( $(left) - $1 )); echo $(( t > 30 ? t : 30 )); }  # s for a step, keeping $1 s for later ones
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

{
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$PY" -c "import torch, platform; print('torch', torch.__version__, 'python', platform.python_version(), \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
    echo "cores $(nproc)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
cp docs/benchmarks.md "$OUT/benchmarks.md"
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$OUT/gpu_util.csv" 2>&1 &
    NVSMI=$!
fi

log "packs vs one at a time vs $PROCS processes: K = $SIZES"
# shellcheck disable=SC2086  # SIZES is a list
timeout -k 10 "$(limit "$SINGLE_S")" "$PY" benchmarks/fused.py --device "$DEVICE" --sizes $SIZES \
    --train "$TRAIN" --val "$VAL" --epochs "$EPOCHS" --precision "$PRECISION" --procs "$PROCS" \
    --max-sequential "$MAX_SEQUENTIAL" --max-procs "$MAX_PROCS" \
    --out "$OUT/benchmarks.md" --marker fused-gpu 2>&1 | tee "$OUT/fused.log"
RC=${PIPESTATUS[0]}; [ "$RC" = 124 ] && log "packs cut short by the time limit: only the rows above were measured"
log "packs: exit $RC"

log "one $SINGLE_EPOCHS-epoch modern run"
timeout -k 10 "$(limit 0)" "$PY" benchmarks/fused.py --device "$DEVICE" --single-run \
    --single-epochs "$SINGLE_EPOCHS" --train "$SINGLE_TRAIN" --val "$SINGLE_VAL" --precision "$PRECISION" \
    --out "$OUT/benchmarks.md" --marker fused-gpu-single 2>&1 | tee "$OUT/single.log"
RC=${PIPESTATUS[0]}; [ "$RC" = 124 ] && log "the single run went over its time limit: far over the 10 s target"
log "single run: exit $RC"

[ -n "${NVSMI:-}" ] && kill "$NVSMI" 2> /dev/null
log "done; results in $OUT"
