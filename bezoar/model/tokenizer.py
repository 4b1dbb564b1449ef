"""A thin wrapper around a sentencepiece ``tokenizer.model`` with Llama's special-token rules.

bos/eos/pad ids come from the model folder's ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``config.json`` when they say so, otherwise from the sentencepiece model itself. Tokens added beyond the
sentencepiece vocabulary (``added_tokens_decoder`` in tokenizer_config.json, ``added_tokens.json``, or
tokenizer.json's ``added_tokens``: a chat model's ``<|im_end|>``, say) are known by id: a special token
named there is the model's bos/eos/pad, and decoding drops special ones and writes the others' text
(ids beyond every token, from a vocabulary padded past the tokenizer, decode to nothing). Encoding is plain
sentencepiece (what transformers' slow ``LlamaTokenizer`` does for text without special or added tokens;
an added token written in a text stays text here, where transformers encodes it as its id).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The files a checkpoint folder carries for its tokenizer. bezoar reads tokenizer.model; the rest go with
# the merged and quantized checkpoints it writes, so that transformers builds the same tokenizer from them
# as from the base (its fast tokenizer.json, any added tokens and the chat template included: transformers
# >= 4.47 saves the template as chat_template.jinja, not in tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")
# transformers 5 saves a tokenizer's named chat templates (beside the default one) as <name>.jinja in this folder.
TOKENIZER_FOLDERS = ("additional_chat_templates",)


class TokenizerError(ValueError):
    pass


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return d if isinstance(d, dict) else {}


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "</s>", ...}
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: Path, tok_cfg: dict, size: int) -> dict[int, tuple[str, bool]]:
    """``{id: (text, special)}`` of the tokens added beyond sentencepiece's ``size`` pieces, from
    tokenizer_config.json's ``added_tokens_decoder``, added_tokens.json, and tokenizer.json's ``added_tokens``
    (the first that names an id wins). Added tokens that are sentencepiece pieces already (``<s>``) are left
    to sentencepiece."""
    found: dict[int, tuple[str, bool]] = {}

    def add(i, text, special):
        if isinstance(i, str) and i.isdigit():
            i = int(i)
        if isinstance(i, int) and i >= size and isinstance(text, str) and i not in found:
            found[i] = (text, bool(special))

    decoder = tok_cfg.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for i, entry in decoder.items():
            if isinstance(entry, dict):
                add(i, entry.get("content"), entry.get("special", True))
    for text, i in _read_json(folder / "added_tokens.json").items():  # not special, as transformers reads them
        add(i, text, False)
    fast = folder / "tokenizer.json"
    if fast.exists() and not found:
        try:
            entries = json.loads(fast.read_text()).get("added_tokens") or []
        except (ValueError, AttributeError):
            entries = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                add(entry.get("id"), entry.get("content"), entry.get("special", True))
    return found


class Tokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.exists():
            raise TokenizerError(f"{model_file}: no sentencepiece tokenizer.model here")
        self.folder = folder
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with terse text
            raise TokenizerError(f"{model_file}: cannot be read as a sentencepiece model ({e})") from None

        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        pad = self.sp.pad_id()
        self.pad_id = pad if pad >= 0 else None
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        # whether transformers' tokenizer of this folder prepends BOS (its default: yes, as Llama's does)
        self.add_bos = tok_cfg.get("add_bos_token") if isinstance(tok_cfg.get("add_bos_token"), bool) else True
        self.added = _added_tokens(folder, tok_cfg, self.sp.GetPieceSize())  # id -> (text, special)
        by_text = {text: i for i, (text, _) in self.added.items()}
        cfg = _read_json(folder / "config.json")
        for name in ("bos", "eos", "pad"):
            value = cfg.get(f"{name}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                if value >= self.sp.GetPieceSize() and value not in self.added:
                    if name == "pad":  # a vocabulary resized for a pad the tokenizer files lack: masked out anyway
                        continue
                    raise TokenizerError(f"{folder / 'config.json'}: {name}_token_id = {value} is beyond the "
                                         f"tokenizer's {self.sp.GetPieceSize()} pieces and no added token has it")
                setattr(self, f"{name}_id", value)
        specials = {**_read_json(folder / "special_tokens_map.json"), **tok_cfg}
        for name in ("bos", "eos", "pad"):
            text = _token_text(specials.get(f"{name}_token"))
            if not text:  # none, or "" (transformers then keeps its default)
                continue
            if text in by_text:
                setattr(self, f"{name}_id", by_text[text])
                continue
            piece_id = self.sp.PieceToId(text)
            if piece_id != self.unk_id or text == self.sp.IdToPiece(self.unk_id):
                setattr(self, f"{name}_id", piece_id)
            elif name != "pad":  # a pad the model lacks is harmless: padded positions are masked out
                raise TokenizerError(f"{folder}: {name}_token {text!r} (tokenizer_config.json or "
                                     "special_tokens_map.json) is neither a sentencepiece piece nor an added token")
        if self.pad_id is None:
            # Llama has no pad token; padded positions are masked out, so any id will do.
            self.pad_id = self.unk_id if self.unk_id >= 0 else 0
        # Every id that ends a generation: the EOS, and the others config.json and generation_config.json list (a chat
        # model's [</s>, <|im_end|>]: transformers' generate stops at any of them; only the first stopped here).
        ends = [self.eos_id] if self.eos_id is not None and self.eos_id >= 0 else []
        for source in (cfg, _read_json(folder / "generation_config.json")):  # config.json read above
            value = source.get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.id_count and i not in ends:
                    ends.append(i)
        self.eos_ids: tuple[int, ...] = tuple(ends)

    @property
    def vocab_size(self) -> int:
        """sentencepiece's pieces (``id_count`` adds the tokens added above them)."""
        return self.sp.GetPieceSize()

    @property
    def id_count(self) -> int:
        """How many ids this tokenizer knows: sentencepiece's pieces and the added tokens above them."""
        return max([self.sp.GetPieceSize(), *(i + 1 for i in self.added)])

    def piece(self, token_id: int) -> str:
        """The piece of an id: sentencepiece's, or an added token's text ("" for an id past every token)."""
        if 0 <= token_id < self.sp.GetPieceSize():
            return self.sp.IdToPiece(token_id)
        return self.added.get(token_id, ("", True))[0]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id is not None and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def encode_many(self, texts: list[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        out = self.sp.EncodeAsIds(list(texts))
        pre = [self.bos_id] if bos and self.bos_id is not None and self.bos_id >= 0 else []
        post = [self.eos_id] if eos and self.eos_id is not None and self.eos_id >= 0 else []
        return [pre + ids + post for ids in out]

    def decode(self, ids, skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        # unk too, as transformers' skip_special_tokens drops it (it decoded as " ⁇ " where pad was not unk)
        special = {self.bos_id, self.eos_id, self.pad_id, self.unk_id} if skip_special else set()
        size = self.sp.GetPieceSize()
        parts, run = [], []

        def flush():
            text = self.sp.DecodeIds(run)
            # sentencepiece drops the space a text's first piece starts with (its dummy prefix); after an added
            # token that space is the text's own, and transformers keeps it
            if parts and run and self.sp.IdToPiece(run[0]).startswith("\u2581"):
                text = " " + text
            parts.append(text)

        for i in (int(i) for i in ids):
            if i in special:
                continue
            if 0 <= i < size:
                run.append(i)
                continue
            text, is_special = self.added.get(i, ("", True))  # an id beyond every token decodes to nothing
            if is_special and skip_special:
                continue
            flush()
            parts.append(text)
            run = []
        flush()
        return "".join(parts)

    def batch(
        self,
        texts: list[str],
        bos: bool = True,
        eos: bool = False,
        max_length: int | None = None,
        padding_side: str = "left",
        truncation_side: str = "left",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad a batch: returns ``input_ids`` and ``attention_mask`` (1 = real token), (B, T).

        ``truncation_side="left"`` keeps the end of over-long texts (what a prompt for generation needs).
        """
        if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
            raise ValueError("padding_side and truncation_side must be 'left' or 'right'")
        seqs = self.encode_many(texts)  # the text alone: truncation cuts it and keeps BOS and EOS
        pre = [self.bos_id] if bos and self.bos_id is not None and self.bos_id >= 0 else []
        post = [self.eos_id] if eos and self.eos_id is not None and self.eos_id >= 0 else []
        if max_length is not None:  # the text is cut, BOS and EOS kept, as transformers truncates
            keep = max(0, max_length - len(pre) - len(post))
            seqs = [(s[len(s) - keep:] if truncation_side == "left" else s[:keep]) if len(s) > keep else s
                    for s in seqs]
        seqs = [(pre + s + post)[-max_length:] if max_length is not None else pre + s + post for s in seqs]
        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if not s:
                continue
            if padding_side == "left":
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
