"""What the data-generation schemes (lamini, evol, orca, filter) share.

- Prompt templates: text files with ``{name}`` placeholders, shipped under ``bezoar/assets/prompts``
  and replaceable with ``--template NAME=FILE``. Only the placeholders a template declares are
  filled in, so any other braces in a template (JSON examples, code) stay as written.
- Reading seeds: JSONL files are read here (errors name the file and line); other sources
  (.json, .parquet, ``datasets`` folders, hub names) go through ``bezoar.data.load``.
- Parsing the numbered or bulleted list a teacher returns (:func:`parse_list`).
- Near-duplicates (:class:`NearDuplicates`): the self-instruct rule. Two texts are near-duplicates
  when the ROUGE-L F1 of their word sequences is at least a threshold (0.7):

      tokens = lowercase runs of letters/digits (NFKC-normalized text)
      F1 = 2 * LCS(a, b) / (len(a) + len(b))

  Texts with the same token sequence are exact duplicates. Candidates are found without
  comparing every pair: F1 >= t needs a shared multiset of at least t * len / (2 - t) tokens
  with any partner, so each text is indexed by the rarest ``len - ceil(t * len / (2 - t)) + 1``
  of its tokens (prefix filtering) and only texts sharing one of those are compared exactly.
- Running one step of a scheme through the client pool with its own store (:func:`run_step`):
  every step's requests are derived deterministically from the seed, the inputs and the results
  of earlier steps, so a rerun finds every finished request in the step's store and continues.
- Writing outputs atomically (:func:`write_jsonl`, :func:`write_json`): final files appear
  whole at the end of a run or not at all.
- The exit status (:func:`exit_status`), as ``requests`` gives it: 0 when every request was answered,
  1 when some ended as recorded failures (the outputs are written without them; ``--retry-failed``
  sends them again), 2 when the command stopped on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import sys
import textwrap
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from bezoar.generate.cli import add_pool_arguments, jsonl_objects, pool_from_args
from bezoar.generate.progress import run_summary
from bezoar.generate.request import GenerateError, Request, Result
from bezoar.generate.store import JSONLStore, fsync_dir, json_utf8

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PROMPTS = ASSETS / "prompts"
SAMPLES = ASSETS / "samples"

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
# finish reasons that mean the reply was cut off (Anthropic's model_context_window_exceeded: by the context window)
TRUNCATED = ("length", "max_tokens", "model_context_window_exceeded")
# Finish reasons of a reply a provider's filter stopped: OpenAI's and Azure's "content_filter", Anthropic's
# "refusal". The text is partial or empty, so like a cut-off reply it is no record.
FILTERED = ("content_filter", "refusal")


# ---------------------------------------------------------------------- templates
#: Template name -> the placeholders it must contain. The shipped file is PROMPTS/<name>.txt.
TEMPLATE_FIELDS: dict[str, tuple[str, ...]] = {
    "lamini_examples": ("count", "examples"),
    "lamini_topics": ("count", "examples", "topics"),
    "evol_depth": ("operation", "instruction"),
    "evol_breadth": ("instruction",),
    "evol_equal": ("first", "second"),
    "judge": ("system", "instruction", "response"),
}
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
_MARKER_WORDS = re.compile(r"#([A-Za-z][A-Za-z ]{1,40}[A-Za-z])#")


@dataclass(frozen=True)
class Template:
    """A prompt template: ``text`` with ``{field}`` placeholders, read from ``source``."""

    name: str
    text: str
    source: str

    def render(self, **values: str) -> str:
        """The text with each declared placeholder replaced (other braces are left alone)."""
        fields = TEMPLATE_FIELDS[self.name]
        missing = [f for f in fields if f not in values]
        if missing:
            raise ValueError(f"template {self.name}: no value for {', '.join(missing)}")
        return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in fields else m.group(0), self.text)

    def markers(self) -> list[str]:
        """The ``#Some Words#`` markers the template uses to label its parts."""
        return sorted(set(_MARKER_WORDS.findall(self.text)))


def load_template(name: str, path: str | os.PathLike | None = None) -> Template:
    """The template ``name``: the shipped one, or the user's file at ``path`` (checked for its placeholders)."""
    if name not in TEMPLATE_FIELDS:
        raise GenerateError(f"unknown template {name!r}; known: {', '.join(TEMPLATE_FIELDS)}")
    file = Path(path).expanduser() if path is not None else PROMPTS / f"{name}.txt"
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise GenerateError(f"cannot read template {file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise GenerateError(f"template {file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    present = set(_PLACEHOLDER.findall(text))
    missing = [f for f in TEMPLATE_FIELDS[name] if f not in present]
    if missing:
        raise GenerateError(f"template {file} ({name}) lacks the placeholder(s) "
                            f"{', '.join('{' + f + '}' for f in missing)}; it needs "
                            f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS[name])}")
    return Template(name, text, str(file))


def load_templates(names: Sequence[str], overrides: Sequence[str] | None) -> dict[str, Template]:
    """The templates a command uses, with ``--template NAME=FILE`` overrides (a bare FILE when the
    command has one template)."""
    paths: dict[str, str] = {}
    for item in overrides or ():
        name, sep, path = item.partition("=")
        if not sep:
            if len(names) != 1:
                raise GenerateError(f"--template {item!r}: this command has several templates; give NAME=FILE "
                                    f"with NAME one of {', '.join(names)}")
            name, path = names[0], item
        if name not in names:
            raise GenerateError(f"--template {item!r}: unknown template {name!r} for this command; "
                                f"it uses {', '.join(names)}")
        paths[name] = path
    return {name: load_template(name, paths.get(name)) for name in names}


# ---------------------------------------------------------------------- reading seeds
def read_records(source: str | os.PathLike, *, what: str, split: str = "train",
                 limit: int | None = None) -> list[tuple[str, dict]]:
    """``(origin, record)`` pairs from a JSONL file (origin ``"FILE line N"``) or any source
    ``bezoar.data.load`` reads. ``what`` names the input in error messages ("seed file"). A path may
    start with ``~`` (the home folder), as ``bezoar.data.load`` reads it."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return _read_jsonl(path, what, limit)
    if not path.exists() and (str(source).startswith(("/", ".", "~")) or path.suffix.lower() in DATA_SUFFIXES):
        raise GenerateError(f"{what} {source}: file not found")
    from bezoar.data.load import DataError, load_records  # heavier: imports the data package

    try:
        records = load_records(source, split=split, limit=limit)
    except DataError as e:
        raise GenerateError(f"{what} {e}") from None
    return [(r.origin, r.data) for r in records]


def _read_jsonl(path: Path, what: str, limit: int | None) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    for _, origin, value in jsonl_objects(path, what):
        out.append((origin, value))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise GenerateError(f"{what} {path} holds no records")
    return out


def text_field(record: dict, origin: str, names: Sequence[str], *, required: bool, what: str,
               nonempty: bool = True) -> str | None:
    """The first of ``names`` present in ``record`` as a string (None if none and not required)."""
    for name in names:
        value = record.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise GenerateError(f"{origin}: field {name!r} must be a string, got {type(value).__name__}")
        if required and nonempty and not value.strip():
            raise GenerateError(f"{origin}: field {name!r} is empty")
        return value
    if required:
        keys = ", ".join(repr(k) for k in list(record)[:12]) or "(none)"
        raise GenerateError(f"{origin}: {what} has no {' / '.join(repr(n) for n in names)} field; its keys are {keys}")
    return None


def read_topics(source: str | os.PathLike) -> list[str]:
    """Topics, one per line of a text file (blank lines and ``#`` comments skipped), or the ``topic``
    field of records in any other format. Repeated topics are kept once, in first-seen order."""
    path = Path(source).expanduser()
    topics: list[str] = []
    if path.is_file() and path.suffix.lower() in (".txt", ".list", ""):
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except OSError as e:
            raise GenerateError(f"cannot read topic file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise GenerateError(f"topic file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for number, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if len(text) > 200:
                raise GenerateError(f"{path} line {number}: a topic is a short phrase; this line has {len(text)} "
                                    "characters (one topic per line)")
            topics.append(text)
    else:
        for origin, record in read_records(source, what="topic file"):
            topics.append(text_field(record, origin, ("topic",), required=True, what="topic record").strip())
    topics = list(dict.fromkeys(topics))
    if not topics:
        raise GenerateError(f"topic file {source} holds no topics")
    return topics


# ---------------------------------------------------------------------- parsing teacher lists
# A number's ".", ")" or ":" ends at a blank, the end of the line or bold ("1.**"): a line of an item that
# starts "10:30 pm", "1.5 litres" or "3:1" is not a marker.
_MARK_END = r"(?=\s|\*\*|$)"
_NUMBER_MARK = (rf"(?:\(\d{{1,3}}\)|<\d{{1,3}}>|\[\d{{1,3}}\]|\d{{1,3}}\s*[.):]{_MARK_END}"
                rf"|(?:instruction|task|question|prompt)\s*#?\s*\d{{1,3}}\s*[.):-]{_MARK_END})")
# A marker may be in bold ("**1.**", "**Task 1:**"); the ** after a plain "1." opens the item's own bold text.
# A marker may open a bold line ("**1. Write a poem.**": group "bold", the item keeps the ** to close it) or a
# heading ("### 1. Write a poem").
_NUMBERED = re.compile(rf"^\s*(?:#{{1,6}}[ \t]+)?(?:\*\*{_NUMBER_MARK}\*\*|(?P<bold>\*\*)?{_NUMBER_MARK})\s*", re.I)
_BULLET = re.compile(r"^\s*([-*\u2022+])\s+")
# "Task:", also in bold as markdown-minded teachers write it ("**Task:**", "**Task**:").
_LABEL = re.compile(r"^(?:\*\*)?(?:instruction|task|prompt|question)\s*(?:\*\*\s*:|:\s*\*\*|:)\s*", re.I)
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("`", "`"), ("**", "**"))


@dataclass
class ParsedList:
    """Items of a teacher's list reply. ``malformed``: the reply had no list markers at all;
    ``empty``: items that were blank once marker, label and quotes were removed; ``cut``: the last
    item was dropped because the reply was cut off at max_tokens."""

    items: list[str]
    malformed: bool = False
    empty: int = 0
    cut: bool = False


def _quoted_inside(text: str, left: str, right: str) -> bool:
    """Whether ``left`` or ``right`` occurs in ``text`` as a delimiter (a straight single quote between two
    letters, as in "don't", is an apostrophe, not a quote)."""
    if left == "'":
        return re.search(r"(?<!\w)'|'(?!\w)", text) is not None
    return left in text or right in text


def _clean_item(text: str) -> str:
    """An item without its label ("Task:") and the quotes, backticks or bold wrapped around all of it.
    A wrapper is removed only when its delimiter does not occur again inside: ``"a" and "b"`` or
    ``**Bold** and **bold**`` start and end with separate spans, and stay as they are."""
    text = text.strip()
    text = _LABEL.sub("", text).strip()
    changed = True
    while changed and len(text) >= 2:
        changed = False
        for left, right in _QUOTES:
            if text.startswith(left) and text.endswith(right) and len(text) >= len(left) + len(right):
                inner = text[len(left):len(text) - len(right)]
                if not _quoted_inside(inner, left, right):
                    text = inner.strip()
                    changed = True
    return text


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def parse_list(reply: str, *, truncated: bool = False) -> ParsedList:
    """The items of a numbered (``1.``, ``1)``, ``(1)``, ``<1>``, ``[1]``, ``Instruction 1:``) or
    bulleted (``-``, ``*``, ``•``) list; a number marker may be in bold (``**1.**``), open a bold line
    (``**1. Write a poem.**``) or a heading (``### 1. Write a poem.``).

    The first marker decides the style; after that only markers of that style start items, so a
    numbered list may hold bullets inside its items. A marker indented 2 columns or more past the
    first one belongs to a list nested inside the current item (material of a task), and like a
    line without a marker it continues the current item. Text before the first marker (a preamble)
    is dropped. After a blank line, a paragraph belongs to the current item when another item
    follows it, or when it is indented 2 columns or more past the markers (the material of the last
    item, as Markdown indents it); from the first unindented paragraph after the last item on, the
    rest (an epilogue: "Let me know if...") is dropped. A reply cut off at max_tokens loses its last
    item. A reply with no marker at all is malformed and yields nothing."""
    lines = reply.replace("\r\n", "\n").split("\n")
    style = None
    for line in lines:
        if _NUMBERED.match(line):
            style = _NUMBERED
            break
        if _BULLET.match(line):
            style = _BULLET
            break
    if style is None:
        return ParsedList([], malformed=True)
    first = next(line for line in lines if style.match(line))
    bullet = style.match(first).group(1) if style is _BULLET else None
    outer = _indent(first)  # the outer list's markers; nested lists sit 2 columns or more further in

    def starts_item(line: str) -> re.Match | None:
        m = style.match(line)
        if m is None or (bullet is not None and m.group(1) != bullet) or _indent(line) >= outer + 2:
            return None
        return m

    items: list[list[str]] = []
    pending: list[str] = []  # lines after a blank line: kept only if another item follows
    for line in lines:
        m = starts_item(line)
        if m is not None:
            if items and pending:
                items[-1].extend(pending)
            pending = []
            opened = style is _NUMBERED and m.group("bold") is not None
            items.append([("**" if opened else "") + line[m.end():]])
        elif not items:
            continue  # preamble
        elif not line.strip():
            pending.append("")
        elif pending:
            pending.append(line)
        else:
            items[-1].append(line)
    if items and pending:  # after the last item: its indented paragraphs, up to an unindented one
        previous = ""
        for line in pending:
            if line.strip() and not previous.strip() and _indent(line) < outer + 2:
                break
            items[-1].append(line)
            previous = line
    parsed = ParsedList([])
    if truncated and items:
        items.pop()
        parsed.cut = True
    for first, *rest in items:
        text = _clean_item("\n".join([first.strip(), textwrap.dedent("\n".join(rest))]).strip())
        if not any(ch.isalnum() for ch in text):
            parsed.empty += 1
            continue
        parsed.items.append(text)
    return parsed


# ---------------------------------------------------------------------- near-duplicates
_WORD = re.compile(r"\w+")


def word_tokens(text: str) -> list[str]:
    """Lowercase word tokens of NFKC-normalized text (what the duplicate rules compare)."""
    return [t for t in _WORD.findall(unicodedata.normalize("NFKC", text).lower()) if t != "_"]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences.

    Bit-parallel (Allison and Dix, 1986; Hyyrö, 2004): bit j of V is 0 where row i of the classic
    DP table steps up at column j; one token of ``a`` updates all of V with a few big-int
    operations, ``V' = ((V + U) | (V - U))`` with ``U = V & match(token)``, and the LCS is the
    number of zero bits in V (of len(b) bits)."""
    if not a or not b:
        return 0
    width = len(b)
    full = (1 << width) - 1
    match: dict[str, int] = {}
    for j, token in enumerate(b):
        match[token] = match.get(token, 0) | (1 << j)
    v = full
    for token in a:
        bits = match.get(token)
        if bits is None:
            continue
        u = v & bits
        v = ((v + u) | (v - u)) & full
    return width - bin(v).count("1")


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token sequences: 2 * LCS / (len(a) + len(b))."""
    if not a or not b:
        return 0.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


@dataclass
class DuplicateVerdict:
    status: str  # "kept" | "duplicate" | "near-duplicate" | "empty"
    similar_to: str | None = None
    similarity: float | None = None


class NearDuplicates:
    """Greedy near-duplicate removal over a batch (see the module doc for the rule).

    ``check(texts, references)`` walks ``texts`` in order; a text is dropped when it duplicates a
    reference or an earlier kept text, otherwise it is kept and later texts are compared with it.
    References (e.g. the seed examples shown to the teacher) are never returned, only compared.

    ``protected`` (indices into ``texts``) names texts that must not lose to the others, e.g. those
    whose answers are already paid for: they are walked first on their own, in order, so one of
    them is dropped only for a reference or an earlier protected text, and an unprotected text is
    also dropped when it duplicates a protected one that comes after it. Where the plain walk keeps
    every protected text, the verdicts are the plain walk's, word for word."""

    def __init__(self, threshold: float = 0.7):
        if not 0.0 < threshold <= 1.0:
            raise GenerateError(f"similarity threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def _overlap_needed(self, n: int) -> int:
        t = self.threshold
        return max(1, math.ceil(t * n / (2.0 - t) - 1e-9))

    def check(self, texts: Sequence[str], references: Iterable[str] = (),
              protected: Collection[int] = ()) -> list[DuplicateVerdict]:
        references = list(references)
        token_lists = [word_tokens(t) for t in references] + [word_tokens(t) for t in texts]
        # Elements are (token, occurrence) so that multiset overlap is set overlap.
        elements: list[frozenset] = []
        for tokens in token_lists:
            seen: Counter = Counter()
            items = []
            for tok in tokens:
                seen[tok] += 1
                items.append((tok, seen[tok]))
            elements.append(frozenset(items))
        frequency: Counter = Counter(e for items in elements for e in items)
        rank = {e: i for i, e in enumerate(sorted(frequency, key=lambda e: (frequency[e], e)))}
        ratio = self.threshold / (2.0 - self.threshold)  # the shortest partner a text can match
        half_t = self.threshold / 2.0
        lengths = [len(tokens) for tokens in token_lists]
        n_ref = len(references)

        def text_of(i: int) -> str:
            return references[i] if i < n_ref else texts[i - n_ref]

        prefixes = [sorted(rank[e] for e in elements[i])[:n - self._overlap_needed(n) + 1] if n else []
                    for i, n in enumerate(lengths)]

        class Kept:
            """The texts kept so far, indexed by the ranks of their prefix elements."""

            def __init__(self) -> None:
                self.index: dict[int, list[int]] = defaultdict(list)  # element rank -> kept text ids
                self.exact: dict[tuple[str, ...], int] = {}

            def add(self, i: int) -> None:
                self.exact.setdefault(tuple(token_lists[i]), i)
                for r in prefixes[i]:
                    self.index[r].append(i)

        def match(i: int, kept: Kept) -> DuplicateVerdict | None:
            """Text i's verdict against ``kept``: a duplicate, a near-duplicate, or None (neither)."""
            tokens = token_lists[i]
            if tuple(tokens) in kept.exact:
                return DuplicateVerdict("duplicate", text_of(kept.exact[tuple(tokens)]), 1.0)
            best: tuple[float, int] | None = None
            n = len(tokens)
            shortest, longest = ratio * n - 1e-9, n / ratio + 1e-9  # partner lengths that can reach t
            mine = elements[i]
            survivors = []
            for j in {j for r in prefixes[i] for j in kept.index.get(r, ())}:
                m = lengths[j]
                # LCS <= multiset overlap: most candidates share too few tokens to need an LCS.
                if shortest <= m <= longest and len(mine & elements[j]) >= half_t * (n + m) - 1e-9:
                    survivors.append(j)
            for j in sorted(survivors):
                score = rouge_l(tokens, token_lists[j])
                if score >= self.threshold and (best is None or score > best[0]):
                    best = (score, j)
            if best is None:
                return None
            return DuplicateVerdict("near-duplicate", text_of(best[1]), round(best[0], 4))

        def walk(ids: list[int], ahead: Kept | None, fixed: dict[int, DuplicateVerdict]):
            """The greedy walk over text ids (references, all kept, come first); a text not in ``fixed``
            is also checked against ``ahead``, the kept protected texts. Returns (verdicts, kept)."""
            kept = Kept()
            verdicts: dict[int, DuplicateVerdict] = {}
            for i in range(n_ref):  # references are all kept: every one of them is compared with
                if token_lists[i]:
                    kept.add(i)
            for i in ids:
                if not token_lists[i]:
                    verdicts[i] = DuplicateVerdict("empty")
                    continue
                verdict = fixed.get(i)
                if verdict is None:
                    verdict = match(i, kept) or (match(i, ahead) if ahead is not None else None)
                verdicts[i] = verdict or DuplicateVerdict("kept")
                if verdicts[i].status == "kept":
                    kept.add(i)
            return verdicts, kept

        ids = list(range(n_ref, n_ref + len(texts)))
        first, ahead = {}, None
        if protected:
            first, ahead = walk([n_ref + k for k in sorted(set(protected))], None, {})
        verdicts, _ = walk(ids, ahead, first)
        return [verdicts[i] for i in ids]


# ---------------------------------------------------------------------- response checks
#: Common English function words: a response made only of these (and punctuation) says nothing.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we
were what when where which while who whom why will with would you your yours yourself yourselves ok okay yes
""".split())

REFUSAL_PHRASES = ("sorry", "i cannot", "i can't", "i can not", "i am unable", "i'm unable", "as an ai")


def only_stop_words(text: str) -> bool:
    """True when ``text`` has no word outside STOP_WORDS (punctuation and blanks only count as none)."""
    return all(token in STOP_WORDS for token in word_tokens(text))


def short_refusal(text: str, max_words: int = 80) -> bool:
    """A refusal: fewer than ``max_words`` words and an apology or inability phrase (WizardLM's rule
    was "contains 'sorry' and is shorter than 80 words"; the phrase list widens it a little)."""
    lowered = " ".join(text.lower().replace("\u2019", "'").split())
    return len(lowered.split()) < max_words and any(p in lowered for p in REFUSAL_PHRASES)


def normalized(text: str) -> str:
    return " ".join(word_tokens(text))


# ---------------------------------------------------------------------- determinism
def rng_for(seed: int, *parts) -> random.Random:
    """A random generator that depends only on the seed and ``parts`` (e.g. step name and index),
    the same in every process and run (string seeds are hashed with SHA-512 by ``random``)."""
    return random.Random(":".join(str(p) for p in (seed, *parts)))


# ---------------------------------------------------------------------- steps and outputs
def add_scheme_arguments(parser: argparse.ArgumentParser, templates: Sequence[str], *,
                         temperature: float = 0.7, max_tokens: int = 1024, model: str = "teacher") -> None:
    """Flags every scheme shares: output folder, seed, sampling, templates; then the pool flags. ``model``
    names in the help whose answers the sampling flags set (the teacher's, or the judge's in filter)."""
    g = parser.add_argument_group("output and sampling")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: final files, and work/ with one resumable store per step")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature of the {model}'s answers, 0 to 2 (default {temperature:g})")
    g.add_argument("--max-tokens", type=int, default=max_tokens,
                   help=f"max tokens per {model} answer (default {max_tokens})")
    if templates:
        g.add_argument("--template", action="append", metavar="NAME=FILE",
                       help=f"use your own prompt template file (templates: {', '.join(templates)}; "
                            f"the shipped ones are in {PROMPTS}); repeatable")
    add_pool_arguments(parser)


def check_sampling(args) -> None:
    if args.max_tokens < 1:
        raise GenerateError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if not 0.0 <= args.temperature <= 2.0:
        raise GenerateError(f"--temperature must be in [0, 2], got {args.temperature}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_step(args, out: Path, step: str, requests: list[Request], *,
             retry_failed: bool | Collection[str] | None = None) -> list[Result]:
    """Run one step's requests through a pool storing into ``out/work/<step>.jsonl``; Results in
    request order (stored ones are read back, not sent again). ``retry_failed`` (default:
    ``--retry-failed``) may name the keys whose recorded failures are sent again."""
    store = _step_store(out, step)
    if not requests:
        return []
    say(f"step {step}: {len(requests)} requests (store {store})")
    pool = pool_from_args(args, store, retry_failed)

    async def main() -> list[Result]:
        async with pool:
            return await pool.run(requests)

    results = asyncio.run(main())
    if args.no_progress:
        say(run_summary(pool.stats))
    return results


def stored_keys(args, out: Path, step: str, *, answered: bool = False) -> set[str]:
    """The keys in a step's store (none when the step never ran), or with ``answered`` only those holding
    a paid answer (not a recorded failure). Opening the store repairs a torn last line as running the
    step would."""
    path = _step_store(out, step)
    if not path.is_file():
        return set()
    with JSONLStore(path, fsync=args.fsync) as store:
        return {key for key in store.keys() if not (answered and store.failed(key))}


def _step_store(out: Path, step: str) -> Path:
    """Where a step's requests are stored: ``out/work/<step>.jsonl``."""
    return Path(out) / "work" / f"{step}.jsonl"


def chat(text: str, *, system: str | None = None, temperature: float | None = None, max_tokens: int | None = None,
         id=None, step: str) -> Request:
    """A one-turn chat request; ``step`` goes into the stored record's meta (not part of the key)."""
    return Request(messages=[{"role": "user", "content": text}], system=system or None, temperature=temperature,
                   max_tokens=max_tokens, id=id, meta={"step": step})


def failed_keys(results: Iterable[Result]) -> set[str]:
    """The keys of the results that are recorded failures (identical requests share one key and one call)."""
    return {r.key for r in results if not r.ok}


def exit_status(out: Path, failed: int) -> int:
    """A scheme command's exit status: 0, or 1 when ``failed`` requests ended as recorded failures (those
    ``--retry-failed`` would send again), said on stderr as ``requests`` says it."""
    if not failed:
        return 0
    it = "it" if failed == 1 else "them"
    what = "1 request ended as a failure" if failed == 1 else f"{failed} requests ended as failures"
    say(f"{what} (recorded in {Path(out) / 'work'}; left out of the outputs); rerun with --retry-failed to send "
        f"{it} again")
    return 1


def truncated(result: Result) -> bool:
    """Whether the reply is not whole: cut off at max_tokens, or stopped by the provider's filter."""
    return result.finish_reason in TRUNCATED or result.finish_reason in FILTERED


def cut_short(result: Result) -> str | None:
    """Why the reply is not whole, as a drop reason's ending ("cut off at max_tokens", "stopped by the
    provider's filter (finish_reason content_filter)"), or None for a whole reply."""
    if result.finish_reason in TRUNCATED:
        return "cut off at max_tokens"
    if result.finish_reason in FILTERED:
        return f"stopped by the provider's filter (finish_reason {result.finish_reason})"
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # the rename itself on the disk


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records as JSONL atomically (a temporary file renamed over ``path``); returns the count. A
    record holding a lone surrogate is written escaped (``json_utf8``), where encoding it stopped the run."""
    lines = [json_utf8(r) + b"\n" for r in records]
    _atomic_write(Path(path), b"".join(lines))
    return len(lines)


def write_json(path: str | os.PathLike, value) -> None:
    """Write ``value`` as indented JSON atomically (``json_utf8``: a lone surrogate in an answer is escaped)."""
    _atomic_write(Path(path), json_utf8(value, indent=2) + b"\n")


def check_out_dir(out: str | os.PathLike, inputs: Sequence, outputs: Sequence[str]) -> Path:
    """The output folder (``~`` expanded), refused when it is a file or when an input file is one of the
    outputs."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out} exists and is not a folder")
    targets = {(out / name).resolve() for name in outputs}
    for source in inputs:
        path = None if source is None else Path(source).expanduser()
        if path is not None and path.exists() and path.resolve() in targets:
            raise GenerateError(f"input {source} is one of the files the command writes in {out}; "
                                "choose another --out")
    return out


def excerpt(text: str | None, limit: int = 300) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + "..."


__all__ = [
    "TEMPLATE_FIELDS", "Template", "load_template", "load_templates", "read_records", "text_field", "read_topics",
    "ParsedList", "parse_list", "word_tokens", "lcs_length", "rouge_l", "NearDuplicates", "DuplicateVerdict",
    "STOP_WORDS", "only_stop_words", "short_refusal", "normalized", "rng_for", "add_scheme_arguments", "stored_keys",
    "check_sampling", "run_step", "chat", "failed_keys", "exit_status", "truncated", "cut_short", "write_jsonl",
    "write_json", "check_out_dir", "say", "excerpt", "PROMPTS", "SAMPLES",
]
