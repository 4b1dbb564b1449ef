"""SwiGLU fused with the LoRA down projection that reads it (training with dropout).

The MLP's down_proj reads ``act = silu(gate) * up`` (M, F), F = 8640 for OpenLLaMA 3B: its input is
2.7 times as wide as the hidden size, so the passes that LoRA dropout forces over a down_proj input
are the most expensive of the block (``kernels/norm_lora.py`` says which passes; here they are passes
over (M, F)). The SwiGLU kernel already reads gate and up and writes act once, so, as the RMSNorm
does for q/k/v:

Forward (``_swiglu_lora_fwd_kernel``, one program per 16 rows)::

    act = silu(gate) * up                    written into [act | xa]    (fp32, rounded once, as swiglu)
    xa  = dropout(act) @ A.T                 from act in registers

then one cuBLAS GEMM of [act | xa] by [W | s B] (the ``concat`` layout of kernels/lora.py) gives y.

Backward::

    [dact_base | g] = dy @ [W | s B]                                  one cuBLAS GEMM
    dB = s dy.T @ xa,  dA = g.T @ dropout(act)                        kernels/lora.py
    dact = dact_base + (g @ A) * mask, rounded to the dtype           (``_swiglu_lora_bwd_kernel``,
    dgate, dup = SwiGLU's backward of dact                             one pass, nothing in between)

Left over SwiGLU + the NF4 down projection: dA (a pass over act) and dB (N/F of a pass, over dy).
Numerics are those of ``swiglu`` followed by ``lora_linear`` on the ``concat`` path.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bezoar_kernels import dispatch
from bezoar_kernels.launch import cdiv
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
    _rows,
    _wide_input,
    _wide_pad,
    seed31,
)
from bezoar_kernels.nf4 import NF4Weight
from bezoar_kernels.norm_lora import _BLOCK_M, _block_k
from bezoar_kernels.swiglu import swiglu_reference

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None


def swiglu_lora_reference(gate: torch.Tensor, up: torch.Tensor, weight, adapter: Adapter, dropout_p: float,
                          training: bool, seed: int) -> torch.Tensor:
    """Hugging Face's ``act_fn(gate) * up``, then the projection with PEFT's arithmetic."""
    return _projections_reference(swiglu_reference(gate, up), [weight], [adapter], dropout_p, training, [seed])[0]


if triton is not None:
    from bezoar_kernels.lora import _dropout_keep, _wide_pad_zeros

    @triton.jit
    def _swiglu_lora_fwd_kernel(
        # pointers: gate, up (M, F), A (R, F), xa (1, M, R), wide (M, F + WIDTH + PAD): [act | xa | zeros]
        gate_ptr, up_ptr, a_ptr, xa_ptr, wide_ptr,
        # sizes and scalars
        M, F, R, seed, threshold, keep_scale,
        # row strides (the last dims are contiguous)
        stride_gate, stride_up, stride_w,
        # meta
        DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        WIDTH: tl.constexpr, DOT_PRECISION: tl.constexpr, PAD: tl.constexpr,
    ):
        """One program per BLOCK_M rows: act chunk by chunk into ``wide`` and the masked act @ A.T
        accumulated on tensor cores from the same registers; zeros in the PAD columns after xa
        (``lora.concat_align``)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)[:, None]
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, F, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < F
            ok = m_ok[:, None] & k_ok[None, :]
            g = tl.load(gate_ptr + rows * stride_gate + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + rows * stride_up + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            act = (g * tl.sigmoid(g) * u).to(wide_ptr.dtype.element_ty)
            tl.store(wide_ptr + rows * stride_w + offs_k[None, :], act, mask=ok)
            if DROPOUT:
                act = tl.where(_dropout_keep(offs_m, k0, seed, threshold, BLOCK_K), act, 0.0)
            a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * F + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            acc = tl.dot(act, tl.trans(a), acc, input_precision=DOT_PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        out = acc.to(xa_ptr.dtype.element_ty)
        tl.store(xa_ptr + rows * R + offs_r[None, :], out, mask=m_ok[:, None] & r_ok[None, :])
        # acc is 0 past R (A's rows there load as 0): that fills the block's padding columns
        tl.store(wide_ptr + rows * stride_w + (F + offs_r)[None, :], out, mask=m_ok[:, None] & (offs_r < WIDTH)[None, :])
        _wide_pad_zeros(wide_ptr + rows * stride_w, m_ok, F + WIDTH, PAD, BLOCK_M)

    @triton.jit
    def _swiglu_lora_bwd_kernel(
        # pointers: dact_base (M, F) strided, g (M, R) strided, A (R, F), gate, up (M, F), dgate, dup (M, F)
        dab_ptr, g_ptr, a_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
        # sizes and scalars
        M, F, R, seed, threshold, keep_scale,
        # strides
        stride_dab, stride_gm, stride_gate, stride_up, stride_dgate, stride_dup,
        # meta
        DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """dact = dact_base + (g @ A) * mask (rounded to the dtype, as the separate LoRA call stores dx), then
        SwiGLU's backward of it, chunk by chunk: one pass, dact never stored."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        rows = offs_m.to(tl.int64)[:, None]
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        gl = tl.load(g_ptr + rows * stride_gm + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        for k0 in range(0, F, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < F
            ok = m_ok[:, None] & k_ok[None, :]
            d = tl.load(dab_ptr + rows * stride_dab + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * F + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :],
                        other=0.0)
            lora = tl.dot(gl, a, input_precision=DOT_PRECISION)
            if DROPOUT:
                d += tl.where(_dropout_keep(offs_m, k0, seed, threshold, BLOCK_K), lora, 0.0) * keep_scale
            else:
                d += lora
            d = d.to(dgate_ptr.dtype.element_ty).to(tl.float32)
            g = tl.load(gate_ptr + rows * stride_gate + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + rows * stride_up + offs_k[None, :], mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            dgate = d * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(dgate_ptr + rows * stride_dgate + offs_k[None, :], dgate.to(dgate_ptr.dtype.element_ty), mask=ok)
            tl.store(dup_ptr + rows * stride_dup + offs_k[None, :], (d * (g * sig)).to(dup_ptr.dtype.element_ty), mask=ok)


def _swiglu_lora_forward(g2, u2, a, plan: _Plan):
    """(xa (1, M, R), wide (M, F + r16 + the pad of ``lora.concat_align``)): act and the masked down
    product in one pass."""
    m, f = g2.shape
    r = a.shape[1]
    width = _concat_width(r)
    dtype = g2.dtype
    wide = _wide_input(m, f, 1, r, dtype, g2.device)
    xa = torch.empty((1, m, r), dtype=dtype, device=g2.device)
    r_pad = _r_pad(r)
    threshold, keep_scale = _dropout_args(plan)
    _swiglu_lora_fwd_kernel[(cdiv(m, _BLOCK_M),)](
        g2, u2, a, xa, wide, m, f, r, plan.seeds[0], threshold, keep_scale,
        g2.stride(0), u2.stride(0), wide.stride(0),
        DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_K=_block_k(r_pad), WIDTH=width,
        DOT_PRECISION=_dot_precision(dtype), **_wide_pad(wide, f, 1, r), num_warps=4,
    )
    return xa, wide


def _swiglu_lora_backward(dact_base, g, a, g2, u2, plan: _Plan):
    """(dgate, dup) (M, F) each, with the masked LoRA term of dact added on the way in."""
    m, f = g2.shape
    r = a.shape[1]
    dgate = torch.empty_like(g2)
    dup = torch.empty_like(u2)
    r_pad = _r_pad(r)
    threshold, keep_scale = _dropout_args(plan)
    _swiglu_lora_bwd_kernel[(cdiv(m, _BLOCK_M),)](
        dact_base, g, a, g2, u2, dgate, dup, m, f, r, plan.seeds[0], threshold, keep_scale,
        dact_base.stride(0), g.stride(1), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0),
        DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=_BLOCK_M, BLOCK_K=_block_k(r_pad),
        DOT_PRECISION=_dot_precision(g2.dtype), num_warps=4,
    )
    return dgate, dup


class SwiGLULoRAFunction(torch.autograd.Function):
    """``forward(ctx, gate, up, plan, lora_a, lora_b)`` -> y (..., N). The frozen base weight rides in
    ``plan`` (path ``concat``). Saved: gate, up, the wide operand [act | xa] (act for dA), xa, A, B and
    the LoRA block."""

    @staticmethod
    def forward(ctx, gate, up, plan: _Plan, lora_a, lora_b):
        f = gate.shape[-1]
        lead = gate.shape[:-1]
        g2, u2 = _rows(gate, f), _rows(up, f)
        dtype = gate.dtype
        a = lora_a.detach().to(dtype).contiguous().unsqueeze(0)  # (1, R, F)
        b = lora_b.detach().to(dtype).contiguous()
        xa, wide = _swiglu_lora_forward(g2, u2, a, plan)
        block = _concat_lora_block(plan, b, wide.shape[1] - f)
        y = _concat_forward(wide, block, plan, f)
        ctx.plan, ctx.lead, ctx.f = plan, lead, f
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(g2, u2, wide, xa, a, b, block)
        return y.view(*lead, y.shape[-1])

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dy):
        plan, f = ctx.plan, ctx.f
        g2, u2, wide, xa, a, b, block = ctx.saved_tensors
        dys = [_rows(dy, plan.out_features[0])]
        dgate = dup = da = db = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            dact_base, g = _concat_backward(dys, block, plan, f, a.shape[1])  # g from the wide GEMM
            dgate, dup = _swiglu_lora_backward(dact_base, g, a, g2, u2, plan)
            dgate = dgate.view(*ctx.lead, f) if ctx.needs_input_grad[0] else None
            dup = dup.view(*ctx.lead, f) if ctx.needs_input_grad[1] else None
        elif ctx.needs_input_grad[3]:  # no input gradient: g alone, one pass over dy, not the wide GEMM
            g = _lora_g(dys, b, plan)
        if ctx.needs_input_grad[3]:
            da = _lora_da(wide[:, :f], g, plan)[0].to(ctx.lora_dtypes[0])
        if ctx.needs_input_grad[4]:
            db = _lora_db(dys, xa, plan).to(ctx.lora_dtypes[1])
        return dgate, dup, None, da, db


def swiglu_lora_ok(gate: torch.Tensor, up: torch.Tensor, weight, adapter: Adapter | None, dropout_p: float,
                   training: bool) -> bool:
    """Whether ``swiglu_lora`` runs the fused kernels: an adapter with dropout in training (without a mask
    the ``merged`` LoRA path does less), a rank the kernels take, an NF4 weight with F a multiple of the
    blocksize or a dense one in the dtype of gate and up, gate and up of one shape and floating dtype,
    Triton for the tensors, and no autocast."""
    if adapter is None or not training or not dropout_p > 0 or adapter.lora_a.shape[0] > MAX_KERNEL_RANK:
        return False
    dtype = gate.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or up.dtype != dtype or up.shape != gate.shape:
        return False
    if torch.is_autocast_enabled(gate.device.type) or gate.numel() == 0:
        return False
    if isinstance(weight, NF4Weight):
        if gate.shape[-1] % weight.blocksize:
            return False
    elif not (isinstance(weight, torch.Tensor) and weight.dtype == dtype):
        return False
    return dispatch.use_triton(gate, up, weight.packed if isinstance(weight, NF4Weight) else weight)


def swiglu_lora(gate: torch.Tensor, up: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout_p: float, training: bool, seed: int) -> torch.Tensor:
    """``y = act @ W.T + scaling * dropout(act) @ A.T @ B.T`` with ``act = silu(gate) * up`` (..., F).

    Equal to ``swiglu`` followed by ``lora_linear`` with the same seed (the same mask). The fused kernels
    run where ``swiglu_lora_ok`` allows, the torch reference otherwise."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu_lora: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must match")
    adapter = Adapter(lora_a, lora_b, float(scaling))
    _check(gate, [weight], [adapter], dropout_p, "swiglu_lora")
    if not swiglu_lora_ok(gate, up, weight, adapter, dropout_p, training):
        return swiglu_lora_reference(gate, up, weight, adapter, dropout_p, training, seed)
    plan = _Plan(weights=(weight,), scalings=(float(scaling),), seeds=(seed31(seed),), dropout_p=float(dropout_p),
                 path="concat", grad_enabled=torch.is_grad_enabled())
    return SwiGLULoRAFunction.apply(gate, up, plan, lora_a, lora_b)


__all__ = ["SwiGLULoRAFunction", "swiglu_lora", "swiglu_lora_ok", "swiglu_lora_reference"]
