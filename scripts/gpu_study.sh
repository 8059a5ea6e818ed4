#!/usr/bin/env bash
# The study's GPU share, run once on a borrowed single-GPU machine (no network, no project install):
#   device/home/lenet.db   sweeps created beforehand with `lenet sweep create ... --backend local --seed 0`
#   device/ids             their ids in priority order (first is served first); device/search: the search sweep
#   device/cifar10-jpg.tar.gz, .whl/ (wheels of `sweeps` and its needs that the machine lacks)
# Every worker shares the one GPU (--gpus 0,0,...): a LeNet step is launch-bound, so one process uses a
# fraction of the GPU. At $DEADLINE seconds all agents get SIGINT: unfinished runs are requeued with their
# last.pt, which comes back in $OUT/checkpoints.tar so `lenet agent` can finish them elsewhere (CPU too).
set -u
T0=$(date +%s)
DEADLINE=${DEADLINE:-480}      # s after start: stop all agents
WORKERS=${WORKERS:-12}         # main agent's worker processes
CONFIRM_EPOCHS=${CONFIRM_EPOCHS:-100}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DIR=${DEVICE_DIR:-device}
export PYTHONUNBUFFERED=1 LENET_HOME=$PWD/$DIR/home LENET_DATA_DIR=${LENET_DATA_DIR:-$PWD/$DIR/cifar10-jpg.tar.gz}
export LENET_CACHE_DIR=${LENET_CACHE_DIR:-/tmp/lenet-cache} LENET_HEARTBEAT_TIMEOUT=600
elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(elapsed)s] $*"; }

if [ -z "${SKIP_WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/machine.txt"
python3 -c "import torch, platform; print(torch.__version__, platform.python_version(), torch.cuda.get_device_name())" >> "$OUT/machine.txt"
nproc >> "$OUT/machine.txt"; cat "$OUT/machine.txt"

log "decode the data once into the tensor cache"
python3 -c "from ablation.config import RunConfig; from ablation.data import load_dataset; d = load_dataset(RunConfig()); print(d.name, len(d.train_y), len(d.test_y))" || exit 1
log "one-epoch GPU check"
GPUS=$(python3 -c "print(','.join(['0'] * $WORKERS))")
if [ -z "${SKIP_CHECK:-}" ] && ! python3 cli.py train preset=modern epochs=1 precision=fp32 device=cuda --wandb disabled --out /tmp/check; then
    log "GPU check failed: falling back to CPU workers"; export CUDA_VISIBLE_DEVICES=; GPUS=""; WORKERS=${CPU_WORKERS:-8}
fi

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$OUT/gpu_util.csv" 2>/dev/null &
NVSMI=$!
read -r -a IDS < $DIR/ids
SEARCH=$(cat $DIR/search 2>/dev/null)  # none: no search to confirm in this call
log "agent on ${IDS[*]} with $WORKERS workers"
timeout -s INT -k "${KILL_S:-60}" $(( DEADLINE - $(elapsed) )) python3 cli.py agent "${IDS[@]}" --workers "$WORKERS" \
    ${GPUS:+--gpus "$GPUS"} --wandb disabled > "$OUT/agent.log" 2>&1 &
MAIN=$!

# When the search is done, retrain its winner over 3 seeds with the longer schedule (3 more workers).
search_done() { python3 -c "from ablation.store import Store; exit(Store().sweep('$SEARCH')['state'] != 'finished')"; }
until [ -z "$SEARCH" ] || search_done || ! kill -0 $MAIN 2>/dev/null; do sleep 5; done
if [ -n "$SEARCH" ] && kill -0 $MAIN 2>/dev/null && [ $(( DEADLINE - $(elapsed) )) -gt 30 ]; then
    log "search finished: confirming its winner"
    python3 cli.py sweep confirm "$SEARCH" "$OUT/search_confirm.yaml" --epochs "$CONFIRM_EPOCHS" --seeds 3
    CONFIRM=$(python3 cli.py sweep create "$OUT/search_confirm.yaml" --backend local --seed 0 | grep -o 'created sweep [0-9a-f]*' | cut -d' ' -f3)
    timeout -s INT -k 60 $(( DEADLINE - $(elapsed) )) python3 cli.py agent "$CONFIRM" --workers 3 \
        ${GPUS:+--gpus 0,0,0} --wandb disabled > "$OUT/confirm.log" 2>&1 &
    CONFIRMING=$!
fi
wait $MAIN
[ -n "${CONFIRMING:-}" ] && wait $CONFIRMING
kill $NVSMI 2>/dev/null
log "agents done"

# One self-contained store file (WAL folded in), and the checkpoints worth keeping: last.pt of every run
# left unfinished (to resume elsewhere) and best.pt of the long runs.
python3 - "$OUT" <<'EOF'
import sqlite3, sys, tarfile
from pathlib import Path
from ablation.store import Store, home
out = Path(sys.argv[1])
store = Store()
dest = sqlite3.connect(out / "lenet.db")
store.db.backup(dest)
dest.close()
with tarfile.open(out / "checkpoints.tar", "w") as tar:
    for sweep in store.sweeps():
        for run in store.runs(sweep["id"]):
            folder = home() / "runs" / run["id"]
            keep = ["last.pt"] if run["state"] in ("pending", "running") else []
            keep += ["best.pt"] if run["params"].get("epochs", 0) >= 50 else []
            for name in keep:
                if (folder / name).exists():
                    tar.add(folder / name, arcname=f"runs/{run['id']}/{name}")
print("store and checkpoints written")
EOF
python3 cli.py sweep ls
log "done"
