#!/usr/bin/env bash
# The second device call of the next GPU session, right after scripts/gpu_next.sh while the machine is
# still warm: the tma path's GEMMs alone (no adapter) at the tile configs of bench/lora.py --sweep-tma,
# against cuBLAS on the same operands, M = 16384 on the three 3B shapes. It says which tiles make the
# Triton GEMM fastest on this GPU and how far from cuBLAS it stays. The JSON lands in $OUT.
#
#   scripts/gpu_tma_sweep.sh             # on the GPU machine: run(command="bash scripts/gpu_tma_sweep.sh", timeout_s=240)
#   scripts/gpu_tma_sweep.sh --dry-run   # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scripts/gpu_tma_sweep.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export DRY_RUN PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"

install_project  # quick where the first call's install is still there
# the sweep writes its JSON into $OUT directly; SIGINT at the limit still prints what it timed
run timeout --signal=INT --kill-after=10 200 "$PYTHON" bench/lora.py --sweep-tma --ms 16384 --out "$OUT_DIR"
