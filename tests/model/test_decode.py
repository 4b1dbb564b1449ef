"""KV-cache decoding: equal to decoding without a cache and to transformers' greedy generate."""

from __future__ import annotations

import pytest
import torch

from bezoar.model import Tokenizer, generate, generate_ids, load
from bezoar.model.decode import sample_next

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
    ids, mask = ours.batch(["a b c d e f"], max_length=3, truncation_side="left")
    assert ids.shape == (1, 3) and ids[0].tolist() == ours.encode("a b c d e f", bos=True)[-3:]
