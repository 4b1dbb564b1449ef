"""The compat provider over its two transports: the lean client and aiohttp classify every fault
alike; the transport is chosen by the proxy environment; credentials reach the server, never a message."""

from __future__ import annotations

import asyncio

import pytest

from bezoar.generate import providers as P
from bezoar.generate.providers import CompatProvider, Endpoint, ProviderError, proxy_for, read_api_key
from bezoar.generate.request import GenerateError, Request
from tests.generate.conftest import closed_port_url
from tests.generate.fake_server import Fault
from tests.generate.test_http import RawServer, length_answer

QUESTION = Request(messages=[{"role": "user", "content": "x"}])


async def _send(transport: str, url: str, request: Request = QUESTION, *, model: str = "m", timeout: float = 60.0,
                key_env: str | None = None):
    endpoint = Endpoint("compat", url, api_key_env=key_env)
    provider = CompatProvider(endpoint, read_api_key(endpoint), connections=4, transport=transport)
    await provider.open()
    try:
        assert provider.transport == transport
        return await provider.send(request, model, timeout)
    finally:
        await provider.close()


def outcome(transport: str, url: str, **kw) -> tuple:
    """What the pool sees of one call: the reply text, or the error's classification."""
    try:
        return ("ok", asyncio.run(_send(transport, url, **kw)).text)
    except ProviderError as e:
        return (e.kind, e.reason, e.status, e.rate_limited, e.connect, e.retry_after)


SCRIPTS = {
    "ok": [], "429": [Fault("429")], "429ms": [Fault("429ms")], "429bare": [Fault("429bare")], "500": [Fault("500")],
    "529": [Fault("529")],
    "malformed": [Fault("malformed")], "drop": [Fault("drop")], "400": [Fault("400")], "422": [Fault("422")],
    "413": [Fault("413")], "hang": [Fault("hang")],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_transports_classify_alike(fake_server, monkeypatch, script):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    results = {}
    # Only the hang needs a short timeout to end. Every other script is answered at once, but on a loaded
    # machine "at once" could take longer than 0.5 s, and that transport then read a timeout where the
    # other read the fault.
    timeout = 0.5 if script == "hang" else 60.0
    for transport in ("lean", "aiohttp"):
        server = fake_server(retry_after_s=0.25)
        server.script(*SCRIPTS[script])
        results[transport] = outcome(transport, server.openai_url, timeout=timeout)
    assert results["lean"] == results["aiohttp"], results
    expected_kind = {"ok": "ok", "400": P.REQUEST, "422": P.REQUEST, "413": P.REQUEST}.get(script, P.RETRY)
    assert results["lean"][0] == expected_kind


def test_transports_alike_on_refused_bad_key_unknown_model(fake_server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-wrong-key-0123456789")
    strict = fake_server(api_key="sk-right", models=["real"])
    cases = {"refused": dict(url=closed_port_url()), "bad key": dict(url=strict.openai_url, key_env="MY_KEY"),
             "unknown model": dict(url=fake_server(models=["real"]).openai_url, model="nope")}
    for name, kw in cases.items():
        lean, slow = outcome("lean", **kw), outcome("aiohttp", **kw)
        assert lean == slow, (name, lean, slow)
    assert outcome("lean", **cases["refused"])[:1] == (P.RETRY,) and outcome("lean", **cases["refused"])[4]
    assert outcome("lean", **cases["bad key"])[0] == P.FATAL


def test_bad_key_message_never_holds_the_key(fake_server, monkeypatch):
    secret = "sk-live-LEAN-SECRET-0123456789"
    monkeypatch.setenv("MY_KEY", secret)
    server = fake_server(api_key="sk-right")  # echoes the key it got in its 401 message
    with pytest.raises(ProviderError) as info:
        asyncio.run(_send("lean", server.openai_url, key_env="MY_KEY"))
    assert info.value.status == 401 and "SECRET" not in str(info.value) and "rejected the API key" in str(info.value)


def test_key_with_a_line_break_is_refused_without_showing_it(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-one\nX-Injected: yes")
    endpoint = Endpoint("compat", "http://127.0.0.1:9/v1", api_key_env="MY_KEY")
    provider = CompatProvider(endpoint, read_api_key(endpoint), connections=1)
    with pytest.raises(GenerateError, match="Authorization") as info:
        asyncio.run(provider.open())
    assert "sk-one" not in str(info.value) and "Injected" not in str(info.value)


@pytest.mark.parametrize("env,url,expected", [
    ({}, "http://gpu1:8000/v1", None),
    ({"http_proxy": "http://proxy:3128"}, "http://gpu1:8000/v1", "http://proxy:3128"),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "http://gpu1:8000/v1", None),
    ({"HTTPS_PROXY": "http://proxy:3128"}, "https://api.openai.com/v1", "http://proxy:3128"),
    ({"http_proxy": "http://proxy:3128", "no_proxy": "localhost,gpu1"}, "http://gpu1:8000/v1", None),
    ({"all_proxy": "http://proxy:3128"}, "http://gpu1:8000/v1", "http://proxy:3128"),
])
def test_proxy_for(monkeypatch, env, url, expected):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert proxy_for(url) == expected


def test_auto_transport_follows_the_proxy_environment(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)

    async def chosen() -> str:
        provider = CompatProvider(Endpoint("compat", "http://gpu1:8000/v1"), None, connections=1)
        await provider.open()
        try:
            return provider.transport
        finally:
            await provider.close()

    monkeypatch.delenv("BEZOAR_COMPAT_TRANSPORT", raising=False)
    assert asyncio.run(chosen()) == "lean"
    monkeypatch.setenv("BEZOAR_COMPAT_TRANSPORT", "aiohttp")  # the user's way back to aiohttp
    assert asyncio.run(chosen()) == "aiohttp"
    monkeypatch.setenv("BEZOAR_COMPAT_TRANSPORT", "fastest")
    with pytest.raises(GenerateError, match="BEZOAR_COMPAT_TRANSPORT='fastest'"):
        CompatProvider(Endpoint("compat", "http://gpu1:8000/v1"), None, connections=1)
    monkeypatch.delenv("BEZOAR_COMPAT_TRANSPORT")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert asyncio.run(chosen()) == "aiohttp"
    with pytest.raises(GenerateError, match="unknown compat transport"):
        CompatProvider(Endpoint("compat", "http://gpu1:8000/v1"), None, connections=1, transport="curl")


def _authorization_sent(url: str, key_env: str | None = None) -> str | None:
    async def go():
        async with RawServer([[length_answer(b'{"choices": [{"message": {"content": "ok"}}]}')]]) as server:
            await _send("lean", url.replace("PORT", str(server.port)), key_env=key_env)
            head = server.requests[0][0].decode()
        for line in head.split("\r\n"):
            if line.lower().startswith("authorization:"):
                return line.split(":", 1)[1].strip()
        return None

    return asyncio.run(go())


def test_credentials_from_key_url_or_netrc(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ann password s3cret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    assert _authorization_sent("http://127.0.0.1:PORT/v1") is None
    assert _authorization_sent("http://bob:pa%20ss@127.0.0.1:PORT/v1") == "Basic Ym9iOnBhIHNz"  # bob:pa ss
    monkeypatch.setenv("NETRC", str(netrc))
    assert _authorization_sent("http://127.0.0.1:PORT/v1") == "Basic YW5uOnMzY3JldA=="  # ann:s3cret
    monkeypatch.setenv("LOCAL_KEY", "sk-local-key")
    assert _authorization_sent("http://127.0.0.1:PORT/v1", key_env="LOCAL_KEY") == "Bearer sk-local-key"



@pytest.mark.parametrize("transport", ["lean", "aiohttp"])
@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect",
                                    "308 Permanent Redirect"])
def test_a_redirect_is_fatal_and_names_the_target(monkeypatch, transport, status):
    # e.g. http:// where the server wants https://, or a proxy in front that moved the API: every
    # call would get the same answer. Neither transport follows: aiohttp would turn a 301/302 POST
    # into a GET without body, and take whatever answers that for the reply.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    moved = length_answer(b"", status=status,
                          extra=b"Location: https://user:pw@api.example.invalid/v1/chat/completions?token=t\r\n")

    async def go():
        async with RawServer([[moved], [length_answer()]]) as server:
            with pytest.raises(ProviderError) as info:
                await _send(transport, server.url)
            return info.value, len(server.requests)

    error, requests = asyncio.run(go())
    assert (error.kind, error.status, requests) == (P.FATAL, int(status[:3]), 1)
    target = "https://api.example.invalid/v1/chat/completions"
    assert f"answered HTTP {status[:3]}, a redirect to {target}:" in error.message
    assert "pw" not in error.message and "token" not in error.message


def test_aiohttp_errors_show_no_credentials_or_query_of_the_url(monkeypatch):
    # aiohttp's exception texts quote the request URL whole; a query string (or user:password) in
    # the base URL may hold a credential. They also run over several lines: ours are one line.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    async def go():
        async with RawServer([[b"NOT HTTP AT ALL\r\n\r\n"]]) as server:
            url = server.url.replace("http://", "http://ann:pa55word@") + "?key=s3cretq"
            with pytest.raises(ProviderError) as info:
                await _send("aiohttp", url)
            return info.value, server.url

    error, url = asyncio.run(go())
    assert error.kind == P.RETRY and "ClientResponseError" in error.message and url in error.message
    assert "s3cretq" not in error.message and "pa55word" not in error.message and "ann" not in error.message
    assert "\n" not in error.message


@pytest.mark.parametrize("usage", ['"n/a"', '[1, 2]', '{"prompt_tokens": "12", "completion_tokens": 3}',
                                   '{"prompt_tokens": null, "completion_tokens": {"n": 3}}'])
def test_an_odd_usage_field_neither_crashes_the_run_nor_loses_the_answer(monkeypatch, tmp_path, usage):
    # The answer text is fine; only the token counts are not what OpenAI sends. The answer was paid
    # for: it is stored (with the counts that could be read), and the run goes on.
    from bezoar.generate.pool import Limits, Pool

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    body = b'{"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": ' + usage.encode() + b"}"

    async def go(tpm):
        async with RawServer([[length_answer(body)]]) as server:
            async with Pool(Endpoint("compat", server.url), Limits(max_attempts=1, tpm=tpm), tmp_path / f"{tpm}.jsonl",
                            model="m") as pool:
                return await pool.run([QUESTION]), len(server.requests)

    for tpm in (None, 100000):
        (result,), calls = asyncio.run(go(tpm))
        assert result.ok and result.response == "hi" and calls == 1
        # counts that are no numbers: unknown (stored as null; stored as 0 tokens before), or the numbers there are
        assert result.usage is None or all(isinstance(n, int) for n in result.usage.to_dict().values())
        assert len((tmp_path / f"{tpm}.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("transport", ["lean", "aiohttp"])
@pytest.mark.parametrize("where", ["url", "netrc"])
def test_basic_credentials_echoed_by_the_server_are_scrubbed(fake_server, monkeypatch, tmp_path, transport, where):
    # A 401 (or 400) that quotes the Authorization header it got must not pass a user:password
    # from the base URL or ~/.netrc on to a message, a log or a stored record.
    import base64

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    password = "pa55w0rd-" + where + "-" + transport
    token = base64.b64encode(f"ann:{password}".encode()).decode()
    server = fake_server(api_key="the-right-key")  # echoes what it got
    url = server.openai_url
    if where == "url":
        monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
        url = url.replace("http://", f"http://ann:{password}@")
    else:
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login ann password {password}\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("NETRC", str(netrc))
    with pytest.raises(ProviderError) as info:
        asyncio.run(_send(transport, url))
    assert info.value.status == 401 and "Basic" in info.value.message
    assert token not in info.value.message and password not in info.value.message
