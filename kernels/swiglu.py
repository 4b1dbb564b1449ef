"""SwiGLU, the gated activation of a Llama MLP: ``silu(gate) * up``.

    out   = gate * sigmoid(gate) * up
    dgate = dout * up * sigmoid(gate) * (1 + gate * (1 - sigmoid(gate)))
    dup   = dout * gate * sigmoid(gate)

The kernel computes in fp32 and rounds once; the reference is Hugging Face's
``act_fn(gate) * up`` in the input dtype (silu rounded, then the product rounded). The
backward recomputes sigmoid(gate) instead of storing silu(gate). Inputs are (..., N) with
a contiguous last dim; the row stride is free, so the two halves of a fused gate/up
projection can be passed as views.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from .dispatch import use_triton
from .launch import cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in the input dtype, as HF's LlamaMLP computes it."""
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(
        gate_ptr, up_ptr, out_ptr,
        stride_gate, stride_up, stride_out,
        n_rows, n_cols,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + rows * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd_kernel(
        dout_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr,
        stride_dout, stride_gate, stride_up, stride_dgate, stride_dup,
        n_rows, n_cols,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
        cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
        mask = (rows < n_rows) & (cols < n_cols)
        do = tl.load(dout_ptr + rows * stride_dout + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + rows * stride_gate + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(up_ptr + rows * stride_up + cols, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dgate = do * u * sig * (1.0 + g * (1.0 - sig))
        tl.store(dgate_ptr + rows * stride_dgate + cols, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
        tl.store(dup_ptr + rows * stride_dup + cols, (do * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(rows, N) view with a contiguous last dim; copies only when no such view exists."""
    try:
        t = t.view(-1, n_cols)
    except RuntimeError:
        t = t.reshape(-1, n_cols)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_shape(n_rows: int, n_cols: int):
    """(grid, BLOCK_R, BLOCK_C): tiles of about 4K elements, at most 1024 columns wide."""
    block_c = min(1024, next_power_of_2(n_cols))
    block_r = min(max(1, 4096 // block_c), next_power_of_2(n_rows))
    return (cdiv(n_rows, block_r), cdiv(n_cols, block_c)), block_r, block_c


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        n_cols = gate.shape[-1]
        g2, u2 = _rows(gate, n_cols), _rows(up, n_cols)
        out = torch.empty(g2.shape, device=gate.device, dtype=gate.dtype)
        if out.numel():
            grid, block_r, block_c = _launch_shape(out.shape[0], n_cols)
            _swiglu_fwd_kernel[grid](
                g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), out.shape[0], n_cols,
                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
            )
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return out.view(gate.shape)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dout):
        g2, u2 = ctx.saved_tensors
        n_cols = g2.shape[1]
        do2 = _rows(dout, n_cols)
        dgate = torch.empty(g2.shape, device=g2.device, dtype=g2.dtype)
        dup = torch.empty(u2.shape, device=u2.device, dtype=u2.dtype)
        if dgate.numel():
            grid, block_r, block_c = _launch_shape(g2.shape[0], n_cols)
            _swiglu_bwd_kernel[grid](
                do2, g2, u2, dgate, dup,
                do2.stride(0), g2.stride(0), u2.stride(0), dgate.stride(0), dup.stride(0),
                g2.shape[0], n_cols, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
            )
        return dgate.view(ctx.shape), dup.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (same shapes and dtype); Triton on CUDA, the HF arithmetic elsewhere."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match"
        )
    if use_triton(gate, up) and gate.numel() > 0:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
