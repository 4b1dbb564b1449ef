"""Fused linear + cross-entropy and per-token log-probs: Triton (interpreter) against F.linear + fp32 CE."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F

import bezoar_kernels.cross_entropy as ce
from bezoar_kernels.dispatch import backend
from tests.kernels.layer_checks import check_against_reference, check_bf16_against_fp32, leaves
from tests.utils import assert_close

IGNORE = -100
# (N, C, V)
SHAPES = [(37, 61, 103), (17, 100, 257)]


def _inputs(N, C, V, dtype, weight_grad, device="cpu", ignore_every=5):
    hidden = torch.randn(N, C).to(device, dtype)
    weight = (torch.randn(V, C) * C ** -0.5 * 3).to(device, dtype)
    labels = torch.randint(0, V, (N,))
    labels[::ignore_every] = IGNORE
    (hidden,) = leaves(hidden)
    (weight,) = leaves(weight, requires_grad=weight_grad)
    return hidden, weight, labels.to(device)


@pytest.fixture
def small_vocab_blocks(monkeypatch):
    """Vocabulary blocks of 64 so that V = 257 takes several steps of the online softmax."""
    monkeypatch.setattr(ce, "MAX_BLOCK_V", 64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_cross_entropy_matches_reference(shape, dtype, reduction, weight_grad):
    hidden, weight, labels = _inputs(*shape, dtype, weight_grad)
    names = ["loss", "dhidden"] + (["dweight"] if weight_grad else [])
    n = shape[0]
    check_against_reference(
        lambda h, w: ce.linear_cross_entropy(h, w, labels, IGNORE, reduction, chunk_tokens=16),
        lambda h, w: ce.linear_cross_entropy_reference(h, w, labels, IGNORE, reduction),
        [hidden, weight], names, dtype, rows={"loss": n, "dweight": n},
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_token_logprobs_matches_reference(shape, dtype, weight_grad):
    """Per-token upstream gradients are random: the backward must not assume a scalar loss."""
    hidden, weight, labels = _inputs(*shape, dtype, weight_grad)
    names = ["logprobs", "dhidden"] + (["dweight"] if weight_grad else [])
    (logp,), _ = check_against_reference(
        lambda h, w: ce.linear_token_logprobs(h, w, labels, IGNORE, chunk_tokens=16),
        lambda h, w: ce.linear_token_logprobs_reference(h, w, labels, IGNORE),
        [hidden, weight], names, dtype, rows={"dweight": shape[0]},
    )
    assert logp.dtype == torch.float32
    assert torch.all(logp[labels == IGNORE] == 0) and torch.all(logp[labels != IGNORE] < 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vocabulary_in_several_blocks(dtype, small_vocab_blocks):
    """One row per program, the online logsumexp carried across blocks of the vocabulary."""
    hidden, weight, labels = _inputs(17, 100, 257, dtype, True)
    check_against_reference(
        lambda h, w: ce.linear_cross_entropy(h, w, labels, IGNORE, "mean", chunk_tokens=8),
        lambda h, w: ce.linear_cross_entropy_reference(h, w, labels, IGNORE, "mean"),
        [hidden, weight], ["loss", "dhidden", "dweight"], dtype, rows={"loss": 17, "dweight": 17},
    )
    check_against_reference(
        lambda h, w: ce.linear_token_logprobs(h, w, labels, IGNORE, chunk_tokens=8),
        lambda h, w: ce.linear_token_logprobs_reference(h, w, labels, IGNORE),
        [hidden, weight], ["logprobs", "dhidden", "dweight"], dtype, rows={"dweight": 17},
    )


def test_default_chunking_and_block_size():
    hidden, weight, labels = _inputs(37, 61, 257, torch.float32, True)
    check_against_reference(
        lambda h, w: ce.linear_cross_entropy(h, w, labels, IGNORE, "mean"),
        lambda h, w: ce.linear_cross_entropy_reference(h, w, labels, IGNORE, "mean"),
        [hidden, weight], ["loss", "dhidden", "dweight"], torch.float32, rows={"loss": 37, "dweight": 37},
    )


def test_batched_leading_dims():
    hidden, weight, labels = _inputs(2 * 13, 61, 103, torch.float32, False)
    hidden3 = hidden.detach().view(2, 13, 61).requires_grad_()
    check_against_reference(
        lambda h, w: ce.linear_token_logprobs(h, w, labels.view(2, 13), IGNORE, chunk_tokens=8),
        lambda h, w: ce.linear_token_logprobs_reference(h, w, labels.view(2, 13), IGNORE),
        [hidden3, weight], ["logprobs", "dhidden"], torch.float32,
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_tokens_ignored_gives_zero_loss_and_grads(reduction):
    hidden, weight, _ = _inputs(9, 61, 103, torch.float32, True)
    labels = torch.full((9,), IGNORE)
    for op in (ce.linear_cross_entropy, ce.linear_cross_entropy_reference):
        with backend("triton"):
            loss = op(hidden, weight, labels, IGNORE, reduction)
        dh, dw = torch.autograd.grad(loss, [hidden, weight])
        assert loss.item() == 0.0 and not torch.isnan(loss)
        assert torch.count_nonzero(dh) == 0 and torch.count_nonzero(dw) == 0


def test_no_grad_forward_equals_reference():
    hidden, weight, labels = _inputs(37, 61, 103, torch.float32, True)
    with torch.no_grad(), backend("triton"):
        loss = ce.linear_cross_entropy(hidden, weight, labels, IGNORE, "mean", chunk_tokens=16)
        logp = ce.linear_token_logprobs(hidden, weight, labels, IGNORE, chunk_tokens=16)
    assert not loss.requires_grad and not logp.requires_grad
    with torch.no_grad():
        want = ce.linear_cross_entropy_reference(hidden, weight, labels, IGNORE, "mean")
        assert_close(loss, want, 1e-5, 1e-5, "loss")
        assert_close(logp, ce.linear_token_logprobs_reference(hidden, weight, labels, IGNORE), 1e-5, 1e-5, "logp")


@pytest.mark.parametrize("op", ["cross_entropy", "token_logprobs"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_fp32_operands_under_autocast_match_the_autocast_reference(op, weight_grad):
    """An fp32 model trained under autocast (the GPU DPO test found this): the Triton path runs the
    logits in the autocast dtype, as F.linear would, and hands fp32 gradients back to fp32 leaves."""
    hidden, weight, labels = _inputs(37, 61, 103, torch.float32, weight_grad)
    upstream = torch.randn(37)
    if op == "cross_entropy":
        def run(fn, h, w):
            return fn(h, w, labels, IGNORE, "mean")
        fused, reference = functools.partial(ce.linear_cross_entropy, chunk_tokens=16), ce.linear_cross_entropy_reference
    else:
        def run(fn, h, w):
            return (fn(h, w, labels, IGNORE) * upstream).sum()
        fused, reference = functools.partial(ce.linear_token_logprobs, chunk_tokens=16), ce.linear_token_logprobs_reference
    wrt = [hidden, weight] if weight_grad else [hidden]
    results = {}
    for name, fn in (("fused", fused), ("reference", reference)):
        with backend("triton"), torch.autocast("cpu", dtype=torch.float16):
            out = run(fn, hidden, weight)
        results[name] = (out, *torch.autograd.grad(out, wrt))
    assert all(g.dtype == torch.float32 for g in results["fused"][1:])
    for what, got, want in zip(["value", "dhidden", "dweight"], results["fused"], results["reference"]):
        assert_close(got, want, 2e-3, 1e-2, what)
    # the torch backend takes the same mixed operands (F.linear under autocast would)
    with backend("torch"), torch.autocast("cpu", dtype=torch.float16):
        assert_close(run(fused, hidden.half(), weight), results["reference"][0], 2e-3, 1e-2, "torch backend")
    with torch.autocast("cpu", dtype=torch.float16):  # as autocast itself, float64 is left alone
        h64, w64, on = ce._autocast_operands(hidden.double(), weight.double())
    assert on and h64.dtype == w64.dtype == torch.float64
    # and it really ran in half precision: the fp32 result differs by more than fp16 rounding allows for
    with backend("triton"):
        exact = run(fused, hidden, weight)
    assert (exact - results["fused"][0]).abs().item() > 1e-6


def test_logits_never_exceed_one_chunk(monkeypatch):
    """Every logits buffer the Triton path makes has at most chunk_tokens rows, forward and backward."""
    hidden, weight, labels = _inputs(37, 61, 103, torch.float32, True)
    rows_seen = []

    def recording_linear(x, w):
        out = F.linear(x, w)
        rows_seen.append(out.shape[0])
        return out

    monkeypatch.setattr(ce, "F", types.SimpleNamespace(linear=recording_linear))
    with backend("triton"):
        loss = ce.linear_cross_entropy(hidden, weight, labels, IGNORE, "sum", chunk_tokens=8)
        logp = ce.linear_token_logprobs(hidden, weight, labels, IGNORE, chunk_tokens=8)
    torch.autograd.grad(loss + logp.sum(), [hidden, weight])
    assert rows_seen and max(rows_seen) <= 8 and sum(rows_seen) >= 3 * 37


def test_chunk_size_follows_vocabulary():
    assert ce.chunk_tokens_for(32768, 32000, 2) == 4096
    assert ce.chunk_tokens_for(100, 32000, 2) == 100
    assert ce.chunk_tokens_for(32768, 32000, 4) == 2048
    assert ce.chunk_tokens_for(10**6, 10**9, 4) == 1


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels = _inputs(5, 61, 103, torch.float32, False)
    with pytest.raises(ValueError, match="reduction"):
        ce.linear_cross_entropy(hidden, weight, labels, IGNORE, "max")
    with pytest.raises(ValueError, match="labels"):
        ce.linear_cross_entropy(hidden, weight, labels[:4])
    bad = labels.clone()
    bad[1] = 103
    with backend("triton"), pytest.raises(ValueError, match="outside the vocabulary"):
        ce.linear_token_logprobs(hidden, weight, bad, IGNORE)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 3200, 32000), (37, 61, 257)])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_bf16_gpu_within_twice_reference_error(shape, weight_grad):
    hidden, weight, labels = _inputs(*shape, torch.bfloat16, weight_grad, device="cuda")
    extra = ["dweight"] if weight_grad else []
    for reduction in ("sum", "mean"):
        check_bf16_against_fp32(
            lambda h, w: ce.linear_cross_entropy(h, w, labels, IGNORE, reduction, chunk_tokens=1024),
            lambda h, w: ce.linear_cross_entropy_reference(h, w, labels, IGNORE, reduction),
            [hidden, weight], ["loss", "dhidden"] + extra,
        )
    check_bf16_against_fp32(
        lambda h, w: ce.linear_token_logprobs(h, w, labels, IGNORE, chunk_tokens=1024),
        lambda h, w: ce.linear_token_logprobs_reference(h, w, labels, IGNORE),
        [hidden, weight], ["logprobs", "dhidden"] + extra,
    )


def test_int32_labels_bad_chunks_and_the_callers_name_in_errors():
    """The torch reference refused int32 labels the Triton path takes; a negative chunk_tokens returned
    uninitialised memory as the loss; linear_token_logprobs' errors named linear_cross_entropy."""
    hidden, weight, labels = _inputs(11, 16, 40, torch.float32, False)
    want = ce.linear_cross_entropy_reference(hidden, weight, labels, IGNORE)
    for impl in ("torch", "triton"):
        with backend(impl):
            assert_close(ce.linear_cross_entropy(hidden, weight, labels.int(), IGNORE), want, rtol=1e-5, atol=1e-4)
            assert_close(ce.linear_token_logprobs(hidden, weight, labels.int(), IGNORE),
                         ce.linear_token_logprobs_reference(hidden, weight, labels, IGNORE), rtol=1e-5, atol=1e-5)
            for bad in (-1, 0, 2.5):
                with pytest.raises(ValueError, match=r"linear_cross_entropy: chunk_tokens must be a positive int"):
                    ce.linear_cross_entropy(hidden, weight, labels, IGNORE, chunk_tokens=bad)
            with pytest.raises(ValueError, match=r"linear_token_logprobs: chunk_tokens must be a positive int"):
                ce.linear_token_logprobs(hidden, weight, labels, IGNORE, chunk_tokens=-3)
            out_of_range = labels.clone()
            out_of_range[1] = 40
            with pytest.raises(ValueError, match=r"^linear_token_logprobs: label 40 is outside the vocabulary"):
                ce.linear_token_logprobs(hidden, weight, out_of_range, IGNORE)
