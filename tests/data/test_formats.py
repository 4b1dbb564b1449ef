"""Templates, field mapping, HH-RLHF parsing and pair split, tokenization, masking and truncation."""

from __future__ import annotations

import pytest

from bezoar.data import (DEFAULT_SYSTEM, DataConfig, DataError, PairExample, PromptTemplate, Record, SFTExample,
                         build_documents, encode_pairs, encode_prompt_response, encode_sft, load_records,
                         parse_hh, read_examples, split_hh_pair)
from bezoar.data.encode import fit_budget
from bezoar.data.formats import FIELD_PRESETS, hh_instruction

T = PromptTemplate()
SHORT = PromptTemplate(system="Be helpful.")  # the default system line is ~100 tiny-vocab tokens


def test_template_text():
    assert T.render("Do X.") == f"### System:\n{DEFAULT_SYSTEM}\n\n### Instruction:\nDo X.\n\n### Response:\n"
    assert T.render("  Do X. ", input=" ctx ", system="Be brief.") == (
        "### System:\nBe brief.\n\n### Instruction:\nDo X.\n\nctx\n\n### Response:\n")
    assert T.render("Do X.", input="", system="  ") == T.render("Do X.")  # empty system/input: defaults
    assert PromptTemplate(system="").render("Do X.") == "### Instruction:\nDo X.\n\n### Response:\n"
    assert PromptTemplate(style="raw").render("Q: hi\nA:", input="more") == "Q: hi\nA:\n\nmore"


@pytest.mark.parametrize("file, fmt, first_instruction, first_response, system", [
    ("lamini.jsonl", "lamini", "Name three fruits that are red.", "Strawberries, cherries and raspberries are red.", None),
    ("evol_instruct.jsonl", "evol", "List two differences", "A river moves water", None),
    ("orca.jsonl", "orca", "If a train leaves at 3 pm", "It leaves at 3 pm.", "You are an AI assistant. Explain"),
    ("alpaca.json", "alpaca", "Classify the sentiment of the sentence.\n\nI loved every minute", "Positive", None),
    ("lamini.jsonl", "instruction", "Name three fruits that are red.", "Strawberries", None),
    ("evol_instruct.jsonl", "instruction", "List two differences", "A river moves water", None),
    ("orca.jsonl", "instruction", "If a train leaves at 3 pm", "It leaves at 3 pm.", "You are an AI assistant."),
    ("alpaca.json", "instruction", "Classify the sentiment of the sentence.\n\nI loved", "Positive", None),
])
def test_each_source_format_loads(samples, file, fmt, first_instruction, first_response, system):
    examples, skipped = read_examples(DataConfig(path=str(samples / file), format=fmt))
    assert not skipped and len(examples) == len(load_records(samples / file))
    ex = examples[0]
    assert isinstance(ex, SFTExample) and ex.response.startswith(first_response)
    assert f"### Instruction:\n{first_instruction}" in ex.prompt and ex.prompt.endswith("### Response:\n")
    if system:
        assert ex.prompt.startswith(f"### System:\n{system}") and DEFAULT_SYSTEM not in ex.prompt
    else:
        assert ex.prompt.startswith(f"### System:\n{DEFAULT_SYSTEM}\n\n")


def test_raw_style_keeps_text_as_given(tmp_path):
    # Already formatted data: the whitespace between prompt and response is part of what the model learns.
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "### Human: Say hi.\\n### Assistant:\\n", "response": "Hi there.\\n"}\n'
                 '{"instruction": "Q: 2+2?\\nA:", "response": " 4"}\n')
    ex, _ = read_examples(DataConfig(path=str(p), template=PromptTemplate(style="raw")))
    assert (ex[0].prompt, ex[0].response) == ("### Human: Say hi.\n### Assistant:\n", "Hi there.\n")
    assert ex[1].prompt + ex[1].response == "Q: 2+2?\nA: 4"
    assert PromptTemplate(style="raw").render("Q: hi\nA: ", input="  ") == "Q: hi\nA: "


def test_orca_system_variants(samples):
    examples, _ = read_examples(DataConfig(path=str(samples / "orca.jsonl"), format="orca"))
    assert DEFAULT_SYSTEM in examples[2].prompt  # empty system_prompt -> the default line
    assert examples[3].prompt.startswith("### System:\nYou are a teacher")  # "system" field name


def test_field_overrides(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"q": "Hi?", "a": "Hello.", "sys": "S."}\n')
    ex, _ = read_examples(DataConfig(path=str(p), fields={"instruction": "q", "response": ["a"], "system": "sys"}))
    assert ex[0].prompt == "### System:\nS.\n\n### Instruction:\nHi?\n\n### Response:\n" and ex[0].response == "Hello."
    with pytest.raises(DataError, match="unknown role"):
        read_examples(DataConfig(path=str(p), fields={"answer": "a"}))
    with pytest.raises(DataError, match="applies to instruction formats"):
        read_examples(DataConfig(path=str(p), format="hh", fields={"instruction": "q"}))


def test_record_missing_fields_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "answer_text": "d"}\n')
    with pytest.raises(DataError) as e:
        read_examples(DataConfig(path=str(p), format="lamini"))
    assert str(e.value).startswith(f"{p}:2: record has no response field (looked for 'response')")
    assert "'answer_text'" in str(e.value)
    p.write_text('{"instruction": 3, "response": "b"}\n')
    with pytest.raises(DataError, match=rf"^{p}:1: field 'instruction' \(instruction\) must be a string, got int"):
        read_examples(DataConfig(path=str(p)))
    p.write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataError, match=rf"^{p}:1: record has no 'rejected' field"):
        read_examples(DataConfig(path=str(p), format="pairs"))
    p.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match=rf"^{p}:1: record has no 'chosen' field"):
        read_examples(DataConfig(path=str(p), format="hh"))


def test_skip_bad_records(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c"}\n{"chosen": "x"}\n')
    examples, skipped = read_examples(DataConfig(path=str(p), skip_bad_records=True))
    assert len(examples) == 1 and skipped == [f"{p}:2", f"{p}:3"]
    p.write_text('{"instruction": "c"}\n')
    with pytest.raises(DataError, match="no usable records"):
        read_examples(DataConfig(path=str(p), skip_bad_records=True))
    # Lines that cannot be read at all (torn JSON, not an object, not UTF-8) are bad records too.
    p.write_bytes(b'{"instruction": "a", "response": "b"}\n{"instruction": "c", "resp\n[1]\n'
                  b'{"instruction": "\xff", "response": "b"}\n{"instruction": "d", "response": "e"}\n{"x": 1}\n')
    examples, skipped = read_examples(DataConfig(path=str(p), skip_bad_records=True))
    assert [e.response for e in examples] == ["b", "e"] and skipped == [f"{p}:{n}" for n in (2, 3, 4, 6)]
    with pytest.raises(DataError, match=rf"^{p}:2: not valid JSON"):
        read_examples(DataConfig(path=str(p)))
    j = tmp_path / "x.json"
    j.write_text('[{"instruction": "a", "response": "b"}, 3, {"instruction": "c", "response": "d"}]')
    examples, skipped = read_examples(DataConfig(path=str(j), skip_bad_records=True, limit=2))
    assert [e.response for e in examples] == ["b", "d"] and skipped == [f"{j}: record 1"]
    p.write_text('{"instruction": \n')
    with pytest.raises(DataError, match=rf"^{p}: the dataset is empty \(no records; 1 unreadable ones skipped, first {p}:1"):
        read_examples(DataConfig(path=str(p), skip_bad_records=True))



@pytest.mark.parametrize("fmt, line", [
    ("lamini", '{"instruction": "a\\ud800b", "response": "x"}'),
    ("lamini", '{"instruction": "a", "response": "x\\udc00"}'),
    ("pairs", '{"prompt": "p", "chosen": "a", "rejected": "b\\ud83d"}'),
    ("pairs", '{"prompt": "p", "chosen": "a", "rejected": "b", "system": "\\udfff"}'),
    ("hh_pairs", '{"chosen": "\\n\\nHuman: hi\\ud800\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}'),
])
def test_lone_surrogate_escape_is_a_data_error_naming_the_field(tmp_path, tokenizer, fmt, line):
    # JSON allows "\ud800" escapes that decode to a lone surrogate, which is not text: sentencepiece failed on it
    # with a TypeError traceback (and skip_bad_records did not skip it).
    p = tmp_path / "x.jsonl"
    good = ('{"instruction": "q", "response": "r"}' if fmt == "lamini"
            else '{"prompt": "q", "chosen": "r", "rejected": "s"}' if fmt == "pairs"
            else '{"chosen": "\\n\\nHuman: q\\n\\nAssistant: r", "rejected": "\\n\\nHuman: q\\n\\nAssistant: s"}')
    p.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"^{p}:2: field '\w+'.*lone surrogate"):
        build_documents(DataConfig(path=str(p), format=fmt), tokenizer)
    docs, stats = build_documents(DataConfig(path=str(p), format=fmt, skip_bad_records=True), tokenizer)
    assert stats.kept == 1 and stats.skipped_records == 1


# ---- HH-RLHF -----------------------------------------------------------------------------------------------


def test_parse_hh_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello! \n\nHuman: Name a fruit.\n\nAssistant: An apple."
    assert parse_hh(text) == [("human", "Hi there"), ("assistant", "Hello!"), ("human", "Name a fruit."),
                              ("assistant", "An apple.")]
    assert hh_instruction(parse_hh(text)[:1]) == "Hi there"
    assert hh_instruction(parse_hh(text)[:3]) == "Human: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit."


@pytest.mark.parametrize("text, match", [
    ("just text", "not an HH-RLHF transcript"),
    ("preamble\n\nHuman: a\n\nAssistant: b", "text before its first turn"),
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "ends with a Human turn"),
    ("\n\nAssistant: b", "no Human turn before"),
    ("\n\nHuman: a", "no Assistant turn"),
])
def test_bad_hh_transcripts(tmp_path, text, match):
    p = tmp_path / "hh.jsonl"
    import json

    p.write_text(json.dumps({"chosen": "\n\nHuman: ok\n\nAssistant: ok"}) + "\n" + json.dumps({"chosen": text}) + "\n")
    with pytest.raises(DataError, match=rf"^{p}:2: .*{match}"):
        read_examples(DataConfig(path=str(p), format="hh"))


@pytest.mark.parametrize("fmt, style", [("hh", "raw"), ("hh_pairs", "openbezoar"), ("hh_pairs", "raw")])
def test_hh_transcript_ending_with_human_turn_is_an_error(tmp_path, fmt, style):
    # The SFT path with the template refuses it; the others must too, not train a Human turn as the answer.
    import json

    ends_with_human = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c"
    p = tmp_path / "hh.jsonl"
    p.write_text(json.dumps({"chosen": ends_with_human, "rejected": ends_with_human}) + "\n")
    with pytest.raises(DataError, match=rf"^{p}:1: HH-RLHF (chosen )?transcript ends with a Human turn"):
        read_examples(DataConfig(path=str(p), format=fmt, template=PromptTemplate(style=style)))


def test_hh_sft_examples(samples):
    examples, _ = read_examples(DataConfig(path=str(samples / "hh_rlhf.jsonl"), format="hh"))
    assert examples[0].prompt == T.render("How do I keep basil alive indoors?")
    assert examples[0].response.startswith("Give it a sunny window")
    assert "Human: What is a good name for a cat?\n\nAssistant: Some popular choices" in examples[1].prompt
    assert examples[1].prompt.endswith("Human: Something more unusual?\n\n### Response:\n")
    assert examples[1].response == "You could try Pistachio, Juniper or Captain."
    raw, _ = read_examples(DataConfig(path=str(samples / "hh_rlhf.jsonl"), format="hh",
                                      template=PromptTemplate(style="raw")))
    assert raw[3].prompt == "\n\nHuman: How many legs does a spider have?\n\nAssistant:" and raw[3].response == " Eight."


def test_split_hh_pair(samples):
    rec = load_records(samples / "hh_rlhf.jsonl")[1].data
    prompt, chosen, rejected = split_hh_pair(rec["chosen"], rec["rejected"])
    assert prompt.endswith("\n\nHuman: Something more unusual?\n\nAssistant:") and prompt.startswith("\n\nHuman: What")
    assert chosen == " You could try Pistachio, Juniper or Captain." and rejected == " Cat."
    assert prompt + chosen == rec["chosen"] and prompt + rejected == rec["rejected"]
    with pytest.raises(DataError, match=r"different prompts \(they first differ at character 9"):
        split_hh_pair("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: y", origin="f.jsonl:7")


def test_hh_pairs_and_generic_pairs(samples):
    pairs, _ = read_examples(DataConfig(path=str(samples / "hh_rlhf.jsonl"), format="hh_pairs"))
    assert isinstance(pairs[0], PairExample)
    assert pairs[1].prompt.endswith("Human: Something more unusual?\n\n### Response:\n")
    assert (pairs[1].chosen, pairs[1].rejected) == ("You could try Pistachio, Juniper or Captain.", "Cat.")
    generic, _ = read_examples(DataConfig(path=str(samples / "pairs.json"), format="pairs"))
    assert generic[1].prompt == T.render("Name a primary color.", system="Answer with one word.")
    assert (generic[1].chosen, generic[1].rejected) == ("Red.", "Purple.")


# ---- tokenization and masking --------------------------------------------------------------------------------


def _decode_loss_tokens(tokenizer, docs, d):
    ids = docs.doc_tokens(d)
    mask = docs.loss_mask[docs.doc_offset[d]: docs.doc_offset[d] + docs.doc_length[d]]
    return ids, mask, tokenizer.decode([int(i) for i, m in zip(ids, mask) if m])


@pytest.mark.parametrize("file, fmt", [("lamini.jsonl", "lamini"), ("orca.jsonl", "orca"), ("alpaca.json", "alpaca"),
                                       ("hh_rlhf.jsonl", "hh"), ("evol_instruct.jsonl", "evol")])
def test_loss_only_on_response_tokens(tokenizer, samples, file, fmt):
    cfg = DataConfig(path=str(samples / file), format=fmt, max_seq_len=512)
    examples, _ = read_examples(cfg)
    docs, stats = build_documents(cfg, tokenizer)
    assert stats.kept == len(examples) and docs.num_docs == len(examples)
    for d, ex in enumerate(examples):
        ids, mask, text = _decode_loss_tokens(tokenizer, docs, d)
        assert text == ex.response  # the masked-in tokens decode to the response (EOS is skipped by decode)
        assert ids[0] == tokenizer.bos_id and not mask[0] and ids[-1] == tokenizer.eos_id and mask[-1]
        n_prompt = int((~mask).sum())
        assert list(ids[:n_prompt]) == tokenizer.encode(ex.prompt, bos=True)  # what generation will see
        assert list(ids) == tokenizer.encode(ex.prompt + ex.response, bos=True, eos=True)  # one-call encoding
        assert mask[n_prompt:].all()  # the loss region is one contiguous tail


def test_response_not_encoded_with_dummy_prefix(tokenizer):
    prompt = T.render("Say hi.")
    (p, r, merged), = encode_prompt_response(tokenizer, [prompt], ["Hello there."])
    assert not merged and r != tokenizer.encode("Hello there.")  # a separate encode would add the "▁" prefix
    assert tokenizer.decode(r) == "Hello there."


def test_eos_option(tokenizer):
    ex = [SFTExample(T.render("Say hi."), "Hello.")]
    with_eos, _ = encode_sft(ex, tokenizer, 256, eos=True)
    without, _ = encode_sft(ex, tokenizer, 256, eos=False)
    assert with_eos.doc_tokens(0)[-1] == tokenizer.eos_id and without.doc_tokens(0)[-1] != tokenizer.eos_id
    assert with_eos.doc_length[0] == without.doc_length[0] + 1


@pytest.mark.parametrize("p, r, max_len, max_prompt, expect", [
    (10, 5, 20, 10, (10, 5)),       # fits
    (30, 5, 20, 10, (15, 5)),       # prompt cut from the left only as far as needed
    (30, 30, 20, 10, (10, 10)),     # both long: prompt keeps max_prompt_len, response the rest
    (5, 30, 20, 10, (5, 15)),       # short prompt kept whole, response cut from the right
    (30, 30, 20, 19, (19, 1)),
])
def test_fit_budget(p, r, max_len, max_prompt, expect):
    assert fit_budget(p, r, max_len, max_prompt) == expect


def test_truncation_policy_and_drops(tokenizer):
    long_instruction = " ".join(["the red cat sleeps"] * 40)
    long_response = " ".join(["the blue dog runs"] * 40)
    examples = [
        SFTExample(SHORT.render(long_instruction), "Short answer."),
        SFTExample(SHORT.render("Short?"), long_response),
        SFTExample(SHORT.render("Fine?"), "Yes."),
        SFTExample(SHORT.render("Empty?"), "   "),
    ]
    max_len = 64
    docs, stats = encode_sft(examples, tokenizer, max_len, max_prompt_len=32)
    assert (stats.examples, stats.kept, stats.truncated, stats.dropped_empty_response) == (4, 3, 2, 1)
    # Of the two cut, only the second lost the end of its response (and so its EOS): the log says so.
    assert stats.responses_cut == 1 and "2 truncated (1 inside the response, which then ends without EOS)" in \
        stats.summary()
    assert docs.doc_length.max() <= max_len and list(docs.doc_example) == [0, 1, 2]
    # 0: prompt cut from the left (BOS kept, the end with the Response header kept), response whole
    ids, mask, text = _decode_loss_tokens(tokenizer, docs, 0)
    full_prompt = tokenizer.encode(examples[0].prompt, bos=True)
    n_prompt = int((~mask).sum())
    assert ids[0] == tokenizer.bos_id and list(ids[1:n_prompt]) == full_prompt[len(full_prompt) - (n_prompt - 1):]
    assert text == "Short answer." and ids[-1] == tokenizer.eos_id and len(ids) == max_len
    # 1: prompt whole, response cut from the right (and so no EOS)
    ids, mask, text = _decode_loss_tokens(tokenizer, docs, 1)
    assert list(ids[: int((~mask).sum())]) == tokenizer.encode(examples[1].prompt, bos=True)
    assert long_response.startswith(text) and ids[-1] != tokenizer.eos_id and len(ids) == max_len
    # Both long: the prompt keeps max_prompt_len tokens (its end), the response the rest (its start).
    both = [SFTExample(examples[0].prompt, long_response)]
    docs, stats = encode_sft(both, tokenizer, max_len, max_prompt_len=20)
    ids, mask, text = _decode_loss_tokens(tokenizer, docs, 0)
    assert int((~mask).sum()) == 20 and len(ids) == max_len and long_response.startswith(text)
    # The response always keeps at least max_len - max_prompt_len tokens: nothing is dropped for length.
    docs, stats = encode_sft(examples[:1], tokenizer, 8, max_prompt_len=7)
    assert stats.kept == 1 and docs.doc_length[0] == 8 and docs.loss_mask.sum() == 1
    with pytest.raises(ValueError, match="max_prompt_len"):
        encode_sft(examples[:1], tokenizer, 8, max_prompt_len=8)


def test_pairs_encoding(tokenizer):
    pairs = [PairExample(SHORT.render("Color?"), "Red.", "Purple, obviously, and also green."),
             PairExample(SHORT.render(" ".join(["the red cat sleeps"] * 40)), "Yes.", "No."),
             PairExample(SHORT.render("x"), "", "No.")]
    docs, stats = encode_pairs(pairs, tokenizer, 64, max_prompt_len=20)
    assert (stats.kept, stats.dropped_empty_response, stats.truncated, stats.responses_cut) == (2, 1, 1, 0)
    assert docs.num_items == 2 and docs.num_docs == 4
    assert list(docs.doc_part) == [0, 1, 0, 1] and list(docs.doc_example) == [0, 0, 1, 1]
    for item, pair in enumerate(pairs[:2]):
        c, r = docs.item_docs(item)
        for d, resp in ((c, pair.chosen), (r, pair.rejected)):
            ids, mask, text = _decode_loss_tokens(tokenizer, docs, d)
            assert text == resp and len(ids) <= 64
        n_c = int((~_decode_loss_tokens(tokenizer, docs, c)[1]).sum())
        n_r = int((~_decode_loss_tokens(tokenizer, docs, r)[1]).sum())
        assert list(docs.doc_tokens(c)[:n_c]) == list(docs.doc_tokens(r)[:n_r])  # one shared prompt cut


def test_pairs_that_are_the_same_tokens_are_dropped_and_counted(tokenizer):
    """A pair whose chosen and rejected documents come out as the same tokens (equal texts, or a cut inside
    a long shared start) has a DPO margin of 0 under any weights: it is dropped and counted, not trained."""
    shared = " ".join(["the red cat sleeps"] * 20)
    pairs = [PairExample(SHORT.render("Color?"), "Red.", "Red."),
             PairExample(SHORT.render("Story?"), shared + " and wakes.", shared + " and dreams."),
             PairExample(SHORT.render("Color?"), "Red.", "Blue.")]
    docs, stats = encode_pairs(pairs, tokenizer, 40, max_prompt_len=10)
    assert (stats.examples, stats.kept, stats.dropped_identical_pair) == (3, 1, 2)
    assert docs.num_items == 1 and list(docs.doc_example) == [2, 2]
    assert "2 dropped (chosen = rejected" in stats.summary()
    docs, stats = encode_pairs(pairs, tokenizer, 400)  # room for the whole responses: only the equal pair goes
    assert (stats.kept, stats.dropped_identical_pair) == (2, 1)


# ---- the config-driven path ------------------------------------------------------------------------------------


def test_build_documents_for_hh_pairs_fits_rows(tokenizer, samples):
    from bezoar.data import make_loader

    cfg = DataConfig(path=str(samples / "hh_rlhf.jsonl"), format="hh_pairs", max_seq_len=256,
                     template=SHORT)
    assert cfg.document_len == 128
    docs, stats = build_documents(cfg, tokenizer)
    assert docs.num_items == 4 and docs.num_docs == 8 and stats.kept == 4
    assert docs.item_lengths().max() <= 256
    batches = list(make_loader(docs, cfg, tokenizer, batch_size=2))
    assert sum(len(b["doc_table"]) for b in batches) == 8


def test_everything_dropped_is_an_error(tmp_path, tokenizer):
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": "  "}\n')
    with pytest.raises(DataError, match=r"every example was dropped"):
        build_documents(DataConfig(path=str(p)), tokenizer)
    with pytest.raises(DataError, match=r"data.path is empty"):
        build_documents(DataConfig(), tokenizer)


def test_everything_dropped_names_the_reason_not_length(tmp_path, tokenizer):
    # Nothing is dropped for length (the truncation policy cuts instead); the error blamed "the length limits"
    # for responses that were empty or pairs whose chosen equals rejected, sending the user to max_seq_len.
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": "  "}\n')
    with pytest.raises(DataError) as e:
        build_documents(DataConfig(path=str(p), max_seq_len=16), tokenizer)
    assert "length" not in str(e.value) and "1 dropped (empty response)" in str(e.value)
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": "b"}\n')
    with pytest.raises(DataError) as e:
        build_documents(DataConfig(path=str(p), format="pairs"), tokenizer)
    assert "length" not in str(e.value) and "1 dropped (chosen = rejected" in str(e.value)


@pytest.mark.parametrize("style", ["openbezoar", "raw"])
def test_examples_with_an_empty_instruction_are_dropped_and_counted(tmp_path, tokenizer, style):
    """An empty instruction, an empty Human turn before the answer, or an empty pairs prompt was trained as an
    answer to nothing ("### Instruction:\\n\\n\\n### Response:\\n"), unlike an empty response, which is dropped."""
    template = PromptTemplate(style=style, system="Be helpful.")
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"instruction": "Name a color.", "response": "Red."}\n{"instruction": "  ", "response": "Hi."}\n'
                   '{"instruction": "", "input": "Translate: chat", "output": "cat"}\n')  # the input is the ask
    docs, stats = build_documents(DataConfig(path=str(sft), format="alpaca", template=template,
                                             fields={"response": ["response", "output"]}), tokenizer)
    assert (stats.kept, stats.dropped_empty_prompt, docs.num_items) == (2, 1, 2)
    assert "1 dropped (empty instruction or Human turn)" in stats.summary()
    hh = tmp_path / "hh.jsonl"
    rows = ['{"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello."}',
            '{"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello.\\n\\nHuman: \\n\\nAssistant: Bye."}',
            '{"chosen": "\\n\\nHuman:\\n\\nAssistant: Hello."}']
    hh.write_text("\n".join(rows) + "\n")
    _, stats = build_documents(DataConfig(path=str(hh), format="hh", template=template), tokenizer)
    assert (stats.kept, stats.dropped_empty_prompt) == (1, 2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Color?", "chosen": "Red.", "rejected": "Blue."}\n'
                     '{"prompt": "", "chosen": "Red.", "rejected": "Blue."}\n')
    _, stats = build_documents(DataConfig(path=str(pairs), format="pairs", template=template), tokenizer)
    assert (stats.kept, stats.dropped_empty_prompt) == (1, 1)
    hh_pairs = tmp_path / "hh_pairs.jsonl"
    hh_pairs.write_text('{"chosen": "\\n\\nHuman: Hi?\\n\\nAssistant: Hello.", "rejected": "\\n\\nHuman: Hi?\\n\\nAssistant: Go."}\n'
                        '{"chosen": "\\n\\nHuman: \\n\\nAssistant: Hello.", "rejected": "\\n\\nHuman: \\n\\nAssistant: Go."}\n')
    _, stats = build_documents(DataConfig(path=str(hh_pairs), format="hh_pairs", template=template), tokenizer)
    assert (stats.kept, stats.dropped_empty_prompt) == (1, 1)


def test_a_null_field_is_named_as_null(tmp_path):
    """A null field (a missing value in a Parquet column) was reported as absent while the same message listed
    it among the record's keys."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"instruction": "a", "response": null}\n')
    with pytest.raises(DataError, match=rf"^{p}:1: field 'response' \(response\) is null$"):
        read_examples(DataConfig(path=str(p), format="lamini"))
    p.write_text('{"prompt": "a", "chosen": "b", "rejected": null}\n')
    with pytest.raises(DataError, match=rf"^{p}:1: field 'rejected' is null$"):
        read_examples(DataConfig(path=str(p), format="pairs"))
    p.write_text('{"question": null, "instruction": "a", "response": "b"}\n')  # a later name that holds text wins
    assert read_examples(DataConfig(path=str(p), format="orca"))[0][0].response == "b"


def test_encode_summary_names_border_merges(tokenizer):
    """A prompt ending in a space merged into the response's first token (trained on) without a word in the log."""
    pairs = [PairExample("Human: hi\n\nAssistant: ", "Hello there", " Go away")]
    docs, stats = encode_pairs(pairs, tokenizer, 64)
    assert stats.border_merges == 1
    assert "1 with the prompt's last token merged into the response's first" in stats.summary()
    _, stats = encode_pairs([PairExample("Human: hi\n\nAssistant:", " Hello there", " Go away")], tokenizer, 64)
    assert stats.border_merges == 0 and "merged" not in stats.summary()


def test_raw_style_refuses_a_system_message_it_would_drop(tmp_path):
    """style = "raw" takes the prompt text as it is: an Orca record's system message was dropped silently."""
    p = tmp_path / "orca.jsonl"
    p.write_text('{"system_prompt": "", "question": "Hi?", "response": "Hello."}\n'
                 '{"system_prompt": "You are a pirate.", "question": "Hi?", "response": "Arr."}\n')
    with pytest.raises(DataError, match=r"orca.jsonl:2: field 'system_prompt' holds a system message, but "
                                        r"template.style = \"raw\""):
        read_examples(DataConfig(path=str(p), format="orca", template=PromptTemplate(style="raw")))
    examples, skipped = read_examples(DataConfig(path=str(p), format="orca", template=PromptTemplate(style="raw"),
                                                 skip_bad_records=True))
    assert [e.prompt for e in examples] == ["Hi?"] and len(skipped) == 1
    q = tmp_path / "pairs.jsonl"
    q.write_text('{"prompt": "Hi?", "chosen": "Hello.", "rejected": "No.", "system": "Be brief."}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'system' holds a system message"):
        read_examples(DataConfig(path=str(q), format="pairs", template=PromptTemplate(style="raw")))
    examples, _ = read_examples(DataConfig(path=str(q), format="pairs"))
    assert "Be brief." in examples[0].prompt


def test_pair_rows_checked_with_the_config():
    """A packed pair longer than half a row failed in packing, after the model and all the data had loaded, naming
    an item index; unpacked pairs were cut to half a row they do not share."""
    with pytest.raises(ValueError, match=r"max_len \(100\) must be at most max_seq_len // 2 \(64\) for packed pairs"):
        DataConfig(format="pairs", max_seq_len=128, max_len=100)
    assert DataConfig(format="pairs", max_seq_len=128, max_len=100, packed=False).document_len == 100
    assert DataConfig(format="hh_pairs", max_seq_len=128, packed=False).document_len == 128
    assert DataConfig(format="hh_pairs", max_seq_len=128).document_len == 64
    assert DataConfig(format="evol", max_seq_len=128).document_len == 128


@pytest.mark.parametrize("style", ["openbezoar", "raw"])
def test_hh_pairs_cut_a_transcript_as_the_hh_sft_format_does(style):
    """Two Assistant turns in a row before the answer (or an empty one between): the hh SFT format took the
    transcript, hh_pairs refused it ("does not end with a Human turn"), stopping the recipe's DPO stage on one
    record of data its SFT stage had trained on. The pair's prompt is now the SFT example's."""
    from bezoar.data.formats import PromptTemplate, hh_sft_example, pair_example
    from bezoar.data.load import Record

    human, assistant = "\n\nHuman:", "\n\nAssistant:"
    template = PromptTemplate(style=style)
    for history in (human + " hi" + assistant + " um", human + " hi" + assistant, human + " hi" + human + " more"):
        chosen, rejected = history + assistant + " ok", history + assistant + " no"
        pair = pair_example(Record({"chosen": chosen, "rejected": rejected}, "x:1"), "hh_pairs", template)
        sft = hh_sft_example(chosen, template)
        assert pair.prompt == sft.prompt, history
        assert (pair.chosen.strip(), pair.rejected.strip()) == ("ok", "no")
