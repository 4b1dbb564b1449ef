#!/usr/bin/env bash
# What the next GPU session runs first, in one device call of under 9 minutes: the checks of what was
# built since the last GPU run and has only run on the CPU (bench/README.md, "The next GPU session's
# first call", says what and why). Each part runs under its own time limit and a failing part does
# not stop the rest; logs and the results JSON land in $OUT.
#
#   1. the GPU tests (scripts/gpu_check.sh --gpu-only, GPU_TEST_LIMIT seconds, default 110);
#   2. bench/lora.py through scripts/gpu_bench.sh: first RMSNorm + q/k/v (and gate/up) with the fused
#      rms_norm_lora against the norm and the separate LoRA calls (and the fused call's two grids side
#      by side at the largest case), then cublas against concat, both with the one-pass dx + dA launch
#      and the pair-hashed dropout mask;
#   3. bench/lora.py --breakdown default: GPU time per kernel of NF4 alone, cublas, concat and the
#      fused norm + q/k/v; bench/lora.py --dropout 0 on two shapes: the merged path (the LoRA term
#      folded into W);
#   4. bench/nf4.py --timing graph with the gemv and dequantize sweeps (the one-tile gemv kernel);
#   5. bench/generate.py --breakdown 16: a decode step per kernel, gemv off and on.
#
# Then, on the machine the results come back to: python bench/tune.py <the JSON> (bench/README.md).
#
#   scripts/gpu_next.sh              # on the GPU machine: run(command="bash scripts/gpu_next.sh", carry=[".whl"])
#   scripts/gpu_next.sh --dry-run    # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scripts/gpu_next.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export DRY_RUN PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"

# name, seconds, command: the command's output goes to $OUT/<name>.log
part() {
  local name=$1 limit=$2
  shift 2
  log "part $name (limit ${limit}s)"
  if [ "$DRY_RUN" = 1 ]; then
    run timeout --signal=INT --kill-after=10 "$limit" "$@"
    return 0
  fi
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  log "part $name: exit $?"
}

# copy what a part wrote under bench/results to $OUT at once: a call cut short keeps what finished
keep() {
  if [ "$DRY_RUN" = 1 ]; then
    log "would copy bench/results/$1 to $OUT_DIR"
  else
    # shellcheck disable=SC2086  # $1 is a glob
    cp bench/results/$1 "$OUT_DIR"/ 2>/dev/null || log "no bench/results/$1 to copy"
  fi
}

part tests 140 env GPU_TEST_LIMIT="${GPU_TEST_LIMIT:-110}" bash scripts/gpu_check.sh --gpu-only
part lora 160 bash scripts/gpu_bench.sh --only lora --budget 150
# the two scripts above installed the project and the wheels; the parts below use that install
[ -d "$SITE_DIR" ] && prepend_pythonpath "$SITE_DIR"
part lora_breakdown 40 "$PYTHON" bench/lora.py --breakdown default
part lora_no_dropout 35 "$PYTHON" bench/lora.py --dropout 0 --ms 16384 --ranks 16 --shapes 3200x3200,8640x3200
keep "lora-no-dropout-*.json"
part nf4_graph 100 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16,4096 --sweep-gemv --sweep-dequant
keep "nf4-graph-*.json"
part decode_breakdown 45 "$PYTHON" bench/generate.py --breakdown 16
