"""bezoar's forward pass against transformers' LlamaForCausalLM on the same random checkpoints."""

from __future__ import annotations

import pytest
import torch

from bezoar.model import load
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")


def hf_model(folder, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").eval()


@pytest.fixture(params=["tiny", "tiny-odd"])
def folder(request, tiny_dir, tiny_odd_dir):
    return tiny_dir if request.param == "tiny" else tiny_odd_dir


def left_padded_batch(vocab, lengths, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    return ids, mask


def test_logits_match_transformers_with_left_padding(folder):
    ours, theirs = load(folder), hf_model(folder)
    ids, mask = left_padded_batch(ours.config.vocab_size, [23, 17, 6], 23)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = theirs(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert_close(got[real], want[real], atol=1e-4, rtol=0, name="logits")


def test_left_padded_row_equals_unpadded_row(tiny_dir):
    model = load(tiny_dir)
    ids, mask = left_padded_batch(model.config.vocab_size, [23, 9], 23)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        alone = model(ids[1:, -9:])
    assert_close(batch[1, -9:], alone[0], atol=1e-5, rtol=0, name="padded row")


def test_logits_match_transformers_with_restarted_positions(folder):
    ours, theirs = load(folder), hf_model(folder)
    ids = torch.randint(3, ours.config.vocab_size, (2, 19))
    pos = torch.tensor([list(range(7)) + list(range(12)), list(range(4)) + list(range(5)) + list(range(10))])
    with torch.no_grad():
        got = ours(ids, position_ids=pos)
        want = theirs(ids, position_ids=pos).logits
    assert_close(got, want, atol=1e-4, rtol=0, name="logits")


def test_doc_ids_isolate_documents(tiny_odd_dir):
    """A packed row with restarted positions and doc ids equals each document run alone."""
    model = load(tiny_odd_dir)
    lens = [5, 1, 9, 4]
    docs = [torch.randint(3, 500, (n,)) for n in lens]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos, doc_ids=doc_ids)[0]
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            assert_close(packed[start:start + len(d)], alone, atol=1e-5, rtol=0, name="document")
            start += len(d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_close_to_fp32(tiny_dir, dtype):
    ref = load(tiny_dir)
    half = load(tiny_dir, dtype=dtype)
    assert half.dtype == dtype
    ids = torch.randint(3, 512, (2, 16))
    with torch.no_grad():
        a = ref(ids)
        b = half(ids)
    assert b.dtype == dtype
    assert torch.isfinite(b).all()
    assert_close(b.float(), a, atol=3e-2, rtol=3e-2, name=f"{dtype} logits")


def test_saved_checkpoint_loads_in_transformers(folder, tmp_path):
    from bezoar.model import save

    model = load(folder)
    out = save(model, tmp_path / "saved", max_shard_size=20_000)  # force several shards
    assert (out / "model.safetensors.index.json").exists()
    theirs = hf_model(out)
    again = load(out)
    ids = torch.randint(3, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        want = model(ids)
        assert_close(theirs(ids).logits, want, atol=1e-4, rtol=0, name="transformers on our save")
        assert_close(again(ids), want, atol=0, rtol=0, name="bezoar on our save")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("a red cat").input_ids[0] == model.config.bos_token_id


def test_bf16_save_keeps_dtype(tiny_dir, tmp_path):
    from bezoar.model import save

    out = save(load(tiny_dir), tmp_path / "bf16", dtype="bfloat16")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert theirs.dtype == torch.bfloat16
    assert load(out, device="cpu", dtype=None).dtype == torch.float32  # CPU default stays fp32
