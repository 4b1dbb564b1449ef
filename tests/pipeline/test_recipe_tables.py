"""The [generate] / [evaluate] recipe tables, the command lines the pipeline builds, its plan and pre-flight checks."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from bezoar.config import ConfigError
from bezoar.pipeline import (PipelineError, describe, eval_model, filter_argv, generate_argv, harness_argv,
                             mt_bench_argv, plan, preflight, render_tasks, write_marker)
from bezoar.train.recipe import RECIPES, load_recipe, stage_configs

TINY = RECIPES / "openbezoar_tiny"


def _copy_recipe(tmp_path: Path, name: str = "openbezoar_tiny") -> Path:
    folder = tmp_path / "recipe"
    shutil.copytree(RECIPES / name, folder)
    return folder


def _edit(folder: Path, old: str, new: str) -> None:
    path = folder / "recipe.toml"
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))


# ---- parsing and validation --------------------------------------------------------------------


def test_shipped_recipes_parse():
    ob = load_recipe("openbezoar")
    assert [s.name for s in ob.stages] == ["lamini", "orca", "evol", "hh_sft", "dpo"]
    assert ob.generate.teacher.model == "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v2"
    assert ob.generate.judge.model == "gpt-4" and ob.evaluate.mt_bench.judge.model == "claude-2.1"
    assert [name for name, _ in ob.generate.schemes()] == ["lamini", "orca", "evol"]
    assert ob.eval_stages() == ["dpo"] and ob.evaluate.harness.preset == "openllm"
    tiny = load_recipe("openbezoar_tiny")
    assert [s.name for s in tiny.stages] == [s.name for s in ob.stages]
    assert tiny.generate.teacher.provider == "compat" and tiny.evaluate.harness.include_path


@pytest.mark.parametrize("old, new, key", [
    ("[generate.lamini]\n", "[generate.lamini]\nseedz = 1\n", "generate.lamini.seedz"),
    ("[generate.teacher]\n", "[generate.teacher]\nbase_urls = 'x'\n", "generate.teacher.base_urls"),
    ("[evaluate.harness]\n", "[evaluate.harness]\nshots = 3\n", "evaluate.harness.shots"),
    ("[generate.filter]\n", "[generate.bogus]\nx = 1\n[generate.filter]\n", "generate.bogus"),
    ("[generate.teacher]\n", "[pipeline]\nx = 1\n[generate.teacher]\n", "pipeline"),
])
def test_unknown_key_is_named_with_its_line(tmp_path, old, new, key):
    folder = _copy_recipe(tmp_path)
    _edit(folder, old, new)
    with pytest.raises(ConfigError) as e:
        load_recipe(str(folder))
    assert f"unknown key {key!r}" in str(e.value)
    assert "recipe.toml:" in str(e.value)  # file:line


@pytest.mark.parametrize("old, new, key", [
    ("threshold = 7\n", "threshold = \"high\"\n", "generate.filter.threshold"),
    ("per_request = 6\n", "per_request = 6.5\n", "generate.lamini.per_request"),
    ("provider = \"compat\"\nmodel = \"demo-teacher\"", "provider = \"local\"\nmodel = \"demo-teacher\"",
     "generate.teacher.provider"),
])
def test_wrong_type_is_named(tmp_path, old, new, key):
    folder = _copy_recipe(tmp_path)
    _edit(folder, old, new)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(str(folder))


def test_values_are_checked(tmp_path):
    folder = _copy_recipe(tmp_path)
    _edit(folder, "threshold = 7\n", "threshold = 11\n")
    with pytest.raises(ConfigError, match="between 1 and 10"):
        load_recipe(str(folder))


@pytest.mark.parametrize("old, new, message", [
    ("cap_per_task = 2\n", "cap_per_task = 2\ncaps = { niv3 = 3 }\n",
     "recipe.toml:62: table 'generate.orca': caps: unknown sub-collection 'niv3'"),
    ("cap_per_task = 2\n", "cap_per_task = 2\ncaps = { niv2 = 0 }\n", "recipe.toml:62: table 'generate.orca': caps.niv2"),
    ("per_request = 6\n", "per_request = 6\ntemplates = { lamini_exampels = \"mine.txt\" }\n",
     "recipe.toml:58: table 'generate.lamini': templates: unknown template 'lamini_exampels'"),
    ("epochs = 2\n", "epochs = 2\ntemplates = { judge = \"mine.txt\" }\n",
     "recipe.toml:66: table 'generate.evol': templates: unknown template 'judge'"),
])
def test_names_inside_scheme_tables_are_checked_when_the_recipe_loads(tmp_path, old, new, message):
    # Found by the scheme's command, these typos stopped the run after the steps before it had run and
    # named a --cap / --template flag the recipe's author never wrote.
    folder = _copy_recipe(tmp_path)
    _edit(folder, old, new)
    with pytest.raises(ConfigError) as e:
        load_recipe(str(folder))
    assert message in str(e.value)
    assert load_recipe("openbezoar_tiny", ["generate.orca.caps={NIV2=3,p3=1}"]).generate.orca.caps


def test_stage_named_like_a_table_and_unknown_eval_stage(tmp_path):
    folder = _copy_recipe(tmp_path)
    _edit(folder, 'name = "hh_sft"\nconfig', 'name = "evaluate"\nconfig')
    with pytest.raises(ConfigError, match="may not be named 'evaluate'"):
        load_recipe(str(folder))
    folder = _copy_recipe(tmp_path / "b")
    _edit(folder, "[evaluate.harness]\n", "[evaluate]\nstages = [\"sft\"]\n\n[evaluate.harness]\n")
    with pytest.raises(ConfigError, match="evaluate.stages names 'sft'"):
        load_recipe(str(folder))


@pytest.mark.parametrize("name", ["", ".", "..", "../up", "a/b", "a\\b"])
def test_a_stage_name_that_is_not_a_folder_name_is_refused(tmp_path, name):
    # A stage writes to <run root>/<name>: ".." or "a/b" would write outside its folder, or into another's.
    folder = _copy_recipe(tmp_path)
    _edit(folder, 'name = "hh_sft"\nconfig', f'name = {json.dumps(name)}\nconfig')
    with pytest.raises(ConfigError, match=re.escape(f"{folder / 'recipe.toml'}: stages[3]: stage name {name!r} is "
                                                    "not a folder name")):
        load_recipe(str(folder))


def test_overrides_reach_tables_and_stages_apart():
    overrides = ["generate.filter.threshold=9", "evaluate.mt_bench.max_new_tokens=5", "optim.lr=0.5",
                 "orca.train.batch_size=3"]
    recipe = load_recipe("openbezoar_tiny", overrides)
    assert recipe.generate.filter.threshold == 9.0 and recipe.evaluate.mt_bench.max_new_tokens == 5
    configs = dict((s.name, c) for s, c in stage_configs(recipe, Path("/r"), overrides))
    assert all(c.optim.lr == 0.5 for c in configs.values())
    assert configs["orca"].train.batch_size == 3 and configs["evol"].train.batch_size == 2
    with pytest.raises(ConfigError, match="unknown key 'generate.filter.cutoff'"):
        load_recipe("openbezoar_tiny", ["generate.filter.cutoff=3"])


def test_a_stage_named_like_a_config_table_leaves_the_table_addressable(tmp_path):
    # openbezoar_tiny names its DPO stage "dpo", as the [dpo] table is named: dpo.beta is the table's key (every
    # stage's), dpo.<section>.<key> the stage's; a key of neither is an error quoting the override as typed.
    overrides = ["dpo.beta=0.2", "dpo.optim.lr=1e-5", "dpo.dpo.label_smoothing=0.1"]
    configs = dict((s.name, c) for s, c in stage_configs(load_recipe("openbezoar_tiny"), Path("/r"), overrides))
    assert all(c.dpo.beta == 0.2 for c in configs.values())
    assert configs["dpo"].optim.lr == 1e-5 and configs["hh_sft"].optim.lr != 1e-5
    assert configs["dpo"].dpo.label_smoothing == 0.1 and configs["hh_sft"].dpo.label_smoothing == 0.0
    with pytest.raises(ConfigError, match=r"^override 'dpo\.bta=0\.2': 'dpo' is both a stage .* dpo\.KEY=VALUE "
                                          r"sets KEY of the \[dpo\] table .* dpo\.SECTION\.KEY=VALUE sets a key of "
                                          r"stage 'dpo'"):
        stage_configs(load_recipe("openbezoar_tiny"), Path("/r"), ["dpo.bta=0.2"])
    # A stage's override that its config refuses is quoted as typed, not as the stage received it.
    for override, key in (["dpo.optim.lr=fast", "optim.lr"], ["orca.optim.betas=[2]", "optim.betas"],
                          ["orca.tokens=3", "tokens"]):
        with pytest.raises(ConfigError, match=re.escape(repr(override))) as e:
            stage_configs(load_recipe("openbezoar_tiny"), Path("/r"), [override])
        assert repr(key) in str(e.value) or key in str(e.value), e.value
    # An override without a dot never addresses a stage, whatever the stages are called.
    folder = _copy_recipe(tmp_path)
    _edit(folder, 'name = "dpo"', 'name = "merge"')
    configs = stage_configs(load_recipe(str(folder)), Path("/r"), ["merge=true", "merge.optim.lr=0.5"])
    assert all(c.merge for _, c in configs) and [c.optim.lr == 0.5 for _, c in configs] == [False] * 4 + [True]


# ---- the command lines match the real parsers ------------------------------------------------------


def _generate_parser():
    from bezoar.generate.__main__ import build_parser

    return build_parser()


def _eval_parser():
    from bezoar.eval.__main__ import _harness_parser, _mt_bench_parser

    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    _harness_parser(sub)
    _mt_bench_parser(sub)
    return p


def test_generate_and_filter_argv_parse(tmp_path):
    overrides = ["generate.lamini.templates={lamini_examples=\"mine.txt\"}", "generate.lamini.temperature=0.9",
                 "generate.evol.limit=3", "generate.orca.caps={niv2=4,t0=2}", "generate.orca.cap_per_task=7",
                 "generate.teacher.rpm=600", "generate.teacher.base_url=[\"http://a:1/v1\",\"http://b:2/v1\"]",
                 "generate.teacher.price=[0.5,1.5]", "generate.judge.api_key_env=MY_JUDGE_KEY",
                 "generate.filter.template=judge.txt", "generate.filter.max_tokens=99"]
    recipe = load_recipe("openbezoar_tiny", overrides)
    gen = recipe.generate
    parser = _generate_parser()
    root = tmp_path / "run"
    args = parser.parse_args(generate_argv("lamini", gen.lamini, gen.teacher, root / "data/lamini", root, False))
    assert args.command == "lamini" and args.per_request == 6 and args.topic_guided == 2
    assert args.template == ["lamini_examples=mine.txt"] and args.temperature == 0.9 and args.no_progress
    assert args.seeds.endswith("assets/samples/lamini_seeds.jsonl") and Path(args.seeds).exists()
    assert args.base_url == ["http://a:1/v1", "http://b:2/v1"] and args.rpm == 600 and args.price == [0.5, 1.5]
    args = parser.parse_args(generate_argv("evol", gen.evol, gen.teacher, root / "data/evol", root, True))
    assert args.command == "evol" and args.epochs == 2 and args.limit == 3 and not args.no_progress
    args = parser.parse_args(generate_argv("orca", gen.orca, gen.teacher, root / "data/orca", root, False))
    assert args.command == "orca" and sorted(args.cap) == ["niv2=4", "t0=2"] and args.cap_per_task == 7
    args = parser.parse_args(filter_argv(gen, root / "data/orca", root, False))
    assert args.command == "filter" and args.threshold == 7.0 and args.input == str(root / "data/orca/raw.jsonl")
    assert args.api_key_env == "MY_JUDGE_KEY" and args.template == ["judge.txt"] and args.max_tokens == 99
    assert args.retry_failed  # an unfinished step resends what its store holds as failures


def test_eval_argv_parse(tmp_path):
    recipe = load_recipe("openbezoar", ["evaluate.harness.limit=0.5", "evaluate.mt_bench.reference=ref.jsonl",
                                        "evaluate.mt_bench.judge.rpm=50", "evaluate.mt_bench.quant=nf4"])
    parser = _eval_parser()
    model = {"model": "/m", "adapter": "/a"}
    args = parser.parse_args(harness_argv(recipe.evaluate.harness, model, tmp_path, tmp_path / "tasks"))
    assert args.preset == "openllm" and args.batch_size == "auto" and args.limit == 0.5 and args.adapter == "/a"
    assert args.output == str(tmp_path / "results.json") and args.include_path == str(tmp_path / "tasks")
    args = parser.parse_args(mt_bench_argv(recipe.evaluate.mt_bench, {"model": "/m"}, "ob-dpo", tmp_path, tmp_path))
    assert args.judge_provider == "anthropic" and args.judge_model == "claude-2.1" and args.rpm == 50
    assert args.questions == "HuggingFaceH4/mt_bench_prompts" and args.quant == "nf4" and args.model_id == "ob-dpo"
    assert args.reference == "ref.jsonl" and args.top_k == 50  # FastChat's (transformers' default top_k)
    recipe = load_recipe("openbezoar", ["evaluate.mt_bench.top_k=0"])
    assert parser.parse_args(mt_bench_argv(recipe.evaluate.mt_bench, {"model": "/m"}, "ob", tmp_path, tmp_path)).top_k == 0
    with pytest.raises(ConfigError, match="top_k"):
        load_recipe("openbezoar", ["evaluate.mt_bench.top_k=-1"])


def test_render_tasks_fills_in_the_folder(tmp_path):
    dest = render_tasks("bezoar:recipes/openbezoar_tiny/tasks", tmp_path, tmp_path / "tasks")
    text = (dest / "tiny_mc.yaml").read_text()
    assert "{here}" not in text and str((TINY / "tasks").resolve()) + "/mc_test.jsonl" in text
    assert sorted(p.name for p in dest.glob("*.yaml")) == ["tiny_gen.yaml", "tiny_mc.yaml", "tiny_ppl.yaml"]


# ---- plan, markers, pre-flight ----------------------------------------------------------------------


def test_plan_of_a_fresh_root_and_a_partial_one(tmp_path):
    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    steps = plan(recipe, root, [])
    names = [s.name for s in steps]
    assert names == ["generate:lamini", "filter:lamini", "generate:orca", "filter:orca", "generate:evol",
                     "filter:evol", "train:lamini", "train:orca", "train:evol", "train:hh_sft", "train:dpo",
                     "harness:dpo", "mt-bench:dpo"]
    assert all(s.status == "to run" for s in steps)
    # Fake progress: lamini generated and filtered, orca's generation half done, lamini trained, orca at a checkpoint.
    for s in steps[:2]:
        write_marker(s, 1.0)
    (root / "data/orca/work").mkdir(parents=True)
    (root / "data/orca/work/responses.jsonl").write_text('{"key": 1}\n{"key": 2}\n')
    (root / "lamini").mkdir()
    (root / "lamini/summary.json").write_text("{}")
    (root / "orca/checkpoints/step-4").mkdir(parents=True)
    (root / "orca/checkpoints/step-4/trainer_state.pt").write_bytes(b"")
    steps = plan(recipe, root, [])
    status = {s.name: s.status for s in steps}
    assert status["generate:lamini"] == status["filter:lamini"] == status["train:lamini"] == "done"
    assert status["generate:orca"] == "resume (2 answers stored)" and status["filter:orca"] == "to run"
    assert status["train:orca"] == "resume from step 4"
    left = describe(steps, root).splitlines()[-1]
    assert left.startswith("steps left: generate:orca (resume (2 answers stored)), filter:orca, generate:evol")
    assert "train:lamini" not in left and "train:orca (resume from step 4)" in left


def test_changed_settings_of_a_done_step_stop_the_run(tmp_path):
    root = tmp_path / "run"
    steps = plan(load_recipe("openbezoar_tiny"), root, [])
    write_marker(steps[1], 1.0)  # filter:lamini, threshold 7
    recipe = load_recipe("openbezoar_tiny", ["generate.filter.threshold=8"])
    steps = plan(recipe, root, [])
    assert steps[1].done and steps[1].changed == ["filter.threshold: 7.0 -> 8.0"]
    with pytest.raises(PipelineError, match=r"filter:lamini is complete .*filter\.threshold: 7\.0 -> 8\.0.*Remove"):
        preflight(recipe, root, steps)
    # Where the endpoints are reached does not matter: a new teacher URL keeps the step done and unchanged.
    recipe = load_recipe("openbezoar_tiny", ["generate.judge.base_url=http://other:1/v1"])
    assert not plan(recipe, root, [])[1].changed


def _fake_trained(root: Path, recipe, overrides: list[str], names: set[str]) -> None:
    """Mark stages complete as run_stage leaves them: config.toml (resolved) and summary.json."""
    from bezoar.config import dump_toml
    from bezoar.train.run import package_path

    for stage, cfg in stage_configs(recipe, root, overrides):
        if stage.name in names:
            cfg.data.path, cfg.eval_path = package_path(cfg.data.path), package_path(cfg.eval_path)
            Path(cfg.out).mkdir(parents=True)
            (Path(cfg.out) / "config.toml").write_text(dump_toml(cfg))
            (Path(cfg.out) / "summary.json").write_text("{}")


def test_changed_training_settings_of_a_done_stage_stop_the_run(tmp_path):
    root = tmp_path / "run"
    recipe = load_recipe("openbezoar_tiny")
    _fake_trained(root, recipe, [], {"lamini", "dpo"})
    for s in plan(recipe, root, [])[:6]:
        write_marker(s, 1.0)
    # The same settings again, or only other progress and checkpoint intervals: done, nothing changed.
    for overrides in ([], ["train.progress=true", "lamini.train.save_every=7", "train.log_every=3"]):
        steps = {s.name: s for s in plan(load_recipe("openbezoar_tiny", overrides), root, overrides)}
        assert steps["train:lamini"].done and steps["train:dpo"].done
        assert not any(s.changed for s in steps.values())
    overrides = ["lamini.optim.lr=0.5", "dpo.dpo.beta=0.3"]
    recipe = load_recipe("openbezoar_tiny", overrides)
    steps = {s.name: s for s in plan(recipe, root, overrides)}
    assert steps["train:lamini"].done and steps["train:lamini"].changed == ["optim.lr: 0.002 -> 0.5"]
    assert steps["train:dpo"].changed == ["dpo.beta: 0.5 -> 0.3"] and not steps["train:orca"].changed
    assert "remove the stage's folder to redo" in describe(list(steps.values()), root)
    with pytest.raises(PipelineError, match=r"train:lamini is complete .*optim\.lr: 0\.002 -> 0\.5.*Remove the "
                                            rf"stage's folder {re.escape(str(root / 'lamini'))}"):
        preflight(recipe, root, list(steps.values()))


def test_a_run_trained_with_bezoar_train_continues_under_the_pipeline(tmp_path, monkeypatch, capsys):
    # Both entry points derive one config per stage: an evaluated stage with merge = false that python -m
    # bezoar.train --recipe trained is done for the pipeline (it was refused as "merge: False -> True"), which
    # evaluates it as its base with its adapter.
    from bezoar.eval import __main__ as eval_cli
    from bezoar.pipeline import main as pipeline_main
    from bezoar.train.__main__ import main as train_main

    folder = tmp_path / "recipe"
    folder.mkdir()
    sft = (RECIPES / "demo" / "sft.toml").read_text()
    (folder / "sft.toml").write_text(sft.replace("merge = true", "merge = false"))
    (folder / "recipe.toml").write_text('description = "one SFT stage that does not merge, evaluated"\n'
                                        '[[stages]]\nname = "sft"\nconfig = "sft.toml"\n'
                                        '[evaluate.harness]\ntasks = ["tiny_mc"]\nlimit = 4\nbuiltin_tasks = false\n'
                                        'include_path = "bezoar:recipes/openbezoar_tiny/tasks"\n')
    root = tmp_path / "run"
    tiny = ["model.path=tiny:tiny", "model.quant=none", "train.max_steps=2", "train.progress=false", "data.limit=16",
            "eval_path="]
    assert train_main(["--recipe", str(folder), "--out", str(root), *tiny]) == 0
    assert not (root / "sft" / "merged").exists()
    steps = {s.name: s for s in plan(load_recipe(str(folder)), root, tiny)}
    assert steps["train:sft"].done and not steps["train:sft"].changed
    assert steps["harness:sft"].inputs == ["sft (base + adapter)"]
    real, calls = eval_cli.main, []
    monkeypatch.setattr(eval_cli, "main", lambda argv: calls.append(argv) or real(argv))
    assert pipeline_main(["--recipe", str(folder), "--out", str(root), *tiny]) == 0, capsys.readouterr().err
    (argv,) = calls
    assert argv[argv.index("--adapter") + 1] == str(root / "sft" / "adapter")
    assert json.loads((root / "eval" / "sft" / "harness" / "results.json").read_text())["results"]["tiny_mc"]
    # In a run root moved since, the adapter is the one there (summary.json names it where it was written).
    root.rename(tmp_path / "moved")
    assert eval_model(tmp_path / "moved", "sft")["adapter"] == str(tmp_path / "moved" / "sft" / "adapter")
    moved = tmp_path / "moved"
    assert eval_model(moved, "sft", start_from="base")["model"] == str(moved / "base" / "merged")


def test_a_moved_or_renamed_run_root_keeps_its_trained_stages(tmp_path, monkeypatch):
    # Stages record their {root} data paths and the merged model they start from as the root was typed: named
    # absolutely after relatively, or moved elsewhere, the root changes no stage's settings.
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("openbezoar_tiny")
    names = {s.name for s in recipe.stages}
    _fake_trained(Path("run"), recipe, [], names)
    for root in (tmp_path / "run", Path("moved"), tmp_path / "moved"):
        if not root.exists():
            (tmp_path / "run").rename(tmp_path / "moved")
        steps = [s for s in plan(recipe, root, []) if s.kind == "train"]
        assert [(s.target, s.status, s.changed) for s in steps] == [(name, "done", []) for name in
                                                                     ("lamini", "orca", "evol", "hh_sft", "dpo")]
    # Another file inside the root is still another setting.
    overrides = [f"lamini.data.path={tmp_path / 'moved' / 'data' / 'orca' / 'filtered.jsonl'}"]
    steps = {s.name: s for s in plan(load_recipe("openbezoar_tiny", overrides), tmp_path / "moved", overrides)}
    assert [c.split(":")[0] for c in steps["train:lamini"].changed] == ["data.path"]


def test_preflight_names_missing_inputs_and_keys(tmp_path, monkeypatch):
    recipe = load_recipe("openbezoar")
    root = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"generate\.lamini\.topics: .*inputs/topics\.txt not found"):
        preflight(recipe, root, plan(recipe, root, []))
    (root / "inputs").mkdir(parents=True)
    (root / "inputs/topics.txt").write_text("gardening\n")
    (root / "inputs/flan.jsonl").write_text(json.dumps({"question": "q", "sub_collection": "cot"}) + "\n")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "set")
    with pytest.raises(ConfigError, match=r"generate\.judge needs an API key .*OPENAI_API_KEY"):
        preflight(recipe, root, plan(recipe, root, []))
    monkeypatch.setenv("OPENAI_API_KEY", "set")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(ConfigError, match=r"evaluate\.mt_bench\.judge needs an API key .*ANTHROPIC_API_KEY"):
        preflight(recipe, root, plan(recipe, root, []))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "  ")  # set by mistake to spaces: the judge step would refuse it
    with pytest.raises(ConfigError, match=r"evaluate\.mt_bench\.judge needs an API key .*ANTHROPIC_API_KEY, which "
                                          r"is empty"):
        preflight(recipe, root, plan(recipe, root, []))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "set")
    preflight(recipe, root, plan(recipe, root, []))


@pytest.mark.parametrize("override, key", [
    ("generate.filter.template={root}/my_judge.txt", "generate.filter.template"),
    ("evaluate.mt_bench.reference={root}/reference.jsonl", "evaluate.mt_bench.reference"),
    ("evaluate.mt_bench.judge_prompts={root}/judge_prompts.jsonl", "evaluate.mt_bench.judge_prompts"),
])
def test_preflight_names_every_missing_input_file(tmp_path, override, key):
    # Not checked, these stopped the run only when their step came: after the teacher's generation, or
    # after every training stage.
    recipe = load_recipe("openbezoar_tiny", [override])
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: {re.escape(str(tmp_path))}/\S+ not found"):
        preflight(recipe, tmp_path, plan(recipe, tmp_path, []))
    name = override.rsplit("/", 1)[1]
    (tmp_path / name).write_text("{}\n")
    preflight(recipe, tmp_path, plan(recipe, tmp_path, []))


def test_dry_run_stops_where_a_run_would(tmp_path, monkeypatch, capsys):
    from bezoar.pipeline import main

    root = tmp_path / "run"
    argv = ["--recipe", "openbezoar", "--out", str(root), "--dry-run"]
    monkeypatch.setenv("OPENAI_API_KEY", "set")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "set")
    # The topic list is missing: a run stops before its first step, so the dry run may not promise the steps.
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "steps left: generate:lamini" in out  # the plan is still shown
    # and its last line says that a run stops first (a finished root's said "a run only rewrites the report")
    assert out.rstrip().splitlines()[-1].endswith("; but a run stops before its first step, on the error below")
    assert "error:" in err and "generate.lamini.topics" in err and "inputs/topics.txt not found" in err
    (root / "inputs").mkdir(parents=True)
    (root / "inputs/topics.txt").write_text("gardening\n")
    (root / "inputs/flan.jsonl").write_text(json.dumps({"question": "q", "sub_collection": "cot"}) + "\n")
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(argv) == 2
    assert "generate.judge needs an API key" in capsys.readouterr().err
    monkeypatch.setenv("OPENAI_API_KEY", "set")
    assert main(argv) == 0
    assert not any(root.glob("data")) and not (root / "report.md").exists()  # a dry run writes nothing


def test_preflight_stage_data_that_nothing_writes(tmp_path):
    recipe = load_recipe("openbezoar_tiny", ["generate.orca.enabled=false"])
    with pytest.raises(ConfigError, match=r"stage orca reads .*data/orca/filtered\.jsonl, which does not exist"):
        preflight(recipe, tmp_path, plan(recipe, tmp_path, []))


def test_one_pipeline_per_run_root(tmp_path):
    from bezoar.pipeline import _lock, run_pipeline

    root = tmp_path / "run"
    root.mkdir()
    held = _lock(root)
    try:
        with pytest.raises(PipelineError, match=rf"another pipeline is running on this run root \(pid {os.getpid()}\)"):
            run_pipeline("openbezoar_tiny", root, [], log=lambda *a: None)
        assert not (root / "report.md").exists() and not (root / "data").exists()  # nothing ran
    finally:
        held.close()


def test_the_plan_is_made_under_the_lock(tmp_path, monkeypatch):
    """The steps are planned once the lock is held (a plan made before could be out of date when the pipeline that
    held it finishes), and a run refused before its first step leaves no run root behind."""
    import bezoar.pipeline as pipeline

    root = tmp_path / "run"
    root.mkdir()
    held = pipeline._lock(root)
    planned = []
    real_plan = pipeline.plan
    monkeypatch.setattr(pipeline, "plan", lambda *a, **kw: planned.append(1) or real_plan(*a, **kw))
    try:
        with pytest.raises(PipelineError, match="another pipeline is running on this run root"):
            pipeline.run_pipeline("openbezoar_tiny", root, [], log=lambda *a: None)
    finally:
        held.close()
    assert planned == [], "no plan while another pipeline holds the run root"

    fresh = tmp_path / "runs" / "new"
    with pytest.raises(ConfigError, match="generate.teacher.model is not set"):
        pipeline.run_pipeline("openbezoar_tiny", fresh, ["generate.teacher.model="], log=lambda *a: None)
    assert planned == [1] and not (tmp_path / "runs").exists(), "refused by preflight: nothing written"


def _lamini_started_at_step_4(tmp_path):
    """A run root whose generation steps are done and whose lamini stage has a checkpoint at step 4 and no
    summary (started, not finished)."""
    root = tmp_path / "run"
    recipe = load_recipe("openbezoar_tiny")
    _fake_trained(root, recipe, [], {"lamini"})
    (root / "lamini" / "summary.json").unlink()
    (root / "lamini" / "checkpoints" / "step-4").mkdir(parents=True)
    (root / "lamini" / "checkpoints" / "step-4" / "trainer_state.pt").write_bytes(b"state")
    for s in plan(recipe, root, [])[:2]:
        write_marker(s, 1.0)
    return root, recipe


def test_a_started_stage_with_changed_settings_stops_before_anything_runs(tmp_path, capsys):
    """A half-trained stage rerun with another lr passed --dry-run as "resume from step 41", started, and stopped
    in the stage with "--resume with a different config", an option neither the pipeline nor a recipe has. Now
    the plan says so, and the run stops before its first step naming the two ways on; a longer max_steps (a
    resumed run may be lengthened) is no change."""
    from bezoar.pipeline import main as pipeline_main
    from bezoar.train.__main__ import main as train_main

    root, recipe = _lamini_started_at_step_4(tmp_path)
    for overrides in ([], ["lamini.train.max_steps=99", "train.log_every=3"]):
        steps = {s.name: s for s in plan(load_recipe("openbezoar_tiny", overrides), root, overrides)}
        assert steps["train:lamini"].status == "resume from step 4" and not steps["train:lamini"].changed
    overrides = ["lamini.optim.lr=0.5"]
    steps = plan(load_recipe("openbezoar_tiny", overrides), root, overrides)
    with pytest.raises(PipelineError) as e:
        preflight(recipe, root, steps)
    assert str(e.value).startswith("step train:lamini has checkpoints (resume from step 4) but the recipe's settings "
                                   "for it changed since it started (optim.lr: ")
    assert f"Put them back to continue it, or remove the stage's folder {root / 'lamini'} to train it from step 0" \
        in str(e.value)
    assert pipeline_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run", *overrides]) == 2
    assert "settings changed since" in capsys.readouterr().out
    # bezoar.train --recipe: the same, in its plan and before its first stage
    assert train_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run", *overrides]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"lamini .*started with other settings \(optim\.lr: .*\): a run stops", out), out
    assert "a run stops at stage lamini" in err
    assert train_main(["--recipe", "openbezoar_tiny", "--out", str(root), *overrides]) == 2
    err = capsys.readouterr().err
    assert "this stage was started (checkpoints up to step 4) with other settings (optim.lr: " in err, err
    assert train_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run"]) == 0


def test_pipeline_command_line_flags_between_overrides_a_missing_root_and_ctrl_c(tmp_path, capsys, monkeypatch):
    """scripts/openbezoar.sh puts its own overrides before the user's: `--out X k=v` after them stopped with
    "unrecognized arguments"; --report-only on a mistyped root made the folder and a report of nothing, exit 0;
    a Ctrl-C outside a step that stops on its own ended in a traceback."""
    import bezoar.pipeline as pipeline
    from bezoar.eval import __main__ as eval_main

    args = pipeline.parse(["a=1", "--recipe", "openbezoar_tiny", "--out", "r", "b=2", "--dry-run", "c=3"])
    assert (args.overrides, args.out, args.dry_run) == (["a=1", "b=2", "c=3"], "r", True)
    missing = tmp_path / "nonexist"
    assert pipeline.main(["--recipe", "openbezoar_tiny", "--out", str(missing), "--report-only"]) == 2
    assert f"--out {missing}: no such run root" in capsys.readouterr().err and not missing.exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run_pipeline", interrupted)
    assert pipeline.main(["--recipe", "openbezoar_tiny", "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == ("bezoar.pipeline: interrupted; rerun the same command to continue from what is "
                                       "stored\n")
    with pytest.raises(KeyboardInterrupt):  # a command's exit 130 inside the pipeline stops it as interrupted
        pipeline._call(lambda argv: 130, [], "generate:lamini")

    def command_interrupted(*a, **k):  # the command said so itself: no second line
        raise KeyboardInterrupt("generate:lamini")

    monkeypatch.setattr(pipeline, "run_pipeline", command_interrupted)
    assert pipeline.main(["--recipe", "openbezoar_tiny", "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(eval_main, "run_harness", interrupted)
    assert eval_main.main(["harness", "--tasks", "x", "--dry-run"]) == 130
    assert "bezoar.eval harness: interrupted; rerun the same command" in capsys.readouterr().err


def test_a_started_stage_shortened_below_its_last_checkpoint_stops_before_anything_runs(tmp_path, capsys):
    """max_steps below a started stage's last checkpoint passed the plan and preflight (its length may change on a
    resume), and the run stopped only at that stage's start. Now the plan, the pipeline's preflight and
    bezoar.train --recipe say so before the first step; max_steps at the checkpoint's step or above still resumes."""
    from bezoar.pipeline import main as pipeline_main
    from bezoar.train.__main__ import main as train_main

    root, recipe = _lamini_started_at_step_4(tmp_path)
    for overrides in (["lamini.train.max_steps=4"], ["lamini.train.max_steps=0"]):
        preflight(recipe, root, plan(load_recipe("openbezoar_tiny", overrides), root, overrides))  # no error
    overrides = ["lamini.train.max_steps=3"]
    with pytest.raises(PipelineError) as e:
        preflight(recipe, root, plan(load_recipe("openbezoar_tiny", overrides), root, overrides))
    assert str(e.value).startswith("step train:lamini: train.max_steps=3: ") and "is at step 4 already" in str(e.value)
    assert pipeline_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run", *overrides]) == 2
    assert "is at step 4 already" in capsys.readouterr().err
    assert train_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run", *overrides]) == 2
    out, err = capsys.readouterr()
    assert re.search(r"lamini .*checkpoints up to step 4, past train\.max_steps=3: a run stops", out), out
    assert train_main(["--recipe", "openbezoar_tiny", "--out", str(root), *overrides]) == 2
    assert "train.max_steps=3: " in capsys.readouterr().err


@pytest.mark.parametrize("override, says", [
    ("generate.evol.epochs=0", "table 'generate.evol': epochs must be at least 1, got 0"),
    ("generate.lamini.similarity=3", "table 'generate.lamini': similarity must be in (0, 1], got 3"),
    ("generate.orca.temperature=5", "table 'generate.orca': temperature must be in [0, 2], got 5"),
    ("evaluate.harness.limit=-1", "table 'evaluate.harness': limit must be a whole number of examples"),
    ("evaluate.harness.num_fewshot=-1", "table 'evaluate.harness': num_fewshot must be at least 0"),
    ("evaluate.mt_bench.max_new_tokens=0", "table 'evaluate.mt_bench': max_new_tokens must be at least 1"),
    ('evaluate.harness.tasks=["tiny_mcc","tiny_gen"]', "evaluate.harness: unknown task(s) tiny_mcc"),
    ("evaluate.harness.gen_kwargs=top_k=-1", "evaluate.harness: gen_kwargs top_k must be an integer"),
    ("evaluate.harness.batch_size=0", "table 'evaluate.harness': batch_size must be at least 1"),
    ("evaluate.harness.limit=2.5", "table 'evaluate.harness': limit must be a whole number"),
])
def test_scheme_and_evaluation_settings_are_checked_before_the_first_step(tmp_path, capsys, override, says):
    """Scheme and evaluation values were checked only when their step ran: evol's epochs=0 after lamini and
    orca had been generated (and paid for), a misspelt harness task after every stage had trained."""
    from bezoar.pipeline import main as pipeline_main

    root = tmp_path / "run"
    assert pipeline_main(["--recipe", "openbezoar_tiny", "--out", str(root), "--dry-run", override]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err
    assert not root.exists()


def test_the_harness_settings_check_leaves_logging_alone_and_accepts_what_the_step_accepts(tmp_path, capsys):
    """The preflight's harness check first ran the harness command with its output captured: its logging set-up
    then sent every later warning of the run into that capture, and an argparse refusal (a preset typo) ended
    the run with exit 2 and no message. It now runs the checks themselves. Batch sizes the harness takes
    ("auto:4", "16") pass the recipe's own check."""
    import logging

    from bezoar.pipeline import check_harness_tasks, main as pipeline_main
    from bezoar.train.recipe import HarnessSection

    root = logging.getLogger()
    before = list(root.handlers)
    for size in ("auto:4", "16", 8, "auto"):
        section = HarnessSection(tasks=["tiny_mc"], include_path="bezoar:recipes/openbezoar_tiny/tasks",
                                 builtin_tasks=False, batch_size=size)
        check_harness_tasks(section, tmp_path)
    assert root.handlers == before
    with pytest.raises(ConfigError, match="evaluate.harness: unknown preset 'OpenLLM'"):
        check_harness_tasks(HarnessSection(preset="OpenLLM", builtin_tasks=False,
                                           include_path="bezoar:recipes/openbezoar_tiny/tasks"), tmp_path)
    assert pipeline_main(["--recipe", "openbezoar_tiny", "--out", str(tmp_path / "r"), "--dry-run",
                          'evaluate.harness.batch_size="auto:4"']) == 0
    assert root.handlers == before
