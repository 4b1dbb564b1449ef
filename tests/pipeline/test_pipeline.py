"""The whole pipeline on the tiny recipe: scripted teacher and judges, shipped samples, local harness tasks.

One uninterrupted run (A) and one run (B) SIGKILLed in the middle of a training stage, looked at
with --dry-run, then rerun: B must finish with the same adapters and merged weights (bitwise) and the
same report tables as A. Each pipeline runs as its own process (the kill must be a real one) on one
torch thread, talking to the scripted server this test process serves.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bezoar.pipeline import main as pipeline_main
from tests.pipeline.teacher import start

REPO = Path(__file__).resolve().parents[2]
SCHEMES = ("lamini", "orca", "evol")
STAGES = ("lamini", "orca", "evol", "hh_sft", "dpo")
STEPS = [f"{kind}:{s}" for s in SCHEMES for kind in ("generate", "filter")] + [f"train:{s}" for s in STAGES] + [
    "harness:dpo", "mt-bench:dpo"]


@pytest.fixture(scope="module")
def teacher_url():
    server = start(port=0)
    yield server.openai_url
    server.stop()


def _env() -> dict:
    env = dict(os.environ)
    # One thread: the same reduction order in every run (bitwise comparisons) and no oversubscription.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _command(root: Path, url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bezoar.pipeline", "--recipe", "openbezoar_tiny", "--out", str(root),
            f"generate.teacher.base_url={url}", f"generate.judge.base_url={url}",
            f"evaluate.mt_bench.judge.base_url={url}", *extra]


# ``python -m bezoar.pipeline`` as it runs, except that it stops for good right after the orca stage's first
# checkpoint is written: the test SIGKILLs it there, in the middle of that stage. Killed when the test first
# saw the checkpoint, the run went on meanwhile, and could finish the stage if the test's process fell behind.
STOP_IN_ORCA = """
import runpy, time
from bezoar.train import loop

save = loop.Trainer.save_checkpoint

def save_then_stop(self):
    path = save(self)
    if self.out.name == "orca":
        while True:  # until the test kills this process
            time.sleep(3600)
    return path

loop.Trainer.save_checkpoint = save_then_stop
runpy.run_module("bezoar.pipeline", run_name="__main__", alter_sys=True)
"""


def _run(root: Path, url: str, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(root, url, *extra), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"pipeline failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _steps_left(dry_run_output: str) -> list[str]:
    line = [x for x in dry_run_output.splitlines() if x.startswith("steps left:")]
    assert len(line) == 1, dry_run_output
    text = line[0][len("steps left:"):].split(";")[0].strip()
    if text.startswith("none"):
        return []
    return [re.sub(r" \(.*\)$", "", item.strip()) for item in re.split(r",\s*(?![^()]*\))", text)]


def _tables(report: Path) -> list[str]:
    return [line for line in report.read_text().splitlines() if line.startswith("|")]


def _weights(root: Path) -> dict[str, bytes]:
    files = {}
    for stage in STAGES:
        for path in sorted([root / stage / "adapter" / "adapter_model.safetensors"]
                           + list((root / stage / "merged").glob("*.safetensors"))):
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, teacher_url):
    """Run A: the whole tiny pipeline, uninterrupted."""
    root = tmp_path_factory.mktemp("pipeline") / "A"
    started = time.time()
    done = _run(root, teacher_url)
    return root, done, time.time() - started


@pytest.mark.slow
def test_every_step_writes_its_outputs_and_the_report(finished_run, teacher_url):
    root, done, seconds = finished_run
    for scheme in SCHEMES:
        folder = root / "data" / scheme
        for name in ("raw.jsonl", "filtered.jsonl", "judged.jsonl", "filter-summary.json", f"{scheme}-summary.json",
                     "generate.step.json", "filter.step.json"):
            assert (folder / name).exists(), folder / name
        summary = json.loads((folder / "filter-summary.json").read_text())
        kept = (folder / "filtered.jsonl").read_text().splitlines()
        assert summary["kept"] == len(kept) > 0 and summary["below_threshold"] > 0
        assert all(json.loads(line)["judge_score"] >= 7 for line in kept)
        for kind in ("generate", "filter"):  # each marker records the inputs the step read
            assert json.loads((folder / f"{kind}.step.json").read_text())["inputs"], (scheme, kind)
    for stage in STAGES:
        assert (root / stage / "summary.json").exists() and (root / stage / "merged" / "config.json").exists()
        assert (root / "report" / f"{stage}.png").stat().st_size > 0
        assert json.loads((root / stage / "pipeline-inputs.json").read_text())["inputs"], stage
    dpo = json.loads((root / "dpo" / "summary.json").read_text())
    assert dpo["stage"] == "dpo" and "rewards/accuracies" in dpo["final"]
    harness = json.loads((root / "eval/dpo/harness/results.json").read_text())
    assert set(harness["results"]) == {"tiny_mc", "tiny_gen", "tiny_ppl"}
    mt = json.loads((root / "eval/dpo/mt_bench/results.json").read_text())
    assert mt["counted"] == 16 and mt["unparseable"] == 0 and mt["failed"] == 0 and mt["overall"] is not None
    assert (root / "eval/dpo/mt_bench/categories.png").exists()

    report = (root / "report.md").read_text()
    for heading in ("## Steps", "## Synthetic data", "## Training", "## Evaluation", "## Timings"):
        assert heading in report
    for step in STEPS:
        assert f"| {step} | done |" in report
    assert "| tiny_mc | 1 | acc |" in report and "#### MT-Bench: openbezoar_tiny-dpo" in report
    assert "rewards/accuracies" in report and "![dpo](report/dpo.png)" in report
    kept = json.loads((root / "data/orca/filter-summary.json").read_text())["kept"]
    assert re.search(rf"\| orca \| 16 \| \d+ \| \d+ \| {kept} \|", report)
    print(f"uninterrupted tiny pipeline: {seconds:.1f} s wall")

    dry = _run(root, teacher_url, "--dry-run")
    assert _steps_left(dry.stdout) == []
    assert all(f"{step} " in dry.stdout for step in STEPS)


@pytest.mark.slow
def test_killed_mid_stage_and_rerun_ends_like_an_uninterrupted_run(finished_run, teacher_url, tmp_path, capsys):
    reference, _, _ = finished_run
    root = tmp_path / "B"
    target = root / "orca"
    script = tmp_path / "stop_in_orca.py"
    script.write_text(STOP_IN_ORCA)
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # the script is not in the repo
    command = [sys.executable, str(script), *_command(root, teacher_url)[3:]]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.time() + 300
        while not list(target.glob("checkpoints/step-*/trainer_state.pt")):
            assert process.poll() is None, f"pipeline ended before the kill:\n{process.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint of the orca stage within 300 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert len(list(target.glob("checkpoints/step-*"))) == 1, "killed right after the orca stage's first checkpoint"
    assert not (target / "summary.json").exists(), "the kill came after the orca stage finished"

    # --dry-run on the half-finished root lists exactly the steps left: orca (to resume) and all after it.
    dry = _run(root, teacher_url, "--dry-run")
    left = _steps_left(dry.stdout)
    assert left == STEPS[STEPS.index("train:orca"):], dry.stdout
    assert re.search(r"train:orca \(resume from step \d+\)", dry.stdout), dry.stdout

    rerun = _run(root, teacher_url)
    log = rerun.stdout + rerun.stderr
    assert "[generate:lamini] done already" in log and "[train:lamini] done already" in log
    assert re.search(r"resumed from .*orca/checkpoints/step-\d+", log), log[-3000:]

    mine, theirs = _weights(root), _weights(reference)
    assert sorted(mine) == sorted(theirs) and len(mine) == 2 * len(STAGES)
    different = [name for name in mine if mine[name] != theirs[name]]
    assert not different, f"weights differ from the uninterrupted run: {different}"
    assert _tables(root / "report.md") == _tables(reference / "report.md")
    for name in ("eval/dpo/harness/results.json", "eval/dpo/mt_bench/results.json"):
        a, b = json.loads((root / name).read_text()), json.loads((reference / name).read_text())
        if "results" in a:  # lm-eval's results also carry timings and paths; compare the metrics
            a, b = a["results"], b["results"]
            for task in list(a.values()) + list(b.values()):
                task.pop("alias", None)
        assert a == b, name

    # More data for orca (raw.jsonl grown): the filter is to run again, and the stage trained on its output
    # stops the run before anything runs, naming the stage and its folder.
    raw = root / "data/orca/raw.jsonl"
    original = raw.read_bytes()
    record = json.loads(original.splitlines()[-1])
    record["question"] = "Name three rivers of Europe."
    raw.write_bytes(original + (json.dumps(record) + "\n").encode())
    assert pipeline_main(_command(root, teacher_url, "--dry-run")[3:]) == 2  # in this process: no start-up
    dry = capsys.readouterr()
    assert re.search(r"filter:orca +to run \(input changed: data/orca/raw\.jsonl \(\d+ -> \d+ bytes\)\)", dry.out)
    assert re.search(r"train:orca +done \(stale: remove the stage's folder to redo\)", dry.out)
    assert (f"error: step train:orca is complete but its inputs are not what it was trained on (filter:orca runs "
            f"first and rewrites data/orca/filtered.jsonl). Remove the stage's folder {root / 'orca'} to train it "
            f"again (these complete stages are stale too: remove {root / 'evol'}, {root / 'hh_sft'}, "
            f"{root / 'dpo'} as well)") in dry.err
    raw.write_bytes(original)  # put back as it was: nothing is stale

    # The last stage trained again: the evaluations of its model run again, the earlier ones set aside.
    shutil.rmtree(root / "dpo")
    rerun = _run(root, teacher_url)
    log = rerun.stdout + rerun.stderr
    assert "[filter:orca] done already" in log and "[train:hh_sft] done already" in log
    assert "[harness:dpo] to run (train:dpo runs first and rewrites the model of stage dpo)" in log
    assert re.search(r"\[mt-bench:dpo\] earlier results and answers moved to eval/dpo/mt_bench/stale-\S+", log)
    (stale,) = (root / "eval/dpo/mt_bench").glob("stale-*")
    assert sorted(p.name for p in stale.iterdir()) == ["answers.jsonl", "answers.jsonl.settings.json", "categories.png",
                                                       "judgments.jsonl", "results.json", "results.md"]
    assert (root / "eval/dpo/mt_bench/answers.jsonl").exists() and (root / "eval/dpo/harness/results.json").exists()
    assert pipeline_main(_command(root, teacher_url, "--dry-run")[3:]) == 0
    assert _steps_left(capsys.readouterr().out) == []


def test_report_only_rewrites_the_report(finished_run, teacher_url):
    root, _, _ = finished_run
    before = _tables(root / "report.md")
    (root / "report.md").unlink()
    _run(root, teacher_url, "--report-only")
    assert _tables(root / "report.md") == before


def test_script_wrapper_help_and_dry_run(tmp_path):
    env = _env()
    env["PYTHON"] = sys.executable
    # an override after --out, as the README shows them: the script's own overrides come first (that split the
    # overrides in two, which the pipeline's parser refused: "unrecognized arguments")
    done = subprocess.run(["bash", str(REPO / "scripts/openbezoar.sh"), "--tiny", "--out", str(tmp_path / "t"),
                           "orca.optim.lr=1e-3", "--dry-run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps_left(done.stdout) == STEPS
    done = subprocess.run([sys.executable, "-m", "bezoar.pipeline", "--help"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--dry-run" in done.stdout and "--report-only" in done.stdout


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_the_wrapper_passes_a_sigterm_to_the_pipeline(tmp_path, tiny, how):
    """A SIGTERM to scripts/openbezoar.sh (timeout, a scheduler, docker stop) killed the shell alone: the pipeline
    ran on without a parent, paying for calls, and held the run root's lock against the rerun. A stand-in for
    Python records what the pipeline gets; with --tiny the teacher outlives it. A terminal's Ctrl-C (SIGINT to
    the foreground process group) reaches the pipeline once: twice abandons the answers in flight."""
    mark = tmp_path / "mark"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
if [ "${{1:-}}" = "-c" ]; then exec {sys.executable} "$@"; fi
if [ "${{2:-}}" = "tests.pipeline.teacher" ]; then
  echo '{{"openai_url": "http://127.0.0.1:9/v1"}}'
  trap 'echo teacher-stopped >> {mark}; exit 0' TERM
  for _ in $(seq 1200); do sleep 0.05; done  # at most a minute, left orphaned
fi
trap 'echo pipeline-got-term >> {mark}; exit 130' TERM
got=0
trap 'echo pipeline-got-int >> {mark}; got=1' INT
echo pipeline-started >> {mark}
for _ in $(seq 1200); do  # at most a minute, left orphaned
  sleep 0.05
  if [ "$got" = 1 ]; then sleep 0.5; exit 130; fi  # time for a second interrupt to show
done
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.Popen(["bash", str(REPO / "scripts/openbezoar.sh"), *(["--tiny"] if tiny else []),
                             "--out", str(tmp_path / "run")], env=env, cwd=tmp_path, start_new_session=True,
                            # as from a terminal: SIGINT not ignored (pytest-xdist's workers ignore it, and a shell
                            # started with it ignored cannot trap it)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (mark.exists() and "pipeline-started" in mark.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
    else:  # as a terminal sends it: to the foreground process group, the script's
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    lines = mark.read_text().split()
    assert lines[:2] == ["pipeline-started", "pipeline-got-term" if how == "sigterm" else "pipeline-got-int"]
    assert lines[2:] == (["teacher-stopped"] if tiny else [])  # the teacher stopped after the pipeline ended
