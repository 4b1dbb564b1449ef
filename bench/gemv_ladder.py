"""Where the NF4 gemv's time goes at M = 1: a ladder of kernels, each adding one piece of the gemv.

Every rung runs the gemv's grid and tiles (``_nf4_gemv_kernel`` as ``nf4_gemv_forward`` launches it:
(row tiles, K ranges) programs of BLOCK_N rows of W by BLOCKS NF4 blocks, the tuned tiles of the
device, else ``gemv_tile``'s) and is timed the same way, so the difference between two neighbouring
rungs is what the piece the upper one adds costs:

  empty             the grid, each program storing one int32: launch and drain, the floor of any kernel
                    with this many programs
  read              + the tile's packed int32 words of W and its absmax bytes, loaded as the gemv loads
                    them, folded into one int32 per row of W (xor, so no load can be dropped) and stored
                    per (K range, row) as the gemv stores its partials: the DRAM floor of this tiling
  read_scale        + the double-quant chain: absmax byte -> nested code gather -> times the nested
                    absmax, plus the offset (``_nf4_block_absmax``), still no decode
  decode            + the register decode of the codes (``_nf4_word_bf16``, table "prmt") and an fp32 sum
                    per block times its scale: the gemv without x
  gemv_nosplit_sum  the real ``_nf4_gemv_kernel`` (x, the FMAs), launched directly with its K ranges'
                    fp32 partials but no summation of them (SPLIT off, no second launch)
  gemv              ``nf4_gemv_forward`` with the ladder's config, as auto runs it with the tuned tiles:
                    the partials summed in kernel by the last program of each row tile (arrival counter)

Beside the ladder, in the same run and timed the same way: ``gemv_whole_k``, ``nf4_gemv_forward`` with
one K range per program (blocks covering all of K, fewer rows per program: no partials, no counter;
compared with ``gemv_nosplit_sum``), cuBLAS ``x @ W.T`` on the dequantized bf16 weight, and a device copy
of as many bytes as the NF4 weight holds (``dst.copy_(src)``).

Timing: each case as CUDA-graph replays of 8 calls, each call on another copy of the weight (so no call
finds its weight in L2), divided by the calls (``common.graph_ms``), in ``--rounds`` rounds through every
case, keeping each case's fastest round. Before timing, each shape's rungs are checked against torch
(the fold of ``read``, the scale sums of ``read_scale``, the decoded sums of ``decode``, the partials of
``gemv_nosplit_sum`` against the gemv); a wrong rung is reported and not timed.

Rows (gemv-ladder-<device>-<date>.json, rewritten after every shape): shape, rung, us (per call), bytes
(the distinct bytes the rung must read: packed words, absmax bytes, the nested scales and code, x; the
partials a program writes and the last one re-reads are not counted; the copy writes as many again),
GB/s (bytes over time), below (the rung it is compared with), piece_us (us minus that rung's: what the
piece costs), at_copy_us (bytes at the copy's GB/s) and over_cublas.

  python bench/gemv_ladder.py                       # 3200x3200, 8640x3200, 3200x8640 on the GPU
  python bench/gemv_ladder.py --shapes 3200x3200 --tiles 32x4 --rounds 3
  python bench/gemv_ladder.py --only decode/3200x3200 --iters 200   # one case, for ncu / nsys
  python bench/gemv_ladder.py --smoke                # tiny shapes on CPU (Triton interpreter), writes nothing
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640)]  # (N, K)
SMOKE_SHAPES = [(24, 384)]  # a row tile and a K range that its tiles do not fill: the masks run too
SMOKE_TILES = (16, 4)  # two K ranges at the smoke shape (the heuristic's tiles cover all of its K)
WEIGHT_COPIES = 8  # per shape, cycled through by every case: a replay's calls find no weight in L2
GRAPH_CALLS = WEIGHT_COPIES
BLOCKSIZE = 64
LADDER = ("empty", "read", "read_scale", "decode", "gemv_nosplit_sum", "gemv")
PEERS = ("gemv_whole_k", "cublas", "copy")
CASES = LADDER + PEERS
BELOW = {**{rung: LADDER[i - 1] for i, rung in enumerate(LADDER) if i}, "gemv_whole_k": "gemv_nosplit_sum"}

KERNEL_NAMES = ("_ladder_empty_kernel", "_ladder_read_kernel", "_ladder_read_scale_kernel", "_ladder_decode_kernel")
_KERNELS: dict = {}


def __getattr__(name: str):
    """The ladder's kernels as module attributes (``bench/sass.py`` compiles them by name), made on first use."""
    if name in KERNEL_NAMES:
        return _kernels()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _kernels() -> dict:
    """The ladder's Triton kernels by name (and rung), defined on first use: triton must be imported after
    ``common.setup_smoke`` has chosen the interpreter. The jit functions find what they call among the
    module's globals, so the helpers go there."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    from bezoar_kernels.nf4 import _bf16_pair_values, _nf4_block_absmax, _nf4_word_bf16

    globals().update(tl=tl, _bf16_pair_values=_bf16_pair_values, _nf4_block_absmax=_nf4_block_absmax,
                     _nf4_word_bf16=_nf4_word_bf16)

    @triton.jit
    def _tile_words(words_ptr, N, K, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr):
        """The program's (1, BLOCK_N, BLOCKS * WORDS) tile of W's int32 words, loaded as the gemv does."""
        WORDS: tl.constexpr = BLOCKSIZE // 8
        SPAN: tl.constexpr = BLOCKS * WORDS
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :, None]
        word = tl.program_id(1) * SPAN + tl.arange(0, SPAN)[None, None, :]
        row_words = tl.multiple_of(K // 8, WORDS)
        w_ok = (offs_n < N) & (word // WORDS < K // BLOCKSIZE)
        return tl.load(words_ptr + offs_n.to(tl.int64) * row_words + word, mask=w_ok, other=0)

    @triton.jit
    def _tile_blocks(N, K, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr):
        """The (BLOCK_N, BLOCKS) absmax indices of the program's tile and their mask, as the gemv's."""
        rows_2d = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
        block = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)[None, :]
        return rows_2d * (K // BLOCKSIZE) + block, (rows_2d < N) & (block < K // BLOCKSIZE)

    @triton.jit
    def _store_rows(out_ptr, value, N, BLOCK_N: tl.constexpr):
        """value (1, BLOCK_N) into out[K range, row], rows < N (as the gemv stores its partials)."""
        out_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(out_ptr + tl.program_id(1) * N + out_n, value, mask=out_n < N)

    @triton.jit
    def _ladder_empty_kernel(out_ptr):
        """One int32 per program (its linear id): the launch and drain of the grid."""
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(out_ptr + pid, pid)

    @triton.jit
    def _ladder_read_kernel(words_ptr, absmax_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr,
                            BLOCKSIZE: tl.constexpr):
        """out[s, n] = xor of row n's words in K range s, xor the sum of their absmax bytes."""
        words = _tile_words(words_ptr, N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        index, ok = _tile_blocks(N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        absmax = tl.load(absmax_ptr + index, mask=ok, other=0).to(tl.int32)
        fold = tl.xor_sum(words, axis=2) ^ tl.sum(absmax, axis=1)[None, :]
        _store_rows(out_ptr, fold, N, BLOCK_N)

    @triton.jit
    def _ladder_read_scale_kernel(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, out_ptr, N, K, offset,
                                  BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                                  NESTED: tl.constexpr):
        """out[s, n] = xor of row n's words in K range s, xor the fp32 bits of the sum of their blocks'
        decoded absmax (the double-quant chain)."""
        words = _tile_words(words_ptr, N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        index, ok = _tile_blocks(N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        scale = _nf4_block_absmax(index, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, True, NESTED)
        scale = tl.where(ok, scale, 0.0)
        fold = tl.xor_sum(words, axis=2) ^ tl.sum(scale, axis=1).to(tl.int32, bitcast=True)[None, :]
        _store_rows(out_ptr, fold, N, BLOCK_N)

    @triton.jit
    def _ladder_decode_kernel(words_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, planes_ptr, out_ptr, N, K,
                              offset, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                              NESTED: tl.constexpr, ASM: tl.constexpr):
        """out[s, n] = sum over row n's blocks in K range s of absmax * the sum of the block's codes
        (rounded to bf16 by the register decode): the gemv's work without x."""
        WORDS: tl.constexpr = BLOCKSIZE // 8
        SPAN: tl.constexpr = BLOCKS * WORDS
        words = _tile_words(words_ptr, N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        index, ok = _tile_blocks(N, K, BLOCK_N, BLOCKS, BLOCKSIZE)
        scale = _nf4_block_absmax(index, ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, True, NESTED)
        scale = tl.where(ok, scale, 0.0)  # masked words decode to code 0 (-1.0): their blocks count 0
        p01, p23, p45, p67 = _nf4_word_bf16(words, planes_ptr, ASM)
        acc = tl.zeros((1, BLOCK_N, SPAN), dtype=tl.float32)
        for i in tl.static_range(4):
            first, second = _bf16_pair_values(p01 if i == 0 else p23 if i == 1 else p45 if i == 2 else p67)
            acc += first
            acc += second
        y = tl.sum(tl.sum(tl.reshape(acc, (1, BLOCK_N, BLOCKS, WORDS)), axis=3) * scale[None, :, :], axis=2)
        _store_rows(out_ptr, y, N, BLOCK_N)

    globals().update(_tile_words=_tile_words, _tile_blocks=_tile_blocks, _store_rows=_store_rows)
    kernels = (_ladder_empty_kernel, _ladder_read_kernel, _ladder_read_scale_kernel, _ladder_decode_kernel)
    _KERNELS.update(zip(KERNEL_NAMES, kernels))
    _KERNELS.update(zip(LADDER[:4], kernels))
    return _KERNELS


@dataclasses.dataclass(frozen=True)
class Tiles:
    """The gemv's launch for one shape: rows of W and NF4 blocks per program, the grid, the config."""

    block_n: int
    blocks: int
    tiles: int  # row tiles (grid axis 0)
    split: int  # K ranges (grid axis 1)
    config: object  # the GemvConfig the gemv rungs run with (block_n, blocks set)
    source: str  # "tuned", "heuristic" or "--tiles"


def ladder_tiles(n: int, k: int, device, dtype, override: tuple[int, int] | None = None,
                 table: str | None = None) -> Tiles:
    """The tiles ``nf4_gemv_forward`` takes at M = 1 for an (n, k) weight on ``device`` (the tuning file's,
    else ``gemv_tile``'s), or ``override`` (block_n, blocks) with the tuned config's warps; the gemv
    rungs' code lookup is the tuned config's unless ``table`` names one. The ladder takes one K range per
    program apart, so a tuned ``steps`` is set back to 1 (every rung, the gemv's included, runs the same
    grid)."""
    from bezoar_kernels import nf4_matmul as mm
    from bezoar_kernels.launch import cdiv

    cfg = mm._tuned_gemv_config(1, device, dtype)
    block_n, blocks = mm.gemv_tile(1, BLOCKSIZE, k // BLOCKSIZE)
    source = "tuned" if cfg.block_n or cfg.blocks else "heuristic"
    block_n, blocks = cfg.block_n or block_n, cfg.blocks or blocks
    if override:
        block_n, blocks = override
        source = "--tiles"
    cfg = dataclasses.replace(cfg, block_n=block_n, blocks=blocks, table=table or cfg.table, steps=1)
    return Tiles(block_n, blocks, cdiv(n, block_n), cdiv(k // BLOCKSIZE, blocks), cfg, source)


def whole_k_config(t: Tiles, k: int):
    """A GemvConfig with one K range per program: blocks = all of K's (a power of two), rows of W cut so
    a program holds about as many words as the ladder's, warps raised where it still holds more."""
    from bezoar_kernels.launch import next_power_of_2

    blocks = next_power_of_2(k // BLOCKSIZE)
    block_n = max(1, (t.block_n * t.blocks) // blocks)
    block_n = 1 << (block_n.bit_length() - 1)  # a power of two, rounded down
    warps = min(16, t.config.num_warps * max(1, (block_n * blocks) // (t.block_n * t.blocks)))
    return dataclasses.replace(t.config, block_n=block_n, blocks=blocks, num_warps=warps)


def rung_output(rung: str, q, t: Tiles):
    """A buffer for ``rung``'s results: int32 per program (empty), per (K range, row) (read, read_scale),
    fp32 per (K range, row) (decode) or per (K range, row of x, row) (gemv_nosplit_sum)."""
    import torch

    n = q.shape[0]
    if rung == "empty":
        return torch.empty(t.tiles * t.split, dtype=torch.int32, device=q.device)
    if rung in ("read", "read_scale"):
        return torch.empty((t.split, n), dtype=torch.int32, device=q.device)
    if rung == "decode":
        return torch.empty((t.split, n), dtype=torch.float32, device=q.device)
    if rung == "gemv_nosplit_sum":
        return torch.empty((t.split, 1, n), dtype=torch.float32, device=q.device)
    raise ValueError(f"no ladder kernel for {rung!r} (kernels: {', '.join(LADDER[:5])})")


def launch(rung: str, q, t: Tiles, out, x=None):
    """Run ``rung``'s kernel on the NF4 weight ``q`` (double quant, K a multiple of 64) at tiles ``t``
    into ``out`` (``rung_output``); x (1, K) for gemv_nosplit_sum. Returns out."""
    import torch

    from bezoar_kernels import nf4_matmul as mm
    from bezoar_kernels.nf4 import NESTED_BLOCKSIZE, nf4_code_planes, register_decode_asm

    n, k = q.shape
    grid = (t.tiles, t.split)
    launch_opts = dict(num_warps=t.config.num_warps, num_stages=t.config.num_stages, enable_fp_fusion=True)
    words = q.packed.view(torch.int32)
    if rung == "empty":
        _kernels()["empty"][grid](out, **launch_opts)
    elif rung == "read":
        _kernels()["read"][grid](words, q.absmax, out, n, k, BLOCK_N=t.block_n, BLOCKS=t.blocks,
                                 BLOCKSIZE=q.blocksize, **launch_opts)
    elif rung == "read_scale":
        _kernels()["read_scale"][grid](words, q.absmax, q.nested_absmax, q.nested_code, out, n, k, q.offset,
                                       BLOCK_N=t.block_n, BLOCKS=t.blocks, BLOCKSIZE=q.blocksize,
                                       NESTED=NESTED_BLOCKSIZE, **launch_opts)
    elif rung == "decode":
        _kernels()["decode"][grid](words, q.absmax, q.nested_absmax, q.nested_code, nf4_code_planes(q.device), out,
                                   n, k, q.offset, BLOCK_N=t.block_n, BLOCKS=t.blocks, BLOCKSIZE=q.blocksize,
                                   NESTED=NESTED_BLOCKSIZE, ASM=register_decode_asm(q.device), **launch_opts)
    elif rung == "gemv_nosplit_sum":
        # the launcher's arguments for the same tiles (nf4_gemv_forward), with the partials left unsummed
        cfg = t.config
        mm._nf4_gemv_kernel[grid](
            x, words, q.absmax, q.nested_absmax, q.nested_code, mm._gemv_table(cfg.table, x.device), out,
            out, out, 1, n, k, q.offset, x.stride(0), out.stride(0), out.stride(1), 0,
            BLOCKSIZE=q.blocksize, DOUBLE_QUANT=True, NESTED=NESTED_BLOCKSIZE, BLOCK_M=1, BLOCK_N=t.block_n,
            BLOCKS=t.blocks, SPLIT=False, TABLE=cfg.table, ASM=cfg.table == "prmt" and register_decode_asm(x.device),
            X_PAIRS=mm.gemv_x_pairs(cfg.table, x), BLOCK_SCALE=mm.gemv_block_scale(cfg.table, 1),
            PDL=False, STEPS=1,
            **launch_opts)
    else:
        raise ValueError(f"no ladder kernel for {rung!r} (kernels: {', '.join(LADDER[:5])})")
    return out


# ----------------------------------------------------------------------------- torch references


def _by_range(values, t: Tiles):
    """(N, blocks a row) per-block values -> their sums over each K range's blocks, (split, N); the last
    range padded with zeros (its masked blocks)."""
    import torch

    n, per_row = values.shape
    padded = torch.nn.functional.pad(values, (0, t.split * t.blocks - per_row))
    return padded.view(n, t.split, t.blocks).sum(dim=2).t().contiguous()


def _words_xor(q, t: Tiles):
    """(split, N) int32: the xor of each row's packed words in each K range."""
    import numpy as np
    import torch

    n, k = q.shape
    words = q.packed.view(torch.int32).view(n, k // q.blocksize, q.blocksize // 8).cpu().numpy()
    per_block = np.bitwise_xor.reduce(words, axis=2)
    pad = t.split * t.blocks - k // q.blocksize
    per_range = np.bitwise_xor.reduce(np.pad(per_block, ((0, 0), (0, pad))).reshape(n, t.split, t.blocks), axis=2)
    return torch.from_numpy(np.ascontiguousarray(per_range.T))


def expected_read(q, t: Tiles):
    """``read``'s output in torch: (split, N) int32, the xor of each row's words in each K range xor the
    sum of their absmax bytes."""
    import torch

    n, k = q.shape
    absmax = q.absmax.to(torch.int32).view(n, k // q.blocksize).cpu()
    return _words_xor(q, t) ^ _by_range(absmax, t).to(torch.int32)


def expected_scale_sums(q, t: Tiles):
    """(split, N) fp32: the sum of each row's decoded absmax in each K range."""
    from bezoar_kernels.nf4 import decode_absmax

    n, k = q.shape
    return _by_range(decode_absmax(q).float().view(n, k // q.blocksize).cpu(), t)


def read_scale_sums(out, q, t: Tiles):
    """The fp32 scale sums in ``read_scale``'s output (the words' xor taken back out)."""
    import torch

    return (out.cpu() ^ _words_xor(q, t)).view(torch.float32)


def expected_decode(q, t: Tiles):
    """``decode``'s output in torch: (split, N) fp32, per K range the sum over blocks of absmax times the
    sum of the block's codes rounded to bf16."""
    import torch

    from bezoar_kernels.nf4 import decode_absmax, nf4_code

    n, k = q.shape
    per_row = k // q.blocksize
    codes = nf4_code("cpu").to(torch.bfloat16).float()
    packed = q.packed.cpu()
    index = torch.stack([packed >> 4, packed & 15], dim=1).reshape(n, per_row, q.blocksize).long()
    absmax = decode_absmax(q).float().view(n, per_row).cpu()
    return _by_range(codes[index].sum(dim=2) * absmax, t)


def check_rung(rung: str, q, t: Tiles, out, x=None) -> float:
    """How far ``rung``'s output ``out`` is from torch's: 0 for the exact folds, the largest error over the
    largest |value| for the sums; raises ArithmeticError past the tolerance."""
    import torch

    if rung == "empty":
        want = torch.arange(t.tiles * t.split, dtype=torch.int32)
        bad = int((out.cpu() != want).sum())
        if bad:
            raise ArithmeticError(f"empty: {bad} programs stored another value than their id")
        return 0.0
    if rung == "read":
        bad = int((out.cpu() != expected_read(q, t)).sum())
        if bad:
            raise ArithmeticError(f"read: {bad} of {out.numel()} folds differ from torch's")
        return 0.0
    if rung == "read_scale":
        got, want, tol = read_scale_sums(out, q, t), expected_scale_sums(q, t), 1e-5
    elif rung == "decode":
        got, want, tol = out.cpu(), expected_decode(q, t), 1e-4
    elif rung == "gemv_nosplit_sum":
        from bezoar_kernels import nf4_matmul as mm

        got = out.sum(dim=0).float().cpu()
        want = mm.nf4_gemv_forward(x, q, t.config).float().cpu()
        tol = 2e-2 if x.dtype != torch.float32 else 1e-4  # the gemv rounds its result to x's dtype
    else:
        raise ValueError(f"no check for {rung!r}")
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
    if not err <= tol:
        raise ArithmeticError(f"{rung}: differs from torch by {err:.3g} of its largest |value| (tolerance {tol:g})")
    return err


def check_whole_k(x, q, config, whole) -> float:
    """How far the gemv with one K range per program (``whole``) is from the gemv at ``config``, over the
    largest |value|; raises ArithmeticError past the rounding of x's dtype."""
    from bezoar_kernels import nf4_matmul as mm

    got = mm.nf4_gemv_forward(x, q, whole).float()
    want = mm.nf4_gemv_forward(x, q, config).float()
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))
    if not err <= 2e-2:
        raise ArithmeticError(f"gemv_whole_k: differs from the split gemv by {err:.3g} of its largest |value|")
    return err


# ----------------------------------------------------------------------------- the run


def main(argv=None) -> int:
    from bezoar_kernels.tuning import GEMV_TABLES  # no triton: the interpreter is chosen below

    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK of the weights")
    p.add_argument("--tiles", default=None, metavar="BLOCK_NxBLOCKS",
                   help="rows of W and NF4 blocks per program for every rung (default: the tuned gemv tiles, else "
                        "the heuristic's)")
    p.add_argument("--table", choices=GEMV_TABLES, default=None,
                   help="the gemv rungs' code lookup (default: the tuned config's; the ladder's decode is always prmt)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds through every case (the fastest is kept)")
    p.add_argument("--rep", type=int, default=100, help="milliseconds do_bench replays each case for")
    p.add_argument("--warmup", type=int, default=25, help="milliseconds of do_bench warm-up per case")
    p.add_argument("--budget", type=float, default=0.0, help="seconds; no shape starts after it (0: none)")
    args = p.parse_args(argv)
    common.setup_smoke(args)
    shapes = common.int_pairs(args.shapes, "--shapes", p)
    override = common.int_pairs(args.tiles, "--tiles", p, count=1)[0] if args.tiles else None
    if override and any(v & (v - 1) for v in override):
        p.error(f"--tiles {args.tiles!r}: BLOCK_N and BLOCKS must be powers of two")
    if bad := [f"{n}x{k}" for n, k in shapes if k % BLOCKSIZE]:
        p.error(f"--shapes: K must be a multiple of the blocksize {BLOCKSIZE} (the gemv's), not in {', '.join(bad)}")
    for flag, value in (("--rounds", args.rounds), ("--rep", args.rep), ("--warmup", args.warmup)):
        if value < 1:
            p.error(f"{flag} {value}: expected a whole number >= 1")
    if args.iters < 0:
        p.error(f"--iters {args.iters}: expected a whole number >= 0")
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/gemv_ladder.py needs a CUDA GPU (use --smoke to check the code path on CPU)", file=sys.stderr)
        return 2
    if args.smoke:
        shapes = SMOKE_SHAPES if args.shapes == p.get_default("shapes") else shapes
        override = override or SMOKE_TILES
        table = args.table or "prmt"  # as the H100's tuned tiles have it (the CPU has no tuning entry)
    else:
        table = args.table
    from bezoar_kernels import nf4, nf4_matmul as mm
    from bezoar_kernels.dispatch import backend

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16  # the interpreter runs the gemv's bf16 x (no tl.dot in it), and CPU matmul takes bf16
    copies = WEIGHT_COPIES if cuda else 1
    gen = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    if args.smoke:
        print("smoke: the Triton interpreter on CPU, wall-clock times of single calls (no graph timing without a "
              "GPU; 'cublas' is torch.matmul on the CPU): the numbers say only that each rung runs")

    def timer(fn):
        if cuda:
            return common.graph_ms(fn, args.warmup, args.rep, calls=GRAPH_CALLS)
        return common.bench_ms(fn, smoke=True)

    rows, configs, failed, cut = [], {}, [], False
    copy_gbs = {}
    for n, k in shapes:
        if args.budget and time.perf_counter() - started > args.budget:
            cut = True
            break
        tag = f"{n}x{k}"
        if args.only and not args.only.endswith("/" + tag):
            continue
        t = ladder_tiles(n, k, device, dtype, override, table)
        whole = whole_k_config(t, k)
        qs, ws = [], []
        for _ in range(copies):
            w = torch.randn(n, k, generator=gen, device=device) * 0.02
            qs.append(nf4.quantize_nf4_triton(w, BLOCKSIZE, True) if cuda else nf4.quantize_nf4_reference(w, BLOCKSIZE))
            ws.append(nf4.dequantize_nf4_reference(qs[-1], dtype))
            del w
        x = (torch.randn(1, k, generator=gen, device=device)).to(dtype)
        nbytes = qs[0].nbytes()
        srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device) for _ in range(copies)]
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        outs = {rung: [rung_output(rung, q, t) for q in qs] for rung in LADDER[:5]}

        def cycled(items):
            it = itertools.cycle(items)
            return lambda: next(it)

        def ladder_fn(rung):
            nxt = cycled(list(zip(qs, outs[rung])))

            def call():
                q, out = nxt()
                return launch(rung, q, t, out, x)
            return call

        cases = {rung: ladder_fn(rung) for rung in LADDER[:5]}
        nq, nw, ns = cycled(qs), cycled(ws), cycled(srcs)
        cases["gemv"] = lambda: mm.nf4_gemv_forward(x, nq(), t.config)
        cases["gemv_whole_k"] = lambda: mm.nf4_gemv_forward(x, nq(), whole)
        cases["cublas"] = lambda: torch.matmul(x, nw().t())
        cases["copy"] = lambda: dst.copy_(ns())
        q0 = qs[0]
        read_bytes = q0.packed.numel() + q0.absmax.numel()
        x_bytes = k * x.element_size()
        bytes_of = {"empty": 0, "read": read_bytes, "read_scale": nbytes, "decode": nbytes,
                    "gemv_nosplit_sum": nbytes + x_bytes, "gemv": nbytes + x_bytes, "gemv_whole_k": nbytes + x_bytes,
                    "cublas": n * k * 2 + x_bytes, "copy": nbytes}
        configs[tag] = {"block_n": t.block_n, "blocks": t.blocks, "row_tiles": t.tiles, "k_ranges": t.split,
                        "programs": t.tiles * t.split, "num_warps": t.config.num_warps, "table": t.config.table,
                        "source": t.source,
                        "whole_k": {"block_n": whole.block_n, "blocks": whole.blocks, "num_warps": whole.num_warps,
                                    "programs": -(-n // whole.block_n)}}
        print(f"{tag}: {t.tiles} x {t.split} programs of {t.block_n} rows x {t.blocks} blocks ({t.source} tiles, "
              f"{t.config.num_warps} warps, gemv table {t.config.table}); gemv_whole_k {whole.block_n} rows x "
              f"{whole.blocks} blocks, {whole.num_warps} warps", flush=True)

        if args.only:
            rung = args.only.rsplit("/", 1)[0]
            if rung not in cases:
                break
            with backend("triton"), common.maybe_profile(args.profile):
                if args.iters:
                    common.run_plain(cases[rung], args.iters)
                    print(f"{args.only}: ran {args.iters} times")
                else:
                    print(f"{args.only}: {timer(cases[rung]) * 1e3:.2f} us")
            return 0

        errors, checks = {}, {}
        with backend("triton"):
            for rung in LADDER[:5]:  # each kernel checked against torch before it is timed
                try:
                    checks[rung] = check_rung(rung, q0, t, launch(rung, q0, t, outs[rung][0], x), x)
                except Exception as exc:
                    errors[rung] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"{tag} {rung}: failed its check ({errors[rung]}); not timed", flush=True)
            try:  # one K range per program sums the same products as the split gemv
                checks["gemv_whole_k"] = check_whole_k(x, q0, t.config, whole)
            except Exception as exc:
                errors["gemv_whole_k"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"{tag} gemv_whole_k: failed its check ({errors['gemv_whole_k']}); not timed", flush=True)
        best = {}
        with backend("triton"), common.maybe_profile(args.profile):
            for _ in range(1 if args.smoke else args.rounds):
                for rung, fn in cases.items():
                    if rung in errors:
                        continue
                    try:
                        best[rung] = min(best.get(rung, float("inf")), timer(fn))
                    except Exception as exc:  # one failing rung must not hide the others' numbers
                        errors[rung] = f"{type(exc).__name__}: {str(exc)[:300]}"
                        print(f"{tag} {rung}: failed ({errors[rung]})", flush=True)
        copy_gbs[tag] = bytes_of["copy"] / best["copy"] / 1e6 if "copy" in best else None
        for rung in CASES:
            ms = best.get(rung)
            below = BELOW.get(rung)
            row = {"shape": tag, "rung": rung, "us": ms * 1e3 if ms else None, "bytes": bytes_of[rung],
                   "GB/s": bytes_of[rung] / ms / 1e6 if ms and bytes_of[rung] else None, "below": below,
                   "piece_us": (ms - best[below]) * 1e3 if ms and below in best else None,
                   "at_copy_us": bytes_of[rung] / copy_gbs[tag] / 1e3 if copy_gbs[tag] else None,
                   "over_cublas": ms / best["cublas"] if ms and "cublas" in best else None}
            if rung in checks:
                row["check_err"] = checks[rung]
            if rung in errors:
                row["error"] = errors[rung]
                failed.append(f"{rung}/{tag}")
            rows.append(row)
            if ms:
                piece = f", {row['piece_us']:+.2f} us over {below}" if row["piece_us"] is not None else ""
                print(f"{tag} {rung}: {row['us']:.2f} us{piece}", flush=True)
        extra = {"dtype": str(dtype), "timing": "graph" if cuda else "smoke",
                 "graph_calls": GRAPH_CALLS if cuda else None, "weight_copies": copies,
                 "rounds": 1 if args.smoke else args.rounds, "configs": configs, "copy_GBps": copy_gbs,
                 "complete": False, "cut_by_budget": False}
        common.write_results("gemv-ladder", rows, args, extra)  # after every shape: a call cut short keeps it
        del qs, ws, srcs, outs, cases

    if args.only:
        print(f"no case {args.only!r} (names: rung/NxK, rungs: {', '.join(CASES)}; e.g. decode/3200x3200)",
              file=sys.stderr)
        return 2
    print()
    print(common.markdown_table(rows, ["shape", "rung", "us", "piece_us", "below", "bytes", "GB/s", "at_copy_us",
                                       "over_cublas"]))
    if cut:
        print(f"note: --budget {args.budget:g} s reached; the shapes after it were not run")
    if rows:
        extra.update(complete=not cut, cut_by_budget=cut)
        common.write_results("gemv-ladder", rows, args, extra)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
