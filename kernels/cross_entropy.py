"""Fused linear + cross-entropy and per-token log-probs that never hold all (N, V) logits.

For hidden states h (N, C), the output embedding W (V, C) and labels y (N,):

    z_i     = h_i @ W.T                       (one chunk of tokens at a time, in h.dtype)
    lse_i   = log sum_v exp(z_iv)             (fp32, online over blocks of V)
    loss_i  = lse_i - z_i[y_i]                (0 where y_i == ignore_index)
    dz_i    = (softmax(z_i) - onehot(y_i)) * scale_i
    dh_i    = dz_i @ W,   dW += dz_i.T @ h_i

The Triton kernel does the fp32 softmax math of one chunk and writes dz over the logits
buffer in place, so beside the inputs and the gradients only one (chunk, V) buffer exists.

- ``linear_cross_entropy``: the loss is a scalar, so its gradients are computed during the
  forward (scale = 1, or 1/n_valid for ``mean``) and the backward only multiplies them by
  the incoming scalar: two GEMMs of the logits size in total instead of three.
- ``linear_token_logprobs``: log p(y_i) = -loss_i per token with an arbitrary per-token
  upstream gradient g (DPO sums them per sequence). With W frozen (the LoRA case) the
  forward stores d logp_i / d h_i (N, C) and the backward scales its rows by g; when W
  needs a gradient, the backward recomputes the chunks with scale_i = -g_i instead, since
  dW cannot be formed before g is known.

The references are plain ``F.linear`` then ``cross_entropy`` / ``log_softmax`` in fp32, the
arithmetic of Hugging Face's causal-LM loss (logits in the activation dtype, upcast to fp32).
"""

from __future__ import annotations

import contextlib

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

REDUCTIONS = ("sum", "mean")
# The logits of one chunk take at most this many bytes (with V = 32000 in bf16: 4096 tokens).
CHUNK_LOGITS_BYTES = 256 * 2**20
# Widest block of the vocabulary one kernel step reads (tests lower it to exercise the loop).
MAX_BLOCK_V = 4096


# ----------------------------------------------------------------------------- references


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index: int = -100, reduction: str = "sum"):
    """``F.linear`` then fp32 ``F.cross_entropy``; ``mean`` divides by the non-ignored count (0 -> 0)."""
    _check(hidden, weight, labels, reduction)
    _check_label_range(labels, weight.shape[0], ignore_index)
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight).float()
    flat = labels.reshape(-1).long()  # int32 labels too, as the Triton path takes them
    loss = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (flat != ignore_index).sum().clamp(min=1)
    return loss


def linear_token_logprobs_reference(hidden, weight, labels, ignore_index: int = -100):
    """log p(label) per token from fp32 ``log_softmax`` of ``F.linear``; 0 at ignored positions."""
    _check(hidden, weight, labels, "sum", "linear_token_logprobs")
    _check_label_range(labels, weight.shape[0], ignore_index, "linear_token_logprobs")
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight).float()
    flat = labels.reshape(-1).long()
    valid = flat != ignore_index
    picked = logits.log_softmax(-1).gather(-1, torch.where(valid, flat, 0)[:, None]).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked)).view(labels.shape)


# ----------------------------------------------------------------------------- kernel

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(
        # pointers
        logits_ptr, labels_ptr, scale_ptr, loss_ptr, lse_ptr,
        # strides
        stride_logits, stride_scale,
        # sizes and switches
        n_rows, n_vocab, ignore_index,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """BLOCK_R rows of logits: loss and logsumexp; with COMPUTE_GRAD, dz over the logits in place.

        BLOCK_R is 1 for a real vocabulary (one row per program, BLOCK_V-wide steps over it)
        and larger only when a whole row fits one block (small test vocabularies).
        """
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        base = logits_ptr + rows.to(tl.int64) * stride_logits  # (BLOCK_R,) row pointers
        label = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
        valid = (label != ignore_index) & row_ok
        cols = tl.arange(0, BLOCK_V)

        # pass 1: running max and sum of exponentials over blocks of the vocabulary
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        acc = tl.zeros((BLOCK_R,), tl.float32)
        for v0 in range(0, n_vocab, BLOCK_V):
            idx = v0 + cols
            in_vocab = idx < n_vocab
            x = tl.load(base[:, None] + idx[None, :], mask=row_ok[:, None] & in_vocab[None, :], other=0.0)
            x = tl.where(in_vocab[None, :], x.to(tl.float32), float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(acc)
        z_label = tl.load(base + label, mask=valid, other=0.0).to(tl.float32)
        tl.store(loss_ptr + rows, tl.where(valid, lse - z_label, 0.0), mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

        if COMPUTE_GRAD:
            scale = tl.load(scale_ptr + rows * stride_scale, mask=row_ok, other=0.0).to(tl.float32)
            scale = tl.where(valid, scale, 0.0)
            for v0 in range(0, n_vocab, BLOCK_V):
                idx = v0 + cols
                mask = row_ok[:, None] & (idx < n_vocab)[None, :]
                ptrs = base[:, None] + idx[None, :]
                x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                p = tl.exp(x - lse[:, None])
                dz = (p - tl.where(idx[None, :] == label[:, None], 1.0, 0.0)) * scale[:, None]
                tl.store(ptrs, dz.to(logits_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launcher


def _check(hidden, weight, labels, reduction, name: str = "linear_cross_entropy"):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
            "must be (..., C) and (V, C)"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{name}: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"{name}: labels {tuple(labels.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: labels must be int32/int64, got {labels.dtype}")


def _check_chunk(name: str, chunk_tokens) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"{name}: chunk_tokens must be a positive int or None, got {chunk_tokens!r}")


def _check_label_range(labels: torch.Tensor, n_vocab: int, ignore_index: int,
                       name: str = "linear_cross_entropy") -> None:
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= n_vocab))
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(
            f"{name}: label {first} is outside the vocabulary [0, {n_vocab}) "
            f"and is not ignore_index ({ignore_index})"
        )


def chunk_tokens_for(n_tokens: int, n_vocab: int, element_size: int) -> int:
    """Tokens per chunk: the logits of a chunk fit CHUNK_LOGITS_BYTES; a multiple of 128 when large."""
    tokens = max(1, CHUNK_LOGITS_BYTES // max(1, n_vocab * element_size))
    if tokens >= 128:
        tokens -= tokens % 128
    return max(1, min(tokens, n_tokens))


def _chunked_pass(hidden, weight, labels, ignore_index, scale, want_dh, want_dw, chunk_tokens):
    """Run every chunk once: per-token loss and lse (fp32), and dh (hidden's dtype) / dW (fp32) when asked.

    ``scale`` is a 1-element or (N,) fp32 tensor: the factor each token's dz is multiplied by.
    """
    n_tokens, _ = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    loss = torch.empty(n_tokens, device=device, dtype=torch.float32)
    lse = torch.empty(n_tokens, device=device, dtype=torch.float32)
    dh = torch.empty_like(hidden) if want_dh else None
    dw = torch.zeros(weight.shape, device=device, dtype=torch.float32) if want_dw else None
    compute_grad = want_dh or want_dw
    chunk = chunk_tokens or chunk_tokens_for(n_tokens, n_vocab, hidden.element_size())
    block_v = min(MAX_BLOCK_V, next_power_of_2(n_vocab))
    block_r = max(1, min(MAX_BLOCK_V // block_v, next_power_of_2(chunk)))
    stride_scale = 0 if scale.numel() == 1 else scale.stride(0)
    for start in range(0, n_tokens, chunk):
        end = min(start + chunk, n_tokens)
        h = hidden[start:end]
        logits = F.linear(h, weight)  # (n, V) in the activation dtype; becomes dz in place
        _ce_rows_kernel[(cdiv(end - start, block_r),)](
            logits, labels[start:end], scale[start:end] if stride_scale else scale, loss[start:end], lse[start:end],
            logits.stride(0), stride_scale,
            end - start, n_vocab, ignore_index,
            COMPUTE_GRAD=compute_grad, BLOCK_R=block_r, BLOCK_V=block_v,
            num_warps=8 if block_r * block_v >= 2048 else 4,
        )
        if want_dh:
            torch.mm(logits, weight, out=dh[start:end])
        if want_dw:
            dw += torch.mm(logits.t(), h)
    return loss, lse, dh, dw


def _flatten(hidden, labels):
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    if not hidden2.is_contiguous():
        hidden2 = hidden2.contiguous()
    return hidden2, labels.reshape(-1).contiguous()


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_tokens):
        h2, y = _flatten(hidden, labels)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = (y != ignore_index).sum()
        if reduction == "mean":
            scale = n_valid.clamp(min=1).to(torch.float32).reciprocal().reshape(1)
        else:
            scale = torch.ones(1, device=hidden.device, dtype=torch.float32)
        loss, _, dh, dw = _chunked_pass(h2, weight, y, ignore_index, scale, want_dh, want_dw, chunk_tokens)
        ctx.save_for_backward(dh, dw)
        ctx.hidden_shape = hidden.shape
        ctx.weight_dtype = weight.dtype
        return loss.sum() * scale[0]

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, grad_loss):
        dh, dw = ctx.saved_tensors
        grad_hidden = grad_weight = None
        if dh is not None:
            grad_hidden = (dh * grad_loss).to(dh.dtype).view(ctx.hidden_shape)
        if dw is not None:
            grad_weight = (dw * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_tokens):
        h2, y = _flatten(hidden, labels)
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.recompute = want_dw
        ctx.ignore_index, ctx.chunk_tokens = ignore_index, chunk_tokens
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        minus_one = torch.full((1,), -1.0, device=hidden.device, dtype=torch.float32)
        if want_dw:
            loss, _, _, _ = _chunked_pass(h2, weight, y, ignore_index, minus_one, False, False, chunk_tokens)
            ctx.save_for_backward(h2, weight, y)
        else:
            # dlogp_i/dh_i is complete once the forward is done: keep it and scale in backward
            loss, _, dh, _ = _chunked_pass(h2, weight, y, ignore_index, minus_one, want_dh, False, chunk_tokens)
            ctx.save_for_backward(dh)
        return (-loss).view(labels.shape)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, grad_logp):
        g = grad_logp.reshape(-1).to(torch.float32)
        if ctx.recompute:
            h2, weight, y = ctx.saved_tensors
            want_dh = ctx.needs_input_grad[0]
            _, _, dh, dw = _chunked_pass(h2, weight, y, ctx.ignore_index, -g.contiguous(), want_dh, True,
                                         ctx.chunk_tokens)
            grad_hidden = dh.view(ctx.hidden_shape) if dh is not None else None
            return grad_hidden, dw.to(ctx.weight_dtype), None, None, None
        (dh,) = ctx.saved_tensors
        grad_hidden = None
        if dh is not None:
            grad_hidden = (dh * g[:, None]).to(dh.dtype).view(ctx.hidden_shape)
        return grad_hidden, None, None, None, None


# ----------------------------------------------------------------------------- public ops


def _needs_graph(hidden, weight) -> bool:
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _autocast_operands(hidden, weight):
    """The operands as autocast would hand them to ``F.linear``, and whether autocast is on.

    The chunked pass writes into buffers of the operands' dtype (``torch.mm(..., out=)``), so
    under autocast it must see both operands in the autocast dtype already; the casts happen
    here, outside the autograd Function, so gradients flow back to the original dtypes.
    """
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, False
    dtype = torch.get_autocast_dtype(device_type)
    castable = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone
    cast = [t.to(dtype) if t.dtype in castable and t.dtype != dtype else t for t in (hidden, weight)]
    return cast[0], cast[1], True


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, reduction: str = "sum",
                         chunk_tokens: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` as an fp32 scalar.

    hidden (N, C) (or (..., C) with labels (...)), weight (V, C), labels int; ``sum`` or
    ``mean`` over non-ignored tokens (0 of them gives 0). Triton on CUDA: logits exist one
    chunk of ``chunk_tokens`` rows at a time (default: chosen from V, see chunk_tokens_for).
    """
    _check_chunk("linear_cross_entropy", chunk_tokens)
    hidden, weight, autocasting = _autocast_operands(hidden, weight)
    if not use_triton(hidden, weight, labels):  # the reference checks its inputs
        if hidden.is_cuda:  # a GPU the kernels do not run on (below sm_80): the reference, a chunk at a time
            return _linear_cross_entropy_chunked_reference(hidden, weight, labels, ignore_index, reduction,
                                                           chunk_tokens)
        return linear_cross_entropy_reference(hidden, weight, labels, ignore_index, reduction)
    _check(hidden, weight, labels, reduction)
    _check_label_range(labels, weight.shape[0], ignore_index)
    with torch.autocast(hidden.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        return _linear_cross_entropy_triton(hidden, weight, labels, ignore_index, reduction, chunk_tokens)


def _linear_cross_entropy_chunked_reference(hidden, weight, labels, ignore_index, reduction, chunk_tokens):
    """``linear_cross_entropy_reference`` over chunks of rows, each recomputed in the backward (checkpointed): the
    fp32 logits of one chunk exist at a time, where the reference builds the whole batch's (2 GB at 16K tokens and
    a 32K vocabulary, more than a T4 spares beside a 3B model)."""
    from torch.utils.checkpoint import checkpoint

    _check(hidden, weight, labels, reduction)
    _check_label_range(labels, weight.shape[0], ignore_index)
    h2, flat = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    step = chunk_tokens or 4096

    def part(h, y):
        return F.cross_entropy(F.linear(h, weight).float(), y, ignore_index=ignore_index, reduction="sum")

    # from a zero tied to both inputs: a rank with no rows (all padding) still gets a loss its backward can run
    # (of empty slices: summing the values in fp16 overflowed to inf, and inf * 0 made the loss NaN)
    loss = (h2[:0].sum() + weight[:0].sum()).float()
    for i in range(0, h2.shape[0], step):
        loss = loss + checkpoint(part, h2[i: i + step], flat[i: i + step], use_reentrant=False)
    if reduction == "mean":
        loss = loss / (flat != ignore_index).sum().clamp(min=1)
    return loss


def _linear_cross_entropy_triton(hidden, weight, labels, ignore_index, reduction, chunk_tokens):
    if _needs_graph(hidden, weight):
        return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, reduction, chunk_tokens)
    h2, y = _flatten(hidden, labels)
    one = torch.ones(1, device=hidden.device, dtype=torch.float32)
    loss, _, _, _ = _chunked_pass(h2, weight, y, ignore_index, one, False, False, chunk_tokens)
    total = loss.sum()
    if reduction == "mean":
        total = total / (y != ignore_index).sum().clamp(min=1)
    return total


def linear_token_logprobs(hidden, weight, labels, ignore_index: int = -100,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(label) per token (fp32, shape of labels; 0 where ignored) from ``hidden @ weight.T``.

    Differentiable w.r.t. hidden and, if it requires grad, weight, for any per-token upstream
    gradient. Never holds more than one (chunk, V) block of logits.
    """
    _check_chunk("linear_token_logprobs", chunk_tokens)
    hidden, weight, autocasting = _autocast_operands(hidden, weight)
    if not use_triton(hidden, weight, labels):  # the reference checks its inputs
        return linear_token_logprobs_reference(hidden, weight, labels, ignore_index)
    _check(hidden, weight, labels, "sum", "linear_token_logprobs")
    _check_label_range(labels, weight.shape[0], ignore_index, "linear_token_logprobs")
    with torch.autocast(hidden.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        return _linear_token_logprobs_triton(hidden, weight, labels, ignore_index, chunk_tokens)


def _linear_token_logprobs_triton(hidden, weight, labels, ignore_index, chunk_tokens):
    if _needs_graph(hidden, weight):
        return LinearTokenLogprobsFunction.apply(hidden, weight, labels, ignore_index, chunk_tokens)
    h2, y = _flatten(hidden, labels)
    minus_one = torch.full((1,), -1.0, device=hidden.device, dtype=torch.float32)
    loss, _, _, _ = _chunked_pass(h2, weight, y, ignore_index, minus_one, False, False, chunk_tokens)
    return (-loss).view(labels.shape)
