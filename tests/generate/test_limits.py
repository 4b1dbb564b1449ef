"""Token buckets and the rate limiter: pacing, bursts, debts and usage correction."""

from __future__ import annotations

import asyncio
import time

import pytest

from bezoar.generate.pool import Limits, RateLimiter, TokenBucket
from bezoar.generate.request import GenerateError


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


def test_limiter_paces_requests_at_rpm():
    async def main():
        limiter = RateLimiter(rpm=1200, tpm=None, burst_s=0.25)  # 20/s, burst of 5
        t0 = time.monotonic()
        await asyncio.gather(*(limiter.acquire(0) for _ in range(25)))
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    assert 0.95 <= elapsed < 1.5  # 5 at once, then 20 more at 20/s


def test_limiter_tokens_bucket_and_settle():
    async def main():
        limiter = RateLimiter(rpm=None, tpm=6000, burst_s=1.0)  # 100 tokens/s, holds 100
        await limiter.acquire(100)
        assert limiter.tokens.level == pytest.approx(0, abs=1)
        limiter.settle(estimated=100, actual=20)  # the answer used fewer: 80 come back
        assert limiter.tokens.level == pytest.approx(80, abs=1)
        t0 = time.monotonic()
        await limiter.acquire(80)
        assert time.monotonic() - t0 < 0.05
        limiter.settle(estimated=80, actual=130)  # more than estimated: a debt of 50
        t0 = time.monotonic()
        await limiter.acquire(30)
        return time.monotonic() - t0

    assert 0.6 <= asyncio.run(main()) < 1.2  # 80 tokens to make up at 100/s


def test_no_limits_costs_nothing():
    async def main():
        limiter = RateLimiter(None, None, 0.5)
        t0 = time.perf_counter()
        for _ in range(10000):
            await limiter.acquire(1000)
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 0.5


@pytest.mark.parametrize("field,value", [("concurrency", 0), ("rpm", -1), ("max_attempts", 0), ("timeout_s", 0)])
def test_bad_limits_are_refused(field, value):
    with pytest.raises(GenerateError, match=field):
        Limits(**{field: value})
