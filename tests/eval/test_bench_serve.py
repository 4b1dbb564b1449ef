"""bench/serve.py serves one trace with continuous batching and with whole batches: in --smoke mode on
CPU (fp32) both give every request the same tokens, continuous batching needs fewer steps, and nothing is
written; the trace and its summary are what they say."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_bench_serve_smoke(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for pattern in ("offline", "online"):
        assert f"{pattern}: continuous / batched throughput" in out
        assert f"{pattern}: continuous / batched" in out and "12 of 12 requests got the same tokens" in out
    steps = {(line.split()[0], line.split()[1]): int(line.split()[-1]) for line in out.splitlines()
             if line.split()[:1] in (["offline"], ["online"]) and "steps" in line}
    assert steps[("offline", "continuous")] < steps[("offline", "batched")], steps
    assert not list(tmp_path.glob("*.json")), "smoke mode must not write results"


def test_trace_and_summary():
    bench = _bench()
    trace = bench.make_trace(200, 512, (4, 9), median_tokens=20, max_tokens=60, rate=10.0, seed=1)
    assert trace == bench.make_trace(200, 512, (4, 9), median_tokens=20, max_tokens=60, rate=10.0, seed=1)
    arrivals = [a for a, _, _ in trace]
    assert arrivals == sorted(arrivals) and 10 < arrivals[-1] < 30  # 200 arrivals at 10 a second
    assert all(4 <= len(p) <= 9 and p[0] == 1 and min(p[1:], default=3) >= 3 for _, p, _ in trace)
    tokens = sorted(m for _, _, m in trace)
    assert 1 <= tokens[0] and tokens[-1] <= 60 and 14 <= tokens[100] <= 28
    assert all(a == 0 for a, _, _ in bench.make_trace(5, 512, (4, 9), 20, 60, rate=0.0, seed=1))
    reqs = [bench.Request(0.0, [1], 2, first=0.5, done=1.0, tokens=[5, 6]),
            bench.Request(1.0, [1], 3, first=1.5, done=4.0, tokens=[5, 6, 7])]
    s = bench.summarize(reqs, steps=4)
    assert s["makespan_s"] == 4.0 and s["tokens"] == 5 and math.isclose(s["tokens_per_s"], 1.25)
    assert s["latency_s"]["mean"] == 2.0 and s["ttft_s"]["p50"] == 0.5 and s["steps"] == 4


def test_bench_serve_only_iters_and_profile(tmp_path, capsys):
    bench = _bench()
    assert bench.main(["--smoke", "--only", "online/batched", "--iters", "2"]) == 0
    assert "ran online/batched 2 times" in capsys.readouterr().out
    assert bench.main(["--smoke", "--only", "offline/continuous", "--profile", str(tmp_path / "trace")]) == 0
    assert list((tmp_path / "trace").iterdir()), "a profiler trace was written"
    assert bench.main(["--smoke", "--only", "offline/nope"]) == 2
    assert "no such case 'offline/nope'" in capsys.readouterr().err


def test_continuous_scheduler_admits_within_the_prefill_bound():
    """bench/serve.py's continuous scheduler takes arrivals as the server does (``prefill_take``): first come
    first, while rows are free and rows x longest prompt fits ``prefill_tokens``."""
    bench = _bench()

    class Batch:  # every admitted row decodes one token in the next step and ends
        def __init__(self):
            self.rows, self.admits, self.steps = [], [], 0

        @property
        def free(self):
            return 3 - len(self.rows)

        @property
        def running(self):
            return self.rows

        def admit(self, seqs):
            self.admits.append([len(s.prompt_ids) for s in seqs])
            self.rows += seqs

        def step(self):
            self.steps += 1
            for seq in self.rows:
                seq.new_ids.append(7)
                seq.should_stop(seq.new_ids)
                seq.on_done(seq)
            self.rows = []

    lengths = [5, 5, 5, 2, 9, 2]
    requests = [bench.Request(0.0, [1] * n, 1) for n in lengths]
    batch = Batch()
    assert bench.serve_continuous(batch, requests, lambda: None, prefill_tokens=12) == 4
    assert batch.admits == [[5, 5], [5, 2], [9], [2]]
    assert all(r.tokens == [7] and r.done is not None for r in requests)
    batch = Batch()
    assert bench.serve_continuous(batch, [bench.Request(0.0, [1] * n, 1) for n in lengths], lambda: None) == 2
    assert batch.admits == [[5, 5, 5], [2, 9, 2]]  # no bound: as many as rows are free
