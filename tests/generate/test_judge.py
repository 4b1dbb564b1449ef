"""``python -m bezoar.generate filter`` against the fake server: threshold exactness, recorded failures."""

from __future__ import annotations

import json
import re

import pytest

from bezoar.generate.judge import JudgeParseError, parse_judgement
from tests.generate.fake_server import Cut, Fault, Filtered
from tests.generate.schemes_helpers import CallLog, between, read_jsonl, run, write_jsonl

#: response text -> what the judge answers about it
JUDGE_REPLIES = {
    "r-seven": "Reason: correct but terse.\nScore: 7",
    "r-six": "Reason: partly wrong.\nScore: 6",
    "r-ten": "**Reason:** excellent.\n**Score:** 10",
    "r-eight": "Score: 8/10. Reason: good and on task.",
    "r-seven-half": "Score: 7.5\nReason: decent.",
    "r-six-nine": "Reason: almost.\nScore: 6.9",
    "r-no-score": "I think this response is fine.",
    "r-eleven": "Reason: off the scale.\nScore: 11",
    "r-two-scores": "Reason: mixed.\nScore: 3\nScore: 9",
    "r-no-reason": "Score: 9",
    "r-fails": Fault("400", message="judge refused (injected)"),
    "r-cut": Cut("Reason: thorough, correct and on task, with every step of the derivation shown.\nScore: 1"),
    "r-filtered": Filtered("Reason: good.\nScore: 8"),  # a filter stopped it: no judgement, whatever it reads
    "orca answer": "Reason: follows the system message.\nScore: 9",
}

RECORDS = [
    {"instruction": f"Task {name}", "response": name, "source": "self_instruct_without_topic", "teacher": "t"}
    for name in JUDGE_REPLIES if name != "orca answer"
] + [
    {"instruction": "Task r-seven", "response": "r-seven", "source": "self_instruct_without_topic", "teacher": "t"},
    {"system": "Answer like a pirate.", "question": "Where is the treasure?", "instruction": "Where is the treasure?",
     "response": "orca answer", "source": "t0"},
    {"instruction": "Evolved r-eight", "output": "r-eight", "epoch": 2, "evolution_strategy": "in-breadth"},
]
SCORES = {"r-seven": 7, "r-six": 6, "r-ten": 10, "r-eight": 8, "r-seven-half": 7.5, "r-six-nine": 6.9,
          "orca answer": 9}
FAILURES = {"r-no-score": "no 'Score: N'", "r-eleven": "score 11 is outside 1-10",
            "r-two-scores": "several different scores", "r-no-reason": "no reason",
            "r-fails": "judge request failed", "r-cut": "cut off at max_tokens",
            "r-filtered": "stopped by the provider's filter (finish_reason content_filter)"}


def judge(call):
    return JUDGE_REPLIES[between(call.last_user_text, "Response:\n", "\n\nWrite exactly two lines")]


def response_of(record):
    return record.get("response", record.get("output"))


@pytest.fixture
def judged(fake_server, tmp_path):
    log = CallLog(judge)
    server = fake_server(reply=log)
    raw = write_jsonl(tmp_path / "raw.jsonl", RECORDS)
    out = tmp_path / "data"
    assert run("filter", raw, "--out", out, url=server.openai_url) == 1  # r-fails: a recorded failure
    return server, log, raw, out


def test_scores_reasons_and_failures(judged):
    server, log, raw, out = judged
    scored = read_jsonl(out / "judged.jsonl")
    originals = [r for r in RECORDS if response_of(r) in SCORES]
    assert [response_of(r) for r in scored] == [response_of(r) for r in originals]  # input order
    for r, original in zip(scored, originals):
        assert {k: v for k, v in r.items() if not k.startswith("judge_")} == original  # fields kept as they were
        assert r["judge_score"] == SCORES[response_of(r)] and r["judge_model"] == "teacher" and r["judge_reason"]
    assert next(r for r in scored if r["response"] == "r-ten")["judge_reason"] == "excellent."
    assert next(r for r in scored if r["response"] == "r-eight")["judge_reason"] == "good and on task."
    assert isinstance(next(r for r in scored if r["response"] == "r-seven")["judge_score"], int)

    kept = read_jsonl(out / "filtered.jsonl")
    assert sorted(response_of(r) for r in kept) == sorted(
        ["r-seven", "r-seven", "r-ten", "r-eight", "r-eight", "r-seven-half", "orca answer"])

    failures = read_jsonl(out / "judge-failures.jsonl")
    assert {r["response"]: r["judge_error"] for r in failures}.keys() == FAILURES.keys()
    for r in failures:
        assert FAILURES[r["response"]] in r["judge_error"] and r["input_origin"].startswith(str(raw))
        reply = JUDGE_REPLIES[r["response"]]
        assert r["judge_reply"] == (None if r["response"] == "r-fails" else getattr(reply, "text", reply))
    summary = json.loads((out / "filter-summary.json").read_text())
    assert (summary["records"], summary["scored"], summary["kept"], summary["below_threshold"], summary["failures"]) \
        == (len(RECORDS), 9, 7, 2, 7)
    assert summary["scores"] == {"6": 1, "6.9": 1, "7": 2, "7.5": 1, "8": 2, "9": 1, "10": 1}

    # The judge saw the rubric, the orca record's system message, and "(none)" for the others;
    # identical records were judged once.
    pirate = next(c.last_user_text for c in log.calls if "orca answer" in c.last_user_text)
    assert "Answer like a pirate." in pirate and "Helpfulness" in pirate and "Correctness" in pirate
    assert "System message given to the assistant:\n(none)" in next(
        c.last_user_text for c in log.calls if "r-six\n" in c.last_user_text)
    assert server.stats()["requests"] == len(RECORDS) - 1  # the r-seven record appears twice
    assert all(c.body.get("temperature") == 0.0 for c in log.calls)

    from bezoar.data import DataConfig, read_examples

    examples, _ = read_examples(DataConfig(path=str(out / "filtered.jsonl"), format="instruction"))
    assert len(examples) == 7


@pytest.mark.parametrize("threshold,kept", [
    (7, {"r-seven", "r-ten", "r-eight", "r-seven-half", "orca answer"}),
    (6.9, {"r-six-nine", "r-seven", "r-ten", "r-eight", "r-seven-half", "orca answer"}),
    (7.5, {"r-ten", "r-eight", "r-seven-half", "orca answer"}),
    (10, {"r-ten"}),
    (1, set(SCORES)),
])
def test_threshold_is_exact_and_costs_nothing_to_change(judged, threshold, kept):
    server, _, raw, out = judged
    server.reset_counters()
    assert run("filter", raw, "--out", out, "--threshold", str(threshold), url=server.openai_url) == 1
    assert server.stats()["requests"] == 0  # every judgement comes from the store (the failure too)
    assert {response_of(r) for r in read_jsonl(out / "filtered.jsonl")} == kept
    assert all(r["judge_score"] >= threshold for r in read_jsonl(out / "filtered.jsonl"))
    assert len(read_jsonl(out / "judged.jsonl")) == 9 and len(read_jsonl(out / "judge-failures.jsonl")) == 7


def test_retry_failed_asks_again_for_failed_requests_only(judged, fake_server):
    _, _, raw, out = judged
    fixed = fake_server(reply=lambda call: "Reason: fine now.\nScore: 8")
    # Exit 0: no request is a recorded failure now; the unparseable replies are answers, listed and kept as such
    # (--retry-failed cannot change them).
    assert run("filter", raw, "--out", out, "--retry-failed", url=fixed.openai_url) == 0
    assert fixed.stats()["requests"] == 1  # the failed request; unparseable replies are answers, kept as such
    failures = read_jsonl(out / "judge-failures.jsonl")
    assert sorted(r["response"] for r in failures) == sorted(set(FAILURES) - {"r-fails"})


@pytest.mark.parametrize("reply,score,reason", [
    ("Reason: ok\nScore: 5", 5, "ok"), ("Score: 5\nReason: ok", 5, "ok"), ("SCORE = 3. Reasoning: weak", 3, "weak"),
    ("The answer is right.\nScore: 9 out of 10", 9, "The answer is right."), ("Score (1-10): 4\nReason: meh", 4, "meh"),
    ("Reason: consistent.\nScore: 8\nFinal score: 8", 8, "consistent."),
    # the template's placeholder filled in as written, a note on the label, a scale in parentheses
    ("Reason: ok\nScore: <8>", 8, "ok"), ("Reason: ok\nScore: [8]", 8, "ok"), ("Reason: ok\nScore: [8/10]", 8, "ok"),
    ("Score (out of 10): 8\nReason: ok", 8, "ok"), ("Score (overall): 6.5\nReason: ok", 6.5, "ok"),
    ("Reason: ok\nScore: 9 (out of 10)", 9, "ok"), ("Reason: ok.\nScore: 8.", 8, "ok."),
    ("Score: 8 of 10\nReason: ok", 8, "ok"), ("Score: 8 out of ten\nReason: ok", 8, "ok"),
    ("Score: 8 (on a scale of 1 to 10)\nReason: ok", 8, "ok"), ("Reason: ok\nScore: 7 on a 10-point scale", 7, "ok"),
    # the words of the label before "Score" are not the reason ("Good. Overall" before)
    ("Reason: Good.\nOverall Score: 8", 8, "Good."), ("Overall Score: 8\nThe answer is good.", 8, "The answer is good."),
    ("Reason: fine\n## My Final Score: 7", 7, "fine"), ("Good answer overall Score: 9", 9, "Good answer overall"),
    # a scale in the reason on the score's line is the instruction's, not the score's (refused at first)
    ("Score: 9. The response builds the 5-point scale survey as asked.", 9,
     "The response builds the 5-point scale survey as asked."),
    ("Score: 7 (the Likert items use a scale of 1 to 5 as requested)\nReason: ok", 7, "ok"),
])
def test_parse_judgement(reply, score, reason):
    assert parse_judgement(reply) == (score, reason)


@pytest.mark.parametrize("reply", ["", "Score: none", "Score: 0\nReason: x", "Score: -2 Reason: x", "Score: 10.5",
                                   "Score: 9 (out of 10)",
                                   # other scales in words the number-only forms did not read (taken for 1-10 before)
                                   "Reason: Good.\nScore: 4 of 5", "Reason: Good.\nScore: 4 out of five",
                                   "Reason: Good.\nScore: 4 on a 5-point scale", "Score: 4 (scale of 1-5)\nReason: ok",
                                   "Score: 4 out of a hundred\nReason: ok"])
def test_parse_judgement_refuses(reply):
    with pytest.raises(JudgeParseError):
        parse_judgement(reply)


@pytest.mark.parametrize("reply,why", [
    ("Reason: terse.\nScore: 4/5", "score 4/5 is not on the 1-10 scale"),  # 8 on 1-10: not a 4
    ("Reason: weak.\nScore: 7/100", "score 7/100 is not on the 1-10 scale"),
    ("Reason: fine.\nScore: 9 out of 5", "score 9/5 is not on the 1-10 scale"),
    ("Reason: good, small flaws.\nScore: 7-8", "a range of scores (7-8)"),
    ("Reason: good.\nScore: 7 to 8", "a range of scores (7-8)"),
    ("Score (out of 5): 4\nReason: terse.", "score 4 (out of 5) is not on the 1-10 scale"),
    ("Score (0-100): 80\nReason: terse.", "score 80 (0-100) is not on the 1-10 scale"),
    ("Reason: terse.\nScore: 4 (out of 5)", "score 4/5 is not on the 1-10 scale"),
    # what only starts like a score: a decimal comma, an exponent, a unit, two numbers, an unclosed bracket
    ("Reason: ok.\nScore: 7,5", "'Score: 7,5' is not a score from 1 to 10"),
    ("Reason: ok.\nScore: 1e1", "'Score: 1e1' is not a score from 1 to 10"),
    ("Reason: ok.\nScore: 10x", "'Score: 10x' is not a score from 1 to 10"),
    ("Reason: ok.\nScore: 1 0", "'Score: 1 0' is not a score from 1 to 10"),
    ("Reason: ok.\nScore: <8", "'Score: <8' is not a score from 1 to 10"),
])
def test_parse_judgement_refuses_other_scales_and_ranges(reply, why):
    with pytest.raises(JudgeParseError, match=re.escape(why)):
        parse_judgement(reply)
    assert parse_judgement("Reason: ok.\nScore: 6.5/10.0") == (6.5, "ok.")
    assert parse_judgement("Reason: ok.\nScore: 8 - solid") == (8, "ok.")
    assert parse_judgement("Reason: ok.\nScore: 8\n- 1 point off for length") == (8, "ok.")  # a list, not 8-1


@pytest.mark.parametrize("record,message", [
    ({"instruction": "x"}, "line 2: record has no 'response' / 'output' / 'answer' field"),
    ({"response": "x"}, "line 2: record has no 'instruction' / 'question' / 'prompt' field"),
    ({"instruction": "x", "response": ["y"]}, "line 2: field 'response' must be a string, got list"),
])
def test_malformed_input_names_file_and_line(tmp_path, capsys, record, message):
    raw = write_jsonl(tmp_path / "raw.jsonl", [RECORDS[0], record])
    assert run("filter", raw, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {raw} {message}" in err and "Traceback" not in err


def test_bad_threshold_and_output_over_input(tmp_path, capsys):
    raw = write_jsonl(tmp_path / "filtered.jsonl", RECORDS[:1])
    assert run("filter", raw, "--out", tmp_path / "out", "--threshold", "0") == 2
    assert "--threshold must be between 1 and 10" in capsys.readouterr().err
    assert run("filter", raw, "--out", tmp_path) == 2
    assert "is one of the files the command writes" in capsys.readouterr().err
