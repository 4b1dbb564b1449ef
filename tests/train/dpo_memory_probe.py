"""Peak resident memory of one training step, measured in a fresh process (run by test_dpo_memory.py).

    python tests/train/dpo_memory_probe.py MODE      MODE: dpo | dpo_copy | sft

- ``dpo``: bezoar's DPO step, the reference = the same model with its adapters off;
- ``dpo_copy``: the same step, but the reference log-probs come from a deep copy of the model (the
  usual two-model setup), kept alive for the whole step as a trainer would;
- ``sft``: an SFT step (fused CE over the response tokens) on the same batch, for scale.

Prints one JSON line: the resident set after the imports, after the model (and copy) are built, the
lifetime peak, the step's own peak (VmHWM reset just before the step) and the model's bytes.
"""

from __future__ import annotations

import copy
import json
import re
import sys

import torch

from bezoar.data import DocumentSetBuilder
from bezoar.data.packing import BatchLoader
from bezoar.model import LlamaConfig, LlamaForCausalLM
from bezoar.model.lora import LoraConfig, adapters_disabled, apply_lora
from bezoar.train.config import DPOSection
from bezoar.train.dpo import DPOStage, sequence_logprobs
from bezoar.train.sft import SFTStage


def rss_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


def main(mode: str) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = rss_kib()
    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=8, max_position_embeddings=512)
    model = LlamaForCausalLM(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"]))
    model.train()
    reference = None
    if mode == "dpo_copy":
        reference = copy.deepcopy(model)
        for p in reference.parameters():
            p.requires_grad_(False)

    g = torch.Generator().manual_seed(1)
    builder = DocumentSetBuilder()
    for i in range(4):
        prompt = torch.randint(3, config.vocab_size, (12,), generator=g).tolist()
        docs = [(prompt + torch.randint(3, config.vocab_size, (n,), generator=g).tolist(), len(prompt))
                for n in (10 + i, 6 + i)]
        builder.add_item(docs, example=i)
    batch = BatchLoader(builder.build(), 128, 1, shuffle=False).batch(0, 0)

    after_model = rss_kib()
    lifetime_before_step = rss_kib("VmHWM")
    can_reset = reset_peak()
    before_step = rss_kib()
    if mode == "sft":
        loss, _ = SFTStage().loss(model, batch)
    else:
        stage = DPOStage(DPOSection())
        if reference is not None:
            with torch.no_grad(), adapters_disabled(reference):
                batch["ref_logps"] = sequence_logprobs(reference, batch)
        loss, _ = stage.loss(model, batch)
    loss.backward()
    step_peak = rss_kib("VmHWM")
    return {"mode": mode, "base_kib": base, "after_model_kib": after_model, "before_step_kib": before_step,
            "step_peak_kib": step_peak, "peak_kib": max(step_peak, lifetime_before_step),
            "model_kib": model_bytes // 1024, "peak_reset": can_reset, "tokens": int(batch["num_tokens"])}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
