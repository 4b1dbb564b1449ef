"""429s that name no wait (a server over its own limit on requests at once, or one that refuses a share of the
calls at any load): what the pool's endpoint state sends at once, on a virtual clock, and end to end."""

from __future__ import annotations

import asyncio
import heapq
import random
import time

from bezoar.generate import pool as pool_module
from bezoar.generate.pool import Pool
from bezoar.generate.providers import RETRY, Endpoint, ProviderError, Reply
from tests.generate.conftest import chat_requests, fast_limits


class _Clock:
    now = 0.0

    def monotonic(self) -> float:
        return self.now


def _simulate(monkeypatch, seconds: float, *, concurrency: int = 64, limit=None, share: float = 0.0,
              latency: float = 0.05, jitter: float = 0.8, backoff: float = 0.01, seed: int = 0):
    """The pool's sending against one endpoint, 1 ms a step: as many requests as the pool's window holds
    (2 x ``concurrency``), each sent whenever fewer than ``allowed`` are in flight, answered after ``latency``
    (+- ``jitter`` of it) or refused at once with a 429 naming no wait, then sent again ``backoff`` later.
    The server refuses what it holds beyond ``limit(now)`` (None: no limit) and, at random, ``share`` of the
    calls. Deterministic (a seeded generator, a virtual clock), so the assertions check the tracker's
    arithmetic, not a machine's timing. Returns the state, the answer times, the refusal times and the
    ``allowed`` of every step."""
    clock = _Clock()
    monkeypatch.setattr(pool_module, "time", clock)
    rng = random.Random(seed)
    state = pool_module._EndpointState(Endpoint("compat", "http://fake/v1"), None,
                                       pool_module.Limits(concurrency=concurrency))
    in_flight: list = []  # (answer time, tie-break, the send's record)
    backing_off: list[float] = []  # when each refused request goes again
    answers: list[float] = []
    refusals: list[float] = []
    allowed: list[float] = []
    sends = 0
    for step in range(int(seconds * 1000)):
        clock.now = now = step / 1000
        while in_flight and in_flight[0][0] <= now:
            _, _, record = heapq.heappop(in_flight)
            state.outstanding -= 1
            state.answered(record)
            answers.append(now)
        while backing_off and backing_off[0] <= now:
            heapq.heappop(backing_off)
        while state.outstanding < state.allowed and len(in_flight) + len(backing_off) < 2 * concurrency:
            state.outstanding += 1
            record = state.sent(now)
            sends += 1
            full = limit is not None and len(in_flight) >= limit(now)
            if full or rng.random() < share:
                state.outstanding -= 1
                state.overloaded(now, record)
                refusals.append(now)
                heapq.heappush(backing_off, now + backoff)
            else:
                heapq.heappush(in_flight, (now + latency * (1.0 + jitter * (2.0 * rng.random() - 1.0)), sends, record))
        allowed.append(state.allowed)
    return state, answers, refusals, allowed


def _per_s(times, since: float, until: float) -> float:
    return sum(1 for t in times if since <= t < until) / (until - since)


def test_refusals_at_any_load_do_not_cut_what_is_sent_at_once(monkeypatch):
    """5% and 15% of the calls refused at random, whatever the load: each refusal halved what was sent at once,
    and 64 at once ran at about 20 (measured through the pool: 3,000 requests of 50 ms took 24 s and 41 s, not
    2.5). The refusals come as often with fewer in flight, so they cut nothing now."""
    for share in (0.05, 0.15, 0.30):
        state, answers, refusals, allowed = _simulate(monkeypatch, 4.0, share=share)
        ideal = 64 / 0.05  # answered a second at 64 in flight (a refusal holds no slot)
        answered = _per_s(answers, 1.0, 4.0)
        assert answered >= 0.9 * ideal, f"{share:.0%} refused: {answered:.0f} answered a second of {ideal:.0f}"
        assert min(allowed[1000:]) >= 48, f"{share:.0%} refused: cut to {min(allowed[1000:]):.1f} of 64"


def test_a_limit_on_requests_at_once_is_still_found(monkeypatch):
    """A server holding 24 at once, alone and behind 5% refused at random: what is sent at once stays about
    the limit (halved on its refusals, grown back with the answers), and the limit's refusals stay few."""
    for share in (0.0, 0.05):
        state, answers, refusals, allowed = _simulate(monkeypatch, 6.0, limit=lambda now: 24, share=share)
        ideal = 24 / 0.05
        answered = _per_s(answers, 1.0, 6.0)
        mean_allowed = sum(allowed[1000:]) / len(allowed[1000:])
        assert 0.6 * ideal <= answered <= 1.05 * ideal, f"{share:.0%}: {answered:.0f} answered a second of {ideal:.0f}"
        assert 12 <= mean_allowed <= 26, f"{share:.0%}: {mean_allowed:.1f} allowed on average against a limit of 24"
        # what a limit refuses: a few a cycle of halving and regrowth, not a storm
        over_limit = _per_s(refusals, 1.0, 6.0) - share * _per_s(answers, 1.0, 6.0) / (1 - share)
        assert over_limit <= 0.1 * answered, f"{share:.0%}: {over_limit:.0f} refused a second over the share"


def test_a_limit_that_falls_is_followed_within_a_few_refusals(monkeypatch):
    """16 at once answered for a second, then the server holds 4 (another client took the rest): the old
    answers at 16 in flight must not hide the new refusals (sends are judged on the last ones only)."""
    state, answers, refusals, allowed = _simulate(monkeypatch, 3.0, concurrency=16,
                                                  limit=lambda now: 16 if now < 1.0 else 4)
    assert min(allowed[:1000]) == 16  # no cut while nothing was refused
    assert max(allowed[1100:]) <= 8, f"still {max(allowed[1100:]):.1f} at once 0.1 s after the fall to 4"
    assert len([t for t in refusals if 1.0 <= t < 1.1]) <= 24
    assert _per_s(answers, 1.5, 3.0) >= 0.6 * 4 / 0.05


def test_a_refusal_with_nothing_else_in_flight_cuts_nothing(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(pool_module, "time", clock)
    state = pool_module._EndpointState(Endpoint("compat", "http://fake/v1"), None,
                                       pool_module.Limits(concurrency=8))
    for step in range(4):
        clock.now = step / 10
        state.outstanding = 1
        record = state.sent(clock.now)
        state.outstanding = 0
        state.overloaded(clock.now, record)
    assert state.allowed == 8  # fewer than one at once cannot be sent
    # without a record (a caller that does not say what was in flight) it halves, as before
    clock.now = 1.0
    state.outstanding = 3
    state.overloaded(clock.now)
    assert state.allowed == 2.0


class _Flaky:
    """A server that refuses ``share`` of the calls at random with a 429 naming no wait (seeded), and answers
    the others after ``latency`` (+- 80%)."""

    def __init__(self, share: float, latency: float, seed: int = 0):
        self.share, self.latency, self.rng = share, latency, random.Random(seed)
        self.refused = self.active = self.peak = 0

    async def open(self):
        pass

    async def close(self):
        pass

    async def send(self, request, model, timeout):
        if self.rng.random() < self.share:
            self.refused += 1
            raise ProviderError("rate limited (HTTP 429): Model is overloaded", RETRY, status=429,
                                rate_limited=True)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.latency * (0.2 + 1.6 * self.rng.random()))
        finally:
            self.active -= 1
        return Reply("ok", 1, 1, "stop")


def test_a_server_refusing_a_share_at_any_load_is_sent_as_many_at_once_end_to_end():
    """Through the pool: 1,000 requests of 20 ms (+- 80%), 64 at once, 15% refused at random with no wait named.
    The pool halved on those until it sent 8-20 at once: 5.4-5.9 s where 0.31 s is the ideal (0.36-0.38 s now)."""
    server = _Flaky(0.15, 0.02)

    async def main():
        async with Pool(Endpoint("compat", "http://fake/v1"), fast_limits(concurrency=64, max_attempts=20), None,
                        model="m", provider_factory=lambda e, connections: server) as pool:
            t0 = time.monotonic()
            results = await pool.run(chat_requests(1000))
            return results, pool.stats, time.monotonic() - t0

    results, stats, elapsed = asyncio.run(main())
    assert all(r.ok for r in results)
    assert stats.rate_limited == server.refused > 100
    ideal = 1000 / 64 * 0.02
    assert elapsed < 3 * ideal, f"{elapsed:.2f} s for what takes {ideal:.2f} s at 64 at once"
