"""The compiled sm_90 code of the gemv kernel (built on the CPU with triton's own ptxas and nvdisasm).

No GPU is needed to see what the compiler made: these checks keep the properties the kernel was
written for, which a timing would only show as a slowdown on the next GPU run. bench/sass.py runs in a
subprocess: compiling needs the real JIT, and the test session runs Triton's interpreter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (TOOLS / "nvdisasm").exists() or not (TOOLS / "ptxas").exists(),
                                reason="triton without its bundled ptxas / nvdisasm")


def _sass(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _instructions(dump: Path) -> list[str]:
    """The opcodes of a SASS dump, in order."""
    ops = []
    for line in dump.read_text().splitlines():
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", line)
        if m:
            ops.append(m.group(1))
    return ops


@pytest.mark.parametrize("preset", ["nf4_gemv", "nf4_gemv_nibble", "nf4_gemv_prmt"])
@pytest.mark.parametrize("block_m,blocksize", [(1, 64), (4, 64), (8, 64), (8, 128), (4, 128)])
def test_gemv_tiles_load_everything_first_and_do_not_spill(block_m, blocksize, preset, tmp_path):
    """The gemv kernel is latency-bound at batch 1: the design is one tile per program with no loop,
    every global load of the weight issued before the first multiply-add, and no spills at the tiles
    the launcher picks (for the 3B rows: 50 and 135 blocks of 64)."""
    from bezoar_kernels.nf4_matmul import gemv_block_scale, gemv_tile

    block_n, blocks = gemv_tile(block_m, blocksize, 50)
    dump = tmp_path / "gemv.sass"
    # as the launcher has them
    x_pairs = "true" if preset == "nf4_gemv_prmt" and block_m == 1 else "false"
    table = {"nf4_gemv": "byte", "nf4_gemv_nibble": "nibble", "nf4_gemv_prmt": "prmt"}[preset]
    block_scale = str(gemv_block_scale(table, block_m)).lower()
    info = json.loads(_sass(preset, "--meta", f"BLOCK_M={block_m}", "--meta", f"BLOCKSIZE={blocksize}",
                            "--meta", f"BLOCK_N={block_n}", "--meta", f"BLOCKS={blocks}", "--meta", "SPLIT=false",
                            "--meta", f"X_PAIRS={x_pairs}", "--meta", f"BLOCK_SCALE={block_scale}", "--json",
                            "--dump", str(dump)))
    assert "STACK:0" in info["usage"], (block_n, blocks, info["usage"])
    assert sum(info["loop"].values()) <= 1, info["loop"]  # no main loop (the end-of-kernel BRA only)
    for op in ("LDGSTS", "HMMA", "HGMMA", "STL", "LDL"):
        assert not any(k.startswith(op) for k in info["counts"]), (op, info["counts"])
    ops = _instructions(dump)
    first_fma = ops.index("FFMA")
    # the double-quant chain starts before any arithmetic: every absmax byte is requested up front
    assert all(i < first_fma for i, op in enumerate(ops) if op == "LDG.E.U8"), first_fma
    # the byte table decodes two values per 8-byte load (a gather per value before: 2264 instructions
    # for a 64 x 8-block tile at M = 1, 1552 with the table). Per weight and row of x, with triton 3.9:
    # 5.0 at M = 1, 3.6 at M = 4, 2.8 at M = 8 since the scale is applied per block at M = 1 and the
    # words are masked by whole blocks (6.4, 3.9, 3.0 before); the bound catches a regression, not noise
    weights_per_thread = block_n * blocks * blocksize / 128
    # triton 3.6 (the GPU machine's) builds a smaller tile (16 rows at M = 1) into 9.6 per weight (10.4).
    # The 16-entry table takes a 4-byte load per value, and its address arithmetic, instead: ~30% more
    # instructions (7.8 per weight at M = 1 on 3.9, 13.5 on 3.6, whole kernel) for 1 L1 wavefront per
    # warp-wide gather instead of ~14
    new_triton = tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 9)
    # The register decode (table "prmt"): 16 byte permutes per word of 8 weights and no table loads,
    # 7.0 per weight at M = 1 on 3.9 (32 rows), 8.75 on 3.6 (16 rows) with the per-block scale (8.2 and
    # 10.4 with a scale per word); its lookup constants stay in registers (rebuilt before every permute
    # they cost one more instruction each, ~1 per weight)
    if preset == "nf4_gemv":
        bound = 6.5 if new_triton else 10.5
        assert ops.count("LDG.E.64") >= weights_per_thread / 2  # one table load per byte
    elif preset == "nf4_gemv_prmt":
        bound = 8 if new_triton else 10
        assert ops.count("PRMT") >= 2 * weights_per_thread
        # no table loads: the byte table's build of the same tile, reading x the same way (as int32
        # pairs: X_PAIRS), has one per byte more, less the 4 of the lookup constants here
        table_dump = tmp_path / "gemv_byte.sass"
        _sass("nf4_gemv", "--meta", f"BLOCK_M={block_m}", "--meta", f"BLOCKSIZE={blocksize}", "--meta",
              f"BLOCK_N={block_n}", "--meta", f"BLOCKS={blocks}", "--meta", "SPLIT=false", "--meta",
              f"X_PAIRS={x_pairs}", "--meta", f"BLOCK_SCALE={block_scale}", "--dump", str(table_dump))
        # x read as int32 pairs needs no reshapes through shared memory (9-12 barriers before); triton 3.6
        # adds one to hand the per-block scales' absmax bytes to the layout of the block sums (5 in all)
        if block_m == 1:
            assert sum(op.startswith("BAR") for op in ops) <= 5, ops.count("BAR.SYNC.DEFER")
        loads = sum(op.startswith("LDG") for op in ops)
        assert loads <= sum(op.startswith("LDG") for op in _instructions(table_dump)) - weights_per_thread / 2 + 4
        assert not re.search(r"IMAD\.U32 R\d+, RZ, RZ, UR", dump.read_text())
    else:
        bound = 9 if new_triton else 15
        assert ops.count("LDG.E") >= weights_per_thread  # one table load per value
    assert len(ops) / (weights_per_thread * block_m) < bound, (len(ops), weights_per_thread)
    assert ops.count("FFMA") >= weights_per_thread * block_m  # the products are fused multiply-adds


@pytest.mark.parametrize("steps", [4, 8])  # at 2 the compiler drops the loads two ahead: none are in range
def test_gemv_steps_loop_over_k_ranges_without_spilling(steps, tmp_path):
    """GemvConfig.steps: the register decode at the H100's tuned M = 1 tiles (16 rows by 8 blocks), the
    program walking K. Its main loop loads W's words as 16-byte vectors into registers (no cp.async, no
    shared-memory staging), two ranges ahead: at most 128 registers (four programs an SM) and no stack.
    Per weight the loop takes 7.8 instructions on triton 3.6 (the GPU machine's), fewer than the one-range
    kernel's 8.75 in all, and 8.7 on 3.9, more than its 7.0 (3.9's build copies the ranges carried into
    the next step through ~100 register moves); the bound holds both to under 9.5."""
    dump = tmp_path / "gemv_steps.sass"
    info = json.loads(_sass("nf4_gemv_prmt", "--meta", "BLOCK_N=16", "--meta", "BLOCKS=8", "--meta", f"STEPS={steps}",
                            "--json", "--dump", str(dump)))
    assert "STACK:0" in info["usage"], info["usage"]
    assert int(re.search(r"REG:(\d+)", info["usage"]).group(1)) <= 128, info["usage"]
    loop = info["loop"]
    weights_per_thread = 16 * 8 * 64 / 128
    assert loop.get("PRMT", 0) >= 2 * weights_per_thread and loop.get("FFMA", 0) >= weights_per_thread, loop
    assert loop.get("LDG", 0) >= 2, loop  # this step issues the loads of the range two ahead
    assert sum(loop.values()) / weights_per_thread < 9.5, loop
    ops = _instructions(dump)
    assert ops.count("LDG.E.128") >= 6  # two ranges before the loop, one in it: W's words as vectors
    for op in ("LDGSTS", "STL", "LDL"):
        assert not any(k.startswith(op) for k in info["counts"]), (op, info["counts"])


@pytest.mark.parametrize("block_m,block_n,blocks,steps", [(1, 16, 8, 1), (1, 16, 8, 4), (4, 16, 4, 1)])
def test_gemv_gather_lookup_reads_codes_from_shared_memory(block_m, block_n, blocks, steps, tmp_path):
    """GemvConfig(table="gather"): each value's code is one shared-memory load (the 16 fp32 codes in 16
    banks), never a global gather, and the decode costs fewer integer-pipe instructions than the register
    decode at the same tiles (at M = 1, 16 x 8, triton 3.6: 279 against 357 whole kernel, 191 against 268
    in the 4-step loop; 3.9: 253 against 331 and 182 against 253); no spills."""
    alu = ("PRMT", "LOP3", "SHF", "ISETP", "IADD3", "LEA", "SGXT", "PLOP3", "POPC", "SEL", "FSEL", "VIADD")

    def build(preset):
        dump = tmp_path / f"{preset}.sass"
        info = json.loads(_sass(preset, "--meta", f"BLOCK_M={block_m}", "--meta", f"BLOCK_N={block_n}", "--meta",
                                f"BLOCKS={blocks}", "--meta", f"STEPS={steps}", "--meta",
                                f"X_PAIRS={'true' if block_m == 1 else 'false'}", "--json", "--dump", str(dump)))
        ops = _instructions(dump)
        if steps > 1:  # the loop's instructions
            return info, sum(n for op, n in info["loop"].items() if op in alu), info["loop"].get("LDS", 0)
        return info, sum(op.split(".")[0] in alu for op in ops), sum(op == "LDS" for op in ops)

    weights_per_thread = block_n * blocks * 64 / 128
    info, gather_alu, shared_loads = build("nf4_gemv_gather")
    assert "STACK:0" in info["usage"], info["usage"]
    # three programs an SM at least in the loop (161 registers on 3.6, 124 on 3.9); five in one range
    # (56 at M = 1, 72 at M = 4)
    assert int(re.search(r"REG:(\d+)", info["usage"]).group(1)) <= (168 if steps > 1 else 96), info["usage"]
    assert shared_loads >= weights_per_thread  # a shared load per value
    assert not any(k.startswith("LDG.E.64") for k in info["counts"])  # no byte-table gathers
    _, prmt_alu, _ = build("nf4_gemv_prmt")
    assert gather_alu < 0.9 * prmt_alu, (gather_alu, prmt_alu)


def test_gemv_dependent_launch_waits_before_any_memory_access(tmp_path):
    """GemvConfig.pdl's build: the grid dependency wait (ACQBULK) comes before every load and store, so
    nothing the kernel ahead writes or reads is touched early, and the launch-dependents signal
    (PREEXIT) follows it; the plain build has neither."""
    dump = tmp_path / "gemv_pdl.sass"
    _sass("nf4_gemv_prmt", "--meta", "PDL=true", "--dump", str(dump))
    ops = _instructions(dump)
    wait = ops.index("ACQBULK")
    memory = [i for i, op in enumerate(ops) if op.startswith(("LDG", "STG", "ATOMG", "RED", "LDS", "STS"))]
    assert memory and wait < min(memory), (wait, memory[:3])
    assert wait < ops.index("PREEXIT")
    plain = tmp_path / "gemv.sass"
    _sass("nf4_gemv_prmt", "--dump", str(plain))
    assert not {"ACQBULK", "PREEXIT"} & set(_instructions(plain))


def test_gemv_split_sum_is_a_fenced_semaphore(tmp_path):
    """With K cut into ranges, the last program of a row tile sums the partials (no second launch). The
    build must follow the split-K semaphore order: the partial stored, a CTA barrier, then one thread's
    GPU-scope fence and atomic add; the acquire invalidates L1, and the partials are read back with
    L1-bypassing loads (STRONG.GPU) in a short loop; the count is reset by an exchange."""
    from bezoar_kernels.nf4_matmul import gemv_tile

    block_n, blocks = gemv_tile(1, 64, 50)
    dump = tmp_path / "gemv_split.sass"
    info = json.loads(_sass("nf4_gemv", "--meta", "SPLIT=true", "--meta", f"BLOCK_N={block_n}", "--meta",
                            f"BLOCKS={blocks}", "--json", "--dump", str(dump)))
    assert "STACK:0" in info["usage"], info["usage"]
    ops = _instructions(dump)
    add = ops.index("ATOMG.E.ADD.STRONG.GPU")
    assert ops.count("ATOMG.E.ADD.STRONG.GPU") == 1 and "ATOMG.E.EXCH.STRONG.GPU" in ops[add:]
    fence = max(i for i, op in enumerate(ops[:add]) if op.startswith("MEMBAR"))
    assert ops[fence] == "MEMBAR.ALL.GPU"
    last_partial_store = max(i for i, op in enumerate(ops[:add]) if op.startswith("STG"))
    assert any(op.startswith("BAR.SYNC") for op in ops[last_partial_store:fence])
    assert "CCTL.IVALL" in ops[add: add + 3]
    read_back = [op for op in ops[add:] if op.startswith("LDG")]
    assert read_back and all(op.endswith("STRONG.GPU") for op in read_back), read_back
    assert 0 < sum(info["loop"].values()) <= 40, info["loop"]  # the sum over the splits, nothing else


def test_cli_lists_and_reports():
    out = _sass("nf4_gemv", "--meta", "BLOCK_N=32")
    assert "REG:" in out and "main loop:" in out
    listed = _sass("--list")
    assert "nf4_gemv" in listed and "lora_down" in listed


@pytest.mark.parametrize("even", ["true", "false"])
def test_dequantize_uses_wide_loads_and_stores(even):
    """The H100 figures had dequantize at 61-78% of copy bandwidth; its compiled code then read the packed
    bytes one at a time (16 scalar byte loads per thread where one 16-byte load does: the mask
    ``2 * byte_index < n_elements`` hid the bytes' contiguity from the compiler)."""
    info = json.loads(_sass("nf4_dequant", "--meta", f"EVEN={even}", "--json"))
    counts = info["counts"]
    # (kinds, not exact counts: another ptxas may split the same 16 bytes differently)
    assert counts.get("LDG.E.128", 0) + counts.get("LDG.E.64", 0) >= 1, counts  # the packed bytes, wide
    assert counts.get("LDG.E.U8", 0) <= 1, counts  # only the one absmax byte of double quantization
    assert counts.get("STG.E.128", 0) >= 1, counts
    assert not any(k.startswith("STG") and k not in ("STG.E.128", "STG.E.64") for k in counts), counts


@pytest.mark.parametrize("kernel", ["norm_lora_fwd", "norm_lora_bwd"])
@pytest.mark.parametrize("p,r_pad", [(3, 16), (1, 16), (3, 32), (3, 64), (1, 128)])
def test_norm_lora_kernels_do_not_spill_and_meet_between_passes(kernel, p, r_pad, tmp_path):
    """The fused RMSNorm + LoRA kernels at the launcher's tiles (16 rows; the columns per step that
    ``_block_k`` gives): no spills, 16-byte stores, the rank-r products on
    tensor cores, and a CTA barrier between the
    first pass's stores (s in the forward, dh in the backward: the only stores marked evict_last) and the
    second pass's first global load of them (the forward's cp.async of s, the backward's evict_first load
    of dh): the second pass reads what other threads of the program stored."""
    from bezoar_kernels.norm_lora import _block_k, _forward_block_k

    block_k = _forward_block_k(r_pad, p) if kernel == "norm_lora_fwd" else _block_k(r_pad)
    dump = tmp_path / f"{kernel}.sass"
    width = ["--meta", f"WIDTH={r_pad}"] if kernel == "norm_lora_fwd" else []  # the wide blocks as launched
    info = json.loads(_sass(kernel, "--meta", f"P={p}", "--meta", f"R_PAD={r_pad}", "--meta", f"BLOCK_K={block_k}",
                            *width, "--json", "--dump", str(dump)))
    assert "STACK:0" in info["usage"], info["usage"]
    counts = info["counts"]
    # 16-byte stores; 8-byte ones at 32 columns (16 x 32 values over 128 threads: four per thread)
    wide = ("STG.E.128", "STG.E.EL.128") + (("STG.E.64", "STG.E.EL.64") if block_k == 32 else ())
    assert sum(counts.get(op, 0) for op in wide) >= 1, counts
    assert counts.get("HMMA.16816.F32.BF16", 0) >= p, counts
    ops = _instructions(dump)
    kept = [i for i, op in enumerate(ops) if op.startswith("STG") and ".EL" in op]
    assert kept, "the first pass's stores lost their evict_last hint"
    second = "LDGSTS" if kernel == "norm_lora_fwd" else "LDG.E.EF"
    first_load = min(i for i, op in enumerate(ops) if i > kept[-1] and op.startswith(second))
    last_store = max(i for i, op in enumerate(ops[:first_load]) if op.startswith("STG"))
    assert any(op.startswith("BAR.SYNC") for op in ops[last_store:first_load]), (last_store, first_load)


@pytest.mark.parametrize("kernel", ["swiglu_lora_fwd", "swiglu_lora_bwd"])
@pytest.mark.parametrize("r_pad,block_k", [(16, 128), (32, 128), (64, 64), (128, 32)])
def test_swiglu_lora_kernels_do_not_spill(kernel, r_pad, block_k):
    """The fused SwiGLU + down_proj LoRA kernels at the launcher's tiles: no spills, 16-byte stores of
    act / dgate / dup, the rank-r product on tensor cores."""
    width = ["--meta", f"WIDTH={r_pad}"] if kernel == "swiglu_lora_fwd" else []  # the wide block as launched
    info = json.loads(_sass(kernel, "--meta", f"R_PAD={r_pad}", "--meta", f"BLOCK_K={block_k}", *width, "--json"))
    assert "STACK:0" in info["usage"], info["usage"]
    counts = info["counts"]
    # 16-byte stores; 8-byte ones at 32 columns (16 x 32 values over 128 threads: four per thread)
    assert counts.get("STG.E.128", 0) + (counts.get("STG.E.64", 0) if block_k == 32 else 0) >= 1, counts
    assert any(k.startswith(("HMMA", "HGMMA")) for k in counts), counts


@pytest.mark.parametrize("preset,seeds", [("lora_down", 3), ("lora_bwd", 3), ("lora_dx_da", 3), ("lora_da", 3),
                                          ("lora_tma_bwd", 3),
                                          ("norm_lora_fwd", 3), ("norm_lora_bwd", 3), ("swiglu_lora_fwd", 1),
                                          ("swiglu_lora_bwd", 1)])
def test_dropout_kernels_build_with_seed_one(preset, seeds):
    """Triton turns an int argument equal to 1 into a constant when it specializes a launch, so a dropout
    seed of 1 reaches the mask as a constexpr, not a tensor. The mask must take it: ``seed.to(...)`` did
    not (the fused SwiGLU + LoRA kernels failed to build at seed 1 on an H100 under triton 3.6)."""
    names = ["seed"] if seeds == 1 else [f"seed{i}" for i in range(seeds)]
    args = [preset]
    for name in names:
        args += ["--meta", f"{name}=1"]
    info = json.loads(_sass(*args, "--json"))
    assert "REG:" in info["usage"], info["usage"]


def test_fused_forward_register_decode_builds_without_table_loads(tmp_path):
    """The fused NF4 forward with decode="prmt" (16 rows of x, 128 of W, blocksize 64; its sm_90 build
    under the launcher's 4 warps and 3 stages): no spills, its dots on the tensor cores, 16 byte permutes
    per word of the tile (8 words a thread per chunk) and none of the pair table's gathers, which the
    table build's pipeliner turns into 4-byte cp.async copies (LDGSTS.E). In the default operand order
    (swap: W x^T, one dot of the chunk's 64 columns) the dot is a warpgroup MMA and the loop is ~27%
    shorter than x W^T's two mma.sync dots (394 against 541 instructions on triton 3.6, 399 against 546
    on 3.9): no register moves to assemble the mma.sync operands."""
    info = {}
    for preset, meta in (("nf4_fused_fwd", ()), ("nf4_fused_fwd_prmt", ()),
                         ("nf4_fused_fwd_prmt", ("--meta", "SWAP=false"))):
        name = preset + "".join(meta)
        info[name] = json.loads(_sass(preset, *meta, "--json", "--dump", str(tmp_path / f"{preset}.sass")))
    swap, plain = info["nf4_fused_fwd_prmt"], info["nf4_fused_fwd_prmt--metaSWAP=false"]
    for prmt in (swap, plain):
        assert "STACK:0" in prmt["usage"], prmt["usage"]
        assert prmt["loop"].get("PRMT", 0) >= 16 * 8, prmt["loop"]
        assert prmt["counts"].get("LDGSTS.E", 0) == 0, prmt["counts"]
    assert plain["loop"].get("HMMA", 0) >= 8, plain["loop"]
    assert swap["loop"].get("HGMMA", 0) >= 8, swap["loop"]
    assert sum(swap["loop"].values()) < 0.8 * sum(plain["loop"].values()), (swap["loop"], plain["loop"])
    assert info["nf4_fused_fwd"]["counts"].get("LDGSTS.E", 0) > 0  # the table build's gathers, as cp.async


@pytest.mark.parametrize("kernel,p,r_pad", [("lora_tma_fwd", 1, 16), ("lora_tma_fwd", 3, 16), ("lora_tma_fwd", 1, 64),
                                            ("lora_tma_fwd", 3, 64),
                                            ("lora_tma_bwd", 1, 16), ("lora_tma_bwd", 1, 64), ("lora_tma_bwd", 3, 16),
                                            ("lora_tma_bwd", 3, 64)])
def test_tma_lora_gemms_use_tma_and_wgmma(kernel, p, r_pad):
    """The tma path's GEMMs at the launcher's default tiles (``lora_tma.DEFAULT_FWD``, ``default_bwd``):
    operands by TMA (UTMALDG), products by warpgroup MMA (HGMMA), the output tile by a TMA store, and a
    stack of at most 128 bytes (the backward's q/k/v epilogue at r = 64; none in the forward)."""
    from bezoar_kernels import lora_tma

    if kernel == "lora_tma_fwd":
        cfg = lora_tma.DEFAULT_FWD
        meta = ["--meta", f"P={p}", "--meta", f"R_PAD={r_pad}"]
        tiles = ["--meta", f"BLOCK_M={cfg.block_m}", "--meta", f"BLOCK_N={cfg.block_n}", "--meta", f"BLOCK_K={cfg.block_k}"]
    else:
        cfg = lora_tma.default_bwd(p, r_pad)
        meta = ["--meta", f"P={p}", "--meta", f"R_PAD={r_pad}"]
        tiles = ["--meta", f"BLOCK_M={cfg.block_m}", "--meta", f"BLOCK_N={cfg.block_n}", "--meta", f"BLOCK_K={cfg.block_k}"]
    info = json.loads(_sass(kernel, *meta, *tiles, "--warps", str(cfg.num_warps), "--stages", str(cfg.num_stages),
                            "--json"))
    stack = int(re.search(r"STACK:(\d+)", info["usage"]).group(1))
    assert stack <= (0 if kernel == "lora_tma_fwd" else 128), info["usage"]
    counts = info["counts"]

    def count(prefix):
        return sum(n for op, n in counts.items() if op.split(".")[0] == prefix)

    assert count("UTMALDG") >= 2 and count("UTMASTG") >= 1, counts
    assert count("HGMMA") >= 1, counts


@pytest.mark.parametrize("r_pad,p,block_m,warps", [(16, 1, 256, 8), (32, 1, 256, 8), (16, 3, 256, 8), (32, 3, 128, 4)])
def test_g_db_kernel_does_not_spill(r_pad, p, block_m, warps):
    """g and dB from one read of dy (``lora._lora_g_db``, its launch tiles): no spills, the two rank-r
    products per step of dy on the tensor cores, dy streamed through cp.async."""
    info = json.loads(_sass("lora_g_db", "--meta", f"R_PAD={r_pad}", "--meta", f"P={p}", "--meta", f"BLOCK_M={block_m}",
                            "--warps", str(warps), "--json"))
    assert "STACK:0" in info["usage"], info["usage"]
    assert info["loop"].get("HGMMA", 0) >= 2, info["loop"]
    assert info["loop"].get("LDGSTS", 0) >= 1, info["loop"]


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("r_pad", [16, 32, 64])
def test_dx_da_kernel_loads_a_once_and_does_not_spill(p, r_pad):
    """The backward's pass over (M, K) (``lora._lora_dx_da``, its column tile and warps): A's tile of each
    projection is the same at every row step and is loaded before the loop, so the loop's global loads
    are dx_in, x and g alone (at most 9 instructions). With A loaded in the loop there were 10-13 (sm_90,
    triton 3.9), P = 1 at r_pad 32 took 222 registers and P = 3 at r_pad 32 8 bytes of stack. And dx_in is
    the product's accumulator, streamed by cp.async into the matrix unit's layout: added to the product
    after it, it went through shared memory in 4 rounds of 2 barriers, 20 barriers a step in all."""
    block_k = 128 if r_pad <= 32 else 64  # the launcher's: min(128, _skinny_blocks' columns) at large M
    info = json.loads(_sass("lora_dx_da", "--meta", f"P={p}", "--meta", f"R_PAD={r_pad}", "--meta", f"BLOCK_K={block_k}",
                            "--warps", "8" if p > 1 else "4", "--json"))
    assert "STACK:0" in info["usage"], info["usage"]
    assert info["loop"].get("LDGSTS", 0) + info["loop"].get("LDG", 0) <= 9, info["loop"]
    assert info["loop"].get("BAR", 0) <= (12 if p == 1 else 16), info["loop"]


@pytest.mark.parametrize("kernel", ["nf4_tma_fwd", "nf4_tma_bwd"])
@pytest.mark.parametrize("bf16_pairs,blocksize", [(True, 64), (False, 64), (True, 128)])
def test_nf4_tma_kernels_decode_into_the_mma_operand(kernel, bf16_pairs, blocksize):
    """The NF4 tma kernels at their default tiles (``nf4_tma.DEFAULT_FWD`` / ``DEFAULT_BWD``): the weight
    by TMA as packed words and decoded in registers into the first operand of warpgroup MMAs (HGMMA with
    a register A), the MMA of one K step left in flight while the next is decoded (a wait for all but
    one group, ``WARPGROUP.DEPBAR.LE gsb0, 0x1``; all but three under triton 3.6), the bf16 scaling as one ``HMUL2`` per pair of weights,
    no spills, and shared memory within the H100's 227 KB."""
    from bezoar_kernels import nf4_tma

    cfg = nf4_tma.DEFAULT_FWD if kernel == "nf4_tma_fwd" else nf4_tma.DEFAULT_BWD
    dump = Path(os.environ.get("TMPDIR", "/tmp")) / f"{kernel}-{bf16_pairs}-{blocksize}-{os.getpid()}.sass"
    info = json.loads(_sass(kernel, "--meta", f"BF16_PAIRS={str(bf16_pairs).lower()}", "--meta", f"BLOCKSIZE={blocksize}",
                            "--meta", f"BLOCK_M={cfg.block_m}", "--meta", f"BLOCK_N={cfg.block_n}",
                            "--meta", f"BLOCK_K={cfg.block_k}", "--warps", str(cfg.num_warps),
                            "--stages", str(cfg.num_stages), "--dump", str(dump), "--json"))
    try:
        assert "STACK:0" in info["usage"], info["usage"]
        assert info["shared"] <= 232448, info["shared"]
        k_loop = info["k_loop"]
        assert k_loop.get("HGMMA", 0) >= 1 and info["hgmma_register_a"] == k_loop["HGMMA"], (k_loop, info)
        assert k_loop.get("UTMALDG", 0) >= 1, k_loop  # x / dy and the words come by TMA inside the loop
        weights = cfg.block_n * cfg.block_k // (32 * cfg.num_warps)  # per thread and K step
        if bf16_pairs:
            assert k_loop.get("HMUL2", 0) == weights // 2, k_loop
        else:
            assert k_loop.get("HMUL2", 0) == 0 and k_loop.get("FMUL", 0) >= weights, k_loop
        # the MMA left in flight: a wait for all but one group (triton 3.9) or all but three (3.6), never
        # for all of them inside the loop
        assert re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x[1-9a-f]", dump.read_text())
    finally:
        dump.unlink(missing_ok=True)


@pytest.mark.parametrize("layout,packed", [("pairs", "true"), ("two_dots", "true"), ("joined", "false")])
def test_merge_kernel_uses_wide_loads_and_stores(layout, packed):
    """The merged path's merge kernel took 212 us a step on an H100 where the dequantize's same traffic took
    22 us: its column masks made the compiler read the packed bytes one at a time (32 LDG.E.U8) and store
    4-byte words (16 STG.E). Without them each layout reads the bytes wide and stores 16 bytes at a time."""
    info = json.loads(_sass("lora_merge", "--meta", f"LAYOUT={layout}", "--meta", f"PACKED={packed}", "--json"))
    counts = info["counts"]
    assert "STACK:0" in info["usage"], info["usage"]
    assert counts.get("LDG.E.U8", 0) <= 2, counts  # the absmax bytes (double quantization), not the packed bytes
    assert counts.get("LDG.E.128", 0) >= 1, counts
    assert counts.get("STG.E.128", 0) >= 1, counts
    assert not any(k.startswith("STG") and k not in ("STG.E.128", "STG.E.64") for k in counts), counts


def test_every_preset_names_only_its_kernels_arguments():
    """Each bench/sass.py preset's signature and constants name arguments its kernel has (a kernel whose
    arguments changed left its preset unable to compile, which only a compile of that preset would show)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sass", ROOT / "bench" / "sass.py")
    sass = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass)
    for name, (module, kernel, signature, constants, *_) in sass.PRESETS.items():
        fn = getattr(importlib.import_module(module), kernel)
        unknown = sorted((set(signature) | set(constants)) - set(fn.arg_names))
        assert not unknown, f"preset {name}: {kernel} has no argument(s) {', '.join(unknown)}"
