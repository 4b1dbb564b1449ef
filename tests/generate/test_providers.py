"""Providers against the fake server through the real SDKs and the aiohttp transport."""

from __future__ import annotations

import asyncio
import email.utils
import re
import time

import pytest

from bezoar.generate import providers as P
from bezoar.generate.providers import (Endpoint, ProviderError, make_provider, parse_retry_after, read_api_key, redact,
                                       status_error)
from bezoar.generate.request import GenerateError, Request
from tests.generate.conftest import closed_port_url
from tests.generate.fake_server import Fault, Filtered

PROVIDER_NAMES = ("compat", "openai", "anthropic")


def base_url(name: str, server) -> str:
    return server.url if name == "anthropic" else server.openai_url


async def _send(name: str, url: str, request: Request, timeout: float = 60.0, model: str = "m"):
    provider = make_provider(Endpoint(name, url), connections=4)
    await provider.open()
    try:
        return await provider.send(request, model, timeout)
    finally:
        await provider.close()


def send(name, server_or_url, request, **kw):
    url = server_or_url if isinstance(server_or_url, str) else base_url(name, server_or_url)
    return asyncio.run(_send(name, url, request, **kw))


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_chat_round_trip(fake_server, api_keys, name):
    calls = []
    server = fake_server(reply=lambda call: (calls.append(call), "four")[1])
    request = Request(messages=[{"role": "user", "content": "two plus two?"}], system="answer in words",
                      max_tokens=7, temperature=0.3, top_p=0.9, stop=["\nEND"])
    reply = send(name, server, request)
    assert reply.text == "four" and reply.output_tokens == 1 and reply.input_tokens > 0
    body = calls[0].body
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0.3 and body["top_p"] == 0.9
    if name == "anthropic":
        assert body["system"] == "answer in words" and body["stop_sequences"] == ["\nEND"]
        assert body["messages"] == [{"role": "user", "content": "two plus two?"}]
    else:
        assert body["stop"] == ["\nEND"]
        assert body["messages"] == [{"role": "system", "content": "answer in words"},
                                    {"role": "user", "content": "two plus two?"}]


def test_anthropic_moves_system_messages_and_defaults_max_tokens(fake_server, api_keys):
    calls = []
    server = fake_server(reply=lambda call: (calls.append(call), "ok")[1])
    request = Request(messages=[{"role": "system", "content": "rules"}, {"role": "user", "content": "hi"}])
    send("anthropic", server, request)
    assert calls[0].body["system"] == "rules" and calls[0].body["max_tokens"] == 1024
    assert calls[0].body["messages"] == [{"role": "user", "content": "hi"}]
    assert "temperature" not in calls[0].body  # unset parameters are not sent


def test_anthropic_takes_system_messages_of_text_blocks(fake_server, api_keys):
    calls = []
    server = fake_server(reply=lambda call: (calls.append(call), "ok")[1])
    blocks = [{"type": "text", "text": "be brief"},
              {"type": "text", "text": "no lists", "cache_control": {"type": "ephemeral"}}]
    request = Request(messages=[{"role": "system", "content": blocks}, {"role": "developer", "content": "in English"},
                                {"role": "user", "content": "hi"}], system="rules")
    assert send("anthropic", server, request).text == "ok"
    assert calls[0].body["system"] == [{"type": "text", "text": "rules"}, *blocks,
                                       {"type": "text", "text": "in English"}]
    assert calls[0].body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("content,match", [
    ([{"type": "text", "text": "a"}, {"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}],
     "message 0 \\(system\\): the anthropic provider takes only text blocks in a system message, got a 'image'"),
    ([{"type": "text"}], "got a 'text' block"),
    (["plain"], "got a 'str' block"),
    (None, "must be text or a list of text blocks, got NoneType"),
])
def test_anthropic_refuses_a_system_message_it_cannot_send_as_this_request_only(fake_server, api_keys, tmp_path,
                                                                                content, match):
    # A request error, recorded as this request's failure; the run goes on (it crashed with a TypeError).
    from bezoar.generate.pool import Limits, Pool

    server = fake_server()
    bad = Request(messages=[{"role": "system", "content": content}, {"role": "user", "content": "hi"}], id=0)
    good = Request(messages=[{"role": "user", "content": "hi"}], id=1)

    async def main():
        async with Pool(Endpoint("anthropic", server.url), Limits(timeout_s=5), tmp_path / "o.jsonl",
                        model="m") as pool:
            return await pool.run([bad, good])

    failed, answered = asyncio.run(main())
    assert failed.error_type == "request" and failed.attempts == 1 and answered.ok
    assert re.search(match, failed.error), failed.error
    assert server.stats()["requests"] == 1  # the bad one was never sent


@pytest.mark.parametrize("name", ("compat", "openai"))
def test_completion_round_trip(fake_server, api_keys, name):
    server = fake_server()
    reply = send(name, server, Request(kind="completion", prompt="Once upon", max_tokens=3))
    assert reply.text == "echo: Once upon" and reply.finish_reason == "stop"


def test_anthropic_has_no_completions(fake_server, api_keys):
    with pytest.raises(ProviderError) as info:
        send("anthropic", fake_server(), Request(kind="completion", prompt="x"))
    assert info.value.kind == P.REQUEST


# fault -> (kind, rate_limited, retry_after, connect)
FAULTS = {
    "429": (P.RETRY, True, 0.25, False),
    "429ms": (P.RETRY, True, 0.25, False),
    "429bare": (P.RETRY, True, None, False),  # no wait named: a server past its limit on requests at once
    "500": (P.RETRY, False, None, False),
    "529": (P.RETRY, False, None, False),
    "malformed": (P.RETRY, False, None, False),
    "drop": (P.RETRY, False, None, False),
    "400": (P.REQUEST, False, None, False),
    "422": (P.REQUEST, False, None, False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_faults_are_classified(fake_server, api_keys, name, fault):
    server = fake_server(retry_after_s=0.25)
    server.script(Fault(fault, message="you sent something odd"))
    with pytest.raises(ProviderError) as info:
        send(name, server, Request(messages=[{"role": "user", "content": "x"}]))
    kind, rate_limited, retry_after, connect = FAULTS[fault]
    e = info.value
    assert (e.kind, e.rate_limited, e.connect) == (kind, rate_limited, connect), e.message
    assert e.retry_after == (pytest.approx(retry_after) if retry_after else None)
    if kind == P.REQUEST:
        assert "you sent something odd" in e.message  # the provider's own words, passed on


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_hang_times_out(fake_server, api_keys, name):
    server = fake_server()
    server.script(Fault("hang"))
    t0 = time.monotonic()
    with pytest.raises(ProviderError) as info:
        send(name, server, Request(messages=[{"role": "user", "content": "x"}]), timeout=0.3)
    assert info.value.kind == P.RETRY and info.value.reason == "timeout"
    # The server would hang for an hour: finishing at all within 30 s proves the 0.3 s timeout fired.
    # A tighter bound measured the SDK's client start-up on a loaded 2-core CI machine (3.4 s once).
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_connection_refused_is_a_connect_error(api_keys, name):
    url = closed_port_url()
    url = url.removesuffix("/v1") if name == "anthropic" else url
    with pytest.raises(ProviderError) as info:
        send(name, url, Request(messages=[{"role": "user", "content": "x"}]), timeout=2)
    assert info.value.kind == P.RETRY and info.value.connect, info.value.message


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_bad_key_is_fatal_and_redacted(fake_server, monkeypatch, name):
    secret = "sk-live-THIS-IS-A-SECRET-0123456789"
    monkeypatch.setenv("MY_KEY", secret)
    server = fake_server(api_key="the-right-key")  # its 401 message echoes the key it got
    provider = make_provider(Endpoint(name, base_url(name, server), api_key_env="MY_KEY"), connections=2)

    async def go():
        await provider.open()
        try:
            return await provider.send(Request(messages=[{"role": "user", "content": "x"}]), "m", 5)
        finally:
            await provider.close()

    with pytest.raises(ProviderError) as info:
        asyncio.run(go())
    e = info.value
    assert e.kind == P.FATAL and e.status == 401 and "rejected the API key" in e.message
    assert "SECRET" not in e.message and secret not in str(e) and secret not in repr(provider)


@pytest.mark.parametrize("key", ["sk-SECRET-0123\nX-Injected: yes", "sk-SECRET-0123\u2019tail", "sk-SECRET 0123"])
@pytest.mark.parametrize("name", ["compat-lean", "compat-aiohttp", "openai", "anthropic"])
def test_a_key_no_header_can_carry_stops_the_pool_at_once_without_showing_it(fake_server, monkeypatch, tmp_path,
                                                                              name, key):
    # A key pasted with a line break, a space or a typographic character in it can never be sent.
    # Every provider refuses it at the start, with one message naming the variable: not a traceback,
    # not every request retried and recorded as a failure (with bits of the key in its error).
    from bezoar.generate.pool import Limits, Pool

    provider, _, transport = name.partition("-")
    if transport:
        monkeypatch.setenv("BEZOAR_COMPAT_TRANSPORT", transport)
    monkeypatch.setenv("MY_KEY", key)
    server = fake_server()
    store = tmp_path / "out.jsonl"

    async def go():
        async with Pool(Endpoint(provider, base_url(provider, server), api_key_env="MY_KEY"),
                        Limits(max_attempts=2, backoff_base_s=0.01), store, model="m") as pool:
            return await pool.run([Request(messages=[{"role": "user", "content": "x"}])])

    with pytest.raises(GenerateError) as info:
        asyncio.run(go())
    message = str(info.value)
    assert "MY_KEY" in message and "SECRET" not in message and "0123" not in message and "tail" not in message
    assert server.stats()["requests"] == 0 and not store.read_text()


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_unknown_model_is_fatal(fake_server, api_keys, name):
    server = fake_server(models=["real-model"])
    with pytest.raises(ProviderError) as info:
        send(name, server, Request(messages=[{"role": "user", "content": "x"}]), model="no-such-model")
    assert info.value.kind == P.FATAL and "no-such-model" in info.value.message


def test_compat_sends_no_key_unless_asked(fake_server, monkeypatch):
    # The user's OpenAI key is not for whatever server --base-url names (often plain http): compat
    # used to send OPENAI_API_KEY to it unasked.
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    server = fake_server(api_key="k")
    assert read_api_key(Endpoint("compat", server.openai_url)) is None
    # A server that wants a key says so, and the error says how to send one (not "rejected the API key").
    for transport in ("lean", "aiohttp"):
        monkeypatch.setenv("BEZOAR_COMPAT_TRANSPORT", transport)
        with pytest.raises(ProviderError, match=r"requires an API key \(HTTP 401\) and none was sent: .*--api-key-env"):
            send("compat", server, Request(messages=[{"role": "user", "content": "x"}]))
    monkeypatch.delenv("BEZOAR_COMPAT_TRANSPORT")
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("LOCAL_KEY", "k")
    provider = make_provider(Endpoint("compat", server.openai_url, api_key_env="LOCAL_KEY"), connections=1)

    async def go():
        await provider.open()
        try:
            return await provider.send(Request(messages=[{"role": "user", "content": "y"}]), "m", 5)
        finally:
            await provider.close()

    assert asyncio.run(go()).text == "echo: y"


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(GenerateError, match="OPENAI_API_KEY is not set"):
        make_provider(Endpoint("openai"), connections=1)
    with pytest.raises(GenerateError, match="NOPE_KEY is not set"):
        make_provider(Endpoint("anthropic", api_key_env="NOPE_KEY"), connections=1)
    monkeypatch.setenv("NOPE_KEY", " ")  # set, but to nothing: said so, not "not set"
    with pytest.raises(GenerateError, match="NOPE_KEY is empty"):
        make_provider(Endpoint("anthropic", api_key_env="NOPE_KEY"), connections=1)


def test_endpoint_validation_and_label():
    with pytest.raises(GenerateError, match="unknown provider"):
        Endpoint("gemini", "http://x")
    with pytest.raises(GenerateError, match="needs a base URL"):
        Endpoint("compat")
    with pytest.raises(GenerateError, match="not an http"):
        Endpoint("compat", "localhost:8000")
    with pytest.raises(GenerateError, match="'http://host:80800/v1': Port out of range") as info:
        Endpoint("compat", "http://user:pw@host:80800/v1?key=abc")
    assert "pw" not in str(info.value) and "abc" not in str(info.value)
    with pytest.raises(GenerateError, match="could not be cast"):
        Endpoint("openai", "https://host:80a/v1")
    label = Endpoint("compat", "http://user:pw@host:8000/v1?key=abc").label
    assert label == "compat:http://host:8000/v1"  # no credentials in labels (they go into records)


def test_endpoint_repr_shows_no_credentials_of_the_url():
    # A repr ends up in tracebacks, debug prints and logs of the pool's endpoints.
    endpoint = Endpoint("compat", "https://alice:s3cret-passw0rd@llm.example.com:8443/v1?api-key=AZURE-KEY-123456",
                        models=("m",))
    shown = repr(endpoint)
    assert "s3cret" not in shown and "alice" not in shown and "AZURE" not in shown, shown
    assert shown == ("Endpoint(provider='compat', base_url='https://llm.example.com:8443/v1', api_key_env=None, "
                     "models=('m',), name=None)")
    assert repr([Endpoint("openai")]) == ("[Endpoint(provider='openai', base_url=None, api_key_env=None, models=None, "
                                          "name=None)]")
    assert "s3cret" in endpoint.base_url  # the URL itself is kept whole: it is what is connected to


@pytest.mark.parametrize("status,body,kind", [
    (401, {"error": {"message": "bad key"}}, P.FATAL), (403, None, P.FATAL), (404, None, P.FATAL),
    (429, {"error": {"message": "You exceeded your quota", "type": "insufficient_quota"}}, P.FATAL),
    # one request above the whole tokens-per-minute limit: no wait makes it fit (it was retried max_attempts times)
    (429, {"error": {"message": "Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
                                "Limit 30000, Requested 52000.", "type": "tokens", "code": "rate_limit_exceeded"}},
     P.REQUEST),
    (429, {"message": "slow down"}, P.RETRY), (408, None, P.RETRY), (409, None, P.RETRY), (503, None, P.RETRY),
    (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "too long"}}, P.REQUEST),
    (413, None, P.REQUEST),
])
def test_status_classification(status, body, kind):
    assert status_error(status, body, "raw text", {}, "ep", "m").kind == kind


def test_parse_retry_after():
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": when}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "99999"}) == 3600.0
    # NaN is not a wait: retry-after-ms NaN falls back to retry-after, a NaN retry-after is none at all
    assert parse_retry_after({"retry-after-ms": "NaN", "retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({"retry-after": "inf"}) == 3600.0
    # an HTTP date without a zone ("-0000") is GMT, whatever the machine's zone
    import email.utils as eu
    gmt = eu.formatdate(time.time() + 30, usegmt=False, localtime=False).replace("+0000", "-0000")
    assert 25 < parse_retry_after({"retry-after": gmt}) <= 31


def test_a_retry_after_in_whole_seconds_is_known_to_be_rounded():
    """The pool pauses everyone only for what the server surely meant: a whole-second value is rounded up."""
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    for headers, rounded in (({"retry-after": "1"}, True), ({"retry-after": "2.0"}, True), ({"retry-after": when}, True),
                             ({"retry-after": "0.5"}, False), ({"retry-after-ms": "1000"}, False),
                             ({"retry-after-ms": "250", "retry-after": "1"}, False),
                             ({"retry-after-ms": "NaN", "retry-after": "1"}, True), ({}, False),
                             ({"retry-after": "soon"}, False)):
        assert P.retry_after_is_rounded(headers) is rounded, headers
    error = P.status_error(429, {"error": {"message": "slow down"}}, "", {"retry-after": "1"}, "ep", "m")
    assert error.rate_limited and error.retry_after == 1.0 and error.retry_after_rounded
    error = P.status_error(503, None, "busy", {"retry-after-ms": "1500"}, "ep", "m")
    assert error.retry_after == 1.5 and not error.retry_after_rounded


def test_redact_removes_keys_and_long_fragments(monkeypatch):
    monkeypatch.setattr(P, "_SECRETS", {"sk-abcdefghijklmnopqrstuvwxyz"})
    assert redact("key sk-abcdefghijklmnopqrstuvwxyz!") == "key ***!"
    out = redact("Incorrect API key provided: sk-abcdefg*****tuvwxyz and abcdefghijklm")
    assert "abcdefg" not in out and "hijklm" not in out
    assert redact("nothing here") == "nothing here"


def test_redact_replaces_a_short_key_only_as_a_token_of_its_own(monkeypatch):
    """A local server's placeholder key ("k", "none") is scrubbed where it stands alone, not out of words."""
    monkeypatch.setattr(P, "_SECRETS", {"k", "none"})
    assert redact("unknown model: none of them") == "unknown model: *** of them"
    assert redact("Authorization: Bearer k rejected") == "Authorization: Bearer *** rejected"
    assert redact("key=k; token 'k'") == "key=***; token '***'"
    assert redact("bookkeeping, nonexistent") == "bookkeeping, nonexistent"


@pytest.mark.parametrize("name", PROVIDER_NAMES)
def test_a_reply_stopped_by_a_filter_says_so(fake_server, api_keys, name):
    """OpenAI's finish_reason content_filter and Anthropic's stop_reason refusal come through as the finish reason
    that ``schemes.cut_short`` reads: the schemes drop such partial replies as they drop cut-off ones."""
    from bezoar.generate.schemes import FILTERED

    server = fake_server(reply=lambda call: Filtered("Step 1: First, gather the"))
    reply = send(name, server, Request(messages=[{"role": "user", "content": "how?"}], max_tokens=50))
    assert reply.text == "Step 1: First, gather the"
    assert reply.finish_reason == ("refusal" if name == "anthropic" else "content_filter")
    assert reply.finish_reason in FILTERED
