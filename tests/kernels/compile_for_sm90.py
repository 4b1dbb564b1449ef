"""Compile every layer kernel for an H100 (sm_90) on a machine without a GPU.

Triton lowers a kernel all the way to a cubin with the ptxas it ships, no device needed, so
this catches what the interpreter cannot: code that does not compile for the GPU, shared
memory over the limit, and (with cuobjdump) register spills. Runs in its own process,
without TRITON_INTERPRET:

    python tests/kernels/compile_for_sm90.py              # the first autotune config of each kernel
    python tests/kernels/compile_for_sm90.py --all-configs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bezoar_kernels import attention, cross_entropy, rmsnorm, rope, swiglu  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes per block on an H100
BF16 = "bf16"
FLOAT_ARGS = {"eps", "qk_scale", "sm_scale"}


def _signature(fn, pointers: dict, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + pointers.get(name, BF16)
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _resource_usage(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    lines = [line.strip() for line in out.splitlines() if "REG:" in line]
    return lines[0] if lines else ""


def kernel_specs(all_configs: bool):
    """(name, jit function, pointer dtypes, constexprs, num_warps, num_stages) at OpenLLaMA 3B sizes."""
    f32 = "fp32"
    specs = []
    for has_residual in (False, True):
        specs.append(("rms_norm_fwd", rmsnorm._rms_norm_fwd_kernel, {"rstd_ptr": f32},
                      dict(HAS_RESIDUAL=has_residual, BLOCK_R=1, BLOCK_C=4096), 8, 3))
        specs.append(("rms_norm_bwd", rmsnorm._rms_norm_bwd_kernel, {"rstd_ptr": f32, "dw_partial_ptr": f32},
                      dict(HAS_DS_IN=has_residual, COMPUTE_DW=True, BLOCK_R=1, BLOCK_C=4096), 8, 3))
    specs.append(("rope", rope._rope_kernel, {"cos_ptr": f32, "sin_ptr": f32},
                  dict(INVERSE=False, BLOCK_R=32, BLOCK_HALF=64), 8, 3))
    specs.append(("swiglu_fwd", swiglu._swiglu_fwd_kernel, {}, dict(BLOCK_R=4, BLOCK_C=1024), 4, 3))
    specs.append(("swiglu_bwd", swiglu._swiglu_bwd_kernel, {}, dict(BLOCK_R=4, BLOCK_C=1024), 4, 3))
    specs.append(("cross_entropy_rows", cross_entropy._ce_rows_kernel,
                  {"labels_ptr": "i64", "scale_ptr": f32, "loss_ptr": f32, "lse_ptr": f32},
                  dict(COMPUTE_GRAD=True, BLOCK_R=1, BLOCK_V=4096), 8, 3))
    attn_ptrs = {"lse_ptr": f32, "delta_ptr": f32, "doc_ptr": "i32", "first_ptr": "i32", "last_ptr": "i32"}
    specs.append(("attn_bwd_delta", attention._attn_bwd_delta_kernel, attn_ptrs, dict(BLOCK_M=64, BLOCK_D=128), 4, 3))
    for name, tuner in (("attn_fwd", attention._attn_fwd_kernel), ("attn_bwd_dkdv", attention._attn_bwd_dkdv_kernel),
                        ("attn_bwd_dq", attention._attn_bwd_dq_kernel)):
        configs = tuner.configs if all_configs else tuner.configs[:1]
        for config in configs:
            constexprs = dict(HAS_DOCS=True, DOT_PRECISION="tf32", BLOCK_D=128, **config.kwargs)
            specs.append((name, tuner.fn, attn_ptrs, constexprs, config.num_warps, config.num_stages))
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all-configs", action="store_true", help="every autotune config of the attention kernels")
    args = p.parse_args(argv)
    failures = 0
    for name, fn, pointers, constexprs, num_warps, num_stages in kernel_specs(args.all_configs):
        label = f"{name} {constexprs} warps={num_warps} stages={num_stages}"
        try:
            src = ASTSource(fn, _signature(fn, pointers, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
        except Exception as exc:
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {exc}", flush=True)
            continue
        shared = compiled.metadata.shared
        status = "ok" if shared <= SHARED_LIMIT else "FAIL (shared memory)"
        failures += status != "ok"
        print(f"{status} {label} shared={shared} {_resource_usage(compiled.asm['cubin'])}", flush=True)
    if shutil.which("nvidia-smi") is None:
        print("(compiled for sm_90 without a GPU)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
