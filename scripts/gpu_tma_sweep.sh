#!/usr/bin/env bash
# The second device call of the next GPU session, right after scripts/gpu_next.sh while the machine is
# still warm, two tile sweeps on the three 3B shapes, each checked against cuBLAS before it is timed:
#   1. the NF4 tma kernels (the 4-bit weight decoded inside the K loop) at M = 4096, issue 3's
#      M >= 4096 target, against cuBLAS on the dequantized weight and dequant + cuBLAS
#      (bench/nf4.py --sweep-tma);
#   2. the LoRA tma path's GEMMs alone (no adapter) at M = 16384 against cuBLAS on the same operands
#      (bench/lora.py --sweep-tma).
# They say which tiles make each Triton GEMM fastest on this GPU and how far from cuBLAS it stays. The
# JSON lands in $OUT.
#
#   scripts/gpu_tma_sweep.sh             # on the GPU machine: run(command="bash scripts/gpu_tma_sweep.sh", timeout_s=240)
#   scripts/gpu_tma_sweep.sh --dry-run   # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

parse_dry_run_only "${BASH_SOURCE[0]}" "$@"
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"

install_project  # quick where the first call's install is still there
# each sweep writes its JSON into $OUT directly, after every config; SIGINT at the limit keeps what it timed
run timeout --signal=INT --kill-after=10 100 "$PYTHON" bench/nf4.py --sweep-tma --ms 4096 --out "$OUT_DIR"
run timeout --signal=INT --kill-after=10 100 "$PYTHON" bench/lora.py --sweep-tma --ms 16384 --out "$OUT_DIR"
