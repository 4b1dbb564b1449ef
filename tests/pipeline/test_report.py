"""The report's figures are those of the files it reads."""

from __future__ import annotations

import json
from pathlib import Path

from bezoar.pipeline import plan
from bezoar.report import data_section
from bezoar.train.recipe import load_recipe


def test_data_table_states_the_threshold_the_filter_used(tmp_path):
    recipe = load_recipe("openbezoar_tiny", ["generate.filter.threshold=6.96"])
    steps = plan(recipe, tmp_path, [])
    folder = tmp_path / "data" / "lamini"
    folder.mkdir(parents=True)
    (folder / "lamini-summary.json").write_text(json.dumps({"seeds": 4, "counts": {"records": 5}}))
    (folder / "filter-summary.json").write_text(json.dumps(
        {"judge": "j", "threshold": 6.96, "records": 5, "scored": 5, "kept": 3, "below_threshold": 2,
         "failures": 0, "scores": {"6.9": 2, "7": 3}}))
    row = next(line for line in data_section(steps, tmp_path) if line.startswith("| lamini |"))
    # Records scoring 6.96 to 7 were kept: the table must not say the cut-off was 7.0.
    assert row == "| lamini | 4 | 5 | 5 | 3 | 2 | 0 | 60.0% | 6.96 |"
