"""What the generation pool sends and returns: Request, Result, Usage, the stable request key.

A :class:`Request` is one API call: a chat (messages, optional system prompt) or a text completion
(prompt), a model and sampling parameters, plus an ``id`` chosen by the caller. Its key is

    sha256(canonical JSON of [kind, model, messages, prompt, system, max_tokens,
                              temperature, top_p, stop, id])[:32]   (hex, 128 bits)

so two requests share a key exactly when they would ask the same thing of the same model under
the same id. ``kind`` is the endpoint kind (chat | completion); the provider and the base URL are
not part of the key, so the same request answered by any endpoint of a model counts as done.
``id`` is how a caller asks for more than one answer to the same prompt (samples 0..n-1) or keeps
two equal prompts apart; requests that agree in everything, id included, are one call.
``meta`` is carried to the stored record untouched and is not part of the key.

A :class:`Result` is what came back, success or final failure, in the shape stored as one JSONL
record (:meth:`Result.to_record`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any

KINDS = ("chat", "completion")
ROLES = ("system", "user", "assistant", "tool", "developer")


class GenerateError(Exception):
    """An error a user can cause (bad input, bad key, unknown model, unreachable endpoint).

    Its message is one clear line, meant to be printed as is, without a traceback."""


@dataclass
class Request:
    """One call to an LLM. Either ``messages`` (kind "chat") or ``prompt`` (kind "completion").

    messages: list of ``{"role": ..., "content": ...}`` (content a string or a list of content blocks)
    system: system prompt for chat requests (sent as a system message, or Anthropic's ``system``)
    model: None means the pool's default model
    max_tokens, temperature, top_p, stop: sampling parameters; None leaves the provider's default
        (max_tokens >= 1, temperature >= 0, top_p in [0, 1]: values outside are refused here)
    id: the caller's identifier; part of the key (see the module doc)
    meta: JSON-able data copied into the stored record, not part of the key
    """

    messages: list | None = None
    prompt: str | None = None
    kind: str = "chat"
    model: str | None = None
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    id: Any = None
    meta: Any = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Request.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "chat":
            if not isinstance(self.messages, (list, tuple)) or not self.messages:
                raise ValueError("a chat Request needs a non-empty list of messages")
            for i, message in enumerate(self.messages):
                if not isinstance(message, dict) or "role" not in message or "content" not in message:
                    raise ValueError(f"message {i} must be an object with 'role' and 'content'")
                if message["role"] not in ROLES:
                    raise ValueError(f"message {i} has unknown role {message['role']!r}; known: {ROLES}")
            if self.prompt is not None:
                raise ValueError("a chat Request takes messages, not a prompt")
        else:
            if not isinstance(self.prompt, str):
                raise ValueError("a completion Request needs a prompt string")
            if self.messages is not None or self.system is not None:
                raise ValueError("a completion Request takes a prompt only (no messages, no system)")
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"Request.model must be a string, got {type(self.model).__name__}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError("Request.system must be a string")
        if self.max_tokens is not None:
            if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
                raise ValueError(f"Request.max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"Request.{name} must be a finite number, got {value!r}")
                setattr(self, name, float(value))  # 1 and 1.0 must give the same key
        # Ranges no provider accepts outside of, refused here rather than sent and recorded as a failure
        # (upper bounds of temperature differ: OpenAI 2, Anthropic 1, vLLM none; each server checks its own).
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"Request.temperature must be >= 0, got {self.temperature:g}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"Request.top_p must be between 0 and 1, got {self.top_p:g}")
        if self.stop is not None:
            if isinstance(self.stop, str):
                self.stop = [self.stop]
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise ValueError(f"Request.stop must be a string or a list of strings, got {self.stop!r}")
            self.stop = list(self.stop)
        self._check_json()

    def _check_json(self) -> None:
        """Refuse data that cannot go into the key or the stored record: a value JSON cannot hold
        (a date, a set, a Path) or text that is not valid Unicode (a lone surrogate such as
        "\\ud83d", half of an emoji). Checked here, before anything is paid for: found when the
        answer is stored, the call is paid, its answer lost, and every rerun pays again."""
        fields = ("messages", "prompt", "system", "stop", "id", "model")  # encoded as key() encodes them
        try:  # the usual case: one encoding of the key's fields, one of meta
            json.dumps([getattr(self, name) for name in fields], sort_keys=True, ensure_ascii=False).encode("utf-8")
            json.dumps(self.meta, ensure_ascii=False).encode("utf-8")
            return
        except (TypeError, ValueError, RecursionError):
            pass
        for name in fields + ("meta",):  # again one at a time, to name the bad one
            try:
                json.dumps(getattr(self, name), sort_keys=name != "meta", ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                bad = e.object[e.start:e.end]
                raise ValueError(f"Request.{name} holds text that is not valid Unicode ({ascii(bad)}, a lone "
                                 "surrogate: half of a character, e.g. of an emoji cut in two)") from None
            except (TypeError, ValueError, RecursionError) as e:
                raise ValueError(f"Request.{name} must be JSON data (strings, numbers, true/false/null, lists "
                                 f"and objects with string keys): {e}") from None

    def key(self, model: str | None = None) -> str:
        """The stable key of this request; ``model`` fills in when the request names none."""
        blob = [self.kind, self.model or model, self.messages, self.prompt, self.system, self.max_tokens,
                self.temperature, self.top_p, self.stop, self.id]
        text = json.dumps(blob, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # the pool's model name, or a field changed since the checks
            bad = e.object[e.start:e.end]
            raise ValueError(f"the request or its model name holds text that is not valid Unicode ({ascii(bad)}, "
                             "a lone surrogate)") from None
        return hashlib.sha256(data).hexdigest()[:32]

    def prompt_text(self) -> str:
        """All input text, for token estimates."""
        if self.kind == "completion":
            return self.prompt or ""
        parts = [self.system or ""]
        for message in self.messages or ():
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(b.get("text", "") for b in content if isinstance(b, dict))
        return "\n".join(parts)


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def to_dict(self) -> dict:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


@dataclass
class Result:
    """The outcome of one request: ``response`` text and ``usage``, or ``error``.

    error_type: "request" (the provider refused this request, e.g. 400; not retried),
        "retries" (every attempt failed with a retryable error; the last one is in ``error``)
    attempts: calls made for this result (0 when it came from the store)
    latency_s: seconds from the first attempt to the end, retries and back-off included
    cached: True when no call was made: the key was already in the store, or the same request
        was in flight and this result is shared with it
    """

    key: str
    id: Any = None
    response: str | None = None
    usage: Usage | None = None
    error: str | None = None
    error_type: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    model: str | None = None
    endpoint: str | None = None
    finish_reason: str | None = None
    meta: Any = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_record(self) -> dict:
        """The JSONL record the store keeps ("key" first, so a line is easy to eyeball)."""
        record = {"key": self.key, "id": self.id, "ok": self.ok}
        if self.ok:
            record["response"] = self.response
            record["usage"] = self.usage.to_dict() if self.usage else None
            record["finish_reason"] = self.finish_reason
        else:
            record["error"] = self.error
            record["error_type"] = self.error_type
        record.update(model=self.model, endpoint=self.endpoint, attempts=self.attempts,
                      latency_s=None if self.latency_s is None else round(self.latency_s, 4),
                      time=round(time.time(), 3))
        if self.meta is not None:
            record["meta"] = self.meta
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Result":
        usage = record.get("usage")
        return cls(
            key=record["key"], id=record.get("id"), response=record.get("response"),
            usage=Usage(int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)) if usage else None,
            error=record.get("error"), error_type=record.get("error_type"), attempts=record.get("attempts", 0),
            latency_s=record.get("latency_s"), model=record.get("model"), endpoint=record.get("endpoint"),
            finish_reason=record.get("finish_reason"), meta=record.get("meta"), cached=True,
        )


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate of a prompt's tokens (about 4 characters a token in English),
    used only to charge the tokens-per-minute bucket before a call; the usage the provider
    reports corrects it afterwards."""
    return len(text) // 4 + 8


__all__ = ["GenerateError", "Request", "Result", "Usage", "KINDS", "estimate_tokens"]
