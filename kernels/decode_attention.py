"""Attention of one new token per row over a KV cache: the decode step's attention.

q (B, 1, Hq, D), k and v (B, S, Hk, D) (any strides: the cache's views), an optional key mask
(B, 1, 1, S) bool (True: the key is visible), Hq % Hk == 0 (query head h reads key/value head
h // (Hq // Hk)). Output (B, 1, Hq, D) in q's dtype::

    o = softmax(scale * q k^T, masked) v

One program per (row, query head) walks the keys in blocks with an online softmax in fp32: K and
V are read once, in their own dtype, and nothing of size S is written. Why not SDPA: with
OpenLLaMA 3B's head_dim of 100 (not a multiple of 8) SDPA has no fused kernel for bf16 and runs
its math path, which casts the cached K and V to fp32 and launches a handful of kernels per layer
(bench/generate.py --breakdown shows them). No matrix units: a decode query is a single row, so
the products are elementwise multiplies and row sums, which also keeps the kernel exact to
compile on every Triton version. There is no backward (decoding needs none). When rows x heads
give fewer programs than about two per SM (batch 1: 32 programs), the keys are split into ranges
of at least 256, each its own program, and a second kernel joins the partial softmaxes
(flash-decoding), so a long context does not leave most SMs idle.

``decode_attention`` takes the Triton kernel on CUDA (or when the backend is forced to
"triton"), the SDPA reference otherwise. The model uses it unless ``BEZOAR_DECODE_ATTENTION`` is
``sdpa`` (see ``enabled``). Timed on an H100 (2026-11-27, ``bench/generate.py --breakdown 32``, random
3B NF4 weights, batch 1, an 8-token prompt; bench/results/generate-breakdown-NVIDIA_H100_80GB_HBM3-*):
SDPA's math path spent about 0.9 ms of a 4.16 ms decode step (GPU time) in casts and copies, two cuBLAS
gemv kernels, a softmax and reductions; this kernel took 0.27 ms, so about 0.6 ms (15%) of the step
went. (That run's two modes also differed in the prefill's NF4 path, which is the rest of the step's
4.16 -> 3.26 ms; the breakdown's modes now differ in the attention only.)
"""

from __future__ import annotations

import math
import os

import torch

from bezoar_kernels import dispatch
from bezoar_kernels.attention import sdpa_heads
from bezoar_kernels.launch import cdiv, next_power_of_2, sm_count

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

CHOICES = ("sdpa", "triton")
KEYS_PER_SPLIT = 256  # the fewest keys one program of a split launch takes
DEFAULT = "triton"  # about 15% off a 3B decode step at batch 1 on an H100 (the module's docstring)


def choice() -> str:
    """``BEZOAR_DECODE_ATTENTION`` (sdpa | triton), default ``DEFAULT``."""
    raw = os.environ.get("BEZOAR_DECODE_ATTENTION", "").strip().lower() or DEFAULT
    if raw not in CHOICES:
        raise ValueError(f"BEZOAR_DECODE_ATTENTION={raw!r}: expected one of {', '.join(CHOICES)}")
    return raw


def enabled(q: torch.Tensor) -> bool:
    """Whether the model's one-token attention should call ``decode_attention``: it has no backward, so
    never when q needs a gradient."""
    return (q.shape[1] == 1 and not (torch.is_grad_enabled() and q.requires_grad) and choice() == "triton"
            and dispatch.use_triton(q))


def _check(q, k, v, mask):
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "(B, 1, Hq, D) and two equal (B, S, Hk, D)")
    b, t, hq, d = q.shape
    if t != 1 or k.shape[0] != b or k.shape[3] != d or hq % k.shape[2] != 0:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} needs one token per row, k/v {tuple(k.shape)} the "
                         "same batch and head dim and a number of heads that divides q's")
    if k.shape[1] == 0:
        raise ValueError("decode_attention: k and v hold no keys (S = 0); a decode step attends to at least one")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, 1, 1, k.shape[1])):
        raise ValueError(f"decode_attention: mask must be bool ({b}, 1, 1, {k.shape[1]}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def decode_attention_reference(q, k, v, mask=None, scale=None):
    """SDPA with the mask (and GQA by repeating the key/value heads): the oracle."""
    _check(q, k, v, mask)
    return sdpa_heads(q, k, v, mask, scale)


if triton is not None:

    @triton.jit
    def _decode_attn_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr,
        part_ptr, stats_ptr,
        S, HQ, N_REP, scale, keys_per_split,
        stride_qb, stride_kb, stride_ks, stride_vb, stride_vs, stride_mb, stride_ob,
        HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
        """o[b, 0, h, :] for one (b, h): an online softmax over key blocks of BLOCK_S, fp32 throughout.

        SPLIT: program (b * HQ + h, i) covers keys [i * keys_per_split, (i + 1) * keys_per_split) and
        writes its unnormalized sum to part[pid, i, :] and (max, sum of exponents) to stats[pid, i, :];
        ``_decode_attn_combine_kernel`` joins the splits. Heads are HEAD_DIM values apart in q, k, v and o
        (a constant, so the compiler sees how the rows align: 8-byte loads for D = 100)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // HQ
        h = pid % HQ
        kvh = h // N_REP
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h * HEAD_DIM + offs_d, mask=d_ok, other=0.0).to(tl.float32)
        k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * HEAD_DIM
        v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * HEAD_DIM
        m_i = tl.full((1,), -float("inf"), tl.float32)
        l_i = tl.zeros((1,), tl.float32)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        s_begin = split * keys_per_split
        s_end = tl.minimum(s_begin + keys_per_split, S)
        for s0 in range(s_begin, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            visible = offs_s < s_end
            if HAS_MASK:
                visible = visible & (tl.load(mask_ptr + b.to(tl.int64) * stride_mb + offs_s, mask=offs_s < S,
                                             other=0) != 0)
            tile = visible[:, None] & d_ok[None, :]
            kk = tl.load(k_base + offs_s.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=tile,
                         other=0.0).to(tl.float32)
            scores = tl.where(visible, tl.sum(kk * q[None, :], axis=1) * scale, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            # a block with no visible key leaves m at -inf: keep the exponents finite until one is seen
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.where(visible, tl.exp(scores - m_safe), 0.0)
            vv = tl.load(v_base + offs_s.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=tile,
                         other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * vv, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if SPLIT:
            n_splits = tl.num_programs(1)
            row = pid.to(tl.int64) * n_splits + split
            tl.store(part_ptr + row * BLOCK_D + offs_d, acc)
            two = tl.arange(0, 2)
            tl.store(stats_ptr + row * 2 + two, tl.where(two == 0, tl.sum(m_i, axis=0), tl.sum(l_i, axis=0)))
        else:
            # a row whose keys are all masked gets zeros (SDPA gives NaN there; decoding never has one)
            out = acc / tl.where(l_i > 0, l_i, 1.0)
            tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty),
                     mask=d_ok)

    @triton.jit
    def _decode_attn_combine_kernel(
        part_ptr, stats_ptr, o_ptr, HQ, SPLITS, stride_ob,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS_POW2: tl.constexpr,
    ):
        """o[b, 0, h, :] = sum_i exp(m_i - M) part_i / sum_i exp(m_i - M) l_i over the splits of (b, h)."""
        pid = tl.program_id(0)
        b = pid // HQ
        h = pid % HQ
        offs_i = tl.arange(0, SPLITS_POW2)
        i_ok = offs_i < SPLITS
        rows = pid.to(tl.int64) * SPLITS + offs_i
        m = tl.load(stats_ptr + rows * 2, mask=i_ok, other=-float("inf"))
        l_ = tl.load(stats_ptr + rows * 2 + 1, mask=i_ok, other=0.0)
        m_max = tl.max(m, axis=0)
        m_max = tl.where(m_max == -float("inf"), 0.0, m_max)
        w = tl.where(i_ok & (m > -float("inf")), tl.exp(m - m_max), 0.0)
        offs_d = tl.arange(0, BLOCK_D)
        parts = tl.load(part_ptr + rows[:, None] * BLOCK_D + offs_d[None, :], mask=i_ok[:, None], other=0.0)
        total = tl.sum(w * l_, axis=0)
        out = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0, total, 1.0)
        tl.store(o_ptr + b.to(tl.int64) * stride_ob + h * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


def _splits_for(batch_heads: int, keys: int, device: torch.device) -> int:
    """Splits of the keys: enough programs for about two per SM, at least KEYS_PER_SPLIT keys each."""
    if device.type != "cuda":
        return 1
    return max(1, min(cdiv(2 * sm_count(device), batch_heads), cdiv(keys, KEYS_PER_SPLIT)))


def decode_attention_triton(q, k, v, mask=None, scale=None, splits: int | None = None):
    """The Triton kernel (see the module docstring); inputs as ``decode_attention``. ``splits`` cuts the
    keys into that many ranges, each its own program, joined by a second kernel (default: by device,
    see ``_splits_for``)."""
    _check(q, k, v, mask)
    b, _, hq, d = q.shape
    s, hk = k.shape[1], k.shape[2]
    # each token's heads back to back (the linear outputs viewed per head, the cache's slots)
    q, k, v = (t if t.stride(3) == 1 and t.stride(2) == d else t.contiguous() for t in (q, k, v))
    out = torch.empty((b, 1, hq, d), dtype=q.dtype, device=q.device)
    if mask is not None and mask.stride(3) != 1:
        mask = mask.contiguous()
    block_d = max(16, next_power_of_2(d))
    block_s = 16 if dispatch.interpreting() else max(16, min(64, 8192 // block_d))
    splits = max(1, min(splits or _splits_for(b * hq, s, q.device), s))
    per_split = cdiv(s, splits)
    splits = cdiv(s, per_split)  # no empty range
    part = stats = out
    if splits > 1:
        part = torch.empty((b * hq, splits, block_d), dtype=torch.float32, device=q.device)
        stats = torch.empty((b * hq, splits, 2), dtype=torch.float32, device=q.device)
    _decode_attn_kernel[(b * hq, splits)](
        q, k, v, mask if mask is not None else q, out, part, stats,
        s, hq, hq // hk, float(scale if scale is not None else 1.0 / math.sqrt(d)), per_split,
        q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        mask.stride(0) if mask is not None else 0, out.stride(0),
        HEAD_DIM=d, HAS_MASK=mask is not None, BLOCK_S=block_s, BLOCK_D=block_d, SPLIT=splits > 1, num_warps=4,
    )
    if splits > 1:
        _decode_attn_combine_kernel[(b * hq,)](
            part, stats, out, hq, splits, out.stride(0),
            HEAD_DIM=d, BLOCK_D=block_d, SPLITS_POW2=max(2, next_power_of_2(splits)), num_warps=4,
        )
    return out


def decode_attention(q, k, v, mask=None, scale=None):
    """One query token per row over k/v, masked by ``mask`` (B, 1, 1, S) bool; Triton or SDPA by dispatch."""
    if dispatch.use_triton(q, k, v):
        return decode_attention_triton(q, k, v, mask, scale)
    return decode_attention_reference(q, k, v, mask, scale)


__all__ = ["CHOICES", "DEFAULT", "choice", "decode_attention", "decode_attention_reference",
           "decode_attention_triton", "enabled"]
