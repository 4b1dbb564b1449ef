"""NF4 kernels against cuBLAS and bitsandbytes on OpenLLaMA 3B shapes.

Measures, side by side in one run (bf16, CUDA):

* dequantize: bezoar's Triton kernel in GB/s (packed bytes + scales read, bf16 written),
  as a fraction of the measured device-to-device copy bandwidth (bytes read + written);
* forward ``x @ W.T`` for W (N, K) in {3200x3200, 8640x3200, 3200x8640} and
  M in {1, 4, 16, 64, 256, 1024, 4096, 16384}:
  cuBLAS on the pre-dequantized bf16 weight, bezoar gemv (M <= 8), bezoar fused, bezoar
  dequant+cuBLAS, bezoar tma (M >= 256: the weight decoded inside a TMA GEMM's K loop,
  ``bezoar_kernels.nf4_tma``), bezoar auto (what dispatch picks), bitsandbytes ``dequantize_4bit`` +
  ``F.linear``, and ``bnb.matmul_4bit`` without grad (its fused gemv/gemm path);
* backward ``dx = dy @ W``: cuBLAS, bezoar fused, bezoar dequant+cuBLAS, bezoar tma, bezoar auto, and
  bitsandbytes' own backward (``dequantize_4bit`` + matmul, as in MatMul4Bit.backward);
* the crossover M where dequant+cuBLAS starts beating the fused kernel, per shape and direction,
  and the M range where the gemv kernel is the fastest NF4 path (what GEMV_MAX_M should be);
* with ``--sweep``: fused-kernel tile configs at M <= 64, best against the default heuristic;
  with ``--sweep-gemv`` likewise for the gemv kernel at M = 1, 4, 8, and with ``--sweep-dequant``
  for the dequantize launch (blocks per program, warps).

``--timing graph`` times every case as CUDA-graph replays of 8 calls in a row (2 above M = 256),
divided by the calls: GPU time only, the graph's launch latency spread as inside a decode step. Every
case cycles through 8 copies of its weights, so the calls of one replay do not find them in L2.

The JSON is rewritten after every case (``complete`` false until the last, ``cases_complete`` false until
every case of the tables was timed), so a run cut short keeps what it measured; ``--budget SECONDS``
(counted from the process's start) or a SIGINT, which ``timeout --signal=INT`` sends, stops starting
cases and sweep configs, and the tables and the JSON then hold what was measured and list the rest as
skipped. Each sweep says whether it ran to its end (``sweep_gemv_complete``, ``sweep_dequant_complete``,
``sweep_complete``; a gemv sweep row cut short has ``complete`` false): bench/tune.py derives no tiles for
an M whose sweep lacks a shape or was cut, and nothing from a file whose tables were cut.

Then it checks the targets of issue 3 and prints which were met; where the thresholds bench/tune.py
derives from the run differ from the ones it ran with, the NF4 matmul targets again for those
(``tuned/cublas``: what ``auto`` would run with them). bitsandbytes columns are left
empty with a note when it does not import. Usage::

    python bench/nf4.py                 # full run on the GPU, writes bench/results/nf4-<device>-<date>.json
    python bench/nf4.py --smoke         # tiny shapes on CPU (Triton interpreter), writes nothing
    python bench/nf4.py --only fwd/nf4_fused/3200x8640/M=1 --iters 200   # one case, for ncu/nsys
    python bench/nf4.py --sweep-tma --ms 4096   # only the tma kernels' tiles, into nf4-tma-sweep-*.json
    python bench/nf4.py --cache       # training-step sequences with the dequant cache off and on, nf4-cache-*.json
"""

from __future__ import annotations

import dataclasses
import itertools
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import tune  # noqa: E402

SHAPES = [(3200, 3200), (8640, 3200), (3200, 8640)]  # (N, K) = (out_features, in_features)
MS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
SMOKE_SHAPES = [(96, 128)]
SMOKE_MS = [1, 40]  # either side of FUSED_MAX_M
TMA_FROM_M = 256  # the tma kernels (256-row tiles) are timed from this M up: below it they only decode
COPY_BYTES = 1 << 30
WEIGHT_COPIES = 8  # per shape, cycled through by every case, so back-to-back calls find no weight in L2
GRAPH_CALLS = WEIGHT_COPIES  # calls per graph replay with --timing graph (M <= 256): each reads its own copy,
# and do_bench clears L2 between replays

STARTED = time.perf_counter()
stop: list[str] = []  # a SIGINT (timeout --signal=INT) stops starting cases; the measured ones are still written


def on_sigint(signum, frame):
    stop.append("SIGINT")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second one interrupts at once


def out_of_time(args) -> bool:
    """Whether no new case or sweep config should start: a SIGINT came, or ``--budget`` (counted from the
    process's start, as the time limit around it is) ran out."""
    budget = getattr(args, "budget", 0) or 0
    return bool(stop) or bool(budget and time.perf_counter() - STARTED > budget)


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="also sweep fused tile configs at M <= 64")
    p.add_argument("--sweep-dequant", action="store_true",
                   help="also sweep the dequantize launch (blocks per program, warps) on each shape")
    p.add_argument("--sweep-gemv", action="store_true",
                   help="also sweep gemv configs (rows and NF4 blocks per program, warps) at M = 1, 4, 8")
    p.add_argument("--sweep-tma", action="store_true",
                   help="only sweep the tma kernels' tile configs (forward and backward, M from --ms, default "
                        "4096) against cuBLAS on the dequantized weight and dequant + cuBLAS; writes nf4-tma-sweep-*")
    p.add_argument("--cache", action="store_true",
                   help="only time training-step sequences of dequant-path matmuls (forward over 8 weights, "
                        "backward back) with the dequant cache off, on and on with a high-priority side stream, "
                        "against cuBLAS on bf16 weights; M from --ms, default 4096,16384; writes nf4-cache-*")
    p.add_argument("--shapes", default=None, help="comma list NxK to restrict the shapes, e.g. 3200x8640")
    p.add_argument("--ms", default=None, help="comma list of M values to restrict the sweep")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds after which no new case or sweep config starts (0: no limit); skipped cases are "
                        "listed in the JSON, which is rewritten after every case")
    p.add_argument("--timing", choices=("eager", "graph"), default="eager",
                   help="eager: do_bench of each call, host launch gaps included; graph: each case captured in "
                        "a CUDA graph and its replay timed (GPU time only, as inside a graph-replayed decode step)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return run(args)
    finally:  # the measuring loop and the sweeps take SIGINT as "stop starting"; the caller's handling is back
        signal.signal(signal.SIGINT, previous)


def run(args) -> int:
    common.setup_smoke(args)
    import torch

    from bezoar_kernels import nf4, nf4_matmul as mm, nf4_tma, tuning
    from bezoar_kernels.dispatch import backend

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/nf4.py needs a CUDA GPU (use --smoke to check the code path on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the interpreter's bf16 dot is wrong; smoke uses fp32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    ms = SMOKE_MS if args.smoke else MS
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]

    bnb, bnbf, bnb_note = None, None, None
    try:
        import bitsandbytes
        import bitsandbytes.functional

        bnb, bnbf = bitsandbytes, bitsandbytes.functional
    except Exception as exc:  # the GPU box may not have it
        bnb_note = f"bitsandbytes columns skipped: it does not import ({type(exc).__name__}: {exc})"
        print(bnb_note)

    graph_timing = args.timing == "graph" and not args.smoke
    if args.cache:
        return cache_sequences(args, shapes, [int(v) for v in args.ms.split(",")] if args.ms else
                               ([40] if args.smoke else [4096, 16384]), device, dtype)
    if args.sweep_tma:
        return sweep_tma(args, shapes, [int(v) for v in args.ms.split(",")] if args.ms else [4096], device,
                         dtype if cuda else torch.float16)

    def bench(fn, m=None, quick=False, eager=False):
        """Milliseconds per call; ``quick`` (the sweeps) measures for 20 ms instead of 100; ``eager`` times
        without a graph whatever ``--timing`` says."""
        warmup, rep = (5, 20) if quick else (25, 100)
        if graph_timing and not eager:  # small products: many calls per replay, so the graph's launch latency is spread
            return common.graph_ms(fn, warmup, rep, calls=GRAPH_CALLS if m is None or m <= 256 else 2)
        return common.bench_ms(fn, smoke=args.smoke, warmup=warmup, rep=rep)

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale).to(dtype)

    # ---- the cases -------------------------------------------------------------------------
    cases: dict[str, object] = {}  # name -> zero-argument callable
    meta: dict[str, dict] = {}

    def add(name, fn, **info):
        cases[name] = fn
        meta[name] = info

    def cycle(items):
        """A zero-argument callable returning the next of ``items``, round and round."""
        it = itertools.cycle(items)
        return lambda: next(it)

    # the copy bandwidth the dequantize rows are measured against: timed first, so that the JSON written
    # after every case has it
    copy_src = torch.randint(0, 255, ((COPY_BYTES if cuda else 1 << 20),), dtype=torch.uint8, device=device)
    copy_dst = torch.empty_like(copy_src)
    add("copy/device_to_device", lambda: copy_dst.copy_(copy_src), kind="copy", bytes=2 * copy_src.numel())

    weights = {}
    copies = 1 if args.smoke else WEIGHT_COPIES
    for n, k in shapes:
        qs, w_dqs, bqs = [], [], []
        for _ in range(copies):  # each case cycles through the copies: repeated calls miss L2 as in a model
            w = randn(n, k, scale=0.02)
            with backend("triton"):
                qs.append(nf4.quantize_nf4(w, 64, True))
            w_dqs.append(nf4.dequantize_nf4_reference(qs[-1], dtype))
            if bnb is not None:
                bqs.append(bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))
            del w
        q, bq = qs[0], (bqs[0] if bqs else None)
        next_q, next_w, next_bq = cycle(qs), cycle(w_dqs), cycle(bqs) if bqs else None
        weights[(n, k)] = next_q  # the sweeps cycle through the copies too
        tag = f"{n}x{k}"
        buf = torch.empty(n * k, dtype=dtype, device=device)
        add(f"dequant/nf4_triton/{tag}", lambda nq=next_q, buf=buf: nf4.dequantize_nf4_triton(nq(), dtype, out=buf),
            kind="dequant", shape=tag, bytes=q.nbytes() + n * k * buf.element_size())
        if bq is not None:
            add(f"dequant/bnb/{tag}", lambda nb=next_bq: bnbf.dequantize_4bit(*nb()).to(dtype),
                kind="dequant", shape=tag, bytes=q.nbytes() + n * k * buf.element_size())
        # a copy that moves as many bytes as the dequantize (half read, half written), its sources
        # cycled like the weights: what a kernel of this size can reach, launch and tail included
        half = (q.nbytes() + n * k * buf.element_size()) // 2
        srcs = [torch.randint(0, 255, (half,), dtype=torch.uint8, device=device) for _ in range(copies)]
        dst = torch.empty(half, dtype=torch.uint8, device=device)
        add(f"copy/same_bytes/{tag}", lambda ns=cycle(srcs), dst=dst: dst.copy_(ns()), kind="copy", shape=tag,
            bytes=2 * half)
        for m in ms:
            x = randn(m, k)
            dy = randn(m, n)
            key = dict(shape=tag, m=m)
            add(f"fwd/cublas/{tag}/M={m}", lambda x=x, nw=next_w: torch.matmul(x, nw().t()), kind="fwd", peer="cublas", **key)
            if mm.gemv_supported(m, q):
                # the tuned config as a plain launch, whatever the tuning file or BEZOAR_NF4_GEMV_PDL says (tune.py
                # sets nf4.gemv_pdl from these two columns: with its entry on, both were dependent launches, and
                # the next pick turned it off again)
                tuned = mm._tuned_gemv_config(mm.next_power_of_2(m), device, dtype)
                plain = dataclasses.replace(tuned, pdl=False)
                add(f"fwd/nf4_gemv/{tag}/M={m}", lambda x=x, nq=next_q, cfg=plain: mm.nf4_gemv_forward(x, nq(), cfg),
                    kind="fwd", peer="nf4_gemv", **key)
                # the same config as a programmatic dependent launch (sm_90+; plain elsewhere): the graph
                # replays 8 calls in a row, so each launch can be scheduled during the one before it
                pdl = dataclasses.replace(tuned, pdl=True)
                add(f"fwd/nf4_gemv_pdl/{tag}/M={m}",
                    lambda x=x, nq=next_q, cfg=pdl: mm.nf4_gemv_forward(x, nq(), cfg),
                    kind="fwd", peer="nf4_gemv_pdl", **key)
            add(f"fwd/nf4_fused/{tag}/M={m}", lambda x=x, nq=next_q: mm.nf4_fused_forward(x, nq()),
                kind="fwd", peer="nf4_fused", **key)
            if dtype == torch.bfloat16 and m <= 64 and k % q.blocksize == 0:
                # the fused forward with its codes gathered from a table, as before the register decode
                # (its default here since 2026-11-27; files before that have nf4_fused_prmt instead)
                table = dataclasses.replace(mm.default_fused_config("forward", m, n, k, q.blocksize, device),
                                            decode="table")
                add(f"fwd/nf4_fused_table/{tag}/M={m}",
                    lambda x=x, nq=next_q, cfg=table: mm.nf4_fused_forward(x, nq(), cfg),
                    kind="fwd", peer="nf4_fused_table", **key)
                # the register decode in each operand order (FusedConfig.swap), whatever the default is:
                # bench/tune.py writes the faster into the device's entry (nf4.fused_swap)
                prmt = mm.default_fused_config("forward", m, n, k, q.blocksize, device, prmt=True)
                if prmt.decode == "prmt":
                    for peer, swap in (("nf4_fused_swap", True), ("nf4_fused_xw", False)):
                        add(f"fwd/{peer}/{tag}/M={m}",
                            lambda x=x, nq=next_q, cfg=dataclasses.replace(prmt, swap=swap):
                            mm.nf4_fused_forward(x, nq(), cfg), kind="fwd", peer=peer, **key)
            add(f"fwd/nf4_dequant/{tag}/M={m}", lambda x=x, nq=next_q: mm.nf4_dequant_forward(x, nq()),
                kind="fwd", peer="nf4_dequant", **key)
            add(f"fwd/nf4_auto/{tag}/M={m}", lambda x=x, nq=next_q: mm.nf4_matmul_triton(x, nq()),
                kind="fwd", peer="nf4_auto", **key)
            add(f"bwd/cublas/{tag}/M={m}", lambda dy=dy, nw=next_w: torch.matmul(dy, nw()), kind="bwd", peer="cublas", **key)
            add(f"bwd/nf4_fused/{tag}/M={m}", lambda dy=dy, nq=next_q: mm.nf4_fused_backward(dy, nq()),
                kind="bwd", peer="nf4_fused", **key)
            add(f"bwd/nf4_dequant/{tag}/M={m}", lambda dy=dy, nq=next_q: mm.nf4_dequant_backward(dy, nq()),
                kind="bwd", peer="nf4_dequant", **key)
            add(f"bwd/nf4_auto/{tag}/M={m}",
                lambda dy=dy, nq=next_q: mm.nf4_matmul_backward(dy, nq(), "auto"), kind="bwd", peer="nf4_auto", **key)
            # the weight decoded inside a TMA GEMM's K loop (bf16 on a GPU; fp16 in smoke: no fp32 tma)
            tma_dtype = dtype if cuda else torch.float16
            if (m >= TMA_FROM_M or args.smoke) and nf4_tma.supported(q, tma_dtype):
                xt, dyt = x.to(tma_dtype), dy.to(tma_dtype)
                add(f"fwd/nf4_tma/{tag}/M={m}", lambda x=xt, nq=next_q: nf4_tma.nf4_tma_forward(x, nq()),
                    kind="fwd", peer="nf4_tma", **key)
                add(f"bwd/nf4_tma/{tag}/M={m}", lambda dy=dyt, nq=next_q: nf4_tma.nf4_tma_backward(dy, nq()),
                    kind="bwd", peer="nf4_tma", **key)
            if bq is not None:
                add(f"fwd/bnb_dequant_linear/{tag}/M={m}",
                    lambda x=x, nb=next_bq: torch.nn.functional.linear(x, bnbf.dequantize_4bit(*nb()).to(dtype)),
                    kind="fwd", peer="bnb_dequant_linear", **key)

                def bnb_fused(x=x, nb=next_bq):
                    packed, state = nb()
                    with torch.no_grad():
                        return bnb.matmul_4bit(x, packed.t(), quant_state=state)

                add(f"fwd/bnb_matmul_4bit/{tag}/M={m}", bnb_fused, kind="fwd", peer="bnb_matmul_4bit", **key)
                add(f"bwd/bnb/{tag}/M={m}",
                    lambda dy=dy, nb=next_bq: torch.matmul(dy, bnbf.dequantize_4bit(*nb()).to(dtype)),
                    kind="bwd", peer="bnb", **key)

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
    timing = "graph" if graph_timing else "eager"
    name = "nf4" if timing == "eager" else "nf4-graph"
    peers = {"fwd": ["cublas", "nf4_gemv", "nf4_gemv_pdl", "nf4_fused", "nf4_fused_table", "nf4_fused_swap", "nf4_fused_xw",
                     "nf4_dequant", "nf4_tma", "nf4_auto", "bnb_dequant_linear", "bnb_matmul_4bit"],
             "bwd": ["cublas", "nf4_fused", "nf4_dequant", "nf4_tma", "nf4_auto", "bnb"]}

    def tables(times):
        """(rows, dequant_rows, copy GB/s) of the cases timed so far (None where a case has no time yet)."""
        copy_ms = times.get("copy/device_to_device")
        copy_gbs = meta["copy/device_to_device"]["bytes"] / copy_ms / 1e6 if copy_ms else None
        rows, dequant_rows = [], []
        for n, k in shapes:
            tag = f"{n}x{k}"
            for impl in ("nf4_triton", "bnb"):
                case = f"dequant/{impl}/{tag}"
                if case in times:
                    gbs = meta[case]["bytes"] / times[case] / 1e6
                    same = f"copy/same_bytes/{tag}"
                    same_gbs = meta[same]["bytes"] / times[same] / 1e6 if same in times else None
                    dequant_rows.append({"shape": tag, "impl": impl, "ms": times[case], "GB/s": gbs,
                                         "of_copy_bw": gbs / copy_gbs if copy_gbs else None,
                                         "same_size_copy_GB/s": same_gbs,
                                         "of_same_size_copy": gbs / same_gbs if same_gbs else None})
        for kind in ("fwd", "bwd"):
            for n, k in shapes:
                tag = f"{n}x{k}"
                for m in ms:
                    row = {"dir": kind, "shape": tag, "M": m}
                    for peer in peers[kind]:
                        row[peer] = times.get(f"{kind}/{peer}/{tag}/M={m}")
                    cub, auto = row["cublas"], row["nf4_auto"]
                    best_nf4 = min((v for v in (row.get("nf4_gemv"), row["nf4_fused"], row["nf4_dequant"],
                                                row["nf4_tma"]) if v is not None), default=None)
                    row["auto/cublas"] = auto / cub if auto and cub else None
                    row["best_nf4/cublas"] = best_nf4 / cub if best_nf4 and cub else None
                    bnb_ms = _bnb_best(row)
                    row["bnb_best/auto"] = bnb_ms / auto if bnb_ms and auto else None
                    rows.append(row)
        return rows, dequant_rows, copy_gbs

    base_extra = {"dtype": str(dtype), "timing": timing, "graph_calls": GRAPH_CALLS if graph_timing else None,
                  "bandwidth_timing": "eager",  # the copy and dequantize rows, in either mode (see the loop)
                  "weight_copies": copies, "bnb_note": bnb_note, "budget": args.budget or None}

    times: dict[str, float] = {}
    skipped: list[str] = []
    # from here a SIGINT (the call's time limit) stops starting cases and sweep configs; before, it interrupts
    signal.signal(signal.SIGINT, on_sigint)
    with backend("triton"), common.maybe_profile(args.profile):
        for case, fn in cases.items():
            if out_of_time(args):
                skipped.append(case)
                continue
            try:
                # The bandwidth rows (the copies and the dequantizes they judge) are timed eagerly in either
                # mode: a copy_ captured in a CUDA graph read 2,446 GB/s on an H100 where the same call's
                # eager copy read 2,953, and the dequantize then passed for 101% of a copy. Each is one
                # launch of 10 us or more, which an eager loop keeps queued back to back.
                times[case] = bench(fn, meta[case].get("m"), eager=meta[case]["kind"] in ("copy", "dequant"))
            except Exception as exc:  # one failing peer must not hide the others' numbers
                print(f"{case}: failed ({type(exc).__name__}: {exc})")
            # rewritten after every case: a run cut short (its time limit's KILL too) keeps what it timed
            partial_rows, partial_dequant, partial_copy = tables(times)
            common.write_results(name, partial_rows + partial_dequant, args, extra={
                **base_extra, "copy_GBps": partial_copy, "complete": False, "cases_complete": False,
                "cases_timed": len(times), "cases": len(cases)})
    skip_note = None
    if skipped:
        why = "SIGINT (time limit)" if stop else f"--budget {args.budget:g}s reached"
        skip_note = f"{why}: {len(skipped)} case(s) not measured: {', '.join(skipped)}"

    # ---- tables ----------------------------------------------------------------------------
    rows, dequant_rows, copy_gbs = tables(times)
    crossover = {}
    for kind in ("fwd", "bwd"):
        for n, k in shapes:
            tag = f"{n}x{k}"
            faster = [r["M"] for r in rows if r["dir"] == kind and r["shape"] == tag
                      and r["nf4_dequant"] is not None and r["nf4_fused"] is not None
                      and r["nf4_dequant"] < r["nf4_fused"]]
            crossover[f"{kind}/{tag}"] = min(faster) if faster else None
    # GEMV_MAX_M: the largest measured M up to which gemv is the fastest NF4 forward summed over the shapes (the
    # rule bench/tune.py writes into the tuning file)
    # the fused forward's times in the operand order tune.py will pick (nf4.fused_swap, where this run timed
    # both); the rows keep what the default ran
    swap_pick = tune.fused_swap_pick(rows)
    swap_tuned = mm.fused_swap(device) if swap_pick is None else swap_pick[0]
    ordered = tune.with_fused_order(rows)
    gemv_derived = tune.gemv_fastest_up_to(ordered)
    gemv_max = gemv_derived or 0
    # what "auto" would have taken with the thresholds tune.py derives from these rows (the ones it
    # cannot derive stay as they are now): the targets are checked for that too, so that a run says
    # what the tuned defaults give without a second run
    fused_tuned = tune.fused_fastest_up_to(ordered)
    fused_tuned = mm.fused_max_m(device) if fused_tuned is None else fused_tuned
    gemv_tuned = mm.gemv_max_m(device) if gemv_derived is None else gemv_derived
    gemv_at = tune.gemv_runs_at(ordered, gemv_tuned)
    tma_tuned = tune.tma_fastest_from(rows)
    tma_tuned = mm.tma_min_m(device) if tma_tuned is None else tma_tuned
    tuned_same = (gemv_tuned, fused_tuned, tma_tuned, swap_tuned) == (
        mm.gemv_max_m(device), mm.fused_max_m(device), mm.tma_min_m(device), mm.fused_swap(device))
    for row, in_order in zip(rows, ordered):
        tuned = tune.nf4_auto_time(in_order, (row["shape"], row["M"]) in gemv_at, gemv_tuned, fused_tuned, tma_tuned)
        cub = row["cublas"]
        row["nf4_tuned"] = tuned
        row["tuned/cublas"] = tuned / cub if tuned and cub else None
        bnb_ms = _bnb_best(row)
        row["bnb_best/tuned"] = bnb_ms / tuned if bnb_ms and tuned else None

    print(f"\ntiming: {timing}" + (" (CUDA-graph replay: GPU time only; the copy and dequantize rows eager)"
                                  if graph_timing else
                                 " (do_bench per call: host launch gaps included)")
          + (" (graph timing needs a GPU)" if args.timing == "graph" and not graph_timing else ""))
    print("\ndevice-to-device copy: " + (f"{copy_gbs:.1f} GB/s (read + written)\n" if copy_gbs else "not measured\n"))
    print(common.markdown_table(dequant_rows, ["shape", "impl", "ms", "GB/s", "of_copy_bw", "same_size_copy_GB/s",
                                               "of_same_size_copy"]))
    for kind in ("fwd", "bwd"):
        print(f"\n{kind} (ms; ratios < 1 mean bezoar is faster)\n")
        print(common.markdown_table([r for r in rows if r["dir"] == kind],
                                    ["shape", "M"] + peers[kind] + ["auto/cublas", "best_nf4/cublas", "bnb_best/auto",
                                                                    "tuned/cublas"]))
    print("\ncrossover M (smallest measured M where dequant+cuBLAS beats the fused kernel; "
          f"FUSED_MAX_M is now {mm.fused_max_m(device)}):")
    for key, m in crossover.items():
        print(f"  {key}: {m if m is not None else 'none in range'}")
    print(f"gemv is the fastest NF4 forward, summed over the shapes, up to M = {gemv_max} "
          f"(GEMV_MAX_M is now {mm.gemv_max_m(device)}; the kernel takes M <= {mm.GEMV_MAX_ROWS})")
    pdl_pick = tune.gemv_pdl_pick(rows)
    if pdl_pick is not None:
        print(f"gemv as a programmatic dependent launch: {'on' if pdl_pick[0] else 'off'}, {pdl_pick[1]} "
              f"(GemvConfig.pdl's default is now {mm.gemv_pdl(device)})")
    if swap_pick is not None:
        print(f"fused forward operand order: {'W x^T (swap)' if swap_pick[0] else 'x W^T'}, {swap_pick[1]} "
              f"(FusedConfig.swap's default is now {mm.fused_swap(device)})")
    order = "W x^T" if swap_tuned else "x W^T"
    print(f"bench/tune.py would write: gemv to M = {gemv_tuned}, fused to M = {fused_tuned}, tma from M = {tma_tuned}, "
          f"fused order {order} ("
          + ("the thresholds this run had)" if tuned_same else
             "the targets below are also checked for them: tuned/cublas)"))
    targets = check_targets(rows, dequant_rows, ms)
    if not tuned_same:  # the same thresholds as this run's: the targets above already say it
        tuned_how = (f"auto with this run's derived thresholds (bench/tune.py): gemv to M = {gemv_tuned}, fused to "
                     f"M = {fused_tuned}, tma from M = {tma_tuned}, fused order {order}")
        targets += [dict(t, target=f"{t['target']} [{tuned_how}]") for t in check_targets(rows, [], ms, column="tuned")
                    if not t["target"].startswith(("dequantize", "("))]
    if args.smoke:  # interpreter timings say nothing about the GPU
        targets = [dict(t, status="smoke, not evaluated") for t in targets]
    print(f"\ntargets (issue 3, {timing} timing):")
    for t in targets:
        print(f"  [{t['status']}] {t['target']}: {t['detail']}")
    if bnb_note:
        print(f"\nnote: {bnb_note}")
    if skip_note:
        print(f"\nnote: {skip_note}")

    sweeps = [flag for flag, asked in (("sweep", args.sweep), ("sweep_dequant", args.sweep_dequant),
                                       ("sweep_gemv", args.sweep_gemv)) if asked]
    extra = {
        **base_extra, "complete": not skipped and not sweeps, "cases_complete": not skipped, "skipped": skipped,
        "skip_note": skip_note, "cases_timed": len(times), "cases": len(cases),
        **{f"{flag}_complete": False for flag in sweeps},  # each set true where it runs to its end
        "copy_GBps": copy_gbs, "crossover_M": crossover, "fused_max_m": mm.fused_max_m(device),
        "gemv_fastest_up_to_M": gemv_max, "gemv_max_m": mm.gemv_max_m(device), "tma_min_m": mm.tma_min_m(device),
        "tma_fastest_from_M": tune.tma_fastest_from(rows), "fused_swap": mm.fused_swap(device),
        "gemv_pdl": mm.gemv_pdl(device), "tuning": tuning.summary(device),
        "targets": targets,
    }
    # The main tables are written before the sweeps start, so a run stopped by its time limit keeps them.
    common.write_results(name, rows + dequant_rows, args, extra=extra)
    if not sweeps:
        return 0
    if skipped:  # the time is up: no sweep starts (each says it did not run to its end)
        print("no sweep started: " + skip_note.split(":")[0])
        return 0

    stopping = lambda: out_of_time(args)  # noqa: E731
    with backend("triton"):
        if args.sweep and not stopping():
            extra["sweep"] = sweep_fused(args, shapes, ms, weights, randn, bench, mm, stop=stopping)
            extra["sweep_complete"] = all(r.get("complete", True) for r in extra["sweep"])
            print("\nfused config sweep (best per case vs the default heuristic)\n")
            print(common.markdown_table(extra["sweep"], ["dir", "shape", "M", "default_ms", "best_ms", "best_config"]))
            common.write_results(name, rows + dequant_rows, args, extra=extra)
        if args.sweep_dequant and not stopping():
            extra["sweep_dequant"] = sweep_dequant(args, shapes, weights, bench, nf4, dtype, stop=stopping)
            extra["sweep_dequant_complete"] = all(r.get("complete", True) for r in extra["sweep_dequant"])
            print("\ndequantize launch sweep (best per shape vs the default)\n")
            print(common.markdown_table(extra["sweep_dequant"], ["shape", "default_ms", "best_ms",
                                                                 "best_blocks_per_prog", "best_num_warps"]))
            common.write_results(name, rows + dequant_rows, args, extra=extra)
        if args.sweep_gemv and not stopping():
            def keep_gemv_rows(done):
                extra["sweep_gemv"] = done
                common.write_results(name, rows + dequant_rows, args, extra=extra)

            extra["sweep_gemv"] = sweep_gemv(args, shapes, weights, randn, bench, mm, keep_gemv_rows, stop=stopping)
            extra["sweep_gemv_complete"] = gemv_sweep_complete(extra["sweep_gemv"], shapes, args.smoke)
            print("\ngemv config sweep (best per case vs the default heuristic)\n")
            print(common.markdown_table(extra["sweep_gemv"], ["shape", "M", "default_ms", "best_ms", "best_config"]))
            # the thresholds above were derived before the sweep, from the tiles this run had; tune.py
            # derives the gemv threshold at the tiles the sweep chooses: say what it will write
            derived = {key: value for key, (value, _) in tune.derive(
                {"bench": name, "rows": rows, "sweep_gemv": extra["sweep_gemv"]}).items()}
            extra["tune_derived"] = derived
            print(f"\nwith the swept tiles, bench/tune.py would write: {derived}")
    unfinished = [flag for flag in sweeps if not extra.get(f"{flag}_complete")]
    if unfinished:
        why = "SIGINT (time limit)" if stop else f"--budget {args.budget:g}s reached"
        extra["sweep_note"] = f"{why}: {', '.join(unfinished)} not run to the end"
        print(f"\nnote: {extra['sweep_note']}")
    extra["complete"] = not unfinished
    common.write_results(name, rows + dequant_rows, args, extra=extra)
    return 0


def cache_sequences(args, shapes, ms, device, dtype) -> int:
    """--cache: one training step's worth of dequant-path calls on one shape, as a model makes them:
    x @ W_i.T for i = 1..8 (forward), then dy @ W_i for i = 8..1 (backward), 8 weights of the shape.

    Timed (do_bench of a whole sequence, eager: at M >= 4096 the GPU work outlasts the host's) as
    cuBLAS on 8 bf16 weights; the dequant path with the cache off (16 dequantizes, inline); with the cache
    on and ``begin_step`` per sequence (from the second sequence every call hits: 12 dequantizes run
    ahead on the side stream, 4 calls meet their weight still in a slot: W1, W2 from the sequence
    before, W8, W7 where the backward turns); the same with the side stream at high priority; and the
    cache on without ``begin_step`` (those 4 hits, 12 dequantizes inline, none ahead). Each
    variant's results are checked equal, bit for bit, to the cache-off sequence's, before it is timed and
    again after; a variant that fails records ``<variant>_error`` instead of its times. ``<variant>_hidden``
    is the share of the dequant path's extra time over cuBLAS that the variant takes away."""
    import torch

    from bezoar_kernels import dequant_cache, nf4, nf4_matmul as mm
    from bezoar_kernels.dispatch import backend

    gen = torch.Generator(device=device).manual_seed(0)
    copies = 3 if args.smoke else WEIGHT_COPIES  # 3 > the 2 slots: the smoke run dequantizes ahead too
    rows = []
    with backend("triton"):
        for n, k in shapes:
            qs = [nf4.quantize_nf4(torch.randn(n, k, generator=gen, device=device) * 0.02, 64, True)
                  for _ in range(copies)]
            ws = [nf4.dequantize_nf4_reference(q, dtype) for q in qs]
            for m in ms:
                x = torch.randn(m, k, generator=gen, device=device).to(dtype)
                dy = torch.randn(m, n, generator=gen, device=device).to(dtype)

                def cublas():
                    return [torch.matmul(x, w.t()) for w in ws] + [torch.matmul(dy, w) for w in reversed(ws)]

                def nf4_path(mark_steps):
                    def run():
                        if mark_steps:
                            dequant_cache.begin_step()
                        return ([mm.nf4_dequant_forward(x, q) for q in qs]
                                + [mm.nf4_dequant_backward(dy, q) for q in reversed(qs)])
                    return run

                variants = {"dequant": ("0", 0, nf4_path(False)), "cache": ("1", 0, nf4_path(True)),
                            "cache_high_priority": ("1", -1, nf4_path(True)),
                            "cache_hits_only": ("1", 0, nf4_path(False))}
                row = {"shape": f"{n}x{k}", "M": m, "calls": 2 * copies,
                       "cublas_ms": common.bench_ms(cublas, smoke=args.smoke)}
                ref = None

                def check(out, label):
                    if ref is None:
                        raise RuntimeError("no cache-off results to check against (the dequant variant failed)")
                    if not all(torch.equal(a, b) for a, b in zip(out, ref)):
                        raise ArithmeticError(f"{label}: results differ from the cache-off sequence")

                for label, (env, priority, fn) in variants.items():
                    dequant_cache.clear()
                    dequant_cache.SIDE_PRIORITY = priority
                    with common.environ(BEZOAR_NF4_DEQUANT_CACHE=env):
                        try:
                            for _ in range(2):  # learn the order, then use it
                                out = fn()
                            if label == "dequant":
                                ref = out
                            else:
                                check(out, label)
                            before = dequant_cache.stats()
                            t = common.bench_ms(fn, smoke=args.smoke)
                            after = dequant_cache.stats()
                            if label != "dequant":  # and once more after the timed runs
                                check(fn(), label)
                            row[f"{label}_ms"] = t
                            row[f"{label}_over_cublas"] = t / row["cublas_ms"]
                            if label != "dequant":
                                calls = max(1, (after["hits"] + after["misses"]) - (before["hits"] + before["misses"]))
                                row[f"{label}_hit_share"] = (after["hits"] - before["hits"]) / calls
                        except Exception as exc:  # reported in the row; the other variants still run
                            row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                dequant_cache.clear()
                dequant_cache.SIDE_PRIORITY = 0
                extra_ms = row.get("dequant_ms", 0.0) - row["cublas_ms"]
                for label in ("cache", "cache_high_priority", "cache_hits_only"):
                    if f"{label}_ms" in row and extra_ms > 0:
                        row[f"{label}_hidden"] = (row["dequant_ms"] - row[f"{label}_ms"]) / extra_ms
                rows.append(row)
                print(f"{n}x{k} M={m}: " + ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else
                                                   f"{key} {value}" for key, value in row.items()
                                                   if key not in ("shape", "M")), flush=True)
                common.write_results("nf4-cache", rows, args, extra={"dtype": str(dtype), "complete": False})
    print()
    print(common.markdown_table(rows, ["shape", "M", "cublas_ms", "dequant_over_cublas", "cache_over_cublas",
                                       "cache_high_priority_over_cublas", "cache_hits_only_over_cublas",
                                       "cache_hidden"]))
    common.write_results("nf4-cache", rows, args, extra={"dtype": str(dtype), "complete": True})
    return 0


def tma_sweep_configs(nf4_tma) -> dict[str, list]:
    """The tile configs ``--sweep-tma`` times, the defaults first: rows of x per tile, rows of W per tile
    (forward) or per reduction step (backward), the K step (forward) or dx columns (backward), stages
    and group, and the default tiles with exact fp32 scaling."""
    fwd, bwd = nf4_tma.DEFAULT_FWD, nf4_tma.DEFAULT_BWD
    r = dataclasses.replace
    return {
        "fwd": [fwd, r(fwd, num_stages=4), r(fwd, block_k=128, num_stages=2), r(fwd, block_n=64),
                r(fwd, block_m=128, num_stages=4), r(fwd, group_m=16), r(fwd, exact=True)],
        "bwd": [bwd, r(bwd, num_stages=4), r(bwd, block_n=128, num_stages=2), r(bwd, block_k=64),
                r(bwd, block_m=128, num_stages=4), r(bwd, group_m=16), r(bwd, exact=True)],
    }


def sweep_tma(args, shapes, ms, device, dtype) -> int:
    """--sweep-tma: each tile config of the tma kernels, its result checked against dequant + cuBLAS first,
    then timed beside cuBLAS on the dequantized weight and dequant + cuBLAS (do_bench, eager). The JSON
    is rewritten after every config; a SIGINT (``timeout --signal=INT``) stops starting configs."""
    import signal

    import torch

    from bezoar_kernels import nf4, nf4_matmul as mm, nf4_tma
    from bezoar_kernels.dispatch import backend

    stop = []
    signal.signal(signal.SIGINT, lambda *_: stop.append("SIGINT"))
    configs = tma_sweep_configs(nf4_tma)
    if args.smoke:  # tiny tiles the interpreter walks quickly; two configs a direction
        configs = {k: [dataclasses.replace(c, block_m=32, block_n=32, programs=2) for c in v[:2]]
                   for k, v in configs.items()}
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for m in ms:
        for n, k in shapes:
            if stop:
                break
            with backend("triton"):
                q = nf4.quantize_nf4((torch.randn(n, k, generator=gen, device=device) * 0.02), 64, True)
            w = nf4.dequantize_nf4_reference(q, dtype)
            x = torch.randn(m, k, generator=gen, device=device).to(dtype)
            dy = torch.randn(m, n, generator=gen, device=device).to(dtype)
            base = {"fwd": (lambda: torch.matmul(x, w.t()), lambda: mm.nf4_dequant_forward(x, q)),
                    "bwd": (lambda: torch.matmul(dy, w), lambda: mm.nf4_dequant_backward(dy, q))}
            for kind, grid in configs.items():
                cublas_ms = common.bench_ms(base[kind][0], smoke=args.smoke)
                dequant_ms = common.bench_ms(base[kind][1], smoke=args.smoke)
                ref = base[kind][1]().float()
                for cfg in grid:
                    if stop:
                        break
                    run = nf4_tma.nf4_tma_forward if kind == "fwd" else nf4_tma.nf4_tma_backward
                    fn = lambda cfg=cfg, run=run, a=(x if kind == "fwd" else dy): run(a, q, cfg)  # noqa: E731
                    tiles = (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} "
                             f"g{cfg.group_m}" + (" exact" if cfg.exact else ""))
                    row = {"dir": kind, "shape": f"{n}x{k}", "M": m, "config": tiles, "cublas_ms": cublas_ms,
                           "dequant_ms": dequant_ms}
                    try:
                        # these kernels are new to the GPU they run on: checked before they are timed
                        err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                        row["max_rel_err"] = err
                        if not err < 2e-2:
                            raise ArithmeticError(f"differs from dequant + cuBLAS by {err:.3g} of its largest |value|")
                        t = common.bench_ms(fn, smoke=args.smoke)
                        row.update(ms=t, over_cublas=t / cublas_ms, over_dequant=t / dequant_ms)
                    except Exception as exc:  # a config this device cannot fit, or a wrong result: reported
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    rows.append(row)
                    print(f"{kind} {n}x{k} M={m} {tiles}: "
                          + (f"{row['ms']:.4f} ms, {row['over_cublas']:.3f}x cuBLAS, {row['over_dequant']:.3f}x "
                             "dequant + cuBLAS" if "ms" in row else row["error"]), flush=True)
                    # rewritten after every config: a call cut short keeps what it timed
                    common.write_results("nf4-tma-sweep", rows, args, extra={"dtype": str(dtype), "complete": False})
    print()
    print(common.markdown_table(rows, ["dir", "shape", "M", "ms", "cublas_ms", "dequant_ms", "over_cublas",
                                       "over_dequant", "config"]))
    common.write_results("nf4-tma-sweep", rows, args, extra={"dtype": str(dtype), "complete": not stop})
    return 0


def _bnb_best(row: dict) -> float | None:
    """bitsandbytes' fastest time in a table row (None where it was not measured)."""
    times = [row.get(p) for p in ("bnb_dequant_linear", "bnb_matmul_4bit", "bnb") if row.get(p)]
    return min(times) if times else None


def fastest(time_config, grid, timed: list | None = None, stop=None):
    """(best milliseconds, its config, whether every config was tried) of ``time_config(cfg)`` over
    ``grid``; configs that fail to compile or fit on the device are skipped. Every (config, ms) measured
    is appended to ``timed``. ``stop()`` true before a config: that one and the rest are not tried."""
    best, best_cfg = float("inf"), None
    for cfg in grid:
        if stop is not None and stop():
            return best, best_cfg, False
        try:
            t = time_config(cfg)
        except Exception:  # e.g. more shared memory or registers than the device has
            continue
        if timed is not None:
            timed.append((cfg, t))
        if t < best:
            best, best_cfg = t, cfg
    return best, best_cfg, True


def sweep_fused(args, shapes, ms, weights, randn, bench, mm, stop=None):
    """Time a grid of fused-kernel configs at small M; report the best next to the default. ``stop()`` true
    stops it before the next config: the row it cuts (or a row for the case it would have started) has
    ``complete`` false."""
    out = []
    small = [m for m in ms if m <= 64]
    if args.smoke:
        shapes, small = shapes[:1], small[:1]
    for (n, k), m in itertools.product(shapes, small):
        if stop is not None and stop():
            out.append({"shape": f"{n}x{k}", "M": m, "complete": False, "note": "not started: out of time"})
            break
        next_q = weights[(n, k)]  # cycles through the copies: no L2 reuse between calls
        x, dy = randn(m, k), randn(m, n)
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        grid = [mm.FusedConfig(block_m, bn, split, warps, stages) for bn, split, warps, stages
                in itertools.product((32, 64, 128), (1, 2, 4, 8, 16), (4, 8), (1, 2, 3, 4))]
        if args.smoke:
            grid = grid[:1]
        q0 = next_q()
        # the forward's tiles with the decode and operand order its default takes (the register decode and
        # W x^T for bf16 x): those are what the tiles would serve
        fwd = mm.default_fused_config("forward", m, n, k, q0.blocksize, x.device,
                                      prmt=mm.prmt_decode_applies(x.dtype, k % q0.blocksize == 0, q0.packed))
        for kind in ("fwd", "bwd"):
            configs = ([dataclasses.replace(c, decode=fwd.decode, swap=fwd.swap) for c in grid] if kind == "fwd"
                       else grid)

            def run(cfg, kind=kind):
                q = next_q()
                return mm.nf4_fused_forward(x, q, cfg) if kind == "fwd" else mm.nf4_fused_backward(dy, q, cfg)

            default = bench(lambda: run(None), m, quick=True)
            best, best_cfg, whole = fastest(lambda cfg: bench(lambda: run(cfg), m, quick=True), configs, stop=stop)
            out.append({"dir": kind, "shape": f"{n}x{k}", "M": m, "default_ms": default, "best_ms": best,
                        "best_config": str(best_cfg), "complete": whole})
            if not whole:
                return out
    return out


def sweep_dequant(args, shapes, weights, bench, nf4, dtype, stop=None):
    """Time the dequantize kernel with several launches per shape; report the best next to the default.
    ``stop()`` true stops it before the next config: the row it cuts (or a row for the shape it would have
    started) has ``complete`` false, and bench/tune.py takes nothing from the sweep."""
    out = []
    grid = list(itertools.product((8, 16, 32, 64, 128, 256), (2, 4, 8)))
    if args.smoke:
        shapes, grid = shapes[:1], grid[:2]
    for n, k in shapes:
        if stop is not None and stop():
            out.append({"shape": f"{n}x{k}", "complete": False, "note": "not started: out of time"})
            break
        next_q = weights[(n, k)]
        q = next_q()
        buf = q.packed.new_empty(q.numel, dtype=dtype)
        heuristic = nf4._blocks_per_prog(q.num_blocks, q.blocksize)  # the default without a tuning entry
        default = bench(lambda: nf4.dequantize_nf4_triton(next_q(), dtype, out=buf, blocks_per_prog=heuristic,
                                                          num_warps=4), quick=True)
        timed = []
        best, best_cfg, whole = fastest(lambda cfg: bench(lambda: nf4.dequantize_nf4_triton(
            next_q(), dtype, out=buf, blocks_per_prog=cfg[0], num_warps=cfg[1]), quick=True), grid, timed, stop)
        best_cfg = best_cfg or (None, None)
        # every config's time, as values per program (what bench/tune.py writes: blocksize-independent)
        out.append({"shape": f"{n}x{k}", "blocksize": q.blocksize, "default_ms": default, "best_ms": best,
                    "best_blocks_per_prog": best_cfg[0], "best_num_warps": best_cfg[1],
                    "grid": [{"config": {"values_per_prog": c[0] * q.blocksize, "num_warps": c[1]}, "ms": t}
                             for c, t in timed], "complete": whole})
        if not whole:
            break
    return out


def gemv_sweep_ms(smoke: bool) -> list[int]:
    """The M the gemv sweep times."""
    return [1] if smoke else [1, 4, 8]


def gemv_sweep_complete(rows: list[dict], shapes, smoke: bool = False) -> bool:
    """Whether a gemv sweep ran to its end: a whole row (every config tried) at each swept M and shape."""
    want = {(m, f"{n}x{k}") for m in gemv_sweep_ms(smoke) for n, k in (shapes[:1] if smoke else shapes)}
    return want <= {(r["M"], r["shape"]) for r in rows if r.get("complete", True)}


def sweep_gemv(args, shapes, weights, randn, bench, mm, progress=None, stop=None):
    """Time a grid of gemv configs at M = 1, 4, 8; report the best next to the default heuristic.
    ``progress(rows)`` after each (M, shape) row, M = 1 on every shape first: a run stopped by its time
    limit keeps what it timed. ``stop()`` true stops it before the next config; the row it cuts keeps
    the configs timed, with ``complete`` false (bench/tune.py then takes no tiles for that M)."""
    out = []
    small = gemv_sweep_ms(args.smoke)
    if args.smoke:
        shapes = shapes[:1]
    for m, (n, k) in itertools.product(small, shapes):
        if stop is not None and stop():
            break
        next_q = weights[(n, k)]  # cycles through the copies: no L2 reuse between calls
        words = next_q().blocksize // 8
        # tiles up to twice the default's accumulator (beyond, the sm_90 build spills), with each code
        # lookup; each distinct tile is a compile (1-3 s), so the grid stays small. At M = 1 a chosen
        # list: the H100's best tiles of the 2026-11-26 sweep (4 and 8 warps) and a few rows of W by most
        # or all of K per program (little or no split-K: no partials and no semaphore round trip, as
        # bitsandbytes' gemv gives each row a warp); at M = 4 and 8 every tile at 4 warps (8 lost by
        # 50-70% there on the H100)
        if m == 1:
            tiles = [(16, 8, 4), (16, 8, 8), (32, 4, 4), (32, 4, 8), (64, 2, 8), (64, 4, 8), (32, 8, 4),
                     (4, 64, 4), (8, 32, 4), (4, 32, 4)]
        else:
            tiles = [(block_n, blocks, 4) for block_n, blocks in itertools.product((16, 32, 64, 128), (2, 4, 8, 16))]
        # every lookup at one range per program; the register decode ("prmt", the fastest in the H100
        # sweep of 2026-11-27: by 1.6-2x at M = 1, by 1.4-1.5x at M = 4, by 1-3% at M = 8) also with the
        # program walking K in steps (GemvConfig.steps: 2-16 ranges, or all of a row's), and the
        # shared-memory lookup ("gather", not timed yet) at a few of those; the other lookups at M = 1
        # only at its first four tiles
        def fits(block_n, blocks):
            return m * block_n * blocks * words <= 2 * mm._GEMV_TILE_VALUES

        grid = [mm.GemvConfig(block_n, blocks, warps, 1, table=table)
                for (block_n, blocks, warps), table in itertools.product(tiles, mm.GEMV_TABLES)
                if fits(block_n, blocks) and (table == "prmt" or m > 1 or (block_n, blocks, warps) in tiles[:4])]
        stepped = ([(16, 8, 4, s, "prmt") for s in (2, 4, 8, 64)] + [(32, 4, 4, s, "prmt") for s in (4, 16)]
                   + [(8, 8, 4, 8, "prmt"), (4, 16, 4, 4, "prmt")]
                   + [(16, 8, 4, 4, "gather"), (16, 8, 4, 8, "gather"), (32, 4, 4, 4, "gather")] if m == 1 else
                   [(16, 4, 4, s, "prmt") for s in (2, 4, 8)] + [(32, 2, 4, 4, "prmt"), (16, 4, 4, 4, "gather")])
        grid += [mm.GemvConfig(block_n, blocks, warps, 1, table=table, steps=s)
                 for block_n, blocks, warps, s, table in stepped if fits(block_n, blocks)]
        if args.smoke:
            grid = grid[:2]
        x = randn(m, k)
        heuristic = mm.heuristic_gemv_config()
        default = bench(lambda: mm.nf4_gemv_forward(x, next_q(), heuristic), m, quick=True)
        q = next_q()
        block_n, blocks = mm.gemv_tile(mm.next_power_of_2(m), q.blocksize, k // q.blocksize)
        # what default_ms ran (bench/tune.py names it): the heuristic's tiles on its code lookup
        default_config = {"block_n": block_n, "blocks": blocks, "num_warps": heuristic.num_warps,
                          "table": heuristic.table, "steps": heuristic.steps}
        timed = []
        best, best_cfg, whole = fastest(lambda cfg: bench(lambda: mm.nf4_gemv_forward(x, next_q(), cfg), m,
                                                          quick=True), grid, timed, stop)
        out.append({"shape": f"{n}x{k}", "M": m, "default_ms": default, "default_config": default_config,
                    "best_ms": best, "best_config": str(best_cfg),
                    "grid": [{"config": {"block_n": c.block_n, "blocks": c.blocks, "num_warps": c.num_warps,
                                         "table": c.table, "steps": c.steps}, "ms": t}
                             for c, t in timed], "complete": whole})
        if progress is not None:
            progress(out)
        if not whole:
            break
    return out


def check_targets(rows, dequant_rows, ms, column: str = "auto") -> list[dict]:
    """The performance targets of issue 3, each met / missed / not measured, with the figures; the NF4
    matmul ones for the ``column`` path ("auto": as dispatched in this run, "tuned": with the thresholds
    bench/tune.py derives from it)."""
    ratio, bnb_ratio = f"{column}/cublas", f"bnb_best/{column}"
    out = []

    def verdict(name, ok, detail):
        out.append({"target": name, "status": "not measured" if ok is None else ("met" if ok else "missed"),
                    "detail": detail})

    nf4_dq = [r for r in dequant_rows if r["impl"] == "nf4_triton" and r.get("of_copy_bw") is not None]
    verdict("dequantize >= 85% of device-to-device copy bandwidth",
            all(r["of_copy_bw"] >= 0.85 for r in nf4_dq) if nf4_dq else None,
            ", ".join(f"{r['shape']}: {r['of_copy_bw']:.0%}" for r in nf4_dq))
    same = [r for r in nf4_dq if r.get("of_same_size_copy")]
    verdict("(for reference, not the issue's target) dequantize >= 85% of a copy moving the same bytes",
            all(r["of_same_size_copy"] >= 0.85 for r in same) if same else None,
            ", ".join(f"{r['shape']}: {r['of_same_size_copy']:.0%}" for r in same))
    for kind in ("fwd", "bwd"):
        big = [r for r in rows if r["dir"] == kind and r["M"] >= 4096 and r.get(ratio)]
        verdict(f"{kind} M >= 4096: NF4 <= 1.05x cuBLAS on the dequantized weight",
                all(r[ratio] <= 1.05 for r in big) if big else None,
                ", ".join(f"{r['shape']} M={r['M']}: {r[ratio]:.3f}x" for r in big))
    small = [r for r in rows if r["dir"] == "fwd" and r["M"] <= 16 and r.get(ratio)]
    verdict("fwd M <= 16: >= 2.5x faster than cuBLAS bf16",
            all(1 / r[ratio] >= 2.5 for r in small) if small else None,
            ", ".join(f"{r['shape']} M={r['M']}: {1 / r[ratio]:.2f}x" for r in small))
    with_bnb = [r for r in small if r.get(bnb_ratio) is not None]
    verdict("fwd M <= 16: faster than bitsandbytes' fastest path",
            all(r[bnb_ratio] > 1 for r in with_bnb) if with_bnb else None,
            ", ".join(f"{r['shape']} M={r['M']}: bnb/bezoar {r[bnb_ratio]:.2f}" for r in with_bnb)
            or "bitsandbytes not measured")
    return out


if __name__ == "__main__":
    sys.exit(main())
