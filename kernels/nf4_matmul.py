"""``y = x @ dequant(W).T`` and its input gradient for a frozen NF4 weight W (N, K).

Forward ``y = x @ W.T`` (M, N); backward ``dx = dy @ W`` (M, K). W is frozen: no dW. Four
paths, chosen by M (rows of x after flattening leading dims):

* ``gemv`` (M <= 8, forward only: decoding at batch 1 to 8): each program loads its whole tile at
  once (a few rows of W by a range of absmax blocks, as 32-bit words of 8 values, and their scales)
  and has no loop, because at batch 1 the product is bound by memory latency more than bandwidth.
  A byte table gives both values of a packed byte in one load; the values times x go into an fp32
  partial per word (plain FMAs, no matrix units); a block's word partials are summed and scaled once
  (``gemv_block_scale``; per word where that builds worse). K's
  ranges of blocks give fp32 partials; the last program of a row tile to finish adds them up (an
  arrival count per tile, as in a split-K semaphore), so a decode step's ~180 gemv calls are not
  followed by as many summing launches.
* ``fused`` (small M): one kernel streams the packed bytes and feeds tensor cores inside the K loop.
  Where K is a multiple of the blocksize the forward does not dequantize: a 1 KB table gives each
  packed byte's two code values in x's dtype with one load, the dot runs on the codes, and each
  row's block scale multiplies the chunk's product (sm_90: ~6 instructions per weight, ~13 with a
  code gather per value and a multiply per weight). With bf16 x (the register decode) each chunk's
  product is W x^T by default (``FusedConfig.swap``): W's rows are the matrix unit's M dimension, a
  warpgroup MMA on sm_90. Small grids are split along the reduction
  (``FusedConfig.split``) into fp32 partials; in the forward the last split of each tile adds them
  up in split order (deterministic; an arrival count per tile), in the backward a second launch.
* ``dequant`` (large M: training): the Triton dequantize kernel writes W in the compute dtype
  into one buffer per (device, dtype) that every layer reuses, then cuBLAS multiplies. At large
  M the matmul is compute-bound and cuBLAS is hard to beat; the dequantization costs one pass
  over W per call. The backward dequantizes again (the buffer belongs to the next layer by then).
* ``tma`` (large M, sm_90): ``bezoar_kernels.nf4_tma``, persistent TMA GEMMs that decode the packed
  weight in registers inside the K loop, 256 rows of x per decoded tile, so there is no dequantize
  pass. Off in ``auto`` (``TMA_MIN_M = 0``): on an H100 at M = 4096 they took 1.36 to 2.24
  times cuBLAS's time at their best tiles, against 1.07 to 1.10 for dequant + cuBLAS in the same run
  (bench/README.md).

Directions: ``auto`` picks the forward's path by M; the backward of an ``auto`` forward runs dequant
where the forward ran gemv (no backward kernel) or fused (the fused backward was 5.7 to 6.9 times slower
than dequant + cuBLAS at M <= 16 on an H100), and tma where the forward ran tma. An explicit path is
kept in both directions.

``GEMV_MAX_M`` and ``FUSED_MAX_M`` are the largest M that ``auto`` sends to those kernels where neither
the environment (``BEZOAR_NF4_GEMV_MAX_M``, ``BEZOAR_NF4_FUSED_MAX_M``) nor a tuning file entry for the
device (``tuning.py``) says otherwise; bench/nf4.py measures the crossover on a GPU and bench/tune.py
writes it into the tuning file. On the H100 it was first measured on, the fused kernel lost at every M
(5 to 11 times slower than dequant + cuBLAS at M <= 16). Its compiled loop explained it: the code-table
gathers of every element went through cp.async into shared memory, with layout conversions for the
tensor-core operands. So the fused default was 0, and the gemv kernel was written; its default is 1
(fastest at M = 1 on an H200). Since then the fused forward decodes bf16 codes in registers
(``FusedConfig.decode = "prmt"``, its default where x is bf16 and K a multiple of the blocksize): on
an H100 that halved its time at M <= 16 and beat dequant + cuBLAS up to M = 16 in time summed over the
three 3B shapes (up to M = 4 on each), and on an H200 (2026-11-28) it beat it up to M = 16 on each
shape. Both tuning entries say 16 (``nf4.fused_max_m``, forward only: see Directions), and so does
the default for a GPU without an entry.

How the fused kernel decodes: K is processed in chunks. When K is a multiple of the NF4
blocksize (the real model shapes), a chunk is one absmax block per row: the row's chunk is
``blocksize / 2`` whole bytes and one scale. The high nibbles are the even columns and the low
nibbles the odd ones, so instead of interleaving them the kernel multiplies them against the
even and odd columns of x (a reduction does not care about the order of its terms). Other K
(odd sizes in tests, or blocks that straddle rows) take the general variant of the same
kernel, which finds byte, nibble and block per element.

Rounding: the general variant rounds the dequantized tile to x's dtype before the dot, as the
reference ``F.linear(x, dequantize_nf4(W, x.dtype))`` does, so the two differ only in summation
order. The aligned forward rounds the 16 code values instead and applies the fp32 block scale to the
fp32 product: in bf16 the codes are off by up to 0.31% (fp16: 0.033%), within the 2^-8 bound of the
reference's own rounding of code * absmax, but the same for every weight with that code rather than
varying with the scale. For fp32 x nothing is rounded.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.autograd.function import once_differentiable

from bezoar_kernels import dequant_cache, dispatch, nf4_tma, tuning
from bezoar_kernels.launch import cdiv, launch_fitting, next_power_of_2, sm_count, triton_version
from bezoar_kernels.nf4 import (
    NESTED_BLOCKSIZE,
    NF4Weight,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    nf4_byte_table,
    nf4_code,
    nf4_code_planes,
    register_decode_asm,
    nf4_pair_table,
)

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# Largest M for the fused path by default. bench/nf4.py on an H100 (2026-11-26, torch 2.11, triton 3.6,
# bench/results/nf4-NVIDIA_H100_80GB_HBM3-2026-11-26.json) found dequant + cuBLAS faster at every M it
# measured, M = 1 included (3200x3200: 0.025 ms against 0.127 ms fused): that kernel's decode went through
# shared memory. With the register decode the forward beat dequant + cuBLAS up to M = 16 on an H100
# (2026-11-27) and on an H200 (2026-11-28, nf4-graph-NVIDIA_H200-2026-11-28.json: 14.4 / 20.7 / 21.7 us at
# M = 16 against 19.8 / 43.5 / 43.9), and both devices' tuning entries say 16: a GPU without an entry
# takes it there too (BEZOAR_NF4_FUSED_MAX_M=0 turns it off).
FUSED_MAX_M = 16
# The fused forward's default operand order with the register decode (FusedConfig.swap): W x^T per chunk.
# Its sm_90 loop at M <= 16 (128 rows of W, 4 warps, 3 stages; bench/sass.py nf4_fused_fwd_prmt) takes 394
# instructions per 64 weights a thread on triton 3.6 (6.2 per weight; 399 on 3.9) against 541 for x W^T
# (8.5; 546): a warpgroup MMA with W from the decode, where the two mma.sync dots of the even and odd
# columns needed 81 register moves and 71 copies out of uniform registers per chunk. Without warpgroup MMAs
# (sm_80, sm_86, sm_89 builds, triton 3.9: mma.sync in both orders) W x^T is still shorter, 465 against 524
# on sm_80 and 473 against 556 on sm_86 and sm_89, so the default does not depend on the GPU. Untimed when this was
# written; bench/nf4.py times both orders (nf4_fused_swap and nf4_fused_xw) and bench/tune.py writes the
# faster into a device's tuning entry (nf4.fused_swap).
FUSED_SWAP = True
# The gemv kernel as a programmatic dependent launch by default (GemvConfig.pdl): off until a GPU run of
# bench/nf4.py (its nf4_gemv_pdl column) shows the gain; bench/tune.py writes nf4.gemv_pdl from it.
GEMV_PDL = False
# Largest M for the gemv kernel by default (M <= GEMV_MAX_ROWS, K a multiple of the blocksize). Measured
# on an H200 (2026-11-26, torch 2.11, triton 3.6; bench/results/nf4-NVIDIA_H200-2026-11-26.json and
# nf4-graph-*): gemv is the fastest NF4 forward at M = 1 on all three 3B shapes, eager and as a graph
# replay (8640x3200: 38.7 us against 41.8 us for dequant + cuBLAS), and slower from M = 4 (66.5 us);
# a 3B decode step at batch 1 fell from 6.44 to 5.83 ms with it (generate-NVIDIA_H200-2026-11-26.json).
# Those figures are the first gemv kernel's (a loop over blocks, ~0.5 TB/s). The one-tile kernel that
# replaced it, with the register decode and swept tiles (the H100's tuning entry), ran M = 1 in 10.1 /
# 19.0 / 19.1 us on an H100 (nf4-graph-NVIDIA_H100_80GB_HBM3-2026-11-27-tuned.json), and lost to the
# fused forward from M = 4.
GEMV_MAX_M = 1
# Smallest M from which auto takes the ``tma`` kernels (bezoar_kernels.nf4_tma: the weight decoded inside
# a persistent TMA GEMM's K loop, no dequantize pass) instead of dequant + cuBLAS; 0: never. On an H100
# they lost to dequant + cuBLAS at M = 4096 on every shape (1.36-2.24x cuBLAS, bench/nf4.py --sweep-tma
# of 2026-11-27), so auto takes them only where a tuning entry (nf4.tma_min_m) or
# BEZOAR_NF4_TMA_MIN_M says so.
TMA_MIN_M = 0
PATHS = ("auto", "fused", "dequant", "gemv", "tma")
_GENERAL_CHUNK = 64  # K chunk of the general (unaligned) variant


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer") from None


def _threshold(env: str, key: str, device, default: int) -> int:
    value = _env_int(env)
    if value is None:
        value = tuning.setting(key, device)
    return default if value is None else value


def _switch(env: str, key: str, device, default: bool) -> bool:
    """An on/off setting: the environment variable ``env`` (0 or 1), else the tuning entry ``key``, else
    ``default``."""
    forced = dispatch.env_switch(env)
    if forced is not None:
        return forced
    tuned = tuning.setting(key, device)
    return default if tuned is None else tuned


def fused_max_m(device=None) -> int:
    """The M threshold of the fused kernel: ``BEZOAR_NF4_FUSED_MAX_M`` if set, else the tuning file's
    value for ``device`` (see ``tuning``), else ``FUSED_MAX_M``."""
    return _threshold("BEZOAR_NF4_FUSED_MAX_M", "nf4.fused_max_m", device, FUSED_MAX_M)


def gemv_max_m(device=None) -> int:
    """The M threshold of the gemv kernel: ``BEZOAR_NF4_GEMV_MAX_M`` if set, else the tuning file's value
    for ``device``, else ``GEMV_MAX_M``."""
    return _threshold("BEZOAR_NF4_GEMV_MAX_M", "nf4.gemv_max_m", device, GEMV_MAX_M)


def tma_min_m(device=None) -> int:
    """The M from which auto takes the tma kernels: ``BEZOAR_NF4_TMA_MIN_M`` if set, else the tuning file's
    value for ``device``, else ``TMA_MIN_M`` (0: never)."""
    return _threshold("BEZOAR_NF4_TMA_MIN_M", "nf4.tma_min_m", device, TMA_MIN_M)


def resolve_path(path: str | None, m: int, weight: NF4Weight | None = None, backward: bool = False) -> str:
    """The path for M rows: an explicit one as given; ``auto`` takes gemv for M <= gemv_max_m() (where
    the weight fits it), then fused for M <= fused_max_m(), then tma from tma_min_m() (when that is not
    0), else dequant (thresholds for W's device). ``backward``: the path of dx = dy @ W, where ``auto``
    takes neither gemv (it has no backward) nor fused (see the module's Directions). Where tma came from
    auto and the weight or the activations' dtype do not fit the tma kernels, the matmul runs dequant."""
    path = path or "auto"
    if path not in PATHS:
        raise ValueError(f"nf4_matmul path {path!r}: expected one of {', '.join(PATHS)}")
    if path == "auto":
        device = weight.device if weight is not None else None
        if not backward:
            if m <= gemv_max_m(device) and (weight is None or gemv_supported(m, weight)):
                return "gemv"
            if m <= fused_max_m(device):
                return "fused"
        tma_from = tma_min_m(device)
        return "tma" if 0 < tma_from <= m else "dequant"
    return path


FUSED_DECODES = ("table", "prmt")


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """Tile sizes of the fused kernels. ``split``: forward splits K, backward splits N."""

    block_m: int
    block_n: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 3
    reduce_in_kernel: bool = True  # forward: the last split of a tile sums the partials (False: a 2nd launch)
    # forward, bf16 x with whole blocks: how the aligned loop gets the codes, "table" (a 4-byte gather per
    # byte from nf4_pair_table) or "prmt" (the register decode of nf4._nf4_word_bf16; the same bf16 codes,
    # so the same results bit for bit). default_fused_config takes prmt where it applies: on an H100
    # (bench/results/nf4-graph-NVIDIA_H100_80GB_HBM3-2026-11-27.json) it ran 3200x3200 at M = 1 in
    # 14.9 us against the table's 31.5, and 8640x3200 in 23.0 against 64.8
    decode: str = "table"
    # forward with whole blocks and 16-bit x: each chunk's product as W x^T, W's rows the matrix unit's M
    # dimension (``_nf4_matmul_fwd_kernel``'s SWAP); False: x W^T as two dots, the chunk's even and odd
    # columns. default_fused_config takes it with the register decode (``fused_swap``)
    swap: bool = False

    def __post_init__(self):
        if self.decode not in FUSED_DECODES:
            raise ValueError(f"nf4 fused: decode must be one of {', '.join(FUSED_DECODES)}, got {self.decode!r}")


def _prmt_operands_ok(dtype: torch.dtype, aligned: bool, packed: torch.Tensor) -> bool:
    """bf16 x, K a multiple of the blocksize (``aligned``) and packed bytes aligned to 4: what the fused
    forward's register decode needs of its operands."""
    return dtype == torch.bfloat16 and aligned and packed.data_ptr() % 4 == 0


def prmt_decode_applies(dtype: torch.dtype, aligned: bool, packed: torch.Tensor) -> bool:
    """Whether the fused forward can decode codes in registers (``FusedConfig.decode = "prmt"``): the
    operands it needs (``_prmt_operands_ok``) on an NVIDIA GPU or the interpreter (which runs the
    decode's integer model)."""
    if not _prmt_operands_ok(dtype, aligned, packed):
        return False
    if dispatch.interpreting():
        return True
    return packed.device.type == "cuda" and torch.version.hip is None


def default_fused_config(kind: str, m: int, n: int, k: int, chunk: int, device: torch.device,
                         aligned: bool = True, prmt: bool = False) -> FusedConfig:
    """Tiles for the fused ``kind`` ("forward" | "backward") kernel on an (m, k) x (n, k) problem;
    ``prmt``: the forward decodes codes in registers (see ``prmt_decode_applies``).

    Small M is memory-bound: enough programs to keep every SM streaming (about four per SM),
    splitting the reduction when the output tiles alone are too few. Large M is compute-bound:
    big tiles, no split.
    """
    sm = sm_count(device) if device.type == "cuda" else 4
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    big = m > 64
    if kind == "forward":
        # 128 rows of W per program where the aligned loop's tile allows it: in its sm_90 build (4 warps,
        # 3 stages, M <= 16) that is ~6.2 instructions per weight against ~10.7 at 64 rows (bench/sass.py
        # nf4_fused_fwd); beyond BLOCK_M * CHUNK = 2048 (32 rows of x at blocksize 128, 64 at 64) and in
        # the unaligned variant, 128 rows spill (48-1360 bytes, triton 3.6 and 3.9)
        block_n = 128 if big or (aligned and block_m * chunk <= 2048) else 64
        tiles = cdiv(m, block_m) * cdiv(n, block_n)
        steps = cdiv(k, chunk)
    elif kind == "backward":
        block_n = 64
        tiles = cdiv(m, block_m) * cdiv(k, chunk)
        steps = cdiv(n, block_n)
    else:
        raise ValueError(f"fused config kind {kind!r}")
    split = 1 if big else max(1, min(steps // 2, cdiv(4 * sm, tiles)))
    if kind == "forward" and not big:
        # the fp32 partials (written, then read by the last split) stay within half of W's NF4 bytes
        split = max(1, min(split, k // (32 * m)))
    decode = "prmt" if prmt and kind == "forward" else "table"
    return FusedConfig(block_m, block_n, split, num_warps=8 if big else 4, num_stages=3, decode=decode,
                       swap=decode == "prmt" and fused_swap(device))


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    from bezoar_kernels.nf4 import (_bf16_pair_values, _nf4_block_absmax, _nf4_byte_values, _nf4_pair_tile,
                                    _nf4_plane_registers, _nf4_word_bf16)

    try:  # grid dependency control (programmatic dependent launch, sm_90+): triton >= 3.3
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:  # pragma: no cover - older triton: GemvConfig.pdl launches plainly (pdl_supported)
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def _last_split_sums(parts, stride_split, final, mask, counts_ptr, tile, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """``parts``: the tile's pointers in split 0 (the caller stored this split's fp32 partial at
        ``parts + program_id(1) * stride_split``). Count this program in; the last of the tile's
        ``num_programs(1)`` programs adds every split's partial in split order (the same sum whichever
        program is last) into ``final`` and sets the count back to zero for the next launch. The order
        is a split-K semaphore's: the stores, a barrier of the program's threads, then one thread's
        acquire-release atomic (a GPU-scope fence before it); the partials are read back past L1."""
        tl.debug_barrier()
        arrived = tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(1) - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, tl.num_programs(1)):
                total += tl.load(parts + s * stride_split, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(final, total.to(final.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counts_ptr + tile, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _nf4_gather(
        flat, mask, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    ):
        """fp32 values of W at flat indices ``flat`` (0 where masked): byte, nibble and block per element."""
        byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0)
        shift = (1 - flat % 2) * 4  # even flat index: high nibble
        nibble = (byte.to(tl.int32) >> shift.to(tl.int32)) & 15
        absmax = _nf4_block_absmax(flat // BLOCKSIZE, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   DOUBLE_QUANT, NESTED)
        return tl.where(mask, tl.load(code_ptr + nibble) * absmax, 0.0)

    @triton.jit
    def _nf4_weight_halves(
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
        rows, k_start, N, K,
        BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    ):
        """W[rows, k_start + 2j] and W[rows, k_start + 2j + 1] for j < CHUNK/2: two fp32 tiles, 0 outside W."""
        HALF: tl.constexpr = CHUNK // 2
        j = tl.arange(0, HALF)
        row_ok = rows < N
        if ALIGNED:
            # CHUNK == BLOCKSIZE divides K: this chunk of a row is one block of whole bytes.
            byte = tl.load(packed_ptr + rows[:, None] * (K // 2) + (k_start // 2 + j)[None, :],
                           mask=row_ok[:, None], other=0)
            absmax = _nf4_block_absmax(rows * (K // BLOCKSIZE) + k_start // BLOCKSIZE, row_ok, absmax_ptr,
                                       nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT, NESTED)
            absmax = tl.where(row_ok, absmax, 0.0)[:, None]
            w_hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * absmax
            w_lo = tl.load(code_ptr + (byte & 15).to(tl.int32)) * absmax
        else:
            k_even = k_start + 2 * j
            flat = rows[:, None] * K + k_even[None, :]
            ok_hi = row_ok[:, None] & (k_even < K)[None, :]
            ok_lo = row_ok[:, None] & (k_even + 1 < K)[None, :]
            w_hi = _nf4_gather(flat, ok_hi, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                               offset, BLOCKSIZE, DOUBLE_QUANT, NESTED)
            w_lo = _nf4_gather(flat + 1, ok_lo, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                               offset, BLOCKSIZE, DOUBLE_QUANT, NESTED)
        return w_hi, w_lo

    @triton.jit
    def _nf4_matmul_fwd_kernel(
        # pointers; ``table_ptr``: with ALIGNED, nf4_pair_table (16-bit x), nf4_byte_table (fp32 x), or
        # with PRMT (bf16 x) nf4_code_planes for the register decode
        x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, table_ptr, out_ptr,
        # with SPLIT: the (M, N) result (unit column stride) and one int32 arrival count per output tile
        final_ptr, counts_ptr,
        # sizes and scalars
        M, N, K, offset, chunks_per_split,
        # strides
        stride_xm, stride_xk, stride_os, stride_om, stride_on, stride_fm,
        # meta
        BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
        SPLIT: tl.constexpr, PRMT: tl.constexpr, ASM: tl.constexpr, SWAP: tl.constexpr,
    ):
        """out[split, m, n] = sum over this split's K chunks of x[m, k] * W[n, k].

        With ALIGNED (a chunk is one absmax block of each row) the tile of W is not dequantized: one
        table load per packed byte gives its two code values as dot operands (in x's dtype for 16-bit
        x: the codes rounded, not code * absmax), and each row's block scale multiplies the chunk's
        (BLOCK_M, BLOCK_N) product, BLOCK_M multiplies per row instead of one per weight. With PRMT
        (bf16 x) the chunk's bytes are read as int32 words and their codes decoded in registers
        (``_nf4_pair_tile``) instead: the same bf16 pairs, no table loads.

        With SWAP (ALIGNED, 16-bit x) the chunk's product is W x^T: the pairs, joined into the chunk's
        columns in order, are the first operand, so W's BLOCK_N rows are the matrix unit's M dimension
        (a warpgroup MMA on sm_90, where x's BLOCK_M rows alone are too few) and one dot of CHUNK columns
        replaces the two of the even and odd columns; the accumulator is (BLOCK_N, BLOCK_M)."""
        HALF: tl.constexpr = CHUNK // 2
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        n_tiles = tl.cdiv(N, BLOCK_N)
        pid_m = pid // n_tiles
        pid_n = pid % n_tiles
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = offs_m < M
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        j = tl.arange(0, HALF)

        if SWAP:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PRMT:
            h0, h2, l0, l2 = _nf4_plane_registers(table_ptr)
        chunk_begin = pid_split * chunks_per_split
        chunk_end = tl.minimum(chunk_begin + chunks_per_split, tl.cdiv(K, CHUNK))
        n_ok = offs_n < N
        for chunk in range(chunk_begin, chunk_end):
            k_start = chunk * CHUNK
            k_even = (k_start + 2 * j).to(tl.int64)
            if SWAP:  # the chunk's columns in order (ALIGNED: all inside K)
                x = tl.load(x_rows + (k_start + tl.arange(0, CHUNK)).to(tl.int64)[None, :] * stride_xk,
                            mask=m_ok[:, None], other=0.0)
            else:
                x_hi = tl.load(x_rows + k_even[None, :] * stride_xk, mask=m_ok[:, None] & (k_even < K)[None, :],
                               other=0.0)
                x_lo = tl.load(x_rows + (k_even + 1)[None, :] * stride_xk,
                               mask=m_ok[:, None] & (k_even + 1 < K)[None, :], other=0.0)
            if ALIGNED:
                if not PRMT:
                    byte = tl.load(packed_ptr + offs_n[:, None] * (K // 2) + (k_start // 2 + j)[None, :],
                                   mask=n_ok[:, None], other=0)
                scale = _nf4_block_absmax(offs_n * (K // BLOCKSIZE) + k_start // BLOCKSIZE, n_ok, absmax_ptr,
                                          nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT, NESTED)
                if x_ptr.dtype.element_ty == tl.float32:
                    c_hi, c_lo = _nf4_byte_values(tl.load(table_ptr + byte.to(tl.int32)))
                else:
                    if PRMT:  # bf16 x: the chunk's bytes as int32 words, decoded in registers (table_ptr: planes)
                        words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * (K // 8)
                                        + (k_start // 8 + tl.arange(0, HALF // 4))[None, :], mask=n_ok[:, None],
                                        other=0)
                        pair = _nf4_pair_tile(words, h0, h2, l0, l2, BLOCK_N, HALF // 4, ASM)
                    else:
                        pair = tl.load(table_ptr + byte.to(tl.int32))
                    c_hi = pair.to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                    c_lo = (pair >> 16).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
                if SWAP:  # column 2c of the chunk is c_hi[:, c], column 2c + 1 c_lo[:, c]
                    w = tl.reshape(tl.join(c_hi, c_lo), (BLOCK_N, CHUNK))
                    part = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION)
                    acc += part * tl.where(n_ok, scale, 0.0)[:, None]
                else:
                    part = tl.dot(x_hi, tl.trans(c_hi), input_precision=DOT_PRECISION)
                    part = tl.dot(x_lo, tl.trans(c_lo), part, input_precision=DOT_PRECISION)
                    acc += part * tl.where(n_ok, scale, 0.0)[None, :]
            else:
                w_hi, w_lo = _nf4_weight_halves(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                                                offset, offs_n, k_start, N, K, BLOCKSIZE, CHUNK, ALIGNED,
                                                DOUBLE_QUANT, NESTED)
                acc = tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), acc, input_precision=DOT_PRECISION)

        if SWAP:
            acc = tl.trans(acc)
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        out_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(out + pid_split * stride_os, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
        if SPLIT:  # the last split of this tile sums the partials into final: no second launch
            _last_split_sums(out, stride_os, final_ptr + offs_m.to(tl.int64)[:, None] * stride_fm + offs_n[None, :],
                             out_ok, counts_ptr, pid, BLOCK_M, BLOCK_N)

    @triton.jit
    def _nf4_matmul_bwd_kernel(
        # pointers
        dy_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, dx_ptr,
        # sizes and scalars
        M, N, K, offset, rows_per_split,
        # strides
        stride_dym, stride_dyn, stride_ds, stride_dxm, stride_dxk,
        # meta
        BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        NESTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dx[split, m, k] = sum over this split's rows n of dy[m, n] * W[n, k], one K chunk per program."""
        HALF: tl.constexpr = CHUNK // 2
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        n_chunks = tl.cdiv(K, CHUNK)
        pid_m = pid // n_chunks
        k_start = (pid % n_chunks) * CHUNK
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym

        acc_hi = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc_lo = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        row_begin = pid_split * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, N)
        for n_start in range(row_begin, row_end, BLOCK_N):
            offs_n = (n_start + tl.arange(0, BLOCK_N)).to(tl.int64)
            w_hi, w_lo = _nf4_weight_halves(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                                            offset, offs_n, k_start, N, K, BLOCKSIZE, CHUNK, ALIGNED, DOUBLE_QUANT,
                                            NESTED)
            dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_ok[:, None] & (offs_n < row_end)[None, :],
                         other=0.0)
            acc_hi = tl.dot(dy, w_hi.to(dy.dtype), acc_hi, input_precision=DOT_PRECISION)
            acc_lo = tl.dot(dy, w_lo.to(dy.dtype), acc_lo, input_precision=DOT_PRECISION)

        k_even = (k_start + 2 * tl.arange(0, HALF)).to(tl.int64)
        dx = dx_ptr + pid_split * stride_ds + offs_m.to(tl.int64)[:, None] * stride_dxm
        tl.store(dx + k_even[None, :] * stride_dxk, acc_hi.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (k_even < K)[None, :])
        tl.store(dx + (k_even + 1)[None, :] * stride_dxk, acc_lo.to(dx_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (k_even + 1 < K)[None, :])

    @triton.jit
    def _gemv_loads(words_ptr, absmax_ptr, nested_absmax_ptr, x_ptr, pid_n, first, live, M, N, K, stride_xm,
                    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, X_PAIRS: tl.constexpr, BLOCK_SCALE: tl.constexpr):
        """Every load of one K range of the gemv (words ``first`` .. ``first + BLOCKS * BLOCKSIZE / 8`` of
        its rows), as loaded: nothing here waits for memory. ``live`` (a scalar) false masks them all.

        Returns W's words (BLOCK_N rows, the range's words), x's columns (four int32 tiles of bf16 pairs
        with X_PAIRS, else x's tile four times) and the scale's inputs: the 8-bit absmax and its nested
        scale with DOUBLE_QUANT (the code lookup between them is ``_gemv_scale``'s), else the fp32 absmax
        twice; one per (row, block) with BLOCK_SCALE, else one per (row, word)."""
        WORDS: tl.constexpr = BLOCKSIZE // 8
        SPAN: tl.constexpr = BLOCKS * WORDS
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]
        word = first + tl.arange(0, SPAN)[None, None, :]  # word index within a row of W
        row_words = tl.multiple_of(K // 8, WORDS)  # K is a multiple of the blocksize: rows start block-aligned
        # masked by whole blocks (K // BLOCKSIZE of them), so the mask is constant over a block's words and
        # each thread's run of words loads as one vector
        w_ok = (offs_n < N) & (word // WORDS < K // BLOCKSIZE) & live
        words = tl.load(words_ptr + offs_n.to(tl.int64) * row_words + word, mask=w_ok, other=0)
        if BLOCK_SCALE:  # one scale per (row, block), applied to the block's sum of its word partials
            rows_2d = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
            block = first // WORDS + tl.arange(0, BLOCKS)[None, :]
            block_ok = (rows_2d < N) & (block < K // BLOCKSIZE) & live
            flat = rows_2d * (K // BLOCKSIZE) + block
        else:  # one per word (its block's), applied to the word's partial
            block_ok = w_ok
            flat = offs_n * (K // BLOCKSIZE) + word // WORDS
        if DOUBLE_QUANT:
            quant = tl.load(absmax_ptr + flat, mask=block_ok, other=0)
            nested = tl.load(nested_absmax_ptr + flat // NESTED, mask=block_ok, other=0.0)
        else:
            quant = tl.load(absmax_ptr + flat, mask=block_ok, other=0.0)
            nested = quant
        # x's 8 * SPAN columns of the range. Eight strided loads, one per value position within the word,
        # were scalar 16-bit loads per weight in triton 3.6's build; the split by position is in
        # _gemv_products
        rows_m = tl.arange(0, BLOCK_M)
        if X_PAIRS:
            # bf16 x as int32 words, four per word of W: word 4w + i holds columns 8w + 2i (low half) and
            # 8w + 2i + 1, paired as the decoded codes are, and its halves are fp32 bits after a shift
            # or a mask; four strided loads, no reshapes (their shared-memory round trips and barriers)
            pw = first + tl.arange(0, SPAN)
            x_ok = (rows_m < M)[:, None] & (pw < K // 8)[None, :] & live
            x_pairs = (x_ptr.to(tl.pointer_type(tl.int32)) + rows_m.to(tl.int64)[:, None] * (stride_xm // 2)
                       + (4 * pw)[None, :])
            x0 = tl.load(x_pairs, mask=x_ok, other=0)
            x1 = tl.load(x_pairs + 1, mask=x_ok, other=0)
            x2 = tl.load(x_pairs + 2, mask=x_ok, other=0)
            x3 = tl.load(x_pairs + 3, mask=x_ok, other=0)
        else:
            cols = first * 8 + tl.arange(0, 8 * SPAN)
            x0 = tl.load(x_ptr + rows_m.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                         mask=(rows_m < M)[:, None] & (cols < K)[None, :] & live, other=0.0)
            x1 = x0
            x2 = x0
            x3 = x0
        return words, x0, x1, x2, x3, quant, nested

    @triton.jit
    def _gemv_scale(quant, nested, nested_code_ptr, offset, DOUBLE_QUANT: tl.constexpr):
        """The fp32 absmax from ``_gemv_loads``' scale inputs (the 8-bit code's lookup, then the nested scale)."""
        if DOUBLE_QUANT:
            return tl.load(nested_code_ptr + quant.to(tl.int32)) * nested + offset
        else:
            return quant

    @triton.jit
    def _gemv_products(words, x0, x1, x2, x3, table_ptr, BLOCK_M: tl.constexpr, SPAN: tl.constexpr,
                       TABLE: tl.constexpr, ASM: tl.constexpr, X_PAIRS: tl.constexpr):
        """acc[m, n, w] = sum over the 8 values of word w of row n of W of value * x[m, column], fp32,
        unscaled; x as ``_gemv_loads`` gives it."""
        # split x by value position within the word: e_i[m, w] = x[m, 8 w + 2 i], o_i = the column after it
        # (sm_90 instructions per weight and row of x, the eight strided loads -> one load and this split:
        # M = 1, 32 rows x 8 blocks: 11.9 -> 8.9 on 3.6, 6.5 -> 6.4 on 3.9; M = 4, 16 x 4: 5.9 -> 5.1 on
        # 3.6, 5.6 -> 3.9 on 3.9; M = 8, 16 x 4: 3.8 -> 3.7 on 3.6, 4.1 -> 3.0 on 3.9)
        if X_PAIRS:
            e0, o0 = _bf16_pair_values(x0)
            e1, o1 = _bf16_pair_values(x1)
            e2, o2 = _bf16_pair_values(x2)
            e3, o3 = _bf16_pair_values(x3)
        else:
            x = x0.to(tl.float32)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, SPAN, 4, 2)))  # columns 8w + 2i, 8w + 2i + 1
            e01, e23 = tl.split(tl.permute(tl.reshape(x_even, (BLOCK_M, SPAN, 2, 2)), (0, 1, 3, 2)))
            o01, o23 = tl.split(tl.permute(tl.reshape(x_odd, (BLOCK_M, SPAN, 2, 2)), (0, 1, 3, 2)))
            e0, e1 = tl.split(e01)
            e2, e3 = tl.split(e23)
            o0, o1 = tl.split(o01)
            o2, o3 = tl.split(o23)
        acc = tl.zeros((BLOCK_M, words.shape[1], SPAN), dtype=tl.float32)
        if TABLE == "prmt":
            p01, p23, p45, p67 = _nf4_word_bf16(words, table_ptr, ASM)
        if TABLE == "gather":  # the 16 codes go to shared memory and every value of the tile is one
            # shared load at its nibble's offset (shifted and masked in place: 2 integer operations a
            # value, where "prmt" takes 3.1); the eight values of each word in one lookup, as the storing
            # of the codes takes two barriers a lookup (a lookup per value position: 20 a 4-step loop's
            # step on triton 3.6, 6 this way)
            code = tl.load(table_ptr + tl.arange(0, 16))
            n8 = tl.join(tl.join(tl.join((words >> 4) & 15, words & 15),
                                 tl.join((words >> 12) & 15, (words >> 8) & 15)),
                         tl.join(tl.join((words >> 20) & 15, (words >> 16) & 15),
                                 tl.join((words >> 28) & 15, (words >> 24) & 15)))
            v8 = tl.reshape(tl.gather(code, tl.reshape(n8, (words.shape[1] * SPAN * 8,)), 0),
                            (1, words.shape[1], SPAN, 2, 2, 2))
            v0123, v4567 = tl.split(v8)
            v01, v23 = tl.split(v0123)
            v45, v67 = tl.split(v4567)
        for i in tl.static_range(4):
            if TABLE == "prmt":  # pair i: byte i's first value (its high nibble) in the low half
                first, second = _bf16_pair_values(p01 if i == 0 else p23 if i == 1 else p45 if i == 2 else p67)
            elif TABLE == "gather":
                first, second = tl.split(v01 if i == 0 else v23 if i == 1 else v45 if i == 2 else v67)
            elif TABLE == "nibble":  # byte i of the word: its high nibble is the first value
                first = tl.load(table_ptr + ((words >> (8 * i + 4)) & 15))
                second = tl.load(table_ptr + ((words >> (8 * i)) & 15))
            else:
                first, second = _nf4_byte_values(tl.load(table_ptr + ((words >> (8 * i)) & 255)))
            xe = e0 if i == 0 else e1 if i == 1 else e2 if i == 2 else e3
            xo = o0 if i == 0 else o1 if i == 1 else o2 if i == 2 else o3
            acc += xe[:, None, :] * first
            acc += xo[:, None, :] * second
        return acc

    @triton.jit
    def _gemv_scaled(acc, scale, BLOCK_M: tl.constexpr, BLOCKS: tl.constexpr, WORDS: tl.constexpr,
                     BLOCK_SCALE: tl.constexpr):
        """A range's word partials times their blocks' scales: (BLOCK_M, rows, BLOCKS) block sums with
        BLOCK_SCALE (``scale`` per (row, block)), else (BLOCK_M, rows, words) (``scale`` per (row, word))."""
        if BLOCK_SCALE:
            return tl.sum(tl.reshape(acc, (BLOCK_M, acc.shape[1], BLOCKS, WORDS)), axis=3) * scale[None, :, :]
        else:
            return acc * scale

    @triton.jit
    def _nf4_gemv_kernel(
        # pointers: x (M, K); W's packed bytes viewed as int32 words (N, K / 8); the code table for TABLE:
        # "byte" nf4_byte_table (both values of a byte in one int64), "nibble" the 16 fp32 values
        # (nf4_code), "prmt" nf4_code_planes (the bf16 codes' bytes for the register decode)
        x_ptr, words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, table_ptr, out_ptr,
        # with SPLIT: the (M, N) result and one int32 arrival count per row tile (zero between launches)
        final_ptr, counts_ptr,
        # sizes and scalars
        M, N, K, offset,
        # strides (x's last dim, out's and final's are contiguous)
        stride_xm, stride_os, stride_om, stride_fm,
        # meta
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, SPLIT: tl.constexpr, TABLE: tl.constexpr,
        ASM: tl.constexpr, X_PAIRS: tl.constexpr, BLOCK_SCALE: tl.constexpr, PDL: tl.constexpr,
        STEPS: tl.constexpr,
    ):
        """out[split, m, n] = sum over NF4 blocks split * STEPS * BLOCKS .. + STEPS * BLOCKS of x[m, k] * W[n, k],
        M <= BLOCK_M.

        With SPLIT (more than one K range), out holds fp32 partials and the last program of each row
        tile to finish adds them up into final (``_last_split_sums``), so no second launch sums them.

        With STEPS = 1 there is no loop: a program loads its whole tile at once, BLOCK_N rows of W by
        BLOCKS absmax blocks (each row's part is BLOCKS * BLOCKSIZE / 2 contiguous bytes, read as 32-bit
        words of 8 values: byte i holds values 2i (high nibble) and 2i + 1), with every block's scale, so
        all its DRAM reads are in flight together and the double-quant chain (absmax byte, its code, the
        nested scale) is waited for once, not once per block. At batch 1 this kernel is bound by latency,
        not bandwidth: the first version stepped through the blocks one at a time and reached ~0.5 TB/s
        on an H200. But one tile per program also means that a wave of programs first waits for its
        reads, then decodes, then sums its split partials, with no DRAM traffic while it decodes. With
        STEPS > 1 a program walks STEPS such tiles along K and issues each tile's loads (W's words, the
        scales' inputs, x) two tiles ahead, into registers, so its reads overlap its arithmetic; there are
        STEPS times fewer split partials to sum, and the program's fixed work (addresses, the final
        sums, the semaphore) is spread over STEPS tiles (``GemvConfig.steps``).

        Each byte of a word is decoded by one 8-byte load from the 2 KB byte table (both its values; a
        16-entry table takes a gather per value, and the address arithmetic of the gathers was most of
        the old kernel's instructions), or, with TABLE "nibble", by one 4-byte load
        per value from the 64-byte table of the 16 codes. The trade: a warp's 32 gathers from the
        byte table touch about 14 of its 16 cache lines, each a separate L1 pass (a wavefront), where
        a gather from the 64-byte table is one; two gathers per byte instead of one. On an H100 the
        byte-table kernel took 17.8 us at M = 1 for 3200x3200, slower than cuBLAS on the bf16 weight,
        and a count of byte-table wavefronts alone (5.1M gathers x ~14 / 32 lanes / 132 SMs) comes to
        ~10 us. TABLE "prmt" reads no table at all: ``_nf4_word_bf16`` decodes a word's eight codes with
        16 byte permutes over code bytes held in registers, giving the codes rounded to bf16 (the
        byte and nibble tables give them in fp32). Its sm_90 build takes 28% more instructions per
        weight than the byte table's on triton 3.9 (8.2 against 6.4, M = 1) and as many on 3.6 (10.6
        against 10.4), with none of the L1 passes. Which lookup wins is for ``bench/nf4.py --sweep-gemv`` to say
        (``GemvConfig.table``, written per GPU into the tuning file). The values times x go into an
        fp32 partial per word (plain FMAs, no matrix units, no shared memory). With BLOCK_SCALE the words
        of each absmax block are summed and the block's scale multiplies the sum (``gemv_block_scale``);
        otherwise each word's block scale multiplies the word's partial. With the byte and nibble tables W is never
        rounded to x's dtype, so the result differs from ``F.linear(x, dequantize(W, x.dtype))`` by
        that rounding (it is the more exact of the two); with "prmt" the codes are rounded to bf16 (at
        most 0.312% of a weight) before the block scale, the size of the rounding that 16-bit x gets
        from dequantize + cuBLAS (an fp32 caller gets the byte table unless it asks for "prmt").
        TABLE "gather" looks the 16 fp32 codes up in shared memory (``tl.gather``: the table stored once
        per tile, then a shared load per value at the nibble's offset, conflict-free as the 16 codes
        sit in 16 banks): about 2 integer-pipe instructions per weight for the decode where "prmt"
        takes 3.1, the integer pipe being what bounds the gemv (bench/README.md), for a shared load
        per weight and two barriers per tile; the codes exact in fp32, as the byte table's.
        """
        WORDS: tl.constexpr = BLOCKSIZE // 8
        SPAN: tl.constexpr = BLOCKS * WORDS  # words per row of the tile
        if PDL:  # launched as a programmatic dependent launch (GemvConfig.pdl): before any load or store,
            # wait for the kernel before this one to finish (its writes visible: x, or W, or memory this
            # launch writes that it read), then let the next dependent launch be scheduled
            gdc_wait()
            gdc_launch_dependents()
        pid_n = tl.program_id(0)
        pid_split = tl.program_id(1)
        # Every tile is 3-D, (rows of x, rows of W, words), so the products broadcast in registers.
        first = pid_split * (STEPS * SPAN)  # the program's first word of each row
        words, x0, x1, x2, x3, quant, nested = _gemv_loads(
            words_ptr, absmax_ptr, nested_absmax_ptr, x_ptr, pid_n, first, True, M, N, K, stride_xm,
            BLOCKSIZE, DOUBLE_QUANT, NESTED, BLOCK_M, BLOCK_N, BLOCKS, X_PAIRS, BLOCK_SCALE)
        if STEPS == 1:
            scale = _gemv_scale(quant, nested, nested_code_ptr, offset, DOUBLE_QUANT)
            acc = _gemv_products(words, x0, x1, x2, x3, table_ptr, BLOCK_M, SPAN, TABLE, ASM, X_PAIRS)
            total = _gemv_scaled(acc, scale, BLOCK_M, BLOCKS, WORDS, BLOCK_SCALE)
        else:
            # STEPS ranges of SPAN words, one after the other: each step issues the loads of the range two
            # ahead (into registers: no shared memory, no barrier) before this range's arithmetic, so the
            # program's DRAM reads overlap its decode and FMAs where the one-range tile waits for all its
            # loads, then computes, with nothing in flight (one range ahead gave nothing: ptxas moved the
            # loads below the step's arithmetic, docs/notes.md)
            if BLOCK_SCALE:
                total = tl.zeros((BLOCK_M, BLOCK_N, BLOCKS), dtype=tl.float32)
            else:
                total = tl.zeros((BLOCK_M, BLOCK_N, SPAN), dtype=tl.float32)
            n_words, n_x0, n_x1, n_x2, n_x3, n_quant, n_nested = _gemv_loads(
                words_ptr, absmax_ptr, nested_absmax_ptr, x_ptr, pid_n, first + SPAN, True, M, N, K, stride_xm,
                BLOCKSIZE, DOUBLE_QUANT, NESTED, BLOCK_M, BLOCK_N, BLOCKS, X_PAIRS, BLOCK_SCALE)
            for step in range(STEPS):
                f_words, f_x0, f_x1, f_x2, f_x3, f_quant, f_nested = _gemv_loads(
                    words_ptr, absmax_ptr, nested_absmax_ptr, x_ptr, pid_n, first + (step + 2) * SPAN,
                    step + 2 < STEPS, M, N, K, stride_xm,
                    BLOCKSIZE, DOUBLE_QUANT, NESTED, BLOCK_M, BLOCK_N, BLOCKS, X_PAIRS, BLOCK_SCALE)
                scale = _gemv_scale(quant, nested, nested_code_ptr, offset, DOUBLE_QUANT)
                acc = _gemv_products(words, x0, x1, x2, x3, table_ptr, BLOCK_M, SPAN, TABLE, ASM, X_PAIRS)
                total += _gemv_scaled(acc, scale, BLOCK_M, BLOCKS, WORDS, BLOCK_SCALE)
                words, x0, x1, x2, x3, quant, nested = n_words, n_x0, n_x1, n_x2, n_x3, n_quant, n_nested
                n_words, n_x0, n_x1, n_x2, n_x3, n_quant, n_nested = f_words, f_x0, f_x1, f_x2, f_x3, f_quant, f_nested
        y = tl.sum(total, axis=2)
        out_m = tl.arange(0, BLOCK_M)[:, None]
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        out_ok = (out_m < M) & (out_n < N)
        parts = out_ptr + out_m.to(tl.int64) * stride_om + out_n
        tl.store(parts + pid_split * stride_os, y.to(out_ptr.dtype.element_ty), mask=out_ok)
        if SPLIT:
            _last_split_sums(parts, stride_os, final_ptr + out_m.to(tl.int64) * stride_fm + out_n, out_ok, counts_ptr,
                             pid_n, BLOCK_M, BLOCK_N)

    @triton.jit
    def _sum_splits_kernel(parts_ptr, out_ptr, n_elements, splits, cols, stride_out, BLOCK: tl.constexpr):
        """out[i // cols, i % cols] = sum over s of parts[s, i] (fp32, parts (splits, rows, cols)
        contiguous), cast to out's dtype; out's rows go ``stride_out`` apart."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, splits):
            acc += tl.load(parts_ptr + s * n_elements + offs, mask=mask, other=0.0)
        tl.store(out_ptr + (offs // cols) * stride_out + offs % cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check(x: torch.Tensor, weight: NF4Weight, dim: int, what: str) -> None:
    """x's last dim must be weight.shape[dim] (1 for x, 0 for dy)."""
    if len(weight.shape) != 2:
        raise ValueError(f"nf4_matmul: weight must be 2-D (out, in), got shape {weight.shape}")
    inner = weight.shape[dim]
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"nf4_matmul: {what} must be float16/bfloat16/float32, got {x.dtype}")
    if x.shape[-1] != inner:
        raise ValueError(f"nf4_matmul: {what} has last dim {x.shape[-1]}, weight {weight.shape} needs {inner}")
    if x.device != weight.device:
        raise ValueError(f"nf4_matmul: {what} on {x.device}, weight on {weight.device}")


def _weight_args(weight: NF4Weight) -> tuple:
    dq = weight.double_quant
    return (weight.packed, weight.absmax,
            weight.nested_absmax if dq else weight.absmax, weight.nested_code if dq else weight.absmax,
            nf4_code(weight.device))


def _meta(weight: NF4Weight, k: int, x_dtype: torch.dtype) -> dict:
    aligned = k % weight.blocksize == 0
    return dict(BLOCKSIZE=weight.blocksize, CHUNK=weight.blocksize if aligned else _GENERAL_CHUNK, ALIGNED=aligned,
                DOUBLE_QUANT=weight.double_quant, NESTED=NESTED_BLOCKSIZE,
                DOT_PRECISION="ieee" if x_dtype == torch.float32 else "tf32")


def _sum_splits(parts: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of fp32 partials (splits, rows, cols) into ``out`` (rows, cols; unit column stride) or a
    new tensor."""
    if out is None:
        out = torch.empty(parts.shape[1:], dtype=dtype, device=parts.device)
    n = out.numel()
    block = 1024
    _sum_splits_kernel[(cdiv(n, block),)](parts, out, n, parts.shape[0], parts.shape[-1], out.stride(0), BLOCK=block,
                                          num_warps=4, enable_fp_fusion=False)
    return out


# Arrival counts of the in-kernel split sums (gemv: one int32 per row tile; fused forward: per output
# tile), per device. Every launch leaves them at zero. One array per device serves every launch because
# bezoar runs them on one stream, one at a time (side streams only with wait_stream, as CUDA-graph
# warm-up does). Two such launches overlapping on one device could leave a count non-zero, and every
# later launch touching that tile would then sum too early: do not call these kernels from concurrent
# streams. More tiles than this take the second launch.
_SPLIT_COUNTS = 1 << 16
_split_count_buffers: dict[torch.device, torch.Tensor] = {}


def _split_counts(device: torch.device, tiles: int) -> torch.Tensor | None:
    """The device's arrival counts, or None (sum the splits in a second launch) when there are more
    tiles than counts, or when the array would first be made inside a CUDA graph capture (its zeroing
    would only run at replay; the eager calls before a capture make it)."""
    buf = _split_count_buffers.get(device)
    if buf is None:
        if tiles > _SPLIT_COUNTS or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return None
        buf = _split_count_buffers[device] = torch.zeros(_SPLIT_COUNTS, dtype=torch.int32, device=device)
    return buf if tiles <= _SPLIT_COUNTS else None


def fused_swap(device=None) -> bool:
    """Whether the fused forward's default config (with the register decode) computes W x^T per chunk
    (``FusedConfig.swap``): ``BEZOAR_NF4_FUSED_SWAP`` (0 or 1), else the device's tuning entry
    ``nf4.fused_swap``, else FUSED_SWAP."""
    return _switch("BEZOAR_NF4_FUSED_SWAP", "nf4.fused_swap", device, FUSED_SWAP)


def nf4_fused_forward(x: torch.Tensor, weight: NF4Weight, config: FusedConfig | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(W).T -> (M, N) in x's dtype, with the fused Triton kernel."""
    _check(x, weight, 1, "x")
    m, k = x.shape
    n = weight.shape[0]
    meta = _meta(weight, k, x.dtype)
    chunk = meta["CHUNK"]
    cfg = config or default_fused_config("forward", m, n, k, chunk, x.device, meta["ALIGNED"],
                                         prmt_decode_applies(x.dtype, meta["ALIGNED"], weight.packed))
    n_chunks = cdiv(k, chunk)
    per_split = cdiv(n_chunks, max(1, min(cfg.split, n_chunks)))
    split = cdiv(n_chunks, per_split)
    final = torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    counts = _split_counts(x.device, tiles) if split > 1 and cfg.reduce_in_kernel else None
    out = final if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    prmt = cfg.decode == "prmt"
    if prmt and not _prmt_operands_ok(x.dtype, meta["ALIGNED"], weight.packed):
        raise ValueError(f"nf4 fused: decode='prmt' needs bf16 x and K a multiple of the blocksize "
                         f"{weight.blocksize} with the packed bytes aligned to 4, got {x.dtype}, K={k}")
    if cfg.swap and (x.dtype == torch.float32 or not meta["ALIGNED"]):
        raise ValueError(f"nf4 fused: swap=True needs 16-bit x and K a multiple of the blocksize "
                         f"{weight.blocksize}, got {x.dtype}, K={k}")
    table = (nf4_byte_table(x.device) if x.dtype == torch.float32 else nf4_code_planes(x.device) if prmt
             else nf4_pair_table(x.device, x.dtype))
    launch_fitting(_nf4_matmul_fwd_kernel, (tiles, split), (
        x, *_weight_args(weight), table, out, final, counts if counts is not None else final,
        m, n, k, weight.offset if weight.double_quant else 0.0, per_split,
        x.stride(0), x.stride(1), out.stride(0) if split > 1 else 0, out.stride(-2), out.stride(-1), final.stride(0),
    ), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False, SPLIT=counts is not None, PRMT=prmt, ASM=prmt and register_decode_asm(x.device),
        SWAP=cfg.swap, **meta,
    ))
    if split > 1 and counts is None:
        _sum_splits(out, x.dtype, final)
    return final


def nf4_fused_backward(dy: torch.Tensor, weight: NF4Weight, config: FusedConfig | None = None) -> torch.Tensor:
    """dy (M, N) @ dequant(W) -> (M, K) in dy's dtype, with the fused Triton kernel."""
    _check(dy, weight, 0, "dy")
    m, n = dy.shape
    k = weight.shape[1]
    meta = _meta(weight, k, dy.dtype)
    chunk = meta["CHUNK"]
    cfg = config or default_fused_config("backward", m, n, k, chunk, dy.device)
    n_steps = cdiv(n, cfg.block_n)
    rows_per_split = cdiv(n_steps, max(1, min(cfg.split, n_steps))) * cfg.block_n
    split = cdiv(n, rows_per_split)
    if split == 1:
        dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
        stride_split = 0
    else:
        dx = torch.empty((split, m, k), dtype=torch.float32, device=dy.device)
        stride_split = dx.stride(0)
    grid = (cdiv(m, cfg.block_m) * cdiv(k, chunk), split)
    launch_fitting(_nf4_matmul_bwd_kernel, grid, (
        dy, *_weight_args(weight), dx,
        m, n, k, weight.offset if weight.double_quant else 0.0, rows_per_split,
        dy.stride(0), dy.stride(1), stride_split, dx.stride(-2), dx.stride(-1),
    ), dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False, **meta,
    ))
    return dx if split == 1 else _sum_splits(dx, dy.dtype)


GEMV_MAX_ROWS = 8  # the gemv kernel's accumulator holds every row of x: it takes M <= this
GEMV_TABLES = tuning.GEMV_TABLES  # the gemv kernel's code lookups (GemvConfig.table)


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Tiles of the gemv kernel: rows of W and NF4 blocks along K per program (both powers of two;
    None: by rows of x and blocksize, ``gemv_tile``). K is cut into ranges of ``blocks`` blocks; with
    more than one, each range writes fp32 partials that the row tile's last program sums (or, with
    ``reduce_in_kernel=False``, a second kernel)."""

    block_n: int | None = None
    blocks: int | None = None
    num_warps: int = 4
    num_stages: int = 1
    reduce_in_kernel: bool = True  # False: the fp32 partials are summed by a second launch
    # how codes are looked up: "byte" (2 KB, a byte's two values per load), "nibble" (64 bytes, a load per
    # value), "prmt" (byte permutes in registers, no loads; the codes rounded to bf16) or "gather" (the 16
    # fp32 codes in shared memory, a shared load per value: tl.gather). "byte" is what a config that names no
    # table means; the heuristic's config (no tuned tiles) takes GEMV_TABLE
    table: str = "byte"
    # a programmatic dependent launch where the GPU has them (``pdl_supported``; a plain launch elsewhere):
    # the launch can be scheduled before the kernel ahead of it in the stream has finished, and its
    # programs wait for that kernel (``gdc_wait``) before they read or write anything, so what it hides
    # is the launch's own latency, not any memory traffic; the results are the same bit for bit
    pdl: bool = False
    # K ranges of ``blocks`` blocks that one program walks in a loop, loading each range two ahead of its
    # arithmetic (the kernel's STEPS); K is cut into ranges of ``blocks * steps`` blocks. 1: one range
    steps: int = 1

    def __post_init__(self):
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ValueError(f"nf4 gemv: steps must be a whole number >= 1, got {self.steps!r}")
        if self.table not in GEMV_TABLES:
            raise ValueError(f"nf4 gemv: table must be one of {', '.join(GEMV_TABLES)}, got {self.table!r}")


# fp32 accumulator values per program: 16 per thread at 4 warps on triton >= 3.9, 8 on older ones. The
# sm_90 builds (bench/sass.py nf4_gemv, M = 1, blocksize 64), per weight, when the scale was applied per
# word: 32 rows by 8 blocks was 6.4 instructions on triton 3.9 and 8.9 on 3.6, but 3.6 (the GPU machine's)
# needed 255 registers and 8 bytes of stack for it; 16 rows 7.3 on 3.9 and 10.4 on 3.6 with 95 registers.
# With the per-block scale (gemv_block_scale) 32 rows take 176 registers on 3.6 and do not spill; the
# tuned tiles (kernels/tuning.json) decide on the GPU, so the heuristic is left as it was timed.
_GEMV_TILE_VALUES = 2048 if triton_version() >= (3, 9) else 1024


def gemv_tile(block_m: int, blocksize: int, blocks_per_row: int) -> tuple[int, int]:
    """(rows of W, NF4 blocks) per gemv program: a (block_m, rows, words) fp32 accumulator of about
    _GEMV_TILE_VALUES values, 64 words (256 bytes) of each row at batch 1 and 2, 32 from 3 rows of x."""
    words = blocksize // 8
    span = 64 if block_m <= 2 else 32
    blocks = max(1, min(span // words, next_power_of_2(blocks_per_row)))
    block_n = max(16, min(128, _GEMV_TILE_VALUES // (block_m * blocks * words)))
    return block_n, blocks


# The code lookup of the heuristic's tiles (a device without tuned tiles). A stored config that names no
# table means "byte" (GemvConfig's default, what every sweep ran before tables existed), but the byte table
# lost everywhere it was timed: on an H200 (bench/results/nf4-graph-NVIDIA_H200-2026-11-28.json, graph
# replay, the heuristic's 16 rows by 8 blocks at M = 1) "byte" took 22.1 / 48.2 / 45.6 us on the three 3B
# shapes, "gather" 9.3 / 18.6 / 19.1 and "prmt" 9.9 / 18.6 / 17.8; at M = 4 and 8 (16 by 4, 16 by 2) "gather"
# ran 1.5-2.1x faster than "byte", "prmt" a little faster again. "gather" keeps the fp32 codes, so the
# heuristic's results do not depend on the dtype of x; "prmt" (bf16 codes) is for tuning entries to pick.
GEMV_TABLE = "gather"


def heuristic_gemv_config() -> GemvConfig:
    """The gemv config where no tiles are tuned: ``gemv_tile``'s tiles on the GEMV_TABLE lookup."""
    return GemvConfig(table=GEMV_TABLE)


def _tuned_gemv_config(block_m: int, device, dtype: torch.dtype = torch.bfloat16) -> GemvConfig:
    """The tiles the tuning file gives for ``block_m`` rows of x on this device, else the heuristic's,
    launched as a programmatic dependent launch where ``gemv_pdl`` says so. The sweeps time 16-bit x: for
    fp32 x a tuned "prmt" lookup (bf16 codes) gives way to the fp32 codes of GEMV_TABLE, so a setting
    picked for speed never lowers an fp32 caller's precision."""
    tiles = (tuning.setting("nf4.gemv_tiles", device) or {}).get(str(block_m))
    cfg = GemvConfig(**tiles) if tiles else heuristic_gemv_config()
    if cfg.table == "prmt" and dtype == torch.float32:
        cfg = dataclasses.replace(cfg, table=GEMV_TABLE)
    return dataclasses.replace(cfg, pdl=gemv_pdl(device))


def gemv_pdl(device=None) -> bool:
    """Whether the gemv kernel's default config is a programmatic dependent launch (``GemvConfig.pdl``):
    ``BEZOAR_NF4_GEMV_PDL`` (0 or 1), else the device's tuning entry ``nf4.gemv_pdl``, else GEMV_PDL."""
    return _switch("BEZOAR_NF4_GEMV_PDL", "nf4.gemv_pdl", device, GEMV_PDL)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launches: NVIDIA GPUs from sm_90 with a triton that has grid dependency
    control. Elsewhere (the interpreter included, which cannot run it) a config asking for one launches
    plainly, with the same results."""
    return (device.type == "cuda" and torch.version.hip is None and not dispatch.interpreting()
            and gdc_wait is not None and torch.cuda.get_device_capability(device) >= (9, 0))


def _gemv_table(table: str, device) -> torch.Tensor:
    """What the gemv kernel's table_ptr points at for GemvConfig.table."""
    return {"byte": nf4_byte_table, "nibble": nf4_code, "prmt": nf4_code_planes, "gather": nf4_code}[table](device)


def _x_pairs_ok(x: torch.Tensor) -> bool:
    """Whether the gemv kernel reads bf16 x as int32 pairs of columns (X_PAIRS): one 4-byte aligned row.
    At M = 1 the sm_90 build then has 4 barriers instead of 12 on triton 3.6 (1 instead of 9 on 3.9),
    as many instructions or fewer; at M = 4 it had 22 instead of 20, so more rows keep the plain loads."""
    return x.dtype == torch.bfloat16 and x.shape[0] == 1 and x.data_ptr() % 4 == 0


def gemv_x_pairs(table: str, x: torch.Tensor) -> bool:
    """Whether the gemv kernel reads x as int32 pairs of columns (X_PAIRS) for this lookup: the two that
    give values per position of a word ("prmt" and "gather"), where ``_x_pairs_ok`` holds."""
    return table in ("prmt", "gather") and _x_pairs_ok(x)


def gemv_block_scale(table: str, block_m: int) -> bool:
    """Whether the gemv kernel scales each NF4 block's sum of word partials (one scale per row and block)
    rather than each word's partial (one scale per word, the same value for a block's 8 or 16 words).

    Per block, a program gathers and decodes a scale for each (row, block) of its tile instead of each
    (row, word): 8 times fewer double-quant chains at blocksize 64, and a multiply per block instead of
    one per word and row of x. The sm_90 builds at the launcher's tiles (``gemv_tile``, 50 blocks per row;
    whole-kernel instructions per weight and row of x, ``tests/kernels/test_sass.py``), per word -> per
    block: "prmt" M = 1 10.38 -> 8.75 on triton 3.6 and 8.19 -> 7.00 on 3.9, M = 4 5.00 -> 4.44 and
    4.44 -> 3.94, M = 8 3.56 -> 3.38 and 3.28 -> 2.91; the byte table at M = 1 10.38 -> 9.62 and
    6.44 -> 5.00. But with the byte and nibble tables at M >= 4 triton 3.6 (the GPU machine's) built the
    block sums into more instructions (byte M = 4: 5.12 -> 5.75), so those keep the per-word scale. The
    shared-memory lookup ("gather") scales per block at every M (M = 4, 16 rows by 4 blocks, triton 3.6:
    672 instructions against 776 per word)."""
    return table in ("prmt", "gather") or block_m == 1


def gemv_supported(m: int, weight: NF4Weight) -> bool:
    """The gemv kernel needs M <= GEMV_MAX_ROWS, K a multiple of the blocksize and the packed bytes
    word-aligned (it reads them as 32-bit words; NF4Weight keeps them contiguous)."""
    return (0 < m <= GEMV_MAX_ROWS and len(weight.shape) == 2 and weight.shape[1] % weight.blocksize == 0
            and weight.packed.data_ptr() % 4 == 0)


def nf4_gemv_forward(x: torch.Tensor, weight: NF4Weight, config: GemvConfig | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) @ dequant(W).T -> (M, N) for small M with the gemv kernel (see ``gemv_supported``),
    into ``out`` when given (an (M, N) tensor of x's dtype with unit column stride: a column slice of a
    wider buffer is fine)."""
    _check(x, weight, 1, "x")
    m, k = x.shape
    n = weight.shape[0]
    if not gemv_supported(m, weight):
        raise ValueError(f"nf4 gemv: needs 1 <= M <= {GEMV_MAX_ROWS}, K a multiple of the blocksize "
                         f"{weight.blocksize} and packed bytes aligned to 4, got M={m}, weight {weight.shape}, "
                         f"bytes at {weight.packed.data_ptr() % 4} mod 4")
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = next_power_of_2(m)
    cfg = config or _tuned_gemv_config(block_m, x.device, x.dtype)
    blocks_per_row = k // weight.blocksize
    block_n, blocks = gemv_tile(block_m, weight.blocksize, blocks_per_row)
    block_n, blocks = cfg.block_n or block_n, cfg.blocks or blocks
    if blocks & (blocks - 1) or block_n & (block_n - 1):
        raise ValueError(f"nf4 gemv: block_n and blocks must be powers of two, got {block_n}, {blocks}")
    tiles = cdiv(n, block_n)
    steps = max(1, min(cfg.steps, cdiv(blocks_per_row, blocks)))  # no program walks past the row's blocks
    split = cdiv(blocks_per_row, blocks * steps)
    if out is not None and (tuple(out.shape) != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1):
        raise ValueError(f"nf4 gemv: out must be ({m}, {n}) {x.dtype} with unit column stride, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
    final = out if out is not None else torch.empty((m, n), dtype=x.dtype, device=x.device)
    counts = _split_counts(x.device, tiles) if split > 1 and cfg.reduce_in_kernel else None
    parts = final if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    dq = weight.double_quant
    pdl = cfg.pdl and pdl_supported(x.device)
    _nf4_gemv_kernel[(tiles, split)](
        x, weight.packed.view(torch.int32), weight.absmax, weight.nested_absmax if dq else weight.absmax,
        weight.nested_code if dq else weight.absmax,
        _gemv_table(cfg.table, x.device), parts,
        final, counts if counts is not None else final,
        m, n, k, weight.offset if dq else 0.0,
        x.stride(0), parts.stride(0) if split > 1 else 0, parts.stride(-2), final.stride(0),
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=dq, NESTED=NESTED_BLOCKSIZE,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCKS=blocks, SPLIT=counts is not None,
        TABLE=cfg.table, ASM=cfg.table == "prmt" and register_decode_asm(x.device),
        X_PAIRS=gemv_x_pairs(cfg.table, x), BLOCK_SCALE=gemv_block_scale(cfg.table, block_m),
        PDL=pdl, STEPS=steps, launch_pdl=pdl, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, enable_fp_fusion=True,  # x * code + partial as one FMA
    )
    if split > 1 and counts is None:
        _sum_splits(parts, x.dtype, final)
    return final


_dequant_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_buffer(weight: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W dequantized by the Triton kernel into the shared per-(device, dtype) buffer.

    The result is a view that the next call overwrites: use it at once, on the current stream.
    The buffer grows to the largest weight seen and is kept (one layer's worth of memory).
    """
    key = (weight.device, dtype)
    buf = _dequant_buffers.get(key)
    if buf is None or buf.numel() < weight.numel:
        _dequant_buffers.pop(key, None)
        with torch.inference_mode(False):  # made under inference mode, it must stay writable outside it
            buf = torch.empty(weight.numel, dtype=dtype, device=weight.device)
        _dequant_buffers[key] = buf
    view = buf[: weight.numel].view(weight.shape)
    return dequantize_nf4_triton(weight, dtype, out=view)


def nf4_dequant_forward(x: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """x (M, K) @ W.T through the dequant buffer (or ``dequant_cache`` where it is on) and torch.matmul
    (cuBLAS on CUDA)."""
    _check(x, weight, 1, "x")
    if dequant_cache.usable(weight, x.dtype):
        return dequant_cache.matmul(x, weight, transpose=True)
    return torch.matmul(x, dequant_buffer(weight, x.dtype).t())


def nf4_dequant_backward(dy: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """dy (M, N) @ W through the dequant buffer and torch.matmul."""
    _check(dy, weight, 0, "dy")
    if dequant_cache.usable(weight, dy.dtype):
        return dequant_cache.matmul(dy, weight, transpose=False)
    return torch.matmul(dy, dequant_buffer(weight, dy.dtype))


def _runnable(path: str | None, m: int, weight: NF4Weight, dtype: torch.dtype, backward: bool = False) -> str:
    """``resolve_path``, then the tma path checked against the weight and dtype: an explicit
    ``path="tma"`` that the tma kernels cannot take is an error naming why; where auto chose it, dequant
    runs instead."""
    chosen = resolve_path(path, m, weight, backward)
    if chosen == "tma":
        reason = nf4_tma.unsupported_reason(weight, dtype)
        if reason is not None:
            if path == "tma":
                raise ValueError(f"nf4_matmul path 'tma': {reason}")
            return "dequant"
    return chosen


def nf4_matmul_forward(x: torch.Tensor, weight: NF4Weight, path: str | None = None) -> torch.Tensor:
    """2-D forward (no autograd) on the path M picks: x (M, K) -> (M, N).

    An explicit ``gemv`` on a shape the gemv kernel does not take (M > GEMV_MAX_ROWS, K not a multiple
    of the blocksize) runs dequant instead."""
    chosen = _runnable(path, x.shape[0], weight, x.dtype)
    if chosen == "gemv" and gemv_supported(x.shape[0], weight):
        return nf4_gemv_forward(x, weight)
    if chosen == "fused":
        return nf4_fused_forward(x, weight)
    if chosen == "tma":
        return nf4_tma.nf4_tma_forward(x, weight)
    return nf4_dequant_forward(x, weight)


def nf4_matmul_backward(dy: torch.Tensor, weight: NF4Weight, path: str | None = None) -> torch.Tensor:
    """2-D input gradient (no autograd) on the path M picks: dy (M, N) -> (M, K). The gemv kernel has
    no backward (W's rows are the reduction there): gemv's backward is dequant."""
    chosen = _runnable(path, dy.shape[0], weight, dy.dtype, backward=True)
    if chosen == "fused":
        return nf4_fused_backward(dy, weight)
    if chosen == "tma":
        return nf4_tma.nf4_tma_backward(dy, weight)
    return nf4_dequant_backward(dy, weight)


class NF4MatmulFunction(torch.autograd.Function):
    """y = x @ dequant(W).T with dx = dy @ dequant(W); W is frozen (no gradient).

    The NF4Weight rides on ctx as a plain object: its tensors are constants of the graph
    (buffers that never require grad), so nothing needs save_for_backward, and W is never
    kept dequantized between forward and backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, path: str) -> torch.Tensor:
        ctx.weight = weight
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        # both directions' paths, chosen once here: an explicit path is kept (gemv has no backward:
        # dequant); auto picks the backward's own (never gemv or fused)
        chosen = _runnable(path, x2d.shape[0], weight, x2d.dtype)
        if path == "auto":
            ctx.path = _runnable(path, x2d.shape[0], weight, x2d.dtype, backward=True)
        else:
            ctx.path = "dequant" if chosen == "gemv" else chosen
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, weight.shape[0])
        return nf4_matmul_forward(x2d, weight, chosen).reshape(*lead, weight.shape[0])

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, dy: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.weight
        lead = dy.shape[:-1]
        dy2d = dy.reshape(-1, dy.shape[-1])
        if dy2d.shape[0] == 0:
            return dy.new_zeros(*lead, weight.shape[1]), None, None
        path = ctx.path
        if path == "tma" and not nf4_tma.supported(weight, dy2d.dtype):  # a gradient in another dtype
            path = "dequant"
        return nf4_matmul_backward(dy2d, weight, path).reshape(*lead, weight.shape[1]), None, None


# ----------------------------------------------------------------------------- public entry points


def nf4_matmul_triton(x: torch.Tensor, weight: NF4Weight, path: str | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` with the Triton kernels; x (..., K) -> (..., N) in x's dtype."""
    _check(x, weight, 1, "x")
    return NF4MatmulFunction.apply(x, weight, path or "auto")


def nf4_matmul_reference(x: torch.Tensor, weight: NF4Weight, path: str | None = None) -> torch.Tensor:
    """Torch reference: ``F.linear(x, dequantize(W, x.dtype))``; ``path`` is checked and otherwise unused."""
    _check(x, weight, 1, "x")
    resolve_path(path, 0)
    return torch.nn.functional.linear(x, dequantize_nf4_reference(weight, x.dtype))


def nf4_matmul(x: torch.Tensor, weight: NF4Weight, path: str | None = None) -> torch.Tensor:
    """``x @ dequant(W).T`` (forward) with ``dx = dy @ dequant(W)`` (backward); Triton or torch by dispatch."""
    if dispatch.use_triton(x, weight.packed):
        return nf4_matmul_triton(x, weight, path)
    return nf4_matmul_reference(x, weight, path)
