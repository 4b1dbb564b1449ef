"""bezoar.data: read records, apply the prompt template, tokenize with loss masks, pack into batches.

    from bezoar.data import DataConfig, build_documents, make_loader
    docs, stats = build_documents(DataConfig(path="sft.jsonl", format="lamini"), tokenizer)
    loader = make_loader(docs, cfg, tokenizer, batch_size=8, seed=0)
    for batch in loader.stream(num_epochs=1): ...

Modules: ``load`` (files and datasets -> records), ``formats`` (schemas, template, HH-RLHF),
``encode`` (tokenization rule and truncation policy), ``packing`` (documents -> batches),
``pipeline`` (the config section that ties them together).
"""

from .encode import EncodeStats, encode_pairs, encode_prompt_response, encode_sft
from .formats import (DEFAULT_SYSTEM, FIELD_PRESETS, FieldMap, PairExample, PromptTemplate, SFTExample,
                      pair_example, parse_hh, sft_example, split_hh_pair)
from .load import DataError, Record, load_records
from .packing import (DOC_EXAMPLE, DOC_LENGTH, DOC_LOSS_TOKENS, DOC_PART, DOC_ROW, DOC_START, IGNORE_INDEX,
                      BatchLoader, DocumentSet, DocumentSetBuilder, batch_to, best_fit_decreasing,
                      next_token_labels, per_document_sum)
from .pipeline import PAIR_FORMATS, DataConfig, build_documents, make_loader, read_examples

__all__ = [
    "BatchLoader", "DataConfig", "DataError", "DEFAULT_SYSTEM", "DOC_EXAMPLE", "DOC_LENGTH", "DOC_LOSS_TOKENS",
    "DOC_PART", "DOC_ROW", "DOC_START", "DocumentSet", "DocumentSetBuilder", "EncodeStats", "FIELD_PRESETS",
    "FieldMap", "IGNORE_INDEX", "PAIR_FORMATS", "PairExample", "PromptTemplate", "Record", "SFTExample",
    "batch_to", "best_fit_decreasing", "build_documents", "encode_pairs", "encode_prompt_response", "encode_sft",
    "load_records", "make_loader", "next_token_labels", "pair_example", "parse_hh", "per_document_sum",
    "read_examples", "sft_example", "split_hh_pair",
]
