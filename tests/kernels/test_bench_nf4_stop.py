"""bench/nf4.py cut short: a SIGINT (what ``timeout --signal=INT`` sends at a part's limit) or ``--budget``
stops starting cases and sweep configs; the JSON is rewritten after every case, so whatever was timed is
on disk, and says what is missing; bench/tune.py takes no tiles from a gemv sweep that was cut."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from tests.utils import load_bench

def _load(name, monkeypatch):
    return load_bench(name, "stop", monkeypatch)


def _run(monkeypatch, tmp_path, argv, trip):
    """bench/nf4.py's main in this process (smoke shapes, no kernel timed: a stand-in returns 1 ms), every
    write captured. ``trip(calls, written, module)`` runs before each timing."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nf4 = _load("nf4", monkeypatch)
    written = []
    monkeypatch.setattr(nf4.common, "write_results",
                        lambda name, rows, args, extra=None: written.append((name, rows, dict(extra or {}))))
    calls = []

    def fake_bench_ms(fn, smoke=False, **kw):
        calls.append(fn)
        trip(len(calls), written, nf4)
        return 1.0

    monkeypatch.setattr(nf4.common, "bench_ms", fake_bench_ms)
    monkeypatch.setattr(sys, "argv", ["nf4.py", "--smoke", "--out", str(tmp_path), *argv])
    before = signal.getsignal(signal.SIGINT)
    assert nf4.main() == 0
    assert signal.getsignal(signal.SIGINT) is before  # the caller's SIGINT handling is back
    return nf4, written, calls


@pytest.mark.parametrize("how", ["sigint", "budget"])
def test_a_cut_main_loop_keeps_every_case_it_timed(monkeypatch, tmp_path, how):
    """Stopped after the fifth case: the run does not raise (a SIGINT used to end it with KeyboardInterrupt and
    no file), the JSON was written after each case timed (complete false), and the last write holds the five
    cases' times, the rest listed as skipped, and starts no sweep."""
    def trip(n, written, nf4):
        if n == 5:
            if how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler runs at the next bytecode
            else:
                nf4.STARTED = time.perf_counter() - 1e6

    argv = ["--sweep-gemv"] + (["--budget", "100"] if how == "budget" else [])
    nf4, written, calls = _run(monkeypatch, tmp_path, argv, trip)
    assert len(calls) == 5
    partial = [extra for _, _, extra in written if extra["cases_complete"] is False and "skipped" not in extra]
    assert [e["cases_timed"] for e in partial] == [1, 2, 3, 4, 5] and all(e["complete"] is False for e in partial)
    name, rows, extra = written[-1]
    assert name == "nf4" and extra["complete"] is False and extra["cases_complete"] is False
    assert extra["cases_timed"] == 5 and len(extra["skipped"]) == extra["cases"] - 5 > 0
    assert extra["skip_note"].startswith("SIGINT (time limit)" if how == "sigint" else "--budget 100s reached")
    assert extra["sweep_gemv_complete"] is False and "sweep_gemv" not in extra  # no sweep started
    assert extra["copy_GBps"]  # the copy is timed first: the dequantize rows have their bandwidth share
    timed = [r for r in rows if r.get("ms") or any(r.get(p) for p in ("cublas", "nf4_gemv"))]
    assert timed
    # bench/tune.py takes nothing from tables cut short
    tune = _load("tune", monkeypatch)
    assert tune.derive({"bench": name, "rows": rows, **extra}) == {}


def test_a_cut_gemv_sweep_is_marked_and_gives_no_tiles(monkeypatch, tmp_path):
    """The tables are whole; the budget runs out during the gemv sweep (after its default and one config):
    the row it cut keeps its time, with complete false, the file says sweep_gemv_complete false, and
    bench/tune.py derives the thresholds but no gemv tiles for that M."""
    state = {}

    def trip(n, written, nf4):
        whole = [extra for _, _, extra in written if extra.get("cases_complete")]
        if whole and "at" not in state:
            state["at"] = n
        if state.get("at") is not None and n == state["at"] + 1:  # the sweep's default, then one config
            nf4.STARTED = time.perf_counter() - 1e6

    nf4, written, calls = _run(monkeypatch, tmp_path, ["--sweep-gemv", "--budget", "100"], trip)
    name, rows, extra = written[-1]
    assert extra["cases_complete"] is True and extra["complete"] is False
    assert extra["sweep_gemv_complete"] is False and "sweep_gemv" in extra["sweep_note"]
    (row,) = extra["sweep_gemv"]
    assert row["M"] == 1 and row["complete"] is False and len(row["grid"]) == 1
    # what its default_ms ran: the heuristic's tiles on its lookup (bench/tune.py names it)
    assert row["default_config"]["table"] == "gather" and row["default_config"]["steps"] == 1
    assert row["default_config"]["block_n"] >= 1 and row["default_config"]["blocks"] >= 1
    tune = _load("tune", monkeypatch)
    assert tune.gemv_baseline_name([row]) == "the heuristic's (gather table)"
    assert tune.gemv_baseline_name([{k: v for k, v in row.items() if k != "default_config"}]) == \
        "the heuristic's (byte table)"  # a sweep recorded before 2026-11-28 timed the byte table
    derived = tune.derive({"bench": name, "rows": rows, **extra})
    assert "nf4.gemv_tiles" not in derived and "nf4.fused_max_m" in derived
    # the same file with the row whole gives the tiles
    whole = dict(extra, sweep_gemv=[dict(row, complete=True)], sweep_gemv_complete=True)
    assert "nf4.gemv_tiles" in tune.derive({"bench": name, "rows": rows, **whole})


def test_a_whole_run_is_marked_complete(monkeypatch, tmp_path):
    nf4, written, calls = _run(monkeypatch, tmp_path, ["--sweep-gemv", "--sweep-dequant"], lambda *a: None)
    name, rows, extra = written[-1]
    assert extra["complete"] is True and extra["cases_complete"] is True and extra["skipped"] == []
    assert extra["sweep_gemv_complete"] is True and extra["sweep_dequant_complete"] is True
    assert all(r["complete"] for r in extra["sweep_gemv"] + extra["sweep_dequant"])
    assert extra["cases_timed"] == extra["cases"]
