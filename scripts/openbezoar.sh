#!/usr/bin/env bash
# The whole OpenBezoar recipe end to end: synthetic instruction data from a teacher LLM (LaMini, Orca,
# Evol-Instruct schemes), the LLM-judge filter, QLoRA SFT LaMini -> Orca -> Evol-Instruct -> HH-RLHF, DPO on
# HH-RLHF, then the lm-eval harness and MT-Bench, and RUN/report.md. A thin wrapper around
# `python -m bezoar.pipeline` (its --help has the details), which a SIGTERM to this script reaches (it then stores
# the answers in flight and stops, as on Ctrl-C). Rerun the same command after a failure or a kill:
# finished steps are skipped and unfinished ones continue where they stopped (a finished step whose inputs
# changed since runs again, or, for generation and training, stops the run and says what to remove).
#
#   scripts/openbezoar.sh [--out RUN] [--dry-run | --report-only] [key=value ...]
#   scripts/openbezoar.sh --tiny [--out RUN] [...]
#
# --tiny runs the miniature recipe (bezoar/recipes/openbezoar_tiny: tiny model, shipped samples, a few steps per
# stage; minutes on a CPU) against the scripted teacher and judges of tests/pipeline/teacher.py, which this
# script starts on a free port and stops at exit (needs a source checkout).
#
# Environment (API keys are read from the environment by the client pool and never written anywhere):
#   OPENAI_API_KEY      the judge filter (GPT-4 in the recipe); never sent to the teacher's server
#   ANTHROPIC_API_KEY   the MT-Bench judge (Claude in the recipe)
#   TEACHER_URL         base URL of the OpenAI-compatible server that serves the teacher model
#                       (vLLM, TGI, bezoar.serve; the recipe's default is http://localhost:8000/v1). It gets
#                       no key; for one started with a key, pass generate.teacher.api_key_env=NAME with the
#                       key in the variable NAME
#   RUN                 the run root (default runs/openbezoar, or runs/openbezoar_tiny with --tiny)
#   PYTHON              the Python to run (default: python)
#
# Examples:
#   TEACHER_URL=http://gpu1:8000/v1 OPENAI_API_KEY=... ANTHROPIC_API_KEY=... scripts/openbezoar.sh --out runs/ob
#   scripts/openbezoar.sh --out runs/ob --dry-run
#   scripts/openbezoar.sh --tiny
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
recipe=openbezoar
tiny=0
args=()
for arg in "$@"; do
  case "$arg" in
    --tiny) tiny=1; recipe=openbezoar_tiny ;;
    *) args+=("$arg") ;;
  esac
done

pre=(--recipe "$recipe")
if [ -n "${RUN:-}" ]; then pre+=(--out "$RUN"); fi
if [ -n "${TEACHER_URL:-}" ]; then pre+=("generate.teacher.base_url=$TEACHER_URL"); fi

if [ "$tiny" = 1 ]; then
  info="$(mktemp)"
  PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m tests.pipeline.teacher --port 0 >"$info" &
  teacher=$!
  trap 'kill "$teacher" 2>/dev/null || true; wait "$teacher" 2>/dev/null || true; rm -f "$info"' EXIT
  for _ in $(seq 1 300); do
    if [ -s "$info" ] || ! kill -0 "$teacher" 2>/dev/null; then break; fi
    sleep 0.1
  done
  url="$("$python" -c 'import json, sys; print(json.loads(open(sys.argv[1]).readline())["openai_url"])' "$info")" || {
    echo "openbezoar.sh: the scripted teacher did not start (python -m tests.pipeline.teacher)" >&2; exit 1; }
  pre+=("generate.teacher.base_url=$url" "generate.judge.base_url=$url" "evaluate.mt_bench.judge.base_url=$url")
fi

if [ "$tiny" = 0 ]; then
  # the pipeline in this process: a SIGTERM or Ctrl-C reaches it, not a shell that would die and leave it running
  exec "$python" -m bezoar.pipeline "${pre[@]}" ${args[@]+"${args[@]}"}
fi
# --tiny: the teacher must outlive the pipeline, which gets this script's SIGTERM and SIGINT (it stores the
# answers in flight, then stops) before the exit trap stops the teacher. The pipeline runs in a process group of
# its own (set -m), so that a terminal's Ctrl-C reaches it once, through the trap (in the script's group it got
# the terminal's SIGINT and the trap's signal: two, and the second abandons the answers in flight).
set -m
"$python" -m bezoar.pipeline "${pre[@]}" ${args[@]+"${args[@]}"} &
pipeline=$!
set +m
trap 'kill -INT "$pipeline" 2>/dev/null || true' INT
trap 'kill -TERM "$pipeline" 2>/dev/null || true' TERM
status=0
while :; do
  wait "$pipeline" && status=0 || status=$?
  kill -0 "$pipeline" 2>/dev/null || break  # a wait cut short by a signal: the pipeline still runs
done
exit "$status"
