"""Progress line and end-of-run summary for the generation pool (on stderr).

On a terminal the line is redrawn in place twice a second; otherwise (a log file, CI) one line is
printed every ``log_interval_s`` seconds. The line shows done / failed / in flight (out of the total
when known), requests per second over the last seconds and overall, tokens in and out, and the
cost when a price table was given.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import deque


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, stats, stream=None, interval_s: float = 0.5, log_interval_s: float = 10.0):
        self.stats = stats
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval_s = interval_s if self.tty else log_interval_s
        self._recent: deque = deque(maxlen=20)  # (time, calls finished) for the recent rate

    def line(self) -> str:
        s = self.stats
        now = time.monotonic()
        ended = s.done + s.failed
        self._recent.append((now, ended))
        t0, n0 = self._recent[0]
        recent = (ended - n0) / (now - t0) if now - t0 > 0.2 else 0.0
        elapsed = max(now - s.started, 1e-9)
        total = f"/{s.total}" if s.total is not None else ""
        parts = [f"{s.finished}{total} finished: {s.done} done, {s.failed} failed, {s.cached + s.shared} reused",
                 f"{s.inflight} in flight", f"{recent:.1f} req/s now, {ended / elapsed:.1f} avg",
                 f"tokens in {_si(s.tokens_in)} out {_si(s.tokens_out)}"]
        if s.retries:
            parts.append(f"{s.retries} retries ({s.rate_limited} rate-limited)")
        if s.cost:
            parts.append(f"${s.cost:.2f}")
        parts.append(_clock(elapsed))
        return " | ".join(parts)

    def draw(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.draw()

    def finish(self, summary: bool = True) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        if summary:
            self.stream.write(run_summary(self.stats) + "\n")
        self.stream.flush()


def run_summary(stats) -> str:
    """A few lines that close a run: counts, speed, tokens, cost, errors seen."""
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    ended = stats.done + stats.failed
    lines = [
        f"finished {stats.finished} requests in {_clock(elapsed)}: {stats.done} answered, {stats.failed} failed, "
        f"{stats.cached} already stored, {stats.shared} duplicates",
        f"{stats.calls} calls, {stats.retries} retries, {stats.rate_limited} rate-limited answers; "
        f"{ended / elapsed:.1f} requests/s; tokens in {_si(stats.tokens_in)}, out {_si(stats.tokens_out)}"
        + (f"; cost ${stats.cost:.4f}" if stats.cost else ""),
    ]
    if stats.errors:
        lines.append("errors: " + ", ".join(f"{k} x{v}" for k, v in stats.errors.most_common()))
    return "\n".join(lines)
