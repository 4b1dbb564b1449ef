"""Sequence packing: tokenized documents -> fixed-width rows -> deterministic, resumable batches.

Terms. A *document* is one token sequence with a loss mask (an SFT example: BOS + prompt +
response + EOS). An *item* is what must stay together: one document for SFT, two for a DPO pair
(prompt+chosen and prompt+rejected, kept as separate documents). A *row* is one line of a batch.

Packing. Items are placed by best-fit decreasing: sorted longest first (ties by index), each goes
into the open row whose free space is the smallest that still fits it, or a new row. Items never
straddle rows; an item longer than a row is an error (``bezoar.data.encode`` truncates every
document to ``max_seq_len`` first, and a pair to fit one row, so this only fires on misuse).
Rows are packed once; each epoch shuffles the rows with ``(seed, epoch)``.

Each batch is a dict:

    input_ids     (B, L) int64   pad_id in padding slots
    labels        (B, L) int64   token id where the loss applies, else -100 (prompt, padding, and the
                                 first token of every document, which nothing in its document predicts);
                                 aligned with input_ids: logits[:, t] predict labels[:, t + 1]
    position_ids  (B, L) int64   0, 1, ... restarting at every document; 0 in padding
    doc_ids       (B, L) int64   index of the slot's document in doc_table, -1 in padding
    doc_table     (N, 6) int64   one row per document: DOC_ROW, DOC_START, DOC_LENGTH, DOC_EXAMPLE,
                                 DOC_PART, DOC_LOSS_TOKENS (example = index of the source example,
                                 part = 0 for SFT, 0 chosen / 1 rejected for pairs)
    num_tokens, num_loss_tokens                 ints for this rank's share
    global_num_tokens, global_num_loss_tokens   ints for the whole global batch (all ranks), so a
                                                loss normalised by them matches one process exactly
    epoch, step                                 where the batch sits in the data order

Because the first token of a document never carries a label, a shifted label ``labels[:, t+1]``
that is not -100 always belongs to the same document as position ``t``; ``per_document_sum``
relies on that to gather per-document log-probs from a packed batch.

Unpacked mode (``packed=False``, for comparison): every document is its own row, a batch is
padded to its longest row (rounded up to ``pad_to_multiple_of``), and the documents of an item
sit in neighbouring rows of the same batch.

Data-parallel sharding: ``batch_size`` counts the rows of the *global* batch, the same with one
process or many; rank ``r`` of ``world_size`` takes a contiguous share of its units (rows, or
items in unpacked mode). A final short batch is split as evenly as it goes; a rank left with
nothing gets one all-padding row (no loss tokens) so collective calls stay in step.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DocumentSet", "DocumentSetBuilder", "best_fit_decreasing", "BatchLoader", "per_document_sum",
    "next_token_labels", "batch_to", "DOC_ROW", "DOC_START", "DOC_LENGTH", "DOC_EXAMPLE", "DOC_PART",
    "DOC_LOSS_TOKENS", "IGNORE_INDEX",
]

IGNORE_INDEX = -100
DOC_ROW, DOC_START, DOC_LENGTH, DOC_EXAMPLE, DOC_PART, DOC_LOSS_TOKENS = range(6)


# ---- documents -------------------------------------------------------------------------------------------


@dataclass
class DocumentSet:
    """Tokenized documents grouped into items, stored flat (numpy) so 100K+ examples stay cheap."""

    tokens: np.ndarray           # (T,) int32, all documents back to back
    loss_mask: np.ndarray        # (T,) bool, False on the first token of every document
    doc_offset: np.ndarray       # (D,) int64 start of each document in ``tokens``
    doc_length: np.ndarray       # (D,) int64
    doc_example: np.ndarray      # (D,) int64 source example index (the doc tag)
    doc_part: np.ndarray         # (D,) int64 position of the document within its item
    item_doc_offset: np.ndarray  # (I+1,) int64: item i holds documents item_doc_offset[i]:item_doc_offset[i+1]

    @property
    def num_docs(self) -> int:
        return len(self.doc_length)

    @property
    def num_items(self) -> int:
        return len(self.item_doc_offset) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.doc_length.sum())

    def doc_loss_tokens(self) -> np.ndarray:
        if self.num_docs == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.loss_mask.astype(np.int64), self.doc_offset)

    def item_lengths(self) -> np.ndarray:
        if self.num_items == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.doc_length, self.item_doc_offset[:-1])

    def item_docs(self, i: int) -> range:
        return range(int(self.item_doc_offset[i]), int(self.item_doc_offset[i + 1]))

    def doc_tokens(self, d: int) -> np.ndarray:
        return self.tokens[self.doc_offset[d]: self.doc_offset[d] + self.doc_length[d]]

    def fingerprint(self) -> str:
        """A hash of every token, mask bit and grouping: resume refuses data that changed."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.tokens, self.loss_mask, self.doc_length, self.doc_example, self.doc_part, self.item_doc_offset):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


class DocumentSetBuilder:
    """Collects items (lists of documents) and freezes them into a ``DocumentSet``."""

    def __init__(self):
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._example: list[int] = []
        self._part: list[int] = []
        self._item_sizes: list[int] = []

    def add_item(self, docs: Sequence[tuple[Sequence[int], Sequence[bool] | int]], example: int) -> None:
        """One item of documents; each is ``(ids, n_prompt)`` (loss on ids[n_prompt:]) or ``(ids, mask)``."""
        if not docs:
            raise ValueError("an item needs at least one document")
        for part, (ids, mask) in enumerate(docs):
            ids = np.asarray(ids, dtype=np.int32)
            if ids.ndim != 1 or len(ids) == 0:
                raise ValueError(f"example {example} part {part}: a document needs at least one token")
            if isinstance(mask, (int, np.integer)):
                m = np.zeros(len(ids), dtype=bool)
                m[int(mask):] = True
            else:
                m = np.asarray(mask, dtype=bool).copy()
                if m.shape != ids.shape:
                    raise ValueError(f"example {example} part {part}: mask length {len(m)} != {len(ids)} tokens")
            m[0] = False  # nothing in the document predicts its first token
            self._tokens.append(ids)
            self._masks.append(m)
            self._example.append(example)
            self._part.append(part)
        self._item_sizes.append(len(docs))

    def build(self) -> DocumentSet:
        lengths = np.array([len(t) for t in self._tokens], dtype=np.int64)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], out=offsets[1:])
        item_off = np.zeros(len(self._item_sizes) + 1, dtype=np.int64)
        np.cumsum(np.array(self._item_sizes, dtype=np.int64), out=item_off[1:])
        return DocumentSet(
            tokens=np.concatenate(self._tokens) if self._tokens else np.zeros(0, dtype=np.int32),
            loss_mask=np.concatenate(self._masks) if self._masks else np.zeros(0, dtype=bool),
            doc_offset=offsets,
            doc_length=lengths,
            doc_example=np.array(self._example, dtype=np.int64),
            doc_part=np.array(self._part, dtype=np.int64),
            item_doc_offset=item_off,
        )


# ---- packing -----------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Bins (lists of indices into ``lengths``) of total length <= ``capacity``, best-fit decreasing.

    Free spaces are integers in [0, capacity], so the open bins are kept in buckets by free space
    with a sorted list of the distinct spaces: finding the tightest bin is a bisect, O(log capacity).
    Among bins with equal free space the lowest-numbered (oldest) one is taken.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if len(lengths) and lengths.min() <= 0:
        raise ValueError(f"item {int(np.argmin(lengths))} has length {int(lengths.min())}; lengths must be positive")
    too_long = np.flatnonzero(lengths > capacity)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"item {i} has {int(lengths[i])} tokens, more than a row of {capacity}: "
                         f"truncate documents first (or make rows longer)")
    order = np.argsort(-lengths, kind="stable")
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free spaces of open bins
    buckets: dict[int, list[int]] = {}  # free space -> bins with exactly that space
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(spaces, n)
        if k == len(spaces):
            b = len(bins)
            bins.append([i])
            free = capacity - n
        else:
            space = spaces[k]
            bucket = buckets[space]
            b = heapq.heappop(bucket)  # ties go to the oldest bin: deterministic, easy to state
            if not bucket:
                del buckets[space]
                spaces.pop(k)
            bins[b].append(i)
            free = space - n
        if free > 0:
            bucket = buckets.get(free)
            if bucket is None:
                buckets[free] = [b]
                bisect.insort(spaces, free)
            else:
                heapq.heappush(bucket, b)
    return bins


# ---- batches -------------------------------------------------------------------------------------------------


class BatchLoader:
    """Deterministic, resumable, rank-sharded batches of packed (or padded) rows; see the module docstring."""

    def __init__(
        self,
        docs: DocumentSet,
        max_seq_len: int,
        batch_size: int,
        *,
        packed: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        pad_id: int = 0,
        pad_to_multiple_of: int = 8,
    ):
        if docs.num_items == 0:
            raise ValueError("no documents to batch (the dataset is empty after tokenization)")
        if max_seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"max_seq_len ({max_seq_len}) and batch_size ({batch_size}) must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if pad_to_multiple_of <= 0:
            raise ValueError("pad_to_multiple_of must be positive")
        self.docs = docs
        self.max_seq_len = int(max_seq_len)
        self.batch_size = int(batch_size)
        self.packed = packed
        self.shuffle = shuffle
        self.seed = int(seed)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)

        self._doc_loss = docs.doc_loss_tokens()
        # A unit is what one slot of the batch order holds: a packed row, or one item's rows.
        # Each unit is a list of rows; each row a list of document indices.
        if packed:
            bins = best_fit_decreasing(docs.item_lengths(), self.max_seq_len)
            first, last = docs.item_doc_offset[:-1].tolist(), docs.item_doc_offset[1:].tolist()
            self.units: list[list[list[int]]] = [[[d for i in b for d in range(first[i], last[i])]] for b in bins]
            rows_per_unit = 1
        else:
            long = np.flatnonzero(docs.doc_length > self.max_seq_len)
            if len(long):
                d = int(long[0])
                raise ValueError(f"document {d} has {int(docs.doc_length[d])} tokens, more than max_seq_len "
                                 f"{self.max_seq_len}: truncate documents first")
            sizes = np.diff(docs.item_doc_offset)
            if (sizes != sizes[0]).any():
                raise ValueError("unpacked batches need the same number of documents in every item")
            rows_per_unit = int(sizes[0])
            self.units = [[[d] for d in docs.item_docs(i)] for i in range(docs.num_items)]
        if self.batch_size % (rows_per_unit * self.world_size):
            raise ValueError(
                f"batch_size {self.batch_size} (rows in the global batch) must be a multiple of world_size "
                f"{self.world_size}" + (f" x {rows_per_unit} documents per item" if rows_per_unit > 1 else ""))
        self.units_per_batch = self.batch_size // rows_per_unit
        unit_of_doc = np.empty(docs.num_docs, dtype=np.int64)
        for k, unit in enumerate(self.units):
            for row in unit:
                unit_of_doc[row] = k
        self._unit_tokens = np.bincount(unit_of_doc, weights=docs.doc_length, minlength=len(self.units)).astype(np.int64)
        self._unit_loss = np.bincount(unit_of_doc, weights=self._doc_loss, minlength=len(self.units)).astype(np.int64)
        n = len(self.units)
        self.batches_per_epoch = n // self.units_per_batch if drop_last else -(-n // self.units_per_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} {'rows' if packed else 'items'} make no full batch of {self.units_per_batch} "
                             "with drop_last set")
        self._fingerprint: str | None = None  # computed on first use (hashing every token takes a moment)
        self._positions = np.arange(self.max_seq_len, dtype=np.int64)
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch

    # -- facts --

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.docs.fingerprint()
        return self._fingerprint

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def num_rows(self) -> int:
        return sum(len(u) for u in self.units)

    @property
    def efficiency(self) -> float:
        """Real tokens / slots over one epoch (packed: rows of max_seq_len; unpacked: padded batches)."""
        if self.packed:
            return float(self._unit_tokens.sum()) / (self.num_rows * self.max_seq_len)
        order = self._order(0)
        slots = used = 0
        for b in range(self.batches_per_epoch):
            units = self._global_units(0, b, order)
            rows = [row for u in units.tolist() for row in self.units[u]]
            slots += len(rows) * self._width(rows)
            used += int(self._unit_tokens[units].sum())
        return used / max(slots, 1)

    def stats(self) -> dict:
        return {
            "items": self.docs.num_items, "documents": self.docs.num_docs, "tokens": int(self._unit_tokens.sum()),
            "loss_tokens": int(self._unit_loss.sum()), "rows": self.num_rows, "batches_per_epoch": self.batches_per_epoch,
            "efficiency": self.efficiency, "packed": self.packed, "max_seq_len": self.max_seq_len,
        }

    # -- order --

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.units)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _global_units(self, epoch: int, index: int, order: np.ndarray | None = None) -> np.ndarray:
        order = self._order(epoch) if order is None else order
        return order[index * self.units_per_batch: (index + 1) * self.units_per_batch]

    def _width(self, rows: list[list[int]]) -> int:
        if self.packed:
            return self.max_seq_len
        longest = max((sum(int(self.docs.doc_length[d]) for d in row) for row in rows), default=1)
        m = self.pad_to_multiple_of
        return min(-(-longest // m) * m, max(self.max_seq_len, longest))

    def batch(self, epoch: int, index: int) -> dict:
        """Batch ``index`` of ``epoch`` for this rank (does not move the loader's position)."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch {index} is not in 0..{self.batches_per_epoch - 1}")
        return self._make_batch(epoch, index, self._order(epoch))

    def _make_batch(self, epoch: int, index: int, order: np.ndarray) -> dict:
        units = self._global_units(epoch, index, order)
        share = np.array_split(units, self.world_size)[self.rank]
        batch = self._collate([row for u in share.tolist() for row in self.units[u]])
        batch["global_num_tokens"] = int(self._unit_tokens[units].sum())
        batch["global_num_loss_tokens"] = int(self._unit_loss[units].sum())
        batch["epoch"] = epoch
        batch["step"] = index
        return batch

    def _collate(self, rows: list[list[int]]) -> dict:
        docs = self.docs
        width = self._width(rows) if rows else (self.max_seq_len if self.packed else self.pad_to_multiple_of)
        B = max(len(rows), 1)  # a rank with no share gets one padding row
        input_ids = np.full((B, width), self.pad_id, dtype=np.int64)
        labels = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.zeros((B, width), dtype=np.int64)
        doc_ids = np.full((B, width), -1, dtype=np.int64)
        table = np.zeros((sum(len(r) for r in rows), 6), dtype=np.int64)
        k = 0
        for r, row in enumerate(rows):
            start = 0
            for d in row:
                off, n = int(docs.doc_offset[d]), int(docs.doc_length[d])
                ids = docs.tokens[off: off + n]
                input_ids[r, start: start + n] = ids
                labels[r, start: start + n] = np.where(docs.loss_mask[off: off + n], ids, IGNORE_INDEX)
                position_ids[r, start: start + n] = self._positions[:n] if n <= len(self._positions) else np.arange(n)
                doc_ids[r, start: start + n] = k
                table[k] = (r, start, n, docs.doc_example[d], docs.doc_part[d], self._doc_loss[d])
                k += 1
                start += n
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids),
            "doc_ids": torch.from_numpy(doc_ids),
            "doc_table": torch.from_numpy(table),
            "num_tokens": int(table[:, DOC_LENGTH].sum()),
            "num_loss_tokens": int(table[:, DOC_LOSS_TOKENS].sum()),
        }

    # -- iteration and resume --

    def __iter__(self) -> Iterator[dict]:
        """The rest of the current epoch; afterwards the loader stands at the start of the next one."""
        epoch = self.epoch
        order = self._order(epoch)
        while self.epoch == epoch and self.position < self.batches_per_epoch:
            index = self.position
            self.position += 1  # a state_dict taken while this batch is in use resumes after it
            yield self._make_batch(epoch, index, order)
        if self.epoch == epoch:
            self.epoch, self.position = epoch + 1, 0

    def stream(self, num_epochs: int | None = None) -> Iterator[dict]:
        """Batches across epochs from the current position, until ``num_epochs`` are done (None: forever)."""
        while num_epochs is None or self.epoch < num_epochs:
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
                continue
            yield from self

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "position": self.position, "seed": self.seed, "shuffle": self.shuffle,
            "batch_size": self.batch_size, "max_seq_len": self.max_seq_len, "packed": self.packed,
            "drop_last": self.drop_last, "batches_per_epoch": self.batches_per_epoch, "data": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data and batching settings must be those it was saved with."""
        for key in ("seed", "shuffle", "batch_size", "max_seq_len", "packed", "drop_last", "batches_per_epoch"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]!r}, but this run has "
                                 f"{key}={getattr(self, key)!r}: the batches would not continue where they stopped")
        if state.get("data") != self.fingerprint:
            raise ValueError("data position was saved for different data (tokens or documents changed): "
                             "cannot resume the data order")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"data position epoch={epoch} position={position} is out of range")
        self.epoch, self.position = epoch, position


# ---- helpers for losses ----------------------------------------------------------------------------------------


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) targets for the logits at each position: ``labels`` shifted left, -100 in the last column."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def per_document_sum(values: torch.Tensor, doc_ids: torch.Tensor, num_docs: int,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``values`` (B, L) over each document's slots -> (num_docs,), differentiable.

    With ``values`` the log-prob of each position's next-token target and ``mask`` =
    ``next_token_labels(labels) != -100`` this is the per-document response log-prob DPO needs.
    """
    keep = doc_ids >= 0 if mask is None else (doc_ids >= 0) & mask
    out = torch.zeros(num_docs, dtype=values.dtype, device=values.device)
    return out.index_add(0, doc_ids[keep], values[keep])


def batch_to(batch: dict, device, non_blocking: bool = True) -> dict:
    """Move a batch's tensors to ``device``; ints stay as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
