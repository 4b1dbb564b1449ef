"""A packed batch through the real model gives the loss, gradients and per-document log-probs of
its examples run one by one: position restarts and doc_ids leave no cross-document leak."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bezoar.data import (DOC_EXAMPLE, DOC_PART, IGNORE_INDEX, BatchLoader, PairExample, PromptTemplate, SFTExample,
                         encode_pairs, encode_sft, next_token_labels, per_document_sum)
from tests.utils import assert_close

TEMPLATE = PromptTemplate(system="You are a helpful assistant.")
QUESTIONS = ["What color is the owl?", "Repeat after me: lamp river cat", "Who builds the bridge?",
             "Swap the words: red owl", "Tell me the color of the bear.", "What is 7 plus 45?"]
ANSWERS = ["The owl is golden.", "lamp river cat", "Grace builds the bridge.", "owl red", "The bear is pink.",
           "The answer is 52."]


@pytest.fixture(scope="module")
def model(tiny_folder):
    from bezoar.model import load

    torch.manual_seed(0)
    m = load(tiny_folder, device="cpu", dtype=torch.float32)
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def token_logprobs(model, input_ids, position_ids=None, doc_ids=None):
    """log p(next token) at every position, (B, T), and the next-token targets."""
    logits = model(input_ids, position_ids=position_ids, doc_ids=doc_ids).float()
    return F.log_softmax(logits, dim=-1)


def test_packed_sft_loss_and_grads_equal_one_by_one(model, tokenizer):
    examples = [SFTExample(TEMPLATE.render(q), a) for q, a in zip(QUESTIONS, ANSWERS)]
    docs, _ = encode_sft(examples, tokenizer, 128)
    loader = BatchLoader(docs, 256, batch_size=2, shuffle=False, pad_id=tokenizer.pad_id)
    assert loader.num_rows == 2  # six documents in two rows: they really are packed
    batch = next(iter(loader))
    assert len(batch["doc_table"]) == len(examples)

    model.zero_grad()
    targets = next_token_labels(batch["labels"])
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"])
    packed = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    packed.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    single = torch.zeros((), dtype=torch.float64)
    for d in range(docs.num_docs):
        ids = torch.from_numpy(docs.doc_tokens(d).astype("int64"))[None]
        mask = torch.from_numpy(docs.loss_mask[docs.doc_offset[d]: docs.doc_offset[d] + docs.doc_length[d]])[None]
        labels = torch.where(mask, ids, torch.full_like(ids, IGNORE_INDEX))
        loss = F.cross_entropy(model(ids).flatten(0, 1), next_token_labels(labels).flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        single += loss.detach().double()
    assert batch["num_loss_tokens"] == int((targets != IGNORE_INDEX).sum()) > 0
    assert abs(packed.item() - single.item()) <= 1e-5 * abs(single.item())
    for n, p in model.named_parameters():
        assert_close(packed_grads[n], p.grad, atol=1e-6, rtol=1e-4, name=n)


def test_packed_pairs_per_document_logps_equal_separate_forwards(model, tokenizer):
    pairs = [PairExample(TEMPLATE.render(q), a, a[::-1]) for q, a in zip(QUESTIONS[:4], ANSWERS[:4])]
    docs, _ = encode_pairs(pairs, tokenizer, 96)
    batch = next(iter(BatchLoader(docs, 256, batch_size=2, shuffle=False, pad_id=tokenizer.pad_id)))
    table = batch["doc_table"]
    assert len(table) == 2 * len(pairs)
    with torch.no_grad():
        logp = token_logprobs(model, batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        targets = next_token_labels(batch["labels"])
        mask = targets != IGNORE_INDEX
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        per_doc = per_document_sum(picked, batch["doc_ids"], len(table), mask)
        for k in range(len(table)):
            example, part = int(table[k, DOC_EXAMPLE]), int(table[k, DOC_PART])
            d = int(docs.item_doc_offset[example]) + part
            ids = torch.from_numpy(docs.doc_tokens(d).astype("int64"))[None]
            m = torch.from_numpy(docs.loss_mask[docs.doc_offset[d]: docs.doc_offset[d] + docs.doc_length[d]])
            lp = token_logprobs(model, ids)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            want = lp[m[1:]].sum()
            assert abs(per_doc[k].item() - want.item()) <= 1e-5 * abs(want.item()), (example, part)
