"""Helpers shared by the layer-kernel tests: run forward + backward once, compare with tolerances.

Two comparison rules:
- CPU (interpreter, fp32 / fp16): the kernel equals the reference run on the same inputs in
  the same dtype, within ``TOLERANCES[dtype]``. Outputs that are sums over many rows (a weight
  gradient, a summed loss) carry rounding that grows like sqrt(rows) in any implementation,
  so their atol is scaled by that factor (``rows=``).
- GPU (bf16): the issue's criterion. Against the reference computed in fp32 from the same
  bf16 inputs, the kernel's error is at most twice the error of the reference computed in
  bf16 (mean and max error; see assert_no_worse_than_bf16_reference).
"""

from __future__ import annotations

import math

import torch

from tests.utils import TOLERANCES, assert_close


def leaves(*tensors, requires_grad=True):
    return [t.detach().clone().requires_grad_(requires_grad) if t.is_floating_point() else t for t in tensors]


def as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def forward_backward(fn, inputs, grad_outputs=None, seed=1234):
    """Outputs of ``fn(*inputs)`` and the grads of every input that requires grad.

    Upstream gradients are random (fixed seed) unless given, so every output's backward counts.
    Returns (outputs, grads, grad_outputs).
    """
    outputs = as_tuple(fn(*inputs))
    if grad_outputs is None:
        gen = torch.Generator().manual_seed(seed)
        grad_outputs = tuple(
            torch.randn(o.shape, generator=gen, dtype=torch.float32).to(device=o.device, dtype=o.dtype)
            for o in outputs
        )
    wrt = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    grads = torch.autograd.grad(outputs, wrt, grad_outputs) if wrt else ()
    return outputs, tuple(grads), grad_outputs


def compare(actual, expected, names, dtype, rows=None):
    """assert_close each pair with the dtype's tolerance; ``rows`` maps a name to its summed row count."""
    atol, rtol = TOLERANCES[dtype]
    rows = rows or {}
    assert len(actual) == len(expected) == len(names)
    for a, e, name in zip(actual, expected, names):
        scale = math.sqrt(rows[name]) if name in rows else 1.0
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != reference {e.dtype}"
        assert_close(a, e, atol * scale, rtol, name)


def abs_errors(a, ref):
    return (a.detach().double() - ref.detach().double()).abs()


def assert_no_worse_than_bf16_reference(kernel, ref_bf16, ref_fp32, names, floor=1e-6):
    """The issue's GPU criterion, output by output, on two error measures against the fp32 reference.

    - mean |error| of the kernel <= 2x that of the bf16 reference;
    - max |error| of the kernel <= 2x that of the bf16 reference, plus one bf16 ulp at the
      largest output: both results are rounded to bf16, and which element happens to land a
      full ulp off differs between two correct implementations.
    """
    for k, r16, r32, name in zip(kernel, ref_bf16, ref_fp32, names):
        err_k, err_r = abs_errors(k, r32), abs_errors(r16, r32)
        mean_k, mean_r = err_k.mean().item(), err_r.mean().item()
        assert mean_k <= 2 * mean_r + floor, (
            f"{name}: kernel mean error {mean_k:.3e} against the fp32 reference exceeds twice the bf16 "
            f"reference's {mean_r:.3e}"
        )
        ulp = 2.0 ** -7 * r32.detach().abs().max().item()
        max_k, max_r = err_k.max().item(), err_r.max().item()
        assert max_k <= 2 * max_r + ulp + floor, (
            f"{name}: kernel max error {max_k:.3e} against the fp32 reference exceeds twice the bf16 "
            f"reference's {max_r:.3e} plus one bf16 ulp ({ulp:.3e})"
        )


def upcast(inputs):
    """fp32 copies of the floating inputs (same requires_grad), other inputs unchanged."""
    out = []
    for t in inputs:
        if torch.is_tensor(t) and t.is_floating_point():
            out.append(t.detach().float().requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def check_against_reference(op, reference, inputs, names, dtype, rows=None):
    """CPU rule: ``op`` under the Triton backend equals ``reference`` (same inputs, same dtype)."""
    from bezoar_kernels.dispatch import backend

    with backend("triton"):
        out_k, grads_k, grad_outputs = forward_backward(op, inputs)
    out_r, grads_r, _ = forward_backward(reference, inputs, grad_outputs)
    compare(out_k + grads_k, out_r + grads_r, names, dtype, rows)
    return out_k, grads_k


def check_bf16_against_fp32(op, reference, inputs, names):
    """GPU rule: ``op`` in bf16 is within 2x the bf16 reference's error against the fp32 reference."""
    from bezoar_kernels.dispatch import backend

    with backend("triton"):
        out_k, grads_k, grad_outputs = forward_backward(op, inputs)
    with backend("torch"):
        out_r, grads_r, _ = forward_backward(reference, inputs, grad_outputs)
        out_32, grads_32, _ = forward_backward(reference, upcast(inputs), tuple(g.float() for g in grad_outputs))
    assert_no_worse_than_bf16_reference(out_k + grads_k, out_r + grads_r, out_32 + grads_32, names)
