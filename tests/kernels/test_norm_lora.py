"""RMSNorm fused with the LoRA projections that read it (kernels/norm_lora.py): Triton (the interpreter
on CPU) against the torch reference and against the separate Triton calls, forward and backward."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from bezoar_kernels import lora as L
from bezoar_kernels import nf4
from bezoar_kernels import norm_lora as NL
from bezoar_kernels.dispatch import backend
from bezoar_kernels.rmsnorm import rms_norm_add, rms_norm_keep
from tests.utils import TOLERANCES, assert_close


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _weights(ns, k, kind, dtype, blocksize=64):
    out = []
    for j, n in enumerate(ns):
        w = torch.randn(n, k, generator=_gen(10 + j)) * 0.05
        out.append(nf4.quantize_nf4_reference(w, blocksize, True) if kind == "nf4" else w.to(dtype))
    return out


def _adapters(ns, k, r, dtype=torch.float32):
    ads = []
    for j, n in enumerate(ns):
        g = _gen(20 + j)
        a = (torch.randn(r, k, generator=g) * 0.1).to(dtype)
        b = (torch.randn(n, r, generator=g) * 0.1).to(dtype)
        ads.append(L.Adapter(a, b, 0.5 + 0.25 * j))
    return ads


def _inputs(m, k, dtype, residual):
    x = torch.randn(m, k, generator=_gen(1)).to(dtype)
    res = torch.randn(m, k, generator=_gen(2)).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=_gen(3))).to(dtype)
    return x, res, nw


def _run(fn, x, res, nw, adapters, dys, ds):
    """Outputs, s, and grads (x, residual, then A_j, B_j) of ``fn`` under upstream dys and ds."""
    x = x.clone().requires_grad_(True)
    res = res.clone().requires_grad_(True) if res is not None else None
    ads = [L.Adapter(a.lora_a.clone().requires_grad_(True), a.lora_b.clone().requires_grad_(True), a.scaling)
           for a in adapters]
    outs, s = fn(x, res, nw, ads)
    torch.autograd.backward(list(outs) + [s], list(dys) + [ds])
    grads = [x.grad, res.grad if res is not None else None] + [t.grad for a in ads for t in (a.lora_a, a.lora_b)]
    return [o.detach() for o in outs], s.detach(), grads


def _fused(weights, p, seeds, training=True):
    def fn(x, res, nw, ads):
        with backend("triton"):
            return NL.rms_norm_lora(x, res, nw, 1e-6, weights, ads, p, training, seeds)
    return fn


def _separate(weights, p, seeds, name, path="concat"):
    """rms_norm_add / rms_norm_keep, then the LoRA projections, each its own call."""
    def fn(x, res, nw, ads):
        with backend(name):
            if res is not None:
                h, s = rms_norm_add(x, res, nw, 1e-6)
            else:
                h, s = rms_norm_keep(x, nw, 1e-6)
            if len(weights) == 3:
                outs = (L.lora_qkv_triton(h, weights, ads, p, True, seeds, path) if name == "triton"
                        else L.lora_qkv_reference(h, weights, ads, p, True, seeds))
            else:
                outs = tuple((L.lora_linear_triton(h, w, a.lora_a, a.lora_b, a.scaling, p, True, sd, path)
                              if name == "triton" else
                              L.lora_linear_reference(h, w, a.lora_a, a.lora_b, a.scaling, p, True, sd))
                             for w, a, sd in zip(weights, ads, seeds))
        return outs, s
    return fn


CASES = [
    # kind, dtype, projections' N, K, r, M, residual
    ("nf4", torch.float32, (48, 16, 16), 128, 8, 37, True),
    ("nf4", torch.float32, (40,), 192, 16, 20, False),
    ("nf4", torch.float16, (48, 16, 16), 128, 5, 33, True),
    ("dense", torch.float16, (24, 40), 100, 16, 17, True),
    ("dense", torch.float32, (30, 30, 30), 72, 3, 1, False),
]


@pytest.mark.parametrize("kind,dtype,ns,k,r,m,residual", CASES)
@pytest.mark.parametrize("p", [0.3])
def test_fused_norm_lora_matches_reference_and_separate_calls(monkeypatch, kind, dtype, ns, k, r, m, residual, p):
    """Outputs, s, dx, d(residual), dA and dB of the fused call equal the torch reference (PEFT's
    arithmetic after HF's RMSNorm) within the dtype's tolerance, and the separate Triton calls (norm, then
    the concat LoRA path), in fp32 more tightly; the fused kernels are the ones that ran."""
    ran = []
    monkeypatch.setattr(NL, "_norm_lora_forward", lambda *a, _f=NL._norm_lora_forward: ran.append("f") or _f(*a))
    monkeypatch.setattr(NL, "_norm_lora_backward", lambda *a, _f=NL._norm_lora_backward: ran.append("b") or _f(*a))
    weights = _weights(ns, k, kind, dtype)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, dtype, residual)
    dys = [torch.randn(m, n, generator=_gen(40 + j)).to(dtype) for j, n in enumerate(ns)]
    ds = torch.randn(m, k, generator=_gen(50)).to(dtype)
    seeds = [7, 8, 9][: len(ns)]
    got = _run(_fused(weights, p, seeds), x, res, nw, adapters, dys, ds)
    assert ran == ["f", "b"]
    want = _run(_separate(weights, p, seeds, "torch"), x, res, nw, adapters, dys, ds)
    near = _run(_separate(weights, p, seeds, "triton"), x, res, nw, adapters, dys, ds)
    atol, rtol = TOLERANCES[dtype]
    # against the separate Triton calls: as tight in fp32; in fp16 a rounding of dh may land one ulp apart
    near_scale = 0.25 if dtype == torch.float32 else 1.0
    for other, scale, what in ((want, 1.0, "reference"), (near, near_scale, "separate triton")):
        for i, (a, b) in enumerate(zip(got[0], other[0])):
            assert a.dtype == b.dtype == dtype and a.shape == b.shape
            assert_close(a, b, atol * scale, rtol * scale, name=f"{what} y[{i}]")
        assert_close(got[1], other[1], 0, 0, name=f"{what} s")
        assert_close(got[2][0], other[2][0], atol * scale, rtol * scale, name=f"{what} dx")
        if residual:
            assert_close(got[2][1], other[2][1], atol * scale, rtol * scale, name=f"{what} dres")
        else:
            assert got[2][1] is None and other[2][1] is None
        for i, (a, b) in enumerate(zip(got[2][2:], other[2][2:])):
            assert a.dtype == b.dtype == torch.float32
            bound = atol * max(1.0, m ** 0.5) + rtol * b.abs().max().item()
            assert_close(a, b, bound * scale, rtol * scale, name=f"{what} d{'AB'[i % 2]}[{i // 2}]")


@pytest.mark.parametrize("align", [64, 128])
def test_fused_forward_zeros_the_columns_past_the_lora_blocks(monkeypatch, align):
    """With ``lora.concat_align`` above the blocks' width the norm kernel's [h | xa_0 | .. | zeros] operand
    is that much wider and every column of it written (it starts as NaN here): the fused call still
    equals the reference and, to fp32 rounding, itself at align 16."""
    from tests.kernels.test_lora import nan_wide_inputs

    ns, k, r, m = (48, 16, 16), 128, 8, 37
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    dys = [torch.randn(m, n, generator=_gen(40 + j)) for j, n in enumerate(ns)]
    ds = torch.randn(m, k, generator=_gen(50))
    seeds = [7, 8, 9]
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", "16")
    at16 = _run(_fused(weights, 0.3, seeds), x, res, nw, adapters, dys, ds)
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", str(align))
    widths = nan_wide_inputs(monkeypatch, [L, NL])
    got = _run(_fused(weights, 0.3, seeds), x, res, nw, adapters, dys, ds)
    want = _run(_separate(weights, 0.3, seeds, "torch"), x, res, nw, adapters, dys, ds)
    assert widths == [k + align]
    atol, rtol = TOLERANCES[torch.float32]
    for i, (a, b, c) in enumerate(zip(got[0], want[0], at16[0])):
        assert_close(a, b, atol, rtol, name=f"reference y[{i}]")
        assert_close(a, c, 1e-5, 1e-5, name=f"align 16 y[{i}]")
    for i, (a, b, c) in enumerate(zip(got[2], want[2], at16[2])):
        bound = atol * m ** 0.5 + rtol * b.abs().max().item()
        assert_close(a, b, bound, rtol, name=f"reference grad {i}")
        assert_close(a, c, 1e-5, 1e-5, name=f"align 16 grad {i}")


def test_masks_are_the_lora_masks():
    """The fused forward's xa is dropout_j(h) @ A_j.T with lora_dropout_mask's mask for seed j: a
    different seed on one projection changes that projection's output only."""
    ns, k, r, m = (16, 16, 16), 128, 4, 19
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    with backend("triton"):
        a, _ = NL.rms_norm_lora(x, res, nw, 1e-6, weights, adapters, 0.5, True, (1, 2, 3))
        b, _ = NL.rms_norm_lora(x, res, nw, 1e-6, weights, adapters, 0.5, True, (1, 5, 3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert not torch.allclose(a[1], b[1])


def test_only_needed_grads_and_frozen_parts():
    """A frozen: no dA launch result; x frozen with a residual that needs grad: d(residual) only."""
    ns, k, r, m = (32,), 128, 8, 21
    weights = _weights(ns, k, "nf4", torch.float32)
    (ad,) = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    res = res.requires_grad_(True)
    b = ad.lora_b.clone().requires_grad_(True)
    with backend("triton"):
        (y,), s = NL.rms_norm_lora(x, res, nw, 1e-6, weights, [L.Adapter(ad.lora_a, b, ad.scaling)], 0.2, True, [4])
    (y.sum() + s.sum()).backward()
    assert x.grad is None and res.grad is not None and b.grad is not None
    with backend("torch"):
        res2 = res.detach().clone().requires_grad_(True)
        b2 = ad.lora_b.clone().requires_grad_(True)
        (y2,), s2 = NL.rms_norm_lora(x, res2, nw, 1e-6, weights, [L.Adapter(ad.lora_a, b2, ad.scaling)], 0.2,
                                     True, [4])
        (y2.sum() + s2.sum()).backward()
    assert_close(res.grad, res2.grad, 1e-5, 1e-5, name="dres")
    assert_close(b.grad, b2.grad, 1e-4, 1e-5, name="dB")


def test_frozen_inputs_skip_the_wide_gemm_and_unused_outputs_get_no_grads(monkeypatch):
    """x and residual frozen (the first layer's input is the frozen embedding): g from one pass over dy,
    not the wide dx GEMM, and dA / dB as with it. An output the loss does not use leaves its projection's
    A and B without a gradient (None, as separate calls would), and s alone passes its gradient through."""
    wide_gemm = []
    monkeypatch.setattr(NL, "_concat_backward", lambda *a, _f=NL._concat_backward: wide_gemm.append(1) or _f(*a))
    ns, k, r, m = (32, 16, 16), 128, 8, 21
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)

    def grads(name, use=(0, 1, 2), x_grad=False):
        xx = x.clone().requires_grad_(x_grad)
        rr = res.clone().requires_grad_(x_grad)
        ads = [L.Adapter(a.lora_a.clone().requires_grad_(True), a.lora_b.clone().requires_grad_(True), a.scaling)
               for a in adapters]
        with backend(name):
            outs, s = NL.rms_norm_lora(xx, rr, nw, 1e-6, weights, ads, 0.25, True, (4, 5, 6))
        loss = sum((outs[j] * (j + 1)).sum() for j in use) + (s.square().sum() if x_grad else 0)
        loss.backward()
        return [xx.grad, rr.grad] + [t.grad for a in ads for t in (a.lora_a, a.lora_b)]

    got, want = grads("triton"), grads("torch")
    assert wide_gemm == [] and got[0] is None and got[1] is None
    for i, (a, b) in enumerate(zip(got[2:], want[2:])):
        assert_close(a, b, 1e-4, 1e-4, name=f"d{'AB'[i % 2]}[{i // 2}]")
    got, want = grads("triton", use=(0, 2), x_grad=True), grads("torch", use=(0, 2), x_grad=True)
    assert wide_gemm == [1]
    assert got[4] is None and got[5] is None  # k's output unused
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, i
        else:
            assert_close(a, b, 1e-4, 1e-4, name=f"grad {i}")
    got = grads("triton", use=(), x_grad=True)
    assert all(t is None for t in got[2:]) and torch.allclose(got[0], 2 * (x + res))


def test_falls_back_where_the_fused_kernels_do_not_apply(monkeypatch):
    """No dropout, eval, a norm weight that trains, autocast, an NF4 K off the blocksize: the reference
    runs (and gives the same as the separate calls)."""
    ran = []
    monkeypatch.setattr(NL, "_norm_lora_forward", lambda *a, _f=NL._norm_lora_forward: ran.append(1) or _f(*a))
    ns, k, r, m = (16,), 128, 4, 9
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    with backend("triton"):
        assert NL.norm_lora_ok(x, res, nw, weights, adapters, 0.1, True)
        assert not NL.norm_lora_ok(x, res, nw, weights, adapters, 0.0, True)
        assert not NL.norm_lora_ok(x, res, nw, weights, adapters, 0.1, False)
        assert not NL.norm_lora_ok(x, res, nw.clone().requires_grad_(True), weights, adapters, 0.1, True)
        assert not NL.norm_lora_ok(x, res, nw.half(), weights, adapters, 0.1, True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not NL.norm_lora_ok(x, res, nw, weights, adapters, 0.1, True)
        odd = _weights(ns, 96, "nf4", torch.float32)
        x96, res96, nw96 = _inputs(m, 96, torch.float32, True)
        assert not NL.norm_lora_ok(x96, res96, nw96, odd, _adapters(ns, 96, r), 0.1, True)
        (y,), s = NL.rms_norm_lora(x, res, nw, 1e-6, weights, adapters, 0.0, True, [3])
    assert ran == []
    with backend("torch"):
        (y2,), s2 = NL.rms_norm_lora_reference(x, res, nw, 1e-6, weights, adapters, 0.0, True, [3])
    assert torch.equal(y, y2) and torch.equal(s, s2)


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's meta-parameters, then launches the real one."""

    def __init__(self, kernel, seen: list):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["BLOCK_K"])
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("version", [(3, 6), (3, 9)])
def test_the_steps_at_rank_32_are_128_columns_and_a_partial_last_step_is_right(monkeypatch, version):
    """At r_pad = 32 both kernels walk 128 columns per step (the backward under triton 3.6 too, since it
    adds its masked products with dh as their accumulator: its 128-column build no longer spills), but for
    the forward of three projections under triton < 3.9, whose 128-column build spills: 64 there. A K that
    ends in a partial step gives the reference's result either way."""
    backward_step = 128
    assert [NL._block_k(r) for r in (16, 32, 64, 128)] == [128, 128, 64, 32]
    monkeypatch.setattr(NL, "triton_version", lambda: version)
    assert [NL._forward_block_k(32, p) for p in (1, 2, 3)] == [128, 128, 64 if version < (3, 9) else 128]
    assert [NL._forward_block_k(r, 3) for r in (16, 64, 128)] == [128, 64, 32]
    fwd_steps, bwd_steps = [], []
    monkeypatch.setattr(NL, "_norm_lora_fwd_kernel", _LaunchSpy(NL._norm_lora_fwd_kernel, fwd_steps))
    monkeypatch.setattr(NL, "_norm_lora_bwd_kernel", _LaunchSpy(NL._norm_lora_bwd_kernel, bwd_steps))
    ns, k, r, m = (16, 24, 16), 320, 20, 19  # r = 20 pads to 32; 320 columns: a partial last step either way
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    dys = [torch.randn(m, n, generator=_gen(40 + j)) for j, n in enumerate(ns)]
    ds = torch.randn(m, k, generator=_gen(50))
    got = _run(_fused(weights, 0.3, (1, 2, 3)), x, res, nw, adapters, dys, ds)
    assert (fwd_steps, bwd_steps) == ([64 if version < (3, 9) else 128], [backward_step])
    want = _run(_separate(weights, 0.3, (1, 2, 3), "torch"), x, res, nw, adapters, dys, ds)
    atol, rtol = TOLERANCES[torch.float32]
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert_close(a, b, atol, rtol, name=f"y[{i}]")
    for name, a, b in (("dx", got[2][0], want[2][0]), ("dres", got[2][1], want[2][1])):
        assert_close(a, b, atol, rtol, name=name)


def test_any_grid_gives_the_same_result(monkeypatch):
    """The kernels walk the row blocks persistently: one program, two, or one per block
    (BEZOAR_NORM_LORA_PROGRAMS) give the same bits; a bad value is one clear error."""
    ns, k, r, m = (16, 16, 16), 128, 8, 53  # 4 row blocks
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    dys = [torch.randn(m, n, generator=_gen(40 + j)) for j, n in enumerate(ns)]
    ds = torch.randn(m, k, generator=_gen(50))
    results = []
    for programs in ("1", "3", "0"):
        monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", programs)
        results.append(_run(_fused(weights, 0.3, (1, 2, 3)), x, res, nw, adapters, dys, ds))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], other[0]))
        assert all(torch.equal(a, b) for a, b in zip(results[0][2], other[2]))
    monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", "many")
    with pytest.raises(ValueError, match="BEZOAR_NORM_LORA_PROGRAMS='many'"):
        _run(_fused(weights, 0.3, (1, 2, 3)), x, res, nw, adapters, dys, ds)


def test_the_grid_follows_the_environment_then_the_tuning_file(tmp_path, monkeypatch):
    """BEZOAR_NORM_LORA_PROGRAMS (a count, 0 or "persistent") before the device's ``norm_lora.grid`` entry,
    before the persistent default (two programs on the CPU, where there are no SMs to count)."""
    from bezoar_kernels import tuning

    cpu = torch.device("cpu")
    monkeypatch.delenv("BEZOAR_NORM_LORA_PROGRAMS", raising=False)
    monkeypatch.delenv("BEZOAR_TUNING", raising=False)
    tuning.reload()
    try:
        assert NL._programs(160, cpu, "forward") == 2  # 10 row blocks
        path = tmp_path / "tuning.json"
        path.write_text('{"format": 1, "devices": {"cpu": {"settings": {"norm_lora.grid": "per_block"}}}}')
        monkeypatch.setenv("BEZOAR_TUNING", str(path))
        tuning.reload()
        assert NL._programs(160, cpu, "forward") == 10 and NL._programs(160, cpu, "backward") == 10
        assert NL.grid_in_effect(cpu) == "per_block"
        monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", "Persistent")
        assert NL._programs(160, cpu, "forward") == 2 and NL.grid_in_effect(cpu) == "persistent"
        monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", "3")
        assert NL._programs(160, cpu, "backward") == 3 and NL.grid_in_effect(cpu) is None
        monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", "0")
        assert NL.grid_in_effect(cpu) == "per_block"
        monkeypatch.setenv("BEZOAR_NORM_LORA_PROGRAMS", "-1")
        with pytest.raises(ValueError, match="expected a number of programs .* one of persistent, per_block"):
            NL._programs(160, cpu, "forward")
        monkeypatch.delenv("BEZOAR_NORM_LORA_PROGRAMS")
        path.write_text('{"format": 1, "devices": {}}')
        tuning.reload()
        assert NL.grid_in_effect(cpu) == "persistent"
    finally:
        monkeypatch.delenv("BEZOAR_TUNING", raising=False)
        tuning.reload()


def test_the_bench_grid_peers_run_their_grid_forward_and_backward(monkeypatch):
    """bench/lora.py times each grid by wrapping the forward + backward in ``common.with_environ``: both
    kernels' launches see it (80 rows: 5 row blocks, which the persistent grid covers with 2 programs)."""
    spec = importlib.util.spec_from_file_location(
        "bench_common", Path(__file__).resolve().parents[2] / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.delenv("BEZOAR_NORM_LORA_PROGRAMS", raising=False)
    ns, k, r, m = (16,), 128, 4, 80
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    grids = []
    real = NL._programs
    monkeypatch.setattr(NL, "_programs", lambda m, device, kind: grids.append((kind, real(m, device, kind))) or grids[-1][1])

    dys, ds = [torch.ones(m, ns[0])], torch.ones(m, k)

    def step():
        _run(_fused(weights, 0.1, (1,)), x, res, nw, adapters, dys, ds)

    common.with_environ(step, BEZOAR_NORM_LORA_PROGRAMS="0")()
    common.with_environ(step, BEZOAR_NORM_LORA_PROGRAMS="persistent")()
    assert grids == [("forward", 5), ("backward", 5), ("forward", 2), ("backward", 2)]
    assert "BEZOAR_NORM_LORA_PROGRAMS" not in os.environ


def test_bad_inputs_raise():
    ns, k, r, m = (16,), 128, 4, 5
    weights = _weights(ns, k, "nf4", torch.float32)
    adapters = _adapters(ns, k, r)
    x, res, nw = _inputs(m, k, torch.float32, True)
    with pytest.raises(ValueError, match="norm weight shape"):
        NL.rms_norm_lora(x, res, nw[:-1], 1e-6, weights, adapters, 0.1, True, [1])
    with pytest.raises(ValueError, match="residual"):
        NL.rms_norm_lora(x, res[:-1], nw, 1e-6, weights, adapters, 0.1, True, [1])
    with pytest.raises(ValueError, match="seeds"):
        NL.rms_norm_lora(x, res, nw, 1e-6, weights, adapters, 0.1, True, [1, 2])
    with pytest.raises(ValueError, match="needs adapters"):
        NL.rms_norm_lora(x, res, nw, 1e-6, weights, None, 0.1, True, [1])
    with pytest.raises(ValueError, match="lora_A 0 has shape"):
        NL.rms_norm_lora(x, res, nw, 1e-6, weights, _adapters(ns, 64, r), 0.1, True, [1])


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [True, False])
def test_fused_norm_lora_on_gpu_matches_separate_calls(residual):
    """3B q/k/v shapes in bf16 on CUDA (the real barrier between the kernels' two passes): equal to the
    separate Triton calls within bf16 rounding."""
    dev = "cuda"
    ns, k, r, m = (3200, 3200, 3200), 3200, 16, 4096
    weights = [nf4.quantize_nf4(torch.randn(n, k, device=dev) * 0.02, 64, True) for n in ns]
    adapters = [L.Adapter(torch.randn(r, k, device=dev) * 0.02, torch.randn(n, r, device=dev) * 0.02, 1.0)
                for n in ns]
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    res = torch.randn(m, k, device=dev, dtype=torch.bfloat16) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device=dev)).to(torch.bfloat16)
    dys = [torch.randn(m, n, device=dev, dtype=torch.bfloat16) for n in ns]
    ds = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    got = _run(_fused(weights, 0.05, (1, 2, 3)), x, res, nw, adapters, dys, ds)
    want = _run(_separate(weights, 0.05, (1, 2, 3), "triton"), x, res, nw, adapters, dys, ds)
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert_close(a.float(), b.float(), 2e-2, 2e-2, name=f"y[{i}]")
    assert torch.equal(got[1], want[1])
    assert_close(got[2][0].float(), want[2][0].float(), 2e-2, 2e-2, name="dx")
    if residual:
        assert_close(got[2][1].float(), want[2][1].float(), 2e-2, 2e-2, name="dres")
    for i, (a, b) in enumerate(zip(got[2][2:], want[2][2:])):
        assert_close(a, b, 1e-2 * b.abs().max().item(), 1e-2, name=f"d{'AB'[i % 2]}[{i // 2}]")


@pytest.fixture(scope="module")
def tiny192_dir():
    """The tiny Llama with an intermediate size of 192 (the preset's 176 is not a multiple of the NF4
    blocksize, which the fused SwiGLU + down_proj path needs)."""
    from bezoar.model.tiny import build_tiny_model

    return build_tiny_model("tiny", intermediate_size=192)


def _tiny_model(tiny_dir, targets):
    from bezoar.model import load
    from bezoar.model.lora import LoraConfig, apply_lora, lora_parameters

    # fp32 compute: the interpreter's bf16 dot is wrong
    model = load(tiny_dir, quant="nf4", device="cpu", dtype=torch.float32, nf4_compute_dtype=torch.float32)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.1, targets=targets))
    with torch.no_grad():
        for i, p in enumerate(lora_parameters(model)):
            p.copy_(0.05 * torch.randn(p.shape, generator=_gen(i)))
    return model.train()


@pytest.mark.parametrize("targets,per_layer,swiglu_per_layer", [
    (["q_proj", "k_proj", "v_proj"], 1, 0),
    (["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], 1, 1),
    (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2, 1),
])
def test_model_runs_the_fused_norm_and_equals_the_reference(monkeypatch, tiny192_dir, targets, per_layer,
                                                            swiglu_per_layer):
    """A LoRA model training with dropout runs each norm and the projections that read it as one call
    (q/k/v; gate/up when adapted), and the SwiGLU with an adapted down_proj, on the Triton backend; its
    logits and LoRA grads equal the torch backend's (the separate reference calls), given the same torch
    seed: the same masks either way. With ``full`` checkpointing the recompute runs the fused calls
    again; ``cheap`` uses the separate calls."""
    from bezoar_kernels import swiglu_lora as SL

    ran, ran_swiglu = [], []
    monkeypatch.setattr(NL, "_norm_lora_forward", lambda *a, _f=NL._norm_lora_forward: ran.append(1) or _f(*a))
    monkeypatch.setattr(SL, "_swiglu_lora_forward",
                        lambda *a, _f=SL._swiglu_lora_forward: ran_swiglu.append(1) or _f(*a))
    model = _tiny_model(tiny192_dir, targets)
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 500, (2, 9), generator=_gen(5))

    def step(name, mode="off"):
        model.gradient_checkpointing = mode
        model.zero_grad(set_to_none=True)
        torch.manual_seed(42)
        with backend(name):
            logits = model(ids)
            logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want = step("torch")
    assert ran == [] and ran_swiglu == []
    for mode, calls in (("off", 1), ("full", 2), ("cheap", 0)):
        ran.clear()
        ran_swiglu.clear()
        got = step("triton", mode)
        assert len(ran) == calls * per_layer * layers, mode
        assert len(ran_swiglu) == calls * swiglu_per_layer * layers, mode
        assert_close(got[0], want[0], 1e-4, 1e-4, name=f"{mode} logits")
        assert got[1].keys() == want[1].keys()
        for n in want[1]:
            assert_close(got[1][n], want[1][n], 1e-4, 1e-3, name=f"{mode} grad {n}")
    model.eval()  # no dropout: the merged / separate paths
    ran.clear()
    with backend("triton"), torch.no_grad():
        model(ids)
    assert ran == [] and ran_swiglu == []
