"""python -m bezoar.train: flags and values that do not fit are refused with one message, before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bezoar.train.__main__ import main
from tests.train.helpers import DEMO

TINY = ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", "data.max_seq_len=128", "lora.r=4",
        "eval_path=", "merge=false", "train.max_steps=1"]


@pytest.mark.parametrize("flag", [["--dry-run"], ["--out", "elsewhere"]])
def test_recipe_only_flags_with_a_stage_config_are_refused(tmp_path, capsys, flag):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([str(DEMO / "sft.toml"), f"out={out}", *TINY, *flag])
    assert e.value.code == 2
    assert flag[0] in capsys.readouterr().err
    assert not out.exists(), "nothing may run"


@pytest.mark.parametrize("override, key", [
    ("train.grad_accum=0", "train.grad_accum"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=0 train.epochs=-1", "train.epochs"),
    ("train.max_steps=0 train.epochs=inf", "train.epochs"),  # passed the check, then an OverflowError
    ("train.save_every=-1", "train.save_every"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.warmup_ratio=2", "optim.warmup_ratio"),
    ("model.device=gpu", "model.device"),
])
def test_bad_values_are_config_errors_naming_the_key(tmp_path, capsys, override, key):
    out = tmp_path / "run"
    code = main([str(DEMO / "sft.toml"), f"out={out}", *TINY, *override.split()])
    err = capsys.readouterr().err
    assert code == 2 and key in err and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("overrides, culprit", [
    (["train.progress=false", "train.grad_accum=0"], "train.grad_accum=0"),
    (["optim.lr=1e-3", "optim.betas=[0.9]"], "optim.betas=[0.9]"),
    (["lora.alpha=8", "lora.targets=['nope']"], "lora.targets=['nope']"),  # TINY's lora.r=4 is set first
])
def test_a_bad_value_is_blamed_on_its_own_override(tmp_path, capsys, overrides, culprit):
    code = main([str(DEMO / "sft.toml"), f"out={tmp_path / 'run'}", *TINY, *overrides])
    err = capsys.readouterr().err
    assert code == 2 and f"command-line override {culprit!r}" in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_config_error(tmp_path, capsys):
    code = main([str(DEMO / "sft.toml"), f"out={tmp_path / 'run'}", *TINY, "model.device=cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "model.device" in err, err


def test_batch_size_that_cannot_hold_whole_pairs_is_a_config_error(tmp_path, capsys):
    # Unpacked DPO rows come two per pair (chosen, rejected): an odd batch cannot hold whole pairs.
    out = tmp_path / "run"
    code = main([str(DEMO / "dpo.toml"), f"out={out}", *TINY, "data.packed=false", "train.batch_size=3",
                 "dpo.precompute_ref=false"])
    err = capsys.readouterr().err
    assert code == 2 and "train.batch_size" in err and "Traceback" not in err, err


@pytest.mark.parametrize("fmt", ["hh_pairs", "pairs"])
def test_sft_stage_on_preference_pairs_is_refused(tmp_path, capsys, fmt):
    # SFT on pair data trained every pair as two examples: the rejected responses too, as targets to imitate.
    data = "bezoar:recipes/openbezoar_tiny/hh_rlhf.jsonl" if fmt == "hh_pairs" else "bezoar:assets/demo/dpo.jsonl"
    out = tmp_path / "run"
    code = main([str(DEMO / "sft.toml"), f"out={out}", *TINY, f"data.path={data}", f"data.format={fmt}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.format" in err and "rejected" in err and "Traceback" not in err, err
    assert not out.exists(), "nothing may run"


def test_merge_onto_an_nf4_checkpoint_is_refused_before_training(tmp_path, tiny_dir):
    from bezoar.quantize import quantize

    nf4 = quantize(tiny_dir, tmp_path / "nf4")
    out = tmp_path / "run"
    from bezoar.config import ConfigError
    from bezoar.train.run import run_stage
    from tests.train.helpers import tiny_sft_config

    cfg = tiny_sft_config(out, f"model.path={nf4}", "merge=true", "train.max_steps=2")
    with pytest.raises(ConfigError, match="merge") as e:
        run_stage(cfg, log=lambda *a: None)
    assert str(nf4) in str(e.value)
    assert not (out / "metrics.jsonl").exists() and not (out / "adapter").exists(), "no step may run first"


def _finished_demo_run(root: Path) -> Path:
    """The demo recipe's stages under ``root`` as run_stage leaves them finished (config.toml, summary.json)."""
    from bezoar.config import dump_toml
    from bezoar.train.recipe import load_recipe, stage_configs
    from bezoar.train.run import package_path

    for _, cfg in stage_configs(load_recipe("demo"), root, []):
        cfg.data.path, cfg.eval_path = package_path(cfg.data.path), package_path(cfg.eval_path)
        Path(cfg.out).mkdir(parents=True)
        (Path(cfg.out) / "config.toml").write_text(dump_toml(cfg))
        (Path(cfg.out) / "summary.json").write_text("{}")
    return root


def test_recipe_rerun_with_other_settings_for_a_complete_stage_is_refused(tmp_path, capsys):
    root = _finished_demo_run(tmp_path / "run")
    assert main(["--recipe", "demo", "--out", str(root), "train.progress=false"]) == 0
    assert "[dpo] done already" in capsys.readouterr().out
    code = main(["--recipe", "demo", "--out", str(root), "dpo.optim.lr=0.5"])
    err = capsys.readouterr().err
    assert code == 2 and f"{root / 'dpo'}: this stage is complete" in err and "optim.lr: 0.003 -> 0.5" in err, err
    assert "Traceback" not in err


def test_a_recipe_run_root_named_otherwise_or_moved_keeps_its_stages(tmp_path, capsys, monkeypatch):
    # A stage records model.path = <root>/sft/merged as the root was typed: the same root named absolutely
    # after relatively, or moved, is no change of settings, for a finished stage and a half-finished one.
    from bezoar.config import ConfigError
    from bezoar.train.recipe import load_recipe, stage_configs
    from bezoar.train.run import check_run_dir

    monkeypatch.chdir(tmp_path)
    _finished_demo_run(Path("run"))
    assert main(["--recipe", "demo", "--out", str(tmp_path / "run"), "train.progress=false"]) == 0
    assert "[dpo] done already" in capsys.readouterr().out
    (tmp_path / "run").rename(tmp_path / "moved")
    root = tmp_path / "moved"
    assert main(["--recipe", "demo", "--out", "moved", "--dry-run"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    status = {words[0]: words[2] for words in lines}
    assert status == {"sft": "done", "dpo": "done"}, status
    # Half-finished: the resume is let through (it stops later only because this fake stage has no model).
    (root / "dpo" / "summary.json").unlink()
    (root / "dpo" / "checkpoints" / "step-1").mkdir(parents=True)
    (root / "dpo" / "checkpoints" / "step-1" / "trainer_state.pt").write_bytes(b"")
    code = main(["--recipe", "demo", "--out", str(root), "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "different config" not in err and f"{root / 'sft' / 'merged'}" in err, err
    # A real change of a path inside the root is still one.
    _, dpo = stage_configs(load_recipe("demo"), root, [f"dpo.data.path={root / 'other.jsonl'}"])[1]
    with pytest.raises(ConfigError, match="--resume with a different config \\(data.path\\)"):
        check_run_dir(root / "dpo", dpo, resume=True, root=root)


def _record_started_on_sft(root: Path) -> None:
    """dpo's INPUTS as a run that started on sft's current merged model writes it."""
    from bezoar.fingerprint import fingerprint

    (root / "dpo" / "inputs.json").write_text(json.dumps({"base_summary": fingerprint(root / "sft" / "summary.json")}))


def _dry_run_status(root: Path, capsys) -> dict[str, str]:
    code = main(["--recipe", "demo", "--out", str(root), "--dry-run"])
    run = capsys.readouterr()
    lines = [line.split(None, 2) for line in run.out.splitlines() if line.startswith("  ")]
    status = {words[0]: words[2] for words in lines}
    # exit 2 where a stage's line says a run stops (as the pipeline's dry run), naming the first such stage
    stops = [name for name, text in status.items() if "a run stops" in text]
    assert code == (2 if stops else 0), (code, status)
    assert (f"a run stops at stage {stops[0]}" in run.err) if stops else run.err == ""
    return status


@pytest.mark.parametrize("complete", [True, False])
def test_a_recipe_stage_whose_base_stage_was_trained_again_is_refused(tmp_path, capsys, complete):
    """dpo starts from sft's merged model. Retrained, sft writes a new summary.json: a dpo stage that started on
    the old one went on before (resumed from its checkpoints, or skipped as done) as if nothing had changed."""
    root = _finished_demo_run(tmp_path / "run")
    (root / "sft" / "merged").mkdir()
    if not complete:
        (root / "dpo" / "summary.json").unlink()
        (root / "dpo" / "checkpoints" / "step-1").mkdir(parents=True)
        (root / "dpo" / "checkpoints" / "step-1" / "trainer_state.pt").write_bytes(b"")
    _record_started_on_sft(root)
    # The same base: done is done, and checkpoints resume (this fake stage then stops for want of a model).
    code = main(["--recipe", "demo", "--out", str(root), "train.progress=false"])
    out, err = capsys.readouterr()
    if complete:
        assert code == 0 and "[dpo] done already" in out, err
    else:
        assert code == 2 and "trained again" not in err and f"{root / 'sft' / 'merged'}" in err, err
    # sft trained again: its summary is another file now.
    (root / "sft" / "summary.json").write_text('{"seconds": 12}')
    what = "complete" if complete else "has checkpoints (step 1)"
    assert _dry_run_status(root, capsys)["dpo"].startswith("done on another base" if complete else
                                                           "checkpoints on another base")
    code = main(["--recipe", "demo", "--out", str(root), "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and f"{root / 'dpo'}: this stage {'is ' if complete else ''}{what}" in err, err
    assert f"{root / 'sft'}) was trained again" in err and f"remove the folder {root / 'dpo'}" in err, err
    if not complete:  # `python -m bezoar.train dpo.toml --resume` (no recipe) is refused as well
        from bezoar.config import ConfigError
        from bezoar.train.recipe import load_recipe, stage_configs
        from bezoar.train.run import check_run_dir

        _, dpo = stage_configs(load_recipe("demo"), root, [])[1]
        with pytest.raises(ConfigError, match="has checkpoints \\(step 1\\), but its base model .* cannot resume"):
            check_run_dir(root / "dpo", dpo, resume=True, root=root)
    # A stage started before stages recorded their base (no inputs.json) goes on as before.
    (root / "dpo" / "inputs.json").unlink()
    assert _dry_run_status(root, capsys)["dpo"].startswith("done" if complete else "resume from step 1")


def test_a_recipe_that_would_retrain_the_base_of_a_started_stage_is_refused_before_it_runs(tmp_path, capsys):
    """sft's folder lost its summary (being retrained from scratch, say) while dpo, which starts from its merged
    model, is complete: the run would train sft again and then skip dpo as done on the old model."""
    root = _finished_demo_run(tmp_path / "run")
    (root / "sft" / "summary.json").unlink()
    before = sorted(p.name for p in (root / "sft").iterdir())
    code = main(["--recipe", "demo", "--out", str(root), "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "stage 'dpo' is complete, but it starts from the merged model of stage 'sft', which this " \
                         "run trains first" in err and f"remove the folder {root / 'dpo'} as well" in err, err
    assert sorted(p.name for p in (root / "sft").iterdir()) == before, "nothing may run before the refusal"
    assert _dry_run_status(root, capsys)["dpo"].startswith("done on another base (stage 'dpo' is complete")


@pytest.mark.parametrize("override", ["out={elsewhere}", "sft.out={elsewhere}", "dpo.model.path={elsewhere}"])
def test_recipe_overrides_of_the_keys_it_sets_itself_are_refused(tmp_path, capsys, override):
    # A recipe puts each stage in <root>/<stage> and starts a start_from stage from the merge before it: an
    # override of those keys would be dropped without a word (the demo writing into runs/demo, not out=).
    override = override.format(elsewhere=tmp_path / "elsewhere")
    code = main(["--recipe", "demo", "--out", str(tmp_path / "run"), "--dry-run", override])
    err = capsys.readouterr().err
    assert code == 2 and repr(override) in err and "Traceback" not in err, err
    assert not (tmp_path / "elsewhere").exists()


def test_recipe_dry_run_refuses_or_flags_what_the_run_would_refuse(tmp_path, capsys):
    root = _finished_demo_run(tmp_path / "run")
    # The run stops at the finished dpo stage trained with another lr: the plan must not just say "done".
    assert main(["--recipe", "demo", "--out", str(root), "--dry-run", "dpo.optim.lr=0.5"]) == 2
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "optim.lr: 0.003 -> 0.5" in lines["dpo"] and "optim.lr" not in lines["sft"], lines
    # generate.* overrides are checked by the run (load_recipe), so by the dry run too.
    code = main(["--recipe", "demo", "--out", str(root), "--dry-run", "generate.teacher.model=5"])
    err = capsys.readouterr().err
    assert code == 2 and "generate.teacher.model" in err, err


def test_the_dpo_table_of_a_recipe_with_a_stage_named_dpo_is_set_on_the_command_line(tmp_path, capsys):
    # The demo's DPO stage is named "dpo", like the [dpo] table: dpo.beta=0.2 is that table's beta (it was read
    # as stage dpo's key "beta", unknown). Every stage gets it; the finished SFT stage, which reads nothing of
    # [dpo], is not changed by it, the finished DPO stage is.
    root = _finished_demo_run(tmp_path / "run")
    assert main(["--recipe", "demo", "--out", str(root), "--dry-run", "dpo.beta=0.2"]) == 2  # dpo: a run stops
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert lines["sft"].split()[2] == "done" and "dpo.beta: 0.5 -> 0.2" in lines["dpo"], lines
    code = main(["--recipe", "demo", "--out", str(root), "--dry-run", "dpo.betta=0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "override 'dpo.betta=0.2'" in err and "dpo.dpo.beta" in err, err


def test_unknown_tiny_preset_is_a_config_error_naming_model_path(tmp_path, capsys):
    code = main([str(DEMO / "sft.toml"), f"out={tmp_path / 'x'}", *TINY, "model.path=tiny:tinyy"])
    err = capsys.readouterr().err
    assert code == 2 and "model.path 'tiny:tinyy'" in err and "tiny-odd" in err, err


def test_a_stage_folder_is_trained_by_one_run_at_a_time(tmp_path, capsys, monkeypatch):
    """OUT/train.lock is held while a stage trains: a second run into the folder (a --resume started while the
    first still runs, or workers a killed torchrun left behind) stops with one error naming the holder's pid,
    before it reads or writes anything else there."""
    import os

    from bezoar.config import ConfigError
    from bezoar.train import run
    from bezoar.train.loop import Trainer

    out = tmp_path / "run"
    holder = run.hold_out(out)
    try:
        code = main([str(DEMO / "sft.toml"), f"out={out}", *TINY])
        err = capsys.readouterr().err
        assert code == 2 and f"{out}: another bezoar.train (pid {os.getpid()}) is training into this folder" in err, err
        assert sorted(p.name for p in out.iterdir()) == ["train.lock"]
    finally:
        holder.close()

    seen = []
    real_fit = Trainer.fit

    def fit(self):  # while the run trains, its folder is locked
        with pytest.raises(ConfigError, match=rf"another bezoar.train \(pid {os.getpid()}\)"):
            run.hold_out(out)
        seen.append(True)
        return real_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit)
    assert main([str(DEMO / "sft.toml"), f"out={out}", *TINY]) == 0
    assert seen == [True] and (out / "summary.json").exists()
    run.hold_out(out).close()  # released when the run ends

    other = tmp_path / "refused"  # refused before writing anything: no folder left behind
    assert main([str(DEMO / "sft.toml"), f"out={other}", *TINY, f"data.path={tmp_path / 'missing.jsonl'}"]) == 2
    assert not other.exists()


def test_flags_may_sit_between_the_overrides():
    """`python -m bezoar.train s.toml out=x --resume train.max_steps=2` stopped with "unrecognized arguments"."""
    from bezoar.train.__main__ import parse

    _, args = parse(["s.toml", "out=x", "--resume", "train.max_steps=2"])
    assert (args.config, args.overrides, args.resume) == ("s.toml", ["out=x", "train.max_steps=2"], True)
    _, args = parse(["out=x", "--resume", "a=1"])  # the demo's overrides
    assert (args.config, args.overrides, args.resume) == (None, ["out=x", "a=1"], True)


@pytest.mark.parametrize("device, message", [
    ("foo", r"device 'foo': not a device torch knows"),
    ("cuda:7", r"device 'cuda:7': this machine has (no CUDA device|\d+ CUDA device)"),
])
def test_a_device_the_machine_lacks_is_one_error_in_every_loader(tmp_path, capsys, device, message):
    """merge, quantize, serve and mt-bench load through bezoar.model.load: --device cuda on a machine without
    CUDA (or a name torch does not know) ended in a traceback from the first copy."""
    from bezoar.model import CheckpointError, load
    from bezoar.model.tiny import build_tiny_model
    from bezoar.quantize import main as quantize_main

    folder = build_tiny_model("tiny")
    with pytest.raises(CheckpointError, match=message):
        load(folder, device=device)
    out = tmp_path / "q"
    assert quantize_main(["--model", str(folder), "--out", str(out), "--device", device]) == 2
    assert "device" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("root, hint", [(None, "continue with --resume"),
                                        ("run", "rerun the same command to continue from it")])
def test_a_stopped_stage_says_how_its_own_command_goes_on(tmp_path, monkeypatch, root, hint):
    """A stage of a recipe or the pipeline, stopped by Ctrl-C, said "continue with --resume", an option neither has."""
    import bezoar.train.run as run
    from tests.train.helpers import tiny_sft_config

    seen = []

    class Stopped(Exception):
        pass

    def fit(self):
        seen.append(self.resume_hint)
        raise Stopped

    monkeypatch.setattr(run.Trainer, "fit", fit)
    cfg = tiny_sft_config(tmp_path / "out", "train.max_steps=1")
    with pytest.raises(Stopped):
        run.run_stage(cfg, log=lambda *a: None, root=tmp_path / root if root else None)
    assert seen == [hint]


def test_an_out_under_a_file_is_one_error_before_anything_loads(tmp_path, capsys):
    """out= (or merge --out) below a file ended in a NotADirectoryError traceback; merge's only after the merge."""
    from bezoar.merge import main as merge_main

    blocker = tmp_path / "a_file"
    blocker.write_text("mine\n")
    code = main([str(DEMO / "sft.toml"), f"out={blocker / 'sub'}", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and f"out={blocker / 'sub'}: cannot make the folder (Not a directory" in err, err
    code = merge_main(["--model", str(tmp_path), "--adapter", str(tmp_path), "--out", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and f"{blocker / 'sub'}: cannot be made, {blocker} is a file" in err, err
    assert blocker.read_text() == "mine\n"


def test_a_file_as_model_path_is_named_as_a_file(tmp_path, capsys):
    """model.path naming a file said "no such folder"."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    code = main([str(DEMO / "sft.toml"), f"out={tmp_path / 'run'}", *TINY, f"model.path={weights}"])
    err = capsys.readouterr().err
    assert code == 2 and f"model.path {str(weights)!r}: is a file, not a folder" in err, err


@pytest.mark.parametrize("env, value, says", [
    ("BEZOAR_KERNELS", "bogus", "BEZOAR_KERNELS='bogus': expected one of auto, triton, torch"),
    ("BEZOAR_NF4_GEMV_MAX_M", "abc", "BEZOAR_NF4_GEMV_MAX_M='abc': expected an integer"),
    ("BEZOAR_NF4_GEMV_PDL", "2", "BEZOAR_NF4_GEMV_PDL: expected 0 or 1"),
    ("BEZOAR_NF4_DEQUANT_CACHE", "yes", "BEZOAR_NF4_DEQUANT_CACHE: expected 0 or 1"),
    ("BEZOAR_LORA_WAVES", "false", "BEZOAR_LORA_WAVES: expected 0 or 1"),  # was read as "on", unchecked
    ("BEZOAR_PACKED_ATTENTION", "fast", "BEZOAR_PACKED_ATTENTION='fast'"),
    ("BEZOAR_DECODE_ATTENTION", "fast", "BEZOAR_DECODE_ATTENTION='fast'"),
    ("BEZOAR_NORM_LORA_PROGRAMS", "x", "BEZOAR_NORM_LORA_PROGRAMS='x'"),
    ("BEZOAR_LORA_LARGE_M_PATH", "fast", "BEZOAR_LORA_LARGE_M_PATH='fast'"),
    ("BEZOAR_LORA_CONCAT_ALIGN", "7", "BEZOAR_LORA_CONCAT_ALIGN='7'"),
    ("BEZOAR_TUNING", "/no/such/tuning.json", "/no/such/tuning.json: no such tuning file"),
])
def test_a_bad_kernel_setting_in_the_environment_stops_every_command_at_its_start(tmp_path, capsys, monkeypatch,
                                                                                   env, value, says):
    """BEZOAR_KERNELS=bogus was ignored by train (its config sets the backend) and made every serve request a
    500; a bad threshold failed inside the first training step, after the model and data had loaded."""
    from bezoar.eval.__main__ import main as eval_main
    from bezoar.pipeline import main as pipeline_main
    from bezoar.quantize import main as quantize_main
    from bezoar.serve import main as serve_main

    monkeypatch.setenv(env, value)
    out = tmp_path / "run"
    assert main([str(DEMO / "sft.toml"), f"out={out}", *TINY]) == 2
    assert says in capsys.readouterr().err and not out.exists()
    for command in (lambda: serve_main(["--model", str(tmp_path), "--port", "0"]),
                    lambda: eval_main(["lm-eval", "--help"]),
                    lambda: eval_main(["harness", "--tasks", "x", "--dry-run"]),
                    lambda: pipeline_main(["--recipe", "openbezoar_tiny", "--out", str(out), "--dry-run"]),
                    lambda: quantize_main(["--model", str(tmp_path), "--out", str(out)])):
        assert command() == 2
        assert says in capsys.readouterr().err
