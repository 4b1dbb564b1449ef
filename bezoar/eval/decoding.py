"""Small decoding helpers shared by the lm-eval model, MT-Bench and the server: stop strings and the text
new tokens add after a prompt."""

from __future__ import annotations

import os


def silent(tokenizer, token_id: int) -> bool:
    """Whether ``tokenizer.decode`` drops the token: BOS, EOS, pad and unk (as transformers' skip_special_tokens),
    sentencepiece's control tokens, and special added tokens (an id past every token too)."""
    if token_id in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, getattr(tokenizer, "unk_id", None)):
        return True
    sp = tokenizer.sp
    if token_id >= sp.GetPieceSize():
        return getattr(tokenizer, "added", {}).get(token_id, ("", True))[1]
    return sp.IsControl(token_id)


def context_tail(tokenizer, ids: list[int]) -> list[int]:
    """The end of ``ids`` that decides how tokens decoded after them read: from the last token that is
    neither a control token nor a UTF-8 continuation byte (a byte-fallback piece 0x80-0xBF) to the end;
    all of ``ids`` when there is none.

    A sentencepiece decode depends on what came before a token in two ways only: the first token that
    produces text loses its word marker's space, and byte-fallback pieces join into characters. At such
    a token both are settled (it produces text, and it starts a character), so the text that tokens after
    ``ids`` add reads the same after this tail as after all of ``ids``, at the cost of a few tokens'
    decode rather than the whole prompt's."""
    sp = tokenizer.sp
    for i in range(len(ids) - 1, -1, -1):
        t = ids[i]
        if silent(tokenizer, t):
            continue
        if t >= sp.GetPieceSize():  # an added token that decode keeps: its text stands alone
            return list(ids[i:])
        if sp.IsByte(t) and 0x80 <= int(sp.IdToPiece(t)[3:5], 16) < 0xC0:
            continue
        return list(ids[i:])
    return list(ids)


def continuation(tokenizer, context: list[int], ids: list[int]) -> str:
    """The text ``ids`` add when they follow ``context``: ``decode(context + ids)`` after the part it
    shares with ``decode(context)``.

    Decoding ``ids`` alone is not that: sentencepiece drops the word marker of the first piece it
    decodes, so a completion " an" of "The answer is" would read "an". The shared part is all of
    ``decode(context)`` unless the context ends inside a character that ``ids`` complete (a token
    prompt cut mid-character): then the completed character belongs to the new text."""
    context = context_tail(tokenizer, context)
    before = tokenizer.decode(context)
    whole = tokenizer.decode(context + list(ids))
    if whole.startswith(before):
        return whole[len(before):]
    return whole[len(os.path.commonprefix([before, whole])):]


class StopStrings:
    """``should_stop(row, new_ids)`` for ``generate_ids``: true once the decoded tail of a row's
    new tokens contains a stop string. Only the last few tokens are decoded each step: enough to
    hold the longest stop string even at one byte per token (byte-fallback pieces), plus a margin, counting
    only the tokens that produce text.

    With ``context`` (the row's prompt ids), the new tokens read as they do after the prompt
    (``continuation``): a first token " The" keeps its space, so a stop string " The" ends the text
    there. Without it they read as a text of their own (the lm-eval model's rule)."""

    def __init__(self, tokenizer, stop: list[str], context: list[int] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max((len(s.encode("utf-8")) for s in self.stop), default=0) + 8
        self.context = None if context is None else context_tail(tokenizer, context)

    def __call__(self, row: int, new_ids: list[int]) -> bool:
        if not self.stop:
            return False
        # the last ``self.window`` tokens that produce text, and the silent ones between them (counted in tokens,
        # nine unk or control tokens inside a stop string hid it: it streamed, and only the final text was cut)
        start, texts = len(new_ids), 0
        while start > 0 and texts < self.window:
            start -= 1
            texts += not silent(self.tokenizer, new_ids[start])
        window = new_ids[start:]
        if self.context is None:
            text = self.tokenizer.decode(window)
        else:
            before = new_ids[: len(new_ids) - len(window)] or self.context
            text = continuation(self.tokenizer, before, window)
        return any(s in text for s in self.stop)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]
