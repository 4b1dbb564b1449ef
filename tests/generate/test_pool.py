"""The pool end to end against fake servers: faults, dedup, resume, failover, fatal errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import signal
import time

import pytest

from bezoar.generate.pool import Pool, PoolError, run_sync
from bezoar.generate.providers import Endpoint
from bezoar.generate.request import GenerateError, Request
from tests.generate.conftest import chat_requests, closed_port_url, fast_limits
from tests.generate.fake_server import FAULT_KINDS, OTHER_FAULT_KINDS, Fault


def records(path) -> list[dict]:
    out = [json.loads(line) for line in open(path, encoding="utf-8")]
    keys = [r["key"] for r in out]
    assert len(keys) == len(set(keys)), "a key was written twice"
    return out


def run(coro):
    return asyncio.run(coro)


async def run_pool(endpoints, requests, store=None, **kw):
    limits = kw.pop("limits", None) or fast_limits()
    async with Pool(endpoints, limits, store, model=kw.pop("model", "m"), **kw) as pool:
        return await pool.run(requests), pool.stats


def test_2000_requests_with_10pct_faults_of_every_kind(fake_server, tmp_path):
    server = fake_server(fault_rate=0.10, fault_kinds=FAULT_KINDS + OTHER_FAULT_KINDS, retry_after_s=0.01, seed=1)
    out = tmp_path / "out.jsonl"
    requests = chat_requests(2000)
    t0 = time.monotonic()
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), requests, out,
                                  limits=fast_limits(concurrency=64, timeout_s=1.0)))
    elapsed = time.monotonic() - t0
    server_stats = server.stats()
    # every kind of fault was injected
    for kind in FAULT_KINDS + OTHER_FAULT_KINDS:
        assert server_stats["outcomes"].get("fault_" + kind, 0) > 0, kind
    # every request ends exactly once, with its own answer
    lines = records(out)
    assert len(lines) == 2000 and sorted(r["id"] for r in lines) == list(range(2000))
    assert all(r["ok"] and r["response"] == f"echo: q{r['id']}" for r in lines)
    assert [r.response for r in results] == [f"echo: q{i}" for i in range(2000)]
    # An answer is paid for twice only when the client stopped waiting for it (a timeout: an
    # injected hang, or a server slowed down by a loaded machine) and asked again.
    timeouts = stats.errors.get("timeout", 0)
    assert timeouts >= server_stats["outcomes"]["fault_hang"]
    assert server_stats["answered_twice"] <= timeouts - server_stats["outcomes"]["fault_hang"]
    assert 2000 <= server_stats["answered"] <= 2000 + timeouts - server_stats["outcomes"]["fault_hang"]
    assert stats.retries == stats.calls - 2000 and server_stats["requests"] <= stats.calls
    assert elapsed < 60


@pytest.mark.parametrize("name", ["openai", "anthropic"])
def test_faults_through_the_official_sdks(fake_server, api_keys, tmp_path, name):
    server = fake_server(fault_rate=0.10, retry_after_s=0.01, seed=2)
    url = server.url if name == "anthropic" else server.openai_url
    results, _ = run(run_pool(Endpoint(name, url), chat_requests(150), tmp_path / "o.jsonl",
                              limits=fast_limits(concurrency=16, timeout_s=1.0)))
    assert all(r.ok for r in results) and [r.response for r in results] == [f"echo: q{i}" for i in range(150)]
    assert len(records(tmp_path / "o.jsonl")) == 150
    assert sum(server.stats()["outcomes"].get("fault_" + k, 0) for k in FAULT_KINDS) > 0


def test_duplicates_in_one_run_make_one_call(fake_server, tmp_path):
    server = fake_server(latency=0.05)
    base = chat_requests(10)
    requests = base + base[:5] + base[2:4]  # repeats while the originals are in flight
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), requests, tmp_path / "o.jsonl"))
    assert [r.response for r in results] == [f"echo: q{i}" for i in [*range(10), *range(5), 2, 3]]
    assert server.stats()["requests"] == 10 and server.stats()["duplicates"] == 0
    assert stats.shared == 7 and len(records(tmp_path / "o.jsonl")) == 10
    assert sum(not r.cached for r in results) == 10


class _Echo:
    """A provider without HTTP that answers after 0 to 3 turns of the event loop (a seeded draw),
    counting its calls per request key."""

    def __init__(self, calls, rng):
        self.calls, self.rng = calls, rng

    async def open(self):
        pass

    async def close(self):
        pass

    async def send(self, request, model, timeout):
        from bezoar.generate.providers import Reply

        self.calls[request.key(model)] += 1
        for _ in range(self.rng.randint(0, 3)):
            await asyncio.sleep(0)
        return Reply("echo: " + request.messages[-1]["content"], 1, 1, "stop")


def test_a_repeat_that_starts_after_its_original_finished_is_not_sent_again(tmp_path):
    # Repeats spread over the input: some repeat's task is created while its original is in
    # flight but first runs after the original has finished and been stored.
    import collections
    import random

    calls = collections.Counter()
    rng = random.Random(0)
    requests = [Request(messages=[{"role": "user", "content": f"q{rng.randint(0, 50)}"}]) for _ in range(400)]
    factory = lambda endpoint, connections: _Echo(calls, rng)  # noqa: E731
    results, stats = run(run_pool(Endpoint("compat", "http://fake/v1"), requests, tmp_path / "o.jsonl",
                                  limits=fast_limits(concurrency=4), provider_factory=factory))
    assert [r.response for r in results] == ["echo: " + r.messages[0]["content"] for r in requests]
    assert max(calls.values()) == 1, "a request was sent twice"
    assert stats.done == len(calls) and stats.finished == len(requests)
    assert len(records(tmp_path / "o.jsonl")) == len(calls)


def test_an_answer_with_half_an_emoji_is_stored_and_not_bought_again(fake_server, tmp_path):
    # "\\ud83d" in the answer body is valid JSON but no UTF-8: the answer must still be stored
    # (escaped), read back the same, and not be paid for again by the rerun.
    server = fake_server(reply=lambda call: "smile \ud83d" if call.last_user_text == "q0" else "fine")
    out = tmp_path / "o.jsonl"
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(3), out))
    assert [r.response for r in results] == ["smile \ud83d", "fine", "fine"] and stats.done == 3
    server.reset_counters()
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(3), out))
    assert server.stats()["requests"] == 0 and stats.cached == 3
    assert results[0].response == "smile \ud83d"
    assert len(records(out)) == 3


def test_rerun_skips_what_is_stored(fake_server, tmp_path):
    server = fake_server()
    out = tmp_path / "o.jsonl"
    run(run_pool(Endpoint("compat", server.openai_url), chat_requests(50), out))
    server.reset_counters()
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(60), out))
    assert server.stats()["requests"] == 10 and stats.cached == 50 and stats.done == 10
    assert [r.response for r in results] == [f"echo: q{i}" for i in range(60)]
    assert [r.cached for r in results] == [True] * 50 + [False] * 10
    assert len(records(out)) == 60


POOL_FILLS_UP = r"""
import asyncio
from bezoar.generate.pool import Endpoint, Limits, Pool
from bezoar.generate.providers import Reply
from bezoar.generate.request import Request

path, n = sys.argv[1], int(sys.argv[2])
sent = []

class Echo:  # answers at once; the answer of request 8 finds the disk full
    async def open(self): pass
    async def close(self): pass
    async def send(self, request, model, timeout):
        sent.append(request.id)
        await asyncio.sleep(0.001 * (request.id % 3))
        if request.id == 8:
            fill_up(path, 50)
        return Reply("echo: " + request.messages[0]["content"], 1, 1, "stop")

async def main():
    requests = [Request(messages=[{"role": "user", "content": f"q{i}"}], id=i) for i in range(n)]
    async with Pool(Endpoint("compat", "http://fake/v1"), Limits(concurrency=4), path, model="m",
                    provider_factory=lambda endpoint, connections: Echo()) as pool:
        await pool.run(requests)

try:
    asyncio.run(main())
    error = None
except BaseException as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"error": error, "sent": len(sent)}))
"""


def test_a_full_disk_stops_the_pool_and_a_rerun_resumes(tmp_path):
    from tests.generate.test_store import run_filling_up

    out = tmp_path / "o.jsonl"
    seen = run_filling_up(POOL_FILLS_UP, out, 30)
    assert seen["error"].startswith(f"PoolError: cannot write to {out}: File too large"), seen["error"]
    stored = records(out)  # whole lines only: no fragment of the record that did not fit
    assert 0 < len(stored) < 30 and all(r["response"] == f"echo: q{r['id']}" for r in stored)
    # Space is back: the rerun sends only what is not stored, and opens the file without repairs.
    calls = collections.Counter()
    factory = lambda endpoint, connections: _Echo(calls, random.Random(0))  # noqa: E731
    requests = chat_requests(30)
    results, stats = run(run_pool(Endpoint("compat", "http://fake/v1"), requests, out, provider_factory=factory))
    assert sum(calls.values()) == 30 - len(stored) and stats.cached == len(stored)
    assert [r.response for r in results] == [f"echo: q{i}" for i in range(30)] and len(records(out)) == 30
    assert not list(tmp_path.glob("o.jsonl.torn-*"))


def test_spread_over_endpoints_and_failover(fake_server, tmp_path):
    a, b = fake_server(latency=0.01), fake_server(latency=0.01)
    endpoints = [Endpoint("compat", a.openai_url), Endpoint("compat", b.openai_url),
                 Endpoint("compat", closed_port_url())]

    async def main():
        async with Pool(endpoints, fast_limits(concurrency=16), tmp_path / "o.jsonl", model="m") as pool:
            first = await pool.run(chat_requests(200))
            spread = (a.stats()["requests"], b.stats()["requests"])
            a.stop()  # one server dies; its keep-alive connections break
            second = await pool.run(chat_requests(100, prefix="later"))
            return first, second, spread

    first, second, spread = run(main())
    assert all(r.ok for r in first + second)
    assert min(spread) >= 60, spread  # least outstanding spreads the load over the live two
    assert b.stats()["requests"] >= spread[1] + 100
    assert len(records(tmp_path / "o.jsonl")) == 300


def test_unreachable_endpoint_stops_with_one_clear_message(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(PoolError, match="cannot reach any endpoint.*Connection refused") as info:
        run(run_pool(Endpoint("compat", closed_port_url()), chat_requests(100), tmp_path / "o.jsonl"))
    assert time.monotonic() - t0 < 5
    assert "\n" not in str(info.value)
    assert records(tmp_path / "o.jsonl") == []  # nothing recorded: the requests were not at fault


def test_bad_key_stops_the_pool_and_never_leaks(fake_server, tmp_path, monkeypatch, caplog):
    secret = "sk-proj-VERY-SECRET-abcdefghijklmnop"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    server = fake_server(api_key="the-right-one", latency=0.01)
    with caplog.at_level(logging.DEBUG), pytest.raises(PoolError, match="rejected the API key") as info:
        run(run_pool(Endpoint("openai", server.openai_url), chat_requests(50), tmp_path / "o.jsonl"))
    assert "SECRET" not in str(info.value) and "SECRET" not in caplog.text
    assert "SECRET" not in (tmp_path / "o.jsonl").read_text()
    assert server.stats()["requests"] <= fast_limits().concurrency  # stopped at the first wave


def test_unknown_model_stops_the_pool(fake_server, tmp_path):
    server = fake_server(models=["served"])
    with pytest.raises(PoolError, match="'missing'.*unknown model"):
        run(run_pool(Endpoint("compat", server.openai_url), chat_requests(20), tmp_path / "o.jsonl",
                     model="missing"))


def test_request_errors_are_recorded_and_not_retried(fake_server, tmp_path):
    def reply(call):
        n = int(call.last_user_text[1:])
        return Fault("400", message=f"prompt {n} is too long") if n % 5 == 0 else "fine"

    server = fake_server(reply=reply)
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(30), tmp_path / "o.jsonl"))
    failed = [r for r in results if not r.ok]
    assert [r.id for r in failed] == list(range(0, 30, 5))
    assert all(r.error_type == "request" and r.attempts == 1 and "too long" in r.error for r in failed)
    assert server.stats()["requests"] == 30 and stats.failed == 6 and stats.done == 24
    stored = {r["id"]: r for r in records(tmp_path / "o.jsonl")}
    assert stored[5]["ok"] is False and "prompt 5 is too long" in stored[5]["error"]


def test_exhausted_retries_are_recorded(fake_server, tmp_path):
    server = fake_server(reply=lambda call: Fault("500") if call.last_user_text == "q3" else "fine")
    results, _ = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(8), tmp_path / "o.jsonl",
                              limits=fast_limits(max_attempts=3)))
    assert [r.ok for r in results] == [True, True, True, False, True, True, True, True]
    assert results[3].error_type == "retries" and results[3].attempts == 3 and "HTTP 500" in results[3].error


def test_retry_failed_sends_failures_again(fake_server, tmp_path):
    out = tmp_path / "o.jsonl"
    broken = fake_server(reply=lambda call: Fault("400") if call.last_user_text in ("q1", "q2") else "fine")
    run(run_pool(Endpoint("compat", broken.openai_url), chat_requests(5), out))
    fixed = fake_server()
    results, _ = run(run_pool(Endpoint("compat", fixed.openai_url), chat_requests(5), out))
    assert fixed.stats()["requests"] == 0 and not results[1].ok  # failures count as done by default
    results, _ = run(run_pool(Endpoint("compat", fixed.openai_url), chat_requests(5), str(out), retry_failed=True))
    assert fixed.stats()["requests"] == 2 and all(r.ok for r in results)
    assert sorted(r["id"] for r in records(out)) == [0, 1, 2, 3, 4]


def test_retry_after_pauses_everyone(fake_server, tmp_path):
    arrivals = []
    server = fake_server(reply=lambda call: (arrivals.append(time.monotonic()), "fine")[1])
    server.script(Fault("429", retry_after=0.3))
    results, stats = run(run_pool(Endpoint("compat", server.openai_url), chat_requests(5), None,
                                  limits=fast_limits(concurrency=1)))
    assert all(r.ok for r in results) and stats.rate_limited == 1
    first_429 = server.stats()["first_request_at"]
    assert min(arrivals) - first_429 >= 0.29  # nobody was sent before Retry-After ran out


def test_map_reads_requests_lazily(fake_server):
    server = fake_server()
    pulled = 0

    def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield Request(messages=[{"role": "user", "content": f"x{pulled}"}])

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(concurrency=4), None, model="m") as pool:
            seen = []
            async with contextlib.aclosing(pool.map(endless())) as results:
                async for result in results:
                    seen.append(result)
                    if len(seen) == 40:
                        break
            return seen

    seen = run(main())
    assert len(seen) == 40 and all(r.ok for r in seen)
    assert pulled <= 40 + 16 + 1  # a window of max(16, 2 x concurrency) ahead, no more


def test_submit_from_many_tasks_and_async_input(fake_server):
    server = fake_server(latency=0.01)

    async def requests():
        for r in chat_requests(30):
            yield r

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(concurrency=8), None, model="m") as pool:
            single = await asyncio.gather(*(pool.submit(r) for r in chat_requests(20) + chat_requests(20)))
            streamed = [r async for r in pool.map(requests())]
            return single, streamed

    single, streamed = run(main())
    assert [r.response for r in single] == [f"echo: q{i}" for i in range(20)] * 2
    assert sorted(r.response for r in streamed) == sorted(f"echo: q{i}" for i in range(30))
    assert server.stats()["requests"] == 30  # the memory store dedups too


def test_fatal_error_reaches_every_submitter(fake_server):
    server = fake_server(latency=0.02)
    server.script(*(["fine"] * 3), Fault("401"))

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(concurrency=2), None, model="m") as pool:
            outcomes = await asyncio.gather(*(pool.submit(r) for r in chat_requests(40)), return_exceptions=True)
            with pytest.raises(PoolError):
                await pool.submit(Request(messages=[{"role": "user", "content": "after"}]))
            return outcomes

    outcomes = run(main())
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and all(isinstance(e, PoolError) for e in errors)
    assert server.stats()["requests"] <= 6  # stopped right away, not 40 calls


def test_run_sync_and_usage_and_cost(fake_server, tmp_path):
    server = fake_server()
    results = run_sync(chat_requests(3), Endpoint("compat", server.openai_url), fast_limits(), tmp_path / "o.jsonl",
                       model="m", prices={"m": (1.0, 2.0)})
    assert [r.response for r in results] == ["echo: q0", "echo: q1", "echo: q2"]
    assert results[0].usage.input_tokens > 0 and results[0].usage.output_tokens == 2


def test_misuse_is_reported_clearly(fake_server):
    server = fake_server()

    async def no_model():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits()) as pool:
            await pool.submit(chat_requests(1)[0])

    with pytest.raises(GenerateError, match="no model"):
        run(no_model())

    async def unserved():
        async with Pool(Endpoint("compat", server.openai_url, models=("a",)), fast_limits(), model="b") as pool:
            await pool.submit(chat_requests(1)[0])

    with pytest.raises(GenerateError, match="no endpoint serves model 'b'"):
        run(unserved())

    async def outside():
        await Pool(Endpoint("compat", server.openai_url), model="m").submit(chat_requests(1)[0])

    with pytest.raises(RuntimeError, match="async with"):
        run(outside())


def test_a_cancelled_owner_hands_its_call_over(fake_server):
    # The owner's call is never answered (it hangs until the owner gives it up); the sharer's own call is.
    # With an answer after 0.2 s and fixed 50 ms sleeps to cancel in, a loaded machine could see the answer
    # first, or cancel the owner before its request went out.
    server = fake_server()
    server.script(Fault("hang"))
    request = chat_requests(1)[0]

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(timeout_s=60), None, model="m") as pool:
            owner = asyncio.ensure_future(pool.submit(request))
            while server.stats()["requests"] < 1:  # the owner's call is at the server
                await asyncio.sleep(0.005)
            sharer = asyncio.ensure_future(pool.submit(request))
            await asyncio.sleep(0)  # its first step: the key is in flight, so it waits on the owner's call
            owner.cancel()
            result = await sharer
            return owner, result

    owner, result = run(main())
    assert owner.cancelled() and result.ok and result.response == "echo: q0"
    assert server.stats()["requests"] == 2  # the owner's call was abandoned; the sharer made its own


@pytest.fixture
def sigint_default():
    """SIGINT as asyncio.run expects to find it (it then installs its own: a first Ctrl-C cancels the main task)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def interrupted_run(server, requests, store, *, after_requests: int, interrupts: int, limits, use_map=False):
    """Run the pool under asyncio.run and press Ctrl-C (SIGINT) ``interrupts`` times once the server has
    seen ``after_requests`` requests. Returns the seconds from the first Ctrl-C to the KeyboardInterrupt."""
    pressed, watchers = [], []

    async def ctrl_c():
        while server.stats()["requests"] < after_requests:
            await asyncio.sleep(0.005)
        for _ in range(interrupts):
            pressed.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.2)

    async def main():
        watchers.append(asyncio.ensure_future(ctrl_c()))
        async with Pool(Endpoint("compat", server.openai_url), limits, store, model="m") as pool:
            if use_map:
                async for _ in pool.map(requests, include_cached=False):
                    if use_map == "awaits":  # the interrupt lands in the caller's loop body, not in the pool
                        await asyncio.sleep(0.3)
            else:
                await pool.run(requests)

    with pytest.raises(KeyboardInterrupt):
        asyncio.run(main())
    if watchers[0].done() and not watchers[0].cancelled():
        watchers[0].exception()  # a second Ctrl-C raises its KeyboardInterrupt in the watcher itself
    return time.monotonic() - pressed[0]


@pytest.mark.parametrize("use_map", [False, True, "awaits"])
def test_ctrl_c_stores_the_answers_in_flight_and_a_rerun_sends_only_the_rest(fake_server, tmp_path, capsys,
                                                                              sigint_default, use_map):
    server = fake_server(latency=0.5)
    out = tmp_path / "out.jsonl"
    requests = chat_requests(16)
    limits = fast_limits(concurrency=4, timeout_s=30)
    interrupted_run(server, requests, out, after_requests=6, interrupts=1, limits=limits, use_map=use_map)
    err = capsys.readouterr().err
    stats = server.stats()
    assert stats["requests"] == 8  # the second four were at the server; none was sent after the Ctrl-C
    lines = records(out)
    assert len(lines) == stats["answered"] == 8  # every answer the server sent is stored
    assert all(r["ok"] and r["response"] == f"echo: q{r['id']}" for r in lines)
    results, _ = run(run_pool(Endpoint("compat", server.openai_url), requests, out, limits=limits))
    assert [r.response for r in results] == [f"echo: q{i}" for i in range(16)]
    stats = server.stats()
    assert stats["requests"] == 16 and stats["duplicates"] == 0  # the rerun sent only the 8 never answered
    assert len(records(out)) == 16
    assert "waiting for 4 requests in flight" in err and "Ctrl-C again abandons them" in err


def test_a_second_ctrl_c_abandons_the_requests_in_flight(fake_server, tmp_path, capsys, sigint_default):
    server = fake_server(latency=3.0)
    out = tmp_path / "out.jsonl"
    waited = interrupted_run(server, chat_requests(8), out, after_requests=4, interrupts=2,
                             limits=fast_limits(concurrency=4, timeout_s=30))
    assert "waiting for 4 requests in flight" in capsys.readouterr().err
    assert waited < 2.0  # not the 3 s the answers take
    assert server.stats()["requests"] == 4 and records(out) == []


def test_cancelling_the_main_task_waits_for_calls_in_flight_but_not_for_retries(fake_server, tmp_path):
    # q0 is refused with a 429 (its retry must not be sent once cancelled); the others are at the server.
    server = fake_server(latency=0.3, reply=lambda call: Fault("429") if call.last_user_text == "q0"
                         else f"echo: {call.last_user_text}", retry_after_s=5)
    out = tmp_path / "out.jsonl"

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(concurrency=4, timeout_s=30), out,
                        model="m") as pool:
            task = asyncio.ensure_future(pool.run(chat_requests(4)))
            while server.stats()["requests"] < 4:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert sorted(r["id"] for r in records(out)) == [1, 2, 3]
    assert server.stats()["requests"] == 4


def test_a_pool_goes_on_after_a_cancelled_call(fake_server, tmp_path):
    """A drain marked the pool as interrupted for good: a later call of the same pool (after a wait_for timed out
    around an earlier one) raised CancelledError."""
    server = fake_server(latency=0.3)
    out = tmp_path / "out.jsonl"

    async def main():
        async with Pool(Endpoint("compat", server.openai_url), fast_limits(concurrency=4, timeout_s=30), out,
                        model="m") as pool:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(pool.run(chat_requests(3)), timeout=0.1)
            return await pool.run(chat_requests(5))

    results = run(main())
    assert [r.response for r in results] == [f"echo: q{i}" for i in range(5)]
    assert server.stats()["duplicates"] == 0  # the first three, answered meanwhile, were stored once


def test_failures_in_flight_when_an_endpoint_went_down_do_not_lengthen_its_probe_wait():
    """The requests in flight when an endpoint went down failed together, and each doubled the wait to the next
    probe: one burst of 8 took it from 1 s to 30 s, keeping it out of rotation long after a short outage. Only
    a failed probe (a request sent after its time out) doubles the wait now."""
    from bezoar.generate.pool import Limits, _EndpointState

    state = _EndpointState(Endpoint("compat", "http://a/v1"), provider=None, limits=Limits(down_after=3))
    state.ever_answered = True
    sent = time.monotonic()
    for _ in range(8):  # a burst sent before it went down, failing together
        state.connect_failed("Connection refused", sent)
    assert state.down_since is not None and state.probe_s == 2.0
    assert state.down_until - time.monotonic() <= 1.0  # the first probe after 1 s, not 30
    state.connect_failed("Connection refused", state.probe_from + 0.001)  # the probe failed: wait longer
    assert state.probe_s == 4.0
    state.answered()
    assert (state.down_since, state.probe_s, state.connect_failures) == (None, 1.0, 0)


def test_a_hung_endpoint_goes_out_of_rotation_and_a_connect_timeout_is_a_connect_failure(tmp_path, monkeypatch):
    """A timeout never took an endpoint out of rotation: a hung server kept half the slots waiting on it, and
    a request could fail while the other endpoint was healthy. A connection that never opens (a host that
    drops the packets) counts as a connection failure, and whole-request timeouts of an endpoint that has
    answered before count toward down_after."""
    from bezoar.generate.http import HTTPClient, HTTPConnectError
    from bezoar.generate.providers import RETRY, ProviderError

    from bezoar.generate.providers import Reply

    class Provider(_Echo):
        def __init__(self, endpoint):
            self.endpoint, self.label, self.sent = endpoint, endpoint.label, 0

        async def send(self, request, model, timeout):
            self.sent += 1
            if "hung" in self.label and self.sent > 2:  # answers twice, then hangs
                await asyncio.sleep(timeout)
                raise ProviderError(f"no answer from {self.label} within {timeout:g} s", RETRY, reason="timeout")
            await asyncio.sleep(0.01)
            return Reply("echo: " + request.messages[-1]["content"], 1, 1, "stop")

    providers = {}

    def factory(endpoint, connections):
        providers[endpoint.label] = Provider(endpoint)
        return providers[endpoint.label]

    endpoints = [Endpoint("compat", "http://hung/v1"), Endpoint("compat", "http://good/v1")]
    limits = fast_limits(concurrency=16, timeout_s=0.3, max_attempts=4, down_after=2)
    results, stats = run(run_pool(endpoints, chat_requests(400), tmp_path / "o.jsonl", limits=limits,
                                  provider_factory=factory))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    hung = providers["compat:http://hung/v1"].sent
    assert hung < 40, hung  # out of rotation after two timeouts in a row, probed now and then

    async def never_connects(*args, **kwargs):
        await asyncio.sleep(10)

    transport = HTTPClient("http://blackhole.invalid:81/v1", headers={})
    loop = asyncio.new_event_loop()
    try:
        monkeypatch.setattr(loop, "create_connection", never_connects)
        with pytest.raises(HTTPConnectError, match="timed out while connecting"):
            loop.run_until_complete(transport._connect(loop, loop.time() + 0.1))
    finally:
        loop.close()
