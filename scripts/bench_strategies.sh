#!/usr/bin/env bash
# Reproduces the strategy benchmark of docs/benchmarks.md: every strategy calibrated to the
# same budget, interleaved timing rounds, median; results in docs/results/*.json.
# Run on an otherwise idle machine.
# Usage: bash scripts/bench_strategies.sh          (CPU: batches 64 and 1)
#        bash scripts/bench_strategies.sh cuda     (GPU: batches 256 and 1, with AMP)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
PY=.venv/bin/python
S=none,prune,merge,prune_merge,ppt
if [ "$DEVICE" = cpu ]; then BATCHES="64 1"; EXTRA=""; else BATCHES="256 1"; EXTRA="--amp"; fi
for B in $BATCHES; do
    $PY -m prance bench --model deit_small_patch16_224 --strategies $S --budget 50% --batch-size "$B" \
        --repeats 7 --device "$DEVICE" $EXTRA --output "docs/results/bench_deit_small_${DEVICE}_b${B}.json"
    $PY -m prance bench --model prance_vit_fmnist --strategies $S --budget 60% --batch-size "$B" \
        --repeats 15 --device "$DEVICE" $EXTRA --output "docs/results/bench_prance_vit_fmnist_${DEVICE}_b${B}.json"
done
