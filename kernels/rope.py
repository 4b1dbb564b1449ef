"""Rotary position embedding applied to q and k in one kernel pass.

Hugging Face Llama's non-interleaved convention: with x1 = x[..., :D/2], x2 = x[..., D/2:]
and the half tables cos, sin (B, T, D/2) in fp32,

    out[..., :D/2] = x1 * cos - x2 * sin
    out[..., D/2:] = x2 * cos + x1 * sin

(HF writes this as ``x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)``). The rotation is
orthogonal, so the backward is the same kernel with the angle negated (``INVERSE``).

Layouts: q (B, T, Hq, D), k (B, T, Hk, D), each the output of a linear layer viewed per head
(the last dim contiguous; other strides free, so slices of a fused qkv output work). The
launch sees q and k as (B*T*H, D) rows: the first programs take blocks of q's rows, the
rest blocks of k's, and each row fetches its token's cos/sin (shared by the heads of a
token, so those reads mostly hit the cache).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .dispatch import use_triton
from .launch import cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# ----------------------------------------------------------------------------- tables


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``1 / theta ** (arange(0, D, 2) / D)`` in fp32, computed on the CPU as transformers does (it
    builds the table at init, before moving the model) and then moved to ``device``."""
    if head_dim % 2:
        raise ValueError(f"rope_inv_freq: head_dim must be even, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return inv_freq if device is None else inv_freq.to(device)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, device=None,
                 inv_freq: torch.Tensor | None = None):
    """Half cos/sin tables (B, T, head_dim // 2) in fp32 for the given positions.

    Same arithmetic as transformers' default rope: ``freqs = position * inv_freq`` in fp32 on the
    target device, with ``inv_freq`` from ``rope_inv_freq``. HF's full-width cos is ``cat(cos, cos)``.
    Passing ``inv_freq`` already on the device (a CUDA-graph decode step does) makes the call free
    of host-to-device copies.
    """
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be even, got {head_dim}")
    if position_ids.dim() != 2:
        raise ValueError(f"rope_cos_sin: position_ids must be (B, T), got shape {tuple(position_ids.shape)}")
    device = position_ids.device if device is None else torch.device(device)
    if inv_freq is None:
        inv_freq = rope_inv_freq(head_dim, theta)
    elif inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"rope_cos_sin: inv_freq has shape {tuple(inv_freq.shape)}, expected ({head_dim // 2},)")
    freqs = position_ids.to(device)[..., None].float() * inv_freq.to(device=device, dtype=torch.float)
    return freqs.cos(), freqs.sin()


# ----------------------------------------------------------------------------- reference


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """HF's ``apply_rotary_pos_emb`` on (B, T, H, D) tensors (``unsqueeze_dim=2``).

    As in HF, the full tables are cast to the activation dtype before the multiplies.
    """
    cos_full = torch.cat((cos, cos), dim=-1).to(q.dtype).unsqueeze(2)  # (B, T, 1, D)
    sin_full = torch.cat((sin, sin), dim=-1).to(q.dtype).unsqueeze(2)
    q_out = (q * cos_full) + (_rotate_half(q) * sin_full)
    k_out = (k * cos_full) + (_rotate_half(k) * sin_full)
    return q_out, k_out


# ----------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def _rotate_rows(
        x_ptr, out_ptr, cos_ptr, sin_ptr,
        row_start, n_rows, seq_len, n_heads, half,
        stride_xb, stride_xt, stride_xh,
        stride_ob, stride_ot, stride_oh,
        stride_cb, stride_ct,
        INVERSE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        """Rotate BLOCK_R (token, head) rows of one tensor; row r is head r % H of token r // H."""
        rows = row_start + tl.arange(0, BLOCK_R)  # B*T*H < 2^31: int32 for the index arithmetic
        cols = tl.arange(0, BLOCK_HALF)
        h = (rows % n_heads).to(tl.int64)
        token = rows // n_heads
        t = (token % seq_len).to(tl.int64)
        b = (token // seq_len).to(tl.int64)
        mask = (rows < n_rows)[:, None] & (cols < half)[None, :]
        x_offs = (b * stride_xb + t * stride_xt + h * stride_xh)[:, None] + cols[None, :]
        o_offs = (b * stride_ob + t * stride_ot + h * stride_oh)[:, None] + cols[None, :]
        c_offs = (b * stride_cb + t * stride_ct)[:, None] + cols[None, :]
        cos = tl.load(cos_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offs + half, mask=mask, other=0.0).to(tl.float32)
        if INVERSE:
            y1 = x1 * cos + x2 * sin
            y2 = x2 * cos - x1 * sin
        else:
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
        tl.store(out_ptr + o_offs, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + o_offs + half, y2.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        # pointers
        q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        # strides of q, k (B, T, H; the last dim is contiguous)
        stride_qb, stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        # strides of the outputs
        stride_qob, stride_qot, stride_qoh,
        stride_kob, stride_kot, stride_koh,
        # strides of cos/sin (B, T; the last dim is contiguous)
        stride_cb, stride_ct,
        # sizes
        seq_len, n_q_rows, n_k_rows, n_q_heads, n_k_heads, half, n_q_programs,
        INVERSE: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        """The first n_q_programs programs rotate rows of q, the rest rows of k: one launch for both."""
        pid = tl.program_id(0)
        if pid < n_q_programs:
            _rotate_rows(q_ptr, q_out_ptr, cos_ptr, sin_ptr,
                         pid * BLOCK_R, n_q_rows, seq_len, n_q_heads, half,
                         stride_qb, stride_qt, stride_qh, stride_qob, stride_qot, stride_qoh,
                         stride_cb, stride_ct, INVERSE, BLOCK_R, BLOCK_HALF)
        else:
            _rotate_rows(k_ptr, k_out_ptr, cos_ptr, sin_ptr,
                         (pid - n_q_programs) * BLOCK_R, n_k_rows, seq_len, n_k_heads, half,
                         stride_kb, stride_kt, stride_kh, stride_kob, stride_kot, stride_koh,
                         stride_cb, stride_ct, INVERSE, BLOCK_R, BLOCK_HALF)


# ----------------------------------------------------------------------------- launcher


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, T, H, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} in B, T or D")
    if D % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {D}")
    if k.dtype != q.dtype:
        raise ValueError(f"apply_rope: q is {q.dtype} but k is {k.dtype}")
    want = (B, T, D // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(
            f"apply_rope: cos/sin must be the half tables {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )


def _rope_launch(q, k, cos, sin, inverse: bool):
    B, T, Hq, D = q.shape
    Hk = k.shape[2]
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((B, T, Hq, D), device=q.device, dtype=q.dtype)
    k_out = torch.empty((B, T, Hk, D), device=k.device, dtype=k.dtype)
    half = D // 2
    block_half = next_power_of_2(half)
    n_q_rows, n_k_rows = B * T * Hq, B * T * Hk
    # 2K elements of each half per program over 8 warps: 80 registers on sm_90, no spills
    # (4K over 4 warps spilled: every load and store here has a 2-D tensor of 64-bit pointers)
    block_r = min(max(1, 2048 // block_half), next_power_of_2(max(n_q_rows, 1)))
    n_q_programs = cdiv(n_q_rows, block_r)
    n_programs = n_q_programs + cdiv(n_k_rows, block_r)
    if n_programs > 0:
        _rope_kernel[(n_programs,)](
            q, k, cos, sin, q_out, k_out,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            q_out.stride(0), q_out.stride(1), q_out.stride(2),
            k_out.stride(0), k_out.stride(1), k_out.stride(2),
            cos.stride(0), cos.stride(1),
            T, n_q_rows, n_k_rows, Hq, Hk, half, n_q_programs,
            INVERSE=inverse, BLOCK_R=block_r, BLOCK_HALF=block_half, num_warps=8,
        )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, inverse=False)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_launch(dq_out, dk_out, cos, sin, inverse=True)
        return dq, dk, None, None


# ----------------------------------------------------------------------------- public op


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q (B, T, Hq, D) and k (B, T, Hk, D) by the half tables cos/sin (B, T, D/2).

    Returns new (B, T, H, D) tensors. Gradients flow to q and k (the tables are constants).
    """
    _check(q, k, cos, sin)
    if use_triton(q, k, cos, sin):
        return RoPEFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)
