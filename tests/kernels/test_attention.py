"""Packed causal attention: the Triton flash kernel (interpreter) against SDPA with a document mask."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bezoar_kernels.attention import (
    INTERPRETER_BLOCKS,
    attention,
    attention_reference,
    document_bounds,
    document_mask,
    flash_attention,
    flex_attention_packed,
)
from bezoar_kernels.dispatch import backend
from tests.kernels.layer_checks import check_against_reference, check_bf16_against_fp32, leaves
from tests.utils import assert_close

NAMES = ["out", "dq", "dk", "dv"]
DEFAULT_INTERPRETER_BLOCKS = dict(INTERPRETER_BLOCKS)


@pytest.fixture(autouse=True)
def small_interpreter_blocks(monkeypatch):
    """Blocks of 16 and 32 so that rows of 37 or 48 span several query and key blocks."""
    import bezoar_kernels.attention as attn

    monkeypatch.setattr(attn, "INTERPRETER_BLOCKS", {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)})


def doc_ids_from_lengths(lengths_per_row, T, pad_id=-1):
    """(B, T) int32 ids: documents of the given lengths laid end to end, the rest padding."""
    ids = torch.full((len(lengths_per_row), T), pad_id, dtype=torch.int32)
    for b, lengths in enumerate(lengths_per_row):
        pos = 0
        for i, n in enumerate(lengths):
            ids[b, pos: pos + n] = i
            pos += n
        assert pos <= T
    return ids


def _qkv(B, T, Hq, Hk, D, dtype, device="cpu"):
    q = torch.randn(B, T, Hq, D).to(device, dtype)
    k = torch.randn(B, T, Hk, D).to(device, dtype)
    v = torch.randn(B, T, Hk, D).to(device, dtype)
    return leaves(q, k, v)


def _compare(q, k, v, docs, dtype):
    check_against_reference(lambda q, k, v: attention(q, k, v, docs),
                            lambda q, k, v: attention_reference(q, k, v, docs), [q, k, v], NAMES, dtype)


# (B, T, Hq, Hk, D, document lengths per row or None)
CASES = [
    pytest.param(2, 37, 3, 3, 100, [[10, 1, 20], [37]], id="d100-uneven-docs-pad"),
    pytest.param(1, 37, 4, 2, 64, None, id="gqa-causal"),
    pytest.param(1, 37, 4, 2, 64, [[5, 12, 1, 19]], id="gqa-docs"),
    pytest.param(1, 48, 2, 1, 16, [[1] * 7 + [26, 1, 1]], id="many-length-1"),  # a doc ends at 32, a block edge
]


@pytest.mark.parametrize("B,T,Hq,Hk,D,lengths", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flash_attention_matches_reference(B, T, Hq, Hk, D, lengths, dtype):
    q, k, v = _qkv(B, T, Hq, Hk, D, dtype)
    docs = doc_ids_from_lengths(lengths, T) if lengths else None
    _compare(q, k, v, docs, dtype)


def test_default_interpreter_blocks(monkeypatch):
    """The blocks the interpreter uses outside these tests (the training tests on CPU)."""
    import bezoar_kernels.attention as attn

    monkeypatch.setattr(attn, "INTERPRETER_BLOCKS", DEFAULT_INTERPRETER_BLOCKS)
    q, k, v = _qkv(2, 130, 6, 3, 10, torch.float32)
    docs = doc_ids_from_lengths([[40, 1, 70, 19], [100]], 130)
    _compare(q, k, v, docs, torch.float32)


def test_views_of_a_fused_qkv_and_custom_scale():
    """q, k, v sliced from one projection output (row stride (Hq + 2 Hk) D), and scale != 1/sqrt(D)."""
    B, T, Hq, Hk, D = 1, 29, 4, 2, 24
    (qkv,) = leaves(torch.randn(B, T, (Hq + 2 * Hk) * D))
    docs = doc_ids_from_lengths([[13, 16]], T)

    def split(t):
        q = t[..., : Hq * D].view(B, T, Hq, D)
        k = t[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
        v = t[..., (Hq + Hk) * D:].view(B, T, Hk, D)
        return q, k, v

    check_against_reference(lambda t: attention(*split(t), docs, scale=0.3),
                            lambda t: attention_reference(*split(t), docs, scale=0.3),
                            [qkv], ["out", "dqkv"], torch.float32)


def test_ids_that_reappear_later_in_the_row():
    """The mask is by id, not by contiguous run: a document id may come back after another."""
    T = 37
    docs = torch.tensor([[0] * 9 + [1] * 10 + [0] * 8 + [2] * 10], dtype=torch.int32)
    q, k, v = _qkv(1, T, 2, 2, 32, torch.float32)
    _compare(q, k, v, docs, torch.float32)


def test_bounds_are_derived_once_per_doc_ids_tensor(monkeypatch):
    """Every layer passes the same doc_ids: bounds are computed once, and again after any change."""
    import bezoar_kernels.attention as attn

    calls = []
    real = attn.document_bounds
    monkeypatch.setattr(attn, "document_bounds", lambda d: calls.append(1) or real(d))
    q, k, v = (t.detach() for t in _qkv(1, 20, 2, 2, 16, torch.float32))
    docs = doc_ids_from_lengths([[7, 13]], 20)
    with backend("triton"):
        first = attention(q, k, v, docs)
        attention(q, k, v, docs)
        assert len(calls) == 1
        docs[0, 7:] = 0  # in place: one document now
        merged = attention(q, k, v, docs)
        assert len(calls) == 2
        fresh = attention(q, k, v, doc_ids_from_lengths([[7, 13]], 20))
        assert len(calls) == 3
    assert_close(merged, attention_reference(q, k, v, docs), 1e-5, 1e-5, "after in-place change")
    assert_close(fresh, first, 0, 0, "new tensor")


def test_document_bounds():
    docs = torch.tensor([[3, 3, 1, 1, 1, -1, -1], [0, 5, 0, 5, 7, 0, 5]], dtype=torch.int32)
    first, last = document_bounds(docs)
    for b in range(docs.shape[0]):
        for t in range(docs.shape[1]):
            same = (docs[b] == docs[b, t]).nonzero().flatten()
            assert first[b, t] == same.min() and last[b, t] == same.max(), (b, t)
    assert first.dtype == last.dtype == torch.int32


def test_reference_is_masked_softmax_attention():
    """The oracle itself, in fp64: softmax(scale QK^T + mask) V with k/v heads repeated like HF."""
    B, T, Hq, Hk, D = 2, 11, 4, 2, 8
    q, k, v = (t.double() for t in _qkv(B, T, Hq, Hk, D, torch.float32))
    docs = doc_ids_from_lengths([[4, 7], [1, 6, 2]], T)
    out = attention_reference(q, k, v, docs)
    kr, vr = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kr) / math.sqrt(D)
    allowed = document_mask(docs, T, "cpu")
    scores = scores.masked_fill(~allowed, float("-inf"))
    want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vr)
    assert_close(out, want, 1e-12, 1e-12, "reference")


def test_flex_attention_forward_on_cpu():
    """FlexAttention (eager on CPU, forward only) with the document mask equals the reference."""
    q, k, v = (t.detach() for t in _qkv(2, 37, 4, 2, 100, torch.float32))
    docs = doc_ids_from_lengths([[10, 1, 20], [37]], 37)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
        out = flex_attention_packed(q, k, v, docs, compiled=False)
        want = attention_reference(q, k, v, docs)
    assert_close(out, want, 1e-5, 1e-5, "flex")


def test_cpu_auto_backend_is_the_reference():
    q, k, v = _qkv(1, 9, 2, 1, 8, torch.float32)
    docs = doc_ids_from_lengths([[3, 6]], 9)
    with backend("auto"):
        assert torch.equal(attention(q, k, v, docs), attention_reference(q, k, v, docs))


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 9, 3, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k, v)
    q, k, v = _qkv(1, 9, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, k, v, torch.zeros(1, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, k, v, torch.zeros(1, 9))


def test_packed_backend_switch(monkeypatch):
    from bezoar_kernels.attention import packed_backend

    monkeypatch.delenv("BEZOAR_PACKED_ATTENTION", raising=False)
    assert packed_backend() == "triton"
    monkeypatch.setenv("BEZOAR_PACKED_ATTENTION", "Flex")
    assert packed_backend() == "flex"
    monkeypatch.setenv("BEZOAR_PACKED_ATTENTION", "cudnn")
    with pytest.raises(ValueError, match="BEZOAR_PACKED_ATTENTION"):
        packed_backend()


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hk,D,lengths", [
    pytest.param(2, 2048, 32, 32, 100, [[300, 1, 700, 1000, 47], [2048]], id="3b-packed"),
    pytest.param(1, 37, 4, 2, 64, [[5, 12, 1, 19]], id="small-gqa"),
])
def test_bf16_gpu_within_twice_reference_error(B, T, Hq, Hk, D, lengths):
    q, k, v = _qkv(B, T, Hq, Hk, D, torch.bfloat16, device="cuda")
    docs = doc_ids_from_lengths(lengths, T).cuda()
    check_bf16_against_fp32(lambda q, k, v: flash_attention(q, k, v, docs),
                            lambda q, k, v: attention_reference(q, k, v, docs), [q, k, v], NAMES)
    check_bf16_against_fp32(lambda q, k, v: flash_attention(q, k, v, None),
                            lambda q, k, v: attention_reference(q, k, v, None), [q, k, v], NAMES)


@pytest.mark.gpu
def test_gpu_peers_agree_with_reference():
    """SDPA is_causal (unpacked path) and compiled FlexAttention (packed alternative), bf16, fwd + bwd."""
    B, T, Hq, Hk, D = 2, 512, 8, 4, 100
    q, k, v = _qkv(B, T, Hq, Hk, D, torch.bfloat16, device="cuda")
    docs = doc_ids_from_lengths([[100, 1, 300, 111], [512]], T).cuda()
    check_bf16_against_fp32(lambda q, k, v: attention(q, k, v, None),
                            lambda q, k, v: attention_reference(q, k, v, None), [q, k, v], NAMES)
    check_bf16_against_fp32(lambda q, k, v: flex_attention_packed(q, k, v, docs),
                            lambda q, k, v: attention_reference(q, k, v, docs), [q, k, v], NAMES)
