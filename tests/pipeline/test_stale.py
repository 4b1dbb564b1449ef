"""A complete pipeline step whose inputs changed since it ran is not reported done.

Fast: generation and the judge filter run in this process against the scripted teacher; training stages and
evaluations are faked on disk (summary.json, config.toml, markers) and their commands replaced by stubs.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from bezoar.pipeline import PipelineError, describe, execute, main, plan, preflight, write_marker
from bezoar.train.recipe import load_recipe
from tests.generate.fake_server import Fault, FakeLLMServer
from tests.pipeline.teacher import pipeline_teacher
from tests.pipeline.test_recipe_tables import _fake_trained

STAGES = {"lamini", "orca", "evol", "hh_sft", "dpo"}


class Recording:
    """The pipeline's scripted teacher and judges, keeping the model and messages of every call."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, call):
        with self.lock:
            self.calls.append((call.model, json.dumps(call.messages, sort_keys=True)))
        return pipeline_teacher(call)

    def judged(self) -> list[str]:
        with self.lock:
            return [messages for model, messages in self.calls if model == "demo-judge"]


@pytest.fixture
def server():
    replies = Recording()
    s = FakeLLMServer(reply=replies).start()
    s.replies = replies
    yield s
    s.stop()


def _overrides(url: str) -> list[str]:
    return [f"generate.teacher.base_url={url}", f"generate.judge.base_url={url}",
            f"evaluate.mt_bench.judge.base_url={url}"]


def _steps(recipe, root, overrides=()) -> dict:
    return {s.name: s for s in plan(recipe, root, list(overrides))}


def _quiet(*_):
    pass


def _append_record(path: Path, instruction: str) -> None:
    """Append a copy of the file's last record with another instruction (a grown or edited data file)."""
    last = json.loads(path.read_text().splitlines()[-1])
    field = next(k for k in ("instruction", "question", "prompt") if k in last)
    last[field] = instruction
    with open(path, "a") as f:
        f.write(json.dumps(last) + "\n")


def _store_keys(path: Path) -> list[str]:
    return [json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()]


# ---- filter: run again, from its judge store -----------------------------------------------------------


def test_filter_runs_again_when_raw_jsonl_changes_and_only_judges_what_is_new(tmp_path, server):
    overrides = _overrides(server.openai_url)
    recipe = load_recipe("openbezoar_tiny", overrides)
    root = tmp_path / "run"
    steps = _steps(recipe, root, overrides)
    for name in ("generate:orca", "filter:orca"):
        execute(steps[name], root, log=_quiet)
    folder = root / "data/orca"
    first = len(server.replies.judged())
    records = json.loads((folder / "filter-summary.json").read_text())["records"]
    assert first == records > 0
    marker = json.loads((folder / "filter.step.json").read_text())
    assert set(marker["inputs"]) == {"data/orca/raw.jsonl"}
    assert _steps(recipe, root, overrides)["filter:orca"].done

    # raw.jsonl grows by one record (edited by hand, or generated again with more): the filter is not done.
    _append_record(folder / "raw.jsonl", "Name three rivers of Europe.")
    steps = _steps(recipe, root, overrides)
    step = steps["filter:orca"]
    assert not step.done and step.status.startswith("to run (input changed: data/orca/raw.jsonl (")
    assert steps["generate:orca"].done and not steps["generate:orca"].stale
    preflight(recipe, root, list(steps.values()))  # a filter is run again, not refused
    execute(step, root, log=_quiet)

    # Only the new record went to the judge; the store holds each request once.
    assert len(server.replies.judged()) == first + 1
    keys = _store_keys(folder / "work/judge.jsonl")
    assert len(keys) == len(set(keys)) == records + 1
    summary = json.loads((folder / "filter-summary.json").read_text())
    assert summary["records"] == records + 1
    assert "Name three rivers of Europe." in (folder / "judged.jsonl").read_text()
    assert _steps(recipe, root, overrides)["filter:orca"].done

    # Generated again (its marker removed): the filter waits for it, then judges nothing twice.
    (folder / "generate.step.json").unlink()
    steps = _steps(recipe, root, overrides)
    assert steps["filter:orca"].status == "to run (generate:orca runs first and rewrites data/orca/raw.jsonl)"
    for name in ("generate:orca", "filter:orca"):
        execute(steps[name], root, log=_quiet)
    assert len(server.replies.judged()) == first + 1  # raw.jsonl is the stored generation again: all judged
    assert json.loads((folder / "filter-summary.json").read_text())["records"] == records
    steps = _steps(recipe, root, overrides)
    assert steps["generate:orca"].done and steps["filter:orca"].done


def test_failed_requests_complete_their_step_and_say_how_to_send_them_again(tmp_path):
    # The generate and filter commands exit 1 when requests ended as recorded failures; the pipeline keeps
    # completing such a step (a few failures do not stop a paid run) and says how to send them again.
    fail = {"judge": 1}
    lock = threading.Lock()

    def reply(call):
        with lock:
            if call.model == "demo-judge" and fail["judge"]:
                fail["judge"] -= 1
                return Fault("400", message="judge refused (injected)")
        return pipeline_teacher(call)

    with FakeLLMServer(reply=reply) as server:
        overrides = _overrides(server.openai_url)
        recipe = load_recipe("openbezoar_tiny", overrides)
        root = tmp_path / "run"
        logged: list[str] = []
        steps = {s.name: s for s in plan(recipe, root, overrides, log=logged.append)}
        for name in ("generate:orca", "filter:orca"):
            execute(steps[name], root, log=logged.append)
        folder = root / "data/orca"
        assert len((folder / "judge-failures.jsonl").read_text().splitlines()) == 1
        note = [line for line in logged if line.startswith("[filter:orca]")]
        assert len(note) == 1 and "remove data/orca/filter.step.json and rerun" in note[0], logged
        assert not any(line.startswith("[generate:orca]") for line in logged)  # no failure there, no note
        assert _steps(recipe, root, overrides)["filter:orca"].done

        # Following the note: only the failed request is sent again, and the step completes without one.
        (folder / "filter.step.json").unlink()
        server.reset_counters()
        logged.clear()
        execute({s.name: s for s in plan(recipe, root, overrides, log=logged.append)}["filter:orca"], root,
                log=logged.append)
        assert server.stats()["requests"] == 1 and not logged
        assert (folder / "judge-failures.jsonl").read_text() == ""


def _one_record_generated(tmp_path: Path):
    """The tiny recipe, its run root, and data/lamini holding a raw.jsonl of one record."""
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    folder = root / "data/lamini"
    folder.mkdir(parents=True)
    (folder / "raw.jsonl").write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    return recipe, root, folder


def test_dry_run_shows_why_a_step_is_to_run_again(tmp_path, capsys):
    recipe, root, folder = _one_record_generated(tmp_path)
    steps = _steps(recipe, root)
    for name in ("generate:lamini", "filter:lamini"):
        write_marker(steps[name], 1.0)
    _append_record(folder / "raw.jsonl", "Say hello.")

    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("filter:lamini"))
    assert "to run (input changed: data/lamini/raw.jsonl (" in line and "bytes)" in line
    assert re.search(r"steps left: filter:lamini \(to run \(input changed: data/lamini/raw\.jsonl", out)
    assert re.search(r"generate:lamini +done ", out)


# ---- training: stop before anything runs ----------------------------------------------------------------


def _trained_lamini(root: Path, recipe) -> None:
    """data/lamini generated, filtered and trained on, each step recorded as the pipeline records them."""
    folder = root / "data/lamini"
    folder.mkdir(parents=True)
    rows = [{"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(4)]
    (folder / "raw.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "filtered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    _fake_trained(root, recipe, [], {"lamini"})
    steps = _steps(recipe, root)
    for name in ("generate:lamini", "filter:lamini", "train:lamini"):
        write_marker(steps[name], 1.0)


def test_a_trained_stage_whose_data_changed_stops_the_run(tmp_path, capsys):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _trained_lamini(root, recipe)
    record = json.loads((root / "lamini/pipeline-inputs.json").read_text())
    assert set(record["inputs"]) == {"data/lamini/filtered.jsonl"}
    steps = _steps(recipe, root)
    assert steps["train:lamini"].done and not steps["train:lamini"].stale
    preflight(recipe, root, list(steps.values()))

    # The filtered data edited in place after the stage trained on it.
    _append_record(root / "data/lamini/filtered.jsonl", "Question 9?")
    steps = _steps(recipe, root)
    stage = steps["train:lamini"]
    assert stage.done and stage.stale and stage.stale[0].startswith("input changed: data/lamini/filtered.jsonl (")
    assert steps["filter:lamini"].done  # its raw.jsonl did not change
    with pytest.raises(PipelineError) as e:
        preflight(recipe, root, list(steps.values()))
    message = str(e.value)
    assert message.startswith("step train:lamini is complete but its inputs are not what it was trained on "
                              "(input changed: data/lamini/filtered.jsonl (")
    assert f"Remove the stage's folder {root / 'lamini'} to train it again" in message
    assert "put the input back as it was" in message
    assert "stale: input changed: data/lamini/filtered.jsonl" in describe(list(steps.values()), root)

    # --dry-run shows it and stops where a run would; nothing is written.
    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"train:lamini +done \(stale: remove the stage's folder to redo\)", out)
    assert "error: step train:lamini is complete but its inputs are not what it was trained on" in err
    assert not (root / "report.md").exists()


def test_a_partly_trained_stage_does_not_resume_on_another_base(tmp_path, capsys):
    """A stage killed after its first checkpoint recorded the inputs it started from: when the stage it starts from
    trained again (or is to train again), its checkpoints are refused like a stale complete stage, never resumed
    on the new base."""
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _trained_lamini(root, recipe)
    for name in ("generate:orca", "filter:orca"):
        write_marker(_steps(recipe, root)[name], 1.0)
    orca = _steps(recipe, root)["train:orca"]
    assert orca.status == "to run"

    def killed_after_a_checkpoint():
        (orca.out / "checkpoints/step-4").mkdir(parents=True)
        (orca.out / "checkpoints/step-4/trainer_state.pt").write_bytes(b"state")
        raise PipelineError("train:orca: interrupted; rerun the same command to continue")

    orca.run = killed_after_a_checkpoint
    with pytest.raises(PipelineError, match="interrupted"):
        execute(orca, root, log=_quiet)
    record = json.loads((root / "orca/pipeline-inputs.json").read_text())
    assert set(record["inputs"]) == {"model:lamini"} and "started" in record and "finished" not in record
    steps = _steps(recipe, root)
    assert steps["train:orca"].status == "resume from step 4" and not steps["train:orca"].stale
    preflight(recipe, root, list(steps.values()))  # the same base: it resumes

    summary = root / "lamini/summary.json"
    kept = summary.read_text()
    summary.write_text('{"steps": 9}')  # lamini trained again, to completion, before orca resumed
    steps = _steps(recipe, root)
    assert steps["train:orca"].stale == ["input changed: the model of stage lamini (2 -> 12 bytes)"]
    with pytest.raises(PipelineError) as e:
        preflight(recipe, root, list(steps.values()))
    assert str(e.value) == (
        "step train:orca has checkpoints (resume from step 4) but its inputs are not what it started from (input "
        "changed: the model of stage lamini (2 -> 12 bytes)), so it cannot resume from them. Remove the stage's "
        f"folder {root / 'orca'} to train it again from step 0, or put the input back as it was, or use another "
        "--out.")
    summary.write_text(kept)

    shutil.rmtree(root / "lamini")  # to train lamini again: orca would resume on the new lamini
    steps = _steps(recipe, root)
    assert steps["train:lamini"].status == "to run"
    assert steps["train:orca"].stale == ["train:lamini runs first and rewrites the model of stage lamini"]
    with pytest.raises(PipelineError, match=re.escape("step train:orca has checkpoints (resume from step 4) but its "
                                                      "inputs are not what it started from (train:lamini runs first")):
        preflight(recipe, root, list(steps.values()))
    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"train:orca +resume from step 4 \(stale: remove the stage's folder to redo\)", out), out
    assert "error: step train:orca has checkpoints" in err


def test_a_trained_stage_whose_data_is_to_be_rewritten_stops_the_run(tmp_path):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _trained_lamini(root, recipe)
    # A later stage started from lamini's model; it completed through the pipeline too.
    _fake_trained(root, recipe, [], {"orca"})
    for name in ("generate:orca", "filter:orca", "train:orca"):
        write_marker(_steps(recipe, root)[name], 1.0)
    assert set(json.loads((root / "orca/pipeline-inputs.json").read_text())["inputs"]) == {"model:lamini"}
    (root / "data/lamini/generate.step.json").unlink()  # to generate more data

    steps = _steps(recipe, root)
    assert steps["generate:lamini"].status == "to run"
    assert steps["filter:lamini"].status == "to run (generate:lamini runs first and rewrites data/lamini/raw.jsonl)"
    assert steps["train:lamini"].stale == ["filter:lamini runs first and rewrites data/lamini/filtered.jsonl"]
    assert steps["train:orca"].stale == ["the model of stage lamini comes from train:lamini, which is stale"]
    with pytest.raises(PipelineError) as e:
        preflight(recipe, root, list(steps.values()))
    message = str(e.value)
    assert message.startswith("step train:lamini is complete but its inputs are not what it was trained on "
                              "(filter:lamini runs first and rewrites data/lamini/filtered.jsonl). Remove the "
                              f"stage's folder {root / 'lamini'} to train it again (these complete stages are stale "
                              f"too: remove {root / 'orca'} as well)")
    assert "put the input back" not in message

    # Retrained from scratch (the folder removed): the stage after it is stale, by its start model.
    write_marker(steps["generate:lamini"], 1.0)  # generated again, to the same raw.jsonl
    shutil.rmtree(root / "lamini")
    steps = _steps(recipe, root)
    assert steps["train:lamini"].status == "to run"
    assert steps["train:orca"].stale == ["train:lamini runs first and rewrites the model of stage lamini"]
    with pytest.raises(PipelineError, match=rf"step train:orca is complete .*{re.escape(str(root / 'orca'))}"):
        preflight(recipe, root, list(steps.values()))


def test_a_generation_step_whose_seed_file_changed_stops_the_run(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    overrides = [f"generate.evol.seeds={seeds}"]
    recipe = load_recipe("openbezoar_tiny", overrides)
    root = tmp_path / "run"
    write_marker(_steps(recipe, root, overrides)["generate:evol"], 1.0)
    _append_record(seeds, "Say hello.")
    steps = _steps(recipe, root, overrides)
    assert steps["generate:evol"].done and len(steps["generate:evol"].stale) == 1
    assert steps["generate:evol"].stale[0].startswith(f"input changed: {seeds} (")
    marker = re.escape(str(root / "data/evol/generate.step.json"))
    with pytest.raises(PipelineError, match=r"step generate:evol is complete but its inputs are not what it was "
                                            rf"generated from .*Remove {marker} to generate again"):
        preflight(recipe, root, list(steps.values()))


# ---- records written before fingerprints: unknown, not stale ------------------------------------------------


def test_steps_completed_before_fingerprints_were_recorded_stay_done(tmp_path, capsys):
    recipe, root, folder = _one_record_generated(tmp_path)
    (folder / "filtered.jsonl").write_text((folder / "raw.jsonl").read_text())
    steps = _steps(recipe, root)
    for name in ("generate:lamini", "filter:lamini"):  # markers as the code before wrote them: no "inputs"
        s = steps[name]
        s.marker.write_text(json.dumps({"step": s.name, "settings": s.settings, "seconds": 1.0,
                                        "finished": "2026-01-01 00:00:00"}, indent=2) + "\n")
    _fake_trained(root, recipe, [], {"lamini"})  # and a stage with no pipeline-inputs.json
    _append_record(folder / "raw.jsonl", "Say hello.")
    _append_record(folder / "filtered.jsonl", "Say hello.")

    steps = _steps(recipe, root)
    for name in ("generate:lamini", "filter:lamini", "train:lamini"):
        assert steps[name].done and not steps[name].stale, name
    preflight(recipe, root, list(steps.values()))
    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 0
    left = [x for x in capsys.readouterr().out.splitlines() if x.startswith("steps left:")][0]
    assert "generate:orca" in left and not any(n in left for n in ("generate:lamini", "filter:lamini", "train:lamini"))

    # Known for sure: a step before it is to run. Then even an old marker is not done.
    (folder / "generate.step.json").unlink()
    steps = _steps(recipe, root)
    assert steps["filter:lamini"].status.startswith("to run (generate:lamini runs first")
    assert steps["train:lamini"].stale


def test_an_input_that_is_gone_does_not_make_a_step_stale(tmp_path):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _trained_lamini(root, recipe)
    (root / "data/lamini/raw.jsonl").unlink()  # removed to save space
    (root / "data/lamini/filtered.jsonl").unlink()
    steps = _steps(recipe, root)
    assert all(steps[n].done and not steps[n].stale for n in ("generate:lamini", "filter:lamini", "train:lamini"))


# ---- evaluations: run again, earlier results and answers set aside -------------------------------------


def _evaluated_run(root: Path, recipe) -> dict:
    """Every step complete: generation and filter markers, faked stages, recorded harness and MT-Bench steps."""
    steps = _steps(recipe, root)
    for name, s in steps.items():
        if not name.startswith(("train:", "harness:", "mt-bench:")):
            write_marker(s, 1.0)
    _fake_trained(root, recipe, [], STAGES)
    (root / "dpo/summary.json").write_text(json.dumps({"stage": "dpo", "steps": 4}) + "\n")
    steps = _steps(recipe, root)
    for name in ("harness:dpo", "mt-bench:dpo"):
        s = steps[name]
        s.out.mkdir(parents=True)
        (s.out / "results.json").write_text('{"old": true}\n')
        write_marker(s, 1.0)
    mt = steps["mt-bench:dpo"].out
    (mt / "answers.jsonl").write_text(json.dumps({  # an answer line as bezoar.eval mt-bench writes it
        "question_id": 81, "answer_id": "a81", "model_id": "openbezoar_tiny-dpo",
        "choices": [{"index": 0, "turns": ["first answer", "second answer"]}], "tstamp": 1.0}) + "\n")
    from bezoar.eval import mt_bench

    made_with = steps["mt-bench:dpo"].settings["mt_bench"]  # and the settings they were made with beside them
    mt_bench.answer_settings_path(mt / "answers.jsonl").write_text(json.dumps(mt_bench.answer_settings(
        made_with["max_new_tokens"], made_with["seed"], made_with["top_k"])))
    (mt / "judge_store.jsonl").write_text('{"key": "k1"}\n')
    return steps


def test_evaluations_run_again_on_a_retrained_model_with_old_answers_set_aside(tmp_path, capsys):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _evaluated_run(root, recipe)
    marker = json.loads((root / "eval/dpo/mt_bench/mt-bench.step.json").read_text())
    assert set(marker["inputs"]) == {"model:dpo", "bezoar:assets/mt_bench/sample_questions.jsonl"}
    steps = _steps(recipe, root)
    assert all(s.done and not s.stale for s in steps.values())

    # The dpo stage trained again (its summary.json rewritten when it completed).
    (root / "dpo/summary.json").write_text(json.dumps({"stage": "dpo", "steps": 8}) + "\n")
    steps = _steps(recipe, root)
    assert steps["harness:dpo"].status.startswith("to run (input changed: the model of stage dpo")
    mt = steps["mt-bench:dpo"]
    assert mt.status.startswith("to run (input changed: the model of stage dpo")
    assert mt.status.endswith("; its answers are set aside)")
    preflight(recipe, root, list(steps.values()))

    seen = {}

    def fake_mt_bench():  # what the step finds when its command starts
        seen["answers"] = (mt.out / "answers.jsonl").exists()
        seen["store"] = (mt.out / "judge_store.jsonl").read_text()
        seen["marker"] = mt.marker.exists()
        (mt.out / "answers.jsonl").write_text('{"question_id": 81, "model_id": "openbezoar_tiny-dpo", "new": 1}\n')
        (mt.out / "results.json").write_text('{"new": true}\n')

    mt.run = fake_mt_bench
    logged = []
    execute(mt, root, log=logged.append)
    assert seen == {"answers": False, "store": '{"key": "k1"}\n', "marker": False}
    (stale,) = mt.out.glob("stale-*")
    assert "openbezoar_tiny-dpo" in (stale / "answers.jsonl").read_text() and '"new"' not in (
        stale / "answers.jsonl").read_text()
    assert (stale / "results.json").read_text() == '{"old": true}\n'
    assert (mt.out / "judge_store.jsonl").read_text() == '{"key": "k1"}\n'  # paid judgments stay
    assert any("earlier results and answers moved to eval/dpo/mt_bench/stale-" in x for x in logged)

    harness = steps["harness:dpo"]
    harness.run = lambda: (harness.out / "results.json").write_text('{"new": true}\n')
    execute(harness, root, log=_quiet)
    assert [p.name for p in harness.out.glob("stale-*/*")] == ["results.json"]
    steps = _steps(recipe, root)
    assert steps["harness:dpo"].done and steps["mt-bench:dpo"].done



def test_mt_bench_keeps_its_answers_when_only_the_judge_prompts_changed(tmp_path):
    prompts = tmp_path / "judge_prompts.jsonl"
    shipped = Path(__file__).resolve().parents[2] / "bezoar/assets/mt_bench/judge_prompts.jsonl"
    prompts.write_text(shipped.read_text())
    recipe = load_recipe("openbezoar_tiny", [f"evaluate.mt_bench.judge_prompts={prompts}"])
    root = tmp_path / "run"
    _evaluated_run(root, recipe)
    with open(prompts, "a") as f:
        f.write("\n")
    mt = _steps(recipe, root)["mt-bench:dpo"]
    assert mt.status.startswith(f"to run (input changed: {prompts} (") and not mt.set_aside
    seen = []
    mt.run = lambda: seen.append((mt.out / "answers.jsonl").exists())
    execute(mt, root, log=_quiet)
    assert seen == [True]  # the answers are the model's still: only the judging is redone
    assert [p.name for p in mt.out.glob("stale-*/*")] == ["results.json"]


def test_an_mt_bench_step_from_before_top_k_reads_as_sampled_without_it(tmp_path):
    """A marker written before MT-Bench had top_k ran without it: the recipe's 50 is a changed setting that
    names both values (not None -> 50), and top_k = 0 keeps the step complete."""
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    steps = _evaluated_run(root, recipe)
    mt = steps["mt-bench:dpo"]
    record = json.loads(mt.marker.read_text())
    del record["settings"]["mt_bench"]["top_k"]
    mt.marker.write_text(json.dumps(record))
    steps = _steps(recipe, root)
    assert steps["mt-bench:dpo"].changed == ["mt_bench.top_k: 0 -> 50"]
    with pytest.raises(PipelineError, match=re.escape("changed since (mt_bench.top_k: 0 -> 50)")):
        preflight(recipe, root, list(steps.values()))
    kept = load_recipe("openbezoar_tiny", ["evaluate.mt_bench.top_k=0"])
    steps = _steps(kept, root)
    assert steps["mt-bench:dpo"].done and not steps["mt-bench:dpo"].changed
    preflight(kept, root, list(steps.values()))


def test_mt_bench_answers_made_with_other_settings_are_set_aside_when_it_runs_again(tmp_path):
    """The marker removed after a setting the answers depend on changed (as the pipeline's error says): the
    step sets those answers (and their settings file) aside with the results, and answers again; the judge
    store stays, and answers made with the step's settings are kept."""
    from bezoar.eval import mt_bench

    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    steps = _evaluated_run(root, recipe)
    mt = steps["mt-bench:dpo"]
    answers = mt.out / "answers.jsonl"
    answers.write_text(json.dumps(mt_bench.Answer(1, "openbezoar_tiny-dpo", ["a", "b"]).to_record()) + "\n")
    section = recipe.evaluate.mt_bench
    settings = mt_bench.answer_settings(section.max_new_tokens, section.seed, section.top_k)
    side = mt.out / "answers.jsonl.settings.json"
    side.write_text(json.dumps({**settings, "top_k": 0}))
    mt.marker.unlink()
    mt = _steps(recipe, root)["mt-bench:dpo"]
    assert not mt.done
    seen, logged = [], []
    mt.run = lambda: seen.append(answers.exists())
    execute(mt, root, log=logged.append)
    assert seen == [False]
    (stale,) = mt.out.glob("stale-*")
    assert sorted(p.name for p in stale.iterdir()) == ["answers.jsonl", "answers.jsonl.settings.json", "results.json"]
    assert (mt.out / "judge_store.jsonl").read_text() == '{"key": "k1"}\n'
    assert any("answers made with other settings (top_k: 0 -> 50) and the results from them moved to "
               "eval/dpo/mt_bench/stale-" in x for x in logged), logged

    # answers made with the step's settings stay where they are
    answers.write_text(json.dumps(mt_bench.Answer(1, "openbezoar_tiny-dpo", ["a", "b"]).to_record()) + "\n")
    side.write_text(json.dumps(settings))
    mt.marker.unlink()
    mt = _steps(recipe, root)["mt-bench:dpo"]
    mt.run = lambda: seen.append(answers.exists())
    execute(mt, root, log=logged.append)
    assert seen == [False, True] and len(list(mt.out.glob("stale-*"))) == 1


def test_mt_bench_answers_loaded_otherwise_are_set_aside(tmp_path):
    """How the model was loaded is part of what the answers were made with: answers from the dense model are
    not resumed (nor their results kept) under evaluate.mt_bench.quant = "nf4" (likewise dtype and device), and a
    settings file written before those were recorded reads as made with the defaults, so a run that kept them
    keeps its answers."""
    from bezoar.eval import mt_bench

    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    mt = _evaluated_run(root, recipe)["mt-bench:dpo"]
    side = mt_bench.answer_settings_path(mt.out / "answers.jsonl")
    old = {k: v for k, v in json.loads(side.read_text()).items() if k not in ("quant", "dtype", "device")}
    side.write_text(json.dumps(old))  # as bezoar wrote it before
    mt.marker.unlink()
    step = _steps(recipe, root)["mt-bench:dpo"]
    assert step.status.startswith("resume (1 questions answered") and not step.changed_answers
    for override, change in [("quant=nf4", "quant: 'none' -> 'nf4'"), ("dtype=float16", "dtype: '' -> 'float16'"),
                             ("device=cpu", "device: '' -> 'cpu'")]:
        other = load_recipe("openbezoar_tiny", [f"evaluate.mt_bench.{override}"])
        step = _steps(other, root)["mt-bench:dpo"]
        assert step.status == f"to run (its answers were made with other settings: {change}; they are set aside)"
    nf4 = load_recipe("openbezoar_tiny", ["evaluate.mt_bench.quant=nf4"])
    step = _steps(nf4, root)["mt-bench:dpo"]
    seen = []
    step.run = lambda: seen.append((step.out / "answers.jsonl").exists())
    execute(step, root, log=_quiet)
    assert seen == [False]
    (stale,) = step.out.glob("stale-*")
    assert sorted(p.name for p in stale.iterdir()) == ["answers.jsonl", "answers.jsonl.settings.json", "results.json"]


def _answers_made_with_top_k_0(root, recipe):
    """The MT-Bench step's marker removed, and one answer in its answers.jsonl made with top_k 0 (the recipe: 50)."""
    from bezoar.eval import mt_bench

    mt = _evaluated_run(root, recipe)["mt-bench:dpo"]
    (mt.out / "answers.jsonl").write_text(
        json.dumps(mt_bench.Answer(1, "openbezoar_tiny-dpo", ["a", "b"]).to_record()) + "\n")
    section = recipe.evaluate.mt_bench
    settings = mt_bench.answer_settings(section.max_new_tokens, section.seed, section.top_k)
    (mt.out / "answers.jsonl.settings.json").write_text(json.dumps({**settings, "top_k": 0}))
    mt.marker.unlink()
    return mt


def test_dry_run_says_which_mt_bench_answers_will_be_set_aside(tmp_path, capsys):
    """--dry-run of a step whose answers were made with other settings says that they will be set aside and
    why, not that the step resumes from them."""
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _answers_made_with_top_k_0(root, recipe)
    mt = _steps(recipe, root)["mt-bench:dpo"]
    assert mt.status == "to run (its answers were made with other settings: top_k: 0 -> 50; they are set aside)"
    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("mt-bench:dpo"))
    assert "they are set aside" in line and "resume" not in line, line
    assert (mt.out / "answers.jsonl").exists() and not list(mt.out.glob("stale-*")), "a dry run moves nothing"


def test_an_unreadable_answer_settings_file_stops_the_pipeline_with_its_error(tmp_path, capsys):
    """answers.jsonl.settings.json unreadable: the dry run and the run stop before the step with one error naming
    the file (bezoar.pipeline's exit status 2, no traceback), and nothing is moved."""
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    mt = _answers_made_with_top_k_0(root, recipe)
    side = mt.out / "answers.jsonl.settings.json"
    side.write_text("{not json")
    steps = _steps(recipe, root)  # the plan (and so the report) is still made
    with pytest.raises(PipelineError, match=rf"mt-bench:dpo: {re.escape(str(side))}: unreadable"):
        preflight(recipe, root, list(steps.values()))
    assert main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 2
    assert f"{side}: unreadable" in capsys.readouterr().err
    mt = steps["mt-bench:dpo"]
    mt.run = lambda: pytest.fail("the step must not run")
    with pytest.raises(PipelineError, match=rf"mt-bench:dpo: {re.escape(str(side))}: unreadable"):
        execute(mt, root, log=_quiet)
    assert side.read_text() == "{not json" and (mt.out / "answers.jsonl").exists()
    assert not list(mt.out.glob("stale-*"))


def test_evaluations_wait_for_a_stage_trained_again(tmp_path):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _evaluated_run(root, recipe)
    shutil.rmtree(root / "dpo")
    steps = _steps(recipe, root)
    assert steps["train:dpo"].status == "to run"
    for name in ("harness:dpo", "mt-bench:dpo"):
        assert steps[name].status.startswith("to run (train:dpo runs first and rewrites the model of stage dpo")
    preflight(recipe, root, list(steps.values()))  # nothing stale is refused: the run retrains, then evaluates


def test_fingerprints_follow_content_not_times_or_places(tmp_path):
    import os

    from bezoar.fingerprint import fingerprint

    data = tmp_path / "a.jsonl"
    data.write_text('{"x": 1}\n')
    first = fingerprint(data)
    os.utime(data, (1, 1))  # touched
    copy = tmp_path / "b.jsonl"
    shutil.copy(data, copy)
    assert fingerprint(data) == fingerprint(copy) == first == {"size": 9, "sha256": first["sha256"]}
    data.write_text('{"x": 2}\n')  # same size, other content
    assert fingerprint(data) != first and fingerprint(tmp_path / "missing") is None

    folder = tmp_path / "tasks"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub/t.yaml").write_text("task: t\n")
    before = fingerprint(folder)
    assert before["files"] == 1
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__/x.pyc").write_bytes(b"\0")
    assert fingerprint(folder) == before
    (folder / "sub/t.yaml").write_text("task: u\n")  # same size, other content
    # fingerprint() keeps the hashes it made by (inode, size, mtime, ctime). This rewrite comes well within a
    # millisecond of the first write, and a kernel that stamps files with a coarse clock (a jiffy, before Linux
    # 6.13) or a filesystem with coarse timestamps gives both writes the same times: the file would look
    # unchanged. A later edit has a later mtime; this one is given one.
    st = (folder / "sub/t.yaml").stat()
    os.utime(folder / "sub/t.yaml", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(folder) != before


@pytest.mark.parametrize("complete", [True, False])
def test_a_stage_trained_by_bezoar_train_is_judged_by_the_base_it_recorded(tmp_path, complete):
    """A stage trained with `python -m bezoar.train --recipe` has no pipeline record, only its own inputs.json
    (the stage it starts from): the pipeline took it as unchanged, so it skipped it as done, or let it reach
    its resume (which run_stage then refused, after the steps before it had run), on a base trained again."""
    from bezoar.fingerprint import fingerprint

    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _trained_lamini(root, recipe)
    for name in ("generate:orca", "filter:orca"):
        write_marker(_steps(recipe, root)[name], 1.0)
    if complete:
        _fake_trained(root, recipe, [], {"orca"})
    else:
        (root / "orca/checkpoints/step-4").mkdir(parents=True)
        (root / "orca/checkpoints/step-4/trainer_state.pt").write_bytes(b"state")
    (root / "orca/inputs.json").write_text(json.dumps({"base_summary": fingerprint(root / "lamini/summary.json")}))
    steps = _steps(recipe, root)
    assert steps["train:orca"].status == ("done" if complete else "resume from step 4")
    assert not steps["train:orca"].stale
    preflight(recipe, root, list(steps.values()))  # the base it recorded: done, or resumed
    (root / "lamini/summary.json").write_text('{"steps": 9}')  # lamini trained again
    steps = _steps(recipe, root)
    assert steps["train:orca"].stale == ["input changed: the model of stage lamini (2 -> 12 bytes)"]
    with pytest.raises(PipelineError, match=re.escape(
            "step train:orca " + ("is complete but its inputs are not what it was trained on" if complete else
                                  "has checkpoints (resume from step 4) but its inputs are not what it started from"))):
        preflight(recipe, root, list(steps.values()))
