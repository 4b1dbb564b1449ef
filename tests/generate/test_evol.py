"""``python -m bezoar.generate evol`` against the fake server: every elimination rule, lineages, resume."""

from __future__ import annotations

import json

import pytest

from bezoar.generate.evol import DEPTH_OPERATIONS, STRATEGIES, equality_verdict, leaked_phrase, refused_rewrite
from bezoar.generate.schemes import rng_for
from tests.generate.fake_server import Cut, Fault, Filtered
from tests.generate.schemes_helpers import CallLog, between, read_jsonl, run, store_keys_unique, write_jsonl

SEEDS = [
    {"instruction": "Alpha: name a planet.", "context": "", "response": "Mars.", "category": "open_qa"},
    {"instruction": "Beta: name a colour.", "context": "", "response": "Red.", "category": "open_qa"},
    {"instruction": "Bravo: name a metal.", "context": "", "response": "Iron.", "category": "open_qa"},
    {"instruction": "Charlie: name a tree.", "context": "", "response": "Oak.", "category": "open_qa"},
    {"instruction": "Delta: name a river.", "context": "", "response": "Nile.", "category": "open_qa"},
    {"instruction": "Echo: name a poison.", "context": "", "response": "Arsenic.", "category": "open_qa"},
    {"instruction": "Foxtrot: name a dance.", "context": "", "response": "Waltz.", "category": "open_qa"},
    {"instruction": "Golf: name a sport.", "context": "", "response": "Golf.", "category": "open_qa"},
    {"instruction": "Hotel: name a city.", "context": "", "response": "Lima.", "category": "open_qa"},
    {"instruction": "India: summarise the passage.", "context": "The passage is about tea.", "response": "Tea.",
     "category": "summarization"},
    {"instruction": "Juliet: name a play.", "category": "open_qa"},
]


def original_of(prompt: str) -> str:
    return between(prompt, "#Original Instruction#\n", "\n\nReply with")


def evolve(text: str):
    name = text.split(":")[0]
    if name in ("Alpha", "India"):  # good evolutions, every epoch
        return f"{text} Step {text.count('Step') + 1}."
    return {
        "Beta": "#Rewritten Instruction#\nBeta: name a colour of the rainbow.",
        "Bravo": "Following the original instruction, name a metal that rusts.",
        "Charlie": "charlie -- Name a tree!",  # the same words: nothing new
        "Delta": "Delta: name a long river.", "Echo": "Echo: name a poison used in history.",
        "Foxtrot": "Foxtrot: name a dance from Austria.", "Golf": "   ", "Hotel": "Hotel: name a city in Peru.",
        "Juliet": Fault("400", message="evolve refused (injected)"),
    }[name]


def equality(first: str, second: str) -> str:
    return {"Delta": "SAME.", "Hotel": "Hmm, hard to say."}.get(second.split(":")[0], "DIFFERENT")


def respond(text: str) -> str:
    return {"Echo": "I'm sorry, but I can't help with that.", "Foxtrot": "It is, of the!"}.get(
        text.split(":")[0], f"Answer about {text.split(':')[0]}: a full and useful reply.")


def teacher(call):
    text = call.last_user_text
    if "#Original Instruction#" in text:
        return evolve(original_of(text))
    if "SAME or DIFFERENT" in text:
        return equality(between(text, "First instruction:\n", "\n\nSecond instruction:"),
                        between(text, "Second instruction:\n", "\n\nAnswer with"))
    return respond(text)


def test_elimination_rules_and_lineages(fake_server, tmp_path, capsys):
    log = CallLog(teacher)
    server = fake_server(reply=log)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", SEEDS)
    out = tmp_path / "out"
    # Juliet's evolution fails in both epochs: exit status 1 for epoch 2's failure, the one --retry-failed
    # would send again (epoch 1's has epoch 2 built on it, and stays an eliminated evolution).
    assert run("evol", seeds, "--epochs", "2", "--out", out, url=server.openai_url) == 1
    assert "1 request ended as a failure" in capsys.readouterr().err

    records = read_jsonl(out / "raw.jsonl")
    india = "India: summarise the passage.\n\nThe passage is about tea."
    assert [(r["epoch"], r["instruction"]) for r in records] == [
        (1, "Alpha: name a planet. Step 1."), (1, india + " Step 1."),
        (2, "Alpha: name a planet. Step 1. Step 2."), (2, india + " Step 1. Step 2."),
    ]
    for r in records:
        assert set(r) == {"instruction", "output", "evolution_strategy", "in-depth-evolving_operation", "epoch",
                          "category", "teacher"}
        lineage = 0 if r["instruction"].startswith("Alpha") else 9
        strategy, operation = rng_for(0, "evol", r["epoch"], lineage).choice(STRATEGIES)
        assert (r["evolution_strategy"], r["in-depth-evolving_operation"]) == (strategy, operation)
        assert r["category"] == SEEDS[lineage]["category"] and r["teacher"] == "teacher"
        assert r["output"] == f"Answer about {r['instruction'].split(':')[0]}: a full and useful reply."
        # The prompt that produced it was the right operation's, on the lineage's previous instruction.
        previous = r["instruction"].rsplit(" Step", 1)[0]
        prompt = next(c.last_user_text for c in log.calls if "#Original Instruction#" in c.last_user_text
                      and original_of(c.last_user_text) == previous)
        if strategy == "in-depth":
            assert DEPTH_OPERATIONS[operation] in prompt
        else:
            assert "brand-new instruction" in prompt

    dropped = read_jsonl(out / "dropped.jsonl")
    reasons = {(d["epoch"], d["previous"].split(":")[0]): d["reason"] for d in dropped}
    expected = {
        "Beta": "leaks the rewriting prompt", "Bravo": "leaks the rewriting prompt",
        "Charlie": "no information gain", "Delta": "no information gain", "Echo": "response is a short refusal",
        "Foxtrot": "response has only punctuation and stop words", "Golf": "empty evolution",
        "Hotel": "equality check unclear", "Juliet": "evolution request failed",
    }
    assert reasons == {(epoch, name): reason for epoch in (1, 2) for name, reason in expected.items()}
    for d in dropped:  # a failed lineage keeps its seed instruction for the next epoch
        seed = next(s for s in SEEDS if s["instruction"].startswith(d["previous"].split(":")[0]))
        assert d["previous"] == seed["instruction"]
    assert next(d for d in dropped if d["reason"] == "evolution request failed")["error"].count("evolve refused")
    assert {d["leaked"] for d in dropped if "leaked" in d} == {"rewritten instruction", "Original Instruction"}

    counts = json.loads((out / "evol-summary.json").read_text())["counts"]
    assert counts["records"] == 4 and counts["epoch 1 records"] == 2 and counts["dropped: no information gain"] == 4
    # Leaks, empties, unchanged texts and failures are caught before asking anything more.
    equality_calls = [c for c in log.calls if "SAME or DIFFERENT" in c.last_user_text]
    assert len(equality_calls) == 2 * 6  # Alpha, Delta, Echo, Foxtrot, Hotel, India per epoch
    assert all(c.body.get("temperature") == 0.0 for c in equality_calls)

    from bezoar.data import DataConfig, read_examples

    examples, _ = read_examples(DataConfig(path=str(out / "raw.jsonl"), format="evol"))
    assert [e.response for e in examples] == [r["output"] for r in records]

    before = (out / "raw.jsonl").read_bytes()
    server.reset_counters()
    assert run("evol", seeds, "--epochs", "2", "--out", out, url=server.openai_url) == 1
    assert server.stats()["requests"] == 0 and (out / "raw.jsonl").read_bytes() == before
    store_keys_unique(out)
    assert sorted(p.name for p in (out / "work").iterdir()) == sorted(
        f"epoch-{e}-{s}.jsonl" for e in (1, 2) for s in ("evolve", "equal", "respond"))


@pytest.mark.parametrize("text,previous,refusal", [
    ("I'm sorry, but I can't assist with rewriting that request.", "Name a poison.", True),
    ("Sorry, I cannot do that.", "x", True), ('"I cannot help with this."', "x", True),
    ("As an AI language model, I can't create that.", "x", True),
    ("**I apologize**, but I cannot fulfill this request.", "x", True),
    ("I am unable to comply with this request.", "x", True), ("Unfortunately, I can't do that.", "x", True),
    ("I cannot provide a rewritten version of this prompt.", "x", True),
    # instructions that speak of sorry, or as a user in the first person, are instructions
    ("Write a note saying sorry to a friend for missing the party.", "x", False),
    ("I can't decide between two jobs; list the pros and cons of each.", "x", False),
    ("Explain why I cannot sleep at night.", "x", False),
    # personas and first-person requests the first version of the rule dropped
    ("As an AI researcher, design an experiment to test it.", "x", False),
    ("As an AI ethics consultant, write a policy memo.", "x", False),
    ("Unfortunately, I can't attend my sister's wedding. Write a heartfelt letter.", "x", False),
    ("I can't create a monthly budget that actually sticks. Give me a plan.", "x", False),
    ("I cannot provide my landlord with a reference. Draft an email.", "x", False),
    ("I'm sorry to bother you, but could you explain how vaccines work?", "x", False),
    # an instruction evolved from one that opens the same way
    ("I'm sorry to ask, but explain tides in detail, with a diagram.", "I'm sorry to ask, but explain tides.", False),
])
def test_refused_rewrite(text, previous, refusal):
    assert refused_rewrite(text, previous) is refusal


def test_a_refused_or_filtered_evolution_is_no_instruction(fake_server, tmp_path):
    """A teacher's refusal to rewrite passed every evolve check, was judged DIFFERENT, got a polite answer and became
    a training record (and the lineage's instruction). A reply stopped by a filter is no record either."""
    def refusing(call):
        text = call.last_user_text
        if "#Original Instruction#" in text:
            name = original_of(text).split(":")[0]
            if name == "Echo":
                return "I'm sorry, but I can't assist with rewriting that request."
            if name == "Delta":
                return Filtered("Delta: name a long")
            if name == "Foxtrot":
                return Cut("Foxtrot: name a dance")
            return evolve(original_of(text))
        if "SAME or DIFFERENT" in text:
            return "DIFFERENT"
        if text.startswith("Hotel"):
            return Filtered("Partial answer")
        return f"Thanks for asking. Answer about {text.split(':')[0]}."

    log = CallLog(refusing)
    server = fake_server(reply=log)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", [SEEDS[0], SEEDS[4], SEEDS[5], SEEDS[6], SEEDS[8]])
    out = tmp_path / "out"
    assert run("evol", seeds, "--epochs", "1", "--out", out, url=server.openai_url) == 0
    # Hotel's evolution is whole: its response is the one filtered
    assert [r["instruction"] for r in read_jsonl(out / "raw.jsonl")] == ["Alpha: name a planet. Step 1."]
    reasons = {d["previous"].split(":")[0]: d["reason"] for d in read_jsonl(out / "dropped.jsonl")}
    assert reasons == {"Echo": "evolution is a refusal",
                       "Delta": "evolution stopped by the provider's filter (finish_reason content_filter)",
                       "Foxtrot": "evolution cut off at max_tokens",
                       "Hotel": "response stopped by the provider's filter (finish_reason content_filter)"}
    asked = [c.last_user_text for c in log.calls if "#Original Instruction#" not in c.last_user_text]
    assert not any("sorry" in text for text in asked)  # refused before the paid equality and respond calls


def test_more_epochs_extend_the_same_run(fake_server, tmp_path):
    """Epochs are built on stored answers: 3 epochs after 2 only asks for the third."""
    server = fake_server(reply=teacher)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", SEEDS[:1])
    out = tmp_path / "out"
    assert run("evol", seeds, "--epochs", "2", "--out", out, url=server.openai_url) == 0
    server.reset_counters()
    assert run("evol", seeds, "--epochs", "3", "--out", out, url=server.openai_url) == 0
    assert server.stats()["requests"] == 3  # evolve, equal, respond of epoch 3
    assert [r["epoch"] for r in read_jsonl(out / "raw.jsonl")] == [1, 2, 3]


@pytest.mark.parametrize("reply,verdict", [("SAME", "same"), ("Different.", "different"), ("Equal", "same"),
                                           ("Not Equal", "different"), ("They are not the same.", "different"),
                                           ("I am not sure", None), ("", None),
                                           ("NOT SAME", "different"), ("Not quite the same.", "different"),
                                           ("SAME. The second only rewords it; nothing different is asked.", "same"),
                                           ("Not different.", "same"), ("They are equal, not different.", "same"),
                                           ("DIFFERENT: it adds a constraint, so they are not the same.", "different"),
                                           ("Unequal", "different"),
                                           # negation by contraction, straight or curly apostrophe
                                           ("They aren't the same.", "different"),
                                           ("The two aren\u2019t equal.", "different"),
                                           ("It isn't identical: it adds a step.", "different"),
                                           ("They cannot be the same.", "different"),
                                           ("They aren't different.", "same"),
                                           # the template's answer word in capitals decides ("same" before)
                                           ("In the same domain, but DIFFERENT", "different"),
                                           ("Same topic; DIFFERENT.", "different"), ("Not DIFFERENT", "same"),
                                           ("They differ.", "different"), ("The second differs.", "different")])
def test_equality_verdict(reply, verdict):
    assert equality_verdict(reply) == verdict


@pytest.mark.parametrize("text,leak", [
    ("#Rewritten Prompt#: do x", "rewritten prompt"), ("#Created Task# x", "#created"),
    ("Using the given prompt, do x", "given prompt"),
    ("Write a NEW INSTRUCTION for x", "new instruction"), ("#My Marker# do x", "My Marker"),
    ("Explain recursion with an example.", None),
    ("#New Instruction#\nDo x", "new instruction"), ("#Original# do x", "#original"),
    # hashtags an evolved instruction may well ask for are not the rewriting prompt's markers
    ("Write a tweet about our bakery's opening with the hashtag #NewYear.", None),
    ("Tag the post #OriginalContent and #GivenTuesday.", None),
])
def test_leaked_phrase(text, leak):
    assert leaked_phrase(text, ["My Marker"]) == leak


@pytest.mark.parametrize("text,previous,leak", [
    # whole words only
    ("Explain how to renew instructions for a passport.", "", None),
    ("List the steps to renew instructional licences.", "", None),
    ("Write new instructions for the dishwasher.", "", None),
    ("Rewrite this as a given prompted form.", "", None),
    ("Write a new instruction for x", "", "new instruction"),
    # a phrase the previous instruction (with its context) already holds is the task's own
    ("Why did the FAA act? Answer in three bullet points.\n\nThe FAA sent a new instruction to pilots.",
     "Why did the FAA act?\n\nThe FAA sent a new instruction to pilots.", None),
    ("Explain what a language model does with the given prompt, in two paragraphs.",
     "Explain what a language model does with the Given  Prompt.", None),
    ("Explain the given prompt. #Rewritten Prompt#", "Explain the given prompt.", "rewritten prompt"),
    # the marker's #Words# form is the rewriting prompt's even where the previous text has the words
    ("#My Marker#\nName my marker's colour.", "Name my marker's colour.", "My Marker"),
    ("Name my marker's colour and shape.", "Name my marker's colour.", None),
])
def test_leaked_phrase_counts_only_new_whole_words(text, previous, leak):
    assert leaked_phrase(text, ["My Marker"], previous) == leak


def test_a_seed_that_holds_a_leak_phrase_still_evolves(fake_server, tmp_path):
    """The seed's own context says "new instruction": evolutions that keep it are not leaks."""
    def keeps_context(call):
        text = call.last_user_text
        if "#Original Instruction#" in text:
            return original_of(text) + " Answer in three bullet points."
        return "DIFFERENT" if "SAME or DIFFERENT" in text else f"A full, useful answer to: {text}"

    server = fake_server(reply=keeps_context)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", [
        {"instruction": "Why did the FAA act?", "context": "In 2019 the FAA sent a new instruction to pilots.",
         "category": "closed_qa"}])
    out = tmp_path / "out"
    assert run("evol", seeds, "--epochs", "2", "--out", out, url=server.openai_url) == 0
    assert [r["epoch"] for r in read_jsonl(out / "raw.jsonl")] == [1, 2]
    assert read_jsonl(out / "dropped.jsonl") == []


@pytest.mark.parametrize("record,message", [
    ({"context": "c"}, "line 2: seed has no 'instruction' field"),
    ({"instruction": "a", "context": ["c"]}, "line 2: field 'context' must be a string, got list"),
    ({"instruction": "a", "category": 7}, "line 2: field 'category' must be a string, got int"),
])
def test_malformed_seed_file_names_file_and_line(tmp_path, capsys, record, message):
    seeds = write_jsonl(tmp_path / "dolly.jsonl", [SEEDS[0], record])
    assert run("evol", seeds, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"error: {seeds} {message}" in err and "Traceback" not in err


def test_evolve_request_failures_stop_nothing(fake_server, tmp_path):
    server = fake_server(reply=lambda call: Fault("400"))
    seeds = write_jsonl(tmp_path / "dolly.jsonl", SEEDS[:3])
    out = tmp_path / "out"
    assert run("evol", seeds, "--epochs", "1", "--out", out, url=server.openai_url) == 1
    assert read_jsonl(out / "raw.jsonl") == []
    assert [d["reason"] for d in read_jsonl(out / "dropped.jsonl")] == ["evolution request failed"] * 3


def test_retry_failed_keeps_every_stored_later_epoch(fake_server, tmp_path):
    """--retry-failed (which the pipeline passes on every resume) retries a lineage's failures only in its
    last stored epoch: retrying an earlier one could change the instruction later epochs were built on,
    paying for them again and dropping their records from raw.jsonl."""
    faults = {"Alpha: name a planet. Step 1.", "Beta: name a colour. Step 1. Step 2."}  # each answer fails once

    def flaky(call):
        text = call.last_user_text
        if "#Original Instruction#" in text:  # every evolution differs, so a retried epoch changes the lineage
            return f"{original_of(text)} Step {original_of(text).count('Step') + 1}."
        if "SAME or DIFFERENT" in text:
            return "DIFFERENT"
        if text in faults:
            faults.discard(text)
            return Fault("400", message="transient filter (injected)")
        return f"A full, useful answer to: {text}"

    log = CallLog(flaky)
    server = fake_server(reply=log)
    seeds = write_jsonl(tmp_path / "dolly.jsonl", [{"instruction": "Alpha: name a planet."},
                                                   {"instruction": "Beta: name a colour."}])
    out = tmp_path / "out"
    # Exit status 1 counts only the failures --retry-failed would send again: Beta's (its last stored epoch).
    assert run("evol", seeds, "--epochs", "2", "--out", out, url=server.openai_url) == 1
    first = read_jsonl(out / "raw.jsonl")
    assert [(r["epoch"], r["instruction"]) for r in first] == [
        (1, "Beta: name a colour. Step 1."), (2, "Alpha: name a planet. Step 1.")]  # Alpha evolved again

    log.calls.clear()
    # 0: Alpha's failure stays recorded, but no retry can send it again (a 1 here would never clear).
    assert run("evol", seeds, "--epochs", "2", "--out", out, "--retry-failed", url=server.openai_url) == 0
    # Alpha's epoch-1 failure has epoch 2 built on it: kept. Beta's failure is in its last stored epoch: asked again.
    assert [c.last_user_text for c in log.calls] == ["Beta: name a colour. Step 1. Step 2."]
    second = read_jsonl(out / "raw.jsonl")
    assert second[:2] == first and [(r["epoch"], r["instruction"]) for r in second[2:]] == [
        (2, "Beta: name a colour. Step 1. Step 2.")]
    reasons = [(d["epoch"], d["previous"], d["reason"]) for d in read_jsonl(out / "dropped.jsonl")]
    assert reasons == [(1, "Alpha: name a planet.", "response request failed")]

    log.calls.clear()
    assert run("evol", seeds, "--epochs", "3", "--out", out, "--retry-failed", url=server.openai_url) == 0
    assert len(log.calls) == 6  # epoch 3 only: evolve, equal and respond of each lineage
    assert read_jsonl(out / "raw.jsonl")[:3] == second
    store_keys_unique(out)
