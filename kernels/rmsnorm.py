"""RMSNorm, alone and fused with the residual add that precedes it in a Llama block.

    y = weight * cast(x * rsqrt(mean(x^2) + eps))          (the mean and rsqrt in fp32)

The cast back to ``x.dtype`` before the weight multiply is Hugging Face Llama's order of
operations (``LlamaRMSNorm``); the reference below is that module's arithmetic, so in fp32 it
equals transformers exactly. The fused variant takes the residual stream too:

    s = x + residual          (in x.dtype, returned: it is the next residual)
    y = rms_norm(s)

which reads ``x`` and ``residual`` once and writes ``s`` and ``y`` in the same pass.

Backward, with xhat = s * rstd and g = dy * weight (both fp32):

    ds = rstd * (g - xhat * mean(g * xhat))  (+ the incoming gradient of s, fused variant)
    dweight = sum over rows of dy * xhat

``dweight`` is reduced in two steps: each program sums its rows into one fp32 row of a
(programs, C) buffer, and torch adds those rows; it is skipped when the weight is frozen
(the LoRA case).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .dispatch import use_triton
from .launch import cdiv, next_power_of_2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU installs without triton use the reference
    triton = None


# ----------------------------------------------------------------------------- reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face ``LlamaRMSNorm.forward`` arithmetic, step for step."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def rms_norm_add_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``s = x + residual`` then ``rms_norm(s)``; returns ``(y, s)``."""
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _rms_norm_fwd_kernel(
        # pointers
        x_ptr, res_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr,
        # strides (rows; the last dim is contiguous)
        stride_x, stride_res, stride_y, stride_s,
        # sizes and numerics
        n_rows, n_cols, eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
            # the sum is rounded to the input dtype, exactly like ``x + residual`` in torch
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        xhat = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        y = w[None, :] * xhat
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rms_norm_bwd_kernel(
        # pointers
        dy_ptr, s_ptr, w_ptr, rstd_ptr, ds_in_ptr, dx_ptr, dw_partial_ptr,
        # strides (rows)
        stride_dy, stride_s, stride_ds_in, stride_dx,
        # sizes
        n_rows, n_cols, rows_per_program,
        HAS_DS_IN: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Each program walks rows_per_program rows, BLOCK_R at a time, and sums its dweight row."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first_row = pid * rows_per_program
        end_row = tl.minimum(first_row + rows_per_program, n_rows)
        for start in range(first_row, end_row, BLOCK_R):
            rows = (start + tl.arange(0, BLOCK_R)).to(tl.int64)
            mask = (rows < end_row)[:, None] & col_ok[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=rows < end_row, other=0.0)
            xhat = s * rstd[:, None]
            g = dy * w[None, :]
            ds = rstd[:, None] * (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None])
            if HAS_DS_IN:
                ds += tl.load(ds_in_ptr + rows[:, None] * stride_ds_in + cols[None, :], mask=mask,
                              other=0.0).to(tl.float32)
            tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], ds.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                # the forward multiplied the weight by xhat rounded to the input dtype
                dw_acc += tl.sum(dy * xhat.to(s_ptr.dtype.element_ty).to(tl.float32), axis=0)
        if COMPUTE_DW:
            tl.store(dw_partial_ptr + pid * n_cols + cols, dw_acc, mask=col_ok)


# ----------------------------------------------------------------------------- launchers


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View as (rows, C) with a contiguous last dim, copying only when needed."""
    t = t.reshape(-1, n_cols)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _num_warps(block_c: int) -> int:
    return 4 if block_c <= 1024 else 8 if block_c <= 4096 else 16


def _block_rows(block_c: int, n_rows: int) -> int:
    """Rows per tile: one for wide rows (C = 3200), several for narrow ones (about 4K elements)."""
    return max(1, min(4096 // block_c, next_power_of_2(max(n_rows, 1))))


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm_add: residual {tuple(residual.shape)} must match x {tuple(x.shape)}")


def _forward(x, residual, weight, eps):
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), device=x.device, dtype=out_dtype)
    rstd = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    if residual is not None:
        r2 = _rows(residual, n_cols)
        s = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    else:
        r2, s = x2, x2
    block_c = next_power_of_2(n_cols)
    block_r = _block_rows(block_c, n_rows)
    if n_rows > 0:
        _rms_norm_fwd_kernel[(cdiv(n_rows, block_r),)](
            x2, r2, weight, y, s, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0),
            n_rows, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_num_warps(block_c),
        )
    return y, s, rstd


def _backward(dy, ds_in, s, weight, rstd, compute_dw: bool, dx_dtype: torch.dtype):
    n_cols = s.shape[-1]
    n_rows = s.shape[0]
    dy2 = _rows(dy, n_cols)
    ds2 = _rows(ds_in, n_cols) if ds_in is not None else dy2
    dx = torch.empty((n_rows, n_cols), device=s.device, dtype=dx_dtype)
    block_c = next_power_of_2(n_cols)
    block_r = _block_rows(block_c, n_rows)
    if s.is_cuda:
        programs = torch.cuda.get_device_properties(s.device).multi_processor_count * 4
    else:
        programs = 2
    programs = max(1, min(programs, cdiv(n_rows, block_r)))
    rows_per_program = cdiv(n_rows, programs) if n_rows else 0
    dw_partial = torch.empty((programs, n_cols) if compute_dw else (1,), device=s.device, dtype=torch.float32)
    if n_rows > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, s, weight, rstd, ds2, dx, dw_partial,
            dy2.stride(0), s.stride(0), ds2.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program,
            HAS_DS_IN=ds_in is not None, COMPUTE_DW=compute_dw, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_num_warps(block_c),
        )
    dw = None
    if compute_dw:
        dw = dw_partial.sum(0).to(weight.dtype) if n_rows else torch.zeros_like(weight)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        weight = weight.contiguous()  # the kernels read it with stride 1
        y, s, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dy):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, None, s, weight, rstd, ctx.needs_input_grad[1], ctx.x_dtype)
        return dx.view(ctx.x_shape), dw, None


class RMSNormAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        weight = weight.contiguous()  # the kernels read it with stride 1
        y, s, rstd = _forward(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1]), s.view(x.shape)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, ds, s, weight, rstd, ctx.needs_input_grad[2], ctx.x_dtype)
        dx = dx.view(ctx.x_shape)
        # s = x + residual: both inputs receive the same gradient
        return dx, dx, dw, None


class RMSNormKeepFunction(torch.autograd.Function):
    """``(rms_norm(x), x)``: the second output carries x on as the residual stream. Its gradient joins
    the norm's in the backward kernel (one rounding, as in RMSNormAddFunction), where autograd would
    round the norm's input gradient to x's dtype first and add the two in that dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        weight = weight.contiguous()  # the kernels read it with stride 1
        y, s, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.view(*x.shape[:-1], y.shape[-1]), x.view_as(x)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors  # (autograd passes zeros for an output that was not used)
        dx, dw = _backward(dy, ds, s, weight, rstd, ctx.needs_input_grad[1], ctx.x_dtype)
        return dx.view(ctx.x_shape), dw, None


# ----------------------------------------------------------------------------- public ops


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with Hugging Face Llama numerics; Triton on CUDA."""
    _check(x, weight)
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps)


def rms_norm_keep(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rms_norm(x), x)`` for a layer whose input is also its residual stream; Triton on CUDA, where the
    backward adds the residual's gradient to the norm's in fp32 before one rounding, exactly as
    ``rms_norm_add``'s does (so a model gets the same gradients whether the add came before or inside)."""
    _check(x, weight)
    if use_triton(x, weight):
        return RMSNormKeepFunction.apply(x, weight, float(eps))
    return rms_norm_reference(x, weight, eps), x


def rms_norm_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rms_norm(x + residual), x + residual)`` in one pass over the inputs; Triton on CUDA.

    x and residual may differ in dtype: under autocast a sublayer of an fp32 model returns bf16 while
    the residual stream stays fp32. The sum is then taken in the wider dtype, as ``x + residual`` does.
    """
    _check(x, weight, residual)
    if x.dtype != residual.dtype:
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    if use_triton(x, residual, weight):
        return RMSNormAddFunction.apply(x, residual, weight, float(eps))
    return rms_norm_add_reference(x, residual, weight, eps)
