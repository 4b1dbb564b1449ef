"""The text side of tokens (review of the tokenizer and its templates): added tokens in the server's token
pieces, unk in decode, stop strings split by tokens that add no text, BOS at training as at generation, chat
logprobs cut at a stop string."""

from __future__ import annotations

import pytest

from bezoar.model.tokenizer import Tokenizer
from tests.model.test_decode import _tokenizer_folder

transformers = pytest.importorskip("transformers")

ADDED = {"512": {"content": "<|im_end|>", "special": True}, "513": {"content": "<tool>", "special": False}}


@pytest.fixture
def added_tokenizer(tiny_dir, tmp_path):
    return Tokenizer(_tokenizer_folder(tiny_dir, tmp_path, tok_cfg={"added_tokens_decoder": ADDED}))


def test_token_pieces_of_added_tokens_join_to_the_text(added_tokenizer):
    """token_pieces called sentencepiece's IsControl on an added id (512, 513): IndexError, so a stop string hit
    after one, or any logprobs request holding one, was a 500."""
    from bezoar.eval.decoding import continuation
    from bezoar.serve import token_pieces

    tok = added_tokenizer
    hello, world = tok.encode("hello"), tok.encode(" world")
    for ids in ([513] + hello, hello + [513] + world, hello + [512] + world, [512, 513, 512]):
        pieces = token_pieces(tok, ids)
        assert "".join(pieces) == tok.decode(ids) and len(pieces) == len(ids), ids
        assert [p for t, p in zip(ids, pieces) if t == 512] == [""] * ids.count(512)  # special: no text
        context = tok.encode("Say", bos=True)
        assert "".join(token_pieces(tok, ids, context)) == continuation(tok, context, ids)


def test_decode_drops_unk_as_transformers_skip_special_tokens_does(tiny_dir, tmp_path):
    """Where pad was not unk (pad </s>), unk decoded as sentencepiece's " ⁇ "; transformers drops it."""
    folder = _tokenizer_folder(tiny_dir, tmp_path, tok_cfg={"pad_token": "</s>"})
    ours, theirs = Tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.pad_id != ours.unk_id
    hello, there = ours.encode("hello"), ours.encode("there")
    ids = hello + [ours.unk_id] + there
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == ours.decode(hello + there)
    assert "\u2047" in ours.decode(ids, skip_special=False)


def test_a_stop_string_split_by_tokens_without_text_is_found(tiny_tokenizer):
    """The window was the stop string's bytes + 8 tokens: nine unk (or control) tokens inside "ab" hid it, so the
    row kept streaming past it while the final text was cut."""
    from bezoar.eval.decoding import StopStrings

    tok = tiny_tokenizer
    a, b = tok.encode("xa")[-1:], tok.encode("xb")[-1:]
    assert tok.decode(a + b) == "ab"
    for silent in (tok.unk_id, tok.bos_id):
        for k in (0, 5, 9, 40):
            ids = tok.encode("x") + a + [silent] * k + b
            assert StopStrings(tok, ["ab"])(0, ids), (silent, k)
            assert StopStrings(tok, ["ab"], context=tok.encode("Say", bos=True))(0, ids), (silent, k)
    assert not StopStrings(tok, ["ab"])(0, tok.encode("x") + a + [tok.unk_id] * 9)


def test_training_prompts_follow_add_bos_token_as_generation_does(tiny_dir, tmp_path):
    """encode_prompt_response always put BOS first, while the server, MT-Bench and the harness follow the
    tokenizer's add_bos_token: with it false, training saw [BOS] + prompt and generation the prompt alone."""
    from bezoar.data.encode import encode_prompt_response, encode_sft
    from bezoar.data.formats import SFTExample
    from bezoar.eval.chat import chat_prompt

    def first_document(docs):
        return docs.tokens[docs.doc_offset[0]: docs.doc_offset[0] + docs.doc_length[0]].tolist()

    for add_bos in (True, False):
        tok = Tokenizer(_tokenizer_folder(tiny_dir, tmp_path / str(add_bos), tok_cfg={"add_bos_token": add_bos}))
        prompt = chat_prompt([{"role": "user", "content": "Name a planet."}])
        served = tok.encode(prompt, bos=tok.add_bos)
        (p, r, merged), = encode_prompt_response(tok, [prompt], ["Mars."])
        assert p == served and not merged and tok.decode(r) == "Mars."
        docs, _ = encode_sft([SFTExample(prompt=prompt, response="Mars.")], tok, max_len=512)
        assert first_document(docs)[: len(served)] == served
        # cut to fit: the BOS stays first when there is one, and none comes in when there is not
        docs, _ = encode_sft([SFTExample(prompt=prompt, response="Mars.")], tok, max_len=8, max_prompt_len=4)
        assert (first_document(docs)[0] == tok.bos_id) is add_bos


def test_chat_logprobs_bytes_join_to_the_content_at_a_stop_string(tiny_tokenizer):
    """A stop string starting inside a token: completions cut that token's text, chat kept it whole, so the
    logprobs' bytes joined to 'hello w' for the content 'hello '."""
    from bezoar import serve

    tok = tiny_tokenizer
    server = serve.Server.__new__(serve.Server)
    server.tokenizer = tok
    engine = serve.Engine.__new__(serve.Engine)
    engine.tokenizer = tok
    new = tok.encode("hello world again")
    for stop in (["wor"], ["orld"], ["again"], ["nothing"]):
        job = serve.Job(prompt_ids=[tok.bos_id], max_tokens=10, stop=stop, continues_prompt=False, logprobs=0)
        job.new_ids, job.token_logprobs, job.top_logprobs = list(new), [-1.0] * len(new), [[] for _ in new]
        engine._finish_text(job)
        entries = server._chat_logprobs(job)
        assert bytes(b for e in entries for b in e["bytes"]).decode() == job.text, stop
        assert "".join(e["token"] for e in entries) == job.text, stop
    assert job.text == "hello world again" and not job.stop_hit
    # tokens the content leaves out (unk, BOS) add no bytes: the cut at the stop took real text instead ('hello<unk>
    # w' for 'hello  world ')
    for dropped in (tok.unk_id, tok.bos_id):
        new = tok.encode("hello") + [dropped] + tok.encode(" world again")
        for stop in (["again"], ["nothing"]):
            job = serve.Job(prompt_ids=[tok.bos_id], max_tokens=20, stop=stop, continues_prompt=False, logprobs=0)
            job.new_ids, job.token_logprobs, job.top_logprobs = list(new), [-1.0] * len(new), [[] for _ in new]
            engine._finish_text(job)
            entries = server._chat_logprobs(job)
            assert bytes(b for e in entries for b in e["bytes"]).decode() == job.text, (dropped, stop)
            assert entries[len(tok.encode("hello"))]["token"] == ""
