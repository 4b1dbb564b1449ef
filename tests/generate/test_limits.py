"""Token buckets and the rate limiter: pacing, bursts, debts and usage correction."""

from __future__ import annotations

import asyncio

import pytest

from bezoar.generate import pool as pool_module
from bezoar.generate.pool import Limits, RateLimiter, TokenBucket
from bezoar.generate.request import GenerateError

_real_sleep = asyncio.sleep


class VirtualClock:
    """``time.monotonic`` and ``asyncio.sleep`` as the pool module sees them: a sleep moves the clock on by
    exactly its length (and yields to the loop once). The limiter's pacing is then its own arithmetic,
    exact on any machine; measured in wall time, a loaded machine's late wake-ups (or an idle one's
    early start) decided the upper bounds."""

    def __init__(self):
        self.now = 0.0
        self.sleeps: list[float] = []
        self.reads = 0

    def monotonic(self) -> float:
        self.reads += 1
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        assert len(self.sleeps) < 10000, "the limiter keeps sleeping without the clock moving it on"
        # At least a microsecond, as a real sleep takes: a wait that rounding leaves at 1e-16 s would
        # otherwise not move the clock at all.
        self.now += max(1e-6, seconds)
        await _real_sleep(0)


class _AsyncioWithSleep:
    """The asyncio module, but with another ``sleep`` (only for the module that is given it)."""

    def __init__(self, sleep):
        self.sleep = sleep

    def __getattr__(self, name):
        return getattr(asyncio, name)


@pytest.fixture
def clock(monkeypatch) -> VirtualClock:
    clock = VirtualClock()
    monkeypatch.setattr(pool_module, "time", type("VirtualTime", (), {"monotonic": staticmethod(clock.monotonic)}))
    monkeypatch.setattr(pool_module, "asyncio", _AsyncioWithSleep(clock.sleep))
    return clock


def test_bucket_starts_full_and_refills_at_rate():
    bucket = TokenBucket(per_minute=600, burst_s=0.5)  # 10/s, holds 5
    assert bucket.capacity == 5
    now = bucket.stamp
    for _ in range(5):
        assert bucket.wait_s(1, now) == 0.0
        bucket.take(1)
    assert bucket.wait_s(1, now) == pytest.approx(0.1)
    assert bucket.wait_s(1, now + 0.1) == pytest.approx(0.0, abs=1e-9)
    assert bucket.wait_s(1, now + 100) == 0.0 and bucket.level == 5  # never above capacity


def test_a_charge_bigger_than_the_bucket_waits_for_full_then_leaves_a_debt():
    bucket = TokenBucket(per_minute=60, burst_s=2)  # 1/s, holds 2
    now = bucket.stamp
    assert bucket.wait_s(10, now) == 0.0  # full bucket: a 10-token charge may go
    bucket.take(10)
    assert bucket.level == -8
    assert bucket.wait_s(1, now) == pytest.approx(9.0)  # the debt is paid back at the rate


def test_limiter_paces_requests_at_rpm(clock):
    async def main():
        limiter = RateLimiter(rpm=1200, tpm=None, burst_s=0.25)  # 20/s, burst of 5
        t0 = clock.now
        granted = []

        async def one():
            await limiter.acquire(0)
            granted.append(clock.now - t0)

        await asyncio.gather(*(one() for _ in range(25)))
        return granted

    granted = asyncio.run(main())
    # 5 at once, then 20 more at 20/s: one every 50 ms, the last after 1 s, none sooner or later
    assert granted == pytest.approx([0.0] * 5 + [0.05 * k for k in range(1, 21)], abs=1e-4)


def test_limiter_tokens_bucket_and_settle(clock):
    async def main():
        limiter = RateLimiter(rpm=None, tpm=6000, burst_s=1.0)  # 100 tokens/s, holds 100
        await limiter.acquire(100)
        assert limiter.tokens.level == pytest.approx(0, abs=1e-9) and clock.sleeps == []
        limiter.settle(estimated=100, actual=20)  # the answer used fewer: 80 come back
        assert limiter.tokens.level == pytest.approx(80, abs=1e-9)
        await limiter.acquire(80)
        assert clock.sleeps == []  # they were there: no wait
        limiter.settle(estimated=80, actual=130)  # more than estimated: a debt of 50
        t0 = clock.now
        await limiter.acquire(30)
        return clock.now - t0

    assert asyncio.run(main()) == pytest.approx(0.8, abs=1e-4)  # 80 tokens to make up at 100/s


def test_no_limits_costs_nothing(clock):
    # Without limits an acquire returns at once: it never suspends (no wait for the lock, no sleep, no
    # turn of the event loop) and never reads the clock. (Timing 10000 of them against 0.5 s measured the machine.)
    limiter = RateLimiter(None, None, 0.5)
    assert not limiter.active
    for _ in range(10000):
        call = limiter.acquire(1000)
        with pytest.raises(StopIteration):
            call.send(None)  # finished on its first step
    assert clock.reads == 0 and clock.sleeps == []


@pytest.mark.parametrize("field,value", [("concurrency", 0), ("rpm", -1), ("max_attempts", 0), ("timeout_s", 0)])
def test_bad_limits_are_refused(field, value):
    with pytest.raises(GenerateError, match=field):
        Limits(**{field: value})
