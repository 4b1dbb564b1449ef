"""``python -m bezoar.generate filter``: an LLM judge scores records; those at or above a threshold are kept.

OpenBezoar used GPT-4 as a stand-in for human review of its synthetic data. The judge reads
each record's system message (if any), instruction (plus input, if any) and response, and rates
them on one rubric, helpfulness, correctness and instruction following, as a whole number
from 1 to 10 with a short reason (template ``judge``). The reply must contain::

    Reason: <text>
    Score: <1-10>

Parsing is lenient about form (any order, ``**Score:** 8``, ``Score: [8]``, ``Score: <8>``,
``Score (out of 10): 8``, ``8/10``, an unlabelled reason) and strict about meaning: no score,
several different scores, a range (``7-8``), a score on another scale (``4/5``, ``Score (out of
5): 4``), a score outside 1-10, or a number that does not end where a number ends (``7,5``,
``1e1``, ``10x``, ``1 0``) make the reply unparseable. An unparseable reply, a reply cut off at
max_tokens (its score may be cut too: ``Score: 1`` of ``Score: 10``), or a judge request that
failed, is a recorded failure: the record goes to ``judge-failures.jsonl`` with the error and the
judge's reply, is counted, and is in neither output below. Rerun with ``--retry-failed`` to ask
again for the requests that failed; a reply that was received but could not be used stays what
it was (its answer is stored), so change the template, ``--max-tokens`` or the judge to get a
different one. The exit status is 1 when judge requests ended as recorded failures (those
``--retry-failed`` sends again), else 0: an unusable reply is counted and listed but does not change it.

Outputs (``OUT``), written at the end, atomically:

- ``judged.jsonl``: every scored record, its fields unchanged plus ``judge_score``,
  ``judge_reason`` and ``judge_model``;
- ``filtered.jsonl``: the records with ``judge_score >= --threshold``, same fields (the SFT
  loader ignores the judge fields);
- ``judge-failures.jsonl`` and ``filter-summary.json`` (counts and the score histogram).

Records are read with the field names of the SFT loader's presets: instruction | question |
prompt, input | context, response | output | answer, system_prompt | system. Judge requests are
keyed by their content (temperature 0), so identical records are judged once and a grown input
file only costs its new records.
"""

from __future__ import annotations

import re
from collections import Counter

from bezoar.generate.request import GenerateError
from bezoar.generate.schemes import (TRUNCATED, add_scheme_arguments, chat, check_out_dir, check_sampling,
                                     cut_short, exit_status, failed_keys, load_templates, read_records, run_step, say,
                                     text_field, write_json, write_jsonl)

TEMPLATES = ("judge",)
OUTPUTS = ("judged.jsonl", "filtered.jsonl", "judge-failures.jsonl", "filter-summary.json")
INSTRUCTION_FIELDS = ("instruction", "question", "prompt")
INPUT_FIELDS = ("input", "context")
RESPONSE_FIELDS = ("response", "output", "answer")
SYSTEM_FIELDS = ("system_prompt", "system")

# "Score", maybe a note in parentheses ("(1-10)", "(out of 10)": a scale other than 10 in it is refused),
# ":" or "=", then the number, maybe in <> or [] ("<8>": the template's placeholder filled in). The number
# ends where a number ends: not before a letter or digit, nor before "," or "." and a digit ("7,5", "1e1",
# "10x" and "1 0" are no score). It may be followed, on its line, by its scale ("/ 10", "out of 10", "(out
# of 10)": any other scale is not 1-10) or by the end of a range ("7-8", "7 to 8": two scores); a list item
# on the next line ("\n- 1 point off for ...") is neither.
_LABEL = r"\bscore\s*(?:\((?P<note>[^()\n]{0,40})\)\s*)?[:=]\s*"
_NUMBER_END = r"(?![ \t]*\d|\w|[.,]\d)"
_SCORE = re.compile(
    _LABEL + rf"(?:(?P<angle><)|(?P<square>\[))?[ \t]*(?P<score>-?\d+(?:\.\d+)?){_NUMBER_END}"
    rf"(?:[ \t]*(?P<paren>\()?[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<scale>\d+(?:\.\d+)?){_NUMBER_END}(?(paren)[ \t]*\))"
    rf"|[ \t]*(?:-|\u2013|to)[ \t]*(?P<upper>\d+(?:\.\d+)?){_NUMBER_END})?"
    r"(?(angle)[ \t]*>)(?(square)[ \t]*\])", re.I)
# A label followed by what starts like a number but is not one of the forms above ("Score: 7,5").
_GARBLED = re.compile(_LABEL + r"(?P<value>[<\[]?[ \t]*-?\d\S*(?:[ \t]+\S+)?)", re.I)
_NOTE_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# A scale named after the score on its line in words the forms above do not read: "4 of 5", "4 out of five",
# "4 on a 5-point scale", "(on a scale of 1 to 5)"; any but 10 is not the 1-10 scale.
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
                 "ten": 10, "hundred": 100, "a hundred": 100, "one hundred": 100}
_SCALE_NUMBER = r"(?P<n>\d+(?:\.\d+)?|(?:a |one )?hundred|one|two|three|four|five|six|seven|eight|nine|ten)\b"
# Only right after the number (maybe in a parenthesis, after "on a"): a reason on the same line about a survey's
# "5-point scale" is no scale of the score.
_SCALE_LEAD = r"^[ \t]*\(?[ \t]*(?:on[ \t]+)?(?:a[ \t]+|the[ \t]+)?"
_SCALE_AFTER = [re.compile(r"^[ \t]*\(?[ \t]*(?:out[ \t]+of|of)[ \t]+" + _SCALE_NUMBER, re.I),
                re.compile(_SCALE_LEAD + _SCALE_NUMBER + r"[ \t]*[- ]?[ \t]*points?[ \t]+scale\b", re.I),
                re.compile(_SCALE_LEAD + r"scale[ \t]+(?:of|from)[ \t]+(?:0|1|one|zero)[ \t]*(?:-|\u2013|to)[ \t]*"
                           + _SCALE_NUMBER, re.I)]
# the words of a label before "Score" on its line ("Overall Score: 8"): not part of the reason
_LABEL_WORDS = re.compile(r"(?:^|(?<=\n))[ \t#>*_-]*(?:(?:overall|final|total|my|the|judge'?s?|quality|response"
                          r"|answer|helpfulness)[ \t]+){1,3}$", re.I)


def _other_scale(text: str, m: re.Match) -> str | None:
    """The scale other than 10 named right after a score (see _SCALE_AFTER), or None."""
    rest = text[m.end():].split("\n", 1)[0]
    for pattern in _SCALE_AFTER:
        found = pattern.search(rest)
        if found is not None:
            word = found.group("n").lower()
            value = float(word) if word[0].isdigit() else _NUMBER_WORDS[" ".join(word.split())]
            if value != 10:
                return found.group("n")
    return None


def _label_start(text: str, start: int) -> int:
    """Where the score's label begins: ``start`` (its "Score"), or the start of its line where only words of a
    label stand before it there ("Overall Score: 8", "My final score: 8")."""
    found = _LABEL_WORDS.search(text[:start])
    return found.start() if found is not None else start
_REASON = re.compile(r"\b(?:reason|reasoning|explanation|rationale)\s*:\s*", re.I)


class JudgeParseError(ValueError):
    pass


def parse_judgement(reply: str) -> tuple[float | int, str]:
    """(score, reason) from a judge reply; JudgeParseError says why it cannot be read."""
    text = reply.replace("**", "").replace("__", "")
    matches = list(_SCORE.finditer(text))
    starts = {m.start() for m in matches}
    for m in _GARBLED.finditer(text):
        if m.start() not in starts:
            raise JudgeParseError(f"'{m.group(0).strip()}' is not a score from 1 to 10")
    if not matches:
        raise JudgeParseError("no 'Score: N' in the reply")
    for m in matches:
        notes = [float(n) for n in _NOTE_NUMBER.findall(m.group("note") or "")]
        if notes and max(notes) != 10:
            raise JudgeParseError(f"score {m.group('score')} ({m.group('note')}) is not on the 1-10 scale")
        if m.group("scale") is not None and float(m.group("scale")) != 10:
            raise JudgeParseError(f"score {m.group('score')}/{m.group('scale')} is not on the 1-10 scale")
        if m.group("upper") is not None:
            raise JudgeParseError(f"a range of scores ({m.group('score')}-{m.group('upper')}), not one score")
        if (scale := _other_scale(text, m)) is not None:
            raise JudgeParseError(f"score {m.group('score')} (of {scale}) is not on the 1-10 scale")
    scores = [float(m.group("score")) for m in matches]
    if len(set(scores)) > 1:
        raise JudgeParseError(f"several different scores in the reply: {', '.join(f'{s:g}' for s in scores)}")
    score = scores[0]
    if not 1 <= score <= 10:
        raise JudgeParseError(f"score {score:g} is outside 1-10")
    label = _REASON.search(text)
    if label is not None:
        following = text[label.end():]
        after = _SCORE.search(following)
        reason = following if after is None else following[:_label_start(following, after.start())]
    else:
        parts, at = [], 0
        for m in matches:
            parts.append(text[at:_label_start(text, m.start())])
            at = m.end()
        reason = "".join(parts) + text[at:]
    reason = " ".join(reason.split()).strip(" -:").lstrip(".;, ")  # "Score: 9. The answer ..." -> "The answer ..."
    if not reason:
        raise JudgeParseError("the reply gives a score but no reason")
    return (int(score) if score.is_integer() else score), reason


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "filter", help="LLM judge: score records 1-10, keep those at or above a threshold",
        description="Score each record (helpfulness, correctness, instruction following) with a judge LLM and "
                    "keep those scoring at least --threshold. Writes OUT/judged.jsonl (all scored), "
                    "OUT/filtered.jsonl (kept), OUT/judge-failures.jsonl. Rerun the same command to resume.")
    p.add_argument("input", help="records to judge: JSONL (e.g. OUT/raw.jsonl of lamini / evol / orca) or any "
                                 "format bezoar.data reads")
    p.add_argument("--threshold", type=float, default=7.0,
                   help="keep records whose score is at least this (1-10; default 7)")
    p.add_argument("--split", default="train", help="split, when INPUT is a datasets name (default train)")
    add_scheme_arguments(p, TEMPLATES, temperature=0.0, max_tokens=256, model="judge")
    p.set_defaults(func=run_filter)


def run_filter(args) -> int:
    check_sampling(args)
    if not 1.0 <= args.threshold <= 10.0:
        raise GenerateError(f"--threshold must be between 1 and 10, got {args.threshold:g}")
    template = load_templates(TEMPLATES, args.template)["judge"]
    items = []  # (record, prompt)
    for origin, record in read_records(args.input, what="input file", split=args.split):
        instruction = text_field(record, origin, INSTRUCTION_FIELDS, required=True, what="record")
        extra = text_field(record, origin, INPUT_FIELDS, required=False, what="record")
        response = text_field(record, origin, RESPONSE_FIELDS, required=True, what="record", nonempty=False)
        system = text_field(record, origin, SYSTEM_FIELDS, required=False, what="record")
        if extra and extra.strip():
            instruction = f"{instruction.strip()}\n\n{extra.strip()}"
        prompt = template.render(system=system.strip() if system and system.strip() else "(none)",
                                 instruction=instruction.strip(), response=response.strip())
        items.append((origin, record, prompt))
    out = check_out_dir(args.out, [args.input], OUTPUTS)

    requests = [chat(prompt, temperature=args.temperature, max_tokens=args.max_tokens, id="judge", step="judge")
                for _, _, prompt in items]
    results = run_step(args, out, "judge", requests)
    judged, kept, failures = [], [], []
    histogram: Counter = Counter()
    for (origin, record, _), result in zip(items, results):
        if not result.ok:
            failures.append({**record, "judge_error": f"judge request failed: {result.error}", "judge_reply": None,
                             "judge_model": result.model or args.model, "input_origin": origin})
            continue
        try:
            if (short := cut_short(result)) is not None:
                raise JudgeParseError(f"the reply was {short}"
                                      + (" (raise --max-tokens)" if result.finish_reason in TRUNCATED else ""))
            score, reason = parse_judgement(result.response or "")
        except JudgeParseError as e:
            failures.append({**record, "judge_error": f"unparseable judge reply: {e}", "judge_reply": result.response,
                             "judge_model": result.model or args.model, "input_origin": origin})
            continue
        histogram[score] += 1
        scored = {**record, "judge_score": score, "judge_reason": reason, "judge_model": result.model or args.model}
        judged.append(scored)
        if score >= args.threshold:
            kept.append(scored)

    write_jsonl(out / "judged.jsonl", judged)
    write_jsonl(out / "filtered.jsonl", kept)
    write_jsonl(out / "judge-failures.jsonl", failures)
    summary = {"command": "filter", "input": str(args.input), "judge": args.model, "threshold": args.threshold,
               "records": len(items), "scored": len(judged), "kept": len(kept),
               "below_threshold": len(judged) - len(kept), "failures": len(failures),
               "scores": {f"{k:g}": v for k, v in sorted(histogram.items())}}
    write_json(out / "filter-summary.json", summary)
    say(f"filter: {len(items)} records: {len(kept)} kept (score >= {args.threshold:g}) in {out / 'filtered.jsonl'}, "
        f"{len(judged) - len(kept)} below, {len(failures)} judge failures"
        + (f" (listed in {out / 'judge-failures.jsonl'})" if failures else ""))
    return exit_status(out, len(failed_keys(results)))
