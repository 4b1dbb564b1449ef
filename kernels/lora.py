"""Fused LoRA linear: ``y = x @ W.T + s * (dropout(x) @ A.T) @ B.T`` on a frozen NF4 or dense base.

Shapes: x (M, K) after flattening leading dims, W (N, K) frozen (an ``NF4Weight`` or a dense
bf16/fp16/fp32 tensor), A (r, K), B (N, r), s the LoRA scaling. Gradients: dx, dA, dB (no dW).

Forward, in two launches::

    xa = dropout(x) @ A.T                         (M, r)   "down":  reads x once, writes M*r
    y  = x @ W.T + s * xa @ B.T                   (M, N)   base GEMM whose epilogue adds the LoRA term

The LoRA term costs the base GEMM 2*M*N*r extra FLOPs in its epilogue (r/K of the base: 0.5% at
r=16, K=3200) and reads xa (M x r) and a B tile (r x BLOCK_N) per output tile. Nothing of size
(M, N) is written besides y, and dropout(x) is never materialized: the mask is a counter-based
hash of (seed, row, column), recomputed wherever it is needed (down, dx, dA) and never stored.

Backward, with g = s * dy @ B (M, r)::

    g  = s * dy @ B                               "g":     reads dy once
    dB = s * dy.T @ xa                            "dB":    reads dy once more, fp32 partial sums over row splits
    dx = dy @ W + (g @ A) * mask / (1 - p)        base GEMM (dy @ W) whose epilogue adds the masked LoRA term
    dA = g.T @ dropout(x)                         "dA":    reads x once, fp32 partial sums over row splits

On the paths whose base product is cuBLAS's (``cublas``, ``concat``) the dx epilogue and dA are one
launch ("dx_da"): it reads the base product, x and g once per tile and computes each element's
dropout mask once for both.

Why this split (OpenLLaMA 3B q_proj, M = 16384, N = K = 3200, bf16, H100): the base GEMM is
2*M*N*K = 336 GFLOP (about 0.45 ms); one pass over an (M, K) activation is 105 MB (about
0.04 ms). Computing xa inside the base GEMM would redo x @ A.T for every column tile (r/BLOCK_N
more tensor-core work: 12% at r=16, 50% at r=64), more than the one extra pass the "down" launch
costs. The same holds for g inside the dx GEMM. g and dB both reduce dy, over different axes;
one pass computing both ("g_db") keeps dB's fp32 partials per block of rows, Ncat * r values for
every 256 rows: at r = 16 that is an eighth of what the second pass over dy reads, at r = 64 half,
and written and summed it costs as much. So from M = 1024 and r <= 32 (padded) one launch reads dy
once for both; otherwise two lean passes do. The LoRA path thus adds three or four activation
passes (x for down, dy once or twice, x for dA), about 10% of the base GEMMs' time at these
shapes, and no (M, N) intermediate. PEFT's separate ops make many more: the dropout output and
its mask, the lora_B output, its scaled copy and the sum are each written and read again, and
their gradients likewise in the backward.

The base GEMM runs on one of six paths (``path``, chosen by M when "auto"):

* ``merged`` (no dropout: evaluation, or training with dropout 0; NF4 W with K a multiple of the
  blocksize): without a mask, x @ W.T + s * (x @ A.T) @ B.T = x @ (W + s * B @ A).T, and likewise
  dy @ W + s * (dy @ B) @ A = dy @ (W + s * B @ A). One kernel writes the merged weight while it
  dequantizes W (the rank-r product per tile on tensor cores, fp32, rounded once), and both GEMMs
  are cuBLAS's with nothing after them: no pass over y or dx at all. xa and g come out of those
  GEMMs too: in the forward A_j's rows sit below W' (x @ A_j.T = xa without a mask, P * r16 more
  output columns), in the backward s_j B_j's columns beside it (dy @ [W' | s B] holds g after column
  K, as on ``concat``). What is left over the base is dA (a pass over x) and dB (a pass over dy):
  1 + N/K activation passes, against 4 + 4 N/K on ``cublas``. The xa columns are copied out (M x P r,
  small) so that saving xa does not keep y's storage alive; dx comes back as a strided view of the
  wide product (the model's kernels take row strides). "auto" takes it whenever it can: it does
  strictly less work than ``cublas``. The merged weight rounds W + s * B @ A
  to the dtype once, the error the dequantized W already has, where the other paths round the
  LoRA term on its own. On an H100 (2026-11-27) the merge kernel took 1.6x the dequantize alone in
  kernel time (17.9 us a call at 3200x3200, r = 16, against 11.0 us; bench/lora.py --sweep-merge, whose
  figures also count s B's copy beside W and a graph launch, read 1.7-2.0x over its cases), and
  ``merged`` ran 1.07-1.19x NF4 alone forward + backward at r = 16 (graph replay; bench/README.md).

* ``gemv`` (inference at M up to the NF4 gemv threshold: decoding with an adapter): the NF4 gemv
  kernel writes each x @ W_j.T into y, then the down launch and the epilogue launch add the LoRA
  term in place; no W is dequantized. Forward only, without dropout: "auto" takes it only when
  nothing needs a gradient and the weights are NF4 that the gemv kernel takes, else the next rule.
  Above the gemv threshold and up to the NF4 matmul's fused one (``nf4_matmul.fused_max_m``: 16 on
  both GPUs measured), the same inference call runs the NF4 fused forward (the register decode) for
  each x @ W_j.T and the same two LoRA launches ("auto" only; the plan's path reads ``small``): batched
  decoding and evaluation with an adapter, where ``merged`` would write every merged W for a few rows.
  On an H200 (2026-11-28) the fused forward took 14.4-21.7 us at M = 16 where dequantize + cuBLAS took
  19.8-43.9 us, and the merge alone costs 1.6x the dequantize.

* ``fused``: one Triton kernel decodes NF4 tiles inside the K loop (0.5 byte per weight read),
  for small M where the product is memory-bound (decoding, evaluation); a dense W is read as is.
  Small grids split the reduction into fp32 partials (split 0 carries the LoRA term).
* ``dequant``: the Triton dequantize kernel writes W into a reused buffer, then the Triton
  dense GEMM with the LoRA epilogue runs on it.
* ``concat``: the LoRA term rides in the base GEMM's reduction. W_j is dequantized into the first K columns of a wider (Ncat, K + P * r16) buffer whose
  column block j holds s_j * B_j for projection j's rows and zeros elsewhere (r16: r rounded up to
  16), and x into the first K columns of an (M, K + P * r16) copy that holds xa_j in block j. One cuBLAS GEMM
  then gives every y_j = x @ W_j.T + s_j * xa_j @ B_j.T with no pass over y: the cost moves from a
  read and write of y (M x Ncat) to a write of x (M x K), which pays when Ncat > K / 2 (q/k/v fused,
  gate and up; not down). The backward multiplies dy by the same wide matrix: sum_j dy_j @ [W_j |
  .. s_j B_j ..] holds dy @ W in its first K columns and g_j = s_j * dy_j @ B_j in column block j, so
  the pass over dy for g is not made; the dx epilogue reads the base product from there and writes a
  contiguous dx (the wide product and dx are both alive for that pass: one activation of (M, K)
  more than ``cublas``, which works in place). The forward may round its P * r16 columns up with
  zeros (``concat_align``, 16 by default: none added); the backward's product keeps P * r16. Needs K
  a multiple of the blocksize for NF4 (the strided dequantize).
* ``tma`` (``bezoar_kernels.lora_tma``): W dequantized into the buffer as on ``cublas``, then
  persistent Triton GEMMs fed by tensor descriptors (TMA on sm_90) with the LoRA terms in their
  epilogues: the forward adds xa @ (s B).T per tile, the backward adds the masked g @ A to each dx
  tile and, from the same mask and a tile of x, its dA contribution. Left over the two GEMMs: the
  down pass over x and the pass over dy for g and dB (two passes at r > 32). Needs rows of 16 bytes' multiples (K and sum N_j multiples of 8 in 16-bit
  dtypes); untimed, so "auto" takes it only where a tuning entry or ``BEZOAR_LORA_LARGE_M_PATH`` says.
* ``cublas`` (what "auto" takes for large M with dropout): W dequantized into the buffer, the base
  product by cuBLAS, then the forward kernel adds the LoRA term in place over y and the backward's
  "dx_da" launch adds it over dx while it reduces dA: one extra read and write of y and of dx. It
  trades the fused epilogue for cuBLAS's GEMM, and on an H200 cuBLAS's GEMM won by more than the
  extra pass costs (``LARGE_M_PATH`` gives the figures). A device's tuning entry (``tuning.py``,
  written by bench/tune.py from bench/lora.py) or ``BEZOAR_LORA_LARGE_M_PATH`` picks another.

Where x is an RMSNorm's output (q/k/v, gate/up) and dropout is on, ``bezoar_kernels.norm_lora`` runs
the norm and these projections as one computation on the ``concat`` layout: the masked down
product and the wide operand come out of the norm's kernel, and the masked dx term goes into the
norm's backward (what that saves depends on L2: its module docstring counts it).
``bezoar_kernels.swiglu_lora`` does the same for down_proj, whose x is SwiGLU's output; there each
kernel is one pass, and only dA and dB are left over SwiGLU + the NF4 projection.

Fused q/k/v (``lora_qkv``): three projections in each launch. The down and dA launches read a
tile of x once from DRAM for the three (the three programs of one tile run side by side and
share it through L2), the forward GEMM walks the column tiles of q, k and v over the same rows
of x (grouped launch order keeps x in L2), and the dx GEMM sums the three products in one
accumulator, so dx is written once. Each projection has its own dropout mask (its own seed), as
PEFT's three dropout modules would. q, k, v come back as column slices of one (M, Nq+Nk+Nv)
buffer; the rotary and attention kernels take such strided views as they are.

Dropout: columns k = 2i and 2i + 1 of row m share one 32-bit hash h = hash(hash(seed ^ m) ^ i);
element (m, 2i) is kept when the high 16 bits of h are >= round(p * 2**16), element (m, 2i + 1)
when the low 16 bits are. ``hash`` is a 32-bit integer mixer (xor-shift / multiply rounds),
computed in uint32 by the kernels and in int64 (masked to 32 bits) by ``lora_dropout_mask``, so
the torch reference reproduces the kernels' mask bit for bit. Kept elements are scaled by
1 / (1 - p). One hash per two elements because the mask, not the memory traffic, bounds the
launches that apply it: in the sm_90 SASS of the dA launch (bench/sass.py lora_da, triton 3.9) the
main loop had ~19 instructions per element with a hash per element and x * scale in fp32, ~12 with a
hash per pair and a select of x (~15 with triton 3.6), against ~3 without dropout; at ~12 its integer work is still about as long
as its loads at HBM speed (an estimate from the counts and the SM issue rate, not a timing). 16 bits resolve p to 1/65536 (0.05 becomes 0.050003).

Precision: the compute dtype is x's dtype. A and B (fp32 master weights) are cast to it, as
autocast does for PEFT; products accumulate in fp32; xa and g are rounded to the compute dtype
(as the reference's matmul outputs are); dA and dB accumulate in fp32 and come back in the dtype
of A and B. dropout(x) is never rounded: the kernels multiply the kept elements of x and scale the
fp32 product by 1 / (1 - p) once, where the reference rounds x * mask to the dtype per element. The reference (``lora_linear_reference``) is PEFT's arithmetic: separate matmuls,
the dropout mask applied to x, autograd for the backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable
import torch.nn.functional as F

from bezoar_kernels import dequant_cache, dispatch, tuning
from bezoar_kernels.launch import (capability, cdiv, launch_fitting, next_power_of_2, resident_programs, shared_per_block,
                                   sm_count, wave_splits)
from bezoar_kernels.nf4 import (
    NESTED_BLOCKSIZE,
    NF4Weight,
    dequantize_nf4_reference,
    _int32_words,
    dequantize_nf4_triton,
    nf4_byte_table,
    nf4_code,
)
from bezoar_kernels.nf4_matmul import _threshold, gemv_max_m, gemv_supported, nf4_gemv_forward, nf4_matmul_forward
from bezoar_kernels.nf4_matmul import fused_max_m as nf4_fused_max_m

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

PATHS = ("auto", "fused", "dequant", "cublas", "concat", "gemv", "merged", "tma")
# What "auto" takes above the fused threshold; env BEZOAR_LORA_LARGE_M_PATH. bench/lora.py on an H200
# (2026-11-26, bench/results/lora-NVIDIA_H200-2026-11-26.json), forward + backward as CUDA-graph replays
# (GPU time): cuBLAS for the base product plus the LoRA epilogue pass took 1.18-1.55x NF4 alone on all 12
# cases (3B shapes, M 4096/16384, r 16/64), the Triton dense GEMM with the fused epilogue 1.55-1.99x.
# An H100 run of the same cases with "concat" beside it (2026-11-26, the second session's
# lora-NVIDIA_H100_80GB_HBM3 file) measured concat 1.12-1.44x and cublas 1.18-1.54x (geometric means
# 1.264x and 1.301x): the H100's tuning entry takes concat; this default for GPUs without one stays
# cublas until concat has been timed on a second GPU model.
LARGE_M_PATH = "cublas"
# Largest M that "auto" sends to the fused NF4 + LoRA kernels; env BEZOAR_LORA_FUSED_MAX_M, tuning key
# lora.fused_max_m. 0: never. Until 2026-11-27 this followed nf4.fused_max_m, which has been 0 on every
# GPU measured (the table-decode fused kernels lost to dequant + cuBLAS at every M on an H100); that key
# now measures the NF4 forward's register decode, so this one stands apart until bench/lora.py times
# these kernels at small M.
FUSED_MAX_M = 0
MAX_KERNEL_RANK = 256  # larger ranks run the torch reference (register tiles of r columns)
_GENERAL_CHUNK = 64  # K chunk of the NF4 decode when K is not a multiple of the blocksize
_DROP_BITS = 16  # each element's 16 bits of its pair's hash are compared with p * 2**16

_BASE_NF4, _BASE_DENSE, _BASE_IN_OUT = 0, 1, 2  # the GEMM kernels' BASE switch


# ----------------------------------------------------------------------------- dropout mask (torch)

_MASK32 = 0xFFFFFFFF
_MIX_MUL1 = 0x7FEB352D
_MIX_MUL2 = 0x846CA68B


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 h in [0, 2**32), without overflowing int64."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _MASK32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """The 32-bit mixer of the kernels, on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _MIX_MUL1)
    h = h ^ (h >> 15)
    h = _mul32(h, _MIX_MUL2)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """An element is dropped when its 16 bits of the pair hash are below this."""
    return int(round(p * (1 << _DROP_BITS)))


def seed31(seed: int) -> int:
    """The 31 bits of a seed the mask uses (the kernels take it as an int32)."""
    return int(seed) & 0x7FFFFFFF


def lora_dropout_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """The kernels' dropout mask for an (rows, cols) input: fp32, 0 or 1 / (1 - p), from (seed, row, col)."""
    m = torch.arange(rows, dtype=torch.int64, device=device)
    k = torch.arange(cols, dtype=torch.int64, device=device)
    row_hash = _mix32(m ^ seed31(seed))
    h = _mix32(row_hash[:, None] ^ (k >> 1)[None, :])
    bits = torch.where((k & 1)[None, :] == 0, h >> _DROP_BITS, h & ((1 << _DROP_BITS) - 1))
    keep = bits >= dropout_threshold(p)
    return keep.to(torch.float32) * (1.0 / (1.0 - p))


# ----------------------------------------------------------------------------- arguments


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One LoRA pair: A (r, in), B (out, r) and the scaling s (alpha / r, or alpha / sqrt(r))."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def _check(x: torch.Tensor, weights: Sequence, adapters: Sequence[Adapter] | None, dropout_p: float,
           what: str) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{what}: x must be float16/bfloat16/float32, got {x.dtype}")
    k = x.shape[-1]
    dense = [isinstance(w, torch.Tensor) for w in weights]
    if any(dense) and not all(dense):
        raise ValueError(f"{what}: weights must be all NF4Weight or all dense tensors")
    for i, w in enumerate(weights):
        if not isinstance(w, (torch.Tensor, NF4Weight)):
            raise ValueError(f"{what}: weight {i} is a {type(w).__name__}; expected an NF4Weight or a tensor")
        shape = tuple(w.shape)
        if len(shape) != 2 or shape[1] != k:
            raise ValueError(f"{what}: weight {i} has shape {shape}, x's last dim {k} needs (out, {k})")
        if w.device != x.device:
            raise ValueError(f"{what}: x on {x.device}, weight {i} on {w.device}")
        if isinstance(w, torch.Tensor):
            if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"{what}: dense weight {i} must be float16/bfloat16/float32, got {w.dtype}")
            if w.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{what}: the base weight is frozen here (no dW); weight {i} requires grad")
    nf4 = [w for w in weights if isinstance(w, NF4Weight)]
    if nf4 and len({(w.blocksize, w.double_quant) for w in nf4}) > 1:
        raise ValueError(f"{what}: NF4 weights must share blocksize and double quantization")
    if adapters is None:
        return
    if len(adapters) != len(weights):
        raise ValueError(f"{what}: {len(weights)} weights but {len(adapters)} adapters")
    ranks = set()
    for i, ad in enumerate(adapters):
        a, b = ad.lora_a, ad.lora_b
        n = weights[i].shape[0]
        if a.dim() != 2 or a.shape[1] != k:
            raise ValueError(f"{what}: lora_A {i} has shape {tuple(a.shape)}, expected (r, {k})")
        if b.dim() != 2 or b.shape != (n, a.shape[0]):
            raise ValueError(f"{what}: lora_B {i} has shape {tuple(b.shape)}, expected ({n}, {a.shape[0]})")
        if a.device != x.device or b.device != x.device:
            raise ValueError(f"{what}: LoRA weights {i} on {a.device}/{b.device}, x on {x.device}")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise ValueError(f"{what}: LoRA weights {i} must be floating point")
        ranks.add(a.shape[0])
    if len(ranks) > 1:
        raise ValueError(f"{what}: the fused projections need one rank, got {sorted(ranks)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p}")


def fused_max_m(device=None) -> int:
    """The largest M that "auto" sends to the fused NF4 + LoRA kernels: ``BEZOAR_LORA_FUSED_MAX_M``, else
    the tuning file's ``lora.fused_max_m`` for ``device``, else ``FUSED_MAX_M``. Its own setting, not the
    NF4 matmul's ``nf4.fused_max_m``: that one is measured on the forward alone with the register decode,
    which these kernels (a table decode, and a fused backward) do not share."""
    return _threshold("BEZOAR_LORA_FUSED_MAX_M", "lora.fused_max_m", device, FUSED_MAX_M)


def large_m_path(device=None) -> str:
    """The path "auto" takes above the fused threshold: ``BEZOAR_LORA_LARGE_M_PATH``, else the tuning
    file's value for ``device`` (see ``tuning``), else ``LARGE_M_PATH``."""
    raw = os.environ.get("BEZOAR_LORA_LARGE_M_PATH", "").strip().lower()
    if not raw:
        return tuning.setting("lora.large_m_path", device) or LARGE_M_PATH
    allowed = [p for p in PATHS if p not in ("auto", "gemv", "merged")]
    if raw not in allowed:
        raise ValueError(f"BEZOAR_LORA_LARGE_M_PATH={raw!r}: expected one of {', '.join(allowed)}")
    return raw


# The concat forward's reduction runs over K + the LoRA columns: P * r16 of them, rounded up to a
# multiple of this (zeros past the LoRA blocks, on both operands). cuBLAS on H100 ran the reduction
# over 3200 + 64 columns 1.7-4.2% faster than over 3200 + 16 (bench/gemm_widths.py), while wider dx columns
# (the backward's product, which keeps P * r16) mostly cost more. A tuning entry ("lora.concat_align",
# from bench/lora.py --sweep-concat-align) or BEZOAR_LORA_CONCAT_ALIGN sets it; 16 adds no columns.
CONCAT_ALIGN = 16
CONCAT_ALIGNS = tuning.CONCAT_ALIGNS


def concat_align(device=None) -> int:
    """The multiple the concat forward's LoRA columns are rounded up to: ``BEZOAR_LORA_CONCAT_ALIGN`` (read
    at every call, so a benchmark can switch it), else ``device``'s tuning entry, else ``CONCAT_ALIGN``."""
    raw = os.environ.get("BEZOAR_LORA_CONCAT_ALIGN", "").strip()
    if not raw:
        return tuning.setting("lora.concat_align", device) or CONCAT_ALIGN
    if raw not in tuple(str(a) for a in CONCAT_ALIGNS):
        raise ValueError(f"BEZOAR_LORA_CONCAT_ALIGN={raw!r}: expected one of {', '.join(map(str, CONCAT_ALIGNS))}")
    return int(raw)


def resolve_path(path: str | None, m: int, has_lora: bool = True, device=None) -> str:
    """The concrete path for M rows: "fused", "dequant", "cublas", "concat", "tma" or "gemv" ("gemv" up to
    the NF4 gemv threshold; ``_apply`` falls back from it where the weights or autograd do not allow it).
    The thresholds are ``device``'s (see ``tuning``; None: the environment and built-in defaults only)."""
    path = path or "auto"
    if path not in PATHS:
        raise ValueError(f"lora path {path!r}: expected one of {', '.join(PATHS)}")
    if path != "auto":
        return path
    if 0 < m <= gemv_max_m(device):
        return "gemv"
    if m <= fused_max_m(device):
        return "fused"
    # Without an adapter there is no epilogue to fuse: the base product is cuBLAS's to do.
    return large_m_path(device) if has_lora else "cublas"


# ----------------------------------------------------------------------------- torch reference


def _dense_or_dequantized(weight, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(weight, NF4Weight):
        return dequantize_nf4_reference(weight, dtype)
    return weight.detach().to(dtype)


def _projections_reference(x, weights, adapters, dropout_p, training, seeds):
    outputs = []
    dtype = x.dtype
    k = x.shape[-1]
    for i, w in enumerate(weights):
        y = F.linear(x, _dense_or_dequantized(w, dtype))
        if adapters is not None:
            ad = adapters[i]
            h = x
            if training and dropout_p > 0:
                mask = lora_dropout_mask(seeds[i], x.numel() // k, k, dropout_p, x.device)
                h = (x.float() * mask.view(x.shape)).to(dtype)
            update = F.linear(F.linear(h, ad.lora_a.to(dtype)), ad.lora_b.to(dtype)) * ad.scaling
            y = y + update
        outputs.append(y)
    return tuple(outputs)


def lora_linear_reference(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                          dropout_p: float = 0.0, training: bool = False, seed: int = 0,
                          path: str | None = None) -> torch.Tensor:
    """Torch reference of ``lora_linear`` (PEFT's arithmetic; the mask from ``lora_dropout_mask``)."""
    adapters = [Adapter(lora_a, lora_b, float(scaling))]
    _check(x, [weight], adapters, dropout_p, "lora_linear")
    resolve_path(path, 0)
    return _projections_reference(x, [weight], adapters, dropout_p, training, [seed])[0]


def lora_qkv_reference(x: torch.Tensor, weights: Sequence, adapters: Sequence[Adapter] | None = None,
                       dropout_p: float = 0.0, training: bool = False, seeds: Sequence[int] = (0, 0, 0),
                       path: str | None = None) -> tuple[torch.Tensor, ...]:
    """Torch reference of ``lora_qkv``: each projection on its own, with its own seed."""
    _check_qkv_args(x, weights, adapters, dropout_p, seeds)
    resolve_path(path, 0)
    return _projections_reference(x, weights, adapters, dropout_p, training, seeds)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    from bezoar_kernels.nf4 import _nf4_block_absmax, _nf4_byte_values, _pack16
    from bezoar_kernels.nf4_matmul import _nf4_weight_halves

    @triton.jit
    def _pick3(j, a, b, c):
        """a, b or c for projection j (a select on scalars or pointers; static when j is constexpr)."""
        if j == 0:
            out = a
        elif j == 1:
            out = b
        else:
            out = c
        return out

    @triton.jit
    def _mix32_tl(h):
        h ^= h >> 16
        h *= 0x7FEB352D
        h ^= h >> 15
        h *= 0x846CA68B
        h ^= h >> 16
        return h

    @triton.jit
    def _dropout_keep_halves(rows, pair0, seed, threshold, PAIRS: tl.constexpr):
        """int1 (rows x PAIRS) twice: whether the mask keeps columns 2i and 2i + 1 for the column pairs
        i = pair0 .. pair0 + PAIRS - 1 (one 32-bit hash per pair: its high and low 16 bits)."""
        row_hash = _mix32_tl(rows.to(tl.uint32) ^ tl.cast(seed, tl.uint32))
        pairs = (pair0 + tl.arange(0, PAIRS)).to(tl.uint32)
        h = _mix32_tl(row_hash[:, None] ^ pairs[None, :])
        return (h >> 16).to(tl.int32) >= threshold, (h & 0xFFFF).to(tl.int32) >= threshold

    @triton.jit
    def _dropout_keep(rows, col0, seed, threshold, BLOCK: tl.constexpr):
        """int1 (rows x BLOCK) for columns col0 .. col0 + BLOCK - 1 (col0 even): where the mask keeps
        the element. Callers select x (or a product) in its own dtype and apply the 1 / (1 - p) scale
        once to an fp32 result, which keeps the per-element work to the hash and a select."""
        even, odd = _dropout_keep_halves(rows, col0 // 2, seed, threshold, BLOCK // 2)
        return tl.reshape(tl.join(even, odd), (rows.shape[0], BLOCK))

    @triton.jit
    def _wide_pad_zeros(row_ptrs, m_ok, start, PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        """Zeros into the PAD columns (a multiple of 16) from ``start`` of the rows at ``row_ptrs``
        (BLOCK_M, 1): the concat forward's columns past the LoRA blocks (``concat_align``), which both GEMM
        operands hold as zeros, 16 columns at a time."""
        offs = tl.arange(0, 16)
        for c in tl.static_range(0, PAD, 16):
            tl.store(row_ptrs + (start + c + offs)[None, :], tl.zeros((BLOCK_M, 16), row_ptrs.dtype.element_ty),
                     mask=m_ok[:, None])

    @triton.jit
    def _lora_down_kernel(
        # pointers: x (M, K), A stacked (P, R, K), xa (P, M, R), wide (M, K + P * WIDTH + PAD) for the concat path
        x_ptr, a_ptr, xa_ptr, wide_ptr,
        # sizes and scalars
        M, K, R, seed0, seed1, seed2, threshold, keep_scale,
        # strides
        stride_xm, stride_xk, stride_wm,
        # meta
        P: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE: tl.constexpr, WIDTH: tl.constexpr,
        PAD: tl.constexpr,
    ):
        """xa[j, m, :] = dropout_j(x[m, :]) @ A[j].T; one program per (row block, projection j).

        WIDE (the concat path): also write [x | xa_0 | xa_1 | ...] into ``wide``, x (without dropout)
        by the j = 0 programs as their tiles go by, and xa_j into column block j of WIDTH columns (the
        columns past R get zeros); the last projection's programs also zero the PAD columns after the
        blocks (``_wide_pad_zeros``)."""
        pid = tl.program_id(0)
        j = pid % P  # the P programs of one row block are neighbours: x comes from DRAM once
        offs_m = (pid // P) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        m_ok = offs_m < M
        r_ok = offs_r < R
        seed = _pick3(j, seed0, seed1, seed2)
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        a_rows = a_ptr + (j * R + offs_r).to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < K
            x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if WIDE:
                if j == 0:
                    tl.store(wide_ptr + offs_m.to(tl.int64)[:, None] * stride_wm + offs_k[None, :], x,
                             mask=m_ok[:, None] & k_ok[None, :])
            if DROPOUT:
                x = tl.where(_dropout_keep(offs_m, k0, seed, threshold, BLOCK_K), x, 0.0)
            a = tl.load(a_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        out = xa_ptr + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :]
        tl.store(out, acc.to(xa_ptr.dtype.element_ty), mask=m_ok[:, None] & r_ok[None, :])
        if WIDE:  # acc is 0 past R (A's rows there load as 0), which fills the block's padding
            cols = K + j * WIDTH + offs_r
            tl.store(wide_ptr + offs_m.to(tl.int64)[:, None] * stride_wm + cols[None, :],
                     acc.to(wide_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_r < WIDTH)[None, :])
            if j == P - 1:
                _wide_pad_zeros(wide_ptr + offs_m.to(tl.int64)[:, None] * stride_wm, m_ok, K + P * WIDTH, PAD, BLOCK_M)

    @triton.jit
    def _lora_fwd_kernel(
        # pointers: x (M, K), xa (P, M, R), B concatenated (Ncat, R), y (split, M, Ncat), the NF4 code
        x_ptr, xa_ptr, b_ptr, y_ptr, code_ptr,
        # per projection j: the weight (NF4 packed bytes, absmax, nested absmax, nested code; dense: 4x W)
        w0_ptr, absmax0_ptr, nested_absmax0_ptr, nested_code0_ptr,
        w1_ptr, absmax1_ptr, nested_absmax1_ptr, nested_code1_ptr,
        w2_ptr, absmax2_ptr, nested_absmax2_ptr, nested_code2_ptr,
        # sizes and scalars
        M, K, R, N0, N1, N2, offset0, offset1, offset2, scaling0, scaling1, scaling2, steps_per_split,
        # strides
        stride_xm, stride_xk, stride_ys, stride_ym,
        # meta
        BASE: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        NESTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """y[:, n_off_j + n] = x @ W_j[n].T + s_j * xa[j] @ B_j[n].T for one (row block, column tile).

        BASE: 0 decodes NF4 tiles in the K loop, 1 reads a dense W, 2 takes the base product already
        in y (cuBLAS) and only adds the LoRA term. Column tiles never straddle projections.
        """
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        t0 = tl.cdiv(N0, BLOCK_N)
        t1 = tl.cdiv(N1, BLOCK_N)
        n_tiles = t0 + t1 + tl.cdiv(N2, BLOCK_N)
        # grouped order: GROUP_M row blocks walk the column tiles together (x and W stay in L2)
        per_group = GROUP_M * n_tiles
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        j = (pid_n >= t0).to(tl.int32) + (pid_n >= t0 + t1).to(tl.int32)
        tile = pid_n - _pick3(j, 0, t0, t0 + t1)
        N = _pick3(j, N0, N1, N2)
        n_off = _pick3(j, 0, N0, N0 + N1)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
        y_tile = y_ptr + pid_split * stride_ys + offs_m.to(tl.int64)[:, None] * stride_ym + (n_off + offs_n)[None, :]

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if BASE == 0:
            w_ptr = _pick3(j, w0_ptr, w1_ptr, w2_ptr)
            absmax_ptr = _pick3(j, absmax0_ptr, absmax1_ptr, absmax2_ptr)
            nested_absmax_ptr = _pick3(j, nested_absmax0_ptr, nested_absmax1_ptr, nested_absmax2_ptr)
            nested_code_ptr = _pick3(j, nested_code0_ptr, nested_code1_ptr, nested_code2_ptr)
            offset = _pick3(j, offset0, offset1, offset2)
            HALF: tl.constexpr = CHUNK // 2
            half = tl.arange(0, HALF)
            chunk_begin = pid_split * steps_per_split
            chunk_end = tl.minimum(chunk_begin + steps_per_split, tl.cdiv(K, CHUNK))
            for chunk in range(chunk_begin, chunk_end):
                k_start = chunk * CHUNK
                w_hi, w_lo = _nf4_weight_halves(w_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr,
                                                offset, offs_n, k_start, N, K, BLOCKSIZE, CHUNK, ALIGNED,
                                                DOUBLE_QUANT, NESTED)
                k_even = (k_start + 2 * half).to(tl.int64)
                x_hi = tl.load(x_rows + k_even[None, :] * stride_xk, mask=m_ok[:, None] & (k_even < K)[None, :],
                               other=0.0)
                x_lo = tl.load(x_rows + (k_even + 1)[None, :] * stride_xk,
                               mask=m_ok[:, None] & (k_even + 1 < K)[None, :], other=0.0)
                acc = tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)), acc, input_precision=DOT_PRECISION)
                acc = tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)), acc, input_precision=DOT_PRECISION)
        elif BASE == 1:
            w_rows = _pick3(j, w0_ptr, w1_ptr, w2_ptr) + offs_n[:, None] * K
            k_begin = pid_split * steps_per_split * BLOCK_K
            k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)
            for k0 in range(k_begin, k_end, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.load(y_tile, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)

        if HAS_LORA:
            # the LoRA term, once: split 0 carries it when the reduction is split
            offs_r = tl.arange(0, R_PAD)
            r_ok = offs_r < R
            xa = tl.load(xa_ptr + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptr + (n_off + offs_n)[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0)
            scaling = tl.where(pid_split == 0, _pick3(j, scaling0, scaling1, scaling2), 0.0)
            acc += scaling * tl.dot(xa, tl.trans(b), input_precision=DOT_PRECISION)
        tl.store(y_tile, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _lora_dx_epilogue(acc, g_ptr, a_ptr, offs_m, m_ok, cols, K, R, stride_gp, stride_gm, keep, keep_scale,
                          j: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """acc + (g[j] @ A[j][:, cols]) masked by ``keep`` (rows x cols; unused without DROPOUT) and scaled
        by keep_scale: projection j's LoRA part of dx. g[j][m, r] is at g_ptr + j * stride_gp + m *
        stride_gm + r."""
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        g = tl.load(g_ptr + j * stride_gp + offs_m.to(tl.int64)[:, None] * stride_gm + offs_r[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + (j * R + offs_r).to(tl.int64)[:, None] * K + cols[None, :],
                    mask=r_ok[:, None] & (cols < K)[None, :], other=0.0)
        lora = tl.dot(g, a, input_precision=DOT_PRECISION)
        if DROPOUT:
            lora = tl.where(keep, lora * keep_scale, 0.0)
        return acc + lora

    @triton.jit
    def _lora_bwd_kernel(
        # pointers: dy_j (M, N_j), g (P, M, R) strided, A stacked (P, R, K), dx (split, M, K), the NF4 code
        dy0_ptr, dy1_ptr, dy2_ptr, g_ptr, a_ptr, dx_ptr, code_ptr,
        # per projection j: the weight, as in the forward kernel
        w0_ptr, absmax0_ptr, nested_absmax0_ptr, nested_code0_ptr,
        w1_ptr, absmax1_ptr, nested_absmax1_ptr, nested_code1_ptr,
        w2_ptr, absmax2_ptr, nested_absmax2_ptr, nested_code2_ptr,
        # sizes and scalars
        M, K, R, N0, N1, N2, offset0, offset1, offset2, seed0, seed1, seed2, threshold, keep_scale, rows_per_split,
        # strides
        stride_dy0, stride_dy1, stride_dy2, stride_gp, stride_gm, stride_dxs, stride_dxm,
        # meta
        P: tl.constexpr, BASE: tl.constexpr, HAS_LORA: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr, ALIGNED: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
        NESTED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """dx[m, cols] = sum_j dy_j @ W_j[:, cols] + sum_j (g[j] @ A[j][:, cols]) * mask_j, one tile per program.

        The reduction runs over the concatenated rows of W_0..W_{P-1}; a split takes rows
        [split * rows_per_split, ...). BASE 0 decodes NF4 tiles, 1 reads a dense W (the cuBLAS paths
        add their LoRA term in ``_lora_dx_da_kernel``).
        With NF4 a tile's columns are one K chunk, as two halves: even columns (high nibbles) and odd.
        """
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        WIDTH: tl.constexpr = CHUNK if BASE == 0 else BLOCK_K
        k_tiles = tl.cdiv(K, WIDTH)
        per_group = GROUP_M * k_tiles
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        k_start = ((pid % per_group) // group_size) * WIDTH
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        row_begin = pid_split * rows_per_split
        row_end = row_begin + rows_per_split
        dx_rows = dx_ptr + pid_split * stride_dxs + offs_m.to(tl.int64)[:, None] * stride_dxm

        if BASE == 0:
            HALF: tl.constexpr = CHUNK // 2
            cols_hi = (k_start + 2 * tl.arange(0, HALF)).to(tl.int64)
            cols_lo = cols_hi + 1
            acc_hi = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            acc_lo = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
            for j in tl.static_range(P):
                dy_ptr = _pick3(j, dy0_ptr, dy1_ptr, dy2_ptr)
                stride_dy = _pick3(j, stride_dy0, stride_dy1, stride_dy2)
                N = _pick3(j, N0, N1, N2)
                n_off = _pick3(j, 0, N0, N0 + N1)
                lo = tl.maximum(row_begin - n_off, 0)
                hi = tl.minimum(row_end - n_off, N)
                dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dy
                for n_start in range(lo, hi, BLOCK_N):
                    offs_n = (n_start + tl.arange(0, BLOCK_N)).to(tl.int64)
                    w_hi, w_lo = _nf4_weight_halves(
                        _pick3(j, w0_ptr, w1_ptr, w2_ptr), _pick3(j, absmax0_ptr, absmax1_ptr, absmax2_ptr),
                        _pick3(j, nested_absmax0_ptr, nested_absmax1_ptr, nested_absmax2_ptr),
                        _pick3(j, nested_code0_ptr, nested_code1_ptr, nested_code2_ptr), code_ptr,
                        _pick3(j, offset0, offset1, offset2), offs_n, k_start, N, K, BLOCKSIZE, CHUNK, ALIGNED,
                        DOUBLE_QUANT, NESTED)
                    dy = tl.load(dy_rows + offs_n[None, :], mask=m_ok[:, None] & (offs_n < hi)[None, :], other=0.0)
                    acc_hi = tl.dot(dy, w_hi.to(dy.dtype), acc_hi, input_precision=DOT_PRECISION)
                    acc_lo = tl.dot(dy, w_lo.to(dy.dtype), acc_lo, input_precision=DOT_PRECISION)
            if HAS_LORA:
                if pid_split == 0:
                    for j in tl.static_range(P):
                        keep_hi = m_ok  # placeholders, unread without dropout
                        keep_lo = m_ok
                        if DROPOUT:  # the even and odd columns of a pair share one hash
                            keep_hi, keep_lo = _dropout_keep_halves(offs_m, k_start // 2, _pick3(j, seed0, seed1, seed2),
                                                                    threshold, HALF)
                        acc_hi = _lora_dx_epilogue(acc_hi, g_ptr, a_ptr, offs_m, m_ok, cols_hi, K, R, stride_gp,
                                                   stride_gm, keep_hi, keep_scale, j, DROPOUT, R_PAD, DOT_PRECISION)
                        acc_lo = _lora_dx_epilogue(acc_lo, g_ptr, a_ptr, offs_m, m_ok, cols_lo, K, R, stride_gp,
                                                   stride_gm, keep_lo, keep_scale, j, DROPOUT, R_PAD, DOT_PRECISION)
            tl.store(dx_rows + cols_hi[None, :], acc_hi.to(dx_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & (cols_hi < K)[None, :])
            tl.store(dx_rows + cols_lo[None, :], acc_lo.to(dx_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & (cols_lo < K)[None, :])
        else:
            cols = (k_start + tl.arange(0, BLOCK_K)).to(tl.int64)
            c_ok = cols < K
            acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for j in tl.static_range(P):
                dy_ptr = _pick3(j, dy0_ptr, dy1_ptr, dy2_ptr)
                stride_dy = _pick3(j, stride_dy0, stride_dy1, stride_dy2)
                N = _pick3(j, N0, N1, N2)
                n_off = _pick3(j, 0, N0, N0 + N1)
                lo = tl.maximum(row_begin - n_off, 0)
                hi = tl.minimum(row_end - n_off, N)
                dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dy
                w_ptr = _pick3(j, w0_ptr, w1_ptr, w2_ptr)
                for n_start in range(lo, hi, BLOCK_N):
                    offs_n = (n_start + tl.arange(0, BLOCK_N)).to(tl.int64)
                    n_ok = offs_n < hi
                    dy = tl.load(dy_rows + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
                    w = tl.load(w_ptr + offs_n[:, None] * K + cols[None, :], mask=n_ok[:, None] & c_ok[None, :],
                                other=0.0)
                    acc = tl.dot(dy, w.to(dy.dtype), acc, input_precision=DOT_PRECISION)
            if HAS_LORA:
                if pid_split == 0:
                    for j in tl.static_range(P):
                        keep = m_ok  # a placeholder, unread without dropout
                        if DROPOUT:
                            keep = _dropout_keep(offs_m, k_start, _pick3(j, seed0, seed1, seed2), threshold, BLOCK_K)
                        acc = _lora_dx_epilogue(acc, g_ptr, a_ptr, offs_m, m_ok, cols, K, R, stride_gp, stride_gm,
                                                keep, keep_scale, j, DROPOUT, R_PAD, DOT_PRECISION)
            tl.store(dx_rows + cols[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _lora_g_kernel(
        # pointers: dy_j (M, N_j), B concatenated (Ncat, R), g (P, M, R)
        dy0_ptr, dy1_ptr, dy2_ptr, b_ptr, g_ptr,
        # sizes and scalars
        M, R, N0, N1, N2, scaling0, scaling1, scaling2,
        # strides (rows of dy_j; the last dim is contiguous)
        stride_dy0, stride_dy1, stride_dy2,
        # meta
        P: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """g[j, m, :] = s_j * dy_j[m, :] @ B_j; one program per (row block, projection), whole rows of dy."""
        pid = tl.program_id(0)
        j = pid % P
        offs_m = (pid // P) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        m_ok = offs_m < M
        r_ok = offs_r < R
        N = _pick3(j, N0, N1, N2)
        n_off = _pick3(j, 0, N0, N0 + N1)
        dy_rows = _pick3(j, dy0_ptr, dy1_ptr, dy2_ptr) + offs_m.to(tl.int64)[:, None] * _pick3(
            j, stride_dy0, stride_dy1, stride_dy2)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = offs_n < N
            dy = tl.load(dy_rows + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(b_ptr + (n_off + offs_n)[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0)
            acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
        acc = acc * _pick3(j, scaling0, scaling1, scaling2)
        tl.store(g_ptr + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :], acc.to(g_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_g_db_kernel(
        # pointers: dy_j (M, N_j), B concatenated (Ncat, R), xa (P, M, R), partial g (n_splits, P, M, R) fp32,
        # partial dB (row blocks, Ncat, R) fp32
        dy0_ptr, dy1_ptr, dy2_ptr, b_ptr, xa_ptr, g_ptr, db_ptr,
        # sizes and scalars
        M, R, N0, N1, N2, scaling0, scaling1, scaling2, cols_per_split,
        # strides (rows of dy_j; the last dim is contiguous)
        stride_dy0, stride_dy1, stride_dy2, stride_gs, stride_dbm,
        # meta
        P: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """g and dB from one read of dy: program (row block, projection j; column range) streams its tiles
        of dy_j once, adding dy @ B_j into its rows of g and writing dy.T @ xa_j per column tile:
        g_part[split, j, m, :] = s_j * dy_j[m, range] @ B_j[range], db_part[block, n_off_j + n, :] =
        s_j * dy_j[block rows, n] @ xa_j[block rows]. The host sums both over their first axis."""
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        j = pid % P
        pid_m = pid // P
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.arange(0, R_PAD)
        m_ok = offs_m < M
        r_ok = offs_r < R
        N = _pick3(j, N0, N1, N2)
        n_off = _pick3(j, 0, N0, N0 + N1)
        scaling = _pick3(j, scaling0, scaling1, scaling2)
        dy_rows = _pick3(j, dy0_ptr, dy1_ptr, dy2_ptr) + offs_m.to(tl.int64)[:, None] * _pick3(
            j, stride_dy0, stride_dy1, stride_dy2)
        xa = tl.load(xa_ptr + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :],
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        n_begin = pid_split * cols_per_split
        n_end = tl.minimum(n_begin + cols_per_split, N)
        for n0 in range(n_begin, n_end, BLOCK_N):
            offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            n_ok = offs_n < n_end
            dy = tl.load(dy_rows + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            b = tl.load(b_ptr + (n_off + offs_n)[:, None] * R + offs_r[None, :], mask=n_ok[:, None] & r_ok[None, :],
                        other=0.0)
            acc = tl.dot(dy, b, acc, input_precision=DOT_PRECISION)
            db = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION)
            tl.store(db_ptr + pid_m * stride_dbm + (n_off + offs_n)[:, None] * R + offs_r[None, :], db * scaling,
                     mask=n_ok[:, None] & r_ok[None, :])
        tl.store(g_ptr + pid_split * stride_gs + (j * M + offs_m).to(tl.int64)[:, None] * R + offs_r[None, :],
                 acc * scaling, mask=m_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_db_kernel(
        # pointers: dy_j (M, N_j), xa (P, M, R), partial dB (split, Ncat, R) fp32
        dy0_ptr, dy1_ptr, dy2_ptr, xa_ptr, db_ptr,
        # sizes and scalars
        M, R, N0, N1, N2, scaling0, scaling1, scaling2, rows_per_split,
        # strides
        stride_dy0, stride_dy1, stride_dy2, stride_dbs,
        # meta
        R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """db[split, n_off_j + n, :] = s_j * sum over the split's rows m of dy_j[m, n] * xa[j, m, :]."""
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        t0 = tl.cdiv(N0, BLOCK_N)
        t1 = tl.cdiv(N1, BLOCK_N)
        j = (pid >= t0).to(tl.int32) + (pid >= t0 + t1).to(tl.int32)
        tile = pid - _pick3(j, 0, t0, t0 + t1)
        N = _pick3(j, N0, N1, N2)
        n_off = _pick3(j, 0, N0, N0 + N1)
        dy_ptr = _pick3(j, dy0_ptr, dy1_ptr, dy2_ptr)
        stride_dy = _pick3(j, stride_dy0, stride_dy1, stride_dy2)
        offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        n_ok = offs_n < N
        r_ok = offs_r < R
        m_begin = pid_split * rows_per_split
        m_end = tl.minimum(m_begin + rows_per_split, M)
        acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            offs_m = (m0 + tl.arange(0, BLOCK_M)).to(tl.int64)
            m_ok = offs_m < m_end
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dy + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :],
                         other=0.0)
            xa = tl.load(xa_ptr + (j * M + offs_m)[:, None] * R + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                         other=0.0)
            acc = tl.dot(tl.trans(dy), xa, acc, input_precision=DOT_PRECISION)
        acc = acc * _pick3(j, scaling0, scaling1, scaling2)
        tl.store(db_ptr + pid_split * stride_dbs + (n_off + offs_n)[:, None] * R + offs_r[None, :], acc,
                 mask=n_ok[:, None] & r_ok[None, :])

    @triton.jit
    def _lora_da_kernel(
        # pointers: x (M, K), g (P, M, R) strided, partial dA (split, P, R, K) fp32
        x_ptr, g_ptr, da_ptr,
        # sizes and scalars
        M, K, R, seed0, seed1, seed2, threshold, keep_scale, rows_per_split,
        # strides
        stride_xm, stride_xk, stride_gp, stride_gm, stride_das,
        # meta
        P: tl.constexpr, DROPOUT: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """da[split, j, :, k] = sum over the split's rows m of g[j, m, :] * dropout_j(x)[m, k]."""
        pid = tl.program_id(0)
        pid_split = tl.program_id(1)
        j = pid % P  # neighbours share the x tile through L2
        offs_k = ((pid // P) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        k_ok = offs_k < K
        r_ok = offs_r < R
        seed = _pick3(j, seed0, seed1, seed2)
        m_begin = pid_split * rows_per_split
        m_end = tl.minimum(m_begin + rows_per_split, M)
        acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        for m0 in range(m_begin, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m_end
            x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if DROPOUT:
                x = tl.where(_dropout_keep(offs_m, (pid // P) * BLOCK_K, seed, threshold, BLOCK_K), x, 0.0)
            g = tl.load(g_ptr + j * stride_gp + offs_m.to(tl.int64)[:, None] * stride_gm + offs_r[None, :],
                        mask=m_ok[:, None] & r_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(g), x, acc, input_precision=DOT_PRECISION)
        if DROPOUT:
            acc = acc * keep_scale
        out = da_ptr + pid_split * stride_das + (j * R + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(out, acc, mask=r_ok[:, None] & k_ok[None, :])


    @triton.jit
    def _lora_dx_da_kernel(
        # pointers: dx_in (M, K) the base product dy @ W (may be dx itself), dx (M, K), x (M, K),
        # g (P, M, R) strided, A stacked (P, R, K), partial dA (split, P, R, K) fp32
        dx_in_ptr, dx_ptr, x_ptr, g_ptr, a_ptr, da_ptr,
        # sizes and scalars
        M, K, R, seed0, seed1, seed2, threshold, keep_scale, rows_per_split,
        # strides
        stride_dx_in, stride_dxm, stride_xm, stride_xk, stride_gp, stride_gm, stride_das,
        # meta
        P: tl.constexpr, DROPOUT: tl.constexpr, NEED_DA: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """The backward's LoRA pass over (M, K), for the paths whose base product comes from cuBLAS:

            dx[m, k]       = dx_in[m, k] + sum_j (g_j @ A_j)[m, k] * mask_j[m, k]
            da[split, j]  += g_j[rows].T @ (x * mask_j)[rows, k-tile]        (NEED_DA)

        One program per (column tile, row range): the two share each element's dropout mask, which
        costs more than the loads (a 32-bit hash per two elements and projection; the dx epilogue and
        the dA reduction as two launches computed it twice), and g_j is read once."""
        pid_k = tl.program_id(0)
        pid_split = tl.program_id(1)
        offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
        offs_r = tl.arange(0, R_PAD)
        k_ok = offs_k < K
        r_ok = offs_r < R
        m_begin = pid_split * rows_per_split
        m_end = tl.minimum(m_begin + rows_per_split, M)
        da0 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        da1 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        da2 = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
        inv_keep_scale = 1.0 / keep_scale
        # A's (R, column tile) of each projection is the same for every row step: loaded once
        a_ok = r_ok[:, None] & k_ok[None, :]
        a_tile = a_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
        a0 = tl.load(a_tile, mask=a_ok, other=0.0)
        a1 = a0
        a2 = a0
        if P > 1:
            a1 = tl.load(a_tile + R * K, mask=a_ok, other=0.0)
        if P > 2:
            a2 = tl.load(a_tile + 2 * R * K, mask=a_ok, other=0.0)
        for m0 in range(m_begin, m_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < m_end
            rows = offs_m.to(tl.int64)[:, None]
            tile_ok = m_ok[:, None] & k_ok[None, :]
            acc = tl.load(dx_in_ptr + rows * stride_dx_in + offs_k[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            if NEED_DA:
                x = tl.load(x_ptr + rows * stride_xm + offs_k[None, :] * stride_xk, mask=tile_ok, other=0.0)
            for j in tl.static_range(P):
                g = tl.load(g_ptr + j * stride_gp + rows * stride_gm + offs_r[None, :],
                            mask=m_ok[:, None] & r_ok[None, :], other=0.0)
                if DROPOUT:
                    keep = _dropout_keep(offs_m, pid_k * BLOCK_K, _pick3(j, seed0, seed1, seed2), threshold, BLOCK_K)
                    if NEED_DA:
                        # dx_in (with the terms before j) rides in the product's accumulator, scaled by
                        # 1 / keep_scale and back, and one select over [x | dx] keeps or drops both (a select
                        # for each computed the mask twice, in the x tile's layout and in the product's:
                        # 40 mixer multiplies for 16 column pairs per thread, 20 this way). The compiler then
                        # streams dx_in through cp.async into the matrix unit's layout, where adding the
                        # product to it moved dx_in through shared memory in 4 rounds of 2 barriers a step
                        # (sm_90 SASS, P = 1, r 16: 20 barriers a step -> 12, dx_in's 4 loads pipelined)
                        kept = tl.dot(g, _pick3(j, a0, a1, a2), acc * inv_keep_scale, input_precision=DOT_PRECISION)
                        x_kept, acc = tl.split(tl.where(keep[:, :, None], tl.join(x.to(tl.float32), kept * keep_scale),
                                                        tl.join(tl.zeros_like(acc), acc)))
                        xd = x_kept.to(x_ptr.dtype.element_ty)
                    else:  # here the sum as it was builds to fewer registers (84 against 114)
                        acc += tl.where(keep, tl.dot(g, _pick3(j, a0, a1, a2), input_precision=DOT_PRECISION),
                                        0.0) * keep_scale
                else:
                    acc = tl.dot(g, _pick3(j, a0, a1, a2), acc, input_precision=DOT_PRECISION)
                    if NEED_DA:
                        xd = x
                if NEED_DA:
                    if j == 0:
                        da0 = tl.dot(tl.trans(g), xd, da0, input_precision=DOT_PRECISION)
                    elif j == 1:
                        da1 = tl.dot(tl.trans(g), xd, da1, input_precision=DOT_PRECISION)
                    else:
                        da2 = tl.dot(tl.trans(g), xd, da2, input_precision=DOT_PRECISION)
            tl.store(dx_ptr + rows * stride_dxm + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty), mask=tile_ok)
        if NEED_DA:
            if DROPOUT:
                da0 = da0 * keep_scale
                da1 = da1 * keep_scale
                da2 = da2 * keep_scale
            out = da_ptr + pid_split * stride_das + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :]
            da_ok = r_ok[:, None] & k_ok[None, :]
            tl.store(out, da0, mask=da_ok)
            if P > 1:
                tl.store(out + R * K, da1, mask=da_ok)
            if P > 2:
                tl.store(out + 2 * R * K, da2, mask=da_ok)


    @triton.jit
    def _nf4_merge_kernel(
        # pointers: W's NF4 parts, the byte table, B (N, R) and A (R, K) in the compute dtype, out (N, K)
        # rows ``stride_out`` apart (int32 words of two 16-bit values with PACKED), the extra block in
        # out's dtype (EXTRA 1: A's first row under the stack; EXTRA 2: this projection's first row, column K)
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, byte_table_ptr, b_ptr, a_ptr, out_ptr,
        extra_ptr,
        # sizes and scalars
        N, K, R, offset, scaling, stride_out, projection,
        # meta
        BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, LAYOUT: tl.constexpr, PACKED: tl.constexpr,
        PACKED_BF16: tl.constexpr, DOT_PRECISION: tl.constexpr, EXTRA: tl.constexpr, WIDTH: tl.constexpr,
        P: tl.constexpr,
    ):
        """out[n, k] = dequant(W)[n, k] + scaling * (B @ A)[n, k] for BLOCK_N rows by one NF4 block of
        columns (so each row's scale is one value), in fp32 and rounded once to out's dtype: the merged
        weight of the ``merged`` path, made in the pass that dequantizes W. K is a multiple of the
        blocksize, so only rows past N are masked (EVEN_N: none are), and a mask never varies along a row
        (a mask that varies inside a vector splits it into scalar accesses).

        Byte j of a row's tile holds columns 2j (high nibble) and 2j + 1 (low nibble). LAYOUT says how the
        product meets the decoded values: "pairs", one dot over the block's A columns, its product split
        into even and odd columns (what the packed words hold); "two_dots", A's even and odd columns
        loaded apart, one dot each; "joined", the decoded values interleaved into the natural column order
        and one dot added to them. bench/lora.py --sweep-merge times them.

        EXTRA writes the blocks ``merged_weights``' ``extra`` asks for in the same launch, each value once:
        1 ("rows"), the programs of the first row block store A's columns of their NF4 block as WIDTH rows
        (zero past R); 2 ("cols"), the programs of the first column block store their rows' P * WIDTH
        columns, s * B in block ``projection`` (zero past R) and zeros in the others."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        kb = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows64 = rows.to(tl.int64)
        row_ok = rows < N
        j = tl.arange(0, HALF)
        byte_ptrs = packed_ptr + rows64[:, None] * (K // 2) + (kb * HALF + j)[None, :]
        if EVEN_N:
            byte = tl.load(byte_ptrs)
        else:
            byte = tl.load(byte_ptrs, mask=row_ok[:, None], other=0)
        absmax = _nf4_block_absmax(rows64 * (K // BLOCKSIZE) + kb, row_ok, absmax_ptr, nested_absmax_ptr,
                                   nested_code_ptr, offset, DOUBLE_QUANT, NESTED)[:, None]
        w_hi, w_lo = _nf4_byte_values(tl.load(byte_table_ptr + byte.to(tl.int32)))
        w_hi = w_hi * absmax
        w_lo = w_lo * absmax
        offs_r = tl.arange(0, R_PAD)
        r_ok = offs_r < R
        b = tl.load(b_ptr + rows64[:, None] * R + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        a_rows = a_ptr + offs_r.to(tl.int64)[:, None] * K
        cols = kb * BLOCKSIZE + tl.arange(0, BLOCKSIZE)
        if LAYOUT == "two_dots":
            k_even = kb * BLOCKSIZE + 2 * j
            a_hi = tl.load(a_rows + k_even[None, :], mask=r_ok[:, None], other=0.0)
            a_lo = tl.load(a_rows + (k_even + 1)[None, :], mask=r_ok[:, None], other=0.0)
            w_hi += scaling * tl.dot(b, a_hi, input_precision=DOT_PRECISION)
            w_lo += scaling * tl.dot(b, a_lo, input_precision=DOT_PRECISION)
        else:
            a = tl.load(a_rows + cols[None, :], mask=r_ok[:, None], other=0.0)
            lora = scaling * tl.dot(b, a, input_precision=DOT_PRECISION)
            if LAYOUT == "pairs":
                l_hi, l_lo = tl.split(tl.reshape(lora, (BLOCK_N, HALF, 2)))
                w_hi += l_hi
                w_lo += l_lo
        if LAYOUT == "joined":
            values = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BLOCKSIZE)) + lora
            out_ptrs = out_ptr + rows64[:, None] * stride_out + cols[None, :]
            if EVEN_N:
                tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty))
            else:
                tl.store(out_ptrs, values.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        elif PACKED:
            word_ptrs = out_ptr + rows64[:, None] * (stride_out // 2) + (kb * HALF + j)[None, :]
            if EVEN_N:
                tl.store(word_ptrs, _pack16(w_hi, w_lo, PACKED_BF16))
            else:
                tl.store(word_ptrs, _pack16(w_hi, w_lo, PACKED_BF16), mask=row_ok[:, None])
        else:
            values = tl.reshape(tl.join(w_hi, w_lo), (BLOCK_N, BLOCKSIZE)).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], values, mask=row_ok[:, None])
        w_ok = offs_r < WIDTH
        if EXTRA == 1:
            if tl.program_id(0) == 0:
                a_nat = tl.load(a_rows + cols[None, :], mask=r_ok[:, None], other=0.0)
                tl.store(extra_ptr + offs_r.to(tl.int64)[:, None] * stride_out + cols[None, :],
                         a_nat.to(extra_ptr.dtype.element_ty), mask=w_ok[:, None])
        elif EXTRA == 2:
            if kb == 0:
                sb = (b.to(tl.float32) * scaling).to(extra_ptr.dtype.element_ty)
                for i in tl.static_range(P):
                    tl.store(extra_ptr + rows64[:, None] * stride_out + (i * WIDTH + offs_r)[None, :],
                             tl.where(projection == i, sb, tl.zeros_like(sb)), mask=row_ok[:, None] & w_ok[None, :])


# ----------------------------------------------------------------------------- launch configuration


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tiles of the base-GEMM kernels. ``split`` cuts the reduction (forward: K, backward: N) into
    fp32 partials; ``block_k`` is the K step of the dense forward and the K tile of the dense backward."""

    block_m: int
    block_n: int
    block_k: int = 64
    split: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def _programs_wanted(device: torch.device) -> int:
    """About four programs per SM keep a memory-bound launch streaming; few in the interpreter."""
    if device.type != "cuda":
        return 8
    return 4 * sm_count(device)


def default_gemm_config(kind: str, base: int, m: int, n: int, k: int, chunk: int, device: torch.device) -> GemmConfig:
    """Tiles for the ``kind`` ("forward" | "backward") GEMM on (m, k) x (n, k) with the given BASE.

    Small M is memory-bound on W: enough programs to keep the SMs streaming, splitting the
    reduction when the output tiles alone are too few. Large M is compute-bound: big tiles,
    8 warps, no split. BASE 2 (the forward epilogue only, the cuBLAS paths) is a plain pass over y.
    """
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    big = m > 64
    if base == _BASE_IN_OUT:
        return GemmConfig(min(block_m, 64), 128, 64, 1, 8, 4, 1)
    if kind == "forward":
        block_n = 128 if big else 64
        tiles = cdiv(m, block_m) * cdiv(n, block_n)
        block_k = 64
        steps = cdiv(k, chunk if base == _BASE_NF4 else block_k)
    elif kind == "backward":
        block_n = 64
        block_k = 128 if big else 64
        tiles = cdiv(m, block_m) * cdiv(k, chunk if base == _BASE_NF4 else block_k)
        steps = cdiv(n, block_n)
    else:
        raise ValueError(f"gemm config kind {kind!r}")
    split = 1 if big else max(1, min(steps // 2, cdiv(_programs_wanted(device), tiles)))
    return GemmConfig(block_m, block_n, block_k, split, 8, 8 if big else 4, 4 if big else 3)


def _skinny_blocks(m: int, r_pad: int) -> tuple[int, int]:
    """(rows, columns) per step of the rank-r launches (down, g, dB, dA): r_pad x columns fp32 stay small."""
    rows = 16 if m <= 16 else 32 if m <= 32 else 64
    cols = 256 if r_pad <= 16 and m <= 16 else 128 if r_pad <= 32 else 64 if r_pad <= 64 else 32
    return rows, cols


def _row_block(m: int, r_pad: int, projections: int, device: torch.device) -> tuple[int, int]:
    """(rows, columns) for the launches with one program per row block (down, g): ``_skinny_blocks``'
    rows, halved down to 16 while there would be fewer programs than about two per SM. At M = 4096 and
    one projection, 64-row blocks made 64 programs, so half of an H100's 132 SMs had none (arithmetic
    from the grid, not a timing: bench/lora.py's graph-replay figures are what tell)."""
    rows, cols = _skinny_blocks(m, r_pad)
    while rows > 16 and cdiv(m, rows) * projections < _programs_wanted(device) // 2:
        rows //= 2
    return rows, cols


def _waves_on() -> bool:
    """BEZOAR_LORA_WAVES=0 gives back the row splits that fill ``_programs_wanted`` rounded up (what ran
    before the splits were fitted to waves), for bench/lora.py to time both."""
    return dispatch.env_switch("BEZOAR_LORA_WAVES") is not False


def _row_splits(m: int, block_m: int, tiles: int, device: torch.device, splits: int | None,
                resident: int | None = None) -> int:
    """How many row ranges the dB/dA reductions use (never an empty one): ``splits`` where the plan
    gives it; else the fewest waves x row blocks per program (``launch.wave_splits``) with ``resident``
    programs at once (the kernel's occupancy on the device, else ``_programs_wanted``). Rounding
    ``_programs_wanted / tiles`` up, as before, made a short second wave whenever ``tiles`` does not
    divide it: 550 programs for 528 slots at K = 3200."""
    blocks = cdiv(m, block_m)
    tiles = max(1, tiles)
    if splits is None:
        wanted = _programs_wanted(device)
        splits = _fitted_splits(blocks, tiles, wanted, resident) if _waves_on() else cdiv(wanted, tiles)
    return max(1, min(splits, blocks))


def _fitted_splits(blocks: int, tiles: int, wanted: int, resident: int | None) -> int:
    """``launch.wave_splits`` in waves of ``resident`` programs (``wanted`` where unknown), over at least
    the splits that fill ``wanted`` (the old choice stays a candidate) and at most about twice that many
    programs (the fp32 partial sums stay small)."""
    wave = resident or wanted
    return wave_splits(blocks, tiles, wave, max(cdiv(2 * min(wave, wanted), tiles), cdiv(wanted, tiles)))


def _reduction_splits(kernel, key: tuple, args, meta: dict, m: int, block_m: int, tiles: int, plan: _Plan,
                      device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of a row-split reduction launch: ``_row_splits`` with the occupancy of
    ``kernel`` (built once per ``key`` from ``args(partials, rows_per_split)`` with a stand-in for the
    fp32 partials) unless the plan fixes the splits; every split has rows."""
    resident = None
    if plan.splits is None:
        resident = resident_programs(
            kernel, key, device, lambda: (args(torch.empty(1, dtype=torch.float32, device=device), block_m), meta))
    split = _row_splits(m, block_m, tiles, device, plan.splits, resident)
    rows_per_split = cdiv(cdiv(m, block_m), split) * block_m
    return cdiv(m, rows_per_split), rows_per_split


# ----------------------------------------------------------------------------- launchers


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything about one call that is not a tensor autograd tracks."""

    weights: tuple  # NF4Weight or dense tensor per projection, each (N_j, K)
    scalings: tuple[float, ...]  # per projection; empty without adapters
    seeds: tuple[int, ...]
    dropout_p: float  # 0 when not training
    path: str
    fwd_config: GemmConfig | None = None
    bwd_config: GemmConfig | None = None
    splits: int | None = None  # row splits of the dB/dA reductions (None: by device)
    grad_enabled: bool = True  # grad mode at the call (forward itself always runs without it)

    @property
    def projections(self) -> int:
        return len(self.weights)

    @property
    def has_lora(self) -> bool:
        return bool(self.scalings)

    @property
    def dropout(self) -> bool:
        return self.dropout_p > 0

    @property
    def nf4(self) -> bool:
        return isinstance(self.weights[0], NF4Weight)

    @property
    def out_features(self) -> tuple[int, ...]:
        return tuple(w.shape[0] for w in self.weights)


def _three(values: Sequence, fill) -> list:
    return list(values) + [fill] * (3 - len(values))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _r_pad(r: int) -> int:
    return max(16, next_power_of_2(r))


def _dropout_args(plan: _Plan) -> tuple:
    p = plan.dropout_p
    return (dropout_threshold(p), 1.0 / (1.0 - p)) if p > 0 else (0, 1.0)


def _nf4_meta(plan: _Plan, k: int) -> dict:
    if not plan.nf4:
        return dict(BLOCKSIZE=64, CHUNK=_GENERAL_CHUNK, ALIGNED=False, DOUBLE_QUANT=False, NESTED=NESTED_BLOCKSIZE)
    w = plan.weights[0]
    aligned = k % w.blocksize == 0
    return dict(BLOCKSIZE=w.blocksize, CHUNK=w.blocksize if aligned else _GENERAL_CHUNK, ALIGNED=aligned,
                DOUBLE_QUANT=w.double_quant, NESTED=NESTED_BLOCKSIZE)


def _weight_args(weights: Sequence) -> tuple[list, list[float]]:
    """Four pointers per projection (padded to three projections) and the double-quant offsets."""
    ptrs, offsets = [], []
    for w in _three(weights, weights[0]):
        if isinstance(w, NF4Weight):
            dq = w.double_quant
            ptrs += [w.packed, w.absmax, w.nested_absmax if dq else w.absmax, w.nested_code if dq else w.absmax]
            offsets.append(w.offset if dq else 0.0)
        else:
            ptrs += [w, w, w, w]
            offsets.append(0.0)
    return ptrs, offsets


_dequant_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _shared_buffer(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """The reused per-(device, dtype) buffer, grown to at least ``numel`` values (flat)."""
    key = (device, dtype)
    buf = _dequant_buffers.get(key)
    if buf is None or buf.numel() < numel:
        _dequant_buffers.pop(key, None)
        with torch.inference_mode(False):  # made under inference mode, it must stay writable outside it
            buf = torch.empty(numel, dtype=dtype, device=device)
        _dequant_buffers[key] = buf
    return buf


def dequantized(weights: Sequence[NF4Weight], dtype: torch.dtype) -> torch.Tensor:
    """The NF4 weights dequantized back to back into one reused per-(device, dtype) buffer.

    Returns the (sum N_j, K) block (weight j in its rows n_off_j .. n_off_j + N_j), so cuBLAS can
    multiply all of them at once. The next call overwrites it: use it at once, on the current
    stream. The buffer grows to the largest request and is kept.
    """
    total = sum(w.numel for w in weights)
    buf = _shared_buffer(weights[0].device, dtype, total)
    start = 0
    for w in weights:
        dequantize_nf4_triton(w, dtype, out=buf[start: start + w.numel])
        start += w.numel
    return buf[:total].view(-1, weights[0].shape[1])


def _split_rows(block: torch.Tensor, ns: Sequence[int]) -> list[torch.Tensor]:
    return list(torch.split(block, list(ns), dim=0))


@contextlib.contextmanager
def _base_weights(plan: _Plan, dtype: torch.dtype):
    """(BASE switch, per-projection weights for the kernel, the stacked (sum N_j, K) matrix for cuBLAS),
    for reads queued inside the ``with``. NF4 weights are dequantized into the reused buffer, or taken
    from the dequant cache where it is on (``bezoar_kernels.dequant_cache``, the same values)."""
    path = plan.path
    if plan.nf4:
        if path == "fused":
            yield _BASE_NF4, list(plan.weights), None
            return
        base = _BASE_IN_OUT if path in ("cublas", "concat") else _BASE_DENSE
        if dequant_cache.usable(plan.weights, dtype):
            with dequant_cache.held(plan.weights, dtype) as block:
                yield base, _split_rows(block, plan.out_features), block
            return
        block = dequantized(plan.weights, dtype)
        yield base, _split_rows(block, plan.out_features), block
        return
    dense = [w.detach().contiguous() for w in plan.weights]
    if path in ("cublas", "concat"):  # concat's backward, and its forward where it cannot run, are cublas's
        cast = [w.to(dtype) for w in dense]
        yield _BASE_IN_OUT, cast, cast[0] if len(cast) == 1 else torch.cat(cast)
        return
    yield _BASE_DENSE, dense, None


def _concat_ok(plan: _Plan, k: int) -> bool:
    """Whether the ``concat`` forward can run: adapters, and an NF4 K the strided dequantize takes."""
    return plan.has_lora and (not plan.nf4 or k % plan.weights[0].blocksize == 0)


def _concat_width(r: int) -> int:
    """Columns per projection's LoRA block: r rounded up to 16. With K a multiple of 16 (the NF4 case),
    the wide rows then stay a multiple of 16 values apart, which Triton needs to see to keep its
    16-byte stores in the strided dequantize and the down kernel's copy of x (sm_90 SASS: 4 STG.128
    against 32 STG.U16 per 64 bf16 values), and which suits cuBLAS."""
    return -(-r // 16) * 16


def _concat_extra(projections: int, r: int, device) -> int:
    """Columns the concat forward adds to K: the P blocks of ``_concat_width(r)`` rounded up to a multiple
    of ``concat_align(device)``, the columns past the blocks zero in both operands. The backward's product
    keeps the P blocks alone, unless the dequant cache is on (``_concat_backward``)."""
    blocks = projections * _concat_width(r)
    align = concat_align(device)
    return -(-blocks // align) * align


def _wide_pad(wide: torch.Tensor, k: int, projections: int, r: int) -> dict:
    """The PAD launch argument of a kernel that writes [x | xa_0 | ...] into ``wide``: the columns after
    the P LoRA blocks (a multiple of 16), which it fills with zeros."""
    return {"PAD": wide.shape[1] - k - projections * _concat_width(r)}


def _wide_input(m: int, k: int, projections: int, r: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The concat forward's (M, K + ``_concat_extra``) operand, unwritten: the down kernel (or a fused
    norm / SwiGLU kernel) fills every column of it."""
    return torch.empty((m, k + _concat_extra(projections, r, device)), dtype=dtype, device=device)


def _concat_lora_block(plan: _Plan, b: torch.Tensor, extra: int) -> torch.Tensor:
    """The (Ncat, ``extra``) LoRA columns of the wide matrix: s_j * B_j in projection j's rows of column
    block j (``_concat_width(r)`` columns each), zeros elsewhere and past the P blocks, in b's dtype.
    ``extra`` is what the forward operand holds beyond K (``wide.shape[1] - K``: the align is read once
    a call). Built once in the forward and saved for the backward, which then fills the wide matrix
    with one copy (the forward: P + 2 small launches)."""
    ns = plan.out_features
    r = b.shape[1]
    width = _concat_width(r)
    if extra < plan.projections * width:
        raise ValueError(f"concat block: {extra} columns cannot hold {plan.projections} blocks of {width}")
    block = torch.zeros((sum(ns), extra), dtype=b.dtype, device=b.device)
    start = 0
    for j, n in enumerate(ns):
        torch.mul(b[start: start + n], plan.scalings[j], out=block[start: start + n, j * width: j * width + r])
        start += n
    return block


@contextlib.contextmanager
def _concat_weights(plan: _Plan, block: torch.Tensor, k: int, dtype: torch.dtype):
    """The (Ncat, K + block columns) matrix [W_j | 0 .. s_j B_j .. 0] stacked over j, for reads queued inside the
    ``with``: in the reused buffer, W_j dequantized into the first K columns, or from the dequant cache
    where it is on (the W columns kept between calls, the same values); ``block``
    (``_concat_lora_block``) copied beside them on every call."""
    n_total, extra = block.shape
    kc = k + extra
    if plan.nf4 and dequant_cache.usable(plan.weights, dtype):
        with dequant_cache.held(plan.weights, dtype, kc) as wide:
            wide[:, k:].copy_(block)
            yield wide
        return
    wide = _shared_buffer(block.device, dtype, n_total * kc)[: n_total * kc].view(n_total, kc)
    start = 0
    for w, n in zip(plan.weights, plan.out_features):
        if plan.nf4:
            dequantize_nf4_triton(w, dtype, out=wide[start: start + n, :k])
        else:
            wide[start: start + n, :k].copy_(w.detach())
        start += n
    wide[:, k:].copy_(block)
    yield wide


def _merge_ok(weights, adapters, k: int) -> bool:
    """Whether the ``merged`` path can run: NF4 weights with K a multiple of the blocksize, adapters."""
    return (adapters is not None and all(isinstance(w, NF4Weight) for w in weights)
            and k % weights[0].blocksize == 0 and adapters[0].lora_a.shape[0] <= MAX_KERNEL_RANK)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """The launch of ``_nf4_merge_kernel``: ``block_n`` rows by one NF4 block of columns per program, the
    way the product meets the decoded values (``layout``: "pairs", "two_dots" or "joined", see the
    kernel), and its warps."""

    layout: str = "pairs"
    block_n: int = 64
    num_warps: int = 4

    def __post_init__(self):  # checked once here, not on every merge of a training step
        if self.layout not in tuning.MERGE_LAYOUTS:
            raise ValueError(f"merge layout must be one of {', '.join(tuning.MERGE_LAYOUTS)}, not {self.layout!r}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"merge block_n must be a power of two of at least 16, not {self.block_n}")
        if self.num_warps < 1 or self.num_warps & (self.num_warps - 1):
            raise ValueError(f"merge num_warps must be a power of two, not {self.num_warps}")


MERGE_LAYOUTS = tuning.MERGE_LAYOUTS
DEFAULT_MERGE = MergeConfig()


def merge_config(device) -> MergeConfig:
    """The merge kernel's launch on ``device``: its tuning entry (``lora.merge_launch``, written by
    bench/tune.py from ``bench/lora.py --sweep-merge``), else ``DEFAULT_MERGE``."""
    tuned = tuning.setting("lora.merge_launch", device)
    return MergeConfig(**tuned) if tuned else DEFAULT_MERGE


def merged_weights(plan: _Plan, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                   extra: str | None = None, config: MergeConfig | None = None) -> torch.Tensor:
    """The (Ncat, K) stack of W_j + s_j * B_j @ A_j, each made in the pass that dequantizes W_j, in the
    reused per-(device, dtype) buffer (the next call overwrites it: use it at once).

    ``extra="rows"`` appends A_0, A_1, ... as P * r16 more rows (r padded to 16 with zero rows): x @ out.T
    then holds y and, in the columns after Ncat, x @ A_j.T (the forward's xa without dropout), so no
    pass over x computes xa. ``extra="cols"`` makes it (Ncat, K + P * r16), [W'_j | .. s_j B_j ..] as on
    the concat path: dy @ out holds dx and, after column K, g_j = s_j * dy_j @ B_j, so no pass over dy
    computes g. The launches that write W' write either block too, zeros and all (one launch per
    projection, nothing else). ``_lora_columns`` reads either block out of the product. ``config``: the
    merge kernel's launch (``merge_config(device)`` when None; bench/lora.py --sweep-merge times others)."""
    if extra not in (None, "rows", "cols"):
        raise ValueError(f"extra must be None, 'rows' or 'cols', not {extra!r}")
    config = config or merge_config(a.device)
    ns = plan.out_features
    p, r, k = a.shape
    n_total = sum(ns)
    width = _concat_width(r)
    rows_out = n_total + (p * width if extra == "rows" else 0)
    cols_out = k + (p * width if extra == "cols" else 0)
    out = _shared_buffer(a.device, dtype, rows_out * cols_out)[: rows_out * cols_out].view(rows_out, cols_out)
    packed = dtype in (torch.bfloat16, torch.float16) and config.layout != "joined"
    start = 0
    for j, (w, n) in enumerate(zip(plan.weights, ns)):
        rows = out[start: start + n, :k]
        extra_at = (out[n_total + j * width] if extra == "rows" else out[start, k:] if extra == "cols" else rows)
        dq = w.double_quant
        _nf4_merge_kernel[(cdiv(n, config.block_n), k // w.blocksize)](
            w.packed, w.absmax, w.nested_absmax if dq else w.absmax, w.nested_code if dq else w.absmax,
            nf4_byte_table(a.device), b[start: start + n], a[j], _int32_words(rows) if packed else rows, extra_at,
            n, k, r, w.offset if dq else 0.0, plan.scalings[j], cols_out, j,
            BLOCKSIZE=w.blocksize, DOUBLE_QUANT=dq, NESTED=NESTED_BLOCKSIZE, R_PAD=_r_pad(r),
            BLOCK_N=config.block_n, EVEN_N=n % config.block_n == 0, LAYOUT=config.layout, PACKED=packed,
            PACKED_BF16=dtype == torch.bfloat16, DOT_PRECISION=_dot_precision(dtype),
            EXTRA={None: 0, "rows": 1, "cols": 2}[extra], WIDTH=width, P=p, num_warps=config.num_warps,
        )
        start += n
    return out


def _lora_columns(wide: torch.Tensor, start: int, projections: int, r: int) -> torch.Tensor:
    """The (P, M, R) strided view of the LoRA column blocks (``_concat_width(r)`` columns each, from
    column ``start``) of a wide product: g after the concat / merged backward GEMM, xa after the
    merged forward GEMM."""
    return wide.as_strided((projections, wide.shape[0], r), (_concat_width(r), wide.stride(0), 1),
                           wide.storage_offset() + start)


def _no_autocast(t: torch.Tensor):
    """Autocast off for the block: the cuBLAS products run in the compute dtype the Triton paths use,
    so every path returns the same dtype under autocast."""
    return torch.autocast(t.device.type, enabled=False)


def _concat_forward(wide_x: torch.Tensor, block: torch.Tensor, plan: _Plan, k: int) -> torch.Tensor:
    """y (M, Ncat) = [x | xa_0 | xa_1 | ...] @ [W_j | .. s_j B_j ..].T: one cuBLAS GEMM, no pass over y.
    ``wide_x`` is what ``_lora_down`` wrote, ``block`` the LoRA columns (``_concat_lora_block``)."""
    with _no_autocast(wide_x), _concat_weights(plan, block, k, wide_x.dtype) as wide_w:
        return torch.matmul(wide_x, wide_w.t())


def _concat_backward(dys: list[torch.Tensor], block: torch.Tensor, plan: _Plan, k: int,
                     r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_j dy_j @ W_j as a strided (M, K) view, g (P, M, R) as a strided view) from one wide product.

    sum_j dy_j @ [W_j | .. s_j B_j ..] (M, K + P * r16) holds the base dx in its first K columns and
    g_j = s_j * dy_j @ B_j in column block j (rows of projection i != j are zero there): the pass over
    dy that computes g on the other paths is not made. Only the P blocks of ``block`` take part: the
    forward's columns past them (``concat_align``) would only widen dx; with the dequant cache on they
    stay, so that both products read the one cached [W | ...] block."""
    if not (plan.nf4 and dequant_cache.usable(plan.weights, dys[0].dtype)):
        block = block[:, :plan.projections * _concat_width(r)]
    with _concat_weights(plan, block, k, dys[0].dtype) as wide_w:
        wide = _base_product(dys, plan, _split_rows(wide_w, plan.out_features))
    return wide[:, :k], _lora_columns(wide, k, plan.projections, r)


def _lora_down(x: torch.Tensor, a: torch.Tensor, plan: _Plan, wide: torch.Tensor | None = None) -> torch.Tensor:
    """xa (P, M, R) in x's dtype; with ``wide`` (``_wide_input``) also [x | xa_0 | ... | zeros] written there."""
    m, k = x.shape
    p, r, _ = a.shape
    xa = torch.empty((p, m, r), dtype=x.dtype, device=x.device)
    r_pad = _r_pad(r)
    block_m, block_k = _row_block(m, r_pad, p, x.device)
    threshold, keep_scale = _dropout_args(plan)
    _lora_down_kernel[(cdiv(m, block_m) * p,)](
        x, a, xa, wide if wide is not None else xa, m, k, r, *_three(plan.seeds, 0), threshold, keep_scale,
        x.stride(0), x.stride(1), wide.stride(0) if wide is not None else 0,
        P=p, DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k,
        DOT_PRECISION=_dot_precision(x.dtype), WIDE=wide is not None, WIDTH=_concat_width(r),
        **(_wide_pad(wide, k, p, r) if wide is not None else {"PAD": 0}), num_warps=4,
    )
    return xa


def _gemm_forward(x: torch.Tensor, plan: _Plan, xa: torch.Tensor | None, b: torch.Tensor | None,
                  base_y: torch.Tensor | None = None) -> torch.Tensor:
    """y (M, Ncat) = [x @ W_j.T + s_j * xa_j @ B_j.T]_j in x's dtype; with ``base_y`` (the products
    x @ W_j.T already there, e.g. from the gemv kernel) only the LoRA term is added to it, in place."""
    if base_y is not None:  # the weights are not read
        return _gemm_forward_on(x, plan, xa, b, base_y, _BASE_IN_OUT, [base_y] * plan.projections, None)
    with _base_weights(plan, x.dtype) as (base, weights, stacked):
        return _gemm_forward_on(x, plan, xa, b, None, base, weights, stacked)


def _gemm_forward_on(x: torch.Tensor, plan: _Plan, xa: torch.Tensor | None, b: torch.Tensor | None,
                     base_y: torch.Tensor | None, base: int, weights: list, stacked: torch.Tensor | None):
    m, k = x.shape
    ns = plan.out_features
    n_total = sum(ns)
    dtype = x.dtype
    y = base_y
    if base == _BASE_IN_OUT and base_y is None:
        with _no_autocast(x):
            y = torch.matmul(x, stacked.t())
        if not plan.has_lora:
            return y
    meta = _nf4_meta(plan, k)
    chunk = meta["CHUNK"]
    cfg = plan.fwd_config or default_gemm_config("forward", base, m, n_total, k, chunk, x.device)
    steps = cdiv(k, chunk if base == _BASE_NF4 else cfg.block_k)
    split = 1 if base == _BASE_IN_OUT else max(1, min(cfg.split, steps))
    per_split = cdiv(steps, split)
    split = cdiv(steps, per_split)
    if base != _BASE_IN_OUT:
        shape = (m, n_total) if split == 1 else (split, m, n_total)
        y = torch.empty(shape, dtype=dtype if split == 1 else torch.float32, device=x.device)
    ptrs, offsets = _weight_args(weights)
    r = b.shape[1] if b is not None else 1
    n_tiles = sum(cdiv(n, cfg.block_n) for n in ns)
    grid = (cdiv(m, cfg.block_m) * n_tiles, split)
    launch_fitting(_lora_fwd_kernel, grid, (
        x, xa if xa is not None else x, b if b is not None else x, y, nf4_code(x.device), *ptrs,
        m, k, r, *_three(ns, 0), *offsets, *_three(plan.scalings, 0.0), per_split,
        x.stride(0), x.stride(1), y.stride(0) if split > 1 else 0, y.stride(-2),
    ), dict(
        BASE=base, HAS_LORA=plan.has_lora, R_PAD=_r_pad(r), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    ))
    return y if split == 1 else y.sum(0).to(dtype)


def _base_product(dys: list[torch.Tensor], plan: _Plan, weights: list[torch.Tensor]) -> torch.Tensor:
    """sum_j dy_j @ W_j by cuBLAS, in dy's dtype."""
    with _no_autocast(dys[0]):
        dx = torch.matmul(dys[0], weights[0])
        for dy, w in zip(dys[1:], weights[1:]):
            dx.addmm_(dy, w)
    return dx


def _gemm_backward(dys: list[torch.Tensor], plan: _Plan, g: torch.Tensor | None, a: torch.Tensor | None,
                   k: int) -> torch.Tensor:
    """dx (M, K) = sum_j dy_j @ W_j + sum_j (g_j @ A_j) * mask_j in dy's dtype, on the Triton GEMM
    (``fused``, ``dequant``), or by cuBLAS where the path has no LoRA term to add (the LoRA paths on
    cuBLAS go through ``_lora_dx_da``)."""
    with _base_weights(plan, dys[0].dtype) as (base, weights, _):
        return _gemm_backward_on(dys, plan, g, a, k, base, weights)


def _gemm_backward_on(dys: list[torch.Tensor], plan: _Plan, g: torch.Tensor | None, a: torch.Tensor | None,
                      k: int, base: int, weights: list) -> torch.Tensor:
    m = dys[0].shape[0]
    ns = plan.out_features
    n_total = sum(ns)
    dtype = dys[0].dtype
    device = dys[0].device
    if base == _BASE_IN_OUT:
        if plan.has_lora:
            raise AssertionError("the LoRA term of a cuBLAS path is added by _lora_dx_da")
        return _base_product(dys, plan, weights)
    meta = _nf4_meta(plan, k)
    chunk = meta["CHUNK"]
    cfg = plan.bwd_config or default_gemm_config("backward", base, m, n_total, k, chunk, device)
    width = chunk if base == _BASE_NF4 else cfg.block_k
    steps = cdiv(n_total, cfg.block_n)
    split = max(1, min(cfg.split, steps))
    rows_per_split = cdiv(steps, split) * cfg.block_n
    split = cdiv(n_total, rows_per_split)
    shape = (m, k) if split == 1 else (split, m, k)
    dx = torch.empty(shape, dtype=dtype if split == 1 else torch.float32, device=device)
    ptrs, offsets = _weight_args(weights)
    r = a.shape[1] if a is not None else 1
    threshold, keep_scale = _dropout_args(plan)
    dy3 = _three(dys, dys[0])
    grid = (cdiv(m, cfg.block_m) * cdiv(k, width), split)
    launch_fitting(_lora_bwd_kernel, grid, (
        *dy3, g if g is not None else dys[0], a if a is not None else dys[0], dx, nf4_code(device), *ptrs,
        m, k, r, *_three(ns, 0), *offsets, *_three(plan.seeds, 0), threshold, keep_scale, rows_per_split,
        *(dy.stride(0) for dy in dy3), g.stride(0) if g is not None else 0, g.stride(1) if g is not None else 0,
        dx.stride(0) if split > 1 else 0, dx.stride(-2),
    ), dict(
        P=plan.projections, BASE=base, HAS_LORA=plan.has_lora, DROPOUT=plan.dropout, R_PAD=_r_pad(r),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DOT_PRECISION=_dot_precision(dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta,
    ))
    return dx if split == 1 else dx.sum(0).to(dtype)


def _lora_g(dys: list[torch.Tensor], b: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """g (P, M, R) = s_j * dy_j @ B_j in dy's dtype."""
    m = dys[0].shape[0]
    r = b.shape[1]
    p = plan.projections
    g = torch.empty((p, m, r), dtype=dys[0].dtype, device=b.device)
    r_pad = _r_pad(r)
    block_m, block_n = _row_block(m, r_pad, p, b.device)
    dy3 = _three(dys, dys[0])
    _lora_g_kernel[(cdiv(m, block_m) * p,)](
        *dy3, b, g, m, r, *_three(plan.out_features, 0), *_three(plan.scalings, 0.0), *(dy.stride(0) for dy in dy3),
        P=p, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(b.dtype), num_warps=4,
    )
    return g


# g and dB in one pass over dy (``_lora_g_db``) up to this padded rank: above it the fp32 partials of dB,
# one (Ncat, R) slab per row block, cost about what the second pass over dy saves
_G_DB_MAX_R_PAD = 32
_G_DB_MIN_M = 1024  # below, the two launches are small and the separate ones are kept


def _g_db_fused_ok(m: int, r: int) -> bool:
    return m >= _G_DB_MIN_M and _r_pad(r) <= _G_DB_MAX_R_PAD


G_DB_WIDE_SHARED = 98304  # shared memory a block of the 256-row g + dB build may need (r_pad 32 on sm_75)


def _g_db_block_m(m: int, device) -> int:
    """The g + dB kernel's row block: 256 at M >= 8192 where a block may hold its shared memory (49-61 KB on sm_80
    and later, 80-96 KB on sm_75, whose blocks hold 64 KB: launched there, it failed), else 128 (40 KB)."""
    if m < 8192:
        return 128
    # below sm_80 (T4: 80-96 KB of 64; a V100's 96 KB is the build's own need at r_pad 32) and where a block holds less
    if device.type == "cuda" and (capability(device) < (8, 0) or shared_per_block(device) < G_DB_WIDE_SHARED):
        return 128
    return 256


def _lora_g_db(dys: list[torch.Tensor], b: torch.Tensor, xa: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(g (P, M, R) in dy's dtype, dB (Ncat, R) fp32) from one read of dy (``_lora_g_db_kernel``).

    Row blocks of 256 rows at M >= 8192 (else 128) keep dB's partials to Ncat * R fp32 per block (at
    M = 16384, N = 3200, r = 16: 13 MB written and summed, against the 105 MB of the second pass over
    dy it saves); the columns are split too where the row blocks alone give fewer than two programs
    per SM, g's partials then being (splits, P, M, R) fp32."""
    m = dys[0].shape[0]
    r = b.shape[1]
    p = plan.projections
    ns = plan.out_features
    r_pad = _r_pad(r)
    block_m = _g_db_block_m(m, b.device)
    block_n = 64
    blocks = cdiv(m, block_m)
    widest = max(ns)
    col_blocks = cdiv(widest, block_n)
    dy3 = _three(dys, dys[0])
    db_parts = torch.empty((blocks, sum(ns), r), dtype=torch.float32, device=b.device)
    meta = dict(P=p, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(b.dtype),
                num_warps=8 if block_m == 256 else 4)

    def args(g_parts, cols_per_split):
        return (*dy3, b, xa, g_parts, db_parts, m, r, *_three(ns, 0), *_three(plan.scalings, 0.0), cols_per_split,
                *(dy.stride(0) for dy in dy3), p * m * r, db_parts.stride(0))

    wanted = _programs_wanted(b.device) // 2
    if _waves_on():  # column splits fitted to waves of what runs at once, as ``_row_splits`` does rows
        resident = resident_programs(
            _lora_g_db_kernel, ("g_db", dys[0].dtype, b.dtype, xa.dtype, *meta.items()), b.device,
            lambda: (args(torch.empty(1, dtype=torch.float32, device=b.device), block_n), meta))
        splits = _fitted_splits(col_blocks, blocks * p, wanted, resident)
    else:
        splits = max(1, min(col_blocks, cdiv(wanted, blocks * p)))
    cols_per_split = cdiv(col_blocks, splits) * block_n
    splits = cdiv(widest, cols_per_split)
    # every element of both is written once (a projection narrower than the widest stores zeros in g
    # for the column ranges past its end)
    g_parts = torch.empty((splits, p, m, r), dtype=torch.float32, device=b.device)
    _lora_g_db_kernel[(blocks * p, splits)](*args(g_parts, cols_per_split), **meta)
    g = (g_parts[0] if splits == 1 else g_parts.sum(0)).to(dys[0].dtype)
    return g, db_parts.sum(0)


def _lora_db(dys: list[torch.Tensor], xa: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """dB (Ncat, R) fp32 = s_j * dy_j.T @ xa_j, summed over row splits."""
    m = dys[0].shape[0]
    r = xa.shape[2]
    ns = plan.out_features
    r_pad = _r_pad(r)
    block_m, block_n = _skinny_blocks(m, r_pad)
    block_m = max(block_m, 32)
    tiles = sum(cdiv(n, block_n) for n in ns)
    dy3 = _three(dys, dys[0])
    meta = dict(R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=_dot_precision(xa.dtype), num_warps=4)

    def args(parts, rows_per_split):
        return (*dy3, xa, parts, m, r, *_three(ns, 0), *_three(plan.scalings, 0.0), rows_per_split,
                *(dy.stride(0) for dy in dy3), sum(ns) * r)

    split, rows_per_split = _reduction_splits(_lora_db_kernel, ("db", dys[0].dtype, xa.dtype, *meta.items()), args,
                                              meta, m, block_m, tiles, plan, xa.device)
    parts = torch.empty((split, sum(ns), r), dtype=torch.float32, device=xa.device)
    _lora_db_kernel[(tiles, split)](*args(parts, rows_per_split), **meta)
    return parts[0] if split == 1 else parts.sum(0)


def _lora_da(x: torch.Tensor, g: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """dA (P, R, K) fp32 = g_j.T @ dropout_j(x), summed over row splits."""
    m, k = x.shape
    p, _, r = g.shape
    r_pad = _r_pad(r)
    block_m, block_k = _skinny_blocks(m, r_pad)
    block_m = max(block_m, 32)
    tiles = cdiv(k, block_k) * p
    threshold, keep_scale = _dropout_args(plan)
    meta = dict(P=p, DROPOUT=plan.dropout, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k,
                DOT_PRECISION=_dot_precision(x.dtype), num_warps=4)

    def args(parts, rows_per_split):
        return (x, g, parts, m, k, r, *_three(plan.seeds, 0), threshold, keep_scale, rows_per_split,
                x.stride(0), x.stride(1), g.stride(0), g.stride(1), p * r * k)

    split, rows_per_split = _reduction_splits(
        _lora_da_kernel, ("da", x.dtype, g.dtype, x.stride(1) == 1, *meta.items()), args, meta, m, block_m, tiles, plan,
        x.device)
    parts = torch.empty((split, p, r, k), dtype=torch.float32, device=x.device)
    _lora_da_kernel[(tiles, split)](*args(parts, rows_per_split), **meta)
    return parts[0] if split == 1 else parts.sum(0)


def _lora_dx_da(dx_in: torch.Tensor, x: torch.Tensor, g: torch.Tensor, a: torch.Tensor, plan: _Plan,
                need_da: bool, dx: torch.Tensor) -> torch.Tensor | None:
    """dx = dx_in + sum_j (g_j @ A_j) * mask_j written into ``dx`` (which may be dx_in), and dA (P, R, K)
    fp32 summed over row splits when ``need_da`` (else None): one pass for both (``_lora_dx_da_kernel``)."""
    m, k = x.shape
    p, r, _ = a.shape
    r_pad = _r_pad(r)
    # 32-row steps by at most 128 columns: at 64 rows the sm_90 build (triton 3.9) spills 48-528 bytes
    # of stack for r 16 and 64, P 1 and 3, as do 256 columns (the small-M width of the other launches);
    # these do not, and each element's mask is hashed once (bench/sass.py lora_dx_da)
    block_k = min(128, _skinny_blocks(m, r_pad)[1])
    block_m = 32
    tiles = cdiv(k, block_k)
    threshold, keep_scale = _dropout_args(plan)
    meta = dict(P=p, DROPOUT=plan.dropout, NEED_DA=need_da, R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k,
                DOT_PRECISION=_dot_precision(x.dtype), num_warps=8 if p > 1 else 4)

    def args(parts, rows_per_split):
        return (dx_in, dx, x, g, a, parts if need_da else dx, m, k, r, *_three(plan.seeds, 0), threshold,
                keep_scale, rows_per_split, dx_in.stride(0), dx.stride(0), x.stride(0), x.stride(1), g.stride(0),
                g.stride(1), p * r * k if need_da else 0)

    split, rows_per_split = _reduction_splits(
        _lora_dx_da_kernel, ("dx_da", dx.dtype, x.dtype, g.dtype, x.stride(1) == 1, *meta.items()), args, meta, m,
        block_m, tiles, plan, x.device)
    parts = torch.empty((split, p, r, k), dtype=torch.float32, device=x.device) if need_da else None
    _lora_dx_da_kernel[(tiles, split)](*args(parts, rows_per_split), **meta)
    if not need_da:
        return None
    return parts[0] if split == 1 else parts.sum(0)


def _tma_ok(x: torch.Tensor, weights, adapters) -> bool:
    """Whether the ``tma`` path can run: Triton with tensor descriptors, rows of 16 bytes' multiples
    (x, W, y, dx) and a rank its epilogues take (``lora_tma.MAX_RANK``)."""
    if triton is None:
        return False
    from bezoar_kernels import lora_tma
    r = adapters[0].lora_a.shape[0] if adapters is not None else 0
    return lora_tma.available() and lora_tma.shapes_ok(x.shape[-1], sum(w.shape[0] for w in weights), x.dtype, r)


def _check_configs(path: str, fwd_config, bwd_config) -> None:
    """Tile configs must be of the path's kind: ``lora_tma.TmaConfig`` for "tma", ``GemmConfig`` otherwise."""
    from bezoar_kernels import lora_tma
    want = lora_tma.TmaConfig if path == "tma" else GemmConfig
    for name, cfg in (("fwd_config", fwd_config), ("bwd_config", bwd_config)):
        if cfg is not None and not isinstance(cfg, want):
            raise TypeError(f"lora path {path!r}: {name} must be a {want.__name__}, got {type(cfg).__name__}")


def _tma_weights(plan: _Plan, dtype: torch.dtype) -> torch.Tensor:
    """The (Ncat, K) stacked base weights in ``dtype`` for the tma GEMMs: NF4 dequantized into the
    reused buffer, dense ones cast (and concatenated for more than one projection)."""
    if plan.nf4:
        return dequantized(plan.weights, dtype)
    dense = [w.detach().to(dtype) for w in plan.weights]
    return _described(dense[0]) if len(dense) == 1 else torch.cat(dense)


def _described(t: torch.Tensor) -> torch.Tensor:
    """t itself where a tensor descriptor can take it (unit last stride, 16-byte aligned base and rows,
    rows apart), else a fresh contiguous copy (``contiguous()`` would return a misaligned t as it is)."""
    from bezoar_kernels import lora_tma
    return t if lora_tma._aligned(t) else t.clone(memory_format=torch.contiguous_format)


def _joined(dys: list[torch.Tensor]) -> torch.Tensor:
    """The P upstream gradients as one (M, Ncat) matrix: a view where they are adjacent column slices
    of one buffer, else a concatenation."""
    if len(dys) == 1:
        return _described(dys[0])
    first = dys[0]
    start, ok = 0, True
    for dy in dys:
        ok = ok and dy.stride() == first.stride() and dy.data_ptr() == first.data_ptr() + start * dy.element_size()
        start += dy.shape[1]
    if ok and first.stride(0) >= start:
        return _described(first.as_strided((first.shape[0], start), first.stride()))
    return torch.cat(dys, dim=1)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) view with a contiguous last dim; copies only when no such view exists."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def lora_in_dtype(lora: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A stacked (P, R, K), B concatenated (Ncat, R)) in the compute dtype from ``lora = (A_0, B_0, A_1,
    B_1, ...)`` (fp32 masters, as a rule): each made by one stack / cat that converts as it copies, where
    converting each tensor first and then stacking took 2P + 2 launches (a training step's small kernels).
    On CUDA a cat whose inputs are not of its output's dtype copies each input on its own (torch's batched
    cat kernel needs one dtype: ``cat_out_cuda``), so with fp32 masters that is P + P launches, not 2: the
    conversion of q/k/v takes 6 (8 before), of one projection 2 (4 before)."""
    first_a, first_b = lora[0], lora[1]
    a = torch.empty((len(lora) // 2, *first_a.shape), dtype=dtype, device=first_a.device)
    b = torch.empty((sum(t.shape[0] for t in lora[1::2]), first_b.shape[1]), dtype=dtype, device=first_b.device)
    torch.stack([t.detach() for t in lora[0::2]], out=a)
    torch.cat([t.detach() for t in lora[1::2]], out=b)
    return a, b


class LoRAFunction(torch.autograd.Function):
    """P = 1 or 3 projections of one x: ``y_j = x @ W_j.T + s_j * dropout_j(x) @ A_j.T @ B_j.T``.

    ``forward(ctx, x, plan, *lora)`` with ``lora = (A_0, B_0, A_1, B_1, ...)`` (empty without
    adapters) returns the P outputs, column slices of one (M, sum N_j) buffer. The frozen base
    weights ride in ``plan`` (constants of the graph, as in ``NF4MatmulFunction``); x, xa, the
    compute-dtype A and B, and on the concat path its LoRA block are saved. The dropout mask is
    recomputed from the seeds in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: _Plan, *lora: torch.Tensor):
        k = x.shape[-1]
        lead = x.shape[:-1]
        x2d = x.reshape(-1, k)
        m = x2d.shape[0]
        ns = plan.out_features
        dtype = x.dtype
        ctx.plan = plan
        ctx.lead = lead
        ctx.lora_dtypes = [t.dtype for t in lora]
        a = b = xa = block = None
        if plan.has_lora:
            a, b = lora_in_dtype(lora, dtype)
        if m == 0:
            y = x2d.new_empty((0, sum(ns)))
        elif plan.path in ("gemv", "small"):  # inference at small M: ``_apply`` checked the weights and autograd
            y = torch.empty((m, sum(ns)), dtype=dtype, device=x.device)
            xc = x2d.contiguous()
            start = 0
            for w, n in zip(plan.weights, ns):
                if plan.path == "gemv":
                    nf4_gemv_forward(xc, w, out=y[:, start: start + n])
                else:  # the NF4 fused forward (its own tiles and decode)
                    y[:, start: start + n] = nf4_matmul_forward(xc, w, "fused")
                start += n
            if plan.has_lora:
                xa = _lora_down(x2d, a, plan)
                y = _gemm_forward(x2d, plan, xa, b, base_y=y)
        elif plan.path == "merged":
            # no dropout: y = x @ (W + s B A).T, one GEMM with no LoRA pass over y; where dB needs xa, the
            # A rows below W' give it from the same GEMM (no pass over x), copied out (P * r columns) so
            # that saving it does not keep y's storage alive until the backward. needs_input_grad is set
            # under no_grad too (B requires grad): the grad mode of the call decides
            need_xa = plan.grad_enabled and any(ctx.needs_input_grad[3::2])
            with _no_autocast(x2d):
                y = torch.matmul(x2d, merged_weights(plan, a, b, dtype, "rows" if need_xa else None).t())
            if need_xa:
                xa = _lora_columns(y, sum(ns), plan.projections, a.shape[1]).clone(memory_format=torch.contiguous_format)
        elif plan.path == "tma":
            from bezoar_kernels import lora_tma
            if plan.has_lora:
                xa = _lora_down(x2d, a, plan)
            y = lora_tma.tma_forward(_described(x2d), _tma_weights(plan, dtype), xa, b, ns, plan.scalings,
                                     plan.fwd_config or lora_tma.DEFAULT_FWD)
        elif plan.path == "concat" and _concat_ok(plan, k):
            wide = _wide_input(m, k, plan.projections, a.shape[1], dtype, x.device)
            xa = _lora_down(x2d, a, plan, wide)
            block = _concat_lora_block(plan, b, wide.shape[1] - k)
            y = _concat_forward(wide, block, plan, k)
        else:
            if plan.has_lora:
                xa = _lora_down(x2d, a, plan)
            y = _gemm_forward(x2d, plan, xa, b)
        ctx.save_for_backward(x2d, xa, a, b, block)
        outputs, start = [], 0
        for n in ns:
            outputs.append(y[:, start: start + n].view(*lead, n))
            start += n
        return tuple(outputs)

    @staticmethod
    @once_differentiable  # the backward runs Triton kernels: no graph for a second derivative
    def backward(ctx, *dys: torch.Tensor):
        plan = ctx.plan
        x2d, xa, a, b, block = ctx.saved_tensors
        m, k = x2d.shape
        need_x = ctx.needs_input_grad[0]
        need_lora = ctx.needs_input_grad[2:]
        dx = None
        grads = [None] * len(need_lora)
        if m == 0:
            if need_x:
                dx = x2d.new_zeros(ctx.lead + (k,))
            for i, t in enumerate(need_lora):
                if t:
                    shape = a.shape[1:] if i % 2 == 0 else (plan.out_features[i // 2], a.shape[1])
                    grads[i] = torch.zeros(shape, dtype=ctx.lora_dtypes[i], device=x2d.device)
            return (dx, None, *grads)
        dys = [_rows(dy, n) for dy, n in zip(dys, plan.out_features)]
        need_da = plan.has_lora and any(need_lora[0::2])
        need_db = plan.has_lora and any(need_lora[1::2])
        da = db = None

        def g_and_db():
            """g, and dB from the same pass over dy where that pays (``_lora_g_db``), else None for dB."""
            if need_db and _g_db_fused_ok(m, a.shape[1]):
                return _lora_g_db(dys, b, xa, plan)
            return _lora_g(dys, b, plan), None

        if plan.path == "merged":
            # dx = dy @ (W + s B A): the LoRA part of dx rides in the GEMM, no pass over dx; where dA needs
            # g, the s B columns beside W' give it from the same GEMM (no pass over dy)
            g = None
            if need_x:
                merged = merged_weights(plan, a, b, dys[0].dtype, "cols" if need_da else None)
                wide = _base_product(dys, plan, _split_rows(merged, plan.out_features))
                if need_da:
                    g = _lora_columns(wide, k, plan.projections, a.shape[1])
                dx = wide[:, :k].view(*ctx.lead, k)
            elif need_da:
                g = _lora_g(dys, b, plan)
        elif plan.path == "tma":
            # dx by the tma GEMM with the masked LoRA term in its epilogue, and dA beside it (atomics)
            # unless the config keeps the separate dA pass
            from bezoar_kernels import lora_tma
            g, db = g_and_db() if plan.has_lora else (None, None)
            if need_x:
                cfg = plan.bwd_config or lora_tma.default_bwd(plan.projections, a.shape[1] if a is not None else 1)
                if not need_da and cfg.fuse_da:
                    cfg = dataclasses.replace(cfg, fuse_da=False)
                threshold, keep_scale = _dropout_args(plan)
                dx2d, da = lora_tma.tma_backward(_joined(dys), _tma_weights(plan, dys[0].dtype), _described(x2d), g,
                                                 a, plan.seeds, threshold, keep_scale, plan.dropout, cfg)
                dx = dx2d.view(*ctx.lead, k)
        elif need_x and plan.has_lora and plan.path in ("cublas", "concat"):
            # the base product from cuBLAS, then one pass adds the LoRA term to dx and reduces dA
            if block is not None:  # the concat forward ran
                base_dx, g = _concat_backward(dys, block, plan, k, a.shape[1])  # g from the wide product
                dx2d = torch.empty((m, k), dtype=base_dx.dtype, device=base_dx.device)
            else:
                g, db = g_and_db()
                with _base_weights(plan, dys[0].dtype) as (_, weights, _):
                    base_dx = dx2d = _base_product(dys, plan, weights)
            da = _lora_dx_da(base_dx, x2d, g, a, plan, need_da, dx2d)
            dx = dx2d.view(*ctx.lead, k)
        else:
            g, db = g_and_db() if plan.has_lora else (None, None)
            if need_x:
                dx = _gemm_backward(dys, plan, g, a, k).view(*ctx.lead, k)
        if need_da:
            if da is None:
                da = _lora_da(x2d, g, plan)
            for j in range(plan.projections):
                if need_lora[2 * j]:
                    grads[2 * j] = da[j].to(ctx.lora_dtypes[2 * j])
        if need_db:
            if db is None:
                db = _lora_db(dys, xa, plan)
            start = 0
            for j, n in enumerate(plan.out_features):
                if need_lora[2 * j + 1]:
                    grads[2 * j + 1] = db[start: start + n].to(ctx.lora_dtypes[2 * j + 1])
                start += n
        return (dx, None, *grads)


# ----------------------------------------------------------------------------- public entry points


def _kernel_rank_ok(adapters) -> bool:
    return adapters is None or adapters[0].lora_a.shape[0] <= MAX_KERNEL_RANK


def _needs_grad(x, adapters) -> bool:
    """Whether this call's autograd needs a backward: grad mode on and x or an adapter requiring grad."""
    return torch.is_grad_enabled() and (x.requires_grad or any(
        t.requires_grad for ad in (adapters or ()) for t in (ad.lora_a, ad.lora_b)))


def _gemv_ok(x, weights, adapters, dropout_p) -> bool:
    """The gemv path is forward-only and unmasked: NF4 weights it takes, no dropout, no gradient."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (not _needs_grad(x, adapters) and dropout_p == 0
            and all(isinstance(w, NF4Weight) and gemv_supported(m, w) for w in weights))


def _small_ok(x, weights, adapters, dropout_p) -> bool:
    """The ``small`` inference path: NF4 weights, no dropout, no gradient (its forward has no backward)."""
    return not _needs_grad(x, adapters) and dropout_p == 0 and all(isinstance(w, NF4Weight) for w in weights)


def _apply(x, weights, adapters, dropout_p, training, seeds, path, fwd_config=None, bwd_config=None, splits=None):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    dropout_p = float(dropout_p) if (training and adapters is not None) else 0.0
    resolved = resolve_path(path, m, adapters is not None, x.device)
    if resolved == "gemv" and not _gemv_ok(x, weights, adapters, dropout_p):
        if path == "gemv":
            raise ValueError("lora path 'gemv' needs NF4 weights the gemv kernel takes (M <= 8, K a multiple "
                             "of the blocksize), no dropout and no gradient")
        resolved = "fused" if m <= fused_max_m(x.device) else (
            large_m_path(x.device) if adapters is not None else "cublas")
    if ((path or "auto") == "auto" and resolved in ("cublas", "concat", "dequant", "tma")
            and 0 < m <= nf4_fused_max_m(x.device) and _small_ok(x, weights, adapters, dropout_p)):
        resolved = "small"  # inference at small M: the NF4 fused forward for the base, then the LoRA launches
    merge_ok = dropout_p == 0 and _merge_ok(weights, adapters, x.shape[-1])
    if resolved == "merged" and not merge_ok:
        raise ValueError("lora path 'merged' needs NF4 weights with K a multiple of the blocksize, an adapter "
                         "and no dropout")
    if resolved == "tma" and not _tma_ok(x, weights, adapters):
        if path == "tma":
            from bezoar_kernels import lora_tma
            r = adapters[0].lora_a.shape[0] if adapters is not None else 0
            raise ValueError("lora path 'tma' needs K and the summed output features to be multiples of "
                             f"{16 // x.element_size()} (rows of 16 bytes for the tensor descriptors), a rank of at "
                             f"most {lora_tma.MAX_RANK} and Triton with tensor descriptors; got K={x.shape[-1]}, "
                             f"N={sum(w.shape[0] for w in weights)}, r={r}, {x.dtype}")
        resolved = "cublas"
    if (path or "auto") == "auto" and merge_ok and resolved in ("cublas", "concat", "dequant", "tma"):
        resolved = "merged"  # without a mask the LoRA term folds into the weight: strictly less work
    _check_configs(resolved, fwd_config, bwd_config)  # against the path that runs
    plan = _Plan(
        weights=tuple(weights),
        scalings=tuple(float(ad.scaling) for ad in adapters) if adapters is not None else (),
        seeds=tuple(seed31(s) for s in seeds),
        dropout_p=dropout_p,
        path=resolved,
        fwd_config=fwd_config, bwd_config=bwd_config, splits=splits, grad_enabled=torch.is_grad_enabled(),
    )
    lora = [t for ad in adapters for t in (ad.lora_a, ad.lora_b)] if adapters is not None else []
    return LoRAFunction.apply(x, plan, *lora)


def lora_linear_triton(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                       dropout_p: float = 0.0, training: bool = False, seed: int = 0, path: str | None = None,
                       fwd_config: GemmConfig | None = None, bwd_config: GemmConfig | None = None,
                       splits: int | None = None) -> torch.Tensor:
    """``lora_linear`` with the Triton kernels; the configs override the tile heuristics (bench, tests)."""
    adapters = [Adapter(lora_a, lora_b, float(scaling))]
    _check(x, [weight], adapters, dropout_p, "lora_linear")
    return _apply(x, [weight], adapters, dropout_p, training, [seed], path, fwd_config, bwd_config, splits)[0]


def lora_linear(x: torch.Tensor, weight, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = False, seed: int = 0, path: str | None = None) -> torch.Tensor:
    """``x @ W.T + scaling * (dropout(x) @ A.T) @ B.T``; x (..., K) -> (..., N) in x's dtype.

    ``weight``: an ``NF4Weight`` or a dense (N, K) tensor, frozen. ``lora_a`` (r, K), ``lora_b``
    (N, r): any float dtype (fp32 masters), computed in x's dtype, gradients in their own dtype.
    Dropout with probability ``dropout_p`` applies when ``training``; its mask is a function of
    ``seed`` and the element's (row, column) in x viewed as (M, K). ``path``: "auto" (by M, dropout
    and autograd), "fused", "dequant", "cublas", "concat", "tma", "gemv" or "merged" (see the module
    docstring). Triton or torch by dispatch.
    """
    tensors = [x] + ([weight.packed] if isinstance(weight, NF4Weight) else [weight])
    if dispatch.use_triton(*tensors) and lora_a.shape[0] <= MAX_KERNEL_RANK:  # larger ranks: the reference
        return lora_linear_triton(x, weight, lora_a, lora_b, scaling, dropout_p, training, seed, path)
    return lora_linear_reference(x, weight, lora_a, lora_b, scaling, dropout_p, training, seed, path)


def _check_qkv_args(x, weights, adapters, dropout_p, seeds):
    if len(weights) != 3:
        raise ValueError(f"lora_qkv: expected three weights (q, k, v), got {len(weights)}")
    if adapters is not None and len(adapters) != 3:
        raise ValueError(f"lora_qkv: expected three adapters (q, k, v) or None, got {len(adapters)}")
    if len(seeds) != 3:
        raise ValueError(f"lora_qkv: expected three seeds, got {len(seeds)}")
    _check(x, weights, adapters, dropout_p, "lora_qkv")


def lora_qkv_triton(x: torch.Tensor, weights: Sequence, adapters: Sequence[Adapter] | None = None,
                    dropout_p: float = 0.0, training: bool = False, seeds: Sequence[int] = (0, 0, 0),
                    path: str | None = None, fwd_config: GemmConfig | None = None,
                    bwd_config: GemmConfig | None = None, splits: int | None = None) -> tuple[torch.Tensor, ...]:
    """``lora_qkv`` with the Triton kernels."""
    _check_qkv_args(x, weights, adapters, dropout_p, seeds)
    return _apply(x, weights, adapters, dropout_p, training, seeds, path, fwd_config, bwd_config, splits)


def lora_qkv(x: torch.Tensor, weights: Sequence, adapters: Sequence[Adapter] | None = None, dropout_p: float = 0.0,
             training: bool = False, seeds: Sequence[int] = (0, 0, 0),
             path: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v = the three projections of one x, each ``x @ W_j.T (+ s_j * dropout_j(x) @ A_j.T @ B_j.T)``.

    ``weights``: three NF4Weights (one blocksize and double-quant setting) or three dense tensors,
    with one K. ``adapters``: three ``Adapter``s of one rank, or None for the base projections
    alone. ``seeds``: one per projection (independent masks). Returns (..., N_j) tensors, column
    slices of one buffer. Triton or torch by dispatch.
    """
    first = weights[0] if weights else None
    tensors = [x] + ([first.packed] if isinstance(first, NF4Weight) else [first] if first is not None else [])
    if dispatch.use_triton(*tensors) and _kernel_rank_ok(adapters):
        return lora_qkv_triton(x, weights, adapters, dropout_p, training, seeds, path)
    return lora_qkv_reference(x, weights, adapters, dropout_p, training, seeds, path)


def draw_seed(count: int = 1) -> list[int]:
    """``count`` dropout seeds from torch's (CPU) generator: reproducible under torch.manual_seed,
    restored with torch's RNG state on resume and by activation checkpointing's recompute, and
    drawn on the host (no device sync)."""
    return [int(v) for v in torch.randint(0, 2**31 - 1, (count,)).tolist()]


__all__ = [
    "Adapter", "GemmConfig", "LoRAFunction", "PATHS", "default_gemm_config", "dequantized", "draw_seed",
    "dropout_threshold", "large_m_path", "lora_dropout_mask", "lora_linear", "lora_linear_reference",
    "lora_linear_triton", "lora_qkv", "lora_qkv_reference", "lora_qkv_triton", "resolve_path",
]
