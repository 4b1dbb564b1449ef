"""MT-Bench: question/prompt files, answer generation (template, per-category temperature, resume),
rating parsing, and a run end to end with the fake provider as judge, whose scripted ratings
(malformed ones included) must give exactly the averages they imply."""

from __future__ import annotations

import json
import logging
import re

import pytest

from bezoar.eval import mt_bench as mt
from bezoar.eval.chat import chat_prompt


@pytest.mark.parametrize("text,score", [
    ("Good answer. Rating: [[7]]", 7.0),
    ("[[8.5]] first, [[3]] later", 8.5),
    ("no double brackets, but [6] here", 6.0),
    ("[[7]] beats a later [2]", 7.0),
    ("I cannot rate this.", -1.0),
    # outside the prompts' 1-10, kept as FastChat keeps them (only "no rating" is -1)
    ("Rating: [[0]]", 0.0),
    ("Rating: [[0.5]]", 0.5),
    ("Rating: [[11]]", 11.0),
    ("no double brackets, [12] here", 12.0),
    ("", -1.0),
    (None, -1.0),
])
def test_parse_rating(text, score):
    assert mt.parse_rating(text) == score


def test_ratings_outside_1_to_10_are_counted_as_fastchat_counts_them():
    """FastChat's show_result drops score -1 only: a judge's [[0]] or [[11]] enters the averages as
    given (bezoar dropped them as unparseable); the report counts them apart."""
    def judgment(qid, turn, text, error=None):
        score = mt.parse_rating(text) if error is None else -1.0
        return mt.Judgment(qid, "m", ["j", "single-v1"], "", text, score, turn, "writing", error=error)

    judgments = [judgment(1, 1, "[[0]]"), judgment(1, 2, "[[11]]"), judgment(2, 1, "[[4]]"),
                 judgment(2, 2, "no rating"), judgment(3, 1, "", error="refused")]
    summary = mt.summarize(judgments)
    assert (summary.counted, summary.unparseable, summary.failed, summary.outside_scale) == (3, 1, 1, 2)
    assert summary.overall == pytest.approx(5.0) and summary.per_turn == {1: 2.0, 2: 11.0}
    table = mt.summary_table(summary, "m", "j")
    assert "3 judgments counted; 1 without a rating (-1) and 1 failed calls left out." in table
    assert "2 of the counted ratings lie outside 1-10" in table
    assert "outside 1-10" not in mt.summary_table(mt.summarize(judgments[2:]), "m", "j")


def test_sample_questions_and_default_judge_prompts():
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    assert len(questions) == 8 and all(len(q.turns) == 2 for q in questions)
    assert {q.category for q in questions} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                               "stem", "humanities"}
    assert all(q.reference for q in questions if q.category in mt.NEED_REFERENCE)
    prompts = mt.load_judge_prompts()
    assert set(prompts) >= {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"}
    assert all("[[rating]]" in p.prompt_template + p.system_prompt for p in prompts.values())


def test_bad_input_files_are_named(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "category": "math", "turns": ["a", "b"]}\n{"question_id": 2, "turns": "x"}\n')
    with pytest.raises(mt.MTBenchError, match=r"q.jsonl:2: 'turns' must be"):
        mt.load_questions(bad)
    bad.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n{not json\n')
    with pytest.raises(mt.MTBenchError, match=r"q.jsonl:2: not valid JSON"):
        mt.load_questions(bad)
    bad.write_text('{"question_id": 1, "category": "math", "turns": ["a"]}\n' * 2)
    with pytest.raises(mt.MTBenchError, match="appears twice"):
        mt.load_questions(bad)
    bad.write_text('{"question_id": [1], "category": "math", "turns": ["a"]}\n')
    with pytest.raises(mt.MTBenchError, match=r"q.jsonl:1: question_id must be an integer or a string, got \[1\]"):
        mt.load_questions(bad)
    bad.write_bytes('{"question_id": 1, "category": "math", "turns": ["a"]}\n'.encode()
                    + '{"question_id": 2, "category": "math", "turns": ["caf\u00e9"]}\n'.encode("latin-1"))
    with pytest.raises(mt.MTBenchError, match=r"q.jsonl:2: not valid UTF-8 \(byte 0xe9\)"):
        mt.load_questions(bad)
    bad.write_text('{"question_id": 1, "category": 7, "turns": ["a"]}\n')  # said "no category"
    with pytest.raises(mt.MTBenchError, match=r"q.jsonl:1: 'category' must be a string, got a number"):
        mt.load_questions(bad)
    # a line separator inside a question's text is text, not the end of its line
    bad.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["a\u2028b"]}, ensure_ascii=False) + "\n")
    assert [q.turns for q in mt.load_questions(bad)] == [["a\u2028b"]]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"name": "single-v1", "prompt_template": "{question} {answer}"}) + "\n")
    with pytest.raises(mt.MTBenchError, match="no judge prompt named 'single-v1-multi-turn'"):
        mt.load_judge_prompts(prompts)
    good = mt.DEFAULT_JUDGE_PROMPTS.read_text().splitlines()
    for field, value, got in (("prompt_template", ["{question}"], "a list"), ("system_prompt", None, "null"),
                              ("name", 7, "a number")):
        row = {**json.loads(good[1]), field: value}
        prompts.write_text("\n".join([good[0], json.dumps(row)] + good[2:]) + "\n")
        with pytest.raises(mt.MTBenchError, match=rf"p.jsonl:2: judge prompt field '{field}' must be a string, "
                                                  rf"got {got}"):
            mt.load_judge_prompts(prompts)


def test_malformed_turns_and_question_ids_in_answer_and_reference_files_are_named(tmp_path):
    """FastChat's model-answer format holds turns as a list of strings: a string there was read as its
    characters (the judge was sent ref_answer_1 "1" for "158 - 58 = 100."), and a question_id of another
    type went unchecked. Both files now name the line and the field."""
    def record(**fields):
        return json.dumps({"question_id": 4, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "b"]}], **fields})

    path = tmp_path / "ref.jsonl"
    cases = [({"choices": [{"index": 0, "turns": "158 - 58 = 100."}]}, "choices[0].turns must be a non-empty list "
              "of strings, got a string"),
             ({"choices": [{"turns": ["ok", 3]}]}, "choices[0].turns must be a non-empty list of strings, got a list "
              "holding a number"),
             ({"choices": [{"turns": []}]}, "choices[0].turns must be a non-empty list of strings, got an empty list"),
             ({"choices": []}, "expected choices[0].turns"),
             ({"question_id": [4]}, "question_id must be an integer or a string, got [4]"),
             ({"question_id": None}, "no question_id")]
    for fields, message in cases:
        path.write_text(record(question_id=1) + "\n" + record(**fields) + "\n")
        with pytest.raises(mt.MTBenchError, match=re.escape(f"ref.jsonl:2: {message}")):
            mt.load_reference_answers(path)
        # an answer file too, on its last line: a whole JSON record of the wrong shape is no torn line
        answers = tmp_path / "answers.jsonl"
        answers.write_text(path.read_text())
        with pytest.raises(mt.MTBenchError, match=re.escape(f"answers.jsonl:2: {message}")):
            mt.read_answers(answers)
    answers.write_text(record(model_id=None) + "\n")
    with pytest.raises(mt.MTBenchError, match=r"answers.jsonl:1: no model_id"):
        mt.read_answers(answers)
    answers.write_text(record(model_id=["m"]) + "\n")
    with pytest.raises(mt.MTBenchError, match=r"answers.jsonl:1: model_id must be a string, got a list"):
        mt.read_answers(answers)
    path.write_text(record() + "\n" + record(question_id="q2", choices=[{"turns": ["x"]}]) + "\n")
    assert mt.load_reference_answers(path) == {4: ["a", "b"], "q2": ["x"]}


def test_judge_prompts_pick_references_and_turns(caplog):
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    answers = {q.question_id: mt.Answer(q.question_id, "m", [f"A1 of {q.question_id}", f"A2 of {q.question_id}"])
               for q in questions}
    references = {4: ["REF-ONE", "REF-TWO"]}  # a reference file overrides the question's own field
    math_q = next(q for q in questions if q.category == "math")
    assert math_q.question_id == 4
    tasks = {(t.question_id, t.turn): t for t in mt.judge_tasks(questions, answers, mt.load_judge_prompts(), references)}
    assert len(tasks) == 16
    assert tasks[(4, 1)].prompt_name == "single-math-v1" and "REF-ONE" in tasks[(4, 1)].user_prompt
    assert "REF-TWO" not in tasks[(4, 1)].user_prompt
    assert tasks[(4, 2)].prompt_name == "single-math-v1-multi-turn"
    assert "REF-TWO" in tasks[(4, 2)].user_prompt and "A2 of 4" in tasks[(4, 2)].user_prompt
    assert tasks[(3, 1)].prompt_name == "single-math-v1"  # reasoning: the question's own reference
    assert "Carol is the shortest." in tasks[(3, 1)].user_prompt
    assert tasks[(1, 1)].prompt_name == "single-v1" and "A1 of 1" in tasks[(1, 1)].user_prompt
    assert "A2 of 1" not in tasks[(1, 1)].user_prompt
    second = tasks[(1, 2)]
    assert second.prompt_name == "single-v1-multi-turn"
    assert all(s in second.user_prompt for s in (questions[0].turns[0], questions[0].turns[1], "A1 of 1", "A2 of 1"))
    # No reference anywhere: judged with the general prompt, and the log says so.
    questions[3].reference = None
    with caplog.at_level(logging.WARNING, logger="bezoar.eval"):
        tasks = mt.judge_tasks(questions, answers, mt.load_judge_prompts())
    assert next(t for t in tasks if t.question_id == 4).prompt_name == "single-v1"
    assert "no reference answer" in caplog.text


def _record_admits(monkeypatch) -> list[tuple[tuple[int, ...], float, int]]:
    """(prompt ids, temperature, top_k) of every sequence the answers' continuous batch admits, in order."""
    from bezoar.model.decode import ContinuousBatch

    calls = []
    admit = ContinuousBatch.admit

    def recording(self, sequences):
        calls.extend((tuple(s.prompt_ids), s.temperature, s.top_k) for s in sequences)
        return admit(self, sequences)

    monkeypatch.setattr(ContinuousBatch, "admit", recording)
    return calls


def test_generate_answers_template_temperatures_and_resume(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    import bezoar.model

    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    calls = _record_admits(monkeypatch)
    real_generate = bezoar.model.generate

    def ids(messages):
        return tuple(tiny_tokenizer.encode(chat_prompt(messages), bos=True))

    path = tmp_path / "answers.jsonl"
    answers = mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, max_new_tokens=6, batch_size=3)
    assert len(answers) == 8
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["question_id"] for r in records} == {q.question_id for q in questions}
    assert all(r["model_id"] == "tiny" and len(r["choices"][0]["turns"]) == 2 for r in records)
    temperature_of = {prompt: temperature for prompt, temperature, _ in calls}
    for q in questions:
        first = ids([{"role": "user", "content": q.turns[0]}])
        assert temperature_of[first] == {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1}.get(q.category, 0.0)
        second = ids([{"role": "user", "content": q.turns[0]},
                      {"role": "assistant", "content": answers[q.question_id].turns[0]},
                      {"role": "user", "content": q.turns[1]}])
        assert second in temperature_of, "turn 2 must see the turn-1 answer"
    # Greedy categories answer like a plain greedy generate of the same prompt.
    math_q = next(q for q in questions if q.category == "math")
    first = chat_prompt([{"role": "user", "content": math_q.turns[0]}])
    want = real_generate(tiny_model, tiny_tokenizer, first, max_new_tokens=6,
                         stop=["### Instruction:", "### System:", "### Response:"])[0].text.strip()
    assert answers[math_q.question_id].turns[0] == want
    # A rerun answers nothing; a torn last line (an interrupted run) is answered again.
    calls.clear()
    mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, max_new_tokens=6)
    assert calls == []
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    lost = json.loads(lines[-1])["question_id"]
    again = mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, max_new_tokens=6)
    assert len(again) == 8
    lost_q = next(q for q in questions if q.question_id == lost)
    assert calls[0][0] == ids([{"role": "user", "content": lost_q.turns[0]}])
    assert len(calls) == 2  # the lost question's two turns, nothing else
    assert sorted(json.loads(line)["question_id"] for line in path.read_text().splitlines()) == list(range(1, 9))


def test_answers_files_are_read_as_utf8_lines(tmp_path, caplog):
    """A run killed while appending answers can leave a last line that ends midway through a multi-byte
    character; the rerun drops that line as any other torn one (it was a bare UnicodeDecodeError)."""
    path = tmp_path / "answers.jsonl"
    whole = mt.Answer(1, "tiny", ["caf\u00e9", "ok"]).to_record()
    torn = json.dumps(mt.Answer(2, "tiny", ["na\u00efve \u2014 answer"]).to_record(), ensure_ascii=False).encode()
    cut = torn.index("\u2014".encode()) + 1  # inside the dash's three bytes
    path.write_bytes(json.dumps(whole, ensure_ascii=False).encode() + b"\n" + torn[:cut])
    with caplog.at_level(logging.WARNING, logger="bezoar.eval"):
        answers = mt.read_answers(path)
    assert list(answers) == [1] and answers[1].turns == ["caf\u00e9", "ok"]
    assert "incomplete last line" in caplog.text
    path.write_bytes(b'{"question_id": 1, "model_id": "tiny", "choices": [{"turns": ["caf\xe9"]}]}\n'
                     + json.dumps(whole).encode() + b"\n")
    with pytest.raises(mt.MTBenchError, match=r"answers.jsonl:1: not valid UTF-8"):
        mt.read_answers(path)
    # Answers holding characters that str.splitlines() breaks lines at (NEL, LINE SEPARATOR), which
    # json.dumps(ensure_ascii=False) writes as they are: still one record per line.
    path.unlink()
    mt._append_jsonl(path, [mt.Answer(1, "tiny", ["a\x85b", "c"]).to_record(),
                            mt.Answer(2, "tiny", ["x\u2028y\u2029z", "w"]).to_record()])
    answers = mt.read_answers(path)
    assert answers[1].turns == ["a\x85b", "c"] and answers[2].turns == ["x\u2028y\u2029z", "w"]


def test_sampled_categories_get_top_k_50_and_greedy_ones_none(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """FastChat samples through transformers' generate, whose top_k defaults to 50: the sampled categories
    (writing, roleplay, stem, humanities, any other) decode with top_k=50, the greedy ones without it."""
    calls = _record_admits(monkeypatch)
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS) + [mt.Question(99, "my-own-category", ["Hi."])]
    mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", tmp_path / "a.jsonl", max_new_tokens=4)
    assert {t for _, t, _ in calls} == {0.0, 0.1, 0.7}, "greedy and both sampled temperatures were asked for"
    assert all(k == (50 if t > 0 else 0) for _, t, k in calls), calls
    calls.clear()
    mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", tmp_path / "b.jsonl", max_new_tokens=4, top_k=7)
    assert all(k == (7 if t > 0 else 0) for _, t, k in calls) and any(t > 0 for _, t, _ in calls)
    with pytest.raises(ValueError, match="top_k"):
        mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", tmp_path / "c.jsonl", top_k=-1)


def test_an_answer_does_not_depend_on_the_batch_or_the_order(tiny_model, tiny_tokenizer, tmp_path):
    """Every answer (sampled ones too: each draws from a generator seeded by the seed, the question and the
    turn) is the same whatever the batch size and the order of the questions; another seed samples others."""
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    runs = [mt.generate_answers(tiny_model, tiny_tokenizer, qs, "tiny", tmp_path / f"{i}.jsonl", max_new_tokens=12,
                                batch_size=size, seed=seed)
            for i, (qs, size, seed) in enumerate([(questions, 1, 3), (questions[::-1], 5, 3), (questions, 3, 4)])]
    assert {q: a.turns for q, a in runs[0].items()} == {q: a.turns for q, a in runs[1].items()}
    sampled = [q.question_id for q in questions if mt.category_temperature(q.category) >= 0.7]
    assert sampled and any(runs[0][q].turns != runs[2][q].turns for q in sampled), "the seed must matter"
    assert mt.answer_seed(3, 81, 0) == mt.answer_seed(3, 81, 0) != mt.answer_seed(3, 81, 1) != mt.answer_seed(3, "81", 1)


def test_mt_bench_cli_top_k(tiny_dir, tmp_path, capsys, monkeypatch):
    from bezoar.eval.__main__ import main

    seen = []
    monkeypatch.setattr(mt, "generate_answers", lambda *a, **kw: seen.append(kw["top_k"]))
    base = ["mt-bench", "--model", str(tiny_dir), "--questions", str(mt.SAMPLE_QUESTIONS), "--skip-judge"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    assert main(base + ["--out", str(tmp_path / "b"), "--top-k", "0"]) == 0
    assert seen == [50, 0]
    assert main(base + ["--out", str(tmp_path / "c"), "--top-k", "-1"]) == 2
    assert "--top-k must be 0 (off) or more, got -1" in capsys.readouterr().err
    assert seen == [50, 0] and not (tmp_path / "c").exists(), "refused before the model loads"


def test_a_second_mt_bench_run_on_the_same_out_is_refused(tiny_dir, tmp_path, capsys, monkeypatch):
    """Two mt-bench runs on one --out both read "none answered", answered every question and appended them all
    to answers.jsonl: each answer twice, the compute paid twice. The second is now refused, naming the pid."""
    import os

    from bezoar.eval.__main__ import main
    from bezoar.locking import hold

    seen = []
    monkeypatch.setattr(mt, "generate_answers", lambda *a, **kw: seen.append(1))
    out = tmp_path / "out"
    out.mkdir()
    held = hold(out / "mt_bench.lock")
    argv = ["mt-bench", "--model", str(tiny_dir), "--questions", str(mt.SAMPLE_QUESTIONS), "--skip-judge",
            "--out", str(out)]
    try:
        assert main(argv) == 2
    finally:
        held.close()
    assert f"--out {out}: another bezoar.eval mt-bench (pid {os.getpid()}) is writing it" in capsys.readouterr().err
    # refused before it read or recorded anything: the settings file is the running one's to write
    assert seen == [] and sorted(p.name for p in out.iterdir()) == ["mt_bench.lock"]
    assert main(argv) == 0 and seen == [1]  # the lock let go: it runs


def test_answers_are_resumed_only_under_the_settings_they_were_made_with(tiny_model, tiny_tokenizer, tmp_path,
                                                                         monkeypatch):
    """answers.jsonl.settings.json records what the answers were made with; adding to (or judging) them under
    other settings is refused, naming each one, and the answers stay as they were. An answer file from before
    the record (no settings file) was sampled without top-k."""
    import bezoar.model
    from bezoar.model.decode import Generation

    monkeypatch.setattr(bezoar.model, "generate", lambda model, tokenizer, prompts, **kw: [
        Generation(text="an answer", token_ids=[5], finish_reason="stop", prompt_tokens=1) for _ in prompts])
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    path = tmp_path / "answers.jsonl"
    side = tmp_path / "answers.jsonl.settings.json"
    mt.generate_answers(tiny_model, tiny_tokenizer, questions[:3], "tiny", path, max_new_tokens=4, seed=1)
    assert json.loads(side.read_text()) == mt.answer_settings(4, 1, 50)
    before = path.read_text()
    for kwargs, change in [(dict(top_k=0), "top_k: 50 -> 0"), (dict(seed=2), "seed: 1 -> 2"),
                           (dict(max_new_tokens=8), "max_new_tokens: 4 -> 8"),
                           (dict(loaded={"quant": "nf4"}), "quant: 'none' -> 'nf4'"),
                           (dict(loaded={"dtype": "float16"}), "dtype: '' -> 'float16'")]:
        settings = {"max_new_tokens": 4, "seed": 1, **kwargs}
        with pytest.raises(mt.MTBenchError, match=re.escape(f"its 3 answers were made with other settings ({change})")):
            mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, **settings)
        assert path.read_text() == before and json.loads(side.read_text()) == mt.answer_settings(4, 1, 50)
    answers = mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, max_new_tokens=4, seed=1)
    assert len(answers) == len(questions)  # the same settings resume

    side.unlink()  # answers from before the settings were recorded: made without top-k
    with pytest.raises(mt.MTBenchError, match=re.escape("(top_k: 0 -> 50)")):
        mt.check_answer_settings(path, mt.answer_settings(4, 1, 50))
    mt.check_answer_settings(path, mt.answer_settings(4, 1, 0))
    assert not side.exists(), "what else old answers were made with is not known: nothing is recorded for them"

    side.write_text("{not json")
    with pytest.raises(mt.MTBenchError, match=re.escape(f"{side}: unreadable")):
        mt.check_answer_settings(path, mt.answer_settings(4, 1, 50))
    path.write_text("")  # no answers: the settings are recorded afresh
    mt.check_answer_settings(path, mt.answer_settings(4, 1, 0))
    assert json.loads(side.read_text())["top_k"] == 0


def test_mt_bench_cli_refuses_answers_made_with_other_settings(tiny_dir, tmp_path, capsys):
    from bezoar.eval.__main__ import main

    out = tmp_path / "o"
    out.mkdir()
    old = mt.Answer(1, "tiny", ["an answer", "another"])  # written before settings were recorded
    (out / "answers.jsonl").write_text(json.dumps(old.to_record()) + "\n")
    base = ["mt-bench", "--model", str(tiny_dir), "--model-id", "tiny", "--questions", str(mt.SAMPLE_QUESTIONS),
            "--out", str(out), "--skip-judge", "--max-new-tokens", "2"]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "answers.jsonl: its 1 answers were made with other settings (top_k: 0 -> 50)" in err, err
    assert "move answers.jsonl away to answer again" in err
    assert (out / "answers.jsonl").read_text() == json.dumps(old.to_record()) + "\n"
    assert main(base + ["--top-k", "0", "--dtype", "float32"]) == 2  # old answers: loaded by default
    assert "(dtype: '' -> 'float32')" in capsys.readouterr().err
    assert main(base + ["--top-k", "0"]) == 0  # the settings they were made with: resumed
    assert len(mt.read_answers(out / "answers.jsonl")) == 8


def test_a_long_prompt_in_the_batch_does_not_shorten_the_other_answers(tiny_model, tiny_tokenizer, tmp_path):
    context = tiny_model.config.max_position_embeddings
    long_turn = "Why is the sky blue? " * 30
    assert context - len(tiny_tokenizer.encode(chat_prompt([{"role": "user", "content": long_turn}]), bos=True)) < 100
    questions = [mt.Question(1, "reasoning", [long_turn]), mt.Question(2, "reasoning", ["Name a color."])]
    alone = mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", tmp_path / "alone.jsonl",
                                max_new_tokens=200, batch_size=1)
    together = mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", tmp_path / "together.jsonl",
                                   max_new_tokens=200, batch_size=2)
    assert [together[q].turns for q in (1, 2)] == [alone[q].turns for q in (1, 2)]
    # A prompt that fills the context is named, wherever it sits in the batch.
    too_long = [mt.Question(3, "math", ["Hi."]), mt.Question(4, "math", ["Why is the sky blue? " * 60])]
    with pytest.raises(mt.MTBenchError, match="question 4 turn 1: the prompt fills"):
        mt.generate_answers(tiny_model, tiny_tokenizer, too_long, "tiny", tmp_path / "long.jsonl",
                            max_new_tokens=8, batch_size=2)


# ---- end to end through the client pool and the fake provider --------------------------------

SCRIPT = {  # (question_id, turn) -> the judge's reply
    (1, 1): "Fine poem. Rating: [[8]]", (1, 2): "Rating: [[6]]",
    (2, 1): "[[7]]", (2, 2): "Decent, I give it [5].",  # fallback pattern
    (3, 1): "Correct. [[9]]", (3, 2): "I cannot decide on a score.",  # malformed: -1
    (4, 1): "Wrong sum. [[2]]", (4, 2): "[[10]]",
    (5, 1): "[[4]]", (5, 2): "[[4.5]]",
    (6, 1): "[[3]]", (6, 2): "rating: eleven",  # malformed: -1
    (7, 1): "[[6]]", (7, 2): "[[8]]",
    (8, 1): "[[5]], though a later [[9]] would be kind", (8, 2): "[[7]]",
}
TURN1 = [8, 7, 9, 2, 4, 3, 6, 5]
TURN2 = [6, 5, 10, 4.5, 8, 7]  # q3 and q6 unparseable
CATEGORY = {"writing": 7.0, "roleplay": 6.0, "reasoning": 9.0, "math": 6.0, "coding": 4.25, "extraction": 3.0,
            "stem": 7.0, "humanities": 6.0}


def scripted_judge(questions):
    first_turns = {q.turns[0]: q.question_id for q in questions}

    def reply(call):
        text = call.last_user_text
        qid = next(i for t, i in first_turns.items() if t in text)
        turn = 2 if "### User:" in text else 1
        return SCRIPT[(qid, turn)]

    return reply


def test_mt_bench_end_to_end_with_a_scripted_judge(tiny_dir, tmp_path):
    pytest.importorskip("bezoar.generate.pool", reason="the client pool is not on this branch yet")
    fake_server = pytest.importorskip("tests.generate.fake_server")
    from bezoar.eval.__main__ import main

    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    out = tmp_path / "run"
    args = ["mt-bench", "--model", str(tiny_dir), "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out),
            "--max-new-tokens", "6", "--judge-model", "judge-1", "--judge-provider", "compat"]
    with fake_server.FakeLLMServer(reply=scripted_judge(questions)) as judge:
        assert main(args + ["--judge-base-url", judge.openai_url]) == 0
        sent = sum(judge.received.values())
        assert sent == 16
        results = json.loads((out / "results.json").read_text())
        assert results["per_turn"]["1"] == pytest.approx(sum(TURN1) / 8)
        assert results["per_turn"]["2"] == pytest.approx(sum(TURN2) / 6)
        assert results["overall"] == pytest.approx((sum(TURN1) + sum(TURN2)) / 14)
        assert results["per_category"] == pytest.approx(CATEGORY)
        assert (results["counted"], results["unparseable"], results["failed"]) == (14, 2, 0)
        judgments = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
        by_key = {(j["question_id"], j["turn"]): j for j in judgments}
        assert by_key[(3, 2)]["score"] == -1 and by_key[(6, 2)]["score"] == -1 and by_key[(2, 2)]["score"] == 5
        assert by_key[(4, 1)]["judge"] == ["judge-1", "single-math-v1"]
        assert by_key[(1, 2)]["judge"] == ["judge-1", "single-v1-multi-turn"]
        table = (out / "results.md").read_text()
        assert "| math | 2.000 | 10.000 | 6.000 |" in table and f"**{(sum(TURN1) + sum(TURN2)) / 14:.3f}**" in table
        assert (out / "categories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # A rerun resumes: answers kept, every judgment comes from the store, nothing is sent.
        answers_before = (out / "answers.jsonl").read_text()
        assert main(args + ["--judge-base-url", judge.openai_url]) == 0
        assert sum(judge.received.values()) == sent
        assert (out / "answers.jsonl").read_text() == answers_before
        assert json.loads((out / "results.json").read_text())["overall"] == results["overall"]


def test_mt_bench_cli_errors(tmp_path, capsys):
    from bezoar.eval.__main__ import main

    assert main(["mt-bench", "--questions", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                 "--judge-model", "j"]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert main(["mt-bench", "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(tmp_path / "o")]) == 2
    assert "--judge-model is required" in capsys.readouterr().err
    for flag in ("--max-new-tokens", "--batch-size"):
        assert main(["mt-bench", "--model", str(tmp_path / "no-model"), "--questions", str(mt.SAMPLE_QUESTIONS),
                     "--out", str(tmp_path / "o"), "--skip-judge", flag, "0"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} must be at least 1, got 0" in err and "no-model" not in err


def test_missing_inputs_are_named_before_the_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    import bezoar.model
    from bezoar.eval.__main__ import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(bezoar.model, "load", no_load)
    out = tmp_path / "o"
    base = ["mt-bench", "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out), "--judge-model", "j"]
    assert main(base + ["--answers", str(tmp_path / "missing.jsonl")]) == 2
    assert f"--answers {tmp_path / 'missing.jsonl'}: no such file" in capsys.readouterr().err
    assert main(base + ["--model", str(tiny_dir), "--judge-prompts", str(tmp_path / "prompts.jsonl")]) == 2
    assert f"--judge-prompts {tmp_path / 'prompts.jsonl'}: no such file" in capsys.readouterr().err
    assert main(base + ["--model", str(tiny_dir), "--adapter", str(tmp_path / "no-adapter"),
                        "--reference", str(tmp_path / "ref.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"--reference {tmp_path / 'ref.jsonl'}: no such file" in err
    assert f"--adapter {tmp_path / 'no-adapter'}: no such folder" in err
    assert main(base + ["--model", str(tmp_path), "--questions", str(tmp_path)]) == 2
    assert f"--questions {tmp_path}: not a file" in capsys.readouterr().err
    assert not out.exists()


def test_answers_of_another_model_are_not_resumed(tiny_dir, tmp_path, capsys):
    from bezoar.eval.__main__ import main

    out = tmp_path / "o"
    out.mkdir()
    other = mt.Answer(1, "stage-a", ["an answer", "another"])
    (out / "answers.jsonl").write_text(json.dumps(other.to_record()) + "\n")
    assert main(["mt-bench", "--model", str(tiny_dir), "--model-id", "stage-b", "--questions",
                 str(mt.SAMPLE_QUESTIONS), "--out", str(out), "--skip-judge", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "answers.jsonl: holds answers from model 'stage-a', not 'stage-b'" in err
    assert len((out / "answers.jsonl").read_text().splitlines()) == 1


def test_failed_judge_calls_are_left_out_and_retried_on_rerun(tmp_path):
    """Judging given answers (--answers): a call the judge refuses is recorded as failed and left out
    of the averages; the next run sends that one call again, and only it."""
    pytest.importorskip("bezoar.generate.pool", reason="the client pool is not on this branch yet")
    fake_server = pytest.importorskip("tests.generate.fake_server")
    from bezoar.eval.__main__ import main

    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    answers = tmp_path / "given.jsonl"
    answers.write_text("".join(json.dumps(mt.Answer(q.question_id, "other-model", ["one", "two"]).to_record()) + "\n"
                               for q in questions))
    broken = {"on": True}
    coding_turn_1 = next(q for q in questions if q.category == "coding").turns[0]

    def reply(call):
        text = call.last_user_text
        if broken["on"] and coding_turn_1 in text and "### User:" not in text:
            return fake_server.Fault("400", message="refused")
        return "[[5]]"

    out = tmp_path / "run"
    with fake_server.FakeLLMServer(reply=reply) as judge:
        args = ["mt-bench", "--answers", str(answers), "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out),
                "--judge-model", "j", "--judge-provider", "compat", "--judge-base-url", judge.openai_url]
        assert main(args) == 0
        first = json.loads((out / "results.json").read_text())
        assert (first["counted"], first["failed"], first["overall"]) == (15, 1, 5.0)
        assert first["model_id"] == "other-model"
        failed = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()
                  if "error" in json.loads(line)]
        assert len(failed) == 1 and failed[0]["score"] == -1 and failed[0]["question_id"] == 5
        sent = sum(judge.received.values())
        broken["on"] = False
        assert main(args) == 0
        assert sum(judge.received.values()) == sent + 1
        second = json.loads((out / "results.json").read_text())
        assert (second["counted"], second["failed"]) == (16, 0)


def test_answers_that_leave_turns_unanswered_are_refused_before_any_judge_call(tmp_path, capsys):
    """An interrupted run's answers.jsonl given as --answers was judged over the turns it had and reported as the
    model's MT-Bench score (4 of 16 turns: "overall 9.0"); FastChat's gen_judgment refuses such answers."""
    fake_server = pytest.importorskip("tests.generate.fake_server")
    from bezoar.eval.__main__ import main

    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)
    answers = tmp_path / "partial.jsonl"
    rows = [mt.Answer(questions[0].question_id, "m", ["one", "two"]), mt.Answer(questions[1].question_id, "m", ["one"])]
    answers.write_text("".join(json.dumps(r.to_record()) + "\n" for r in rows))
    out = tmp_path / "run"
    with fake_server.FakeLLMServer(reply=lambda call: "[[9]]") as judge:
        assert main(["mt-bench", "--answers", str(answers), "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out),
                     "--judge-model", "j", "--judge-provider", "compat", "--judge-base-url", judge.openai_url]) == 2
        assert sum(judge.received.values()) == 0
    err = capsys.readouterr().err
    turns = sum(len(q.turns) for q in questions)
    assert f"--answers {answers}: {turns - 3} of the {turns} turns of the {len(questions)} questions have no answer" \
        in err
    assert f"question {questions[1].question_id} turn 2, question {questions[2].question_id}," in err
    assert not out.exists()  # refused before the folder was made
    assert mt.unanswered(questions[:1], {r.question_id: r for r in rows}) == []
    with pytest.raises(mt.MTBenchError, match=r"the answers: 1 of the 4 turns of the 2 questions"):
        mt.judge_tasks(questions[:2], {r.question_id: r for r in rows}, mt.load_judge_prompts())


def test_an_answer_file_mixing_models_is_refused(tmp_path):
    """Answers of two models to one question cannot both be judged from one file (the later would replace
    the earlier, and be reported under one model id): one error naming both lines."""
    path = tmp_path / "answers.jsonl"
    rows = [mt.Answer(1, "a", ["x"]), mt.Answer(2, "a", ["y"]), mt.Answer(1, "b", ["z"])]
    path.write_text("".join(json.dumps(r.to_record()) + "\n" for r in rows))
    with pytest.raises(mt.MTBenchError, match=r"answers.jsonl:3: question 1 answered by model 'b', and on line 1 "
                                              r"by 'a'"):
        mt.read_answers(path)
    path.write_text("".join(json.dumps(r.to_record()) + "\n" for r in rows[:2] + [mt.Answer(1, "a", ["w"])]))
    assert mt.read_answers(path)[1].turns == ["w"]  # one model answering again: the later answer stands


def test_answer_temperatures_are_fastchats():
    """FastChat's answer temperatures: writing and roleplay 0.7, stem and humanities 0.1, extraction, math,
    coding and reasoning greedy; a category outside the eight is sampled at 0.7, as FastChat does."""
    from bezoar.eval import mt_bench

    got = {c: mt_bench.category_temperature(c) for c in ("writing", "roleplay", "stem", "humanities", "extraction",
                                                          "math", "coding", "reasoning", "my-own-category")}
    assert got == {"writing": 0.7, "roleplay": 0.7, "stem": 0.1, "humanities": 0.1, "extraction": 0.0, "math": 0.0,
                   "coding": 0.0, "reasoning": 0.0, "my-own-category": 0.7}


def test_answers_of_another_model_in_a_folder_of_the_same_name_are_refused(tiny_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """--model A/merged then --model B/merged (other weights, the same folder name, so the same default model id),
    or A with an --adapter, resumed from A's answers without a word: a judge run would have scored A's answers as
    B's. The settings file now records the model and adapter folders and their content; a model with other files
    is refused before it loads, answers untouched. A copy of A elsewhere resumes; answers from before the record
    resume with a warning that they cannot be checked."""
    import shutil

    import bezoar.model
    from bezoar.eval.__main__ import main

    a, b = tmp_path / "A" / "merged", tmp_path / "B" / "merged"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    weights = bytearray((b / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # other weights
    (b / "model.safetensors").write_bytes(bytes(weights))
    adapter = tmp_path / "D" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    out = tmp_path / "X"
    base = ["mt-bench", "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out), "--skip-judge",
            "--max-new-tokens", "2"]
    assert main([*base, "--model", str(a)]) == 0
    answers = (out / "answers.jsonl").read_text()
    side = mt.answer_settings_path(out / "answers.jsonl")
    recorded = json.loads(side.read_text())
    assert recorded["model"]["path"] == str(a.resolve()) and recorded["adapter"] is None
    assert len(recorded["model"]["sha256"]) == 64
    capsys.readouterr()

    monkeypatch.setattr(bezoar.model, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert main([*base, "--model", str(b)]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'answers.jsonl'}: its 8 answers were made by another model than this run's (--model {a}" in err
    assert f"-> {b} (" in err and "answers.jsonl.settings.json records" in err
    assert "Use another --out for this model, or move answers.jsonl and answers.jsonl.settings.json away" in err
    assert main([*base, "--model", str(a), "--adapter", str(adapter)]) == 2
    assert f"(--adapter none -> {adapter} (1 files" in capsys.readouterr().err
    assert (out / "answers.jsonl").read_text() == answers and json.loads(side.read_text()) == recorded

    moved = tmp_path / "elsewhere" / "merged"  # the same files in another place: the same model
    shutil.copytree(a, moved)
    assert main([*base, "--model", str(moved)]) == 0
    run = capsys.readouterr()
    assert "(8 questions)" in run.out and "warning" not in run.err

    side.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("model", "adapter")}))
    assert main([*base, "--model", str(b)]) == 0  # written before the record: kept, and said to be unchecked
    err = capsys.readouterr().err
    assert "which model made its 8 answers is not recorded" in err and f"cannot be checked against --model {b}" in err
    assert (out / "answers.jsonl").read_text() == answers


@pytest.mark.parametrize("flags,env,message", [
    (["--judge-provider", "compat"], {}, "--judge-provider compat needs --judge-base-url"),
    (["--judge-api-key-env", "NOPE_KEY"], {}, "environment variable NOPE_KEY is not set"),
    ([], {"OPENAI_API_KEY": ""}, "environment variable OPENAI_API_KEY is empty; or name the variable that holds "
                                 "it with --judge-api-key-env"),
    (["--judge-api-key-env", "JUDGE_KEY"], {"JUDGE_KEY": "sk-secret with space"},
     "the API key in environment variable JUDGE_KEY cannot be sent"),
    (["--judge-provider", "compat", "--judge-base-url", "ftp://host/v1"], {}, "--judge-base-url: base URL"),
    (["--judge-api-key-env", "JUDGE_KEY", "--rpm", "0"], {"JUDGE_KEY": "sk-secret"}, "--rpm 0: must be more than 0"),
    (["--judge-api-key-env", "JUDGE_KEY", "--judge-prompts", str(mt.SAMPLE_QUESTIONS)], {"JUDGE_KEY": "sk-secret"},
     "sample_questions.jsonl:1: judge prompt without 'name'"),
])
def test_the_judge_is_checked_before_the_model_loads_and_nothing_is_created(tiny_dir, tmp_path, capsys,
                                                                            monkeypatch, flags, env, message):
    """A judge that could not be reached (compat without a URL, an unset key variable) failed only after every
    answer had been generated (an hour on a real model), and a refused run had created --out. The key itself is
    never shown."""
    import bezoar.model
    from bezoar.eval.__main__ import main

    monkeypatch.delenv("NOPE_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(bezoar.model, "load", lambda *a, **k: pytest.fail("the model loaded before the judge check"))
    out = tmp_path / "o"
    assert main(["mt-bench", "--model", str(tiny_dir), "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out),
                 "--judge-model", "judge-1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "sk-secret" not in err, err
    assert not out.exists()


def test_answers_kept_inside_the_model_folder_are_not_the_model(tiny_dir, tmp_path, capsys):
    """--out inside --model counted the answers as model files: the rerun was refused as another model's."""
    import shutil

    from bezoar.eval.__main__ import main

    model = tmp_path / "merged"
    shutil.copytree(tiny_dir, model)
    out = model / "mt-bench"
    argv = ["mt-bench", "--model", str(model), "--questions", str(mt.SAMPLE_QUESTIONS), "--out", str(out),
            "--skip-judge", "--max-new-tokens", "2"]
    assert main(argv) == 0
    answers = (out / "answers.jsonl").read_text()
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "answers.jsonl").read_text() == answers
    (model / "extra.safetensors").write_bytes(b"x")  # the model's own files still count
    assert main(argv) == 2 and "made by another model" in capsys.readouterr().err


def test_answer_prompts_follow_the_tokenizers_add_bos_token(tiny_model, tiny_dir, tmp_path, monkeypatch):
    """Answer prompts got BOS whatever tokenizer_config.json said; FastChat's transformers tokenizer follows its
    add_bos_token, and so do they now (OpenLLaMA's says true)."""
    import shutil

    from bezoar.model import Tokenizer

    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    tok = Tokenizer(folder)
    calls = _record_admits(monkeypatch)
    question = mt.Question(1, "math", ["What is 2 + 2?"])
    mt.generate_answers(tiny_model, tok, [question], "tiny", tmp_path / "a.jsonl", max_new_tokens=3)
    first = tok.encode(chat_prompt([{"role": "user", "content": question.turns[0]}]), bos=False)
    assert calls[0][0] == tuple(first) and first[0] != tok.bos_id


def test_each_answered_question_is_logged_with_the_count(tiny_model, tiny_tokenizer, tmp_path, caplog):
    """An hour of answering shows its progress: one line per question as it is written, counting the
    questions a resumed run had already."""
    questions = mt.load_questions(mt.SAMPLE_QUESTIONS)[:3]
    path = tmp_path / "a.jsonl"
    mt.generate_answers(tiny_model, tiny_tokenizer, questions[:1], "tiny", path, max_new_tokens=2)
    with caplog.at_level(logging.INFO, logger="bezoar.eval"):
        mt.generate_answers(tiny_model, tiny_tokenizer, questions, "tiny", path, max_new_tokens=2)
    lines = [r.getMessage() for r in caplog.records if "answered (" in r.getMessage()]
    assert len(lines) == 2 and lines[0].endswith("(2 of 3)") and lines[1].endswith("(3 of 3)"), lines
