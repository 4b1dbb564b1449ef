#!/usr/bin/env bash
# The device call for a session lent the 15-minute budget: parts by name, each under its own time limit
# and never past the call's total (GPU_SHORT_SECONDS, default 560), a failing part not stopping the rest.
# A part's limit ends all it started (gpu_env.sh: limited): a SIGINT at the limit, a SIGKILL 10 s
# later (GPU_SHORT_GRACE), to its whole process group, and whatever it left running when it ends.
# The setup (carried wheels, the project, versions) runs once; scripts/gpu_check.sh, which gpu_tests
# runs, skips its own (BEZOAR_GPU_SETUP=done).
#
# $OUT holds few files at every moment, so that a call cut short brings back what it had (a call brings
# back at most 8): one log, gpu_short.log (the setup and every part's output, each under a header line),
# the results JSON the benches write (rewritten after each case or config), the tuning files later parts
# read (concat-tuning.json, merge-tuning.json), and results.tar, into which the results go between parts
# where more than 2 would lie in $OUT.
#
# Results name the commit in BEZOAR_COMMIT (the device copy's .git can be an earlier call's): put it in
# the command, as `scripts/gpu_short.sh --print-call` prints it here (bench/README.md, "On the lent GPU").
# A call of 590 s is the session's only one: a machine's start costs a minute or more, and none starts
# with under 4 minutes left.
#
# Parts (--parts a,b,c runs them in that order; the default is the next session's call):
#   gpu_tests      the whole GPU test suite (scripts/gpu_check.sh --gpu-only, which skips the setup done here)
#   nf4_cache      bench/nf4.py --cache: training-step sequences with the dequant cache off and on (issue 3, M >= 4096)
#   step_cache     bench/step.py, SFT q/k/v at 8K tokens, full checkpointing with the dequant cache off and on,
#                  and each step's GPU time by kernel category (--breakdown 2)
#   nf4_small      bench/nf4.py in graph timing at M = 1, 4, 16: what auto runs with the committed tuning
#   decode         bench/generate.py --breakdown 32: a 3B decode step at batch 1, GPU time per kernel
#   generate       bench/generate.py --batches 1: decode tokens/s with CUDA graphs against transformers + bnb
#   serve          bench/serve.py --requests 128 --rate 12: the server's continuous batching against whole batches
#                  on a 3B NF4 model (throughput offline, latency at 12 requests a second)
#   lora           bench/lora.py, cuBLAS, concat and tma paths, M = 16384 and 4096, r = 16 and 64 (issue 4)
#   lora_nodrop    bench/lora.py --dropout 0: auto (merged there, which is also timed as itself) and concat, M = 16384 and 4096, r = 16 and 64,
#                  beside PEFT-style and bitsandbytes + PEFT (issue 4 without dropout)
#   lora_infer     bench/lora.py --inference: forwards without gradients at M = 1-32 (decoding and evaluation with an
#                  adapter): NF4 alone, lora auto (gemv, the small-M inference path, merged), lora merged, PEFT-style
#                  and bitsandbytes + PEFT, r = 16 and 64 (issue 4: the small-M inference path's first timing)
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
#                  with BEZOAR_LORA_CONCAT_ALIGN=64, each only at an align the call has not tested yet (gpu_tests,
#                  run to its end, tested the default: 16 unless a tuning file or the environment says otherwise)
#   gemm_widths    bench/gemm_widths.py: cuBLAS on the concat and merged paths' widened GEMMs against the plain
#                  ones, by the width of the extra block (issue 4)
#   merged_check   the merged path after a change: its GPU tests, then the no-dropout breakdown (NF4 alone, merged,
#                  concat at 3200x3200, M = 16384, r = 16)
#   nf4_gemv       bench/nf4.py in graph timing at M = 1, 4, 16, 32, 64 (--budget 115) with the gemv sweep, the gemv as a
#                  dependent launch (nf4_gemv_pdl) and the fused forward in both operand orders (nf4_fused_swap,
#                  nf4_fused_xw): issue 3, M <= 16, and how far past 16 the fused forward beats dequant + cuBLAS
#                  (batched decoding: the server's 32 rows)
#   gemv_ladder    bench/gemv_ladder.py: where the NF4 gemv's time goes at M = 1 (issue 3), a ladder of kernels at
#                  the gemv's grid and tiles (launch, the reads, the double-quant chain, the decode, the gemv
#                  without and with its split sums) beside cuBLAS and a copy of the same bytes, graph replay
#   nf4_tma_sweep  bench/nf4.py --sweep-tma at M = 4096: the NF4 tma kernels' tile configs (issue 3, M >= 4096)
#   lora_tma_sweep bench/lora.py --sweep-tma at M = 16384: the LoRA tma GEMMs with no adapter against cuBLAS
#   tma_tests      the GPU tests of the NF4 and LoRA tma kernels
#   small_tests    the GPU tests of the NF4 matmul and the LoRA paths
#
#   scripts/gpu_short.sh --print-call   # here: the device call to make, with this checkout's commit
#   BEZOAR_COMMIT=<commit> bash scripts/gpu_short.sh   # on the GPU machine (run(..., carry=[".whl"], timeout_s=590))
#   scripts/gpu_short.sh --parts nf4_tma_sweep,lora   # those two only
#   scripts/gpu_short.sh --dry-run   # print what would run, run nothing (works anywhere)
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT" || exit 1
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

ALL_PARTS=(gpu_tests nf4_cache step_cache nf4_small decode generate serve lora lora_nodrop lora_infer lora_breakdown waves merge concat_align gemm_widths merged_check nf4_gemv gemv_ladder nf4_tma_sweep lora_tma_sweep tma_tests small_tests)
PARTS=gpu_tests,nf4_gemv,lora_infer,generate
DRY_RUN=0
PRINT_CALL=0
PARTS_ASKED=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --print-call) PRINT_CALL=1 ;;
    --parts) PARTS=${2:-}; PARTS_ASKED=(--parts "$PARTS"); shift ;;
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
if [ "$PRINT_CALL" = 1 ]; then  # here, not on the GPU machine: the call to make, with the commit it sends
  commit=$(git rev-parse --short=12 HEAD) || exit 1
  # untracked files travel too (the device copies what git does not ignore): they make the commit dirty as well
  [ -n "$(git status --porcelain)" ] && commit+=-dirty
  if ! compgen -G ".whl/*.whl" >/dev/null && [ "${GPU_SHORT_NO_PEERS:-0}" != 1 ]; then
    echo "scripts/gpu_short.sh: no wheels in .whl/: run scripts/fetch_gpu_wheels.sh first (the bitsandbytes peers" \
      "need them), or set GPU_SHORT_NO_PEERS=1 to make the call without them" >&2
    exit 2
  fi
  words=(bash scripts/gpu_short.sh "${PARTS_ASKED[@]}")
  if [ "${GPU_SHORT_NO_PEERS:-0}" = 1 ]; then  # the setting goes with the call, where the check reads it
    printf 'run(command="BEZOAR_COMMIT=%s GPU_SHORT_NO_PEERS=1 %s", carry=[], timeout_s=590)\n' "$commit" "${words[*]}"
  else
    printf 'run(command="BEZOAR_COMMIT=%s %s", carry=[".whl"], timeout_s=590)\n' "$commit" "${words[*]}"
  fi
  exit 0
fi
export PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}
LOG="$OUT_DIR/gpu_short.log"  # the setup's and every part's output
ARCHIVE=results.tar           # the results moved out of $OUT's top between parts
MAX_LOOSE=2                   # results left beside the log, the tuning files and the archive between parts
GRACE=${GPU_SHORT_GRACE:-10}  # seconds between a part's SIGINT and its SIGKILL
MIN_PART=${GPU_SHORT_MIN_PART:-20}  # no part starts with less than this left of the total
START=$(date +%s)
TOTAL=${GPU_SHORT_SECONDS:-560}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT_DIR"

# A line here and in the log.
say() {
  local line
  line=$(log "$@")
  echo "$line"
  [ "$DRY_RUN" = 1 ] || echo "$line" >>"$LOG"
}

# Keep $OUT to a few files (a call brings back at most 8, and one cut short brings back what is there):
# beside the log, the tuning files and the archive, at most MAX_LOOSE results; more go into the archive
# (appended to a copy, which then replaces it: a call cut meanwhile leaves the last whole archive).
# Results the running group of parts wrote (a sweep, and the tune step that reads it) stay where its later
# parts look for them: with GROUP_ACTIVE=1, only the files named in BEFORE_GROUP (there when it began) move,
# all of them (so $OUT holds the log, the tuning files, the archive and this group's results: 3 at most).
GROUP_ACTIVE=0
BEFORE_GROUP=" "
loose_names() {
  local f
  for f in "$OUT_DIR"/*; do
    [ -f "$f" ] && printf '%s ' "${f##*/}"
  done
}
consolidate() {
  [ "$DRY_RUN" = 1 ] && return 0
  local loose=() f name
  for f in "$OUT_DIR"/*; do
    [ -f "$f" ] || continue
    name=${f##*/}
    if [ "$GROUP_ACTIVE" = 1 ] && [[ "$BEFORE_GROUP" != *" $name "* ]]; then
      continue
    fi
    case "$name" in
      gpu_short.log|*-tuning.json|"$ARCHIVE"|"$ARCHIVE.tmp") ;;
      *) loose+=("$name") ;;
    esac
  done
  # inside a group every earlier result moves (the group's own stay loose); between groups a few may stay
  local keep=$MAX_LOOSE
  [ "$GROUP_ACTIVE" = 1 ] && keep=0
  [ "${#loose[@]}" -le "$keep" ] && return 0
  rm -f "$OUT_DIR/$ARCHIVE.tmp"
  if [ -f "$OUT_DIR/$ARCHIVE" ]; then
    cp "$OUT_DIR/$ARCHIVE" "$OUT_DIR/$ARCHIVE.tmp" || return 0
  fi
  if tar -rf "$OUT_DIR/$ARCHIVE.tmp" -C "$OUT_DIR" "${loose[@]}" && mv "$OUT_DIR/$ARCHIVE.tmp" "$OUT_DIR/$ARCHIVE"; then
    (cd "$OUT_DIR" && rm -f "${loose[@]}")
    say "moved into $ARCHIVE: ${loose[*]}"
  else
    rm -f "$OUT_DIR/$ARCHIVE.tmp"
  fi
}

# name, seconds, command: at most the given seconds and never past the call's total, under `limited`
# (gpu_env.sh: the limit ends all the command started); its output into the log under a header line.
# PART_RC is its exit status ("skipped" where it did not start).
PART_RC=
part() {
  local name=$1 limit=$2 left began
  shift 2
  left=$(seconds_left "$START" "$TOTAL")
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt "$MIN_PART" ]; then
    say "part $name skipped: ${left}s left of ${TOTAL}s"
    PART_RC=skipped
    return 0
  fi
  say "part $name (limit ${limit}s)"
  if [ "$DRY_RUN" = 1 ]; then
    run timeout --signal=INT --kill-after="$GRACE" "$limit" "$@"
    PART_RC=0
    return 0
  fi
  began=$(date +%s)
  {
    printf '==== part %s (limit %ss) ====\n' "$name" "$limit"
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  } >>"$LOG"
  PART_RC=0
  limited "$limit" "$GRACE" "$@" >>"$LOG" 2>&1 || PART_RC=$?
  printf '==== part %s: exit %s ====\n' "$name" "$PART_RC" >>"$LOG"
  local why=
  case "$PART_RC" in 124) why=" (time limit)" ;; 137) why=" (time limit, killed after the SIGINT)" ;; esac
  say "part $name: exit $PART_RC$why after $(( $(date +%s) - began ))s"
  [ "$PART_RC" = 0 ] || FAILED=1
  consolidate
}

if [ -n "${BEZOAR_COMMIT:-}" ]; then
  export BEZOAR_COMMIT
  say "commit $BEZOAR_COMMIT (BEZOAR_COMMIT: the results name it)"
else
  say "BEZOAR_COMMIT is not set: the results name this copy's git HEAD, which may be an earlier call's (scripts/gpu_short.sh --print-call gives the call with it)"
fi
FAILED=0  # the call's exit status: 1 where the peers' wheels or a part failed (what ran still comes back)
if [ "$DRY_RUN" = 1 ]; then
  install_wheels || true; install_project; show_versions
else
  printf '==== setup ====\n' >>"$LOG"
  setup_from=$(wc -l <"$LOG")
  wheels_rc=0
  { install_wheels || wheels_rc=$?; install_project; show_versions; } >>"$LOG" 2>&1
  tail -n +"$((setup_from + 1))" "$LOG" | tail -n 12
  if [ "${GPU_SHORT_NO_PEERS:-0}" != 1 ] && { [ "$wheels_rc" != 0 ] \
      || ! "$PYTHON" -c "import sys; sys.path.insert(0, '$SITE_DIR'); import bitsandbytes" >/dev/null 2>&1; }; then
    say "ERROR: bitsandbytes does not import (the carried wheels: see the setup above): the parts run without the" \
      "bitsandbytes peers"
    FAILED=1
  fi
fi
[ -d "$SITE_DIR" ] && prepend_pythonpath "$SITE_DIR"
export BEZOAR_GPU_SETUP="done"  # scripts/gpu_check.sh (gpu_tests) does not install again
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
# The concat path's align that the GPU tests run at by default here: BEZOAR_LORA_CONCAT_ALIGN where set, else
# 16 where no tuning file (the shipped one, BEZOAR_TUNING's) names another for any device; empty where one
# does (which one holds depends on the device).
default_concat_align() {
  local file
  if [ -n "${BEZOAR_LORA_CONCAT_ALIGN:-}" ]; then
    echo "$BEZOAR_LORA_CONCAT_ALIGN"
    return 0
  fi
  for file in kernels/tuning.json ${BEZOAR_TUNING:+"$BEZOAR_TUNING"}; do
    [ -f "$file" ] || continue
    # the file's lora.concat_align values, read as JSON (any layout); one that does not read is unknown too
    if ! python3 -c 'import json, sys
devices = json.load(open(sys.argv[1])).get("devices", {})
sys.exit(any(d.get("settings", {}).get("lora.concat_align", 16) != 16 for d in devices.values()))' "$file" \
      >/dev/null 2>&1; then
      return 0
    fi
  done
  echo 16
}

# The align a tuning file written by bench/tune.py picks (lora.concat_align), or nothing.
concat_align_pick() {
  [ -f "$1" ] || return 0
  grep -oE '"lora\.concat_align": *[0-9]+' "$1" | head -n 1 | grep -oE '[0-9]+$'
}

# The aligns the concat GPU tests ran at in this call, space-separated: gpu_tests run to its end (passed or
# failed, not cut by a limit) ran them at the default; concat_align adds what it tests.
CONCAT_TESTED=" "
tested_at() {
  [ -n "$1" ] && case "$CONCAT_TESTED" in *" $1 "*) return 0 ;; esac
  return 1
}

run_part() {
  case "$1" in
    gpu_tests)
      part gpu_tests 175 env GPU_TEST_LIMIT=155 bash scripts/gpu_check.sh --gpu-only
      case "$PART_RC" in
        0|1) default=$(default_concat_align); [ -n "$default" ] && CONCAT_TESTED+="$default " ;;
      esac ;;
    nf4_cache) part nf4_cache 50 "$PYTHON" bench/nf4.py --cache --out "$OUT_DIR" ;;
    step_cache) part step_cache 150 "$PYTHON" bench/step.py --tokens 8192 --lora qkv --workloads sft \
      --impls bezoar-full,bezoar-full-cache --breakdown 2 --out "$OUT_DIR" ;;
    nf4_small) part nf4_small 70 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16 --out "$OUT_DIR" ;;
    decode) part decode 100 "$PYTHON" bench/generate.py --breakdown 32 --out "$OUT_DIR" ;;
    generate) part generate 130 "$PYTHON" bench/generate.py --batches 1 --out "$OUT_DIR" ;;
    serve) part serve 170 "$PYTHON" bench/serve.py --requests 128 --rate 12 --out "$OUT_DIR" ;;
    lora) part lora 125 "$PYTHON" bench/lora.py --paths cublas,concat,tma --ranks 16,64 --ms 16384,4096 --no-groups \
      --budget 105 --out "$OUT_DIR" ;;
    lora_nodrop) part lora_nodrop 100 "$PYTHON" bench/lora.py --dropout 0 --paths auto,concat --ranks 16,64 --ms 16384,4096 \
      --no-groups --budget 85 --out "$OUT_DIR" ;;
    lora_infer) part lora_infer 85 "$PYTHON" bench/lora.py --inference --ranks 16,64 --budget 70 --out "$OUT_DIR" ;;
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
      part merge_tune 20 bash -c '"$1" bench/tune.py "$2"/lora-merge-sweep-*.json --keys lora.merge_launch --out "$2/merge-tuning.json"; rc=$?
        [ -f "$2/merge-tuning.json" ] || echo "{\"format\": 1, \"devices\": {}}" > "$2/merge-tuning.json"; exit $rc' _ "$PYTHON" "$OUT_DIR"
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
      part concat_align_tune 20 bash -c '"$1" bench/tune.py "$2"/lora-concat-align-*.json --keys lora.concat_align --out "$2/concat-tuning.json"; rc=$?
        [ -f "$2/concat-tuning.json" ] || echo "{\"format\": 1, \"devices\": {}}" > "$2/concat-tuning.json"; exit $rc' _ "$PYTHON" "$OUT_DIR"
      # the concat GPU tests under the pick (the default where there is none), then at 64: each only at an
      # align not tested yet in this call (gpu_tests tested the default); a dry run cannot know the pick
      pick=$(concat_align_pick "$OUT_DIR/concat-tuning.json")
      align=${pick:-$(default_concat_align)}
      if [ "$DRY_RUN" = 1 ] && [ -z "$pick" ]; then
        say "concat_align_tests runs where the pick is an align not tested yet in this call (tested:${CONCAT_TESTED% }; a dry run has no pick)"
      fi
      if tested_at "$align" && ! { [ "$DRY_RUN" = 1 ] && [ -z "$pick" ]; }; then
        say "part concat_align_tests skipped: the concat GPU tests ran at align $align already (pick: ${pick:-none})"
      else
        part concat_align_tests 60 env -u TRITON_INTERPRET -u BEZOAR_LORA_CONCAT_ALIGN \
          BEZOAR_TUNING="$OUT_DIR/concat-tuning.json" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
          "${parallel[@]}" "${CONCAT_TESTS[@]}"
        [ "$PART_RC" = 0 ] || [ "$PART_RC" = 1 ] && [ -n "$align" ] && CONCAT_TESTED+="$align "
      fi
      if tested_at 64; then
        say "part concat_align_tests_64 skipped: the concat GPU tests ran at align 64 already (pick: ${pick:-none})"
      else
        part concat_align_tests_64 50 env -u TRITON_INTERPRET BEZOAR_LORA_CONCAT_ALIGN=64 "$PYTHON" -m pytest -q -m gpu \
          -p no:cacheprovider -rfE "${parallel[@]}" "${CONCAT_TESTS[@]}"
      fi ;;
    gemm_widths) part gemm_widths 90 "$PYTHON" bench/gemm_widths.py --budget 75 --out "$OUT_DIR" ;;
    merged_check)
      part merged_tests 75 env -u TRITON_INTERPRET "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider -rfE \
        "${parallel[@]}" tests/kernels/test_lora.py -k merge
      part merged_breakdown 40 "$PYTHON" bench/lora.py --breakdown "$NO_DROPOUT_CASES" --dropout 0 --shapes 3200x3200 \
        --ms 16384 --ranks 16 --paths concat --no-groups --out "$OUT_DIR" ;;
    nf4_gemv) part nf4_gemv 130 "$PYTHON" bench/nf4.py --timing graph --ms 1,4,16,32,64 --budget 115 --sweep-gemv \
      --out "$OUT_DIR" ;;
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
  BEFORE_GROUP=" $(loose_names)"
  GROUP_ACTIVE=1
  run_part "$name"
done
GROUP_ACTIVE=0
consolidate

if [ "$DRY_RUN" = 1 ]; then
  log "would keep $OUT_DIR to at most 8 files after every part: gpu_short.log, the tuning files, $ARCHIVE and beside them the running group's results (the sweep its tune step reads stays), at most $MAX_LOOSE between groups"
fi
if [ "$DRY_RUN" = 1 ]; then
  log "done in $(( $(date +%s) - START ))s"
else
  say "done in $(( $(date +%s) - START ))s; in $OUT_DIR: $(loose_names)"
  exit "$FAILED"
fi
