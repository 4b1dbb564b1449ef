"""Packing invariants, batch layout, deterministic and resumable order, data-parallel sharding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bezoar.data import (DOC_EXAMPLE, DOC_LENGTH, DOC_LOSS_TOKENS, DOC_PART, DOC_ROW, DOC_START, IGNORE_INDEX,
                         BatchLoader, DocumentSetBuilder, best_fit_decreasing, next_token_labels, per_document_sum)

PAD = 0


def reference_bfd(lengths, capacity):
    """Best-fit decreasing, the obvious O(items x bins) way."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, free = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: free[b])
            bins[best].append(i)
            free[best] -= lengths[i]
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def make_docs(n_items, seed=0, max_len=61, docs_per_item=1, vocab=50):
    rng = np.random.default_rng(seed)
    b = DocumentSetBuilder()
    for i in range(n_items):
        docs = []
        for _ in range(docs_per_item):
            n = int(rng.integers(2, max_len + 1))
            ids = rng.integers(3, vocab, size=n)
            docs.append((ids, int(rng.integers(1, n))))
        b.add_item(docs, example=i)
    return b.build()


@pytest.mark.parametrize("n, capacity, max_len, seed", [(1, 10, 10, 0), (37, 64, 61, 1), (200, 128, 100, 2),
                                                         (500, 61, 20, 3)])
def test_bfd_matches_reference_and_fits(n, capacity, max_len, seed):
    lengths = np.random.default_rng(seed).integers(1, max_len + 1, size=n).tolist()
    bins = best_fit_decreasing(lengths, capacity)
    ref = reference_bfd(lengths, capacity)
    assert sorted(map(sorted, bins)) == sorted(map(sorted, ref))
    assert sorted(i for b in bins for i in b) == list(range(n))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    assert len(bins) >= -(-sum(lengths) // capacity)


def test_bfd_errors():
    with pytest.raises(ValueError, match="item 1 has 11 tokens, more than a row of 10"):
        best_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="lengths must be positive"):
        best_fit_decreasing([3, 0], 10)


def test_bfd_efficiency_on_many_small_items():
    lengths = np.random.default_rng(0).integers(20, 300, size=5000)
    bins = best_fit_decreasing(lengths, 2048)
    assert lengths.sum() / (len(bins) * 2048) > 0.99


def check_batch(batch, docs, packed, max_seq_len):
    ids, labels, pos, doc_ids, table = (batch[k] for k in ("input_ids", "labels", "position_ids", "doc_ids", "doc_table"))
    B, L = ids.shape
    if packed:
        assert L == max_seq_len
    covered = torch.zeros(B, L, dtype=torch.bool)
    for k, (row, start, length, example, part, loss_tokens) in enumerate(table.tolist()):
        d = int(docs.item_doc_offset[example]) + part  # examples were added in order
        assert length == docs.doc_length[d] and start + length <= L
        sl = slice(start, start + length)
        assert ids[row, sl].tolist() == docs.doc_tokens(d).tolist()  # the document is whole, in one row
        assert pos[row, sl].tolist() == list(range(length))  # positions restart at 0
        assert (doc_ids[row, sl] == k).all()
        mask = docs.loss_mask[docs.doc_offset[d]: docs.doc_offset[d] + length]
        want = np.where(mask, docs.doc_tokens(d), IGNORE_INDEX)
        assert labels[row, sl].tolist() == want.tolist() and labels[row, start] == IGNORE_INDEX
        assert loss_tokens == int(mask.sum())
        covered[row, sl] = True
    pad = ~covered
    assert (doc_ids[pad] == -1).all() and (labels[pad] == IGNORE_INDEX).all() and (ids[pad] == PAD).all()
    assert (pos[pad] == 0).all()
    # next-token targets never cross a document border
    nxt = next_token_labels(labels)
    has = nxt != IGNORE_INDEX
    assert (doc_ids[:, :-1][has[:, :-1]] == doc_ids[:, 1:][has[:, :-1]]).all() and not has[:, -1].any()
    assert batch["num_tokens"] == int(covered.sum()) and batch["num_loss_tokens"] == int((labels != IGNORE_INDEX).sum())
    if not packed and B > 1:
        assert (table[:, DOC_START] == 0).all() and table[:, DOC_ROW].tolist() == list(range(B))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("docs_per_item", [1, 2])
def test_every_document_once_per_epoch_with_exact_layout(packed, docs_per_item):
    max_seq_len = 128
    docs = make_docs(57, seed=4, docs_per_item=docs_per_item)
    loader = BatchLoader(docs, max_seq_len, batch_size=4, packed=packed, seed=1, pad_id=PAD)
    seen = []
    for batch in loader:
        check_batch(batch, docs, packed, max_seq_len)
        t = batch["doc_table"]
        seen += list(zip(t[:, DOC_EXAMPLE].tolist(), t[:, DOC_PART].tolist()))
        # the documents of one item stay together: same row when packed, neighbouring rows otherwise
        for ex in set(t[:, DOC_EXAMPLE].tolist()):
            rows = t[t[:, DOC_EXAMPLE] == ex, DOC_ROW].tolist()
            assert len(rows) == docs_per_item
            assert len(set(rows)) == 1 if packed else rows == list(range(rows[0], rows[0] + docs_per_item))
        if not packed:
            longest = int(t[:, DOC_LENGTH].max())
            assert batch["input_ids"].shape[1] == min(-(-longest // 8) * 8, max_seq_len)
    assert sorted(seen) == [(i, p) for i in range(57) for p in range(docs_per_item)]
    assert loader.epoch == 1 and loader.position == 0


def test_efficiency_reported():
    docs = make_docs(300, seed=5, max_len=100)
    packed = BatchLoader(docs, 256, batch_size=8)
    unpacked = BatchLoader(docs, 256, batch_size=8, packed=False)
    assert packed.efficiency == pytest.approx(docs.num_tokens / (packed.num_rows * 256))
    assert packed.efficiency > 0.95 and unpacked.efficiency < packed.efficiency
    slots = sum(b["input_ids"].numel() for b in BatchLoader(docs, 256, batch_size=8, packed=False))
    assert unpacked.efficiency == pytest.approx(docs.num_tokens / slots)
    s = packed.stats()
    assert s["tokens"] == docs.num_tokens and s["rows"] == packed.num_rows and s["items"] == 300


def batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("packed", [True, False])
def test_deterministic_order_and_epochs(packed):
    docs = make_docs(80, seed=6)
    a = list(BatchLoader(docs, 128, 4, packed=packed, seed=3).stream(2))
    b = list(BatchLoader(docs, 128, 4, packed=packed, seed=3).stream(2))
    c = list(BatchLoader(docs, 128, 4, packed=packed, seed=4).stream(1))
    assert len(a) == len(b) == 2 * len(c)
    for x, y in zip(a, b):
        batches_equal(x, y)
    n = len(c)
    order = lambda bs: [tuple(x["doc_table"][:, DOC_EXAMPLE].tolist()) for x in bs]  # noqa: E731
    assert order(a[:n]) != order(c) and order(a[:n]) != order(a[n:])  # the seed and the epoch change the order
    assert [x["epoch"] for x in a] == [0] * n + [1] * n and [x["step"] for x in a[:n]] == list(range(n))
    unshuffled = list(BatchLoader(docs, 128, 4, packed=packed, shuffle=False))
    assert order(unshuffled) == order(list(BatchLoader(docs, 128, 4, packed=packed, shuffle=False, seed=9)))


@pytest.mark.parametrize("where", ["first", "mid-1", "mid", "mid+1", "last"])
def test_resume_mid_epoch_gives_the_same_remaining_batches(where):
    docs = make_docs(90, seed=7)
    full = list(BatchLoader(docs, 128, 4, seed=2).stream(2))
    n = len(full) // 2  # batches per epoch; "mid" is the end of epoch 0
    stop_at = {"first": 1, "mid-1": n - 1, "mid": n, "mid+1": n + 1, "last": 2 * n - 1}[where]
    loader = BatchLoader(docs, 128, 4, seed=2)
    stream = loader.stream(2)
    for _ in range(stop_at):
        next(stream)
    state = loader.state_dict()
    resumed = BatchLoader(docs, 128, 4, seed=2)
    resumed.load_state_dict(state)
    rest = list(resumed.stream(2))
    assert len(rest) == len(full) - stop_at
    for x, y in zip(rest, full[stop_at:]):
        batches_equal(x, y)


def test_resume_refuses_changed_data_or_settings():
    docs = make_docs(40, seed=8)
    state = BatchLoader(docs, 128, 4, seed=2).state_dict()
    with pytest.raises(ValueError, match="saved for different data"):
        BatchLoader(make_docs(40, seed=9), 128, 4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=4"):
        BatchLoader(docs, 128, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=2"):
        BatchLoader(docs, 128, 4, seed=3).load_state_dict(state)


@pytest.mark.parametrize("packed, docs_per_item, world_size, batch_size", [
    (True, 1, 2, 4), (True, 1, 3, 6), (True, 2, 2, 4), (False, 1, 2, 4), (False, 2, 2, 8), (False, 1, 4, 4)])
def test_rank_shards_are_disjoint_and_make_the_global_batch(packed, docs_per_item, world_size, batch_size):
    docs = make_docs(45, seed=10, docs_per_item=docs_per_item)
    single = list(BatchLoader(docs, 128, batch_size, packed=packed, seed=5))
    ranks = [list(BatchLoader(docs, 128, batch_size, packed=packed, seed=5, world_size=world_size, rank=r))
             for r in range(world_size)]
    assert all(len(r) == len(single) for r in ranks)
    for step, whole in enumerate(single):
        parts = [r[step] for r in ranks]
        key = lambda t: sorted(zip(t[:, DOC_EXAMPLE].tolist(), t[:, DOC_PART].tolist()))  # noqa: E731
        union = sorted(x for p in parts for x in key(p["doc_table"]))
        assert union == key(whole["doc_table"])  # together the ranks hold exactly the single-process batch
        assert len(union) == len(set(union))
        assert all(p["global_num_loss_tokens"] == whole["num_loss_tokens"] for p in parts)
        assert all(p["global_num_tokens"] == whole["num_tokens"] for p in parts)
        assert sum(p["num_loss_tokens"] for p in parts) == whole["num_loss_tokens"]
        for p in parts:
            check_batch(p, docs, packed, 128)
            if step < len(single) - 1:
                assert p["input_ids"].shape[0] == batch_size // world_size


def test_rank_with_nothing_in_the_last_batch_gets_a_padding_row():
    docs = make_docs(9, seed=11)  # 9 items unpacked, batch 4 over 4 ranks: the last batch has 1 item
    last = [list(BatchLoader(docs, 128, 4, packed=False, world_size=4, rank=r))[-1] for r in range(4)]
    assert [len(b["doc_table"]) for b in last] == [1, 0, 0, 0]
    for b in last[1:]:
        assert b["input_ids"].shape[0] == 1 and (b["labels"] == IGNORE_INDEX).all() and b["num_loss_tokens"] == 0
        assert b["global_num_loss_tokens"] == last[0]["num_loss_tokens"]
    assert len(BatchLoader(docs, 128, 4, packed=False, drop_last=True)) == 2


def test_loader_argument_errors():
    docs = make_docs(10, seed=12, docs_per_item=2)
    with pytest.raises(ValueError, match="multiple of world_size 2"):
        BatchLoader(docs, 256, 3, world_size=2)
    with pytest.raises(ValueError, match="x 2 documents per item"):
        BatchLoader(docs, 256, 3, packed=False)
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        BatchLoader(docs, 256, 2, world_size=2, rank=2)
    with pytest.raises(ValueError, match="more than a row of 64"):
        BatchLoader(docs, 64, 2)
    with pytest.raises(ValueError, match="more than max_seq_len"):
        BatchLoader(docs, 32, 2, packed=False)


def test_per_document_sum_matches_loop_and_has_gradients():
    docs = make_docs(20, seed=13, docs_per_item=2)
    batch = next(iter(BatchLoader(docs, 256, 4)))
    values = torch.randn(batch["input_ids"].shape, dtype=torch.float64, requires_grad=True)
    mask = next_token_labels(batch["labels"]) != IGNORE_INDEX
    got = per_document_sum(values, batch["doc_ids"], len(batch["doc_table"]), mask)
    for k, (row, start, length, *_rest) in enumerate(batch["doc_table"].tolist()):
        sl = slice(start, start + length)
        want = (values[row, sl] * mask[row, sl]).sum()
        assert torch.allclose(got[k], want)
    got.sum().backward()
    assert torch.equal(values.grad, mask.double())


def test_builder_mask_forms_and_errors():
    b = DocumentSetBuilder()
    b.add_item([([5, 6, 7, 8], 2)], example=0)
    b.add_item([([5, 6, 7], [True, False, True])], example=1)
    docs = b.build()
    assert docs.loss_mask.tolist() == [False, False, True, True, False, False, True]  # first token never has loss
    assert docs.doc_loss_tokens().tolist() == [2, 1] and docs.item_lengths().tolist() == [4, 3]
    with pytest.raises(ValueError, match="at least one token"):
        b.add_item([([], 0)], example=2)
    with pytest.raises(ValueError, match="mask length 2 != 3"):
        b.add_item([([1, 2, 3], [True, True])], example=2)
    with pytest.raises(ValueError, match="empty"):
        BatchLoader(DocumentSetBuilder().build(), 16, 1)
