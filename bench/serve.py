"""Serving a stream of requests: continuous batching against whole batches, on the same model and trace.

A seeded trace of ``--requests`` greedy requests: prompt lengths uniform in ``--prompt-len`` (A,B), and
``max_tokens`` long-tailed (lognormal around ``--median-tokens``, clipped to ``--max-tokens``), EOS off so
each request decodes exactly its ``max_tokens``. Two arrival patterns: ``offline`` (every request waits at
the start: throughput) and ``online`` (a Poisson process at ``--rate`` requests a second: latency). Two
schedulers serve it in one thread, in process (no HTTP, which is the same for both):

* ``continuous``: ``bezoar.model.decode.ContinuousBatch`` with ``--rows`` rows, as ``bezoar.serve`` runs
  since 2026-11-28: arrivals take free rows at the next step (as many as fit ``--prefill-tokens``
  left-padded tokens, the server's ``--max-prefill-tokens``), a row leaves when its request ends.
* ``batched``: the server before it: the requests waiting when the model is free (at most ``--rows``)
  form a batch, ``Decoder.generate_ids`` (padded to a power of two of rows, as the server's decoder was)
  decodes it until its longest row ends, each row answered when it ends (``on_done``); requests arriving
  meanwhile wait for the next batch.

Per scheduler and pattern: the makespan, output tokens a second, latency (arrival to last token) and time
to first token (mean, p50, p90, p99), steps, and how many requests got the same tokens from both (on a GPU
a row's bf16 logits depend on which rows share its matmuls, so a near tie can go either way; on the CPU in
fp32 all agree). Each scheduler is one object for the whole run and serves the trace once untimed first
(its CUDA graphs captured, kernels tuned), unless ``--no-warmup``. Decode steps run as the server runs them (``--decode``, default ``auto``: CUDA
graphs on a GPU; static steps on the CPU).

    python bench/serve.py                          # GPU: random OpenLLaMA 3B NF4 weights, writes results
    python bench/serve.py --preset demo --requests 64 --rows 8   # CPU, dense fp32: writes serve-cpu-*.json
    python bench/serve.py --smoke                  # tiny model on CPU, checks the code path, writes nothing
    python bench/serve.py --only offline/continuous --iters 2   # one case, untimed, for nsys / ncu
"""

from __future__ import annotations

import functools
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from bezoar.model.decode import MAX_PREFILL_TOKENS  # noqa: E402


@dataclass
class Request:
    arrival: float  # seconds after the start
    prompt: list[int]
    max_tokens: int
    first: float | None = None  # when its first token was known
    done: float | None = None  # when its last token was known
    tokens: list[int] = field(default_factory=list)


def make_trace(n: int, vocab: int, prompt_len: tuple[int, int], median_tokens: int, max_tokens: int,
               rate: float, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival, prompt, max_tokens) per request; arrival 0 for all when ``rate`` is 0."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        if rate > 0:
            t += rng.expovariate(rate)
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_len) - 1)]
        tokens = int(min(max_tokens, max(1, round(rng.lognormvariate(math.log(median_tokens), 0.9)))))
        out.append((t, prompt, tokens))
    return out


def _requests(trace) -> list[Request]:
    return [Request(a, list(p), m) for a, p, m in trace]


def _arrivals(requests: list[Request], start: float, taken: int) -> int:
    """How many requests have arrived by now (``taken`` of them already handed on)."""
    now = time.perf_counter() - start
    while taken < len(requests) and requests[taken].arrival <= now:
        taken += 1
    return taken


def _wait_for(requests: list[Request], start: float, taken: int) -> None:
    if taken < len(requests):
        time.sleep(max(0.0, requests[taken].arrival - (time.perf_counter() - start)))


def serve_continuous(batch, requests: list[Request], sync, prefill_tokens: int | None = None) -> int:
    """Serve ``requests`` through ``batch`` (a ``ContinuousBatch``), each admit taking the arrivals that fit
    ``prefill_tokens`` (``prefill_take``, as the server); the decode steps it ran."""
    from bezoar.model.decode import Sequence, prefill_take

    steps_before = batch.steps
    start = time.perf_counter()
    arrived = taken = 0

    def first_token(req, new):
        if len(new) == 1:
            req.first = time.perf_counter() - start
        return False

    def finished(seq):
        seq.tag.done = time.perf_counter() - start
        seq.tag.tokens = list(seq.new_ids)

    while taken < len(requests) or batch.running:
        arrived = _arrivals(requests, start, arrived)
        new = requests[taken:taken + prefill_take([len(r.prompt) for r in requests[taken:arrived]], batch.free,
                                                  prefill_tokens)]
        if new:
            batch.admit([Sequence(r.prompt, r.max_tokens, should_stop=lambda ids, r=r: first_token(r, ids),
                                  on_done=finished, tag=r) for r in new])
            taken += len(new)
        if batch.running:
            batch.step()
        else:
            _wait_for(requests, start, taken)
    sync()
    return batch.steps - steps_before


def serve_batched(decoder, requests: list[Request], sync) -> int:
    """Serve ``requests`` in whole batches of at most ``decoder.pad_batch`` rows through ``decoder`` (a
    ``Decoder``); the decode steps they ran."""
    from bezoar.model.decode import left_pad

    rows = decoder.pad_batch
    start = time.perf_counter()
    arrived = taken = steps = 0
    while taken < len(requests):
        arrived = _arrivals(requests, start, arrived)
        if arrived == taken:
            _wait_for(requests, start, taken)
            continue
        group = requests[taken:min(arrived, taken + rows)]
        taken += len(group)
        ids, mask = left_pad([r.prompt for r in group], 0)

        def should_stop(row, new, group=group):
            if len(new) == 1:
                group[row].first = time.perf_counter() - start
            return len(new) >= group[row].max_tokens

        def on_done(row, new, why, group=group):
            group[row].done = time.perf_counter() - start
            group[row].tokens = list(new)

        out, _ = decoder.generate_ids(ids, mask, max_new_tokens=max(r.max_tokens for r in group), eos_id=None,
                                      should_stop=should_stop, on_done=on_done)
        steps += max(len(t) for t in out) - 1
        now = time.perf_counter() - start
        for r, new in zip(group, out):
            if r.done is None:
                r.done, r.tokens = now, list(new)
    sync()
    return steps


def _quantiles(values: list[float]) -> dict:
    s = sorted(values)

    def q(p):
        return s[min(len(s) - 1, int(p * len(s)))]

    return {"mean": sum(s) / len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def summarize(requests: list[Request], steps: int) -> dict:
    makespan = max(r.done for r in requests)
    tokens = sum(len(r.tokens) for r in requests)
    return {"makespan_s": makespan, "tokens": tokens, "tokens_per_s": tokens / makespan, "steps": steps,
            "latency_s": _quantiles([r.done - r.arrival for r in requests]),
            "ttft_s": _quantiles([r.first - r.arrival for r in requests])}


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--preset", default=None, help="model shape (default: open_llama_3b_v2 on a GPU; demo on the CPU)")
    p.add_argument("--quant", choices=["nf4", "none"], default=None,
                   help="NF4 decoder linears (default on a GPU) or dense weights (default on the CPU)")
    p.add_argument("--requests", type=int, default=256, help="requests in the trace (default 256)")
    p.add_argument("--rows", type=int, default=32, help="rows decoded at once, --max-batch-size (default 32)")
    p.add_argument("--prompt-len", default="16,256", help="prompt lengths, uniform in A,B (default 16,256)")
    p.add_argument("--median-tokens", type=int, default=64, help="median max_tokens (default 64)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens (default 512)")
    p.add_argument("--rate", type=float, default=8.0, help="online arrivals a second (default 8)")
    p.add_argument("--patterns", default="offline,online", help="offline, online or both (default both)")
    p.add_argument("--decode", default="auto", help="decode mode, as bezoar.serve's --decode (default auto)")
    p.add_argument("--prefill-tokens", type=int, default=MAX_PREFILL_TOKENS,
                   help=f"left-padded prompt tokens one continuous admit takes, as bezoar.serve's "
                   f"--max-prefill-tokens (default {MAX_PREFILL_TOKENS}; 0: no bound)")
    p.add_argument("--no-warmup", action="store_true", help="time the first pass (graph captures included)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_smoke(args)
    import torch

    from bezoar.model.config import preset

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = "tiny" if args.smoke else (args.preset or ("open_llama_3b_v2" if cuda else "demo"))
    quant = args.quant or ("nf4" if cuda else "none")
    config = preset(name)
    lo, hi = (int(v) for v in args.prompt_len.split(","))
    n, rows, median, longest, rate = args.requests, args.rows, args.median_tokens, args.max_tokens, args.rate
    if args.smoke:
        n, rows, lo, hi, median, longest, rate = 12, 4, 3, 12, 6, 20, 200.0
    longest = min(longest, config.max_position_embeddings - hi)
    t0 = time.perf_counter()
    if quant == "nf4":
        import step as step_bench

        model = step_bench.build_bezoar(config, args.seed, device, dtype).eval()
    else:
        model = common.random_llama(config, device, dtype, args.seed)
    print(f"built a random {name} model ({quant}, {dtype}) on {device} in {time.perf_counter() - t0:.1f}s",
          flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from bezoar.model.decode import ContinuousBatch, Decoder

    # one of each for the whole run: the untimed pass captures the CUDA graphs the timed pass replays
    prefill_tokens = args.prefill_tokens or None
    schedulers = {"continuous": (functools.partial(serve_continuous, prefill_tokens=prefill_tokens),
                                 ContinuousBatch(model, rows, args.decode)),
                  "batched": (serve_batched, Decoder(model, args.decode, pad_batch=rows))}
    patterns = args.patterns.split(",")
    traces = {pattern: make_trace(n, config.vocab_size, (lo, hi), median, longest,
                                  rate if pattern == "online" else 0.0, args.seed) for pattern in patterns}
    if args.only:  # one case, for a profiler: PATTERN/SCHEDULER
        pattern, _, label = args.only.partition("/")
        if pattern not in traces or label not in schedulers:
            names = ", ".join(f"{p}/{s}" for p in patterns for s in schedulers)
            print(f"bench/serve.py: no such case {args.only!r} (cases: {names})", file=sys.stderr)
            return 2
        serve, scheduler = schedulers[label]
        runs = max(1, args.iters)
        with common.maybe_profile(args.profile):
            for _ in range(runs):
                steps = serve(scheduler, _requests(traces[pattern]), sync)
        print(f"ran {args.only} {runs} times ({steps} steps each)")
        return 0
    rows_out = []
    for pattern in patterns:
        trace = traces[pattern]
        served = {}
        for label, (serve, scheduler) in schedulers.items():
            if not args.no_warmup:
                serve(scheduler, _requests(trace), sync)
            requests = _requests(trace)
            with common.maybe_profile(args.profile and str(Path(args.profile) / f"{pattern}-{label}")):
                steps = serve(scheduler, requests, sync)
            served[label] = requests
            row = {"pattern": pattern, "scheduler": label, **summarize(requests, steps)}
            rows_out.append(row)
            print(f"{pattern:8s} {label:10s} {row['makespan_s']:8.2f} s  {row['tokens_per_s']:9.1f} tok/s  "
                  f"latency mean {row['latency_s']['mean']:.2f} s p90 {row['latency_s']['p90']:.2f} s  "
                  f"ttft mean {row['ttft_s']['mean']:.3f} s p90 {row['ttft_s']['p90']:.3f} s  steps {steps}",
                  flush=True)
        same = sum(a.tokens == b.tokens for a, b in zip(served["continuous"], served["batched"]))
        for row in rows_out[-2:]:
            row["same_tokens"] = same
        cont, bat = rows_out[-2], rows_out[-1]
        print(f"{pattern}: continuous / batched throughput {cont['tokens_per_s'] / bat['tokens_per_s']:.2f}x, "
              f"mean latency {bat['latency_s']['mean'] / cont['latency_s']['mean']:.2f}x lower; "
              f"{same} of {n} requests got the same tokens from both", flush=True)
        if args.smoke and same != n:
            print("smoke: the two schedulers disagree on fp32 CPU tokens", file=sys.stderr)
            return 1
        common.write_results("serve", rows_out, args, {
            "model": name, "quant": quant, "dtype": str(dtype).replace("torch.", ""), "requests": n, "rows": rows,
            "prompt_len": [lo, hi], "median_tokens": median, "max_tokens": longest, "rate": rate,
            "decode": args.decode, "prefill_tokens": prefill_tokens, "warmup": not args.no_warmup,
            "complete": pattern == patterns[-1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
