"""NF4 + LoRA forward+backward against NF4 alone, PEFT-style separate matmuls and bitsandbytes + PEFT.

Measures, side by side in one run (bf16, CUDA), on OpenLLaMA 3B shapes W (N, K) in
{3200x3200 (q/k/v/o), 8640x3200 (gate/up), 3200x8640 (down)}, M in {4096, 16384}, r in {16, 64},
dropout 0.05 (the OpenBezoar setting), the time of one forward + backward (dx, and dA, dB where
there is an adapter; ``torch.autograd.grad``, so nothing accumulates):

* ``nf4_only``: bezoar's NF4 matmul alone (what dispatch picks: dequant + cuBLAS at these M);
* ``lora_auto`` / ``lora_dequant`` / ``lora_cublas`` / ``lora_concat`` / ``lora_tma``: bezoar's fused
  NF4 + LoRA op on the path "auto" picks and on each large-M path (``--paths`` picks which); with
  ``--dropout 0`` also ``lora_merged`` (the LoRA term folded into the weight, which "auto" then
  takes), written to ``lora-no-dropout-<device>-<date>.json``. With ``tma`` timed also ``nf4_tma_gemm``
  (the LoRA tma path's persistent Triton GEMMs with no adapter, on the dequantized weight: bezoar's
  GEMM against the cuBLAS GEMM inside ``nf4_only``), ``nf4_tma_decode`` (the NF4 matmul's own ``tma``
  kernels, ``bezoar_kernels.nf4_tma``: no dequantize pass) and ``lora_tma_da_pass`` (dA by its own
  pass instead of the dx epilogue); with ``concat`` timed also ``lora_concat_rounded``: the concat
  path with the dA/dB reductions' splits as they were before they were fitted to the kernels'
  occupancy (``BEZOAR_LORA_WAVES=0``);
* ``peft_style``: bezoar's NF4 matmul plus PEFT's LoRA arithmetic as separate torch ops
  (``F.dropout``, two ``F.linear``, scale, add): the ~1.3x the issue quotes;
* ``bnb_peft``: bitsandbytes ``matmul_4bit`` as the base plus the same PEFT arithmetic (what
  PEFT's bnb ``Linear4bit`` LoRA layer runs), and ``bnb_only``; empty when bitsandbytes does not
  import (it is not installed on the measuring GPU box);
* q/k/v (3200x3200 x3): ``qkv_nf4_only`` (three NF4 matmuls), ``qkv_lora_fused`` (``lora_qkv``
  on the path "auto" picks), ``qkv_lora_concat`` (``lora_qkv`` on the concat path) and
  ``qkv_lora_separate`` (three ``lora_linear`` calls);
* norm + projections (only with dropout > 0, which is what the fusion is for): the RMSNorm that
  feeds the projections timed with them, since ``rms_norm_lora`` moves the LoRA's passes over the
  activations into the norm. x and residual (M, 3200) in, the norm weight frozen; gradients of x,
  residual and the adapters, under random upstream gradients of every output and of s.
  q/k/v (3200x3200 x3): ``norm_qkv_nf4_only`` (``rms_norm_add`` then the three NF4 matmuls),
  ``norm_qkv_lora_separate`` (``rms_norm_add`` then ``lora_qkv``, path "auto"; ``*_lora_concat`` the
  same on the concat path, the fused call's layout, at the largest M and first rank only) and
  ``norm_qkv_lora_fused`` (``rms_norm_lora``; at the largest M and first rank also with each grid
  forced, ``*_lora_fused_persistent`` and ``*_lora_fused_per_block``, which bench/tune.py reads, and
  ``*_lora_fused_rounded``, the splits before the waves as above); gate/up (8640x3200 x2, when that shape is in the
  run): ``norm_gateup_nf4_only``, ``norm_gateup_lora_separate`` (two ``lora_linear`` calls) and
  ``norm_gateup_lora_fused``. SwiGLU + down (3200x8640, when that shape is in the run): gate and up
  (M, 8640) in, ``swiglu_down_nf4_only`` (``swiglu`` then the NF4 matmul), ``swiglu_down_lora_separate``
  (``swiglu`` then ``lora_linear``, path "auto") and ``swiglu_down_lora_fused`` (``swiglu_lora``).
  These groups are measured first (M = 16384, r = 16 at the front).

Ratios are over ``nf4_only`` (``qkv_nf4_only`` for q/k/v, ``<group>_nf4_only`` for the norm and
SwiGLU groups); the target of issue 4 is ``lora_auto / nf4_only <= 1.10`` at every shape, M and r,
and is also reported for the fused groups (producer + LoRA projections over producer + NF4
projections). The script prints the large-M path bench/tune.py would write from the run; where it
differs from the one the run had, the target again for it (``lora_tuned`` in the JSON rows).
``--budget SECONDS`` (or a SIGINT, which ``timeout --signal=INT`` sends) stops starting cases; the
tables and the JSON then hold what was measured and list the rest as skipped. ``--sweep`` also
times a grid of tile configs for the Triton GEMM of the dequant path. Usage::

    python bench/lora.py                  # full run on the GPU, writes bench/results/lora-<device>-<date>.json
    python bench/lora.py --smoke          # tiny shapes on CPU (Triton interpreter), writes nothing
    python bench/lora.py --paths concat,tma --ranks 16 --no-groups   # the tma path against concat only
    python bench/lora.py --sweep-tma --ms 16384   # the tma GEMMs alone at a few tiles against cuBLAS
    python bench/lora.py --sweep-merge --ranks 16,64   # the merged path's weight merge at each launch
    python bench/lora.py --sweep-concat-align   # the concat path at each align of its LoRA columns
    python bench/lora.py --only lora_auto/3200x3200/M=16384/r=16 --iters 50   # one case, for ncu/nsys
    python bench/lora.py --breakdown nf4_only/3200x3200/M=16384,lora_cublas/3200x3200/M=16384/r=16
                                          # GPU time per kernel of one forward + backward, per case

``--breakdown`` (comma list of cases, or ``default``: NF4 alone and the cublas and concat paths at
3200x3200 and 8640x3200, and norm + q/k/v with NF4 alone and fused, M = 16384, r = 16) runs each
case 20 times under ``torch.profiler`` and prints its kernels by GPU time per call: where the time
over NF4 alone goes, launch by launch. Each kernel's time is also given in passes (the time one read of
the case's (M, K) LoRA input takes at the device-to-device copy bandwidth measured in the same run),
and each case whose NF4-alone baseline is profiled too gets its time and passes over it, per kernel
category (cuBLAS GEMM, NF4 dequantize, LoRA, norm, ...): how far each path is from the pass counts
its design assumes. Written to ``lora-breakdown-<device>-<date>.json`` (``lora-breakdown-no-dropout-*``
with ``--dropout 0``, where ``lora_merged/...`` cases exist).

``--sweep-concat-align`` times only the ``concat`` path's forward + backward (dropout ``--dropout``) at each
multiple its forward's LoRA columns are rounded up to (``--aligns``, default 16,64,128; 16 adds no
columns and is always timed), set per call through ``BEZOAR_LORA_CONCAT_ALIGN``: single projections on
each shape, M and rank, and the fused q/k/v call on the first shape (not with ``--no-groups``). Each
align's output and grads are first checked against align 16's (an align that differs by more than float
reassociation gives is reported as an error and not timed); then ``--rounds`` rounds (default 2), each
timing every align in turn in CUDA-graph replay, keep each align's fastest. Written to
``lora-concat-align-<device>-<date>.json``, from which bench/tune.py derives ``lora.concat_align``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tune  # noqa: E402

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640)]  # (N, K) = (out_features, in_features)
MS = [4096, 16384]
RANKS = [16, 64]
SMOKE_SHAPES = [(64, 128)]
SMOKE_MS = [24]
SMOKE_RANKS = [8]
INFERENCE_MS = [1, 2, 4, 8, 16, 32]  # --inference: decoding and evaluation batches
SMOKE_INFERENCE_MS = [1, 3]
INFERENCE_IMPLS = ("nf4_only", "lora_auto", "lora_merged", "peft_style", "bnb_peft")
CONCAT_ALIGNS_DEFAULT = (16, 64, 128)  # --sweep-concat-align's aligns: 16 (no columns added) is the reference
LORA_PATHS = ("auto", "dequant", "cublas", "concat", "tma")  # the lora_<path> cases (with --dropout 0 also merged)
LORA_PEERS = ["nf4_tma_gemm", "nf4_tma_decode", "lora_auto", "lora_dequant", "lora_cublas", "lora_concat", "lora_concat_rounded", "lora_tma",
              "lora_tma_da_pass",
              "lora_merged", "peft_style", "bnb_peft"]
QKV_PEERS = ["qkv_lora_fused", "qkv_lora_concat", "qkv_lora_separate"]
# norm + projections: group -> ((N, K) of each projection, how many), and at smoke size (K a multiple
# of the NF4 blocksize 64, which the fused path needs)
# and the SwiGLU + down_proj group (``swiglu_down``: the LoRA input is act = silu(gate) * up, (M, 8640))
NORM_GROUPS = {"norm_qkv": ((3200, 3200), 3), "norm_gateup": ((8640, 3200), 2), "swiglu_down": ((3200, 8640), 1)}
SMOKE_NORM_SHAPES = {"norm_qkv": (64, 128), "norm_gateup": (96, 128), "swiglu_down": (64, 192)}
GROUP_LABELS = {"norm_qkv": ("norm+q/k/v", "RMSNorm + q/k/v projections (rms_norm_add then the projections, or "
                             "rms_norm_lora)"),
                "norm_gateup": ("norm+gate/up", "RMSNorm + gate/up projections (rms_norm_add then the projections, "
                                "or rms_norm_lora)"),
                "swiglu_down": ("swiglu+down", "SwiGLU + down projection (swiglu then the projection, or "
                                "swiglu_lora)")}
# concat and the two explicit grids of the fused call: at the largest M and first rank only
NORM_PEERS = ["lora_separate", "lora_concat", "lora_fused", "lora_fused_rounded", "lora_fused_persistent",
              "lora_fused_per_block"]
NORM_EPS = 1e-6  # OpenLLaMA's rms_norm_eps


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also sweep tile configs of the dequant path's Triton GEMM")
    p.add_argument("--shapes", default=None, help="comma list NxK to restrict the shapes, e.g. 3200x8640")
    p.add_argument("--ms", default=None, help="comma list of M values")
    p.add_argument("--ranks", default=None, help="comma list of LoRA ranks")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout probability (default 0.05)")
    p.add_argument("--breakdown", default=None, metavar="CASES",
                   help="comma list of cases (or 'default') to profile per kernel instead of timing")
    p.add_argument("--no-graphs", action="store_true",
                   help="skip the CUDA-graph replay timings (GPU time without host launch gaps)")
    p.add_argument("--paths", default=None, metavar="LIST",
                   help=f"comma list of the LoRA paths timed as lora_<path>, of {','.join(LORA_PATHS)} (the default: "
                        "all; merged comes with --dropout 0)")
    p.add_argument("--no-groups", action="store_true",
                   help="skip the q/k/v, norm + projections and SwiGLU + down groups (the single-projection cases only)")
    p.add_argument("--sweep-tma", action="store_true",
                   help="only time the tma path's GEMMs (no adapter) at a few tile configs against cuBLAS, per "
                        "shape at the first M, and write lora-tma-sweep-<device>-<date>.json")
    p.add_argument("--sweep-merge", action="store_true",
                   help="only time the merged path's weight merge at each launch of its kernel against the NF4 "
                        "dequantize alone and dequantize + addmm, per shape and rank, and write "
                        "lora-merge-sweep-<device>-<date>.json")
    p.add_argument("--sweep-concat-align", action="store_true",
                   help="only time the concat path's forward + backward at each align of its LoRA columns "
                        "(BEZOAR_LORA_CONCAT_ALIGN), per shape, M and rank, single projections and q/k/v, and write "
                        "lora-concat-align-<device>-<date>.json")
    p.add_argument("--inference", action="store_true",
                   help="only time forwards without gradients at small M (default 1,2,4,8,16,32): NF4 alone, "
                        "lora auto (gemv, the small-M inference path, or merged), lora merged, PEFT-style and "
                        "bitsandbytes + PEFT, per shape and rank, and write lora-inference-<device>-<date>.json")
    p.add_argument("--aligns", default=",".join(map(str, CONCAT_ALIGNS_DEFAULT)), metavar="LIST",
                   help="with --sweep-concat-align: the aligns timed, of 16,32,64,128 (16 is always timed: the "
                        "reference; default %(default)s)")
    p.add_argument("--rounds", type=int, default=2,
                   help="with --sweep-concat-align: rounds over every align of a case, each align's fastest "
                        "kept (default 2)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds after which no new case starts (0: no limit); skipped cases are listed")
    args = p.parse_args()
    if args.breakdown and (args.profile or args.only):
        p.error("--breakdown runs its own profiler over the cases it names: not with --profile or --only")
    return args


BREAKDOWN_DEFAULT = [f"{case}/{shape}/M=16384{rank}" for shape in ("3200x3200", "8640x3200")
                     for case, rank in (("nf4_only", ""), ("lora_cublas", "/r=16"), ("lora_concat", "/r=16"))]
BREAKDOWN_DEFAULT += ["norm_qkv_nf4_only/M=16384", "norm_qkv_lora_fused/M=16384/r=16"]
# the reductions' splits as before they were fitted to waves, kernel by kernel beside the fitted ones
BREAKDOWN_DEFAULT += ["lora_concat_rounded/3200x3200/M=16384/r=16", "norm_qkv_lora_fused_rounded/M=16384/r=16"]
GROUP_PREFIXES = tuple(f"{g}_" for g in NORM_GROUPS)
BREAKDOWN_CALLS = 20


def tma_sweep_configs(lora_tma) -> dict[str, list]:
    """The tile configs ``--sweep-tma`` times, the defaults first. Forward: output tiles block_m x block_n,
    K steps of block_k. Backward: dx tiles block_m x block_k, steps of block_n over N. All fit the H100's
    227 KB of shared memory with their output staging (sm_90 builds, triton 3.9)."""
    T = lora_tma.TmaConfig
    fwd = lora_tma.DEFAULT_FWD
    bwd = lora_tma.DEFAULT_BWD
    return {
        "fwd": [fwd, dataclasses.replace(fwd, flatten=True), dataclasses.replace(fwd, num_stages=2),
                T(128, 128, 64, 8, 4, 4), T(128, 128, 64, 8, 8, 4), T(256, 128, 64, 8, 8, 3),
                dataclasses.replace(fwd, group_m=16)],
        "bwd": [bwd, dataclasses.replace(bwd, flatten=True), T(128, 64, 256, 8, 8, 3), T(128, 128, 128, 8, 8, 3),
                T(256, 64, 128, 8, 8, 3), T(128, 64, 128, 8, 4, 4), dataclasses.replace(bwd, group_m=16)],
    }


def sweep_tma(args, shapes, m: int, device, dtype) -> int:
    """--sweep-tma: each tile config of the tma GEMMs with no adapter (y = x @ W.T, dx = dy @ W on a bf16
    W) against torch.matmul (cuBLAS) on the same operands; results JSON unless --smoke."""
    import torch

    from bezoar_kernels import lora_tma

    configs = tma_sweep_configs(lora_tma)
    if args.smoke:
        configs = {k: [dataclasses.replace(c, block_m=16, block_n=16, block_k=16, programs=2) for c in v[:2]]
                   for k, v in configs.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for n, k in shapes:
        w = (torch.randn(n, k, generator=gen, device=device) * 0.02).to(dtype)
        x = torch.randn(m, k, generator=gen, device=device).to(dtype)
        dy = torch.randn(m, n, generator=gen, device=device).to(dtype)
        flop = 2.0 * m * n * k
        if stop:
            break
        cublas = {"fwd": common.bench_ms(lambda: torch.matmul(x, w.t()), smoke=args.smoke),
                  "bwd": common.bench_ms(lambda: torch.matmul(dy, w), smoke=args.smoke)}
        ref = {"fwd": torch.matmul(x, w.t()).float(), "bwd": torch.matmul(dy, w).float()}
        for kind, grid in configs.items():
            for cfg in grid:
                if stop:  # SIGINT (the call's time limit): keep what was timed
                    break
                if kind == "fwd":
                    fn = lambda cfg=cfg: lora_tma.tma_forward(x, w, cfg=cfg)  # noqa: E731
                else:
                    fn = lambda cfg=cfg: lora_tma.tma_backward(dy, w, x, None, None, (), 0, 1.0, False, cfg)[0]  # noqa: E731
                tiles = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                         f"g{cfg.group_m}" + (" flat" if cfg.flatten else ""))
                row = {"dir": kind, "shape": f"{n}x{k}", "M": m, "config": tiles, "cublas_ms": cublas[kind]}
                try:
                    # checked before it is timed: these kernels are new to the GPU they run on. cuBLAS and
                    # this GEMM both sum in fp32 and round once, so they differ by about one rounding
                    err = _max_rel_err(fn(), ref[kind])
                    row["max_rel_err"] = err
                    if not err < 2e-2:
                        raise ArithmeticError(f"differs from cuBLAS by {err:.3g} of its largest |value|")
                    t = common.bench_ms(fn, smoke=args.smoke)
                    row.update(ms=t, over_cublas=t / cublas[kind], tflops=flop / t / 1e9)
                except Exception as exc:  # a config this device cannot fit, or a wrong result: reported
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                print(f"{kind} {n}x{k} M={m} {tiles}: " + (f"{row['ms']:.4f} ms, {row['over_cublas']:.3f}x cuBLAS"
                                                         if "ms" in row else row["error"]), flush=True)
                # rewritten after every config: a call cut short keeps what it timed
                common.write_results("lora-tma-sweep", rows, args, extra={"dtype": str(dtype), "complete": False})
    print()
    print(common.markdown_table(rows, ["dir", "shape", "M", "ms", "cublas_ms", "over_cublas", "tflops", "config"]))
    common.write_results("lora-tma-sweep", rows, args, extra={"dtype": str(dtype), "complete": not stop})
    return 0


def merge_sweep_configs(L, smoke: bool) -> list:
    """The merge kernel launches ``--sweep-merge`` times: each layout at 32, 64 and 128 rows per program,
    4 and 8 warps (few in smoke mode, where each is an interpreter run)."""
    if smoke:
        return [L.MergeConfig("pairs", 16, 4), L.MergeConfig("joined", 16, 4)]
    return [L.MergeConfig(layout, block_n, warps) for layout in L.MERGE_LAYOUTS for block_n in (32, 64, 128)
            for warps in (4, 8)]


def sweep_merge(args, shapes, ranks, device, dtype) -> int:
    """--sweep-merge: the merged path's weight merge (``merged_weights``, W + s B @ A in the backward's
    layout, s B beside W) at each launch of ``merge_sweep_configs`` against the floor it is judged by, the
    NF4 dequantize alone into the same buffer, and against dequantize + an in-place cuBLAS addmm (two
    passes over W). Each launch is checked against fp32 arithmetic before it is timed. Writes
    lora-merge-sweep-<device>-<date>.json (rows that bench/tune.py reads for ``lora.merge_launch``)."""
    import torch

    from bezoar_kernels import lora as L
    from bezoar_kernels import nf4

    configs = merge_sweep_configs(L, args.smoke)
    copies_n = 2
    # graph timing replays only what was captured: one captured call would read the same copy of W on every
    # replay (out of L2), so each capture holds a call on each copy (which also spreads the replay's launch)
    timer = ((lambda fn: common.bench_ms(fn, smoke=True)) if args.smoke
             else (lambda fn: common.graph_ms(fn, calls=copies_n)))
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    cut = False  # a case or a launch left untimed (SIGINT or --budget)
    for r, (n, k) in itertools.product(ranks, shapes):  # the first rank on every shape first
        if stop or (args.budget and time.perf_counter() - STARTED > args.budget):
            cut = True
            break
        copies = [nf4.quantize_nf4(torch.randn(n, k, generator=gen, device=device) * 0.02, 64, True)
                  for _ in range(copies_n)]
        a = (torch.randn(1, r, k, generator=gen, device=device) * 0.02).to(dtype)
        b = (torch.randn(n, r, generator=gen, device=device) * 0.02).to(dtype)
        scaling = 16 / r
        plans = [L._Plan(weights=(w,), scalings=(scaling,), seeds=(0,), dropout_p=0.0, path="merged") for w in copies]
        turn = itertools.cycle(range(len(plans)))  # alternate copies: the next call does not find W in L2
        exact = nf4.dequantize_nf4_reference(copies[0], torch.float32) + scaling * b.float() @ a[0].float()
        width = L._concat_width(r)
        buf = torch.empty(n, k + width, dtype=dtype, device=device)
        row = {"shape": f"{n}x{k}", "r": r, "extra": "cols",
               "dequant_ms": timer(lambda: nf4.dequantize_nf4_triton(copies[next(turn)], dtype, out=buf[:, :k]))}

        def two_pass():
            j = next(turn)
            nf4.dequantize_nf4_triton(copies[j], dtype, out=buf[:, :k]).addmm_(b, a[0], alpha=scaling)

        row["dequant_addmm_ms"] = timer(two_pass)
        grid, failed = [], []  # grid: the timed launches (what bench/tune.py compares)
        for cfg in configs:
            # SIGINT (the call's time limit) or --budget (counted from the process's start): keep what was timed
            if stop or (args.budget and time.perf_counter() - STARTED > args.budget):
                cut = True
                break
            entry = {"config": dataclasses.asdict(cfg)}
            try:
                got = L.merged_weights(plans[0], a, b, dtype, "cols", cfg)[:, :k].float()
                # the kernel sums in fp32 and rounds once to the dtype: within one rounding of fp32
                err = ((got - exact).abs() / (exact.abs() + 1e-3 * exact.abs().max())).max().item()
                entry["max_rel_err"] = err
                if not err < 2 ** -7:
                    raise ArithmeticError(f"differs from fp32 arithmetic by {err:.3g} of a value")
                entry["ms"] = timer(lambda cfg=cfg: L.merged_weights(plans[next(turn)], a, b, dtype, "cols", cfg))
            except Exception as exc:  # a launch this device cannot fit, or a wrong result: reported apart
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            (grid if "ms" in entry else failed).append(entry)
            print(f"merge {n}x{k} r={r} {cfg.layout} block_n={cfg.block_n} w{cfg.num_warps}: "
                  + (f"{entry['ms'] * 1e3:.1f} us, {entry['ms'] / row['dequant_ms']:.2f}x the dequantize alone"
                     if "ms" in entry else entry["error"]), flush=True)
        row["grid"] = grid
        if failed:
            row["failed"] = failed
        default = next((g["ms"] for g in grid if g["config"] == dataclasses.asdict(L.DEFAULT_MERGE)), None)
        if default is not None:
            row["default_ms"] = default
        if grid:
            best = min(grid, key=lambda g: g["ms"])
            row.update(best_ms=best["ms"], best_config=best["config"], best_over_dequant=best["ms"] / row["dequant_ms"])
        rows.append(row)
        # rewritten after every case: a call cut short keeps what it timed
        common.write_results("lora-merge-sweep", rows, args, extra={"dtype": str(dtype), "complete": False})
    print()
    print(common.markdown_table([{**r, "best_config": " ".join(map(str, r.get("best_config", {}).values()))}
                                 for r in rows],
                                ["shape", "r", "dequant_ms", "dequant_addmm_ms", "default_ms", "best_ms",
                                 "best_over_dequant", "best_config"]))
    # complete where every case timed every launch: a budget that ran out during the last launch cut nothing
    common.write_results("lora-merge-sweep", rows, args,
                         extra={"dtype": str(dtype), "complete": not cut and len(rows) == len(shapes) * len(ranks)})
    return 0


def inference(args, shapes, ms, ranks, device, dtype) -> int:
    """--inference: forwards without gradients at small M (decoding and evaluation with an adapter), per rank,
    shape and M: ``nf4_only`` (the NF4 matmul as auto picks it), ``lora_auto`` (``lora_linear`` as auto picks:
    the gemv path, the small-M inference path, or merged past the NF4 fused threshold; its path is recorded),
    ``lora_merged`` (the merged path asked for), ``peft_style`` (the NF4 matmul plus PEFT's two F.linear, scale
    and add) and ``bnb_peft`` (bitsandbytes' matmul_4bit plus the same). Each is checked against ``lora_merged``
    first; CUDA-graph replay over two copies of W (no L2 reuse between calls). Writes
    lora-inference-<device>-<date>.json."""
    import torch
    import torch.nn.functional as F

    from bezoar_kernels import lora as L
    from bezoar_kernels import nf4
    from bezoar_kernels import nf4_matmul as mm
    from bezoar_kernels.dispatch import backend

    bnbf, bnb_note = None, "no bnb_peft column: not on a CUDA device"
    if device.type == "cuda":  # bitsandbytes' CPU backend is no peer here (nor the smoke run's business)
        try:
            import bitsandbytes.functional as bnbf
            bnb_note = None
        except Exception as exc:  # noqa: BLE001 - the GPU box may not have it
            bnb_note = f"no bnb_peft column: bitsandbytes does not import ({type(exc).__name__}: {exc})"
    copies_n = 2
    timer = ((lambda fn: common.bench_ms(fn, smoke=True)) if args.smoke
             else (lambda fn: common.graph_ms(fn, calls=copies_n)))
    gen = torch.Generator(device=device).manual_seed(0)
    rows, cut = [], False
    for r, (n, k), m in itertools.product(ranks, shapes, ms):
        if stop or (args.budget and time.perf_counter() - STARTED > args.budget):
            cut = True
            break
        with backend("triton"):
            copies = [nf4.quantize_nf4(torch.randn(n, k, generator=gen, device=device) * 0.02, 64, True)
                      for _ in range(copies_n)]
        bnb_copies = []
        if bnbf is not None and device.type == "cuda":
            for q in copies:  # the same bytes as bitsandbytes' QuantState
                w = nf4.dequantize_nf4_reference(q, dtype)
                bnb_copies.append(bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
        # B drawn at sqrt(r) / 16 (a trained adapter's size, not PEFT's zeros): the LoRA term is then about as
        # large as x @ W.T, so the check below sees a missing or mis-scaled term (at 0.02 it was 4% of y at r = 64)
        a = (torch.randn(r, k, generator=gen, device=device) * 0.02).to(dtype)
        b = (torch.randn(n, r, generator=gen, device=device) * (r ** 0.5 / 16)).to(dtype)
        scaling = 16 / r
        x = (torch.randn(m, k, generator=gen, device=device)).to(dtype)
        at = [copies_n - 1]  # the copy of W the last call read: calls alternate, checks start from copy 0

        def turn() -> int:
            at[0] = (at[0] + 1) % copies_n
            return at[0]

        paths = []

        def lora(path=None):
            return L.lora_linear(x, copies[turn()], a, b, scaling, 0.0, False, 0, path)

        impls = {
            "nf4_only": lambda: mm.nf4_matmul(x, copies[turn()]),
            "lora_auto": lora,
            "lora_merged": lambda: lora("merged"),
            "peft_style": lambda: mm.nf4_matmul(x, copies[turn()]) + F.linear(F.linear(x, a), b) * scaling,
        }
        if bnb_copies:
            impls["bnb_peft"] = lambda: (bnbf_matmul(x, bnb_copies[turn()])
                                         + F.linear(F.linear(x, a), b) * scaling)
        row = {"shape": f"{n}x{k}", "M": m, "r": r}
        real_apply = L.LoRAFunction.apply
        with backend("triton"), torch.no_grad():
            try:
                L.LoRAFunction.apply = lambda xx, plan, *lo: paths.append(plan.path) or real_apply(xx, plan, *lo)
                at[0] = copies_n - 1
                want = lora("merged").float()
                paths.clear()
                at[0] = copies_n - 1
                lora()
            finally:
                L.LoRAFunction.apply = real_apply
            row["auto_path"] = paths[0] if paths else None
            scale = want.abs().max().item()
            for name, fn in impls.items():
                if stop:
                    cut = True
                    break
                try:
                    at[0] = copies_n - 1  # checked on copy 0, as want
                    err = (fn().float() - want).abs().max().item() / scale
                    if name != "nf4_only" and not err < 0.05:
                        raise ArithmeticError(f"differs from lora_merged by {err:.3g} of its largest value")
                    row[name] = timer(fn)
                except Exception as exc:  # noqa: BLE001 - reported in the row, the others still timed
                    row[name] = None
                    row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        base = row.get("nf4_only")
        for name in INFERENCE_IMPLS[1:]:
            if base and row.get(name):
                row[f"{name}/nf4_only"] = row[name] / base
        if row.get("lora_auto") and row.get("lora_merged"):
            row["merged/auto"] = row["lora_merged"] / row["lora_auto"]
        rows.append(row)
        print(f"inference {row['shape']} M={m} r={r} auto={row['auto_path']}: "
              + ", ".join(f"{name} {row[name] * 1e3:.1f} us" for name in INFERENCE_IMPLS if row.get(name)), flush=True)
        common.write_results("lora-inference", rows, args, extra={"dtype": str(dtype), "complete": False})
    print()
    print(common.markdown_table(rows, ["shape", "M", "r", "auto_path", *INFERENCE_IMPLS, "lora_auto/nf4_only",
                                       "merged/auto", "bnb_peft/nf4_only"]))
    common.write_results("lora-inference", rows, args, extra={
        "dtype": str(dtype), "complete": not cut and len(rows) == len(ranks) * len(shapes) * len(ms),
        "bnb_note": bnb_note})
    return 0


def bnbf_matmul(x, state):
    """bitsandbytes' 4-bit matmul as PEFT's Linear4bit calls it (its gemv at one row, dequantize + matmul above)."""
    import bitsandbytes as bnb

    packed, quant_state = state
    return bnb.matmul_4bit(x, packed.t(), quant_state=quant_state)


def concat_align_cases(shapes, ms, ranks, groups: bool) -> list[dict]:
    """The cases ``--sweep-concat-align`` times, in order: each rank in turn, each M in turn, a single
    projection on every shape, then (``groups``) the fused q/k/v call of three projections of the first."""
    out = []
    for r, m in itertools.product(ranks, ms):
        out += [{"case": "single", "shape": (n, k), "M": m, "r": r} for n, k in shapes]
        if groups:
            out.append({"case": "qkv", "shape": shapes[0], "M": m, "r": r})
    return out


def concat_align_name(case: dict) -> str:
    n, k = case["shape"]
    return f"{case['case']} {n}x{k} M={case['M']} r={case['r']}"


def seeded_randn(gen, device, dtype):
    """randn(*shape, scale=1.0, dt=None): normal values times ``scale`` in ``dt`` (default ``dtype``), drawn
    in fp32 from ``gen`` on ``device``, so each run of a mode draws the same inputs."""
    import torch

    def randn(*shape, scale=1.0, dt=None):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dt or dtype)
    return randn


def _max_rel_err(got, want) -> float:
    """Largest |got - want| over the largest |want| (over 1 where want is all zeros); NaN stays NaN."""
    want = want.float()
    scale = want.abs().max().item() or 1.0
    return (got.float() - want).abs().max().item() / scale


def sweep_concat_align(args, shapes, ms, ranks, device, dtype) -> int:
    """--sweep-concat-align: the concat path's forward + backward at each multiple its forward's LoRA
    columns round up to (``BEZOAR_LORA_CONCAT_ALIGN``, set for each call with ``common.with_environ`` so that
    it also holds in a graph's capture). Per case, first each align's output and grads against align 16's
    (only float reassociation may differ: an align that differs more gets an error and is not timed), then
    ``--rounds`` rounds, each timing every align in turn (graph replay; a short wall-clock median in smoke
    mode), keeping each align's fastest round: drift of the clocks over a case then does not read as the
    cost of one align. Writes lora-concat-align-<device>-<date>.json (rows that bench/tune.py reads for
    ``lora.concat_align``)."""
    import torch

    from bezoar_kernels import lora as L
    from bezoar_kernels import nf4
    from bezoar_kernels.dispatch import backend

    try:
        aligns = [int(a) for a in args.aligns.split(",")]
    except ValueError:
        aligns = []
    if not aligns or any(a not in L.CONCAT_ALIGNS for a in aligns):
        print(f"--aligns {args.aligns!r}: expected a comma list of {', '.join(map(str, L.CONCAT_ALIGNS))}",
              file=sys.stderr)
        return 2
    aligns = sorted(set(aligns) | {16})  # 16 is what the others are checked and timed against
    if args.rounds < 1:
        print("--rounds: expected at least 1", file=sys.stderr)
        return 2
    p_drop = args.dropout
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # relative to the largest value of each tensor
    timer = ((lambda fn: common.bench_ms(fn, smoke=True)) if args.smoke else common.graph_ms)
    gen = torch.Generator(device=device).manual_seed(0)
    randn = seeded_randn(gen, device, dtype)

    weights: dict = {}

    def weight(n, k, j=0):  # quantized once per shape (and per q/k/v projection)
        if (n, k, j) not in weights:
            with backend("triton"):
                weights[n, k, j] = nf4.quantize_nf4(randn(n, k, scale=0.02), 64, True)
        return weights[n, k, j]

    def build(case):
        """(forward, the tensors it differentiates, upstream grads) of one case."""
        (n, k), m, r = case["shape"], case["M"], case["r"]
        count = 3 if case["case"] == "qkv" else 1
        qs = [weight(n, k, j) for j in range(count)]
        x = randn(m, k).requires_grad_(True)
        ads = [L.Adapter(randn(r, k, scale=1 / k ** 0.5, dt=torch.float32).requires_grad_(True),
                         randn(n, r, scale=0.02, dt=torch.float32).requires_grad_(True), 16 / r) for _ in range(count)]
        dys = tuple(randn(m, n) for _ in range(count))
        params = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
        if count == 1:
            ad = ads[0]
            forward = lambda: L.lora_linear_triton(x, qs[0], ad.lora_a, ad.lora_b, ad.scaling,  # noqa: E731
                                                   p_drop, True, 1234, "concat")
        else:
            forward = lambda: L.lora_qkv_triton(x, qs, ads, p_drop, True, (1, 2, 3), "concat")  # noqa: E731
        return forward, params, dys

    def results(forward, params, dys, align):
        """The outputs and grads of one forward + backward at ``align``."""
        with common.environ(BEZOAR_LORA_CONCAT_ALIGN=align):
            outputs = forward()
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            grads = torch.autograd.grad(outputs, params, dys)
        return [t.detach() for t in outputs] + list(grads)

    cases = concat_align_cases(shapes, ms, ranks, not args.no_groups)
    rows, skipped = [], []
    cut = False
    for case in cases:
        # SIGINT (the call's time limit) or --budget (counted from the process's start): keep what was timed
        if stop or (args.budget and time.perf_counter() - STARTED > args.budget):
            skipped.append(concat_align_name(case))
            continue
        (n, k), m, r = case["shape"], case["M"], case["r"]
        count = 3 if case["case"] == "qkv" else 1
        row = {"shape": f"{n}x{k}", "M": m, "r": r, "case": case["case"], "projections": count,
               "lora_cols": count * L._concat_width(r), "ms": {}, "errors": {}}
        forward = params = dys = fn = None
        good, want = [], None  # good: the aligns whose results matched align 16's, the ones timed
        with backend("triton"):
            try:
                forward, params, dys = build(case)
                fn = fwd_bwd(forward, params, dys)
                want = results(forward, params, dys, 16)
                good.append(16)
            except Exception as exc:  # the inputs (memory) or the reference: no align of the case is timed
                for a in aligns:
                    row["errors"][str(a)] = (f"the inputs or align 16 (the reference) failed: {type(exc).__name__}: "
                                             f"{str(exc)[:200]}")
            for a in aligns if good else []:
                if a == 16:
                    continue
                try:
                    got = results(forward, params, dys, a)
                    errs = [_max_rel_err(g, w) for g, w in zip(got, want)]
                    bad = [i for i, e in enumerate(errs) if not e <= tol]  # NaN is bad too
                    if bad:
                        i = bad[0]
                        what = f"output {i}" if i < count else f"grad {i - count} (of x, then A and B)"
                        raise ArithmeticError(f"{what} differs from align 16's by {errs[i]:.3g} of its largest "
                                              f"|value| (tolerance {tol:g})")
                    good.append(a)
                except Exception as exc:  # a wrong result is reported, never timed
                    row["errors"][str(a)] = f"{type(exc).__name__}: {str(exc)[:200]}"
            del want
            timed = {a: common.with_environ(fn, BEZOAR_LORA_CONCAT_ALIGN=a) for a in sorted(good)}
            best: dict[int, float] = {}
            for turn in range(args.rounds):
                if turn and stop:  # SIGINT: the rounds done are kept (every align timed in each)
                    cut = True
                    break
                for a, run in timed.items():
                    if str(a) in row["errors"]:
                        continue
                    try:
                        t = timer(run)
                    except Exception as exc:  # e.g. a capture that fails: that align is reported, not timed
                        row["errors"][str(a)] = f"timing: {type(exc).__name__}: {str(exc)[:200]}"
                        best.pop(a, None)
                        continue
                    best[a] = min(t, best.get(a, float("inf")))
        row["ms"] = {str(a): best[a] for a in aligns if a in best}
        row["rounds"] = turn + 1 if not cut else turn
        if "16" in row["ms"]:
            row["over_16"] = {a: t / row["ms"]["16"] for a, t in row["ms"].items()}
        if not row["errors"]:
            del row["errors"]
        rows.append(row)
        for a in aligns:
            if str(a) in row["ms"]:
                over = row.get("over_16", {}).get(str(a))
                line = f"{row['ms'][str(a)]:.4f} ms" + (f", {over:.3f}x align 16" if over else "")
            else:
                line = row.get("errors", {}).get(str(a), "not timed")
            print(f"concat align {a} {concat_align_name(case)}: {line}", flush=True)
        del forward, params, dys, fn, timed
        # rewritten after every case: a call cut short keeps what it timed
        write_concat_align(args, rows, aligns, dtype, complete=False)
    note = None
    if skipped or cut:
        why = "SIGINT (time limit)" if stop else f"--budget {args.budget:g}s reached"
        note = why + (f": {len(skipped)} case(s) not timed: {', '.join(skipped)}" if skipped else "")
        if cut:
            note += "; the last case timed in fewer rounds"
    show = []
    for r in rows:
        flat = {"shape": r["shape"], "case": r["case"], "M": r["M"], "r": r["r"]}
        flat.update({str(a): r["ms"].get(str(a)) for a in aligns})
        flat.update({f"{a}/16": r.get("over_16", {}).get(str(a)) for a in aligns if a != 16})
        show.append(flat)
    how = "wall clock, smoke" if args.smoke else "CUDA-graph replay"
    print(f"\nconcat path forward + backward, ms by the align of its LoRA columns ({how}; dtype {dtype}, dropout "
          f"{p_drop}; best of {args.rounds} rounds); ratios over align 16\n")
    print(common.markdown_table(show, ["shape", "case", "M", "r"] + [str(a) for a in aligns]
                                + [f"{a}/16" for a in aligns if a != 16]))
    if note:
        print(f"\nnote: {note}")
    write_concat_align(args, rows, aligns, dtype, complete=not skipped and not cut, skipped=skipped, note=note)
    return 0


def write_concat_align(args, rows, aligns, dtype, complete: bool, skipped=(), note=None) -> None:
    common.write_results("lora-concat-align", rows, args, extra={
        "dtype": str(dtype), "dropout": args.dropout, "aligns": aligns, "rounds": args.rounds,
        "timing": "wall clock (smoke)" if args.smoke else "CUDA-graph replay, best round's median",
        "complete": complete, "skipped": list(skipped), "skip_note": note})


def fwd_bwd(forward, inputs, dy):
    """One forward + backward: grads of ``inputs`` under upstream ``dy`` (a tensor or a tuple)."""
    import torch

    def run():
        outputs = forward()
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        dys = dy if isinstance(dy, tuple) else (dy,)
        return torch.autograd.grad(outputs, inputs, dys)
    return run


COPY_BYTES = 256 << 20  # the device-to-device copy that --breakdown's passes are measured against


def baseline_case(name: str) -> str | None:
    """The NF4-alone case a breakdown case is read against (None for the NF4-alone cases themselves):
    ``nf4_only/<shape>/M=<m>`` for the single projections and their peers, ``<group>_nf4_only/M=<m>``
    for the q/k/v, norm and SwiGLU groups."""
    head, _, rest = name.partition("/")
    m = next((part for part in rest.split("/") if part.startswith("M=")), None)
    if m is None or head.endswith("nf4_only"):
        return None
    for group in ("qkv",) + tuple(NORM_GROUPS):
        if head.startswith(group + "_"):
            return f"{group}_nf4_only/{m}"
    shape = rest.split("/")[0]
    return f"nf4_only/{shape}/{m}"


def activation_width(info: dict) -> int:
    """K of the case's LoRA input (M, K): the last number of its shape label (``NxK``, ``norm+q/k/v NxK``)."""
    return int(info["shape"].split()[-1].split("x")[-1])


def copy_gbs(torch, device, smoke: bool) -> float:
    """Device-to-device copy bandwidth, GB/s of bytes read + written (CPU memory in smoke runs)."""
    n = (1 << 20) if smoke else COPY_BYTES
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = common.bench_ms(lambda: dst.copy_(src), smoke=smoke)
    return 2 * n / ms / 1e6


def breakdown_summary(results: list[dict]) -> None:
    """Adds to each result whose NF4-alone baseline is among ``results``: baseline, over_baseline,
    extra_us, extra_passes and categories_extra (per kernel category, us per call over the baseline's)."""
    by_name = {r["case"]: r for r in results}
    for r in results:
        base = by_name.get(baseline_case(r["case"]) or "")
        if base is None:
            continue
        r["baseline"] = base["case"]
        r["over_baseline"] = r["us"] / base["us"] if base["us"] else None
        r["extra_us"] = r["us"] - base["us"]
        r["extra_passes"] = r["extra_us"] / r["pass_us"]
        mine = {c["category"]: c["us_per"] for c in r["categories"]}
        theirs = {c["category"]: c["us_per"] for c in base["categories"]}
        extra = [{"category": c, "extra_us": mine.get(c, 0.0) - theirs.get(c, 0.0),
                  "extra_passes": (mine.get(c, 0.0) - theirs.get(c, 0.0)) / r["pass_us"]}
                 for c in dict.fromkeys([*mine, *theirs])]
        r["categories_extra"] = sorted(extra, key=lambda e: -abs(e["extra_us"]))


def breakdown(args, cases: dict, meta: dict, backend, torch, device, dtype) -> int:
    """Per case: its kernels by GPU time per forward + backward (CPU operator time in smoke mode), each
    also in passes: its time over that of one read of the case's (M, K) LoRA input at the measured copy
    bandwidth. Cases whose NF4-alone baseline is profiled too get the time and passes over it, per
    kernel category. Writes lora-breakdown[-no-dropout]-<device>-<date>.json (not in smoke runs)."""
    names = BREAKDOWN_DEFAULT if args.breakdown == "default" else args.breakdown.split(",")
    if args.smoke and args.breakdown == "default":
        names = [n for n in cases if n.startswith(("nf4_only/", "lora_cublas/", "lora_concat/",
                                                   "norm_qkv_nf4_only/", "norm_qkv_lora_fused/"))]
    missing = [n for n in names if n not in cases]
    if missing:
        print(f"--breakdown: no case {missing}; cases are:\n  " + "\n  ".join(cases), file=sys.stderr)
        return 2
    from bezoar_kernels import tuning

    calls = 2 if args.smoke else BREAKDOWN_CALLS
    gbs = copy_gbs(torch, device, args.smoke)
    item = torch.empty((), dtype=dtype).element_size()
    where = "CPU operator time (smoke)" if args.smoke else "GPU kernel time"
    print(f"copy bandwidth {gbs:.0f} GB/s (read + written); a pass = one read of the case's (M, K) LoRA input at it")

    def write(results, complete):
        common.write_results("lora-breakdown" if args.dropout > 0 else "lora-breakdown-no-dropout", results, args, extra={
            "dtype": str(dtype), "dropout": args.dropout, "calls": calls, "copy_gbs": gbs, "complete": complete,
            "cases_asked": names,
            "timing": "GPU kernel time under torch.profiler, summed per kernel, per forward + backward",
            "pass_note": "a pass = the time to read one (M, K) LoRA input (x, or the norm's / SwiGLU's output) at "
                         "the measured copy bandwidth (bytes read + written over time): M * K * itemsize / copy_gbs",
            "tuning": tuning.summary(device)})

    def show(r):
        over = ""
        if "baseline" in r:
            ratio = "n/a" if r["over_baseline"] is None else f"{r['over_baseline']:.3f}x"
            over = f"; {ratio} {r['baseline']}, {r['extra_us']:+.1f} us = {r['extra_passes']:+.2f} passes"
        print(f"\n{r['case']}: {r['us']:.1f} us of {where} per forward + backward ({calls} calls profiled; "
              f"a pass {r['pass_us']:.1f} us){over}\n")
        print(common.markdown_table(r["kernels"][:16], ["kernel", "category", "calls_per", "us_per", "share", "passes"]))
        if "categories_extra" in r:
            print("\nover the baseline, by category:\n")
            print(common.markdown_table(r["categories_extra"], ["category", "extra_us", "extra_passes"]), flush=True)

    # the baselines first, so that each case prints beside its own as soon as it is profiled
    names = sorted(names, key=lambda n: baseline_case(n) is not None)
    results = []
    try:
        for name in names:
            if args.budget and time.perf_counter() - STARTED > args.budget:
                print(f"--budget {args.budget:g}s reached: not profiled {', '.join(names[len(results):])}")
                break
            with backend("triton"):
                rows, total = common.profile_kernels(cases[name], calls, cuda=device.type == "cuda")
            info = meta[name]
            pass_us = info["M"] * activation_width(info) * item / (gbs * 1e3)
            for row in rows:
                row["passes"] = row["us_per"] / pass_us
            results.append({"case": name, "shape": info["shape"], "M": info["M"], "r": info["r"], "us": total,
                            "pass_us": pass_us, "passes": total / pass_us, "kernels": rows,
                            "categories": common.category_totals(rows)})
            breakdown_summary(results)
            show(results[-1])
            # rewritten after every case: a call cut short keeps what it profiled
            write(results, complete=len(results) == len(names))
    except KeyboardInterrupt:  # timeout --signal=INT: what was profiled is written already
        print(f"interrupted: profiled {len(results)} of {len(names)} cases")
    return 0


STARTED = time.perf_counter()
stop: list[str] = []  # a SIGINT (timeout --signal=INT) stops starting cases; the measured ones are still written


def on_sigint(signum, frame):
    stop.append("SIGINT")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one interrupts at once


def main() -> int:
    # installed before the cases are built: a SIGINT while compiling or quantizing only stops the timing early
    signal.signal(signal.SIGINT, on_sigint)
    args = parse_args()
    common.setup_smoke(args)
    import torch
    import torch.nn.functional as F

    from bezoar_kernels import lora as L
    from bezoar_kernels import nf4
    from bezoar_kernels import nf4_matmul as mm
    from bezoar_kernels import nf4_tma
    from bezoar_kernels import norm_lora as NL
    from bezoar_kernels import swiglu_lora as SL
    from bezoar_kernels import tuning
    from bezoar_kernels.dispatch import backend
    from bezoar_kernels.rmsnorm import rms_norm_add

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/lora.py needs a CUDA GPU (use --smoke to check the code path on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 dot is wrong; smoke uses fp32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    ms = SMOKE_MS if args.smoke else MS
    ranks = SMOKE_RANKS if args.smoke else RANKS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    if args.ranks:
        ranks = [int(v) for v in args.ranks.split(",")]
    p_drop = args.dropout
    if args.sweep_tma:
        return sweep_tma(args, shapes, ms[0], device, dtype)
    if args.sweep_merge:
        return sweep_merge(args, shapes, ranks, device, dtype)
    if args.sweep_concat_align:
        return sweep_concat_align(args, shapes, ms, ranks, device, dtype)
    if args.inference:
        return inference(args, shapes, ms if args.ms else (SMOKE_INFERENCE_MS if args.smoke else INFERENCE_MS),
                         ranks, device, dtype)
    paths = tuple(args.paths.split(",")) if args.paths else LORA_PATHS
    unknown = [p for p in paths if p not in LORA_PATHS]
    if unknown:
        print(f"--paths: unknown LoRA path(s) {', '.join(unknown)}", file=sys.stderr)
        return 2
    from bezoar_kernels import lora_tma

    bnb, bnb_note = None, None
    try:
        import bitsandbytes

        bnb = bitsandbytes
    except Exception as exc:  # the GPU box may not have it
        bnb_note = f"bitsandbytes columns skipped: it does not import ({type(exc).__name__}: {exc})"
        print(bnb_note)

    def bench(fn):
        return common.bench_ms(fn, smoke=args.smoke)

    gen = torch.Generator(device=device).manual_seed(0)
    randn = seeded_randn(gen, device, dtype)

    # ---- the cases -------------------------------------------------------------------------
    cases: dict[str, object] = {}
    meta: dict[str, dict] = {}

    def add(name, fn, **info):
        cases[name] = fn
        meta[name] = info

    sweep_inputs = []
    for n, k in shapes:
        w = randn(n, k, scale=0.02)
        with backend("triton"):
            q = nf4.quantize_nf4(w, 64, True)
        bq = None
        if bnb is not None:
            bq = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        del w
        tag = f"{n}x{k}"
        for m in ms:
            x = randn(m, k).requires_grad_(True)
            dy = randn(m, n)
            key = dict(shape=tag, M=m)
            add(f"nf4_only/{tag}/M={m}", fwd_bwd(lambda x=x, q=q: mm.nf4_matmul_triton(x, q), [x], dy),
                peer="nf4_only", r=None, **key)
            if "tma" in paths:  # the tma GEMMs without an adapter: bezoar's Triton GEMM against cuBLAS's
                add(f"nf4_tma_gemm/{tag}/M={m}",
                    fwd_bwd(lambda x=x, q=q: L._apply(x, [q], None, 0.0, False, [0], "tma")[0], [x], dy),
                    peer="nf4_tma_gemm", r=None, **key)
                if nf4_tma.supported(q, x.dtype):  # and the NF4 matmul's own tma kernels (no dequantize)
                    add(f"nf4_tma_decode/{tag}/M={m}", fwd_bwd(lambda x=x, q=q: mm.nf4_matmul_triton(x, q, "tma"), [x], dy),
                        peer="nf4_tma_decode", r=None, **key)
            if bq is not None:
                add(f"bnb_only/{tag}/M={m}",
                    fwd_bwd(lambda x=x, bq=bq: bnb.matmul_4bit(x, bq[0].t(), quant_state=bq[1]), [x], dy),
                    peer="bnb_only", r=None, **key)
            for r in ranks:
                a = randn(r, k, scale=1 / k ** 0.5, dt=torch.float32).requires_grad_(True)
                b = randn(n, r, scale=0.02, dt=torch.float32).requires_grad_(True)
                s = 16 / r
                rkey = dict(key, r=r)
                for path in paths + (("merged",) if p_drop == 0 and "merged" not in paths else ()):
                    add(f"lora_{path}/{tag}/M={m}/r={r}",
                        fwd_bwd(lambda x=x, q=q, a=a, b=b, s=s, path=path:
                                L.lora_linear_triton(x, q, a, b, s, p_drop, True, 1234, path), [x, a, b], dy),
                        peer=f"lora_{path}", **rkey)
                if "concat" in paths:  # the reductions' splits rounded up as before they were fitted to waves
                    add(f"lora_concat_rounded/{tag}/M={m}/r={r}",
                        common.with_environ(fwd_bwd(lambda x=x, q=q, a=a, b=b, s=s: L.lora_linear_triton(
                            x, q, a, b, s, p_drop, True, 1234, "concat"), [x, a, b], dy), BEZOAR_LORA_WAVES=0),
                        peer="lora_concat_rounded", **rkey)
                if "tma" in paths and p_drop > 0:  # dA by its own pass instead of the dx epilogue's atomics
                    add(f"lora_tma_da_pass/{tag}/M={m}/r={r}",
                        fwd_bwd(lambda x=x, q=q, a=a, b=b, s=s: L.lora_linear_triton(
                            x, q, a, b, s, p_drop, True, 1234, "tma", None,
                            dataclasses.replace(lora_tma.default_bwd(1, r), fuse_da=False)), [x, a, b], dy),
                        peer="lora_tma_da_pass", **rkey)

                def peft_style(x=x, q=q, a=a, b=b, s=s):
                    y = mm.nf4_matmul_triton(x, q)
                    h = F.dropout(x, p_drop, True)
                    return y + (F.linear(F.linear(h, a.to(x.dtype)), b.to(x.dtype)) * s)

                add(f"peft_style/{tag}/M={m}/r={r}", fwd_bwd(peft_style, [x, a, b], dy), peer="peft_style", **rkey)
                if bq is not None:
                    def bnb_peft(x=x, bq=bq, a=a, b=b, s=s):
                        y = bnb.matmul_4bit(x, bq[0].t(), quant_state=bq[1])
                        h = F.dropout(x, p_drop, True)
                        return y + (F.linear(F.linear(h, a.to(x.dtype)), b.to(x.dtype)) * s)

                    add(f"bnb_peft/{tag}/M={m}/r={r}", fwd_bwd(bnb_peft, [x, a, b], dy), peer="bnb_peft", **rkey)
                if args.sweep and r == ranks[0]:
                    sweep_inputs.append((tag, m, r, x, q, a, b, s, dy))

    # q/k/v of one attention block: three 3200x3200 (smoke: the smoke shape) projections of one x
    qn, qk = (3200, 3200) if not args.smoke else shapes[0]
    group_ms = [] if args.no_groups else ms
    with backend("triton"):
        qkv_w = [nf4.quantize_nf4(randn(qn, qk, scale=0.02), 64, True) for _ in range(3)] if group_ms else []
    for m in group_ms:
        x = randn(m, qk).requires_grad_(True)
        dys = tuple(randn(m, qn) for _ in range(3))
        key = dict(shape=f"qkv {qn}x{qk}", M=m)
        add(f"qkv_nf4_only/M={m}", fwd_bwd(lambda x=x: tuple(mm.nf4_matmul_triton(x, w) for w in qkv_w), [x], dys),
            peer="qkv_nf4_only", r=None, **key)
        for r in ranks:
            ads = [L.Adapter(randn(r, qk, scale=1 / qk ** 0.5, dt=torch.float32).requires_grad_(True),
                             randn(qn, r, scale=0.02, dt=torch.float32).requires_grad_(True), 16 / r) for _ in range(3)]
            params = [x] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]
            add(f"qkv_lora_fused/M={m}/r={r}",
                fwd_bwd(lambda x=x, ads=ads: L.lora_qkv_triton(x, qkv_w, ads, p_drop, True, (1, 2, 3)), params, dys),
                peer="qkv_lora_fused", **dict(key, r=r))
            add(f"qkv_lora_concat/M={m}/r={r}",
                fwd_bwd(lambda x=x, ads=ads: L.lora_qkv_triton(x, qkv_w, ads, p_drop, True, (1, 2, 3), "concat"),
                        params, dys),
                peer="qkv_lora_concat", **dict(key, r=r))
            add(f"qkv_lora_separate/M={m}/r={r}",
                fwd_bwd(lambda x=x, ads=ads: tuple(
                    L.lora_linear_triton(x, w, ad.lora_a, ad.lora_b, ad.scaling, p_drop, True, j)
                    for j, (w, ad) in enumerate(zip(qkv_w, ads))), params, dys),
                peer="qkv_lora_separate", **dict(key, r=r))

    # RMSNorm + the projections that read it: q/k/v and gate/up (gate/up when 8640x3200 is in the run)
    norm_notes = []
    norm_groups = {}
    # the grid the fused norm call runs on by default here (None: an explicit count in the environment)
    in_effect = NL.grid_in_effect(device)
    same_grid: dict[str, str] = {}  # a grid peer's case name -> the case that measured it
    if args.no_groups:
        norm_notes.append("q/k/v, norm + projections and SwiGLU + down groups skipped (--no-groups)")
    elif p_drop <= 0:
        norm_notes.append("norm + projections cases skipped: the fused norm + LoRA path is for dropout > 0")
    else:
        for group, (shape, count) in NORM_GROUPS.items():
            if group != "norm_qkv" and not args.smoke and shape not in shapes:
                continue
            norm_groups[group] = (SMOKE_NORM_SHAPES[group] if args.smoke else shape), count
    for group, ((gn, gk), count) in norm_groups.items():
        label = f"{GROUP_LABELS[group][0]} {gn}x{gk}"
        if group == "swiglu_down":
            add_swiglu_cases(add, group, label, gn, gk, ms, ranks, randn, fwd_bwd, p_drop, norm_notes, nf4, mm, L, SL,
                             backend, torch)
            continue
        with backend("triton"):
            gw = [nf4.quantize_nf4(randn(gn, gk, scale=0.02), 64, True) for _ in range(count)]
        nw = (1 + 0.1 * torch.randn(gk, generator=gen, device=device, dtype=torch.float32)).to(dtype)
        seeds = tuple(range(1, count + 1))
        for m in ms:
            x = randn(m, gk).requires_grad_(True)
            res = randn(m, gk).requires_grad_(True)
            dys = tuple(randn(m, gn) for _ in range(count)) + (randn(m, gk),)  # the outputs', then s's
            key = dict(shape=label, M=m)

            def norm_nf4(x=x, res=res, gw=gw, nw=nw):
                h, s = rms_norm_add(x, res, nw, NORM_EPS)
                return (*(mm.nf4_matmul_triton(h, w) for w in gw), s)

            add(f"{group}_nf4_only/M={m}", fwd_bwd(norm_nf4, [x, res], dys),
                peer=f"{group}_nf4_only", r=None, **key)
            for r in ranks:
                ads = [L.Adapter(randn(r, gk, scale=1 / gk ** 0.5, dt=torch.float32).requires_grad_(True),
                                 randn(gn, r, scale=0.02, dt=torch.float32).requires_grad_(True), 16 / r)
                       for _ in range(count)]
                params = [x, res] + [t for ad in ads for t in (ad.lora_a, ad.lora_b)]

                def norm_separate(x=x, res=res, gw=gw, nw=nw, ads=ads, seeds=seeds):
                    h, s = rms_norm_add(x, res, nw, NORM_EPS)
                    if len(gw) == 3:
                        return (*L.lora_qkv_triton(h, gw, ads, p_drop, True, seeds), s)
                    return (*(L.lora_linear_triton(h, w, ad.lora_a, ad.lora_b, ad.scaling, p_drop, True, sd)
                              for w, ad, sd in zip(gw, ads, seeds)), s)

                def norm_fused(x=x, res=res, gw=gw, nw=nw, ads=ads, seeds=seeds):
                    outputs, s = NL.rms_norm_lora(x, res, nw, NORM_EPS, gw, ads, p_drop, True, seeds)
                    return (*outputs, s)

                add(f"{group}_lora_separate/M={m}/r={r}", fwd_bwd(norm_separate, params, dys),
                    peer=f"{group}_lora_separate", **dict(key, r=r))
                if m == max(ms) and r == ranks[0]:  # the separate calls on the concat path: the fused one's layout

                    def norm_concat(x=x, res=res, gw=gw, nw=nw, ads=ads, seeds=seeds):
                        h, s = rms_norm_add(x, res, nw, NORM_EPS)
                        if len(gw) == 3:
                            return (*L.lora_qkv_triton(h, gw, ads, p_drop, True, seeds, "concat"), s)
                        return (*(L.lora_linear_triton(h, w, ad.lora_a, ad.lora_b, ad.scaling, p_drop, True, sd,
                                                       "concat") for w, ad, sd in zip(gw, ads, seeds)), s)

                    add(f"{group}_lora_concat/M={m}/r={r}", fwd_bwd(norm_concat, params, dys),
                        peer=f"{group}_lora_concat", **dict(key, r=r))
                with backend("triton"):
                    fused_ok = NL.norm_lora_ok(x, res, nw, gw, ads, p_drop, True)
                if fused_ok:
                    add(f"{group}_lora_fused/M={m}/r={r}", fwd_bwd(norm_fused, params, dys),
                        peer=f"{group}_lora_fused", **dict(key, r=r))
                    if m == max(ms) and r == ranks[0]:  # the splits as before they were fitted to waves
                        add(f"{group}_lora_fused_rounded/M={m}/r={r}",
                            common.with_environ(fwd_bwd(norm_fused, params, dys), BEZOAR_LORA_WAVES=0),
                            peer=f"{group}_lora_fused_rounded", **dict(key, r=r))
                    if m == max(ms) and r == ranks[0]:  # both grids, whatever the tuning file says (tune.py)
                        for grid, programs in (("persistent", "persistent"), ("per_block", "0")):
                            if grid == in_effect:  # the case just added already runs it
                                same_grid[f"{group}_lora_fused_{grid}/M={m}/r={r}"] = f"{group}_lora_fused/M={m}/r={r}"
                                continue
                            add(f"{group}_lora_fused_{grid}/M={m}/r={r}",
                                common.with_environ(fwd_bwd(norm_fused, params, dys),
                                                    BEZOAR_NORM_LORA_PROGRAMS=programs),
                                peer=f"{group}_lora_fused_{grid}", **dict(key, r=r))
                else:  # it would time the torch reference, not the kernels
                    norm_notes.append(f"{group}_lora_fused/M={m}/r={r} skipped: norm_lora_ok is false")

    # past this point only the measuring loop looks at ``stop``: elsewhere a SIGINT interrupts at once
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop:
        raise KeyboardInterrupt
    if args.breakdown:
        return breakdown(args, cases, meta, backend, torch, device, dtype)

    if args.only:
        if args.only not in cases:
            print(f"--only {args.only!r}: no such case; cases are:\n  " + "\n  ".join(cases), file=sys.stderr)
            return 2
        with backend("triton"), common.maybe_profile(args.profile):
            if args.iters:
                common.run_plain(cases[args.only], args.iters)
                print(f"ran {args.only} {args.iters} times")
            else:
                print(f"{args.only}: {bench(cases[args.only]):.4f} ms")
        return 0

    # ---- measure ---------------------------------------------------------------------------
    times: dict[str, float] = {}
    graph_times: dict[str, float] = {}
    graphs = cuda and not args.no_graphs
    skipped: list[str] = []
    started = STARTED  # --budget counts from the process's start, as the time limit around it does
    previous = signal.signal(signal.SIGINT, on_sigint)
    with backend("triton"), common.maybe_profile(args.profile):
        for name in measure_order(cases, meta, ms, ranks):
            fn = cases[name]
            if stop or (args.budget and time.perf_counter() - started > args.budget):
                skipped.append(name)
                continue
            try:
                times[name] = bench(fn)
            except Exception as exc:  # one failing peer must not hide the others' numbers
                print(f"{name}: failed ({type(exc).__name__}: {exc})")
                continue
            if graphs:
                try:
                    graph_times[name] = common.graph_ms(fn)
                except Exception as exc:  # e.g. a peer that cannot be captured
                    print(f"{name}: no graph timing ({type(exc).__name__}: {exc})")
        sweep_rows = sweep(args, sweep_inputs, bench, L, torch) if sweep_inputs and not skipped else []
    signal.signal(signal.SIGINT, previous)
    skip_note = None
    if skipped:
        why = "SIGINT (time limit)" if stop else f"--budget {args.budget:g}s reached"
        skip_note = f"{why}: {len(skipped)} case(s) not measured: {', '.join(skipped)}"

    # ---- tables ----------------------------------------------------------------------------
    def tables(times):
        rows = []
        for n, k in shapes:
            tag = f"{n}x{k}"
            for m in ms:
                base = times.get(f"nf4_only/{tag}/M={m}")
                bnb_base = times.get(f"bnb_only/{tag}/M={m}")
                for r in ranks:
                    row = {"shape": tag, "M": m, "r": r, "nf4_only": base, "bnb_only": bnb_base}
                    for peer in LORA_PEERS:
                        # the nf4_tma cases have no adapter: one per (shape, M), shown in each rank's row
                        t = times.get(f"{peer}/{tag}/M={m}" if peer.startswith("nf4_tma") else f"{peer}/{tag}/M={m}/r={r}")
                        row[peer] = t
                        row[f"{peer}/nf4_only"] = t / base if t and base else None
                    rows.append(row)
        qkv_rows = []
        for m in ms:
            base = times.get(f"qkv_nf4_only/M={m}")
            for r in ranks:
                row = {"shape": f"qkv {qn}x{qk}", "M": m, "r": r, "qkv_nf4_only": base}
                for peer in QKV_PEERS:
                    t = times.get(f"{peer}/M={m}/r={r}")
                    row[peer] = t
                    row[f"{peer}/nf4_only"] = t / base if t and base else None
                qkv_rows.append(row)
        norm_rows = []
        for group, ((gn, gk), _) in norm_groups.items():
            for m in ms:
                base_name = f"{group}_nf4_only"
                base = times.get(f"{base_name}/M={m}")
                for r in ranks:
                    row = {"shape": meta[f"{base_name}/M={m}"]["shape"], "group": group, "M": m, "r": r,
                           base_name: base}
                    for peer in NORM_PEERS:
                        t = times.get(f"{group}_{peer}/M={m}/r={r}")
                        row[f"{group}_{peer}"] = t
                        row[f"{group}_{peer}/nf4_only"] = t / base if t and base else None
                    norm_rows.append(row)
        return rows, qkv_rows, norm_rows

    for measured in (times, graph_times):
        measured.update({name: measured[source] for name, source in same_grid.items() if source in measured})
    rows, qkv_rows, norm_rows = tables(times)
    graph_rows, graph_qkv_rows, graph_norm_rows = tables(graph_times) if graph_times else ([], [], [])

    def show(rows, qkv_rows, norm_rows, how):
        print(f"\nforward + backward, ms, {how} (dtype {dtype}, dropout {p_drop}); ratios over NF4 alone\n")
        print(common.markdown_table(rows, ["shape", "M", "r", "nf4_only", "bnb_only"] + LORA_PEERS
                                    + [f"{p}/nf4_only" for p in LORA_PEERS]))
        print(f"\nq/k/v of one block, forward + backward, ms, {how}\n")
        print(common.markdown_table(qkv_rows, ["shape", "M", "r", "qkv_nf4_only"] + QKV_PEERS
                                    + [f"{p}/nf4_only" for p in QKV_PEERS]))
        for group in norm_groups:
            # the grid peers are the norm kernels'; SwiGLU's kernels have one grid
            peers = [f"{group}_{p}" for p in NORM_PEERS if group != "swiglu_down" or "_fused_" not in p]
            print(f"\n{GROUP_LABELS[group][1]}, forward + backward, ms, {how}; ratios over the same with NF4 "
                  "alone\n")
            print(common.markdown_table([r for r in norm_rows if r["group"] == group],
                                        ["shape", "M", "r", f"{group}_nf4_only"] + peers
                                        + [f"{p}/nf4_only" for p in peers]))

    show(rows, qkv_rows, norm_rows, "eager (host launch gaps included)")
    if graph_rows:
        show(graph_rows, graph_qkv_rows, graph_norm_rows, "CUDA-graph replay (GPU time only)")
    if sweep_rows:
        print("\ndequant-path GEMM tile sweep (best per case vs the default heuristic)\n")
        print(common.markdown_table(sweep_rows, ["dir", "shape", "M", "r", "default_ms", "best_ms", "best_config"]))

    # the large-M path bench/tune.py derives from this run (graph rows first): the issue-4 target is also
    # checked for it, so that one run says what the tuned default gives
    picked = (tune.large_m_path(graph_rows) if graph_rows else None) or tune.large_m_path(rows)
    tuned_path = picked[0] if picked and p_drop > 0 else None
    above = max(mm.gemv_max_m(device), L.fused_max_m(device))  # where auto takes the large-M path
    for row in rows + graph_rows:
        t = tune.lora_auto_time(row, tuned_path, above) if tuned_path else None
        row["lora_tuned"] = t
        row["lora_tuned/nf4_only"] = t / row["nf4_only"] if t and row.get("nf4_only") else None
    if tuned_path:
        same = tuned_path == L.large_m_path(device)
        print(f"\nbench/tune.py would write: large-M path {tuned_path} ("
              + ("the path this run had)" if same else "the issue-4 target below is also checked for it)"))
        tuned_path = None if same else tuned_path
    targets = check_targets(rows, qkv_rows, "eager", norm_rows, tuned_path)
    if graph_rows:
        targets += check_targets(graph_rows, graph_qkv_rows, "graph replay", graph_norm_rows, tuned_path)
    if args.smoke:  # interpreter timings say nothing about the GPU
        targets = [dict(t, status="smoke, not evaluated") for t in targets]
    print("\ntargets (issue 4):")
    for t in targets:
        print(f"  [{t['status']}] {t['target']}: {t['detail']}")
    if bnb_note:
        print(f"\nnote: {bnb_note}")
    for note in norm_notes:
        print(f"note: {note}")
    if skip_note:
        print(f"\nnote: {skip_note}")

    # without dropout ("auto" is then the merged path) the results go to their own file
    common.write_results("lora" if p_drop > 0 else "lora-no-dropout", rows + qkv_rows + norm_rows, args, extra={
        "dtype": str(dtype), "dropout": p_drop, "large_m_path": L.large_m_path(device), "concat_align": L.concat_align(device), "fused_max_m": L.fused_max_m(device),
        "tuning": tuning.summary(device), "norm_lora_programs": os.environ.get("BEZOAR_NORM_LORA_PROGRAMS") or "default",
        "targets": targets, "sweep": sweep_rows, "bnb_note": bnb_note, "norm_notes": norm_notes,
        "skipped": skipped, "skip_note": skip_note,
        "graph_rows": graph_rows + graph_qkv_rows + graph_norm_rows,
    })
    return 0


def add_swiglu_cases(add, group, label, n, f, ms, ranks, randn, fwd_bwd, p_drop, notes, nf4, mm, L, SL, backend,
                     torch):
    """SwiGLU + down_proj: gate and up (M, F) in, W (N, F) in NF4; ``swiglu`` then the NF4 matmul, then the
    separate LoRA call (path "auto"), against ``swiglu_lora``; gradients of gate, up and the adapter."""
    from bezoar_kernels.swiglu import swiglu

    with backend("triton"):
        w = nf4.quantize_nf4(randn(n, f, scale=0.02), 64, True)
    for m in ms:
        gate = randn(m, f).requires_grad_(True)
        up = randn(m, f).requires_grad_(True)
        dy = (randn(m, n),)
        key = dict(shape=label, M=m)
        add(f"{group}_nf4_only/M={m}", fwd_bwd(lambda g=gate, u=up: (mm.nf4_matmul_triton(swiglu(g, u), w),),
                                                 [gate, up], dy),
            peer=f"{group}_nf4_only", r=None, **key)
        for r in ranks:
            a = randn(r, f, scale=1 / f ** 0.5, dt=torch.float32).requires_grad_(True)
            b = randn(n, r, scale=0.02, dt=torch.float32).requires_grad_(True)
            params = [gate, up, a, b]

            def separate(g=gate, u=up, a=a, b=b, r=r):
                return (L.lora_linear_triton(swiglu(g, u), w, a, b, 16 / r, p_drop, True, 1),)

            def fused(g=gate, u=up, a=a, b=b, r=r):
                return (SL.swiglu_lora(g, u, w, a, b, 16 / r, p_drop, True, 1),)

            add(f"{group}_lora_separate/M={m}/r={r}", fwd_bwd(separate, params, dy),
                peer=f"{group}_lora_separate", **dict(key, r=r))
            if m == max(ms) and r == ranks[0]:  # the separate call on the concat path: the fused one's layout
                add(f"{group}_lora_concat/M={m}/r={r}",
                    fwd_bwd(lambda g=gate, u=up, a=a, b=b, r=r: (
                        L.lora_linear_triton(swiglu(g, u), w, a, b, 16 / r, p_drop, True, 1, "concat"),),
                        params, dy),
                    peer=f"{group}_lora_concat", **dict(key, r=r))
            with backend("triton"):
                ok = SL.swiglu_lora_ok(gate, up, w, L.Adapter(a, b, 16 / r), p_drop, True)
            if ok:
                add(f"{group}_lora_fused/M={m}/r={r}", fwd_bwd(fused, params, dy),
                    peer=f"{group}_lora_fused", **dict(key, r=r))
            else:  # it would time the torch reference, not the kernels
                notes.append(f"{group}_lora_fused/M={m}/r={r} skipped: swiglu_lora_ok is false")


def measure_order(cases: dict, meta: dict, ms: list[int], ranks: list[int]) -> list[str]:
    """The cases in the order they are timed: the norm + projections groups first (the newest figures,
    at the front of a run that a time limit may cut short), their largest M at the first rank ahead of
    the rest (q/k/v before gate/up; NF4 alone, fused, then separate), then every other case in the order
    it was added."""
    norm = [n for n in cases if n.startswith(GROUP_PREFIXES)]
    top_m, top_r = max(ms), ranks[0]
    norm.sort(key=lambda n: (not (meta[n]["M"] == top_m and meta[n]["r"] in (None, top_r)),
                             [n.startswith(g) for g in GROUP_PREFIXES].index(True),
                             "_lora_separate/" in n or "_lora_concat/" in n))
    return norm + [n for n in cases if not n.startswith(GROUP_PREFIXES)]


def sweep(args, inputs, bench, L, torch):
    """Time tile configs of the dequant path's Triton GEMM (forward and backward separately)."""
    import itertools

    grid = [L.GemmConfig(bm, bn, bk, 1, 8, warps, stages)
            for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (4, 8), (3, 4))
            if bm * bn <= 128 * 256]
    if args.smoke:
        grid, inputs = grid[:1], inputs[:1]
    out = []
    for tag, m, r, x, q, a, b, s, dy in inputs:
        xd = x.detach()
        for kind in ("fwd", "bwd"):
            def run(cfg, kind=kind):
                if kind == "fwd":
                    with torch.no_grad():
                        return L.lora_linear_triton(xd, q, a, b, s, 0.05, True, 1, "dequant", fwd_config=cfg)
                y = L.lora_linear_triton(x, q, a, b, s, 0.05, True, 1, "dequant", bwd_config=cfg)
                return torch.autograd.grad(y, [x, a, b], dy)

            default = bench(lambda: run(None))
            best, best_cfg = float("inf"), None
            for cfg in grid:
                try:
                    t = bench(lambda cfg=cfg: run(cfg))
                except Exception:  # a config the device cannot fit (shared memory) is skipped
                    continue
                if t < best:
                    best, best_cfg = t, cfg
            out.append({"dir": kind, "shape": tag, "M": m, "r": r, "default_ms": default, "best_ms": best,
                        "best_config": str(best_cfg)})
    return out


def check_targets(rows, qkv_rows, how: str, norm_rows=(), tuned_path: str | None = None) -> list[dict]:
    """Issue 4's target (lora_auto <= 1.10x NF4 alone) and the comparisons it asks for, with the figures,
    on one set of timings (``how``: eager or graph replay); the same target for ``tuned_path`` (the path
    bench/tune.py derives from the run, column ``lora_tuned``); for the norm + projections groups the same
    1.10x, of norm + fused LoRA projections over norm + NF4 projections."""
    out = []

    def verdict(name, ok, detail):
        out.append({"target": f"{name} [{how}]", "timing": how, "status": "not measured" if ok is None else ("met" if ok else "missed"),
                    "detail": detail})

    measured = [r for r in rows if r["lora_auto/nf4_only"]]
    verdict("NF4+LoRA fwd+bwd <= 1.10x NF4 alone (M 4096/16384, r 16/64)",
            all(r["lora_auto/nf4_only"] <= 1.10 for r in measured) if measured else None,
            ", ".join(f"{r['shape']} M={r['M']} r={r['r']}: {r['lora_auto/nf4_only']:.3f}x" for r in measured))
    if tuned_path:
        tuned = [r for r in rows if r.get("lora_tuned/nf4_only")]
        verdict(f"NF4+LoRA fwd+bwd <= 1.10x NF4 alone, auto on the path bench/tune.py derives from this run "
                f"({tuned_path})",
                all(r["lora_tuned/nf4_only"] <= 1.10 for r in tuned) if tuned else None,
                ", ".join(f"{r['shape']} M={r['M']} r={r['r']}: {r['lora_tuned/nf4_only']:.3f}x" for r in tuned))
    def unmeasured(peer: str) -> str:
        """What a comparison with no case holding both times lacked."""
        if not any(r[peer] for r in rows):
            return "bitsandbytes not measured" if peer == "bnb_peft" else f"{peer} not measured"
        return "lora_auto not measured (--paths without auto)"

    def peft_detail(r) -> str:
        """Both over NF4 alone where that was timed, else both times (a case may lack NF4 alone)."""
        if r["peft_style/nf4_only"] and r["lora_auto/nf4_only"]:
            return f"peft {r['peft_style/nf4_only']:.3f}x, bezoar {r['lora_auto/nf4_only']:.3f}x"
        return f"peft {r['peft_style']:.4f} ms, bezoar {r['lora_auto']:.4f} ms (NF4 alone not timed)"

    # a verdict only from cases with both times: a run without lora_auto says so, it does not pass
    peft = [r for r in rows if r["peft_style"] and r["lora_auto"]]
    verdict("faster than PEFT-style separate LoRA matmuls on the same NF4 base",
            all(r["lora_auto"] < r["peft_style"] for r in peft) if peft else None,
            ", ".join(f"{r['shape']} M={r['M']} r={r['r']}: {peft_detail(r)}" for r in peft)
            or unmeasured("peft_style"))
    bnb = [r for r in rows if r["bnb_peft"] and r["lora_auto"]]
    verdict("faster than bitsandbytes + PEFT",
            all(r["lora_auto"] < r["bnb_peft"] for r in bnb) if bnb else None,
            ", ".join(f"{r['shape']} M={r['M']} r={r['r']}: bnb+peft/bezoar {r['bnb_peft'] / r['lora_auto']:.2f}"
                      for r in bnb) or unmeasured("bnb_peft"))
    qkv = [r for r in qkv_rows if r["qkv_lora_fused"] and r["qkv_lora_separate"]]
    verdict("fused q/k/v faster than three separate LoRA calls",
            all(r["qkv_lora_fused"] < r["qkv_lora_separate"] for r in qkv) if qkv else None,
            ", ".join(f"M={r['M']} r={r['r']}: fused {r['qkv_lora_fused/nf4_only']:.3f}x, separate "
                      f"{r['qkv_lora_separate/nf4_only']:.3f}x" for r in qkv))
    for group, (producer, what, op) in (("norm_qkv", ("norm", "q/k/v", "rms_norm_lora")),
                                        ("norm_gateup", ("norm", "gate/up", "rms_norm_lora")),
                                        ("swiglu_down", ("swiglu", "down", "swiglu_lora"))):
        rs = [r for r in norm_rows if r["group"] == group]
        if not rs:
            continue
        fused, separate = f"{group}_lora_fused", f"{group}_lora_separate"
        measured = [r for r in rs if r[f"{fused}/nf4_only"]]
        verdict(f"{producer} + {what} LoRA projections, fused ({op}), fwd+bwd <= 1.10x {producer} + NF4 {what} "
                f"projections alone",
                all(r[f"{fused}/nf4_only"] <= 1.10 for r in measured) if measured else None,
                ", ".join(f"M={r['M']} r={r['r']}: fused {r[f'{fused}/nf4_only']:.3f}x"
                          + (f", separate {r[f'{separate}/nf4_only']:.3f}x" if r[f"{separate}/nf4_only"] else "")
                          for r in measured))
        both = [r for r in rs if r[fused] and r[separate]]
        verdict(f"{producer} + {what}: fused {producer} + LoRA faster than {producer} then the separate LoRA calls",
                all(r[fused] < r[separate] for r in both) if both else None,
                ", ".join(f"M={r['M']} r={r['r']}: separate/fused {r[separate] / r[fused]:.2f}" for r in both))
    return out


if __name__ == "__main__":
    sys.exit(main())
