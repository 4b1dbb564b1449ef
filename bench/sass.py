"""Compile a bezoar Triton kernel for an NVIDIA target on any machine (no GPU needed) and report it.

Prints registers, spills (stack), shared memory, the count of each memory / matrix / barrier
instruction in the SASS, and the instructions in the main loop, which say more about a kernel than a
timing does when no GPU is at hand: scalar loads where vector loads were meant, gathers that the
pipeliner turned into cp.async round trips, layout conversions (shared stores, loads, barriers) inside
the loop, register spills. Uses triton's bundled ptxas and nvdisasm.

    python bench/sass.py --list
    python bench/sass.py nf4_gemv --meta BLOCK_M=1 --meta BLOCK_N=64
    python bench/sass.py lora_down --meta DROPOUT=true --arch 90 --dump /tmp/lora_down.sass

Integer arguments are compiled as a launch would see them: divisible by 16 (sizes and row strides of
the OpenLLaMA shapes, a LoRA rank of 16 or 64, split sizes in whole tiles) and the unit strides as the
constant 1 (triton specializes both at launch); the presets mark the ones that are not (M, seeds).
Leaving a size unmarked that is divisible in practice makes loads look scalar that are not.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the presets of bench/ modules (gemv_ladder)


def _gemv(table: str, table_type: str, x_pairs: bool) -> tuple:
    """The gemv kernel with one code lookup (GemvConfig.table) and its table's pointer type."""
    return ("bezoar_kernels.nf4_matmul", "_nf4_gemv_kernel",
            {"x_ptr": "*bf16", "words_ptr": "*i32", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
             "nested_code_ptr": "*fp32", "table_ptr": table_type, "out_ptr": "*fp32", "final_ptr": "*bf16",
             "counts_ptr": "*i32", "offset": "fp32", "M": "i32:any"},
            {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "NESTED": 256, "BLOCK_M": 1, "BLOCK_N": 32, "BLOCKS": 8,
             "SPLIT": True, "TABLE": table, "ASM": True, "X_PAIRS": x_pairs, "BLOCK_SCALE": True, "PDL": False,
             "STEPS": 1},
            4, 1)


def _fused_fwd(prmt: bool) -> tuple:
    """The fused NF4 forward, its codes from the pair table or (prmt) the register decode."""
    return ("bezoar_kernels.nf4_matmul", "_nf4_matmul_fwd_kernel",
            {"x_ptr": "*bf16", "packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32",
             "nested_code_ptr": "*fp32", "code_ptr": "*fp32", "table_ptr": "*i32", "out_ptr": "*fp32",
             "final_ptr": "*bf16", "counts_ptr": "*i32", "offset": "fp32", "M": "i32:any",
             "chunks_per_split": "i32:any"},
            {"stride_xk": 1, "stride_on": 1, "BLOCKSIZE": 64, "CHUNK": 64, "ALIGNED": True,
             "DOUBLE_QUANT": True, "NESTED": 256, "BLOCK_M": 16, "BLOCK_N": 128, "DOT_PRECISION": "tf32",
             "SPLIT": True, "PRMT": prmt, "ASM": True, "SWAP": prmt},
            4, 3)


def _ladder(rung: str) -> tuple:
    """A rung of bench/gemv_ladder.py at the H100's tuned M = 1 gemv tiles (16 rows x 8 blocks, 4 warps)."""
    tiles = {"BLOCK_N": 16, "BLOCKS": 8, "BLOCKSIZE": 64}
    chain = {"words_ptr": "*i32", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
             "out_ptr": "*i32", "offset": "fp32"}
    return {
        "empty": ("gemv_ladder", "_ladder_empty_kernel", {"out_ptr": "*i32"}, {}, 4, 1),
        "read": ("gemv_ladder", "_ladder_read_kernel", {"words_ptr": "*i32", "absmax_ptr": "*u8", "out_ptr": "*i32"},
                 tiles, 4, 1),
        "read_scale": ("gemv_ladder", "_ladder_read_scale_kernel", chain, {**tiles, "NESTED": 256}, 4, 1),
        "decode": ("gemv_ladder", "_ladder_decode_kernel", {**chain, "planes_ptr": "*i32", "out_ptr": "*fp32"},
                   {**tiles, "NESTED": 256, "ASM": True}, 4, 1),
    }[rung]


def _desc(rows: str, cols: str, dtype: str = "bf16"):
    """A tensor descriptor argument whose block is (constants[rows], constants[cols]): typed after --meta."""
    return lambda c: f"tensordesc<{dtype}[{c[rows]}, {c[cols]}]>"


def _lora_tma(kind: str) -> tuple:
    """The ``tma`` LoRA GEMMs (bezoar_kernels.lora_tma) at their default tiles, with dropout."""
    common = {"M": "i32:any", "NUM_PROGRAMS": "i32:any"}
    if kind == "fwd":
        return ("bezoar_kernels.lora_tma", "_tma_fwd_kernel",
                {**common, "x_desc": _desc("BLOCK_M", "BLOCK_K"), "w_desc": _desc("BLOCK_N", "BLOCK_K"),
                 "y_desc": _desc("BLOCK_M", "BLOCK_N"), "xa_ptr": "*bf16", "b_ptr": "*bf16", "scaling0": "fp32",
                 "scaling1": "fp32", "scaling2": "fp32", "N0": "i32:any", "N1": "i32:any"},
                {"P": 1, "HAS_LORA": True, "R_PAD": 16, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8,
                 "FLATTEN": False, "DOT_PRECISION": "tf32"}, 8, 3)
    return ("bezoar_kernels.lora_tma", "_tma_bwd_kernel",
            {**common, "dy_desc": _desc("BLOCK_M", "BLOCK_N"), "w_desc": _desc("BLOCK_N", "BLOCK_K"),
             "dx_desc": _desc("BLOCK_M", "BLOCK_K"), "x_ptr": "*bf16", "g_ptr": "*bf16", "a_ptr": "*bf16",
             "da_ptr": "*fp32", "keep_scale": "fp32", "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any",
             "threshold": "i32:any"},
            {"P": 1, "HAS_LORA": True, "DROPOUT": True, "FUSE_DA": True, "R_PAD": 16, "BLOCK_M": 128,
             "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "FLATTEN": False, "DOT_PRECISION": "tf32"}, 8, 4)


def _nf4_tma(kind: str) -> tuple:
    """The NF4 ``tma`` kernels (bezoar_kernels.nf4_tma) at their default tiles, bf16 pairs, double quant."""
    fwd = kind == "fwd"
    a, out = ("x_desc", "y_desc") if fwd else ("dy_desc", "dx_desc")
    tiles = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64} if fwd else {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 128}
    return ("bezoar_kernels.nf4_tma", "_nf4_tma_fwd_kernel" if fwd else "_nf4_tma_bwd_kernel",
            {"M": "i32:any", "NUM_PROGRAMS": "i32:any", a: _desc("BLOCK_M", "BLOCK_K" if fwd else "BLOCK_N"),
             "w_desc": lambda c: f"tensordesc<i32[{c['BLOCK_N']}, {c['BLOCK_K'] // 8}]>",
             out: _desc("BLOCK_M", "BLOCK_N" if fwd else "BLOCK_K"), "absmax_ptr": "*u8",
             "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "planes_ptr": "*i32", "offset": "fp32"},
            {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "NESTED": 256, **tiles, "GROUP_M": 8, "ASM": True,
             "BF16_PAIRS": True}, 8, 3, {"enable_fp_fusion": False})  # as nf4_tma launches them


# name: (module, kernel, argument types (others: i32 divisible by 16; a callable: a type from the
# constants), constants, num_warps, num_stages[, compile options the launcher passes])
PRESETS = {
    "nf4_gemv": _gemv("byte", "*i64", False),
    # the same with the 16-entry fp32 code table (GemvConfig(table="nibble"))
    "nf4_gemv_nibble": _gemv("nibble", "*fp32", False),
    # the same with the codes looked up by byte permutes in registers (GemvConfig(table="prmt")), x read
    # as int32 pairs as the launcher does at M = 1
    "nf4_gemv_prmt": _gemv("prmt", "*i32", True),
    # the same with the 16 fp32 codes looked up in shared memory (GemvConfig(table="gather"))
    "nf4_gemv_gather": _gemv("gather", "*fp32", True),
    # the rungs of bench/gemv_ladder.py (the gemv's loads, + the scale chain, + the register decode)
    "ladder_empty": _ladder("empty"),
    "ladder_read": _ladder("read"),
    "ladder_read_scale": _ladder("read_scale"),
    "ladder_decode": _ladder("decode"),
    # the register decode alone (nf4.nf4_words_bf16)
    "nf4_words_bf16": ("bezoar_kernels.nf4", "_nf4_words_bf16_kernel",
                       {"words_ptr": "*i32", "planes_ptr": "*i32", "out_ptr": "*i32", "n": "i32:any"},
                       {"BLOCK": 1024, "ASM": True}, 4, 1),
    "nf4_dequant": ("bezoar_kernels.nf4", "_nf4_dequantize_kernel",
                    {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                     "byte_table_ptr": "*i64", "out_ptr": "*i32", "offset": "fp32"},
                    {"BLOCKSIZE": 64, "BLOCKS_PER_PROG": 64, "DOUBLE_QUANT": True, "NESTED": 256, "EVEN": True,
                     "STRIDED": False, "PACKED": True, "PACKED_BF16": True},
                    4, 3),
    "nf4_fused_fwd": _fused_fwd(False),
    # the same with the codes decoded in registers (FusedConfig(decode="prmt"))
    "nf4_fused_fwd_prmt": _fused_fwd(True),
    "lora_bwd": ("bezoar_kernels.lora", "_lora_bwd_kernel",
                 {**{f"{n}{j}_ptr": "*bf16" for n in ("w", "absmax", "nested_absmax", "nested_code") for j in range(3)},
                  "dy0_ptr": "*bf16", "dy1_ptr": "*bf16", "dy2_ptr": "*bf16", "g_ptr": "*bf16", "a_ptr": "*bf16",
                  "dx_ptr": "*bf16", "code_ptr": "*fp32", "offset0": "fp32", "offset1": "fp32", "offset2": "fp32",
                  "keep_scale": "fp32", "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any",
                  "threshold": "i32:any"},
                 {"stride_dxs": 0, "P": 1, "BASE": 1, "HAS_LORA": True, "DROPOUT": True, "R_PAD": 16, "BLOCK_M": 128,
                  "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "BLOCKSIZE": 64, "CHUNK": 64, "ALIGNED": True,
                  "DOUBLE_QUANT": False, "NESTED": 256, "DOT_PRECISION": "tf32"}, 8, 4),
    "lora_fwd": ("bezoar_kernels.lora", "_lora_fwd_kernel",
                 {**{f"{n}{j}_ptr": "*bf16" for n in ("w", "absmax", "nested_absmax", "nested_code") for j in range(3)},
                  "x_ptr": "*bf16", "xa_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "code_ptr": "*fp32",
                  "offset0": "fp32", "offset1": "fp32", "offset2": "fp32", "scaling0": "fp32", "scaling1": "fp32",
                  "scaling2": "fp32", "steps_per_split": "i32:any"},
                 {"stride_xk": 1, "stride_ys": 0, "BASE": 1, "HAS_LORA": True, "R_PAD": 16, "BLOCK_M": 128,
                  "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "BLOCKSIZE": 64, "CHUNK": 64, "ALIGNED": True,
                  "DOUBLE_QUANT": False, "NESTED": 256, "DOT_PRECISION": "tf32"}, 8, 4),
    "decode_attn": ("bezoar_kernels.decode_attention", "_decode_attn_kernel",
                    {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i1", "o_ptr": "*bf16",
                     "part_ptr": "*fp32", "stats_ptr": "*fp32", "scale": "fp32", "S": "i32:any",
                     "N_REP": "i32:any", "keys_per_split": "i32:any"},
                    {"HEAD_DIM": 100, "HAS_MASK": True, "BLOCK_S": 64, "BLOCK_D": 128, "SPLIT": True}, 4, 3),
    "decode_attn_combine": ("bezoar_kernels.decode_attention", "_decode_attn_combine_kernel",
                            {"part_ptr": "*fp32", "stats_ptr": "*fp32", "o_ptr": "*bf16", "SPLITS": "i32:any"},
                            {"HEAD_DIM": 100, "BLOCK_D": 128, "SPLITS_POW2": 8}, 4, 3),
    # the LoRA GEMMs of the tma path: tensor descriptors, persistent programs, LoRA epilogues
    "lora_tma_fwd": _lora_tma("fwd"),
    "lora_tma_bwd": _lora_tma("bwd"),
    "nf4_tma_fwd": _nf4_tma("fwd"),
    "nf4_tma_bwd": _nf4_tma("bwd"),
    "lora_down": ("bezoar_kernels.lora", "_lora_down_kernel",
                  {"x_ptr": "*bf16", "a_ptr": "*bf16", "xa_ptr": "*bf16", "wide_ptr": "*bf16", "keep_scale": "fp32",
                   "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any", "threshold": "i32:any"},
                  {"stride_xk": 1, "P": 1, "DROPOUT": True, "R_PAD": 16, "BLOCK_M": 64, "BLOCK_K": 128,
                   "DOT_PRECISION": "tf32", "WIDE": False, "WIDTH": 16, "PAD": 0}, 4, 3),
    "lora_dx_da": ("bezoar_kernels.lora", "_lora_dx_da_kernel",
                   {"dx_in_ptr": "*bf16", "dx_ptr": "*bf16", "x_ptr": "*bf16", "g_ptr": "*bf16", "a_ptr": "*bf16",
                    "da_ptr": "*fp32", "keep_scale": "fp32", "seed0": "i32:any", "seed1": "i32:any",
                    "seed2": "i32:any", "threshold": "i32:any"},
                   {"stride_xk": 1, "P": 1, "DROPOUT": True, "NEED_DA": True, "R_PAD": 16, "BLOCK_M": 32,
                    "BLOCK_K": 128, "DOT_PRECISION": "tf32"}, 4, 3),
    # g and dB from one read of dy (lora._lora_g_db): 256-row blocks, 8 warps, as at M >= 8192
    "lora_g_db": ("bezoar_kernels.lora", "_lora_g_db_kernel",
                  {"dy0_ptr": "*bf16", "dy1_ptr": "*bf16", "dy2_ptr": "*bf16", "b_ptr": "*bf16", "xa_ptr": "*bf16",
                   "g_ptr": "*fp32", "db_ptr": "*fp32", "scaling0": "fp32", "scaling1": "fp32", "scaling2": "fp32",
                   "M": "i32:any"},
                  {"P": 1, "R_PAD": 16, "BLOCK_M": 256, "BLOCK_N": 64, "DOT_PRECISION": "tf32"}, 8, 3),
    "lora_merge": ("bezoar_kernels.lora", "_nf4_merge_kernel",
                   {"packed_ptr": "*u8", "absmax_ptr": "*u8", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32",
                    "byte_table_ptr": "*i64", "b_ptr": "*bf16", "a_ptr": "*bf16", "out_ptr": "*i32", "extra_ptr": "*bf16",
                    "offset": "fp32", "scaling": "fp32", "N": "i32:any"},
                   {"BLOCKSIZE": 64, "DOUBLE_QUANT": True, "NESTED": 256, "R_PAD": 16, "BLOCK_N": 64, "EVEN_N": True,
                    "LAYOUT": "pairs", "PACKED": True, "PACKED_BF16": True, "DOT_PRECISION": "tf32", "EXTRA": 2,
                    "WIDTH": 16, "P": 1}, 4, 1),
    "lora_da": ("bezoar_kernels.lora", "_lora_da_kernel",
                {"x_ptr": "*bf16", "g_ptr": "*bf16", "da_ptr": "*fp32", "keep_scale": "fp32",
                 "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any", "threshold": "i32:any"},
                {"stride_xk": 1, "P": 1, "DROPOUT": True, "R_PAD": 16, "BLOCK_M": 64, "BLOCK_K": 128,
                 "DOT_PRECISION": "tf32"}, 4, 3),
    "norm_lora_fwd": ("bezoar_kernels.norm_lora", "_norm_lora_fwd_kernel",
                      {"x_ptr": "*bf16", "res_ptr": "*bf16", "nw_ptr": "*bf16", "s_ptr": "*bf16", "rstd_ptr": "*fp32",
                       "a_ptr": "*bf16", "xa_ptr": "*bf16", "wide_ptr": "*bf16", "eps": "fp32", "keep_scale": "fp32",
                       "M": "i32:any", "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any",
                       "threshold": "i32:any"},
                      {"P": 3, "HAS_RESIDUAL": True, "DROPOUT": True, "R_PAD": 16, "BLOCK_M": 16, "BLOCK_K": 128,
                       "WIDTH": 16, "DOT_PRECISION": "tf32", "PAD": 0}, 4, 3),
    "norm_lora_bwd": ("bezoar_kernels.norm_lora", "_norm_lora_bwd_kernel",
                      {"dhb_ptr": "*bf16", "g_ptr": "*bf16", "a_ptr": "*bf16", "s_ptr": "*bf16", "nw_ptr": "*bf16",
                       "rstd_ptr": "*fp32", "ds_in_ptr": "*bf16", "ds_ptr": "*bf16", "keep_scale": "fp32",
                       "M": "i32:any", "seed0": "i32:any", "seed1": "i32:any", "seed2": "i32:any",
                       "threshold": "i32:any"},
                      {"P": 3, "HAS_DS_IN": True, "DROPOUT": True, "R_PAD": 16, "BLOCK_M": 16, "BLOCK_K": 128,
                       "DOT_PRECISION": "tf32"}, 4, 3),
    "swiglu_lora_fwd": ("bezoar_kernels.swiglu_lora", "_swiglu_lora_fwd_kernel",
                        {"gate_ptr": "*bf16", "up_ptr": "*bf16", "a_ptr": "*bf16", "xa_ptr": "*bf16",
                         "wide_ptr": "*bf16", "keep_scale": "fp32", "M": "i32:any", "seed": "i32:any",
                         "threshold": "i32:any"},
                        {"DROPOUT": True, "R_PAD": 16, "BLOCK_M": 16, "BLOCK_K": 128, "WIDTH": 16,
                         "DOT_PRECISION": "tf32", "PAD": 0}, 4, 3),
    "swiglu_lora_bwd": ("bezoar_kernels.swiglu_lora", "_swiglu_lora_bwd_kernel",
                        {"dab_ptr": "*bf16", "g_ptr": "*bf16", "a_ptr": "*bf16", "gate_ptr": "*bf16", "up_ptr": "*bf16",
                         "dgate_ptr": "*bf16", "dup_ptr": "*bf16", "keep_scale": "fp32", "M": "i32:any",
                         "seed": "i32:any", "threshold": "i32:any"},
                        {"DROPOUT": True, "R_PAD": 16, "BLOCK_M": 16, "BLOCK_K": 128, "DOT_PRECISION": "tf32"}, 4, 3),
}
COUNTED = re.compile(r"\b(LDGSTS|LDG|STG|LDSM|STSM|LDS|STS|HGMMA|HMMA|SHFL|BAR|UTMALDG|UTMASTG)(\.[A-Z0-9.]+)?")
OPCODE = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def compile_kernel(preset: str, meta: dict, warps: int | None, stages: int | None, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, types, constants, default_warps, default_stages, *launch = PRESETS[preset]
    fn = getattr(importlib.import_module(module), name)
    constants = dict(constants, **meta)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constants:
            signature[arg] = "constexpr"
            continue
        kind = types.get(arg, "i32")
        if callable(kind):
            kind = kind(constants)
        signature[arg] = kind.split(":")[0]
        if kind.startswith("*") or kind == "i32":  # pointers aligned, sizes and strides divisible by 16
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs=constants, attrs=attrs)
    options = dict(dict(num_warps=warps or default_warps, num_stages=stages or default_stages, enable_fp_fusion=True),
                   **(launch[0] if launch else {}))
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options), options


def analyse(kernel, dump: str | None = None) -> dict:
    """{"usage": cuobjdump's resource line, "counts": memory/matrix/barrier instructions of the whole
    kernel, "loop": opcode counts of the main loop (the longest backward branch), "k_loop": those of the
    innermost loop with tensor-core instructions when it is another loop (empty otherwise),
    "hgmma_register_a": the warpgroup MMAs of that loop that take their first operand from registers,
    "shared": the launch's shared memory in bytes (static and dynamic)}."""
    bin_dir = Path(importlib.import_module("triton").__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    if dump:
        Path(dump).write_text(sass)
    text = sass.splitlines()
    labels = {line.strip().rstrip(":"): i for i, line in enumerate(text) if re.match(r"^\.L_x_\d+:$", line.strip())}
    spans = []
    for i, line in enumerate(text):
        m = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            spans.append((labels[m.group(1)], i))
    best = max(spans, key=lambda s: s[1] - s[0], default=None)

    def opcodes(span):
        return collections.Counter(m.group(1) for line in text[span[0]:span[1] + 1] if (m := OPCODE.match(line)))

    loop = opcodes(best) if best else collections.Counter()
    # the innermost loop with tensor-core instructions: a persistent kernel's K loop (its main loop is the
    # loop over tiles)
    mma = [s for s in spans if any(k.startswith(("HGMMA", "HMMA")) for k in opcodes(s))]
    inner = min(mma, key=lambda s: s[1] - s[0], default=None)
    k_loop = opcodes(inner) if inner and inner != best else collections.Counter()
    # warpgroup MMAs whose first operand comes from registers (``HGMMA... Rd, Ra, gdesc[...]``), not from
    # shared memory (``HGMMA... Rd, gdesc[...]``)
    register_a = sum(1 for line in (text[inner[0]:inner[1] + 1] if inner else text)
                     if re.search(r"HGMMA\.\S+\s+R\d+,\s*R\d+,\s*gdesc", line))
    return {"usage": " ".join(line.strip() for line in usage.splitlines() if "REG:" in line),
            "counts": collections.Counter(m.group(0) for m in COUNTED.finditer(sass)), "loop": loop,
            "k_loop": k_loop, "hgmma_register_a": register_a, "shared": kernel.metadata.shared}


def report(info: dict) -> str:
    lines = [info["usage"] + f" (shared memory in all: {info['shared']} bytes)", "whole kernel: " + ", ".join(f"{n} {k}" for k, n in sorted(info["counts"].items()))]
    if info["loop"]:
        lines.append(f"main loop: {sum(info['loop'].values())} instructions: "
                     + ", ".join(f"{k} {n}" for k, n in info["loop"].most_common(14)))
    if info.get("k_loop"):
        lines.append(f"inner MMA loop: {sum(info['k_loop'].values())} instructions: "
                     + ", ".join(f"{k} {n}" for k, n in info["k_loop"].most_common(14)))
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compiling needs the real JIT, not the interpreter
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("preset", nargs="?", choices=sorted(PRESETS))
    p.add_argument("--list", action="store_true", help="list the presets and their constants")
    p.add_argument("--meta", action="append", default=[], metavar="NAME=VALUE", help="override a constant")
    p.add_argument("--warps", type=int)
    p.add_argument("--stages", type=int)
    p.add_argument("--arch", type=int, default=90, help="compute capability, 90 = H100/H200 (default)")
    p.add_argument("--dump", metavar="FILE", help="write the whole SASS here")
    p.add_argument("--json", action="store_true", help="print the analysis as one JSON object")
    args = p.parse_args(argv)
    if args.list or not args.preset:
        for name, (module, kernel, _, constants, warps, stages, *_) in PRESETS.items():
            print(f"{name}: {module}.{kernel} warps={warps} stages={stages} {constants}")
        return 0
    meta = {}
    for item in args.meta:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--meta {item!r}: expected NAME=VALUE")
        meta[key] = _value(value)
    kernel, options = compile_kernel(args.preset, meta, args.warps, args.stages, args.arch)
    info = analyse(kernel, args.dump)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.preset} sm_{args.arch} {options} {meta or ''}")
    print(report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
