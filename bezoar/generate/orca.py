"""``python -m bezoar.generate orca``: Orca-style explanation tuning data (Mukherjee et al., 2023).

Queries come from the FLAN-v2 sub-collections Orca used: ``cot``, ``niv2``, ``t0`` and
``flan2021``. Each query gets a system message drawn from 16 (the first one empty; ours are in
``bezoar/assets/prompts/orca_system_messages.json``, our own wording of the paper's list) among
the ones the paper assigns to its sub-collection:

    cot       6, 11, 16
    niv2      1, 2, 5, 7, 9, 12, 13, 14, 15
    t0        1, 2, 3, 5, 7
    flan2021  3, 4, 7, and also 8, 10 for multiple-choice queries (8 and 10 speak of options)

The draw for query i depends only on ``(seed, i)``. The teacher answers with that system message;
the explanation style comes from the messages. A query repeated word for word is asked once (its
first occurrence in the input is kept). Caps: ``--cap-per-task N`` keeps at most N queries of any
one task (Orca kept at most 300 per NiV2 task), ``--cap SUB=N`` sets it per sub-collection; the
kept ones are drawn from ``(seed, task)`` among the task's queries left after the repeats are
dropped, so a task with N or more different queries keeps N different ones.

Input records (JSONL, or any format bezoar.data reads)::

    {"question": "...", "sub_collection": "cot|niv2|t0|flan2021", "task": "...", "multiple_choice": false}

FLAN's own field names also work: ``inputs``, ``task_source`` and ``task_name``, also with the
leading underscore of FLAN v2's export (``_task_source``, ``_task_name``, ``_template_type``, as in
Open-Orca/FLAN); without a ``multiple_choice`` flag a ``template_type`` containing ``_opt``
(zs_opt, fs_opt) means multiple choice. A missing task is taken to be the sub-collection.

Output (``OUT``): ``raw.jsonl``, in input order::

    {"system", "question", "instruction", "response", "source": SUB, "task", "multiple_choice",
     "system_message_id": 1..16, "teacher"}

(``question`` and ``instruction`` hold the same query: ``data.format = "orca"`` reads ``question``
and ``system``), ``dropped.jsonl`` and ``orca-summary.json``. Rerunning reuses stored answers. The
exit status is 1 when requests ended as recorded failures (``--retry-failed`` sends them again), else 0.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from bezoar.generate.request import GenerateError
from bezoar.generate.schemes import (PROMPTS, add_scheme_arguments, chat, check_out_dir, check_sampling, cut_short,
                                     excerpt, exit_status, failed_keys, read_records, rng_for, run_step, say,
                                     text_field, write_json, write_jsonl)

OUTPUTS = ("raw.jsonl", "dropped.jsonl", "orca-summary.json")
SUB_COLLECTIONS = ("cot", "niv2", "t0", "flan2021")
SUB_ALIASES = {"cot": "cot", "niv2": "niv2", "niv": "niv2", "natinst": "niv2", "natinstv2": "niv2", "t0": "t0",
               "p3": "t0", "flan2021": "flan2021", "flan": "flan2021"}
#: Orca's system-message ids per sub-collection (1-based; see the module doc).
SYSTEM_IDS = {"cot": (6, 11, 16), "niv2": (1, 2, 5, 7, 9, 12, 13, 14, 15), "t0": (1, 2, 3, 5, 7),
              "flan2021": (3, 4, 7)}
MULTIPLE_CHOICE_EXTRA = {"flan2021": (8, 10)}


def system_ids(sub_collection: str, multiple_choice: bool) -> tuple[int, ...]:
    ids = SYSTEM_IDS[sub_collection]
    if multiple_choice:
        ids = ids + MULTIPLE_CHOICE_EXTRA.get(sub_collection, ())
    return ids


def read_system_messages(path: str | Path | None) -> list[str]:
    file = Path(path).expanduser() if path is not None else PROMPTS / "orca_system_messages.json"
    try:
        messages = json.loads(file.read_text(encoding="utf-8-sig"))
    except OSError as e:
        raise GenerateError(f"cannot read system messages {file}: {e.strerror or e}") from None
    except ValueError as e:
        raise GenerateError(f"system messages {file}: not valid JSON ({e})") from None
    if not isinstance(messages, list) or len(messages) != 16 or not all(isinstance(m, str) for m in messages):
        raise GenerateError(f"system messages {file}: expected a JSON list of 16 strings (message 1 first; the "
                            "sub-collection mapping refers to them by position)")
    return messages


def _sub_collection(value, origin: str) -> str:
    if not isinstance(value, str):
        raise GenerateError(f"{origin}: 'sub_collection' must be a string, got {type(value).__name__}")
    key = value.lower().replace("_", "").replace("-", "").replace(" ", "")
    if key not in SUB_ALIASES:
        raise GenerateError(f"{origin}: unknown sub-collection {value!r}; use one of {', '.join(SUB_COLLECTIONS)}")
    return SUB_ALIASES[key]


def _multiple_choice(record: dict, origin: str) -> bool:
    if "multiple_choice" in record and record["multiple_choice"] is not None:
        value = record["multiple_choice"]
        if not isinstance(value, bool):
            raise GenerateError(f"{origin}: 'multiple_choice' must be true or false, got {value!r}")
        return value
    template_type = record.get("template_type", record.get("_template_type"))
    if isinstance(template_type, str):
        return "_opt" in template_type and "noopt" not in template_type
    return False


def read_queries(source: str, split: str) -> list[dict]:
    queries = []
    for origin, record in read_records(source, what="query file", split=split):
        question = text_field(record, origin, ("question", "inputs", "query", "instruction"), required=True,
                              what="query")
        if "sub_collection" in record:
            sub = _sub_collection(record["sub_collection"], origin)
        elif "task_source" in record or "_task_source" in record:
            sub = _sub_collection(record.get("task_source", record.get("_task_source")), origin)
        else:
            raise GenerateError(f"{origin}: query has no 'sub_collection' (or 'task_source') field; "
                                f"use one of {', '.join(SUB_COLLECTIONS)}")
        task = text_field(record, origin, ("task", "task_name", "_task_name"), required=False, what="query")
        queries.append({"question": question.strip(), "source": sub, "task": task.strip() if task else sub,
                        "multiple_choice": _multiple_choice(record, origin), "origin": origin})
    return queries


def parse_caps(items: list[str] | None) -> dict[str, int]:
    caps = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise GenerateError(f"--cap {item!r}: expected SUB=N, e.g. niv2=300")
        sub = _sub_collection(name, f"--cap {item!r}")
        try:
            caps[sub] = int(value)
        except ValueError:
            raise GenerateError(f"--cap {item!r}: {value!r} is not a whole number") from None
        if caps[sub] < 1:
            raise GenerateError(f"--cap {item!r}: the cap must be at least 1")
    return caps


def drop_repeats(queries: list[dict]) -> tuple[list[int], list[dict]]:
    """Indices of the queries asked (input order: the first occurrence of each text) and a dropped entry
    for each repeat."""
    seen: dict[str, int] = {}
    unique, dropped = [], []
    for i, q in enumerate(queries):
        # Word for word means the exact text (only runs of whitespace folded): the word tokens of the
        # de-duplication rules drop symbols, and "5 + 3" and "5 - 3" are different questions.
        key = " ".join(q["question"].split())
        if key in seen:
            dropped.append({"reason": "repeated query", "question": q["question"], "origin": q["origin"],
                            "same_as": queries[seen[key]]["origin"]})
            continue
        seen[key] = i
        unique.append(i)
    return unique, dropped


def apply_caps(queries: list[dict], indices: list[int], cap_per_task: int | None, caps: dict[str, int],
               seed: int) -> tuple[list[int], int]:
    """The ones of ``indices`` (into ``queries``, repeats already dropped) kept under the caps, in input
    order, and how many were capped away."""
    by_task: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i in indices:
        by_task[(queries[i]["source"], queries[i]["task"])].append(i)
    keep = set()
    for (sub, task), members in by_task.items():
        cap = caps.get(sub, cap_per_task)
        if cap is None or len(members) <= cap:
            keep.update(members)
        else:
            keep.update(rng_for(seed, "orca-cap", sub, task).sample(members, cap))
    return sorted(keep), len(indices) - len(keep)


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "orca", help="Orca: explanation-style answers to FLAN queries under sampled system messages",
        description="Answer FLAN-v2 queries (cot, niv2, t0, flan2021) with a system message drawn per "
                    "sub-collection from Orca's 16. Writes OUT/raw.jsonl (fields system, question, instruction, "
                    "response, source, task, multiple_choice, system_message_id, teacher). "
                    "Rerun the same command to resume.")
    p.add_argument("queries", help="queries: JSONL (or any format bezoar.data reads, or a datasets name) with "
                                   "question, sub_collection, task, multiple_choice")
    p.add_argument("--split", default="train", help="split, when QUERIES is a datasets name (default train)")
    g = p.add_argument_group("orca")
    g.add_argument("--cap-per-task", type=int, metavar="N", help="at most N queries per task (default: no cap)")
    g.add_argument("--cap", action="append", metavar="SUB=N",
                   help="per sub-collection cap per task, e.g. niv2=300 (overrides --cap-per-task); repeatable")
    g.add_argument("--system-messages", metavar="FILE",
                   help="your own 16 system messages as a JSON list of strings (default: the shipped ones)")
    add_scheme_arguments(p, (), temperature=0.7, max_tokens=1024)
    p.set_defaults(func=run_orca)


def run_orca(args) -> int:
    check_sampling(args)
    if args.cap_per_task is not None and args.cap_per_task < 1:
        raise GenerateError(f"--cap-per-task must be at least 1, got {args.cap_per_task}")
    caps = parse_caps(args.cap)
    messages = read_system_messages(args.system_messages)
    queries = read_queries(args.queries, args.split)
    out = check_out_dir(args.out, [args.queries, args.system_messages], OUTPUTS)
    counts: Counter = Counter(queries=len(queries))

    # Repeats go before the caps: a cap counts different queries, so a repeat never takes a place that
    # another query of its task could have had.
    unique, dropped = drop_repeats(queries)
    if dropped:
        counts["repeated queries"] = len(dropped)
    kept, counts["capped"] = apply_caps(queries, unique, args.cap_per_task, caps, args.seed)
    chosen = []  # (query, system id)
    for i in kept:
        q = queries[i]
        ids = system_ids(q["source"], q["multiple_choice"])
        chosen.append((q, rng_for(args.seed, "orca-system", i).choice(ids)))

    requests = [chat(q["question"], system=messages[sid - 1], temperature=args.temperature,
                     max_tokens=args.max_tokens, id="orca", step="responses") for q, sid in chosen]
    results = run_step(args, out, "responses", requests)
    records = []
    for (q, sid), result in zip(chosen, results):
        response = (result.response or "").strip()
        reason = None
        if not result.ok:
            reason = "response request failed"
        elif not response:
            reason = "empty response"
        elif (short := cut_short(result)) is not None:
            reason = f"response {short}"
        if reason is not None:
            counts[f"dropped: {reason}"] += 1
            dropped.append({"reason": reason, "question": q["question"], "origin": q["origin"],
                            "system_message_id": sid, "error": result.error, "response": excerpt(result.response)})
            continue
        counts[f"records {q['source']}"] += 1
        records.append({"system": messages[sid - 1], "question": q["question"], "instruction": q["question"],
                        "response": response, "source": q["source"], "task": q["task"],
                        "multiple_choice": q["multiple_choice"], "system_message_id": sid,
                        "teacher": result.model or args.model})
    counts["records"] = len(records)
    write_jsonl(out / "raw.jsonl", records)
    write_jsonl(out / "dropped.jsonl", dropped)
    write_json(out / "orca-summary.json", {"command": "orca", "teacher": args.model, "caps": caps,
                                           "cap_per_task": args.cap_per_task, "counts": dict(sorted(counts.items()))})
    say(f"orca: {len(records)} records in {out / 'raw.jsonl'} from {len(queries)} queries ({counts['capped']} over "
        f"the caps, {len(dropped)} dropped; details in dropped.jsonl)")
    return exit_status(out, len(failed_keys(results)))
