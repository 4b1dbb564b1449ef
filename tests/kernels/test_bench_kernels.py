"""bench/kernels.py runs its whole code path at tiny shapes on CPU (--smoke) and its flags work."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "kernels.py"
KERNELS = ["rmsnorm", "rmsnorm_add", "rope", "swiglu", "linear_ce", "linear_logprobs", "attention_causal",
           "attention_packed"]


def _run(*args, timeout=600):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_runs_every_case_and_writes_nothing(tmp_path):
    out_dir = tmp_path / "results"
    proc = _run("--smoke", "--out", str(out_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for kernel in KERNELS:
        for mode in ("fwd", "fwdbwd"):
            assert any(line.startswith(f"| {kernel}.{mode}.triton.") for line in table), (kernel, mode)
    assert any(line.startswith("| attention_packed.fwd.flex.") for line in table)
    assert "BEZOAR_PACKED_ATTENTION=" in proc.stdout
    assert not out_dir.exists()


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_only_iters_and_profile_in_process(tmp_path, capsys):
    """The flags, run in this process (the interpreter is already on) to skip another startup."""
    bench = _bench_module()
    assert bench.main(["--smoke", "--only", "rope.fwdbwd.triton.*", "--iters", "2"]) == 0
    assert "rope.fwdbwd.triton.64: ran 2 times" in capsys.readouterr().out

    trace_dir = tmp_path / "trace"
    assert bench.main(["--smoke", "--only", "swiglu.fwd.*", "--profile", str(trace_dir)]) == 0
    assert any(trace_dir.iterdir()), "no profiler trace written"

    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "no_such_case"])
    assert "matches no case" in capsys.readouterr().err


def test_packed_rows_look_like_sft_data():
    bench = _bench_module()
    ids, stats = bench.packed_doc_ids(16, 2048, seed=8192)
    assert ids.shape == (16, 2048) and not ids.dtype.is_floating_point
    assert 150 < stats["mean_doc_len"] < 900 and stats["fill"] > 0.95
    assert 0 < stats["pairs_vs_causal"] < 0.75  # documents, not whole rows, attend
