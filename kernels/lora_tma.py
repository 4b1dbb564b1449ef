"""The LoRA ``tma`` path: persistent Triton GEMMs fed by tensor descriptors, the LoRA terms in their epilogues.

Why a second Triton GEMM: with dropout the LoRA term of dx is masked element by element, and dA needs
the masked x, so on the cuBLAS-based paths each is a pass over an (M, K) activation outside the GEMM
(``cublas`` and ``concat`` make about six such passes at M = 16384; bench/README.md). Inside a GEMM's
epilogue the same work reads one tile of x per output tile while the tensor cores are busy with the
next tile's mainloop. The ``dequant`` path already has such epilogues, on a Triton GEMM that streams
its operands with pointer loads one tile per program; on the H100 it took 1.52-1.90x NF4 alone
(graph replay), 1.23-1.38x the ``cublas`` path with the same LoRA work around it. These kernels are the GEMM built the way Hopper wants it: operands through
tensor descriptors (TMA on sm_90; the interpreter reads them too), one program per SM walking output
tiles in grouped order, and big tiles.

Forward, with xa = dropout(x) @ A.T from the ``down`` launch of ``bezoar_kernels.lora``::

    y[:, cols of j] = x @ W_j.T + s_j * xa_j @ B_j.T

The epilogue adds, for each projection whose columns the tile meets, one rank-r product into the
tile's fp32 accumulator, with s_j B_j rounded to the compute dtype first (as on the ``concat`` path).

Backward, with g = s * dy @ B from the ``g`` launch (or the ``g_db`` launch, which also reduces dB)::

    dx = dy @ W + sum_j (g_j @ A_j) * mask_j / (1 - p)
    dA_j += g_j.T @ (x * mask_j) / (1 - p)        per output tile, ``FUSE_DA``

Each dx tile hashes its dropout mask once and uses it for both terms; the dA contribution of a tile
is r16 x BLOCK_K values, added to an fp32 dA with atomics (so dA's sum order, and its last bits, vary
from run to run; ``fuse_da=False`` keeps the separate deterministic ``dA`` pass instead). Against
``concat`` this removes the pass that copies x, the dx + dA pass (base product, x and dx: three
activations) and the wide product's extra columns; left over the two GEMMs are the down pass over x
and the pass over dy for g and dB (two passes above a padded rank of 32).

Measured on an H100 (2026-11-27, bench/results/lora-NVIDIA_H100_80GB_HBM3-2026-11-27.json, graph
replay): the GEMMs with no adapter take 1.045-1.107x dequant + cuBLAS's time; with the LoRA terms,
forward + backward, 1.14-1.39x NF4 alone at r = 16 (``concat`` 1.13-1.38x on the same cases) and
1.56-1.84x at r = 64. ``auto`` takes it only where bench/tune.py finds it the fastest large-M path
(``lora.large_m_path``), which it was not on the H100; ``path="tma"`` runs it.
"""

from __future__ import annotations

import dataclasses

import torch

from bezoar_kernels import persistent
from bezoar_kernels.launch import cdiv, launch_fitting
from bezoar_kernels.lora import _dot_precision, _r_pad
from bezoar_kernels.persistent import TensorDescriptor, available, tl, triton
from bezoar_kernels.persistent import describable as _aligned


@dataclasses.dataclass(frozen=True)
class TmaConfig:
    """Tiles of the ``tma`` GEMMs. Forward: (block_m x block_n) output tiles, K in steps of block_k.
    Backward: (block_m x block_k) tiles of dx, the reduction over N in steps of block_n (the
    ``GemmConfig`` convention of the other LoRA GEMMs). ``programs``: persistent programs (None: one
    per SM). ``fuse_da``: the backward adds dA in its epilogue (atomics) instead of a separate pass.
    ``flatten``: one pipelined loop over all (tile, K step) pairs, so a tile's epilogue overlaps the
    next tile's loads; off by default: the pipeliner then multi-buffers the epilogue's LoRA loads too,
    which at the default forward tiles takes 225 KB of shared memory (213 KB without), and 262 KB for
    q/k/v at r = 64, over the H100's 227 KB (``launch_fitting`` then drops a stage)."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    programs: int | None = None
    fuse_da: bool = True
    flatten: bool = False

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"TmaConfig.{name} must be a power of two >= 16, got {value}")


# Forward: 128 x 256 tiles, 64-wide K steps, 8 warps, 3 stages, the shape Triton's Hopper matmuls use
# for large bf16 products: 208 KB of shared memory on sm_90 (144 KB of operand stages, 64 KB to stage
# the output tile for its TMA store). Backward: dx tiles of 128 x 128 in 64-row steps over N, 4 stages
# (160 KB), so the epilogue's mask, x tile and dA products fit beside the accumulator (255 registers,
# no spills, triton 3.6 and 3.9; bench/sass.py lora_tma_bwd).
DEFAULT_FWD = TmaConfig(128, 256, 64, 8, 8, 3)
DEFAULT_BWD = TmaConfig(128, 64, 128, 8, 8, 4)


def default_bwd(projections: int, r: int) -> TmaConfig:
    """The backward's tiles for P projections of rank r: 128-column dx tiles at P = 1 and r <= 16; 64
    columns otherwise, where the epilogue's P masks and products spilled (sm_90, triton 3.9: 800 bytes
    of stack at P = 3, 72 at r = 64 with 128 columns; 16 and 0 with 64)."""
    if projections == 1 and r <= 16:
        return DEFAULT_BWD
    return dataclasses.replace(DEFAULT_BWD, block_k=64)


# LoRA ranks this path takes: the ranks its sm_90 builds were checked at (bench/sass.py lora_tma_fwd /
# lora_tma_bwd: no spills in the forward, at most 128 bytes of stack in the q/k/v backward at r = 64) and
# the tests run; larger ranks go to the other paths
MAX_RANK = 64


def shapes_ok(k: int, n_total: int, dtype: torch.dtype, r: int = 0) -> bool:
    """Whether x (M, K), W (Ncat, K), y (M, Ncat) and dx can be described (rows of 16 bytes' multiples)
    and the rank fits the epilogues (r <= MAX_RANK)."""
    per16 = 16 // torch.empty((), dtype=dtype).element_size()
    return k % per16 == 0 and n_total % per16 == 0 and r <= MAX_RANK


def _descriptor(t: torch.Tensor, block: list[int], what: str):
    if not _aligned(t):
        raise ValueError(f"lora tma: {what} must have a unit last stride and 16-byte aligned base and rows, "
                         f"got shape {tuple(t.shape)} strides {t.stride()} at {t.data_ptr() % 16} mod 16")
    return TensorDescriptor.from_tensor(t, block)


if triton is not None:
    from bezoar_kernels.lora import _dropout_keep, _lora_dx_epilogue, _pick3
    from bezoar_kernels.persistent import grouped_tile as _grouped_tile

    @triton.jit
    def _tma_fwd_kernel(
        x_desc, w_desc, y_desc, xa_ptr, b_ptr,
        M, N, K, R, N0, N1, scaling0, scaling1, scaling2, stride_xap, stride_xam, NUM_PROGRAMS,
        P: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """y = x @ W.T (+ s_j * xa_j @ B_j.T on projection j's columns) over persistent programs; x (M, K),
        W (N, K) and y (M, N) through descriptors, xa (P, M, R) strided and B (N, R) (the projections'
        B_j stacked like W) with plain loads: they are small. Projection j owns columns N0 + .. of y;
        a column tile meets one projection or two, and only those add a rank-R product."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        steps = tl.cdiv(K, BLOCK_K)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=FLATTEN):
            pid_m, pid_n = _grouped_tile(tile, tiles_m, tiles_n, GROUP_M)
            row0 = pid_m * BLOCK_M
            col0 = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for step in range(steps):
                a = x_desc.load([row0, step * BLOCK_K])
                b = w_desc.load([col0, step * BLOCK_K])
                acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
            if HAS_LORA:
                rows = row0 + tl.arange(0, BLOCK_M)
                cols = col0 + tl.arange(0, BLOCK_N)
                offs_r = tl.arange(0, R_PAD)
                r_ok = offs_r < R
                for j in tl.static_range(P):
                    lo = _pick3(j, 0, N0, N0 + N1)
                    hi = _pick3(j, N0, N0 + N1, N)
                    if P == 1 or (col0 < hi and col0 + BLOCK_N > lo):
                        xa = tl.load(xa_ptr + j * stride_xap + rows.to(tl.int64)[:, None] * stride_xam + offs_r[None, :],
                                     mask=(rows < M)[:, None] & r_ok[None, :], other=0.0)
                        b = tl.load(b_ptr + cols.to(tl.int64)[:, None] * R + offs_r[None, :],
                                    mask=((cols >= lo) & (cols < hi))[:, None] & r_ok[None, :], other=0.0)
                        # s_j B_j rounded to the dtype, as the concat path's wide matrix has it: the product then
                        # accumulates into acc in place (a separate product scaled after it took 128 more
                        # registers a thread and spilled 1 KB on sm_90)
                        sb = (b.to(tl.float32) * _pick3(j, scaling0, scaling1, scaling2)).to(b.dtype)
                        acc = tl.dot(xa, sb.T, acc, input_precision=DOT_PRECISION)
            y_desc.store([row0, col0], acc.to(y_desc.dtype))

    @triton.jit
    def _tma_bwd_kernel(
        dy_desc, w_desc, dx_desc, x_ptr, g_ptr, a_ptr, da_ptr,
        M, N, K, R, seed0, seed1, seed2, threshold, keep_scale,
        stride_xm, stride_gp, stride_gm, NUM_PROGRAMS,
        P: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, FUSE_DA: tl.constexpr,
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dx = dy @ W (+ sum_j (g_j @ A_j) * mask_j * keep_scale) over persistent programs, and with
        FUSE_DA dA_j += g_j.T @ (x * mask_j) * keep_scale into fp32 dA (P, R, K) by atomics.
        dy (M, N), W (N, K), dx (M, K); g (P, M, R) strided, A (P, R, K) contiguous."""
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_k = tl.cdiv(K, BLOCK_K)
        steps = tl.cdiv(N, BLOCK_N)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_k, NUM_PROGRAMS, flatten=FLATTEN):
            pid_m, pid_k = _grouped_tile(tile, tiles_m, tiles_k, GROUP_M)
            row0 = pid_m * BLOCK_M
            col0 = pid_k * BLOCK_K
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for step in range(steps):
                d = dy_desc.load([row0, step * BLOCK_N])
                w = w_desc.load([step * BLOCK_N, col0])
                acc = tl.dot(d, w, acc, input_precision=DOT_PRECISION)
            if HAS_LORA:
                rows = row0 + tl.arange(0, BLOCK_M)
                cols = col0 + tl.arange(0, BLOCK_K)
                m_ok = rows < M
                c_ok = cols < K
                if FUSE_DA:
                    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :],
                                mask=m_ok[:, None] & c_ok[None, :], other=0.0)
                    offs_r = tl.arange(0, R_PAD)
                    r_ok = offs_r < R
                for j in tl.static_range(P):
                    keep = m_ok  # a placeholder, unread without dropout
                    if DROPOUT:
                        keep = _dropout_keep(rows, col0, _pick3(j, seed0, seed1, seed2), threshold, BLOCK_K)
                    acc = _lora_dx_epilogue(acc, g_ptr, a_ptr, rows, m_ok, cols, K, R, stride_gp, stride_gm, keep,
                                            keep_scale, j, DROPOUT, R_PAD, DOT_PRECISION)
                    if FUSE_DA:
                        g = tl.load(g_ptr + j * stride_gp + rows.to(tl.int64)[:, None] * stride_gm + offs_r[None, :],
                                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                        xm = x
                        if DROPOUT:
                            xm = tl.where(keep, x, 0.0)
                        part = tl.dot(g.T, xm, input_precision=DOT_PRECISION)
                        if DROPOUT:
                            part = part * keep_scale
                        tl.atomic_add(da_ptr + (j * R + offs_r).to(tl.int64)[:, None] * K + cols[None, :], part,
                                      mask=r_ok[:, None] & c_ok[None, :], sem="relaxed")
            dx_desc.store([row0, col0], acc.to(dx_desc.dtype))


def tma_forward(x: torch.Tensor, w: torch.Tensor, xa: torch.Tensor | None = None, b: torch.Tensor | None = None,
                out_features: tuple[int, ...] = (), scalings: tuple[float, ...] = (),
                cfg: TmaConfig | None = None) -> torch.Tensor:
    """y (M, N) = x @ w.T (+ s_j * xa_j @ B_j.T on projection j's columns) in x's dtype; x (M, K) and
    w (N, K) in x's dtype, xa (P, M, R) with unit last stride, b (N, R) contiguous (B_j stacked as W_j
    are), ``out_features`` the N_j and ``scalings`` the s_j; or xa and b None for the base product."""
    cfg = cfg or DEFAULT_FWD
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    programs = persistent.programs(cfg.programs, tiles, x.device)
    has_lora = xa is not None
    p, r = (xa.shape[0], xa.shape[2]) if has_lora else (1, 1)
    ns = list(out_features) + [0] * (3 - len(out_features))
    s = list(scalings) + [0.0] * (3 - len(scalings))
    launch_fitting(_tma_fwd_kernel, (programs,), (
        _descriptor(x, [cfg.block_m, cfg.block_k], "x"), _descriptor(w, [cfg.block_n, cfg.block_k], "W"),
        _descriptor(y, [cfg.block_m, cfg.block_n], "y"),
        xa if has_lora else x, b if has_lora else x,
        m, n, k, r, ns[0], ns[1], s[0], s[1], s[2], xa.stride(0) if has_lora else 0, xa.stride(1) if has_lora else 0,
        programs,
    ), dict(
        P=p, HAS_LORA=has_lora, R_PAD=_r_pad(r), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FLATTEN=cfg.flatten, DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))
    return y


def tma_backward(dy: torch.Tensor, w: torch.Tensor, x: torch.Tensor, g: torch.Tensor | None, a: torch.Tensor | None,
                 seeds: tuple, threshold: int, keep_scale: float, dropout: bool,
                 cfg: TmaConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx (M, K) in dy's dtype, dA (P, R, K) fp32 or None) with dx = dy @ w (+ the masked LoRA term);
    dy (M, N), w (N, K), x (M, K), g (P, M, R) with unit last stride, a (P, R, K) contiguous. dA comes
    back when ``cfg.fuse_da`` and g is given; otherwise the caller reduces dA itself."""
    m, n = dy.shape
    k = w.shape[1]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    has_lora = g is not None
    p, r = (g.shape[0], g.shape[2]) if has_lora else (1, 1)
    cfg = cfg or default_bwd(p, r)
    fuse_da = has_lora and cfg.fuse_da
    da = torch.zeros((p, r, k), dtype=torch.float32, device=dy.device) if fuse_da else None
    if m == 0:
        return dx, da
    tiles = cdiv(m, cfg.block_m) * cdiv(k, cfg.block_k)
    programs = persistent.programs(cfg.programs, tiles, dy.device)
    s = list(seeds) + [0] * (3 - len(seeds))
    launch_fitting(_tma_bwd_kernel, (programs,), (
        _descriptor(dy, [cfg.block_m, cfg.block_n], "dy"), _descriptor(w, [cfg.block_n, cfg.block_k], "W"),
        _descriptor(dx, [cfg.block_m, cfg.block_k], "dx"),
        x, g if has_lora else dy, a if has_lora else dy, da if fuse_da else dx,
        m, n, k, r, s[0], s[1], s[2], threshold, keep_scale,
        x.stride(0), g.stride(0) if has_lora else 0, g.stride(1) if has_lora else 0, programs,
    ), dict(
        P=p, HAS_LORA=has_lora, DROPOUT=dropout and has_lora, FUSE_DA=fuse_da,
        R_PAD=_r_pad(r), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, FLATTEN=cfg.flatten, DOT_PRECISION=_dot_precision(dy.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ))
    return dx, da


__all__ = ["DEFAULT_BWD", "DEFAULT_FWD", "MAX_RANK", "TmaConfig", "available", "default_bwd", "shapes_ok", "tma_backward",
           "tma_forward"]
