#!/usr/bin/env bash
# The study's GPU share, run once on a borrowed single-GPU machine (no network, no project install):
#   device/home/lenet.db   sweeps created beforehand with `lenet sweep create ... --backend local --seed 0`
#   device/ids             (may be empty) ids for the main agent in priority order (first is served first):
#                          runs one at a time (those that cannot train in packs: TTA, EMA, mixing, distillation)
#   device/fused_ids       (optional) ids for a second agent that trains compatible runs as packs (--fuse K)
#   device/search          (optional) a search sweep whose winner is confirmed as soon as it finishes
#   device/teachers/       (optional) copied to /work/teachers: the absolute teacher paths the sweeps name
#   device/cifar10-jpg.tar.gz, .whl/ (wheels of `sweeps` and its needs that the machine lacks)
# Every worker shares the one GPU (--gpus 0,0,...): a LeNet step is launch-bound, so one process uses a
# fraction of the GPU; but processes sharing a GPU are time-sliced, so a few workers with large packs train
# more than many one-run workers (session 13: 8.5 against 5.6 model-epochs/s). With BENCH_S > 0,
# scripts/gpu_bench.sh runs first within BENCH_S seconds (the fused benchmark's GPU figures), and the pack size
# is the fastest pack it measured, at most $FUSE (1 if packs failed).
# At $DEADLINE seconds all agents get SIGINT: unfinished runs are requeued with their last.pt, which comes
# back in $OUT/checkpoints*.tar so `lenet agent` can finish them elsewhere (CPU too).
# Results (at most 8 files): lenet.db, checkpoints0-2.tar, logs.tar (agent, benchmark and GPU-load logs),
# benchmarks.md (docs/benchmarks.md with the GPU blocks filled in), summary.txt.
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-480}      # s after start: stop all agents
WORKERS=${WORKERS:-12}         # main agent's worker processes
FUSED_WORKERS=${FUSED_WORKERS:-3}
FUSE=${FUSE:-64}
BENCH_S=${BENCH_S:-0}
CONFIRM_EPOCHS=${CONFIRM_EPOCHS:-100}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOGS=$(mktemp -d)
DIR=$(cd "${DEVICE_DIR:-device}" && pwd) || exit 1
export PYTHONUNBUFFERED=1 LENET_HOME=$DIR/home LENET_DATA_DIR=${LENET_DATA_DIR:-$DIR/cifar10-jpg.tar.gz}
export LENET_CACHE_DIR=${LENET_CACHE_DIR:-/tmp/lenet-cache} LENET_HEARTBEAT_TIMEOUT=600
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(elapsed)s] $*" | tee -a "$LOGS/summary.txt"; }
finish_logs() { cp "$LOGS/summary.txt" "$OUT/summary.txt"; tar -C "$LOGS" -cf "$OUT/logs.tar" .; }
trap finish_logs EXIT

if [ -z "${SKIP_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python3 -c "import torch, platform; print(torch.__version__, platform.python_version(), \
torch.cuda.is_available() and torch.cuda.get_device_name())"
    nproc
} > "$LOGS/machine.txt"
cat "$LOGS/machine.txt" | tee -a "$LOGS/summary.txt"
if [ -d "$DIR/teachers" ]; then mkdir -p /work && cp -r "$DIR/teachers" /work/; fi

log "decode the data once into the tensor cache"
python3 -c "from ablation.config import RunConfig; from ablation.data import load_dataset; d = load_dataset(RunConfig()); print(d.name, len(d.train_y), len(d.test_y))" || exit 1

if [ "$BENCH_S" -gt 0 ]; then
    log "fused benchmark within $BENCH_S s"
    BUDGET=$BENCH_S OUT=$LOGS/bench bash scripts/gpu_bench.sh > "$LOGS/bench.log" 2>&1
    cp "$LOGS/bench/benchmarks.md" "$OUT/benchmarks.md" 2>/dev/null
    # The pack size with the most model-epochs/s among the measured rows "| K | pack s | pack me/s | ..."
    FUSE=$(python3 -c "
import re, sys
rows = [line.split('|') for line in open(sys.argv[1]) if re.match(r'^\| \d+ \| [\d.]+ \|', line)]
print(min($FUSE, int(max(rows, key=lambda r: float(r[3]))[1])) if rows else 1)" "$LOGS/bench/fused.log" 2>/dev/null || echo 1)
    log "benchmark done; agents fuse up to $FUSE runs per pack"
    [ "$FUSE" -gt 1 ] && SKIP_CHECK=1  # packs trained on the GPU: it works
fi

GPUS=$(python3 -c "print(','.join(['0'] * $WORKERS))")
FGPUS=$(python3 -c "print(','.join(['0'] * $FUSED_WORKERS))")
if [ -z "${SKIP_CHECK:-}" ] && ! python3 cli.py train preset=modern epochs=1 precision=fp32 device=cuda --wandb disabled --out /tmp/check > "$LOGS/check.log" 2>&1; then
    log "GPU check failed: falling back to CPU workers"; export CUDA_VISIBLE_DEVICES=; GPUS=""; FGPUS=""; WORKERS=${CPU_WORKERS:-8}
fi

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$LOGS/gpu_util.csv" 2>/dev/null &
NVSMI=$!
IDS=(); [ -s $DIR/ids ] && read -r -a IDS < $DIR/ids
SEARCH=$(cat $DIR/search 2>/dev/null)  # none: no search to confirm in this call
if [ ${#IDS[@]} -gt 0 ]; then
    log "agent on ${IDS[*]} with $WORKERS workers, one run each"
    timeout -s INT -k "${KILL_S:-60}" $(( DEADLINE - $(elapsed) )) python3 cli.py agent "${IDS[@]}" --workers "$WORKERS" \
        ${GPUS:+--gpus "$GPUS"} --fuse 1 --wandb disabled > "$LOGS/agent.log" 2>&1 &
    MAIN=$!
fi
if [ -s $DIR/fused_ids ]; then
    read -r -a FIDS < $DIR/fused_ids
    log "agent on ${FIDS[*]} with $FUSED_WORKERS workers, packs of up to $FUSE runs"
    timeout -s INT -k "${KILL_S:-60}" $(( DEADLINE - $(elapsed) )) python3 cli.py agent "${FIDS[@]}" \
        --workers "$FUSED_WORKERS" ${FGPUS:+--gpus "$FGPUS"} --fuse "$FUSE" --wandb disabled > "$LOGS/fused_agent.log" 2>&1 &
    FUSED=$!
fi

# When the search is done, retrain its winner over 3 seeds with the longer schedule (3 more workers).
search_done() { python3 -c "from ablation.store import Store; exit(Store().sweep('$SEARCH')['state'] != 'finished')"; }
until [ -z "$SEARCH" ] || search_done || ! kill -0 "${MAIN:-}" 2>/dev/null; do sleep 5; done
if [ -n "$SEARCH" ] && kill -0 "${MAIN:-}" 2>/dev/null && [ $(( DEADLINE - $(elapsed) )) -gt 30 ]; then
    log "search finished: confirming its winner"
    python3 cli.py sweep confirm "$SEARCH" "$LOGS/search_confirm.yaml" --epochs "$CONFIRM_EPOCHS" --seeds 3
    CONFIRM=$(python3 cli.py sweep create "$LOGS/search_confirm.yaml" --backend local --seed 0 | grep -o 'created sweep [0-9a-f]*' | cut -d' ' -f3)
    timeout -s INT -k 60 $(( DEADLINE - $(elapsed) )) python3 cli.py agent "$CONFIRM" --workers 3 \
        ${GPUS:+--gpus 0,0,0} --wandb disabled > "$LOGS/confirm.log" 2>&1 &
    CONFIRMING=$!
fi
[ -n "${MAIN:-}" ] && wait $MAIN
[ -n "${FUSED:-}" ] && wait $FUSED
[ -n "${CONFIRMING:-}" ] && wait $CONFIRMING
kill $NVSMI 2>/dev/null
log "agents done"

# One self-contained store file (WAL folded in), and the checkpoints worth keeping: last.pt of every run
# left unfinished (to resume elsewhere; earliest started first) and, with KEEP_BEST=1, best.pt of the long runs,
# in up to 3 tars of <= 15 MiB (the device tool brings back files of <= 16 MiB); runs left out restart afresh.
python3 - "$OUT" <<'EOF' 2>&1 | tee -a "$LOGS/summary.txt"
import os, sqlite3, sys, tarfile
from pathlib import Path
from ablation.store import Store, home
out = Path(sys.argv[1])
store = Store()
dest = sqlite3.connect(out / "lenet.db")
store.db.backup(dest)
dest.close()
keep_best = os.environ.get("KEEP_BEST") == "1"
files = []
for sweep in store.sweeps():
    for run in store.runs(sweep["id"]):
        folder = home() / "runs" / run["id"]
        keep = ["last.pt"] if run["state"] in ("pending", "running") else []
        keep += ["best.pt"] if keep_best and run["params"].get("epochs", 0) >= 50 else []
        files += [(run["started_at"] or 0, folder / name) for name in keep if (folder / name).exists()]
tars, limit, left_out = [], 15 << 20, 0
for _, path in sorted(files):
    size = path.stat().st_size
    if not tars or tars[-1][1] + size > limit:
        if len(tars) == 3:
            left_out += 1
            continue
        tars.append([tarfile.open(out / f"checkpoints{len(tars)}.tar", "w"), 0])
    tars[-1][0].add(path, arcname=f"runs/{path.parent.name}/{path.name}")
    tars[-1][1] += size
for tar, _ in tars:
    tar.close()
print(f"{len(files) - left_out} checkpoints in {len(tars)} tar(s); {left_out} left out (their runs restart afresh)")
EOF
python3 cli.py sweep ls | tee -a "$LOGS/summary.txt"
log "done"
