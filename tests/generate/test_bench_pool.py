"""bench/pool.py --smoke runs every case end to end at tiny sizes and writes no results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_pool_smoke(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for case in ("pool-null-provider", "pool-compat", "pool-compat-aiohttp", "pool-openai-sdk", "pool-anthropic-sdk",
                 "raw-aiohttp", "cookbook-loop", "ratelimit-6000rpm", "refused-15pct"):
        assert f"| {case} |" in done.stdout, case
    assert list(tmp_path.iterdir()) == []  # smoke mode writes nothing


def test_bench_pool_only_unknown_case():
    done = subprocess.run([sys.executable, str(REPO / "bench" / "pool.py"), "--smoke", "--only", "nope"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "unknown case" in done.stderr
