#!/usr/bin/env bash
# Every benchmark in one device call (under 9 minutes): install the project and the carried wheels,
# run bench/{step,kernels,nf4,generate,lora}.py (those that exist) each under its own time limit, and
# copy the results JSON this run wrote, plus the log, to $OUT.
#
#   scripts/gpu_bench.sh                 # on the GPU machine (bench/README.md has the device call)
#   scripts/gpu_bench.sh --dry-run       # print what would run, run nothing (works anywhere)
#   scripts/gpu_bench.sh --only step     # one bench, with all of the budget
#   scripts/gpu_bench.sh --only nf4,step # several, in that order, each within its own limit
#   scripts/gpu_bench.sh --budget 300    # seconds for everything (default 500: the call stays under 9 minutes)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
cd "$ROOT"
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

DRY_RUN=0
ONLY=""
BUDGET=500
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --only) ONLY=${2:?--only needs a bench name}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "scripts/gpu_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "scripts/gpu_bench.sh: --budget '$BUDGET' is not a number of seconds" >&2; exit 2 ;;
esac

# name, its time limit in seconds, extra arguments; @BUDGET@ becomes the limit less 90 s: bench/step.py
# stops starting cases then, so the case in flight can finish and the tables and JSON get written.
# The step bench goes first (its figures are the headline ones). The limits add up to more than the
# budget: a bench that finishes early leaves its time to the next, and the last ones get what is left.
# With --only, a bench may use all of the budget that is left.
BENCHES=(
  "step 200 --budget @BUDGET@"
  "kernels 90"
  "nf4 80"
  "generate 180 --batches 1"
  "lora 120 --budget @SOON@"
)

OUT_DIR=${OUT:-/tmp/bezoar-gpu-out}  # $OUT is set on the device machine
STARTED=$(date +%s)
if [ "$DRY_RUN" = 0 ]; then
  mkdir -p "$OUT_DIR" bench/results
  exec > >(tee -a "$OUT_DIR/gpu_bench.log") 2>&1
  TEE_PID=$!
  trap 'exec 1>&- 2>&-; wait "$TEE_PID" || true' EXIT  # let tee write the last lines before exiting
  MARKER=$(mktemp)  # results newer than this were written by this run
fi
export PYTHONUNBUFFERED=1

log "bezoar GPU benches in $ROOT (budget ${BUDGET}s)"
install_wheels || true  # (it says what failed; the peers are skipped)
install_project
show_versions

declare -A STATUS=()
ORDER=("${BENCHES[@]}")
ASKED=0
if [ -n "$ONLY" ]; then  # the benches asked for, in the order asked
  ORDER=()
  IFS=',' read -r -a WANTED <<<"$ONLY"
  for want in "${WANTED[@]}"; do
    found=""
    for entry in "${BENCHES[@]}"; do
      [ "${entry%% *}" = "$want" ] && found=$entry
    done
    if [ -z "$found" ]; then
      log "--only: no bench named '$want' (benches: $(printf '%s ' "${BENCHES[@]%% *}"))"
      exit 2
    fi
    ORDER+=("$found")
  done
  ASKED=${#ORDER[@]}
  for entry in "${BENCHES[@]}"; do
    [[ ",$ONLY," == *",${entry%% *},"* ]] || STATUS[${entry%% *}]="not asked for"
  done
fi
for entry in "${ORDER[@]}"; do
  read -r name limit extra <<<"$entry"
  script="bench/$name.py"
  if [ ! -f "$script" ]; then
    log "$script: not in this checkout, skipped"
    STATUS[$name]="absent"
    continue
  fi
  left=$(seconds_left "$STARTED" "$BUDGET")
  if [ "$DRY_RUN" = 0 ] && [ "$left" -lt 30 ]; then
    log "$script: skipped, ${left}s of the budget left"
    STATUS[$name]="skipped (budget)"
    continue
  fi
  if [ "$ASKED" = 1 ] || [ "$left" -lt "$limit" ]; then  # one bench asked for: all of the budget
    limit=$left
  fi
  # step needs ~90 s after its last case starts (its memory and DPO comparisons); lora only a case's worth
  extra=${extra//@BUDGET@/$((limit > 100 ? limit - 90 : 10))}
  extra=${extra//@SOON@/$((limit > 35 ? limit - 25 : 10))}
  log "$script (limit ${limit}s)"
  # shellcheck disable=SC2086  # $extra holds separate arguments
  if run timeout --signal=INT --kill-after=15 "$limit" "$PYTHON" "$script" $extra; then
    STATUS[$name]=$([ "$DRY_RUN" = 1 ] && echo "would run" || echo "ok")
  else
    code=$?
    STATUS[$name]="exit $code$([ "$code" = 124 ] && echo ' (time limit)' || true)"
  fi
done

log "summary"
for entry in "${BENCHES[@]}"; do
  name=${entry%% *}
  [ -n "${STATUS[$name]:-}" ] && printf '  %-9s %s\n' "$name" "${STATUS[$name]}"
done

if [ "$DRY_RUN" = 1 ]; then
  log "dry run: would copy bench/results/*.json written by this run and the log to ${OUT_DIR}"
  exit 0
fi
mapfile -t results < <(find bench/results -maxdepth 1 -name '*.json' -newer "$MARKER" | sort)
rm -f "$MARKER"
# $OUT returns at most 8 files: up to 6 JSON files go back as they are, more as one archive.
if [ "${#results[@]}" -le 6 ]; then
  for f in "${results[@]}"; do
    cp "$f" "$OUT_DIR/"
  done
elif [ "${#results[@]}" -gt 6 ]; then
  tar -czf "$OUT_DIR/bench-results.tar.gz" "${results[@]}"
fi
log "${#results[@]} results file(s) to $OUT_DIR: ${results[*]:-none}"
