"""The GPU scripts (scripts/gpu_bench.sh, gpu_check.sh, fetch_gpu_wheels.sh) cannot run here; their dry
runs can: they must parse, name every bench that exists with a time limit inside the 9-minute call,
and print the commands they would run. shellcheck runs too where it is installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["gpu_bench.sh", "gpu_check.sh", "gpu_short.sh", "fetch_gpu_wheels.sh", "gpu_env.sh"]


def dry_run(script, *args):
    out = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    return out


def test_gpu_bench_dry_run_lists_every_bench_within_the_call_limit():
    out = dry_run("gpu_bench.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pip install -q --no-deps --no-build-isolation -e ." in text
    limits = [int(m) for m in re.findall(r"timeout --signal=INT --kill-after=15 (\d+) python3 bench/", text)]
    ran = re.findall(r"python3 (bench/\w+\.py)", text)
    present = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bench").glob("*.py")
                     if p.stem in ("step", "kernels", "nf4", "lora", "generate"))
    assert sorted(ran) == present, (ran, present)
    assert ran[0] == "bench/step.py" and re.search(r"bench/step.py --budget \d+", text)
    # every bench stops by the budget (plus the grace before a kill), and that fits a 9-minute call
    budget = int(re.search(r"budget (\d+)s", text).group(1))
    assert max(limits) <= budget and budget + 15 + 20 < 9 * 60, (budget, limits)
    assert "would copy bench/results" in text


def test_gpu_bench_only_and_bad_arguments():
    out = dry_run("gpu_bench.sh", "--dry-run", "--only", "step", "--budget", "400")
    assert out.returncode == 0
    assert re.findall(r"python3 (bench/\w+\.py)", out.stdout) == ["bench/step.py"]
    # the limit is what is left of the budget when the bench starts: 400 s, less a second or two where
    # installing (a dry run here) took that long on a loaded machine; step.py gets it less 90 s
    limit, inner = map(int, re.search(r"kill-after=15 (\d+) python3 bench/step.py --budget (\d+)", out.stdout).groups())
    assert 395 <= limit <= 400 and inner == limit - 90, (limit, inner)
    several = dry_run("gpu_bench.sh", "--dry-run", "--only", "lora,nf4", "--budget", "400")
    assert several.returncode == 0, several.stderr
    # in the order asked, each within its own limit (lora 120 s, nf4 80 s), not the whole budget each
    assert re.findall(r"(\d+) python3 (bench/\w+\.py)", several.stdout) == [("120", "bench/lora.py"),
                                                                           ("80", "bench/nf4.py")]
    assert re.search(r"step\s+not asked for", several.stdout)
    unknown = dry_run("gpu_bench.sh", "--dry-run", "--only", "nf4,bogus")
    assert unknown.returncode == 2 and "no bench named 'bogus'" in unknown.stdout + unknown.stderr
    bad = dry_run("gpu_bench.sh", "--frobnicate")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    bad = dry_run("gpu_bench.sh", "--dry-run", "--budget", "soon")
    assert bad.returncode == 2 and "not a number" in bad.stderr


def test_gpu_check_dry_run_runs_gpu_tests_then_the_rest():
    out = dry_run("gpu_check.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    first = out.stdout.index("pytest -q -p no:cacheprovider -m gpu")
    second = out.stdout.index("TRITON_INTERPRET=1")
    assert first < second and "-m not\\ gpu" in out.stdout[second:]


def test_gpu_short_dry_run_fits_one_call_and_runs_the_parts_asked_for():
    out = dry_run("gpu_short.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "pip install -q --no-deps --no-build-isolation -e ." in text
    parts = re.findall(r"part (\w+) \(limit (\d+)s\)", text)
    assert [name for name, _ in parts] == ["gpu_tests", "nf4_gemv", "lora_infer", "generate"], parts
    # one device call of timeout_s=590 (bench/README.md): the parts' limits, kill grace included
    assert sum(int(limit) for _, limit in parts) + 10 * len(parts) <= 590, parts
    for piece in ("GPU_TEST_LIMIT=155 bash scripts/gpu_check.sh --gpu-only",
                  r"--ms 1\,4\,16\,32\,64 --budget 115 --sweep-gemv --out /tmp/bezoar-gpu-out",
                  r"bench/lora.py --inference --ranks 16\,64 --budget 70 --out /tmp/bezoar-gpu-out",
                  "bench/generate.py --batches 1 --out /tmp/bezoar-gpu-out"):
        assert piece in text, piece
    text = dry_run("gpu_short.sh", "--dry-run", "--parts", "concat_align").stdout
    for piece in ("bench/lora.py --sweep-concat-align --budget 95 --out /tmp/bezoar-gpu-out",
                  "--keys lora.concat_align", "BEZOAR_TUNING=/tmp/bezoar-gpu-out/concat-tuning.json",
                  "BEZOAR_LORA_CONCAT_ALIGN=64"):
        assert piece in text, piece
    # the parts run before (not in the default) still print their commands
    text = dry_run("gpu_short.sh", "--dry-run", "--parts", "generate,lora,lora_nodrop").stdout
    for piece in ("bench/generate.py --batches 1 --out /tmp/bezoar-gpu-out",
                  r"bench/lora.py --paths cublas\,concat\,tma --ranks 16\,64 --ms 16384\,4096 --no-groups",
                  r"bench/lora.py --dropout 0 --paths auto\,concat --ranks 16\,64 --ms 16384\,4096 --no-groups"):
        assert piece in text, piece
    assert "would keep /tmp/bezoar-gpu-out to at most 8 files after every part" in text
    # the waves part profiles each case with the splits fitted and rounded up, beside its baseline
    text = dry_run("gpu_short.sh", "--dry-run", "--parts", "waves").stdout
    for case in ("nf4_only/3200x3200/M=16384", "lora_concat/3200x3200/M=16384/r=16",
                 "lora_concat_rounded/3200x3200/M=16384/r=16", "norm_qkv_nf4_only/M=16384",
                 "norm_qkv_lora_fused/M=16384/r=16", "norm_qkv_lora_fused_rounded/M=16384/r=16"):
        assert case.replace(",", r"\,") in text, case
    assert "part waves (limit 70s)" in text
    # every part by name, in the order asked; each part's limit stays under the call's total
    every = ["gpu_tests", "nf4_cache", "step_cache", "nf4_small", "decode", "generate", "lora", "lora_nodrop",
             "lora_infer", "lora_breakdown", "waves", "merge", "concat_align", "gemm_widths", "merged_check", "nf4_gemv", "gemv_ladder",
             "nf4_tma_sweep", "lora_tma_sweep", "tma_tests", "small_tests"]
    out = dry_run("gpu_short.sh", "--dry-run", "--parts", ",".join(reversed(every)))
    assert out.returncode == 0, out.stderr
    # lora_breakdown logs as two steps, with dropout and without; merge as its five
    steps = {"lora_breakdown": ["lora_breakdown", "lora_breakdown_no_dropout"],
             "merge": ["merge_sweep", "merge_tune", "merge_breakdown", "merge_lora", "merge_tests"],
             "concat_align": ["concat_align_sweep", "concat_align_tune", "concat_align_tests", "concat_align_tests_64"],
             "merged_check": ["merged_tests", "merged_breakdown"]}
    logged = [step for name in reversed(every) for step in steps.get(name, [name])]
    assert re.findall(r"part (\w+) \(limit", out.stdout) == logged
    # every --paths given to bench/lora.py names its cases (merged is not one: it comes with --dropout 0)
    known = re.search(r"^LORA_PATHS = \(([^)]*)\)", (ROOT / "bench" / "lora.py").read_text(), re.M).group(1)
    known = set(re.findall(r'"(\w+)"', known))
    given = re.findall(r"bench/lora.py .*?--paths (\S+)", out.stdout)
    assert len(given) >= 4 and all(set(p.split("\\,")) <= known for p in given), (given, known)
    assert "--sweep-merge --ranks 16\\,64" in out.stdout
    assert "-n 8 tests/kernels/test_nf4_matmul.py" in out.stdout  # xdist assumed in a dry run
    for piece in ("bench/nf4.py --cache --out /tmp/bezoar-gpu-out",
                  r"bench/nf4.py --timing graph --ms 1\,4\,16 --out /tmp/bezoar-gpu-out",
                  "bench/generate.py --breakdown 32 --out /tmp/bezoar-gpu-out",
                  "bench/nf4.py --sweep-tma --ms 4096", "bench/lora.py --sweep-tma --ms 16384", "--sweep-gemv",
                  "bench/gemv_ladder.py --budget 50 --out /tmp/bezoar-gpu-out",
                  r"bench/lora.py --paths cublas\,concat\,tma", "tests/kernels/test_nf4_tma.py",
                  r"--impls bezoar-full\,bezoar-full-cache --breakdown 2", "bench/lora.py --breakdown default",
                  r"lora_merged/3200x3200/M=16384/r=16\,lora_concat/3200x3200/M=16384/r=16 --dropout 0"):
        assert piece in out.stdout, piece
    bad = dry_run("gpu_short.sh", "--dry-run", "--parts", "nf4_small,bogus")
    assert bad.returncode == 2 and "no part 'bogus'" in bad.stderr
    # a space for a comma is one unknown name, not two parts; no names at all is refused too
    bad = dry_run("gpu_short.sh", "--dry-run", "--parts", "generate lora")
    assert bad.returncode == 2 and "no part 'generate lora'" in bad.stderr
    for empty in (("--parts", ""), ("--parts",)):
        bad = dry_run("gpu_short.sh", "--dry-run", *empty)
        assert bad.returncode == 2 and "--parts needs part names" in bad.stderr, empty
    bad = dry_run("gpu_short.sh", "--frobnicate")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_gpu_short_concat_align_part_sweeps_tunes_then_tests_under_the_pick():
    """The concat_align part: the sweep under its budget, tune.py's pick into concat-tuning.json (an empty
    tuning file where it gave none), then the concat GPU tests under that file and again at align 64; the
    test files it names exist, and the part fits a call of 300 s."""
    out = dry_run("gpu_short.sh", "--dry-run", "--parts", "concat_align")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    parts = re.findall(r"part (\w+) \(limit (\d+)s\)", text)
    assert [name for name, _ in parts] == ["concat_align_sweep", "concat_align_tune", "concat_align_tests",
                                           "concat_align_tests_64"], parts
    assert sum(int(limit) for _, limit in parts) + 10 * len(parts) <= 300, parts
    sweep_limit = int(parts[0][1])
    budget = int(re.search(r"bench/lora.py --sweep-concat-align --budget (\d+) --out /tmp/bezoar-gpu-out", text).group(1))
    assert budget + 10 <= sweep_limit, (budget, sweep_limit)  # its last case has time to finish and write
    assert 'bench/tune.py "$2"/lora-concat-align-*.json --keys lora.concat_align --out "$2/concat-tuning.json"' in text
    assert '[ -f "$2/concat-tuning.json" ] ||' in text
    tests = [line for line in text.splitlines() if "-m pytest" in line]
    assert len(tests) == 2, tests
    assert "-u BEZOAR_LORA_CONCAT_ALIGN BEZOAR_TUNING=/tmp/bezoar-gpu-out/concat-tuning.json python3 -m pytest" in tests[0]
    assert "BEZOAR_LORA_CONCAT_ALIGN=64 python3 -m pytest" in tests[1] and "BEZOAR_TUNING" not in tests[1]
    for line in tests:
        files = re.findall(r"(tests/\S+\.py)", line)
        assert files == ["tests/kernels/test_lora.py", "tests/kernels/test_norm_lora.py",
                         "tests/kernels/test_swiglu_lora.py"], line
        assert all((ROOT / f).is_file() for f in files)
        assert line.endswith(r"-k concat\ or\ test_norm_lora.py\ or\ test_swiglu_lora.py"), line
    # what the selection collects (collecting needs no GPU): the concat
    # cases of test_lora.py and every gpu test of the fused norm and SwiGLU + LoRA files
    words = shlex.split(tests[0].split("+ ", 1)[1])
    args = words[words.index("pytest") + 1:]
    if "-n" in args:  # collected in this process: no xdist workers
        del args[args.index("-n"):args.index("-n") + 2]
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], capture_output=True,
                               text=True, timeout=120, cwd=ROOT)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    assert collected.returncode == 0 and ids, collected.stdout[-2000:] + collected.stderr[-2000:]
    assert all("concat" in i for i in ids if i.startswith("tests/kernels/test_lora.py::")), ids
    assert {i.split("::")[0] for i in ids} == set(files), ids


def test_gpu_short_cuts_parts_to_its_total():
    """A part gets at most what is left of GPU_SHORT_SECONDS, and none starts with under 20 s left (a dry
    run spends no time, so here only the total cuts)."""
    import os

    def parts(total):
        out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_short.sh"), "--dry-run"], capture_output=True,
                             text=True, timeout=120, cwd=ROOT, env={**os.environ, "GPU_SHORT_SECONDS": str(total)})
        assert out.returncode == 0, out.stderr
        return out.stdout

    text = parts(100)
    found = re.findall(r"part (\w+) \(limit (\d+)s\)", text)
    expected = [("gpu_tests", 100), ("nf4_gemv", 100), ("lora_infer", 85), ("generate", 100)]
    assert [name for name, _ in found] == [name for name, _ in expected], text
    # a dry run spends a second or two (more on a loaded machine), which the total's cut counts
    for (name, limit), (_, most) in zip(found, expected):
        assert most - 5 <= int(limit) <= most, (name, limit, text)
    text = parts(15)
    assert not re.findall(r"part \w+ \(limit", text)
    left = re.findall(r"skipped: (\d+)s left of 15s", text)  # a second or two may go by here too (a loaded machine)
    assert len(left) == 4 and all(10 <= int(x) <= 15 for x in left), text


def test_fetch_wheels_dry_run_names_the_wheel_for_the_gpu_machine():
    existed = (ROOT / ".whl").exists()
    out = dry_run("fetch_gpu_wheels.sh", "--dry-run")
    assert out.returncode == 0, out.stderr
    cmd = out.stdout
    for part in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                 "manylinux_2_24_x86_64", "-d .whl", "bitsandbytes==0.50.2"):
        assert part in cmd, part
    assert (ROOT / ".whl").exists() == existed, "a dry run downloads nothing"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
    out = subprocess.run(["shellcheck", "-x", *(f"scripts/{s}" for s in SCRIPTS)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout


# ----------------------------------------------------------------------------- gpu_short.sh run for real, here
# with a stand-in for python3 (no GPU, no torch): what it runs, in what order, what it leaves in $OUT

FAKE_PYTHON = r'''#!/usr/bin/env bash
# python3 as scripts/gpu_short.sh calls it, without python: each call logged (with the settings it ran
# under); pytest passes (FAKE_PYTEST=pass), hangs ignoring SIGINT (hang), or leaves a process behind
# (leave); a bench writes a results file into --out; bench/tune.py writes a tuning file picking FAKE_ALIGN
calls="$FAKE_DIR/calls"
printf '%s\t%s\t%s\t%s\n' "${BEZOAR_TUNING:-}" "${BEZOAR_LORA_CONCAT_ALIGN:-}" "${BEZOAR_COMMIT:-}" "$*" >>"$calls"
out=
prev=
for a in "$@"; do
  [ "$prev" = --out ] && out=$a
  prev=$a
done
case "$1" in
  -c) case "$2" in *"import bitsandbytes"*) [ "${FAKE_BNB:-ok}" = ok ]; exit $? ;; esac
      exit 1 ;;  # no optional module here (xdist, lm_eval, ...); bitsandbytes unless FAKE_BNB=missing
  -) cat >/dev/null; exit 0 ;;
  -m)
    [ "$2" = pytest ] || exit 0
    case "${FAKE_PYTEST:-pass}" in
      hang) trap '' INT TERM; echo $$ >>"$FAKE_DIR/pids"; sleep 300 & echo $! >>"$FAKE_DIR/pids"; wait ;;
      leave) sleep 300 & echo $! >>"$FAKE_DIR/pids" ;;
    esac
    exit 0 ;;
  bench/tune.py)
    shift
    for a in "$@"; do  # its results files, as tune.py reads them: one missing is an error
      case "$a" in --*) break ;; esac
      [ -f "$a" ] || { echo "tune: $a: cannot read the results" >&2; exit 1; }
    done
    if [ -n "${FAKE_ALIGN:-}" ]; then
      printf '{"format": 1, "devices": {"X": {"settings": {"lora.concat_align": %s}, "sources": {"lora.concat_align": "r.json (abc): 1 ms"}}}}\n' "$FAKE_ALIGN" >"$out"
    fi
    exit 0 ;;
  bench/*.py)
    n=$(wc -l <"$calls")
    name=$(basename "$1" .py)-fake-$n.json
    case " $* " in  # the sweeps' names, which the tune steps read
      *" --sweep-merge "*) name=lora-merge-sweep-fake-$n.json ;;
      *" --sweep-concat-align "*) name=lora-concat-align-fake-$n.json ;;
    esac
    echo '{}' >"$out/$name.part" && mv "$out/$name.part" "$out/$name"
    exit 0 ;;
esac
exit 0
'''


def short_call(tmp_path, *args, timeout=120, **env):
    """scripts/gpu_short.sh run here with the stand-in python3: (process, $OUT, the calls it made as
    (BEZOAR_TUNING, BEZOAR_LORA_CONCAT_ALIGN, BEZOAR_COMMIT, arguments))."""
    import os

    fake, fake_dir, out = tmp_path / "python3", tmp_path / "fake", tmp_path / "out"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    fake_dir.mkdir()
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("BEZOAR_", "GPU_", "TRITON_"))}
    wheels = tmp_path / "wheels"  # a wheel to carry, whatever this checkout's ignored .whl/ holds (a fresh clone: none)
    wheels.mkdir()
    (wheels / "bitsandbytes-0-py3-none-any.whl").write_bytes(b"")
    environ.update(PYTHON=str(fake), OUT=str(out), FAKE_DIR=str(fake_dir), SITE_DIR=str(tmp_path / "site"),
                   LINK_DIR=str(tmp_path / "links"), WHEEL_DIR=str(wheels), **{k: str(v) for k, v in env.items()})
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_short.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=environ)
    calls = (fake_dir / "calls").read_text().splitlines() if (fake_dir / "calls").exists() else []
    return proc, out, [tuple(line.split("\t")) for line in calls]


def concat_test_runs(calls):
    """(BEZOAR_TUNING set, BEZOAR_LORA_CONCAT_ALIGN) of each run of the concat GPU tests."""
    return [(bool(tuning), align) for tuning, align, _, argv in calls
            if argv.startswith("-m pytest") and "tests/kernels/test_lora.py" in argv]


@pytest.mark.parametrize("pick,expected", [
    ("16", [(False, "64")]),             # the pick is what gpu_tests ran at: only the rerun at 64
    ("", [(False, "64")]),               # no pick: the default, likewise
    ("64", [(True, "")]),                # the pick is 64: under the tuning file, no second run at 64
    ("128", [(True, ""), (False, "64")]),
])
def test_gpu_short_runs_the_concat_tests_only_at_aligns_not_tested_yet(tmp_path, pick, expected):
    proc, out, calls = short_call(tmp_path, "--parts", "gpu_tests,concat_align", FAKE_ALIGN=pick)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert concat_test_runs(calls) == expected, (calls, proc.stdout)
    suite = [argv for _, _, _, argv in calls if argv.startswith("-m pytest") and "--durations=10" in argv]
    assert len(suite) == 1  # gpu_tests' own run, at the default align
    for skipped in {"concat_align_tests", "concat_align_tests_64"} - {
            "concat_align_tests" if tuning else "concat_align_tests_64" for tuning, _ in expected}:
        assert f"part {skipped} skipped: the concat GPU tests ran at align" in proc.stdout


def test_gpu_short_does_not_assume_align_16_where_a_tuning_file_names_another(tmp_path):
    """The shipped file's align is 16 for every device that names one, so gpu_tests counts as tested at 16;
    a BEZOAR_TUNING file naming 64 for some device makes the default unknown: the pick is tested again."""
    mine = tmp_path / "mine.json"
    # any JSON layout: a tab and a space before the colon, the value on the next line
    mine.write_text('{"format": 1, "devices": {"x": {"settings": {"lora.concat_align" :\t\n 64}, "triton": "3.6"}}}')
    proc, out, calls = short_call(tmp_path, "--parts", "gpu_tests,concat_align", FAKE_ALIGN="16", BEZOAR_TUNING=mine)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # under the pick's file, then at 64 (the caller's BEZOAR_TUNING still set there)
    assert concat_test_runs(calls) == [(True, ""), (True, "64")]


def test_gpu_short_concat_tests_without_gpu_tests_run_at_the_pick(tmp_path):
    """Without gpu_tests in the call nothing ran at 16 yet: a pick of 16 is tested, then 64."""
    proc, out, calls = short_call(tmp_path, "--parts", "concat_align", FAKE_ALIGN="16")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert concat_test_runs(calls) == [(True, ""), (False, "64")]


def test_gpu_short_sets_up_once_and_passes_the_commit(tmp_path):
    """gpu_short installs the wheels and the project and prints the versions once: gpu_check.sh, which
    its gpu_tests part runs, does not again (it used to, 15-25 s of the part), nor writes a log of its
    own beside gpu_short.log. BEZOAR_COMMIT reaches every bench."""
    proc, out, calls = short_call(tmp_path, "--parts", "gpu_tests,nf4_gemv", BEZOAR_COMMIT="0123456789ab")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = [argv for _, _, _, argv in calls if argv.startswith("-m pip install")]
    project = [argv for argv in installs if argv.endswith(" -e .")]
    assert project == ["-m pip install -q --no-deps --no-build-isolation -e ."], calls
    wheels = [argv for argv in installs if argv.endswith("/wheels/bitsandbytes-0-py3-none-any.whl")]  # WHEEL_DIR's
    assert len(wheels) == 1, calls
    assert len(installs) == len(project) + len(wheels), calls
    assert sum(argv == "-" for _, _, _, argv in calls) == 1  # show_versions' module list
    assert "setup: done by the caller" in (out / "gpu_short.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["gpu_short.log", [p.name for p in out.iterdir()
                                                                       if p.name.startswith("nf4-")][0]]
    benches = [commit for _, _, commit, argv in calls if argv.startswith("bench/")]
    assert benches == ["0123456789ab"] and "commit 0123456789ab" in proc.stdout


def _alive(pid):
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("mode", ["hang", "leave"])
def test_a_part_leaves_nothing_running(tmp_path, mode):
    """hang: the GPU tests ignore the SIGINT at the part's limit (stuck in a kernel, say) under
    gpu_check.sh's own limit of 140 s, which used to take them into a process group of their own, out of
    the part's reach: they ran on into the next part. Now the part's SIGKILL reaches them at its limit
    and the call goes on. leave: the tests end in time but leave a process behind; the part's end kills it."""
    import os
    import time

    env = dict(FAKE_PYTEST=mode, GPU_SHORT_GRACE=1)
    if mode == "hang":
        env.update(GPU_SHORT_SECONDS=5, GPU_SHORT_MIN_PART=1)
    pid_file = tmp_path / "fake" / "pids"

    def pids():
        return [int(p) for p in pid_file.read_text().split()] if pid_file.exists() else []

    began = time.monotonic()
    try:
        # before the fix a process left behind also held gpu_check.sh's log pipe open: the call never ended
        proc, out, calls = short_call(tmp_path, "--parts", "gpu_tests", timeout=60, **env)
        took = time.monotonic() - began
        # the call ends in any case; its status says a part failed (the hung one, killed at its limit)
        assert proc.returncode == (1 if mode == "hang" else 0) and pids(), proc.stdout + proc.stderr
        deadline = time.monotonic() + 3
        while any(_alive(p) for p in pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids() if _alive(p)], (pids(), proc.stdout)
        if mode == "hang":
            # the SIGKILL, GPU_SHORT_GRACE after the SIGINT at the limit; the call goes on at once
            assert "part gpu_tests: exit 137 (time limit, killed after the SIGINT)" in proc.stdout, proc.stdout
            assert took < 20, took
    finally:
        for p in pids():  # only what this test's stand-in started
            if _alive(p):
                os.kill(p, 9)


def test_gpu_short_keeps_out_to_a_few_files_at_every_moment(tmp_path):
    """Every part, each bench writing a results file: at no moment does $OUT hold more than the 8 files a
    call brings back (one log with a header per part, the tuning files, results.tar and a few results),
    so a call cut anywhere brings back all it has; every results file is there, loose or in the archive."""
    import tarfile
    import threading

    out = tmp_path / "out"
    most, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            try:
                most[0] = max(most[0], sum(1 for e in out.iterdir() if e.is_file()))
            except OSError:
                pass
            time.sleep(0.002)

    import time

    every = ["gpu_tests", "nf4_cache", "step_cache", "nf4_small", "decode", "generate", "lora", "lora_nodrop",
             "lora_breakdown", "waves", "merge", "concat_align", "gemm_widths", "merged_check", "nf4_gemv",
             "gemv_ladder", "nf4_tma_sweep", "lora_tma_sweep", "tma_tests", "small_tests"]
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc, out, calls = short_call(tmp_path, "--parts", ",".join(every), timeout=300)
    finally:
        done.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 0 < most[0] <= 8, most
    def name(n, argv):
        for flag, prefix in (("--sweep-merge", "lora-merge-sweep"), ("--sweep-concat-align", "lora-concat-align")):
            if flag in argv.split():
                return f"{prefix}-fake-{n}.json"
        return f"{Path(argv.split()[0]).stem}-fake-{n}.json"

    written = {name(n, argv) for n, (_, _, _, argv) in enumerate(calls, 1)
               if argv.startswith("bench/") and not argv.startswith("bench/tune.py")}
    assert len(written) > 8
    with tarfile.open(out / "results.tar") as tar:
        archived = set(tar.getnames())
    loose = {p.name for p in out.iterdir()} - {"gpu_short.log", "results.tar", "merge-tuning.json",
                                               "concat-tuning.json"}
    assert archived | loose == written and len(loose) <= 2, (archived, loose)
    log = (out / "gpu_short.log").read_text()
    # A group's sweep stays loose until its tune step has read it (it was archived first: no pick, exit 0).
    assert "part merge_tune: exit 0" in log and "part concat_align_tune: exit 0" in log, log
    assert "cannot read the results" not in log
    assert log.startswith("[") and "==== setup ====" in log
    for part in ("gpu_tests", "merge_sweep", "merge_tests", "concat_align_tune", "nf4_gemv", "small_tests"):
        assert f"==== part {part} (limit " in log and f"==== part {part}: exit 0 ====" in log, part


def test_gpu_short_prints_the_call_with_this_checkouts_commit():
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    commit = head.stdout.strip() + "(-dirty)?"
    if any((ROOT / ".whl").glob("*.whl")):  # a checkout that fetched the wheels (CI's has none: refused there)
        out = dry_run("gpu_short.sh", "--print-call", "--parts", "nf4_gemv")
        assert out.returncode == 0, out.stderr
        assert re.fullmatch(r'run\(command="BEZOAR_COMMIT=' + commit + r' bash scripts/gpu_short.sh --parts nf4_gemv", '
                            r'carry=\[".whl"\], timeout_s=590\)\n', out.stdout), out.stdout
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_short.sh"), "--print-call", "--parts", "nf4_gemv"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "GPU_SHORT_NO_PEERS": "1"})
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(r'run\(command="BEZOAR_COMMIT=' + commit + r' GPU_SHORT_NO_PEERS=1 bash scripts/gpu_short.sh '
                        r'--parts nf4_gemv", carry=\[\], timeout_s=590\)\n', out.stdout), out.stdout


def test_gpu_check_under_gpu_short_neither_installs_nor_leaves_its_callers_limit():
    import os

    env = {**os.environ, "BEZOAR_GPU_SETUP": "done", "BEZOAR_IN_LIMIT": "1"}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "pip install" not in out.stdout and "setup: done by the caller" in out.stdout
    limits = re.findall(r"timeout (.*?) --signal=INT", out.stdout)
    assert limits == ["--foreground", "--foreground"], out.stdout
    alone = dry_run("gpu_check.sh", "--dry-run").stdout
    assert "pip install -q --no-deps --no-build-isolation -e ." in alone and "--foreground" not in alone


def test_a_call_whose_peers_do_not_import_says_so_and_exits_1(tmp_path):
    proc, out, calls = short_call(tmp_path, "--parts", "generate", FAKE_BNB="missing")
    assert proc.returncode == 1 and "ERROR: bitsandbytes does not import" in proc.stdout, proc.stdout
    assert any("bench/generate.py" in c[3] for c in calls)  # the parts still ran
    (tmp_path / "again").mkdir()
    proc, out, calls = short_call(tmp_path / "again", "--parts", "generate")
    assert proc.returncode == 0 and "ERROR" not in proc.stdout, proc.stdout


def test_the_device_call_is_not_made_or_run_without_its_peers_unsaid(tmp_path):
    """The one device call: a failed wheel install was a note in the log and the call exited 0, so it ran without
    bitsandbytes and transformers + bnb (the peers' columns missing); --print-call printed a call without wheels
    to carry and a clean commit where untracked files (which the device copies) were there."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    (clone / "bench" / "new_untracked.py").write_text("# travels with the call\n")
    out = subprocess.run(["bash", "scripts/gpu_short.sh", "--print-call"], capture_output=True, text=True,
                         timeout=120, cwd=clone)
    assert out.returncode == 2 and "no wheels in .whl/" in out.stderr and not out.stdout
    out = subprocess.run(["bash", "scripts/gpu_short.sh", "--print-call"], capture_output=True, text=True,
                         timeout=120, cwd=clone, env={**os.environ, "GPU_SHORT_NO_PEERS": "1"})
    # the setting goes with the call (the device reads it there), and no wheels are carried
    assert out.returncode == 0 and re.search(r'BEZOAR_COMMIT=[0-9a-f]{12}-dirty GPU_SHORT_NO_PEERS=1 bash .*'
                                             r'carry=\[\]', out.stdout), out.stdout
    # a wheel pip cannot install: install_wheels fails (it returned 0 and the call went on, quiet)
    (clone / ".whl").mkdir()
    (clone / ".whl" / "bitsandbytes-0-py3-none-any.whl").write_bytes(b"not a wheel")
    script = ('source scripts/gpu_env.sh; SITE_DIR="$1"; install_wheels; echo "rc=$?"')
    out = subprocess.run(["bash", "-c", script, "_", str(tmp_path / "site")], capture_output=True, text=True,
                         timeout=300, cwd=clone, env={**os.environ, "PYTHON": sys.executable})
    assert "rc=1" in out.stdout and "ERROR: installing the carried wheels failed" in out.stdout, out.stdout
