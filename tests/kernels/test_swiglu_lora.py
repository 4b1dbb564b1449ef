"""SwiGLU fused with the LoRA down projection (kernels/swiglu_lora.py): Triton (the interpreter on CPU)
against the torch reference and against swiglu then the separate concat LoRA call, forward and backward."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels import lora as L
from bezoar_kernels import nf4
from bezoar_kernels import swiglu_lora as SL
from bezoar_kernels.dispatch import backend
from bezoar_kernels.swiglu import swiglu
from tests.utils import TOLERANCES, assert_close


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(n, f, r, m, kind, dtype):
    w = torch.randn(n, f, generator=_gen(1)) * 0.05
    weight = nf4.quantize_nf4_reference(w, 64, True) if kind == "nf4" else w.to(dtype)
    a = torch.randn(r, f, generator=_gen(2)) * 0.1
    b = torch.randn(n, r, generator=_gen(3)) * 0.1
    gate = (torch.randn(m, f, generator=_gen(4)) * 2).to(dtype)
    up = torch.randn(m, f, generator=_gen(5)).to(dtype)
    dy = torch.randn(m, n, generator=_gen(6)).to(dtype)
    return weight, a, b, gate, up, dy


def _run(fn, gate, up, a, b, dy):
    gate = gate.clone().requires_grad_(True)
    up = up.clone().requires_grad_(True)
    a = a.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    y = fn(gate, up, a, b)
    y.backward(dy)
    return y.detach(), [gate.grad, up.grad, a.grad, b.grad]


CASES = [
    # kind, dtype, N, F, r, M
    ("nf4", torch.float32, 40, 192, 8, 37),
    ("nf4", torch.float16, 24, 128, 16, 20),
    ("dense", torch.float16, 30, 100, 5, 17),
    ("dense", torch.float32, 16, 72, 33, 1),
]


@pytest.mark.parametrize("kind,dtype,n,f,r,m", CASES)
def test_fused_swiglu_lora_matches_reference_and_separate_calls(monkeypatch, kind, dtype, n, f, r, m):
    """y, dgate, dup, dA and dB of the fused call equal the torch reference (HF's SwiGLU, PEFT's LoRA)
    within the dtype's tolerance and the separate Triton calls (swiglu, then the concat LoRA path), in fp32
    more tightly; the fused kernels are the ones that ran. F off BLOCK_K, r off 16 (33: R_PAD 64), M = 1."""
    ran = []
    monkeypatch.setattr(SL, "_swiglu_lora_forward", lambda *a, _f=SL._swiglu_lora_forward: ran.append("f") or _f(*a))
    monkeypatch.setattr(SL, "_swiglu_lora_backward",
                        lambda *a, _f=SL._swiglu_lora_backward: ran.append("b") or _f(*a))
    weight, a, b, gate, up, dy = _case(n, f, r, m, kind, dtype)
    p, seed, s = 0.3, 11, 0.75

    def fused(g, u, a, b):
        with backend("triton"):
            return SL.swiglu_lora(g, u, weight, a, b, s, p, True, seed)

    def separate(name):
        def fn(g, u, a, b):
            with backend(name):
                act = swiglu(g, u)
                if name == "triton":
                    return L.lora_linear_triton(act, weight, a, b, s, p, True, seed, "concat")
                return L.lora_linear_reference(act, weight, a, b, s, p, True, seed)
        return fn

    got = _run(fused, gate, up, a, b, dy)
    assert ran == ["f", "b"]
    atol, rtol = TOLERANCES[dtype]
    near_scale = 0.25 if dtype == torch.float32 else 1.0
    for want, scale, what in ((_run(separate("torch"), gate, up, a, b, dy), 1.0, "reference"),
                              (_run(separate("triton"), gate, up, a, b, dy), near_scale, "separate triton")):
        assert got[0].dtype == want[0].dtype == dtype
        assert_close(got[0], want[0], atol * scale, rtol * scale, name=f"{what} y")
        for i, name in enumerate(("dgate", "dup")):
            assert_close(got[1][i], want[1][i], atol * scale, rtol * scale, name=f"{what} {name}")
        for i, name in ((2, "dA"), (3, "dB")):
            bound = atol * max(1.0, m ** 0.5) + rtol * want[1][i].abs().max().item()
            assert_close(got[1][i], want[1][i], bound * scale, rtol * scale, name=f"{what} {name}")


@pytest.mark.parametrize("align", [64, 128])
def test_fused_forward_zeros_the_columns_past_the_lora_block(monkeypatch, align):
    """With ``lora.concat_align`` above r16 the SwiGLU kernel's [act | xa | zeros] operand is that much
    wider and every column of it written (it starts as NaN here): the fused call still equals the
    reference and, to fp32 rounding, itself at align 16."""
    from tests.kernels.test_lora import nan_wide_inputs

    n, f, r, m = 40, 192, 8, 37
    weight, a, b, gate, up, dy = _case(n, f, r, m, "nf4", torch.float32)

    def fused(g, u, a, b):
        with backend("triton"):
            return SL.swiglu_lora(g, u, weight, a, b, 0.75, 0.3, True, 11)

    def reference(g, u, a, b):
        with backend("torch"):
            return L.lora_linear_reference(swiglu(g, u), weight, a, b, 0.75, 0.3, True, 11)

    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", "16")
    at16 = _run(fused, gate, up, a, b, dy)
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", str(align))
    widths = nan_wide_inputs(monkeypatch, [L, SL])
    got = _run(fused, gate, up, a, b, dy)
    want = _run(reference, gate, up, a, b, dy)
    assert widths == [f + align]
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(got[0], want[0], atol, rtol, name="reference y")
    assert_close(got[0], at16[0], 1e-5, 1e-5, name="align 16 y")
    for i, name in enumerate(("dgate", "dup", "dA", "dB")):
        bound = atol * m ** 0.5 + rtol * want[1][i].abs().max().item()
        assert_close(got[1][i], want[1][i], bound, rtol, name=f"reference {name}")
        assert_close(got[1][i], at16[1][i], 1e-5, 1e-5, name=f"align 16 {name}")


@pytest.mark.parametrize("frozen", ["gate_up", "a", "b", "up"])
def test_strided_inputs_leading_dims_and_frozen_parts(monkeypatch, frozen):
    """gate and up as column slices of one (B, T, 2F) buffer (what the fused gate/up call returns), with
    parts frozen: gate and up frozen (g from one pass over dy, not the wide dx GEMM), A or B frozen, or
    up alone. Gradients equal swiglu then the separate concat LoRA call, and None where nothing trains."""
    wide_gemm = []
    monkeypatch.setattr(SL, "_concat_backward", lambda *a, _f=SL._concat_backward: wide_gemm.append(1) or _f(*a))
    n, f, r = 24, 128, 17
    weight, a0, b0, _, _, _ = _case(n, f, r, 1, "nf4", torch.float32)
    both = torch.randn(2, 7, 2 * f, generator=_gen(8))
    dy = torch.randn(2, 7, n, generator=_gen(9))

    def run(fused):
        buf = both.clone().requires_grad_(frozen != "gate_up")
        gate, up = buf[..., :f], buf[..., f:]
        if frozen == "up":
            up = up.detach()
        a = a0.clone().requires_grad_(frozen != "a")
        b = b0.clone().requires_grad_(frozen != "b")
        with backend("triton"):
            y = (SL.swiglu_lora(gate, up, weight, a, b, 0.5, 0.2, True, 4) if fused else
                 L.lora_linear_triton(swiglu(gate, up), weight, a, b, 0.5, 0.2, True, 4, "concat"))
        y.backward(dy)
        return y.detach(), [buf.grad, a.grad, b.grad]

    got = run(True)
    assert wide_gemm == ([] if frozen == "gate_up" else [1])
    want = run(False)
    assert_close(got[0], want[0], 1e-5, 1e-5, name="y")
    for i, (x, w) in enumerate(zip(got[1], want[1])):
        if w is None:
            assert x is None, i
        else:
            assert_close(x, w, 1e-4, 1e-5, name=f"grad {i}")


def test_falls_back_and_checks_inputs(monkeypatch):
    ran = []
    monkeypatch.setattr(SL, "_swiglu_lora_forward", lambda *a, _f=SL._swiglu_lora_forward: ran.append(1) or _f(*a))
    weight, a, b, gate, up, dy = _case(16, 128, 4, 9, "nf4", torch.float32)
    ad = L.Adapter(a, b, 1.0)
    with backend("triton"):
        assert SL.swiglu_lora_ok(gate, up, weight, ad, 0.1, True)
        assert not SL.swiglu_lora_ok(gate, up, weight, ad, 0.0, True)
        assert not SL.swiglu_lora_ok(gate, up, weight, ad, 0.1, False)
        assert not SL.swiglu_lora_ok(gate, up.half(), weight, ad, 0.1, True)
        y = SL.swiglu_lora(gate, up, weight, a, b, 1.0, 0.0, True, 3)
    assert ran == []
    with backend("torch"):
        want = SL.swiglu_lora_reference(gate, up, weight, ad, 0.0, True, 3)
    assert torch.equal(y, want)
    with pytest.raises(ValueError, match="must match"):
        SL.swiglu_lora(gate, up[:, :64], weight, a, b, 1.0, 0.1, True, 3)
    with pytest.raises(ValueError, match="lora_A 0 has shape"):
        SL.swiglu_lora(gate, up, weight, a[:, :64], b, 1.0, 0.1, True, 3)


@pytest.mark.gpu
def test_fused_swiglu_lora_on_gpu_matches_separate_calls():
    """3B down_proj shapes in bf16 on CUDA: equal to swiglu then the separate concat LoRA call."""
    dev = "cuda"
    n, f, r, m = 3200, 8640, 16, 4096
    weight = nf4.quantize_nf4(torch.randn(n, f, device=dev) * 0.02, 64, True)
    a0 = torch.randn(r, f, device=dev) * 0.02
    b0 = torch.randn(n, r, device=dev) * 0.02
    gate = torch.randn(m, f, device=dev, dtype=torch.bfloat16)
    up = torch.randn(m, f, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    got = _run(lambda g, u, a, b: SL.swiglu_lora(g, u, weight, a, b, 1.0, 0.05, True, 5), gate, up, a0, b0, dy)
    want = _run(lambda g, u, a, b: L.lora_linear_triton(swiglu(g, u), weight, a, b, 1.0, 0.05, True, 5, "concat"),
                gate, up, a0, b0, dy)
    assert_close(got[0].float(), want[0].float(), 2e-2, 2e-2, name="y")
    for i, name in enumerate(("dgate", "dup")):
        assert_close(got[1][i].float(), want[1][i].float(), 2e-2, 2e-2, name=name)
    for i, name in ((2, "dA"), (3, "dB")):
        assert_close(got[1][i], want[1][i], 1e-2 * want[1][i].abs().max().item(), 1e-2, name=name)
