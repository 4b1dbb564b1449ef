"""Record schemas, the OpenBezoar prompt template, and HH-RLHF transcripts.

Turns raw records (dicts from ``bezoar.data.load``) into text examples:

- ``SFTExample(prompt, response)``: the prompt is the full text the model sees before it answers
  (template included); the loss is on the response only.
- ``PairExample(prompt, chosen, rejected)``: a preference pair for DPO, same prompt convention.

Instruction records map fields by name, first match wins (``FieldMap``); presets cover the
sources the recipe uses:

    lamini   instruction, response
    evol     instruction, output
    orca     system_prompt | system, question, response
    alpaca   instruction, input, output

The template ("modified Alpaca", as the OpenBezoar model cards describe it)::

    ### System:
    {system}

    ### Instruction:
    {instruction}[\\n\\n{input}]

    ### Response:
    {response}

``{system}`` is the template's default system line unless the record carries its own (Orca's
system messages replace it). The default system line is the Alpaca preamble reworded for an
optional input, the OpenBezoar-SFT card's text character for character (checked against the card's
README); no EOS follows the response header at inference, as the card notes. An input, when present, follows the instruction after a blank
line inside the Instruction section. ``style = "raw"`` uses no template at all: the prompt is
the instruction (plus input) and the response is the response, exactly as given (nothing stripped),
for data that is already formatted.

HH-RLHF transcripts are ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` strings. As SFT data (the
``chosen`` field) the LAST Assistant turn is the response and everything before it is the
instruction: a single Human turn becomes the instruction text as is; a longer history is kept
as ``Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...`` lines so the model sees the whole dialogue.
Loss is on the last Assistant turn only (the same prompt/response cut DPO uses). As DPO pairs,
the prompt is the transcript up to and including the last ``"\\n\\nAssistant:"`` and
chosen/rejected are the rests of the two transcripts; the two prompts must be equal. A transcript
that ends with a Human turn has no answer to train on and is an error, in every format and style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from .load import DataError, Record

__all__ = [
    "DEFAULT_SYSTEM", "PromptTemplate", "FieldMap", "FIELD_PRESETS", "SFTExample", "PairExample",
    "InstructionRecord", "instruction_record", "parse_hh", "hh_instruction", "hh_sft_example",
    "split_hh_pair", "sft_example", "pair_example", "FORMATS",
]

DEFAULT_SYSTEM = (
    "Below is an instruction that describes a task, optionally paired with an input that provides "
    "further context following that instruction. Write a response that appropriately completes the request."
)

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")

#: Record formats a data config can name.
FORMATS = ("instruction", "lamini", "evol", "orca", "alpaca", "hh", "pairs", "hh_pairs")


@dataclass
class PromptTemplate:
    """How an instruction (and optional input and system message) becomes the prompt text."""

    style: Literal["openbezoar", "raw"] = "openbezoar"
    system: str = DEFAULT_SYSTEM  # an empty string drops the System section
    system_header: str = "### System:"
    instruction_header: str = "### Instruction:"
    response_header: str = "### Response:"

    def render(self, instruction: str, input: str | None = None, system: str | None = None) -> str:
        """The prompt text; the response is appended to it directly."""
        if self.style == "raw":
            # Already formatted text: nothing is stripped, above all not the whitespace the response follows.
            return f"{instruction}\n\n{input}" if input is not None and input.strip() else instruction
        body = instruction.strip()
        if input is not None and input.strip():
            body = f"{body}\n\n{input.strip()}"
        system_text = system.strip() if system is not None and system.strip() else self.system.strip()
        parts = []
        if system_text:
            parts.append(f"{self.system_header}\n{system_text}\n\n")
        parts.append(f"{self.instruction_header}\n{body}\n\n{self.response_header}\n")
        return "".join(parts)


@dataclass
class FieldMap:
    """Source field names for each role of an instruction record; the first name present wins."""

    instruction: list[str] = field(default_factory=lambda: ["instruction", "question", "prompt"])
    input: list[str] = field(default_factory=lambda: ["input", "context"])
    response: list[str] = field(default_factory=lambda: ["response", "output", "answer"])
    system: list[str] = field(default_factory=lambda: ["system_prompt", "system"])

    def updated(self, overrides: dict[str, str | list[str]] | None) -> "FieldMap":
        """A copy with some roles' names replaced (``{"instruction": "question"}``)."""
        if not overrides:
            return FieldMap(list(self.instruction), list(self.input), list(self.response), list(self.system))
        values = {}
        for role in ("instruction", "input", "response", "system"):
            names = overrides.get(role, getattr(self, role))
            values[role] = [names] if isinstance(names, str) else list(names)
        unknown = set(overrides) - set(values)
        if unknown:
            raise DataError(f"data fields: unknown role(s) {sorted(unknown)}; roles are instruction, input, response, system")
        return FieldMap(**values)


FIELD_PRESETS: dict[str, FieldMap] = {
    "instruction": FieldMap(),
    "lamini": FieldMap(instruction=["instruction"], input=[], response=["response"], system=[]),
    "evol": FieldMap(instruction=["instruction"], input=[], response=["output"], system=[]),
    "orca": FieldMap(instruction=["question", "instruction"], input=[], response=["response"], system=["system_prompt", "system"]),
    "alpaca": FieldMap(instruction=["instruction"], input=["input"], response=["output"], system=[]),
}


@dataclass
class SFTExample:
    prompt: str
    response: str
    origin: str = ""
    empty_prompt: bool = False  # the instruction (or the Human turn answered) is empty: encoding drops it


@dataclass
class PairExample:
    prompt: str
    chosen: str
    rejected: str
    origin: str = ""
    empty_prompt: bool = False


@dataclass
class InstructionRecord:
    instruction: str
    response: str
    input: str | None = None
    system: str | None = None


# ---- instruction records -----------------------------------------------------------------------------


def _check_text(record: Record, name: str, value: str) -> str:
    """``value`` if it is text; a lone surrogate (JSON allows the escape "\\ud800") is a DataError naming the field."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{record.origin}: field {name!r} is not valid text: it holds a lone surrogate "
                        f"({value[e.start]!r} at character {e.start}, from a \\uXXXX escape that is half of a pair)"
                        ) from None
    return value


def _pick(record: Record, names: list[str], role: str, required: bool) -> str | None:
    for name in names:
        if name in record.data and record.data[name] is not None:
            value = record.data[name]
            if not isinstance(value, str):
                raise DataError(f"{record.origin}: field {name!r} ({role}) must be a string, "
                                f"got {type(value).__name__}")
            return _check_text(record, name, value)
    if required:
        nulls = [name for name in names if name in record.data]
        if nulls:  # present but null (a missing value in a Parquet or CSV column)
            raise DataError(f"{record.origin}: field {nulls[0]!r} ({role}) is null")
        tried = ", ".join(repr(n) for n in names) or "(no names configured)"
        keys = ", ".join(repr(k) for k in list(record.data)[:12])
        raise DataError(f"{record.origin}: record has no {role} field (looked for {tried}); "
                        f"its keys are {keys or '(none)'}")
    return None


def instruction_record(record: Record, fields: FieldMap) -> InstructionRecord:
    """Read instruction / input / response / system from a record (error naming the record if absent)."""
    return InstructionRecord(
        instruction=_pick(record, fields.instruction, "instruction", required=True),
        response=_pick(record, fields.response, "response", required=True),
        input=_pick(record, fields.input, "input", required=False),
        system=_pick(record, fields.system, "system", required=False),
    )


# ---- HH-RLHF ----------------------------------------------------------------------------------------


def parse_hh(text: str, origin: str = "transcript") -> list[tuple[str, str]]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> ``[("human", "a"), ("assistant", "b")]`` (texts stripped)."""
    matches = list(_TURN_RE.finditer(text))
    if not matches:
        raise DataError(f"{origin}: not an HH-RLHF transcript (no '\\n\\nHuman:' / '\\n\\nAssistant:' turns)")
    if text[: matches[0].start()].strip():
        raise DataError(f"{origin}: HH-RLHF transcript has text before its first turn marker: "
                        f"{text[: matches[0].start()][:40]!r}")
    turns = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        turns.append((m.group(1).lower(), text[m.end(): end].strip()))
    return turns


def hh_instruction(turns: list[tuple[str, str]]) -> str:
    """The dialogue before the answer as instruction text (see the module docstring)."""
    if len(turns) == 1 and turns[0][0] == "human":
        return turns[0][1]
    return "\n\n".join(f"{'Human' if role == 'human' else 'Assistant'}: {text}" for role, text in turns)


def _last_assistant(turns: list[tuple[str, str]], origin: str) -> int:
    for i in range(len(turns) - 1, -1, -1):
        if turns[i][0] == "assistant":
            if i != len(turns) - 1:
                raise DataError(f"{origin}: HH-RLHF transcript ends with a Human turn, not an Assistant answer")
            if i == 0:
                raise DataError(f"{origin}: HH-RLHF transcript has no Human turn before the Assistant answer")
            return i
    raise DataError(f"{origin}: HH-RLHF transcript has no Assistant turn")


def hh_sft_example(text: str, template: PromptTemplate, origin: str = "transcript") -> SFTExample:
    """The last Assistant turn is the response, the dialogue before it the instruction."""
    if template.style == "raw":
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{origin}: HH-RLHF transcript has no Assistant turn")
        _check_answer(text[cut + len(ASSISTANT):], "", origin)
        return SFTExample(text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):], origin,
                          _raw_human_turn_empty(text[:cut]))
    turns = parse_hh(text, origin)
    last = _last_assistant(turns, origin)
    return SFTExample(template.render(hh_instruction(turns[:last])), turns[last][1], origin,
                      not turns[last - 1][1] if turns[last - 1][0] == "human" else False)


def _raw_human_turn_empty(prompt: str) -> bool:
    """Whether the last Human turn of a raw HH prompt (the text before its answer's marker) holds no text."""
    at = prompt.rfind(HUMAN)
    return at >= 0 and not prompt[at + len(HUMAN):].strip()


def _check_answer(rest: str, name: str, origin: str) -> None:
    # What follows the last Assistant marker is trained as the answer; a Human turn in it is not one.
    if HUMAN in rest:
        raise DataError(f"{origin}: HH-RLHF {name}transcript ends with a Human turn, not an Assistant answer")


def split_hh_pair(chosen: str, rejected: str, origin: str = "pair") -> tuple[str, str, str]:
    """Raw HH split: (prompt up to and including the last "\\n\\nAssistant:", chosen rest, rejected rest)."""
    parts = []
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        cut = text.rfind(ASSISTANT)
        if cut < 0:
            raise DataError(f"{origin}: {name} transcript has no '\\n\\nAssistant:' turn")
        _check_answer(text[cut + len(ASSISTANT):], f"{name} ", origin)
        parts.append((text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT):]))
    (prompt_c, rest_c), (prompt_r, rest_r) = parts
    if prompt_c != prompt_r:
        n = next((i for i, (a, b) in enumerate(zip(prompt_c, prompt_r)) if a != b), min(len(prompt_c), len(prompt_r)))
        raise DataError(f"{origin}: chosen and rejected transcripts have different prompts "
                        f"(they first differ at character {n}: {prompt_c[n:n + 30]!r} vs {prompt_r[n:n + 30]!r})")
    return prompt_c, rest_c, rest_r


# ---- records -> examples ------------------------------------------------------------------------------


def _require_str(record: Record, name: str) -> str:
    if name in record.data and record.data[name] is None:
        raise DataError(f"{record.origin}: field {name!r} is null")
    if name not in record.data:
        keys = ", ".join(repr(k) for k in list(record.data)[:12])
        raise DataError(f"{record.origin}: record has no {name!r} field; its keys are {keys or '(none)'}")
    value = record.data[name]
    if not isinstance(value, str):
        raise DataError(f"{record.origin}: field {name!r} must be a string, got {type(value).__name__}")
    return _check_text(record, name, value)


def _raw_drops_system(record: Record, field_name) -> None:
    raise DataError(f"{record.origin}: field {field_name!r} holds a system message, but template.style = \"raw\" "
                    "uses the prompt text as it is and would drop it: write the system message into the prompt "
                    "text, or use the openbezoar style")


def sft_example(record: Record, fmt: str, template: PromptTemplate, fields: FieldMap | None = None,
                hh_field: str = "chosen") -> SFTExample:
    """One record -> prompt/response text for SFT. ``fmt`` is one of the instruction presets or ``hh``."""
    if fmt == "hh":
        return hh_sft_example(_require_str(record, hh_field), template, record.origin)
    if fmt not in FIELD_PRESETS:
        raise DataError(f"data format {fmt!r} is not an SFT format; use one of: {', '.join(list(FIELD_PRESETS) + ['hh'])}")
    rec = instruction_record(record, fields or FIELD_PRESETS[fmt])
    if template.style == "raw" and rec.system is not None and rec.system.strip():
        names = (fields or FIELD_PRESETS[fmt]).system
        _raw_drops_system(record, next((n for n in names if record.data.get(n)), names[0] if names else "system"))
    response = rec.response if template.style == "raw" else rec.response.strip()
    return SFTExample(template.render(rec.instruction, rec.input, rec.system), response, record.origin,
                      not rec.instruction.strip() and not (rec.input or "").strip())


PAIR_SYSTEM_FIELDS = ("system_prompt", "system")  # as the instruction presets read a system message


def pair_example(record: Record, fmt: str, template: PromptTemplate,
                 system_fields: tuple[str, ...] = PAIR_SYSTEM_FIELDS) -> PairExample:
    """One record -> a preference pair. ``pairs``: prompt/chosen/rejected fields (prompt is an
    instruction rendered by the template, optional system message: the first of ``system_fields`` the record
    has, where only ``system`` was read and a ``system_prompt`` was dropped); ``hh_pairs``: HH-RLHF
    chosen/rejected transcripts split at the last Assistant turn."""
    if fmt == "pairs":
        prompt = _require_str(record, "prompt")
        chosen = _require_str(record, "chosen")
        rejected = _require_str(record, "rejected")
        system_field = next((n for n in system_fields if record.data.get(n) is not None), system_fields[-1])
        system = record.data.get(system_field)
        if system is not None and not isinstance(system, str):
            raise DataError(f"{record.origin}: field {system_field!r} must be a string, got {type(system).__name__}")
        if system is not None:
            _check_text(record, system_field, system)
        if template.style == "raw":
            if system is not None and system.strip():
                _raw_drops_system(record, system_field)
            return PairExample(prompt, chosen, rejected, record.origin, not prompt.strip())
        return PairExample(template.render(prompt, system=system), chosen.strip(), rejected.strip(), record.origin,
                           not prompt.strip())
    if fmt == "hh_pairs":
        chosen_text = _require_str(record, "chosen")
        rejected_text = _require_str(record, "rejected")
        prompt, chosen, rejected = split_hh_pair(chosen_text, rejected_text, record.origin)
        if template.style == "raw":
            return PairExample(prompt, chosen, rejected, record.origin,
                               _raw_human_turn_empty(prompt[: len(prompt) - len(ASSISTANT)]))
        turns = parse_hh(prompt, record.origin)[:-1]  # the prompt ends with an empty Assistant turn
        if not turns:
            raise DataError(f"{record.origin}: HH-RLHF prompt has no turn before the answer")
        # As hh_sft_example cuts the same transcript: an Assistant turn right before the answer (two in a row, in
        # some HH-RLHF dialogues) stays in the history the instruction shows.
        return PairExample(template.render(hh_instruction(turns)), chosen.strip(), rejected.strip(), record.origin,
                           not turns[-1][1] if turns[-1][0] == "human" else False)
    raise DataError(f"data format {fmt!r} is not a preference format; use 'pairs' or 'hh_pairs'")
