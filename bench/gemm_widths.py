"""cuBLAS on the wide GEMMs of the LoRA concat and merged paths, by the width of their extra block.

Both paths ride the LoRA terms inside the base GEMM by widening one of its dimensions by a block of
P * r16 columns (r rounded up to 16, P projections): 16 for one projection at r = 16, 48 for q/k/v,
64 at r = 64. The GEMM does 0.5% more arithmetic for 16 extra columns on 3200, yet the breakdowns
(``bench/lora.py --breakdown``) showed cuBLAS picking other kernels for the widened shapes and taking
2-6% longer. This times each widened GEMM against the plain one, with the kernel cuBLAS ran:

  rows   y = x (M, K) @ W' (N + e, K).T       the merged forward (A's rows under W')
  cols   dx = dy (M, N) @ W' (N, K + e)       the merged and concat backward (s B beside W)
  inner  y = [x | xa] (M, K + e) @ [W | s B] (N, K + e).T   the concat forward

Each case is timed in CUDA-graph replay (GPU time), in rounds that go through every width before the
next round, keeping each width's fastest round (clock drift between rounds reads as noise, not as a
width's cost). Writes gemm-widths-<device>-<date>.json: rows of shape, M, kind, extra, ms, over_plain
(the time over the plain GEMM's, extra 0) and the kernel.

  python bench/gemm_widths.py                          # 3200x3200, 8640x3200, 3200x8640; M = 16384, 4096
  python bench/gemm_widths.py --extras 0,16,48,64,128 --rounds 3
  python bench/gemm_widths.py --only cols/3200x3200/M=16384/+16 --iters 50   # one case, for ncu / nsys
  python bench/gemm_widths.py --smoke                  # tiny shapes on CPU, writes nothing
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

KINDS = ("rows", "cols", "inner")


def operands(kind: str, m: int, n: int, k: int, e: int, randn):
    """(a, b, what the timed call computes) for ``kind`` widened by ``e``."""
    import torch

    if kind == "rows":
        x, w = randn(m, k), randn(n + e, k)
        return lambda: torch.matmul(x, w.t())
    if kind == "cols":
        dy, w = randn(m, n), randn(n, k + e)
        return lambda: torch.matmul(dy, w)
    if kind == "inner":
        xw, ww = randn(m, k + e), randn(n, k + e)
        return lambda: torch.matmul(xw, ww.t())
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="3200x3200,8640x3200,3200x8640", help="NxK of the base weights")
    p.add_argument("--ms", default="16384,4096", help="rows M")
    p.add_argument("--extras", default="0,16,48,64,128", help="widths of the extra block (0: the plain GEMM)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"which GEMMs ({', '.join(KINDS)})")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds over every width")
    p.add_argument("--budget", type=float, default=0.0, help="seconds; stop starting cases after it (0: none)")
    args = p.parse_args(argv)
    common.setup_smoke(args)
    import torch

    started = time.perf_counter()
    shapes = common.int_pairs(args.shapes, "--shapes", p)
    try:
        ms = [int(v) for v in args.ms.split(",")]
        extras = [int(v) for v in args.extras.split(",")]
    except ValueError:
        p.error(f"--ms {args.ms!r} / --extras {args.extras!r}: expected whole numbers, comma-separated")
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind not in KINDS:
            p.error(f"--kinds: no kind {kind!r} (kinds: {', '.join(KINDS)})")
    if 0 not in extras:
        extras = [0] + extras
    if args.smoke:
        shapes, ms, extras = [(48, 64)], [32], [0, 16]
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(dtype)

    def timer(fn):
        return common.bench_ms(fn, smoke=True) if args.smoke else common.graph_ms(fn)

    rows, cut = [], False
    for (n, k) in shapes:
        for m in ms:
            for kind in kinds:
                if args.budget and time.perf_counter() - started > args.budget:
                    cut = True
                    break
                names = {e: f"{kind}/{n}x{k}/M={m}/+{e}" for e in extras}
                if args.only:
                    wanted = [e for e in extras if names[e] == args.only]
                    if not wanted:
                        continue
                    fn = operands(kind, m, n, k, wanted[0], randn)
                    if args.iters:
                        common.run_plain(fn, args.iters)
                        print(f"{args.only}: ran {args.iters} times")
                    else:
                        print(f"{args.only}: {timer(fn) * 1e3:.1f} us")
                    return 0
                calls = {e: operands(kind, m, n, k, e, randn) for e in extras}
                best = {e: float("inf") for e in extras}
                for _ in range(max(1, args.rounds)):  # each round goes through every width in turn
                    for e in extras:
                        best[e] = min(best[e], timer(calls[e]))
                for e in extras:
                    kernels, _ = common.profile_kernels(calls[e], 2, cuda=device == "cuda")
                    rows.append({"shape": f"{n}x{k}", "M": m, "kind": kind, "extra": e, "ms": best[e],
                                 "over_plain": best[e] / best[0], "kernel": kernels[0]["kernel"] if kernels else None})
                    print(f"{kind} {n}x{k} M={m} +{e}: {best[e] * 1e3:.1f} us, {best[e] / best[0]:.3f}x plain"
                          f" ({rows[-1]['kernel']})", flush=True)
                del calls
    if args.only:
        print(f"no case {args.only!r} (names: kind/NxK/M=m/+extra, e.g. cols/3200x3200/M=16384/+16)", file=sys.stderr)
        return 2
    print()
    print(common.markdown_table(rows, ["shape", "M", "kind", "extra", "ms", "over_plain", "kernel"]))
    if cut:
        print(f"note: --budget {args.budget:g} s reached; the cases after it were not timed")
    path = common.write_results("gemm-widths", rows, args, {"dtype": str(dtype), "rounds": args.rounds,
                                                            "cut_by_budget": cut})
    if path:
        print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
