"""DPO under torchrun + DDP on CPU (gloo): the cached reference is built by both ranks and equals one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from bezoar.train.dpo import METRICS
from tests.train.dpo_helpers import write_pairs
from tests.train.helpers import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "bezoar" / "recipes" / "demo" / "dpo.toml"


def common(data: Path) -> list[str]:
    return ["model.path=tiny:tiny", "model.quant=none", "train.progress=false", f"data.path={data}",
            "data.max_seq_len=128", "train.batch_size=4", "lora.r=4", "lora.alpha=8", "train.max_steps=4",
            "train.save_every=0", "train.epochs=1", "optim.lr=3e-3"]


def free_port() -> int:
    # torchrun's --master-port=0 hands the workers MASTER_PORT=0 (torch 2.13), and they wait forever
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, data: Path, *extra: str, nproc: int = 1):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                "--master-addr=127.0.0.1", f"--master-port={free_port()}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "bezoar.train", str(CONFIG), f"out={out}", *common(data), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_with_cached_reference_equal_one_on_the_fly(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 20, seed=8)
    one = run(tmp_path / "one", data, "dpo.precompute_ref=false")
    assert one.returncode == 0, one.stdout + one.stderr
    two = run(tmp_path / "two", data, "dpo.precompute_ref=true", nproc=2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert "reference log-probs cached in" in two.stdout
    assert len(list((tmp_path / "two" / "ref_cache").glob("ref-logps-*.safetensors"))) == 1
    a = [m for m in read_metrics(tmp_path / "one") if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "two") if "loss" in m]
    assert len(a) == len(b) == 4
    for ma, mb in zip(a, b):
        for key in ("loss", *METRICS):
            assert abs(ma[key] - mb[key]) <= 1e-5 * max(1.0, abs(ma[key])), (ma["step"], key, ma[key], mb[key])
    wa = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    for k in wa:
        err = (wa[k] - wb[k]).abs().max().item()
        assert err <= 1e-5, f"{k}: max |diff| {err:.2e}"
