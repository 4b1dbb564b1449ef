"""GPUs below the H100/H200 bezoar was measured on (review of the GPU paths): on CPU, with torch.cuda's device
queries answered as a T4 (sm_75), an A100 (sm_80) or an RTX 4090 (sm_89) answers them."""

from __future__ import annotations

import warnings

import pytest
import torch

from bezoar_kernels import dispatch, launch, lora

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Sets the device queries' answers: ``gpu(capability, shared_per_block)``."""
    def set_gpu(capability, shared=166912):
        launch._capability_of.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(launch, "_shared_per_block_of", lambda index: shared)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        dispatch._WARNED_OLD_GPU.clear()

    yield set_gpu
    launch._capability_of.cache_clear()


def test_half_precision_is_fp16_where_bf16_is_only_emulated(gpu):
    """torch.cuda.is_bf16_supported() says yes on a T4 (bf16 emulated, no tensor cores): precision 'auto' took
    bf16 and never fp16 with loss scaling, and models loaded in bf16."""
    from bezoar.model.checkpoint import default_dtype
    from bezoar.model.config import LlamaConfig
    from bezoar.train.loop import resolve_precision

    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
    for capability, half, scaled in (((7, 5), torch.float16, True), ((7, 0), torch.float16, True),
                                     ((8, 0), torch.bfloat16, False), ((8, 9), torch.bfloat16, False)):
        gpu(capability)
        assert resolve_precision("auto", CUDA) == (half, scaled), capability
        assert default_dtype("nf4", config, CUDA) == half, capability
        assert default_dtype(None, config, CUDA) == half, capability
    gpu((7, 5))
    assert resolve_precision("bf16", CUDA) == (torch.bfloat16, False)  # asked for: as asked
    config.torch_dtype = "float32"
    assert default_dtype(None, config, CUDA) == torch.float32
    assert default_dtype("nf4", config, torch.device("cpu")) == torch.float32


def test_the_g_db_kernel_takes_row_blocks_its_shared_memory_fits(gpu):
    """The 256-row g + dB build needs 80-96 KB of shared memory on sm_75, whose blocks hold 64 KB: every SFT step
    at 16K tokens with dropout would have failed there at the first backward."""
    for shared, m, want in ((65536, 16384, 128), (101376, 16384, 256), (166912, 16384, 256), (65536, 4096, 128),
                            (232448, 2048, 128)):
        gpu((8, 6), shared)
        assert lora._g_db_block_m(m, CUDA) == want, (shared, m)
    gpu((7, 0), 98304)  # a V100: its 96 KB is the 256-row build's own need at r_pad 32
    assert lora._g_db_block_m(16384, CUDA) == 128
    assert lora._g_db_block_m(16384, torch.device("cpu")) == 256


def test_the_chunked_reference_cross_entropy_equals_the_reference():
    """On a GPU below sm_80 the SFT loss runs the reference, which built the whole batch's fp32 logits (2 GB at 16K
    tokens and a 32K vocabulary); there it takes chunks of rows, each recomputed in the backward."""
    from bezoar_kernels.cross_entropy import _linear_cross_entropy_chunked_reference, linear_cross_entropy_reference

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[0, :5] = -100
    for reduction in ("sum", "mean"):
        grads = []
        for fn, kwargs in ((linear_cross_entropy_reference, {}), (_linear_cross_entropy_chunked_reference,
                                                                   {"chunk_tokens": 10})):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            args = (h, w, labels, -100, reduction) + tuple(kwargs.values())
            loss = fn(*args)
            loss.backward()
            grads.append((loss.detach(), h.grad, w.grad))
        for want, got in zip(grads[0], grads[1]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a rank with no rows (all padding): a loss of 0 whose backward runs (it had no graph: backward raised)
    h, w = hidden[:0].clone().requires_grad_(), weight.clone().requires_grad_()
    loss = _linear_cross_entropy_chunked_reference(h, w, labels[:0], -100, "sum", 10)
    loss.backward()
    assert loss.item() == 0 and w.grad is not None and not w.grad.any()
    # fp16 inputs whose sum passes 65504: the zero was their sum times 0, inf * 0, a NaN loss
    h = (torch.randn(512, 64, generator=g) + 3).half()
    w = torch.randn(50, 64, generator=g).half() * 0.01
    y = torch.randint(0, 50, (512,), generator=g)
    want = linear_cross_entropy_reference(h.float(), w.float(), y)
    got = _linear_cross_entropy_chunked_reference(h, w, y, -100, "sum", 100)
    assert h.sum().isinf() and torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=1e-1, rtol=1e-3)


class _OnGPU:
    """What use_triton reads of a tensor: on CUDA device 0."""

    is_cuda = True
    device = CUDA


def test_auto_runs_the_torch_reference_below_sm_80_with_one_warning(gpu, monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    gpu((7, 5))
    with pytest.warns(UserWarning, match="below 8.0"):
        assert dispatch.use_triton(_OnGPU(), None) is False
    with dispatch.backend("triton"):
        assert dispatch.use_triton(_OnGPU()) is True  # forced: as asked
    gpu((8, 9))
    assert dispatch.use_triton(_OnGPU()) is True
    gpu((7, 5))
    with pytest.warns(UserWarning, match=r"compute capability 7.5 is below 8.0.*BEZOAR_KERNELS=triton"):
        assert dispatch.triton_supported(CUDA) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.triton_supported(CUDA) is False  # said once
    for capability in ((8, 0), (8, 9), (9, 0)):
        gpu(capability)
        assert dispatch.triton_supported(CUDA) is True
