"""The compiled sm_90 code of the gemv kernel (built on the CPU with triton's own ptxas and nvdisasm).

No GPU is needed to see what the compiler made: these checks keep the properties the kernel was
written for, which a timing would only show as a slowdown on the next GPU run. bench/sass.py runs in a
subprocess: compiling needs the real JIT, and the test session runs Triton's interpreter."""

from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("block_m", [1, 4])
def test_gemv_loop_has_no_shared_memory_round_trips(block_m):
    info = json.loads(_sass("nf4_gemv", "--meta", f"BLOCK_M={block_m}", "--json"))
    loop = info["loop"]
    assert loop, "no main loop found in the SASS"
    # the design: plain loads and FMAs; no cp.async, shared stores/loads or barriers per block step
    for op in ("LDGSTS", "STS", "LDS", "BAR", "HMMA", "HGMMA"):
        assert loop.get(op, 0) == 0, (op, loop)
    assert "STACK:0" in info["usage"], info["usage"]  # no register spills
    # one step decodes 64 x 64 weights with 128 threads (32 per thread): about 9 instructions per
    # weight at M = 1 when written (291), 19 at M = 4 (603); the bound catches a regression, not noise
    per_weight = sum(loop.values()) / 32
    assert per_weight < 12 * block_m ** 0.6, (per_weight, loop)
    assert loop.get("FFMA", 0) >= 32 * block_m  # the products are fused multiply-adds


@pytest.mark.parametrize("block_m,blocksize", [(8, 64), (8, 128), (4, 128)])
def test_gemv_tiles_the_launcher_picks_do_not_spill(block_m, blocksize):
    from bezoar_kernels.nf4_matmul import gemv_block_n

    block_n = gemv_block_n(block_m, blocksize)
    info = json.loads(_sass("nf4_gemv", "--meta", f"BLOCK_M={block_m}", "--meta", f"BLOCKSIZE={blocksize}",
                            "--meta", f"BLOCK_N={block_n}", "--json"))
    assert "STACK:0" in info["usage"], (block_n, info["usage"])  # 64 rows at 8 x 128 spilled 480 bytes
    assert info["loop"].get("STL", 0) == 0 and info["loop"].get("LDL", 0) == 0, info["loop"]


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
