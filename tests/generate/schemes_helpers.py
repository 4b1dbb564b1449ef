"""Helpers for the scheme tests (lamini, evol, orca, filter): scripted teachers and CLI runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from bezoar.generate.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def pool_flags(url: str, *extra: str) -> list[str]:
    return ["--provider", "compat", "--base-url", url, "--model", "teacher", "--no-progress", *extra]


def run(command: str, *args: str, url: str = "http://127.0.0.1:9/v1") -> int:
    """Run ``python -m bezoar.generate COMMAND ARGS`` in this process; returns the exit code."""
    return main([command, *map(str, args), *pool_flags(url)])


def run_subprocess(command: str, *args: str, url: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bezoar.generate", command, *map(str, args), *pool_flags(url)],
                          capture_output=True, text=True, cwd=REPO, timeout=timeout, env=dict(os.environ))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def store_keys_unique(folder: Path) -> int:
    """Every store under ``folder/work`` holds each key once; returns the number of records."""
    total = 0
    for store in sorted((folder / "work").glob("*.jsonl")):
        keys = [r["key"] for r in read_jsonl(store)]
        assert len(keys) == len(set(keys)), f"{store} holds a key twice"
        total += len(keys)
    return total


class CallLog:
    """A reply callable wrapper that remembers every call it answered (thread-safe)."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []
        self._lock = threading.Lock()

    def __call__(self, call):
        with self._lock:
            self.calls.append(call)
        return self.reply(call)

    def system_of(self, call) -> str | None:
        for message in call.messages:
            if message.get("role") == "system":
                return message.get("content")
        return call.system


def between(text: str, start: str, end: str) -> str:
    """The part of ``text`` after ``start`` and before the next ``end``."""
    return text.split(start, 1)[1].split(end, 1)[0]
