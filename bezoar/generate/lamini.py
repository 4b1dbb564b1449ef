"""``python -m bezoar.generate lamini``: LaMini-style instruction generation (Wu et al., 2023).

Two steps, each with its own resumable store under ``OUT/work``:

1. ``instructions``: list requests to the teacher. An example-guided request shows ``--examples``
   seed instructions drawn at random and asks for ``--per-request`` new ones; a topic-guided
   request also names ``--topics-per-prompt`` topics drawn from the user's topic list and asks
   for instructions about them. Request i's draws come from ``(seed, kind, i)`` only.
   Each reply is parsed as a list (:func:`bezoar.generate.schemes.parse_list`); then, in request
   order, empty items, exact duplicates and near-duplicates (ROUGE-L F1 >= ``--similarity`` with a
   seed instruction or an earlier kept one) are dropped. An instruction whose response is already
   stored is never dropped for one whose response is not: such instructions are compared first,
   among themselves in request order, and a new item is dropped when it duplicates one of them,
   wherever it stands. On a first run, or a rerun with the same lists, that changes nothing (the
   stored ones are those kept before); it matters when a list request that failed is sent again
   (``--retry-failed``, which the pipeline passes on every resume) and its items come ahead of
   instructions already answered: without it, a paid record would leave ``raw.jsonl`` and its new
   near-duplicate would be paid for.
2. ``responses``: the teacher answers each kept instruction (the instruction is the whole user
   message). Failed, empty and cut-off (max_tokens) answers are dropped.

Output (``OUT``): ``raw.jsonl`` with one record per kept pair::

    {"instruction", "response", "source": "self_instruct_with_topic" | "self_instruct_without_topic",
     "topics": [...], "teacher": MODEL}

(``data.format = "lamini"`` reads it as is), ``dropped.jsonl`` with every dropped item and why,
and ``lamini-summary.json`` with the counts. Both are written at the end, atomically, from the
stores; rerunning the same command reuses every stored answer and rewrites the same files. The exit
status is 1 when requests ended as recorded failures (``--retry-failed`` sends them again), else 0.
"""

from __future__ import annotations

from collections import Counter
from bezoar.generate.request import GenerateError, Request
from bezoar.generate.schemes import (NearDuplicates, add_scheme_arguments, chat, check_out_dir, check_sampling,
                                     cut_short, excerpt, exit_status, failed_keys, load_templates, parse_list,
                                     read_records, read_topics, rng_for, run_step, say, stored_keys, text_field,
                                     truncated, write_json, write_jsonl)

TEMPLATES = ("lamini_examples", "lamini_topics")
SOURCE_WITH_TOPIC = "self_instruct_with_topic"
SOURCE_WITHOUT_TOPIC = "self_instruct_without_topic"
OUTPUTS = ("raw.jsonl", "dropped.jsonl", "lamini-summary.json")


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "lamini", help="LaMini: new instructions from seed examples (and topics), then responses",
        description="Example-guided and topic-guided instruction generation, de-duplication, then one response "
                    "per instruction. Writes OUT/raw.jsonl (fields instruction, response, source, topics, teacher). "
                    "Rerun the same command to resume.")
    p.add_argument("seeds", help="seed examples: JSONL (or any format bezoar.data reads, or a datasets name) "
                                 "with an 'instruction' field")
    p.add_argument("--topics", metavar="FILE", help="topic list: one topic per line (or records with 'topic')")
    p.add_argument("--split", default="train", help="split, when SEEDS is a datasets name (default train)")
    g = p.add_argument_group("lamini")
    g.add_argument("--example-guided", type=int, default=10, metavar="N",
                   help="example-guided list requests (default 10)")
    g.add_argument("--topic-guided", type=int, default=None, metavar="N",
                   help="topic-guided list requests (default 10 with --topics, else 0)")
    g.add_argument("--examples", type=int, default=3, metavar="K", help="seed examples shown per request (default 3)")
    g.add_argument("--topics-per-prompt", type=int, default=3, metavar="K",
                   help="topics named per topic-guided request (default 3)")
    g.add_argument("--per-request", type=int, default=20, metavar="N",
                   help="instructions asked for per request (default 20)")
    g.add_argument("--similarity", type=float, default=0.7,
                   help="ROUGE-L F1 at or above which an instruction is a near-duplicate (default 0.7)")
    add_scheme_arguments(p, TEMPLATES, temperature=1.0, max_tokens=1024)
    p.set_defaults(func=run_lamini)


def _numbered(items) -> str:
    return "\n".join(f"{i}. {text}" for i, text in enumerate(items, start=1))


def _response_request(args, instruction: str) -> Request:
    """Step 2's request for one instruction (the whole user message)."""
    return chat(instruction, temperature=args.temperature, max_tokens=args.max_tokens, id="lamini:response",
                step="responses")


def run_lamini(args) -> int:
    check_sampling(args)
    topic_guided = args.topic_guided if args.topic_guided is not None else (10 if args.topics else 0)
    for name, value, low in (("--example-guided", args.example_guided, 0), ("--topic-guided", topic_guided, 0),
                             ("--examples", args.examples, 1), ("--topics-per-prompt", args.topics_per_prompt, 1),
                             ("--per-request", args.per_request, 1)):
        if value < low:
            raise GenerateError(f"{name} must be at least {low}, got {value}")
    if topic_guided and not args.topics:
        raise GenerateError("--topic-guided needs --topics FILE")
    if args.example_guided + topic_guided == 0:
        raise GenerateError("nothing to do: --example-guided and --topic-guided are both 0")
    templates = load_templates(TEMPLATES, args.template)
    seeds = [text_field(record, origin, ("instruction",), required=True, what="seed").strip()
             for origin, record in read_records(args.seeds, what="seed file", split=args.split)]
    topics = read_topics(args.topics) if args.topics else []
    if not 0.0 < args.similarity <= 1.0:  # before anything is sent
        raise GenerateError(f"--similarity must be in (0, 1], got {args.similarity:g}")
    dedupe = NearDuplicates(args.similarity)
    out = check_out_dir(args.out, [args.seeds, args.topics], OUTPUTS)

    # ---- step 1: instruction lists
    plans = []  # (source, topics) per request
    requests = []
    for kind, count in (("example", args.example_guided), ("topic", topic_guided)):
        for i in range(count):
            rng = rng_for(args.seed, "lamini", kind, i)
            examples = rng.sample(seeds, min(args.examples, len(seeds)))
            if kind == "topic":
                chosen = rng.sample(topics, min(args.topics_per_prompt, len(topics)))
                text = templates["lamini_topics"].render(count=args.per_request, examples=_numbered(examples),
                                                         topics=_numbered(chosen))
                plans.append((SOURCE_WITH_TOPIC, chosen))
            else:
                text = templates["lamini_examples"].render(count=args.per_request, examples=_numbered(examples))
                plans.append((SOURCE_WITHOUT_TOPIC, []))
            requests.append(chat(text, temperature=args.temperature, max_tokens=args.max_tokens,
                                 id=f"lamini:{kind}:{i}", step="instructions"))
    results = run_step(args, out, "instructions", requests)
    failed = failed_keys(results)

    counts: Counter = Counter(list_requests=len(requests))
    dropped: list[dict] = []
    candidates = []  # (instruction, source, topics)
    for (source, chosen), result in zip(plans, results):
        if not result.ok:
            counts["list_requests_failed"] += 1
            dropped.append({"step": "instructions", "reason": "request failed", "error": result.error,
                            "request_id": result.id})
            continue
        parsed = parse_list(result.response or "", truncated=truncated(result))
        if parsed.malformed:
            counts["malformed_lists"] += 1
            dropped.append({"step": "instructions", "reason": "reply is not a list", "reply": excerpt(result.response),
                            "request_id": result.id})
        counts["items_empty"] += parsed.empty
        counts["items_cut_off"] += int(parsed.cut)
        for item in parsed.items:
            candidates.append((item, source, chosen))
    counts["items_parsed"] = len(candidates)
    answered = stored_keys(args, out, "responses", answered=True)
    paid = [k for k, (instruction, _, _) in enumerate(candidates)
            if answered and _response_request(args, instruction).key(args.model) in answered]
    verdicts = dedupe.check([c[0] for c in candidates], references=seeds, protected=paid)
    kept = []
    for (instruction, source, chosen), verdict in zip(candidates, verdicts):
        if verdict.status == "kept":
            kept.append((instruction, source, chosen))
            continue
        counts[f"instructions_{verdict.status.replace('-', '_')}"] += 1
        dropped.append({"step": "instructions", "reason": verdict.status, "instruction": instruction,
                        "similar_to": verdict.similar_to, "similarity": verdict.similarity})
    counts["instructions_kept"] = len(kept)

    # ---- step 2: responses
    requests = [_response_request(args, instruction) for instruction, _, _ in kept]
    results = run_step(args, out, "responses", requests)
    failed |= failed_keys(results)
    records = []
    for (instruction, source, chosen), result in zip(kept, results):
        reason = None
        if not result.ok:
            reason = "response request failed"
        elif not (result.response or "").strip():
            reason = "empty response"
        elif (short := cut_short(result)) is not None:
            reason = f"response {short}"
        if reason is not None:
            counts["responses_dropped"] += 1
            dropped.append({"step": "responses", "reason": reason, "instruction": instruction,
                            "error": result.error, "response": excerpt(result.response)})
            continue
        records.append({"instruction": instruction, "response": result.response.strip(), "source": source,
                        "topics": chosen, "teacher": result.model or args.model})
    counts["records"] = len(records)

    write_jsonl(out / "raw.jsonl", records)
    write_jsonl(out / "dropped.jsonl", dropped)
    summary = {"command": "lamini", "seeds": len(seeds), "topics": len(topics), "teacher": args.model,
               "counts": dict(sorted(counts.items()))}
    write_json(out / "lamini-summary.json", summary)
    say(f"lamini: {len(records)} records in {out / 'raw.jsonl'} from {len(candidates)} parsed instructions "
        f"({len(candidates) - len(kept)} duplicates or near-duplicates, {counts['responses_dropped']} responses "
        f"dropped; details in dropped.jsonl)")
    return exit_status(out, len(failed))
