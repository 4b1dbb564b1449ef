"""DPO training on the loop: rewards rise on a synthetic preference set; run_stage with a cached reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bezoar.config import ConfigError, from_dict
from bezoar.data import make_loader
from bezoar.model import Tokenizer, load
from bezoar.model.lora import TARGETS, LoraConfig, apply_lora
from bezoar.train.config import DPOSection, StageConfig
from bezoar.train.dpo import METRICS, DPOStage
from bezoar.train.loop import LoopConfig, OptimConfig, Trainer
from bezoar.train.run import SUMMARY, run_stage
from tests.train.dpo_helpers import single_thread, documents, write_pairs

assert single_thread  # an autouse fixture: every test here runs torch on one thread


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_raises_rewards_and_margins(tiny_dir, tmp_path):
    tokenizer = Tokenizer(tiny_dir)
    docs, cfg = documents(write_pairs(tmp_path / "pairs.jsonl", 24, seed=11), tokenizer)
    torch.manual_seed(0)
    model = load(tiny_dir, device="cpu")
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, targets=list(TARGETS)))
    batches = make_loader(docs, cfg, tokenizer, batch_size=8, seed=0)
    every_pair = make_loader(docs, cfg, tokenizer, batch_size=16, shuffle=False)
    out = tmp_path / "run"
    trainer = Trainer(model, DPOStage(DPOSection(beta=0.5)), batches,
                      LoopConfig(max_steps=24, progress=False, eval_every=0),
                      OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant"), out, eval_batches=every_pair,
                      log=lambda *a: None)
    trainer.fit()
    records = read_metrics(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 24
    for key in ("loss", *METRICS):
        assert all(key in r for r in steps), key
    first, last = steps[:4], steps[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "rewards/margins") > mean(first, "rewards/margins") + 0.5
    assert mean(last, "loss") < mean(first, "loss")
    assert mean(last, "rewards/accuracies") > 0.9
    final = [r for r in records if "eval_loss" in r][-1]  # over every pair, after training
    assert final["eval_rewards/accuracies"] > 0.9, final
    assert final["eval_rewards/margins"] > 0.5, final


def stage_config(tiny_dir, data: Path, out: Path, *overrides: str) -> StageConfig:
    base = {
        "stage": "dpo", "out": str(out),
        "model": {"path": str(tiny_dir), "quant": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "data": {"path": str(data), "format": "pairs", "max_seq_len": 128,
                 "template": {"system": "You are a helpful assistant."}},
        "optim": {"lr": 5e-3, "warmup_steps": 0},
        "train": {"batch_size": 4, "max_steps": 3, "save_every": 1, "progress": False},
    }
    return from_dict(StageConfig, base, overrides=list(overrides))


def test_run_stage_with_precomputed_reference_matches_on_the_fly_and_resumes(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 12, seed=4)
    logs = {"cached": [], "fly": []}
    cached = run_stage(stage_config(tiny_dir, data, tmp_path / "cached", "dpo.precompute_ref=true"),
                       log=logs["cached"].append)
    fly = run_stage(stage_config(tiny_dir, data, tmp_path / "fly"), log=logs["fly"].append)
    assert any("cached in" in m for m in logs["cached"]) and not any("reference" in m for m in logs["fly"])
    assert list((cached / "ref_cache").glob("ref-logps-*.safetensors"))
    a, b = read_metrics(cached), read_metrics(fly)
    assert [r["step"] for r in a] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", *METRICS):
            assert ra[key] == pytest.approx(rb[key], rel=1e-5, abs=1e-5), (ra["step"], key)

    # a run that stopped after its checkpoint at step 3, continued to step 5: the cache is reused
    (cached / SUMMARY).unlink()
    messages = []
    run_stage(stage_config(tiny_dir, data, tmp_path / "cached", "dpo.precompute_ref=true", "train.max_steps=5"),
              resume=True, log=messages.append)
    assert any("reusing" in m for m in messages) and not any("one pass" in m for m in messages), messages
    assert any("resumed from" in m for m in messages)
    assert [r["step"] for r in read_metrics(cached)] == [1, 2, 3, 4, 5]


def test_dpo_stage_needs_pair_data(tiny_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "response": "hi"}) + "\n")
    cfg = stage_config(tiny_dir, data, tmp_path / "x", "data.format=instruction", "train.batch_size=1")
    with pytest.raises(ConfigError, match="data.format"):
        run_stage(cfg, log=lambda *a: None)


def test_pairs_too_long_for_one_row_name_the_keys_to_change(tiny_dir, tmp_path):
    """With data.max_len above max_seq_len // 2 a long pair cannot share a row: the config is refused, naming the
    keys that make every pair fit, before the model or the data loads (packing found it only after both, and
    named an item index). Unpacked, each document has a row of its own and the same max_len trains."""
    data = tmp_path / "long.jsonl"
    words = " ".join(f"word{i}" for i in range(200))
    data.write_text(json.dumps({"prompt": "Say it.", "chosen": words, "rejected": "No. " + words}) + "\n")
    with pytest.raises(ConfigError, match=r"data\.max_len=128.*max_len \(128\) must be at most "
                                          r"max_seq_len // 2 \(64\) for packed pairs.*packed = false"):
        stage_config(tiny_dir, data, tmp_path / "out", "data.max_len=128")
    cfg = stage_config(tiny_dir, data, tmp_path / "out", "data.max_len=128", "data.packed=false", "train.max_steps=1",
                       "train.batch_size=2")
    run_stage(cfg, log=lambda *a: None)
    assert (tmp_path / "out" / "summary.json").exists()


def test_dpo_policy_trains_without_lora_dropout_unless_asked(tiny_dir, tmp_path):
    """dpo.disable_dropout (default true, as TRL's DPOConfig): a DPO stage's LoRA layers run with dropout 0
    whatever lora.dropout says, and the adapter's config still records lora.dropout; false keeps it. An SFT
    stage keeps its dropout."""
    from bezoar.model.lora import lora_modules, save_adapter
    from bezoar.train.run import build_model

    data = tmp_path / "pairs.jsonl"
    cfg = stage_config(tiny_dir, data, tmp_path / "x", "lora.dropout=0.05")
    assert cfg.dpo.disable_dropout is True
    model, _ = build_model(cfg, torch.device("cpu"))
    assert {m.dropout_p for m in lora_modules(model).values()} == {0.0}
    assert model.lora_config.dropout == 0.05
    adapter = save_adapter(model, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    kept = stage_config(tiny_dir, data, tmp_path / "y", "lora.dropout=0.05", "dpo.disable_dropout=false")
    model, _ = build_model(kept, torch.device("cpu"))
    assert {m.dropout_p for m in lora_modules(model).values()} == {0.05}
    sft = stage_config(tiny_dir, data, tmp_path / "z", "stage=sft", "lora.dropout=0.05", "data.format=instruction")
    model, _ = build_model(sft, torch.device("cpu"))
    assert {m.dropout_p for m in lora_modules(model).values()} == {0.05}


def test_dpo_run_recorded_before_disable_dropout_ran_with_dropout(tiny_dir, tmp_path):
    """A DPO run whose config.toml predates dpo.disable_dropout trained its policy with LoRA dropout: the new
    default (true) is a changed setting for it, not a silent switch on resume; an SFT run is unaffected, and a
    run that recorded the key compares as usual."""
    from bezoar.config import dump_toml
    from bezoar.train.run import config_changes

    data = tmp_path / "pairs.jsonl"
    cfg = stage_config(tiny_dir, data, tmp_path / "dpo", "lora.dropout=0.05")
    out = tmp_path / "dpo"
    out.mkdir()
    text = dump_toml(cfg)
    (out / "config.toml").write_text(text)
    assert config_changes(out, cfg) == {}
    (out / "config.toml").write_text("\n".join(line for line in text.splitlines()
                                               if not line.startswith("disable_dropout")) + "\n")
    assert config_changes(out, cfg) == {"dpo.disable_dropout": (False, True)}
    kept = stage_config(tiny_dir, data, tmp_path / "dpo", "lora.dropout=0.05", "dpo.disable_dropout=false")
    assert config_changes(out, kept) == {}
    sft = stage_config(tiny_dir, data, tmp_path / "sft", "stage=sft", "data.format=instruction")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "config.toml").write_text("\n".join(line for line in dump_toml(sft).splitlines()
                                                           if not line.startswith("disable_dropout")) + "\n")
    assert config_changes(tmp_path / "sft", sft) == {}
