"""Shared scheme helpers: list parsing, ROUGE-L near-duplicates, templates, seed and topic readers."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from bezoar.generate.request import GenerateError
from bezoar.generate.schemes import (TEMPLATE_FIELDS, NearDuplicates, lcs_length, load_template, load_templates,
                                     only_stop_words, parse_list, read_records, read_topics, rng_for, rouge_l,
                                     short_refusal, word_tokens)


# ---------------------------------------------------------------------- parse_list
def test_numbered_list_with_preamble_epilogue_and_continuations():
    reply = ("Sure! Here are the tasks you asked for:\n\n"
             "1. Describe how a rainbow forms.\n"
             "2) \"Write a limerick about a cat.\"\n"
             "3. Summarize the text in one sentence:\n"
             "   The river flooded twice this spring.\n"
             "   - it rained a lot\n"
             "4.\n"
             "5. Instruction: Name a prime number.\n"
             "\n"
             "Let me know if you need more!")
    parsed = parse_list(reply)
    assert parsed.items == ["Describe how a rainbow forms.", "Write a limerick about a cat.",
                            "Summarize the text in one sentence:\nThe river flooded twice this spring.\n- it rained a lot",
                            "Name a prime number."]
    assert parsed.empty == 1 and not parsed.malformed and not parsed.cut


@pytest.mark.parametrize("reply,items", [
    ("(1) one thing\n(2) two things", ["one thing", "two things"]),
    ("<1> first task <2> not split inline\n<2> second", ["first task <2> not split inline", "second"]),
    ("[1] alpha\n[2] beta", ["alpha", "beta"]),
    ("Instruction 1: alpha\nInstruction 2: beta", ["alpha", "beta"]),
    ("- alpha\n- beta\n  * inner\n- gamma", ["alpha", "beta\n* inner", "gamma"]),
    ("* alpha\n- part of alpha\n* beta", ["alpha\n- part of alpha", "beta"]),
    ("1. alpha\n\nmore about alpha\n\n2. beta\n\nbye", ["alpha\n\nmore about alpha", "beta"]),
    ("1. `code task`\n2. **bold task**\n3. \u201cquoted\u201d", ["code task", "bold task", "quoted"]),
    ("1. **Task:** alpha\n2. **Instruction**: beta\n3. **Question:** Is **this** bold?",
     ["alpha", "beta", "Is **this** bold?"]),
    ("**1.** alpha\n**2.** beta", ["alpha", "beta"]), ("**Task 1:** alpha\n**Task 2:** beta", ["alpha", "beta"]),
    # a marker opening a bold line, or a heading (both were "not a list": every item of the paid reply lost)
    ("Here they are:\n**1. Write a poem about rain.**\n**2. Summarize the text below.**",
     ["Write a poem about rain.", "Summarize the text below."]),
    ("**1. Bold start** then plain\n**2. Other**", ["**Bold start** then plain", "Other"]),
    ("### 1. Write a poem.\n### 2. Summarize **this** text.", ["Write a poem.", "Summarize **this** text."]),
    ("## Tasks\n\n#### 1) alpha\n#### 2) beta", ["alpha", "beta"]),
])
def test_list_styles(reply, items):
    assert parse_list(reply).items == items


def test_nested_list_of_the_same_style_stays_in_its_item():
    """Material the teacher was told to put inside a task may be a list of its own, numbered or bulleted like
    the outer one; indented (2 columns or more past the outer markers) it belongs to its task."""
    reply = ("1. Rank these cities by population:\n"
             "   1. Paris\n"
             "   2. Rome\n"
             "2. Write a haiku about rain.\n"
             "3. Pick the odd one out:\n"
             "  1) cat\n"
             "  2) dog\n"
             "  3) car")
    assert parse_list(reply).items == ["Rank these cities by population:\n1. Paris\n2. Rome",
                                       "Write a haiku about rain.", "Pick the odd one out:\n1) cat\n2) dog\n3) car"]
    bullets = "- Sort these words:\n  - pear\n  - apple\n- Name a colour."
    assert parse_list(bullets).items == ["Sort these words:\n- pear\n- apple", "Name a colour."]
    # Numbers right-aligned by one space are still the outer list.
    aligned = "".join(f"{i:>2}. task {i}\n" for i in range(1, 12))
    assert parse_list(aligned).items == [f"task {i}" for i in range(1, 12)]
    indented = "  1. alpha\n  2. beta"  # the whole list indented
    assert parse_list(indented).items == ["alpha", "beta"]


@pytest.mark.parametrize("finish,why", [("stop", None), ("end_turn", None), (None, None),
                                        ("length", "cut off at max_tokens"), ("max_tokens", "cut off at max_tokens"),
                                        ("content_filter", "stopped by the provider's filter (finish_reason "
                                                           "content_filter)"),
                                        ("refusal", "stopped by the provider's filter (finish_reason refusal)")])
def test_a_reply_is_whole_unless_cut_off_or_filtered(finish, why):
    """A reply a filter stopped is partial (a list of instructions loses its last item, as a cut-off one does)."""
    from bezoar.generate.request import Result
    from bezoar.generate.schemes import cut_short, truncated

    result = Result(key="k", response="1. alpha\n2. bet", finish_reason=finish)
    assert cut_short(result) == why and truncated(result) is (why is not None)
    assert parse_list(result.response, truncated=truncated(result)).items == (["alpha"] if why else ["alpha", "bet"])


def test_malformed_and_truncated_lists():
    assert parse_list("I cannot think of any tasks.").malformed
    assert parse_list("").malformed and parse_list("").items == []
    cut = parse_list("1. alpha\n2. beta\n3. gam", truncated=True)
    assert cut.items == ["alpha", "beta"] and cut.cut
    assert parse_list("1. ...\n2. ?!\n3. ok").items == ["ok"] and parse_list("1. ...\n2. ?!\n3. ok").empty == 2


def test_times_ratios_and_decimals_that_start_a_line_are_not_markers():
    """A number marker ends at a blank, the end of the line or bold: "10:30 pm", "3:1" or "1.5 litres"
    opening a line of an item are the item's material, not new items."""
    reply = ("1. Convert these times to the 24-hour clock:\n10:30 pm\n11:45 am\n"
             "2. Scale the recipe:\n3:1 flour to butter\n1.5 litres of milk\n"
             "3.**Name** a fruit.\n"
             "4.\n"
             "5. Name a river.")
    parsed = parse_list(reply)
    assert parsed.items == ["Convert these times to the 24-hour clock:\n10:30 pm\n11:45 am",
                            "Scale the recipe:\n3:1 flour to butter\n1.5 litres of milk", "**Name** a fruit.",
                            "Name a river."]
    assert parsed.empty == 1


def test_indented_paragraphs_after_the_last_item_are_its_material():
    """After a blank line, a paragraph indented past the markers belongs to the last item as it does to any
    other; only the unindented paragraphs after the last item (an epilogue) are dropped."""
    passage = "The Industrial Revolution began in Britain.\nIt spread to Europe."
    reply = ("1. Translate to French: good morning\n"
             "2. Summarize the passage below in one sentence.\n\n"
             "   The Industrial Revolution began in Britain.\n   It spread to Europe.\n\n"
             "   Use at most 20 words.\n\n"
             "I hope these help!\n\n   - an indented line of the epilogue")
    assert parse_list(reply).items == ["Translate to French: good morning",
                                       f"Summarize the passage below in one sentence.\n\n{passage}\n\n"
                                       "Use at most 20 words."]
    bullets = "- Name a colour.\n- Sort these words:\n\n  pear, apple, fig\n\nHope this helps."
    assert parse_list(bullets).items == ["Name a colour.", "Sort these words:\n\npear, apple, fig"]
    # A last item whose material the teacher did not indent cannot be told from an epilogue: dropped.
    assert parse_list("1. alpha\n2. beta\n\ngamma").items == ["alpha", "beta"]


@pytest.mark.parametrize("item,cleaned", [
    ('"Carpe diem" and "memento mori"', None),
    ('Explain the difference between "carpe diem" and "memento mori"', None),
    ('"Carpe diem" or "memento mori"?', None),
    ("**Compare** the two sorting algorithms for **nearly sorted input**", None),
    ("`git merge` or `git rebase`: which should a small team use? Explain `rebase`", None),
    ("'Tis a phrase, 'tis", None),
    ('"Write a limerick about a cat."', "Write a limerick about a cat."),
    ("'Don't panic': explain the phrase, 'tis'", None),
    ("'Don't panic, it's fine'", "Don't panic, it's fine"),
    ("**`ls -la`**", "ls -la"), ("\u201cWhy is the sky blue?\u201d", "Why is the sky blue?"),
])
def test_wrapping_quotes_are_removed_only_around_the_whole_item(item, cleaned):
    """Quotes, backticks or bold around the whole item go; an item that starts and ends with separate spans
    keeps them (removing one delimiter at each end would leave them unbalanced)."""
    assert parse_list(f"1. {item}\n2. x").items == [item if cleaned is None else cleaned, "x"]


def test_paths_may_start_with_the_home_folder(tmp_path, monkeypatch):
    """"~/..." is the home folder for every input a scheme reads, as for bezoar.data.load."""
    from bezoar.generate.orca import read_system_messages
    from bezoar.generate.schemes import check_out_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "seeds.jsonl").write_text('{"instruction": "a"}\n')
    (tmp_path / "topics.txt").write_text("Volcanoes\n")
    (tmp_path / "judge.txt").write_text("Rate {response} for {instruction} ({system}).")
    (tmp_path / "system.json").write_text(json.dumps([f"message {i}" for i in range(1, 17)]))
    assert [r["instruction"] for _, r in read_records("~/seeds.jsonl", what="seed file")] == ["a"]
    assert read_topics("~/topics.txt") == ["Volcanoes"]
    assert load_template("judge", "~/judge.txt").text.startswith("Rate {response}")
    assert read_system_messages("~/system.json")[0] == "message 1"
    assert check_out_dir("~/out", [], ["raw.jsonl"]) == tmp_path / "out"
    with pytest.raises(GenerateError, match="is one of the files the command writes"):
        check_out_dir("~", ["~/seeds.jsonl"], ["seeds.jsonl"])


# ---------------------------------------------------------------------- near-duplicates
def _lcs_table(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def test_bit_parallel_lcs_equals_the_table():
    rng = random.Random(0)
    for _ in range(3000):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _lcs_table(a, b), (a, b)


def test_rouge_l_values():
    a, b = word_tokens("Explain why the sky looks red at sunset."), word_tokens("Explain why the sky looks so red at sunset")
    assert lcs_length(a, b) == 8
    assert rouge_l(a, b) == pytest.approx(16 / 17)
    assert rouge_l(a, a) == 1.0 and rouge_l(a, []) == 0.0
    assert lcs_length("a b c d".split(), "b d a c".split()) == 2


def _greedy_bruteforce(texts, refs, threshold):
    kept_tokens = [word_tokens(r) for r in refs if word_tokens(r)]
    out = []
    for text in texts:
        tokens = word_tokens(text)
        if not tokens:
            out.append("empty")
        elif any(tokens == k for k in kept_tokens):
            out.append("duplicate")
        elif any(rouge_l(tokens, k) >= threshold for k in kept_tokens):
            out.append("near-duplicate")
        else:
            kept_tokens.append(tokens)
            out.append("kept")
    return out


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
@pytest.mark.parametrize("trial", range(3))
def test_prefix_filtered_dedup_equals_all_pairs(threshold, trial):
    """The candidate index must never miss a pair the all-pairs rule would catch."""
    rng = random.Random(f"{threshold}:{trial}")
    vocab = [f"w{i}" for i in range(14)] + ["the", "a", "of"] * 3
    base = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12))) for _ in range(60)]
    texts = []
    for text in base:  # near variants: drop, swap or add a word
        words = text.split()
        texts.append(text)
        variant = list(words)
        op = rng.randrange(3)
        if op == 0 and len(variant) > 1:
            variant.pop(rng.randrange(len(variant)))
        elif op == 1:
            variant.insert(rng.randrange(len(variant) + 1), rng.choice(vocab))
        else:
            rng.shuffle(variant)
        texts.append(" ".join(variant))
    texts.append("!!")
    refs = texts[:5]
    verdicts = NearDuplicates(threshold).check(texts[5:], refs)
    assert [v.status for v in verdicts] == _greedy_bruteforce(texts[5:], refs, threshold)
    assert {v.status for v in verdicts} >= {"kept", "near-duplicate", "duplicate", "empty"}


def test_near_duplicate_verdicts_name_the_match():
    verdicts = NearDuplicates(0.7).check(
        ["Describe how a rainbow forms.", "Please describe how a rainbow forms.", "DESCRIBE how a rainbow forms!",
         "Explain why the sky looks so red at sunset.", "Write a haiku about snow."],
        references=["Explain why the sky looks red at sunset."])
    assert [v.status for v in verdicts] == ["kept", "near-duplicate", "duplicate", "near-duplicate", "kept"]
    assert verdicts[1].similar_to == "Describe how a rainbow forms." and verdicts[1].similarity == pytest.approx(10 / 11,
                                                                                                             abs=1e-4)
    assert verdicts[3].similar_to == "Explain why the sky looks red at sunset."
    with pytest.raises(GenerateError):
        NearDuplicates(0.0)


def test_protected_texts_never_lose_to_unprotected_ones():
    texts = ["Please describe how a rainbow forms.", "Write a haiku about snow.", "Describe how a rainbow forms.",
             "Write a haiku about snow!", "Describe how a rainbow forms!"]
    plain = NearDuplicates(0.7).check(texts)
    assert [v.status for v in plain] == ["kept", "kept", "near-duplicate", "duplicate", "near-duplicate"]
    # Text 2 is protected (its answer is paid): text 0 comes first but is the one dropped, naming it.
    verdicts = NearDuplicates(0.7).check(texts, protected=[2])
    assert [v.status for v in verdicts] == ["near-duplicate", "kept", "kept", "duplicate", "duplicate"]
    assert verdicts[0].similar_to == "Describe how a rainbow forms." and verdicts[4].similar_to == texts[2]
    # Protected texts are compared among themselves in order; references still win.
    verdicts = NearDuplicates(0.7).check(texts, references=["Describe how a rainbow forms"], protected=[0, 2])
    assert [v.status for v in verdicts] == ["near-duplicate", "kept", "duplicate", "duplicate", "duplicate"]
    # Protecting texts the plain walk keeps changes nothing.
    assert NearDuplicates(0.7).check(texts, protected=[0, 1]) == plain


# ---------------------------------------------------------------------- response checks, rng
@pytest.mark.parametrize("text,refusal", [
    ("I'm sorry, but I cannot help with that request.", True),
    ("I can\u2019t do that.", True),
    ("As an AI, I have no opinion.", True),
    ("Sorry " + "word " * 90, False),  # long answers that apologise once are answers
    ("Paris is the capital of France.", False),
])
def test_short_refusal(text, refusal):
    assert short_refusal(text) is refusal


@pytest.mark.parametrize("text,only", [("", True), ("...!?", True), ("It is, of the.", True), ("Yes, it is!", True),
                                       ("It is blue.", False), ("42", False)])
def test_only_stop_words(text, only):
    assert only_stop_words(text) is only


def test_rng_for_is_stable():
    assert rng_for(3, "evol", 1, 7).random() == rng_for(3, "evol", 1, 7).random()
    assert rng_for(3, "evol", 1, 7).random() != rng_for(3, "evol", 1, 8).random()
    # The same draw in every process and Python version that hashes str seeds with SHA-512.
    assert rng_for(0, "x").randrange(10**6) == random.Random("0:x").randrange(10**6)


# ---------------------------------------------------------------------- templates
@pytest.mark.parametrize("name", list(TEMPLATE_FIELDS))
def test_shipped_templates_have_their_placeholders(name):
    template = load_template(name)
    values = {field: f"<{field.upper()}>" for field in TEMPLATE_FIELDS[name]}
    text = template.render(**values)
    assert all(v in text for v in values.values()) and "{" not in text


def test_user_template_checks_and_renders_only_its_fields(tmp_path):
    good = tmp_path / "mine.txt"
    good.write_text('Rate {response} for {instruction} ({system}); reply as {"score": N}.')
    assert load_templates(["judge"], [str(good)])["judge"].render(system="s", instruction="i", response="r") == \
        'Rate r for i (s); reply as {"score": N}.'
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate {response}.")
    with pytest.raises(GenerateError, match=r"bad.txt \(judge\) lacks the placeholder\(s\) \{system\}, \{instruction\}"):
        load_templates(["judge"], [str(bad)])
    with pytest.raises(GenerateError, match="unknown template 'nope'"):
        load_templates(["evol_depth", "evol_breadth"], [f"nope={good}"])
    with pytest.raises(GenerateError, match="give NAME=FILE"):
        load_templates(["evol_depth", "evol_breadth"], [str(good)])
    with pytest.raises(GenerateError, match="cannot read template"):
        load_templates(["judge"], [str(tmp_path / "missing.txt")])
    assert load_template("evol_depth").markers() == ["Original Instruction"]


# ---------------------------------------------------------------------- readers
def test_read_records_names_file_and_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"instruction": "a"}\n\n["not", "an", "object"]\n')
    with pytest.raises(GenerateError, match=rf"{path} line 3: expected a JSON object"):
        read_records(path, what="seed file")
    path.write_text('{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(GenerateError, match=rf"{path} line 2: not valid JSON"):
        read_records(path, what="seed file")
    # A bad byte deep in a big file: the message names its line and the byte within that line.
    lines = [b'{"instruction": "task %d"}\n' % i for i in range(3000)]
    lines[2500] = b'{"instruction": "caf\xe9"}\n'
    path.write_bytes(b"".join(lines))
    with pytest.raises(GenerateError, match=rf"{path} line 2501: not UTF-8 text \(invalid continuation byte at byte 21 "
                                            r"of the line\)"):
        read_records(path, what="seed file")
    path.write_text("\n\n")
    with pytest.raises(GenerateError, match="holds no records"):
        read_records(path, what="seed file")
    with pytest.raises(GenerateError, match="file not found"):
        read_records(tmp_path / "nope.jsonl", what="seed file")


def test_read_records_other_formats_go_through_the_data_loader(tmp_path):
    path = tmp_path / "seeds.json"
    path.write_text('[{"instruction": "a"}, {"instruction": "b"}]')
    assert [r["instruction"] for _, r in read_records(path, what="seed file")] == ["a", "b"]
    path.write_text('[{"instruction": "a"}, 3]')
    with pytest.raises(GenerateError, match="record 1"):
        read_records(path, what="seed file")


def test_read_topics(tmp_path):
    path = tmp_path / "topics.txt"
    path.write_text("# comment\nVolcanoes\n\n  Sleep  \nVolcanoes\n")
    assert read_topics(path) == ["Volcanoes", "Sleep"]
    path.write_text("Volcanoes\n" + "x" * 300 + "\n")
    with pytest.raises(GenerateError, match=rf"{path} line 2: a topic is a short phrase"):
        read_topics(path)
    jsonl = tmp_path / "topics.jsonl"
    jsonl.write_text('{"topic": "Rivers"}\n{"name": "Lakes"}\n')
    with pytest.raises(GenerateError, match=rf"{jsonl} line 2: topic record has no 'topic' field"):
        read_topics(jsonl)


@pytest.mark.parametrize("a,b", list(itertools.combinations(["x y z", "x z y", "z"], 2)))
def test_rouge_is_symmetric(a, b):
    assert rouge_l(a.split(), b.split()) == rouge_l(b.split(), a.split())


# ---------------------------------------------------------------------- commands on the shipped samples
@pytest.mark.parametrize("command", ["lamini", "evol", "orca", "filter"])
def test_command_help(command, capsys):
    from bezoar.generate.__main__ import main

    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("command,model", [("lamini", "teacher"), ("evol", "teacher"), ("orca", "teacher"),
                                           ("filter", "judge")])
def test_sampling_help_names_whose_answers_it_sets(command, model):
    # filter's --temperature and --max-tokens are the judge's: its help said the teacher's.
    import argparse

    from bezoar.generate.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    helps = {flag: action.help for action in sub._actions for flag in action.option_strings}
    other = {"teacher": "judge", "judge": "teacher"}[model]
    for flag in ("--temperature", "--max-tokens"):
        assert model in helps[flag] and other not in helps[flag], (flag, helps[flag])


def test_shipped_samples_through_every_scheme_and_the_filter(fake_server, tmp_path):
    """The demo path of scripts/openbezoar.sh: shipped samples, a scripted teacher and judge, SFT-ready files."""
    from bezoar.data import DataConfig, read_examples
    from bezoar.generate.schemes import SAMPLES
    from tests.generate.demo_teacher import demo_teacher
    from tests.generate.schemes_helpers import read_jsonl, run

    server = fake_server(reply=demo_teacher)
    url = server.openai_url
    data = tmp_path / "data"
    assert run("lamini", SAMPLES / "lamini_seeds.jsonl", "--topics", SAMPLES / "topics.txt", "--example-guided", "2",
               "--topic-guided", "2", "--per-request", "8", "--out", data / "lamini", url=url) == 0
    assert run("evol", SAMPLES / "dolly_seeds.jsonl", "--epochs", "2", "--out", data / "evol", url=url) == 0
    assert run("orca", SAMPLES / "flan_queries.jsonl", "--cap-per-task", "2", "--out", data / "orca", url=url) == 0
    for scheme, fmt, at_least in (("lamini", "lamini", 15), ("evol", "evol", 10), ("orca", "orca", 10)):
        raw = read_jsonl(data / scheme / "raw.jsonl")
        assert len(raw) >= at_least, (scheme, len(raw))
        assert run("filter", data / scheme / "raw.jsonl", "--out", data / scheme, url=url) == 0
        kept = read_jsonl(data / scheme / "filtered.jsonl")
        assert 0 < len(kept) < len(raw) and all(r["judge_score"] >= 7 for r in kept)
        examples, _ = read_examples(DataConfig(path=str(data / scheme / "filtered.jsonl"), format=fmt))
        assert len(examples) == len(kept)


def test_inputs_with_a_byte_order_mark(tmp_path):
    """A UTF-8 byte-order mark at the start of a seed, topic or template file is not part of its text."""
    bom = b"\xef\xbb\xbf"
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(bom + b'{"instruction": "a"}\n{"instruction": "b"}\n')
    assert [r["instruction"] for _, r in read_records(seeds, what="seed file")] == ["a", "b"]
    topics = tmp_path / "topics.txt"
    topics.write_bytes(bom + b"Volcanoes\nSleep\n")
    assert read_topics(topics) == ["Volcanoes", "Sleep"]
    name = next(iter(TEMPLATE_FIELDS))
    shipped = load_template(name)
    mine = tmp_path / "mine.txt"
    mine.write_bytes(bom + shipped.text.encode())
    assert load_template(name, mine).text == shipped.text


def test_an_output_is_renamed_into_place_durably(tmp_path, monkeypatch):
    """The rename that puts an output in place is synced too (the folder), not only the file's bytes:
    otherwise a power cut after the run may leave the old output, or none."""
    import os

    from bezoar.generate.schemes import write_jsonl

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    write_jsonl(tmp_path / "out" / "a.jsonl", [{"a": 1}])
    assert os.stat(tmp_path / "out").st_ino in synced


def test_outputs_holding_half_an_emoji_are_written_and_read_back(tmp_path):
    """A teacher's answer that ends in a lone surrogate (valid JSON, but no UTF-8) reaches the scheme's
    outputs escaped, so writing the dataset does not stop the run, and reads back as the same text;
    other records keep their characters as they are."""
    import json

    from bezoar.generate.schemes import write_json, write_jsonl

    records = [{"response": "caf\u00e9 \ud83d"}, {"response": "caf\u00e9"}]
    assert write_jsonl(tmp_path / "a.jsonl", records) == 2
    raw = (tmp_path / "a.jsonl").read_bytes()
    raw.decode("utf-8")  # valid UTF-8
    assert [json.loads(line) for line in raw.splitlines()] == records
    assert "caf\u00e9\"" in raw.decode("utf-8").splitlines()[1]  # unescaped where it can be
    write_json(tmp_path / "b.json", {"rows": records})
    assert json.loads((tmp_path / "b.json").read_bytes().decode("utf-8")) == {"rows": records}
