"""RMSNorm and the LoRA projections that read its output, as one computation (training with dropout).

In a Llama block the q/k/v projections (and gate/up) read the output h of an RMSNorm. With LoRA
dropout on, a LoRA linear on its own pays passes over activations that the mask forces: on the
``concat`` path (kernels/lora.py) a read of h for the masked down product and a copy of h into the
wide GEMM operand in the forward; a read of the base dh, a read of h and a write of dh (the masked
term and dA in one launch) in the backward; dy for dB. This module gives the norm those jobs:

Forward (``_norm_lora_fwd_kernel``, 16 rows at a time, two passes over them)::

    pass 1:  s = x + residual (stored; the next residual), sum of squares   as rms_norm_add
    pass 2:  h = w * cast(s * rsqrt(mean(s^2) + eps)) into [h | xa_0 | ...]   the concat operand
             xa_j = dropout_j(h) @ A_j.T from h in registers, the mask hashed once

then one cuBLAS GEMM of [h | xa] by [W_j | s_j B_j] gives every y_j with the LoRA term.

Backward::

    [dh_base | g] = sum_j dy_j @ [W_j | .. s_j B_j ..]          one cuBLAS GEMM (g comes out of it)
    dB_j = s_j dy_j.T @ xa_j                                     a pass over dy (kernels/lora.py)
    dA_j = g_j.T @ dropout_j(h)                                  a pass over h (kernels/lora.py)
    ds   = rmsnorm_backward(dh_base + sum_j (g_j @ A_j) * mask_j)    (``_norm_lora_bwd_kernel``: pass 1
           makes dh, stores it in ds's buffer and sums dh * w * shat per row; pass 2 reads dh back)

What this saves depends on L2. The norm cannot finish a row before it has seen all of it, and 16
rows (tl.dot's smallest tile) of K = 3200 do not fit in registers, so each program reads its rows
twice: s in the forward, s and the dh it stored in the backward. Those re-reads are the program's
own 100-200 KB from moments before; the kernels mark them evict_last and the streamed inputs
evict_first, and by default run as a persistent grid of one or two programs per SM (``_programs``)
so that what all programs will read again stays near half of an H100's L2; a device's tuning entry
(``norm_lora.grid``, which bench/tune.py picks from timings of both) or BEZOAR_NORM_LORA_PROGRAMS can
make it one program per row block.

Counted in passes over an (M, K) activation beyond RMSNorm + the NF4 projections: fused 1 (forward:
s again) + 3 (backward: dh stored and read, s again) + 1 (dA) + N/K (dB) when the re-reads miss L2,
1 + N/K when they hit; the separate ``concat`` calls 2 + 3 + N/K either way. So the fusion is worth
at most 4 passes, and nothing when L2 does not keep the rows: the bench (``bench/lora.py``'s
``norm_*`` cases, with the separate calls on ``concat`` beside it) decides.
Numerics are those of ``rms_norm_add`` followed by ``lora_qkv`` on the ``concat`` path, except that
the sum of squares is added up chunk by chunk (h may differ in the last place).

The norm weight is frozen here (QLoRA trains only the adapters; ``norm_lora_ok`` says when the
fused call applies, and the model falls back to the separate calls otherwise).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from bezoar_kernels import dispatch, tuning
from bezoar_kernels.launch import cdiv, sm_count, triton_version
from bezoar_kernels.lora import (
    MAX_KERNEL_RANK,
    Adapter,
    _check,
    _concat_backward,
    _concat_forward,
    _concat_lora_block,
    _concat_width,
    _dot_precision,
    _dropout_args,
    _lora_da,
    _lora_db,
    _lora_g,
    _Plan,
    _projections_reference,
    _r_pad,
    _wide_input,
    _wide_pad,
    _rows,
    _three,
    lora_in_dtype,
    seed31,
)
from bezoar_kernels.nf4 import NF4Weight
from bezoar_kernels.rmsnorm import rms_norm_add_reference, rms_norm_reference

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


# ----------------------------------------------------------------------------- reference


def rms_norm_lora_reference(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                            weights: Sequence, adapters: Sequence[Adapter], dropout_p: float, training: bool,
                            seeds: Sequence[int]):
    """``rms_norm_add`` (or ``rms_norm`` with x carried on, without a residual) then each projection with
    PEFT's arithmetic: returns ``(outputs, s)``."""
    if residual is not None:
        h, s = rms_norm_add_reference(x, residual, norm_weight, eps)
    else:
        h, s = rms_norm_reference(x, norm_weight, eps), x
    return _projections_reference(h, weights, adapters, dropout_p, training, seeds), s


# ----------------------------------------------------------------------------- kernels

if triton is not None:
    from bezoar_kernels.lora import _dropout_keep, _pick3, _wide_pad_zeros

    @triton.jit
    def _norm_lora_fwd_kernel(
        # pointers: x, residual (M, K), the norm weight (K), s (M, K; with a residual), rstd (M) fp32,
        # A stacked (P, R, K), xa (P, M, R), wide (M, K + P * WIDTH + PAD): [h | xa_0 | xa_1 | ... | zeros]
        x_ptr, res_ptr, nw_ptr, s_ptr, rstd_ptr, a_ptr, xa_ptr, wide_ptr,
        # sizes and scalars
        M, K, R, eps, seed0, seed1, seed2, threshold, keep_scale,
        # row strides (the last dims are contiguous)
        stride_x, stride_res, stride_s, stride_w,
        # meta
        P: tl.constexpr, HAS_RESIDUAL: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WIDTH: tl.constexpr, DOT_PRECISION: tl.constexpr,
        PAD: tl.constexpr,
    ):
        """BLOCK_M rows at a time: the sum of squares over K, then h chunk by chunk into ``wide`` and each
        projection's masked h @ A_j.T accumulated on tensor cores from the same registers; zeros in the
        PAD columns after the blocks (``lora.concat_align``)."""
        if PAD > 0:  # in a loop of its own: inside the main one its stores took 186 registers to 255
            for blk in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
                offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
                _wide_pad_zeros(wide_ptr + offs_m.to(tl.int64)[:, None] * stride_w, offs_m < M, K + P * WIDTH, PAD,
                                BLOCK_M)
        # persistent over row blocks: a grid of fewer programs than blocks keeps the rows each
        # program reads twice (100-200 KB) within L2 across all of them (``_programs``)
        for blk in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            rows = offs_m.to(tl.int64)[:, None]
            sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                ok = m_ok[:, None] & (offs_k < K)[None, :]
                if HAS_RESIDUAL:  # x and the residual are read once: they may leave L2 first
                    v = tl.load(x_ptr + rows * stride_x + offs_k[None, :], mask=ok, other=0.0,
                                eviction_policy="evict_first")
                    r = tl.load(res_ptr + rows * stride_res + offs_k[None, :], mask=ok, other=0.0,
                                eviction_policy="evict_first")
                    # rounded to the input dtype, exactly like ``x + residual`` in torch
                    v = (v.to(tl.float32) + r.to(tl.float32)).to(v.dtype)
                    # s is read again in the second pass: kept in L2 if it can be
                    tl.store(s_ptr + rows * stride_s + offs_k[None, :], v, mask=ok, eviction_policy="evict_last")
                else:  # x itself is read again in the second pass
                    v = tl.load(x_ptr + rows * stride_x + offs_k[None, :], mask=ok, other=0.0,
                                eviction_policy="evict_last")
                vf = v.to(tl.float32)
                sq += tl.sum(vf * vf, axis=1)
            rstd = tl.rsqrt(sq / K + eps)
            tl.store(rstd_ptr + offs_m, rstd, mask=m_ok)
            if HAS_RESIDUAL:
                # the second pass reads s back: this program's own stores, made visible to its other threads
                tl.debug_barrier()
                src_ptr = s_ptr
                stride_src = stride_s
            else:
                src_ptr = x_ptr
                stride_src = stride_x
            offs_r = tl.arange(0, R_PAD)
            r_ok = offs_r < R
            acc0 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                ok = m_ok[:, None] & k_ok[None, :]
                v = tl.load(src_ptr + rows * stride_src + offs_k[None, :], mask=ok, other=0.0,
                            eviction_policy="evict_first")
                # Hugging Face's order: normalize in fp32, round to the input dtype, then scale by the weight
                vhat = (v.to(tl.float32) * rstd[:, None]).to(v.dtype).to(tl.float32)
                w = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                h = (w[None, :] * vhat).to(wide_ptr.dtype.element_ty)
                tl.store(wide_ptr + rows * stride_w + offs_k[None, :], h, mask=ok)
                for j in tl.static_range(P):
                    hj = h
                    if DROPOUT:
                        hj = tl.where(_dropout_keep(offs_m, k0, _pick3(j, seed0, seed1, seed2), threshold, BLOCK_K),
                                      h, 0.0)
                    a = tl.load(a_ptr + (j * R + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                                mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    if j == 0:
                        acc0 = tl.dot(hj, tl.trans(a), acc0, input_precision=DOT_PRECISION)
                    elif j == 1:
                        acc1 = tl.dot(hj, tl.trans(a), acc1, input_precision=DOT_PRECISION)
                    else:
                        acc2 = tl.dot(hj, tl.trans(a), acc2, input_precision=DOT_PRECISION)
            for j in tl.static_range(P):
                if j == 0:
                    acc = acc0
                elif j == 1:
                    acc = acc1
                else:
                    acc = acc2
                if DROPOUT:
                    acc = acc * keep_scale
                out = acc.to(xa_ptr.dtype.element_ty)
                tl.store(xa_ptr + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :], out,
                         mask=m_ok[:, None] & r_ok[None, :])
                # acc is 0 past R (A's rows there load as 0): that fills the block's padding columns
                cols = K + j * WIDTH + offs_r
                tl.store(wide_ptr + rows * stride_w + cols[None, :], out, mask=m_ok[:, None] & (offs_r < WIDTH)[None, :])

    @triton.jit
    def _norm_lora_bwd_kernel(
        # pointers: dh_base (M, K) strided, g (P, M, R) strided, A stacked (P, R, K), s (M, K), the norm
        # weight (K), rstd (M), the incoming gradient of s (M, K), ds (M, K, also the scratch for dh)
        dhb_ptr, g_ptr, a_ptr, s_ptr, nw_ptr, rstd_ptr, ds_in_ptr, ds_ptr,
        # sizes and scalars
        M, K, R, seed0, seed1, seed2, threshold, keep_scale,
        # strides
        stride_dhb, stride_gp, stride_gm, stride_s, stride_ds_in, stride_ds,
        # meta
        P: tl.constexpr, HAS_DS_IN: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """BLOCK_M rows at a time. First pass: dh = dh_base + sum_j (g_j @ A_j) * mask_j, rounded to
        the dtype as the separate LoRA call stores it, kept in ``ds`` as scratch, and each row's
        sum(dh * w * shat). Second pass: ds = rstd * (dh * w - shat * mean(dh * w * shat)) (+ ds_in)."""
        # persistent over row blocks: a grid of fewer programs than blocks keeps the rows each
        # program reads twice (100-200 KB) within L2 across all of them (``_programs``)
        inv_keep_scale = 1.0 / keep_scale
        for blk in range(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.num_programs(0)):
            offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            rows = offs_m.to(tl.int64)[:, None]
            offs_r = tl.arange(0, R_PAD)
            r_ok = offs_r < R
            rstd = tl.load(rstd_ptr + offs_m, mask=m_ok, other=0.0)
            g_ok = m_ok[:, None] & r_ok[None, :]
            g0 = tl.load(g_ptr + rows * stride_gm + offs_r[None, :], mask=g_ok, other=0.0)
            g1 = g0
            g2 = g0
            if P > 1:
                g1 = tl.load(g_ptr + stride_gp + rows * stride_gm + offs_r[None, :], mask=g_ok, other=0.0)
            if P > 2:
                g2 = tl.load(g_ptr + 2 * stride_gp + rows * stride_gm + offs_r[None, :], mask=g_ok, other=0.0)
            dot_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                ok = m_ok[:, None] & k_ok[None, :]
                dh = tl.load(dhb_ptr + rows * stride_dhb + offs_k[None, :], mask=ok, other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                for j in tl.static_range(P):
                    a = tl.load(a_ptr + (j * R + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                                mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                    # dh (with the terms before j) is the product's accumulator, scaled by 1 / keep_scale and
                    # back where the mask keeps it: triton 3.6's sm_90 build at r_pad 16 then needs no stack
                    # (added after the product it spilled 24 bytes at P = 3, 16 at P = 1)
                    if DROPOUT:
                        keep = _dropout_keep(offs_m, k0, _pick3(j, seed0, seed1, seed2), threshold, BLOCK_K)
                        kept = tl.dot(_pick3(j, g0, g1, g2), a, dh * inv_keep_scale, input_precision=DOT_PRECISION)
                        dh = tl.where(keep, kept * keep_scale, dh)
                    else:
                        dh = tl.dot(_pick3(j, g0, g1, g2), a, dh, input_precision=DOT_PRECISION)
                dh = dh.to(ds_ptr.dtype.element_ty)
                # dh and s are read again in the second pass: kept in L2 if they can be
                tl.store(ds_ptr + rows * stride_ds + offs_k[None, :], dh, mask=ok, eviction_policy="evict_last")
                s = tl.load(s_ptr + rows * stride_s + offs_k[None, :], mask=ok, other=0.0,
                            eviction_policy="evict_last").to(tl.float32)
                w = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                dot_sum += tl.sum(dh.to(tl.float32) * w[None, :] * (s * rstd[:, None]), axis=1)
            mean = dot_sum / K
            # the second pass reads dh back: this program's own stores, made visible to its other threads
            tl.debug_barrier()
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                ok = m_ok[:, None] & k_ok[None, :]
                dh = tl.load(ds_ptr + rows * stride_ds + offs_k[None, :], mask=ok, other=0.0,
                             eviction_policy="evict_first").to(tl.float32)
                s = tl.load(s_ptr + rows * stride_s + offs_k[None, :], mask=ok, other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
                w = tl.load(nw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                ds = rstd[:, None] * (dh * w[None, :] - (s * rstd[:, None]) * mean[:, None])
                if HAS_DS_IN:
                    ds += tl.load(ds_in_ptr + rows * stride_ds_in + offs_k[None, :], mask=ok, other=0.0,
                                  eviction_policy="evict_first").to(tl.float32)
                tl.store(ds_ptr + rows * stride_ds + offs_k[None, :], ds.to(ds_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers

_BLOCK_M = 16  # rows per step: tl.dot's smallest M; at M = 16384 that is 1024 row blocks

# Programs per SM: each program reads its current row block twice, 100 KB of s (forward) or 200 KB of
# s and dh (backward) at K = 3200 in bf16. With one program per row block the GPU keeps 3-4 of them
# per SM (by registers), 40-110 MB of rows to be read again against an H100's 50 MB of L2; these
# counts keep it near 26 MB. An estimate to be checked by bench/lora.py's norm cases, not a timing:
# they time both grids at their largest case, and bench/tune.py writes the faster into the device's
# tuning entry (``norm_lora.grid``); BEZOAR_NORM_LORA_PROGRAMS (programs in all, 0: one per row block,
# or a grid name) overrides both.
_PROGRAMS_PER_SM = {"forward": 2, "backward": 1}


def _env_programs() -> int | str | None:
    """BEZOAR_NORM_LORA_PROGRAMS: None (unset), a grid name of ``tuning.NORM_GRIDS``, or a count of programs
    (0: one per row block, the same as ``per_block``)."""
    raw = os.environ.get("BEZOAR_NORM_LORA_PROGRAMS", "").strip().lower()
    if not raw:
        return None
    if raw in tuning.NORM_GRIDS:
        return raw
    try:
        wanted = int(raw)
    except ValueError:
        wanted = -1
    if wanted < 0:
        raise ValueError(f"BEZOAR_NORM_LORA_PROGRAMS={raw!r}: expected a number of programs (0: one per row "
                         f"block) or one of {', '.join(tuning.NORM_GRIDS)}")
    return wanted


def grid_in_effect(device: torch.device) -> str | None:
    """The grid the kernels run on for ``device``: the environment's, else the tuning entry's, else
    persistent; None where the environment gives a count of programs."""
    env = _env_programs()
    if env is None:
        return tuning.setting("norm_lora.grid", device) or "persistent"
    if isinstance(env, str):
        return env
    return "per_block" if env == 0 else None


def _programs(m: int, device: torch.device, kind: str) -> int:
    """The grid of the norm + LoRA kernels, which walk the row blocks persistently."""
    blocks = cdiv(m, _BLOCK_M)
    env = _env_programs()
    if isinstance(env, int):
        wanted = env
    elif (env or tuning.setting("norm_lora.grid", device)) == "per_block":
        wanted = 0
    elif device.type == "cuda":
        wanted = _PROGRAMS_PER_SM[kind] * sm_count(device)
    else:
        wanted = 2  # the interpreter: few programs, each walking several row blocks
    return max(1, min(blocks, wanted)) if wanted else blocks


def _block_k(r_pad: int) -> int:
    """Columns per step: the (BLOCK_M, r_pad) fp32 accumulators (three of them) and the A tiles stay small.

    Forward and backward alike: since the backward adds each masked product with dh as its
    accumulator, triton 3.6's sm_90 build of the 128-column step
    at r_pad 32 has no stack for P = 1-3 (168 registers at P = 3), where the 64-column step spills 8-24
    bytes at P = 2 and 3 and issues 7% more instructions per column; before, the 128-column step was the
    one that spilled (a 104-byte stack), and 3.6 took 64 (docs/notes.md). bench/sass.py norm_lora_bwd."""
    return 128 if r_pad <= 32 else 64 if r_pad <= 64 else 32


def _forward_block_k(r_pad: int, p: int) -> int:
    """The forward's columns per step: ``_block_k``, but for three projections at r_pad 32 under triton < 3.9,
    whose sm_90 build of the 128-column step spills (255 registers, a 40-byte stack) where the 64-column one
    takes 116 registers and no stack; 3.9 builds the 128-column step without a stack
    (``bench/sass.py norm_lora_fwd --meta P=3 --meta R_PAD=32 --meta BLOCK_K=128``)."""
    if r_pad == 32 and p >= 3 and triton_version() < (3, 9):
        return 64
    return _block_k(r_pad)


def _norm_lora_forward(x2d, res2d, norm_weight, eps, a, plan: _Plan):
    """(s, rstd, xa, wide): the norm and the masked down products in one pass (``_norm_lora_fwd_kernel``)."""
    m, k = x2d.shape
    p, r, _ = a.shape
    dtype = x2d.dtype
    width = _concat_width(r)
    wide = _wide_input(m, k, p, r, dtype, x2d.device)
    xa = torch.empty((p, m, r), dtype=dtype, device=x2d.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x2d.device)
    s = torch.empty_like(x2d) if res2d is not None else x2d
    r_pad = _r_pad(r)
    threshold, keep_scale = _dropout_args(plan)
    _norm_lora_fwd_kernel[(_programs(m, x2d.device, "forward"),)](
        x2d, res2d if res2d is not None else x2d, norm_weight, s, rstd, a, xa, wide,
        m, k, r, eps, *_three(plan.seeds, 0), threshold, keep_scale,
        x2d.stride(0), res2d.stride(0) if res2d is not None else 0, s.stride(0), wide.stride(0),
        P=p, HAS_RESIDUAL=res2d is not None, DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=_BLOCK_M,
        BLOCK_K=_forward_block_k(r_pad, p), WIDTH=width, DOT_PRECISION=_dot_precision(dtype),
        **_wide_pad(wide, k, p, r),
        num_warps=4,
    )
    return s, rstd, xa, wide


def _norm_lora_backward(dh_base, g, a, s, norm_weight, rstd, ds_in, plan: _Plan) -> torch.Tensor:
    """ds (M, K): the norm's input gradient with the masked LoRA term of dh added on the way in."""
    m, k = s.shape
    p, r, _ = a.shape
    ds = torch.empty((m, k), dtype=s.dtype, device=s.device)
    r_pad = _r_pad(r)
    threshold, keep_scale = _dropout_args(plan)
    _norm_lora_bwd_kernel[(_programs(m, s.device, "backward"),)](
        dh_base, g, a, s, norm_weight, rstd, ds_in if ds_in is not None else s, ds,
        m, k, r, *_three(plan.seeds, 0), threshold, keep_scale,
        dh_base.stride(0), g.stride(0), g.stride(1), s.stride(0), ds_in.stride(0) if ds_in is not None else 0,
        ds.stride(0),
        P=p, HAS_DS_IN=ds_in is not None, DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=_BLOCK_M,
        BLOCK_K=_block_k(r_pad), DOT_PRECISION=_dot_precision(s.dtype), num_warps=4,
    )
    return ds


class NormLoRAFunction(torch.autograd.Function):
    """``forward(ctx, x, residual, norm_weight, eps, plan, *lora)`` -> ``(y_0, .., y_{P-1}, s)``.

    ``residual`` None: s is x itself (the first layer, or a residual sum taken in front), returned as a
    view so the residual stream's gradient joins the norm's in the backward kernel, as in
    ``rms_norm_keep``. ``lora = (A_0, B_0, ...)``; the frozen base weights ride in ``plan`` (path
    ``concat``). Saved: s, rstd, the wide operand [h | xa] (h for dA), xa, A, B and the LoRA block."""

    @staticmethod
    def forward(ctx, x, residual, norm_weight, eps, plan: _Plan, *lora):
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None, not zeros
        k = x.shape[-1]
        lead = x.shape[:-1]
        x2d = _rows(x, k)
        res2d = _rows(residual, k) if residual is not None else None
        dtype = x.dtype
        a, b = lora_in_dtype(lora, dtype)  # (P, R, K), (Ncat, R)
        nw = norm_weight.detach().contiguous()
        s, rstd, xa, wide = _norm_lora_forward(x2d, res2d, nw, float(eps), a, plan)
        block = _concat_lora_block(plan, b, wide.shape[1] - k)
        y = _concat_forward(wide, block, plan, k)
        ctx.plan, ctx.lead, ctx.k = plan, lead, k
        ctx.has_residual = residual is not None
        ctx.lora_dtypes = [t.dtype for t in lora]
        ctx.save_for_backward(s, rstd, nw, wide, xa, a, b, block)
        outputs, start = [], 0
        for n in plan.out_features:
            outputs.append(y[:, start: start + n].view(*lead, n))
            start += n
        s_out = s.view(x.shape) if residual is not None else x.view_as(x)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            ctx.mark_non_differentiable(s_out)  # as the separate calls' s: no gradient to carry
        return (*outputs, s_out)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, *grads):
        plan, k = ctx.plan, ctx.k
        s, rstd, nw, wide, xa, a, b, block = ctx.saved_tensors
        ds_in = _rows(grads[-1], k) if grads[-1] is not None else None
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        need_lora = ctx.needs_input_grad[5:]
        used = [dy is not None for dy in grads[:-1]]
        out = [None] * len(need_lora)
        dx = None
        if not any(used):  # only s reached the loss: its gradient passes through the add
            dx = ds_in.view(*ctx.lead, k) if ds_in is not None and need_x else None
        else:
            dys = [_rows(dy, n) if dy is not None else s.new_zeros((s.shape[0], n))
                   for dy, n in zip(grads[:-1], plan.out_features)]
            r = a.shape[1]
            need_da = any(need_lora[2 * j] and used[j] for j in range(plan.projections))
            g = None
            if need_x:
                # dh_base and g from one wide GEMM; the norm's backward adds the masked LoRA term of dh
                dh_base, g = _concat_backward(dys, block, plan, k, r)
                dx = _norm_lora_backward(dh_base, g, a, s, nw, rstd, ds_in, plan).view(*ctx.lead, k)
            elif need_da:  # no input gradient: g alone, one pass over dy, not the wide GEMM
                g = _lora_g(dys, b, plan)
            if need_da:
                da = _lora_da(wide[:, :k], g, plan)
                for j in range(plan.projections):
                    if need_lora[2 * j] and used[j]:
                        out[2 * j] = da[j].to(ctx.lora_dtypes[2 * j])
            if any(need_lora[2 * j + 1] and used[j] for j in range(plan.projections)):
                db = _lora_db(dys, xa, plan)
                start = 0
                for j, n in enumerate(plan.out_features):
                    if need_lora[2 * j + 1] and used[j]:
                        out[2 * j + 1] = db[start: start + n].to(ctx.lora_dtypes[2 * j + 1])
                    start += n
        dres = dx if ctx.has_residual and ctx.needs_input_grad[1] else None
        return (dx if ctx.needs_input_grad[0] else None, dres, None, None, None, *out)


# ----------------------------------------------------------------------------- public entry points


def norm_lora_ok(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, weights: Sequence,
                 adapters: Sequence[Adapter] | None, dropout_p: float, training: bool) -> bool:
    """Whether ``rms_norm_lora`` runs the fused kernels for these arguments: Triton for the tensors,
    adapters with dropout in training (without a mask the ``merged`` LoRA path does less), at most three
    projections of one rank the kernels take, NF4 weights with K a multiple of the blocksize (the
    strided dequantize of the wide matrix) or dense ones, one floating dtype for x, the residual, the
    norm weight and dense weights, a frozen norm weight, and no autocast (whose dtype rules the separate
    calls follow)."""
    if adapters is None or not training or not dropout_p > 0 or not 1 <= len(weights) <= 3:
        return False
    if len(adapters) != len(weights) or adapters[0].lora_a.shape[0] > MAX_KERNEL_RANK:
        return False
    dtype = x.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or norm_weight.dtype != dtype:
        return False
    if residual is not None and (residual.dtype != dtype or residual.shape != x.shape):
        return False
    if norm_weight.requires_grad and torch.is_grad_enabled():
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    k = x.shape[-1]
    if all(isinstance(w, NF4Weight) for w in weights):
        if k % weights[0].blocksize:
            return False
    elif not all(isinstance(w, torch.Tensor) and w.dtype == dtype for w in weights):
        return False
    if x.numel() == 0:
        return False
    first = weights[0]
    tensors = [x, norm_weight, first.packed if isinstance(first, NF4Weight) else first]
    return dispatch.use_triton(*tensors)


def _check_norm_args(x, residual, norm_weight, weights, adapters, dropout_p, seeds) -> None:
    what = "rms_norm_lora"
    if adapters is None:
        raise ValueError(f"{what}: needs adapters (without them call rms_norm_add and the base projections)")
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"{what}: one to three projections, got {len(weights)}")
    if len(seeds) != len(weights):
        raise ValueError(f"{what}: {len(weights)} projections but {len(seeds)} seeds")
    if norm_weight.dim() != 1 or norm_weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{what}: norm weight shape {tuple(norm_weight.shape)} does not match hidden size "
                         f"{x.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{what}: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    for name, t in (("residual", residual), ("norm weight", norm_weight)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{what}: x on {x.device}, {name} on {t.device}")
    _check(x, weights, adapters, dropout_p, what)


def rms_norm_lora(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weights: Sequence, adapters: Sequence[Adapter], dropout_p: float, training: bool,
                  seeds: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """``(outputs, s)``: RMSNorm of ``s = x + residual`` (of x, carried on as s, without a residual) and
    the LoRA projections of the normed rows, ``y_j = h @ W_j.T + s_j * dropout_j(h) @ A_j.T @ B_j.T``.

    Equal to ``rms_norm_add`` (or ``rms_norm_keep``) followed by ``lora_qkv`` / ``lora_linear`` with
    the same seeds (the same masks). Runs the fused kernels where ``norm_lora_ok`` allows, the torch
    reference otherwise. Outputs are column slices of one buffer, as ``lora_qkv``'s are."""
    _check_norm_args(x, residual, norm_weight, weights, adapters, dropout_p, seeds)
    if not norm_lora_ok(x, residual, norm_weight, weights, adapters, dropout_p, training):
        return rms_norm_lora_reference(x, residual, norm_weight, eps, weights, adapters, dropout_p, training,
                                       seeds)
    plan = _Plan(
        weights=tuple(weights),
        scalings=tuple(float(ad.scaling) for ad in adapters),
        seeds=tuple(seed31(s) for s in seeds),
        dropout_p=float(dropout_p),
        path="concat",
        grad_enabled=torch.is_grad_enabled(),
    )
    lora = [t for ad in adapters for t in (ad.lora_a, ad.lora_b)]
    *outputs, s = NormLoRAFunction.apply(x, residual, norm_weight, float(eps), plan, *lora)
    return tuple(outputs), s


__all__ = ["NormLoRAFunction", "norm_lora_ok", "rms_norm_lora", "rms_norm_lora_reference"]
