# shellcheck shell=bash
# Shared by the scripts/gpu_*.sh scripts (sourced, not run): set up the project on a
# lent GPU machine, which has torch, triton, transformers and peft but reaches no package registry.
#
# - wheels carried in .whl/ (scripts/fetch_gpu_wheels.sh puts bitsandbytes there) are installed into
#   /tmp/site and put on PYTHONPATH;
# - the project is installed editable without build isolation; if that fails (an old setuptools), a
#   folder of links that maps the import names (bezoar, bezoar_kernels -> kernels/) goes on PYTHONPATH.
#
# The caller sets DRY_RUN=1 to print the commands instead of running them. A script that did the setup
# exports BEZOAR_GPU_SETUP=done: a script it runs (scripts/gpu_check.sh) then skips it (and its own log,
# the caller keeps one). `limited` runs a command under a time limit that reaches all it started;
# a limit inside it uses `timeout_options` to stay within its reach.

PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
SITE_DIR=${SITE_DIR:-/tmp/site}
WHEEL_DIR=${WHEEL_DIR:-.whl}  # the wheels the call carries (scripts/fetch_gpu_wheels.sh)
LINK_DIR=${LINK_DIR:-/tmp/bezoar-import-path}

# Print a script's help: its comment block after the first line, up to the first line of code.
print_help() {
  awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$1"
}

# For scripts whose only options are --dry-run and --help: parse_dry_run_only SCRIPT "$@" sets DRY_RUN
# (and exports it), prints the help, or refuses anything else with exit status 2.
parse_dry_run_only() {
  local script=$1
  shift
  DRY_RUN=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) print_help "$script"; exit 0 ;;
      *) echo "scripts/$(basename "$script"): unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  export DRY_RUN
}

log() {
  printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"
}

# Print a command as it would be typed; run it unless this is a dry run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  "$@"
}

prepend_pythonpath() {
  export PYTHONPATH="$1${PYTHONPATH:+:$PYTHONPATH}"
  log "PYTHONPATH=$PYTHONPATH"
}

install_wheels() {
  local wheels=()
  if [ -d "$WHEEL_DIR" ]; then
    for w in "$WHEEL_DIR"/*.whl; do
      [ -e "$w" ] && wheels+=("$w")
    done
  fi
  if [ "${#wheels[@]}" -eq 0 ]; then
    log "no wheels in .whl/ (run scripts/fetch_gpu_wheels.sh here and carry .whl): the bitsandbytes peers will be skipped"
    return 1
  fi
  # a failed install is a failure: the peers' columns (bitsandbytes, transformers + bnb) would be missing unsaid
  if ! run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE_DIR" "${wheels[@]}"; then
    log "ERROR: installing the carried wheels failed: the bitsandbytes peers will be skipped"
    return 1
  fi
  prepend_pythonpath "$SITE_DIR"
}

install_project() {
  if run "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e .; then
    return 0
  fi
  log "editable install failed; putting links to bezoar/ and kernels/ (as bezoar_kernels) on PYTHONPATH"
  run mkdir -p "$LINK_DIR"
  run ln -sfn "$PWD/bezoar" "$LINK_DIR/bezoar"
  run ln -sfn "$PWD/kernels" "$LINK_DIR/bezoar_kernels"
  prepend_pythonpath "$LINK_DIR"
}

show_versions() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  fi
  run "$PYTHON" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())' || true
  run "$PYTHON" - <<'PY' || true
import importlib
for name in ("transformers", "peft", "bitsandbytes", "lm_eval", "openai", "anthropic", "bezoar", "bezoar_kernels"):
    try:
        module = importlib.import_module(name)
        print(f"  {name} {getattr(module, '__version__', 'ok')}")
    except Exception as exc:
        print(f"  {name} missing ({type(exc).__name__})")
PY
}

# Seconds left of a budget that started at $1 (epoch seconds) and lasts $2 seconds.
seconds_left() {
  local now
  now=$(date +%s)
  echo $(($2 - (now - $1)))
}

# Run a command under a time limit that ends everything it started: at the limit a SIGINT (a bench then
# writes what it measured), $2 seconds later a SIGKILL, both to the command's whole process group, which
# timeout makes (a limit inside uses timeout_options, which keeps it in that group); whatever of the group
# outlives the command (a process it left behind) is killed when it ends. The exit status is the
# command's, or 124 where the limit stopped it.
#   limited SECONDS GRACE COMMAND...
limited() {
  local limit=$1 grace=$2 pid rc=0
  shift 2
  BEZOAR_IN_LIMIT=1 timeout --signal=INT --kill-after="$grace" "$limit" "$@" &
  pid=$!
  wait "$pid" || rc=$?
  kill -KILL -- "-$pid" 2>/dev/null || true
  return "$rc"
}

# The options of a time limit (timeout's) in a script that may run under `limited`: there it stays in the
# outer limit's process group (--foreground), which a timeout of its own would leave, taking its command
# out of the outer limit's reach (a GPU test run then went on into the next part's timings).
#   timeout $(timeout_options) --signal=INT ... (word-split on purpose; prints nothing or --foreground)
timeout_options() {
  if [ -n "${BEZOAR_IN_LIMIT:-}" ]; then
    echo --foreground
  fi
}
