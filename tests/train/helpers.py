"""Small stage configs on the tiny model for loop tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bezoar.config import load_config
from bezoar.train.config import StageConfig

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "bezoar" / "recipes" / "demo"

# ``python -m bezoar.train ARGS`` as it runs, but ``python paused_train.py STEP ARGS`` stops for good once the
# training record of step STEP is in metrics.jsonl (every rank stops there under torchrun: rank 0 after
# writing the line, the others at the same step), so that a test can SIGKILL the run at a known point
# between two checkpoints. Killing it as soon as the test saw that step let the run go on past the next
# checkpoint whenever the test's process was slower than the training (a stall of a few steps' time).
PAUSED_TRAIN = """
import runpy, sys, time
from bezoar.train import loop

pause_step = int(sys.argv.pop(1))
write = loop.Trainer._write_metrics

def write_then_pause(self, record):
    write(self, record)
    if record.get("step") == pause_step and "loss" in record:
        while True:  # until the test kills this process
            time.sleep(3600)

loop.Trainer._write_metrics = write_then_pause
runpy.run_module("bezoar.train", run_name="__main__", alter_sys=True)
"""


def paused_train_script(folder) -> Path:
    """PAUSED_TRAIN written to ``folder``; run it with ``repo_env()`` (the script's folder is not the repo)."""
    path = Path(folder) / "paused_train.py"
    path.write_text(PAUSED_TRAIN)
    return path


def repo_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


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
