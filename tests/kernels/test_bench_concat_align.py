"""bench/lora.py --sweep-concat-align: the concat path timed at each align of its LoRA columns
(BEZOAR_LORA_CONCAT_ALIGN), each align checked against align 16 before it is timed, in rounds."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from bezoar_kernels import lora as L
from tests.utils import load_bench

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _load(name, monkeypatch):
    return load_bench(name, "concat_align", monkeypatch)


def _bench(monkeypatch, tmp_path, **overrides):
    """bench/lora.py loaded in this process, its results captured instead of written."""
    monkeypatch.delenv("BEZOAR_LORA_CONCAT_ALIGN", raising=False)
    bench = _load("lora", monkeypatch)
    written = []
    monkeypatch.setattr(bench.common, "write_results",
                        lambda name, rows, args, extra=None: written.append((name, rows, extra)))
    args = argparse.Namespace(smoke=True, budget=0.0, out=str(tmp_path), aligns="16,64,128", rounds=2,
                              dropout=0.05, no_groups=True)
    for key, value in overrides.items():
        setattr(args, key, value)
    return bench, args, written


def _scripted_timer(monkeypatch, times, seen, after=None):
    """A stand-in for common.bench_ms: runs the call once, records the align in effect inside the LoRA call
    it makes (``BEZOAR_LORA_CONCAT_ALIGN`` there), and returns the next of ``times`` for that align
    (``after(seen)`` runs after each timing)."""
    left = {a: list(ts) for a, ts in times.items()}
    inside = []
    for name in ("lora_linear_triton", "lora_qkv_triton"):
        def spy(*a, _real=getattr(L, name), **kw):
            inside.append(os.environ.get("BEZOAR_LORA_CONCAT_ALIGN"))
            return _real(*a, **kw)
        monkeypatch.setattr(L, name, spy)

    def timer(fn, smoke=False, **kw):
        inside.clear()
        fn()
        assert len(set(inside)) == 1, inside
        seen.append(inside[0])
        if after:
            after(seen)
        return left[seen[-1]].pop(0)
    return timer


def test_bench_lora_sweep_concat_align_smoke(tmp_path):
    """The smoke run (Triton interpreter): a line per align and case, the table with each align's time
    over align 16's, and no results file."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("BEZOAR_LORA_CONCAT_ALIGN", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "lora.py"), "--smoke", "--sweep-concat-align",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("concat align ")]
    want = [f"concat align {a} {case} 64x128 M=24 r=8: " for case in ("single", "qkv") for a in (16, 64, 128)]
    assert [line[:len(w)] for line, w in zip(lines, want)] == want and len(lines) == 6, proc.stdout[-3000:]
    assert all(re.search(r": [\d.]+ ms, [\d.]+x align 16$", line) for line in lines), lines
    assert "dropout 0.05" in proc.stdout
    assert "| shape | case | M | r | 16 | 64 | 128 | 64/16 | 128/16 |" in proc.stdout
    for case in ("single", "qkv"):
        (row,) = [line for line in proc.stdout.splitlines() if line.startswith(f"| 64x128 | {case} | 24 | 8 |")]
        cells = [float(c) for c in row.split("|")[5:-1]]
        assert len(cells) == 5 and all(c > 0 for c in cells), row
    assert not (tmp_path / "out").exists()  # smoke runs write nothing


def test_sweep_times_every_align_in_rounds_and_keeps_each_fastest(monkeypatch, tmp_path):
    """Each round times 16, 64, 128 in turn with the align set during the call; each align keeps its
    fastest round; the rows (with the dropout) are what bench/tune.py reads, and it picks 64 from them."""
    bench, args, written = _bench(monkeypatch, tmp_path, aligns="128,64", dropout=0.1)  # 16 comes with them
    seen = []
    times = {"16": [1.00, 0.98], "64": [0.90, 0.95], "128": [1.10, 1.05]}
    monkeypatch.setattr(bench.common, "bench_ms", _scripted_timer(monkeypatch, times, seen))
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8], CPU, torch.float32) == 0
    assert seen == ["16", "64", "128", "16", "64", "128"]
    name, (row,), extra = written[-1]
    assert name == "lora-concat-align" and extra["complete"] is True and extra["dropout"] == 0.1
    assert extra["aligns"] == [16, 64, 128] and extra["rounds"] == 2 and extra["skipped"] == []
    assert row["ms"] == {"16": 0.98, "64": 0.90, "128": 1.05} and "errors" not in row
    assert (row["shape"], row["M"], row["r"], row["case"], row["rounds"]) == ("64x128", 24, 8, "single", 2)
    assert abs(row["over_16"]["64"] - 0.90 / 0.98) < 1e-12
    assert "BEZOAR_LORA_CONCAT_ALIGN" not in os.environ  # set only around each call
    tune = _load("tune", monkeypatch)
    result = {"bench": name, "device": "NVIDIA X", "rows": written[-1][1], **extra}
    assert tune.derive(result)["lora.concat_align"][0] == 64


def test_an_align_whose_results_differ_is_reported_and_not_timed(monkeypatch, tmp_path):
    """The check before the timing: a forward that gives other results at align 64 gets an error for 64,
    64 is never timed, the others are; bench/tune.py takes nothing from such a file."""
    bench, args, written = _bench(monkeypatch, tmp_path, rounds=1)
    real = L.lora_linear_triton

    def wrong_at_64(*a, **kw):
        y = real(*a, **kw)
        return y + 0.01 * y.detach().abs().max() if os.environ.get("BEZOAR_LORA_CONCAT_ALIGN") == "64" else y

    monkeypatch.setattr(L, "lora_linear_triton", wrong_at_64)
    seen = []
    monkeypatch.setattr(bench.common, "bench_ms", _scripted_timer(monkeypatch, {"16": [1.0], "128": [0.5]}, seen))
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8], CPU, torch.float32) == 0
    assert seen == ["16", "128"]
    (row,) = written[-1][1]
    assert row["ms"] == {"16": 1.0, "128": 0.5}
    assert re.match(r"ArithmeticError: output 0 differs from align 16's by 0\.01 of its largest \|value\| "
                    r"\(tolerance 1e-05\)", row["errors"]["64"]), row["errors"]
    assert set(row["errors"]) == {"64"}
    tune = _load("tune", monkeypatch)
    assert tune.derive({"bench": "lora-concat-align", "rows": written[-1][1]}) == {}


def test_budget_and_sigint_stop_starting_cases(monkeypatch, tmp_path, capsys):
    """--budget spent: no case starts, each is listed as not timed. A SIGINT during a case's first round:
    that round ends (every align timed once), no further round or case starts, and the file says so."""
    bench, args, written = _bench(monkeypatch, tmp_path, budget=5.0)
    bench.STARTED = bench.time.perf_counter() - 10
    monkeypatch.setattr(bench.common, "bench_ms", lambda *a, **k: 1 / 0)  # nothing may be timed
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8, 4], CPU, torch.float32) == 0
    _, rows, extra = written[-1]
    assert rows == [] and extra["complete"] is False
    assert extra["skipped"] == ["single 64x128 M=24 r=8", "single 64x128 M=24 r=4"]
    assert extra["skip_note"].startswith("--budget 5s reached: 2 case(s) not timed")
    assert "note: --budget 5s reached" in capsys.readouterr().out

    bench, args, written = _bench(monkeypatch, tmp_path)
    seen = []
    sigint = _scripted_timer(monkeypatch, {a: [1.0, 1.0] for a in ("16", "64", "128")}, seen,
                             after=lambda seen: len(seen) == 2 and bench.stop.append("SIGINT"))
    monkeypatch.setattr(bench.common, "bench_ms", sigint)
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8, 4], CPU, torch.float32) == 0
    assert seen == ["16", "64", "128"]
    _, (row,), extra = written[-1]
    assert row["rounds"] == 1 and set(row["ms"]) == {"16", "64", "128"}
    assert extra["complete"] is False and extra["skipped"] == ["single 64x128 M=24 r=4"]
    assert extra["skip_note"].startswith("SIGINT (time limit): 1 case(s) not timed")


def test_a_case_whose_reference_fails_is_reported_and_not_timed(monkeypatch, tmp_path):
    """Where align 16 itself fails (here the concat call raises), every align of the case gets an error and
    nothing is timed; the next case still runs."""
    bench, args, written = _bench(monkeypatch, tmp_path, rounds=1, no_groups=False)

    def broken(*a, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(L, "lora_linear_triton", broken)
    seen = []
    monkeypatch.setattr(bench.common, "bench_ms", _scripted_timer(monkeypatch, {a: [1.0] for a in ("16", "64", "128")},
                                                                   seen))
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8], CPU, torch.float32) == 0
    single, qkv = written[-1][1]
    assert single["ms"] == {} and set(single["errors"]) == {"16", "64", "128"}
    assert "the inputs or align 16 (the reference) failed: RuntimeError: out of memory" in single["errors"]["64"]
    assert qkv["case"] == "qkv" and set(qkv["ms"]) == {"16", "64", "128"} and seen == ["16", "64", "128"]


def test_bad_aligns_are_refused(monkeypatch, tmp_path, capsys):
    bench, args, written = _bench(monkeypatch, tmp_path, aligns="16,48")
    assert bench.sweep_concat_align(args, [(64, 128)], [24], [8], CPU, torch.float32) == 2
    assert "--aligns '16,48': expected a comma list of 16, 32, 64, 128" in capsys.readouterr().err
    assert written == []
