"""NF4 quantize/dequantize: bitsandbytes' bytes exactly (CPU oracle), Triton (interpreter) == reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from bezoar_kernels import nf4
from bezoar_kernels.dispatch import backend
from tests.utils import assert_close

try:  # the oracle; the GPU machine may lack it, and the Triton-against-reference tests run without it
    import bitsandbytes.functional as bnbf
except ImportError:
    bnbf = None
needs_bnb = pytest.mark.skipif(bnbf is None, reason="needs bitsandbytes (the oracle of the NF4 bytes)")


@pytest.fixture(autouse=True)
def _bnb_without_torch_compile(monkeypatch):
    # bitsandbytes' CPU dequantize of odd shapes runs a torch.compile'd function, which recompiles
    # per shape (seconds each); the oracle is the same function run eagerly.
    if bnbf is None:
        return
    ops = importlib.import_module("bitsandbytes.backends.default.ops")
    fn = ops._dequantize_4bit_compute
    monkeypatch.setattr(ops, "_dequantize_4bit_compute", getattr(fn, "__wrapped__", fn))


def _bnb_quantize(w: torch.Tensor, blocksize: int, double_quant: bool):
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return packed, state


def _assert_same_bytes(q: nf4.NF4Weight, packed: torch.Tensor, state) -> None:
    assert q.packed.shape == (packed.numel(),)
    assert torch.equal(q.packed, packed.reshape(-1)), "packed bytes differ from bitsandbytes"
    assert torch.equal(q.absmax, state.absmax), "absmax differs from bitsandbytes"
    assert q.double_quant == state.nested
    if state.nested:
        assert q.offset == state.offset.item(), "double-quant offset differs"
        assert torch.equal(q.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert torch.equal(q.nested_code, state.state2.code), "nested code differs"
        assert state.state2.blocksize == nf4.NESTED_BLOCKSIZE


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # a few outliers, as real weights have, so absmax varies a lot between blocks
    flat = w.view(-1)
    idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 997),), generator=g)
    flat[idx] *= 25
    return w.to(dtype)


@needs_bnb
def test_code_tables_match_bitsandbytes():
    assert torch.equal(nf4.nf4_code(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(nf4.dynamic_code(), bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_and_byte_tables_decode_every_byte(dtype):
    """Entry b of the byte table holds the fp32 codes of b's high and low nibble (first value low);
    entry b of the pair table holds them rounded to ``dtype``, first value in the low 16 bits."""
    code = nf4.nf4_code()
    byte = torch.arange(256)
    table = nf4.nf4_byte_table()
    first = (table & 0xFFFFFFFF).to(torch.int32).view(torch.float32)  # wraps to the same 32 bits
    second = (table >> 32).to(torch.int32).view(torch.float32)
    assert torch.equal(first, code[byte >> 4]) and torch.equal(second, code[byte & 15])
    pair = nf4.nf4_pair_table(dtype=dtype)
    assert pair.dtype == torch.int32 and pair.shape == (256,)
    halves = pair.view(torch.int16).view(dtype).view(256, 2)  # little-endian: the low half first
    assert torch.equal(halves[:, 0], code[byte >> 4].to(dtype)) and torch.equal(halves[:, 1], code[byte & 15].to(dtype))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        nf4.nf4_pair_table(dtype=torch.float32)


def _expected_pairs(words: torch.Tensor) -> torch.Tensor:
    """The bf16 pairs of int32 words: pair i = byte i's high-nibble code (low half), low-nibble code."""
    code = nf4.nf4_code().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    byte = torch.stack([(unsigned >> (8 * i)) & 255 for i in range(4)], dim=1)
    pairs = code[byte >> 4] | (code[byte & 15] << 16)
    return torch.where(pairs >= 2 ** 31, pairs - 2 ** 32, pairs).to(torch.int32)


def _every_nibble_pattern(device) -> torch.Tensor:
    """65536 words whose low halves take every 16-bit value and whose high halves take every value too
    (a bijection of the low half), so each four-nibble group of the decode meets every pattern."""
    low = torch.arange(65536, dtype=torch.int64)
    high = (low * 40503 + 12345) & 0xFFFF  # odd multiplier: a permutation of 0 .. 65535
    words = low | (high << 16)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).to(device)


def test_code_planes_hold_the_bf16_codes():
    """The register decode's tables: byte i of word q of each plane is the high / low byte of code 4q + i
    rounded to bf16."""
    planes = nf4.nf4_code_planes()
    assert planes.dtype == torch.int32 and planes.shape == (8,)
    code = nf4.nf4_code().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    plane_bytes = (planes.to(torch.int64).view(8, 1) >> torch.tensor([0, 8, 16, 24])) & 255
    assert torch.equal(plane_bytes[:4].reshape(16), code >> 8)
    assert torch.equal(plane_bytes[4:].reshape(16), code & 255)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_register_decode_gives_every_code(device):
    """``nf4_words_bf16`` (byte permutes over the code bytes: the instruction on a GPU, its integer
    model under the interpreter) decodes every pattern of four nibbles in both halves of a word to the
    bf16 codes, bit for bit."""
    words = _every_nibble_pattern(device)
    assert torch.equal(nf4.nf4_words_bf16(words).cpu(), _expected_pairs(words.cpu()))
    with pytest.raises(ValueError, match="1-D int32 tensor"):
        nf4.nf4_words_bf16(words.to(torch.int64))


# (shape, input dtype, blocksize, double quant): odd sizes, partial last blocks, odd element counts,
# and counts whose number of absmax blocks is not a multiple of 256.
CASES = [
    ((37, 61), torch.float32, 64, True),
    ((37, 61), torch.bfloat16, 128, True),
    ((64, 64), torch.float16, 64, False),
    ((1, 1), torch.float32, 64, True),
    ((129,), torch.bfloat16, 128, False),
    ((300, 77), torch.float16, 128, True),
    ((257, 64 * 3), torch.float32, 64, True),  # 771 blocks: a partial nested block
    ((100, 3), torch.float32, 64, False),
]


@needs_bnb
@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_quantize_reference_matches_bitsandbytes(shape, dtype, blocksize, double_quant):
    w = _weight(shape, dtype)
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    q = nf4.quantize_nf4_reference(w, blocksize, double_quant)
    _assert_same_bytes(q, packed, state)
    assert q.shape == tuple(shape) and q.dtype == dtype and q.blocksize == blocksize


@needs_bnb
@pytest.mark.parametrize("shape,blocksize", [((37, 61), 64), ((301, 77), 128), ((4097,), 64)])
def test_quantize_reference_in_small_chunks_matches_bitsandbytes(monkeypatch, shape, blocksize):
    # The torch quantizer works in chunks of whole blocks; chunks of 2-3 blocks put chunk edges
    # everywhere, the partial last block and an odd element count in the last chunk.
    monkeypatch.setattr(nf4, "_QUANTIZE_CHUNK", 2 * blocksize + 1)
    w = _weight(shape, torch.float32, seed=3)
    packed, state = _bnb_quantize(w, blocksize, True)
    _assert_same_bytes(nf4.quantize_nf4_reference(w, blocksize, True), packed, state)


@needs_bnb
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_dequantize_reference_matches_bitsandbytes(shape, dtype, blocksize, double_quant, out_dtype):
    w = _weight(shape, dtype)
    packed, state = _bnb_quantize(w, blocksize, double_quant)
    state.dtype = out_dtype
    expected = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    q = nf4.quantize_nf4_reference(w, blocksize, double_quant)
    got = nf4.dequantize_nf4_reference(q, out_dtype)
    assert got.dtype == out_dtype and got.shape == tuple(shape)
    assert torch.equal(got, expected), f"max diff {(got.double() - expected.double()).abs().max()}"


@needs_bnb
def test_openllama_sized_weight_matches_bitsandbytes():
    """A 3200x8640-like weight (27.6M values) with an odd count: 432085 blocks (not a multiple of 256),
    the last one partial with an odd number of values."""
    w = _weight((3201, 8639), torch.float32, seed=1)
    packed, state = _bnb_quantize(w, 64, True)
    q = nf4.quantize_nf4_reference(w, 64, True)
    assert q.num_blocks % 256 != 0 and q.numel % 64 % 2 == 1
    _assert_same_bytes(q, packed, state)
    state.dtype = torch.bfloat16
    assert torch.equal(nf4.dequantize_nf4_reference(q, torch.bfloat16), bnbf.dequantize_4bit(packed, state))


@needs_bnb
def test_zero_and_constant_blocks_match_bitsandbytes():
    w = _weight((20, 64), torch.float32)
    w[3] = 0.0  # an all-zero block
    w[7] = 0.01  # a constant block
    w[19, 40:] = 0.0
    for blocksize, double_quant in [(64, True), (64, False), (128, True)]:
        packed, state = _bnb_quantize(w, blocksize, double_quant)
        q = nf4.quantize_nf4_reference(w, blocksize, double_quant)
        _assert_same_bytes(q, packed, state)
        assert torch.equal(nf4.dequantize_nf4_reference(q), bnbf.dequantize_4bit(packed, state))
    # every absmax equal: the centred absmax is all zero, and so is a whole nested block
    packed, state = _bnb_quantize(torch.ones(4, 64), 64, True)
    _assert_same_bytes(nf4.quantize_nf4_reference(torch.ones(4, 64), 64, True), packed, state)


def test_nibble_order_and_rounding():
    # one block: values exactly on NF4 codes and on midpoints between them
    code = nf4.nf4_code()
    mids = nf4.nf4_midpoints()
    w = torch.cat([code, mids, torch.zeros(64 - 31)])
    q = nf4.quantize_nf4_reference(w, 64, False)
    index = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1)
    assert index[:16].tolist() == list(range(16)), "codes map to themselves; first value in the high nibble"
    assert index[16:31].tolist() == list(range(15)), "a value on a midpoint takes the lower code"
    assert index[31:].tolist() == [7] * 33


@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_quantize_triton_matches_reference(shape, dtype, blocksize, double_quant):
    w = _weight(shape, dtype)
    expected = nf4.quantize_nf4_reference(w, blocksize, double_quant)
    with backend("triton"):
        got = nf4.quantize_nf4(w, blocksize, double_quant)
    assert torch.equal(got.packed, expected.packed)
    assert torch.equal(got.absmax, expected.absmax)
    if double_quant:
        assert got.offset == expected.offset
        assert torch.equal(got.nested_absmax, expected.nested_absmax)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dtype,blocksize,double_quant", CASES)
def test_dequantize_triton_matches_reference(shape, dtype, blocksize, double_quant, out_dtype):
    q = nf4.quantize_nf4_reference(_weight(shape, dtype), blocksize, double_quant)
    expected = nf4.dequantize_nf4_reference(q, out_dtype)
    with backend("triton"):
        got = nf4.dequantize_nf4(q, out_dtype)
    assert got.dtype == out_dtype and got.shape == expected.shape
    if out_dtype == torch.bfloat16 and not got.is_cuda:
        # The interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even): 1 ulp.
        assert_close(got, expected, atol=0.0, rtol=2.0**-7, name="bf16 dequant (interpreter)")
    else:
        assert torch.equal(got, expected), f"max diff {(got.double() - expected.double()).abs().max()}"


def test_dequantize_into_out_buffer_and_bad_out():
    q = nf4.quantize_nf4_reference(_weight((37, 61), torch.float32), 64, True)
    out = torch.empty(37 * 61 + 5)[: 37 * 61]
    with backend("triton"):
        nf4.dequantize_nf4_triton(q, torch.float32, out=out)
        with pytest.raises(ValueError, match="out must be torch.float16"):
            nf4.dequantize_nf4_triton(q, torch.float16, out=out)
        with pytest.raises(ValueError, match="K a multiple of the blocksize"):  # 61 columns: blocks straddle rows
            nf4.dequantize_nf4_triton(q, torch.float32, out=torch.empty(37, 70)[:, :61])
    assert torch.equal(out.view(37, 61), nf4.dequantize_nf4_reference(q))


@pytest.mark.parametrize("blocksize,blocks_per_prog", [(64, None), (128, None), (64, 4), (64, 64)])
def test_dequantize_into_columns_of_a_wider_buffer(blocksize, blocks_per_prog):
    """W's columns inside an (N, K + extra) buffer: the values land there, the other columns are untouched."""
    q = nf4.quantize_nf4_reference(_weight((19, 256), torch.float32), blocksize, True)  # 19 rows: ragged programs
    wide = torch.full((19, 256 + 24), 7.0)
    with backend("triton"):
        got = nf4.dequantize_nf4_triton(q, torch.float32, out=wide[:, :256], blocks_per_prog=blocks_per_prog)
    assert got.data_ptr() == wide.data_ptr()
    assert torch.equal(wide[:, :256], nf4.dequantize_nf4_reference(q))
    assert torch.all(wide[:, 256:] == 7.0)


@pytest.mark.parametrize("where", ["contiguous", "columns", "odd_offset", "odd_stride"])
def test_dequantize_two_values_per_word(where):
    """fp16 W with whole blocks goes out two values per 32-bit word (contiguous, and into the columns of
    a wider buffer with an even row stride); an odd element offset or row stride takes the other store.
    Every case equals the reference, and the values around W are untouched."""
    q = nf4.quantize_nf4_reference(_weight((16, 256), torch.float32), 64, True)  # 64 blocks: EVEN launches
    want = nf4.dequantize_nf4_reference(q, torch.float16)
    extra = {"contiguous": 0, "columns": 24, "odd_offset": 0, "odd_stride": 23}[where]
    buf = torch.full((16 * (256 + extra) + 1,), 7.0, dtype=torch.float16)
    start = 1 if where == "odd_offset" else 0
    if extra:
        out = buf[start: start + 16 * (256 + extra)].view(16, 256 + extra)[:, :256]
    else:
        out = buf[start: start + 16 * 256].view(16, 256)
    even = where in ("contiguous", "odd_offset")
    assert nf4._packed_ok(out, even, not even) == (where in ("contiguous", "columns"))
    with backend("triton"):
        got = nf4.dequantize_nf4_triton(q, torch.float16, out=out, blocks_per_prog=16)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(out, want)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[start: start + 16 * (256 + extra)].view(16, 256 + extra)[:, :256] = False
    assert torch.all(buf[outside] == 7.0)


@pytest.mark.parametrize("blocks_per_prog,num_warps", [(1, 1), (2, 2), (8, 4), (64, 8)])
def test_dequantize_launch_overrides(blocks_per_prog, num_warps):
    """bench/nf4.py's dequantize sweep: every launch gives the same values, ragged last program included."""
    q = nf4.quantize_nf4_reference(_weight((37, 61), torch.float32), 64, True)  # 36 blocks, the last one partial
    with backend("triton"):
        got = nf4.dequantize_nf4_triton(q, torch.float32, blocks_per_prog=blocks_per_prog, num_warps=num_warps)
        with pytest.raises(ValueError, match="power of two"):
            nf4.dequantize_nf4_triton(q, torch.float32, blocks_per_prog=3)
    assert torch.equal(got, nf4.dequantize_nf4_reference(q))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="blocksize 32"):
        nf4.quantize_nf4(torch.randn(8, 8), blocksize=32)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        nf4.quantize_nf4(torch.ones(8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_nf4(torch.empty(0, 8))
    q = nf4.quantize_nf4_reference(torch.randn(8, 8), 64, True)
    with pytest.raises(ValueError, match="packed has"):
        nf4.NF4Weight(q.packed[:-1], q.absmax, q.shape, q.dtype, 64, q.nested_absmax, q.nested_code, q.offset)
    with pytest.raises(ValueError, match="come together"):
        nf4.NF4Weight(q.packed, q.absmax, q.shape, q.dtype, 64, q.nested_absmax, None, q.offset)
    with pytest.raises(ValueError, match="absmax must be"):
        nf4.NF4Weight(q.packed, q.absmax.float(), q.shape, q.dtype, 64, q.nested_absmax, q.nested_code, q.offset)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_weight_that_is_not_finite_is_refused_by_both_quantizers(bad, double_quant, dtype):
    """A NaN or inf ended in an IndexError (torch, double quant), a NaN absmax (torch, no double quant) or, in the
    Triton kernel, whose block maximum skips NaN, a finite value where the NaN was."""
    w = torch.randn(5, 70).to(dtype)
    w[3, 17] = bad
    for quantize in (nf4.quantize_nf4_reference, nf4.quantize_nf4_triton):
        with pytest.raises(ValueError, match=r"not finite \(NaN or inf\)"):
            quantize(w, 64, double_quant)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,blocksize", [((3200, 8640), 64), ((37, 61), 128), ((8640, 3200), 128)])
def test_triton_on_gpu_matches_reference_bitwise(shape, blocksize, dtype):
    w = _weight(shape, dtype).cuda()
    expected = nf4.quantize_nf4_reference(w, blocksize, True)
    with backend("triton"):
        got = nf4.quantize_nf4(w, blocksize, True)
        deq = nf4.dequantize_nf4(got, dtype)
    assert torch.equal(got.packed, expected.packed)
    assert torch.equal(got.absmax, expected.absmax)
    assert torch.equal(deq, nf4.dequantize_nf4_reference(expected, dtype))
