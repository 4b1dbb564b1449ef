"""Every layer kernel compiles for an H100 (sm_90) with the installed Triton, no GPU needed.

The interpreter runs kernels as numpy code and accepts things the GPU compiler rejects;
this lowers each kernel to a cubin with Triton's bundled ptxas (see compile_for_sm90.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / "compile_for_sm90.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    for name in ("rms_norm_fwd", "rms_norm_bwd", "rope", "swiglu_fwd", "swiglu_bwd", "cross_entropy_rows",
                 "attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_delta"):
        assert any(line.startswith(f"ok {name} ") for line in lines), name


@pytest.mark.slow
def test_lora_paths_compile_for_sm90():
    """The launches of the cuBLAS-based LoRA paths (cublas, concat, merged: down, the forward epilogue,
    g, dx_da, dB, the merge kernel) lowered to sm_90; the full set is compile_lora_sm90.py without
    --quick (about 120 variants, minutes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "kernels" / "compile_lora_sm90.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout, proc.stdout[-2000:]
    compiled = int(proc.stdout.split(" variants compiled")[0].split()[-1])
    assert compiled >= 10, proc.stdout[-2000:]
