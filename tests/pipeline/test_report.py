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


def _data_lines(tmp_path, filter_summary: dict, generated: int = 6) -> list[str]:
    recipe = load_recipe("openbezoar_tiny", [])
    steps = plan(recipe, tmp_path, [])
    folder = tmp_path / "data" / "lamini"
    folder.mkdir(parents=True)
    (folder / "lamini-summary.json").write_text(json.dumps({"seeds": 4, "counts": {"records": generated}}))
    (folder / "filter-summary.json").write_text(json.dumps(filter_summary))
    return data_section(steps, tmp_path)


def test_judged_counts_the_scored_records_not_the_judge_failures(tmp_path):
    # 6 records read: 4 scored (3 kept, 1 below), 2 judge failures (a failed request, an unreadable reply).
    lines = _data_lines(tmp_path, {"judge": "j", "threshold": 7.0, "records": 6, "scored": 4, "kept": 3,
                                   "below_threshold": 1, "failures": 2, "scores": {"5": 1, "8": 3}})
    header = next(line for line in lines if line.startswith("| scheme |"))
    assert header.split(" | ")[3:8] == ["judged", "kept", "below threshold", "judge failures", "kept %"]
    row = next(line for line in lines if line.startswith("| lamini |"))
    # judged = kept + below threshold; judged + judge failures = generated; kept % is of the judged.
    assert row == "| lamini | 4 | 6 | 4 | 3 | 1 | 2 | 75.0% | 7.0 |"
    text = "\n".join(lines)
    assert "judged: the records the judge scored (kept + below threshold" in text
    assert "judged + judge failures = the records the filter read" in text
    assert not any(line.startswith("- lamini: the filter read") for line in lines)


def test_a_filter_that_read_other_records_than_the_generation_made_says_so(tmp_path):
    lines = _data_lines(tmp_path, {"judge": "j", "threshold": 7.0, "records": 5, "scored": 5, "kept": 3,
                                   "below_threshold": 2, "failures": 0, "scores": {"5": 2, "8": 3}}, generated=6)
    assert "- lamini: the filter read 5 records, the generation made 6" in lines


def test_a_summary_without_scored_falls_back_to_its_kept_and_below(tmp_path):
    lines = _data_lines(tmp_path, {"judge": "j", "threshold": 7.0, "records": 6, "kept": 3,
                                   "below_threshold": 1, "failures": 2})
    assert "| lamini | 4 | 6 | 4 | 3 | 1 | 2 | 75.0% | 7.0 |" in lines
