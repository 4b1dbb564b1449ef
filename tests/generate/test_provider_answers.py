"""Answers a provider may send that the SDK providers read (review of the providers): 200 bodies that are no
answer, chat content as a list of parts, Anthropic's credit and prompt-cache answers, whitespace stop
sequences, and max_completion_tokens for OpenAI's own API. A scripted server answers each request with the
status, headers and body the test gives."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import pytest
from aiohttp import web

from bezoar.generate import providers as P
from bezoar.generate.providers import FATAL, REQUEST, RETRY, Endpoint, ProviderError, make_provider
from bezoar.generate.request import Request

CHAT = Request(messages=[{"role": "user", "content": "hi"}], max_tokens=9)


class Scripted:
    """An HTTP server in a thread: each request gets the next (status, body, content type); the bodies it was
    sent are kept in ``received``."""

    def __init__(self, answers):
        self.answers, self.received = list(answers), []
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        ready = threading.Event()
        self.loop = asyncio.new_event_loop()

        async def handle(request):
            self.received.append(json.loads(await request.read() or b"null"))
            status, body, kind = self.answers.pop(0)
            text = body if isinstance(body, str) else json.dumps(body)
            return web.Response(status=status, text=text, content_type=kind)

        async def main():
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            await web.SockSite(self.runner, sock).start()
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(main()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        ready.wait(10)

    def url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}" + ("" if provider == "anthropic" else "/v1")

    def close(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def send(provider: str, answers, request: Request = CHAT, env_url=None):
    """The reply and the bodies the server got; ``env_url``: the monkeypatch that sets OPENAI_BASE_URL to the server
    instead of the endpoint's base_url."""
    server = Scripted(answers)
    if env_url is not None:
        env_url.setenv("OPENAI_BASE_URL", server.url(provider))

    async def go():
        p = make_provider(Endpoint(provider, None if env_url is not None else server.url(provider)), connections=2)
        await p.open()
        try:
            return await p.send(request, "m", 30)
        finally:
            await p.close()

    try:
        return asyncio.run(go()), server.received
    finally:
        server.close()


def openai_body(content, usage=None):
    return {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            **({"usage": usage} if usage else {})}


def anthropic_body(text="hello", usage=None, stop_reason="end_turn"):
    return {"id": "msg", "type": "message", "role": "assistant", "model": "m", "stop_reason": stop_reason,
            "content": [{"type": "text", "text": text}], "stop_sequence": None,
            "usage": usage or {"input_tokens": 5, "output_tokens": 2}}


@pytest.mark.parametrize("provider,body,kind", [
    ("openai", {"error": {"message": "upstream failed", "type": "server_error"}}, "application/json"),
    ("openai", {"id": "x", "object": "chat.completion", "choices": None}, "application/json"),
    ("anthropic", "<html>bad gateway</html>", "text/plain"),
    ("anthropic", "null", "application/json"),
    ("anthropic", {"id": "msg", "type": "message", "content": None, "usage": None}, "application/json"),
])
def test_a_200_that_is_no_answer_is_a_malformed_answer_to_retry(api_keys, provider, body, kind):
    """An error object, null choices or a text body in a 200 raised TypeError / AttributeError out of the
    provider: the pool stopped, the run exited 1 with a traceback, and the answers in flight were lost."""
    with pytest.raises(ProviderError) as info:
        send(provider, [(200, body, kind)])
    assert info.value.kind == RETRY and info.value.reason == "malformed", info.value


@pytest.mark.parametrize("provider", ["openai", "compat"])
def test_chat_content_as_a_list_of_parts_is_its_text(api_keys, provider):
    """The openai provider stored the list as the response; compat retried it as malformed until it gave up."""
    parts = [{"type": "text", "text": "Hello, "}, {"type": "reasoning", "reasoning": "..."},
             {"type": "text", "text": "world."}]
    reply, _ = send(provider, [(200, openai_body(parts), "application/json")])
    assert reply.text == "Hello, world."


def test_anthropics_credit_balance_answer_stops_the_run(api_keys):
    """HTTP 400 'Your credit balance is too low': every input was sent and recorded as a failed request."""
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "Your credit balance is too low "
                                       "to access the Anthropic API. Please go to Plans & Billing."}}
    with pytest.raises(ProviderError) as info:
        send("anthropic", [(400, body, "application/json")])
    assert info.value.kind == FATAL and "credit balance exhausted" in str(info.value)
    other = {"type": "error", "error": {"type": "invalid_request_error", "message": "messages: field required"}}
    with pytest.raises(ProviderError) as info:
        send("anthropic", [(400, other, "application/json")])
    assert info.value.kind == REQUEST


def test_anthropic_prompt_cache_tokens_count_as_input(api_keys):
    """input_tokens counts the tokens after the last cache breakpoint only: the 4,000 written to the cache were
    not counted."""
    usage = {"input_tokens": 12, "output_tokens": 3, "cache_creation_input_tokens": 4000,
             "cache_read_input_tokens": 2000}
    reply, _ = send("anthropic", [(200, anthropic_body(usage=usage), "application/json")])
    # the cache writes count (billed, and limited, as input); the reads (0.1x, outside the input-token limit) do not:
    # added at the full price, a cached prompt's cost read 10x the bill
    assert (reply.input_tokens, reply.output_tokens) == (4012, 3)
    reply, _ = send("anthropic", [(200, anthropic_body(stop_reason="model_context_window_exceeded"),
                                   "application/json")])
    from bezoar.generate.request import Result
    from bezoar.generate.schemes import cut_short

    assert cut_short(Result(key="k", response=reply.text, finish_reason=reply.finish_reason)) == "cut off at max_tokens"


def test_whitespace_stop_sequences_are_refused_before_a_paid_call_to_anthropic(api_keys):
    request = Request(messages=[{"role": "user", "content": "hi"}], stop=["\n\n", "END"])
    with pytest.raises(ProviderError) as info:
        send("anthropic", [], request)
    assert info.value.kind == REQUEST and "only whitespace" in str(info.value)


def test_openais_own_api_gets_max_completion_tokens(api_keys, monkeypatch):
    """OpenAI deprecated max_tokens on its chat API and its reasoning models refuse it; a compatible server at a
    base_url keeps max_tokens."""
    assert P._official_openai(None) and P._official_openai("https://api.openai.com/v1")
    assert not P._official_openai("http://gpu1:8000/v1")
    reply, sent = send("openai", [(200, openai_body("ok"), "application/json")])
    assert sent[0]["max_tokens"] == 9 and "max_completion_tokens" not in sent[0]
    # a compatible server named by OPENAI_BASE_URL (no base_url): it was taken for OpenAI's API
    reply, sent = send("openai", [(200, openai_body("ok"), "application/json")], env_url=monkeypatch)
    assert sent[0]["max_tokens"] == 9 and "max_completion_tokens" not in sent[0]
    monkeypatch.delenv("OPENAI_BASE_URL")
    monkeypatch.setattr(P, "_official_openai", lambda base_url: True)
    reply, sent = send("openai", [(200, openai_body("ok"), "application/json")])
    assert sent[0]["max_completion_tokens"] == 9 and "max_tokens" not in sent[0]


def test_an_openai_sdk_that_refuses_the_arguments_stops_the_run(api_keys, monkeypatch):
    """openai 1.40-1.44 have no max_completion_tokens: the TypeError was taken for a malformed answer and every
    request retried max_attempts times, then recorded as failed."""
    import openai

    monkeypatch.setattr(P, "_official_openai", lambda base_url: True)

    async def old_create(self, *, model, messages, max_tokens=None, temperature=None, top_p=None, stop=None,
                         timeout=None):
        raise AssertionError("not reached")

    monkeypatch.setattr(openai.resources.chat.completions.AsyncCompletions, "create", old_create)
    with pytest.raises(ProviderError) as info:
        send("openai", [])
    assert info.value.kind == FATAL and "upgrade it" in str(info.value)


def test_a_price_for_one_model_says_which_models_it_leaves_out(fake_server, tmp_path, caplog):
    """--price prices --model only: tokens of lines naming another model were left out of the cost unsaid."""
    from bezoar.generate.pool import Limits, Pool

    server = fake_server()
    requests = [Request(messages=[{"role": "user", "content": f"q{i}"}], model="other" if i else None)
                for i in range(3)]

    async def go():
        async with Pool(Endpoint("compat", server.openai_url), Limits(), tmp_path / "out.jsonl", model="m",
                        prices={"m": (1.0, 2.0)}) as pool:
            return await pool.run(requests)

    with caplog.at_level(logging.WARNING, logger="bezoar.generate"):
        results = asyncio.run(go())
    assert all(r.ok for r in results)
    assert caplog.text.count("no price for model 'other'") == 1
