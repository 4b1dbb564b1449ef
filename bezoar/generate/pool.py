"""Asyncio client pool: many LLM API calls at the provider's rate limit, fault-tolerant, never twice.

Use::

    from bezoar.generate.pool import Pool, Limits, Endpoint, Request

    endpoints = [Endpoint("compat", "http://gpu1:8000/v1"), Endpoint("compat", "http://gpu2:8000/v1")]
    async with Pool(endpoints, Limits(concurrency=128, rpm=6000), "out.jsonl", model="teacher") as pool:
        results = await pool.run(requests)          # list of Result, in input order
        async for result in pool.map(requests):     # or: streamed, in completion order
            ...
        result = await pool.submit(request)         # or: one call, from any number of tasks

    results = run_sync(requests, endpoints, Limits(rpm=500), "out.jsonl", model="gpt-4o-mini")

What a call goes through (``submit``):

1. key = ``request.key(model)``. A key in the store returns the stored Result (``cached``), no
   call. A key already in flight shares that call's Result. So one key costs at most one call.
2. A concurrency slot (``Limits.concurrency``).
3. An endpoint serving the model: the one with the fewest outstanding requests among those not
   cooling down (after a 429 / Retry-After), not held by its learned rate (below) and not down
   (after ``down_after`` connection failures in a row; retried after 1, 2, 4 ... 30 s). Then the
   rate buckets: requests per minute and tokens per minute (token buckets holding ``burst_s``
   seconds of rate, full at start), taken one request at a time and only while an endpoint is ready: requests held back
   by a pause do not hold tokens, so when the pause ends they leave at the rate, not together.
   Tokens are estimated before the call (prompt characters / 4 + max_tokens) and corrected by
   the usage the answer reports.
4. The call. On a retryable error (429, 408, 409, 5xx, timeout, dropped connection, malformed
   body) it waits Retry-After / retry-after-ms when given, else an exponential back-off with
   jitter (base * 2**n, halved at random, at most ``backoff_max_s``), and tries again, up to
   ``max_attempts``. A 429 with a Retry-After (a provider's rate limit), where more than a tenth of the
   calls were refused, also pauses the endpoint for everyone for as much of the wait as the server
   surely meant (a whole-second value is rounded up, so one second less), and cuts the rate the
   endpoint is sent to what the provider took since the last cut, over at most 2 s (to no less than
   half the rate it was sending, and not for a few stray 429s: a request's n-th refusal weighs 1/n);
   the rate grows back quickly to the rate the provider last took, then by a tenth a second. Two
   probes after each cut tell a limit on the rate from refusals that come at any rate (a share still
   refused below the rate the provider answered), which are then tolerated rather than cut for. So a
   refused burst comes back at the provider's rate, not as a burst, a limit of 100 requests a second is
   not paced down to one a second by ``retry-after: 1``, and 15% of the calls refused at random do not
   take the rate down to nothing. Such 429s do not use up a request's attempts while others are
   answered (see ``Limits.max_attempts``). A 429 without a wait (a server over its own limit on
   requests at once) halves what is sent to that endpoint at once, which its answers then grow back
   (by one an answer to just below where it was cut, then by one per window); not where such 429s come
   as often with fewer requests in flight (a share refused at any load), and such a refusal waits a
   tenth of the back-off where others were answered since its last call (several clients of one server:
   most calls refused, a cut whatever the number in flight). An endpoint that times out ``down_after``
   times in a row goes out of rotation as an unreachable one does. A request error (400, 422, ...) ends
   it at once. Either way the Result is appended to the store before ``submit`` returns.
5. Fatal errors (bad key, unknown model, exhausted quota, every endpoint unreachable, a store
   that cannot be written) stop the whole pool: every ``submit``/``map``/``run`` raises
   :class:`PoolError` with one clear message. Answers already received are stored (as far as the
   store can still write); nothing is recorded for the requests cut short.
6. Ctrl-C (asyncio.run cancels the main task, inside ``run`` / ``map`` or the ``async with``): nothing
   more is sent (requests waiting for a slot, the rate or a retry are dropped), the requests already
   at the provider are waited for, each for at most its own timeout (``Limits.timeout_s``), and
   their answers stored as usual; then the cancellation goes on (KeyboardInterrupt, exit 130). A
   second Ctrl-C abandons them at once. Any cancellation of the task awaiting ``run`` / ``map`` does the
   same (a ``wait_for`` around it returns only once those answers are in); the pool then serves later
   calls as usual. A caller of ``submit`` cancelled on its own still cancels its call. Python 3.11 and
   later: before, asyncio.run cancels every task at once on Ctrl-C, and nothing is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections import Counter, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Iterable, Sequence

from bezoar.generate.progress import Progress
from bezoar.generate.providers import FATAL, REQUEST, Endpoint, ProviderError, make_provider
from bezoar.generate.request import GenerateError, Request, Result, Usage, estimate_tokens
from bezoar.generate.store import JSONLStore, StoreError, open_store

log = logging.getLogger("bezoar.generate")

__all__ = ["Pool", "Limits", "Endpoint", "Request", "Result", "Usage", "PoolError", "PoolStats", "run_sync"]


# The rate an endpoint learns from 429s that name a wait (see _EndpointState.rate_limited): measured over this
# window; cut only where more than RATE_REFUSED of the calls sent there (and at least RATE_REFUSED_MIN) were
# refused, a request's n-th refusal weighing 1/n, to no less than half the rate being sent nor RATE_MIN requests a
# second; grown back by RATE_GROWTH_FAST a second up to the rate last measured taken, by RATE_GROWTH beyond it;
# dropped once past RATE_UNBOUNDED.
RATE_WINDOW_S = 2.0
RATE_REFUSED = 0.1
RATE_REFUSED_MIN = 3
RATE_MIN = 0.1
RATE_GROWTH = 1.1
RATE_GROWTH_FAST = 4.0
RATE_GOOD_HALF_LIFE_S = 30.0
PACE_SLACK_S = 0.005
RATE_UNBOUNDED = 1e6
# Refusals a cut does not remove (a provider that refuses a share of the calls at any rate: a shared key, a
# flaky gateway): each cut is followed by probes of RATE_PROBE_SENDS calls (or RATE_PROBE_S, at least
# RATE_PROBE_MIN calls) at a held rate (see _EndpointState._judge_probe). A share still refused below the rate the
# provider answered is the endpoint's background: cuts then need RATE_REFUSED over it, a 429 within it pauses
# nobody else, and it fades with RATE_GOOD_HALF_LIFE_S unless the refusals keep it up. Where no more than
# RATE_REFUSED of the calls in the window (over the background) were refused, past the window's first tenth, a
# 429 pauses only its own request: at 5% random refusals naming 20 ms, the pauses for everyone took 4.5 x the
# time. Before this, 15% refused at any rate cut the rate on every round trip: 2,000 requests took 32.5 s, not 1.
RATE_PROBE_SENDS = 50
RATE_PROBE_S = 1.0
RATE_PROBE_MIN = 10
# 429s that name no wait (a server over its own limit on requests at once) halve what is sent at once, except
# where they come about as often with fewer requests in flight (see _EndpointState.overloaded). Each endpoint keeps,
# for each number in flight at a send, the answers and such refusals that followed (halved past LEVEL_MEMORY calls
# at a number), and its last sends in the order sent (judged: those made no later than the refused one, at no more
# in flight than may be sent at once now). A refusal cuts where, among the last LEVEL_RECENT judged sends with as
# many in flight or more, so many were refused that a share RATE_REFUSED over the share refused with fewer in flight
# gives that many with probability under LEVEL_ALPHA; or where more of all the last LEVEL_RECENT judged sends
# (LEVEL_RECENT_MIN at least) were refused than a share of LEVEL_REFUSED_MOST gives with that probability; or where
# the number in flight was refused more often than not before.
# After a cut, what is sent at once grows back by one an answer up to LEVEL_FAST_MARGIN below the number in flight
# that was cut for, then by one a window of answers.
LEVEL_MEMORY = 64
LEVEL_RECENT = 64
LEVEL_ALPHA = 1e-3
LEVEL_REFUSED_MOST = 0.5
LEVEL_RECENT_MIN = 16
LEVEL_FAST_MARGIN = 2.0
# A request refused by a rate limit while the endpoint answered others is sent at most this many times
# max_attempts in all (see Limits.max_attempts).
CONTENDED_CALLS = 4
# ... and one refused with a 429 naming no wait in that case waits this share of the back-off.
CONTENDED_BACKOFF = 0.1


class PoolError(GenerateError):
    """The pool stopped: nothing more can succeed (bad key, unknown model, unreachable endpoints,
    a store that cannot be written)."""


@dataclass
class Limits:
    """How hard the pool may push.

    concurrency: requests in flight at once (over all endpoints)
    rpm, tpm: requests and tokens (input + output) per minute over all endpoints; None = no limit
    burst_s: seconds of rpm/tpm the buckets hold; kept below a second so that arrival jitter at
        the provider stays inside its own bucket
    timeout_s: per attempt
    max_attempts: per request, the first included; a 429 does not count where other requests were answered
        since this one's last call (it lost a race for the provider's rate, and says nothing of itself), up
        to ``CONTENDED_CALLS`` x ``max_attempts`` calls in all
    backoff_base_s, backoff_max_s: exponential back-off when the provider gives no Retry-After (a tenth of
        it after a 429 naming no wait that comes at any load while others are answered: see
        ``_EndpointState.overloaded``)
    default_output_tokens: what a request without max_tokens is charged in the tpm bucket up front
    down_after: connection failures (a connection that never opens included) or timeouts in a row after
        which an endpoint that has answered before is taken out of rotation (one that never answered: after
        its first connection failure)
    outage_s: how long every endpoint may be down before the pool gives up (if none answered
        yet in this run, it gives up at once: that is a wrong URL, not an outage)
    """

    concurrency: int = 64
    rpm: float | None = None
    tpm: float | None = None
    burst_s: float = 0.5
    timeout_s: float = 600.0
    max_attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    default_output_tokens: int = 512
    down_after: int = 3
    outage_s: float = 300.0

    def __post_init__(self) -> None:
        checks = {
            "concurrency": self.concurrency >= 1, "burst_s": self.burst_s > 0, "timeout_s": self.timeout_s > 0,
            "max_attempts": self.max_attempts >= 1, "backoff_base_s": self.backoff_base_s >= 0,
            "backoff_max_s": self.backoff_max_s >= 0, "default_output_tokens": self.default_output_tokens >= 0,
            "down_after": self.down_after >= 1, "outage_s": self.outage_s >= 0,
            "rpm": self.rpm is None or self.rpm > 0, "tpm": self.tpm is None or self.tpm > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            error = GenerateError(f"invalid limits: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")
            error.fields = bad  # for a command line to name its flags
            raise error


class TokenBucket:
    """``per_minute`` tokens a minute, holding at most ``burst_s`` seconds' worth (at least 1).

    The level may go negative: a charge larger than the bucket waits for a full bucket and then
    leaves a debt, so the long-run rate holds for any size of charge."""

    def __init__(self, per_minute: float, burst_s: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def wait_s(self, cost: float, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, cost: float) -> None:
        self.level -= cost

    def credit(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Requests-per-minute and tokens-per-minute buckets behind one FIFO lock (one waiter sleeps
    at a time, so waiting costs one timer, not one per waiting request)."""

    def __init__(self, rpm: float | None, tpm: float | None, burst_s: float):
        self.requests = TokenBucket(rpm, burst_s) if rpm else None
        self.tokens = TokenBucket(tpm, burst_s) if tpm else None
        self.active = self.requests is not None or self.tokens is not None
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: float, ready=None):
        """Wait for room in the buckets and take it. With ``ready`` (a function returning what to send
        to, or None), the room is taken only if ``ready()`` gives something once the wait is over, and
        that is returned; else None, and nothing is taken: a request whose endpoint paused meanwhile
        must not hold tokens through the pause."""
        if self.requests is None and self.tokens is None:
            return ready() if ready is not None else True
        async with self._lock:
            while True:
                now = time.monotonic()
                wait = max(self.requests.wait_s(1.0, now) if self.requests else 0.0,
                           self.tokens.wait_s(tokens, now) if self.tokens else 0.0)
                if wait <= 0.0:
                    break
                await asyncio.sleep(wait)
            target = ready() if ready is not None else True
            if target is None:
                return None
            if self.requests:
                self.requests.take(1.0)
            if self.tokens:
                self.tokens.take(tokens)
            return target

    def settle(self, estimated: float, actual: float) -> None:
        """Correct the tokens bucket once the answer tells the real usage."""
        if self.tokens is not None:
            self.tokens.credit(estimated - actual)


class _EndpointState:
    """One endpoint's provider and health, as the picker sees it."""

    def __init__(self, endpoint: Endpoint, provider, limits: Limits):
        self.endpoint, self.provider, self.label = endpoint, provider, endpoint.label
        self.limits = limits
        self.outstanding = 0
        self.cooldown_until = 0.0  # after a 429 / Retry-After: nobody sends here before this
        # Requests a second it is sent, learned from 429s that name a wait (a provider's rate limit): cut to what
        # the provider took on each 429, grown back by RATE_GROWTH a second. Unbounded until the first such 429.
        self.rate_base = math.inf
        self.rate_cut_at = -math.inf
        self.rate_good = math.inf  # the rate the provider was last measured to take: regrown to quickly
        self.rate_good_at = 0.0
        self.next_send = 0.0  # paced sends: none before this
        self.sends: deque[float] = deque()  # send times within RATE_WINDOW_S
        # (send time, 1 / the request's refusals so far) of the 429s that named a wait
        self.refused: deque[tuple[float, float]] = deque()
        # The probe after a cut: the share before it, the rate being sent then, the send times since (at most
        # RATE_PROBE_SENDS) and their refusals (weighted as in ``refused``); None once judged (see RATE_PROBE_SENDS).
        self.probe: dict | None = None
        self.background = 0.0  # share of the calls refused at any rate, learned by a probe
        self.background_at = 0.0
        self.refusal_rtt = 0.0  # how long the last 429 took to come back
        self.down_until = 0.0  # taken out of rotation after connection failures
        self.down_since: float | None = None
        self.connect_failures = 0
        self.probe_s = 1.0
        self.probe_from = 0.0  # a failure of a request sent before this is not a failed probe
        # Requests it may hold at once: cut by half on a 429 that names no wait (a server over its own limit on
        # requests at once, as TGI's --max-concurrent-requests answers), grown by one per window of answers.
        self.allowed = float(limits.concurrency)
        self.last_cut = 0.0
        # per number of requests in flight here at a send (this one included): answers and no-wait 429s since
        self.level_answered = [0.0] * (limits.concurrency + 1)
        self.level_refused = [0.0] * (limits.concurrency + 1)
        # [number in flight, refused (None while in flight), send time] of the last sends; long enough to hold
        # LEVEL_RECENT of them sent before those whose refusal may still be on its way (about one send per slot)
        self.level_recent: deque[list] = deque(maxlen=LEVEL_RECENT + 2 * limits.concurrency)
        self.cut_level = 0.0  # the number in flight the last cut was for
        self.ever_answered = False
        self.last_error = ""

    @property
    def ready_at(self) -> float:
        return max(self.cooldown_until, self.down_until, self.next_send)

    def rate(self, now: float) -> float:
        """Requests a second this endpoint may be sent now (inf: no limit learned, or grown past any use): the rate
        of the last cut, grown by RATE_GROWTH_FAST a second up to ``rate_good`` and by RATE_GROWTH beyond."""
        if self.rate_base == math.inf:
            return math.inf
        if self.probe is not None:
            return self.rate_base  # held at the cut's rate while the probe measures it
        log_rate, left = math.log(self.rate_base), max(0.0, now - self.rate_cut_at)
        if self.rate_base < self.rate_good:
            fast = min(left, (math.log(self.rate_good) - log_rate) / math.log(RATE_GROWTH_FAST))
            log_rate, left = log_rate + fast * math.log(RATE_GROWTH_FAST), left - fast
        log_rate += left * math.log(RATE_GROWTH)
        return math.exp(log_rate) if log_rate < math.log(RATE_UNBOUNDED) else math.inf

    def _forget(self, now: float) -> None:
        while self.sends and self.sends[0] < now - RATE_WINDOW_S:
            self.sends.popleft()
        while self.refused and self.refused[0][0] < now - RATE_WINDOW_S:
            self.refused.popleft()

    def sent(self, now: float) -> list:
        """A request goes out now (counted in ``outstanding``): note it for the rate estimate and pace the next
        one. A send woken late leaves a little credit (PACE_SLACK_S): asyncio's timers fire to the millisecond, and
        paced one send per wake a pool ran at most about 1,000 a second. Returns the send's record, for
        ``answered`` and ``overloaded``."""
        record = [min(max(self.outstanding, 1), len(self.level_answered) - 1), None, now]  # None: no outcome yet
        self.level_recent.append(record)
        self._forget(now)
        self.sends.append(now)
        probe = self.probe
        if probe is not None:
            if len(probe["sends"]) < RATE_PROBE_SENDS and now < probe["at"] + RATE_PROBE_S:
                probe["sends"].append(now)
            elif now - self._probe_end(probe) > 2.0 * self.refusal_rtt + 0.01:
                self._judge_probe(probe, now)  # no 429 came to judge it: its refusals are in
        rate = self.rate(now)
        if rate != math.inf:
            self.next_send = max(now - PACE_SLACK_S, self.next_send) + 1.0 / rate
        return record

    def _level_note(self, record: list | None, refused: bool) -> None:
        if record is None:
            return
        level = record[0]
        record[1] = refused
        (self.level_refused if refused else self.level_answered)[level] += 1.0
        if self.level_answered[level] + self.level_refused[level] > LEVEL_MEMORY:
            self.level_answered[level] *= 0.5
            self.level_refused[level] *= 0.5

    def answered(self, record: list | None = None) -> None:
        """The request whose send returned ``record`` was answered."""
        self._level_note(record, False)
        self.ever_answered = True
        if self.allowed < self.limits.concurrency:
            # quickly back to just below what was cut for (halved there, a limit of 24 at once ran at 77% of it;
            # 94% now), then slowly, to find out whether the limit has risen
            fast = self.allowed + 1.0 < self.cut_level - LEVEL_FAST_MARGIN
            self.allowed = min(float(self.limits.concurrency), self.allowed + (1.0 if fast else 1.0 / self.allowed))
        if self.connect_failures or self.down_since is not None:
            if self.down_since is not None:
                log.info("%s is back", self.label)
            self.connect_failures, self.probe_s, self.down_until, self.down_since = 0, 1.0, 0.0, None

    def overloaded(self, sent_at: float, record: list | None = None) -> bool:
        """A 429 without Retry-After to a request sent at ``sent_at`` (``record``: what its send returned): the
        server refuses what it holds beyond its own limit. Halve the requests sent to it at once, once per window
        (the refusals of requests sent before the last cut are its echo). Returns whether the refusal was taken
        for one that comes at any load (neither a cut nor an echo).

        Not where calls sent with fewer in flight were refused about as often: a server that refuses a share at
        any load (a flaky proxy, a gateway that sheds calls at random), which fewer at once would not change. Cut
        on each such refusal, 5% of them held 16 at once to about 6, and 64 at once to about 20 (3.7 x and 10 x
        the time). A limit on requests at once refuses only above it, so its refusals where fewer went through
        still cut; about four of them make a cut (one did before), one where the number in flight was refused
        more often than not before, and a refusal with nothing else in flight makes none. Several clients of one
        server refuse by their sum, at any number in flight of each: there, most of the calls are refused, and
        that cuts too. See ``_refused_with_load``."""
        self._level_note(record, True)
        if record is not None:
            self._not_held(record)
        if sent_at < self.last_cut:
            return False
        if record is None:
            level = min(self.allowed, self.outstanding + 1.0)
        else:
            if not self._refused_with_load(record[0], sent_at):
                return True
            # in flight at its send, less the refusals then on their way (see _not_held): what the server held of ours
            # then, this one besides (uncorrected, a limit of 24 at once answering its 429s late was taken for 43)
            level = min(self.allowed, record[0])
        self.cut_level = level
        self.allowed = max(1.0, level / 2.0)
        self.last_cut = time.monotonic()
        return False

    def _not_held(self, record: list) -> None:
        """``record``'s request was refused: the sends made while its refusal was on its way had one fewer in flight
        at the server than counted. Without this, a server that answers its 429s as late as its answers showed
        sends at 40 in flight answered under a limit of 24, and its refusals were taken for ones at any load."""
        for other in reversed(self.level_recent):
            if other[2] <= record[2]:
                break
            if other[0] > 1:
                if other[1] is not None:  # already counted at its old number in flight: move it (no more than
                    # is left there since LEVEL_MEMORY halved it; a whole one drove a count to -32.5)
                    memory = self.level_refused if other[1] else self.level_answered
                    moved = min(1.0, memory[other[0]])
                    memory[other[0]] -= moved
                    memory[other[0] - 1] += moved
                other[0] -= 1

    def _refused_with_load(self, level: int, sent_at: float) -> bool:
        """Whether no-wait 429s come more often with ``level`` or more requests in flight than with fewer (or
        whether most calls are refused): see LEVEL_ALPHA. A test on the count, not the share: with a margin on
        the share alone (two standard deviations), the simulator of tests/generate/test_overloaded.py cut 64 at
        once to 32 on 8 refusals in 38 sends where 5% were refused, and again on 3 in 8 just after growing back.

        Judged on the sends made no later than the refused one, whose refusal would have come back by now (a
        server that answers its 429s as late as its answers: judged on the last sends, nearly all still in
        flight and taken for answered, a limit of 24 at once was never found, 1.7 refusals an answer)."""
        low_refused = sum(self.level_refused[:level])
        low = low_refused + sum(self.level_answered[:level])
        # the last sends, in the order sent (an answer comes back later than a refusal: counted as they came, the
        # last outcomes held 4 refusals in 9 where 5% were refused), those not yet answered taken for answered.
        # Only recent sends: old answers at as many would hide a limit that has fallen (counted over all that is
        # remembered, a limit falling from 16 to 4 was refused 2,657 times in 2,000 requests and never cut).
        high = high_refused = judged = judged_refused = 0
        # Not the sends above what may be sent at once now: a cut has answered those (counted, a first burst's 42
        # refusals over a limit of 24 kept cutting to 2-4 at once where 30% were refused at random on top, 80
        # answered a second of 480 for two seconds; at 1,000 at once over a limit of 300, 2,821 a second of 6,000).
        cap = math.ceil(self.allowed)
        for at, refused, t in reversed(self.level_recent):
            if t > sent_at or at > cap:
                continue
            refused = refused is True
            if judged < LEVEL_RECENT:
                judged, judged_refused = judged + 1, judged_refused + refused
            if at >= level:
                high, high_refused = high + 1, high_refused + refused
                if high >= LEVEL_RECENT:
                    break
        if judged >= LEVEL_RECENT_MIN and _tail(judged_refused, judged, LEVEL_REFUSED_MOST) < LEVEL_ALPHA:
            # most calls refused (more than a half would give by chance): fewer at once, whatever the number in
            # flight (several clients). Judged on fewer calls, the first of a burst refused cut 64 at once to 1;
            # on the share alone, 40% refused at random ran at 15% of the speed.
            return True
        if level == 1:
            return False  # sent alone: fewer at once cannot be sent
        # no calls with fewer in flight known: none taken as refused there (a limit's refusals, the safe guess)
        share = low_refused / low if low >= 1.0 else 0.0
        # refused more often than not at this number in flight before (more than a share of a half over the share
        # with fewer would give, as above): a limit's, known (with 4 calls there at least, and no test, 3 random
        # refusals in 4 at one number in flight cut 64 at once to 28 where 15% were refused)
        refused_here = int(self.level_refused[level])
        if _tail(refused_here, int(refused_here + self.level_answered[level]), min(1.0, share + 0.5)) < LEVEL_ALPHA:
            return True
        return _tail(high_refused, high, min(1.0, share + RATE_REFUSED)) < LEVEL_ALPHA

    def rate_limited(self, wait_s: float, rounded: bool, sent_at: float, nth: int = 1) -> None:
        """A 429 told a request sent at ``sent_at`` to wait ``wait_s`` (that request waits it; the caller sleeps):
        its ``nth`` such refusal.

        Everyone else pauses only for the part of the wait the server surely meant: all of it when given exactly
        (retry-after-ms, a fraction of a second), one second less when given in whole seconds, which round
        up. Anthropic answers ``retry-after: 1`` to a request over a bucket that refills every few milliseconds;
        paused a second for each of those, a pool against a 100 request/s limit ran 3 a second.

        The endpoint's rate is then cut, once per round trip (a refusal of a request sent before the last cut is
        its echo, and cuts nothing), to what the provider took over the last RATE_WINDOW_S: the requests sent
        there that were not refused, counting only those sent at least one such refusal's round trip ago, whose
        429 would have come back by now. A cut needs more than RATE_REFUSED of the calls sent there, and at least
        RATE_REFUSED_MIN, refused, a request's n-th refusal weighing 1/n (a few stray 429s, another client of the
        key, a few requests the provider refuses every time: not a limit this rate is over), and goes no lower
        than half the rate that was being sent. Within the first tenth of the window nothing can be measured: a
        first burst a quarter refused halves the rate sent so far. The rate grows back quickly (RATE_GROWTH_FAST)
        to the rate last measured taken (after an outage), then by a tenth a second, so it keeps probing the
        provider's limit from just below. A rate counts as taken where the provider took at least 0.8 of what was
        sent (of what the background leaves); until one is,
        the rate grows back quickly all the way (against a low limit, refused more often: 42% of the calls at
        5 requests a second with ``retry-after: 1``, in a review's measurement, 1.2 x the ideal time).

        With a background known, the share refused is measured from the last cut (calls before it went at
        another rate), and the share a cut needs is RATE_REFUSED over the background (see RATE_PROBE_SENDS); the
        probes that follow a cut hold the rate, and no other cut comes before they are judged. The first-tenth
        halving happens once, on a first burst (each round trip, 30% refused at any rate took it to 20 requests a
        second)."""
        now = time.monotonic()
        self._forget(now)
        weight = 1.0 / nth
        self.refused.append((sent_at, weight))
        start = self.sends[0] if self.sends else now  # the window, or the time since the endpoint was first sent
        background = self.background_share(now)
        share = sum(w for _, w in self.refused) / max(1, len(self.sends))
        if now - start < 0.1 * RATE_WINDOW_S or share > background + RATE_REFUSED:
            self.cooldown_until = max(self.cooldown_until, now + max(0.0, wait_s - (1.0 if rounded else 0.0)))
        settled = sent_at - (now - sent_at)  # requests sent before this have had the time to be refused
        self.refusal_rtt = now - sent_at
        probe = self.probe
        if probe is not None:
            sends = probe["sends"]
            if sends and probe["at"] <= sent_at <= sends[-1]:
                probe["refused"] += weight  # weighed as the cuts weigh them (a few requests refused every time)
                probe["calls_refused"] += 1  # ... but what was answered is every call not refused
            if len(sends) >= RATE_PROBE_MIN and probe["refused"] > (0.5 + background) * len(sends):
                self.probe = None  # the cut did not go far enough: cut again, measured since it
            elif settled < self._probe_end(probe):
                return  # no new cut before the last one is judged
            else:
                self._judge_probe(probe, now)
                background = self.background_share(now)
        if sent_at < self.rate_cut_at:
            return
        # with a background, measured since the last cut (or the probes' verdict): calls before it went at another
        # rate (without one, over the window: measured since each cut, a 2/s bucket was cut once a second)
        since = max(start, self.rate_cut_at) if background > 0.0 else start
        span = settled - since
        rate = self.rate(now)
        sending = sum(1 for t in self.sends if t >= since) / max(now - since, 0.1 * RATE_WINDOW_S)
        threshold = RATE_REFUSED + background
        undo = (rate, self.rate_good, self.rate_good_at)  # restored if the probes find that the cut took what was
        # not the rate (the rate sent then, growing back from when they find it)
        if span >= 0.1 * RATE_WINDOW_S:  # measured
            sent = sum(1 for t in self.sends if since <= t <= settled)
            refusals = [weight for t, weight in self.refused if since <= t <= settled]
            # A request's n-th refusal weighs 1/n: a few requests the provider refuses every time (retried, the
            # others answered) grew to a share of the calls that cut the rate, and cut it again as it fell.
            refused = sum(refusals)
            if refused <= threshold * sent or refused < RATE_REFUSED_MIN:
                if refused >= 0.5 * self.background * sent:
                    self.background_at = now  # refusals about as frequent as the background keep it up
                return
            share = refused / max(1, sent)
            taken = (sent - len(refusals)) / span
            # over the whole window (the cuts within it included), what the provider took against what was sent
            whole = taken if since == start else (sum(1 for t in self.sends if t <= settled) - sum(
                1 for t, _ in self.refused if start <= t <= settled)) / max(settled - start, 1e-3)
            if whole >= 0.8 * (1.0 - background) * len(self.sends) / max(now - start, 0.1 * RATE_WINDOW_S):
                # a rate the provider keeps up (not an outage), regrown to quickly later; kept against the lower
                # rates measured as an outage begins, fading if the provider's limit fell
                fading = 0.5 ** ((now - self.rate_good_at) / RATE_GOOD_HALF_LIFE_S)
                self.rate_good = whole if self.rate_good == math.inf else max(whole, self.rate_good * fading)
                self.rate_good_at = now
            self.rate_base = max(taken, 0.5 * min(rate, sending))
        else:
            refused = sum(weight for t, weight in self.refused if t >= start)
            if refused < RATE_REFUSED_MIN or refused < (0.25 + background) * len(self.sends) or rate != math.inf:
                return
            self.rate_base = max(RATE_MIN, 0.5 * min(rate, sending))
            self.rate_cut_at = now
            self.next_send = min(self.next_send, now + 1.0 / self.rate_base)
            return  # a rate measured over so short a time says too little for the probes to judge
        self.rate_base = max(RATE_MIN, min(rate, self.rate_base))
        self.rate_cut_at = now
        self.next_send = min(self.next_send, now + 1.0 / self.rate_base)
        if self.rate_base * RATE_PROBE_S >= RATE_PROBE_MIN:  # (slower, a probe would hold the rate for seconds)
            self.probe = {"at": now, "share": min(1.0, share), "sends": [], "refused": 0.0, "calls_refused": 0,
                          "undo": undo}

    def background_share(self, now: float) -> float:
        """The share of calls this endpoint refuses at any rate (see RATE_PROBE_SENDS), faded since last seen."""
        if self.background <= 0.0:
            return 0.0
        return self.background * 0.5 ** ((now - self.background_at) / RATE_GOOD_HALF_LIFE_S)

    @staticmethod
    def _probe_end(probe: dict) -> float:
        sends = probe["sends"]
        return sends[-1] if len(sends) >= RATE_PROBE_SENDS else probe["at"] + RATE_PROBE_S

    def _judge_probe(self, probe: dict, now: float) -> None:
        """Two probes follow a cut, each RATE_PROBE_SENDS calls (or RATE_PROBE_S) at a held rate.

        The first is sent at the cut's rate. Where it still sees more than half of RATE_REFUSED refused, the
        second goes at 0.9 x the rate the provider answered in the first: below any limit on the rate (which
        answered that much), so only refusals that come at any rate remain. Where the second still sees at
        least 0.75 of the first's share refused, that share is the endpoint's background, and the cuts are
        undone where it is within RATE_REFUSED of the share that made the cut (they took what was not the
        rate); else (and where the first saw few) the background is no more than what the last probe saw, and
        the last probe's rate stays and starts growing back. The share a probe sees weighs a request's n-th
        refusal 1/n, as the cuts do; the rate it saw answered counts every call (a limit refuses the same
        requests again and again: estimated from the weighted share, a probe against a 10/s limit took 13.4/s
        for answered, and the second, over the limit, learned a false background that no cut then
        exceeded). A probe that sees more than half of its calls refused ends at once, and the
        cut it followed is cut again. Below RATE_PROBE_MIN calls in RATE_PROBE_S, no probe is sent (held at 5/s
        against a 2/s limit, probes doubled the 429s), and refusals there are taken for a limit. The share
        before the cut, with
        a burst a provider's bucket let through at the start, says too little of the rate to compare with
        alone: a first probe against 20 requests a second (sent 38) saw 47% refused where 40% made the cut."""
        self.probe = None
        sends = probe["sends"]
        if len(sends) < RATE_PROBE_MIN:
            self.rate_cut_at = now
            return  # too few calls to tell
        span = max(self._probe_end(probe) - probe["at"], 1e-3)
        rate = len(sends) / span
        answered = max(0, len(sends) - probe["calls_refused"]) / span
        seen = min(1.0, probe["refused"] / len(sends))
        if "first" not in probe:
            if seen > self.background_share(now) + 0.5 * RATE_REFUSED:
                # no lower than half the probe's rate, as a cut (a fixed window spent before the probe answered
                # nothing: the second probe went at 0.1/s, and the rate took 10 s to grow back)
                self.rate_base = max(RATE_MIN, 0.9 * answered, 0.5 * rate)
                self.rate_cut_at = now
                self.next_send = min(self.next_send, now + 1.0 / self.rate_base)
                if self.rate_base * RATE_PROBE_S >= RATE_PROBE_MIN:
                    self.probe = {**probe, "at": now, "sends": [], "refused": 0.0, "calls_refused": 0, "first": seen,
                                  "answered": answered, "below": self.rate_base <= 0.9 * answered + 1e-9}
                else:  # too slow to probe: taken for a limit
                    self._taken(probe, answered, now)
                return
            self.background, self.background_at = min(self.background_share(now), seen), now
            self.rate_cut_at = now
            return
        if seen > 0.0 and seen >= 0.75 * probe["first"] and probe["below"]:  # (sent below what was answered)
            if self.background_share(now) < 0.5 * seen:
                log.info("%s refuses about %.0f%% of calls at any rate: no rate cut for those", self.label,
                         100 * seen)
            self.background, self.background_at = seen, now
            if seen >= probe["share"] - RATE_REFUSED:
                self.rate_base, self.rate_good, self.rate_good_at = probe["undo"]
                # and the rates measured taken while these refusals were taken for a limit say nothing of one
                # (an earlier probe's noise kept 15% random refusals to 1.1 x a second of growth: 6.5 s, not 1.6)
                self.rate_good = math.inf
        else:
            self.background, self.background_at = min(self.background_share(now), seen), now
            self._taken(probe, probe["answered"], now)  # what the first probe had answered
        self.rate_cut_at = now

    def _taken(self, probe: dict, answered: float, now: float) -> None:
        """A probe at a held rate measured the provider taking ``answered`` a second: where a rate taken is
        known (``rate_good``), it is at least this (faded as in ``rate_limited``). Not set where none is: a
        few requests refused every time, taken for a limit at 13/s, held a pool 4 at once to 1.1 x a second
        of growth from there (20 s for what takes 1.5 s)."""
        if self.rate_good == math.inf:
            return
        fading = 0.5 ** ((now - self.rate_good_at) / RATE_GOOD_HALF_LIFE_S)
        self.rate_good, self.rate_good_at = max(answered, self.rate_good * fading), now

    def connect_failed(self, message: str, sent_at: float) -> None:
        """A connection could not be made (or, to an endpoint that has answered before, no answer came in
        time). An endpoint that has answered before is taken out of rotation after ``down_after`` of these
        in a row; one that never answered, at the first (that is most likely a wrong URL or a server not
        started). While it is out, only the failure of a request sent after its time out (a probe) doubles
        the time to the next probe: the requests in flight when it went down fail together, and each of
        them doubling it kept an endpoint back from a short outage for 30 s."""
        self.connect_failures += 1
        self.last_error = message
        if self.down_since is not None and sent_at < self.probe_from:
            return
        if self.connect_failures >= (self.limits.down_after if self.ever_answered else 1):
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now
                if self.ever_answered:
                    log.warning("%s taken out of rotation: %s", self.label, message)
            self.down_until = self.probe_from = now + self.probe_s
            self.probe_s = min(self.probe_s * 2.0, 30.0)


@dataclass
class PoolStats:
    """Counters for progress and the summary (this run only)."""

    total: int | None = None  # requests expected, when known
    done: int = 0  # answered in this run
    failed: int = 0  # ended as a recorded failure in this run
    cached: int = 0  # found in the store, not sent
    shared: int = 0  # duplicates of a request in flight, not sent
    inflight: int = 0
    calls: int = 0  # attempts sent
    retries: int = 0
    rate_limited: int = 0  # 429 answers seen
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    errors: Counter = field(default_factory=Counter)  # retryable and final errors by kind
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.done + self.failed + self.cached + self.shared


class Pool:
    """Sends Requests to endpoints within Limits, records Results in a store. See the module doc.

    endpoints: one Endpoint or several (spread by least outstanding requests, with failover)
    limits: Limits (default: 64 concurrent, no rate limits)
    store: a path (JSONL store, resumable), a store object, or None (in memory: dedup only)
    model: the model for requests that name none
    progress: print a progress line to stderr while running, and a summary at the end
    prices: model -> (USD per million input tokens, USD per million output tokens), for the cost
    retry_failed: with a path as store: send again the requests recorded as failures (True), or those of
        the given keys only (a set of keys)
    provider_factory: ``(endpoint, connections) -> provider`` (default: providers.make_provider);
        a provider has ``async open()``, ``async close()`` and ``async send(request, model,
        timeout) -> Reply`` raising ProviderError. For tests and measurements without HTTP.
    """

    def __init__(self, endpoints: Endpoint | Sequence[Endpoint], limits: Limits | None = None, store=None, *,
                 model: str | None = None, progress: bool = False, prices: dict | None = None,
                 retry_failed: bool | Collection[str] = False, provider_factory=None):
        self.endpoints = [endpoints] if isinstance(endpoints, Endpoint) else list(endpoints)
        if not self.endpoints:
            raise GenerateError("the pool needs at least one endpoint")
        self.limits = limits or Limits()
        if isinstance(store, (str, os.PathLike)):
            store = JSONLStore(store, retry_failed=retry_failed)
        elif retry_failed:
            raise GenerateError("retry_failed needs the store as a path (or pass JSONLStore(path, retry_failed=True))")
        self.store = open_store(store)
        self.model = model
        self.prices = dict(prices or {})
        self._unpriced: set = set()  # models answered without a price, said once each
        self._provider_factory = provider_factory or make_provider
        self.stats = PoolStats()
        self._progress = Progress(self.stats) if progress else None
        self._progress_task: asyncio.Task | None = None
        self._states: list[_EndpointState] = []
        self._routes: dict[str, list[_EndpointState]] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._sending: set[asyncio.Task] = set()  # tasks whose request is at the provider now
        self._draining = False  # interrupted: send nothing more, finish what is at the provider
        self._slots: asyncio.Semaphore | None = None
        self._limiter: RateLimiter | None = None
        self._fatal: str | None = None
        self._answers = 0  # answers received, over all endpoints (see Limits.max_attempts)
        self._open = False

    def __repr__(self) -> str:
        return f"Pool({[e.label for e in self.endpoints]}, {self.limits}, store={self.store!r})"

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> "Pool":
        self._draining = False
        self._slots = asyncio.Semaphore(self.limits.concurrency)
        self._freed = asyncio.Event()  # set whenever a request to some endpoint ends (``_EndpointState.allowed``)
        self._limiter = RateLimiter(self.limits.rpm, self.limits.tpm, self.limits.burst_s)
        self.store.open()
        try:
            for endpoint in self.endpoints:
                provider = self._provider_factory(endpoint, connections=self.limits.concurrency)
                await provider.open()
                self._states.append(_EndpointState(endpoint, provider, self.limits))
        except BaseException:
            await self._close_providers()
            self.store.close()
            raise
        self.stats.started = time.monotonic()
        if self._progress is not None:
            self._progress_task = asyncio.ensure_future(self._progress.run())
        self._open = True
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self._open = False
        if exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and _being_cancelled():
            await self._drain(self._tasks)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._progress_task is not None:
            self._progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._progress_task
            # A run stopped before anything finished gets no summary: its error says it all.
            self._progress.finish(summary=not (exc_type is not None and self.stats.finished == 0))
        await self._close_providers()
        try:
            self.store.close()
        except GenerateError as e:
            if exc_type is None:
                raise
            log.error("%s", e)  # the error that stopped the run is the one to raise

    async def _drain(self, tasks: Collection[asyncio.Task]) -> None:
        """Interrupted (Ctrl-C: asyncio.run cancels the main task): send nothing more, but wait for the
        requests already at the provider, each for at most its own timeout, so that their answers,
        paid for, are stored as usual. Tasks not sending now (waiting for a slot, the rate, a retry)
        are cancelled. A second interrupt (a second cancel of this task; under asyncio.run, its
        KeyboardInterrupt cancels every task) abandons them at once."""
        tasks = list(tasks)
        self._draining = True
        try:
            sending = [t for t in tasks if t in self._sending and not t.done()]
            for task in tasks:
                if task not in self._sending:
                    task.cancel()
            if sending:
                if self._progress is not None and self._progress.tty:
                    self._progress.stream.write("\r\x1b[K")
                print(f"interrupted: waiting for {len(sending)} requests in flight to store their answers "
                      f"(at most {self.limits.timeout_s:g} s); Ctrl-C again abandons them", file=sys.stderr,
                      flush=True)
                await asyncio.wait(sending, timeout=self.limits.timeout_s)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
            self._draining = False  # this drain is over: a later call of the same pool sends as usual

    async def _close_providers(self) -> None:
        for state in self._states:
            with contextlib.suppress(Exception):
                await state.provider.close()
        self._states.clear()
        self._routes.clear()

    # ------------------------------------------------------------------ public API
    async def submit(self, request: Request) -> Result:
        """Send one request (or reuse its stored / in-flight result) and return its Result."""
        model, key = self._model_and_key(request)
        if key in self.store:
            self.stats.cached += 1
            return Result.from_record(self.store.get(key))
        return await self._submit(request, key, model)

    async def map(self, requests: Iterable[Request] | AsyncIterable[Request], *,
                  include_cached: bool = True) -> AsyncIterator[Result]:
        """Results as they finish (completion order). Reads ``requests`` lazily, keeping about
        2 x concurrency of them in progress, so any number of requests runs in bounded memory.
        With ``include_cached=False`` stored and shared results are counted but not yielded."""
        async for _, result in self._imap(requests, include_cached):
            yield result

    async def run(self, requests: Iterable[Request] | AsyncIterable[Request]) -> list[Result]:
        """All Results, in the order of ``requests``."""
        if not hasattr(requests, "__len__"):
            requests = list(requests) if not hasattr(requests, "__aiter__") else [r async for r in requests]
        results: list[Result | None] = [None] * len(requests)
        async for index, result in self._imap(requests, True):
            results[index] = result
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("use the pool inside 'async with Pool(...) as pool:'")
        if self._fatal is not None:
            raise PoolError(self._fatal)

    def _model_and_key(self, request: Request) -> tuple[str, str]:
        self._check_open()
        model = request.model or self.model
        if not model:
            raise GenerateError("the request names no model and the pool has no default model")
        if model not in self._routes:
            route = [s for s in self._states if s.endpoint.serves(model)]
            if not route:
                raise GenerateError(f"no endpoint serves model {model!r} "
                                    f"(endpoints: {', '.join(s.label for s in self._states)})")
            self._routes[model] = route
        return model, request.key(model)

    async def _imap(self, requests, include_cached: bool) -> AsyncIterator[tuple[int, Result]]:
        loop = asyncio.get_running_loop()
        window = max(16, 2 * self.limits.concurrency)
        finished: asyncio.Queue = asyncio.Queue()
        pending: set[asyncio.Task] = set()
        if hasattr(requests, "__len__"):
            self.stats.total = (self.stats.total or 0) + len(requests)
        if hasattr(requests, "__aiter__"):
            source, is_async = requests.__aiter__(), True
        else:
            source, is_async = iter(requests), False
        index, exhausted = 0, False
        positions: dict[asyncio.Task, int] = {}
        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        request = await source.__anext__() if is_async else next(source)
                    except (StopIteration, StopAsyncIteration):
                        exhausted = True
                        break
                    model, key = self._model_and_key(request)
                    i, index = index, index + 1
                    if key in self.store:  # fast path: no task for a stored key
                        self.stats.cached += 1
                        if include_cached:
                            yield i, Result.from_record(self.store.get(key))
                        continue
                    task = loop.create_task(self._submit(request, key, model))
                    positions[task] = i
                    pending.add(task)
                    self._tasks.add(task)
                    task.add_done_callback(finished.put_nowait)
                if not pending:
                    break
                task = await finished.get()
                pending.discard(task)
                self._tasks.discard(task)
                i = positions.pop(task)
                result = task.result()  # a PoolError propagates from here
                if result.cached and not include_cached:
                    continue
                yield i, result
        except asyncio.CancelledError:
            if pending and _being_cancelled():
                await self._drain(pending)
            raise
        finally:
            # A drain under way (the pool's __aexit__, when the interrupt came in the caller's loop body and this
            # generator is closed meanwhile) waits for the requests in flight itself: leave those to it.
            drop = [t for t in pending if not (self._draining and t in self._sending)]
            for task in drop:
                task.cancel()
            if drop:
                await asyncio.gather(*drop, return_exceptions=True)
            self._tasks.difference_update(drop)

    async def _submit(self, request: Request, key: str, model: str) -> Result:
        shared = self._inflight.get(key)
        if shared is not None:
            try:
                result = await asyncio.shield(shared)
            except asyncio.CancelledError:
                if not shared.cancelled():
                    raise  # this task was cancelled
                # The task that owned the call was cancelled: this one takes over, if still wanted.
                if key in self.store:
                    self.stats.cached += 1
                    return Result.from_record(self.store.get(key))
                return await self._submit(request, key, model)
            self.stats.shared += 1
            return dataclasses.replace(result, cached=True, attempts=0)
        # The caller saw the key missing from the store, but a task for it may have been created
        # while the same key was in flight and only start after that call has finished and been
        # stored: look again, or the same request is paid twice (and its append refused).
        if key in self.store:
            self.stats.cached += 1
            return Result.from_record(self.store.get(key))
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._execute(request, key, model)
            try:
                self.store.append(result.to_record())
            except StoreError as e:
                # Disk full or failing: every answer after this one would be paid for and lost too.
                raise self._abort(str(e)) from None
            self._count(result)
            future.set_result(result)
            return result
        except BaseException as e:
            if isinstance(e, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(e)
                future.exception()  # mark retrieved: sharers, if any, get it themselves
            raise
        finally:
            del self._inflight[key]

    def _count(self, result: Result) -> None:
        stats = self.stats
        if not result.ok:
            stats.failed += 1
            stats.errors["final:" + (result.error_type or "error")] += 1
            return
        stats.done += 1
        if result.usage is not None:
            stats.tokens_in += result.usage.input_tokens
            stats.tokens_out += result.usage.output_tokens
            price = self.prices.get(result.model)
            if price is not None:
                stats.cost += (result.usage.input_tokens * price[0] + result.usage.output_tokens * price[1]) / 1e6
            elif self.prices and result.model not in self._unpriced:  # the cost shown would leave these out unsaid
                self._unpriced.add(result.model)
                log.warning("no price for model %r (the prices given are for %s): its tokens are not in the cost",
                            result.model, ", ".join(map(repr, self.prices)))

    def _abort(self, message: str) -> PoolError:
        if self._fatal is None:
            self._fatal = message
        return PoolError(self._fatal)

    def _pick_now(self, model: str) -> _EndpointState | None:
        """The ready endpoint with the fewest outstanding requests, or None if none is ready."""
        now = time.monotonic()
        best = None
        for state in self._routes[model]:
            if (state.ready_at <= now and state.outstanding < state.allowed
                    and (best is None or state.outstanding < best.outstanding)):
                best = state
        return best

    async def _pick(self, model: str) -> _EndpointState:
        """Wait for a ready endpoint; stop the pool if they are all down for good."""
        states = self._routes[model]
        while True:
            best = self._pick_now(model)
            if best is not None:
                return best
            now = time.monotonic()
            down = [s for s in states if s.down_until > now]
            if len(down) == len(states):
                reasons = "; ".join(f"{s.label}: {s.last_error}" for s in states)
                if not any(s.ever_answered for s in states):
                    raise self._abort(f"cannot reach any endpoint for model {model!r} ({reasons})")
                if now - min(s.down_since for s in states) > self.limits.outage_s:
                    raise self._abort(f"every endpoint for model {model!r} has been unreachable for more than "
                                      f"{self.limits.outage_s:g} s ({reasons})")
            if any(s.ready_at <= now for s in states):  # ready, but holding all it is allowed: until one ends
                self._freed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._freed.wait(), 0.05)
            else:
                await asyncio.sleep(max(0.001, min(s.ready_at for s in states) - now))
            if self._fatal is not None:
                raise PoolError(self._fatal)

    async def _pick_and_take_rate(self, model: str, estimate: float) -> _EndpointState:
        """An endpoint to send to now, with the request's room in the rate buckets taken. The wait
        for a ready endpoint comes first, outside the buckets' lock (a paused endpoint of one model
        holds up no other); the buckets are then taken one request at a time, and only if an
        endpoint is still ready at that moment. Tokens taken before the wait for an endpoint would
        be held through a pause, and every request holding them would be sent together when it
        ends: a burst of up to a pause's worth of rate, just after the provider asked for less."""
        while True:
            await self._pick(model)  # until an endpoint is ready (at once when one is)
            state = await self._limiter.acquire(estimate, lambda: self._pick_now(model))
            if state is not None:
                return state
            if self._fatal is not None:
                raise PoolError(self._fatal)

    def _backoff_s(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after * (1.0 + 0.1 * random.random())
        ceiling = min(self.limits.backoff_max_s, self.limits.backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * random.random())

    async def _execute(self, request: Request, key: str, model: str) -> Result:
        limits, stats = self.limits, self.stats
        estimate = 0
        if self._limiter.tokens is not None:
            estimate = estimate_tokens(request.prompt_text()) + (request.max_tokens or limits.default_output_tokens)
        started = time.monotonic()
        attempt = 0  # calls sent
        counted = 0  # failures that count toward max_attempts
        refusals = 0  # 429s that named a wait
        while True:
            attempt += 1
            async with self._slots:
                if self._fatal is not None:
                    raise PoolError(self._fatal)
                state = await self._pick_and_take_rate(model, estimate)
                if self._draining:  # interrupted: nothing new goes out
                    raise asyncio.CancelledError
                task = asyncio.current_task()
                self._sending.add(task)
                state.outstanding += 1
                stats.inflight += 1
                stats.calls += 1
                sent_at = time.monotonic()
                record = state.sent(sent_at)
                if attempt == 1:
                    answers_before = self._answers
                try:
                    reply = await state.provider.send(request, model, limits.timeout_s)
                    error = None
                except ProviderError as e:
                    error = e
                finally:
                    self._sending.discard(task)
                    state.outstanding -= 1
                    stats.inflight -= 1
                    self._freed.set()
            if error is None:
                state.answered(record)
                self._answers += 1
                usage = None  # an answer that reports no usage: unknown, stored as null (it was stored as 0 tokens)
                if reply.input_tokens is not None or reply.output_tokens is not None:
                    usage = Usage(reply.input_tokens or 0, reply.output_tokens or 0)
                    self._limiter.settle(estimate, usage.input_tokens + usage.output_tokens)
                return Result(key, request.id, response=reply.text, usage=usage, attempts=attempt,
                              latency_s=time.monotonic() - started, model=model, endpoint=state.label,
                              finish_reason=reply.finish_reason, meta=request.meta)
            stats.errors[error.reason] += 1
            if error.kind == FATAL:
                raise self._abort(error.message)
            if error.kind == REQUEST:
                return Result(key, request.id, error=error.message, error_type="request", attempts=attempt,
                              latency_s=time.monotonic() - started, model=model, endpoint=state.label,
                              meta=request.meta)
            if error.connect or error.reason == "timeout" and state.ever_answered:
                # a hung endpoint (no answer in timeout_s) goes out of rotation as an unreachable one does,
                # rather than keep its share of the slots waiting; one that never answered is left to its
                # retries (a slow first answer is not a wrong URL)
                state.connect_failed(error.message, sent_at)
            if error.rate_limited:
                stats.rate_limited += 1
            # refused while the provider answered others since this request's last refusal (or first call)
            contended = error.rate_limited and self._answers > answers_before
            counted += not contended
            answers_before = self._answers
            if counted >= limits.max_attempts or attempt >= CONTENDED_CALLS * limits.max_attempts:
                return Result(key, request.id, error=f"gave up after {attempt} attempts; last: {error.message}",
                              error_type="retries", attempts=attempt, latency_s=time.monotonic() - started,
                              model=model, endpoint=state.label, meta=request.meta)
            if self._draining:  # interrupted: no retry; nothing is recorded, so a rerun sends it again
                raise asyncio.CancelledError
            delay = self._backoff_s(attempt, error.retry_after)
            if error.rate_limited and error.retry_after is None:
                # no wait named: fewer at once to this endpoint rather than a pause for everyone (which, paced
                # one retry per back-off, brought an overloaded server down to a request a second)
                if state.overloaded(sent_at, record) and contended:
                    # a refusal that comes at any load, while others were answered since its last call: the
                    # server is taking requests (at a share refused at random, the whole back-off made the few
                    # requests refused three times the run's last 7 s). Not after a refusal taken for a limit:
                    # several clients of one server, shortened so, were refused 14 times an answer.
                    delay *= CONTENDED_BACKOFF
            elif error.rate_limited:
                refusals += 1
                state.rate_limited(delay, error.retry_after_rounded, sent_at, refusals)
            elif error.retry_after is not None:  # e.g. 503 with Retry-After: the server asked everyone
                state.cooldown_until = max(state.cooldown_until, time.monotonic() + delay)
            stats.retries += 1
            log.debug("retry %d of %s in %.2f s: %s", attempt, key, delay, error.message)
            await asyncio.sleep(delay)


def _tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k <= n else 0.0
    return sum(math.comb(n, i) * p ** i * (1.0 - p) ** (n - i) for i in range(k, n + 1))


def _being_cancelled() -> bool:
    """Whether the running task itself was cancelled (as asyncio.run does to its main task on Ctrl-C),
    as opposed to a CancelledError coming from some other task's result."""
    task = asyncio.current_task()
    if task is None:
        return False
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    # Before 3.11 asyncio.run has no SIGINT handler: a Ctrl-C cancels every task at once and there is nothing to
    # wait for (the requests in flight are cancelled too), so no drain.
    return cancelling() > 0 if cancelling is not None else False


def run_sync(requests: Iterable[Request], endpoints: Endpoint | Sequence[Endpoint], limits: Limits | None = None,
             store=None, **pool_kwargs) -> list[Result]:
    """Blocking convenience for scripts: run ``requests`` through a Pool and return their Results."""

    async def main() -> list[Result]:
        async with Pool(endpoints, limits, store, **pool_kwargs) as pool:
            return await pool.run(requests)

    return asyncio.run(main())
