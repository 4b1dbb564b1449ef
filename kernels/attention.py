"""Causal self-attention over packed rows: a query sees only keys of its own document.

q (B, T, Hq, D), k and v (B, T, Hk, D) with Hq % Hk == 0 (query head h reads key/value head
h // (Hq // Hk), like HF's ``repeat_kv``), as the linear outputs viewed per head. With
``doc_ids`` (B, T) a query at position t attends to keys s <= t with doc_ids[s] == doc_ids[t];
padding carries an id of its own (e.g. -1) and its outputs are ignored by the caller.

    S = scale * Q K^T (masked),   P = softmax(S),   O = P V
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = scale dS K,   dK = scale dS^T Q

The Triton kernels are a flash-attention (online softmax, no T x T matrix anywhere) with
the document mask computed from the ids block by block. Each query block only visits key
blocks from the first position of its earliest document, and each key block only visits
query blocks up to the last position of its latest document, so a packed row costs about
sum(len_doc^2) instead of T^2. D need not be a power of two (D = 100 for OpenLLaMA 3B): the
head dim is padded to BLOCK_D with masked loads. The backward is two kernels without
atomics: one per key block (dK, dV, summed over the query heads of its GQA group in
registers) and one per query block (dQ).

Backends of the public ``attention``:
- torch (CPU, or forced): SDPA with a boolean (B, 1, T, T) mask, HF's numerics (the oracle);
- CUDA without doc_ids: SDPA ``is_causal`` (cuDNN / flash);
- CUDA with doc_ids: this file's Triton kernel, or FlexAttention with a document mask when
  ``BEZOAR_PACKED_ATTENTION=flex`` (bench/kernels.py measures both side by side).
"""

from __future__ import annotations

import math
import os
import weakref

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from .dispatch import interpreting, use_triton
from .launch import cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

PACKED_BACKENDS = ("triton", "flex")
_LOG2E = 1.4426950408889634


def packed_backend() -> str:
    """Which implementation runs packed (doc_ids) attention on CUDA: ``triton`` (default) or ``flex``."""
    name = os.environ.get("BEZOAR_PACKED_ATTENTION", "triton").strip().lower() or "triton"
    if name not in PACKED_BACKENDS:
        raise ValueError(f"BEZOAR_PACKED_ATTENTION={name!r}: expected one of {', '.join(PACKED_BACKENDS)}")
    return name


# ----------------------------------------------------------------------------- reference


def document_mask(doc_ids: torch.Tensor | None, seq_len: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, T) mask: causal, and within one document when doc_ids is given."""
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    if doc_ids is None:
        return causal[None, None]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def sdpa_heads(q, k, v, mask=None, scale=None, is_causal: bool = False):
    """SDPA for q (B, T, Hq, D) and k/v (B, S, Hk, D): (B, H, T, D) views, k/v heads repeated as in
    HF's ``repeat_kv`` when Hq > Hk; (B, T, Hq, D) out. ``mask`` (B, 1, T, S) bool or None."""
    n_rep = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if n_rep > 1:
        kt = kt.repeat_interleave(n_rep, dim=1)
        vt = vt.repeat_interleave(n_rep, dim=1)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, is_causal=is_causal)
    return out.transpose(1, 2)


def attention_reference(q, k, v, doc_ids=None, scale=None):
    """SDPA with the document mask (``sdpa_heads``); (B, T, Hq, D) out."""
    _check(q, k, v, doc_ids)
    return sdpa_heads(q, k, v, document_mask(doc_ids, q.shape[1], q.device), scale)


def _check(q, k, v, doc_ids):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention: q must be (B, T, Hq, D) and k, v (B, T, Hk, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, T, Hq, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or D")
    if Hq % k.shape[2]:
        raise ValueError(f"attention: query heads {Hq} must be a multiple of key/value heads {k.shape[2]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if doc_ids is not None:
        if tuple(doc_ids.shape) != (B, T):
            raise ValueError(f"attention: doc_ids must be (B, T) = {(B, T)}, got {tuple(doc_ids.shape)}")
        if doc_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"attention: doc_ids must be int32 or int64, got {doc_ids.dtype}")


# ----------------------------------------------------------------------------- document bounds


def document_bounds(doc_ids: torch.Tensor):
    """For every position, the first and last position of the same id in its row: (B, T) int32 each.

    Works for any ids (not only contiguous runs), on the device, without a T x T matrix:
    a stable sort groups equal ids in position order, so each group's first and last
    sorted entries are the positions wanted.
    """
    B, T = doc_ids.shape
    sorted_ids, order = torch.sort(doc_ids, dim=1, stable=True)
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    group_start = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    group_end = torch.where(ends, idx, torch.full_like(idx, T - 1)).flip(1).cummin(dim=1).values.flip(1)
    first_sorted = order.gather(1, group_start)
    last_sorted = order.gather(1, group_end)
    first = torch.empty_like(order).scatter_(1, order, first_sorted)
    last = torch.empty_like(order).scatter_(1, order, last_sorted)
    return first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous()


class _PerDocIdsCache:
    """Remembers what was derived from one doc_ids tensor (bounds, a block mask).

    A model calls attention once per layer with the same doc_ids tensor: derive once per
    step, not once per layer. Entries are keyed by the tensor object itself (a weak
    reference, checked by identity) and its version counter, so neither a new tensor at a
    recycled address nor an in-place edit can hit a stale entry.
    """

    def __init__(self):
        self._ref = None
        self._version = None
        self._values = {}

    def get(self, doc_ids: torch.Tensor, what: str, make):
        if self._ref is None or self._ref() is not doc_ids or self._version != doc_ids._version:
            self._ref, self._version, self._values = weakref.ref(doc_ids), doc_ids._version, {}
        if what not in self._values:
            self._values[what] = make()
        return self._values[what]


_doc_cache = _PerDocIdsCache()


# ----------------------------------------------------------------------------- kernels


# GPU configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) for head dims up to 128, chosen so that
# most compile for sm_90 without register spills (checked with tests/kernels/compile_for_sm90.py).
_FWD_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)]
_BWD_DKDV_CONFIGS = [(32, 64, 8, 2), (64, 64, 8, 3), (32, 128, 8, 2), (32, 32, 4, 2)]
_BWD_DQ_CONFIGS = [(128, 64, 8, 2), (64, 64, 8, 2), (32, 64, 4, 2)]
# (BLOCK_M, BLOCK_N) under the interpreter (CPU tests), where the cost is per operation, not
# per element: big tiles are fastest. Tests of the block-skipping logic set smaller ones.
INTERPRETER_BLOCKS = {"fwd": (128, 128), "dkdv": (128, 128), "dq": (128, 128)}


def _configs(gpu: list):
    if triton is None:
        return []
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in gpu]


def _launch(kernel, grid, which: str, *args, **kwargs):
    """Autotuned launch on a GPU; under the interpreter one launch with INTERPRETER_BLOCKS[which]."""
    if interpreting():
        bm, bn = INTERPRETER_BLOCKS[which]
        meta = {"BLOCK_M": bm, "BLOCK_N": bn}
        kernel.fn[grid(meta)](*args, **kwargs, **meta, num_warps=4)
    else:
        kernel[grid](*args, **kwargs)


if triton is not None:

    @triton.autotune(configs=_configs(_FWD_CONFIGS), key=["seq_bucket", "BLOCK_D", "HAS_DOCS"])
    @triton.jit
    def _attn_fwd_kernel(
        # pointers
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, doc_ptr, first_ptr,
        # strides (B, T, H; the head dim is contiguous)
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_ob, stride_ot, stride_oh,
        # sizes and numerics (seq_bucket: next power of two of seq_len, the autotuning key)
        seq_len, seq_bucket, n_q_heads, group, head_dim, qk_scale,
        HAS_DOCS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_q_heads).to(tl.int64)
        h = pid_bh % n_q_heads
        hk = (h // group).to(tl.int64)
        h = h.to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seq_len
        d_valid = offs_d < head_dim

        q_base = q_ptr + b * stride_qb + h * stride_qh
        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=m_valid[:, None] & d_valid[None, :], other=0.0)

        lo = 0
        if HAS_DOCS:
            doc_q = tl.load(doc_ptr + b * seq_len + offs_m, mask=m_valid, other=-1)
            first = tl.load(first_ptr + b * seq_len + offs_m, mask=m_valid, other=seq_len)
            lo = (tl.min(first, axis=0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum((pid_m + 1) * BLOCK_M, seq_len)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < seq_len
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None],
                         mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # (D, N)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            mask = (offs_m[:, None] >= cols[None, :]) & n_valid[None, :]
            if HAS_DOCS:
                doc_k = tl.load(doc_ptr + b * seq_len + cols, mask=n_valid, other=-1)
                mask = mask & (doc_q[:, None] == doc_k[None, :])
            s = tl.where(mask, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :],
                        mask=n_valid[:, None] & d_valid[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_base = o_ptr + b * stride_ob + h * stride_oh
        tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_valid[:, None] & d_valid[None, :])
        # log-sum-exp in log2 units of the scaled scores, for the backward
        tl.store(lse_ptr + pid_bh.to(tl.int64) * seq_len + offs_m, m_i + tl.log2(l_safe), mask=m_valid)

    @triton.jit
    def _attn_bwd_delta_kernel(
        o_ptr, do_ptr, delta_ptr,
        stride_ob, stride_ot, stride_oh,
        stride_dob, stride_dot, stride_doh,
        seq_len, n_q_heads, head_dim,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """delta = rowsum(dO * O) per query, (B, Hq, T) fp32."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_q_heads).to(tl.int64)
        h = (pid_bh % n_q_heads).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < head_dim)
        o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        tl.store(delta_ptr + pid_bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, axis=1), mask=offs_m < seq_len)

    @triton.autotune(configs=_configs(_BWD_DKDV_CONFIGS), key=["seq_bucket", "BLOCK_D", "HAS_DOCS"])
    @triton.jit
    def _attn_bwd_dkdv_kernel(
        # pointers
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr, last_ptr, dk_ptr, dv_ptr,
        # strides (B, T, H; the head dim is contiguous); dO shares q's layout, dK/dV k's
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_dob, stride_dot, stride_doh,
        stride_dkb, stride_dkt, stride_dkh,
        # sizes and numerics (seq_bucket: next power of two of seq_len, the autotuning key)
        seq_len, seq_bucket, n_q_heads, n_k_heads, group, head_dim, qk_scale, sm_scale,
        HAS_DOCS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_k_heads).to(tl.int64)
        hk = pid_bh % n_k_heads

        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        n_valid = offs_n < seq_len
        d_valid = offs_d < head_dim
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_ptr + b * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kt
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vt
                    + offs_d[None, :], mask=kv_mask, other=0.0)

        hi = seq_len
        if HAS_DOCS:
            doc_k = tl.load(doc_ptr + b * seq_len + offs_n, mask=n_valid, other=-1)
            last = tl.load(last_ptr + b * seq_len + offs_n, mask=n_valid, other=-1)
            hi = tl.minimum(tl.max(last, axis=0) + 1, seq_len)
        lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M

        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for g in range(0, group):
            h = (hk * group + g).to(tl.int64)
            q_base = q_ptr + b * stride_qb + h * stride_qh
            do_base = do_ptr + b * stride_dob + h * stride_doh
            row_base = (b * n_q_heads + h) * seq_len
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                m_valid = offs_m < seq_len
                qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],
                             mask=m_valid[None, :] & d_valid[:, None], other=0.0)  # (D, M)
                lse = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0)
                st = tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale  # (N, M)
                mask = (offs_m[None, :] >= offs_n[:, None]) & m_valid[None, :] & n_valid[:, None]
                if HAS_DOCS:
                    doc_q = tl.load(doc_ptr + b * seq_len + offs_m, mask=m_valid, other=-1)
                    mask = mask & (doc_k[:, None] == doc_q[None, :])
                pt = tl.where(mask, tl.exp2(st - lse[None, :]), 0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :],
                             mask=m_valid[:, None] & d_valid[None, :], other=0.0)  # (M, D)
                dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PRECISION)
                delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)
                dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (N, M)
                dst = pt * (dpt - delta[None, :])
                dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PRECISION)

        dk_base = dk_ptr + b * stride_dkb + hk.to(tl.int64) * stride_dkh
        dv_base = dv_ptr + b * stride_dkb + hk.to(tl.int64) * stride_dkh
        out_offs = offs_n[:, None] * stride_dkt + offs_d[None, :]
        tl.store(dk_base + out_offs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_base + out_offs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)

    @triton.autotune(configs=_configs(_BWD_DQ_CONFIGS), key=["seq_bucket", "BLOCK_D", "HAS_DOCS"])
    @triton.jit
    def _attn_bwd_dq_kernel(
        # pointers
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, doc_ptr, first_ptr, dq_ptr,
        # strides (B, T, H; the head dim is contiguous); dQ shares dO's layout
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_dob, stride_dot, stride_doh,
        stride_dqb, stride_dqt, stride_dqh,
        # sizes and numerics (seq_bucket: next power of two of seq_len, the autotuning key)
        seq_len, seq_bucket, n_q_heads, group, head_dim, qk_scale, sm_scale,
        HAS_DOCS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // n_q_heads).to(tl.int64)
        h = pid_bh % n_q_heads
        hk = (h // group).to(tl.int64)
        h = h.to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < seq_len
        d_valid = offs_d < head_dim
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=q_mask, other=0.0)
        row_base = pid_bh.to(tl.int64) * seq_len
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_valid, other=0.0)

        lo = 0
        if HAS_DOCS:
            doc_q = tl.load(doc_ptr + b * seq_len + offs_m, mask=m_valid, other=-1)
            first = tl.load(first_ptr + b * seq_len + offs_m, mask=m_valid, other=seq_len)
            lo = (tl.min(first, axis=0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum((pid_m + 1) * BLOCK_M, seq_len)

        k_base = k_ptr + b * stride_kb + hk * stride_kh
        v_base = v_ptr + b * stride_vb + hk * stride_vh
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            n_valid = cols < seq_len
            kv_mask = n_valid[None, :] & d_valid[:, None]
            kt = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=kv_mask, other=0.0)  # (D, N)
            vt = tl.load(v_base + cols[None, :] * stride_vt + offs_d[:, None], mask=kv_mask, other=0.0)  # (D, N)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            mask = (offs_m[:, None] >= cols[None, :]) & n_valid[None, :] & m_valid[:, None]
            if HAS_DOCS:
                doc_k = tl.load(doc_ptr + b * seq_len + cols, mask=n_valid, other=-1)
                mask = mask & (doc_q[:, None] == doc_k[None, :])
            p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PRECISION)

        tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                 (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- launchers


def _head_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as tf32 on tensor cores by default; keep them exact
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, next_power_of_2(head_dim))


def _flash_forward(q, k, v, doc_ids, first, scale):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    o = torch.empty((B, T, Hq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    has_docs = doc_ids is not None
    docs = doc_ids if has_docs else lse  # any pointer; unused when HAS_DOCS is off
    firsts = first if has_docs else lse

    def grid(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * Hq)

    _launch(_attn_fwd_kernel, grid, "fwd",
        q, k, v, o, lse, docs, firsts,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        T, next_power_of_2(T), Hq, Hq // Hk, D, scale * _LOG2E,
        HAS_DOCS=has_docs, DOT_PRECISION=_dot_precision(q.dtype), BLOCK_D=_block_d(D),
    )
    return o, lse


def _flash_backward(do, q, k, v, o, lse, doc_ids, first, last, scale):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    do = _head_dim_contiguous(do)
    block_d = _block_d(D)
    precision = _dot_precision(q.dtype)
    has_docs = doc_ids is not None
    docs = doc_ids if has_docs else lse
    firsts = first if has_docs else lse
    lasts = last if has_docs else lse

    delta = torch.empty_like(lse)
    delta_block = 64
    _attn_bwd_delta_kernel[(cdiv(T, delta_block), B * Hq)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        T, Hq, D, BLOCK_M=delta_block, BLOCK_D=block_d,
    )

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty((B, T, Hk, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, T, Hk, D), device=v.device, dtype=v.dtype)

    def grid_kv(meta):
        return (cdiv(T, meta["BLOCK_N"]), B * Hk)

    _launch(_attn_bwd_dkdv_kernel, grid_kv, "dkdv",
        q, k, v, do, lse, delta, docs, lasts, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        T, next_power_of_2(T), Hq, Hk, Hq // Hk, D, scale * _LOG2E, scale,
        HAS_DOCS=has_docs, DOT_PRECISION=precision, BLOCK_D=block_d,
    )

    def grid_q(meta):
        return (cdiv(T, meta["BLOCK_M"]), B * Hq)

    _launch(_attn_bwd_dq_kernel, grid_q, "dq",
        q, k, v, do, lse, delta, docs, firsts, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        T, next_power_of_2(T), Hq, Hq // Hk, D, scale * _LOG2E, scale,
        HAS_DOCS=has_docs, DOT_PRECISION=precision, BLOCK_D=block_d,
    )
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_ids, scale):
        q, k, v = _head_dim_contiguous(q), _head_dim_contiguous(k), _head_dim_contiguous(v)
        first = last = None
        if doc_ids is not None:
            doc_ids, first, last = _doc_cache.get(doc_ids, "bounds", lambda: (
                doc_ids.to(torch.int32).contiguous(), *document_bounds(doc_ids)))
        o, lse = _flash_forward(q, k, v, doc_ids, first, scale)
        ctx.save_for_backward(q, k, v, o, lse, doc_ids, first, last)
        ctx.scale = scale
        return o

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, do):
        q, k, v, o, lse, doc_ids, first, last = ctx.saved_tensors
        dq, dk, dv = _flash_backward(do, q, k, v, o, lse, doc_ids, first, last, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, doc_ids=None, scale=None):
    """This file's Triton flash-attention (causal, document-masked when doc_ids is given), always."""
    _check(q, k, v, doc_ids)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, doc_ids, scale)


# ----------------------------------------------------------------------------- FlexAttention peer

_flex_compiled = None


def flex_document_block_mask(doc_ids: torch.Tensor, compiled: bool):
    """FlexAttention BlockMask for causal attention within documents of doc_ids (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device, _compile=compiled)


def flex_attention_packed(q, k, v, doc_ids=None, scale=None, compiled: bool | None = None):
    """FlexAttention with a causal (and document) block mask; compiled on CUDA.

    The block mask is built once per doc_ids tensor and reused by later calls with the same
    tensor (every layer of a step). FlexAttention has no backward on CPU: there it serves
    forward-only checks.
    """
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    _check(q, k, v, doc_ids)
    B, T, Hq, _ = q.shape
    if compiled is None:
        compiled = q.is_cuda
    if doc_ids is not None:
        block_mask = _doc_cache.get(doc_ids, f"flex_block_mask_{compiled}",
                                    lambda: flex_document_block_mask(doc_ids, compiled))
    else:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T,
                                       device=q.device, _compile=compiled)
    fn = flex_attention
    if compiled:
        if _flex_compiled is None:
            _flex_compiled = torch.compile(flex_attention, dynamic=False)
        fn = _flex_compiled
    out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
             enable_gqa=Hq != k.shape[2])
    return out.transpose(1, 2)


def sdpa_causal(q, k, v, scale=None):
    """SDPA ``is_causal`` on (B, H, T, D) views (flash / cuDNN on CUDA); GQA without repeating heads."""
    _check(q, k, v, None)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------- public op


def attention(q, k, v, doc_ids=None, scale=None):
    """Causal self-attention, within documents when ``doc_ids`` (B, T) is given; (B, T, Hq, D) out.

    ``scale`` defaults to 1/sqrt(D). Torch backend: the SDPA-with-mask reference. Triton
    backend: on CUDA, SDPA ``is_causal`` without doc_ids and the packed backend
    (``packed_backend()``) with them; under the interpreter, the Triton kernel for both.
    """
    _check(q, k, v, doc_ids)
    if not use_triton(q, k, v):
        return attention_reference(q, k, v, doc_ids, scale)
    if q.is_cuda and doc_ids is None:
        return sdpa_causal(q, k, v, scale)
    if q.is_cuda and packed_backend() == "flex":
        return flex_attention_packed(q, k, v, doc_ids, scale)
    return flash_attention(q, k, v, doc_ids, scale)
