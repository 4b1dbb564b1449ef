"""The eval set's drops and cuts are reported like the training set's (log and data.json)."""

from __future__ import annotations

import json

from tests.train.helpers import tiny_sft_config

from bezoar.train.run import run_stage


def test_eval_set_drops_and_truncations_are_reported(tmp_path):
    # build_documents' counts for eval_path were thrown away: an eval record dropped (empty response) or cut to
    # max_seq_len changed the eval loss without a word to the user.
    evals = tmp_path / "eval.jsonl"
    evals.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Say hi.", "response": "hi"},
        {"instruction": "Say nothing.", "response": "  "},
        {"instruction": "Count.", "response": " ".join(["one two three"] * 60)},
    ]) + "\n")
    lines = []
    cfg = tiny_sft_config(tmp_path / "run", "train.max_steps=1", f"eval_path={evals}", "train.eval_every=1")
    run_stage(cfg, log=lines.append)
    info = json.loads((tmp_path / "run" / "data.json").read_text())
    assert info["eval_encode"]["dropped_empty_response"] == 1 and info["eval_encode"]["truncated"] == 1
    assert any(line.startswith("eval data: 2/3 examples kept") and "1 truncated" in line for line in lines), lines
