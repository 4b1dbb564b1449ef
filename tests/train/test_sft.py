"""SFT through the real loop: packing is exact, resume is bitwise, bad input is named, the demo learns."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bezoar.data import build_documents, make_loader
from bezoar.model import Tokenizer
from bezoar.train.loop import Trainer, TrainingError, list_checkpoints
from bezoar.train.run import build_model, package_path, run_stage
from bezoar.train.sft import SFTStage
from tests.train.helpers import paused_train_script, read_metrics, repo_env, run_cli, tiny_sft_config


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_loss_and_grads_equal_one_by_one(tmp_path):
    cfg = tiny_sft_config(tmp_path / "x", "lora.dropout=0.0")
    cfg.data.path = package_path(cfg.data.path)
    torch.manual_seed(0)
    model, path = build_model(cfg, torch.device("cpu"))
    with torch.no_grad():  # B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    tok = Tokenizer(path)
    docs, _ = build_documents(dataclasses.replace(cfg.data, limit=12), tok)
    packed = next(iter(make_loader(docs, cfg.data, tok, batch_size=64, shuffle=False)))
    assert packed["input_ids"].shape[0] < 12, "the 12 examples must share rows"
    stage = SFTStage()
    model.train()
    loss_packed, _ = stage.loss(model, packed)
    loss_packed.backward()
    g_packed = grads_of(model)
    model.zero_grad()
    single_cfg = dataclasses.replace(cfg.data, packed=False)
    total = 0.0
    for batch in make_loader(docs, single_cfg, tok, batch_size=1, shuffle=False):
        loss, _ = stage.loss(model, batch)
        loss.backward()
        total += float(loss.detach())
    assert abs(float(loss_packed.detach()) - total) <= 1e-5 * abs(total)
    g_single = grads_of(model)
    assert g_packed.keys() == g_single.keys() and g_packed
    for n in g_packed:
        err = (g_packed[n] - g_single[n]).abs().max() / g_single[n].abs().max().clamp_min(1e-12)
        assert err <= 1e-5, f"{n}: relative gradient error {err:.2e}"


def _state_equal(a: Path, b: Path):
    wa, wb = load_file(a / "adapter" / "adapter_model.safetensors"), load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"adapter tensor {k} differs"
    sa = torch.load(a / "trainer_state.pt", weights_only=False)
    sb = torch.load(b / "trainer_state.pt", weights_only=False)
    assert sa["step"] == sb["step"] and sa["data"] == sb["data"]
    for pid, st in sa["optimizer"]["state"].items():
        for key, t in st.items():
            assert torch.equal(t, sb["optimizer"]["state"][pid][key]), f"optimizer state {pid}/{key} differs"


def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    common = ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", "data.max_seq_len=128",
              "train.batch_size=4", "lora.r=4", "lora.dropout=0.1", "eval_path=", "merge=false",
              "train.max_steps=8", "train.save_every=3", "train.keep_last=5", "optim.lr=1e-3"]
    config = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "sft.toml"
    straight = tmp_path / "straight"
    r = run_cli(config, f"out={straight}", *common)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    # Killed between checkpoints: the run stops after step 4 is logged (before step 5 starts) and is killed there.
    proc = subprocess.Popen([sys.executable, str(paused_train_script(tmp_path)), "4", str(config), f"out={killed}",
                             *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=repo_env())
    try:
        deadline = time.time() + 300
        while not ((killed / "metrics.jsonl").exists() and any(m["step"] >= 4 for m in read_metrics(killed))):
            assert proc.poll() is None, "the run ended before step 4"
            assert time.time() < deadline, "step 4 not logged within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [m["step"] for m in read_metrics(killed)] == [1, 2, 3, 4]
    assert [s for s, _ in list_checkpoints(killed)] == [3], "the kill must land between checkpoints 3 and 6"
    r = run_cli(config, f"out={killed}", *common, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    _state_equal(straight / "checkpoints" / "step-8", killed / "checkpoints" / "step-8")
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_metrics(straight), read_metrics(killed)
    assert [m["step"] for m in mb] == [m["step"] for m in ma], "metrics.jsonl must hold each step once"
    assert [m["loss"] for m in mb] == [m["loss"] for m in ma]


def test_sigterm_writes_a_checkpoint_and_resume_finishes(tmp_path):
    config = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "sft.toml"
    out = tmp_path / "run"
    args = [str(config), f"out={out}", "model.path=tiny:tiny", "model.quant=none", "train.progress=false",
            "data.max_seq_len=128", "train.batch_size=4", "lora.r=4", "eval_path=", "merge=false",
            "train.max_steps=200", "train.save_every=0"]
    proc = subprocess.Popen([sys.executable, "-m", "bezoar.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and read_metrics(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and "continue with --resume" in stdout
    r = run_cli(*args, "train.max_steps=" + str(ckpts[0][0] + 2), "--resume")
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists()


class NaNAfter(SFTStage):
    def __init__(self, step):
        self.calls, self.step = 0, step

    def loss(self, model, batch):
        self.calls += 1
        loss, m = super().loss(model, batch)
        return (loss * float("nan") if self.calls >= self.step else loss), m


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    cfg = tiny_sft_config(tmp_path / "nan", "train.max_steps=10", "train.save_every=2")
    cfg.data.path = package_path(cfg.data.path)
    model, path = build_model(cfg, torch.device("cpu"))
    tok = Tokenizer(path)
    docs, _ = build_documents(cfg.data, tok)
    loader = make_loader(docs, cfg.data, tok, cfg.train.batch_size)
    trainer = Trainer(model, NaNAfter(5), loader, cfg.train, cfg.optim, Path(cfg.out))
    with pytest.raises(TrainingError) as e:
        trainer.fit()
    msg = str(e.value)
    assert "non-finite loss at step 5" in msg and "step-4" in msg
    assert [s for s, _ in list_checkpoints(Path(cfg.out))] == [2, 4]
    assert not (Path(cfg.out) / "adapter").exists()


def test_bad_inputs_are_named_and_nothing_is_damaged(tmp_path):
    config = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "sft.toml"
    good = tmp_path / "good"
    common = ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", "data.max_seq_len=128",
              "lora.r=4", "eval_path=", "merge=false", "train.max_steps=2"]
    r = run_cli(config, f"out={good}", *common)
    assert r.returncode == 0, r.stderr
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "broken"\n')
    r = run_cli(config, f"out={tmp_path / 'x1'}", *common, f"data.path={data}")
    assert r.returncode == 2 and f"{data}:2" in r.stderr and "Traceback" not in r.stderr

    data.write_text('{"instruction": "a", "response": "b"}\n{"question": "no response field"}\n')
    r = run_cli(config, f"out={tmp_path / 'x2'}", *common, f"data.path={data}")
    assert r.returncode == 2 and f"{data}:2" in r.stderr and "Traceback" not in r.stderr

    data.write_text("")
    r = run_cli(config, f"out={tmp_path / 'x3'}", *common, f"data.path={data}")
    assert r.returncode == 2 and str(data) in r.stderr and "empty" in r.stderr.lower()

    r = run_cli(config, f"out={tmp_path / 'x4'}", *common, "optim.learning_rate=1")
    assert r.returncode == 2 and "optim.learning_rate" in r.stderr and "Traceback" not in r.stderr

    r = run_cli(config, f"out={good}", *common)  # a finished run is never overwritten
    assert r.returncode == 0 and "complete already" in r.stdout
    r = run_cli(config, f"out={good}", *common, "optim.lr=5e-4", "--resume")  # nor silently kept as if asked for
    assert r.returncode == 2 and "optim.lr" in r.stderr and "trained with other settings" in r.stderr
    assert "Traceback" not in r.stderr
    after = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == before


def test_started_run_is_not_overwritten(tmp_path):
    cfg = tiny_sft_config(tmp_path / "r", "train.max_steps=2", "train.save_every=1")
    run_stage(cfg)
    (tmp_path / "r" / "summary.json").unlink()  # as if it had died before finishing
    cfg2 = tiny_sft_config(tmp_path / "r", "train.max_steps=2", "train.save_every=1")
    from bezoar.config import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_stage(cfg2)
    cfg3 = tiny_sft_config(tmp_path / "r", "train.max_steps=2", "train.save_every=1", "lora.r=8")
    with pytest.raises(ConfigError, match="lora.r"):
        run_stage(cfg3, resume=True)


def test_a_run_that_stopped_before_its_first_checkpoint_resumes_with_a_fixed_config(tmp_path):
    # The NaN message says "lower the learning rate"; a recipe reruns every stage with resume=True, so a stage that
    # stopped before writing any checkpoint must take the fixed settings (there is nothing to continue from).
    out = tmp_path / "r"
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        run_stage(tiny_sft_config(out, "train.max_steps=3", "optim.lr=1e30", "optim.max_grad_norm=0"),
                  log=lambda *a, **k: None)
    assert (out / "config.toml").exists() and not list_checkpoints(out)
    run_stage(tiny_sft_config(out, "train.max_steps=3"), resume=True, log=lambda *a, **k: None)
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert "1e+30" not in (out / "config.toml").read_text()


def test_a_finished_run_asked_to_train_longer_says_how_without_removing_it(tmp_path):
    """Only its length changed: the message points at going on from the end-state checkpoint (not at
    removing the run), and following it trains on to the new length."""
    from bezoar.config import ConfigError

    out = tmp_path / "r"
    run_stage(tiny_sft_config(out, "train.max_steps=2"))
    longer = tiny_sft_config(out, "train.max_steps=4")
    with pytest.raises(ConfigError, match=r"other lengths .*train\.max_steps.*step 2\), rename .*summary\.json "
                                          r"and rerun with --resume") as info:
        run_stage(longer)
    assert "remove the folder" not in str(info.value)
    (out / "summary.json").rename(out / "summary.json.old")
    run_stage(longer, resume=True)
    assert [m["step"] for m in read_metrics(out) if "loss" in m][-1] == 4
    assert (out / "summary.json").exists()


def test_a_run_folder_moved_elsewhere_resumes_there(tmp_path):
    """The recorded ``out`` is where the run was, not a setting: a started run moved to another folder
    resumes from its checkpoint there."""
    first = tmp_path / "first"
    run_stage(tiny_sft_config(first, "train.max_steps=2", "train.save_every=1"))
    (first / "summary.json").unlink()  # as if it had died after its step-2 checkpoint
    moved = tmp_path / "moved"
    first.rename(moved)
    run_stage(tiny_sft_config(moved, "train.max_steps=3", "train.save_every=1"), resume=True)
    steps = [m["step"] for m in read_metrics(moved) if "loss" in m]
    assert steps == [1, 2, 3]  # went on from step 2, nothing trained twice
    assert (moved / "summary.json").exists() and f'out = "{moved}"' in (moved / "config.toml").read_text()


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    """A checkpoint at step 3 cannot end a 2-step run: one error naming it, and nothing in the run changes
    (not even its config.toml). A length in epochs that falls short is the trainer's to refuse."""
    from bezoar.config import ConfigError
    from bezoar.train.loop import TrainingError

    out = tmp_path / "r"
    run_stage(tiny_sft_config(out, "train.max_steps=3", "train.save_every=1"))
    (out / "summary.json").unlink()  # as if it had died after its step-3 checkpoint
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"train.max_steps=2: .*step-3 is at step 3 already"):
        run_stage(tiny_sft_config(out, "train.max_steps=2", "train.save_every=1"), resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(TrainingError, match=r"step-3: the run is at step 3, past the 1 steps now asked for"):
        run_stage(tiny_sft_config(out, "train.max_steps=0", "train.epochs=0.01", "train.save_every=1"), resume=True)
