"""Text examples -> token documents with loss masks, under a stated truncation policy.

Tokenization rule. Training must see exactly the tokens generation sees. Generation encodes the
prompt once (``[BOS] + encode(prompt)``) and then appends the tokens the model emits, which in
the encoding of the whole text are the tokens after the prompt's. So an example is encoded as
one call, ``[BOS] + encode(prompt + response)`` (+ ``[EOS]``), and the prompt/response border is
where that sequence stops agreeing with ``[BOS] + encode(prompt)``. Encoding the response on its
own would be wrong: sentencepiece puts a dummy-prefix space at the start of every call, so the
response would begin with a "▁" the model never produces after the template's newline.
If a merge straddles the border (the prompt's last token differs between the two encodings;
rare, since the template ends with a newline that sentencepiece keeps as its own token) the
differing tokens count as response and the example is counted in ``border_merges``.

Truncation policy, with ``max_len`` the document budget (prompt + response, BOS/EOS included)
and ``max_prompt_len`` (default ``max_len // 2``, must be below ``max_len``):
- an example that fits is kept whole;
- otherwise the prompt is cut from the LEFT (the BOS stays; the end of the prompt, which holds
  the question and the ``### Response:`` header, is kept) down to
  ``max(max_prompt_len, max_len - response tokens)`` (so never further than needed, and never
  below ``max_prompt_len``), and then the response is cut from the RIGHT to what is left (an EOS
  cut off is not put back). The response therefore always keeps at least
  ``min(its length, max_len - max_prompt_len)`` tokens: nothing is dropped for length.
- for a pair, one prompt cut (sized for the longer response) applies to both documents;
- an example whose response text is empty (after stripping) is dropped and counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from .formats import PairExample, SFTExample
from .packing import DocumentSet, DocumentSetBuilder

__all__ = ["EncodeStats", "encode_prompt_response", "fit_budget", "encode_sft", "encode_pairs"]

CHUNK = 1024  # texts per sentencepiece batch call


@dataclass
class EncodeStats:
    examples: int = 0
    kept: int = 0
    skipped_records: int = 0  # records that could not be read (only with skip_bad_records)
    dropped_empty_response: int = 0
    dropped_empty_prompt: int = 0  # no instruction, or an empty Human turn before the answer
    dropped_identical_pair: int = 0  # DPO pairs whose two documents are the same tokens (no gradient)
    truncated: int = 0
    responses_cut: int = 0  # of the truncated, those whose response lost its end (and so its EOS)
    border_merges: int = 0  # prompt and response that tokenize into one token across their border
    tokens: int = 0
    loss_tokens: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        skipped = f" ({self.skipped_records} bad records skipped before)" if self.skipped_records else ""
        identical = (f", {self.dropped_identical_pair} dropped (chosen = rejected once tokenized and cut)"
                     if self.dropped_identical_pair else "")
        no_prompt = f", {self.dropped_empty_prompt} dropped (empty instruction or Human turn)" if self.dropped_empty_prompt else ""
        cut = f" ({self.responses_cut} inside the response, which then ends without EOS)" if self.responses_cut else ""
        merges = (f", {self.border_merges} with the prompt's last token merged into the response's first"
                  if self.border_merges else "")
        return (f"{self.kept}/{self.examples} examples kept{skipped}, {self.dropped_empty_response} dropped "
                f"(empty response){no_prompt}{identical}, {self.truncated} truncated{cut}{merges}, {self.tokens} "
                f"tokens, {self.loss_tokens} with loss")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _adds_bos(tokenizer) -> bool:
    """Whether a document starts with BOS: where the tokenizer's ``add_bos_token`` says so (its default, and
    OpenLLaMA's), as the server, MT-Bench and the harness encode a prompt, so that training sees the tokens
    generation sees (always BOS here, a tokenizer with add_bos_token false was trained on [BOS] + prompt and
    served the prompt alone)."""
    return getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None and tokenizer.bos_id >= 0


def encode_prompt_response(tokenizer, prompts: Sequence[str], responses: Sequence[str]
                           ) -> list[tuple[list[int], list[int], bool]]:
    """``(prompt_ids, response_ids, merged)`` per example, with ``prompt_ids + response_ids ==
    [BOS] + encode(prompt + response)`` (BOS where ``_adds_bos``) and ``merged`` True when the border fell
    inside a merge."""
    bos = _adds_bos(tokenizer)
    prompt_ids = tokenizer.encode_many(list(prompts), bos=bos)
    full_ids = tokenizer.encode_many([p + r for p, r in zip(prompts, responses)], bos=bos)
    out = []
    for p, f in zip(prompt_ids, full_ids):
        k = _common_prefix(p, f)
        out.append((f[:k], f[k:], k != len(p)))
    return out


def fit_budget(prompt_len: int, response_len: int, max_len: int, max_prompt_len: int) -> tuple[int, int]:
    """Tokens to keep of the prompt (from its end, BOS aside) and of the response (from its start)."""
    if prompt_len + response_len <= max_len:
        return prompt_len, response_len
    keep_prompt = min(prompt_len, max(max_prompt_len, max_len - response_len))
    return keep_prompt, max(0, min(response_len, max_len - keep_prompt))


def _cut_prompt(ids: list[int], keep: int, has_bos: bool) -> list[int]:
    if keep >= len(ids):
        return ids
    if has_bos:
        return ids[:1] + ids[len(ids) - (keep - 1):] if keep > 1 else ids[:1]
    return ids[len(ids) - keep:]


def _check_budget(max_len: int, max_prompt_len: int | None) -> int:
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 tokens, got {max_len}")
    if max_prompt_len is None:
        return max_len // 2
    if not 1 <= max_prompt_len < max_len:
        raise ValueError(f"max_prompt_len ({max_prompt_len}) must be at least 1 and below max_len ({max_len})")
    return max_prompt_len


def encode_sft(examples: Sequence[SFTExample], tokenizer, max_len: int, max_prompt_len: int | None = None,
               eos: bool = True) -> tuple[DocumentSet, EncodeStats]:
    """One document per example; loss on the response tokens (and EOS when ``eos``)."""
    max_prompt_len = _check_budget(max_len, max_prompt_len)
    has_bos = _adds_bos(tokenizer)
    eos_ids = [tokenizer.eos_id] if eos and tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    stats = EncodeStats(examples=len(examples))
    builder = DocumentSetBuilder()
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start: start + CHUNK]
        encoded = encode_prompt_response(tokenizer, [e.prompt for e in chunk], [e.response for e in chunk])
        for j, (ex, (p, r, merged)) in enumerate(zip(chunk, encoded)):
            if not ex.response.strip():
                stats.dropped_empty_response += 1
                continue
            if ex.empty_prompt:  # an answer to nothing: it would teach the model to talk unprompted
                stats.dropped_empty_prompt += 1
                continue
            r = r + eos_ids
            keep_p, keep_r = fit_budget(len(p), len(r), max_len, max_prompt_len)
            if (keep_p, keep_r) != (len(p), len(r)):
                stats.truncated += 1
                stats.responses_cut += keep_r < len(r)
            p = _cut_prompt(p, keep_p, has_bos)
            r = r[:keep_r]
            builder.add_item([(p + r, len(p))], example=start + j)
            stats.kept += 1
            stats.border_merges += merged
            stats.tokens += len(p) + len(r)
            stats.loss_tokens += len(r) if len(p) else len(r) - 1  # a document's first token has no loss
    return builder.build(), stats


def encode_pairs(examples: Sequence[PairExample], tokenizer, max_len: int, max_prompt_len: int | None = None,
                 eos: bool = True) -> tuple[DocumentSet, EncodeStats]:
    """Two documents per pair: part 0 = prompt + chosen, part 1 = prompt + rejected (each <= ``max_len``).

    A packed row must hold a whole pair, so rows for pairs need ``max_seq_len >= 2 * max_len``
    in the worst case (or choose ``max_len`` as half the row).
    """
    max_prompt_len = _check_budget(max_len, max_prompt_len)
    has_bos = _adds_bos(tokenizer)
    eos_ids = [tokenizer.eos_id] if eos and tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else []
    stats = EncodeStats(examples=len(examples))
    builder = DocumentSetBuilder()
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start: start + CHUNK]
        prompts = [e.prompt for e in chunk]
        chosen = encode_prompt_response(tokenizer, prompts, [e.chosen for e in chunk])
        rejected = encode_prompt_response(tokenizer, prompts, [e.rejected for e in chunk])
        for j, (ex, (pc, rc, mc), (pr, rr, mr)) in enumerate(zip(chunk, chosen, rejected)):
            if not ex.chosen.strip() or not ex.rejected.strip():
                stats.dropped_empty_response += 1
                continue
            if ex.empty_prompt:
                stats.dropped_empty_prompt += 1
                continue
            rc, rr = rc + eos_ids, rr + eos_ids
            # One prompt cut for both, sized for the longer response.
            keep_p, _ = fit_budget(max(len(pc), len(pr)), max(len(rc), len(rr)), max_len, max_prompt_len)
            docs = []
            cut = response_cut = False
            for p, r in ((pc, rc), (pr, rr)):
                kp = min(len(p), keep_p)
                kr = min(len(r), max_len - kp)
                cut |= (kp, kr) != (len(p), len(r))
                response_cut |= kr < len(r)
                p = _cut_prompt(p, kp, has_bos)
                docs.append((p + r[:kr], len(p)))
            if docs[0][0] == docs[1][0]:
                # The same tokens twice (equal responses, or a cut inside a prefix they share): the DPO margin
                # is 0 whatever the weights, so the pair gives no gradient and only skews the reward metrics.
                stats.dropped_identical_pair += 1
                continue
            builder.add_item(docs, example=start + j)
            stats.kept += 1
            stats.truncated += cut
            stats.responses_cut += response_cut
            stats.border_merges += mc or mr
            stats.tokens += sum(len(ids) for ids, _ in docs)
            stats.loss_tokens += sum(len(ids) - max(n, 1) for ids, n in docs)
    return builder.build(), stats
