"""A fake LLM provider for tests and benchmarks: OpenAI and Anthropic HTTP APIs on localhost.

Serves, with aiohttp, the three routes the generation pool talks to:

  POST /v1/chat/completions   OpenAI chat (also what vLLM, TGI and bezoar.serve expose)
  POST /v1/completions        OpenAI text completions
  POST /v1/messages           Anthropic messages
  GET  /_stats                the counters below as JSON (for a server in another process)

so the real ``openai`` / ``anthropic`` SDKs and the pool's own aiohttp transport can be pointed
at it through their base URL. What it answers is scripted:

- by default an echo, ``"echo: <last user text>"``, so a test can check each answer belongs to
  its request;
- by a ``reply(call) -> str | Cut | Filtered | Fault`` callable (``call`` is a :class:`Call` describing the
  request; a :class:`Cut` answer is one cut off at max_tokens, a :class:`Filtered` one stopped by a filter);
- by a queue: ``server.script("first answer", Fault("500"), ...)`` is consumed first-come.

Faults (as a :class:`Fault` from the script, or at random with ``fault_rate`` over ``fault_kinds``):
``429`` (Retry-After in seconds), ``429ms`` (retry-after-ms only), ``429bare`` (no wait named, as TGI
answers past its limit on requests at once), ``500``, ``529`` (Anthropic's overloaded), ``hang``
(never answers; the client must time out), ``drop`` (closes the connection without an answer) and
``malformed`` (200 with a body that is not JSON). ``latency`` delays every answer. ``rpm`` puts a
token bucket in front (rate rpm/60 per second, ``rpm_burst_s`` seconds of burst) that answers 429
with both retry headers when exceeded. ``api_key`` makes it check the key
(401 otherwise) and ``models`` makes it answer 404 for any other model, as real providers do.

Counters: ``received[content]`` counts every request the server read per request content
(``content_key``: route, model, messages, system, prompt), ``answered[content]`` the 200 answers,
so tests can count duplicates; ``stats()`` gives totals by outcome.

Run in a background thread (``with FakeLLMServer(...) as server:``) for tests in this process or a
subprocess's client; or as its own process for benchmarks::

    python -m tests.generate.fake_server --latency 0.2 --rpm 6000
    # prints one JSON line {"url": ..., "pid": ...} then serves until SIGTERM / SIGINT
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import logging
import math
import random
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiohttp import web

FAULT_KINDS = ("429", "429ms", "500", "hang", "drop", "malformed")
OTHER_FAULT_KINDS = ("529", "429bare")  # drawn at random only where fault_kinds names them


@dataclass(frozen=True)
class Fault:
    """One injected failure. ``kind`` is one of FAULT_KINDS, ``529``, or an HTTP status as text
    (e.g. ``"400"``) answered with ``message``; ``retry_after`` overrides the server default."""

    kind: str
    retry_after: float | None = None
    message: str = "injected fault"


@dataclass(frozen=True)
class Cut:
    """An answer cut off at max_tokens: finish_reason ``length`` (Anthropic: stop_reason ``max_tokens``)."""

    text: str


@dataclass(frozen=True)
class Filtered:
    """An answer a provider's filter stopped: finish_reason ``content_filter`` (Anthropic: stop_reason ``refusal``)."""

    text: str


@dataclass
class Call:
    """What the reply callable sees about one request."""

    route: str  # "chat" | "completion" | "messages"
    model: str
    messages: list
    system: str | list | None  # anthropic: a string or a list of text blocks
    prompt: str | None
    body: dict
    content: str  # content_key of the request
    seen: int  # how many times this content has been received, this one included

    @property
    def last_user_text(self) -> str:
        if self.prompt is not None:
            return self.prompt
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return _text_of(message.get("content"))
        return ""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks
        return "".join(block.get("text", "") for block in content if isinstance(block, dict))
    return ""


def content_key(route: str, model: str, messages: Any, system: Any, prompt: Any) -> str:
    """A short digest identifying a request's content, for the duplicate counters."""
    blob = json.dumps([route, model, messages, system, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def default_reply(call: Call) -> str:
    return "echo: " + call.last_user_text


class _Bucket:
    """Token bucket: ``rate`` tokens per second, at most ``capacity``; starts full."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.stamp = capacity, time.monotonic()

    def take(self) -> float:
        """Take one token; return 0.0 on success, else the seconds until one is available."""
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


class FakeLLMServer:
    def __init__(
        self,
        *,
        latency: float = 0.0,
        reply: Callable[[Call], "str | Fault"] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = FAULT_KINDS,
        seed: int = 0,
        rpm: float | None = None,
        rpm_burst_s: float = 1.0,
        api_key: str | None = None,
        models: tuple[str, ...] | list[str] | None = None,
        retry_after_s: float = 0.05,
        hang_s: float = 3600.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        unknown = set(fault_kinds) - set(FAULT_KINDS) - set(OTHER_FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS + OTHER_FAULT_KINDS}")
        self.latency = latency
        self.reply = reply or default_reply
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.rng = random.Random(seed)
        self.bucket = _Bucket(rpm / 60.0, max(1.0, rpm / 60.0 * rpm_burst_s)) if rpm else None
        self.api_key = api_key
        self.models = set(models) if models is not None else None
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.host, self.port = host, port
        self.queue: collections.deque = collections.deque()
        self.received: collections.Counter = collections.Counter()
        self.answered: collections.Counter = collections.Counter()
        self.outcomes: collections.Counter = collections.Counter()
        self.first_request_at: float | None = None
        self.last_request_at: float | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._stopped: asyncio.Event | None = None
        self._hanging: set[asyncio.Task] = set()

    # ----------------------------------------------------------------- scripting and counters
    def script(self, *items: "str | Fault") -> None:
        """Queue answers (text or Fault) that the next requests get, in order, before ``reply``."""
        with self._lock:
            self.queue.extend(items)

    def stats(self) -> dict:
        with self._lock:
            return {
                "requests": sum(self.received.values()),
                "distinct": len(self.received),
                "duplicates": sum(1 for n in self.received.values() if n > 1),
                "answered": sum(self.answered.values()),
                "answered_twice": sum(1 for n in self.answered.values() if n > 1),
                "outcomes": dict(self.outcomes),
                "first_request_at": self.first_request_at,
                "last_request_at": self.last_request_at,
            }

    def reset_counters(self) -> None:
        with self._lock:
            self.received.clear()
            self.answered.clear()
            self.outcomes.clear()
            self.first_request_at = self.last_request_at = None

    # ----------------------------------------------------------------- URLs
    @property
    def url(self) -> str:
        """Root URL (what the Anthropic SDK takes as base_url)."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """The OpenAI-style base URL, ending in /v1."""
        return self.url + "/v1"

    # ----------------------------------------------------------------- request handling
    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/v1/completions", self._handle_completion)
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_get("/_stats", self._handle_stats)
        return app

    async def _handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def _handle_completion(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completion")

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "messages")

    async def _handle(self, request: web.Request, route: str) -> web.StreamResponse:
        anthropic = route == "messages"
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except ValueError as e:
            return self._error(anthropic, 400, f"request body is not valid JSON: {e}", "invalid_request_error")
        model = body.get("model", "")
        messages = body.get("messages") or []
        system = body.get("system")
        prompt = body.get("prompt")
        content = content_key(route, model, messages, system, prompt)
        now = time.monotonic()
        with self._lock:
            self.received[content] += 1
            seen = self.received[content]
            if self.first_request_at is None:
                self.first_request_at = now
            self.last_request_at = now

        presented = request.headers.get("x-api-key") if anthropic else \
            request.headers.get("Authorization", "").removeprefix("Bearer ")
        if self.api_key is not None and presented != self.api_key:
            # Real providers echo (part of) the key they got; we echo all of it, the worst case,
            # so tests can prove the client never passes it on.
            return self._outcome("401", self._error(
                anthropic, 401, f"Incorrect API key provided: {presented}", "authentication_error", "invalid_api_key"))
        if self.models is not None and model not in self.models:
            return self._outcome("404", self._error(
                anthropic, 404, f"The model `{model}` does not exist or you do not have access to it.",
                "not_found_error" if anthropic else "invalid_request_error", "model_not_found"))
        if self.bucket is not None:
            with self._lock:
                wait = self.bucket.take()
            if wait > 0:
                headers = {"retry-after-ms": str(max(1, math.ceil(wait * 1000))), "retry-after": str(math.ceil(wait))}
                return self._outcome("rate_limited", self._error(
                    anthropic, 429, "Rate limit reached for requests per minute.", "rate_limit_error",
                    "rate_limit_exceeded", headers))

        with self._lock:
            item = self.queue.popleft() if self.queue else None
        call = Call(route, model, messages, system, prompt, body, content, seen)
        if item is None:
            if self.fault_rate and self.rng.random() < self.fault_rate:
                item = Fault(self.rng.choice(self.fault_kinds))
            else:
                item = self.reply(call)
        if self.latency > 0:
            await asyncio.sleep(self.latency)
        if isinstance(item, Fault):
            return await self._fault(request, anthropic, item)
        with self._lock:
            self.answered[content] += 1
            self.outcomes["ok"] += 1
        if isinstance(item, Cut):
            return self._answer(route, model, call, item.text, cut=True)
        if isinstance(item, Filtered):
            return self._answer(route, model, call, item.text, filtered=True)
        return self._answer(route, model, call, str(item))

    def _outcome(self, name: str, response: web.StreamResponse) -> web.StreamResponse:
        with self._lock:
            self.outcomes[name] += 1
        return response

    async def _fault(self, request: web.Request, anthropic: bool, fault: Fault) -> web.StreamResponse:
        with self._lock:
            self.outcomes["fault_" + fault.kind] += 1
        retry_after = self.retry_after_s if fault.retry_after is None else fault.retry_after
        if fault.kind == "429":
            return self._error(anthropic, 429, "Rate limit reached (injected).", "rate_limit_error",
                               "rate_limit_exceeded", {"retry-after": f"{retry_after:g}"})
        if fault.kind == "429ms":
            return self._error(anthropic, 429, "Rate limit reached (injected).", "rate_limit_error",
                               "rate_limit_exceeded", {"retry-after-ms": str(round(retry_after * 1000))})
        if fault.kind == "429bare":
            return self._error(anthropic, 429, "Model is overloaded (injected).", "rate_limit_error")
        if fault.kind == "500":
            return self._error(anthropic, 500, "The server had an error (injected).", "api_error")
        if fault.kind == "529":
            return self._error(anthropic, 529, "Overloaded (injected).", "overloaded_error")
        if fault.kind == "hang":
            task = asyncio.current_task()
            self._hanging.add(task)
            try:
                await asyncio.sleep(self.hang_s)
            finally:
                self._hanging.discard(task)
            return self._error(anthropic, 504, "hung (injected)", "api_error")
        if fault.kind == "drop":
            request.transport.close()
            raise ConnectionResetError("connection dropped (injected)")
        if fault.kind == "malformed":
            return web.Response(text='{"id": "broken", "choices": [{"message": ', content_type="application/json")
        status = int(fault.kind)
        return self._error(anthropic, status, fault.message,
                           "invalid_request_error" if status < 500 else "api_error")

    @staticmethod
    def _error(anthropic: bool, status: int, message: str, error_type: str, code: str | None = None,
               headers: dict | None = None) -> web.Response:
        if anthropic:
            payload = {"type": "error", "error": {"type": error_type, "message": message}}
        else:
            payload = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        return web.json_response(payload, status=status, headers=headers)

    @staticmethod
    def _answer(route: str, model: str, call: Call, text: str, cut: bool = False,
                filtered: bool = False) -> web.Response:
        prompt_text = call.prompt if call.prompt is not None else " ".join(
            _text_of(m.get("content")) for m in call.messages) + " " + _text_of(call.system)
        input_tokens, output_tokens = len(prompt_text.split()) + 1, len(text.split())
        if route == "messages":
            payload = {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "max_tokens" if cut else "refusal" if filtered else "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            }
        else:
            finish = "length" if cut else "content_filter" if filtered else "stop"
            usage = {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                     "total_tokens": input_tokens + output_tokens}
            if route == "chat":
                choice = {"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": finish, "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                obj = "text_completion"
            payload = {"id": "cmpl-fake", "object": obj, "created": int(time.time()), "model": model,
                       "choices": [choice], "usage": usage}
        return web.Response(text=json.dumps(payload), content_type="application/json")

    # ----------------------------------------------------------------- lifecycle
    async def _serve(self, ready: threading.Event) -> None:
        self._stopped = asyncio.Event()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, backlog=4096).start()
        ready.set()
        await self._stopped.wait()
        for task in list(self._hanging):
            task.cancel()
        await self._runner.cleanup()

    def start(self) -> "FakeLLMServer":
        """Serve from a daemon thread with its own event loop; returns once the port is bound."""
        # Dropped connections make aiohttp log a traceback per drop: keep test output readable.
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve(ready))
            except BaseException as e:  # surfaced by start() below
                errors.append(e)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-llm-server", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise RuntimeError(f"fake LLM server failed to start: {errors[0]}") from errors[0]
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Serve the fake LLM provider (OpenAI + Anthropic routes) on localhost.")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--rpm", type=float, default=None, help="requests per minute before answering 429")
    p.add_argument("--rpm-burst-s", type=float, default=1.0, help="seconds of burst the RPM bucket holds")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--fault-kinds", default=",".join(FAULT_KINDS),
                   help="comma-separated kinds the random faults are drawn from "
                        f"(of {', '.join(FAULT_KINDS + OTHER_FAULT_KINDS)})")
    p.add_argument("--retry-after-s", type=float, default=0.05, help="the wait an injected 429 names")
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.fault_kinds.split(",") if k.strip())
    try:
        server = FakeLLMServer(latency=args.latency, rpm=args.rpm, rpm_burst_s=args.rpm_burst_s,
                               fault_rate=args.fault_rate, fault_kinds=kinds, retry_after_s=args.retry_after_s,
                               api_key=args.api_key, port=args.port)
    except ValueError as e:
        p.error(f"--fault-kinds: {e}")

    async def serve() -> None:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        ready = threading.Event()
        task = asyncio.ensure_future(server._serve(ready))
        while not ready.is_set():
            await asyncio.sleep(0.01)
        print(json.dumps({"url": server.url, "openai_url": server.openai_url}), flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server._stopped.set)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1:])
