"""The decode step's attention kernel (one query token per row over a KV cache) against SDPA."""

from __future__ import annotations

import pytest
import torch

import bezoar_kernels.decode_attention as da
from bezoar_kernels.dispatch import backend
from tests.utils import assert_close

TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3)}


def _inputs(b, s, hq, hk, d, dtype, seed=0, cache_len=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
    # k/v as the static cache hands them over: views of the first s slots of a longer buffer
    cache_len = cache_len or s + 7
    k = torch.randn(b, cache_len, hk, d, generator=g).to(dtype)[:, :s]
    v = torch.randn(b, cache_len, hk, d, generator=g).to(dtype)[:, :s]
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,s,hq,hk,d", [(1, 1, 4, 4, 16), (2, 37, 4, 2, 10), (3, 100, 6, 6, 100), (1, 256, 2, 1, 64)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa(b, s, hq, hk, d, dtype, masked):
    q, k, v = _inputs(b, s, hq, hk, d, dtype)
    mask = None
    if masked:  # left padding and unused slots, as the static cache's key_valid has them; the last key visible
        g = torch.Generator().manual_seed(1)
        mask = (torch.rand(b, s, generator=g) > 0.4)
        mask[:, -1] = True
        mask = mask[:, None, None, :]
    want = da.decode_attention_reference(q.float(), k.float(), v.float(), mask)
    with backend("triton"):
        got = da.decode_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == (b, 1, hq, d)
    assert_close(got.float(), want, *TOLERANCES[dtype], name=f"decode attention {dtype}")


def test_whole_masked_blocks_and_scale():
    """Keys visible only in the last of several blocks (the first blocks contribute nothing, no NaN), and
    an explicit scale."""
    q, k, v = _inputs(2, 70, 2, 2, 16, torch.float32, seed=3)
    mask = torch.zeros(2, 1, 1, 70, dtype=torch.bool)
    mask[..., 65:] = True
    want = da.decode_attention_reference(q, k, v, mask, scale=0.3)
    with backend("triton"):
        got = da.decode_attention(q, k, v, mask, scale=0.3)
    assert not torch.isnan(got).any()
    assert_close(got, want, 2e-5, 2e-5, name="late keys only")


def test_bad_inputs_and_choice(monkeypatch):
    q, k, v = _inputs(1, 5, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="one token per row"):
        da.decode_attention(torch.cat([q, q], 1), k, v)
    with pytest.raises(ValueError, match="mask must be bool"):
        da.decode_attention(q, k, v, torch.ones(1, 1, 1, 5))
    with pytest.raises(ValueError, match="divides"):
        da.decode_attention(torch.randn(1, 1, 3, 8), k, v)
    monkeypatch.delenv("BEZOAR_DECODE_ATTENTION", raising=False)
    assert da.choice() == da.DEFAULT == "triton"  # the default since the H100 timing of 2026-11-27
    with backend("triton"):
        assert da.enabled(q)
    monkeypatch.setenv("BEZOAR_DECODE_ATTENTION", "sdpa")
    with backend("triton"):
        assert not da.enabled(q)
    monkeypatch.setenv("BEZOAR_DECODE_ATTENTION", "triton")
    with backend("triton"):
        assert da.enabled(q) and not da.enabled(torch.cat([q, q], 1))
    with backend("torch"):
        assert not da.enabled(q)
    with backend("triton"):  # no backward: a query that needs a gradient stays on SDPA
        assert not da.enabled(q.clone().requires_grad_(True))
        with torch.no_grad():
            assert da.enabled(q.clone().requires_grad_(True))
    monkeypatch.setenv("BEZOAR_DECODE_ATTENTION", "flash")
    with pytest.raises(ValueError, match="BEZOAR_DECODE_ATTENTION"):
        da.choice()


@pytest.mark.gpu
@pytest.mark.parametrize("s", [1, 200, 2048])
def test_bf16_on_gpu_matches_fp32_sdpa(s):
    """OpenLLaMA 3B's heads (32 x 100) in bf16 against fp32 SDPA on the same bf16 values."""
    q, k, v = _inputs(4, s, 32, 32, 100, torch.bfloat16)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    mask = torch.ones(4, 1, 1, s, dtype=torch.bool, device="cuda")
    mask[0, ..., : s // 2] = False  # a left-padded row
    mask[..., -1] = True
    want = da.decode_attention_reference(q.float(), k.float(), v.float(), mask)
    got = da.decode_attention(q, k, v, mask)
    assert_close(got.float(), want, 1e-2, 1e-2, name="bf16 decode attention")


@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_keys_are_joined_exactly(splits, dtype):
    """Key ranges as separate programs (flash-decoding), joined by the second kernel: ranges that are
    ragged, and one whose keys are all masked, give the one-program result."""
    q, k, v = _inputs(2, 83, 4, 2, 100, dtype, seed=5)
    mask = torch.ones(2, 1, 1, 83, dtype=torch.bool)
    mask[0, ..., :40] = False  # row 0: the first range(s) see nothing
    want = da.decode_attention_reference(q.float(), k.float(), v.float(), mask)
    with backend("triton"):
        one = da.decode_attention_triton(q, k, v, mask, splits=1)
        got = da.decode_attention_triton(q, k, v, mask, splits=splits)
    assert not torch.isnan(got).any()
    assert_close(got.float(), want, *TOLERANCES[dtype], name=f"{splits} splits")
    assert_close(got.float(), one.float(), *TOLERANCES[dtype], name=f"{splits} splits vs one")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_no_keys_is_one_clear_error(impl):
    """S = 0 died in the Triton path with a bare ZeroDivisionError; both paths now say what is wrong."""
    q, k, v = _inputs(1, 5, 4, 2, 8, torch.float32)
    with backend(impl), pytest.raises(ValueError, match=r"hold no keys \(S = 0\)"):
        da.decode_attention(q, k[:, :0], v[:, :0])
