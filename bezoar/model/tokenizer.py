"""A thin wrapper around a sentencepiece ``tokenizer.model`` with Llama's special-token rules.

bos/eos/pad ids come from the model folder's ``tokenizer_config.json`` / ``special_tokens_map.json`` /
``config.json`` when they say so, otherwise from the sentencepiece model itself. Encoding is plain
sentencepiece (what transformers' slow ``LlamaTokenizer`` does for text without special tokens).
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
        if folder is not None:
            cfg = _read_json(folder / "config.json")
            for name in ("bos", "eos", "pad"):
                value = cfg.get(f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int) and 0 <= value < self.sp.GetPieceSize():
                    setattr(self, f"{name}_id", value)
            specials = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
            for name in ("bos", "eos", "pad"):
                text = _token_text(specials.get(f"{name}_token"))
                if text is not None:
                    piece_id = self.sp.PieceToId(text)
                    if piece_id != self.unk_id or text == self.sp.IdToPiece(self.unk_id):
                        setattr(self, f"{name}_id", piece_id)
        if self.pad_id is None:
            # Llama has no pad token; padded positions are masked out, so any id will do.
            self.pad_id = self.unk_id if self.unk_id >= 0 else 0

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

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
        special = {self.bos_id, self.eos_id, self.pad_id} if skip_special else set()
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in special])

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
        seqs = self.encode_many(texts, bos=bos, eos=eos)
        if max_length is not None:
            seqs = [s[-max_length:] if truncation_side == "left" else s[:max_length] for s in seqs]
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
