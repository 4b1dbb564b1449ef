"""Per-kernel benchmark of the layer kernels at OpenLLaMA 3B shapes, beside their peers.

Kernels and peers (bf16, 8K and 32K tokens; rows of 2048 for attention):
  rmsnorm, rmsnorm_add, rope, swiglu   Triton vs torch eager (the HF arithmetic)       GB/s
  linear_ce, linear_logprobs           fused chunked Triton vs F.linear on the full
                                       logits + fp32 cross-entropy / log_softmax       TFLOP/s, peak memory
  attention_causal                     Triton flash vs SDPA is_causal (flash/cuDNN)    TFLOP/s
  attention_packed                     Triton flash vs FlexAttention (compiled, with a
                                       document block mask) vs SDPA with a dense mask   TFLOP/s on the useful pairs
  attention_packed_mask                what each packed path derives once per step from
                                       doc_ids: Triton's document bounds, Flex's BlockMask  ms

Modes: ``fwd`` is an inference forward (no_grad); ``fwdbwd`` is a training forward plus the
backward to every input that a LoRA step needs (norm and lm_head weights frozen).
Memory-bound kernels report GB/s of the bytes they must move; attention reports TFLOP/s of
the pairs the mask allows (4 H D per pair forward, 3.5x that forward + backward), so a
kernel that skips masked blocks is credited only with useful work. ``peak MiB`` is the
allocator's peak above the inputs during one call.

The packed-attention rows decide ``BEZOAR_PACKED_ATTENTION`` (triton or flex): the summary
printed at the end names the faster one per token count.

  python bench/kernels.py                      # everything, results JSON + table
  python bench/kernels.py --only 'attention_packed.fwdbwd.*'
  python bench/kernels.py --only attention_packed.fwdbwd.triton.32k --iters 20   # for ncu / nsys
  python bench/kernels.py --tokens 8192        # one token count
  python bench/kernels.py --smoke              # tiny shapes on CPU (Triton interpreter), no results
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab: int
    seq_len: int
    token_counts: tuple


# OpenLLaMA 3B v2
FULL = Shapes(hidden=3200, intermediate=8640, heads=32, head_dim=100, vocab=32000, seq_len=2048,
              token_counts=(8192, 32768))
# the same code path, small enough for the Triton interpreter
SMOKE = Shapes(hidden=32, intermediate=48, heads=2, head_dim=24, vocab=96, seq_len=32, token_counts=(64,))


@dataclass
class Case:
    name: str
    kernel: str
    mode: str  # fwd | fwdbwd
    provider: str
    tokens: int
    build: Callable[[], Callable[[], object]]  # allocates the inputs, returns the call to time
    bytes_moved: float | None = None
    flops: float | None = None


def _tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


# ----------------------------------------------------------------------------- packed rows


def packed_doc_ids(n_rows: int, seq_len: int, seed: int = 0):
    """Document ids (n_rows, seq_len) int32 for rows packed best-fit-decreasing from SFT-like lengths.

    Lengths are log-normal (median 350 tokens, sigma 0.9; clipped to [16, seq_len]), roughly an
    instruction plus response of the OpenBezoar data. Unfilled tails get the padding id -1.
    Returns (doc_ids, stats) with stats on lengths and fill.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    scale = seq_len / 2048
    lengths = []
    while sum(lengths) < n_rows * seq_len * 1.05:
        n = math.exp(math.log(350 * scale) + 0.9 * torch.randn((), generator=gen).item())
        lengths.append(int(min(max(n, 16 * scale, 1), seq_len)))
    rows: list[list[int]] = []
    space: list[int] = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, s in enumerate(space) if s >= n]
        if fits:
            best = min(fits, key=lambda i: space[i])
            rows[best].append(n)
            space[best] -= n
        else:
            rows.append([n])
            space.append(seq_len - n)
    order = sorted(range(len(rows)), key=lambda i: space[i])[:n_rows]  # the fullest rows
    ids = torch.full((n_rows, seq_len), -1, dtype=torch.int32)
    used, docs, pairs = 0, 0, 0
    for r, i in enumerate(order):
        row = rows[i]
        perm = torch.randperm(len(row), generator=gen).tolist()
        pos = 0
        for j, p in enumerate(perm):
            n = row[p]
            ids[r, pos: pos + n] = j
            pos += n
            pairs += n * (n + 1) // 2
        pad = seq_len - pos
        pairs += pad * (pad + 1) // 2  # padding attends within itself too
        used += pos
        docs += len(row)
    stats = {"rows": n_rows, "docs": docs, "mean_doc_len": used / max(docs, 1), "fill": used / (n_rows * seq_len),
             "pairs": pairs, "pairs_vs_causal": pairs / (n_rows * seq_len * (seq_len + 1) / 2)}
    return ids, stats


# ----------------------------------------------------------------------------- building cases


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _timed_call(op, inputs, mode, provider_backend):
    """The call to time: an inference forward, or a training forward plus backward."""
    import torch

    from bezoar_kernels.dispatch import backend

    if mode == "fwd":
        def run():
            with torch.no_grad(), backend(provider_backend):
                return op(*inputs)
        return run

    wrt = [t for t in inputs if torch.is_tensor(t) and t.requires_grad]
    with backend(provider_backend):
        sample = _as_tuple(op(*inputs))
    grads = [torch.randn_like(o) for o in sample]
    del sample

    def run():
        with backend(provider_backend):
            outs = _as_tuple(op(*inputs))
        return torch.autograd.grad(outs, wrt, grads)
    return run


def build_cases(shapes: Shapes, device: str, dtype, smoke: bool) -> list[Case]:
    import torch

    from bezoar_kernels import attention as attn
    from bezoar_kernels import cross_entropy as ce
    from bezoar_kernels.rmsnorm import rms_norm, rms_norm_add, rms_norm_add_reference, rms_norm_reference
    from bezoar_kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
    from bezoar_kernels.swiglu import swiglu, swiglu_reference

    C, inter, H, D, V, T = (shapes.hidden, shapes.intermediate, shapes.heads, shapes.head_dim, shapes.vocab,
                            shapes.seq_len)
    esize = torch.empty((), dtype=dtype).element_size()
    eps = 1e-6
    cases: list[Case] = []

    def rand(*shape, grad=False, scale=1.0):
        t = torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
        return t.requires_grad_(grad)

    def add(kernel, mode, provider, tokens, build, bytes_moved=None, flops=None):
        name = f"{kernel}.{mode}.{provider}.{_tokens_label(tokens)}"
        cases.append(Case(name, kernel, mode, provider, tokens, build, bytes_moved, flops))

    def both(provider):
        return "triton" if provider == "triton" else "torch"

    for N in shapes.token_counts:
        B = N // T
        for mode in ("fwd", "fwdbwd"):
            # RMSNorm: fwd reads x, writes y; bwd reads dy, x, writes dx (weight frozen)
            for provider, op in (("triton", rms_norm), ("torch", rms_norm_reference)):
                def build(op=op, provider=provider, mode=mode, N=N):
                    x, w = rand(N, C, grad=mode == "fwdbwd"), rand(C, scale=0.1).add_(1)
                    return _timed_call(lambda x: op(x, w, eps), [x], mode, both(provider))
                add("rmsnorm", mode, provider, N, build, bytes_moved=(2 if mode == "fwd" else 5) * N * C * esize)

            # residual add + RMSNorm: fwd reads x, r, writes y, s; bwd reads dy, ds, s, writes dx
            for provider, op in (("triton", rms_norm_add), ("torch", rms_norm_add_reference)):
                def build(op=op, provider=provider, mode=mode, N=N):
                    g = mode == "fwdbwd"
                    x, r, w = rand(N, C, grad=g), rand(N, C, grad=g), rand(C, scale=0.1).add_(1)
                    return _timed_call(lambda x, r: op(x, r, w, eps), [x, r], mode, both(provider))
                add("rmsnorm_add", mode, provider, N, build, bytes_moved=(4 if mode == "fwd" else 8) * N * C * esize)

            # RoPE on q and k (B, T, H, D): fwd reads and writes both; bwd the same again
            for provider, op in (("triton", apply_rope), ("torch", apply_rope_reference)):
                def build(op=op, provider=provider, mode=mode, B=B):
                    g = mode == "fwdbwd"
                    q, k = rand(B, T, H, D, grad=g), rand(B, T, H, D, grad=g)
                    pos = torch.arange(T, device=device).repeat(B, 1)
                    cos, sin = rope_cos_sin(pos, D, 10000.0)
                    return _timed_call(lambda q, k: op(q, k, cos, sin), [q, k], mode, both(provider))
                add("rope", mode, provider, N, build, bytes_moved=(4 if mode == "fwd" else 8) * N * H * D * esize)

            # SwiGLU: fwd reads gate, up, writes out; bwd reads dout, gate, up, writes dgate, dup
            for provider, op in (("triton", swiglu), ("torch", swiglu_reference)):
                def build(op=op, provider=provider, mode=mode, N=N):
                    g = mode == "fwdbwd"
                    gate, up = rand(N, inter, grad=g, scale=2.0), rand(N, inter, grad=g)
                    return _timed_call(op, [gate, up], mode, both(provider))
                add("swiglu", mode, provider, N, build, bytes_moved=(3 if mode == "fwd" else 8) * N * inter * esize)

            # linear + cross-entropy / log-probs over the vocabulary (lm_head frozen, as in QLoRA)
            ce_flops = (2 if mode == "fwd" else 4) * N * V * C
            for provider, op in (("triton", ce.linear_cross_entropy), ("torch", ce.linear_cross_entropy_reference)):
                def build(op=op, provider=provider, mode=mode, N=N):
                    h, w = rand(N, C, grad=mode == "fwdbwd"), rand(V, C, scale=C ** -0.5)
                    labels = torch.randint(0, V, (N,), device=device)
                    labels[::7] = -100
                    return _timed_call(lambda h: op(h, w, labels, -100, "mean"), [h], mode, both(provider))
                add("linear_ce", mode, provider, N, build, flops=ce_flops)
            for provider, op in (("triton", ce.linear_token_logprobs), ("torch", ce.linear_token_logprobs_reference)):
                def build(op=op, provider=provider, mode=mode, N=N):
                    h, w = rand(N, C, grad=mode == "fwdbwd"), rand(V, C, scale=C ** -0.5)
                    labels = torch.randint(0, V, (N,), device=device)
                    labels[::7] = -100
                    return _timed_call(lambda h: op(h, w, labels, -100), [h], mode, both(provider))
                add("linear_logprobs", mode, provider, N, build, flops=ce_flops)

            # attention, unpacked causal rows and packed rows of documents
            flop_factor = 1.0 if mode == "fwd" else 3.5
            causal_pairs = B * T * (T + 1) // 2
            causal_ops = [("triton", lambda q, k, v: attn.flash_attention(q, k, v, None)),
                          ("sdpa", lambda q, k, v: attn.sdpa_causal(q, k, v))]
            for provider, op in causal_ops:
                def build(op=op, mode=mode, B=B):
                    g = mode == "fwdbwd"
                    q, k, v = rand(B, T, H, D, grad=g), rand(B, T, H, D, grad=g), rand(B, T, H, D, grad=g)
                    return _timed_call(op, [q, k, v], mode, "triton")
                add("attention_causal", mode, provider, N, build, flops=flop_factor * 4 * H * D * causal_pairs)

            docs, stats = packed_doc_ids(B, T, seed=N)
            docs = docs.to(device)
            packed_ops = [  # docs bound now: the cases are built later, after this loop moved on
                ("triton", lambda q, k, v, docs=docs: attn.flash_attention(q, k, v, docs)),
                ("flex", lambda q, k, v, docs=docs: attn.flex_attention_packed(q, k, v, docs, compiled=not smoke)),
                ("sdpa_mask", lambda q, k, v, docs=docs: attn.attention_reference(q, k, v, docs)),
            ]
            if mode == "fwd":
                # once per step (cached per doc_ids tensor): the masks' own cost, apart from the layers
                mask_ops = [("triton", lambda docs=docs: attn.document_bounds(docs)),
                            ("flex", lambda docs=docs: attn.flex_document_block_mask(docs, compiled=not smoke))]
                for provider, op in mask_ops:
                    add("attention_packed_mask", mode, provider, N, lambda op=op: op)
            for provider, op in packed_ops:
                if provider == "flex" and mode == "fwdbwd" and device == "cpu":
                    continue  # FlexAttention has no backward on CPU
                def build(op=op, mode=mode, B=B):
                    g = mode == "fwdbwd"
                    q, k, v = rand(B, T, H, D, grad=g), rand(B, T, H, D, grad=g), rand(B, T, H, D, grad=g)
                    return _timed_call(op, [q, k, v], mode, "triton")
                add("attention_packed", mode, provider, N, build, flops=flop_factor * 4 * H * D * stats["pairs"])
    return cases


# ----------------------------------------------------------------------------- measuring


def measure(case: Case, smoke: bool, profiling: bool = False) -> dict:
    import torch

    row = {"name": case.name, "kernel": case.kernel, "mode": case.mode, "provider": case.provider,
           "tokens": case.tokens}
    if not smoke:
        torch.cuda.empty_cache()
    fn = case.build()
    if smoke:
        # one call: the code path is what is checked here, and the interpreter is slow
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
    else:
        fn()  # compile / autotune / warm up outside the timed region
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        # under the profiler fewer repeats keep the trace readable
        ms = common.bench_ms(fn, warmup=5, rep=20) if profiling else common.bench_ms(fn)
    row["ms"] = ms
    if case.bytes_moved:
        row["gbps"] = case.bytes_moved / (ms * 1e-3) / 1e9
    if case.flops:
        row["tflops"] = case.flops / (ms * 1e-3) / 1e12
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = the torch-side peer's time / this time, for the same kernel, mode and tokens."""
    peers = {"torch": "torch", "sdpa": "sdpa", "sdpa_mask": "sdpa_mask"}
    by_key = {(r["kernel"], r["mode"], r["tokens"], r["provider"]): r for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        for peer in peers:
            other = by_key.get((r["kernel"], r["mode"], r["tokens"], peer))
            if other is not None:
                r["speedup_vs_" + peer] = other["ms"] / r["ms"]


def packed_attention_choice(rows: list[dict]) -> dict:
    choice = {}
    for r in rows:
        if r["kernel"] != "attention_packed" or r["mode"] != "fwdbwd" or "ms" not in r:
            continue
        if r["provider"] not in ("triton", "flex"):
            continue
        best = choice.get(r["tokens"])
        if best is None or r["ms"] < best["ms"]:
            choice[r["tokens"]] = {"provider": r["provider"], "ms": r["ms"]}
    return {_tokens_label(t): c for t, c in sorted(choice.items())}


def main(argv=None) -> int:
    p = common.parser("Layer kernels (RMSNorm, RoPE, SwiGLU, linear+CE, attention) against their peers")
    p.add_argument("--tokens", metavar="N[,N]", help="token counts to run (default 8192,32768; multiples of 2048)")
    args = p.parse_args(argv)
    common.setup_smoke(args)

    import torch

    if args.smoke:
        shapes, device, dtype = SMOKE, "cpu", torch.float32  # the interpreter's bf16 tl.dot is wrong
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA GPU (use --smoke for the CPU code path check)")
        shapes, device, dtype = FULL, "cuda", torch.bfloat16
    if args.tokens:
        try:
            counts = tuple(int(t) for t in args.tokens.split(","))
        except ValueError:
            p.error(f"--tokens {args.tokens!r}: expected comma-separated integers")
        if any(n <= 0 or n % shapes.seq_len for n in counts):
            p.error(f"--tokens {args.tokens!r}: each count must be a positive multiple of {shapes.seq_len}")
        shapes = dataclasses.replace(shapes, token_counts=counts)
    torch.manual_seed(0)

    cases = build_cases(shapes, device, dtype, args.smoke)
    if args.only:
        selected = [c for c in cases if fnmatch.fnmatchcase(c.name, args.only)]
        if not selected:
            names = "\n  ".join(c.name for c in cases)
            p.error(f"--only {args.only!r} matches no case; cases are:\n  {names}")
        cases = selected

    if args.only and args.iters:
        for case in cases:
            fn = case.build()
            fn()
            common.run_plain(fn, args.iters)
            print(f"{case.name}: ran {args.iters} times")
        return 0

    rows = []
    with common.maybe_profile(args.profile):
        for case in cases:
            try:
                rows.append(measure(case, args.smoke, profiling=bool(args.profile)))
            except Exception as exc:  # an OOM or a peer that does not compile: report it, go on
                if args.smoke:
                    raise
                rows.append({"name": case.name, "kernel": case.kernel, "mode": case.mode,
                             "provider": case.provider, "tokens": case.tokens,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
                torch.cuda.empty_cache()
            print(f"  {rows[-1]['name']}: " + (f"{rows[-1]['ms']:.4g} ms" if "ms" in rows[-1] else rows[-1]["error"]),
                  flush=True)

    add_speedups(rows)
    columns = ["name", "ms", "gbps", "tflops", "peak_mib", "speedup_vs_torch", "speedup_vs_sdpa",
               "speedup_vs_sdpa_mask", "error"]
    print(common.markdown_table(rows, columns))
    choice = packed_attention_choice(rows)
    for tokens, c in choice.items():
        print(f"packed attention fwd+bwd at {tokens} tokens: fastest is {c['provider']} ({c['ms']:.4g} ms)"
              f" -> BEZOAR_PACKED_ATTENTION={c['provider']}")
    docs_stats = {_tokens_label(n): packed_doc_ids(n // shapes.seq_len, shapes.seq_len, seed=n)[1]
                  for n in shapes.token_counts}
    common.write_results("kernels", rows, args, extra={
        "shapes": shapes.__dict__, "dtype": str(dtype), "packed_docs": docs_stats,
        "packed_attention_choice": choice,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
