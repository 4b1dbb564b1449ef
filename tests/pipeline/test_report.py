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


def test_evaluations_not_current_are_labelled_as_earlier_results(tmp_path):
    """A retrained (or to-be-retrained) model leaves its evaluations' earlier tables on disk until they run again:
    the report shows them labelled as earlier results, not as the current model's; current ones are not labelled."""
    from bezoar.report import evaluation_section
    from tests.pipeline.test_stale import _evaluated_run

    recipe = load_recipe("openbezoar_tiny")
    root = tmp_path / "run"
    _evaluated_run(root, recipe)
    mt = root / "eval/dpo/mt_bench"
    (mt / "results.md").write_text("## MT-Bench: openbezoar_tiny-dpo (judge: demo-judge)\n\n| **all** | 6.500 |\n")
    (root / "eval/dpo/harness/results.json").write_text(json.dumps(
        {"results": {"tiny_mc": {"acc,none": 0.5, "acc_stderr,none": 0.1}}, "versions": {"tiny_mc": 1},
         "n-shot": {"tiny_mc": 0}, "higher_is_better": {"tiny_mc": {"acc": True}}}))
    text = "\n".join(evaluation_section(recipe, plan(recipe, root, []), root))
    assert "earlier results" not in text.lower() and "lm-eval harness:" in text
    saved = json.loads((root / "eval/dpo/harness/results.json").read_text())
    (root / "eval/dpo/harness/results.json").write_text(json.dumps({**saved, "complete": False}))  # stopped midway
    text = "\n".join(evaluation_section(recipe, plan(recipe, root, []), root))
    assert "lm-eval harness (partial: the run stopped before its last tasks):" in text
    (root / "eval/dpo/harness/results.json").write_text(json.dumps({**saved, "complete": True}))

    (root / "dpo/summary.json").write_text('{"stage": "dpo", "steps": 8}\n')  # the stage trained again
    text = "\n".join(evaluation_section(recipe, plan(recipe, root, []), root))
    assert "lm-eval harness (earlier results):" in text
    assert "#### MT-Bench: openbezoar_tiny-dpo (judge: demo-judge) (earlier results)" in text
    assert ("> **Earlier results, not current:** mt-bench:dpo is to run (input changed: the model of stage dpo"
            in text)
    assert text.count("> **Earlier results, not current:**") == 2

    top_k = load_recipe("openbezoar_tiny", ["evaluate.mt_bench.top_k=7"])  # complete, with other settings now
    (root / "dpo/summary.json").write_text(json.dumps({"stage": "dpo", "steps": 4}) + "\n")
    text = "\n".join(evaluation_section(top_k, plan(top_k, root, []), root))
    assert ("> **Earlier results, not current:** the recipe's settings for mt-bench:dpo changed since it ran "
            "(mt_bench.top_k: 50 -> 7)") in text
