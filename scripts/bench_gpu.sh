#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md in one run (sized for <= 8 minutes on one GPU), each
# as a JSON record under OUT_DIR:
#   strategies_<model>_<dev>_b<B>.json   token strategies vs dense at batches 256 and 1, AMP
#                                        (python -m prance bench, as scripts/bench_strategies.sh runs it)
#   adaptive_deit_small_<strategy>_<dev>_b<B>.json
#                                        per-image adaptive execution vs dense, deit_small,
#                                        batches 256 and 1, AMP (scripts/bench_adaptive.py)
#   pretrain_<dev>.json                  a pretraining epoch's img/s through Ray Train (1 GPU
#                                        worker, AMP) and the weight-sharing step overhead
#                                        (scripts/bench_pretrain.py)
#   selector_iteration_<dev>.json        the seconds of one PPO iteration of the selector
#                                        (scripts/bench_selector.py --iteration-only)
#   bench_gpu_<dev>.json                 what ran, where, and how long it took
# Without a GPU (torch.cuda.is_available() false) the same steps run as a CPU fallback at
# tiny sizes (the default model, batch 8, 2 batches; about half a minute on an
# idle 2-core machine): it checks the script end to end, its records say "device": "cpu".
#
# Usage: bash scripts/bench_gpu.sh [OUT_DIR]        (default docs/results/gpu/)
#        PYTHON=python3 bash scripts/bench_gpu.sh   (another interpreter; default .venv/bin/python)
#        BENCH_GPU_FALLBACK=1 bash scripts/bench_gpu.sh DIR   (the CPU fallback, GPU or not)
# The pretraining and selector steps need the Fashion-MNIST files (apt-get install
# dataset-fashion-mnist, or PRANCE_FASHION_MNIST=<folder of the IDX files>): checked first.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT=${1:-$ROOT/docs/results/gpu}
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1
START=$(date +%s)

# one interpreter start for both checks: is there a GPU (torch.cuda.is_available()), and the data?
DEV=$("$PY" -c "
import sys, torch
from prance.data import load_fashion_mnist
try:
    load_fashion_mnist('test', download=False)
except Exception:
    sys.exit('bench_gpu: error: Fashion-MNIST not found (apt-get install dataset-fashion-mnist, or set PRANCE_FASHION_MNIST to a folder of its IDX files)')
print('cuda' if torch.cuda.is_available() else 'cpu')
") || exit 2
if [ "${BENCH_GPU_FALLBACK:-0}" = 1 ]; then DEV=cpu; fi   # the CPU fallback even on a GPU machine (tests)

step() { echo "[bench_gpu $(( $(date +%s) - START ))s] $*" >&2; }

# Add "device" (and "amp") to a record that does not say where it ran.
stamp() {
    "$PY" - "$1" "$DEV" "$2" <<'EOF'
import json, sys
path, dev, amp = sys.argv[1], sys.argv[2], sys.argv[3] == "amp"
record = json.load(open(path))
record = {"device": dev, "amp": amp, **record}
open(path, "w").write(json.dumps(record, indent=2) + "\n")
EOF
}

S=none,prune,merge,prune_merge,ppt
if [ "$DEV" = cuda ]; then
    AMP=--amp
    STRATEGY_RUNS="deit_small_patch16_224:50%:256:7 deit_small_patch16_224:50%:1:15 prance_vit_fmnist:60%:256:15 prance_vit_fmnist:60%:1:15"
    ADAPTIVE_MODEL=deit_small_patch16_224; ADAPTIVE_TAG=deit_small
    ADAPTIVE_RUNS="256:4:3 1:32:3"          # batch:batches:repeats
    ADAPTIVE_STRATEGIES="prune merge prune_merge"
    PRETRAIN="--workers 1"
    SELECTOR="--strategies prune"
    THREADS=
else
    # CPU fallback: tiny sizes, one thread (tiny models on few cores are slower with more)
    AMP=
    STRATEGY_RUNS="prance_vit_fmnist:60%:8:2"
    ADAPTIVE_MODEL=default; ADAPTIVE_TAG=default
    ADAPTIVE_RUNS="8:2:1"
    ADAPTIVE_STRATEGIES="prune"
    PRETRAIN="--workers none --batch-size 16"
    SELECTOR="--strategies prune --rollout-images 16 --train-limit 64 --val-limit 32 --warm-start 0 --timed-iterations 2 --threads 1"
    THREADS="--threads 1"
    export OMP_NUM_THREADS=1
fi

for run in $STRATEGY_RUNS; do
    IFS=: read -r model budget b repeats <<<"$run"
    tag=${model%_patch16_224}
    file="$OUT/strategies_${tag}_${DEV}_b${b}.json"
    step "strategies $model budget $budget batch $b"
    "$PY" -m prance bench --model "$model" --strategies $S --budget "$budget" --batch-size "$b" --warmup 2 \
        --repeats "$repeats" --device "$DEV" $AMP --output "$file" --json >/dev/null
    stamp "$file" "${AMP:+amp}"
done

for run in $ADAPTIVE_RUNS; do
    IFS=: read -r b batches repeats <<<"$run"
    for strategy in $ADAPTIVE_STRATEGIES; do
        step "adaptive $ADAPTIVE_MODEL $strategy batch $b"
        "$PY" scripts/bench_adaptive.py --model "$ADAPTIVE_MODEL" --strategy "$strategy" --batch-size "$b" --batches "$batches" \
            --repeats "$repeats" --device "$DEV" $AMP $THREADS --quiet \
            --json "$OUT/adaptive_${ADAPTIVE_TAG}_${strategy}_${DEV}_b${b}.json" >/dev/null
    done
done

step "pretraining ($PRETRAIN)"
"$PY" scripts/bench_pretrain.py --device "$DEV" $AMP $PRETRAIN --output "$OUT/pretrain_${DEV}.json" >/dev/null

step "selector iteration ($SELECTOR)"
"$PY" scripts/bench_selector.py --iteration-only --device "$DEV" $AMP $SELECTOR --output "$OUT/selector_iteration_${DEV}.json" >/dev/null

WALL=$(( $(date +%s) - START ))
"$PY" - "$OUT" "$DEV" "$WALL" <<'EOF'
import datetime, json, os, sys
import torch
out, dev, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])
files = sorted(f for f in os.listdir(out) if f.endswith(f"_{dev}.json") or f"_{dev}_b" in f)
record = {"device": dev, "gpu": torch.cuda.get_device_name() if dev == "cuda" else None, "torch": torch.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "wall_seconds": wall, "files": [f for f in files if f != f"bench_gpu_{dev}.json"]}
open(os.path.join(out, f"bench_gpu_{dev}.json"), "w").write(json.dumps(record, indent=2) + "\n")
EOF
step "done: $OUT"
