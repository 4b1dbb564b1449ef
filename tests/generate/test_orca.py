"""``python -m bezoar.generate orca`` against the fake server: system messages per sub-collection, caps."""

from __future__ import annotations

import json

import pytest

from bezoar.generate.orca import read_system_messages, system_ids
from tests.generate.fake_server import Cut, Fault, Filtered
from tests.generate.schemes_helpers import CallLog, read_jsonl, run, write_jsonl

MESSAGES = read_system_messages(None)


def q(question, sub, task, mc=False, **extra):
    return {"question": question, "sub_collection": sub, "task": task, "multiple_choice": mc, **extra}


QUERIES = (
    [q(f"cot question {i}: think step by step.", "cot", "gsm") for i in range(3)]
    + [q(f"niv2 task a input {i}", "niv2", "task_a") for i in range(4)]
    + [q("niv2 task b input", "niv2", "task_b")]
    + [q("t0 pick A or B", "t0", "story", mc=True), q("t0 write a title", "t0", "titles")]
    + [q(f"flan options question {i}\nOPTIONS:\n- yes\n- no", "flan2021", "snli", mc=True) for i in range(6)]
    + [q(f"flan open question {i}", "flan2021", "common_gen") for i in range(6)]
    + [q("flan open question 0", "flan2021", "common_gen")]  # asked before, word for word
    + [q("please answer nothing", "t0", "titles")]
    + [{"inputs": "native flan record", "task_source": "Flan2021", "task_name": "native", "template_type": "zs_opt"}]
)


def teacher(call):
    if call.last_user_text == "please answer nothing":
        return ""
    if call.last_user_text == "t0 write a title":
        return Fault("400", message="no titles today (injected)")
    return "Explained: " + call.last_user_text


def test_records_system_messages_and_caps(fake_server, tmp_path):
    log = CallLog(teacher)
    server = fake_server(reply=log)
    queries = write_jsonl(tmp_path / "flan.jsonl", QUERIES)
    out = tmp_path / "out"
    # "t0 write a title" fails: exit status 1 (the empty answer is an answer, dropped but not a failure)
    assert run("orca", queries, "--cap", "niv2=2", "--out", out, url=server.openai_url) == 1

    records = read_jsonl(out / "raw.jsonl")
    questions = [r["question"] for r in records]
    niv2_a = [x for x in questions if x.startswith("niv2 task a")]
    assert len(niv2_a) == 2  # capped
    expected = [x["question"] if "question" in x else x["inputs"] for x in QUERIES]
    expected = [x for x in expected if not x.startswith("niv2 task a") or x in niv2_a]
    expected = list(dict.fromkeys(expected))  # the repeated query once
    expected.remove("please answer nothing")
    expected.remove("t0 write a title")
    assert questions == expected  # input order

    sent_system = {c.last_user_text: log.system_of(c) for c in log.calls}
    for r in records:
        assert set(r) == {"system", "question", "instruction", "response", "source", "task", "multiple_choice",
                          "system_message_id", "teacher"}
        assert r["instruction"] == r["question"] and r["response"] == "Explained: " + r["question"]
        assert r["system_message_id"] in system_ids(r["source"], r["multiple_choice"])
        assert r["system"] == MESSAGES[r["system_message_id"] - 1]
        assert sent_system[r["question"]] == (r["system"] or None)  # message 1 is empty: no system sent
    native = records[-1]
    assert (native["source"], native["task"], native["multiple_choice"]) == ("flan2021", "native", True)
    by_source = {r["source"] for r in records}
    assert by_source == {"cot", "niv2", "t0", "flan2021"}

    dropped = read_jsonl(out / "dropped.jsonl")
    assert sorted(d["reason"] for d in dropped) == ["empty response", "repeated query", "response request failed"]
    summary = json.loads((out / "orca-summary.json").read_text())
    assert summary["counts"]["capped"] == 2 and summary["counts"]["records"] == len(records)

    from bezoar.data import DataConfig, read_examples

    examples, _ = read_examples(DataConfig(path=str(out / "raw.jsonl"), format="orca"))
    for example, r in zip(examples, records):
        assert r["question"] in example.prompt and example.response == r["response"]
        if r["system"]:
            assert r["system"] in example.prompt

    # Same inputs, same seed: the same draws and the same file, even in another folder.
    again = tmp_path / "again"
    assert run("orca", queries, "--cap", "niv2=2", "--out", again, url=server.openai_url) == 1
    assert (again / "raw.jsonl").read_bytes() == (out / "raw.jsonl").read_bytes()


def test_system_message_draws_cover_the_mapping(fake_server, tmp_path):
    server = fake_server()
    messages = tmp_path / "sys.json"
    messages.write_text(json.dumps([f"SYSTEM {i}" for i in range(1, 17)]))
    rows = [q(f"mc {i}", "flan2021", f"t{i}", mc=True) for i in range(60)] + \
        [q(f"open {i}", "flan2021", f"t{i}") for i in range(60)] + [q(f"cot {i}", "cot", "c") for i in range(40)]
    queries = write_jsonl(tmp_path / "flan.jsonl", rows)
    out = tmp_path / "out"
    assert run("orca", queries, "--system-messages", messages, "--cap-per-task", "39", "--out", out,
               url=server.openai_url) == 0
    records = read_jsonl(out / "raw.jsonl")
    seen = {}
    for r in records:
        seen.setdefault((r["source"], r["multiple_choice"]), set()).add(r["system_message_id"])
        assert r["system"] == f"SYSTEM {r['system_message_id']}"
    assert seen == {("flan2021", True): {3, 4, 7, 8, 10}, ("flan2021", False): {3, 4, 7}, ("cot", False): {6, 11, 16}}
    assert sum(r["source"] == "cot" for r in records) == 39  # --cap-per-task


def test_queries_that_differ_only_in_symbols_are_not_repeats(fake_server, tmp_path):
    server = fake_server(reply=teacher)
    rows = [q("What is 5 + 3?", "cot", "math"), q("What is 5 - 3?", "cot", "math"), q("What is  5 + 3?", "cot", "math"),
            q("Is 7 > 4?", "cot", "compare"), q("Is 7 < 4?", "cot", "compare")]
    queries = write_jsonl(tmp_path / "flan.jsonl", rows)
    out = tmp_path / "out"
    assert run("orca", queries, "--out", out, url=server.openai_url) == 0
    assert [r["question"] for r in read_jsonl(out / "raw.jsonl")] == [
        "What is 5 + 3?", "What is 5 - 3?", "Is 7 > 4?", "Is 7 < 4?"]
    assert [(d["reason"], d["question"]) for d in read_jsonl(out / "dropped.jsonl")] == [
        ("repeated query", "What is  5 + 3?")]  # only whitespace differs: asked once


@pytest.mark.parametrize("seed", range(4))
def test_caps_count_different_queries(fake_server, tmp_path, seed):
    """Repeats are dropped before the caps: a capped task with at least N different queries keeps N of
    them, whatever the draw (capping first could draw a repeat and keep fewer)."""
    server = fake_server(reply=teacher)
    rows = ([q("same question", "niv2", "t")] * 3
            + [q("other question 1", "niv2", "t"), q("other question 2", "niv2", "t")]
            + [q("asked in task t first", "niv2", "t"), q("asked in task t first", "niv2", "u")]
            + [q("u's own", "niv2", "u")])
    queries = write_jsonl(tmp_path / "flan.jsonl", rows)
    out = tmp_path / "out"
    assert run("orca", queries, "--cap-per-task", "3", "--seed", str(seed), "--out", out, url=server.openai_url) == 0
    records = read_jsonl(out / "raw.jsonl")
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["question"])
    assert len(by_task["t"]) == len(set(by_task["t"])) == 3  # 4 different queries, capped to 3
    assert by_task["u"] == ["u's own"]  # its other query is a repeat of task t's
    counts = json.loads((out / "orca-summary.json").read_text())["counts"]
    assert counts["repeated queries"] == 3 and counts["capped"] == 1 and counts["records"] == 4
    assert [(d["reason"], d["same_as"]) for d in read_jsonl(out / "dropped.jsonl")] == [
        ("repeated query", f"{queries} line 1"), ("repeated query", f"{queries} line 1"),
        ("repeated query", f"{queries} line 6")]


def test_mapping_is_orcas():
    assert system_ids("cot", False) == system_ids("cot", True) == (6, 11, 16)
    assert system_ids("niv2", False) == (1, 2, 5, 7, 9, 12, 13, 14, 15)
    assert system_ids("t0", True) == (1, 2, 3, 5, 7)
    assert system_ids("flan2021", False) == (3, 4, 7) and system_ids("flan2021", True) == (3, 4, 7, 8, 10)
    assert MESSAGES[0] == "" and len(MESSAGES) == 16 and all(MESSAGES[1:])


@pytest.mark.parametrize("record,message", [
    ({"question": "x", "sub_collection": "dialog"}, "line 2: unknown sub-collection 'dialog'; use one of cot, niv2"),
    ({"question": "x"}, "line 2: query has no 'sub_collection' (or 'task_source') field"),
    ({"question": "x", "sub_collection": "cot", "multiple_choice": "yes"},
     "line 2: 'multiple_choice' must be true or false, got 'yes'"),
    ({"sub_collection": "cot"}, "line 2: query has no 'question' / 'inputs' / 'query' / 'instruction' field"),
])
def test_malformed_query_file_names_file_and_line(tmp_path, capsys, record, message):
    queries = write_jsonl(tmp_path / "flan.jsonl", [QUERIES[0], record])
    assert run("orca", queries, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {queries} {message}" in err and "Traceback" not in err


@pytest.mark.parametrize("extra,message", [
    (["--cap", "niv2"], "expected SUB=N"), (["--cap", "niv2=x"], "is not a whole number"),
    (["--cap", "web=3"], "unknown sub-collection 'web'"), (["--cap-per-task", "0"], "at least 1"),
])
def test_bad_caps(tmp_path, capsys, extra, message):
    queries = write_jsonl(tmp_path / "flan.jsonl", QUERIES[:1])
    assert run("orca", queries, "--out", tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


def test_bad_system_messages_file(tmp_path, capsys):
    queries = write_jsonl(tmp_path / "flan.jsonl", QUERIES[:1])
    messages = tmp_path / "sys.json"
    messages.write_text(json.dumps(["only", "three", "here"]))
    assert run("orca", queries, "--system-messages", messages, "--out", tmp_path / "out") == 2
    assert f"system messages {messages}: expected a JSON list of 16 strings" in capsys.readouterr().err


def test_flan_export_field_names_with_underscores(fake_server, tmp_path):
    """FLAN v2's own export (and Open-Orca/FLAN) names its metadata _task_source, _task_name, _template_type."""
    server = fake_server(reply=teacher)
    rows = [{"inputs": "Premise: a dog runs. Does it move?\nOPTIONS:\n- yes\n- no", "targets": "yes",
             "_template_idx": 3, "_task_source": "Flan2021", "_task_name": "anli_r1", "_template_type": "zs_opt"},
            {"inputs": "Translate to French: hello", "targets": "bonjour", "_template_idx": 0,
             "_task_source": "NIv2", "_task_name": "task_en_fr", "_template_type": "zs_noopt"}]
    queries = write_jsonl(tmp_path / "flan.jsonl", rows)
    out = tmp_path / "out"
    assert run("orca", queries, "--out", out, url=server.openai_url) == 0
    records = read_jsonl(out / "raw.jsonl")
    assert [(r["source"], r["task"], r["multiple_choice"]) for r in records] == [
        ("flan2021", "anli_r1", True), ("niv2", "task_en_fr", False)]


def test_replies_cut_off_or_stopped_by_a_filter_are_no_records(fake_server, tmp_path):
    """finish_reason content_filter was taken for a whole answer: "Step 1: First, gather the" became a record."""
    replies = {"cut": Cut("Step 1: First, gather"), "filtered": Filtered("Step 1: First, gather the"),
               "whole": "Step 1: gather. Step 2: done."}
    server = fake_server(reply=lambda call: replies[call.last_user_text.split()[0]])
    queries = write_jsonl(tmp_path / "flan.jsonl", [q(f"{name} question", "cot", "gsm") for name in replies])
    out = tmp_path / "out"
    assert run("orca", queries, "--out", out, url=server.openai_url) == 0
    assert [r["question"] for r in read_jsonl(out / "raw.jsonl")] == ["whole question"]
    assert sorted((d["question"], d["reason"]) for d in read_jsonl(out / "dropped.jsonl")) == [
        ("cut question", "response cut off at max_tokens"),
        ("filtered question", "response stopped by the provider's filter (finish_reason content_filter)")]
