#!/usr/bin/env bash
# The device call for a session lent the 15-minute budget: parts by name, each under its own time limit
# and never past the call's total (GPU_SHORT_SECONDS, default 560), a failing part not stopping the rest.
# Logs and results JSON land in $OUT, packed into one archive when there are more than the 8 files a
# call brings back. A call starts a machine in about 30 s; one of 590 s leaves time for a second,
# shorter call (bench/README.md, "On the lent GPU").
#
# Parts (--parts a,b,c runs them in that order; the default is the next session's call):
#   gpu_tests      the whole GPU test suite (scripts/gpu_check.sh --gpu-only; its install included)
#   nf4_cache      bench/nf4.py --cache: training-step sequences with the dequant cache off and on (issue 3, M >= 4096)
#   step_cache     bench/step.py, SFT q/k/v at 8K tokens, full checkpointing with the dequant cache off and on,
#                  and each step's GPU time by kernel category (--breakdown 2)
#   nf4_small      bench/nf4.py in graph timing at M = 1, 4, 16: what auto runs with the committed tuning
#   decode         bench/generate.py --breakdown 32: a 3B decode step at batch 1, GPU time per kernel
#   generate       bench/generate.py --batches 1: decode tokens/s with CUDA graphs against transformers + bnb
#   lora           bench/lora.py, cuBLAS, concat and tma paths, M = 16384 and 4096, r = 16 and 64 (issue 4)
#   lora_nodrop    bench/lora.py --dropout 0: auto (merged there, which is also timed as itself) and concat, M = 16384 and 4096, r = 16 and 64,
#                  beside PEFT-style and bitsandbytes + PEFT (issue 4 without dropout)
#   lora_breakdown bench/lora.py --breakdown: GPU time per kernel and in passes over the input, NF4 alone
#                  against the cuBLAS and concat paths and the fused norm + q/k/v, M = 16384, r = 16; then
#                  with dropout 0, NF4 alone against merged and concat at 3200x3200 (issue 4)
#   waves          bench/lora.py --breakdown at 3200x3200, M = 16384, r = 16: the concat path and the fused norm +
#                  q/k/v with the dA/dB splits fitted to waves of the kernels' occupancy and rounded up as before
#                  (BEZOAR_LORA_WAVES=0), kernel by kernel, beside NF4 alone (issue 4)
#   merge          the merged path's weight merge (issue 4, no dropout): bench/lora.py --sweep-merge (each launch
#                  of the merge kernel against the dequantize alone, r = 16 then 64), bench/tune.py's pick of it
#                  into $OUT/merge-tuning.json, and under that file the no-dropout breakdown (NF4 alone, merged,
#                  concat at 3200x3200) and bench/lora.py's timings without dropout (merged and concat, r = 16
#                  and 64); then the GPU tests of the merge
#   concat_align   the concat path's LoRA column align (issue 4): bench/lora.py --sweep-concat-align (the concat
#                  forward + backward at align 16, 64 and 128, each checked against 16, single projections and
#                  q/k/v), bench/tune.py's pick of lora.concat_align into $OUT/concat-tuning.json, then the GPU
#                  tests of the concat path and the fused norm and SwiGLU + LoRA calls under that file, and again
#                  with BEZOAR_LORA_CONCAT_ALIGN=64
#   gemm_widths    bench/gemm_widths.py: cuBLAS on the concat and merged paths' widened GEMMs against the plain
#                  ones, by the width of the extra block (issue 4)
#   merged_check   the merged path after a change: its GPU tests, then the no-dropout breakdown (NF4 alone, merged,
#                  concat at 3200x3200, M = 16384, r = 16)
#   nf4_gemv       bench/nf4.py in graph timing at M = 1, 4, 16 with the gemv sweep, the gemv as a dependent launch
#                  (nf4_gemv_pdl) and the fused forward in both operand orders (nf4_fused_swap, nf4_fused_xw):
#                  issue 3, M <= 16
#   gemv_ladder    bench/gemv_ladder.py: where the NF4 gemv's time goes at M = 1 (issue 3), a ladder of kernels at
#                  the gemv's grid and tiles (launch, the reads, the double-quant chain, the decode, the gemv
#                  without and with its split sums) beside cuBLAS and a copy of the same bytes, graph replay
#   nf4_tma_sweep  bench/nf4.py --sweep-tma at M = 4096: the NF4 tma kernels' tile configs (issue 3, M >= 4096)
#   lora_tma_sweep bench/lora.py --sweep-tma at M = 16384: the LoRA tma GEMMs with no adapter against cuBLAS
#   tma_tests      the GPU tests of the NF4 and LoRA tma kernels
#   small_tests    the GPU tests of the NF4 matmul and the LoRA paths
#
#   scripts/gpu_short.sh             # on the GPU machine: run(command="bash scripts/gpu_short.sh", carry=[".whl"], timeout_s=590)
#   scripts/gpu_short.sh --parts nf4_tma_sweep,lora   # those two only
#   scripts/gpu_short.sh --dry-run   # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

ALL_PARTS=(gpu_tests nf4_cache step_cache nf4_small decode generate lora lora_nodrop lora_breakdown waves merge concat_align gemm_widths merged_check nf4_gemv gemv_ladder nf4_tma_sweep lora_tma_sweep tma_tests small_tests)
PARTS=gpu_tests,nf4_gemv,concat_align
DRY_RUN=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --parts) PARTS=${2:-}; shift ;;
    -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scripts/gpu_short.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
export DRY_RUN
if [ -z "$PARTS" ]; then
  echo "scripts/gpu_short.sh: --parts needs part names, comma-separated (parts: ${ALL_PARTS[*]})" >&2
  exit 2
fi
IFS=, read -r -a WANTED <<<"$PARTS"
for name in "${WANTED[@]}"; do
  known=0
  for each in "${ALL_PARTS[@]}"; do
    [ "$name" = "$each" ] && known=1
  done
  if [ "$known" = 0 ]; then
    echo "scripts/gpu_short.sh: no part '$name' (parts: ${ALL_PARTS[*]})" >&2
    exit 2
  fi
done
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
# pytest-xdist where the machine has it (as scripts/gpu_check.sh decides)
parallel=()
if [ "$DRY_RUN" = 1 ] || "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
  parallel=(-n 8)
fi

NO_DROPOUT_CASES=nf4_only/3200x3200/M=16384,lora_merged/3200x3200/M=16384/r=16,lora_concat/3200x3200/M=16384/r=16
WAVES_CASES=nf4_only/3200x3200/M=16384,lora_concat/3200x3200/M=16384/r=16,lora_concat_rounded/3200x3200/M=16384/r=16
WAVES_CASES+=,norm_qkv_nf4_only/M=16384,norm_qkv_lora_fused/M=16384/r=16,norm_qkv_lora_fused_rounded/M=16384/r=16
# the GPU tests that run the concat path's forward: its own (by name), and the fused norm and SwiGLU + LoRA calls
CONCAT_TESTS=(tests/kernels/test_lora.py tests/kernels/test_norm_lora.py tests/kernels/test_swiglu_lora.py
  -k "concat or test_norm_lora.py or test_swiglu_lora.py")
run_part() {
  case "$1" in
    gpu_tests) part gpu_tests 160 env GPU_TEST_LIMIT=140 bash scripts/gpu_check.sh --gpu-only ;;
    nf4_cache) part nf4_cache 50 "$PYTHON" bench/nf4.py --cache --out "$OUT_DIR" ;;
    step_cache) part step_cache 150 "$PYTHON" bench/step.py --tokens 8192 --lora qkv --workloads sft \
      --impls bezoar-full,bezoar-full-cache --breakdown 2 --out "$OUT_DIR" ;;
    nf4_small) part nf4_small 70 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16 --out "$OUT_DIR" ;;
    decode) part decode 100 "$PYTHON" bench/generate.py --breakdown 32 --out "$OUT_DIR" ;;
    generate) part generate 130 "$PYTHON" bench/generate.py --batches 1 --out "$OUT_DIR" ;;
    lora) part lora 125 "$PYTHON" bench/lora.py --paths cublas,concat,tma --ranks 16,64 --ms 16384,4096 --no-groups \
      --budget 105 --out "$OUT_DIR" ;;
    lora_nodrop) part lora_nodrop 100 "$PYTHON" bench/lora.py --dropout 0 --paths auto,concat --ranks 16,64 --ms 16384,4096 \
      --no-groups --budget 85 --out "$OUT_DIR" ;;
    lora_breakdown)
      part lora_breakdown 75 "$PYTHON" bench/lora.py --breakdown default --shapes 3200x3200,8640x3200 --ms 16384 \
        --ranks 16 --paths cublas,concat --out "$OUT_DIR"
      part lora_breakdown_no_dropout 45 "$PYTHON" bench/lora.py --breakdown "$NO_DROPOUT_CASES" --dropout 0 \
        --shapes 3200x3200 --ms 16384 --ranks 16 --paths concat --no-groups --out "$OUT_DIR" ;;
    waves) part waves 70 "$PYTHON" bench/lora.py --breakdown "$WAVES_CASES" --shapes 3200x3200 --ms 16384 --ranks 16 \
      --paths concat --out "$OUT_DIR" ;;
    merge)
      part merge_sweep 100 "$PYTHON" bench/lora.py --sweep-merge --ranks 16,64 --budget 85 --out "$OUT_DIR"
      # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments, expanded there
      part merge_tune 20 bash -c '"$1" bench/tune.py "$2"/lora-merge-sweep-*.json --keys lora.merge_launch --out "$2/merge-tuning.json"
        [ -f "$2/merge-tuning.json" ] || echo "{\"format\": 1, \"devices\": {}}" > "$2/merge-tuning.json"' _ "$PYTHON" "$OUT_DIR"
      part merge_breakdown 40 env BEZOAR_TUNING="$OUT_DIR/merge-tuning.json" "$PYTHON" bench/lora.py \
        --breakdown "$NO_DROPOUT_CASES" --dropout 0 --shapes 3200x3200 --ms 16384 --ranks 16 --paths concat --no-groups \
        --out "$OUT_DIR"
      part merge_lora 80 env BEZOAR_TUNING="$OUT_DIR/merge-tuning.json" "$PYTHON" bench/lora.py --paths auto,concat \
        --dropout 0 --no-groups --ms 16384,4096 --ranks 16,64 --budget 65 --out "$OUT_DIR"
      part merge_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        "${parallel[@]}" tests/kernels/test_lora.py -k merge ;;
    concat_align)
      part concat_align_sweep 110 "$PYTHON" bench/lora.py --sweep-concat-align --budget 95 --out "$OUT_DIR"
      # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments, expanded there
      part concat_align_tune 20 bash -c '"$1" bench/tune.py "$2"/lora-concat-align-*.json --keys lora.concat_align --out "$2/concat-tuning.json"
        [ -f "$2/concat-tuning.json" ] || echo "{\"format\": 1, \"devices\": {}}" > "$2/concat-tuning.json"' _ "$PYTHON" "$OUT_DIR"
      part concat_align_tests 60 env -u TRITON_INTERPRET -u BEZOAR_LORA_CONCAT_ALIGN \
        BEZOAR_TUNING="$OUT_DIR/concat-tuning.json" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        "${parallel[@]}" "${CONCAT_TESTS[@]}"
      part concat_align_tests_64 50 env -u TRITON_INTERPRET BEZOAR_LORA_CONCAT_ALIGN=64 "$PYTHON" -m pytest -q -m gpu \
        -p no:cacheprovider -rfE "${parallel[@]}" "${CONCAT_TESTS[@]}" ;;
    gemm_widths) part gemm_widths 90 "$PYTHON" bench/gemm_widths.py --budget 75 --out "$OUT_DIR" ;;
    merged_check)
      part merged_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        "${parallel[@]}" tests/kernels/test_lora.py -k merge
      part merged_breakdown 40 "$PYTHON" bench/lora.py --breakdown "$NO_DROPOUT_CASES" --dropout 0 --shapes 3200x3200 \
        --ms 16384 --ranks 16 --paths concat --no-groups --out "$OUT_DIR" ;;
    nf4_gemv) part nf4_gemv 130 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16 --sweep-gemv --out "$OUT_DIR" ;;
    gemv_ladder) part gemv_ladder 75 "$PYTHON" bench/gemv_ladder.py --budget 50 --out "$OUT_DIR" ;;
    nf4_tma_sweep) part nf4_tma_sweep 110 "$PYTHON" bench/nf4.py --sweep-tma --ms 4096 --out "$OUT_DIR" ;;
    lora_tma_sweep) part lora_tma_sweep 100 "$PYTHON" bench/lora.py --sweep-tma --ms 16384 --out "$OUT_DIR" ;;
    tma_tests) part tma_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
      tests/kernels/test_nf4_tma.py tests/kernels/test_lora_tma.py ;;
    small_tests) part small_tests 90 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
      "${parallel[@]}" tests/kernels/test_nf4_matmul.py tests/kernels/test_lora.py tests/kernels/test_lora_tma.py ;;
  esac
}
for name in "${WANTED[@]}"; do
  run_part "$name"
done

if [ "$DRY_RUN" = 1 ]; then
  log "would pack $OUT_DIR into gpu-short.tar.gz if it holds more than 8 files"
elif [ "$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  tar -czf /tmp/gpu-short.tar.gz -C "$OUT_DIR" . && find "$OUT_DIR" -mindepth 1 -delete \
    && mv /tmp/gpu-short.tar.gz "$OUT_DIR/" && log "packed $OUT_DIR into gpu-short.tar.gz"
fi
log "done in $(( $(date +%s) - START ))s"
