"""NF4 matmul: Triton (interpreter on CPU) forward and backward against the torch reference."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bezoar_kernels import nf4, nf4_matmul as mm
from bezoar_kernels.dispatch import backend
from bezoar_kernels.launch import triton_version
from tests.utils import TOLERANCES, assert_close

ROOT = Path(__file__).resolve().parents[2]


def _weight(n, k, blocksize=64, double_quant=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    return nf4.quantize_nf4_reference(w.to(device), blocksize, double_quant)


def _inputs(shape, dtype, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _dequant_rounded_codes(weight, dtype):
    """fp32 W as the aligned fused forward sees it: each NF4 code value rounded to ``dtype``, times the
    fp32 absmax of its block (K a multiple of the blocksize)."""
    index = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1)[: weight.numel]
    values = nf4.nf4_code(weight.device).to(dtype).float()[index.int()]
    absmax = nf4.decode_absmax(weight)
    return (values.view(-1, weight.blocksize) * absmax[:, None]).reshape(weight.shape)


def test_rounded_codes_oracle_is_the_reference_for_fp32_codes():
    """The GPU test's oracle for the aligned fused forward: with the codes kept in fp32 it is the fp32
    reference dequantization exactly, and in bf16 it differs by the codes' rounding alone (under 0.312%)."""
    weight = _weight(96, 128)
    exact = nf4.dequantize_nf4_reference(weight, torch.float32)
    assert torch.equal(_dequant_rounded_codes(weight, torch.float32), exact)
    rounded = _dequant_rounded_codes(weight, torch.bfloat16)
    assert not torch.equal(rounded, exact)
    assert ((rounded - exact).abs() <= 0.00312 * exact.abs()).all()  # -0.52507 rounds by 0.3115%


def _run(fn, x, weight, dy, path):
    x = x.clone().requires_grad_(True)
    y = fn(x, weight, path)
    y.backward(dy)
    return y.detach(), x.grad


# (M, N, K, blocksize, double_quant): odd M/N/K, M = 1, K not a multiple of the blocksize (general
# variant) and K a multiple of it (aligned variant), both blocksizes, with and without double quant.
SHAPES = [
    (1, 37, 61, 64, True),
    (17, 61, 128, 64, True),
    (1, 50, 256, 128, False),
    (5, 70, 130, 128, True),
    (64, 33, 200, 64, False),
    (19, 16, 64, 64, True),
]


@pytest.mark.parametrize("path", ["fused", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant", SHAPES)
def test_forward_backward_match_reference(m, n, k, blocksize, double_quant, dtype, path):
    weight = _weight(n, k, blocksize, double_quant)
    x = _inputs((m, k), dtype)
    dy = _inputs((m, n), dtype, seed=2)
    y_ref, dx_ref = _run(mm.nf4_matmul_reference, x, weight, dy, path)
    with backend("triton"):
        y, dx = _run(mm.nf4_matmul, x, weight, dy, path)
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype and dx.dtype == dtype
    assert_close(y, y_ref, atol, rtol, name=f"forward {path}")
    assert_close(dx, dx_ref, atol, rtol, name=f"backward {path}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k,blocksize", [(320, 64), (200, 128)])
def test_fused_forward_split_sum_in_kernel(monkeypatch, dtype, k, blocksize):
    """The fused forward split over K: the last split of each output tile sums the fp32 partials, bit
    for bit what the second launch gives, and leaves every arrival count at zero."""
    weight = _weight(150, k, blocksize)
    x = _inputs((21, k), dtype)  # two row tiles of 16 by five of 32: ten tiles
    sums = []
    monkeypatch.setattr(mm, "_sum_splits", lambda *a, _f=mm._sum_splits: sums.append(1) or _f(*a))
    with backend("triton"):
        second = mm.nf4_fused_forward(x, weight, mm.FusedConfig(16, 32, split=3, reduce_in_kernel=False))
        assert sums == [1]
        first = mm.nf4_fused_forward(x, weight, mm.FusedConfig(16, 32, split=3))
        again = mm.nf4_fused_forward(x, weight, mm.FusedConfig(16, 32, split=3))
    assert sums == [1] and not mm._split_count_buffers[x.device].any()
    assert torch.equal(first, second) and torch.equal(again, second)
    assert_close(first, mm.nf4_matmul_reference(x, weight), *TOLERANCES[dtype], name="fused split sum")


def test_fused_forward_default_tiles(monkeypatch):
    """128 rows of W per program where the aligned tile allows (fewer instructions per weight in the
    sm_90 loop); at small M the K split fills 132 SMs four times over but keeps its fp32 partials
    within half of W's NF4 bytes."""
    monkeypatch.setattr(mm, "sm_count", lambda device: 132)
    gpu = torch.device("cuda")  # only its type is read
    small = mm.default_fused_config("forward", 16, 3200, 3200, 64, gpu)
    assert small.block_n == 128 and small.block_m == 16 and small.split == 3200 // (32 * 16)
    assert mm.default_fused_config("forward", 1, 3200, 3200, 64, gpu).split == 22  # cdiv(4 * 132, 25 tiles)
    assert mm.default_fused_config("forward", 4096, 3200, 3200, 64, gpu).split == 1
    # where 128 rows spill in the sm_90 build: 64 rows of x, blocksize 128 from 32 rows, unaligned K
    assert mm.default_fused_config("forward", 64, 3200, 3200, 64, gpu).block_n == 64
    assert mm.default_fused_config("forward", 16, 3200, 3200, 128, gpu).block_n == 128
    assert mm.default_fused_config("forward", 32, 3200, 3200, 128, gpu).block_n == 64
    assert mm.default_fused_config("forward", 16, 3200, 3201, 64, gpu, aligned=False).block_n == 64


@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("k,blocksize", [(320, 64), (200, 128)])
def test_split_reduction_matches_reference(split, k, blocksize):
    """Forward split over K (summed in the kernel) and backward split over N (summed by a second kernel)."""
    n, m = 150, 3
    weight = _weight(n, k, blocksize)
    x = _inputs((m, k), torch.float32)
    dy = _inputs((m, n), torch.float32, seed=2)
    w = nf4.dequantize_nf4_reference(weight, torch.float32)
    config = mm.FusedConfig(block_m=16, block_n=32, split=split)
    with backend("triton"):
        y = mm.nf4_fused_forward(x, weight, config)
        dx = mm.nf4_fused_backward(dy, weight, config)
    assert_close(y, x @ w.t(), 1e-5, 1e-5, name="split forward")
    assert_close(dx, dy @ w, 1e-5, 1e-5, name="split backward")


# (M, N, K, blocksize, double_quant) for the gemv kernel: K a multiple of the blocksize, M <= 8.
GEMV_SHAPES = [
    (1, 37, 128, 64, True),
    (3, 70, 384, 128, False),
    (8, 16, 64, 64, True),
    (5, 130, 640, 64, True),
]


@pytest.mark.parametrize("blocks", [None, 1, 2, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant", GEMV_SHAPES)
def test_gemv_matches_exact_product(m, n, k, blocksize, double_quant, dtype, blocks):
    """The gemv kernel never rounds W to x's dtype: it equals x @ W (fp32 dequant) rounded once. Blocks
    per program: the default, one (a range per block, summed), two (the last range partly past K where
    a row has 3 blocks) and more than a row has (one masked range)."""
    weight = _weight(n, k, blocksize, double_quant, seed=m)
    x = _inputs((m, k), dtype, seed=n)
    exact = (x.double() @ nf4.dequantize_nf4_reference(weight, torch.float32).double().t()).to(dtype)
    with backend("triton"):
        y = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=32, blocks=blocks))
    atol, rtol = TOLERANCES[dtype]
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, exact, atol, rtol, name=f"gemv blocks={blocks}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant", GEMV_SHAPES)
def test_gemv_code_tables_agree_bit_for_bit(m, n, k, blocksize, double_quant, dtype):
    """The 16-entry table (GemvConfig(table="nibble")) holds the byte table's fp32 values and the kernel
    adds the same products in the same order: the two results are equal, not just close."""
    weight = _weight(n, k, blocksize, double_quant, seed=m + 7)
    x = _inputs((m, k), dtype, seed=n + 7)
    with backend("triton"):
        byte = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2))
        nibble = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table="nibble"))
        gather = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table="gather"))
    assert torch.equal(byte, nibble)
    # the shared-memory lookup holds the same fp32 codes; it scales per block at any M (gemv_block_scale),
    # as the tables do at M = 1 only: bit for bit there, the same sum regrouped at more rows of x
    if m == 1:
        assert torch.equal(gather, nibble)
    else:
        assert_close(gather.double(), nibble.double(), *TOLERANCES[dtype], name="gather against nibble")
    with pytest.raises(ValueError, match="table must be one of byte, nibble, prmt, gather, got 'word'"):
        mm.GemvConfig(table="word")


def test_fused_register_decode_takes_bf16_whole_blocks_only():
    """FusedConfig(decode="prmt") decodes bf16 codes for bf16 dot operands: any other x, or K not a
    multiple of the blocksize (the unaligned loop), is refused by name rather than run on wrong codes."""
    weight = _weight(32, 128)
    cfg = dataclasses.replace(mm.default_fused_config("forward", 2, 32, 128, 64, torch.device("cpu")), decode="prmt")
    with backend("triton"), pytest.raises(ValueError, match="decode='prmt' needs bf16 x"):
        mm.nf4_fused_forward(_inputs((2, 128), torch.float32), weight, cfg)
    with backend("triton"), pytest.raises(ValueError, match="decode='prmt' needs bf16 x"):
        mm.nf4_fused_forward(_inputs((2, 130), torch.bfloat16), _weight(32, 130), cfg)
    with backend("triton"), pytest.raises(ValueError, match="decode='prmt' needs bf16 x"):
        mm.nf4_fused_forward(_inputs((2, 128), torch.float16), weight, cfg)
    shifted = dataclasses.replace(weight, packed=torch.empty(weight.packed.numel() + 1, dtype=torch.uint8)[1:])
    shifted.packed.copy_(weight.packed)
    with backend("triton"), pytest.raises(ValueError, match="aligned to 4"):
        mm.nf4_fused_forward(_inputs((2, 128), torch.bfloat16), shifted, cfg)
    with pytest.raises(ValueError, match="decode must be one of table, prmt, got 'lut'"):
        mm.FusedConfig(16, 64, decode="lut")


def test_fused_forward_defaults_to_the_register_decode_where_it_applies(monkeypatch):
    """Without a config the fused forward decodes in registers for bf16 x on whole blocks with the packed
    bytes aligned to 4 (the same results as the table, twice as fast on an H100), and takes the table
    for any other x or K; the backward has no register decode."""
    weight = _weight(32, 128)
    assert mm.prmt_decode_applies(torch.bfloat16, True, weight.packed)  # under the interpreter (conftest)
    assert not mm.prmt_decode_applies(torch.float16, True, weight.packed)
    assert not mm.prmt_decode_applies(torch.float32, True, weight.packed)
    assert not mm.prmt_decode_applies(torch.bfloat16, False, weight.packed)
    shifted = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8)[1:]
    assert not mm.prmt_decode_applies(torch.bfloat16, True, shifted)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor outside the interpreter: no decode at all
    assert not mm.prmt_decode_applies(torch.bfloat16, True, weight.packed)
    monkeypatch.undo()
    cpu = torch.device("cpu")
    assert mm.default_fused_config("forward", 2, 32, 128, 64, cpu, prmt=True).decode == "prmt"
    assert mm.default_fused_config("forward", 2, 32, 128, 64, cpu).decode == "table"
    assert mm.default_fused_config("backward", 2, 32, 128, 64, cpu, prmt=True).decode == "table"
    seen = []
    real = mm.launch_fitting
    monkeypatch.setattr(mm, "launch_fitting", lambda kernel, grid, args, meta:
                        seen.append((meta["PRMT"], meta["SWAP"])) or real(kernel, grid, args, meta))
    swap = mm.fused_swap(cpu)
    with backend("triton"):
        y = mm.nf4_fused_forward(_inputs((2, 128), torch.bfloat16), weight)
        mm.nf4_fused_forward(_inputs((2, 128), torch.float16), weight)
        table = mm.nf4_fused_forward(_inputs((2, 128), torch.bfloat16), weight, dataclasses.replace(
            mm.default_fused_config("forward", 2, 32, 128, 64, cpu), swap=swap))
    assert seen == [(True, swap), (False, False), (False, swap)] and torch.equal(y, table)


@pytest.mark.parametrize("m,n,k,blocksize,block_n,split", [
    (3, 37, 128, 64, 32, 1), (5, 70, 256, 128, 32, 2), (2, 33, 192, 64, 16, 3), (17, 40, 64, 64, 32, 1),
    (1, 20, 512, 128, 16, 2)])
def test_fused_register_decode_equals_the_pair_table(m, n, k, blocksize, block_n, split):
    """The fused forward with decode="prmt" (bf16 x, the register decode's integer model under the
    interpreter) hands its dots the pair table's operands: equal outputs bit for bit, across
    blocksizes 64 and 128 (8 and 16 words a row per chunk), K splits, N past the last row tile and two
    row tiles of x. (The interpreter's bf16 dot is not the GPU's, but both runs share it.)"""
    weight = _weight(n, k, blocksize, seed=n)
    x = _inputs((m, k), torch.bfloat16, seed=m)
    cfg = mm.FusedConfig(16, block_n, split=split)
    with backend("triton"):
        table = mm.nf4_fused_forward(x, weight, cfg)
        prmt = mm.nf4_fused_forward(x, weight, dataclasses.replace(cfg, decode="prmt"))
    assert torch.equal(prmt, table)


SWAP_CASES = [(3, 37, 128, 64, 32, 1), (5, 70, 256, 128, 64, 2), (1, 20, 512, 128, 16, 2), (17, 40, 192, 64, 32, 3),
              (16, 130, 256, 64, 128, 1)]


@pytest.mark.parametrize("m,n,k,blocksize,block_n,split", SWAP_CASES)
def test_fused_swap_computes_w_times_x(m, n, k, blocksize, block_n, split):
    """FusedConfig(swap=True): each chunk's product as W x^T with the chunk's columns in order. In fp16
    (the interpreter's bf16 dot is not exact; test_fused_swap_on_gpu covers bf16) it equals the product
    with the codes rounded to fp16 (the aligned forward's operands) to within the summation order, as
    x W^T does: K splits, N past the last row tile, M past 16, blocksizes 64 and 128."""
    weight = _weight(n, k, blocksize, seed=n)
    x = _inputs((m, k), torch.float16, seed=m)
    cfg = mm.FusedConfig(16, block_n, split=split, swap=True)
    with backend("triton"):
        swapped = mm.nf4_fused_forward(x, weight, cfg)
        plain = mm.nf4_fused_forward(x, weight, dataclasses.replace(cfg, swap=False))
    want = (x.double() @ _dequant_rounded_codes(weight, torch.float16).double().t()).to(torch.float16)
    assert_close(swapped, want, *TOLERANCES[torch.float16], name="fused swap")
    assert_close(swapped, plain, *TOLERANCES[torch.float16], name="fused swap against x W^T")


@pytest.mark.parametrize("m,n,k,blocksize,block_n,split", SWAP_CASES)
def test_fused_swap_register_decode_equals_the_pair_table(m, n, k, blocksize, block_n, split):
    """With swap, the register decode (bf16) hands the one dot per chunk the pair table's operands in the
    same order: equal outputs bit for bit (the interpreter's bf16 dot is shared by both runs)."""
    weight = _weight(n, k, blocksize, seed=n)
    x = _inputs((m, k), torch.bfloat16, seed=m)
    cfg = mm.FusedConfig(16, block_n, split=split, swap=True)
    with backend("triton"):
        table = mm.nf4_fused_forward(x, weight, cfg)
        prmt = mm.nf4_fused_forward(x, weight, dataclasses.replace(cfg, decode="prmt"))
    assert torch.equal(prmt, table)


def test_fused_swap_default_and_its_checks(monkeypatch):
    """The register decode's default config takes swap (FUSED_SWAP, or BEZOAR_NF4_FUSED_SWAP, or a tuning
    entry); the table's does not. swap needs 16-bit x and whole blocks: anything else is one error."""
    cpu = torch.device("cpu")
    monkeypatch.delenv("BEZOAR_NF4_FUSED_SWAP", raising=False)
    assert mm.default_fused_config("forward", 2, 32, 128, 64, cpu, prmt=True).swap is mm.FUSED_SWAP
    assert not mm.default_fused_config("forward", 2, 32, 128, 64, cpu).swap
    assert not mm.default_fused_config("backward", 2, 32, 128, 64, cpu, prmt=True).swap
    monkeypatch.setenv("BEZOAR_NF4_FUSED_SWAP", "0")
    assert not mm.default_fused_config("forward", 2, 32, 128, 64, cpu, prmt=True).swap
    monkeypatch.setenv("BEZOAR_NF4_FUSED_SWAP", "1")
    assert mm.default_fused_config("forward", 2, 32, 128, 64, cpu, prmt=True).swap
    monkeypatch.setenv("BEZOAR_NF4_FUSED_SWAP", "yes")
    with pytest.raises(ValueError, match="BEZOAR_NF4_FUSED_SWAP: expected 0 or 1, got 'yes'"):
        mm.fused_swap(cpu)
    monkeypatch.delenv("BEZOAR_NF4_FUSED_SWAP")
    cfg = mm.FusedConfig(16, 32, swap=True)
    with backend("triton"), pytest.raises(ValueError, match="swap=True needs 16-bit x"):
        mm.nf4_fused_forward(_inputs((2, 128), torch.float32), _weight(32, 128), cfg)
    with backend("triton"), pytest.raises(ValueError, match="swap=True needs 16-bit x and K a multiple of the "
                                                            "blocksize 64, got torch.bfloat16, K=100"):
        mm.nf4_fused_forward(_inputs((2, 100), torch.bfloat16), _weight(32, 100), cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("n,k", [(8640, 3200), (3200, 8640), (3200, 3200)])
def test_fused_swap_on_gpu(n, k, m):
    """The swapped fused forward on the GPU (a warpgroup MMA on sm_90, W's rows as its M dimension, the
    register decode's PTX) against an fp32 product of the bf16-rounded codes, and against x W^T, at the
    3B shapes and the M the fused path serves."""
    weight = _weight(n, k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    cfg = dataclasses.replace(mm.default_fused_config("forward", m, n, k, weight.blocksize, x.device, prmt=True),
                              swap=True)
    with backend("triton"):
        swapped = mm.nf4_fused_forward(x, weight, cfg)
        plain = mm.nf4_fused_forward(x, weight, dataclasses.replace(cfg, swap=False))
    want = (x.float() @ _dequant_rounded_codes(weight, torch.bfloat16).t()).to(torch.bfloat16)
    assert_close(swapped, want, 2e-2, 2e-2, name="fused swap on GPU")
    assert_close(swapped, plain, 2e-2, 2e-2, name="fused swap against x W^T on GPU")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("n,k", [(8640, 3200), (3200, 8640)])
def test_fused_register_decode_on_gpu_equals_the_pair_table(n, k, m):
    """The fused forward's register decode gives its dots the same bf16 code operands as the pair table
    in the same order: the outputs are equal bit for bit."""
    weight = _weight(n, k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    cfg = mm.default_fused_config("forward", m, n, k, weight.blocksize, x.device)
    with backend("triton"):
        table = mm.nf4_fused_forward(x, weight, cfg)
        prmt = mm.nf4_fused_forward(x, weight, dataclasses.replace(cfg, decode="prmt"))
    assert torch.equal(prmt, table)


@pytest.mark.parametrize("m,n,k,blocksize,double_quant",
                         GEMV_SHAPES + [(1, 130, 640, 64, True), (1, 70, 384, 128, False)])
def test_gemv_register_decode_reads_bf16_x_as_pairs(m, n, k, blocksize, double_quant):
    """At M = 1 with bf16 x the register decode reads x as int32 pairs of columns (X_PAIRS), halves exact
    in fp32: against x @ W' (bf16 codes) in fp64, and an x that is not 4-byte aligned (an odd column
    offset) takes the plain loads with the same result; more rows always take the plain loads."""
    weight = _weight(n, k, blocksize, double_quant, seed=m + 13)
    x = _inputs((m, k), torch.bfloat16, seed=n + 13)
    want = (x.double() @ _dequant_rounded_codes(weight, torch.bfloat16).double().t())
    odd = torch.empty((m, k + 1), dtype=torch.bfloat16)[:, 1:]
    odd.copy_(x)
    assert mm._x_pairs_ok(x) == (m == 1) and not mm._x_pairs_ok(odd)
    with backend("triton"):
        y = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table="prmt"))
        y_odd = mm.nf4_gemv_forward(odd, weight, mm.GemvConfig(block_n=16, blocks=2, table="prmt"))
    assert_close(y.double(), want.to(torch.bfloat16).double(), 1e-2, 1e-2, name="gemv prmt bf16")
    assert torch.equal(y, y_odd)

@pytest.mark.parametrize("table", mm.GEMV_TABLES)
@pytest.mark.parametrize("block_n,blocks", [(4, 64), (8, 16)])
def test_gemv_few_rows_by_most_of_k(block_n, blocks, table):
    """The sweep's small tiles: 4 rows by all of K in one masked range (no split, no partials), and 8
    rows by 16 blocks (a partial last range), against the product of the weight each lookup decodes."""
    weight = _weight(37, 3200, 64, True, seed=5)
    x = _inputs((1, 3200), torch.float32, seed=6)
    w = _dequant_rounded_codes(weight, torch.bfloat16 if table == "prmt" else torch.float32)
    with backend("triton"):
        y = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=block_n, blocks=blocks, table=table))
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(y, (x.double() @ w.double().t()).float(), atol, rtol, name=f"gemv {block_n}x{blocks} {table}")


@pytest.mark.parametrize("table", mm.GEMV_TABLES)
@pytest.mark.parametrize("steps", [3, 7])
@pytest.mark.parametrize("m,n,k,blocksize,double_quant,dtype", [
    (1, 37, 128, 64, True, torch.float32), (3, 70, 384, 128, False, torch.float16),
    (8, 16, 64, 64, True, torch.float32), (2, 40, 640, 64, True, torch.float16),
    (1, 37, 1600, 64, True, torch.float32), (4, 20, 1280, 128, True, torch.float16)])
def test_gemv_steps_walk_k_ranges_in_a_loop(m, n, k, blocksize, double_quant, dtype, steps, table):
    """GemvConfig(steps=S): each program walks S ranges of 2 blocks, loading each range two ranges ahead.
    The sums are the one-range kernel's (blocks=2) regrouped, so they agree to fp32 rounding, and both
    match the product of the weight the lookup decodes. Rows of 10, 25 and 10 blocks (5, 13 and 5 ranges)
    give last splits with dead ranges (ranges past the row: their x is masked to 0) at 3 steps and one
    split at 7 (13 ranges: 2 splits); rows of 1-3 blocks cap the steps at the ranges a row has."""
    weight = _weight(n, k, blocksize, double_quant, seed=m + 17)
    x = _inputs((m, k), dtype, seed=n + 17)
    w = _dequant_rounded_codes(weight, torch.bfloat16 if table == "prmt" else torch.float32)
    with backend("triton"):
        one = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table=table))
        looped = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table=table, steps=steps))
    atol, rtol = TOLERANCES[dtype]
    assert looped.dtype == dtype and looped.shape == (m, n)
    assert_close(looped, (x.double() @ w.double().t()).to(dtype), atol, rtol, name=f"gemv steps={steps} {table}")
    assert_close(looped.double(), one.double(), 1e-5 if dtype == torch.float32 else 2e-3, 1e-5 if dtype ==
                 torch.float32 else 2e-3, name="steps against one range")


@pytest.mark.parametrize("table", ["prmt", "gather"])
def test_gemv_steps_and_gather_read_bf16_x_as_pairs(table):
    """The path a tuned M = 1 config takes: bf16 x read as int32 pairs (X_PAIRS), one range and three
    steps, against x @ W' in fp64 (W' with the codes the lookup decodes). The interpreter rounds fp32 to
    bf16 by truncation, so the bound is two bf16 steps of the result; the steps against one range to
    one."""
    weight = _weight(37, 1600, 64, True, seed=19)
    x = _inputs((1, 1600), torch.bfloat16, seed=20)
    assert mm.gemv_x_pairs(table, x)
    want = (x.double() @ _dequant_rounded_codes(weight, torch.bfloat16 if table == "prmt" else torch.float32)
            .double().t())
    with backend("triton"):
        one = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table=table))
        stepped = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, table=table, steps=3))
    step = want.abs() * 2.0 ** -7 + 1e-6
    assert ((one.double() - want).abs() <= 2 * step).all()
    assert ((stepped.double() - want).abs() <= 2 * step).all()
    assert ((stepped.double() - one.double()).abs() <= one.double().abs() * 2.0 ** -7 + 1e-6).all()


def test_gemv_steps_are_checked_and_capped(monkeypatch):
    """steps must be a whole number from 1; more steps than a row has ranges launch as many as it has
    (one split), with the result of the capped count."""
    for bad in (0, -2, 1.5, None, True):
        with pytest.raises(ValueError, match="steps must be a whole number >= 1"):
            mm.GemvConfig(steps=bad)
    weight = _weight(20, 640, 64, True, seed=3)  # 10 blocks a row: 5 ranges of 2
    x = _inputs((1, 640), torch.float32, seed=4)
    launched = []
    real = mm._nf4_gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launched.append((grid, meta["STEPS"]))
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(mm, "_nf4_gemv_kernel", Spy())
    with backend("triton"):
        capped = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, steps=64))
        whole = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, steps=5))
        two = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, steps=2))
    assert launched == [((2, 1), 5), ((2, 1), 5), ((2, 3), 2)]
    assert torch.equal(capped, whole)
    assert_close(two, whole, 1e-5, 1e-5, name="3 splits against 1")


@pytest.mark.parametrize("dtype,blocks", [(torch.float32, None), (torch.float16, 2)])  # one K range; split sums
@pytest.mark.parametrize("m,n,k,blocksize,double_quant", GEMV_SHAPES)
def test_gemv_register_decode_uses_bf16_codes(m, n, k, blocksize, double_quant, dtype, blocks):
    """GemvConfig(table="prmt") decodes the codes in registers, rounded to bf16 (as the aligned fused
    forward's dot operands are): it equals x @ W' with W' = bf16(code) * absmax in fp32, rounded once,
    and stays within the codes' rounding (0.312%) of the byte table's exact-code result."""
    weight = _weight(n, k, blocksize, double_quant, seed=m + 11)
    x = _inputs((m, k), dtype, seed=n + 11)
    rounded = _dequant_rounded_codes(weight, torch.bfloat16).double()
    with backend("triton"):
        y = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=blocks, table="prmt"))
        exact_codes = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=blocks))
    atol, rtol = TOLERANCES[dtype]
    assert_close(y, (x.double() @ rounded.t()).to(dtype), atol, rtol, name="gemv prmt")
    assert not torch.equal(y, exact_codes)  # the codes are rounded: a table mix-up would go unseen otherwise
    bound = (x.double().abs() @ (0.00312 * rounded.abs()).t()).to(dtype)
    assert ((y.double() - exact_codes.double()).abs() <= bound.double() + 2 * atol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_into_columns_of_a_wider_buffer(dtype):
    """out= a column slice of a wider buffer, with the K ranges summed into it (10 blocks, 2 per range),
    and the other columns untouched; a wrong out is refused."""
    weight = _weight(24, 640, 64, True, seed=3)
    x = _inputs((3, 640), dtype, seed=4)
    wide = torch.full((3, 40), 5.0, dtype=dtype)
    with backend("triton"):
        got = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2), out=wide[:, 8:32])
        with pytest.raises(ValueError, match="out must be"):
            mm.nf4_gemv_forward(x, weight, out=torch.empty(3, 24, dtype=dtype).t().contiguous().t())
        with pytest.raises(ValueError, match="out must be"):
            mm.nf4_gemv_forward(x, weight, out=torch.empty(3, 23, dtype=dtype))
    exact = (x.double() @ nf4.dequantize_nf4_reference(weight, torch.float32).double().t()).to(dtype)
    assert got.data_ptr() == wide[:, 8:32].data_ptr()
    assert_close(wide[:, 8:32], exact, *TOLERANCES[dtype], name="gemv into columns")
    assert torch.all(wide[:, :8] == 5.0) and torch.all(wide[:, 32:] == 5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_split_sum_in_kernel(monkeypatch, dtype):
    """Several K ranges: the last program of each row tile sums the fp32 partials in split order, so the
    result is the second launch's bit for bit; every arrival count is back at zero afterwards (the next
    call reuses them), into a column slice too; with more row tiles than counts, the second launch
    sums them."""
    weight = _weight(70, 640, 64, True, seed=5)  # 10 blocks per row: 5 ranges of 2, 5 row tiles of 16
    x = _inputs((3, 640), dtype, seed=6)
    sums = []
    monkeypatch.setattr(mm, "_sum_splits", lambda *a, _f=mm._sum_splits: sums.append(1) or _f(*a))
    cfg = mm.GemvConfig(block_n=16, blocks=2)
    with backend("triton"):
        mm._split_count_buffers.clear()
        second = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, reduce_in_kernel=False))
        assert sums == [1] and not mm._split_count_buffers
        first = mm.nf4_gemv_forward(x, weight, cfg)
        again = mm.nf4_gemv_forward(x, weight, cfg)
        wide = torch.zeros((3, 90), dtype=dtype)
        mm.nf4_gemv_forward(x, weight, cfg, out=wide[:, 10:80])
        counts = mm._split_count_buffers[x.device]
        assert sums == [1] and counts.dtype == torch.int32 and not counts.any()
        monkeypatch.setattr(mm, "_SPLIT_COUNTS", 4)
        mm._split_count_buffers.clear()
        fallback = mm.nf4_gemv_forward(x, weight, cfg)
        assert sums == [1, 1] and not mm._split_count_buffers
    assert torch.equal(first, second) and torch.equal(again, second) and torch.equal(fallback, second)
    assert torch.equal(wide[:, 10:80], second) and not wide[:, :10].any() and not wide[:, 80:].any()
    exact = (x.double() @ nf4.dequantize_nf4_reference(weight, torch.float32).double().t()).to(dtype)
    assert_close(first, exact, *TOLERANCES[dtype], name="gemv split sum")


def test_gemv_dependent_launch_config(monkeypatch):
    """GemvConfig(pdl=True) asks for a programmatic dependent launch: where there is none to be had (the
    interpreter, CPU tensors) the kernel launches plainly with the same results; the default comes from
    BEZOAR_NF4_GEMV_PDL, then the tuning entry nf4.gemv_pdl, then GEMV_PDL (off)."""
    weight = _weight(40, 256)
    x = _inputs((1, 256), torch.float32)
    assert not mm.pdl_supported(torch.device("cpu"))
    seen = []
    real = mm._nf4_gemv_kernel
    launches = type("Spy", (), {"__getitem__": lambda self, grid: lambda *a, **kw: seen.append(
        (kw["PDL"], kw["launch_pdl"])) or real[grid](*a, **kw)})()
    monkeypatch.setattr(mm, "_nf4_gemv_kernel", launches)
    with backend("triton"):
        plain = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2))
        dependent = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(block_n=16, blocks=2, pdl=True))
    assert torch.equal(plain, dependent) and seen == [(False, False), (False, False)]
    monkeypatch.delenv("BEZOAR_NF4_GEMV_PDL", raising=False)
    assert mm.gemv_pdl(torch.device("cpu")) is mm.GEMV_PDL is False
    assert mm._tuned_gemv_config(1, torch.device("cpu")).pdl is False
    monkeypatch.setenv("BEZOAR_NF4_GEMV_PDL", "1")
    assert mm._tuned_gemv_config(1, torch.device("cpu")).pdl is True
    monkeypatch.setenv("BEZOAR_NF4_GEMV_PDL", "on")
    with pytest.raises(ValueError, match="BEZOAR_NF4_GEMV_PDL: expected 0 or 1, got 'on'"):
        mm.gemv_pdl(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(3200, 3200, 1), (8640, 3200, 4), (3200, 8640, 1)])
def test_gemv_steps_and_gather_on_gpu(n, k, m):
    """What the sweep times beside the one-range register decode, on the 3B shapes with bf16 x: the
    stepped gemv (GemvConfig.steps) and the shared-memory lookup (table "gather"), each against x @ W'
    in fp64 (W' with the codes that lookup decodes: bf16 for "prmt", fp32 for "gather"), and the
    stepped results against one range within fp32 summation order (one bf16 step of the result)."""
    weight = _weight(n, k, seed=n + k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    tiles = (16, 8) if m == 1 else (16, 4)
    with backend("triton"):
        for table, codes in (("prmt", torch.bfloat16), ("gather", torch.float32)):
            want = (x.double() @ _dequant_rounded_codes(weight, codes).double().t()).to(torch.bfloat16).double()
            one = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(*tiles, table=table))
            assert_close(one.double(), want, 1e-2, 1e-2, name=f"gemv {table}")
            # loads two ranges ahead in the loop; all of a row's ranges (one split)
            for steps in (4, 64) if table == "prmt" else (4,):
                got = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(*tiles, table=table, steps=steps))
                step = one.float().abs() * 2.0 ** -7 + 1e-6  # one bf16 step of the result
                assert ((got.float() - one.float()).abs() <= step).all(), (table, steps)
                assert_close(got.double(), want, 1e-2, 1e-2, name=f"gemv {table} steps={steps}")


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_gemv_dependent_launches_on_gpu_chain_bit_for_bit(graph):
    """Dependent launches in a chain where each gemv reads what the one before wrote (and a torch op
    writes the first input right before), eagerly and captured in a CUDA graph: the same bits as plain
    launches. Where the GPU has no dependent launches (before sm_90) both are plain."""
    weights = [_weight(3200, 3200, seed=s, device="cuda") for s in range(3)]
    x0 = _inputs((1, 3200), torch.bfloat16, device="cuda")
    base = mm._tuned_gemv_config(1, x0.device)

    def chain(pdl):
        cfg = dataclasses.replace(base, pdl=pdl)
        x = x0 * 1.0  # written by the kernel right before the first gemv
        for w in weights:
            x = mm.nf4_gemv_forward(x, w, cfg) * 0.05
            x = mm.nf4_gemv_forward(x, weights[0], cfg)  # two gemvs back to back
        return x

    with backend("triton"):
        want = chain(False)
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                chain(True)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                got = chain(True)
            for _ in range(3):
                g.replay()
            torch.cuda.synchronize()
        else:
            got = chain(True)
    assert torch.equal(got, want)


def test_gemv_tile_choice_and_config_check():
    assert mm.gemv_tile(1, 64, 50) == ((32, 8) if triton_version() >= (3, 9) else (16, 8))
    assert mm.gemv_tile(8, 128, 135) == (16, 2)
    # a short row: the tile stops at the row's blocks and takes more rows
    assert mm.gemv_tile(1, 64, 2) == ((128, 2) if triton_version() >= (3, 9) else (64, 2))
    weight = _weight(16, 128, 64, True, seed=0)
    with pytest.raises(ValueError, match="powers of two"):
        mm.nf4_gemv_forward(_inputs((1, 128), torch.float32), weight, mm.GemvConfig(blocks=3))


def test_gemv_path_in_autograd_and_fallbacks(monkeypatch):
    """path="gemv": gemv forward, dequant backward; shapes gemv cannot take run dequant; auto takes gemv
    only up to BEZOAR_NF4_GEMV_MAX_M."""
    weight = _weight(48, 192)
    x = _inputs((2, 3, 192), torch.float32)  # M = 6 after flattening
    dy = _inputs((2, 3, 48), torch.float32, seed=2)
    y_ref, dx_ref = _run(mm.nf4_matmul_reference, x, weight, dy, None)
    calls = []
    monkeypatch.setattr(mm, "nf4_gemv_forward", lambda *a, _f=mm.nf4_gemv_forward: calls.append(1) or _f(*a))
    with backend("triton"):
        y, dx = _run(mm.nf4_matmul, x, weight, dy, "gemv")
        assert calls == [1]
        y9 = mm.nf4_matmul(_inputs((9, 192), torch.float32), weight, "gemv")  # M = 9: dequant
        odd = _weight(20, 100)  # K not a multiple of 64: dequant
        y_odd = mm.nf4_matmul(_inputs((1, 100), torch.float32), odd, "gemv")
    assert calls == [1]
    assert_close(y, y_ref, 1e-5, 1e-5, name="gemv forward")
    assert_close(dx, dx_ref, 1e-5, 1e-5, name="gemv backward (dequant)")
    assert_close(y9, mm.nf4_matmul_reference(_inputs((9, 192), torch.float32), weight), 1e-5, 1e-5, name="M=9")
    assert_close(y_odd, mm.nf4_matmul_reference(_inputs((1, 100), torch.float32), odd), 1e-5, 1e-5, name="odd K")
    assert not mm.gemv_supported(9, weight) and not mm.gemv_supported(1, odd) and mm.gemv_supported(8, weight)
    with pytest.raises(ValueError, match="packed must be contiguous"):  # every kernel reads the bytes flat
        dataclasses.replace(weight, packed=torch.stack([weight.packed, weight.packed], 1)[:, 0])
    shifted = dataclasses.replace(weight, packed=torch.cat([weight.packed.new_zeros(1), weight.packed])[1:])
    assert shifted.packed.data_ptr() % 4 == 1 and not mm.gemv_supported(1, shifted)
    with pytest.raises(ValueError, match="aligned to 4"):
        mm.nf4_gemv_forward(_inputs((1, 192), torch.float32), shifted)
    with pytest.raises(ValueError, match="M <= 8, K a multiple"):
        mm.nf4_gemv_forward(_inputs((1, 100), torch.float32), odd)

    monkeypatch.delenv("BEZOAR_NF4_FUSED_MAX_M", raising=False)
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "4")
    assert mm.resolve_path(None, 4, weight) == "gemv"
    assert mm.resolve_path(None, 5, weight) == ("fused" if mm.FUSED_MAX_M >= 5 else "dequant")
    assert mm.resolve_path(None, 1, odd) == ("fused" if mm.FUSED_MAX_M >= 1 else "dequant")
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "0")
    assert mm.resolve_path(None, 1, weight) != "gemv"
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "x")
    with pytest.raises(ValueError, match="BEZOAR_NF4_GEMV_MAX_M"):
        mm.resolve_path(None, 1, weight)


def test_leading_dims_strides_and_empty():
    weight = _weight(40, 96)
    x = _inputs((2, 3, 5, 96), torch.float16)
    x_t = _inputs((96, 6), torch.float16).t()  # non-contiguous rows
    with backend("triton"):
        y = mm.nf4_matmul(x, weight)
        y_t = mm.nf4_matmul(x_t, weight)
        empty = mm.nf4_matmul(x[:, :0], weight)
    atol, rtol = TOLERANCES[torch.float16]
    assert y.shape == (2, 3, 5, 40)
    assert_close(y, mm.nf4_matmul_reference(x, weight), atol, rtol, name="batched")
    assert_close(y_t, mm.nf4_matmul_reference(x_t, weight), atol, rtol, name="strided")
    assert empty.shape == (2, 0, 5, 40)


def test_no_grad_to_weight_and_grad_only_when_needed():
    weight = _weight(24, 64)
    x = _inputs((4, 64), torch.float32)
    with backend("triton"):
        y = mm.nf4_matmul(x, weight)  # x does not require grad
    assert not y.requires_grad
    assert not any(t.requires_grad for t in weight.tensors())


def test_path_choice_and_threshold_override(monkeypatch):
    monkeypatch.delenv("BEZOAR_NF4_FUSED_MAX_M", raising=False)
    monkeypatch.delenv("BEZOAR_NF4_GEMV_MAX_M", raising=False)
    assert mm.resolve_path(None, max(mm.FUSED_MAX_M, mm.GEMV_MAX_M) + 1) == "dequant"
    assert mm.GEMV_MAX_M == 1  # measured on an H200: gemv is the fastest forward at M = 1 only
    assert mm.FUSED_MAX_M == 16  # measured on an H100 and an H200: the fused forward up to M = 16
    assert mm.resolve_path("auto", 1) == "gemv" and mm.resolve_path("auto", 2) == "fused"
    assert mm.resolve_path("auto", 16) == "fused" and mm.resolve_path("auto", 17) == "dequant"
    assert mm.resolve_path("dequant", 1) == "dequant"
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "4096")
    assert mm.resolve_path(None, 4096) == "fused"
    assert mm.resolve_path(None, 4097) == "dequant"
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "lots")
    with pytest.raises(ValueError, match="BEZOAR_NF4_FUSED_MAX_M"):
        mm.resolve_path(None, 2)  # M = 1 goes to gemv before the fused threshold is read
    with pytest.raises(ValueError, match="path 'cublas'"):
        mm.resolve_path("cublas", 1)


def test_dequant_buffer_is_reused():
    small, big = _weight(8, 64), _weight(32, 64, seed=3)
    with backend("triton"):
        a = mm.dequant_buffer(big, torch.float32)
        ptr = a.data_ptr()
        b = mm.dequant_buffer(small, torch.float32)
    assert b.data_ptr() == ptr and b.shape == (8, 64)
    assert torch.equal(b, nf4.dequantize_nf4_reference(small, torch.float32))


def test_bad_inputs_raise():
    weight = _weight(8, 64)
    with pytest.raises(ValueError, match="last dim 63"):
        mm.nf4_matmul(torch.randn(2, 63), weight)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        mm.nf4_matmul(torch.randn(2, 64).double(), weight)
    flat = nf4.quantize_nf4_reference(torch.randn(128), 64)
    with pytest.raises(ValueError, match="2-D"):
        mm.nf4_matmul(torch.randn(2, 128), flat)


def test_bench_smoke():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "nf4.py"), "--smoke", "--sweep", "--sweep-gemv", "--sweep-dequant",
                           "--timing", "graph"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "timing: eager (do_bench per call: host launch gaps included) (graph timing needs a GPU)" in proc.stdout
    assert "| shape" in proc.stdout and "crossover" in proc.stdout and "fused config sweep" in proc.stdout
    assert "gemv config sweep" in proc.stdout and "GemvConfig(" in proc.stdout
    # after the sweep, what tune.py derives at the swept tiles (the gemv threshold among it)
    assert re.search(r"with the swept tiles, bench/tune\.py would write: \{.*'nf4\.gemv_max_m': \d+", proc.stdout)
    assert "dequantize launch sweep" in proc.stdout
    # the targets again for the thresholds bench/tune.py would write from this run
    said = re.search(r"bench/tune\.py would write: gemv to M = \d+, fused to M = \d+, tma from M = \d+, fused order "
                     r"(W x\^T|x W\^T) \((.*)\)", proc.stdout)
    assert said and "tuned/cublas" in proc.stdout
    # the tuned targets appear exactly when the derived thresholds differ from the ones the run had
    tuned_targets = re.findall(r"\[auto with this run's derived thresholds \(bench/tune\.py\): gemv to M = \d+, fused "
                               r"to M = \d+, tma from M = \d+, fused order (?:W x\^T|x W\^T)\]", proc.stdout)
    # the tma kernels are timed in smoke too (in fp16: they take no fp32), forward and backward
    lines = proc.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("| shape | M |") and "nf4_tma" in line]
    assert len(headers) == 2, "a fwd and a bwd table with an nf4_tma column"
    for i in headers:
        column = [c.strip() for c in lines[i].split("|")].index("nf4_tma")
        row = next(line for line in lines[i:] if line.startswith("| 96x128 | 40 |"))
        float([c.strip() for c in row.split("|")][column])  # a time, not an empty cell
    assert len(tuned_targets) == (0 if said.group(2) == "the thresholds this run had" else 4), tuned_targets
    assert not list((ROOT / "bench" / "results").glob("nf4-cpu-*.json")), "smoke mode must not write results"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "dequant", "gemv"])
@pytest.mark.parametrize("m", [1, 4, 16, 333])
@pytest.mark.parametrize("n,k", [(3200, 3200), (8640, 3200), (3200, 8640), (61, 130)])
def test_bf16_on_gpu_matches_reference(m, n, k, path):
    weight = _weight(n, k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    dy = _inputs((m, n), torch.bfloat16, seed=2, device="cuda")
    w = nf4.dequantize_nf4_reference(weight, torch.bfloat16).float()
    with backend("triton"):
        y, dx = _run(mm.nf4_matmul, x, weight, dy, path)
    # vs an fp32 product of the same bf16 operands: only summation order and the final rounding differ
    # (gemv, which takes M <= 8, does not round W to bf16 first: against the fp32 dequant for it)
    if path == "gemv" and m <= mm.GEMV_MAX_ROWS:
        w_fwd = nf4.dequantize_nf4_reference(weight, torch.float32)
    elif path == "fused" and k % weight.blocksize == 0:
        # the aligned fused forward multiplies bf16 code values and scales the fp32 product by absmax
        # (module docstring): against a bf16-rounded W, 1458 of 1M elements were off on an H100
        w_fwd = _dequant_rounded_codes(weight, torch.bfloat16)
    else:
        w_fwd = w
    assert_close(y, (x.float() @ w_fwd.t()).to(torch.bfloat16), 2e-2, 2e-2, name="bf16 forward")
    assert_close(dx, (dy.float() @ w).to(torch.bfloat16), 2e-2, 2e-2, name="bf16 backward")


@pytest.mark.gpu
@pytest.mark.parametrize("table", mm.GEMV_TABLES)
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k", [(8640, 3200), (3200, 8640)])
def test_gemv_tables_on_gpu(n, k, m, table):
    """Each code lookup of the gemv kernel on the GPU (the register decode runs its PTX byte permutes
    only there) against an fp32 product of the weight it decodes: exact codes for the byte and nibble
    tables, bf16-rounded codes for "prmt"."""
    weight = _weight(n, k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    w = _dequant_rounded_codes(weight, torch.bfloat16 if table == "prmt" else torch.float32)
    with backend("triton"):
        y = mm.nf4_gemv_forward(x, weight, mm.GemvConfig(table=table))
    assert_close(y, (x.float() @ w.t()).to(torch.bfloat16), 2e-2, 2e-2, name=f"gemv {table}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,m", [("gemv", 1), ("gemv", 8), ("fused", 1), ("fused", 16)])
@pytest.mark.parametrize("n,k", [(3200, 8640), (8640, 3200)])
def test_split_sum_on_gpu_is_exact_and_repeatable(kernel, m, n, k):
    """The in-kernel split sums of the gemv and fused forwards on real concurrency: hundreds of tiles
    with several K ranges each, run 50 times eagerly and 20 times as a CUDA-graph replay of 4 calls,
    always bit for bit the two-launch sum (the same fp32 additions in the same order), with every
    arrival count back at zero."""
    weight = _weight(n, k, device="cuda")
    x = _inputs((m, k), torch.bfloat16, device="cuda")
    if kernel == "gemv":
        blocks = 4 if m == 1 else 2
        cfg, two_launch = mm.GemvConfig(blocks=blocks), mm.GemvConfig(blocks=blocks, reduce_in_kernel=False)

        def call(c, out):
            return mm.nf4_gemv_forward(x, weight, c, out=out)
    else:
        cfg = mm.default_fused_config("forward", m, n, k, weight.blocksize, x.device)
        assert cfg.split > 1
        two_launch = dataclasses.replace(cfg, reduce_in_kernel=False)

        def call(c, out):
            return out.copy_(mm.nf4_fused_forward(x, weight, c))
    with backend("triton"):
        want = call(two_launch, torch.empty((m, n), dtype=torch.bfloat16, device="cuda"))
        for _ in range(50):
            assert torch.equal(call(cfg, torch.empty_like(want)), want)
        outs = torch.empty((4, m, n), dtype=torch.bfloat16, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for i in range(4):  # warm-up outside the capture
                call(cfg, outs[i])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(4):
                call(cfg, outs[i])
        for _ in range(20):
            outs.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert all(torch.equal(outs[i], want) for i in range(4))
    assert not mm._split_count_buffers[x.device].any()


def test_backward_path_of_auto_and_of_explicit_paths(monkeypatch):
    """auto chooses both directions in the forward: with both thresholds up, a weight gemv cannot take (K
    not a multiple of the blocksize) runs the fused forward and the dequant backward (the fused backward
    lost to dequant + cuBLAS at every M on an H100), and gemv's backward is dequant too. An explicit
    ``path="fused"`` keeps the fused kernels in both directions; ``nf4_matmul_backward`` with auto never
    takes fused."""
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "8")
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "8")
    monkeypatch.delenv("BEZOAR_NF4_TMA_MIN_M", raising=False)
    calls = []
    for name in ("nf4_fused_forward", "nf4_fused_backward", "nf4_dequant_backward", "nf4_gemv_forward"):
        real = getattr(mm, name)
        monkeypatch.setattr(mm, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    odd, even = _weight(20, 100), _weight(20, 128)
    with backend("triton"):
        for weight, k in ((odd, 100), (even, 128)):
            x = _inputs((2, k), torch.float32).requires_grad_(True)
            mm.nf4_matmul(x, weight).sum().backward()
        assert calls == ["nf4_fused_forward", "nf4_dequant_backward", "nf4_gemv_forward", "nf4_dequant_backward"]
        calls.clear()
        x = _inputs((2, 100), torch.float32).requires_grad_(True)
        mm.nf4_matmul(x, odd, "fused").sum().backward()
        assert calls == ["nf4_fused_forward", "nf4_fused_backward"]
        calls.clear()
        mm.nf4_matmul_backward(_inputs((2, 20), torch.float32), odd, "auto")
        assert calls == ["nf4_dequant_backward"]
    assert mm.resolve_path("auto", 2, odd) == "fused" and mm.resolve_path("auto", 2, odd, backward=True) == "dequant"
    assert mm.resolve_path("fused", 2, odd, backward=True) == "fused"
