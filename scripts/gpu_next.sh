#!/usr/bin/env bash
# What the next GPU session runs first, in one device call of under 9 minutes: what the H100 calls of
# 2026-11-26 (the second session) left unconfirmed (bench/README.md, "The next GPU session's first
# call", says what and why). Each part runs under its own time limit and a failing part does not stop
# the rest; logs and the results JSON land in $OUT, packed into one archive if there are more than the
# 8 files a call brings back.
#
#   1. the GPU tests (scripts/gpu_check.sh --gpu-only, GPU_TEST_LIMIT seconds, default 100): the test
#      oracles and the decode-graph pool fix made after that H100 call's 17 failures, and the new
#      register decode of NF4 codes (PTX byte permutes run only on a GPU: every nibble pattern, the
#      gemv with each code lookup, the fused forward's decode against its pair table bit for bit);
#   2. bench/nf4.py in graph timing at M = 1, 4 and 4096 with the gemv sweep, which now times three
#      code lookups at every tile (GemvConfig.table: the byte table, the 16-entry table "nibble", the
#      register decode "prmt") and, at M = 1, tiles of a few rows by most of K: the byte table's
#      gathers are the suspect in the gemv's 17.8 us at M = 1 (bench/README.md). Its main table has
#      the fused forward with the register decode beside the table one (nf4_fused_prmt, M <= 64), and
#      at M = 4096 the NF4 tma kernels (nf4_tma: the weight decoded in registers inside a TMA GEMM's
#      K loop, no dequantize pass; issue 3's M >= 4096 target) beside dequant + cuBLAS and cuBLAS;
#   3. bench/tune.py on that JSON into $OUT/tuning-next.json (the gemv tiles and lookup only; the
#      thresholds stay the committed ones), which BEZOAR_TUNING then points at;
#   4. the GPU tests of the NF4 tma kernels (bf16, the PTX decode and bf16x2 scaling, against a torch
#      model of their rounding and against dequant + cuBLAS) and of the LoRA tma path
#      (bezoar_kernels.lora_tma: persistent Triton GEMMs on TMA descriptors with the LoRA terms in
#      their epilogues; both built on a CPU machine and never run on a GPU),
#      then bench/lora.py on the single-projection cases with the concat path beside it, M = 16384
#      first: nf4_tma_gemm (its GEMMs alone) against nf4_only (dequantize + cuBLAS) says whether the Triton
#      GEMM keeps up with cuBLAS, lora_tma against lora_concat whether issue 4's 1.10x comes closer.
#      The training step and decode figures (issues 10 and 6, closed) are left to bench/gpu_bench.sh.
#
# Then, on the machine the results come back to: python bench/tune.py <the JSON> (bench/README.md).
#
#   scripts/gpu_next.sh              # on the GPU machine: run(command="bash scripts/gpu_next.sh", carry=[".whl"])
#   scripts/gpu_next.sh --dry-run    # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

parse_dry_run_only "${BASH_SOURCE[0]}" "$@"
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
STAMP=/tmp/bezoar-gpu-next.start
[ "$DRY_RUN" = 1 ] || { mkdir -p "$OUT_DIR"; touch "$STAMP"; }

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
    # only what this call wrote: the tree carries the results already on record under the same names
    local found
    found=$(find bench/results -maxdepth 1 -name "$1" -newer "$STAMP")
    if [ -n "$found" ]; then
      # shellcheck disable=SC2086  # one path per line, no spaces in these names
      cp $found "$OUT_DIR"/
    else
      log "no new bench/results/$1 to copy"
    fi
  fi
}

part tests 120 env GPU_TEST_LIMIT="${GPU_TEST_LIMIT:-100}" bash scripts/gpu_check.sh --gpu-only
# the script above installed the project and the wheels; the part below uses that install
[ -d "$SITE_DIR" ] && prepend_pythonpath "$SITE_DIR"
# the sweep writes its JSON after every (M, shape) row, M = 1 first: a part cut short keeps those
part nf4_sweep 170 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,4096 --sweep-gemv
keep "nf4-graph-NVIDIA*.json"
# the settings that sweep derives (the gemv's lookup and tiles among them) into a tuning file of this
# call's own, which the LoRA bench below then runs with (its JSON records it under "tuning")
NF4_JSON=$(find bench/results -maxdepth 1 -name "nf4-graph-NVIDIA*.json" -newer "$STAMP" 2>/dev/null | head -1)
[ "$DRY_RUN" = 1 ] || rm -f "$OUT_DIR/tuning-next.json"  # never a file an earlier run left in a reused $OUT
if [ "$DRY_RUN" = 1 ] || [ -n "$NF4_JSON" ]; then
  # the gemv tiles (with their code lookup) only: the thresholds stay the committed ones
  part tune 15 "$PYTHON" bench/tune.py "${NF4_JSON:-bench/results/nf4-graph-DEVICE.json}" --keys nf4.gemv_tiles \
    --out "$OUT_DIR/tuning-next.json"
  [ -s "$OUT_DIR/tuning-next.json" ] && export BEZOAR_TUNING="$OUT_DIR/tuning-next.json"
else
  log "no nf4 results from this call: the LoRA bench runs on the committed tuning"
fi
part tma_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
  tests/kernels/test_nf4_tma.py tests/kernels/test_lora_tma.py
part lora_tma 150 "$PYTHON" bench/lora.py --paths cublas,concat,tma --ranks 16,64 --ms 16384,4096 --no-groups --budget 125
keep "lora-NVIDIA*.json"

# a call brings back at most 8 files: more are packed into one archive (bench/README.md)
if [ "$DRY_RUN" = 1 ]; then
  log "would pack $OUT_DIR into gpu-next.tar.gz if it holds more than 8 files"
elif [ "$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/gpu-next.tar.gz -C "$OUT_DIR" . && find "$OUT_DIR" -mindepth 1 -delete \
    && mv /tmp/gpu-next.tar.gz "$OUT_DIR/" && log "packed $OUT_DIR into gpu-next.tar.gz"
fi
