"""Rotary embedding on q and k: tables and reference against transformers, Triton against the reference."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels.dispatch import backend
from bezoar_kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from tests.kernels.layer_checks import check_against_reference, check_bf16_against_fp32, leaves

# (B, T, Hq, Hk, D)
SHAPES = [(2, 37, 3, 3, 100), (1, 17, 4, 2, 64), (3, 5, 1, 1, 6)]


def _packed_positions(B, T):
    """Position ids that restart per document, as packing produces them."""
    pos = torch.empty(B, T, dtype=torch.long)
    for b in range(B):
        cuts = sorted(torch.randperm(T - 1)[: 2 + b].add(1).tolist())
        starts = [0] + cuts
        for i, s in enumerate(starts):
            e = starts[i + 1] if i + 1 < len(starts) else T
            pos[b, s:e] = torch.arange(e - s)
    return pos


def _inputs(B, T, Hq, Hk, D, dtype, device="cpu"):
    q = torch.randn(B, T, Hq, D).to(device, dtype)
    k = torch.randn(B, T, Hk, D).to(device, dtype)
    q, k = leaves(q, k)
    cos, sin = rope_cos_sin(_packed_positions(B, T).to(device), D, 10000.0)
    return q, k, cos, sin


def test_tables_match_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=3200, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=2048, rope_theta=10000.0)
    rotary = LlamaRotaryEmbedding(config)
    pos = torch.cat([torch.arange(2048)[None], _packed_positions(1, 2048)])
    x = torch.zeros(1, dtype=torch.float32)
    cos_hf, sin_hf = rotary(x, pos)
    cos, sin = rope_cos_sin(pos, 100, 10000.0)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, 2048, 50)
    assert torch.equal(torch.cat((cos, cos), -1), cos_hf)
    assert torch.equal(torch.cat((sin, sin), -1), sin_hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_is_transformers_apply_rotary(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin = _inputs(2, 9, 4, 2, 100, dtype)
    full_cos, full_sin = torch.cat((cos, cos), -1).to(dtype), torch.cat((sin, sin), -1).to(dtype)
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
    q_out, k_out = apply_rope_reference(q, k, cos, sin)
    assert torch.equal(q_out, q_hf.transpose(1, 2))
    assert torch.equal(k_out, k_hf.transpose(1, 2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_matches_reference(shape, dtype):
    q, k, cos, sin = _inputs(*shape, dtype)
    check_against_reference(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_reference(q, k, cos, sin),
                            [q, k], ["q_out", "k_out", "dq", "dk"], dtype)


def test_rope_on_views_of_a_fused_qkv_output():
    """q and k as slices of one (B, T, (Hq + 2 Hk) D) projection: strided heads, no copies needed."""
    B, T, Hq, Hk, D = 2, 19, 4, 2, 64
    qkv = leaves(torch.randn(B, T, (Hq + 2 * Hk) * D))[0]
    cos, sin = rope_cos_sin(_packed_positions(B, T), D, 10000.0)

    def split(t):
        q = t[..., : Hq * D].view(B, T, Hq, D)
        k = t[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
        return q, k

    check_against_reference(lambda t: apply_rope(*split(t), cos, sin),
                            lambda t: apply_rope_reference(*split(t), cos, sin),
                            [qkv], ["q_out", "k_out", "dqkv"], torch.float32)


def test_rotation_preserves_norm_and_inverts():
    q, k, cos, sin = _inputs(1, 13, 2, 2, 100, torch.float32)
    with backend("triton"):
        q_out, _ = apply_rope(q, k, cos, sin)
        back, _ = apply_rope(q_out, k, cos, -sin)
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(back, q.detach())


def test_bad_inputs_raise_clear_errors():
    q, k, cos, sin = _inputs(1, 5, 2, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="half tables"):
        apply_rope(q, k, torch.cat((cos, cos), -1), sin)
    with pytest.raises(ValueError, match="does not match"):
        apply_rope(q, k[:, :4], cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope_cos_sin(torch.zeros(1, 3, dtype=torch.long), 7, 10000.0)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 2048, 32, 32, 100), (2, 37, 4, 2, 64)])
def test_bf16_gpu_within_twice_reference_error(shape):
    q, k, cos, sin = _inputs(*shape, torch.bfloat16, device="cuda")
    check_bf16_against_fp32(lambda q, k: apply_rope(q, k, cos, sin), lambda q, k: apply_rope_reference(q, k, cos, sin),
                            [q, k], ["q_out", "k_out", "dq", "dk"])
