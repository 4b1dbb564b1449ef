"""Decoding with a KV cache: greedy and temperature/top-p sampling, batched with left padding.

``generate`` takes text and returns text; ``generate_ids`` is the token-level core that the
evaluation harness and the server also use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import LlamaConfig


class KVCache:
    """Preallocated keys and values for every layer, (L, B, max_len, Hk, D), filled left to right."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k/v (B, T, Hk, D) after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax when temperature is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    should_stop=None,
) -> tuple[list[list[int]], list[str]]:
    """Generate for a left-padded batch (B, T). Returns new token ids per row and finish reasons.

    ``should_stop(row, new_ids) -> bool`` lets the caller end a row early (stop strings).
    """
    model_device = model.device
    input_ids = input_ids.to(model_device)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(model_device).long()
    cache = KVCache(model.config, B, T + max_new_tokens, model.dtype, model_device)
    new_ids: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    active = torch.ones(B, dtype=torch.bool, device=model_device)
    logits = model(input_ids, attention_mask=attention_mask, cache=cache)[:, -1]
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        for row in torch.nonzero(active).flatten().tolist():
            tok = int(nxt[row])
            if eos_id is not None and tok == eos_id:
                active[row] = False
                reasons[row] = "stop"
                continue
            new_ids[row].append(tok)
            if should_stop is not None and should_stop(row, new_ids[row]):
                active[row] = False
                reasons[row] = "stop"
        if not bool(active.any()) or len(max(new_ids, key=len)) >= max_new_tokens:
            break
        attention_mask = torch.cat([attention_mask, torch.ones(B, 1, dtype=attention_mask.dtype, device=model_device)], 1)
        logits = model(nxt[:, None], attention_mask=attention_mask, cache=cache)[:, -1]
    return new_ids, reasons


def generate(
    model,
    tokenizer,
    prompts: list[str] | str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    add_bos: bool = True,
    max_prompt_tokens: int | None = None,
) -> list[Generation]:
    """Complete each prompt; text is cut before the first stop string (which is not returned)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    stop = [s for s in (stop or []) if s]
    limit = model.config.max_position_embeddings - max_new_tokens
    if max_prompt_tokens is not None:
        limit = min(limit, max_prompt_tokens)
    if limit <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"{model.config.max_position_embeddings} positions")
    ids, mask = tokenizer.batch(prompts, bos=add_bos, max_length=limit, padding_side="left", truncation_side="left")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    def should_stop(row, new):
        if not stop:
            return False
        text = tokenizer.decode(new)
        return any(s in text for s in stop)

    out_ids, reasons = generate_ids(model, ids, mask, max_new_tokens, temperature, top_p,
                                    eos_id=tokenizer.eos_id, generator=generator, should_stop=should_stop)
    results = []
    for row, new in enumerate(out_ids):
        text = tokenizer.decode(new)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        results.append(Generation(text=text, token_ids=new, finish_reason=reasons[row],
                                  prompt_tokens=int(mask[row].sum())))
    return results
