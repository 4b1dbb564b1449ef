"""The LoRA ``tma`` path (persistent GEMMs on tensor descriptors, LoRA terms in the epilogues): Triton
under the interpreter on CPU against the torch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels import lora as L
from bezoar_kernels import lora_tma as T
from bezoar_kernels.dispatch import backend
from tests.kernels.test_lora import _adapter, _base, _compare, _gen, _run
from tests.utils import TOLERANCES, assert_close

# small tiles so that the interpreter walks several tiles, K steps and persistent rounds per program
FWD = T.TmaConfig(block_m=16, block_n=32, block_k=16, group_m=2, num_warps=4, num_stages=2, programs=3)
BWD = T.TmaConfig(block_m=16, block_n=16, block_k=32, group_m=2, num_warps=4, num_stages=2, programs=3)


def _linear(weight, dropout, seed, fwd=FWD, bwd=BWD):
    def fn(xx, ads):
        ad = ads[0]
        if torch.is_tensor(xx) and L.dispatch.use_triton(xx):
            return (L.lora_linear_triton(xx, weight, ad.lora_a, ad.lora_b, ad.scaling, dropout, True, seed, "tma",
                                         fwd, bwd),)
        return (L.lora_linear(xx, weight, ad.lora_a, ad.lora_b, ad.scaling, dropout, True, seed, "tma"),)
    return fn


def _qkv(weights, dropout, seeds):
    """The fused q/k/v op on the tma path (the small test tiles on Triton) as a _run function."""
    def fn(xx, ads):
        if L.dispatch.use_triton(xx):
            return L.lora_qkv_triton(xx, weights, ads, dropout, True, seeds, "tma", FWD, BWD)
        return L.lora_qkv(xx, weights, ads, dropout, True, seeds, "tma")
    return fn


# (M, N, K, r): rows of 16 bytes in fp32 and fp16 (K, N multiples of 8), M not a multiple of any tile,
# N and K not multiples of the 32-wide tiles (the descriptors' zero fill and clipped stores), r 1 to 16
SHAPES = [(1, 40, 64, 1), (37, 72, 128, 8), (70, 48, 192, 16)]


@pytest.mark.parametrize("fuse_da", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", ["nf4", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,r", SHAPES)
def test_tma_path_matches_reference(m, n, k, r, dtype, kind, dropout, fuse_da):
    weight = _base(n, k, kind, dtype)
    adapter = _adapter(n, k, r, seed=1)
    x = torch.randn(m, k, generator=_gen(2)).to(dtype)
    dy = torch.randn(m, n, generator=_gen(3)).to(dtype)
    fn = _linear(weight, dropout, 1234, bwd=T.TmaConfig(**{**BWD.__dict__, "fuse_da": fuse_da}))
    want = _run(fn, x, [adapter], [dy])
    with backend("triton"):
        got = _run(fn, x, [adapter], [dy])
    _compare(got, want, dtype, f"tma {kind} p={dropout} fuse_da={fuse_da}", k, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_equals_the_dequant_path(dtype):
    """Same operands, same mask: the tma GEMMs against the pointer-load Triton GEMM of ``dequant``."""
    m, n, k, r = 45, 64, 128, 16
    weight = _base(n, k, "nf4", dtype)
    adapter = _adapter(n, k, r, seed=4)
    x = torch.randn(m, k, generator=_gen(5)).to(dtype)
    dy = torch.randn(m, n, generator=_gen(6)).to(dtype)

    def dequant(xx, ads):
        ad = ads[0]
        return (L.lora_linear_triton(xx, weight, ad.lora_a, ad.lora_b, ad.scaling, 0.1, True, 77, "dequant"),)

    with backend("triton"):
        got = _run(_linear(weight, 0.1, 77), x, [adapter], [dy])
        want = _run(dequant, x, [adapter], [dy])
    _compare(got, want, dtype, "tma vs dequant", k, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_qkv_matches_reference(dtype):
    """q/k/v with GQA-like widths, three masks; the gradients of the three outputs arrive as separate
    tensors (concatenated for the dx GEMM) and as adjacent slices of one buffer (used in place)."""
    m, k, r = 21, 64, 8
    ns = (48, 24, 24)
    weights = [_base(n, k, "nf4", dtype, seed=j) for j, n in enumerate(ns)]
    adapters = [_adapter(n, k, r, seed=10 + j, scaling=0.5 + j) for j, n in enumerate(ns)]
    x = torch.randn(3, 7, k, generator=_gen(2)).to(dtype)
    joined = torch.randn(3, 7, sum(ns), generator=_gen(3)).to(dtype)
    apart = [t.clone() for t in joined.split(list(ns), dim=-1)]
    adjacent = list(joined.split(list(ns), dim=-1))

    fn = _qkv(weights, 0.2, (11, 12, 13))

    want = _run(fn, x, adapters, apart)
    with backend("triton"):
        for dys in (apart, adjacent):
            got = _run(fn, x, adapters, dys)
            _compare(got, want, dtype, "qkv tma", k, m)


def test_joined_views_adjacent_slices_and_copies_the_rest():
    buf = torch.randn(5, 48)
    parts = list(buf.split([16, 16, 16], dim=1))
    view = L._joined(parts)
    assert view.data_ptr() == buf.data_ptr() and torch.equal(view, buf)
    apart = [p.clone() for p in parts]
    copy = L._joined(apart)
    assert copy.data_ptr() != buf.data_ptr() and torch.equal(copy, buf)
    swapped = L._joined([parts[1], parts[0], parts[2]])  # not in order: concatenated
    assert torch.equal(swapped, torch.cat([parts[1], parts[0], parts[2]], dim=1))


def test_tma_without_adapters_is_the_base_product():
    m, n, k = 33, 48, 96
    weight = _base(n, k, "nf4", torch.float32)
    x = torch.randn(m, k, generator=_gen(8))
    dy = torch.randn(m, n, generator=_gen(9))
    with backend("triton"):
        xx = x.clone().requires_grad_(True)
        (y,) = L._apply(xx, [weight], None, 0.0, False, [0], "tma", FWD, BWD)
        y.backward(dy)
    w = L._dense_or_dequantized(weight, torch.float32)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(y.detach(), x @ w.t(), atol, rtol, name="y")
    assert_close(xx.grad, dy @ w, atol, rtol, name="dx")


def test_fused_da_with_no_dx_wanted_uses_the_da_pass(monkeypatch):
    """x frozen: no dx GEMM runs, dA comes from the separate pass and still matches."""
    m, n, k, r = 24, 32, 64, 4
    weight = _base(n, k, "dense", torch.float32)
    adapter = _adapter(n, k, r, seed=3)
    x = torch.randn(m, k, generator=_gen(1))
    calls = []
    real = T.tma_backward
    monkeypatch.setattr(T, "tma_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with backend("triton"):
        a = adapter.lora_a.clone().requires_grad_(True)
        b = adapter.lora_b.clone().requires_grad_(True)
        y = L.lora_linear_triton(x, weight, a, b, adapter.scaling, 0.3, True, 5, "tma", FWD, BWD)
        y.sum().backward()
    assert not calls
    mask = L.lora_dropout_mask(5, m, k, 0.3)
    g = adapter.scaling * torch.ones(m, n) @ adapter.lora_b
    assert_close(a.grad, g.t() @ (x * mask), 1e-4, 1e-4, name="dA")


def test_tma_refuses_rows_a_descriptor_cannot_take():
    weight = _base(40, 60, "dense", torch.float16)  # K = 60: 120-byte rows
    ad = _adapter(40, 60, 4, seed=1)
    x = torch.randn(5, 60).half()
    with backend("triton"), pytest.raises(ValueError, match="lora path 'tma' needs K .* multiples of 8"):
        L.lora_linear(x, weight, ad.lora_a, ad.lora_b, ad.scaling, 0.0, True, 1, "tma")


def test_tma_as_large_m_path_falls_back_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("BEZOAR_LORA_LARGE_M_PATH", "tma")
    monkeypatch.setenv("BEZOAR_LORA_FUSED_MAX_M", "0")
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "0")
    seen = []
    real = L.LoRAFunction.apply
    monkeypatch.setattr(L.LoRAFunction, "apply", lambda x, plan, *t: seen.append(plan.path) or real(x, plan, *t))
    ad = _adapter(40, 60, 4, seed=1)
    with backend("triton"):
        L.lora_linear(torch.randn(5, 60).half(), _base(40, 60, "dense", torch.float16), ad.lora_a, ad.lora_b,
                      ad.scaling, 0.1, True, 1)
        L.lora_linear(torch.randn(5, 64).half(), _base(40, 64, "dense", torch.float16), ad.lora_a[:, :4].new_zeros(4, 64),
                      ad.lora_b, ad.scaling, 0.1, True, 1)
        big = _adapter(40, 64, T.MAX_RANK * 2, seed=2)  # a rank the epilogues do not take
        L.lora_linear(torch.randn(5, 64).half(), _base(40, 64, "dense", torch.float16), big.lora_a, big.lora_b,
                      big.scaling, 0.1, True, 1)
    assert seen == ["cublas", "tma", "cublas"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tma_qkv_at_rank_64_matches_reference(dtype):
    """q/k/v at r = 40 (R_PAD 64, the largest rank the epilogues take): each column tile adds only the
    projections it meets; one tile straddles q and k (48 columns of q, 32-column tiles)."""
    m, k, r = 19, 64, 40
    ns = (48, 32, 32)
    weights = [_base(n, k, "dense", dtype, seed=j) for j, n in enumerate(ns)]
    adapters = [_adapter(n, k, r, seed=20 + j, scaling=0.25 * (j + 1)) for j, n in enumerate(ns)]
    x = torch.randn(m, k, generator=_gen(4)).to(dtype)
    dys = [torch.randn(m, n, generator=_gen(5 + j)).to(dtype) for j, n in enumerate(ns)]

    fn = _qkv(weights, 0.1, (3, 4, 5))

    want = _run(fn, x, adapters, dys)
    with backend("triton"):
        got = _run(fn, x, adapters, dys)
    _compare(got, want, dtype, "qkv tma r=40", k, m)


def test_tma_takes_misaligned_and_broadcast_operands():
    """x starting 4 bytes into its storage (contiguous, so ``contiguous()`` would not move it), a dense W
    likewise, and an upstream gradient broadcast along rows (row stride 0): each is copied for its
    descriptor, and the results match the reference."""
    m, n, k, r = 12, 32, 64, 8
    flat_w = torch.randn(n * k + 1, generator=_gen(1)) * 0.05
    weight = flat_w[1:].view(n, k)
    adapter = _adapter(n, k, r, seed=2)
    flat_x = torch.randn(m * k + 1, generator=_gen(3))
    x = flat_x[1:].view(m, k)
    assert x.data_ptr() % 16 == 4 and x.is_contiguous()
    dy = torch.randn(n, generator=_gen(4)).expand(m, n)
    assert dy.stride() == (0, 1)
    fn = _linear(weight, 0.1, 7)
    want = _run(fn, x, [adapter], [dy])
    with backend("triton"):
        got = _run(fn, x, [adapter], [dy])
    _compare(got, want, torch.float32, "tma misaligned", k, m)
    assert not T._aligned(dy) and not T._aligned(x) and T._aligned(L._described(x))


def test_tma_rank_and_config_limits():
    weight = _base(32, 64, "dense", torch.float32)
    big = _adapter(32, 64, T.MAX_RANK + 1, seed=1)
    x = torch.randn(4, 64)
    with backend("triton"), pytest.raises(ValueError, match=f"a rank of at most {T.MAX_RANK}"):
        L.lora_linear(x, weight, big.lora_a, big.lora_b, big.scaling, 0.0, True, 1, "tma")
    small = _adapter(32, 64, 4, seed=1)
    with backend("triton"), pytest.raises(TypeError, match="fwd_config must be a TmaConfig"):
        L.lora_linear_triton(x, weight, small.lora_a, small.lora_b, 1.0, 0.0, True, 1, "tma", L.GemmConfig(16, 16))
    with backend("triton"), pytest.raises(TypeError, match="bwd_config must be a GemmConfig"):
        L.lora_linear_triton(x, weight, small.lora_a, small.lora_b, 1.0, 0.0, True, 1, "dequant", None, BWD)


def test_config_checks_tiles():
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        T.TmaConfig(block_n=48)


# ----------------------------------------------------------------------------- GPU (bf16)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse_da", [True, False])
@pytest.mark.parametrize("m", [16, 333, 4096])
@pytest.mark.parametrize("n,k,r", [(3200, 3200, 16), (8640, 3200, 64), (3200, 8640, 16)])
def test_bf16_tma_on_gpu_matches_the_concat_path(m, n, k, r, fuse_da):
    """bf16 on the GPU at the default tiles: the tma path against the concat path (cuBLAS on the wide
    operands), same operands and mask; both round s * B, xa and g to bf16 the same way, and differ in
    the order of their fp32 sums and in where dx's two terms meet."""
    dev = "cuda"
    weight = _base(n, k, "nf4", torch.bfloat16, device=dev)
    ad = _adapter(n, k, r, seed=1, device=dev)
    x = torch.randn(m, k, generator=_gen(2)).to(dev, torch.bfloat16)
    dy = torch.randn(m, n, generator=_gen(3)).to(dev, torch.bfloat16)
    bwd = T.TmaConfig(**{**T.default_bwd(1, r).__dict__, "fuse_da": fuse_da})

    def run(path):
        def fn(xx, ads):
            a = ads[0]
            return (L.lora_linear_triton(xx, weight, a.lora_a, a.lora_b, a.scaling, 0.05, True, 99, path,
                                         None if path != "tma" else T.DEFAULT_FWD, None if path != "tma" else bwd),)
        with backend("triton"):
            return _run(fn, x, [ad], [dy])

    (y, ), grads = run("tma")
    (y_ref, ), grads_ref = run("concat")  # s * B rounded to bf16 in the product, as the tma epilogue has it
    scale = y_ref.float().abs().max().item()
    assert_close(y.float(), y_ref.float(), 2e-2 * scale, 0.0, name="bf16 y")
    assert_close(grads[0].float(), grads_ref[0].float(), 2e-2 * grads_ref[0].float().abs().max().item(), 0.0,
                 name="bf16 dx")
    for i, what in ((1, "dA"), (2, "dB")):
        ref = grads_ref[i].float()
        assert_close(grads[i].float(), ref, 2e-2 * ref.abs().max().item(), 0.0, name=f"bf16 {what}")


def test_bench_lora_times_the_tma_path_alone():
    """bench/lora.py --paths concat,tma --no-groups: the tma cases (its GEMMs alone, the LoRA path, dA by
    its own pass) beside concat, every cell timed, no group tables; an unknown path is refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    cmd = [sys.executable, str(root / "bench" / "lora.py"), "--smoke", "--no-graphs", "--paths", "concat,tma",
           "--no-groups"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| shape | M | r | nf4_only"))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 64x128 |"))
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    for case in ("nf4_tma_gemm", "lora_concat", "lora_tma", "lora_tma_da_pass", "lora_tma/nf4_only"):
        assert cells[case] and float(cells[case]) > 0, (case, cells)
    assert cells["nf4_tma_decode"] == "", cells  # the smoke run is fp32: the NF4 tma kernels take bf16 / fp16
    assert not cells["lora_cublas"] and not cells["lora_dequant"], cells  # not asked for
    assert "groups skipped (--no-groups)" in proc.stdout
    bad = subprocess.run(cmd[:-3] + ["--paths", "concat,bogus"], capture_output=True, text=True, env=env, cwd=root,
                         timeout=900)
    assert bad.returncode == 2 and "unknown LoRA path(s) bogus" in bad.stderr


def test_bench_lora_sweep_tma_smoke():
    """--sweep-tma times each tile config of the tma GEMMs (no adapter) beside cuBLAS, forward and backward."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "bench" / "lora.py"), "--smoke", "--sweep-tma"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| fwd |", "| bwd |"))]
    assert len(rows) == 4, proc.stdout[-2000:]  # smoke: the first two configs of each direction
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0, line  # ms, cuBLAS ms, ratio
    assert "flat" in proc.stdout  # the flattened-loop variant is among them


def test_tiny_model_on_the_tma_path_equals_torch(tiny_dir, monkeypatch):
    """The tiny LoRA model in training (dropout on) with tma as the large-M path (what a tuning entry
    would set): the projections that reach the LoRA op run on it, and logits and LoRA gradients equal
    the torch backend's."""
    from tests.kernels.test_lora import _tiny_lora_model, _train_step_on_both_backends

    monkeypatch.setenv("BEZOAR_LORA_LARGE_M_PATH", "tma")
    monkeypatch.setenv("BEZOAR_LORA_FUSED_MAX_M", "0")
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "0")
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = T.tma_forward, T.tma_backward

    def count(kind, fn):
        def wrapped(*args, **kwargs):
            calls[kind] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(T, "tma_forward", count("fwd", fwd))
    monkeypatch.setattr(T, "tma_backward", count("bwd", bwd))
    model = _tiny_lora_model(tiny_dir, "nf4", dropout=0.1)
    ids = torch.randint(3, 500, (2, 9), generator=_gen(5))
    (lt, gt), (lr, gr) = _train_step_on_both_backends(model, ids)
    assert calls["fwd"] > 0 and calls["bwd"] > 0, calls
    assert_close(lt, lr, 1e-4, 1e-4, name="logits")
    for n in gt:
        assert_close(gt[n], gr[n], 1e-4, 1e-3, name=f"grad {n}")
