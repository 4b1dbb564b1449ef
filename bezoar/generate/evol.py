"""``python -m bezoar.generate evol``: Evol-Instruct (Xu et al., 2023, "WizardLM") from seed instructions.

Seeds are databricks-dolly-15k records (``instruction``, ``context``, ``response``, ``category``);
a seed's context, when present, is part of the text that evolves (instruction, blank line,
context). Each seed starts a lineage. Every epoch, for each lineage's current instruction:

1. ``epoch-E-evolve``: one evolution, drawn from ``(seed, epoch, lineage)``, uniformly among six:
   the five in-depth operations (add constraints, deepen, concretize, increase reasoning steps,
   complicate the input; ``evol_depth`` template) and in-breadth (a new, rarer instruction in the
   same domain; ``evol_breadth`` template).
2. Elimination, as WizardLM states it; an evolution fails when
   - the evolved instruction is empty, or leaks the rewriting prompt's words (the templates'
     ``#...#`` markers, and phrases such as "rewritten instruction" or "given prompt", as whole
     words; a phrase the previous instruction or its context already holds is the task's own);
   - it adds no information: the same words as before, or the teacher judges the two
     instructions the SAME (``epoch-E-equal`` step, ``evol_equal`` template; an unclear verdict
     counts as failure);
   - its response (``epoch-E-respond`` step) is a short refusal (an apology or "I cannot" in
     fewer than 80 words), has only punctuation and stop words, failed, or was cut off at
     max_tokens.
3. A surviving evolution becomes a record and the lineage's current instruction; after a
   failure the lineage keeps its previous instruction for the next epoch.

Output (``OUT``): ``raw.jsonl``, one record per surviving evolution, in (epoch, lineage) order::

    {"instruction", "output", "evolution_strategy": "in-depth" | "in-breadth",
     "in-depth-evolving_operation": "add_constraints" | ... | null, "epoch": E, "category", "teacher"}

(``data.format = "evol"`` reads it as is), ``dropped.jsonl`` with every failed evolution and its
reason, and ``evol-summary.json``. Rerunning the same command reuses every stored answer.

``--retry-failed`` sends a recorded failure again only where that cannot undo stored work. A lineage
whose epoch E failed went into epoch E+1 with its previous instruction; if that epoch's evolve
request is already stored, retrying epoch E could change the instruction, so every stored request
of E+1 and later (paid answers, records in ``raw.jsonl``) would stop being asked for and the later
epochs would be paid again. Such a failure stays recorded (the step says how many were kept); the
failures of a lineage's last stored epoch are retried. The exit status is 1 when failures that
``--retry-failed`` would send again are recorded, else 0 (the failures it leaves alone stay
eliminated evolutions, counted in ``dropped.jsonl``).
"""

from __future__ import annotations

import re
from collections import Counter

from bezoar.generate.request import GenerateError, Request, Result
from bezoar.generate.schemes import (add_scheme_arguments, chat, check_out_dir, check_sampling, cut_short, excerpt,
                                     exit_status, load_templates, normalized, only_stop_words, read_records, rng_for,
                                     run_step, say, short_refusal, stored_keys, text_field, write_json, write_jsonl)

TEMPLATES = ("evol_depth", "evol_breadth", "evol_equal")
OUTPUTS = ("raw.jsonl", "dropped.jsonl", "evol-summary.json")

#: In-depth operations: the one sentence that fills ``{operation}`` in the evol_depth template.
DEPTH_OPERATIONS = {
    "add_constraints": "Add one more constraint or requirement that the answer must satisfy.",
    "deepen": "If the instruction touches on a subject, ask for a deeper and broader treatment of it.",
    "concretize": "Replace a general idea in the instruction with a more specific, concrete one.",
    "increase_reasoning_steps": "If the instruction can be solved with a few simple steps, rewrite it so that "
                                "it explicitly calls for reasoning over several steps.",
    "complicate_input": "Give the instruction a richer input to work on: add data in a structured form such as a "
                        "table, a list of records, a snippet of code or a formula, and make the task depend on it.",
}
STRATEGIES = [("in-depth", op) for op in DEPTH_OPERATIONS] + [("in-breadth", None)]

#: Phrases that only a confused rewrite would contain: WizardLM's own markers and their variants. The ones
#: starting with "#" count only as a whole word ("#New Prompt#", not the hashtag "#NewYear").
LEAK_PHRASES = ("given prompt", "rewritten prompt", "created prompt", "given instruction", "rewritten instruction",
                "original instruction", "new instruction", "#rewritten", "#created", "#given", "#new", "#original")

_SAME_WORDS = r"(?:same|equal|identical|equivalent)"
_DIFFERENT_WORDS = r"(?:different|distinct|unequal|differ|differs)"
# "not", "cannot" or a contraction ("aren't", "isn’t": the "n't" sits inside a word, so no \b before it).
_NOT = r"(?:\bnot|\bcannot|n['\u2019]t)\s+(?:(?:the|quite|exactly|really|entirely|be)\s+){0,2}"
_VERDICT = re.compile(rf"(?P<not_same>{_NOT}{_SAME_WORDS}\b)|(?P<not_different>{_NOT}{_DIFFERENT_WORDS}\b)"
                      rf"|\b(?P<same>{_SAME_WORDS})\b|\b(?P<different>{_DIFFERENT_WORDS})\b")
# The template's two answers as it spells them, in capitals: "In the same domain, but DIFFERENT" answers DIFFERENT.
_ANSWER_WORD = re.compile(r"(?<![\w'\u2019])(SAME|DIFFERENT)(?![\w'\u2019])")


def equality_verdict(reply: str) -> str | None:
    """"different", "same", or None when the reply says neither clearly.

    The template's answer words in capitals decide when the reply has one of them and not the other
    ("In the same domain, but DIFFERENT"), unless negated ("NOT SAME"). Otherwise the first verdict word
    decides, negation included: "SAME. Nothing different is asked" is the same, "NOT SAME", "not the same",
    "aren't equal", "they differ" and "cannot be the same" are different, "not different" is the same."""
    spaced = " ".join(reply.split())
    answers = {m.group(1) for m in _ANSWER_WORD.finditer(spaced)}
    if len(answers) == 1:
        m = _ANSWER_WORD.search(spaced)
        if re.search(rf"{_NOT}$", spaced[:m.start()].lower()) is None:  # "NOT SAME": the rule below
            return "same" if answers == {"SAME"} else "different"
    m = _VERDICT.search(spaced.lower())
    if m is None:
        return None
    return "same" if m.lastgroup in ("same", "not_different") else "different"


def _has_phrase(text: str, phrase: str) -> bool:
    """Whether ``phrase`` (lowercase) is in ``text`` (lowercase, single-spaced) as whole words: "new
    instruction" is not in "renew instructions", "#new" not in "#NewYear"."""
    start = "" if phrase.startswith("#") else r"(?<!\w)"
    return re.search(start + re.escape(phrase) + r"(?!\w)", text) is not None


def leaked_phrase(instruction: str, markers: list[str], previous: str = "") -> str | None:
    """The first rewriting-prompt phrase found in ``instruction`` (case-insensitive, as whole words) and
    not already in ``previous``, the instruction it was evolved from (with its context): a seed about
    "the given prompt" of a language model may keep the phrase. None when there is none."""
    text = " ".join(instruction.lower().split())
    before = " ".join(previous.lower().split())
    # A marker's "#Words#" form counts even where the previous instruction has its words without the #s.
    candidates = [(m, form) for m in markers for form in (f"#{m.lower()}#", m.lower())]
    for name, phrase in candidates + [(phrase, phrase) for phrase in LEAK_PHRASES]:
        if _has_phrase(text, phrase) and not _has_phrase(before, phrase):
            return name
    return None


# A rewrite that opens as a refusal ("I'm sorry, but I can't rewrite that", "As an AI, I cannot"): the teacher
# declined to evolve the instruction. WizardLM's rule on "sorry" is for responses; an instruction may well ask for
# an apology, take a persona ("As an AI researcher, design ..."), or speak as a user in the first person ("I can't
# decide between two jobs", "I'm sorry to bother you, but ...", "Unfortunately, I can't attend ..."). So it takes,
# at the opening: an inability to do the task itself (to assist with, comply, provide that ...), or an apology
# or "As an AI" followed by an inability to assist, help, provide, create, rewrite ... And not where the
# instruction it was evolved from opens the same way.
_UNABLE = (r"i\s+(?:cannot|can't|can\s+not|won't|will\s+not|am\s+unable\s+to|'m\s+unable\s+to|am\s+not\s+able\s+to"
           r"|'m\s+not\s+able\s+to)")
_REFUSED_TASK = (r"(?:(?:assist|help)(?:\s+you)?\s+with\s+(?:that|this|your|the|such|rewriting)|comply|fulfil+|proceed"
                 r"|(?:provide|create|generate|complete|rewrite|evolve|do|perform|write)\s+(?:that|this|it|such|so"
                 r"|(?:a|an|the)\s+(?:rewritten|evolved|new\s+(?:prompt|instruction)|more\s+complex|version)))\b")
_REFUSAL_VERB = (r"(?:assist|help|comply|fulfil+|provide|create|generate|complete|rewrite|evolve|do|perform|proceed"
                 r"|engage|support|write|answer)\b")
_APOLOGY = (r"(?:(?:i'm|i\s+am)\s+(?:(?:so|very|really|truly)\s+)?sorry|sorry\b|my\s+apologies|i\s+apologi[sz]e"
            r"|unfortunately\b|as\s+an\s+ai(?:\s+(?:language\s+model|assistant|model))?\s*,)")
_REFUSAL_OPENING = re.compile(rf"{_UNABLE}\s+{_REFUSED_TASK}|{_APOLOGY}[^.!?\n]{{0,80}}?\b{_UNABLE}\s+{_REFUSAL_VERB}")


def refused_rewrite(instruction: str, previous: str = "") -> bool:
    """Whether an evolved instruction is the teacher's refusal to rewrite ``previous``: it opens with a first-person
    apology or inability ("I'm sorry, but...", "I cannot...", "As an AI..."), past any quotes or markdown, and
    ``previous`` does not."""
    def opening(text: str) -> str:
        return " ".join(text.lower().replace("\u2019", "'").split()).lstrip(" \"'`*#>-:")
    return _REFUSAL_OPENING.match(opening(instruction)) is not None and \
        _REFUSAL_OPENING.match(opening(previous)) is None


def add_command(subparsers) -> None:
    p = subparsers.add_parser(
        "evol", help="Evol-Instruct: evolve seed instructions over epochs, eliminate failures, answer them",
        description="In-depth and in-breadth evolution of seed instructions (dolly-15k format) over N epochs, "
                    "with WizardLM's elimination rules. Writes OUT/raw.jsonl (fields instruction, output, "
                    "evolution_strategy, in-depth-evolving_operation, epoch, category, teacher). "
                    "Rerun the same command to resume.")
    p.add_argument("seeds", help="seed instructions: JSONL (or any format bezoar.data reads, or a datasets name) "
                                 "with instruction, and optionally context, response, category")
    p.add_argument("--split", default="train", help="split, when SEEDS is a datasets name (default train)")
    g = p.add_argument_group("evol")
    g.add_argument("--epochs", type=int, default=4, help="rounds of evolution (default 4, as in WizardLM)")
    g.add_argument("--limit", type=int, metavar="N", help="use the first N seeds only")
    add_scheme_arguments(p, TEMPLATES, temperature=0.7, max_tokens=1024)
    p.set_defaults(func=run_evol)


def _seed_text(instruction: str, context: str | None) -> str:
    instruction = instruction.strip()
    if context and context.strip():
        return f"{instruction}\n\n{context.strip()}"
    return instruction


def _evolve_request(args, templates, epoch: int, lineage: int, text: str) -> tuple[str, str | None, Request]:
    """(strategy, operation, request) of a lineage's evolution in ``epoch`` from its instruction ``text``."""
    strategy, operation = rng_for(args.seed, "evol", epoch, lineage).choice(STRATEGIES)
    if strategy == "in-depth":
        prompt = templates["evol_depth"].render(operation=DEPTH_OPERATIONS[operation], instruction=text)
    else:
        prompt = templates["evol_breadth"].render(instruction=text)
    request = chat(prompt, temperature=args.temperature, max_tokens=args.max_tokens, id=f"evol:{epoch}:{lineage}",
                   step=f"epoch-{epoch}-evolve")
    return strategy, operation, request


def _settled_lineages(args, out, templates, epoch: int, current: list[str]) -> set[int]:
    """The lineages whose failures in ``epoch`` ``--retry-failed`` leaves alone: those whose next epoch, as
    a failure now leaves it (the same instruction), is already stored (by this run's epochs or an earlier
    run with more of them)."""
    built_on = stored_keys(args, out, f"epoch-{epoch + 1}-evolve")
    if not built_on:
        return set()
    return {lineage for lineage, text in enumerate(current)
            if _evolve_request(args, templates, epoch + 1, lineage, text)[2].key(args.model) in built_on}


def _retry_keys(args, settled: set[int] | None, lineages: list[int], requests: list[Request]) -> set[str] | None:
    """The keys of a step whose recorded failures are sent again: those of unsettled lineages only (a
    request two lineages share is one key), None without --retry-failed (no failure is sent again)."""
    if settled is None:
        return None
    keys = [(lineage, request.key(args.model)) for lineage, request in zip(lineages, requests)]
    return {key for _, key in keys} - {key for lineage, key in keys if lineage in settled}


def _retriable_failures(args, out, templates, failed: list[tuple[int, int, str]],
                        after: dict[int, list[str]]) -> set[str]:
    """The keys among ``failed`` ((epoch, lineage, key) of each failed result) that ``--retry-failed`` would send
    again now: those of lineages whose next epoch is not stored (``after[epoch]``: the instructions the lineages
    left the epoch with), less any a settled lineage shares, as :func:`_retry_keys` chooses them."""
    retry: set[str] = set()
    for epoch in sorted({e for e, _, _ in failed}):
        settled = _settled_lineages(args, out, templates, epoch, after[epoch])
        mine = [(lineage, key) for e, lineage, key in failed if e == epoch]
        retry |= {key for lineage, key in mine if lineage not in settled} - {
            key for lineage, key in mine if lineage in settled}
    return retry


def _kept_failures(step: str, results: list[Result], retry: set[str] | None) -> None:
    """Say how many recorded failures ``--retry-failed`` left alone (later epochs were built on them)."""
    if retry is None:
        return
    kept = sum(1 for r in results if r.cached and not r.ok and r.key not in retry)
    if kept:
        say(f"step {step}: {kept} recorded failures not retried: the next epoch's stored requests were built on them")


def run_evol(args) -> int:
    check_sampling(args)
    if args.epochs < 1:
        raise GenerateError(f"--epochs must be at least 1, got {args.epochs}")
    if args.limit is not None and args.limit < 1:
        raise GenerateError(f"--limit must be at least 1, got {args.limit}")
    templates = load_templates(TEMPLATES, args.template)
    markers = sorted({m for name in ("evol_depth", "evol_breadth") for m in templates[name].markers()})
    seeds = []
    for origin, record in read_records(args.seeds, what="seed file", split=args.split, limit=args.limit):
        instruction = text_field(record, origin, ("instruction",), required=True, what="seed")
        context = text_field(record, origin, ("context", "input"), required=False, what="seed")
        text_field(record, origin, ("response", "output"), required=False, what="seed")  # type check only
        category = text_field(record, origin, ("category",), required=False, what="seed")
        seeds.append((_seed_text(instruction, context), category))
    out = check_out_dir(args.out, [args.seeds], OUTPUTS)

    current = [text for text, _ in seeds]
    records: list[dict] = []
    dropped: list[dict] = []
    failed: list[tuple[int, int, str]] = []  # (epoch, lineage, key) of each failed request
    after: dict[int, list[str]] = {}  # epoch -> the lineages' instructions at its end
    counts: Counter = Counter(seeds=len(seeds))

    def drop(epoch, lineage, strategy, operation, reason, instruction=None, **extra):
        counts[f"dropped: {reason}"] += 1
        entry = {"epoch": epoch, "lineage": lineage, "evolution_strategy": strategy,
                 "in-depth-evolving_operation": operation, "reason": reason, "instruction": instruction,
                 "previous": current[lineage]}
        entry.update({k: v for k, v in extra.items() if v is not None})
        dropped.append(entry)

    for epoch in range(1, args.epochs + 1):
        settled = _settled_lineages(args, out, templates, epoch, current) if args.retry_failed else None

        # ---- evolve
        plans, requests = [], []
        for lineage, text in enumerate(current):
            strategy, operation, request = _evolve_request(args, templates, epoch, lineage, text)
            plans.append((lineage, strategy, operation))
            requests.append(request)
        keys = _retry_keys(args, settled, [lineage for lineage, _, _ in plans], requests)
        results = run_step(args, out, f"epoch-{epoch}-evolve", requests, retry_failed=keys)
        _kept_failures(f"epoch-{epoch}-evolve", results, keys)
        evolved = []  # (lineage, strategy, operation, instruction)
        for (lineage, strategy, operation), result in zip(plans, results):
            text = (result.response or "").strip()
            if not result.ok:
                failed.append((epoch, lineage, result.key))
                drop(epoch, lineage, strategy, operation, "evolution request failed", error=result.error)
            elif not text:
                drop(epoch, lineage, strategy, operation, "empty evolution")
            elif (short := cut_short(result)) is not None:
                drop(epoch, lineage, strategy, operation, f"evolution {short}", excerpt(text))
            elif (leak := leaked_phrase(text, markers, current[lineage])) is not None:
                drop(epoch, lineage, strategy, operation, "leaks the rewriting prompt", text, leaked=leak)
            elif refused_rewrite(text, current[lineage]):
                drop(epoch, lineage, strategy, operation, "evolution is a refusal", text)
            elif normalized(text) == normalized(current[lineage]):
                drop(epoch, lineage, strategy, operation, "no information gain", text, verdict="unchanged")
            else:
                evolved.append((lineage, strategy, operation, text))

        # ---- equality check (is anything new?)
        requests = [chat(templates["evol_equal"].render(first=current[lineage], second=text), temperature=0.0,
                         max_tokens=16, id="evol:equal", step=f"epoch-{epoch}-equal")
                    for lineage, _, _, text in evolved]
        keys = _retry_keys(args, settled, [lineage for lineage, _, _, _ in evolved], requests)
        results = run_step(args, out, f"epoch-{epoch}-equal", requests, retry_failed=keys)
        _kept_failures(f"epoch-{epoch}-equal", results, keys)
        informative = []
        for (lineage, strategy, operation, text), result in zip(evolved, results):
            verdict = equality_verdict(result.response or "") if result.ok else None
            if not result.ok:
                failed.append((epoch, lineage, result.key))
                drop(epoch, lineage, strategy, operation, "equality check failed", text, error=result.error)
            elif verdict == "same":
                drop(epoch, lineage, strategy, operation, "no information gain", text, verdict=excerpt(result.response))
            elif verdict is None:
                drop(epoch, lineage, strategy, operation, "equality check unclear", text,
                     verdict=excerpt(result.response))
            else:
                informative.append((lineage, strategy, operation, text))

        # ---- respond
        requests = [chat(text, temperature=args.temperature, max_tokens=args.max_tokens, id="evol:respond",
                         step=f"epoch-{epoch}-respond") for _, _, _, text in informative]
        keys = _retry_keys(args, settled, [lineage for lineage, _, _, _ in informative], requests)
        results = run_step(args, out, f"epoch-{epoch}-respond", requests, retry_failed=keys)
        _kept_failures(f"epoch-{epoch}-respond", results, keys)
        for (lineage, strategy, operation, text), result in zip(informative, results):
            response = (result.response or "").strip()
            reason = None
            if not result.ok:
                failed.append((epoch, lineage, result.key))
                reason = "response request failed"
            elif (short := cut_short(result)) is not None:
                reason = f"response {short}"
            elif short_refusal(response):
                reason = "response is a short refusal"
            elif only_stop_words(response):
                reason = "response has only punctuation and stop words"
            if reason is not None:
                drop(epoch, lineage, strategy, operation, reason, text, response=excerpt(result.response),
                     error=result.error)
                continue
            records.append({"instruction": text, "output": response, "evolution_strategy": strategy,
                            "in-depth-evolving_operation": operation, "epoch": epoch,
                            "category": seeds[lineage][1], "teacher": result.model or args.model})
            current[lineage] = text
        counts[f"epoch {epoch} records"] = sum(1 for r in records if r["epoch"] == epoch)
        after[epoch] = list(current)

    counts["records"] = len(records)
    write_jsonl(out / "raw.jsonl", records)
    write_jsonl(out / "dropped.jsonl", dropped)
    write_json(out / "evol-summary.json", {"command": "evol", "epochs": args.epochs, "teacher": args.model,
                                           "counts": dict(sorted(counts.items()))})
    say(f"evol: {len(records)} records in {out / 'raw.jsonl'} from {len(seeds)} seeds over {args.epochs} epochs "
        f"({len(dropped)} evolutions eliminated; reasons in dropped.jsonl)")
    return exit_status(out, len(_retriable_failures(args, out, templates, failed, after)))
