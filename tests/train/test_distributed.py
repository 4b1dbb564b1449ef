"""torchrun + DDP on CPU (gloo): two processes equal one process with the same global batch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bezoar.train.loop import list_checkpoints
from tests.train.helpers import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "sft.toml"
COMMON = ["model.path=tiny:tiny", "model.quant=nf4", "train.progress=false", "data.max_seq_len=128",
          "train.batch_size=4", "lora.r=4", "lora.dropout=0.0", "eval_path=", "merge=false",
          "train.max_steps=20", "train.save_every=5", "train.keep_last=10", "optim.lr=1e-3"]


def torchrun(out, *extra, nproc=2, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
           "-m", "bezoar.train", str(CONFIG), f"out={out}", *COMMON, *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def single(out, *extra):
    return subprocess.run([sys.executable, "-m", "bezoar.train", str(CONFIG), f"out={out}", *COMMON, *extra],
                          capture_output=True, text=True, timeout=900)


def adapter(out):
    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "one"
    r = single(out)
    assert r.returncode == 0, r.stderr
    return out


def test_two_processes_equal_one(one_process, tmp_path):
    out = tmp_path / "two"
    r = torchrun(out)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = read_metrics(one_process), read_metrics(out)
    la = [m["loss"] for m in a if "loss" in m]
    lb = [m["loss"] for m in b if "loss" in m]
    assert len(la) == len(lb) == 20
    for i, (x, y) in enumerate(zip(la, lb)):
        assert abs(x - y) <= 1e-5 * max(1.0, abs(x)), f"step {i + 1}: {x} vs {y}"
    wa, wb = adapter(one_process), adapter(out)
    for k in wa:
        err = (wa[k] - wb[k]).abs().max().item()
        assert err <= 1e-5, f"{k}: max |diff| {err:.2e}"


def test_killed_two_process_run_resumes_equal(tmp_path):
    straight = tmp_path / "straight"
    r = torchrun(straight)
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    proc = torchrun(killed, wait=False)
    deadline = time.time() + 600
    while time.time() < deadline:
        steps = [m["step"] for m in read_metrics(killed) if "loss" in m] if (killed / "metrics.jsonl").exists() else []
        if steps and max(steps) >= 7:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(killed)[-1][0] == 5
    r = torchrun(killed, "--resume")
    assert r.returncode == 0, r.stderr
    wa, wb = adapter(straight), adapter(killed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed 2-process run differs from the uninterrupted one"
    assert [m["loss"] for m in read_metrics(killed) if "loss" in m] == [m["loss"] for m in read_metrics(straight) if "loss" in m]
