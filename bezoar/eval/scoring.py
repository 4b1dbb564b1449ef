"""Log-probabilities of given tokens under a bezoar model: the shared core of the lm-eval model
(``loglikelihood``) and of the server (``echo`` + ``logprobs``).

For a token sequence ``seq`` the model reads ``seq[:-1]`` and the hidden state at position ``j``
predicts ``seq[j + 1]``. ``iter_logprobs`` runs many such inputs in right-padded batches (one
forward per batch, longest first) and yields, row by row, ``log_softmax`` over the vocabulary at
the positions the caller asked for, in float32. Right padding needs no attention mask: a causal
model never lets a real token see the padding that follows it.

Only the asked-for positions go through the LM head, so scoring a one-token answer after a
2,000-token context costs one (1, vocab) row of logits, not (2000, vocab).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch


@dataclass
class RowLogprobs:
    """``logprobs[k]`` is the distribution predicted at input position ``start + k``, (n - start, V)."""

    index: int
    start: int
    logprobs: torch.Tensor


def plan_batches(lengths: Sequence[int], batch_size: int | None, max_batch_tokens: int | None) -> list[list[int]]:
    """Indices grouped into batches, longest first. A batch holds at most ``batch_size`` rows and,
    when ``max_batch_tokens`` is set, at most that many padded tokens (at least one row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first row is the widest
        full_rows = batch_size is not None and len(current) >= batch_size
        full_tokens = max_batch_tokens is not None and current and (len(current) + 1) * width > max_batch_tokens
        if current and (full_rows or full_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def iter_logprobs(
    model,
    inputs: Sequence[Sequence[int]],
    starts: Sequence[int],
    pad_id: int,
    batch_size: int | None = 8,
    max_batch_tokens: int | None = None,
    head_chunk: int = 2048,
) -> Iterator[RowLogprobs]:
    """Yield the log-softmax at positions ``starts[i]:len(inputs[i])`` of every input row.

    Rows come out batch by batch in the order of ``plan_batches`` (longest first); each carries its
    index into ``inputs``. ``head_chunk`` bounds how many positions go through the LM head at once.
    """
    if len(inputs) != len(starts):
        raise ValueError(f"{len(inputs)} inputs but {len(starts)} start positions")
    lengths = [len(x) for x in inputs]
    for i, (n, s) in enumerate(zip(lengths, starts)):
        if n == 0 or not 0 <= s < n:
            raise ValueError(f"row {i}: start {s} is outside an input of {n} tokens")
    device = model.device
    for batch in plan_batches(lengths, batch_size, max_batch_tokens):
        width = lengths[batch[0]]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        for r, i in enumerate(batch):
            ids[r, : lengths[i]] = torch.as_tensor(inputs[i], dtype=torch.long)
        hidden = model.hidden_states(ids.to(device))  # (B, T, C)
        for r, i in enumerate(batch):
            h = hidden[r, starts[i]: lengths[i]]  # (k, C)
            pieces = [torch.log_softmax(model.lm_head(h[a: a + head_chunk]).float(), dim=-1)
                      for a in range(0, h.shape[0], head_chunk)]
            yield RowLogprobs(i, starts[i], pieces[0] if len(pieces) == 1 else torch.cat(pieces))
        del hidden


def target_logprobs(row: RowLogprobs, targets: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of each target token at the row's last ``len(targets)`` positions and
    whether each one is the argmax there. Returns (logprobs (k,), is_argmax (k,)) on the CPU."""
    k = len(targets)
    lp = row.logprobs[row.logprobs.shape[0] - k:]
    t = torch.as_tensor(list(targets), dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, t[:, None]).squeeze(1)
    greedy = lp.argmax(-1) == t
    return chosen.cpu(), greedy.cpu()
