"""``python -m bezoar.generate lamini`` against the fake server: exact records, drops, resume, SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.generate.fake_server import Fault
from tests.generate.schemes_helpers import (REPO, CallLog, pool_flags, read_jsonl, run, run_subprocess,
                                            store_keys_unique, write_jsonl)

SEEDS = ["Explain why the sky looks red at sunset.", "Write a polite email asking a landlord to fix a leaking tap.",
         "Name three rivers in Africa."]

EXAMPLE_REPLY = """Here are five new tasks:

1. Describe how a rainbow forms.
2) "Write a limerick about a cat who loves cheese."
3. Describe how a rainbow forms!
4.
5. Explain why the sky looks so red at sunset.
6. Please describe how a rainbow forms.
7. Summarize the following text in one sentence:
   The river flooded twice this spring, damaging crops along its banks.

I hope these help!"""

TOPIC_REPLY = """- Explain how volcanoes form.
- Describe how a rainbow forms.
- "Why do we need sleep?"
"""


def is_topic_prompt(text: str) -> bool:
    return "must be about at least one of these topics" in text


def is_list_prompt(text: str) -> bool:
    return "Reply with a numbered list only" in text


def scripted_teacher(call):
    text = call.last_user_text
    if is_list_prompt(text):
        return TOPIC_REPLY if is_topic_prompt(text) else EXAMPLE_REPLY
    if text == "Write a limerick about a cat who loves cheese.":
        return ""
    return "Answer: " + text


@pytest.fixture
def inputs(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": s, "response": "x"} for s in SEEDS])
    topics = tmp_path / "topics.txt"
    topics.write_text("# topics\nVolcanoes\nSleep\n")
    return seeds, topics


def lamini_args(seeds, topics, out, *extra):
    return [seeds, "--topics", topics, "--example-guided", "1", "--topic-guided", "1", "--examples", "2",
            "--per-request", "5", "--out", out, *extra]


def test_records_follow_the_rules(fake_server, inputs, tmp_path):
    log = CallLog(scripted_teacher)
    server = fake_server(reply=log)
    seeds, topics = inputs
    out = tmp_path / "out"
    assert run("lamini", *lamini_args(seeds, topics, out), url=server.openai_url) == 0

    records = read_jsonl(out / "raw.jsonl")
    assert [r["instruction"] for r in records] == [
        "Describe how a rainbow forms.",
        "Summarize the following text in one sentence:\n"
        "The river flooded twice this spring, damaging crops along its banks.",
        "Explain how volcanoes form.",
        "Why do we need sleep?",
    ]
    for r in records:
        assert set(r) == {"instruction", "response", "source", "topics", "teacher"}
        assert r["response"] == "Answer: " + r["instruction"] and r["teacher"] == "teacher"
    assert [r["source"] for r in records] == ["self_instruct_without_topic"] * 2 + ["self_instruct_with_topic"] * 2
    assert records[0]["topics"] == [] and sorted(records[2]["topics"]) == ["Sleep", "Volcanoes"]

    dropped = {(d["reason"], d.get("instruction")) for d in read_jsonl(out / "dropped.jsonl")}
    assert dropped == {
        ("duplicate", "Describe how a rainbow forms!"),
        ("near-duplicate", "Explain why the sky looks so red at sunset."),  # a seed, reworded
        ("near-duplicate", "Please describe how a rainbow forms."),
        ("duplicate", "Describe how a rainbow forms."),  # the topic list repeats the example list
        ("empty response", "Write a limerick about a cat who loves cheese."),
    }
    counts = json.loads((out / "lamini-summary.json").read_text())["counts"]
    assert counts["items_parsed"] == 9 and counts["items_empty"] == 1 and counts["instructions_kept"] == 5
    assert counts["records"] == 4 and counts["responses_dropped"] == 1

    # What the teacher was asked: two seed examples each, the topics in the topic-guided one.
    lists = [c.last_user_text for c in log.calls if is_list_prompt(c.last_user_text)]
    assert len(lists) == 2
    for text in lists:
        assert sum(seed in text for seed in SEEDS) == 2 and "Write 5 new tasks" in text
    topic_prompt = next(t for t in lists if is_topic_prompt(t))
    assert "Volcanoes" in topic_prompt and "Sleep" in topic_prompt

    # The SFT loader reads the output as is.
    from bezoar.data import DataConfig, read_examples

    examples, skipped = read_examples(DataConfig(path=str(out / "raw.jsonl"), format="lamini"))
    assert len(examples) == 4 and not skipped and examples[0].response == "Answer: Describe how a rainbow forms."

    # A rerun sends nothing and writes the same files.
    before = {name: (out / name).read_bytes() for name in ("raw.jsonl", "dropped.jsonl", "lamini-summary.json")}
    server.reset_counters()
    assert run("lamini", *lamini_args(seeds, topics, out), url=server.openai_url) == 0
    assert server.stats()["requests"] == 0
    assert {name: (out / name).read_bytes() for name in before} == before


def test_malformed_list_and_failed_request_are_counted(fake_server, inputs, tmp_path, capsys):
    def teacher(call):
        if is_topic_prompt(call.last_user_text):
            return Fault("400", message="bad request (injected)")
        return "Sure, I could write tasks about many things, for example rainbows and cats."

    server = fake_server(reply=teacher)
    seeds, topics = inputs
    out = tmp_path / "out"
    # A request that ended as a failure: exit status 1, as `requests` gives it, and the way to send it again
    # (it exited 0); a reply that is not a list is an answer, not a failure.
    assert run("lamini", *lamini_args(seeds, topics, out), url=server.openai_url) == 1
    err = capsys.readouterr().err
    assert "1 request ended as a failure" in err and "rerun with --retry-failed to send it again" in err, err
    assert read_jsonl(out / "raw.jsonl") == []
    dropped = read_jsonl(out / "dropped.jsonl")
    assert sorted(d["reason"] for d in dropped) == ["reply is not a list", "request failed"]
    assert "bad request (injected)" in next(d["error"] for d in dropped if d["reason"] == "request failed")
    counts = json.loads((out / "lamini-summary.json").read_text())["counts"]
    assert counts["malformed_lists"] == 1 and counts["list_requests_failed"] == 1 and counts["records"] == 0


def test_retried_list_request_never_displaces_answered_instructions(fake_server, inputs, tmp_path):
    """A list request that failed and succeeds under --retry-failed (the pipeline passes it on every resume)
    comes first in request order; its near-duplicate of an instruction already answered is the one dropped,
    so the paid record stays in raw.jsonl and the new item is not paid for."""
    retry = False

    def teacher(call):
        text = call.last_user_text
        if not is_list_prompt(text):
            return "Answer: " + text
        if is_topic_prompt(text):
            return "1. Describe how a rainbow forms in the sky.\n2. Explain how volcanoes form."
        if not retry:
            return Fault("400", message="bad request (injected)")
        return "1. Please describe how a rainbow forms in the sky.\n2. Name three kinds of cloud."

    log = CallLog(teacher)
    server = fake_server(reply=log)
    seeds, topics = inputs
    out = tmp_path / "out"
    assert run("lamini", *lamini_args(seeds, topics, out), url=server.openai_url) == 1  # the failed list request
    first = read_jsonl(out / "raw.jsonl")
    assert [r["instruction"] for r in first] == ["Describe how a rainbow forms in the sky.",
                                                 "Explain how volcanoes form."]

    retry = True
    sent = len(log.calls)
    assert run("lamini", *lamini_args(seeds, topics, out), "--retry-failed", url=server.openai_url) == 0
    asked = [c.last_user_text for c in log.calls[sent:]]
    assert len(asked) == 2 and is_list_prompt(asked[0]) and asked[1] == "Name three kinds of cloud."
    records = read_jsonl(out / "raw.jsonl")
    assert [r["instruction"] for r in records] == ["Name three kinds of cloud.",  # request order
                                                   "Describe how a rainbow forms in the sky.",
                                                   "Explain how volcanoes form."]
    assert records[1:] == first
    dropped = [d for d in read_jsonl(out / "dropped.jsonl") if d["step"] == "instructions"]
    assert [(d["reason"], d["instruction"], d["similar_to"]) for d in dropped] == [
        ("near-duplicate", "Please describe how a rainbow forms in the sky.",
         "Describe how a rainbow forms in the sky.")]
    assert len(read_jsonl(out / "work" / "responses.jsonl")) == 3

    # Rerunning sends nothing and writes the same files.
    before = {name: (out / name).read_bytes() for name in ("raw.jsonl", "dropped.jsonl", "lamini-summary.json")}
    server.reset_counters()
    assert run("lamini", *lamini_args(seeds, topics, out), "--retry-failed", url=server.openai_url) == 0
    assert server.stats()["requests"] == 0
    assert {name: (out / name).read_bytes() for name in before} == before


def test_user_template_is_used(fake_server, inputs, tmp_path):
    log = CallLog(lambda call: "1. Count the legs of a spider." if "MY TEMPLATE" in call.last_user_text else "Eight.")
    server = fake_server(reply=log)
    seeds, topics = inputs
    template = tmp_path / "mine.txt"
    template.write_text("MY TEMPLATE: write {count} tasks like these:\n{examples}\n")
    out = tmp_path / "out"
    assert run("lamini", seeds, "--example-guided", "1", "--template", f"lamini_examples={template}", "--out", out,
               url=server.openai_url) == 0
    assert read_jsonl(out / "raw.jsonl") == [{"instruction": "Count the legs of a spider.", "response": "Eight.",
                                              "source": "self_instruct_without_topic", "topics": [],
                                              "teacher": "teacher"}]
    assert log.calls[0].last_user_text.startswith("MY TEMPLATE: write 20 tasks like these:\n1. ")


@pytest.mark.parametrize("lines,message", [
    (['{"instruction": "a"}', '{"instruction": "b",'], "line 2: not valid JSON"),
    (['{"instruction": "a"}', '{"prompt": "b"}'], "line 2: seed has no 'instruction' field; its keys are 'prompt'"),
    (['{"instruction": 3}'], "line 1: field 'instruction' must be a string, got int"),
    (['{"instruction": "  "}'], "line 1: field 'instruction' is empty"),
])
def test_malformed_seed_file_names_file_and_line(tmp_path, capsys, lines, message):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(lines) + "\n")
    assert run("lamini", seeds, "--out", tmp_path / "out") == 2  # nothing is sent: the URL is a closed port
    err = capsys.readouterr().err
    assert f"error: {seeds} {message}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,message", [
    (["--topic-guided", "2"], "--topic-guided needs --topics FILE"),
    (["--example-guided", "0"], "nothing to do"),
    (["--similarity", "1.5"], "--similarity must be in (0, 1], got 1.5"),
    (["--template", "nope.txt"], "this command has several templates"),
])
def test_bad_options(tmp_path, capsys, inputs, extra, message):
    seeds, _ = inputs
    assert run("lamini", seeds, "--out", tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------- kill midway, rerun
WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "pu", "ra", "si", "tu", "ve", "zo") for b in
         ("bel", "dor", "fin", "gast", "hum", "jix", "lant", "mop", "nurg", "pim", "quor", "rast")]


def wordy_teacher(call):
    """Lists of 5 varied instructions, and answers, that depend only on the request's content."""
    text = call.last_user_text
    rng = random.Random(hashlib.sha256(text.encode()).hexdigest())
    if is_list_prompt(text):
        return "\n".join(f"{k}. Please {' '.join(rng.sample(WORDS, 7))}." for k in range(1, 6))
    return "Answer: " + " ".join(rng.sample(WORDS, 12))


def test_sigkill_midway_then_rerun_gives_the_same_file(fake_server, tmp_path):
    server = fake_server(reply=wordy_teacher, latency=0.05)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": f"Describe the {w} in detail."} for w in WORDS])
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    args = [seeds, "--example-guided", "20", "--per-request", "5", "--out"]
    assert run("lamini", *args, reference, "--concurrency", "32", url=server.openai_url) == 0
    expected = (reference / "raw.jsonl").read_bytes()
    total = len(read_jsonl(reference / "work" / "responses.jsonl"))
    assert total >= 95

    proc = subprocess.Popen([sys.executable, "-m", "bezoar.generate", "lamini", *map(str, args), str(killed),
                             *pool_flags(server.openai_url, "--concurrency", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, env=dict(os.environ))
    responses = killed / "work" / "responses.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if responses.exists() and responses.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    answered = responses.read_bytes().count(b"\n")
    assert 10 <= answered < total, "the run was not stopped in the middle of the responses step"
    assert not (killed / "raw.jsonl").exists()

    # The rerun talks to a server of its own: a request the killed run wrote just before the kill can still
    # be read (and counted) by the first server after it died, which made a count reset there come too early.
    again = fake_server(reply=wordy_teacher, latency=0.05)
    rerun = run_subprocess("lamini", *args, killed, url=again.openai_url)
    assert rerun.returncode == 0, rerun.stderr
    assert (killed / "raw.jsonl").read_bytes() == expected
    assert again.stats()["requests"] == total - answered  # only what was missing, in-flight ones included
    assert store_keys_unique(killed) == store_keys_unique(reference)
    instructions = [r["instruction"] for r in read_jsonl(killed / "raw.jsonl")]
    assert len(instructions) == len(set(instructions))
