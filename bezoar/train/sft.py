"""Supervised fine-tuning: the summed next-token cross-entropy over response tokens.

The loss runs through the fused linear + cross-entropy kernel on the hidden states of the
positions that have a target only, so the (tokens x vocab) logits never exist at once.
"""

from __future__ import annotations

import torch

from bezoar.data.packing import IGNORE_INDEX, next_token_labels
from bezoar_kernels.cross_entropy import linear_cross_entropy


class SFTStage:
    def units(self, batch) -> float:
        return float(batch["num_loss_tokens"])

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"])

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inner = getattr(model, "module", model)
        hidden = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                       return_hidden=True)
        targets = next_token_labels(batch["labels"])
        keep = targets != IGNORE_INDEX
        loss_sum = linear_cross_entropy(hidden[keep], inner.lm_head.weight, targets[keep], reduction="sum")
        return loss_sum, {}
