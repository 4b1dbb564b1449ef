"""NF4: the 4-bit NormalFloat weight format of QLoRA, byte-compatible with bitsandbytes.

Format (what bitsandbytes 0.50 writes for ``quantize_4bit(quant_type="nf4",
compress_statistics=True)``, and what transformers serializes):

* the tensor is flattened and cut into blocks of ``blocksize`` values (64 or 128); the last
  block may be partial. ``absmax[b] = max |w|`` over block ``b``;
* each value is scaled into [-1, 1] (``w * (1 / absmax)``; the partial last block divides,
  ``w / absmax``) and replaced by the index of the nearest of the 16 NF4 code values
  (``NF4_CODE``: quantiles of N(0, 1), sorted, with an exact 0). "Nearest" is decided by the
  midpoints between neighbouring codes; a value exactly on a midpoint takes the lower code;
* two indices share a byte, the first in the high nibble; an odd count is padded with the
  index of 0.0 (7);
* double quantization (``double_quant=True``): ``offset = mean(absmax)``, and
  ``absmax - offset`` is quantized again with 8-bit blockwise quantization over blocks of 256
  against the signed dynamic map (``dynamic_code()``), giving uint8 ``absmax``, fp32
  ``nested_absmax`` (one per 256 blocks) and the scalar ``offset``. The 8-bit rounding is
  bitsandbytes' CPU rounding: the scaled value ``v`` indexes a 65536-entry table at
  ``int(((v + 1) * 0.5) * 65535 + 0.5)`` whose entries are the nearest code of each grid
  point. (bitsandbytes' CUDA kernel rounds a few of those values to the other neighbour; both
  decode with the same formula, so either is a valid file.)

Dequantization: ``absmax = nested_code[absmax_q] * nested_absmax[b // 256] + offset`` and
``w = NF4_CODE[nibble] * absmax`` in fp32, rounded once to the output dtype.

Layers: the Triton kernels (quantize 4-bit, dequantize), their launchers, and torch
references with the same signatures (the CPU path and the test oracle). The 8-bit
quantization of absmax (a tensor 64x smaller than the weight) runs in torch on every device.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from bezoar_kernels import dispatch, tuning
from bezoar_kernels.launch import cdiv, next_power_of_2

try:  # triton is optional: the torch reference needs none of it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# The 16 NF4 code values as float32 (QLoRA, appendix E; the values bitsandbytes hard-codes).
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_ZERO_INDEX = 7
NESTED_BLOCKSIZE = 256
SUPPORTED_BLOCKSIZES = (64, 128)
_LUT_SIZE = 65536


# ----------------------------------------------------------------------------- code tables


@functools.lru_cache(maxsize=None)
def _nf4_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2  # fp32, as the rounding decisions are made in fp32
    return code.to(device), midpoints.to(device)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 values (fp32) on ``device``; shared, do not modify."""
    return _nf4_tables(torch.device(device))[0]


@functools.lru_cache(maxsize=None)
def _nf4_byte_table(device: torch.device) -> torch.Tensor:
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    bits = code.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    byte = torch.arange(256)
    return (bits[byte >> 4] | (bits[byte & 15] << 32)).to(device)


def nf4_byte_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """256 int64 entries, one per packed byte: the fp32 bits of the byte's first value (high nibble)
    in the low 32 bits and of its second value (low nibble) in the high 32 bits, so one 8-byte load
    decodes both; shared, do not modify."""
    return _nf4_byte_table(torch.device(device))


@functools.lru_cache(maxsize=None)
def _nf4_pair_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    byte = torch.arange(256)
    word = bits[byte >> 4] | (bits[byte & 15] << 16)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32).to(device)


def nf4_pair_table(device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """256 int32 entries, one per packed byte: the byte's two NF4 code values (unscaled) rounded to
    ``dtype`` (bf16 or fp16), the first (high nibble) in the low 16 bits: one 4-byte load gives both
    values as tensor-core operands, to be scaled by the block's absmax after the product; shared, do
    not modify."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_pair_table: dtype must be bfloat16 or float16, got {dtype}")
    return _nf4_pair_table(torch.device(device), dtype)


def _signed32(value: int) -> int:
    return value - 2 ** 32 if value >= 2 ** 31 else value


def _bf16_code_planes() -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The 16 codes rounded to bf16, split into byte planes: (high bytes, low bytes), each as four
    signed int32 words with codes 4q .. 4q + 3 in word q, code 4q in its lowest byte."""
    bits = torch.tensor(NF4_CODE, dtype=torch.float32).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    planes = []
    for shift in (8, 0):
        plane = [(int(b) >> shift) & 0xFF for b in bits]
        planes.append(tuple(_signed32(sum(plane[4 * q + i] << (8 * i) for i in range(4))) for q in range(4)))
    return planes[0], planes[1]


# Register decode of a packed int32 word (``_nf4_word_bf16``): the code bytes it permutes, and the
# selectors that interleave a code's low and high bytes into bf16 pairs (see there).
BF16_CODE_HIGH, BF16_CODE_LOW = _bf16_code_planes()
PAIR_EVEN_FIRST = 0x4051  # [low(nibble 1), high(nibble 1), low(nibble 0), high(nibble 0)]
PAIR_ODD_FIRST = 0x6273  # the same for nibbles 3 and 2


@functools.lru_cache(maxsize=None)
def _nf4_code_planes(device: torch.device) -> torch.Tensor:
    return torch.tensor(BF16_CODE_HIGH + BF16_CODE_LOW, dtype=torch.int32).to(device)


def nf4_code_planes(device: torch.device | str = "cpu") -> torch.Tensor:
    """8 int32: the high bytes of the 16 codes rounded to bf16 (codes 4q .. 4q + 3 in word q, the first
    in the lowest byte), then their low bytes; the register decode's lookup tables (``_nf4_word_bf16``);
    shared, do not modify."""
    return _nf4_code_planes(torch.device(device))


def nf4_midpoints(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 15 fp32 decision boundaries between neighbouring NF4 values."""
    return _nf4_tables(torch.device(device))[1]


def _build_dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2015) bitsandbytes uses for double quantization.

    Seven decades 10^-6 .. 10^0; decade i holds 2^i values, the midpoints of an even split of
    [0.1, 1] into 2^i steps, scaled by 10^(i-6), with both signs; plus 0 and 1: 2*127 + 2 = 256
    values, sorted. Built with the same fp32 steps as bitsandbytes so the values agree bit for bit.
    """
    values = [0.0, 1.0]
    for decade in range(7):
        edges = torch.linspace(0.1, 1.0, 2**decade + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (decade - 6)
        values += (scale * mids).tolist()
        values += (-scale * mids).tolist()
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    code = _build_dynamic_code()
    # Grid point j stands for 2j/65535 - 1; its entry is the index of the nearest code (ties low).
    grid = torch.arange(_LUT_SIZE, dtype=torch.float32) / (_LUT_SIZE - 1) * 2.0 - 1.0
    lut = torch.bucketize(grid, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return code.to(device), lut.to(device)


def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-value signed dynamic map (fp32) on ``device``; shared, do not modify."""
    return _dynamic_tables(torch.device(device))[0]


# ----------------------------------------------------------------------------- the weight


@dataclasses.dataclass
class NF4Weight:
    """A tensor quantized to NF4, in bitsandbytes' layout.

    packed:        uint8 (ceil(numel / 2),), two 4-bit indices per byte, first in the high nibble
    absmax:        uint8 (num_blocks,) with double quantization, else fp32 (num_blocks,)
    shape, dtype:  the original tensor's shape and dtype
    blocksize:     values per absmax block (64 or 128)
    nested_absmax: fp32 (ceil(num_blocks / 256),) scales of the 8-bit absmax (double quant only)
    nested_code:   fp32 (256,) the 8-bit code the absmax indices point into (double quant only)
    offset:        mean of the fp32 absmax, subtracted before the 8-bit quantization (double quant)
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        if self.blocksize not in SUPPORTED_BLOCKSIZES:
            raise ValueError(f"NF4 blocksize {self.blocksize}: supported are {SUPPORTED_BLOCKSIZES}")
        nested = (self.nested_absmax is not None, self.nested_code is not None, self.offset is not None)
        if any(nested) and not all(nested):
            raise ValueError("NF4Weight: nested_absmax, nested_code and offset come together or not at all")
        if any(t.device != self.packed.device for t in self.tensors()):
            raise ValueError("NF4Weight: all tensors must be on one device, got "
                             + ", ".join(str(t.device) for t in self.tensors()))
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 1:
            raise ValueError(f"NF4Weight.packed must be 1-D uint8, got {self.packed.dtype} {tuple(self.packed.shape)}")
        if not self.packed.is_contiguous():  # every kernel indexes the bytes flat
            raise ValueError(f"NF4Weight.packed must be contiguous, got stride {self.packed.stride()}")
        if self.packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"NF4Weight.packed has {self.packed.numel()} bytes, shape {self.shape} needs "
                             f"{(self.numel + 1) // 2}")
        want = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != want or self.absmax.shape != (self.num_blocks,):
            raise ValueError(f"NF4Weight.absmax must be {want} ({self.num_blocks},), got "
                             f"{self.absmax.dtype} {tuple(self.absmax.shape)}")
        if self.double_quant:
            n_nested = -(-self.num_blocks // NESTED_BLOCKSIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.shape != (n_nested,):
                raise ValueError(f"NF4Weight.nested_absmax must be float32 ({n_nested},), got "
                                 f"{self.nested_absmax.dtype} {tuple(self.nested_absmax.shape)}")
            if self.nested_code.dtype != torch.float32 or self.nested_code.shape != (256,):
                raise ValueError(f"NF4Weight.nested_code must be float32 (256,), got "
                                 f"{self.nested_code.dtype} {tuple(self.nested_code.shape)}")
            self.offset = float(self.offset)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.absmax, self.nested_absmax, self.nested_code) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def to(self, device: torch.device | str) -> NF4Weight:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return dataclasses.replace(self, packed=move(self.packed), absmax=move(self.absmax),
                                   nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))


def _check_quantize_args(weight: torch.Tensor, blocksize: int) -> None:
    if blocksize not in SUPPORTED_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize {blocksize}: supported are {SUPPORTED_BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 quantization takes float32/float16/bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("NF4 quantization of an empty tensor")
    # A NaN or inf has no NF4 code: the torch path would end in an index error (double quant) or a NaN
    # absmax, and the Triton kernel's block maximum skips NaN and would store a finite value in its place.
    low, high = torch.aminmax(weight.detach().reshape(-1))  # one read, no temporary; NaN propagates
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise ValueError("NF4 quantization: the weight holds values that are not finite (NaN or inf)")


# ----------------------------------------------------------------------------- 8-bit absmax (torch, every device)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Double quantization of fp32 absmax: returns (uint8 indices, nested_absmax, nested_code, offset)."""
    code, lut = _dynamic_tables(absmax.device)
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    n_blocks = -(-n // NESTED_BLOCKSIZE)
    padded = torch.nn.functional.pad(centred, (0, n_blocks * NESTED_BLOCKSIZE - n)).view(n_blocks, NESTED_BLOCKSIZE)
    scale = padded.abs().amax(dim=1)
    inverse = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)  # keeps an all-zero block finite
    scaled = (padded * inverse[:, None]).clamp(-1.0, 1.0)
    # Same fp32 steps as bitsandbytes' CPU quantizer, one rounding per step (no fused multiply-add).
    grid_index = ((((scaled + 1.0) * 0.5) * float(_LUT_SIZE - 1)) + 0.5).to(torch.int64)
    indices = lut[grid_index]
    indices = torch.where(scale[:, None] == 0, torch.zeros_like(indices), indices)  # an all-zero block: index 0
    return indices.reshape(-1)[:n].contiguous(), scale, code.clone(), float(offset)


def decode_absmax(weight: NF4Weight) -> torch.Tensor:
    """The fp32 absmax per block (decodes the 8-bit double quantization when present)."""
    if not weight.double_quant:
        return weight.absmax
    block = torch.arange(weight.num_blocks, device=weight.device) // NESTED_BLOCKSIZE
    absmax = weight.nested_code[weight.absmax.long()] * weight.nested_absmax[block]
    return absmax + torch.tensor(weight.offset, dtype=torch.float32, device=weight.device)


def _finish(packed: torch.Tensor, absmax: torch.Tensor, weight: torch.Tensor, blocksize: int,
            double_quant: bool) -> NF4Weight:
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(weight.shape), weight.dtype, blocksize)
    q, nested_absmax, nested_code, offset = quantize_absmax(absmax)
    return NF4Weight(packed, q, tuple(weight.shape), weight.dtype, blocksize, nested_absmax, nested_code, offset)


# ----------------------------------------------------------------------------- torch reference


_QUANTIZE_CHUNK = 1 << 20  # elements per step of the torch quantizer: bounds its temporaries to a few MB


def _quantize_span(values: torch.Tensor, blocksize: int, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 indices (uint8, one per element) and fp32 absmax for consecutive blocks of ``values`` (fp32, 1-D);
    a shorter last block divides by its own absmax. Division uses absmax clamped at 1e-38; whole blocks
    store it unclamped (an all-zero block keeps 0) and the partial block stores it clamped, as bitsandbytes."""
    full = values.numel() - values.numel() % blocksize
    absmax = values[:full].view(-1, blocksize).abs().amax(dim=1)
    scaled = torch.empty_like(values)
    scaled[:full] = (values[:full].view(-1, blocksize) * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if full < values.numel():  # the partial block divides by its absmax (not times an inverse), as bitsandbytes
        tail_max = values[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled[full:] = values[full:] / tail_max
    scaled.clamp_(-1.0, 1.0)
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8), absmax


def quantize_nf4_reference(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` (any shape) to NF4 in torch; bitsandbytes' bytes exactly.

    Works through the weight in chunks of whole blocks, so the temporaries stay a few MB whatever the
    weight's size (quantize-on-load of a 3B model holds one layer plus these, not five copies of a layer)."""
    _check_quantize_args(weight, blocksize)
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    midpoints = nf4_midpoints(weight.device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=weight.device)
    step = max(1, _QUANTIZE_CHUNK // blocksize) * blocksize  # whole blocks, an even count of elements
    for start in range(0, n, step):
        index, chunk_absmax = _quantize_span(flat[start:start + step].float(), blocksize, midpoints)
        absmax[start // blocksize:start // blocksize + chunk_absmax.numel()] = chunk_absmax
        if index.numel() % 2:  # only the last chunk can be odd: pad with the index of 0.0
            index = torch.cat([index, index.new_full((1,), NF4_ZERO_INDEX)])
        packed[start // 2:start // 2 + index.numel() // 2] = (index[0::2] << 4) | index[1::2]
    return _finish(packed, absmax, weight, blocksize, double_quant)


def dequantize_nf4_reference(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize in torch: ``NF4_CODE[nibble] * absmax`` in fp32, rounded once to ``dtype``."""
    dtype = dtype or weight.dtype
    n, bs = weight.numel, weight.blocksize
    index = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1)[:n]
    values = nf4_code(weight.device)[index.int()]
    absmax = decode_absmax(weight)
    full = n - n % bs
    out = torch.empty(n, dtype=dtype, device=weight.device)
    out[:full] = (values[:full].view(-1, bs) * absmax[: full // bs, None]).view(-1)
    if full < n:
        out[full:] = values[full:] * absmax[-1]
    return out.reshape(weight.shape)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _nf4_quantize_kernel(
        # pointers
        w_ptr, packed_ptr, absmax_ptr, midpoints_ptr,
        # sizes
        n_elements, n_blocks,
        # meta
        BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr,
    ):
        """One program quantizes BLOCKS_PER_PROG absmax blocks: rows = blocks, columns = byte pairs."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        pairs = tl.arange(0, HALF)
        first = rows[:, None] * BLOCKSIZE + 2 * pairs[None, :]  # element index of the high nibble
        row_ok = rows < n_blocks
        w_hi = tl.load(w_ptr + first, mask=row_ok[:, None] & (first < n_elements), other=0.0).to(tl.float32)
        w_lo = tl.load(w_ptr + first + 1, mask=row_ok[:, None] & (first + 1 < n_elements), other=0.0).to(tl.float32)

        absmax = tl.maximum(tl.max(tl.abs(w_hi), axis=1), tl.max(tl.abs(w_lo), axis=1))
        # a typed floor: triton 3.6 reads the bare literal 1e-38 (below FLT_MIN) as fp64
        safe = tl.maximum(absmax, tl.full(absmax.shape, 1e-38, tl.float32))
        # bitsandbytes multiplies full blocks by 1/absmax but divides the partial last block.
        is_tail = (rows == n_blocks - 1) & (n_elements % BLOCKSIZE != 0)
        inverse = tl.math.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
        tail = is_tail[:, None]
        s_hi = tl.where(tail, tl.math.div_rn(w_hi, safe[:, None]), w_hi * inverse[:, None])
        s_lo = tl.where(tail, tl.math.div_rn(w_lo, safe[:, None]), w_lo * inverse[:, None])
        s_hi = tl.minimum(tl.maximum(s_hi, -1.0), 1.0)
        s_lo = tl.minimum(tl.maximum(s_lo, -1.0), 1.0)

        # nearest code = number of midpoints strictly below the value
        q_hi = tl.zeros(s_hi.shape, dtype=tl.int32)
        q_lo = tl.zeros(s_lo.shape, dtype=tl.int32)
        for i in tl.static_range(15):
            mid = tl.load(midpoints_ptr + i)
            q_hi += (s_hi > mid).to(tl.int32)
            q_lo += (s_lo > mid).to(tl.int32)
        byte = ((q_hi << 4) | q_lo).to(tl.uint8)
        byte_index = rows[:, None] * HALF + pairs[None, :]
        tl.store(packed_ptr + byte_index, byte, mask=row_ok[:, None] & (first < n_elements))
        tl.store(absmax_ptr + rows, tl.where(is_tail, safe, absmax), mask=row_ok)

    @triton.jit
    def _nf4_block_absmax(
        block, mask, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
        DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
    ):
        """fp32 absmax of NF4 blocks ``block`` (any shape); decodes the 8-bit double quantization."""
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            code = tl.load(nested_code_ptr + q, mask=mask, other=0.0)
            scale = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
            return code * scale + offset
        else:
            return tl.load(absmax_ptr + block, mask=mask, other=0.0)

    @triton.jit
    def _nf4_byte_values(entry):
        """The fp32 values of a packed byte (first: high nibble, second: low) from its byte-table entry."""
        first = (entry & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        second = (entry >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        return first, second

    @triton.jit
    def _bf16_pair_values(pair):
        """The two bf16 values of an int32 word (the lower address in the low half), exact in fp32."""
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)

    # the register decode's constants, as the jit functions must see them
    _CH1, _CH3 = tl.constexpr(BF16_CODE_HIGH[1]), tl.constexpr(BF16_CODE_HIGH[3])
    _CL1, _CL3 = tl.constexpr(BF16_CODE_LOW[1]), tl.constexpr(BF16_CODE_LOW[3])
    _PAIR_EVEN = tl.constexpr(PAIR_EVEN_FIRST)
    _PAIR_ODD = tl.constexpr(PAIR_ODD_FIRST)

    @triton.jit
    def _prmt(a, b, c, ASM: tl.constexpr):
        """PTX ``prmt.b32`` in its generic form on int32 tensors of one shape: byte j of the result is
        byte ``(c >> 4j) & 7`` of the eight bytes {b, a} (a's four the lower). The selectors given here
        never set a nibble's top bit (which asks for the selected byte's sign instead). ASM: the
        instruction (GPU builds); otherwise the same in integer operations, for the interpreter, which
        cannot run inline assembly."""
        if ASM:
            return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:
            src = (b.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | a.to(tl.uint32, bitcast=True).to(tl.uint64)
            out = tl.zeros(c.shape, dtype=tl.uint32)
            for j in tl.static_range(4):
                pick = ((c >> (4 * j)) & 7).to(tl.uint64)
                out |= ((src >> (pick * 8)) & 0xFF).to(tl.uint32) << (8 * j)
            return out.to(tl.int32, bitcast=True)

    @triton.jit
    def _nf4_code_plane(sel, pick, q0, Q1: tl.constexpr, q2, Q3: tl.constexpr, ASM: tl.constexpr):
        """One byte plane of the codes of four nibbles (``sel``: their low three bits; ``pick``: 0x3210
        plus 4 for each nibble of the upper eight codes): two lookups, codes 0-7 and 8-15, and a
        per-byte choice between them. A permute takes one constant operand as an immediate and the
        other from a register: ``q0`` and ``q2`` come loaded, and in the gemv's sm_90 build the
        compiler keeps them in registers, where constants were rebuilt before every permute (one more
        instruction each). In the fused forward's loop ptxas still moves the loaded values to uniform
        registers and copies one back before each lookup (71 such moves in a 546-instruction loop)."""
        lower = _prmt(q0 + tl.zeros(sel.shape, tl.int32), tl.full(sel.shape, Q1, tl.int32), sel, ASM)
        upper = _prmt(q2 + tl.zeros(sel.shape, tl.int32), tl.full(sel.shape, Q3, tl.int32), sel, ASM)
        return _prmt(lower, upper, pick, ASM)

    @triton.jit
    def _nf4_nibbles_bf16(sel, pick, h0, h2, l0, l2, ASM: tl.constexpr):
        """The bf16 pairs of the four nibbles in the low 16 bits of ``sel``/``pick`` (two bytes of W)."""
        high = _nf4_code_plane(sel, pick, h0, _CH1, h2, _CH3, ASM)
        low = _nf4_code_plane(sel, pick, l0, _CL1, l2, _CL3, ASM)
        first = _prmt(low, high, tl.full(sel.shape, _PAIR_EVEN, tl.int32), ASM)
        second = _prmt(low, high, tl.full(sel.shape, _PAIR_ODD, tl.int32), ASM)
        return first, second

    @triton.jit
    def _nf4_word_bf16(words, planes_ptr, ASM: tl.constexpr):
        """The eight NF4 codes (unscaled, rounded to bf16) of int32 words of W's packed bytes, without
        touching memory: four int32 words of bf16 pairs, pair i holding value 2i (byte i's high nibble)
        in its low half and value 2i + 1 in its high half, so their fp32 bits are ``pair << 16`` and
        ``pair & 0xFFFF0000``. ``planes_ptr``: ``nf4_code_planes()``, the code bytes as int32 words.

        The 32 bytes of the codes live in eight registers, split into a plane of high bytes and one of
        low bytes. A byte permute (``_prmt``) looks up four nibbles at once among eight codes: per plane
        one permute for codes 0-7, one for 8-15 and one that keeps, byte by byte, the half each nibble's
        top bit names; two more interleave the planes into pairs. 16 permutes and five integer
        operations per word, against 8 or 16 gathers from a table in memory (the gathers' cost on an
        H100 is in ``nf4_matmul._nf4_gemv_kernel``)."""
        h0, h2, l0, l2 = _nf4_plane_registers(planes_ptr)
        return _nf4_word_bf16_from(words, h0, h2, l0, l2, ASM)

    @triton.jit
    def _nf4_plane_registers(planes_ptr):
        """The four code words ``_nf4_word_bf16_from`` takes (load them once, outside a loop)."""
        return tl.load(planes_ptr), tl.load(planes_ptr + 2), tl.load(planes_ptr + 4), tl.load(planes_ptr + 6)

    @triton.jit
    def _nf4_word_bf16_from(words, h0, h2, l0, l2, ASM: tl.constexpr):
        """``_nf4_word_bf16`` with the code words already loaded (``_nf4_plane_registers``)."""
        sel = words & 0x77777777
        pick = ((words >> 1) & 0x44444444) | 0x32103210
        p01, p23 = _nf4_nibbles_bf16(sel, pick, h0, h2, l0, l2, ASM)
        p45, p67 = _nf4_nibbles_bf16(sel >> 16, pick >> 16, h0, h2, l0, l2, ASM)
        return p01, p23, p45, p67

    @triton.jit
    def _nf4_pair_tile(words, h0, h2, l0, l2, ROWS: tl.constexpr, WORDS: tl.constexpr, ASM: tl.constexpr):
        """A (ROWS, WORDS) tile of int32 words of packed bytes -> the (ROWS, 4 * WORDS) tile of their bf16
        pairs in byte order (column c: byte c's two codes, as one entry of nf4_pair_table gives them)."""
        p0, p1, p2, p3 = _nf4_word_bf16_from(words, h0, h2, l0, l2, ASM)
        # pair i of word w is byte 4w + i: [w, u, v] = p(2u + v) lands at column 4w + 2u + v
        return tl.reshape(tl.join(tl.join(p0, p2), tl.join(p1, p3)), (ROWS, 4 * WORDS))

    @triton.jit
    def _nf4_words_bf16_kernel(words_ptr, planes_ptr, out_ptr, n, BLOCK: tl.constexpr, ASM: tl.constexpr):
        """out[i, 0..3] = the bf16 pairs of words[i], through ``_nf4_pair_tile`` on tiles of 8 words a row
        (the shape the fused forward decodes at blocksize 64)."""
        rows = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
        h0, h2, l0, l2 = _nf4_plane_registers(planes_ptr)
        pairs = _nf4_pair_tile(tl.load(words_ptr + offs, mask=offs < n, other=0), h0, h2, l0, l2, BLOCK // 8, 8,
                               ASM)
        out = rows[:, None] * 32 + tl.arange(0, 32)[None, :]
        tl.store(out_ptr + out, pairs, mask=out < 4 * n)

    @triton.jit
    def _pack16(first, second, BF16: tl.constexpr):
        """int32 words holding ``first`` and ``second`` rounded to bf16 (BF16) or fp16, the first value in
        the low half (the lower address)."""
        if BF16:
            lo = first.to(tl.bfloat16)
            hi = second.to(tl.bfloat16)
        else:
            lo = first.to(tl.float16)
            hi = second.to(tl.float16)
        word = lo.to(tl.uint16, bitcast=True).to(tl.uint32) | (hi.to(tl.uint16, bitcast=True).to(tl.uint32) << 16)
        return word.to(tl.int32, bitcast=True)

    @triton.jit
    def _nf4_dequantize_kernel(
        # pointers: out is W's dtype, or int32 words of two 16-bit values with PACKED
        packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, byte_table_ptr, out_ptr,
        # sizes and scalars
        n_elements, n_bytes, n_blocks, offset, row_blocks, out_row_stride,
        # meta
        BLOCKSIZE: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr,
        EVEN: tl.constexpr, STRIDED: tl.constexpr, PACKED: tl.constexpr, PACKED_BF16: tl.constexpr,
    ):
        """One program dequantizes BLOCKS_PER_PROG blocks: reads bytes contiguously, writes values contiguously.

        Each byte is decoded by one 8-byte load from the byte table (both of its values; a gather per
        value before, with twice the address arithmetic).
        EVEN (whole programs of whole blocks, as the model's shapes are): no masks, so the compiler can
        use 16-byte loads and stores; a mask that varies inside a vector splits it into scalar accesses.
        STRIDED: W's rows of ``row_blocks`` whole blocks go ``out_row_stride`` values apart in out (a
        wider buffer with other columns beside W); each block still lands contiguously.
        PACKED (16-bit W with whole blocks): a byte's two values, rounded to bf16 (PACKED_BF16) or fp16,
        are stored as one 32-bit word, so the tile keeps the bytes' layout; interleaving two tiles of values (join
        and reshape) cost a round trip through shared memory with barriers in the sm_90 build."""
        HALF: tl.constexpr = BLOCKSIZE // 2
        rows = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        row_ok = rows < n_blocks
        byte_index = rows[:, None] * HALF + tl.arange(0, HALF)[None, :]
        if EVEN:
            byte = tl.load(packed_ptr + byte_index)
        else:
            byte = tl.load(packed_ptr + byte_index, mask=byte_index < n_bytes, other=0)
        absmax = _nf4_block_absmax(rows, row_ok, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                                   DOUBLE_QUANT, NESTED)
        hi, lo = _nf4_byte_values(tl.load(byte_table_ptr + byte.to(tl.int32)))
        hi = hi * absmax[:, None]
        lo = lo * absmax[:, None]
        if PACKED:
            word = _pack16(hi, lo, PACKED_BF16)
            if STRIDED:
                start = (rows // row_blocks) * (out_row_stride // 2) + (rows % row_blocks) * HALF
                pair = start[:, None] + tl.arange(0, HALF)[None, :]
                tl.store(out_ptr + pair, word, mask=row_ok[:, None])
            else:
                tl.store(out_ptr + byte_index, word)
            return
        if STRIDED:
            start = (rows // row_blocks) * out_row_stride + (rows % row_blocks) * BLOCKSIZE
            element = start[:, None] + tl.arange(0, BLOCKSIZE)[None, :]
        else:
            element = rows[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        values = tl.reshape(tl.join(hi, lo), (BLOCKS_PER_PROG, BLOCKSIZE)).to(out_ptr.dtype.element_ty)
        if EVEN:
            tl.store(out_ptr + element, values)
        elif STRIDED:  # whole blocks (K is a multiple of the blocksize): only the last program's rows can run over
            tl.store(out_ptr + element, values, mask=row_ok[:, None])
        else:
            tl.store(out_ptr + element, values, mask=element < n_elements)


def _packed_ok(out: torch.Tensor, even: bool, strided: bool) -> bool:
    """Whether the dequantize kernel stores two 16-bit values per 32-bit word into ``out``: whole blocks
    (an EVEN launch, or strided rows of whole blocks), out's first value at an even offset and, strided,
    an even row stride."""
    return (out.dtype in (torch.bfloat16, torch.float16) and (even or strided) and out.storage_offset() % 2 == 0
            and (not strided or out.stride(0) % 2 == 0))


def _int32_words(out: torch.Tensor) -> torch.Tensor:
    """An int32 tensor starting at ``out``'s first value (its offset is even): the kernel only takes
    its address and computes every word's offset itself."""
    words = torch.empty(0, dtype=torch.int32, device=out.device)
    return words.set_(out.untyped_storage(), out.storage_offset() // 2, (1,), (1,))


def _blocks_per_prog(n_blocks: int, blocksize: int, values: int | None = None) -> int:
    # The interpreter runs programs one by one in Python: few, wide programs keep tests fast.
    if dispatch.interpreting() and values is None:
        return max(16, min(256, next_power_of_2(n_blocks)))
    # On the GPU about 4096 values per program (8 KB of bf16 written by 128 threads: 16-byte stores),
    # unless the device's tuning entry says otherwise (``values``).
    return max(1, (values or 4096) // blocksize)


def quantize_nf4_triton(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize with the Triton kernel (4-bit part); the 8-bit absmax part runs in torch."""
    _check_quantize_args(weight, blocksize)
    flat = weight.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    per_prog = _blocks_per_prog(n_blocks, blocksize)
    grid = (cdiv(n_blocks, per_prog),)
    _nf4_quantize_kernel[grid](
        flat, packed, absmax, nf4_midpoints(flat.device), n, n_blocks,
        BLOCKSIZE=blocksize, BLOCKS_PER_PROG=per_prog, num_warps=4, enable_fp_fusion=False,
    )
    return _finish(packed, absmax, weight, blocksize, double_quant)


def dequantize_nf4_triton(weight: NF4Weight, dtype: torch.dtype | None = None,
                          out: torch.Tensor | None = None, blocks_per_prog: int | None = None,
                          num_warps: int | None = None) -> torch.Tensor:
    """Dequantize with the Triton kernel into ``out`` or a new tensor.

    ``out``: any contiguous tensor of numel values, or a 2-D (N, K) view with unit column stride and
    any row stride (W's columns inside a wider buffer) when K is a multiple of the blocksize.
    ``blocks_per_prog`` (a power of two) and ``num_warps`` set the launch; by default they come from the
    device's tuning entry (``nf4.dequant_launch``, see ``tuning``), else ``_blocks_per_prog`` and 4 warps.
    bench/nf4.py --sweep-dequant times the alternatives."""
    if blocks_per_prog is not None and (blocks_per_prog < 1 or blocks_per_prog & (blocks_per_prog - 1)):
        raise ValueError(f"dequantize_nf4: blocks_per_prog must be a power of two, got {blocks_per_prog}")
    dtype = dtype or weight.dtype
    n = weight.numel
    strided = False
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    elif out.dtype != dtype or out.numel() != n or out.device != weight.device:
        raise ValueError(f"dequantize_nf4: out must be {dtype} with {n} values on {weight.device}")
    elif not out.is_contiguous():
        rows, cols = (weight.shape[0], weight.shape[1]) if len(weight.shape) == 2 else (0, 0)
        if (out.dim() != 2 or tuple(out.shape) != (rows, cols) or out.stride(1) != 1
                or cols % weight.blocksize != 0):
            raise ValueError(
                f"dequantize_nf4: out must be contiguous, or a ({rows}, {cols}) view with unit column stride "
                f"and K a multiple of the blocksize {weight.blocksize}; got shape {tuple(out.shape)} "
                f"strides {out.stride()}")
        strided = True
    # the tuned pair only as a pair: a launch given one of the two takes the heuristic for the other
    tuned = tuning.setting("nf4.dequant_launch", weight.device) if blocks_per_prog is None and num_warps is None \
        else None
    per_prog = blocks_per_prog or _blocks_per_prog(weight.num_blocks, weight.blocksize,
                                                   tuned["values_per_prog"] if tuned else None)
    num_warps = num_warps or (tuned["num_warps"] if tuned else 4)
    grid = (cdiv(weight.num_blocks, per_prog),)
    dq = weight.double_quant
    even = n == weight.num_blocks * weight.blocksize and weight.num_blocks % per_prog == 0
    packed = _packed_ok(out, even, strided)
    _nf4_dequantize_kernel[grid](
        weight.packed, weight.absmax,
        weight.nested_absmax if dq else weight.absmax, weight.nested_code if dq else weight.absmax,
        nf4_byte_table(weight.device), _int32_words(out) if packed else out,
        n, weight.packed.numel(), weight.num_blocks, weight.offset if dq else 0.0,
        weight.shape[-1] // weight.blocksize if strided else 1, out.stride(0) if strided else 0,
        BLOCKSIZE=weight.blocksize, BLOCKS_PER_PROG=per_prog, DOUBLE_QUANT=dq, NESTED=NESTED_BLOCKSIZE,
        EVEN=even, STRIDED=strided, PACKED=packed, PACKED_BF16=dtype == torch.bfloat16,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return out


def register_decode_asm(device: torch.device) -> bool:
    """Whether the register decode (``_nf4_word_bf16``) takes its PTX byte permutes: on NVIDIA GPUs.
    Under the interpreter the kernels run its integer model instead; other GPUs have neither, and a
    launch that asks for it there gets this error."""
    if dispatch.interpreting():
        return False
    if device.type != "cuda" or torch.version.hip is not None:
        raise ValueError("nf4: the register decode ('prmt') runs on NVIDIA GPUs or under the Triton "
                         "interpreter only")
    return True


def nf4_words_bf16(words: torch.Tensor) -> torch.Tensor:
    """Decode int32 words of packed NF4 bytes into the codes' bf16 bits with the kernels' register
    lookup (``_nf4_word_bf16``): an (n, 4) int32 tensor of bf16 pairs, value 2i of a word in the low
    half of pair i. Needs triton (on CPU tensors, the interpreter); for tests and inspection."""
    if triton is None:
        raise RuntimeError("nf4_words_bf16: needs triton (the register decode is a Triton kernel)")
    if words.dtype != torch.int32 or words.dim() != 1:
        raise ValueError(f"nf4_words_bf16: words must be a 1-D int32 tensor, got {words.dtype} {tuple(words.shape)}")
    words = words.contiguous()
    out = torch.empty((words.numel(), 4), dtype=torch.int32, device=words.device)
    block = 1024
    _nf4_words_bf16_kernel[(max(1, cdiv(words.numel(), block)),)](
        words, nf4_code_planes(words.device), out, words.numel(), BLOCK=block,
        ASM=register_decode_asm(words.device), num_warps=4)
    return out


# ----------------------------------------------------------------------------- public entry points


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``weight`` to NF4 on its own device (Triton on CUDA, torch elsewhere)."""
    if dispatch.use_triton(weight):
        return quantize_nf4_triton(weight, blocksize, double_quant)
    return quantize_nf4_reference(weight, blocksize, double_quant)


def dequantize_nf4(weight: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dequantized tensor, shape ``weight.shape``, in ``dtype`` (default: the original dtype)."""
    if dispatch.use_triton(weight.packed):
        return dequantize_nf4_triton(weight, dtype)
    return dequantize_nf4_reference(weight, dtype)
