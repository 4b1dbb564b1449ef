#!/usr/bin/env bash
# Download, here, the wheels the lent GPU machine lacks (it reaches no package registry) into .whl/,
# which scripts/gpu_bench.sh and scripts/gpu_check.sh install there when the device call carries .whl.
# The machine runs CPython 3.12 on x86-64 Linux; bitsandbytes 0.50.2 (the transformers + PEFT peer
# of bench/step.py and bench/nf4.py) needs only torch, numpy and packaging, which it has.
#
#   scripts/fetch_gpu_wheels.sh            # about 45 MB into .whl/ (ignored by git)
#   scripts/fetch_gpu_wheels.sh --dry-run  # print the pip command
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/.."
# shellcheck source=SCRIPTDIR/gpu_env.sh
source "$HERE/gpu_env.sh"

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  -h|--help) print_help "${BASH_SOURCE[0]}"; exit 0 ;;
  '') ;;
  *) echo "scripts/fetch_gpu_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
esac

WHEELS=(bitsandbytes==0.50.2)
# pip matches manylinux tags exactly: list every one a wheel for this machine may carry.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
cmd=(python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp)
for platform in "${PLATFORMS[@]}"; do
  cmd+=(--platform "$platform")
done
cmd+=(-d .whl "${WHEELS[@]}")

[ "$DRY_RUN" = 1 ] || mkdir -p .whl
run "${cmd[@]}"  # (gpu_env.sh: prints the command, runs it unless DRY_RUN=1)
[ "$DRY_RUN" = 1 ] || ls -l .whl
