"""The embedded demo: `python -m bezoar.train` with no config runs SFT then DPO on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bezoar.fingerprint import fingerprint
from bezoar.model import Tokenizer, generate, load
from tests.train.helpers import read_metrics, run_cli


def tenth_means(values):
    n = max(1, len(values) // 10)
    return sum(values[:n]) / n, sum(values[-n:]) / n


def test_demo_learns_and_its_adapters_load(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("--out", out, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out.resolve()) in r.stdout, "the demo must say where its output went"

    sft = [m["loss"] for m in read_metrics(out / "sft") if "loss" in m]
    first, last = tenth_means(sft)
    assert last < first, f"SFT loss did not fall: first tenth {first:.3f}, last tenth {last:.3f}"
    assert last < 0.6 * first, f"the demo should learn visibly: {first:.3f} -> {last:.3f}"

    dpo = [m for m in read_metrics(out / "dpo") if "loss" in m]
    acc_first, acc_last = tenth_means([m["rewards/accuracies"] for m in dpo])
    margin_first, margin_last = tenth_means([m["rewards/margins"] for m in dpo])
    assert acc_last > acc_first and margin_last > margin_first

    # dpo records the stage it starts from (sft's summary, by content); sft's base is no bezoar stage
    assert json.loads((out / "dpo" / "inputs.json").read_text()) == {"base_summary": fingerprint(out / "sft" / "summary.json")}
    assert json.loads((out / "sft" / "inputs.json").read_text()) == {}

    summary = json.loads((out / "sft" / "summary.json").read_text())
    base = Path(summary["base_model"])
    model = load(base, adapter=out / "sft" / "adapter", quant="nf4")
    tok = Tokenizer(base)
    prompt = "### System:\nYou are a helpful assistant.\n\n### Instruction:\nWhat color is the bear?\n\n### Response:\n"
    text = generate(model, tok, prompt, max_new_tokens=8)[0].text
    assert text.strip(), "the trained adapter must generate text"
    merged = load(out / "sft" / "merged")
    with torch.no_grad():
        ids = torch.tensor([tok.encode(prompt, bos=True)])
        assert torch.isfinite(merged(ids)).all()
