"""An OpenAI-compatible HTTP server for a bezoar checkpoint (aiohttp).

    python -m bezoar.serve --model DIR [--adapter DIR] [--quant nf4] [--host 127.0.0.1] [--port 8000]

Routes:

- ``GET /v1/models``: the one model served, under ``--name`` (default: the folder's name).
- ``POST /v1/completions``: ``prompt`` as a string, a list of strings, a list of token ids or a
  list of token-id lists; ``max_tokens``, ``temperature`` (0 to 2; below ``GREEDY_BELOW``, 1e-5, it
  decodes greedily as 0 does, vLLM's rule: the logits divided by a tinier one overflow to infinity),
  ``top_p``, ``top_k`` (as vLLM takes it: an integer, -1 or 0 for off), ``n``, ``stop``, ``seed``,
  ``stream``, ``echo`` and ``logprobs`` (0-20 alternatives, plus the token chosen where it is not one of
  them, as vLLM gives them) - what lm-eval's ``local-completions`` model needs for loglikelihood
  (``echo`` + ``logprobs`` + ``max_tokens=1``) and generation.
  A text prompt gets BOS in front where the tokenizer's ``add_bos_token`` says so (the default, and
  OpenLLaMA's; an empty text is BOS alone); a token prompt is used exactly as given. The completion's text
  is what its tokens add to the prompt's text, as OpenAI and vLLM return it: a first token "▁an" after
  "The answer is" reads " an" (sentencepiece, decoding the new tokens alone, would drop that space),
  so with ``echo`` the text is the prompt's text followed by the completion's. ``usage.completion_tokens``
  (here and in chat, streamed or not) counts every token decoded, as vLLM does: the EOS, and the tokens up to
  the one that completed a stop string, whose text is not returned (nor their logprobs).
- ``POST /v1/chat/completions``: ``messages`` rendered with the OpenBezoar prompt template
  (``bezoar.eval.chat``), the answer stops at EOS or at a new template section; the sampling
  settings of completions (``top_k`` included), ``logprobs`` / ``top_logprobs``, ``stream``. The
  answer's content is its tokens decoded as a text of their own (a leading word marker is no space),
  as OpenAI's chat content starts at the answer's first character; its ``logprobs.content`` bytes
  join to that content (the first token's marker is left out there too).
- ``GET /health``.

Requests are decoded with continuous batching (``bezoar.model.decode.ContinuousBatch``): each choice
of a generation request takes a row of one batch between two decode steps, whatever the rows beside
it are doing, and leaves it the moment it ends (EOS, a stop string, its ``max_tokens``, a client gone),
when it is answered. So a short answer never waits for a long one, and a request arriving mid-decode
starts at the next step instead of after the batch. Requests waiting together (the worker was busy, or
they came within ``--batch-window-ms`` of an idle server) are prefilled together, as many as fit in
``--max-prefill-tokens`` left-padded tokens (default 8192; the rest at the next step, so a wave of long
prompts never stops the rows decoding for one long prefill); at most ``--max-batch-size`` rows decode at
once and the others wait their turn, first come first served. Scoring forwards (below) take at most as
many padded tokens each.
One-token scoring requests (``max_tokens`` <= 1, not streamed: lm-eval's loglikelihood) run as one
batch of forwards between steps; a request that asked for logprobs is scored when its row ends. A
failure fails only the requests it touched (a prefill its own, a step the rows decoding, a sampler
its settings' rows), each with a 500. A sampled request with a ``seed`` draws from a generator of its
own, seeded with ``seed`` plus the choice's index, so the random numbers it gets do not depend on
the requests decoding beside it (its logits can, in the last bits, as in any batched server). The
model runs in one worker thread and prompts are tokenized in two others (a text of megabytes takes
seconds), so the event loop keeps serving.
Bad requests get OpenAI-style errors: status 400 (404 for an unknown model or route) with
``{"error": {"message", "type", "param", "code"}}``.

What one request may ask for: a body of at most 64 MiB; ``n`` up to 16; each prompt plus its
``max_tokens`` within the model's context; and at most ``--max-request-seqs`` sequences (default 128):
``n`` times the number of prompts, checked before any prompt is tokenized. So one request decodes at
most that many sequences of at most the context's length, in batches of ``--max-batch-size`` rows.
A text prompt of more UTF-8 bytes than the context's length times the tokenizer's longest piece
(in bytes, U+2581 counted as its 3) is refused (``context_length_exceeded``, "at least N tokens")
without being tokenized, where the sentencepiece model makes that a sound bound
(``longest_piece_bytes``); a shorter one is tokenized and counted exactly.

lm-eval through the server: ``--model local-completions --model_args model=NAME,base_url=
http://127.0.0.1:8000/v1/completions,tokenizer=DIR,tokenizer_backend=huggingface,add_bos_token=True,
max_length=L+2`` gives the numbers ``--model bezoar`` gives with ``max_length=L`` (local-completions
keeps one token of its max_length for the answer and one more in its rolling windows). For
perplexity tasks pass ``add_bos_token=False``: with it true, local-completions (like lm-eval's
``hf`` model) reads BOS twice at the start of a text and scores the second one. Generated answers are
the same tokens, but read as they follow the prompt (as from vLLM): one whose first token starts a word
begins with the space that lm-eval's ``hf`` and ``bezoar`` models, decoding the answer alone, drop, which
a generation metric that keeps leading whitespace (exact_match without a filter) counts.

The server binds 127.0.0.1 unless ``--host`` says otherwise (every address the name resolves to; ``""``: all
interfaces), on ``--port`` (0: one the system picks). It binds before it loads the model, so a port in use or
a host that does not resolve is one line on stderr and exit status 2 at once, and logs "serving ... on URL"
once it has bound (connections made while the model loads wait for it). When the environment variable
``BEZOAR_SERVE_API_KEY`` is set, every request must carry ``Authorization: Bearer <that key>``; set but
empty (or with whitespace around the key) it is refused at start-up (exit status 2), not read as "no key".
The start-up log line names the adapter, the quantization, device and dtype loaded and whether a bearer key
is required (never the key).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import collections
import concurrent.futures
import errno
import functools
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from bezoar.eval.chat import CHAT_STOP, ChatError, chat_prompt
from bezoar.eval.decoding import StopStrings, context_tail, continuation, cut_at_stop, silent
from bezoar.eval.scoring import iter_logprobs
from bezoar.model import decode as _decode

log = logging.getLogger("bezoar.serve")

API_KEY_ENV = "BEZOAR_SERVE_API_KEY"
MAX_LOGPROBS = 20
MAX_N = 16
MAX_STOP = 16
MAX_REQUEST_SEQS = 128  # default --max-request-seqs: sequences (n x prompts) one request may ask for
# default --max-prefill-tokens (bezoar.model.decode.MAX_PREFILL_TOKENS)
MAX_PREFILL_TOKENS = _decode.MAX_PREFILL_TOKENS
MAX_BODY_BYTES = 64 * 2**20
# A temperature below this decodes greedily, as 0 does (vLLM's threshold): logits divided by 1e-40 are
# infinite, and the softmax of infinities is NaN, which the sampler cannot draw from.
GREEDY_BELOW = 1e-5
TOKENIZE_THREADS = 2  # prompts tokenized at once, off the event loop (sentencepiece releases the GIL)


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


# ---- request validation ----------------------------------------------------------------------

COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
                   "stream", "stream_options", "echo", "logprobs", "user", "presence_penalty", "frequency_penalty",
                   "best_of", "logit_bias", "suffix"}
CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
             "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "user", "presence_penalty",
             "frequency_penalty", "logit_bias", "response_format", "store", "metadata"}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ApiError(f"{name} must be a number, got {value!r}", name)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(f"{name} must be in {bound}, got {value}", name)
    return float(value)


def _temperature(body: dict) -> float:
    """``temperature`` in [0, 2], default 1; below ``GREEDY_BELOW`` it is 0 (greedy)."""
    value = _number(body, "temperature", 1.0, 0.0, 2.0)
    return 0.0 if value < GREEDY_BELOW else value


def _integer(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        raise ApiError(f"{name} must be between {low} and {high if high is not None else 'the context size'}, got {value}", name)
    return value


def _top_k(body: dict) -> int:
    """vLLM's ``top_k``: sample among the k most likely tokens; absent, -1 or 0 is off (returned as 0)."""
    value = body.get("top_k")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"top_k must be an integer, got {value!r}", "top_k")
    if value < -1:
        raise ApiError(f"top_k must be -1 or 0 (off) or at least 1, got {value}", "top_k")
    return max(value, 0)


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError("stop must be a string or a list of strings", "stop")
    if len(value) > MAX_STOP:
        raise ApiError(f"stop takes at most {MAX_STOP} strings, got {len(value)}", "stop")
    return [s for s in value if s]


def _prompt_count(prompt) -> int:
    """How many prompts ``prompt`` holds, read from its shape alone (nothing tokenized): a list of strings or
    of token-id lists holds one per item, anything else is one prompt (or a shape ``_prompts`` refuses)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return len(prompt)
    return 1


def _common(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(f"{name} is not supported by bezoar.serve (only 0)", name)
    if body.get("logit_bias"):
        raise ApiError("logit_bias is not supported by bezoar.serve", "logit_bias")
    options = body.get("stream_options")
    if options is not None and (body.get("stream") is None or body.get("stream") is False):  # as OpenAI does
        raise ApiError("stream_options is only allowed when stream is true", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise ApiError("stream_options may only hold include_usage", "stream_options")
    if options and not isinstance(options.get("include_usage", False), bool):
        raise ApiError(f"stream_options.include_usage must be a boolean, got {options['include_usage']!r}",
                       "stream_options")


# ---- jobs and the scheduler ------------------------------------------------------------------


@dataclass
class Job:
    """One sequence to complete (one choice of one request)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives to report per token; None: no logprobs
    echo: bool = False  # report the prompt's tokens (and their logprobs) too
    # the text reads as it follows the prompt's (completions); False: as a text of its own (chat answers)
    continues_prompt: bool = True
    index: int = 0
    stream: Any = None  # an asyncio.Queue receiving (index, text delta, finish reason or None)
    # filled in by the engine
    new_ids: list[int] = field(default_factory=list)
    # tokens the model produced, as usage counts them (vLLM's rule): new_ids, with the EOS and any token cut
    # after a stop string (the one that completed it) counted too
    generated: int = 0
    finish_reason: str = "length"
    text: str = ""
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    cancelled: bool = False
    error: BaseException | None = None  # what failed the job (the request gets a 500)
    future: Any = None
    sent: int = 0  # characters of text already streamed
    stop_hit: bool = False


class Engine:
    """Runs jobs on the model in one worker thread: one-token scoring jobs in batches of forwards, generation
    jobs in a ``ContinuousBatch`` that they join between decode steps and leave when they end."""

    def __init__(self, model, tokenizer, max_batch_size: int = 32, batch_window_s: float = 0.005,
                 decode: str = "auto", max_prefill_tokens: int | None = MAX_PREFILL_TOKENS):
        from bezoar.model.decode import ContinuousBatch, resolve_decode_mode

        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be at least 1 (None: no bound), got {max_prefill_tokens}")
        self.model = model.eval()  # LoRA dropout off, whatever mode the model came in
        resolve_decode_mode(decode, self.model)  # a bad setting fails at start-up
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # left-padded prompt tokens one admit prefills (prefill_take)
        self.batch_window_s = batch_window_s
        self.context = model.config.max_position_embeddings
        self.generator = torch.Generator(device=model.device).manual_seed(0)
        # the cache and CUDA graphs are kept between requests; steps run the first power of two of rows that
        # covers the rows in use, so a few sizes' graphs serve every load
        self.batch = ContinuousBatch(self.model, max_batch_size, decode,
                                     eos_id=getattr(tokenizer, "eos_ids", tokenizer.eos_id),
                                     pad_id=tokenizer.pad_id, generator=self.generator)
        # jobs not yet taken by the worker: appended on the event loop, taken in the worker (deque's append and
        # popleft are atomic)
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bezoar-model")
        self.task: asyncio.Task | None = None
        self.batches = 0  # groups of waiting jobs the worker took together (for tests and logs)
        self.largest_batch = 0  # most jobs taken together
        self._to_score: list[Job] = []  # ended jobs that wait for their logprobs (worker thread only)
        self.closing = False

    @property
    def steps(self) -> int:
        """Decode steps run so far."""
        return self.batch.steps

    async def start(self, app=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self._schedule())

    async def stop(self, app=None) -> None:
        self.closing = True  # the worker stops after its current step instead of decoding every row to its end
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def run(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            job.future = self.loop.create_future()
            self.waiting.append(job)
        self.wake.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        except asyncio.CancelledError:  # the client went away: let the engine drop these rows
            for job in jobs:
                job.cancelled = True
            raise

    async def _schedule(self) -> None:
        """Start the worker when jobs wait and it is idle; it runs until no job waits and no row decodes."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            if self.batch_window_s > 0:  # requests arriving together are prefilled together
                await asyncio.sleep(self.batch_window_s)
            try:
                await self.loop.run_in_executor(self.executor, self._work)
            except Exception:  # _work answers its jobs' failures itself; this is a bug, not a request's error
                log.exception("the model's worker failed")

    def _resolve(self, job: Job) -> None:
        """(On the event loop.) Answer a job: its result, or its error as a 500."""
        if job.future.done():
            return
        if job.error is not None:
            if job.stream is not None:
                job.stream.put_nowait((job.index, "", "error"))
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job)

    # -- in the worker thread --

    def _answer(self, job: Job) -> None:
        if job.error is None:
            self._emit(job, final=True)
        self.loop.call_soon_threadsafe(self._resolve, job)

    def _work(self) -> None:
        """Take waiting jobs into free rows, decode a step, and again, until nothing waits or decodes."""
        batch = self.batch
        while True:
            if self.closing:
                if batch.running:
                    batch.fail(RuntimeError("the server is shutting down"))  # each job answered by its on_done
                return
            self._take_waiting()
            if not batch.running:
                if not self.waiting:
                    return
                continue
            try:
                batch.step()  # a model failure ends the rows decoding with it (their on_done answers them)
            except Exception:  # an on_done of ours raised: a bug, its job answered with it (_on_done)
                log.exception("finishing a request failed")
            self._finish_scored()

    def _take_waiting(self) -> None:
        """Start the waiting jobs that fit: every one-token scoring job (a batch of forwards), and generation
        jobs in first-come order while rows are free and their prefill fits ``max_prefill_tokens``."""
        one_step, generate = [], []
        free = self.batch.free
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if job.max_tokens <= 1 and job.stream is None:
                one_step.append(self.waiting.popleft())
            elif job.max_tokens == 0:  # streamed (so no logprobs): nothing to decode, the echo is all
                self.waiting.popleft()
                self._finish_generated(job, [], "length")
                self._answer(job)
            elif _decode.prefill_take([len(j.prompt_ids) for j in generate] + [len(job.prompt_ids)], free,
                                      self.max_prefill_tokens) > len(generate):
                generate.append(self.waiting.popleft())
            else:
                break  # the jobs behind it wait their turn too (the next step's admit, or when rows free up)
        if not one_step and not generate:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(one_step) + len(generate))
        if one_step:
            self._run_and_answer(self._run_one_step, one_step, "a one-token batch")
        if generate:
            self._admit(generate)

    def _admit(self, jobs: list[Job]) -> None:
        from bezoar.model.decode import Sequence

        seqs = []
        for job in jobs:
            stops = StopStrings(self.tokenizer, job.stop, self._context(job))
            seqs.append(Sequence(job.prompt_ids, job.max_tokens, job.temperature, job.top_p, job.top_k,
                                 generator=self._sampler(job) if job.seed is not None else None,
                                 should_stop=functools.partial(self._on_token, job, stops),
                                 on_done=functools.partial(self._on_done, job), tag=job))
        try:
            self.batch.admit(seqs)
        except Exception as e:  # their prefill failed: these requests fail, the rows decoding go on
            log.exception("the prefill of %d jobs failed", len(jobs))
            for job, seq in zip(jobs, seqs):
                if seq.row is None:
                    job.error = e
                    self._answer(job)
        self._finish_scored()

    def _on_token(self, job: Job, stops, new_ids: list[int]) -> bool:
        """After each token of ``job``'s row: True ends the row (a stop string, a client gone)."""
        if job.cancelled:
            return True
        if stops(0, new_ids):
            job.stop_hit = True
            return True
        if job.stream is not None:
            job.new_ids = new_ids
            job.text = continuation(self.tokenizer, self._context(job), new_ids)
            self._emit(job, final=False)
        return False

    def _on_done(self, job: Job, seq) -> None:
        """``job``'s row has ended: answer it now, or after the step's scoring pass when it asked for logprobs
        (a 2-token answer decoding beside a 500-token one is answered when its own row ends). A failure here
        fails this job alone."""
        if seq.finish == "error":
            log.error("a request failed while decoding (%d rows decoding)", len(self.batch.running),
                      exc_info=seq.error)
            job.error = seq.error
            self._answer(job)
            return
        try:
            self._finish_generated(job, seq.new_ids, seq.finish)
        except Exception as e:
            log.exception("finishing a request failed")
            job.error = e
        if job.error is None and job.logprobs is not None and not job.cancelled and (job.new_ids or job.echo):
            self._to_score.append(job)
        else:
            self._answer(job)

    def _finish_scored(self) -> None:
        """Score the jobs that ended asking for logprobs (one batch of forwards), then answer them."""
        jobs, self._to_score = self._to_score, []
        if jobs:
            self._run_and_answer(self._score, jobs, "scoring")

    def _run_and_answer(self, run, jobs: list[Job], what: str) -> None:
        """``run(jobs)``, then answer each job: with its result, or with the error that failed them all."""
        try:
            run(jobs)
        except Exception as e:
            log.exception("%s of %d jobs failed", what, len(jobs))
            for job in jobs:
                job.error = e
        for job in jobs:
            self._answer(job)

    def _emit(self, job: Job, final: bool) -> None:
        """Push the text that is safe to show to a streaming client."""
        if job.stream is None:
            return
        text = job.text
        if not final:
            # Hold back a UTF-8 character still being completed (trailing U+FFFD), and before it a tail that may
            # still turn into a stop string: one that starts "Q" and goes on with a multibyte character shows as
            # "Q\ufffd" until that character is whole, and the "Q" must wait too.
            pending = len(text) - len(text.rstrip("\ufffd"))
            text = text[: len(text) - pending]
            hold = 0
            for s in job.stop:
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
            text = text[: len(text) - hold]
        delta = text[job.sent:] if len(text) > job.sent else ""
        if delta or final:
            job.sent += len(delta)
            reason = job.finish_reason if final else None
            self.loop.call_soon_threadsafe(job.stream.put_nowait, (job.index, delta, reason))

    def _sampler(self, job: Job):
        """The server's shared generator, or for a seeded job one of its own: ``seed`` offset by the
        choice's index, so that the n choices of one request differ."""
        if job.seed is None:
            return self.generator
        return torch.Generator(device=self.model.device).manual_seed(job.seed + job.index)

    def _context(self, job: Job) -> list[int]:
        """What ``job``'s new tokens are decoded after: its prompt, or nothing for a chat answer."""
        return job.prompt_ids if job.continues_prompt else []

    def _finish_text(self, job: Job) -> None:
        """The returned text, cut before a stop string, and the new tokens cut to those whose text it
        returns (for logprobs; usage counts ``job.generated``, every token decoded). A token whose text
        straddles the cut stays: part of its text is returned."""
        text = continuation(self.tokenizer, self._context(job), job.new_ids)
        cut = cut_at_stop(text, job.stop)
        if len(cut) < len(text):
            job.stop_hit = True
            kept, length = 0, 0
            for piece in token_pieces(self.tokenizer, job.new_ids, self._context(job)):
                if length >= len(cut):
                    break
                kept, length = kept + 1, length + len(piece)
            job.new_ids = job.new_ids[:kept]
            scored = (len(job.prompt_ids) if job.echo else 0) + kept  # logprobs already recorded (one step)
            del job.token_logprobs[scored:], job.top_logprobs[scored:]
        job.text = cut

    def _run_one_step(self, jobs: list[Job]) -> None:
        """Jobs of at most one new token: one forward over each prompt gives the prompt's logprobs
        (for echo) and the next token's distribution at once."""
        from bezoar.model.decode import sample_next

        starts = [0 if j.echo else len(j.prompt_ids) - 1 for j in jobs]
        eos = set(getattr(self.tokenizer, "eos_ids", (self.tokenizer.eos_id,)))
        for row in iter_logprobs(self.model, [j.prompt_ids for j in jobs], starts, self.tokenizer.pad_id,
                                 batch_size=self.max_batch_size, max_batch_tokens=self.max_prefill_tokens):
            job = jobs[row.index]
            lp = row.logprobs  # (positions, V)
            if job.logprobs is not None and job.echo:
                self._record_logprobs(job, lp[:-1], job.prompt_ids[1:], first_is_none=True)
            if job.max_tokens == 0:
                job.finish_reason = "length"
                continue
            nxt = int(sample_next(lp[-1:], job.temperature, job.top_p, self._sampler(job), job.top_k)[0])
            job.generated = 1  # the EOS too
            if nxt in eos:
                job.finish_reason = "stop"
                continue
            job.new_ids = [nxt]
            if job.logprobs is not None:
                self._record_logprobs(job, lp[-1:], [nxt])
            self._finish_text(job)
            job.finish_reason = "stop" if job.stop_hit else "length"

    def _finish_generated(self, job: Job, new: list[int], finish: str) -> None:
        """The job's tokens, text, usage count and finish reason once its row has ended (``finish``: ``eos``,
        ``stop`` or ``length``, as ``Sequence.finish``)."""
        job.new_ids = list(new)
        job.generated = len(new) + (finish == "eos")  # the EOS is not among the new tokens, but was decoded
        self._finish_text(job)
        job.finish_reason = "stop" if job.stop_hit or finish == "eos" else "length"

    def _score(self, jobs: list[Job]) -> None:
        """Logprobs of the prompt (echo) and new tokens: one teacher-forced forward per sequence."""
        seqs = [j.prompt_ids + j.new_ids for j in jobs]
        inputs, starts, keep = [], [], []
        for i, (job, seq) in enumerate(zip(jobs, seqs)):
            start = 0 if job.echo else len(job.prompt_ids) - 1
            if len(seq) - 1 > start:
                inputs.append(seq[:-1])
                starts.append(start)
                keep.append(i)
            elif job.echo:
                job.token_logprobs, job.top_logprobs = [None], [None]
        for row in iter_logprobs(self.model, inputs, starts, self.tokenizer.pad_id, batch_size=self.max_batch_size,
                                 max_batch_tokens=self.max_prefill_tokens):
            job, seq = jobs[keep[row.index]], seqs[keep[row.index]]
            self._record_logprobs(job, row.logprobs, seq[starts[row.index] + 1:], first_is_none=job.echo)

    def _record_logprobs(self, job: Job, lp: torch.Tensor, targets: list[int], first_is_none: bool = False) -> None:
        if first_is_none:
            job.token_logprobs.append(None)
            job.top_logprobs.append(None)
        if not targets:
            return
        t = torch.as_tensor(targets, dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, t[:, None]).squeeze(1).tolist()
        job.token_logprobs.extend(chosen)
        k = job.logprobs or 0
        if k > 0:
            values, indices = lp.topk(k, dim=-1)
            for v_row, i_row in zip(values.tolist(), indices.tolist()):
                job.top_logprobs.append(list(zip(i_row, v_row)))
        else:
            job.top_logprobs.extend([] for _ in targets)


# ---- the HTTP layer -------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _proto_fields(buf: bytes):
    """(field number, wire type, value) of each field of one serialized protobuf message: varints as ints,
    length-delimited fields as bytes. Enough of the wire format to read a few fields of a sentencepiece
    model without the protobuf package (not a dependency); malformed input raises."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def longest_piece_bytes(tokenizer) -> int | None:
    """The most UTF-8 bytes of text one token of ``tokenizer.encode`` can stand for, where the sentencepiece
    model bounds it; None where it does not.

    A text of B bytes is then at least ceil(B / this) tokens: with no normalization rules (an empty
    precompiled_charsmap), no whitespace squeezing (remove_extra_whitespaces off) and byte fallback on (no
    <unk>, which may stand for a run of unknown characters of any length), sentencepiece only turns each
    space into U+2581 (three bytes for one) and maybe puts one U+2581 in front, so its pieces spell out at
    least the text's bytes; each is a vocabulary piece (at most this many bytes) or one byte. The tiny
    test model's tokenizer is such a model (and Llama 2's is built the same way). A model that rewrites
    text (NFKC folds several characters into one, a run of spaces becomes one) could fit any number of
    bytes in few tokens: there, no bound."""
    try:
        sp = tokenizer.sp
        byte_fallback, charsmap, squeeze = False, b"", True  # proto2 defaults of the three fields
        for number, wire, value in _proto_fields(sp.serialized_model_proto()):
            if number == 2 and wire == 2:  # ModelProto.trainer_spec
                for n, w, v in _proto_fields(value):
                    if n == 35 and w == 0:  # TrainerSpec.byte_fallback
                        byte_fallback = bool(v)
            elif number == 3 and wire == 2:  # ModelProto.normalizer_spec
                for n, w, v in _proto_fields(value):
                    if n == 2 and w == 2:  # NormalizerSpec.precompiled_charsmap
                        charsmap = v
                    elif n == 4 and w == 0:  # NormalizerSpec.remove_extra_whitespaces
                        squeeze = bool(v)
        if not byte_fallback or charsmap or squeeze:
            return None
        longest = 1  # a byte-fallback piece
        for i in range(sp.GetPieceSize()):
            # control pieces (BOS, EOS) never come from text; <unk> does not with byte fallback
            if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i)):
                longest = max(longest, len(sp.IdToPiece(i).encode("utf-8")))
        return longest
    except Exception:  # an unreadable model, a tokenizer without .sp: no bound, the exact check still holds
        return None


def token_text(tokenizer, token_id: int) -> str:
    """What one token reads as on its own: sentencepiece's word marker as a space, a byte-fallback
    piece as its character (or ``bytes:\\xNN`` when it is part of a multi-byte character)."""
    sp = tokenizer.sp
    if token_id >= sp.GetPieceSize():  # an added token (a chat model's <|im_end|>): its text
        return tokenizer.piece(token_id)
    piece = sp.IdToPiece(token_id)
    if sp.IsByte(token_id):
        value = int(piece[3:5], 16)
        return chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
    if sp.IsControl(token_id) or sp.IsUnknown(token_id):
        return piece
    return piece.replace("\u2581", " ")


def token_bytes(tokenizer, token_id: int) -> list[int]:
    sp = tokenizer.sp
    if token_id < sp.GetPieceSize() and sp.IsByte(token_id):
        return [int(sp.IdToPiece(token_id)[3:5], 16)]
    return list(token_text(tokenizer, token_id).encode("utf-8"))


# sentencepiece decodes each byte of a broken UTF-8 sequence as its own U+FFFD; Python's "replace"
# gives one per maximal broken run.
_BYTEWISE_REPLACE = "bezoar-bytewise-replace"
codecs.register_error(_BYTEWISE_REPLACE, lambda e: ("\ufffd" * (e.end - e.start), e.end))


def echo_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The prompt's text as ``echo`` shows it before the completion's (``continuation``), so that the two join
    to ``decode(prompt_ids + new_ids)``: all of ``decode(prompt_ids)``, unless the prompt ends inside a
    character that ``new_ids`` complete, which then belongs to the completion (its bytes' replacement
    characters are left out here)."""
    before = tokenizer.decode(list(prompt_ids))
    if not before.endswith("\ufffd"):  # no character left open at the prompt's end
        return before
    whole = tokenizer.decode(list(prompt_ids) + list(new_ids))
    return before if whole.startswith(before) else os.path.commonprefix([before, whole])


def token_pieces(tokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    """The text each token adds to ``continuation(tokenizer, context, ids)`` (without ``context``:
    ``tokenizer.decode(ids)``), so that the pieces join to exactly that text. What decode skips (BOS,
    EOS, pad, other control tokens) adds ""; a character spelled in byte-fallback tokens is added by its
    last byte (the bytes before it add ""); the first word of a text loses the leading space
    sentencepiece drops, and a first word that follows ``context``'s text keeps it.

    Token bytes run through one incremental UTF-8 decoder: linear in the length. Where that does not
    give the text (a tokenizer rule it does not know), each token's end is found by decoding every
    prefix instead, which is right for any tokenizer but quadratic."""
    context = context_tail(tokenizer, list(context))
    ids = list(ids)
    text = continuation(tokenizer, context, ids)
    sp = tokenizer.sp
    size = sp.GetPieceSize()
    decoder = codecs.getincrementaldecoder("utf-8")(_BYTEWISE_REPLACE)
    pieces, started = [], False
    for t in context + ids:
        if silent(tokenizer, t):  # what decode drops (an added token that is not special adds its text)
            pieces.append("")
            continue
        raw = bytes(token_bytes(tokenizer, t))
        if not started and raw.startswith(b" ") and not (t < size and sp.IsByte(t)):
            raw = raw[1:]
        started = True
        pieces.append(decoder.decode(raw))
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    pieces = pieces[len(context):]
    if "".join(pieces) == text:
        return pieces
    pieces, end = [], 0
    for i in range(len(ids)):
        prefix = continuation(tokenizer, context, ids[: i + 1])
        common = 0
        while common < min(len(prefix), len(text)) and prefix[common] == text[common]:
            common += 1
        common = len(text) if i == len(ids) - 1 else max(common, end)
        pieces.append(text[end:common])
        end = common
    return pieces


class Server:
    """The aiohttp application around an Engine."""

    def __init__(self, model, tokenizer, name: str, max_batch_size: int = 32, batch_window_s: float = 0.005,
                 api_key: str | None = None, template=None, decode: str = "auto",
                 max_request_seqs: int = MAX_REQUEST_SEQS, max_prefill_tokens: int | None = MAX_PREFILL_TOKENS):
        from bezoar.data.formats import PromptTemplate

        if max_request_seqs < 1:
            raise ValueError(f"max_request_seqs must be at least 1, got {max_request_seqs}")
        self.max_request_seqs = max_request_seqs
        self.template = template or PromptTemplate()
        self.tokenizer = tokenizer
        self.name = name
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, batch_window_s=batch_window_s,
                             decode=decode, max_prefill_tokens=max_prefill_tokens)
        self.api_key = api_key
        self.created = int(time.time())
        self.vocab = getattr(tokenizer, "id_count", tokenizer.vocab_size)  # added tokens included
        # Prompts are tokenized in these threads, not on the event loop: a text of megabytes takes seconds.
        self.tokenize_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.piece_bytes = longest_piece_bytes(tokenizer)  # None: no up-front bound on a text's tokens

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{name:.+}", self.model_info)  # names hold "/" (openlm-research/...)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.on_startup.append(self.engine.start)
        app.on_startup.append(self._start_pool)
        app.on_cleanup.append(self.engine.stop)
        app.on_cleanup.append(self._stop_pool)
        return app

    async def _start_pool(self, app=None) -> None:
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(max_workers=TOKENIZE_THREADS,
                                                                   thread_name_prefix="bezoar-tokenize")

    async def _stop_pool(self, app=None) -> None:
        if self.tokenize_pool is not None:
            # a tokenization still running finishes in its thread, for nobody; the loop does not wait for it
            self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, fn, *args):
        """``fn(*args)`` in the tokenizing threads; what it raises (an ApiError) is raised here."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, functools.partial(fn, *args))

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            if self.api_key is not None and request.path != "/health":
                if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
                    raise ApiError("Incorrect API key provided.", status=401, type="authentication_error",
                                   code="invalid_api_key")
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            kind = "not_found_error" if e.status == 404 else "invalid_request_error"
            return ApiError(f"{request.method} {request.path}: {e.reason}", status=e.status, type=kind).response()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("error while serving %s %s", request.method, request.path)
            return ApiError("The server had an error while processing your request.", status=500,
                            type="server_error").response()

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except LookupError:
            # aiohttp decodes the body with the Content-Type's charset, looked up as a Python codec: an
            # unknown one (charset=foo) or one that is no text encoding (charset=base64) raises this
            raise ApiError(f"Unsupported charset {request.charset!r} in the Content-Type header; send the JSON "
                           "body as UTF-8 (application/json; charset=utf-8)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"The request body is not valid JSON ({e})") from None
        except RecursionError:
            raise ApiError("The request body is not valid JSON (nested too deeply)") from None
        if not isinstance(body, dict):
            raise ApiError("The request body must be a JSON object")
        for name, value in body.items():
            # JSON's \ud800-style escapes can spell lone UTF-16 surrogates, which are not text: the
            # tokenizer (and any UTF-8 encode) fails on them
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(f"{name} holds a lone UTF-16 surrogate (half of a character, e.g. an emoji cut in "
                               "two); strings must be valid Unicode", name) from None
            except RecursionError:
                raise ApiError(f"{name} is nested too deeply", name) from None
        model = body.get("model")
        if model is None:
            raise ApiError("you must provide a model parameter", "model")
        if model != self.name:
            raise ApiError(f"The model '{model}' does not exist; this server serves '{self.name}'", "model",
                           status=404, code="model_not_found")
        return body

    async def health(self, request):
        return web.json_response({"status": "ok", "model": self.name})

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "bezoar",
                "max_model_len": self.engine.context}

    async def models(self, request):
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model_info(self, request):
        if request.match_info["name"] != self.name:
            raise ApiError(f"The model '{request.match_info['name']}' does not exist", "model", status=404,
                           code="model_not_found")
        return web.json_response(self._model_card())

    # -- prompts --

    def _encode_text(self, text: str) -> list[int]:
        """A text prompt's tokens: BOS first where the tokenizer's ``add_bos_token`` says so (its default, and
        OpenLLaMA's), as transformers' tokenizer and vLLM encode it; an empty text without BOS is BOS alone
        (a model cannot decode from no token)."""
        ids = self.tokenizer.encode(text, bos=self.tokenizer.add_bos)
        if not ids:
            bos = self.tokenizer.bos_id
            if bos is None or bos < 0:
                raise ApiError("the prompt is empty and the tokenizer has no BOS token to start from", "prompt")
            ids = [bos]
        return ids

    def _prompts(self, prompt, max_tokens: int) -> list[list[int]]:
        """``prompt`` in any of its four OpenAI shapes as token-id lists (text by ``_encode_text``), each
        checked against the context as it comes (a request stops at its first prompt too long, the rest
        untokenized). Runs in the tokenizing threads (``_off_loop``)."""
        def fits(ids: list[int]) -> list[int]:
            self._check_length(ids, max_tokens, "max_tokens")
            return ids

        def encode(text: str) -> list[int]:
            self._check_text_length(text, max_tokens, "max_tokens")
            return self._encode_text(text)

        if isinstance(prompt, str):
            return [fits(encode(prompt))]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [fits(encode(p)) for p in prompt]
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [fits(self._check_ids(prompt, "prompt"))]
            if all(isinstance(p, list) for p in prompt):
                out = []
                for i, p in enumerate(prompt):
                    if not p or not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                        raise ApiError(f"prompt[{i}] must be a non-empty list of token ids", "prompt")
                    out.append(fits(self._check_ids(p, f"prompt[{i}]")))
                return out
        raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of "
                       "token-id lists (none of them empty)", "prompt")

    def _check_ids(self, ids: list[int], where: str) -> list[int]:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise ApiError(f"{where}: token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})", "prompt")
        return list(ids)

    def _check_sequences(self, n: int, prompts: int) -> None:
        """Refuse a request for more sequences (``n`` for each prompt) than ``--max-request-seqs``."""
        if n * prompts > self.max_request_seqs:
            raise ApiError(f"This request asks for {n * prompts} sequences (n={n} x {prompts} "
                           f"prompt{'s' if prompts != 1 else ''}); this server decodes at most {self.max_request_seqs} "
                           "sequences per request (--max-request-seqs). Send fewer prompts per request or a smaller n.",
                           "prompt" if prompts > self.max_request_seqs else "n")

    def _check_length(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        total = len(prompt_ids) + max_tokens
        if total > self.engine.context:
            raise ApiError(f"This model's maximum context length is {self.engine.context} tokens. However, you "
                           f"requested {total} tokens ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                           "completion). Please reduce the prompt or the completion length.", param,
                           code="context_length_exceeded")

    def _check_text_length(self, text: str, max_tokens: int, param: str) -> None:
        """Before ``text`` is tokenized: refuse a text whose UTF-8 length alone proves it longer than the
        context (more than context x the longest piece's bytes: at least ceil(bytes / longest piece)
        tokens, see ``longest_piece_bytes``), as ``_check_length`` would refuse it after seconds of
        tokenizing a text of megabytes. A shorter text is tokenized (quickly) and checked exactly.
        """
        limit = self.engine.context * (self.piece_bytes or 0)
        if self.piece_bytes is None or len(text) * 4 <= limit:
            return  # no bound, or short enough (a character is at most 4 bytes)
        size = len(text.encode("utf-8"))
        if size > limit:
            tokens = -(-size // self.piece_bytes)
            raise ApiError(f"This model's maximum context length is {self.engine.context} tokens. However, you "
                           f"requested at least {tokens + max_tokens} tokens (at least {tokens} in the prompt: "
                           f"{size:,} bytes of text, at most {self.piece_bytes} to a token; {max_tokens} for the "
                           "completion). Please reduce the prompt or the completion length.", param,
                           code="context_length_exceeded")

    # -- /v1/completions --

    async def completions(self, request: web.Request):
        body = await self._body(request)
        _common(body, COMPLETION_KEYS)
        if body.get("suffix"):
            raise ApiError("suffix is not supported by bezoar.serve", "suffix")
        if "prompt" not in body:
            raise ApiError("you must provide a prompt parameter", "prompt")
        echo = _boolean(body, "echo")
        max_tokens = _integer(body, "max_tokens", 16, 0 if echo else 1)
        temperature = _temperature(body)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        top_k = _top_k(body)
        n = _integer(body, "n", 1, 1, MAX_N)
        best_of = _integer(body, "best_of", n, 1, MAX_N)
        if best_of != n:
            raise ApiError("best_of other than n is not supported by bezoar.serve", "best_of")
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        stream = _boolean(body, "stream")
        if stream and logprobs is not None:
            raise ApiError("logprobs with stream is not supported by bezoar.serve", "logprobs")
        stop = _stop(body)
        self._check_sequences(n, _prompt_count(body["prompt"]))  # before any prompt is tokenized
        prompts = await self._off_loop(self._prompts, body["prompt"], max_tokens)
        queue = asyncio.Queue() if stream else None
        jobs = [Job(prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed, stop=stop, logprobs=logprobs, echo=echo, index=p * n + c, stream=queue)
                for p, ids in enumerate(prompts) for c in range(n)]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return await self._stream(request, jobs, rid, created, chat=False,
                                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        await self.engine.run(jobs)
        choices = []
        for job in jobs:
            text = job.text
            if echo:
                text = echo_text(self.tokenizer, job.prompt_ids, job.new_ids) + text
            choices.append({"index": job.index, "text": text, "finish_reason": job.finish_reason,
                            "logprobs": self._completion_logprobs(job) if logprobs is not None else None})
        return web.json_response({"id": rid, "object": "text_completion", "created": created, "model": self.name,
                                  "choices": choices, "usage": self._usage(jobs)})

    def _completion_logprobs(self, job: Job) -> dict:
        """OpenAI's legacy logprobs: ``tokens`` are the pieces of the returned text, one per token (they
        join to ``text``) and ``text_offset`` says where each starts in it (without echo, offsets count
        from the prompt's end). A token that adds no text, BOS included, reads "" rather than being
        left out: clients such as lm-eval index ``token_logprobs`` by token position."""
        ids = (job.prompt_ids if job.echo else []) + job.new_ids
        tokens = token_pieces(self.tokenizer, job.prompt_ids) if job.echo else []
        if tokens:  # a character the prompt leaves open and the completion closes is the completion's
            extra = len("".join(tokens)) - len(echo_text(self.tokenizer, job.prompt_ids, job.new_ids))
            for i in range(len(tokens) - 1, -1, -1):
                if extra <= 0:
                    break
                cut = min(extra, len(tokens[i]))
                tokens[i], extra = tokens[i][: len(tokens[i]) - cut], extra - cut
        new = token_pieces(self.tokenizer, job.new_ids, job.prompt_ids)
        if new and job.stop_hit:  # the last token may straddle the stop: only its returned part
            new[-1] = new[-1][: len(new[-1]) - (len("".join(new)) - len(job.text))]
        tokens += new
        offsets, at = [], 0 if job.echo else len(self.tokenizer.decode(job.prompt_ids))
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
        # top_logprobs: the `logprobs` most likely tokens, and the token the text has there when it is not
        # one of them (listed last: it ranks below them), as OpenAI documents (up to logprobs + 1) and vLLM
        # returns it; logprobs 0 gives that token alone. Prompt tokens (echo) alike.
        top = []
        for tid, value, alternatives in zip(ids, job.token_logprobs, job.top_logprobs):
            if alternatives is None:
                top.append(None)
            else:
                d: dict[str, float] = {}
                for alt, alt_value in alternatives:
                    d.setdefault(token_text(self.tokenizer, alt), alt_value)
                if all(alt != tid for alt, _ in alternatives):
                    d.setdefault(token_text(self.tokenizer, tid), value)
                top.append(d)
        return {"tokens": tokens, "token_logprobs": job.token_logprobs[: len(ids)], "top_logprobs": top,
                "text_offset": offsets}

    def _usage(self, jobs: list[Job]) -> dict:
        seen, prompt_tokens = set(), 0
        for job in jobs:
            if id(job.prompt_ids) not in seen:
                seen.add(id(job.prompt_ids))
                prompt_tokens += len(job.prompt_ids)
        completion = sum(j.generated for j in jobs)  # as vLLM counts: the EOS and a stop string's tokens too
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

    # -- /v1/chat/completions --

    async def chat_completions(self, request: web.Request):
        body = await self._body(request)
        _common(body, CHAT_KEYS)
        if "messages" not in body:
            raise ApiError("you must provide a messages parameter", "messages")
        n = _integer(body, "n", 1, 1, MAX_N)
        self._check_sequences(n, 1)
        try:
            prompt = chat_prompt(body["messages"], self.template)
        except ChatError as e:
            raise ApiError(str(e), e.param) from None
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
            raise ApiError("response_format: only {'type': 'text'} is supported by bezoar.serve", "response_format")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name, None, 1)
        ids, max_tokens = await self._off_loop(self._chat_ids, prompt, max_tokens, name)
        temperature = _temperature(body)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
        top_k = _top_k(body)
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        want_logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
        if top is not None and not want_logprobs:
            raise ApiError("top_logprobs needs logprobs set to true", "top_logprobs")
        stream = _boolean(body, "stream")
        if stream and want_logprobs:
            raise ApiError("logprobs with stream is not supported by bezoar.serve", "logprobs")
        stop = _stop(body) + list(CHAT_STOP)
        queue = asyncio.Queue() if stream else None
        jobs = [Job(prompt_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed, stop=stop, logprobs=(top or 0) if want_logprobs else None, index=c, stream=queue,
                    continues_prompt=False)
                for c in range(n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if stream:
            return await self._stream(request, jobs, rid, created, chat=True,
                                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")))
        await self.engine.run(jobs)
        choices = []
        for job in jobs:
            choice = {"index": job.index, "message": {"role": "assistant", "content": job.text},
                      "finish_reason": job.finish_reason, "logprobs": None}
            if want_logprobs:
                choice["logprobs"] = {"content": self._chat_logprobs(job)}
            choices.append(choice)
        return web.json_response({"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                                  "choices": choices, "usage": self._usage(jobs)})

    def _chat_ids(self, prompt: str, max_tokens: int | None, name: str) -> tuple[list[int], int]:
        """The chat prompt's token ids and the completion's length (without ``max_tokens``, the room the
        context leaves), checked against the context. Runs in the tokenizing threads (``_off_loop``)."""
        if max_tokens is None:
            self._check_text_length(prompt, 1, "messages")
        else:
            self._check_text_length(prompt, max_tokens, name)
        ids = self._encode_text(prompt)
        room = self.engine.context - len(ids)
        if max_tokens is None:
            if room < 1:
                self._check_length(ids, 1, "messages")
            max_tokens = room
        self._check_length(ids, max_tokens, name)
        return ids, max_tokens

    def _chat_logprobs(self, job: Job) -> list[dict]:
        """OpenAI's ``logprobs.content``, whose ``bytes`` join to the message's content: an answer's text is decoded
        on its own, so the word marker of its first token is no space there, and none in the first token either.
        The alternatives at that place read as they would have started the answer: each word piece without its
        marker (a byte-fallback space is text, and kept), whichever token was chosen."""
        tok = self.tokenizer
        sp = tok.sp
        first = next((i for i, tid in enumerate(job.new_ids) if not silent(tok, tid) and token_bytes(tok, tid)), None)

        def entry(tid: int, value, at_start: bool, chosen: bool = False) -> dict:
            if chosen and silent(tok, tid):  # a token the content leaves out (unk, control, special added): no text
                return {"token": "", "logprob": value, "bytes": []}
            text, raw = token_text(tok, tid), token_bytes(tok, tid)
            if at_start and tid < sp.GetPieceSize() and not sp.IsByte(tid) and text.startswith(" "):
                text, raw = text[1:], raw[1:]  # sentencepiece drops the text's leading word marker
            return {"token": text, "logprob": value, "bytes": raw}

        out = []
        for i, (tid, value, alternatives) in enumerate(zip(job.new_ids, job.token_logprobs, job.top_logprobs)):
            out.append({**entry(tid, value, i == first, chosen=True),
                        "top_logprobs": [entry(a, v, i == first) for a, v in alternatives or []]})
        if job.stop_hit:  # the tokens that straddle the stop: only their returned part (as completions' tokens)
            extra = sum(len(e["bytes"]) for e in out) - len(job.text.encode("utf-8"))
            for e in reversed(out):
                if extra <= 0:
                    break
                cut = min(extra, len(e["bytes"]))
                e["bytes"] = e["bytes"][: len(e["bytes"]) - cut]
                e["token"] = bytes(e["bytes"]).decode("utf-8", "ignore")
                extra -= cut
        return out

    # -- streaming (server-sent events) --

    async def _stream(self, request, jobs: list[Job], rid: str, created: int, chat: bool, include_usage: bool):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        kind = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list[dict], usage: dict | None = None) -> None:
            chunk = {"id": rid, "object": kind, "created": created, "model": self.name, "choices": choices}
            if include_usage:
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        queue = jobs[0].stream
        echoed: dict[int, int] = {}  # echo: the length of the prompt's text sent so far, until the first delta
        runner = asyncio.create_task(self.engine.run(jobs))
        try:
            if chat:
                await send([{"index": j.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for j in jobs])
            else:
                # The prompt's text goes first, but for a character it leaves open (trailing replacement
                # characters): whether the completion closes it is known by the job's first delta, which then
                # carries the rest of the echo (``echo_text``).
                for job in jobs:
                    if job.echo:
                        first = self.tokenizer.decode(job.prompt_ids).rstrip("\ufffd")
                        echoed[job.index] = len(first)
                        await send([{"index": job.index, "text": first, "logprobs": None, "finish_reason": None}])
            by_index = {job.index: job for job in jobs}
            open_jobs = len(jobs)
            while open_jobs:
                index, delta, reason = await queue.get()
                if reason == "error":
                    break
                if reason is not None:
                    open_jobs -= 1
                if index in echoed and (delta or reason is not None):
                    job = by_index[index]
                    delta = echo_text(self.tokenizer, job.prompt_ids, list(job.new_ids))[echoed.pop(index):] + delta
                if chat:
                    choice = {"index": index, "delta": {"content": delta} if delta else {}, "logprobs": None,
                              "finish_reason": reason}
                else:
                    choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": reason}
                await send([choice])
            try:
                await runner
            except Exception:  # the headers are out: report the failure as the stream's last event
                error = {"error": {"message": "The server had an error while processing your request.",
                                   "type": "server_error", "param": None, "code": None}}
                await response.write(f"data: {json.dumps(error)}\n\n".encode())
            else:
                if include_usage:
                    await send([], self._usage(jobs))
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            for job in jobs:
                job.cancelled = True
            runner.cancel()
            raise
        await response.write_eof()
        return response


# ---- running it ----------------------------------------------------------------------------


def build_server(model_dir: str, adapter: str | None = None, quant: str | None = None, dtype: str | None = None,
                 device: str | None = None, name: str | None = None, max_batch_size: int = 32,
                 batch_window_ms: float = 5.0, system: str | None = None, decode: str = "auto",
                 max_request_seqs: int = MAX_REQUEST_SEQS, max_prefill_tokens: int | None = MAX_PREFILL_TOKENS
                 ) -> Server:
    from bezoar.data.formats import PromptTemplate
    from bezoar.model import Tokenizer, load

    api_key = api_key_from_env()  # a bad one is refused before the model loads
    model = load(model_dir, quant=quant, adapter=adapter, device=device, dtype=dtype)
    tokenizer = Tokenizer(model_dir)
    template = PromptTemplate() if system is None else PromptTemplate(system=system)
    return Server(model, tokenizer, name or Path(model_dir).resolve().name, max_batch_size=max_batch_size,
                  batch_window_s=batch_window_ms / 1000, api_key=api_key,
                  template=template, decode=decode, max_request_seqs=max_request_seqs,
                  max_prefill_tokens=max_prefill_tokens)


def api_key_from_env() -> str | None:
    """The bearer key every request must carry: ``BEZOAR_SERVE_API_KEY``, None (no key) when it is not set.
    Set but empty is refused (ValueError), not read as "no key": whoever set it meant to require one, and
    a server open to all without a word is the wrong way to fail. So is a key with whitespace around it
    (a newline from a file, say), which no request could carry: HTTP strips it from header values."""
    value = os.environ.get(API_KEY_ENV)
    if value is None:
        return None
    if not value.strip():
        raise ValueError(f"{API_KEY_ENV} is set but empty: set it to the key clients must send, or unset it "
                         "to serve without a key")
    if value != value.strip():
        raise ValueError(f"{API_KEY_ENV} starts or ends with whitespace, which no request's Authorization header "
                         "can carry (HTTP strips it); remove it")
    return value


def describe_model(model, adapter: str | None) -> str:
    """What was loaded, for the start-up log line: the adapter folder, the quantization (NF4 when any linear
    layer is, as a pre-quantized checkpoint loads whatever --quant says), device and dtype."""
    from bezoar.model.nf4 import NF4Linear

    quant = "nf4" if any(isinstance(m, NF4Linear) for m in model.modules()) else "none"
    dtype = str(getattr(model, "dtype", "")).removeprefix("torch.")
    return f"adapter {adapter or 'none'}, quantization {quant}, {model.device} {dtype}".rstrip()


def bind_sockets(host: str | None, port: int, backlog: int = 128) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio's create_server binds them;
    None or "": all interfaces), port 0 for one the system picks. ``main`` binds them before it loads
    the model, so a port in use or a bad host fails in a moment, not after minutes of loading, and no
    other process can take the port meanwhile (connections made while the model loads wait for it).
    Raises OSError (socket.gaierror for a host that does not resolve); what bound before it is closed."""
    infos = socket.getaddrinfo(host or None, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # one socket per distinct address
            if sockets:  # port 0: the other addresses take the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds (TIME_WAIT)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 address has its own
            sock.bind(address)
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if sock.family == socket.AF_INET6 else f"http://{host}:{port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """Serve a ``Server`` from a background thread (tests, notebooks)::

        with BackgroundServer(Server(model, tokenizer, "tiny")) as bg:
            client = openai.OpenAI(base_url=bg.url + "/v1", api_key="none")
    """

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int | None = None):
        self.server = server
        self.host = host
        # Bound (and listening) now, and served as it is: a port found free and closed again (free_port) could
        # be taken by another process before the server bound it. Port None or 0: one the system picks.
        family = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][0] if host else socket.AF_INET
        self._socket = socket.create_server((host, port or 0), family=family)
        self.port = self._socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> "BackgroundServer":
        self._thread = threading.Thread(target=self._main, name="bezoar-serve", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(60)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(60)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            # handler_cancellation: a client that disconnects cancels its handler, whose jobs the engine
            # then drops (aiohttp >= 3.9 leaves handlers running by default)
            self._runner = web.AppRunner(self.server.app(), access_log=None, handler_cancellation=True)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.SockSite(self._runner, self._socket).start())
        except BaseException as e:  # report to the thread that waits in __enter__
            self._socket.close()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bezoar.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, metavar="DIR", help="Hugging Face Llama checkpoint folder")
    g.add_argument("--adapter", metavar="DIR", help="PEFT-format LoRA adapter folder to apply")
    g.add_argument("--quant", choices=["nf4"], help="quantize the decoder's linear layers to NF4 on load")
    g.add_argument("--dtype", help="compute dtype (float32, bfloat16, float16); default by device")
    g.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda when present)")
    g.add_argument("--name", help="model name clients use (default: the folder's name)")
    g.add_argument("--system", help="the chat template's default system line (default: the OpenBezoar one; "
                   "'' drops the System section)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--max-batch-size", type=int, default=32, help="most sequences decoded together (default 32)")
    g.add_argument("--max-request-seqs", type=int, default=MAX_REQUEST_SEQS, metavar="N",
                   help=f"most sequences one request may ask for: n x the number of prompts (default "
                   f"{MAX_REQUEST_SEQS}); a request for more is refused with a 400 before any work; with the "
                   "context length, this bounds how long one request holds the model")
    g.add_argument("--max-prefill-tokens", type=int, default=MAX_PREFILL_TOKENS, metavar="N",
                   help=f"most left-padded prompt tokens one prefill takes (default {MAX_PREFILL_TOKENS}; 0: no "
                   "bound): the prompts waiting beyond it start at the next decode step, so the rows decoding "
                   "are never held up by one long prefill; a longer prompt is prefilled alone")
    g.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long the scheduler waits for more requests before it starts a batch")
    g.add_argument("--decode", choices=["auto", "eager", "static", "graph"], default="auto",
                   help="how decode steps run (default auto: CUDA graphs on a GPU; eager and static: the same "
                        "static-cache steps without graphs, which continuous batching needs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be at least 1")
    if args.max_request_seqs < 1:
        p.error("--max-request-seqs must be at least 1")
    if args.max_prefill_tokens < 0:
        p.error("--max-prefill-tokens must be at least 1, or 0 for no bound")
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be between 0 and 65535 (0: one the system picks), got {args.port}")
    try:
        api_key = api_key_from_env()
    except ValueError as e:
        print(f"bezoar.serve: {e}", file=sys.stderr)
        return 2
    from bezoar.config import environment_error

    if (why := environment_error()) is not None:  # else every request would fail with a 500
        print(f"bezoar.serve: {why}", file=sys.stderr)
        return 2
    # The port is bound before the model loads (minutes for a large one): a port in use fails now.
    try:
        sockets = bind_sockets(args.host, args.port)
    except OSError as e:
        print(f"bezoar.serve: {_bind_error(e, args.host, args.port)}", file=sys.stderr)
        return 2
    try:
        server = build_server(args.model, args.adapter, args.quant, args.dtype, args.device, args.name,
                              args.max_batch_size, args.batch_window_ms, args.system, args.decode,
                              args.max_request_seqs, args.max_prefill_tokens or None)
    except (ValueError, OSError) as e:
        for sock in sockets:
            sock.close()
        print(f"bezoar.serve: {e}", file=sys.stderr)
        return 2
    # what was loaded, and whether requests need the key (never the key itself)
    log.info("serving %s as %r on %s (%s; bearer key %s)", args.model, server.name,
             ", ".join(_url(s) + "/v1" for s in sockets), describe_model(server.engine.model, args.adapter),
             f"required ({API_KEY_ENV})" if api_key is not None else "not required")
    # handler_cancellation: a client that disconnects stops its decoding (see BackgroundServer._main)
    web.run_app(server.app(), sock=sockets, print=None, access_log=None, handler_cancellation=True)
    return 0


def _bind_error(e: OSError, host: str, port: int) -> str:
    """One line saying why ``--host``/``--port`` could not be bound."""
    where = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
    if isinstance(e, socket.gaierror):
        return f"--host {host!r} does not resolve to an address ({e.strerror})"
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {where}: the port is already in use (another server?); choose another --port"
    return f"cannot listen on {where}: {e.strerror or e}"


if __name__ == "__main__":
    sys.exit(main())
