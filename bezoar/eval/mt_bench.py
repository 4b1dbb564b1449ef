"""MT-Bench: two-turn answers from a bezoar model, graded one answer at a time by an LLM judge.

    python -m bezoar.eval mt-bench --model DIR --questions question.jsonl --out DIR \\
        --judge-model gpt-4o --judge-provider openai

The steps, each resumable:

1. Questions: a FastChat-format ``question.jsonl`` (``question_id``, ``category``, ``turns`` and,
   for some, ``reference``) or a dataset name (``datasets.load_dataset``; columns ``prompt`` /
   ``turns``, ``category``, ``reference``, ``prompt_id`` / ``question_id``). The project does not
   ship the benchmark's questions; ``bezoar/assets/mt_bench/sample_questions.jsonl`` holds eight
   questions in the same format for tests and demos.
2. Answers: both turns for every question, the second seeing the first answer, rendered with the
   OpenBezoar chat template (``bezoar.eval.chat``). Temperature by category: writing and roleplay
   0.7, stem and humanities 0.1, extraction, math, coding and reasoning greedy, any other category 0.7
   (FastChat's settings); sampled answers draw from the 50 most likely tokens (``--top-k``; FastChat
   samples through transformers' ``generate``, whose top_k defaults to 50), each answer from a generator seeded by
   ``--seed``, the question and the turn; at most 1024 new tokens. Decoded with continuous batching
   (``--batch-size`` rows): a turn takes a row as one frees, a second turn as soon as its first ends. Written to
   ``answers.jsonl`` in FastChat's model-answer format, one line per finished question (the settings
   they are made with, and the model and adapter folders with their content's fingerprint, in
   ``answers.jsonl.settings.json``: a run with other settings, or with a model or adapter of other files, is
   refused); a rerun keeps the questions already there.
3. Judging: single-answer grading. Turn 1 is judged with ``single-v1`` (``single-math-v1`` with
   the reference answer for math, reasoning and coding), turn 2 with the ``-multi-turn`` prompts,
   which show the whole conversation. Prompts come from a FastChat ``judge_prompts.jsonl``
   (``--judge-prompts``; default ``bezoar/assets/mt_bench/judge_prompts.jsonl``, written for this
   project). Every judge call goes through the client pool (``bezoar.generate.pool``) and its
   durable store ``judge_store.jsonl``: a rerun sends only what is not answered yet.
4. Scores, as FastChat reads them: the first ``[[x]]`` in a judgment, else the first ``[x]``, taken as
   it is (a judge's ``[[0]]`` or ``[[11]]`` counts as 0 or 11, as in FastChat's results); a judgment
   with neither scores -1 and is left out of every average, as is a failed call. The report counts the
   ratings outside 1-10 apart (``outside_scale``) without changing them. ``judgments.jsonl`` (FastChat's
   single-judgment format plus ``category``), ``results.md`` (per turn, per category, overall),
   ``results.json`` and ``categories.png`` (mean score per category).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("bezoar.eval")

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "mt_bench"
DEFAULT_JUDGE_PROMPTS = ASSETS / "judge_prompts.jsonl"
SAMPLE_QUESTIONS = ASSETS / "sample_questions.jsonl"

#: Categories whose answers are judged against a reference answer.
NEED_REFERENCE = ("math", "reasoning", "coding")
#: Sampling temperature by category (FastChat's MT-Bench settings, 0 = greedy); a category not named here
#: is sampled at OTHER_TEMPERATURE, as FastChat's answer generation does.
CATEGORY_TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                        "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
OTHER_TEMPERATURE = 0.7
#: Top-k of the sampled categories: transformers' default, which FastChat's answers get from generate().
TOP_K = 50
MAX_NEW_TOKENS = 1024

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")


class MTBenchError(ValueError):
    """Bad input (questions, answers, judge prompts): the message names the file and line."""


# ---- questions, answers, judge prompts -------------------------------------------------------


@dataclass
class Question:
    question_id: Any
    category: str
    turns: list[str]
    reference: list[str] | None = None


@dataclass
class Answer:
    question_id: Any
    model_id: str
    turns: list[str]
    answer_id: str = field(default_factory=lambda: uuid.uuid4().hex[:22])
    tstamp: float = field(default_factory=time.time)

    def to_record(self) -> dict:
        return {"question_id": self.question_id, "answer_id": self.answer_id, "model_id": self.model_id,
                "choices": [{"index": 0, "turns": self.turns}], "tstamp": self.tstamp}


@dataclass
class JudgePrompt:
    name: str
    system_prompt: str
    prompt_template: str
    output_format: str = "[[rating]]"
    type: str = "single"


def _utf8_lines(path: Path, what: str, torn_tail: bool = False):
    """(line number, text, whether it is the last line) of each non-blank line of ``path``. Lines end at
    b"\n" only: str.splitlines() also breaks at characters a string may hold (U+0085, U+2028), which
    json.dumps(ensure_ascii=False) writes as they are. With ``torn_tail``, a last line that is not UTF-8
    (a run killed inside a multi-byte character) is dropped with a warning; elsewhere bad bytes are an
    error naming the line."""
    lines = path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for line_no, raw in enumerate(lines, 1):
        last = line_no == len(lines)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if torn_tail and last:
                log.warning("%s: ignoring an incomplete last line (an interrupted run)", path)
                continue
            raise MTBenchError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x}); "
                               f"{what} must be UTF-8 text") from None
        if line.strip():
            yield line_no, line, last


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    if not path.exists():
        raise MTBenchError(f"{path}: no such file")
    rows = []
    for line_no, line, _ in _utf8_lines(path, "question, reference and judge-prompt files"):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MTBenchError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise MTBenchError(f"{path}:{line_no}: expected a JSON object")
        rows.append((line_no, row))
    return rows


def _check_question_id(qid, where: str):
    """``qid`` when it is a question id (an integer or a string), else the error naming ``where``."""
    if qid is None:
        raise MTBenchError(f"{where}: no question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise MTBenchError(f"{where}: question_id must be an integer or a string, got {qid!r}")
    return qid


def _answer_turns(row: dict, where: str) -> list[str]:
    """``choices[0].turns`` of a model-answer record, checked to be a non-empty list of strings: a string
    given as the turns would otherwise be read as its characters (a reference's first turn "1" for
    "158 - 58 = 100.") and sent to the paid judge."""
    try:
        turns = row["choices"][0]["turns"]
    except (KeyError, IndexError, TypeError):
        raise MTBenchError(f"{where}: expected choices[0].turns") from None
    if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
        return list(turns)
    if not isinstance(turns, list):
        got = _json_type(turns)
    elif not turns:
        got = "an empty list"
    else:
        got = f"a list holding {_json_type(next(t for t in turns if not isinstance(t, str)))}"
    raise MTBenchError(f"{where}: choices[0].turns must be a non-empty list of strings, got {got}")


def _json_type(value) -> str:
    """What a JSON value is, for error messages: "a string", "a number", "an object"..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def _question_from(row: dict, where: str) -> Question:
    qid = _check_question_id(row.get("question_id", row.get("prompt_id")), where)
    turns = row.get("turns", row.get("prompt"))
    category = row.get("category")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise MTBenchError(f"{where}: 'turns' must be a non-empty list of strings")
    if len(turns) > 2:
        raise MTBenchError(f"{where}: MT-Bench questions have one or two turns, this one has {len(turns)}")
    if not isinstance(category, str) or not category:
        raise MTBenchError(f"{where}: " + ("no category" if category in (None, "") else
                                           f"'category' must be a string, got {_json_type(category)}"))
    reference = row.get("reference")
    if reference in (None, [], ""):
        reference = None
    elif isinstance(reference, str):
        reference = [reference]
    elif not isinstance(reference, list) or not all(isinstance(r, str) for r in reference):
        raise MTBenchError(f"{where}: 'reference' must be a list of strings")
    return Question(qid, category, list(turns), reference)


def load_questions(source: str | Path, split: str = "train") -> list[Question]:
    """Questions from a FastChat ``question.jsonl`` path, or from a dataset name."""
    path = Path(source)
    if path.exists() or str(source).endswith((".jsonl", ".json")):
        questions = [_question_from(row, f"{path}:{line}") for line, row in _read_jsonl(path)]
    else:
        import datasets

        try:
            ds = datasets.load_dataset(str(source), split=split)
        except Exception as e:  # hub/network errors come in many types; one clear line for the user
            raise MTBenchError(f"questions {source!r}: not a file, and loading it as a dataset failed: {e}") from None
        questions = [_question_from(dict(row), f"{source}[{i}]") for i, row in enumerate(ds)]
    seen = set()
    for q in questions:
        if q.question_id in seen:
            raise MTBenchError(f"{source}: question_id {q.question_id!r} appears twice")
        seen.add(q.question_id)
    if not questions:
        raise MTBenchError(f"{source}: no questions")
    return questions


def load_reference_answers(path: str | Path) -> dict[Any, list[str]]:
    """Reference answers in FastChat's model-answer format (``choices[0].turns``), by question id."""
    path = Path(path)
    out = {}
    for line, row in _read_jsonl(path):
        where = f"{path}:{line}"
        out[_check_question_id(row.get("question_id"), where)] = _answer_turns(row, where)
    return out


def load_judge_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    path = Path(path) if path is not None else DEFAULT_JUDGE_PROMPTS
    prompts = {}
    for line, row in _read_jsonl(path):
        try:
            prompt = JudgePrompt(name=row["name"], system_prompt=row.get("system_prompt", ""),
                                 prompt_template=row["prompt_template"],
                                 output_format=row.get("output_format", "[[rating]]"), type=row.get("type", "single"))
        except KeyError as e:
            raise MTBenchError(f"{path}:{line}: judge prompt without {e.args[0]!r}") from None
        for name, value in asdict(prompt).items():  # each is formatted or sent as text
            if not isinstance(value, str):
                raise MTBenchError(f"{path}:{line}: judge prompt field {name!r} must be a string, "
                                   f"got {_json_type(value)}")
        prompts[prompt.name] = prompt
    for name in ("single-v1", "single-v1-multi-turn", "single-math-v1", "single-math-v1-multi-turn"):
        if name not in prompts:
            raise MTBenchError(f"{path}: no judge prompt named {name!r}")
        if prompts[name].output_format != "[[rating]]":
            raise MTBenchError(f"{path}: judge prompt {name!r} has output_format "
                               f"{prompts[name].output_format!r}; bezoar parses '[[rating]]'")
    return prompts


def read_answers(path: Path) -> dict[Any, Answer]:
    """Answers already in ``path`` (FastChat model-answer lines); a torn last line is ignored."""
    if not path.exists():
        return {}
    out = {}
    lines_of: dict[Any, int] = {}  # question_id -> the line its answer came from
    for line_no, line, last in _utf8_lines(path, "answer files", torn_tail=True):
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if last:
                log.warning("%s: ignoring an incomplete last line (an interrupted run)", path)
                continue
            raise MTBenchError(f"{where}: not a model-answer record (not valid JSON)") from None
        # A whole JSON line is no torn one: a record of the wrong shape is an error wherever it is.
        if not isinstance(row, dict):
            raise MTBenchError(f"{where}: not a model-answer record (expected a JSON object)")
        model_id = row.get("model_id")
        if not isinstance(model_id, str):
            raise MTBenchError(f"{where}: no model_id" if model_id is None else
                               f"{where}: model_id must be a string, got {_json_type(model_id)}")
        answer = Answer(_check_question_id(row.get("question_id"), where), model_id, _answer_turns(row, where),
                        row.get("answer_id", ""), row.get("tstamp", 0.0))
        earlier = out.get(answer.question_id)
        if earlier is not None and earlier.model_id != answer.model_id:
            raise MTBenchError(f"{path}:{line_no}: question {answer.question_id!r} answered by model "
                               f"{answer.model_id!r}, and on line {lines_of[answer.question_id]} by "
                               f"{earlier.model_id!r}: an answer file holds one model's answers (FastChat "
                               "writes one file per model)")
        out[answer.question_id] = answer
        lines_of[answer.question_id] = line_no
    return out


def check_answers_model(path: Path, answers: dict[Any, Answer], model_id: str) -> None:
    """Refuse to resume from answers another model wrote: they would be judged and reported as
    ``model_id``'s."""
    other = sorted({a.model_id for a in answers.values() if a.model_id != model_id})
    if other:
        raise MTBenchError(f"{path}: holds answers from model {', '.join(map(repr, other))}, not {model_id!r}; "
                           "use another --out for this model (or the same --model-id to resume that run)")


#: What answers written before bezoar recorded a setting were made with: the settings added since. ``top_k``:
#: none then. ``quant``, ``dtype``, ``device`` (how the model was loaded, recorded since they were found to change
#: the answers): the defaults, which every shipped recipe and the command line used unless told otherwise; a run
#: that kept them keeps its answers, and answers a run loaded otherwise are refused (the pipeline sets them aside
#: and answers again: nothing is deleted). Settings not named here are unknown for such answers.
ANSWERS_RECORDED_BEFORE = {"top_k": 0, "quant": "none", "dtype": "", "device": ""}


def answer_settings(max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0, top_k: int = TOP_K,
                    quant: str | None = "none", dtype: str | None = "", device: str | None = "") -> dict:
    """The settings that decide an answer file's answers (besides the model and the questions): recorded beside
    it (``answer_settings_path``) and compared before a run adds to it. The model's loading counts as given:
    ``quant`` (``"none"`` or ``"nf4"``; None reads as ``"none"``), ``dtype`` and ``device`` (``""`` or None: by
    the machine, bf16 on a GPU and fp32 on a CPU): NF4 weights or another precision answer otherwise. The batch
    size is left out on purpose: a sampled answer draws from a generator of its own (``answer_seed``), so the
    rows decoding beside it move its logits in their last bits at most, not the model; a resumed run may take a
    smaller batch after running out of memory. (Answers made before 2026-11-28 drew from one generator per
    batch: they are kept on resume, sampled with the same settings.)"""
    return {"max_new_tokens": max_new_tokens, "seed": seed, "top_k": top_k,
            "quant": quant or "none", "dtype": dtype or "", "device": device or "",
            "temperature": {**CATEGORY_TEMPERATURE, "other": OTHER_TEMPERATURE}}


#: keys of an answer settings file that record what made the answers (``answer_model``), not a setting: compared
#: by ``check_answer_settings`` with its ``made_by``, left out of ``answer_settings_changes``
MODEL_KEYS = ("model", "adapter")


def answer_model(model: str | Path, adapter: str | Path | None = None, out: str | Path | None = None) -> dict:
    """What makes an answer file's answers besides the settings: the model folder and the adapter folder (None:
    no adapter), each as its resolved path and its content fingerprint (``bezoar.fingerprint``: every file's
    name, size and sha256). Recorded beside the answers; a model with other files (another model of the same
    folder name, a retrained one, another adapter) is refused. Content, not place: a moved or copied model
    resumes. ``out``, the answers' folder, is left out of both (answers kept inside the model folder)."""
    from bezoar.fingerprint import fingerprint

    def record(path):
        if not path:
            return None
        path = Path(path).expanduser().resolve()
        return {"path": str(path), **(fingerprint(path, exclude=[out] if out else ()) or {})}

    return {"model": record(model), "adapter": record(adapter)}


def _same_files(then, now) -> bool:
    if then is None or now is None:
        return then is None and now is None
    content = lambda r: {k: v for k, v in r.items() if k != "path"}  # noqa: E731
    return content(then) == content(now)


def _describe_folder(record) -> str:
    if record is None:
        return "none"
    if not isinstance(record, dict):
        return repr(record)
    size = record.get("size", 0)
    size = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size} bytes"
    return f"{record.get('path')} ({record.get('files', '?')} files, {size}, sha256 {str(record.get('sha256'))[:12]})"


def answer_settings_path(answers_path: Path) -> Path:
    """``answers.jsonl`` -> ``answers.jsonl.settings.json``: the settings its answers were made with."""
    answers_path = Path(answers_path)
    return answers_path.with_name(answers_path.name + ".settings.json")


def answer_settings_changes(answers_path: Path, settings: dict, answers: dict | None = None) -> list[str]:
    """``key: then -> now`` for each setting that differs from what the answers in ``answers_path`` were made
    with (none when it holds no answers; ``answers``: them, already read). Without a settings file the
    answers predate it: ``ANSWERS_RECORDED_BEFORE`` says what they were made with."""
    answers_path = Path(answers_path)
    if answers is None:
        answers = read_answers(answers_path)
    if not answers:
        return []
    side = answer_settings_path(answers_path)
    if side.exists():
        try:
            recorded = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MTBenchError(f"{side}: unreadable ({e}); it records what {answers_path.name}'s answers were "
                               "made with: restore it, or move both files away to answer again") from None
        if not isinstance(recorded, dict):
            raise MTBenchError(f"{side}: expected a JSON object of settings")
        recorded = {**ANSWERS_RECORDED_BEFORE, **{k: v for k, v in recorded.items() if k not in MODEL_KEYS}}
    else:
        recorded = dict(ANSWERS_RECORDED_BEFORE)
    return [f"{key}: {recorded[key]!r} -> {settings.get(key)!r}" for key in sorted(recorded)
            if recorded[key] != settings.get(key)]


def check_answer_settings(answers_path: Path, settings: dict, answers: dict | None = None,
                          made_by: dict | None = None) -> bool:
    """Refuse to add to, or judge, answers made with other settings, or (``made_by``: ``answer_model``'s record of
    the model and adapter) by a model with other files: they would be reported as made with these, by this
    model. Before the first answer the settings (and ``made_by``) are recorded beside the file. False when there
    are answers whose model is not recorded (written before bezoar recorded it, or without ``made_by``): they
    cannot be checked; True otherwise. Answers from before bezoar recorded settings get no settings file: what
    else they were made with is not known."""
    answers_path = Path(answers_path)
    if answers is None:
        answers = read_answers(answers_path)
    changes = answer_settings_changes(answers_path, settings, answers)
    side = answer_settings_path(answers_path)
    if changes:
        undo = "; ".join(changes)
        raise MTBenchError(f"{answers_path}: its {len(answers)} answers were made with other settings ({undo}); "
                           "run with the settings they were made with to resume or judge them, or move "
                           f"{answers_path.name}{' and ' + side.name if side.exists() else ''} away to answer again")
    if not answers:
        answers_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = side.with_name(side.name + ".tmp")
        tmp.write_text(json.dumps({**settings, **(made_by or {})}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, side)
        return True
    if made_by is None:
        return True
    recorded = json.loads(side.read_text(encoding="utf-8")) if side.exists() else {}  # readable: checked above
    if "model" not in recorded:
        return False
    differ = [f"--{key} {_describe_folder(recorded.get(key))} -> {_describe_folder(made_by.get(key))}"
              for key in MODEL_KEYS if not _same_files(recorded.get(key), made_by.get(key))]
    if differ:
        raise MTBenchError(f"{answers_path}: its {len(answers)} answers were made by another model than this run's "
                           f"({'; '.join(differ)}; as {side.name} records): they would be judged as this model's. "
                           f"Use another --out for this model, or move {answers_path.name} and {side.name} away to "
                           "answer again (the model they were made by resumes or judges them)")
    return True


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline (a write interrupted midway) so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _append_jsonl(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- answer generation ------------------------------------------------------------------------


def category_temperature(category: str) -> float:
    return CATEGORY_TEMPERATURE.get(category, OTHER_TEMPERATURE)


def generate_answers(model, tokenizer, questions: list[Question], model_id: str, answers_path: Path,
                     max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8, seed: int = 0,
                     top_k: int = TOP_K, loaded: dict | None = None, made_by: dict | None = None) -> dict[Any, Answer]:
    """Answer every question not yet in ``answers_path`` (both turns) and append the answers there.
    Sampled categories draw from the ``top_k`` most likely tokens (0: all); greedy ones ignore it. ``loaded``:
    how ``model`` was loaded (``quant``, ``dtype``, ``device`` as ``answer_settings`` takes them; default the
    defaults), which the answers are recorded as made with; ``made_by``: ``answer_model``'s record of the folders
    it was loaded from, recorded and checked too (``check_answer_settings``)."""
    import torch

    from bezoar.eval.chat import CHAT_STOP, chat_prompt
    from bezoar.eval.decoding import StopStrings, cut_at_stop
    from bezoar.model.decode import ContinuousBatch, Sequence, check_top_k

    check_top_k(top_k)
    _drop_torn_tail(answers_path)
    done = read_answers(answers_path)
    check_answers_model(answers_path, done, model_id)
    check_answer_settings(answers_path, answer_settings(max_new_tokens, seed, top_k, **(loaded or {})),
                          done, made_by=made_by)
    todo = [q for q in questions if q.question_id not in done]
    if not todo:
        return done
    log.info("mt-bench: answering %d questions (%d already answered)", len(todo), len(done))
    model.eval()  # LoRA dropout off
    # Continuous batching: every question's turn takes a row as one frees, a turn 2 the moment its turn 1 ends,
    # so a short answer never waits for the longest of a batch (the cache and CUDA graphs serve every step).
    batch = ContinuousBatch(model, batch_size, "auto", eos_id=getattr(tokenizer, "eos_ids", tokenizer.eos_id),
                            pad_id=tokenizer.pad_id)
    context = model.config.max_position_embeddings
    stop = list(CHAT_STOP)
    stops = StopStrings(tokenizer, stop)
    conversations: dict[Any, list[dict]] = {q.question_id: [] for q in todo}
    answers: dict[Any, list[str]] = {q.question_id: [] for q in todo}
    ready: deque[tuple[Question, int]] = deque((q, 0) for q in todo)

    def sequence(q: Question, turn: int) -> Sequence:
        conversations[q.question_id].append({"role": "user", "content": q.turns[turn]})
        # BOS where the tokenizer's add_bos_token says so (OpenLLaMA's does), as FastChat's transformers tokenizer
        ids = tokenizer.encode(chat_prompt(conversations[q.question_id]), bos=tokenizer.add_bos)
        # each answer gets max_new_tokens, or what its own prompt leaves of the context
        budget = min(max_new_tokens, context - len(ids))
        if budget < 1:
            raise MTBenchError(f"question {q.question_id!r} turn {turn + 1}: the prompt fills the model's context "
                               f"of {context} tokens")
        temperature = category_temperature(q.category)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=model.device).manual_seed(answer_seed(seed, q.question_id, turn))
        return Sequence(ids, budget, temperature, top_k=top_k if temperature > 0 else 0, generator=generator,
                        should_stop=functools.partial(stops, 0), on_done=finished, tag=(q, turn))

    def finished(seq: Sequence) -> None:
        if seq.finish == "error":
            raise seq.error
        q, turn = seq.tag
        text = cut_at_stop(tokenizer.decode(seq.new_ids), stop).strip()
        answers[q.question_id].append(text)
        conversations[q.question_id].append({"role": "assistant", "content": text})
        if turn + 1 < len(q.turns):
            ready.appendleft((q, turn + 1))  # before new questions: a finished question is written sooner
            return
        answer = Answer(q.question_id, model_id, answers[q.question_id])
        _append_jsonl(answers_path, [answer.to_record()])  # each question as it is done: a crash loses little
        done[q.question_id] = answer
        log.info("mt-bench: question %r answered (%d of %d)", q.question_id, len(done), len(questions))

    while ready or batch.running:
        if ready and batch.free:
            batch.admit([sequence(*ready.popleft()) for _ in range(min(batch.free, len(ready)))])
        batch.step()
    return done


def answer_seed(seed: int, question_id, turn: int) -> int:
    """The seed of one sampled answer: drawn from ``seed``, the question and the turn alone, so an answer does
    not depend on which others decode beside it, their order or a resumed run."""
    digest = hashlib.sha256(json.dumps([seed, question_id, turn]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---- judging ---------------------------------------------------------------------------------


@dataclass
class JudgeConfig:
    """The judge model and how to reach it (through the client pool)."""

    model: str
    provider: str = "openai"  # openai | anthropic | compat (any OpenAI-compatible server)
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 16
    rpm: float | None = None
    tpm: float | None = None
    max_tokens: int = 2048
    temperature: float = 0.0


def check_judge(config: JudgeConfig) -> None:
    """What can be known about the judge before any answer is generated (an hour on a real model): the provider's
    URL, the limits, and that its API key is set and can be sent. Errors name the flag or the environment
    variable, never the key."""
    from bezoar.generate.pool import Limits
    from bezoar.generate.providers import DEFAULT_KEY_ENV, Endpoint, check_key_for_header, read_api_key
    from bezoar.generate.request import GenerateError

    if config.provider == "compat" and not config.base_url:
        raise MTBenchError("--judge-provider compat needs --judge-base-url (the server's OpenAI-compatible API, "
                           "e.g. http://host:8000/v1)")
    try:
        endpoint = Endpoint(config.provider, config.base_url, api_key_env=config.api_key_env)
    except GenerateError as e:
        raise MTBenchError(f"--judge-base-url: {e}") from None
    try:
        Limits(concurrency=config.concurrency, rpm=config.rpm, tpm=config.tpm)
    except GenerateError as e:
        flags = {"concurrency": "--concurrency", "rpm": "--rpm", "tpm": "--tpm"}
        named = [f"{flags.get(f, f)} {getattr(config, f):g}" for f in getattr(e, "fields", [])]
        raise MTBenchError(f"{', '.join(named) or e}: must be more than 0") from None
    env = config.api_key_env or DEFAULT_KEY_ENV.get(config.provider)  # compat: a key only when one is named
    if env is not None and not os.environ.get(env, "").strip():
        how = "" if config.api_key_env else "; or name the variable that holds it with --judge-api-key-env"
        state = "is empty" if env in os.environ else "is not set"
        raise MTBenchError(f"no API key for the judge ({endpoint.label}): environment variable {env} {state}{how}")
    check_key_for_header(endpoint, read_api_key(endpoint))


@dataclass
class JudgeTask:
    """One judge call: one answer turn of one question."""

    question_id: Any
    category: str
    turn: int  # 1 or 2
    prompt_name: str
    system: str
    user_prompt: str


def unanswered(questions: list[Question], answers: dict[Any, Answer]) -> list[str]:
    """The questions ``answers`` does not answer in full: "question 81" (no answer), "question 81 turn 2" (an
    answer with fewer turns than the question asks)."""
    gaps = []
    for q in questions:
        answer = answers.get(q.question_id)
        if answer is None:
            gaps.append(f"question {q.question_id}")
        elif len(answer.turns) < len(q.turns):
            gaps.extend(f"question {q.question_id} turn {t}" for t in range(len(answer.turns) + 1, len(q.turns) + 1))
    return gaps


def check_answered(questions: list[Question], answers: dict[Any, Answer], source: str = "the answers") -> None:
    """Refuse answers that leave turns of the questions unanswered (``unanswered``): a score over the rest would
    read as the model's MT-Bench score (FastChat's gen_judgment refuses such answers too). ``source`` names
    the answers in the message."""
    gaps = unanswered(questions, answers)
    if gaps:
        turns = sum(len(q.turns) for q in questions)
        missing = sum(len(q.turns) - (len(answers[q.question_id].turns) if q.question_id in answers else 0)
                      for q in questions if q.question_id not in answers
                      or len(answers[q.question_id].turns) < len(q.turns))
        shown = ", ".join(gaps[:10]) + (f" and {len(gaps) - 10} more" if len(gaps) > 10 else "")
        raise MTBenchError(f"{source}: {missing} of the {turns} turns of the {len(questions)} questions have no "
                           f"answer ({shown}); MT-Bench is scored over every question: answer them (a run with "
                           "--model completes an answers.jsonl it made), or give --questions only those answered")


def judge_tasks(questions: list[Question], answers: dict[Any, Answer], prompts: dict[str, JudgePrompt],
                references: dict[Any, list[str]] | None = None, source: str = "judge prompts",
                answers_source: str = "the answers") -> list[JudgeTask]:
    """Build the judge prompts for every turn. Reference answers come from ``references`` (a reference-answer
    file) or else from the question's own ``reference`` field. Answers that leave a turn unanswered are refused
    (``check_answered``; ``answers_source`` names them)."""
    check_answered(questions, answers, answers_source)
    references = references or {}
    tasks, missing_ref = [], []
    for q in questions:
        answer = answers[q.question_id]
        ref = references.get(q.question_id) or q.reference
        math_like = q.category in NEED_REFERENCE
        if math_like and not ref:
            missing_ref.append(q.question_id)
            math_like = False
        for turn in range(1, min(len(q.turns), len(answer.turns)) + 1):
            name = ("single-math-v1" if math_like else "single-v1") + ("-multi-turn" if turn == 2 else "")
            prompt = prompts[name]
            fields = {"question": q.turns[0], "answer": answer.turns[0], "question_1": q.turns[0],
                      "answer_1": answer.turns[0]}
            if turn == 2:
                fields.update(question_2=q.turns[1], answer_2=answer.turns[1])
            if math_like:
                fields.update(ref_answer_1=ref[0], ref_answer_2=ref[1] if len(ref) > 1 else "")
            try:
                user_prompt = prompt.prompt_template.format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise MTBenchError(f"{source}: judge prompt {name!r} has a placeholder bezoar cannot fill: {e}") from None
            tasks.append(JudgeTask(q.question_id, q.category, turn, name, prompt.system_prompt, user_prompt))
    if missing_ref:
        log.warning("mt-bench: no reference answer for %d %s question(s) (%s); judged without one",
                    len(missing_ref), "/".join(NEED_REFERENCE), ", ".join(map(str, missing_ref[:10])))
    return tasks


def judge_requests(tasks: list[JudgeTask], config: JudgeConfig) -> list:
    """The pool requests for the judge tasks; a request's id names the question and turn, so the
    store recognises it on a rerun (and a changed prompt or answer is a new request)."""
    from bezoar.generate.pool import Request

    return [Request(messages=[{"role": "user", "content": t.user_prompt}], system=t.system or None,
                    model=config.model, max_tokens=config.max_tokens, temperature=config.temperature,
                    id=f"mt-bench/{t.question_id}/turn-{t.turn}/{t.prompt_name}",
                    meta={"question_id": t.question_id, "turn": t.turn})
            for t in tasks]


def call_judge(requests: list, config: JudgeConfig, store_path: Path, progress: bool = False) -> list:
    """Send the judge requests through the client pool; results come back in request order.
    Requests already answered in the store are not sent again; failed ones are retried."""
    from bezoar.generate.pool import Endpoint, Limits, run_sync

    endpoint = Endpoint(config.provider, config.base_url, api_key_env=config.api_key_env)
    limits = Limits(concurrency=config.concurrency, rpm=config.rpm, tpm=config.tpm)
    return run_sync(requests, endpoint, limits, str(store_path), model=config.model, progress=progress,
                    retry_failed=True)


def parse_rating(judgment: str | None) -> float:
    """The first ``[[x]]`` in the judgment, else the first ``[x]``, as FastChat's single-answer grading
    reads it (its value kept, inside 1-10 or not); -1 when there is none. FastChat's results drop only
    -1, so a rating of 0 or 11 counts there, and here."""
    if not judgment:
        return -1.0
    match = RATING.search(judgment) or RATING_FALLBACK.search(judgment)
    if match is None:
        return -1.0
    return float(match.group(1))


@dataclass
class Judgment:
    question_id: Any
    model: str
    judge: list[str]  # [judge model, prompt name]
    user_prompt: str
    judgment: str
    score: float
    turn: int
    category: str
    error: str | None = None
    tstamp: float = field(default_factory=time.time)

    def to_record(self) -> dict:
        record = asdict(self)
        if record["error"] is None:
            record.pop("error")
        return record


def judgments_from(tasks: list[JudgeTask], results: list, model_id: str, judge_model: str) -> list[Judgment]:
    out = []
    for task, result in zip(tasks, results):
        ok = result.error is None
        text = result.response if ok else ""
        out.append(Judgment(task.question_id, model_id, [judge_model, task.prompt_name], task.user_prompt,
                            text or "", parse_rating(text) if ok else -1.0, task.turn, task.category,
                            error=None if ok else result.error))
    return out


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Summary:
    overall: float | None
    per_turn: dict[int, float | None]
    per_category: dict[str, float | None]
    per_category_turn: dict[str, dict[int, float | None]]
    counted: int
    unparseable: int
    failed: int
    outside_scale: int = 0  # counted ratings outside the prompts' 1-10 (kept as given, as FastChat keeps them)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(judgments: list[Judgment]) -> Summary:
    """Averages over the judgments with a score (score -1: unparseable or failed, left out, the only
    score FastChat's show_result drops)."""
    valid = [j for j in judgments if j.score != -1]
    turns = sorted({j.turn for j in judgments})
    categories = list(dict.fromkeys(j.category for j in judgments))
    return Summary(
        overall=_mean([j.score for j in valid]),
        per_turn={t: _mean([j.score for j in valid if j.turn == t]) for t in turns},
        per_category={c: _mean([j.score for j in valid if j.category == c]) for c in categories},
        per_category_turn={c: {t: _mean([j.score for j in valid if j.category == c and j.turn == t]) for t in turns}
                           for c in categories},
        counted=len(valid),
        unparseable=sum(1 for j in judgments if j.score == -1 and j.error is None),
        failed=sum(1 for j in judgments if j.error is not None),
        outside_scale=sum(1 for j in valid if not 1 <= j.score <= 10),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def summary_table(summary: Summary, model_id: str, judge_model: str) -> str:
    turns = sorted(summary.per_turn)
    lines = [f"## MT-Bench: {model_id} (judge: {judge_model})", "",
             "| category | " + " | ".join(f"turn {t}" for t in turns) + " | average |",
             "|---|" + "---|" * (len(turns) + 1)]
    for category, mean in summary.per_category.items():
        cells = [_fmt(summary.per_category_turn[category][t]) for t in turns]
        lines.append(f"| {category} | " + " | ".join(cells) + f" | {_fmt(mean)} |")
    lines.append("| **all** | " + " | ".join(_fmt(summary.per_turn[t]) for t in turns)
                 + f" | **{_fmt(summary.overall)}** |")
    lines += ["", f"{summary.counted} judgments counted; {summary.unparseable} without a rating (-1) and "
                  f"{summary.failed} failed calls left out."]
    if summary.outside_scale:
        lines[-1] += (f" {summary.outside_scale} of the counted ratings lie outside 1-10 (counted as given, "
                      "as FastChat counts them).")
    return "\n".join(lines)


def category_chart(summary: Summary, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary.per_category)
    values = [summary.per_category[n] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 1.5), 3.6))
    bars = ax.bar(names, values, color="#4c72b0")
    for bar, n in zip(bars, names):
        label = _fmt(summary.per_category[n])
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max([10.0] + values))  # a judge's ratings above 10 count (parse_rating)
    ax.set_ylabel("mean score (scale 1-10)")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out_dir: Path, judgments: list[Judgment], model_id: str, judge_model: str) -> Summary:
    summary = summarize(judgments)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "judgments.jsonl.tmp"
    tmp.write_text("".join(json.dumps(j.to_record(), ensure_ascii=False) + "\n" for j in judgments), encoding="utf-8")
    tmp.replace(out_dir / "judgments.jsonl")
    table = summary_table(summary, model_id, judge_model)
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    payload = {"model_id": model_id, "judge": judge_model, **asdict(summary)}
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    category_chart(summary, out_dir / "categories.png", f"MT-Bench {model_id} (judge {judge_model})")
    return summary


def run_judging(questions: list[Question], answers: dict[Any, Answer], config: JudgeConfig, out_dir: Path,
                model_id: str, judge_prompts: str | Path | None = None, references: dict | None = None,
                progress: bool = False, answers_source: str = "the answers") -> tuple[Summary, list[Judgment]]:
    """Judge every turn (through the pool, resumable) and write the result files; answers that leave a turn
    unanswered are refused (``check_answered``), before any judge call."""
    prompts = load_judge_prompts(judge_prompts)
    tasks = judge_tasks(questions, answers, prompts, references, source=str(judge_prompts or DEFAULT_JUDGE_PROMPTS),
                        answers_source=answers_source)
    if not tasks:
        raise MTBenchError("nothing to judge: no questions")
    results = call_judge(judge_requests(tasks, config), config, out_dir / "judge_store.jsonl", progress=progress)
    judgments = judgments_from(tasks, results, model_id, config.model)
    return write_results(out_dir, judgments, model_id, config.model), judgments
