"""bench/generate.py runs its whole code path (bezoar NF4 and the transformers + bitsandbytes peer)
in --smoke mode on CPU, writes nothing, and honours --only / --iters."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two model loads and a few CPU decodes: about 20 s, more on a busy machine
def test_bench_generate_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "generate.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "| bezoar/b1 | 1 |" in out.stdout and "| bezoar/b2 | 2 |" in out.stdout
    assert "| bezoar-eager/b1 | 1 |" in out.stdout and "| bezoar-attn/b1 | 1 |" in out.stdout
    assert "| bezoar-sdpa/b1 | 1 |" in out.stdout
    if "peer skipped" not in out.stdout:
        assert "eager loop against its default decode: the first 4 of 4 tokens are the same" in out.stdout
        assert "| transformers-bnb/b1 | 1 |" in out.stdout
        assert "greedy agreement with the peer over the first 8 tokens: 1.00" in out.stdout
    assert not list(tmp_path.glob("*.json")), "smoke mode must not write results"


def test_bench_generate_only_and_iters(capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--no-peer", "--only", "bezoar/b2", "--iters", "2"]) == 0
    assert "ran bezoar/b2 2 times" in capsys.readouterr().out
    assert bench.main(["--smoke", "--no-peer", "--only", "nope"]) == 2
    assert "no such case" in capsys.readouterr().err


def test_bench_generate_breakdown_smoke(capsys, monkeypatch):
    """--breakdown profiles static decode steps with and without gemv and tables the top operators; after
    each mode it writes what it has (here the writer is caught: smoke runs write nothing), each mode with
    the settings it ran under: the last two differ in the decode attention only."""
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    written = []
    monkeypatch.setattr(bench.common, "write_results",
                        lambda name, rows, args, extra=None: written.append((name, [dict(r) for r in rows], extra)))
    assert bench.main(["--smoke", "--breakdown", "2"]) == 0
    assert [(name, len(rows)) for name, rows, _ in written] == [("generate-breakdown", 1), ("generate-breakdown", 2),
                                                                  ("generate-breakdown", 3)]
    rows = written[-1][1]
    assert [r["mode"] for r in rows] == ["dequant + cuBLAS", "gemv kernel", "Triton decode attention"]
    assert rows[0]["environment"] == {"BEZOAR_NF4_GEMV_MAX_M": "0", "BEZOAR_NF4_FUSED_MAX_M": "0",
                                      "BEZOAR_DECODE_ATTENTION": "sdpa"}
    assert rows[1]["environment"]["BEZOAR_DECODE_ATTENTION"] == "sdpa"
    assert dict(rows[2]["environment"], BEZOAR_DECODE_ATTENTION="sdpa") == rows[1]["environment"]
    assert rows[2]["environment"]["BEZOAR_DECODE_ATTENTION"] == "triton"
    assert all(r["gpu_ms_per_step"] > 0 and r["kernels"] for r in rows) and written[-1][2]["steps"] == 2
    out = capsys.readouterr().out
    for label in ("dequant + cuBLAS", "gemv kernel", "Triton decode attention"):
        assert f"{label}: 2 forwards at batch 1" in out
    assert out.count("| kernel | calls_per | us_per | share |") == 3
    assert "BEZOAR_NF4_GEMV_MAX_M" not in os.environ  # the modes restored the environment
    assert "BEZOAR_NF4_FUSED_MAX_M" not in os.environ
    assert "BEZOAR_DECODE_ATTENTION" not in os.environ


def test_bench_generate_writes_after_every_case(monkeypatch):
    """The timing loop rewrites its results after each case (a run cut off by its time limit keeps what it
    timed, complete false), the default decode first, and the last write says complete."""
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    written = []
    monkeypatch.setattr(bench.common, "write_results",
                        lambda name, rows, args, extra=None: written.append((name, [r["case"] for r in rows], extra)))
    assert bench.main(["--smoke", "--no-peer", "--batches", "1"]) == 0
    assert [name for name, _, _ in written] == ["generate"] * len(written)
    cases = written[-1][1]
    assert cases[0] == "bezoar/b1" and set(cases) >= {"bezoar-eager/b1", "bezoar-sdpa/b1", "bezoar-attn/b1"}
    assert [len(c) for _, c, _ in written[:-1]] == list(range(1, len(cases) + 1))
    assert [extra["complete"] for _, _, extra in written] == [False] * len(cases) + [True]


def test_bench_generate_times_each_batch_in_the_order_asked():
    """The timing order: batch by batch as --batches lists them (a time limit cuts the last ones), each
    batch's bezoar default, then the peer, then the variants in the order they were added."""
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "bench" / "generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cases = {}
    for b in (32, 1):
        for impl in ("bezoar", "bezoar-eager", "bezoar-sdpa", "bezoar-attn", "transformers-bnb"):
            cases[f"{impl}/b{b}"] = (impl, b, None, None)
    got = list(bench.timing_order(cases, [32, 1]))
    assert got == ["bezoar/b32", "transformers-bnb/b32", "bezoar-eager/b32", "bezoar-sdpa/b32", "bezoar-attn/b32",
                   "bezoar/b1", "transformers-bnb/b1", "bezoar-eager/b1", "bezoar-sdpa/b1", "bezoar-attn/b1"]
    only = {"bezoar-eager/b1": cases["bezoar-eager/b1"]}  # --only: the one case
    assert list(bench.timing_order(only, [32, 1])) == ["bezoar-eager/b1"]
