#!/usr/bin/env bash
# One device call for a session lent the 15-minute budget (under 9 minutes of command time): the
# measurements that decide issues 3 and 4, most decisive first, each part under its own time limit, a
# failing part not stopping the rest. Everything lands in $OUT (packed into one archive when a call
# would bring back more than its 8 files).
#
#   1. bench/nf4.py --sweep-tma at M = 4096: the NF4 tma kernels (weight decoded in registers inside a
#      TMA GEMM's K loop) at each tile config, checked against dequant + cuBLAS, timed beside it and
#      cuBLAS: issue 3's M >= 4096 target;
#   2. the GPU tests of the NF4 tma and LoRA tma kernels (PTX decode bit for bit, 3B-shape GEMMs);
#   3. bench/lora.py with the cuBLAS, concat and tma paths at M = 16384 and 4096, r = 16 and 64: issue 4;
#   4. bench/nf4.py in graph timing at M = 1, 4, 16 with the gemv sweep: issue 3's M <= 16 target;
#   5. the whole GPU test suite for what time is left.
#
#   scripts/gpu_short.sh             # on the GPU machine: run(command="bash scripts/gpu_short.sh", carry=[".whl"], timeout_s=590)
#   scripts/gpu_short.sh --dry-run   # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

parse_dry_run_only "${BASH_SOURCE[0]}" "$@"
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
START=$(date +%s)
TOTAL=${GPU_SHORT_SECONDS:-560}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"

# name, seconds, command: at most the given seconds and never past the call's total; output to $OUT/<name>.log
part() {
  local name=$1 limit=$2 left
  shift 2
  left=$(seconds_left "$START" "$TOTAL")
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    log "part $name skipped: ${left}s left of ${TOTAL}s"
    return 0
  fi
  log "part $name (limit ${limit}s)"
  if [ "$DRY_RUN" = 1 ]; then
    run timeout --signal=INT --kill-after=10 "$limit" "$@"
    return 0
  fi
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  log "part $name: exit $?"
}

if [ "$DRY_RUN" = 1 ]; then
  install_wheels; install_project; show_versions
else
  { install_wheels; install_project; show_versions; } >"$OUT_DIR/setup.log" 2>&1
  tail -n 12 "$OUT_DIR/setup.log"
fi
[ -d "$SITE_DIR" ] && prepend_pythonpath "$SITE_DIR"

part nf4_tma_sweep 110 "$PYTHON" bench/nf4.py --sweep-tma --ms 4096 --out "$OUT_DIR"
part tma_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
  tests/kernels/test_nf4_tma.py tests/kernels/test_lora_tma.py
part lora 125 "$PYTHON" bench/lora.py --paths cublas,concat,tma --ranks 16,64 --ms 16384,4096 --no-groups \
  --budget 105 --out "$OUT_DIR"
part nf4_gemv 110 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16 --sweep-gemv --out "$OUT_DIR"
part gpu_tests 120 env GPU_TEST_LIMIT=100 bash scripts/gpu_check.sh --gpu-only

if [ "$DRY_RUN" = 1 ]; then
  log "would pack $OUT_DIR into gpu-short.tar.gz if it holds more than 8 files"
elif [ "$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/gpu-short.tar.gz -C "$OUT_DIR" . && find "$OUT_DIR" -mindepth 1 -delete \
    && mv /tmp/gpu-short.tar.gz "$OUT_DIR/" && log "packed $OUT_DIR into gpu-short.tar.gz"
fi
log "done in $(( $(date +%s) - START ))s"
