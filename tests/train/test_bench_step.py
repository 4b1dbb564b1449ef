"""bench/step.py: the smoke run goes through every case's code path on CPU; the two sides are built from
the same weights; the FLOP count and the target verdicts are what the docstring says."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bezoar.model.config import LlamaConfig, preset
from tests.utils import assert_close

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "step.py"


def load_bench():
    if "bench_step" in sys.modules:
        return sys.modules["bench_step"]
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # for its ``import common``
    spec = importlib.util.spec_from_file_location("bench_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.slow
def test_smoke_runs_every_case_and_writes_nothing(tmp_path):
    out = run_script("--smoke", "--lora", "qkv", "--tokens", "64", "--out", tmp_path / "results")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for case in ("sft/bezoar-full/qkv/64", "sft/bezoar-cheap/qkv/64", "sft/bezoar-off/qkv/64", "sft/hf/qkv/64",
                 "dpo/bezoar-full/qkv/64", "dpo/bezoar-off/qkv/64", "dpo/hf/qkv/64"):
        assert f"| {case} |" in out.stdout, case
    assert ": failed (" not in out.stdout and "out of memory" not in out.stdout
    assert "speedup_vs_hf" in out.stdout and "dpo_over_sft" in out.stdout
    assert "targets (issues 10 and 6)" in out.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_only_iters_and_profile(tmp_path):
    out = run_script("--smoke", "--only", "sft/bezoar-cheap/all/64", "--iters", "2", "--profile", tmp_path / "trace")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "ran sft/bezoar-cheap/all/64 2 times" in out.stdout
    assert any((tmp_path / "trace").iterdir()), "no profiler trace written"
    bad = run_script("--smoke", "--only", "sft/nothing/qkv/64")
    assert bad.returncode == 2 and "cases are" in bad.stderr


def test_both_sides_hold_the_same_model():
    """bezoar's NF4 model and the transformers + bitsandbytes one, built from the same drawn weights, give
    the same logits: the comparison is between two implementations of one model."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    bench = load_bench()
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64)
    ours = bench.build_bezoar(config, 3, torch.device("cpu"), torch.float32)
    theirs = bench.build_hf(config, 3, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(ids), theirs(input_ids=ids).logits, 1e-4, 1e-4, "logits")


def test_flops_and_targets():
    bench = load_bench()
    config = preset("open_llama_3b_v2")
    n = bench.matmul_params(config)
    per_layer = 4 * 3200 * 3200 + 3 * 3200 * 8640 + 2 * 3200
    assert n == 26 * per_layer + 3200 + 32000 * 3200  # the LM head multiplies; the embedding lookup does not
    pairs = 2048 * 2049 // 2
    sft = bench.model_flops(config, 2048, pairs, reference_forward=False)
    assert sft == pytest.approx(4 * n * 2048 + 12 * 26 * 3200 * pairs)
    dpo = bench.model_flops(config, 2048, pairs, reference_forward=True)
    assert dpo == pytest.approx(sft + 2 * n * 2048 + 4 * 26 * 3200 * pairs)

    def row(workload, impl, ms, peak, mfu=0.5):
        return {"case": f"{workload}/{impl}/qkv/8k", "workload": workload, "impl": impl, "lora": "qkv",
                "tokens_per_step": 8192, "ms": ms, "tokens": 8000, "tokens_per_s": 8000 / ms * 1e3,
                "peak_gib": peak, "mfu": mfu}

    rows = [row("sft", "bezoar-full", 100.0, 4.0), row("sft", "hf", 300.0, 9.0),
            row("dpo", "bezoar-full", 150.0, 4.4), row("dpo", "hf", 500.0, 10.0)]
    comparisons = bench.compare(rows)
    found = {(c["what"], c["workload"], c["impl"]): c for c in comparisons}
    assert found[("speedup_vs_hf", "sft", "bezoar-full")]["ratio"] == pytest.approx(3.0)
    assert found[("dpo_over_sft", "dpo", "bezoar-full")]["ratio"] == pytest.approx(1.5)
    assert found[("dpo_over_sft", "dpo", "bezoar-full")]["memory_ratio"] == pytest.approx(1.1)
    verdicts = {t["target"].split(" (")[0].split(",")[0]: t["status"] for t in bench.check_targets(rows, comparisons)}
    assert verdicts["SFT tokens/s >= 2.5x transformers + PEFT + bitsandbytes"] == "met"
    assert verdicts["MFU >= 45%"] == "met"
    assert verdicts["peak memory of the 3B QLoRA SFT step at 8K tokens <= 5 GB"] == "met"  # 4 GiB = 4.3 GB
    assert verdicts["DPO step time <= 1.6x an SFT step on the same tokens"] == "met"
    rows[2]["ms"] = 200.0  # now 2x the SFT time
    verdicts = {t["target"]: t["status"] for t in bench.check_targets(rows, bench.compare(rows))}
    assert verdicts["DPO step time <= 1.6x an SFT step on the same tokens (bezoar)"] == "missed"


@pytest.mark.slow
def test_the_cache_case_runs_beside_full(tmp_path):
    """``bezoar-full-cache`` is taken only by name, and runs as a case of its own (on CPU the torch
    reference path does not dequantize through the cache: this checks the case's plumbing)."""
    out = run_script("--smoke", "--lora", "qkv", "--tokens", "64", "--workloads", "sft",
                     "--impls", "bezoar-full,bezoar-full-cache")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| sft/bezoar-full/qkv/64 |" in out.stdout and "| sft/bezoar-full-cache/qkv/64 |" in out.stdout
    assert ": failed (" not in out.stdout
    bad = run_script("--smoke", "--impls", "bezoar-full,bezoar-cache")
    assert bad.returncode != 0 and "bezoar-full-cache" in bad.stderr


def test_breakdown_by_kernel_category(tmp_path):
    """``--breakdown N`` profiles N more steps of each case and prints their time per step by category
    (CPU operators in a smoke run: the torch reference path's matmuls show up as the GEMM category)."""
    out = run_script("--smoke", "--lora", "qkv", "--tokens", "64", "--workloads", "sft", "--impls", "bezoar-full",
                     "--breakdown", "1")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "sft/bezoar-full/qkv/64: " in out.stdout and "ms of kernel time per step over 1 profiled steps" in out.stdout
    table = out.stdout.split("ms of kernel time per step", 1)[1]
    assert "| category | kernels | calls_per | us_per | share |" in table
    assert "| gemm (cublas) |" in table
    for bad_args, why in ((("--breakdown", "-1"), "must be a number of steps"),
                          (("--breakdown", "1", "--profile", str(tmp_path)), "ask for one at a time")):
        bad = run_script("--smoke", *bad_args)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr


def test_step_breakdown_counts_the_profiled_steps():
    bench = load_bench()
    calls = []

    def step():
        calls.append(1)
        a = torch.randn(32, 32)
        return torch.mm(a, a)  # one aten::mm (a @ b would add aten::matmul around it)

    got = bench.step_breakdown(step, 3, cuda=False)  # a CPU step, wherever CUDA is
    assert len(calls) == 4  # one outside the profile, three in it
    assert got["steps"] == 3 and got["us_per_step"] > 0
    gemm = [c for c in got["categories"] if c["category"] == "gemm (cublas)"]
    assert gemm and gemm[0]["calls_per"] == pytest.approx(1.0)  # one aten::mm a step
    assert len(got["kernels"]) <= bench.BREAKDOWN_TOP
    assert all("category" in k for k in got["kernels"])
