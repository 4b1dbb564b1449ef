"""KV-cache decoding: equal to decoding without a cache and to transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

from bezoar.model import Tokenizer, generate, generate_ids, load
from bezoar.model.decode import sample_next, sampling_probs

transformers = pytest.importorskip("transformers")


def greedy_without_cache(model, ids, steps, eos_id=None):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(ids)[0, -1].argmax())
            if nxt == eos_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


@pytest.mark.parametrize("which", ["tiny", "tiny-odd"])
def test_cache_equals_no_cache_and_transformers(which, tiny_dir, tiny_odd_dir):
    folder = tiny_dir if which == "tiny" else tiny_odd_dir
    model = load(folder)
    tok = Tokenizer(folder)
    prompts = ["The small cat reads the", "What is 12 plus 7? The answer is", "Q:"]
    ids, mask = tok.batch(prompts, bos=True, padding_side="left")
    steps = 12
    new, reasons = generate_ids(model, ids, mask, max_new_tokens=steps, eos_id=None)
    for row, prompt in enumerate(prompts):
        alone = torch.tensor([tok.encode(prompt, bos=True)])
        assert new[row] == greedy_without_cache(model, alone, steps), f"row {row}"
        assert reasons[row] == "length"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                          eos_token_id=None, pad_token_id=tok.pad_id)
    assert out[:, ids.shape[1]:].tolist() == new


def test_generate_text_stop_strings_and_eos(tiny_dir):
    model = load(tiny_dir)
    tok = Tokenizer(tiny_dir)
    free = generate(model, tok, "The red fox", max_new_tokens=20)[0]
    assert free.text and free.finish_reason in ("length", "stop")
    # Stop at the first occurrence of a piece of the free-running text.
    stop = free.text[3:6]
    assert stop.strip(), "need a non-blank stop string"
    cut = generate(model, tok, "The red fox", max_new_tokens=20, stop=[stop])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert stop not in cut.text


def test_sampling_is_seeded_and_top_p_restricts(tiny_dir):
    model = load(tiny_dir)
    tok = Tokenizer(tiny_dir)
    a = generate(model, tok, ["Once", "Twice"], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, tok, ["Once", "Twice"], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, 0.5, g)) for _ in range(200)}
    assert picks == {0}, "top_p=0.5 keeps only the most likely token here (p=0.73)"
    picks = {int(sample_next(logits, 1.0, 0.95, g)) for _ in range(400)}
    assert picks == {0, 1}


def test_top_k_draws_only_among_the_k_largest_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 64) * 3
    allowed = logits.topk(5, dim=-1).indices
    g = torch.Generator().manual_seed(1)
    seen = [set() for _ in range(4)]
    for _ in range(500):
        picks = sample_next(logits, 1.5, 1.0, g, top_k=5)
        for row, tok in enumerate(picks.tolist()):
            assert tok in allowed[row].tolist(), f"row {row} drew {tok}, outside its 5 largest logits"
            seen[row].add(tok)
    assert all(len(s) > 1 for s in seen), "at temperature 1.5 more than one of the five is drawn"
    for temperature in (0.1, 1.0, 5.0):  # top_k=1 is argmax at any temperature
        for _ in range(20):
            assert torch.equal(sample_next(logits, temperature, 1.0, g, top_k=1), logits.argmax(-1))
    for off in (0, 64, 1000):  # 0, or at least the vocabulary: no filter, the same draws as without top_k
        a = sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(2), top_k=off)
        assert torch.equal(a, sample_next(logits, 1.0, 0.9, torch.Generator().manual_seed(2)))


def _transformers_probs(logits, temperature, top_k, top_p):
    """softmax after the warpers transformers' generate(do_sample=True) builds, in its order
    (generation/utils.py _get_logits_processor: temperature, top-k, top-p)."""
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.softmax(warpers(ids, logits.float().clone()), dim=-1)


TIES = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.5, -1.0, 2.0],
                     [0.0, 1.0, 1.0, 4.0, 1.0, 1.0, -2.0, 0.5]])


@pytest.mark.parametrize("temperature,top_k,top_p,logits", [
    (0.7, 50, 1.0, None),  # MT-Bench's writing setting: FastChat's generate with transformers' default top_k
    (1.3, 10, 0.8, None),  # both filters: top-p renormalises over the ten top-k kept
    (0.1, 50, 1.0, None),
    (1.0, 0, 0.9, None),  # top-p alone, as before
    (0.8, 300, 0.95, None),  # top_k above the vocabulary: off
    (1.0, 2, 1.0, TIES),  # the k-th largest is tied: every token equal to it stays
    (0.5, 3, 0.999, TIES),  # ties at the k-th value, then top-p, which keeps the whole tied group
    (0.5, 3, 0.6, TIES),  # ... or drops all of it
])
def test_sampling_probs_equal_transformers_warpers(temperature, top_k, top_p, logits):
    if logits is None:
        logits = torch.randn(3, 256, generator=torch.Generator().manual_seed(top_k)) * 4
    want = _transformers_probs(logits, temperature, top_k, top_p)
    got = sampling_probs(logits, temperature, top_p, top_k)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert torch.equal(got > 0, want > 0), "the same tokens kept"
    if logits is TIES:  # row 0: 3.0 and four 2.0s kept; row 1: 4.0 and four 1.0s (top-p at 0.6: the top one)
        assert (got > 0).sum(-1).tolist() == ([1, 1] if top_p == 0.6 else [5, 5])
    elif 0 < top_k < logits.shape[-1]:
        assert ((got > 0).sum(-1) <= top_k).all()


def test_top_p_keeps_the_tokens_transformers_keeps_at_the_cut():
    """The kept set was decided on the mass above each token, summed from the top in float32: at top_p 0.99 over a
    32,000-token vocabulary it kept one token more or less than transformers in 61 of 200 rows, and of tokens tied
    across the cut (common in bf16) it kept the other ones (the lowest indices, transformers the highest)."""
    g = torch.Generator().manual_seed(11)
    distinct = torch.randn(200, 32000, generator=g) * 3
    tied = (torch.randn(200, 32000, generator=g) * 3).bfloat16().float()  # runs of equal logits
    for logits, temperature, top_k, top_p in ((distinct, 1.0, 0, 0.99), (distinct, 0.7, 0, 0.95),
                                              (tied, 0.7, 50, 0.9), (tied, 1.0, 0, 0.5)):
        want = _transformers_probs(logits, temperature, top_k, top_p)
        got = sampling_probs(logits, temperature, top_p, top_k)
        assert torch.equal(got > 0, want > 0), (temperature, top_k, top_p)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    quarter = torch.zeros(1, 4)
    assert (sampling_probs(quarter, 1.0, 0.5) > 0).tolist() == (_transformers_probs(quarter, 1.0, 0, 0.5) > 0).tolist()


def _weights_before(logits, temperature, top_k):
    """top-k sampling weights as bezoar (and transformers' warpers) computed them without the overflow rule."""
    scores = logits.float() / temperature
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)


def test_a_vanishing_temperature_keeps_the_largest_logits_instead_of_nan():
    """temperature=1e-40 overflowed logit / temperature to inf and the softmax to NaN (and multinomial then
    raised); such a row keeps its largest logits, ties sharing, and rows that do not overflow are unchanged."""
    from bezoar.model.decode import _sampling_weights as _weights

    logits = torch.cat([TIES, torch.randn(2, 8, generator=torch.Generator().manual_seed(3))])
    logits[3, 5] = float("-inf")  # a masked token stays out
    for temperature in (1e-40, 1e-38, 1e-30, 1e-46, 1e-300):  # the last two are 0 in float32
        got = sampling_probs(logits, temperature)
        assert torch.isfinite(got).all(), temperature
        want = (logits == logits.amax(-1, keepdim=True)).float()
        torch.testing.assert_close(got, want / want.sum(-1, keepdim=True), atol=0, rtol=0)
        assert torch.equal(sample_next(logits, temperature, 1.0, torch.Generator().manual_seed(0))[2:],
                           logits[2:].argmax(-1))
        assert sample_next(TIES, temperature, 1.0, torch.Generator().manual_seed(0)).tolist()[0] == 0
    # One row that overflows beside one that does not (small logits): the second is scaled as before.
    mixed = torch.stack([logits[2] * 1e4, torch.tensor([1e-38, 2e-38, 0.0, -1e-38, 0.0, 0.0, 0.0, 0.0])])
    got = sampling_probs(mixed, 1e-35)
    assert got[0].tolist() == (mixed[0] == mixed[0].max()).float().tolist()
    assert torch.equal(_weights(mixed, 1e-35, 1.0, 0)[1], torch.softmax(mixed[1] / 1e-35, -1))
    # Every logit of a row far below 0: at 1e-40 all of them fell to -inf (NaN softmax); the largest stays.
    low = torch.tensor([[-5.0, -3.0, -4.0, -3.0]])
    assert sampling_probs(low, 1e-40).tolist() == [[0.0, 0.5, 0.0, 0.5]]
    # A mask of float32's lowest value, which only falls to -inf at temperatures below 1: the row is scaled as
    # before (the mask out of the draw), not through the shift, which could round other logits into ties.
    masked = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    masked[:, :4] = torch.finfo(torch.float32).min
    for temperature in (0.7, 0.3):
        assert torch.equal(_weights(masked, temperature, 1.0, 2), _weights_before(masked, temperature, 2))
    # Temperatures that overflow nothing weigh the tokens bit for bit as before (logits / temperature).
    for temperature in (0.7, 1e-3):
        assert torch.equal(_weights(logits, temperature, 1.0, 0), torch.softmax(logits / temperature, -1))


@pytest.mark.parametrize("bad", [-1, 2.0, "5", True, None])
def test_top_k_must_be_a_non_negative_integer(bad, tiny_dir):
    logits = torch.randn(1, 8)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, 1.0, 1.0, top_k=bad)
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, 0.0, 1.0, top_k=bad)  # greedy too: a bad setting is an error wherever it is given
    model = load(tiny_dir)
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="top_k"):
        generate_ids(model, ids, max_new_tokens=2, temperature=1.0, top_k=bad, decode="eager")


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_right_padded_batch_is_refused_and_a_left_padded_one_decodes_each_row_as_alone(tiny_dir, decode):
    """A right-padded batch (Tokenizer.batch(padding_side="right")) decoded its short row on from its pad
    tokens, without a word; transformers warns. It is now an error naming the row."""
    from bezoar.model import Tokenizer

    model, tok = load(tiny_dir), Tokenizer(tiny_dir)
    prompts = ["What is 12 plus 7? The answer is", "Q:"]
    ids, mask = tok.batch(prompts, bos=True, padding_side="right")
    with pytest.raises(ValueError, match=r"row 1 of attention_mask has padding after its tokens.*left-padded"):
        generate_ids(model, ids, mask, max_new_tokens=4, decode=decode)
    ids, mask = tok.batch(prompts, bos=True, padding_side="left")
    batch, _ = generate_ids(model, ids, mask, max_new_tokens=4, decode=decode)
    alone, _ = generate_ids(model, torch.tensor([tok.encode(prompts[1], bos=True)]), max_new_tokens=4, decode=decode)
    assert batch[1] == alone[0]


def test_tokenizer_matches_transformers(tiny_dir):
    ours = Tokenizer(tiny_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    # transformers 5's Llama tokenizer drops one leading space of the text (' one' -> '▁one') where
    # sentencepiece keeps it; bezoar follows sentencepiece, so texts here start without a space.
    for text in ["Hello world", "### Instruction:\nWhat is 12 plus 7?\n\n### Response:\n19", "two  spaces\t x",
                 "émigré café ☕", "\n\nHuman: hi\n\nAssistant: hello", "a\n\n  b"]:
        assert ours.encode(text, bos=True) == theirs(text).input_ids, text
        assert ours.decode(ours.encode(text)) == text
    ids, mask = ours.batch(["a", "a b c d"], bos=True, eos=True)
    assert mask.tolist()[0][:3] == [0, 0, 0] and ids[0, -1] == ours.eos_id and ids[0, -3] == ours.bos_id
    # Truncation cuts the text and keeps BOS, as transformers does (the BOS was cut off before, so a prompt
    # generate() cut to the context ran without one).
    ids, mask = ours.batch(["a b c d e f"], max_length=3, truncation_side="left")
    theirs.truncation_side = "left"
    want = theirs("a b c d e f", truncation=True, max_length=3).input_ids
    assert ids.shape == (1, 3) and ids[0].tolist() == want == [ours.bos_id] + ours.encode("a b c d e f")[-2:]
    ids, _ = ours.batch(["a b c d e f"], max_length=3, truncation_side="right", eos=True)
    assert ids[0].tolist() == [ours.bos_id] + ours.encode("a b c d e f")[:1] + [ours.eos_id]


def _tokenizer_folder(tiny_dir, tmp_path, config=None, tok_cfg=None):
    import json
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(tiny_dir, folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, **config}))
    if tok_cfg is not None:
        path = folder / "tokenizer_config.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **tok_cfg}))
    return folder


def test_added_tokens_are_known_by_id_and_name_the_eos(tiny_dir, tmp_path):
    """A chat model's EOS added beyond sentencepiece (<|im_end|> at 512) was dropped without a word (eos stayed
    </s>, so generation did not stop at it), and decoding its id raised IndexError."""
    added = {"512": {"content": "<|im_end|>", "special": True}, "513": {"content": "<tool>", "special": False}}
    folder = _tokenizer_folder(tiny_dir, tmp_path, config={"eos_token_id": 512},
                               tok_cfg={"added_tokens_decoder": added, "eos_token": "<|im_end|>"})
    tok = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.eos_id == 512 == theirs.eos_token_id
    ids = tok.encode("Hello world")
    assert tok.decode(ids + [512]) == "Hello world"  # special: dropped, as generation output shows it
    assert tok.decode(ids + [513] + ids) == theirs.decode(ids + [513] + ids, skip_special_tokens=True)
    assert tok.decode(ids + [700]) == "Hello world"  # an id past every token (a padded vocabulary)
    assert tok.decode([512], skip_special=False) == "<|im_end|>"


@pytest.mark.parametrize("config, tok_cfg, match", [
    ({"eos_token_id": 900}, None, r"config.json: eos_token_id = 900 is beyond the tokenizer's 512 pieces"),
    (None, {"eos_token": "<|im_end|>"}, r"eos_token '<\|im_end\|>' .* is neither a sentencepiece piece nor an added"),
])
def test_an_eos_the_tokenizer_does_not_have_is_an_error_naming_the_key(tiny_dir, tmp_path, config, tok_cfg, match):
    from bezoar.model.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=match):
        Tokenizer(_tokenizer_folder(tiny_dir, tmp_path, config=config, tok_cfg=tok_cfg))


def test_tokenizer_settings_that_loaded_before_still_load(tiny_dir, tmp_path):
    """A pad id beyond the pieces (a vocabulary resized for [PAD], the base's tokenizer files) and an empty
    bos_token loaded before and load now; tokens only in added_tokens.json decode as text, as transformers
    reads them (not special); the serving and harness helpers read added tokens by id."""
    import json

    from bezoar.serve import token_bytes, token_text

    folder = _tokenizer_folder(tiny_dir, tmp_path, config={"pad_token_id": 600}, tok_cfg={"bos_token": ""})
    (folder / "added_tokens.json").write_text(json.dumps({"<tool>": 512, "<|im_end|>": 513}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": ["<|im_end|>"]}))
    tok = Tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    assert (tok.bos_id, tok.pad_id, tok.id_count) == (1, tok.unk_id, 514)
    ids = tok.encode("Hello world")
    for extra in ([512], [513], [512, 513]):
        assert tok.decode(ids + extra + ids) == theirs.decode(ids + extra + ids, skip_special_tokens=True), extra
    assert token_text(tok, 512) == "<tool>" and token_bytes(tok, 513) == list(b"<|im_end|>")
    assert tok.piece(513) == "<|im_end|>" and tok.piece(900) == ""


def test_every_eos_the_checkpoint_lists_ends_a_generation(tiny_dir, tmp_path):
    """config.json / generation_config.json listing [</s>, X] (a chat model's two ends): transformers' generate stops
    at either, bezoar stopped only at the first and ran on to max_new_tokens. Here X is the 5th greedy token."""
    import json

    import bezoar.model as bm
    from bezoar.model.decode import ContinuousBatch, Sequence

    prompt = "The quick brown fox"
    first = bm.generate(bm.load(tiny_dir, device="cpu"), Tokenizer(tiny_dir), prompt, max_new_tokens=12)[0]
    x = first.token_ids[4]
    assert x not in first.token_ids[:4] and x != 2
    folder = _tokenizer_folder(tiny_dir, tmp_path, config={"eos_token_id": [2, x]})
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [2, x]}))
    tok, model = Tokenizer(folder), bm.load(folder, device="cpu")
    assert tok.eos_id == 2 and tok.eos_ids == (2, x)
    ours = bm.generate(model, tok, prompt, max_new_tokens=12)[0]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    theirs = hf.generate(input_ids=ids, max_new_tokens=12, do_sample=False, top_k=None, top_p=None, temperature=None)
    assert theirs[0, ids.shape[1]:].tolist() == first.token_ids[:5]  # transformers: stopped at x, kept
    assert ours.token_ids == first.token_ids[:4] and ours.finish_reason == "stop"  # bezoar: ended, x not kept
    batch = ContinuousBatch(model, 2, "eager", eos_id=tok.eos_ids, pad_id=tok.pad_id)
    done = []
    batch.admit([Sequence(prompt_ids=ids[0].tolist(), max_new_tokens=12, on_done=done.append)])
    while batch.running:
        batch.step()
    assert done[0].new_ids == first.token_ids[:4] and done[0].finish == "eos"
