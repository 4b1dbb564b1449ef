#!/usr/bin/env bash
# The test suite on a GPU, in one device call: install the project and the carried wheels, then
#   1. the GPU tests:        python -m pytest -m gpu           (compiled Triton kernels, bf16)
#   2. everything else:      python -m pytest -m "not gpu", the CPU suite under this machine's torch and
#      triton (2.11 and 3.6 where CI has 2.13 and 3.9), with CUDA hidden (CUDA_VISIBLE_DEVICES=: tests
#      that load a model with no device= would put it on the GPU and feed it CPU tensors) and
#      TRITON_INTERPRET=1, as CI runs it,
# leaving out test files that import packages this machine lacks (lm_eval, openai, anthropic).
# The log goes to $OUT/gpu_check.log; the exit status is that of the first failing pass. Run by
# scripts/gpu_short.sh (BEZOAR_GPU_SETUP=done, exported there after its setup) it installs nothing and
# writes no log of its own (the caller's has its output), and its time limits stay inside the caller's
# (gpu_env.sh: limited, timeout_options), so the caller's limit stops its tests too.
#
#   scripts/gpu_check.sh                 # on the GPU machine (bench/README.md has the device call)
#   scripts/gpu_check.sh --dry-run       # print what would run, run nothing (works anywhere)
#   scripts/gpu_check.sh --gpu-only      # pass 1 only (GPU_TEST_LIMIT=SECONDS bounds it; default 240)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

DRY_RUN=0
GPU_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --gpu-only) GPU_ONLY=1 ;;
    -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scripts/gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}  # $OUT is set on the device machine
SETUP_DONE=0
[ "${BEZOAR_GPU_SETUP:-}" = "done" ] && SETUP_DONE=1
if [ "$DRY_RUN" = 0 ] && [ "$SETUP_DONE" = 0 ]; then
  mkdir -p "$OUT_DIR"
  exec > >(tee -a "$OUT_DIR/gpu_check.log") 2>&1
  TEE_PID=$!
  trap 'exec 1>&- 2>&-; wait "$TEE_PID" || true' EXIT  # let tee write the last lines before exiting
fi
export PYTHONUNBUFFERED=1

log "bezoar GPU tests in $ROOT"
if [ "$SETUP_DONE" = 1 ]; then
  log "setup: done by the caller (BEZOAR_GPU_SETUP=done; PYTHONPATH=${PYTHONPATH:-})"
else
  install_wheels || true  # (it says what failed; the tests that need bitsandbytes skip)
  install_project
  show_versions
fi

# Test files that import a package this machine does not have.
ignores=()
for module in lm_eval openai anthropic; do
  if [ "$DRY_RUN" = 0 ] && "$PYTHON" -c "import $module" >/dev/null 2>&1; then
    continue
  fi
  while IFS= read -r file; do
    ignores+=("--ignore=$file")
  done < <(grep -rlE "^[[:space:]]*(import|from)[[:space:]]+$module([[:space:].]|$)" tests --include='*.py' || true)
done
log "left out (missing packages): ${ignores[*]:-none}"

# Parallel workers for pass 2 when pytest-xdist is there.
parallel=()
if [ "$DRY_RUN" = 1 ] || "$PYTHON" -c "import xdist" >/dev/null 2>&1; then
  parallel=(-n 8)
fi

# inside a caller's limit (gpu_short.sh's part), these limits stay in its process group
# shellcheck disable=SC2207  # one word or none
within=($(timeout_options))
status=0
log "pass 1: GPU tests"
run timeout "${within[@]}" --signal=INT --kill-after=15 "${GPU_TEST_LIMIT:-240}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
  "${parallel[@]}" -rfE --durations=10 "${ignores[@]}" \
  || status=$?
if [ "$GPU_ONLY" = 0 ]; then
  log "pass 2: the rest of the suite, CUDA hidden, under this machine's torch and triton"
  pass2=0
  run env CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 timeout "${within[@]}" --signal=INT --kill-after=15 330 "$PYTHON" -m pytest -q -p no:cacheprovider \
    -m "not gpu" "${parallel[@]}" "${ignores[@]}" || pass2=$?
  if [ "$status" = 0 ]; then
    status=$pass2
  fi
fi
log "done (exit $status)"
exit "$status"
