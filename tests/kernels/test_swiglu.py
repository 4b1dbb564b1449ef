"""SwiGLU: Triton (interpreter on CPU) against HF's ``act_fn(gate) * up``."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels.dispatch import backend
from bezoar_kernels.swiglu import swiglu, swiglu_reference
from tests.kernels.layer_checks import check_against_reference, check_bf16_against_fp32, leaves

SHAPES = [(37, 61), (2, 17, 100), (1, 1030)]


def _inputs(shape, dtype, device="cpu"):
    gate = (torch.randn(shape) * 3).to(device, dtype)
    up = torch.randn(shape).to(device, dtype)
    return leaves(gate, up)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_matches_reference(shape, dtype):
    gate, up = _inputs(shape, dtype)
    check_against_reference(swiglu, swiglu_reference, [gate, up], ["out", "dgate", "dup"], dtype)


def test_swiglu_on_halves_of_a_fused_projection():
    """gate and up as the two halves of one (B, T, 2I) output: row-strided views."""
    (gate_up,) = leaves(torch.randn(2, 19, 2 * 61) * 2)

    def split(t):
        return t[..., :61], t[..., 61:]

    check_against_reference(lambda t: swiglu(*split(t)), lambda t: swiglu_reference(*split(t)), [gate_up],
                            ["out", "dgate_up"], torch.float32)


def test_reference_is_transformers_activation():
    from transformers.activations import ACT2FN

    gate, up = torch.randn(5, 33).half(), torch.randn(5, 33).half()
    assert torch.equal(swiglu_reference(gate, up), ACT2FN["silu"](gate) * up)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with backend("triton"):
        assert swiglu(torch.randn(0, 4), torch.randn(0, 4)).shape == (0, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 8640), (2, 37, 61)])
def test_bf16_gpu_within_twice_reference_error(shape):
    gate, up = _inputs(shape, torch.bfloat16, device="cuda")
    check_bf16_against_fp32(swiglu, swiglu_reference, [gate, up], ["out", "dgate", "dup"])
