"""Helpers for the DPO tests: synthetic preference data, a policy with live adapters, and the direct
(textbook) implementation the stage is checked against."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bezoar.data import DataConfig, PromptTemplate, build_documents, make_loader
from bezoar.model import Tokenizer, load
from bezoar.model.lora import LoraConfig, apply_lora, lora_modules

@pytest.fixture(autouse=True)
def single_thread():
    """Tiny-model steps run faster on one thread, and a shared 2-core machine makes two threads spin
    against each other (a DPO convergence test measured 10 s on one thread, 67 s on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WORDS = ["red", "blue", "green", "owl", "dog", "fish", "city", "road", "lamp", "tree", "bear", "river"]


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` pairs "Repeat after me: a b c" -> chosen "a b c", rejected the words in another order or one
    short, so chosen and rejected differ in length and content."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rejected = list(reversed(words)) if i % 2 else words[:-1]
        lines.append(json.dumps({"prompt": f"Repeat after me: {' '.join(words)}", "chosen": " ".join(words),
                                 "rejected": " ".join(rejected)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def data_config(path: Path, max_seq_len: int = 128, packed: bool = True) -> DataConfig:
    return DataConfig(path=str(path), format="pairs", max_seq_len=max_seq_len, packed=packed,
                      template=PromptTemplate(system="You are a helpful assistant."))


def documents(path: Path, tokenizer: Tokenizer, **kw):
    cfg = data_config(path, **kw)
    docs, _ = build_documents(cfg, tokenizer)
    return docs, cfg


def one_batch(docs, cfg, tokenizer, rows: int) -> dict:
    """Every pair in one batch, in data order: ``rows`` packed rows, or more where the pairs need them
    (the tiny tokenizer's pieces, and so the lengths, differ a little between sentencepiece versions)."""
    for size in range(rows, 4 * rows + 1):
        loader = make_loader(docs, cfg, tokenizer, batch_size=size, shuffle=False)
        if len(loader) == 1:
            return loader.batch(0, 0)
    raise AssertionError(f"the pairs do not fit one batch of up to {4 * rows} rows")


def policy(folder: Path, seed: int = 1, targets=("q_proj", "v_proj", "down_proj"), r: int = 4,
           quant: str | None = None) -> torch.nn.Module:
    """The tiny model with LoRA adapters whose B is non-zero, so the policy differs from the reference;
    A and B come from ``seed`` alone (two calls give equal models)."""
    model = load(folder, device="cpu", quant=quant)
    apply_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=0.0, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(0.1 * torch.randn(m.lora_A.weight.shape, generator=g))
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))
    model.train()
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def zero_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


# ---- the direct implementation: one forward per side, full logits, explicit log-softmax ----------------


def direct_sequence_logps(model, docs, doc_indices: list[int]) -> torch.Tensor:
    """Sum over response tokens of log softmax(full logits) for each document, one padded forward."""
    seqs = [torch.as_tensor(docs.doc_tokens(d), dtype=torch.long) for d in doc_indices]
    masks = [torch.as_tensor(docs.loss_mask[docs.doc_offset[d]: docs.doc_offset[d] + docs.doc_length[d]])
             for d in doc_indices]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attention = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        attention[i, : len(s)] = 1
    logits = model(input_ids, attention_mask=attention)  # (B, T, V), right padding
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = []
    for i, (s, m) in enumerate(zip(seqs, masks)):
        t = torch.nonzero(m).squeeze(-1)  # response positions (never 0)
        out.append(logprobs[i, t - 1, s[t]].sum())
    return torch.stack(out)


def textbook_loss(pc, pr, rc, rr, beta: float, kind: str, eps: float) -> torch.Tensor:
    """Per-pair losses written straight from the papers (see bezoar.train.dpo)."""
    z = beta * ((pc - rc) - (pr - rr))
    if kind == "sigmoid":
        return -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z))
    if kind == "ipo":
        return (z / beta - 1 / (2 * beta)) ** 2
    if kind == "hinge":
        return torch.clamp(1 - z, min=0)
    if kind == "robust":
        return ((1 - eps) * -torch.log(torch.sigmoid(z)) + eps * torch.log(torch.sigmoid(-z))) / (1 - 2 * eps)
    raise ValueError(kind)


def direct_dpo(policy_model, reference_model, docs, beta: float, kind: str, eps: float):
    """Loss sum over all pairs of ``docs``: two forwards of the policy (chosen, rejected), two of a
    separately loaded reference model without adapters."""
    chosen = [d for d in range(docs.num_docs) if docs.doc_part[d] == 0]
    rejected = [d for d in range(docs.num_docs) if docs.doc_part[d] == 1]
    pc = direct_sequence_logps(policy_model, docs, chosen)
    pr = direct_sequence_logps(policy_model, docs, rejected)
    with torch.no_grad():
        rc = direct_sequence_logps(reference_model, docs, chosen)
        rr = direct_sequence_logps(reference_model, docs, rejected)
    return textbook_loss(pc, pr, rc, rr, beta, kind, eps).sum(), (pc, pr, rc, rr)
