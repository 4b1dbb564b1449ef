"""Compile every Triton launch of ``bezoar_kernels.lora`` for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' arithmetic on CPU but never lowers them; this script does the
lowering (TTIR -> PTX -> cubin, with the ptxas that ships in the triton wheel) for each launch the
launchers make over paths, NF4/dense bases, 1 or 3 projections, with and without adapters and
dropout, small and large M, ranks 16 and 64. Launches are recorded, compiled and not run (the
torch parts of the launchers run on CPU at small sizes). Exits 1 if any variant fails to compile.

    python tests/kernels/compile_lora_sm90.py          # about 120 variants; minutes on a cold cache
    python tests/kernels/compile_lora_sm90.py --quick  # cuBLAS-based and tma paths at r = 16 (the test runs this)
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bezoar_kernels import lora as L  # noqa: E402
from bezoar_kernels import lora_tma as LT  # noqa: E402
from bezoar_kernels import nf4  # noqa: E402
from bezoar_kernels.dispatch import backend  # noqa: E402

TMA_KERNELS = ("_tma_fwd_kernel", "_tma_bwd_kernel")  # the tma path's GEMMs (bezoar_kernels.lora_tma)
KERNELS = ("_lora_down_kernel", "_lora_fwd_kernel", "_lora_bwd_kernel", "_lora_g_kernel", "_lora_g_db_kernel", "_lora_db_kernel",
           "_lora_da_kernel", "_lora_dx_da_kernel", "_nf4_merge_kernel")
TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
         torch.int32: "i32", torch.int64: "i64"}
TARGET = GPUTarget("cuda", 90, 32)


def signature(fn, args, kwargs):
    params = {p.name: p for p in fn.params}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in params})
    sig, constants = {}, {}
    for name in fn.arg_names:
        v = values[name]
        if params[name].is_constexpr:
            sig[name], constants[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + TYPES[v.dtype]
        elif isinstance(v, LT.TensorDescriptor):
            sig[name] = f"tensordesc<{TYPES[v.base.dtype]}[{', '.join(str(b) for b in v.block_shape)}]>"
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} = {v!r}")
    return sig, constants


class Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` compiles the variant instead of launching."""

    def __init__(self, fn, seen, failures):
        self.fn, self.seen, self.failures = fn, seen, failures

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            sig, constants = signature(self.fn, args, kwargs)
            options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
            key = (self.fn.__name__, tuple(sorted(sig.items())),
                   tuple(sorted((k, repr(v)) for k, v in constants.items())), tuple(sorted(options.items())))
            if key in self.seen:
                return
            try:
                compiled = triton.compile(ASTSource(self.fn, sig, constants), target=TARGET, options=options)
                self.seen[key] = compiled.metadata.shared
            except Exception as exc:  # report every failing variant, not just the first
                self.seen[key] = None
                self.failures.append(f"{self.fn.__name__} {constants} {options}:\n{str(exc)[-1500:]}")
        return launch


def run_case(dtype, m, size, r, nf4_base, qkv, path, dropout=0.05):
    g = torch.Generator().manual_seed(0)
    # odd k/v widths, but rows of 16 bytes on the tma path (its tensor descriptors need them)
    half = size // 2 + (8 if path == "tma" else 3)
    ns = [size, half, half] if qkv else [size]
    weights = [torch.randn(n, size, generator=g) * 0.05 for n in ns]
    weights = [nf4.quantize_nf4_reference(w, 64, True) if nf4_base else w.to(dtype) for w in weights]
    adapters = [L.Adapter(torch.randn(r, size).requires_grad_(True), torch.randn(n, r).requires_grad_(True), 0.5)
                for n in ns] if r else None
    x = torch.randn(m, size).to(dtype).requires_grad_(True)
    with backend("triton"):
        outputs = L._apply(x, weights, adapters, dropout, True, [1, 2, 3][:len(ns)], path)
    sum(o.float().sum() for o in outputs).backward()


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    seen, failures = {}, []
    for name in KERNELS:
        setattr(L, name, Recorder(getattr(L, name), seen, failures))
    for name in TMA_KERNELS:
        setattr(LT, name, Recorder(getattr(LT, name), seen, failures))
    # the dequant paths' NF4 -> dense step runs in torch here (its own kernel is nf4.py's)
    L.dequantize_nf4_triton = lambda w, dtype, out=None: out.copy_(
        nf4.dequantize_nf4_reference(w, dtype).reshape(out.shape))
    start = time.time()
    paths = ("cublas", "concat", "tma") if quick else ("fused", "dequant", "cublas", "concat", "tma")
    for path in paths:
        for qkv in (False, True):
            for nf4_base in ((True,) if quick else (True, False)):
                for m in ((4096,) if quick else (1, 4096)):  # small- and large-M tiles; large M at a small size
                    for r in ((16,) if quick else (16, 64, 0)):
                        run_case(torch.bfloat16, m, 3200 if m == 1 else 256, r, nf4_base, qkv, path)
    for qkv in (False, True):  # the merged path: NF4 with adapters and no dropout
        for r in ((16,) if quick else (16, 64)):
            run_case(torch.bfloat16, 4096, 256, r, True, qkv, "merged", dropout=0.0)
    if not quick:
        run_case(torch.float32, 17, 130, 8, True, True, "fused")  # unaligned K: the general NF4 decode
    shared = [s for s in seen.values() if s is not None]
    print(f"{len(seen)} variants compiled for sm_90 in {time.time() - start:.0f}s, {len(failures)} failed; "
          f"largest shared memory {max(shared, default=0)} bytes")
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
