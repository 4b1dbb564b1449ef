#!/usr/bin/env bash
# one-off device call (not committed): recheck the failures of the first call and time what it lost
set -uo pipefail
source scripts/gpu_env.sh
export PYTHONUNBUFFERED=1
O=${OUT:-/tmp/out}; mkdir -p "$O"
log "tests"
timeout --signal=INT --kill-after=10 150 env GPU_TEST_LIMIT=120 bash scripts/gpu_check.sh --gpu-only > "$O/tests.log" 2>&1
log "tests exit $?"
export PYTHONPATH=$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}
mkdir -p /tmp/lora_out
log "lora 3200x8640 (swiglu)"
timeout --signal=INT --kill-after=10 90 python3 bench/lora.py --shapes 3200x8640 --ms 4096,16384 --ranks 16,64 --budget 70 --out /tmp/lora_out > "$O/swiglu.log" 2>&1
log "lora exit $?"
cp /tmp/lora_out/*.json "$O/lora-3200x8640.json" 2>/dev/null
log "nf4 graph"
timeout --signal=INT --kill-after=10 90 python3 bench/nf4.py --timing graph --ms 1,4,16,4096 --sweep-gemv --sweep-dequant > "$O/nf4_graph.log" 2>&1
log "nf4 exit $?"
cp bench/results/nf4-graph-NVIDIA_H100*.json "$O/" 2>/dev/null
ls -la "$O"
