"""NF4 matmul at large M with the weight decoded inside the K loop: the ``tma`` path of nf4_matmul.

Why: at M >= 4096 the ``dequant`` path (Triton dequantize into a buffer, then cuBLAS) pays one pass of
the weight's bytes per call at the copy bandwidth. On the H100 that pass was 9.5 us of the 13 us the
3200x3200 forward at M = 4096 took over cuBLAS on the dequantized weight (1.104x; the target is
1.05x). These kernels skip the pass: they read the packed 4-bit weight (a quarter of the bf16 bytes)
and decode each tile into registers between the tensor-core steps.

Decoding is issue work, and a decoded tile is only worth its instructions if enough rows of x share
it. The kernels therefore compute the transposed product: the decoded tile of W is the first operand
of the warpgroup MMA, which sm_90's ``HGMMA`` takes from registers (B, x or dy, comes through TMA
into shared memory), and one program covers 256 rows of x, so each decoded weight feeds 256
multiply-adds. The decoded values take one trip through shared memory to reach the operand's
register layout (4 ``STS.128`` and 4 ``LDSM`` a thread per step), but no MMA reads that buffer, so
the MMA of one step runs while the next step's words are decoded (the compiled loop waits for all but
one MMA group; with the tile as the second operand, in shared memory, it waited for all of them
before overwriting it). The sm_90 build at the default tiles (``bench/sass.py nf4_tma_fwd``): 288
instructions a warp per K step of 128 x 64 weights, some 575 issue cycles for 8 warps, against about
1,020 cycles of MMA for the 256 x 128 x 64 step; the backward (``nf4_tma_bwd``) 316 for 64 x 128.

The decode is the register one of the gemv kernel (``nf4._nf4_word_bf16_from``: byte permutes over
the 16 codes rounded to bf16, eight values per int32 word, no table loads), then each value is
scaled by its block's absmax:

* bf16 x (default): in bf16 pairs, ``HMUL2.BF16`` on the code pair and the absmax rounded to bf16, as
  bitsandbytes' own 4-bit kernels scale in the compute dtype. A weight differs from
  ``dequantize_nf4(W, bf16)`` (which rounds the fp32 product once) by three bf16 roundings at most
  (the code's, up to 0.31%, the absmax's and the product's, 2^-9 each: about 1% in the worst
  weights); the products then differ by bf16 noise (tests bound both).
* ``NF4TmaConfig.exact=True`` or fp16 x: the code pair widened to fp32, times the fp32 absmax, rounded
  once to x's dtype: the code's own bf16 rounding (up to 0.31% on the 16 codes) is then the only
  difference from the dequantized weight.

Shapes and devices: K a multiple of the blocksize (every OpenLLaMA projection), N a multiple of 8
(16-byte rows of y and dy for their descriptors), x / dy in bf16 or fp16, the packed weight 16-byte
aligned, an NVIDIA GPU of sm_90 or newer (``mul.rn.bf16x2`` and register-operand warpgroup MMAs), or
the Triton interpreter with fp16 (its bf16 dot is wrong). ``supported`` says whether a weight and
dtype qualify, and nf4_matmul falls back to ``dequant`` where they do not.

Measured on an H100 (2026-11-27, ``bench/nf4.py --sweep-tma --ms 4096``,
bench/results/nf4-tma-sweep-NVIDIA_H100_80GB_HBM3-2026-11-27.json): slower than dequant + cuBLAS at
every config, 1.36-1.76x cuBLAS forward and 2.2x backward at the best ones, against 1.07-1.10x. The
exact build ran within 5% of the bf16x2 one, so the decode's arithmetic is not the limit (bench/README.md
says what is suspected). ``auto`` takes this path only from the M that ``BEZOAR_NF4_TMA_MIN_M`` or the
device's tuning entry (``nf4.tma_min_m``, which bench/tune.py writes only where these kernels win)
names, so nowhere at present; ``path="tma"`` runs it.
"""

from __future__ import annotations

import dataclasses

import torch

from bezoar_kernels import dispatch, persistent
from bezoar_kernels.launch import cdiv, launch_fitting
from bezoar_kernels.nf4 import (NESTED_BLOCKSIZE, NF4Weight, decode_absmax, nf4_code, nf4_code_planes,
                               register_decode_asm)
from bezoar_kernels.persistent import TensorDescriptor, available, tl, triton


@dataclasses.dataclass(frozen=True)
class NF4TmaConfig:
    """Tiles of the NF4 ``tma`` kernels. Forward: (block_m x block_n) tiles of y, K in steps of block_k.
    Backward: (block_m x block_k) tiles of dx, the reduction over N in steps of block_n (the convention
    of the LoRA GEMMs). block_k is 64 or 128 (a tile row holds one or two absmax blocks); ``programs``:
    persistent programs (None: one per SM); ``exact``: scale in fp32 and round once (see the module
    docstring) instead of in bf16 pairs."""

    block_m: int = 256
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs: int | None = None
    exact: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"NF4TmaConfig.{name} must be a power of two >= 16, got {value}")
        if self.block_k not in (64, 128):
            raise ValueError(f"NF4TmaConfig.block_k must be 64 or 128, got {self.block_k}")


# Forward: 256 rows of x by 128 rows of W, 64-wide K steps: 178 KB of shared memory on sm_90 (3 stages
# of a 32 KB x tile and a 4 KB word tile, and the output tile staged for its TMA store), no spills.
# Backward: 256 rows of dy by 128 columns of dx (two absmax blocks a row), 64-row steps over N: 182 KB.
# bench/nf4.py --sweep-tma times the alternatives on a GPU.
DEFAULT_FWD = NF4TmaConfig(256, 128, 64)
DEFAULT_BWD = NF4TmaConfig(256, 64, 128)


def _device_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot run on ``device`` with ``dtype``, or None."""
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "the tma kernels need an NVIDIA GPU (PTX decode and bf16x2 multiplies)"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 9:
            return (f"the tma kernels need sm_90 or newer (register-operand warpgroup MMAs, mul.rn.bf16x2); "
                    f"this GPU is sm_{major}{minor}")
    elif not dispatch.interpreting():
        return f"the tma kernels run on NVIDIA GPUs or under the Triton interpreter, not on {device.type}"
    elif dtype == torch.bfloat16:
        return "the Triton interpreter's bf16 dot is wrong: under it the tma kernels take fp16 only"
    return None


def unsupported_reason(weight: NF4Weight, dtype: torch.dtype) -> str | None:
    """Why the ``tma`` kernels cannot take this weight with activations of ``dtype``, or None if they can."""
    if not available():
        return "this Triton has no tensor descriptors (triton.tools.tensor_descriptor)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"activations are {dtype}; the tma kernels take bf16 or fp16"
    reason = _device_reason(weight.packed.device, dtype)
    if reason is not None:
        return reason
    if len(weight.shape) != 2:
        return f"the weight has shape {weight.shape}; expected 2-D"
    n, k = weight.shape
    if k % weight.blocksize:
        return f"K = {k} is not a multiple of the blocksize {weight.blocksize}"
    if n % 8:
        return f"N = {n} is not a multiple of 8 (rows of y must be 16-byte multiples)"
    packed = weight.packed
    if not packed.is_contiguous() or packed.data_ptr() % 16:
        return "the packed weight is not contiguous and 16-byte aligned"
    return None


def supported(weight: NF4Weight, dtype: torch.dtype) -> bool:
    return unsupported_reason(weight, dtype) is None


def _operand(t: torch.Tensor) -> torch.Tensor:
    """t as a descriptor can read it (a contiguous copy where it cannot)."""
    return t if persistent.describable(t) else t.clone(memory_format=torch.contiguous_format)


def _words(weight: NF4Weight) -> torch.Tensor:
    """The packed bytes as int32 words, (N, K / 8): row n's K / 2 bytes, eight values a word."""
    n, k = weight.shape
    return weight.packed.view(torch.int32).view(n, k // 8)


if triton is not None:
    from bezoar_kernels.persistent import grouped_tile as _grouped_tile
    from bezoar_kernels.nf4 import _nf4_block_absmax, _nf4_pair_tile, _nf4_plane_registers

    @triton.jit
    def _bf16_bits(f):
        """The bits of fp32 ``f`` rounded to bf16 (to nearest, ties to even; finite values), in the low 16
        bits of an int32."""
        bits = f.to(tl.int32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF

    @triton.jit
    def _nf4_tile(words, rows, row_ok, col0, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                  h0, h2, l0, l2, ROWS: tl.constexpr, WIDTH: tl.constexpr, BLOCKSIZE: tl.constexpr,
                  DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, ASM: tl.constexpr, BF16_PAIRS: tl.constexpr,
                  OUT: tl.constexpr):
        """W[rows, col0 : col0 + WIDTH] in dtype OUT from its packed words (ROWS, WIDTH / 8); rows that
        are not ``row_ok`` and columns past K give 0. WIDTH is 64 or 128; col0 a multiple of WIDTH, so
        the tile row is one absmax block, or two when WIDTH = 2 * BLOCKSIZE."""
        kblocks = K // BLOCKSIZE
        b0 = col0 // BLOCKSIZE
        pairs = _nf4_pair_tile(words, h0, h2, l0, l2, ROWS, WIDTH // 8, ASM)  # (ROWS, WIDTH / 2) bf16 pairs
        block = rows * kblocks + b0
        ok = row_ok & (rows * 0 + b0 < kblocks)
        s = _nf4_block_absmax(block, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT, NESTED)
        s = tl.where(ok, s, 0.0)[:, None]
        if WIDTH > BLOCKSIZE:  # the second half of each tile row is the next block
            ok1 = row_ok & (rows * 0 + b0 + 1 < kblocks)
            s1 = _nf4_block_absmax(block + 1, ok1, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   DOUBLE_QUANT, NESTED)
            s1 = tl.where(ok1, s1, 0.0)[:, None]
            s = tl.where((tl.arange(0, WIDTH // 2) < BLOCKSIZE // 2)[None, :], s, s1)
        if BF16_PAIRS:  # bf16 pairs times the bf16 absmax, one rounding of each exact product
            sb = _bf16_bits(s)
            if ASM:
                prod = tl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [pairs, sb | (sb << 16)],
                                                 dtype=tl.int32, is_pure=True, pack=1)
            else:  # the same products in fp32 (exact: 8-bit by 8-bit mantissas), rounded as the PTX does
                scale = (sb << 16).to(tl.float32, bitcast=True)
                prod = (_bf16_bits((pairs << 16).to(tl.float32, bitcast=True) * scale)
                        | (_bf16_bits((pairs & -65536).to(tl.float32, bitcast=True) * scale) << 16))
            first = prod.to(tl.int16).to(tl.bfloat16, bitcast=True)
            second = (prod >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            first = (pairs << 16).to(tl.float32, bitcast=True) * s
            second = (pairs & -65536).to(tl.float32, bitcast=True) * s
            if OUT == tl.bfloat16 and not ASM:  # the interpreter's fp32 -> bf16 truncates; cvt.rn rounds
                first = _bf16_bits(first).to(tl.int16).to(tl.bfloat16, bitcast=True)
                second = _bf16_bits(second).to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                first = first.to(OUT)
                second = second.to(OUT)
        return tl.reshape(tl.join(first, second), (ROWS, WIDTH))

    @triton.jit
    def _nf4_tma_fwd_kernel(
        x_desc, w_desc, y_desc, absmax_ptr, nested_absmax_ptr, nested_code_ptr, planes_ptr, offset,
        M, N, K, NUM_PROGRAMS,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ASM: tl.constexpr,
        BF16_PAIRS: tl.constexpr,
    ):
        """y = x @ W.T over persistent programs; x (M, K) and y (M, N) through descriptors, W's words
        (N, K / 8) too. Each step decodes a (BLOCK_N, BLOCK_K) tile of W into registers and multiplies
        it as the first operand: acc (BLOCK_N, BLOCK_M) = y tile transposed."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        steps = tl.cdiv(K, BLOCK_K)
        h0, h2, l0, l2 = _nf4_plane_registers(planes_ptr)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
            row0 = pid_m * BLOCK_M
            col0 = pid_n * BLOCK_N
            n = col0 + tl.arange(0, BLOCK_N)
            n_ok = n < N
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for step in range(steps):
                x = x_desc.load([row0, step * BLOCK_K])
                words = w_desc.load([col0, step * (BLOCK_K // 8)])
                w = _nf4_tile(words, n, n_ok, step * BLOCK_K, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr,
                              offset, h0, h2, l0, l2, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED, ASM,
                              BF16_PAIRS, x_desc.dtype)
                acc = tl.dot(w, x.T, acc)
            y_desc.store([row0, col0], acc.T.to(y_desc.dtype))

    @triton.jit
    def _nf4_tma_bwd_kernel(
        dy_desc, w_desc, dx_desc, absmax_ptr, nested_absmax_ptr, nested_code_ptr, planes_ptr, offset,
        M, N, K, NUM_PROGRAMS,
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ASM: tl.constexpr,
        BF16_PAIRS: tl.constexpr,
    ):
        """dx = dy @ W over persistent programs; dy (M, N), dx (M, K) and W's words through descriptors.
        Each step over N decodes W[n : n + BLOCK_N, cols of the tile] and multiplies its transpose as the
        first operand: acc (BLOCK_K, BLOCK_M) = dx tile transposed."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_k = tl.cdiv(K, BLOCK_K)
        steps = tl.cdiv(N, BLOCK_N)
        h0, h2, l0, l2 = _nf4_plane_registers(planes_ptr)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_k, NUM_PROGRAMS):
            pid_m, pid_k = _grouped_tile(tile, tiles_m, tiles_k, GROUP_M)
            row0 = pid_m * BLOCK_M
            col0 = pid_k * BLOCK_K
            acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
            for step in range(steps):
                d = dy_desc.load([row0, step * BLOCK_N])
                n = step * BLOCK_N + tl.arange(0, BLOCK_N)
                words = w_desc.load([step * BLOCK_N, col0 // 8])
                w = _nf4_tile(words, n, n < N, col0, K, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              h0, h2, l0, l2, BLOCK_N, BLOCK_K, BLOCKSIZE, DOUBLE_QUANT, NESTED, ASM, BF16_PAIRS,
                              dy_desc.dtype)
                acc = tl.dot(w.T, d.T, acc)
            dx_desc.store([row0, col0], acc.T.to(dx_desc.dtype))


def _check(a: torch.Tensor, weight: NF4Weight, dim: int, what: str) -> None:
    reason = unsupported_reason(weight, a.dtype)
    if reason is not None:
        raise ValueError(f"nf4 tma: {reason}")
    if a.dim() != 2 or a.shape[1] != weight.shape[dim]:
        raise ValueError(f"nf4 tma: {what} has shape {tuple(a.shape)}; expected (M, {weight.shape[dim]}) for a "
                         f"weight of shape {weight.shape}")
    if a.device != weight.packed.device:
        raise ValueError(f"nf4 tma: {what} is on {a.device}, the weight on {weight.packed.device}")


def _product(a: torch.Tensor, weight: NF4Weight, cfg: NF4TmaConfig, forward: bool) -> torch.Tensor:
    """x @ W.T (``forward``, a = x) or dy @ W (a = dy) on the tma kernels."""
    _check(a, weight, 1 if forward else 0, "x" if forward else "dy")
    m = a.shape[0]
    n, k = weight.shape
    out = torch.empty((m, n if forward else k), dtype=a.dtype, device=a.device)
    if m == 0:
        return out
    if forward:  # y tiles (block_m, block_n), K steps of block_k
        kernel, a_block, out_block = _nf4_tma_fwd_kernel, [cfg.block_m, cfg.block_k], [cfg.block_m, cfg.block_n]
        tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    else:  # dx tiles (block_m, block_k), N steps of block_n
        kernel, a_block, out_block = _nf4_tma_bwd_kernel, [cfg.block_m, cfg.block_n], [cfg.block_m, cfg.block_k]
        tiles = cdiv(m, cfg.block_m) * cdiv(k, cfg.block_k)
    programs = persistent.programs(cfg.programs, tiles, a.device)
    double = weight.double_quant
    launch_fitting(kernel, (programs,), (
        TensorDescriptor.from_tensor(_operand(a), a_block),
        TensorDescriptor.from_tensor(_words(weight), [cfg.block_n, cfg.block_k // 8]),
        TensorDescriptor.from_tensor(out, out_block),
        weight.absmax, weight.nested_absmax if double else weight.absmax,
        weight.nested_code if double else weight.absmax, nf4_code_planes(a.device),
        float(weight.offset) if double else 0.0, m, n, k, programs,
    ), dict(
        BLOCKSIZE=weight.blocksize, DOUBLE_QUANT=double, NESTED=NESTED_BLOCKSIZE, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, ASM=register_decode_asm(a.device),
        BF16_PAIRS=a.dtype == torch.bfloat16 and not cfg.exact, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        # the double-quant absmax is code * scale, then + offset: two roundings, as bitsandbytes and
        # decode_absmax make them, not one fused multiply-add
        enable_fp_fusion=False,
    ))
    return out


def nf4_tma_forward(x: torch.Tensor, weight: NF4Weight, cfg: NF4TmaConfig | None = None) -> torch.Tensor:
    """y (M, N) = x @ dequant(W).T in x's dtype; x (M, K) bf16 or fp16."""
    return _product(x, weight, cfg or DEFAULT_FWD, True)


def nf4_tma_backward(dy: torch.Tensor, weight: NF4Weight, cfg: NF4TmaConfig | None = None) -> torch.Tensor:
    """dx (M, K) = dy @ dequant(W) in dy's dtype; dy (M, N) bf16 or fp16."""
    return _product(dy, weight, cfg or DEFAULT_BWD, False)


__all__ = ["DEFAULT_BWD", "DEFAULT_FWD", "NF4TmaConfig", "available", "decoded_weight", "nf4_tma_backward",
           "nf4_tma_forward", "supported", "unsupported_reason"]


def decoded_weight(weight: NF4Weight, dtype: torch.dtype, exact: bool = False) -> torch.Tensor:
    """W (N, K) as the ``tma`` kernels multiply it, in torch: each code rounded to bf16, then for bf16 with
    ``exact=False`` times the absmax rounded to bf16 (one rounding of the exact product, as ``HMUL2.BF16``
    makes it), else times the fp32 absmax, rounded once to ``dtype``. The tests' oracle."""
    n, k = weight.shape
    index = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1)[: n * k]
    codes = nf4_code(weight.device).to(torch.bfloat16).float()[index.long()].view(n, k // weight.blocksize, -1)
    absmax = decode_absmax(weight).view(n, k // weight.blocksize, 1)
    if dtype == torch.bfloat16 and not exact:
        absmax = absmax.to(torch.bfloat16).float()
    return (codes * absmax).to(dtype).view(n, k)
