"""The NF4 ``tma`` kernels (weight decoded inside a persistent TMA GEMM's K loop): Triton under the
interpreter on CPU (fp16: the interpreter's bf16 dot is wrong) against a torch model of their rounding
and against the dequantized weight; the bf16 decode bit for bit; dispatch, fallbacks and refusals;
bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels import nf4, nf4_matmul as mm
from bezoar_kernels import nf4_tma as T
from bezoar_kernels.dispatch import backend

triton = pytest.importorskip("triton")
tl = triton.language

# small tiles: the interpreter walks several tiles, K steps and persistent rounds per program
FWD = T.NF4TmaConfig(block_m=16, block_n=16, block_k=64, group_m=2, num_warps=4, num_stages=2, programs=3)
FWD2 = T.NF4TmaConfig(block_m=32, block_n=16, block_k=128, group_m=2, num_warps=4, num_stages=2, programs=2)
BWD = T.NF4TmaConfig(block_m=16, block_n=16, block_k=64, group_m=2, num_warps=4, num_stages=2, programs=3)
BWD2 = T.NF4TmaConfig(block_m=32, block_n=32, block_k=128, group_m=2, num_warps=4, num_stages=2, programs=2)


def _weight(n, k, blocksize=64, double_quant=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nf4.quantize_nf4_reference(torch.randn(n, k, generator=g) * 0.05, blocksize, double_quant)


def _randn(*shape, seed=1, dtype=torch.float16):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _close(got, want, what, rtol):
    """Elementwise |got - want| <= rtol * (|want| + mean |want|): the output's own rounding plus the
    summation order."""
    got, want = got.float(), want.float()
    bound = rtol * (want.abs() + want.abs().mean())
    worst = ((got - want).abs() - bound).max().item()
    relative = ((got - want).abs() / (want.abs() + want.abs().mean())).max()
    assert worst <= 0, f"{what}: off by up to {relative:.2e} relative"


# (M, N, K, blocksize, double quant): M not a multiple of any tile (and M = 1), N a multiple of 8 but
# not of the tiles (zero-filled rows, clipped stores), K with a partial last step at block_k = 128
CASES = [(37, 40, 192, 64, True), (1, 24, 128, 64, True), (19, 24, 256, 128, False), (50, 16, 320, 64, False)]


@pytest.mark.parametrize("m,n,k,blocksize,dq", CASES)
@pytest.mark.parametrize("fwd,bwd", [(FWD, BWD), (FWD2, BWD2)], ids=["k64", "k128"])
def test_forward_and_backward_match_the_rounding_model(m, n, k, blocksize, dq, fwd, bwd):
    weight = _weight(n, k, blocksize, dq)
    x, dy = _randn(m, k), _randn(m, n, seed=2)
    w = T.decoded_weight(weight, torch.float16).float()
    # fp16 output rounding (2^-11) and fp32 sums in another order
    _close(T.nf4_tma_forward(x, weight, fwd), x.float() @ w.T, "forward", 2e-3)
    _close(T.nf4_tma_backward(dy, weight, bwd), dy.float() @ w, "backward", 2e-3)
    # and against the dequantized weight: the codes' bf16 rounding (<= 0.31%) on top
    exact = nf4.dequantize_nf4_reference(weight, torch.float32)
    _close(T.nf4_tma_forward(x, weight, fwd), x.float() @ exact.T, "forward vs dequantize", 1e-2)


def test_empty_rows():
    weight = _weight(16, 128)
    assert T.nf4_tma_forward(torch.empty(0, 128, dtype=torch.float16), weight).shape == (0, 16)
    assert T.nf4_tma_backward(torch.empty(0, 16, dtype=torch.float16), weight).shape == (0, 128)


def test_operands_a_descriptor_cannot_read_are_copied():
    """A column slice (row stride not the row length) and a row-broadcast gradient still give the product."""
    weight = _weight(24, 128, seed=3)
    wide = _randn(21, 136, seed=4)
    x = wide[:, 3:131]  # base 6 bytes past a 16-byte boundary
    w = T.decoded_weight(weight, torch.float16).float()
    _close(T.nf4_tma_forward(x, weight, FWD), x.float() @ w.T, "misaligned x", 2e-3)
    dy = _randn(1, 24, seed=5).expand(9, 24)
    _close(T.nf4_tma_backward(dy, weight, BWD), dy.float() @ w, "broadcast dy", 2e-3)


@triton.jit
def _tile_kernel(words_ptr, out_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, planes_ptr, offset, N, K,
                 ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                 BF16_PAIRS: tl.constexpr, OUT: tl.constexpr, ASM: tl.constexpr):
    """One (ROWS, WIDTH) tile of W per program through the kernels' decode, stored as it comes out."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    col0 = tl.program_id(1) * WIDTH
    row_ok = rows < N
    wcols = col0 // 8 + tl.arange(0, WIDTH // 8)
    words = tl.load(words_ptr + rows[:, None] * (K // 8) + wcols[None, :],
                    mask=row_ok[:, None] & (wcols < K // 8)[None, :], other=0)
    h0, h2, l0, l2 = T._nf4_plane_registers(planes_ptr)
    w = T._nf4_tile(words, rows, row_ok, col0, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                    h0, h2, l0, l2, ROWS, WIDTH, BLOCKSIZE, DOUBLE_QUANT, 256, ASM, BF16_PAIRS, OUT)
    cols = col0 + tl.arange(0, WIDTH)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], w, mask=row_ok[:, None] & (cols < K)[None, :])


def _decode_tiles(weight, dtype, exact, width, asm):
    """W through the kernels' decode, one (16, width) tile per program, on the weight's device."""
    n, k = weight.shape
    out = torch.full((n, k), float("nan"), dtype=dtype, device=weight.device)
    double = weight.double_quant
    _tile_kernel[(triton.cdiv(n, 16), triton.cdiv(k, width))](
        T._words(weight), out, weight.absmax, weight.nested_absmax if double else weight.absmax,
        weight.nested_code if double else weight.absmax, nf4.nf4_code_planes(weight.device),
        float(weight.offset) if double else 0.0, n, k, ROWS=16, WIDTH=width, BLOCKSIZE=weight.blocksize,
        DOUBLE_QUANT=double, BF16_PAIRS=dtype == torch.bfloat16 and not exact,
        OUT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, ASM=asm, enable_fp_fusion=False)
    return out


DECODES = [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]
TILES = [(64, 64, True), (128, 64, True), (64, 128, False), (128, 128, True)]


@pytest.mark.parametrize("dtype,exact", DECODES)
@pytest.mark.parametrize("width,blocksize,dq", TILES)
def test_decode_equals_the_rounding_model_bit_for_bit(dtype, exact, width, blocksize, dq):
    """The decode alone (no dot, so bf16 runs under the interpreter too): every weight of a tile equals
    ``decoded_weight``, the bf16 pair products included (their integer model here; the PTX on a GPU)."""
    weight = _weight(24, 320 if blocksize == 64 else 384, blocksize, dq, seed=6)
    out = _decode_tiles(weight, dtype, exact, width, asm=False)
    want = T.decoded_weight(weight, dtype, exact)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (out - want).abs().max()
    # and the model itself: within three bf16 roundings of the dequantized weight (one for fp32 scaling)
    exact_w = nf4.dequantize_nf4_reference(weight, torch.float32)
    limit = 3 * 2.0 ** -8 if dtype == torch.bfloat16 and not exact else 0.0032 + 2.0 ** -8
    assert ((want.float() - exact_w).abs() <= limit * exact_w.abs() + 1e-30).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,exact", DECODES)
@pytest.mark.parametrize("width,blocksize,dq", TILES)
def test_gpu_decode_equals_the_rounding_model_bit_for_bit(dtype, exact, width, blocksize, dq):
    """The same on the GPU with the PTX: the byte permutes and ``mul.rn.bf16x2`` give every weight of the
    model bit for bit (the double-quant absmax unfused, as decode_absmax computes it)."""
    if not T.supported(_weight(16, 128).to("cuda"), dtype):
        pytest.skip("the tma kernels need sm_90")
    weight = _weight(136, 640 if blocksize == 64 else 768, blocksize, dq, seed=7).to("cuda")
    out = _decode_tiles(weight, dtype, exact, width, asm=True)
    want = T.decoded_weight(weight, dtype, exact)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (out.float() - want.float()).abs().max()


def test_unsupported_shapes_and_dtypes_are_named():
    assert T.unsupported_reason(_weight(16, 128), torch.float32) == \
        "activations are torch.float32; the tma kernels take bf16 or fp16"
    assert "not a multiple of the blocksize" in T.unsupported_reason(_weight(16, 96), torch.float16)
    assert "N = 12 is not a multiple of 8" in T.unsupported_reason(_weight(12, 128), torch.float16)
    assert T.supported(_weight(16, 128), torch.float16)
    with pytest.raises(ValueError, match=r"nf4 tma: .*expected \(M, 128\)"):
        T.nf4_tma_forward(_randn(3, 64), _weight(16, 128))
    with pytest.raises(ValueError, match="block_k must be 64 or 128"):
        T.NF4TmaConfig(block_k=32)


def test_explicit_tma_path_refuses_what_it_cannot_take():
    weight = _weight(16, 128)
    with backend("triton"), pytest.raises(ValueError, match="nf4_matmul path 'tma': activations are torch.float32"):
        mm.nf4_matmul(_randn(5, 128, dtype=torch.float32), weight, "tma")


def test_auto_takes_tma_from_the_threshold_and_falls_back(monkeypatch):
    """BEZOAR_NF4_TMA_MIN_M turns the path on from that M; dtypes it cannot take run dequant instead."""
    weight = _weight(16, 128)
    calls = []
    real_fwd, real_bwd = T.nf4_tma_forward, T.nf4_tma_backward
    monkeypatch.setattr(T, "nf4_tma_forward", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(T, "nf4_tma_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    monkeypatch.setenv("BEZOAR_NF4_TMA_MIN_M", "8")
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "0")  # the fused forward (to M = 16 by default) comes first
    assert mm.resolve_path("auto", 8, weight) == "tma" and mm.resolve_path("auto", 7, weight) != "tma"
    w = T.decoded_weight(weight, torch.float16).float()
    with backend("triton"):
        x = _randn(10, 128).requires_grad_()
        y = mm.nf4_matmul(x, weight)
        y.backward(torch.ones_like(y))
        assert calls == ["fwd", "bwd"]
        _close(y.detach(), x.detach().float() @ w.T, "auto forward", 2e-3)
        _close(x.grad, torch.ones(10, 16) @ w, "auto backward", 2e-3)
        calls.clear()
        mm.nf4_matmul(_randn(10, 128, dtype=torch.float32), weight)  # fp32: dequant, no error
        mm.nf4_matmul(_randn(4, 128), weight)  # below the threshold
        assert calls == []
    monkeypatch.setenv("BEZOAR_NF4_TMA_MIN_M", "0")
    assert mm.resolve_path("auto", 1 << 20, weight) == "dequant"


def test_tma_is_off_by_default(monkeypatch):
    monkeypatch.delenv("BEZOAR_NF4_TMA_MIN_M", raising=False)
    assert mm.TMA_MIN_M == 0 and mm.resolve_path("auto", 1 << 20) == "dequant"


def test_devices_the_kernels_cannot_run_on_are_named(monkeypatch):
    """Before sm_90 (no mul.bf16x2, no register-operand warpgroup MMA), on ROCm, on CPU without the
    interpreter, and bf16 under it (its bf16 dot is wrong): a reason, so auto runs dequant and an
    explicit tma says why."""
    weight = _weight(16, 128)
    assert "bf16 dot is wrong" in T.unsupported_reason(weight, torch.bfloat16)
    monkeypatch.setattr(T.dispatch, "interpreting", lambda: False)
    assert "NVIDIA GPUs or under the Triton interpreter, not on cpu" in T.unsupported_reason(weight, torch.float16)

    # a CUDA device by capability (no GPU needed to reach the check)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "need sm_90 or newer" in T._device_reason(cuda, torch.bfloat16)
    assert "this GPU is sm_80" in T._device_reason(cuda, torch.float16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert T._device_reason(cuda, torch.bfloat16) is None
    monkeypatch.setattr(torch.version, "hip", "6.0")
    assert "need an NVIDIA GPU" in T._device_reason(cuda, torch.bfloat16)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(3200, 3200), (8640, 3200), (3200, 8640), (136, 448)])
@pytest.mark.parametrize("m", [4096, 777])
def test_gpu_bf16_matches_the_model_and_dequant_path(n, k, m):
    """bf16 at the default tiles on the GPU's own build (register decode, HGMMA): against the torch model
    of the kernels' rounding, and against dequant + cuBLAS within bf16 noise."""
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = nf4.quantize_nf4(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    if not T.supported(weight, torch.bfloat16):
        pytest.skip(T.unsupported_reason(weight, torch.bfloat16))
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    dy = torch.randn(m, n, device="cuda", generator=g).to(torch.bfloat16)
    for exact in (False, True):
        w = T.decoded_weight(weight, torch.bfloat16, exact).float()
        fwd = T.NF4TmaConfig(**{**T.DEFAULT_FWD.__dict__, "exact": exact})
        bwd = T.NF4TmaConfig(**{**T.DEFAULT_BWD.__dict__, "exact": exact})
        # the output's bf16 rounding (2^-9) and fp32 sums in another order
        _close(T.nf4_tma_forward(x, weight, fwd), x.float() @ w.T, f"forward exact={exact}", 2 ** -8)
        _close(T.nf4_tma_backward(dy, weight, bwd), dy.float() @ w, f"backward exact={exact}", 2 ** -8)
    _close(T.nf4_tma_forward(x, weight), mm.nf4_dequant_forward(x, weight), "forward vs dequant", 2e-2)
    _close(T.nf4_tma_backward(dy, weight), mm.nf4_dequant_backward(dy, weight), "backward vs dequant", 2e-2)


def test_bench_sweep_tma_smoke():
    """bench/nf4.py --sweep-tma checks each tile config against dequant + cuBLAS, then times it beside
    cuBLAS and dequant + cuBLAS, forward and backward (smoke: tiny tiles, fp16 under the interpreter)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, str(root / "bench" / "nf4.py"), "--smoke", "--sweep-tma", "--ms", "17"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timed = re.findall(r"^(fwd|bwd) 96x128 M=17 (\S+) w\d+ s\d+ g\d+: [0-9.]+ ms, [0-9.]+x cuBLAS, [0-9.]+x dequant",
                       proc.stdout, re.M)
    assert [d for d, _ in timed] == ["fwd", "fwd", "bwd", "bwd"], proc.stdout[-2000:]
    assert "| dir | shape | M | ms | cublas_ms | dequant_ms | over_cublas | over_dequant | config |" in proc.stdout


def test_tiny_model_runs_its_nf4_projections_on_tma(tiny_dir, monkeypatch):
    """The tiny NF4 model in fp16 with BEZOAR_NF4_TMA_MIN_M=1 (what a tuning entry would set): the
    projections without an adapter run the tma kernels forward and backward, and logits and the LoRA
    gradients equal the torch backend's (fp16 tolerances)."""
    from bezoar.model import load
    from bezoar.model.lora import LoraConfig, apply_lora, lora_parameters
    from tests.utils import assert_close

    monkeypatch.setenv("BEZOAR_NF4_TMA_MIN_M", "1")
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "0")
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "0")
    calls = []
    real_fwd, real_bwd = T.nf4_tma_forward, T.nf4_tma_backward
    monkeypatch.setattr(T, "nf4_tma_forward", lambda *a: calls.append("fwd") or real_fwd(*a))
    monkeypatch.setattr(T, "nf4_tma_backward", lambda *a: calls.append("bwd") or real_bwd(*a))
    model = load(tiny_dir, quant="nf4", device="cpu", dtype=torch.float16, nf4_compute_dtype=torch.float16)
    apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0, targets=["q_proj"]))
    with torch.no_grad():
        for i, p in enumerate(lora_parameters(model)):
            p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(5))
    results = {}
    for name in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        with backend(name):
            logits = model(ids)
            logits.float().square().sum().backward()  # a sum: fp16 gradients well above fp16's subnormals
        results[name] = (logits.detach().float(),
                         {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad})
    assert calls.count("fwd") >= 6 and calls.count("bwd") >= 6, calls  # k, v, o, gate, up, down per layer
    (lt, gt), (lr, gr) = results["triton"], results["torch"]
    assert_close(lt, lr, 1e-2, 1e-2, name="logits")  # the two backends in fp16: 1.2e-3 apart at most here
    for n in gt:
        # 0.25-0.45% of the largest gradient apart here
        assert_close(gt[n], gr[n], 2e-2 * gr[n].abs().max().item(), 2e-2, name=f"grad {n}")
