"""bezoar.serve: the openai SDK against it (models, completions, chat, streaming), exactness of
echo/logprobs, batching of concurrent clients, OpenAI-style errors, and the command line."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")

from bezoar.eval.chat import chat_prompt  # noqa: E402
from bezoar.model import generate  # noqa: E402


@pytest.fixture()
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(url: str, body, raw: bytes | None = None, content_type: str = "application/json") -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hold_engine(engine):
    """Keep the engine's worker busy (with a job of its own, held before it runs) until the returned
    ``release(queued)`` is called: requests sent meanwhile wait, and the worker then takes them together.
    Otherwise whether concurrent clients' requests share a prefill depends on their arriving within one
    batch window of each other, which a loaded machine does not promise."""
    import threading

    from bezoar.serve import Engine, Job

    entered, go = threading.Event(), threading.Event()

    def held():
        entered.set()
        go.wait(120)
        del engine._work  # the held job and those after it run as usual
        Engine._work(engine)

    engine._work = held
    # (a worker still finishing an earlier job may take this one itself; the next run of the worker is held)
    job = Job(prompt_ids=[1], max_tokens=1)
    holding = asyncio.run_coroutine_threadsafe(engine.run([job]), engine.loop)
    assert entered.wait(60), "the engine's worker did not start"

    def release(queued: int) -> None:
        """Wait until ``queued`` jobs wait (the holding one aside), then let the worker go on."""
        try:
            deadline = time.time() + 60
            while (waiting := sum(j is not job for j in list(engine.waiting))) < queued:
                assert time.time() < deadline, f"{waiting} of {queued} jobs queued within 60 s"
                time.sleep(0.01)
        finally:
            go.set()
            holding.result(60)

    return release


def test_models_and_greedy_completion_match_bezoar_generate(client, tiny_model, tiny_tokenizer):
    assert [m.id for m in client.models.list()] == ["tiny"]
    prompt = "The bright eagle watches the"
    want = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=12)[0]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == ("stop" if want.finish_reason == "stop" else "length")
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode(prompt, bos=True))
    assert r.usage.completion_tokens == len(want.token_ids)


def test_stop_strings_n_and_token_prompts(client, tiny_model, tiny_tokenizer):
    prompt = "Q: Who builds the book? A:"
    free = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=16)[0].text
    stop = free[4:6]
    r = client.completions.create(model="tiny", prompt=[prompt, "Health is"], max_tokens=16, temperature=0,
                                  stop=[stop], n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == free[: free.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=16, temperature=0, stop=[stop])
    assert by_ids.choices[0].text == r.choices[0].text


def test_a_streamed_echo_of_zero_new_tokens_is_the_prompt(served):
    """stream + echo + max_tokens 0 (nothing to decode) streams the prompt and ends with "length"; with
    continuous batching it was a 500 (a row of zero tokens was refused)."""
    body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 0, "echo": True}
    assert _streamed(served.url + "/v1/completions", body) == "Hello there"
    req = urllib.request.Request(served.url + "/v1/completions", json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = [json.loads(e[6:]) for e in r.read().decode().split("\n\n") if e.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "error" not in events[-1]


def test_echo_logprobs_are_the_models_token_logprobs(client, tiny_model, tiny_tokenizer):
    prompt = "What is 7 plus 45? The answer is"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    for max_tokens in (0, 1, 3):
        r = client.completions.create(model="tiny", prompt=[ids], max_tokens=max_tokens, temperature=0,
                                      logprobs=2, echo=True)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        with torch.no_grad():
            new_ids = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=max_tokens)[0].token_ids if max_tokens else []
            full = ids + new_ids
            ref = tiny_model(torch.tensor([full[:-1]]))[0].float().log_softmax(-1)
        want = ref.gather(1, torch.tensor(full[1:])[:, None]).squeeze(1).tolist()
        assert lp.token_logprobs[1:] == pytest.approx(want, rel=1e-5, abs=1e-5)
        for pos, top in enumerate(lp.top_logprobs[1:]):
            # the 2 most likely tokens, and the prompt's token where it is not one of them
            in_top = full[pos + 1] in ref[pos].topk(2).indices.tolist()
            assert len(top) == (2 if in_top else 3) and max(top.values()) == pytest.approx(float(ref[pos].max()), abs=1e-5)
        # lm-eval's is_greedy rule: a token is greedy when its logprob is the top one
        greedy = [t == max(top.values()) for t, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:])]
        assert greedy == (ref.argmax(-1) == torch.tensor(full[1:])).tolist()
        assert r.choices[0].text.startswith(prompt)


def test_logprobs_tokens_and_offsets_index_the_returned_text(client, tiny_tokenizer):
    """tokens join to the returned text and text_offset[i] is where token i starts in it: BOS reads "",
    a word's marker is a space, a character spelled in byte tokens comes with its last byte."""
    prompt = "The bright eagle sees €5 and ü"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    for echo in (True, False):
        for max_tokens in ((0, 1, 6) if echo else (1, 6)):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                          logprobs=1, echo=echo)
            choice = r.choices[0]
            lp = choice.logprobs
            full = choice.text if echo else prompt + choice.text
            assert "".join(lp.tokens) == choice.text
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset)
            for token, offset in zip(lp.tokens, lp.text_offset):
                assert full[offset: offset + len(token)] == token
            if echo:
                assert len(lp.tokens) == len(ids) + max_tokens
                assert lp.tokens[0] == "" and lp.token_logprobs[0] is None
                assert lp.text_offset[0] == 0 and lp.tokens[1] == "The"
            else:
                assert lp.text_offset[0] == len(prompt)
    from bezoar.serve import token_pieces

    euro = tiny_tokenizer.encode("€", bos=False)
    assert token_pieces(tiny_tokenizer, euro)[-1] == "€" and "".join(token_pieces(tiny_tokenizer, euro)) == "€"


def test_top_logprobs_always_hold_the_chosen_token(client, tiny_tokenizer):
    """As OpenAI documents and vLLM does: top_logprobs holds the `logprobs` most likely tokens and the sampled
    (or, with echo, the prompt's) token where it is not one of them; logprobs 0 gives that token alone."""
    from bezoar.serve import token_text

    prompt = "The bright eagle sees the road"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    outside = 0
    for k in (0, 1, 2):
        for echo in (False, True):
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=2.0, seed=3,
                                          logprobs=k, echo=echo)
            lp = r.choices[0].logprobs
            assert len(lp.top_logprobs) == len(lp.token_logprobs) == len(lp.tokens)
            for at, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
                if echo and at == 0:
                    assert value is None and top is None
                    continue
                assert value in top.values(), (k, echo, at, value, top)  # the chosen token's own entry
                ranked = sorted(top.values(), reverse=True)
                assert len(top) == k + (value < ranked[k - 1] if k else 1), (k, echo, at, top)
                outside += k > 0 and len(top) == k + 1
                if echo and at < len(ids):
                    assert top.get(token_text(tiny_tokenizer, ids[at])) == value
    assert outside, "no position where the chosen token is outside the top ones: the test shows nothing"
    # greedy: the chosen token is the most likely one, so logprobs 0 gives it and logprobs k gives k
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    assert all(list(top.values()) == [v] for v, top in zip(r.choices[0].logprobs.token_logprobs,
                                                            r.choices[0].logprobs.top_logprobs))


def test_the_completion_keeps_the_space_its_first_token_adds_to_the_prompt(client, tiny_model, tiny_tokenizer):
    """The completion is what its tokens add to the prompt's text: after "... The answer is" the tiny
    model's first token is "▁an", which reads " an" there (sentencepiece decoding it alone drops the
    space, and echo glued "isan"). Plain, echoed, streamed, token-prompt and logprobs texts agree."""
    prompt = "What is 7 plus 45? The answer is"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    new = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=3)[0].token_ids
    assert tiny_tokenizer.sp.IdToPiece(new[0]).startswith("\u2581"), "the test needs a first token with a space"
    whole = tiny_tokenizer.decode(ids + new)
    want = whole[len(prompt):]
    assert whole.startswith(prompt) and want.startswith(" an")
    kwargs = dict(model="tiny", max_tokens=3, temperature=0)
    assert client.completions.create(prompt=prompt, **kwargs).choices[0].text == want
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == want
    echo = client.completions.create(prompt=prompt, echo=True, logprobs=0, **kwargs).choices[0]
    assert echo.text == whole and "".join(echo.logprobs.tokens) == whole
    assert echo.logprobs.tokens[len(ids)] == " an" and echo.logprobs.text_offset[len(ids)] == len(prompt)
    plain = client.completions.create(prompt=prompt, logprobs=0, **kwargs).choices[0]
    assert plain.logprobs.tokens[0] == " an" and "".join(plain.logprobs.tokens) == want
    assert plain.logprobs.text_offset == [len(prompt) + len("".join(plain.logprobs.tokens[:i])) for i in range(3)]
    for echoed in (False, True):
        chunks = client.completions.create(prompt=prompt, stream=True, echo=echoed, **kwargs)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == (whole if echoed else want)
    # a stop string that begins with the first token's space ends the text there
    r = client.completions.create(prompt=prompt, stop=[" an"], **kwargs).choices[0]
    assert r.text == "" and r.finish_reason == "stop"


def _scripted_generation(monkeypatch, script: list[int]) -> None:
    """The server's continuous batch emits ``script`` to every row (its i-th token as a row's i-th) instead of
    the model's tokens; its bookkeeping (stop checks, EOS, max_tokens, answers) runs as usual."""
    from bezoar.model.decode import ContinuousBatch

    def prefill(self, sequences, rows):
        return [script[0] for _ in sequences]

    def decode(self, running):
        tokens = [0] * (running[-1][0] + 1)
        for row, seq in running:  # the row's next token: after those recorded and those still in flight
            at = len(seq.new_ids) + seq._in_flight
            tokens[row] = script[at] if at < len(script) else 0
        return torch.tensor(tokens)

    monkeypatch.setattr(ContinuousBatch, "_prefill", prefill)
    monkeypatch.setattr(ContinuousBatch, "_decode", decode)


def _streamed(url: str, body: dict) -> str:
    req = urllib.request.Request(url, json.dumps({**body, "stream": True}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        events = r.read().decode().split("\n\n")
    return "".join(json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {"))


def test_a_stream_holds_back_a_stop_strings_start_while_a_character_after_it_is_incomplete(served, tiny_tokenizer,
                                                                                          monkeypatch):
    """A stop string "Q：" (its colon spelled in byte tokens) read "...\nQ\ufffd" while the colon was half
    decoded: the stream held the replacement character back but sent the "Q", which the final text then cut."""
    byte = tiny_tokenizer.sp.PieceToId
    colon = [byte(f"<0x{b:02X}>") for b in "：".encode()]
    assert len(set(colon)) == 3 and tiny_tokenizer.sp.unk_id() not in colon, "the test needs byte-fallback pieces"
    _scripted_generation(monkeypatch, tiny_tokenizer.encode("The answer") + tiny_tokenizer.encode("\nQ")[1:] + colon
                         + tiny_tokenizer.encode(" next"))
    body = {"model": "tiny", "prompt": "Say", "max_tokens": 20, "stop": ["Q："]}
    status, plain = post(served.url + "/v1/completions", body)
    assert status == 200 and plain["choices"][0]["finish_reason"] == "stop"
    assert plain["choices"][0]["text"] == " The answer\n"
    assert _streamed(served.url + "/v1/completions", body) == " The answer\n"


@pytest.mark.parametrize("closed", [True, False])
def test_echo_of_a_prompt_ending_inside_a_character_reads_as_one_text(served, tiny_tokenizer, monkeypatch, closed):
    """A token prompt that ends inside "€" echoed as decode(prompt) + the completion, and the completion begins
    with the "€" its first token closes: "Price\ufffd\ufffd€ ok". The echo (plain, streamed and its logprobs'
    tokens) is now decode(prompt + completion); a completion that does not close it keeps the prompt's
    replacement characters."""
    byte = tiny_tokenizer.sp.PieceToId
    euro = [byte(f"<0x{b:02X}>") for b in "€".encode()]
    prompt = tiny_tokenizer.encode("Price", bos=True) + euro[:2]
    script = ([euro[2]] if closed else []) + tiny_tokenizer.encode("ok")  # "▁ok": " ok" after a character
    _scripted_generation(monkeypatch, script)
    whole = tiny_tokenizer.decode(prompt + script)
    assert whole == ("Price€ ok" if closed else "Price\ufffd\ufffd ok"), whole
    body = {"model": "tiny", "prompt": prompt, "max_tokens": len(script), "echo": True}
    status, r = post(served.url + "/v1/completions", {**body, "logprobs": 0})
    assert status == 200, r
    choice = r["choices"][0]
    assert choice["text"] == whole
    assert "".join(choice["logprobs"]["tokens"]) == whole
    offsets, tokens = choice["logprobs"]["text_offset"], choice["logprobs"]["tokens"]
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
    assert _streamed(served.url + "/v1/completions", body) == whole
    status, r = post(served.url + "/v1/completions", {**body, "echo": False})
    assert r["choices"][0]["text"] == whole[len("Price" if closed else "Price\ufffd\ufffd"):]


def test_stop_strings_read_the_first_new_token_after_the_prompt(tiny_tokenizer):
    """StopStrings with the prompt as context sees a stop string that starts with the first new token's
    space; without it (the lm-eval model's rule) the new tokens read as a text of their own."""
    from bezoar.eval.decoding import StopStrings, continuation

    prompt = tiny_tokenizer.encode("The answer is", bos=True)
    an = tiny_tokenizer.sp.PieceToId("\u2581an")
    assert StopStrings(tiny_tokenizer, [" an"], prompt)(0, [an])
    assert not StopStrings(tiny_tokenizer, [" an"])(0, [an])
    assert continuation(tiny_tokenizer, prompt, [an]) == " an" and continuation(tiny_tokenizer, [], [an]) == "an"


def test_continuation_is_the_text_added_to_the_whole_prompt(tiny_tokenizer):
    """continuation decodes only the prompt's last few tokens (context_tail): it must give what decoding
    the whole prompt gives, for prompts ending in control tokens, in byte-fallback pieces (a character
    the new tokens complete included) or in word pieces."""
    import random

    from bezoar.eval.decoding import context_tail, continuation
    from bezoar.serve import token_pieces

    sp, rng = tiny_tokenizer.sp, random.Random(0)
    vocab = list(range(tiny_tokenizer.vocab_size))
    euro = tiny_tokenizer.encode("€", bos=False)
    assert all(sp.IsByte(t) for t in euro[-3:])
    for _ in range(300):
        prompt = rng.choices(vocab, k=rng.randint(0, 12)) + rng.choice([[], euro[-3:-1], [tiny_tokenizer.eos_id]])
        new = rng.choice([euro[-1:], []]) + rng.choices(vocab, k=rng.randint(0, 5))
        before, whole = tiny_tokenizer.decode(prompt), tiny_tokenizer.decode(prompt + new)
        common = 0
        while common < min(len(before), len(whole)) and before[common] == whole[common]:
            common += 1
        assert continuation(tiny_tokenizer, prompt, new) == whole[common:], (prompt, new)
        assert len(context_tail(tiny_tokenizer, prompt)) <= len(prompt)
        assert "".join(token_pieces(tiny_tokenizer, new, prompt)) == whole[common:], (prompt, new)
        assert len(token_pieces(tiny_tokenizer, new, prompt)) == len(new)


def _stop_inside(tokenizer, token_ids: list[int]) -> tuple[str, int]:
    """A stop string that starts inside a token of a completion, some tokens before its end, and how
    many tokens cover the text before it (the straddling one included)."""
    from bezoar.serve import token_pieces

    pieces = token_pieces(tokenizer, token_ids)
    text = "".join(pieces)
    for j in range(1, len(pieces) - 3):
        stop = pieces[j][1:] + pieces[j + 1]
        if len(pieces[j]) >= 2 and text.find(stop) == len("".join(pieces[:j])) + 1:
            return stop, j + 1
    raise AssertionError(f"no stop string to pick in {pieces}")


def _decoded_until(text_of, token_ids: list[int], stop: str) -> int:
    """How many of ``token_ids`` a decoder that stops once its text holds ``stop`` decodes."""
    return next(m for m in range(1, len(token_ids) + 1) if stop in text_of(token_ids[:m]))


def test_a_stop_string_cuts_logprobs_with_the_text_and_usage_counts_every_token_decoded(client, tiny_model,
                                                                                       tiny_tokenizer):
    """Only the tokens whose text is returned have logprobs: the token the stop string starts inside stays,
    with the part of its text before the stop; the tokens after it go. usage.completion_tokens counts every
    token decoded, as vLLM does: those up to the one that completed the stop string."""
    from bezoar.eval.decoding import continuation

    prompt = "The bright eagle watches the"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    free = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=16)[0]
    stop, kept = _stop_inside(tiny_tokenizer, free.token_ids)
    decoded = _decoded_until(lambda t: continuation(tiny_tokenizer, ids, t), free.token_ids, stop)
    assert kept < decoded < len(free.token_ids)
    want = free.text[: free.text.find(stop)]
    for echo in (False, True):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                      logprobs=1, echo=echo)
        choice = r.choices[0]
        assert choice.text == (prompt if echo else "") + want and choice.finish_reason == "stop"
        assert r.usage.completion_tokens == decoded
        assert "".join(choice.logprobs.tokens) == choice.text
        assert len(choice.logprobs.token_logprobs) == (r.usage.prompt_tokens if echo else 0) + kept
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == decoded

    messages = [{"role": "user", "content": "Name a red thing."}]
    answer = generate(tiny_model, tiny_tokenizer, chat_prompt(messages), max_new_tokens=16,
                      stop=["### Instruction:", "### System:", "### Response:"])[0]
    stop, kept = _stop_inside(tiny_tokenizer, answer.token_ids)
    decoded = _decoded_until(tiny_tokenizer.decode, answer.token_ids, stop)  # an answer reads as a text of its own
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stop=[stop],
                                       logprobs=True)
    assert r.choices[0].message.content == answer.text[: answer.text.find(stop)]
    assert len(r.choices[0].logprobs.content) == kept and r.usage.completion_tokens == decoded
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stop=[stop], stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == decoded


# [BOS, "on", "###"]: a token prompt the tiny model (seed 0) greedily follows with EOS
EOS_NEXT = [1, 282, 295]


def test_usage_counts_the_token_that_hit_a_stop_and_the_eos(client, tiny_model, tiny_tokenizer):
    """A stop string that is the first token's whole text returns "" but one token was decoded, and an EOS
    is a decoded token: completion_tokens 1 for both (it was 0), in the one-step path (max_tokens 1), in
    generation and streamed, as vLLM counts."""
    from bezoar.serve import token_pieces

    with torch.no_grad():
        assert int(tiny_model(torch.tensor([EOS_NEXT]))[0, -1].argmax()) == tiny_tokenizer.eos_id, \
            "the tiny model no longer follows EOS_NEXT with EOS: pick another token prompt"
    prompt = "Once upon a time"
    ids = tiny_tokenizer.encode(prompt, bos=True)
    first = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=1)[0].token_ids
    stop = token_pieces(tiny_tokenizer, first, ids)[0]  # the first token's whole text ("ssist")
    assert len(stop) > 1 and "\ufffd" not in stop
    for body in ({"prompt": prompt, "stop": [stop]}, {"prompt": EOS_NEXT}):
        for max_tokens in (1, 8):
            r = client.completions.create(model="tiny", max_tokens=max_tokens, temperature=0, **body)
            assert r.choices[0].text == "" and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == 1, (body, max_tokens)
            chunks = list(client.completions.create(model="tiny", max_tokens=max_tokens, temperature=0, stream=True,
                                                    stream_options={"include_usage": True}, **body))
            assert chunks[-1].usage.completion_tokens == 1, (body, max_tokens)
    # in a batch beside a row that runs to max_tokens
    r = client.completions.create(model="tiny", prompt=[ids, EOS_NEXT], max_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 + 1


def test_chat_uses_the_template_and_streams_the_same_text(client, tiny_model, tiny_tokenizer):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a red thing."}]
    text = chat_prompt(messages)
    assert text.startswith("### System:\nAnswer briefly.\n\n### Instruction:\nName a red thing.")
    want = generate(tiny_model, tiny_tokenizer, text, max_new_tokens=10,
                    stop=["### Instruction:", "### System:", "### Response:"])[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == len(tiny_tokenizer.encode(text, bos=True))
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    stream = client.completions.create(model="tiny", prompt="The red fox", max_tokens=10, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == generate(tiny_model, tiny_tokenizer, "The red fox", max_new_tokens=10)[0].text
    assert len(pieces) > 2


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the chosen token is the top one
    # chat's top_logprobs are exactly the top_logprobs most likely (OpenAI's chat API; vLLM caps them there too):
    # a sampled token outside them is not added, as completions add it; its logprob is the item's own
    for top in (0, 2):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=2.0, seed=5, logprobs=True, top_logprobs=top)
        for item in r.choices[0].logprobs.content:
            assert len(item.top_logprobs) == top
            assert all(item.logprob <= alt.logprob for alt in item.top_logprobs) or item.logprob in [
                alt.logprob for alt in item.top_logprobs]


def test_chat_logprobs_bytes_join_to_the_content(client):
    """An answer's text is decoded on its own, so its first token's word marker is no space in the content; its
    logprobs kept that space, and their bytes joined to " " + content (OpenAI's bytes join to the content).
    The alternatives at that place lose it too: the chosen token is among them, and reads the same."""
    for seed in range(6):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story"}],
                                           max_tokens=6, temperature=1.5, seed=seed, logprobs=True, top_logprobs=3)
        choice = r.choices[0]
        items = choice.logprobs.content
        assert b"".join(bytes(item.bytes) for item in items).decode("utf-8", "replace") == choice.message.content
        first = items[0]
        assert first.token in [alt.token for alt in first.top_logprobs] or first.logprob < min(
            alt.logprob for alt in first.top_logprobs)


def test_chat_logprobs_alternatives_at_the_start_read_as_they_would_have_started_the_answer(tiny_model,
                                                                                           tiny_tokenizer):
    """Whichever token was chosen: a word piece there loses its marker (it would have started the content without
    it), a byte-fallback space keeps its byte (decode keeps it)."""
    from bezoar.serve import Job, Server

    sp = tiny_tokenizer.sp
    server = Server(tiny_model, tiny_tokenizer, "tiny")
    H, e, space, e2 = (sp.PieceToId(p) for p in ("\u2581H", "e", "<0x20>", "<0xE2>"))
    for answer in ([H, e], [e, H], [e2, H], [space, e]):
        alternatives = [H, e, space, e2]
        job = Job(prompt_ids=[1], max_tokens=5, continues_prompt=False, logprobs=len(alternatives))
        job.new_ids, job.token_logprobs = answer, [-1.0] * len(answer)
        job.top_logprobs = [[(a, -1.0) for a in alternatives]] + [[] for _ in answer[1:]]
        items = server._chat_logprobs(job)
        assert bytes(b for item in items for b in item["bytes"]).decode("utf-8", "replace") \
            == tiny_tokenizer.decode(answer), answer
        for alt, a in zip(items[0]["top_logprobs"], alternatives):
            if a == e2:  # a lone byte of a character: its byte, which decode shows as U+FFFD
                assert alt["bytes"] == [0xE2], (answer, alt)
                continue
            began = tiny_tokenizer.decode([a] + answer[1:]).encode()  # the content had the answer started with it
            assert began.startswith(bytes(alt["bytes"])) and (a != space or alt["bytes"] == [0x20]), (answer, alt)


def test_a_request_that_ends_early_is_answered_without_waiting_for_its_batch(served, tiny_model, tiny_tokenizer):
    """A row that stopped (max_tokens, a stop string, EOS) waited for the longest row of its batch: a 2-token
    answer batched with a 480-token one took as long as that one (1.45 s against 0.02 s alone)."""
    engine = served.server.engine
    want = generate(tiny_model, tiny_tokenizer, "The red fox", max_new_tokens=2)[0].text
    release = hold_engine(engine)

    async def ask():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0,
                                      timeout=300) as c:
            done: dict[str, float] = {}

            async def timed(name, call):
                result = await call
                if name == "streamed":
                    result = "".join([chunk.choices[0].text async for chunk in result if chunk.choices])
                done[name] = time.monotonic()
                return result

            calls = [asyncio.ensure_future(timed("long", c.completions.create(
                         model="tiny", prompt="Once upon a time", max_tokens=480, temperature=0))),
                     asyncio.ensure_future(timed("short", c.completions.create(
                         model="tiny", prompt="The red fox", max_tokens=2, temperature=0))),
                     asyncio.ensure_future(timed("streamed", c.completions.create(
                         model="tiny", prompt="The red fox", max_tokens=2, temperature=0, stream=True)))]
            await asyncio.to_thread(release, 3)
            return await asyncio.gather(*calls), done

    (long, short, streamed), done = asyncio.run(ask())
    assert short.choices[0].text == streamed == want and short.choices[0].finish_reason == "length"
    assert long.usage.completion_tokens == 480
    # the short answers came while the long one still decoded (it takes about a second here, more on a busy CI)
    assert done["long"] - max(done["short"], done["streamed"]) > 0.2, done


def test_a_request_arriving_mid_decode_joins_the_running_rows(tiny_model, tiny_tokenizer):
    """Continuous batching: a request sent while another decodes starts at the next step, beside it, and is
    answered while the long one goes on (it used to wait for that whole batch to end)."""
    from bezoar.serve import BackgroundServer, Server

    want = generate(tiny_model, tiny_tokenizer, "The red fox", max_new_tokens=3)[0].text
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=4, batch_window_s=0)) as bg:
        engine, url = bg.server.engine, bg.url + "/v1/completions"
        steps_before = engine.steps
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            long = pool.submit(post, url, dict(model="tiny", prompt="Once upon a time", max_tokens=480, temperature=0))
            deadline = time.time() + 60
            while engine.steps - steps_before < 20 and time.time() < deadline:
                time.sleep(0.002)
            status, short = post(url, dict(model="tiny", prompt="The red fox", max_tokens=3, temperature=0))
            long_running = not long.done()
            status_long, long_reply = long.result()
    assert status == status_long == 200
    assert short["choices"][0]["text"] == want
    assert long_running, "the short request was answered only after the long one"
    assert long_reply["usage"]["completion_tokens"] == 480
    # 479 steps after the prefill's first token: the short request's steps were the long one's steps
    assert engine.steps - steps_before == 479 and engine.batch.largest == 2


def test_more_requests_than_rows_wait_their_turn_and_get_their_own_answers(tiny_model, tiny_tokenizer):
    """At most --max-batch-size rows decode at once; the others wait and take rows as they free up."""
    from bezoar.serve import BackgroundServer, Server

    prompts = ["The bright eagle", "What is 74 plus 5?", "Q: Who finds the road? A:", "1. Emma reads",
               "Health is a happy subject."]
    lengths = [9, 3, 14, 6, 11]
    want = [generate(tiny_model, tiny_tokenizer, p, max_new_tokens=n)[0].text for p, n in zip(prompts, lengths)]
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=2)) as bg:
        engine, url = bg.server.engine, bg.url + "/v1/completions"
        release = hold_engine(engine)
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            calls = [pool.submit(post, url, dict(model="tiny", prompt=p, max_tokens=n, temperature=0))
                     for p, n in zip(prompts, lengths)]
            release(len(prompts))
            replies = [c.result() for c in calls]
    assert [r[1]["choices"][0]["text"] for r in replies] == want
    assert engine.batch.largest == 2


def test_a_model_name_with_a_slash_is_found_by_its_path(tiny_model, tiny_tokenizer):
    from bezoar.serve import BackgroundServer, Server

    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "openlm-research/tiny")) as bg:
        with urllib.request.urlopen(bg.url + "/v1/models/openlm-research/tiny", timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["id"] == "openlm-research/tiny"


def test_concurrent_clients_are_batched_and_answered_exactly(served, tiny_model, tiny_tokenizer):
    prompts = ["The bright eagle", "What is 74 plus 5?", "Q: Who finds the road? A:", "1. Emma reads",
               "Write a short poem about a brown dog.", "Health is a happy subject."]
    want = [generate(tiny_model, tiny_tokenizer, p, max_new_tokens=8)[0].text for p in prompts]
    engine = served.server.engine
    batches_before = engine.batches
    release = hold_engine(engine)

    async def ask_all():
        async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0) as c:
            calls = [asyncio.ensure_future(c.completions.create(model="tiny", prompt=p, max_tokens=8, temperature=0))
                     for p in prompts]
            await asyncio.to_thread(release, len(prompts))  # all six wait for the model together
            return await asyncio.gather(*calls)

    results = asyncio.run(ask_all())
    assert [r.choices[0].text for r in results] == want
    assert engine.batches - batches_before == 1, "requests waiting together should share one model batch"
    assert engine.largest_batch >= len(prompts)


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(served, client):
    body = json.dumps({"model": "tiny", "prompt": "The red fox", "max_tokens": 200, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(served.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        first = r.readline()
    assert first.startswith(b"data: ")
    r = client.completions.create(model="tiny", prompt="The red fox", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_leaves_before_a_plain_answer_stops_its_decoding(tiny_model, tiny_tokenizer):
    """A non-streaming client that disconnects (a timeout, a cancelled retry) frees the model: its rows
    stop decoding instead of running to max_tokens for nobody."""
    import socket

    from bezoar.serve import BackgroundServer, Server

    max_tokens = 480
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", batch_window_s=0.0)) as bg:
        engine = bg.server.engine
        seen = []
        run = engine.run

        async def recording_run(jobs):
            seen.extend(jobs)
            return await run(jobs)

        engine.run = recording_run
        body = json.dumps({"model": "tiny", "prompt": "Once", "max_tokens": max_tokens, "temperature": 0}).encode()
        with socket.create_connection(("127.0.0.1", bg.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body)
            deadline = time.time() + 60
            while engine.batches == 0 and time.time() < deadline:
                time.sleep(0.01)
            assert engine.batches == 1, "the request should have reached the model"
        engine.executor.submit(lambda: None).result(120)  # the model's worker is idle again
        assert seen and seen[0].cancelled
        assert len(seen[0].new_ids) < max_tokens, "the abandoned request was decoded to the end"


def test_stopping_the_engine_ends_the_rows_decoding(tiny_model, tiny_tokenizer):
    """Engine.stop (the server's cleanup) ends the rows still decoding after the current step, each request
    failing with "shutting down", instead of decoding every row to its max_tokens first."""
    from bezoar.serve import Engine, Job

    async def main():
        engine = Engine(tiny_model, tiny_tokenizer, batch_window_s=0)
        await engine.start()
        job = Job(tiny_tokenizer.encode("Once", bos=True), 480)
        task = asyncio.ensure_future(engine.run([job]))
        deadline = time.time() + 60
        while engine.steps < 5 and time.time() < deadline:
            await asyncio.sleep(0.002)
        await engine.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await task
        assert engine.steps < 400 and not engine.batch.running

    asyncio.run(main())


@pytest.mark.parametrize("bound", [24, 1])
def test_a_prefill_takes_the_waiting_prompts_that_fit_its_token_bound(tiny_model, tiny_tokenizer, bound):
    """With ``max_prefill_tokens`` each admit takes waiting jobs first come first while rows x longest prompt
    fits (the first whatever its length, so a bound below every prompt admits one at a time); the rest join at
    later steps, beside the rows decoding, and every job gets the tokens it gets with no bound."""
    from bezoar.serve import Engine, Job

    texts = ["Once upon a time there was a", "The red fox", "Q: what is two plus two? A:", "Hello", "The small cat",
             "In the beginning the world was dark and"]
    prompts = [tiny_tokenizer.encode(t, bos=True) for t in texts]

    async def serve(limit):
        engine = Engine(tiny_model, tiny_tokenizer, max_batch_size=8, batch_window_s=0, max_prefill_tokens=limit)
        admits, admit = [], engine.batch.admit
        engine.batch.admit = lambda seqs: (admits.append([len(q.prompt_ids) for q in seqs]), admit(seqs))[1]
        await engine.start()
        try:
            jobs = await engine.run([Job(p, 6) for p in prompts])
        finally:
            await engine.stop()
        return [j.new_ids for j in jobs], admits

    want, admits = asyncio.run(serve(None))
    assert admits == [[len(p) for p in prompts]]  # no bound: all six in one prefill
    got, admits = asyncio.run(serve(bound))
    assert got == want
    assert [n for group in admits for n in group] == [len(p) for p in prompts]  # first come first served
    assert len(admits) > 1
    for group in admits:
        assert len(group) == 1 or len(group) * max(group) <= bound, admits
    if bound == 1:
        assert all(len(group) == 1 for group in admits)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(tiny_model, tiny_tokenizer, max_prefill_tokens=0)


def test_scoring_forwards_keep_to_the_prefill_bound(tiny_model, tiny_tokenizer):
    """One-token scoring jobs (lm-eval's loglikelihood) and logprobs after decoding run forwards of at most
    ``max_prefill_tokens`` padded tokens each (one row where a prompt alone is longer), with the results of
    an unbounded engine."""
    from bezoar.serve import Engine, Job

    texts = ["Once upon a time there was a", "The red fox", "Q: what is two plus two? A:", "Hello", "The small cat"]
    prompts = [tiny_tokenizer.encode(t, bos=True) for t in texts]

    async def serve(limit):
        engine = Engine(tiny_model, tiny_tokenizer, max_batch_size=8, batch_window_s=0, max_prefill_tokens=limit)
        shapes, hidden = [], tiny_model.hidden_states

        def spy(ids, *args, **kwargs):
            shapes.append(tuple(ids.shape))
            return hidden(ids, *args, **kwargs)

        tiny_model.hidden_states = spy
        await engine.start()
        try:
            scored = await engine.run([Job(p, 1, logprobs=2, echo=True) for p in prompts])
            decoded = await engine.run([Job(p, 3, logprobs=1) for p in prompts])
        finally:
            await engine.stop()
            del tiny_model.hidden_states
        got = [(j.new_ids, j.token_logprobs) for j in scored + decoded]
        return got, shapes

    want, _ = asyncio.run(serve(None))
    got, shapes = asyncio.run(serve(16))
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for (_, a), (_, b) in zip(got, want):
        assert len(a) == len(b) and all((x is None and y is None) or abs(x - y) < 1e-4 for x, y in zip(a, b))
    assert len(shapes) > 2 and all(rows == 1 or rows * width <= 16 for rows, width in shapes), shapes


def test_prefill_take_counts_padded_tokens_first_come_first():
    from bezoar.model.decode import prefill_take

    assert prefill_take([5, 5, 5, 5], free=8, max_tokens=12) == 2  # 3 x 5 = 15 > 12
    assert prefill_take([3, 9, 2], free=8, max_tokens=18) == 2  # 2 x 9 = 18 fits; 3 x 9 does not
    assert prefill_take([3, 9, 2], free=8, max_tokens=17) == 1  # the 9 would pad both rows to 18
    assert prefill_take([40, 1, 1], free=8, max_tokens=16) == 1  # the first alone, whatever its length
    assert prefill_take([1, 40], free=8, max_tokens=16) == 1  # the long one waits for the next admit
    assert prefill_take([4] * 10, free=3, max_tokens=None) == 3  # rows bound it too
    assert prefill_take([4] * 10, free=0, max_tokens=None) == 0
    assert prefill_take([], free=4, max_tokens=8) == 0


def test_sampling_is_seeded(client):
    kwargs = dict(model="tiny", prompt="The small cat", max_tokens=8, temperature=1.0, seed=11)
    a = client.completions.create(**kwargs).choices[0].text
    b = client.completions.create(**kwargs).choices[0].text
    assert a == b


def test_top_k_is_accepted_and_top_k_1_samples_the_greedy_text(client):
    prompt = "The small cat"
    for max_tokens in (1, 8):  # one token (the scoring path) and a decode loop
        greedy = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0)
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=2.0, seed=3)
        one = client.completions.create(**kwargs, extra_body={"top_k": 1})
        assert one.choices[0].text == greedy.choices[0].text
        plain = client.completions.create(**kwargs).choices[0].text
        for off in (-1, 0):  # vLLM's "off"
            assert client.completions.create(**kwargs, extra_body={"top_k": off}).choices[0].text == plain
    messages = [{"role": "user", "content": "Name a color."}]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    one = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=2.0, seed=3,
                                         extra_body={"top_k": 1})
    assert one.choices[0].message.content == greedy.choices[0].message.content
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=2.0, seed=3)
    assert plain.choices[0].message.content != greedy.choices[0].message.content, "temperature 2 leaves greedy"


def test_a_tiny_temperature_decodes_greedily(client):
    """A temperature below 1e-5 is greedy, as 0 is (vLLM's rule): logits divided by 1e-40 overflow to
    infinity and the sampler's NaN probabilities failed the request (and its whole batch) with a 500."""
    for max_tokens in (1, 6):  # the scoring path and a decode loop
        kwargs = dict(model="tiny", prompt="Health is", max_tokens=max_tokens)
        greedy = client.completions.create(**kwargs, temperature=0).choices[0].text
        for temperature in (1e-40, 1e-300, 5e-6):
            assert client.completions.create(**kwargs, temperature=temperature).choices[0].text == greedy
    messages = [{"role": "user", "content": "Name a color."}]
    greedy = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    tiny = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=1e-40)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content


def test_a_failure_fails_only_the_requests_it_touched(tiny_model, tiny_tokenizer, monkeypatch):
    """Requests decoding together: a sampler that fails for one set of settings fails those rows' requests
    with a 500, and the rows beside them decode on to their answers; a prefill that fails fails the requests
    it was starting, not the rows decoding; a decode step that fails fails the rows decoding, and the server
    serves the next requests."""
    import bezoar.model.decode as decode_module
    from bezoar.model.decode import ContinuousBatch
    from bezoar.serve import BackgroundServer, Server

    server = Server(tiny_model, tiny_tokenizer, "tiny", batch_window_s=0.2)
    engine = server.engine
    sample_next = decode_module.sample_next

    def failing_sampler(logits, temperature, *args, **kwargs):
        if temperature == 0.5:
            raise RuntimeError("this sampler fails")
        return sample_next(logits, temperature, *args, **kwargs)

    bodies = [dict(model="tiny", prompt="Health is", max_tokens=4, temperature=0),
              dict(model="tiny", prompt="The cat", max_tokens=4, temperature=0.5),
              dict(model="tiny", prompt="Health is", max_tokens=1, temperature=0),
              dict(model="tiny", prompt="Once", max_tokens=6, temperature=1.0, seed=3)]
    with BackgroundServer(server) as bg:
        url = bg.url + "/v1/completions"
        alone = {i: post(url, bodies[i])[1]["choices"][0]["text"] for i in (0, 2, 3)}
        monkeypatch.setattr(decode_module, "sample_next", failing_sampler)
        release = hold_engine(engine)
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            calls = [pool.submit(post, url, b) for b in bodies]
            batches_before = engine.batches
            release(len(bodies))
            replies = [c.result() for c in calls]
        assert engine.batches - batches_before == 1, "the four requests should reach the engine together"
        assert replies[1][0] == 500 and replies[1][1]["error"]["type"] == "server_error"
        assert {i: (replies[i][0], replies[i][1]["choices"][0]["text"]) for i in (0, 2, 3)} == \
            {i: (200, text) for i, text in alone.items()}
        monkeypatch.setattr(decode_module, "sample_next", sample_next)

        prefill, decode = ContinuousBatch._prefill, ContinuousBatch._decode
        failing_length = len(tiny_tokenizer.encode("The cat", bos=True))

        def failing_prefill(self, sequences, rows):
            if any(len(s.prompt_ids) == failing_length for s in sequences):
                raise RuntimeError("this prefill fails")
            return prefill(self, sequences, rows)

        monkeypatch.setattr(ContinuousBatch, "_prefill", failing_prefill)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(post, url, dict(model="tiny", prompt="Health is", max_tokens=60, temperature=0))
            deadline = time.time() + 60
            while not engine.batch.running and time.time() < deadline:
                time.sleep(0.002)
            assert engine.batch.running, "the long request did not start"
            status, reply = post(url, dict(model="tiny", prompt="The cat", max_tokens=4, temperature=0))
            assert status == 500 and reply["error"]["type"] == "server_error", reply
            assert long.result()[0] == 200, "a failed prefill stopped the rows already decoding"
        monkeypatch.setattr(ContinuousBatch, "_prefill", prefill)

        def failing_decode(self, running):
            raise RuntimeError("this step fails")

        monkeypatch.setattr(ContinuousBatch, "_decode", failing_decode)
        status, reply = post(url, dict(model="tiny", prompt="Health is", max_tokens=4, temperature=0))
        assert status == 500 and not engine.batch.running
        monkeypatch.setattr(ContinuousBatch, "_decode", decode)
        status, reply = post(url, bodies[0])
        assert status == 200 and reply["choices"][0]["text"] == alone[0]


def _while_one_decodes(server, tiny_tokenizer, body):
    """Send ``body`` while a 200-token request decodes (after its 10th step); both replies, the long one's last."""
    url = server.url + "/v1/completions"
    engine = server.server.engine
    steps = engine.steps
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        long = pool.submit(post, url, dict(model="tiny", prompt="Once upon a time", max_tokens=200, temperature=0))
        deadline = time.time() + 60
        while engine.steps < steps + 10 and time.time() < deadline:
            time.sleep(0.002)
        assert engine.batch.running, "the long request should still decode"
        return post(url, body), long.result()


def test_a_request_failing_as_it_ends_fails_alone(tiny_model, tiny_tokenizer, monkeypatch):
    """Finishing one request's answer raised: that request hung (its future never set) and the request decoding
    beside it got a 500 (the failure was taken for a failed decode step)."""
    from bezoar.serve import BackgroundServer, Engine, Server

    finish_text = Engine._finish_text
    failing_prompts = (tiny_tokenizer.encode("The red fox", bos=True), EOS_NEXT)

    def failing(self, job):
        if job.prompt_ids in failing_prompts:
            raise RuntimeError("this answer fails")
        return finish_text(self, job)

    monkeypatch.setattr(Engine, "_finish_text", failing)
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=4, batch_window_s=0)) as bg:
        # ending at a step, and at the prefill (EOS_NEXT's first token is the EOS)
        for prompt in ("The red fox", EOS_NEXT):
            (status, reply), (long_status, long_reply) = _while_one_decodes(
                bg, tiny_tokenizer, dict(model="tiny", prompt=prompt, max_tokens=3, temperature=0))
            assert status == 500 and reply["error"]["type"] == "server_error", (prompt, status, reply)
            assert long_status == 200 and long_reply["usage"]["completion_tokens"] == 200


def test_a_cache_that_cannot_grow_fails_only_the_request_that_needed_it(tiny_model, tiny_tokenizer, monkeypatch):
    """Growing the cache for a longer request ran out of memory after the old cache was dropped: the rows
    decoding in it failed too. Now the new cache is made before the old one goes."""
    import bezoar.model.decode as decode_module
    from bezoar.serve import BackgroundServer, Server

    zeros = torch.zeros

    class Torch:  # decode.py's torch, out of memory for a cache of more than 300 slots
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*shape, **kw):
            dims = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
            if len(dims) == 5 and dims[2] > 300:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return zeros(*shape, **kw)

    monkeypatch.setattr(decode_module, "torch", Torch())
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=4, batch_window_s=0)) as bg:
        (status, reply), (long_status, long_reply) = _while_one_decodes(
            bg, tiny_tokenizer, dict(model="tiny", prompt="The red fox", max_tokens=400, temperature=0))
        assert status == 500 and long_status == 200, (reply, long_reply)
        assert long_reply["usage"]["completion_tokens"] == 200


def test_rows_of_every_sampling_setting_decode_together_and_each_as_alone(tiny_model, tiny_tokenizer):
    """One continuous batch holds greedy rows, top-k rows and seeded rows at once, joining at different steps:
    each row's tokens are those it gets decoded alone (greedy, top_k 1 = greedy, and a seeded row draws from
    its own generator the same numbers)."""
    from bezoar.model import generate_ids
    from bezoar.model.decode import ContinuousBatch, Sequence

    prompts = [tiny_tokenizer.encode(p, bos=True) for p in
               ("The small cat", "Q: what is 2+2? A:", "Once upon a", "Health is a happy", "1. Emma")]

    def alone(ids, n, temperature=0.0, top_k=0, seed=None):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return generate_ids(tiny_model, torch.tensor([ids]), max_new_tokens=n, temperature=temperature,
                            top_k=top_k, generator=gen, decode="eager")[0][0]

    specs = [dict(n=12), dict(n=9, temperature=1.5, top_k=1), dict(n=14, temperature=1.0, seed=5),
             dict(n=7, temperature=0.8, top_k=20, seed=9), dict(n=10)]
    want = [alone(p, **spec) for p, spec in zip(prompts, specs)]
    batch = ContinuousBatch(tiny_model, 4, decode="static", bucket=8)  # 8 slots: the cache grows as rows join
    seqs = [Sequence(p, spec["n"], spec.get("temperature", 0.0), top_k=spec.get("top_k", 0),
                     generator=None if spec.get("seed") is None else torch.Generator().manual_seed(spec["seed"]))
            for p, spec in zip(prompts, specs)]
    batch.admit(seqs[:2])
    batch.step()
    batch.admit(seqs[2:4])
    for _ in range(3):
        batch.step()
    while batch.running or seqs[4].row is None:
        if batch.free and seqs[4].row is None:
            batch.admit(seqs[4:])  # into the first row that ended
        batch.step()
    assert [s.new_ids for s in seqs] == want
    assert [s.finish for s in seqs] == ["length"] * 5
    assert batch.largest == 4 and seqs[4].row < 4


def test_seeded_sampling_does_not_depend_on_concurrent_requests(tiny_model, tiny_tokenizer):
    """Two clients sampling with the same seed at the same time get what each gets alone."""
    from bezoar.serve import BackgroundServer, Server

    prompts = ["The small cat", "Once upon a"]
    kwargs = dict(model="tiny", max_tokens=12, temperature=1.0, seed=11)
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", batch_window_s=0.2)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        alone = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts]

        release = hold_engine(bg.server.engine)

        async def together():
            async with openai.AsyncOpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0) as c:
                calls = [asyncio.ensure_future(c.completions.create(prompt=p, **kwargs)) for p in prompts]
                await asyncio.to_thread(release, len(prompts))  # both wait for the model together
                return await asyncio.gather(*calls)

        batches_before = bg.server.engine.batches
        both = [r.choices[0].text for r in asyncio.run(together())]
        assert bg.server.engine.batches - batches_before == 1, "the two requests should reach the engine together"
    assert both == alone


BAD = [
    ("/v1/completions", {"model": "tiny"}, "prompt", "provide a prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": 5}, "temperature", "temperature must be in"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, "prompt", "prompt must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 600}, "max_tokens", "maximum context length"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "best_of": 3}, "best_of", "best_of"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "frobnicate": 1}, "frobnicate", "Unrecognized request argument"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "logprobs": 1}, "logprobs", "stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [1]}, "stop", "stop must be"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -2}, "top_k",
     "top_k must be -1 or 0 (off) or at least 1, got -2"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": 2.5}, "top_k", "top_k must be an integer"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": "5"}, "top_k", "top_k must be an integer"),
    ("/v1/completions", {"prompt": "x"}, "model", "provide a model"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}},
     "stream_options", "include_usage must be a boolean"),
    # OpenAI refuses it; it was silently ignored
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when stream is true"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "stream": False,
                              "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stream": "true", "stream_options": {"include_usage": True}},
     "stream", "stream must be true or false"),  # stream's own error, not stream_options'
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, "messages", "non-empty list"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}]},
     "messages", "last message"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]},
     "messages[0].role", "not supported"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 0}, "n", "n must be"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_k": True},
     "top_k", "top_k must be an integer"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_k": -5},
     "top_k", "top_k must be -1 or 0 (off)"),
    # valid JSON (\ud800 escapes) but not Unicode text: a JavaScript client slicing an emoji in half sends these
    ("/v1/completions", {"model": "tiny", "prompt": "a\ud800b"}, "prompt", "lone UTF-16 surrogate"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["\udc00"]}, "stop", "lone UTF-16 surrogate"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi \ud83d"}]},
     "messages", "lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("path,body,param,message", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_style_400(served, path, body, param, message):
    status, reply = post(served.url + path, body)
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert message in error["message"]


def test_other_errors(served, client):
    status, reply = post(served.url + "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = post(served.url + "/v1/completions", None, raw=b"[" * 100000 + b"]" * 100000)
    assert status == 400 and "not valid JSON" in reply["error"]["message"], reply  # was a 500 (RecursionError)
    status, reply = post(served.url + "/v1/completions", {"model": "gpt-9", "prompt": "x"})
    assert status == 404 and reply["error"]["code"] == "model_not_found"
    for charset in ("foo", "base64"):  # no codec, and a codec that is no text encoding: were 500s (LookupError)
        status, reply = post(served.url + "/v1/completions", {"model": "tiny", "prompt": "x"},
                             content_type=f"application/json; charset={charset}")
        assert status == 400 and reply["error"]["type"] == "invalid_request_error", reply
        assert f"Unsupported charset '{charset}'" in reply["error"]["message"]
    status, reply = post(served.url + "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 1},
                         content_type="application/json; charset=utf-8")
    assert status == 200, reply
    status, reply = post(served.url + "/v1/embeddings", {"model": "tiny", "input": "x"})
    assert status == 404 and "error" in reply
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", top_p=0)
    assert e.value.body["param"] == "top_p"


def test_api_key_is_checked_when_set(tiny_model, tiny_tokenizer):
    from bezoar.serve import BackgroundServer, Server

    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", api_key="sekrit")) as bg:
        good = openai.OpenAI(base_url=bg.url + "/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=bg.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_the_continuous_batch_serves_the_eager_loops_tokens(tiny_model, tiny_tokenizer, decode):
    """Served completions (3 prompts in one request, and a seeded n=3 request) are the tokens of bezoar's
    eager decode loop run on each prompt alone: greedy, and seeded sampling (choice i from seed + i)."""
    from bezoar.model import generate_ids
    from bezoar.serve import BackgroundServer, Server

    prompts = ["The small cat", "Q: what is 2+2?", "Once upon a"]

    def alone(prompt, temperature=0.0, seed=None):
        ids = torch.tensor([tiny_tokenizer.encode(prompt, bos=True)])
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        new = generate_ids(tiny_model, ids, max_new_tokens=9, temperature=temperature, generator=gen,
                           decode="eager", eos_id=tiny_tokenizer.eos_id)[0][0]
        return tiny_tokenizer.decode(ids[0].tolist() + new)[len(tiny_tokenizer.decode(ids[0].tolist())):]

    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", decode=decode)) as bg:
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="x", max_retries=0)
        greedy = client.completions.create(model="tiny", prompt=prompts, max_tokens=9, temperature=0)
        sampled = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=9, temperature=1.0,
                                            n=3, seed=11)
    assert [c.text for c in greedy.choices] == [alone(p) for p in prompts]
    assert [c.text for c in sampled.choices] == [alone(prompts[0], 1.0, 11 + i) for i in range(3)]
    assert len({c.text for c in sampled.choices}) > 1, "three samples should not all agree"
    with pytest.raises(ValueError, match="decode='fast'"):
        Server(tiny_model, tiny_tokenizer, "tiny", decode="fast")


def test_command_line_help_and_bad_folder(capsys):
    from bezoar.serve import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quant" in out and "127.0.0.1" in out
    assert "--max-request-seqs" in out and "(default 128)" in " ".join(out.split())
    assert "--max-prefill-tokens" in out and "(default 8192; 0: no bound)" in " ".join(out.split())
    with pytest.raises(SystemExit) as done:
        main(["--model", "x", "--max-prefill-tokens", "-1"])
    assert done.value.code == 2 and "--max-prefill-tokens must be at least 1" in capsys.readouterr().err
    assert main(["--model", "/no/such/folder"]) == 2
    err = capsys.readouterr().err
    assert "/no/such/folder" in err and "Traceback" not in err


def test_command_line_binds_before_it_loads_and_a_bad_address_is_one_line(tiny_dir, monkeypatch, capsys, caplog):
    """A port in use or a host that does not resolve is found before the model loads (minutes for a large
    one): one line on stderr naming what to change, exit status 2, no traceback and no "serving" line."""
    import logging
    import socket

    from bezoar import serve

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was bound")

    monkeypatch.setattr(serve, "build_server", load)
    caplog.set_level(logging.INFO, logger="bezoar.serve")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert serve.main(["--model", str(tiny_dir), "--port", str(port), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"127.0.0.1:{port}" in err and "already in use" in err and "--port" in err
    assert serve.main(["--model", str(tiny_dir), "--host", "999.1.1.1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host '999.1.1.1' does not resolve" in err
    with pytest.raises(SystemExit) as done:
        serve.main(["--model", str(tiny_dir), "--port", "70000"])
    assert done.value.code == 2 and "--port must be between 0 and 65535" in capsys.readouterr().err
    assert "serving" not in caplog.text


def test_command_line_refuses_an_empty_api_key_and_logs_what_it_serves(tiny_dir, tmp_path, monkeypatch, capsys,
                                                                        caplog):
    """BEZOAR_SERVE_API_KEY set but empty (or with whitespace around it, which no header can carry) is refused
    before anything loads, not read as "no key"; the start-up line names the adapter, the quantization and
    whether a bearer key is required, never the key."""
    import logging

    from bezoar import serve
    from bezoar.model import load
    from bezoar.model.lora import LoraConfig, apply_lora, save_adapter

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded with a bad BEZOAR_SERVE_API_KEY")

    build_server = serve.build_server
    monkeypatch.setattr(serve, "build_server", no_load)
    caplog.set_level(logging.INFO, logger="bezoar.serve")
    for bad, says in (("", "is set but empty"), ("  ", "is set but empty"), ("key\n", "whitespace")):
        monkeypatch.setenv("BEZOAR_SERVE_API_KEY", bad)
        assert serve.main(["--model", str(tiny_dir), "--port", "0", "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "BEZOAR_SERVE_API_KEY" in err and says in err, err
        with pytest.raises(ValueError, match=says):  # build_server, for Python callers, refuses it too
            build_server(str(tiny_dir), device="cpu")
    monkeypatch.setattr(serve, "build_server", build_server)

    base = load(tiny_dir, device="cpu")
    apply_lora(base, LoraConfig(r=2, alpha=4, dropout=0.0))
    adapter = save_adapter(base, tmp_path / "adapter")
    ran = {}
    monkeypatch.setattr(serve.web, "run_app", lambda app, **kwargs: ran.update(kwargs))
    key = "sk-serve-test-5e1f"
    for env, extra, says in ((key, ["--adapter", str(adapter), "--quant", "nf4"],
                              [f"adapter {adapter}, quantization nf4, cpu", "bearer key required"]),
                             (None, [], ["adapter none, quantization none, cpu float32", "bearer key not required"])):
        if env is None:
            monkeypatch.delenv("BEZOAR_SERVE_API_KEY")
        else:
            monkeypatch.setenv("BEZOAR_SERVE_API_KEY", env)
        caplog.clear()
        assert serve.main(["--model", str(tiny_dir), "--port", "0", "--device", "cpu", *extra]) == 0
        [sock] = ran["sock"]
        try:
            port = sock.getsockname()[1]
        finally:
            sock.close()
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving")]
        assert f"on http://127.0.0.1:{port}/v1 (" in line and all(s in line for s in says), line
        captured = capsys.readouterr()
        assert key not in caplog.text + captured.out + captured.err


def test_command_line_serves(tiny_dir):
    """``python -m bezoar.serve`` in its own process, on a free port, with the model quantized to NF4."""
    from bezoar.serve import free_port

    env = {k: v for k, v in os.environ.items() if k != "BEZOAR_SERVE_API_KEY"}
    for attempt in range(3):
        # The port is free when found, but closed again until the server binds it, seconds later: a process of
        # another test (a server, or a client's outgoing connection) can take it meanwhile. Then another port.
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "bezoar.serve", "--model", str(tiny_dir), "--port", str(port),
                                 "--name", "tiny-cli", "--device", "cpu", "--quant", "nf4"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env)
        try:
            deadline = time.time() + 300
            while proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                        health = json.loads(r.read())
                    if health.get("model") == "tiny-cli":
                        break
                except (OSError, ValueError):  # not up yet (or, on a taken port, someone else)
                    pass
                assert time.time() < deadline, "server did not come up within 300 s"
                time.sleep(0.3)
            if proc.poll() is not None:
                output = proc.stdout.read()
                if "address already in use" in output.lower() and attempt < 2:
                    continue
                raise AssertionError(f"server did not come up: {output}")
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            assert c.completions.create(model="tiny-cli", prompt="The cat", max_tokens=3, temperature=0).choices[0].text
            return
        finally:
            proc.terminate()
            proc.wait(30)


def test_sequences_per_request_are_capped_before_any_work(tiny_model, tiny_tokenizer, monkeypatch):
    """--max-request-seqs bounds n x prompts: a request at the cap is served; one over it is a 400 naming
    n, prompt and the cap, refused before a prompt is tokenized or anything reaches the model."""
    from bezoar.serve import BackgroundServer, Server

    server = Server(tiny_model, tiny_tokenizer, "tiny", max_batch_size=4, batch_window_s=0.0, max_request_seqs=6)
    encoded = []
    encode = tiny_tokenizer.encode
    monkeypatch.setattr(tiny_tokenizer, "encode", lambda *a, **k: encoded.append(a) or encode(*a, **k))
    with BackgroundServer(server) as bg:
        engine = bg.server.engine
        url = bg.url + "/v1/completions"
        status, reply = post(url, {"model": "tiny", "prompt": ["The cat", "Once", "Health is"], "n": 2,
                                   "max_tokens": 2, "temperature": 0})
        assert status == 200, reply
        assert [c["index"] for c in reply["choices"]] == list(range(6))
        assert engine.batches == 2  # 6 rows in batches of at most --max-batch-size 4
        status, reply = post(url, {"model": "tiny", "prompt": [[1, 5]] * 6, "max_tokens": 2, "temperature": 0})
        assert status == 200 and len(reply["choices"]) == 6, reply
        batches, encoded[:] = engine.batches, []
        over = [({"prompt": ["The cat", "Once", "Health is", "x"], "n": 2}, "n", "8 sequences (n=2 x 4 prompts)"),
                ({"prompt": [[1, 5]] * 7}, "prompt", "7 sequences (n=1 x 7 prompts)"),
                ({"prompt": ["a"] * 5000, "n": 16}, "prompt", "80000 sequences (n=16 x 5000 prompts)")]
        for body, param, asked in over:
            status, reply = post(url, {"model": "tiny", "max_tokens": 2, **body})
            assert status == 400, reply
            error = reply["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param
            assert asked in error["message"] and "at most 6 sequences" in error["message"], error
            assert "--max-request-seqs" in error["message"]
        status, reply = post(bg.url + "/v1/chat/completions",
                             {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 7})
        assert status == 400 and reply["error"]["param"] == "n", reply
        assert "7 sequences (n=7 x 1 prompt)" in reply["error"]["message"]
        assert engine.batches == batches, "a refused request reached the model"
        assert encoded == [], "a refused request was tokenized"
        # under the cap, the prompts are checked against the context one by one: the first too long stops it
        status, reply = post(url, {"model": "tiny", "prompt": ["The cat " * 600, "Once", "Health is"], "max_tokens": 2})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        assert len(encoded) == 1 and engine.batches == batches
    with pytest.raises(ValueError, match="max_request_seqs"):
        Server(tiny_model, tiny_tokenizer, "tiny", max_request_seqs=0)


def test_the_default_cap_on_sequences_per_request(served):
    from bezoar.serve import MAX_REQUEST_SEQS

    assert served.server.max_request_seqs == MAX_REQUEST_SEQS == 128
    assert served.server.engine.max_prefill_tokens == 8192
    status, reply = post(served.url + "/v1/completions",
                         {"model": "tiny", "prompt": [[1]] * 129, "max_tokens": 1, "temperature": 0})
    assert status == 400 and reply["error"]["param"] == "prompt", reply
    assert "at most 128 sequences" in reply["error"]["message"]


# ---- prompt tokenization off the event loop --------------------------------------------------


def _get(url: str, timeout: float) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def _post(url: str, body, timeout: float) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_slow_tokenization_does_not_stall_other_requests(tiny_model, tiny_tokenizer, monkeypatch, path):
    """A prompt whose tokenization takes long (a multi-megabyte text) is tokenized off the event loop: while
    it runs, the server answers other clients (the model list, a short completion)."""
    import threading

    from bezoar.serve import BackgroundServer, Server

    entered, release = threading.Event(), threading.Event()
    encode = tiny_tokenizer.encode

    def slow_encode(text, *a, **k):
        if "SLOW-MARKER" in text:
            entered.set()
            release.wait(60)  # stands for seconds of sentencepiece work on a huge text
        return encode(text, *a, **k)

    monkeypatch.setattr(tiny_tokenizer, "encode", slow_encode)
    if path == "/v1/completions":
        slow_body = {"model": "tiny", "prompt": "SLOW-MARKER The cat", "max_tokens": 2, "temperature": 0}
    else:
        slow_body = {"model": "tiny", "messages": [{"role": "user", "content": "SLOW-MARKER hi"}], "max_tokens": 2,
                     "temperature": 0}
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", batch_window_s=0.0)) as bg:
        slow = {}
        thread = threading.Thread(target=lambda: slow.update(reply=_post(bg.url + path, slow_body, 120)))
        thread.start()
        try:
            assert entered.wait(30), "the slow request never reached the tokenizer"
            status, models = _get(bg.url + "/v1/models", timeout=10)
            assert status == 200 and models["data"][0]["id"] == "tiny"
            status, reply = _post(bg.url + "/v1/completions", {"model": "tiny", "prompt": "The red fox",
                                                               "max_tokens": 2, "temperature": 0}, timeout=30)
            assert status == 200 and reply["choices"][0]["text"] is not None, reply
            assert not release.is_set() and "reply" not in slow, "answered only after the slow tokenization"
        finally:
            release.set()
            thread.join(60)
    status, reply = slow["reply"]
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2, reply


def test_context_errors_from_the_tokenizing_worker_are_the_same_400s(served):
    """The prompt checks run with the tokenization, off the event loop; their errors are the 400s they were."""
    url = served.url
    context = served.server.engine.context
    cases = [
        ("/v1/completions", {"prompt": "The cat", "max_tokens": context}, "max_tokens"),
        ("/v1/completions", {"prompt": ["Once", "The cat " * 600], "max_tokens": 2}, "max_tokens"),
        ("/v1/completions", {"prompt": [[1, 5], [1, 99999]]}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": context},
         "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": context},
         "max_completion_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "The cat " * 600}]}, "messages"),
    ]
    for path, body, param in cases:
        status, reply = post(url + path, {"model": "tiny", **body})
        assert status == 400, (body, reply)
        error = reply["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
        if param != "prompt":
            assert error["code"] == "context_length_exceeded", error
            assert f"maximum context length is {context} tokens. However, you requested " in error["message"]
            assert " in the prompt, " in error["message"] and "at least" not in error["message"], error
        else:
            assert "prompt[1]: token id 99999 is outside the vocabulary" in error["message"], error
    # the order of the checks holds: response_format is refused before the prompt's length
    status, reply = post(url + "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "The cat " * 600}], "response_format": {"type": "json_object"}})
    assert status == 400 and reply["error"]["param"] == "response_format", reply


# ---- the up-front bound on a text prompt's length -----------------------------------------------


class _EditedProto:
    """A sentencepiece processor whose serialized model is edited (the pieces stay the tiny model's)."""

    def __init__(self, sp, edit):
        from sentencepiece import sentencepiece_model_pb2 as pb

        self._sp = sp
        proto = pb.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        edit(proto)
        self._proto = proto.SerializeToString()

    def serialized_model_proto(self):
        return self._proto

    def __getattr__(self, name):
        return getattr(self._sp, name)


def test_longest_piece_bytes_reads_the_model_and_bounds_the_token_count(tiny_tokenizer):
    import copy
    import math

    pb = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    from bezoar.serve import longest_piece_bytes

    sp = tiny_tokenizer.sp
    proto = pb.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    assert proto.trainer_spec.byte_fallback and not proto.normalizer_spec.remove_extra_whitespaces
    assert not proto.normalizer_spec.precompiled_charsmap  # identity: the text is not rewritten
    longest = longest_piece_bytes(tiny_tokenizer)
    assert longest == max(len(p.piece.encode()) for p in proto.pieces if p.type != pb.ModelProto.SentencePiece.CONTROL)
    # the bound holds on texts built to make tokens as long as they get: the longest pieces repeated, runs of
    # spaces and of U+2581 (sentencepiece's own space marker, 3 bytes), multibyte and unknown characters
    best = max(range(sp.GetPieceSize()), key=lambda i: len(sp.IdToPiece(i).encode()) if not sp.IsControl(i) else 0)
    word = sp.IdToPiece(best)
    texts = [word * 50, word.replace("\u2581", " ") * 50, " " * 5000, "\u2581" * 3000, "\u2581\u2581the" * 500,
             "é" * 2000, "日本語のテキスト" * 300, "😀" * 1000, "a\n\t" * 900, "The cat " * 600, ""]
    for text in texts:
        tokens = len(tiny_tokenizer.encode(text))
        assert tokens >= math.ceil(len(text.encode("utf-8")) / longest), (text[:40], tokens)

    # a model that rewrites the text (drops spaces, normalizes, or has no byte fallback) has no such bound
    def edited(edit):
        tok = copy.copy(tiny_tokenizer)
        tok.sp = _EditedProto(sp, edit)
        return longest_piece_bytes(tok)

    assert edited(lambda p: None) == longest
    assert edited(lambda p: setattr(p.normalizer_spec, "remove_extra_whitespaces", True)) is None
    assert edited(lambda p: p.normalizer_spec.ClearField("remove_extra_whitespaces")) is None  # proto2 default: on
    assert edited(lambda p: setattr(p.normalizer_spec, "precompiled_charsmap", b"\x01\x02")) is None
    assert edited(lambda p: setattr(p.trainer_spec, "byte_fallback", False)) is None
    bad = copy.copy(tiny_tokenizer)
    bad.sp = _EditedProto(sp, lambda p: None)
    bad.sp._proto = b"\xff\xff"  # unreadable: no bound, not a failure
    assert longest_piece_bytes(bad) is None


def test_a_text_prompt_too_long_by_its_bytes_alone_is_refused_untokenized(tiny_model, tiny_tokenizer, monkeypatch):
    from bezoar.serve import BackgroundServer, Server, longest_piece_bytes

    encoded = []
    encode = tiny_tokenizer.encode
    monkeypatch.setattr(tiny_tokenizer, "encode", lambda *a, **k: encoded.append(len(a[0])) or encode(*a, **k))
    longest = longest_piece_bytes(tiny_tokenizer)
    with BackgroundServer(Server(tiny_model, tiny_tokenizer, "tiny", batch_window_s=0.0)) as bg:
        context = bg.server.engine.context
        huge = "The bright eagle watches the river. " * (8 * 2**20 // 36)  # 8 MiB: seconds to tokenize
        status, reply = post(bg.url + "/v1/completions", {"model": "tiny", "prompt": ["Once", huge], "max_tokens": 4})
        assert status == 400, reply
        error = reply["error"]
        assert error["param"] == "max_tokens" and error["code"] == "context_length_exceeded", error
        at_least = -(-len(huge) // longest)
        assert (f"maximum context length is {context} tokens. However, you requested at least {at_least + 4} tokens "
                f"(at least {at_least} in the prompt: {len(huge):,} bytes of text" in error["message"]), error
        # Only the short prompt reached the tokenizer. (The refusal also took 0.1 s where tokenizing took 2.5 s,
        # but a bound of 2 s on it measured the machine's load as much as the work.)
        assert encoded == [len("Once")], "the huge prompt was tokenized"
        # chat: the same bound on the rendered prompt, with the param the exact check names
        for body, param in [({}, "messages"), ({"max_tokens": 3}, "max_tokens")]:
            encoded[:] = []
            status, reply = post(bg.url + "/v1/chat/completions", {
                "model": "tiny", "messages": [{"role": "user", "content": huge}], **body})
            assert status == 400 and reply["error"]["param"] == param, reply
            assert "at least" in reply["error"]["message"] and encoded == [], reply
        # a text of at most context x longest bytes is tokenized (quickly) and refused with its exact count;
        # one byte more and the bound refuses it untokenized, whatever max_tokens
        edge = "x" * (context * longest)
        for text, tokenized in [(edge, True), (edge + "x", False), ("é" * (context * longest // 2 + 1), False)]:
            encoded[:] = []
            status, reply = post(bg.url + "/v1/completions", {"model": "tiny", "prompt": text, "max_tokens": 1})
            assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
            assert encoded == ([len(text)] if tokenized else []), reply
            assert ("at least" in reply["error"]["message"]) != tokenized


@pytest.mark.gpu
def test_the_server_on_a_gpu_replays_graphs_and_answers_as_alone(tiny_dir, tiny_tokenizer):
    """On CUDA (decode auto: graphs) concurrent requests joining the running rows at different steps, with
    stop strings, a seeded sampled one among them, are answered as each is decoded alone by the eager loop;
    no graph capture fails, and the pinned-buffer token queue reads every step right."""
    import warnings

    from bezoar.model import generate, load
    from bezoar.serve import BackgroundServer, Server

    model = load(tiny_dir, device="cuda", dtype=torch.float32).eval()
    prompts = ["The bright eagle", "What is 74 plus 5?", "Q: Who finds the road? A:", "1. Emma reads",
               "Write a short poem about a brown dog.", "Health is a happy subject."]
    lengths = [40, 3, 25, 60, 9, 17]
    want = [generate(model, tiny_tokenizer, p, max_new_tokens=n, decode="eager")[0].text
            for p, n in zip(prompts, lengths)]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with BackgroundServer(Server(model, tiny_tokenizer, "tiny", max_batch_size=4, batch_window_s=0)) as bg:
            url = bg.url + "/v1/completions"
            sampled = dict(model="tiny", prompt=prompts[0], max_tokens=12, temperature=1.0, seed=5)
            alone = post(url, sampled)[1]["choices"][0]["text"]
            with concurrent.futures.ThreadPoolExecutor(len(prompts) + 1) as pool:
                calls = []
                for p, n in zip(prompts, lengths):  # a little apart: they join rows already decoding
                    calls.append(pool.submit(post, url, dict(model="tiny", prompt=p, max_tokens=n, temperature=0)))
                    time.sleep(0.01)
                calls.append(pool.submit(post, url, sampled))
                replies = [c.result() for c in calls]
            assert bg.server.engine.batch._states, "the steps ran on the static cache"
    assert [r[1]["choices"][0]["text"] for r in replies[:-1]] == want
    assert replies[-1][1]["choices"][0]["text"] == alone
    failed = [str(w.message) for w in record if "CUDA graph capture" in str(w.message)]
    assert not failed, failed


def test_text_prompts_follow_the_tokenizers_add_bos_token(tiny_model, tiny_dir, tmp_path):
    """Text prompts (completions and chat) got BOS whatever the checkpoint's tokenizer_config.json said; with
    add_bos_token false they now get none, as transformers' tokenizer and vLLM encode them (an empty text is
    BOS alone). OpenLLaMA's says true, which the default keeps."""
    import shutil

    from bezoar.eval.decoding import continuation
    from bezoar.model import Tokenizer
    from bezoar.serve import BackgroundServer, Server

    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer(folder)
    assert tok.add_bos is False
    prompt = "Health is a happy"
    want = generate(tiny_model, tok, prompt, max_new_tokens=6, add_bos=False)[0]
    messages = [{"role": "user", "content": "Name a red thing."}]
    with BackgroundServer(Server(tiny_model, tok, "tiny")) as bg:
        status, r = post(bg.url + "/v1/completions", dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0))
        assert status == 200 and r["choices"][0]["text"] == continuation(tok, tok.encode(prompt), want.token_ids)
        assert r["usage"]["prompt_tokens"] == len(tok.encode(prompt, bos=False)) == want.prompt_tokens
        status, r = post(bg.url + "/v1/completions", dict(model="tiny", prompt="", max_tokens=2, temperature=0))
        assert status == 200 and r["usage"]["prompt_tokens"] == 1
        status, r = post(bg.url + "/v1/chat/completions", dict(model="tiny", messages=messages, max_tokens=2))
        assert status == 200 and r["usage"]["prompt_tokens"] == len(tok.encode(chat_prompt(messages), bos=False))
