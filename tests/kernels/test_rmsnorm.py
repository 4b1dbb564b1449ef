"""RMSNorm and fused residual-add RMSNorm: Triton (interpreter on CPU) against the HF-numerics reference."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels.dispatch import backend
from bezoar_kernels.rmsnorm import rms_norm, rms_norm_add, rms_norm_add_reference, rms_norm_keep, rms_norm_reference
from tests.kernels.layer_checks import check_against_reference, check_bf16_against_fp32, leaves
from tests.utils import assert_close

SHAPES = [(37, 61), (2, 17, 100), (1, 64), (9, 2, 1030)]  # the last: several row tiles per program
EPS = 1e-6


def _inputs(shape, dtype, weight_grad, device="cpu"):
    x = torch.randn(shape, dtype=torch.float32) * 2.0
    residual = torch.randn(shape, dtype=torch.float32)
    weight = torch.rand(shape[-1]) + 0.5
    x, residual = leaves(x.to(device, dtype), residual.to(device, dtype))
    (weight,) = leaves(weight.to(device, dtype), requires_grad=weight_grad)
    return x, residual, weight


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_matches_reference(shape, dtype, weight_grad):
    x, _, w = _inputs(shape, dtype, weight_grad)
    names = ["y", "dx"] + (["dweight"] if weight_grad else [])
    rows = x.numel() // shape[-1]
    check_against_reference(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_reference(x, w, EPS), [x, w], names, dtype,
        rows={"dweight": rows},
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_add_matches_reference(shape, dtype, weight_grad):
    x, r, w = _inputs(shape, dtype, weight_grad)
    names = ["y", "s", "dx", "dresidual"] + (["dweight"] if weight_grad else [])
    rows = x.numel() // shape[-1]
    check_against_reference(
        lambda x, r, w: rms_norm_add(x, r, w, EPS), lambda x, r, w: rms_norm_add_reference(x, r, w, EPS),
        [x, r, w], names, dtype, rows={"dweight": rows},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_keep_is_rms_norm_add_of_a_zero_residual(dtype):
    """``rms_norm_keep(x)`` = ``(rms_norm(x), x)``, with the gradients of both outputs summed in fp32 and
    rounded once: bit for bit what ``rms_norm_add(x, 0)`` gives x."""
    x, r, w = _inputs((9, 2, 1030), dtype, True)
    zeros = torch.zeros_like(x)
    with backend("triton"):
        y, kept = rms_norm_keep(x, w, EPS)
        y_add, s_add = rms_norm_add(x, zeros, w, EPS)
    assert torch.equal(y, y_add) and torch.equal(kept, x)
    gy, gs = torch.randn_like(y), torch.randn_like(x)
    got = torch.autograd.grad((y, kept), [x, w], (gy, gs))
    want = torch.autograd.grad((y_add, s_add), [x, w], (gy, gs))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with backend("torch"):  # the reference: the same values, the gradients summed by autograd
        y_ref, kept_ref = rms_norm_keep(x, w, EPS)
    assert kept_ref is x and torch.equal(y_ref, rms_norm_reference(x, w, EPS))
    only_y = torch.autograd.grad(rms_norm_keep(x, w, EPS)[0], [x], gy)[0]
    with backend("triton"):
        only_y_triton = torch.autograd.grad(rms_norm_keep(x, w, EPS)[0], [x], gy)[0]
    atol, rtol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-3, 2e-3)
    assert_close(only_y_triton, only_y, atol, rtol, "dx with the kept output unused")


def test_rms_norm_add_when_only_y_is_used():
    """The residual output unused: its incoming gradient is zero and both inputs get the norm's grad."""
    x, r, w = _inputs((37, 61), torch.float32, True)
    with backend("triton"):
        y, _ = rms_norm_add(x, r, w, EPS)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, r, w], g)
    y_ref, _ = rms_norm_add_reference(x, r, w, EPS)
    want = torch.autograd.grad(y_ref, [x, r, w], g)
    for a, e, name in zip(got, want, ["dx", "dresidual", "dweight"]):
        assert_close(a, e, 1e-5, 1e-5, name)


def test_reference_is_transformers_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.float16):
        module = LlamaRMSNorm(61, eps=1e-5).to(dtype)
        with torch.no_grad():
            module.weight.copy_(torch.rand(61) + 0.5)
        x = torch.randn(3, 7, 61).to(dtype)
        assert torch.equal(rms_norm_reference(x, module.weight, 1e-5), module(x))


def test_cpu_auto_backend_is_the_reference():
    x, r, w = _inputs((5, 61), torch.float32, True)
    with backend("auto"):
        assert torch.equal(rms_norm(x, w, EPS), rms_norm_reference(x, w, EPS))
        y, s = rms_norm_add(x, r, w, EPS)
    y_ref, s_ref = rms_norm_add_reference(x, r, w, EPS)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)


def test_bad_shapes_raise_clear_errors():
    x = torch.randn(4, 61)
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(x, torch.ones(60), EPS)
    with pytest.raises(ValueError, match="residual"):
        rms_norm_add(x, torch.randn(4, 60), torch.ones(61), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 3200), (2, 37, 61)])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_bf16_gpu_within_twice_reference_error(shape, weight_grad):
    x, r, w = _inputs(shape, torch.bfloat16, weight_grad, device="cuda")
    extra = ["dweight"] if weight_grad else []
    check_bf16_against_fp32(lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_reference(x, w, EPS),
                            [x, w], ["y", "dx"] + extra)
    check_bf16_against_fp32(lambda x, r, w: rms_norm_add(x, r, w, EPS),
                            lambda x, r, w: rms_norm_add_reference(x, r, w, EPS),
                            [x, r, w], ["y", "s", "dx", "dresidual"] + extra)


@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_add", "rms_norm_keep"])
def test_a_strided_weight_reads_its_own_elements(op):
    """The kernels read the weight with stride 1: a weight sliced from a wider tensor gave wrong values silently."""
    x = torch.randn(5, 24)
    residual = torch.randn(5, 24)
    wide = (torch.rand(48) + 0.5).requires_grad_(True)
    weight = wide[::2]
    args = {"rms_norm": (x,), "rms_norm_add": (x, residual), "rms_norm_keep": (x,)}[op]
    fn = {"rms_norm": rms_norm, "rms_norm_add": rms_norm_add, "rms_norm_keep": rms_norm_keep}[op]
    with backend("triton"):
        out = fn(*args, weight, EPS)
    y = out[0] if isinstance(out, tuple) else out
    y.sum().backward()
    grad = wide.grad.clone()
    wide.grad = None
    ref = rms_norm_reference(x + residual if op == "rms_norm_add" else x, weight, EPS)
    ref.sum().backward()
    assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert_close(grad, wide.grad, rtol=1e-4, atol=1e-4)
