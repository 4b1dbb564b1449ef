"""The data section of a training config and the path from it to a ``BatchLoader``.

    docs, stats = build_documents(cfg.data, tokenizer)     # read, template, tokenize, truncate
    loader = make_loader(docs, cfg.data, tokenizer, batch_size=16, seed=0, world_size=1, rank=0)

``DataConfig`` is a plain dataclass for ``bezoar.config``: a stage's TOML has a ``[data]`` table
with these keys (``[data.template]`` for the prompt template).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .encode import EncodeStats, encode_pairs, encode_sft
from .formats import FIELD_PRESETS, PairExample, PromptTemplate, SFTExample, pair_example, sft_example
from .load import DataError, Record, load_records
from .packing import BatchLoader, DocumentSet

__all__ = ["DataConfig", "PAIR_FORMATS", "read_examples", "build_documents", "make_loader"]

PAIR_FORMATS = ("pairs", "hh_pairs")


@dataclass
class DataConfig:
    path: str = ""  # .jsonl / .json (also .gz, .bz2, .xz) / .parquet file, a folder of them or of datasets, or a hub name
    format: Literal["instruction", "lamini", "evol", "orca", "alpaca", "hh", "pairs", "hh_pairs"] = "instruction"
    split: str = "train"  # for datasets folders and hub names
    limit: int | None = None  # keep the first N records (file order)
    shuffle_seed: int | None = None  # shuffle records after `limit` (batch order has its own seed)
    fields: dict[str, str | list[str]] = field(default_factory=dict)  # e.g. {instruction = "question"}
    hh_field: str = "chosen"  # the transcript field of HH-RLHF records used for SFT
    template: PromptTemplate = field(default_factory=PromptTemplate)
    max_seq_len: int = 2048  # row length of a batch
    max_len: int | None = None  # tokens per document; default max_seq_len (SFT, unpacked pairs), max_seq_len // 2 (packed pairs)
    max_prompt_len: int | None = None  # the prompt is never cut below this; default max_len // 2
    eos: bool = True  # append EOS to every response (the model learns to stop)
    packed: bool = True  # best-fit-decreasing packing; false pads each batch to its longest document
    skip_bad_records: bool = False  # drop (and count) unreadable records instead of stopping

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be at least 2, got {self.max_seq_len}")
        if self.max_len is not None and not 2 <= self.max_len <= self.max_seq_len:
            raise ValueError(f"max_len ({self.max_len}) must be between 2 and max_seq_len ({self.max_seq_len})")
        if self.is_pairs and self.packed and 2 * self.document_len > self.max_seq_len:
            # Checked here: packing would find a pair too long only after the model and all the data are loaded.
            raise ValueError(f"max_len ({self.document_len}) must be at most max_seq_len // 2 "
                             f"({self.max_seq_len // 2}) for packed pairs: a pair's chosen and rejected documents "
                             "share one row (or set packed = false)")
        if self.max_prompt_len is not None and not 1 <= self.max_prompt_len < self.document_len:
            # Checked here, not only when the data is encoded: that happens after the model is loaded.
            raise ValueError(f"max_prompt_len ({self.max_prompt_len}) must be at least 1 and below the document "
                             f"length ({self.document_len}: max_len, or by default max_seq_len"
                             f"{' // 2 for packed pairs' if self.is_pairs and self.packed else ''})")

    @property
    def is_pairs(self) -> bool:
        return self.format in PAIR_FORMATS

    @property
    def document_len(self) -> int:
        if self.max_len is not None:
            return self.max_len
        # A packed row holds a whole pair; unpacked, each document has a row of its own.
        return self.max_seq_len // 2 if self.is_pairs and self.packed else self.max_seq_len


def read_examples(cfg: DataConfig, records: list[Record] | None = None
                  ) -> tuple[list[SFTExample] | list[PairExample], list[str]]:
    """Records -> text examples. Returns the examples and the origins of skipped bad records."""
    skipped: list[str] = []
    if records is None:
        if not cfg.path:
            raise DataError("data.path is empty: name a data file, folder or hub dataset")
        records = load_records(cfg.path, split=cfg.split, limit=cfg.limit, shuffle_seed=cfg.shuffle_seed,
                               skipped=skipped if cfg.skip_bad_records else None)
    fields = None
    if cfg.format in FIELD_PRESETS:
        fields = FIELD_PRESETS[cfg.format].updated(cfg.fields)
    elif cfg.fields:
        raise DataError(f"data.fields applies to instruction formats, not {cfg.format!r}")
    examples = []
    for record in records:
        try:
            if cfg.is_pairs:
                examples.append(pair_example(record, cfg.format, cfg.template))
            else:
                examples.append(sft_example(record, cfg.format, cfg.template, fields, cfg.hh_field))
        except DataError:
            if not cfg.skip_bad_records:
                raise
            skipped.append(record.origin)
    if not examples:
        raise DataError(f"{cfg.path}: no usable records ({len(skipped)} skipped as bad, first: "
                        f"{skipped[0] if skipped else '-'})")
    return examples, skipped


def build_documents(cfg: DataConfig, tokenizer, records: list[Record] | None = None,
                    read: tuple[list, list[str]] | None = None) -> tuple[DocumentSet, EncodeStats]:
    """Read, template, tokenize and truncate the data of ``cfg`` (``read``: what ``read_examples`` returned for
    it already, so that bad data stops a run before its model loads)."""
    examples, skipped = read if read is not None else read_examples(cfg, records)
    encode = encode_pairs if cfg.is_pairs else encode_sft
    docs, stats = encode(examples, tokenizer, cfg.document_len, cfg.max_prompt_len, eos=cfg.eos)
    stats.skipped_records = len(skipped)
    if docs.num_items == 0:
        raise DataError(f"{cfg.path}: every example was dropped ({stats.summary()})")
    return docs, stats


def make_loader(docs: DocumentSet, cfg: DataConfig, tokenizer, batch_size: int, seed: int = 0,
                world_size: int = 1, rank: int = 0, shuffle: bool = True, drop_last: bool = False) -> BatchLoader:
    return BatchLoader(docs, cfg.max_seq_len, batch_size, packed=cfg.packed, shuffle=shuffle, seed=seed,
                       world_size=world_size, rank=rank, drop_last=drop_last, pad_id=tokenizer.pad_id)
