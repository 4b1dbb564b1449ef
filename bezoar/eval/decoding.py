"""Small decoding helpers shared by the lm-eval model and the server: stop strings and left padding."""

from __future__ import annotations

import torch


class StopStrings:
    """``should_stop(row, new_ids)`` for ``generate_ids``: true once the decoded tail of a row's
    new tokens contains a stop string. Only the last few tokens are decoded each step: enough to
    hold the longest stop string even at one byte per token (byte-fallback pieces), plus a margin."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 8

    def __call__(self, row: int, new_ids: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(new_ids[-self.window:])
        return any(s in text for s in self.stop)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask
