"""Small stage configs on the tiny model for loop tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bezoar.config import load_config
from bezoar.train.config import StageConfig

DEMO = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo"


def tiny_sft_config(out, *overrides, quant="none"):
    base = [f"out={out}", "model.path=tiny:tiny", f"model.quant={quant}", "train.progress=false",
            "data.max_seq_len=128", "train.batch_size=4", "lora.r=4", "lora.alpha=8", "eval_path=",
            "merge=false", "train.eval_every=0", "train.save_every=0", "optim.lr=1e-3"]
    return load_config(StageConfig, DEMO / "sft.toml", base + list(overrides))


def run_cli(*args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", "bezoar.train", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_metrics(out) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
