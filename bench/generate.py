"""Decode speed of bezoar's NF4 model against transformers + bitsandbytes 4-bit ``generate``.

OpenLLaMA 3B shapes (``bezoar.model.config.preset("open_llama_3b_v2")``) with random weights:
one checkpoint is written once (bf16 safetensors in a temporary folder, or ``--model DIR`` to
use a real one) and loaded by both sides as NF4 with double quantization and bf16 compute:

* bezoar: ``bezoar.model.load(quant="nf4")`` + ``generate_ids`` (KV cache, greedy) through one
  ``Decoder`` per case, so the CUDA graphs captured in the first (untimed) calls are replayed after:
  ``bezoar`` with the default decode (``auto``: CUDA graphs) and the NF4 paths ``auto`` picks,
  ``bezoar-eager`` with the eager loop (one forward call per token, as before graphs), and for
  batches of at most 8 above ``GEMV_MAX_M`` ``bezoar-gemv``: graphs with the gemv kernel on for
  the decode steps (``BEZOAR_NF4_GEMV_MAX_M=8``), and ``bezoar-attn``: graphs with the Triton
  decode-attention kernel named (``BEZOAR_DECODE_ATTENTION=triton``, the default since 2026-11-27),
  and ``bezoar-sdpa``: graphs with SDPA's decode attention instead (``BEZOAR_DECODE_ATTENTION=sdpa``);
* peer: ``transformers`` ``from_pretrained(quantization_config=BitsAndBytesConfig(nf4, double
  quant))`` + ``generate(do_sample=False)`` with ``min_new_tokens`` so both always decode the
  same number of tokens (EOS cannot end a row early).

For each batch size (default 1 and 32, in the order given; in each, bezoar's default and the peer
before the variants) it times a prefill (one forward over the prompts) with ``triton.testing.do_bench``
(median after warm-up) and a full generation (prefill + N decode steps) by wall clock
(``common.wall_ms``: one warm-up call, then the median of three, or one call where the warm-up took
over 2 s), rewrites the results after each case (``complete`` false until the last), and reports
decode tokens/s = batch * N / (generation - prefill), end-to-end tokens/s, and bezoar's speed-up
over the peer (the issue's target: >= 2x at batch 1). The peer is skipped, with a note in the
results, when transformers or bitsandbytes does not import.

    python bench/generate.py                       # GPU: writes bench/results/generate-<device>-<date>.json
    python bench/generate.py --smoke               # tiny model on CPU, same code path, writes nothing
    python bench/generate.py --only bezoar/b1 --iters 3   # one case, for nsys / ncu
    python bench/generate.py --breakdown 32        # where a decode step's GPU time goes, per kernel

``--breakdown N`` times nothing against the peer: it builds random 3B NF4 weights in memory (no
checkpoint written), decodes N tokens at batch 1 with static steps (the same kernels a graph replays)
under ``torch.profiler``: with the gemv and fused kernels off (dequantize + cuBLAS) and SDPA, with the
gemv kernel on for every M it takes and SDPA, and the same with the Triton decode-attention kernel; it
prints the kernels by GPU time per step (the 8-token prefill is one of the N forwards counted) and
writes ``generate-breakdown-<device>-<date>.json`` (not in smoke runs).
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def timing_order(cases: dict, batches: list[int]) -> dict:
    """``cases`` in the order they are timed: batch by batch as ``--batches`` lists them (a time limit cuts
    the last ones), and in each batch bezoar's default and the peer (the target's two cases) before the
    variants, each group in the order it was added."""
    return dict(sorted(cases.items(), key=lambda item: (batches.index(item[1][1]),
                                                        item[1][0] not in ("bezoar", "transformers-bnb"))))


def parse_args(argv=None):
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", metavar="DIR", help="a real checkpoint folder instead of random 3B weights")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per row (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per row (default 128)")
    p.add_argument("--no-peer", action="store_true", help="skip transformers + bitsandbytes")
    p.add_argument("--keep", metavar="DIR", help="write the random checkpoint here and keep it")
    p.add_argument("--breakdown", type=int, default=0, metavar="N",
                   help="only profile N static decode steps at batch 1 and print GPU time per kernel (see above)")
    return p.parse_args(argv)


environ = common.environ


def gemv_max_m(value: int):
    """BEZOAR_NF4_GEMV_MAX_M set to ``value`` for the block, restored after."""
    return environ(BEZOAR_NF4_GEMV_MAX_M=value)


def sdpa_attention():
    """SDPA for one-token steps (BEZOAR_DECODE_ATTENTION=sdpa) instead of the default Triton kernel."""
    return environ(BEZOAR_DECODE_ATTENTION="sdpa")


def decode_attention_on():
    """The Triton decode-attention kernel for one-token steps (BEZOAR_DECODE_ATTENTION=triton)."""
    return environ(BEZOAR_DECODE_ATTENTION="triton")


def gemv_on():
    """The gemv kernel on for every M it takes, whatever GEMV_MAX_M says."""
    from bezoar_kernels import nf4_matmul as mm

    return gemv_max_m(mm.GEMV_MAX_ROWS)


def gemv_off():
    """The gemv and fused kernels off: every M dequantizes and multiplies with cuBLAS."""
    return environ(BEZOAR_NF4_GEMV_MAX_M=0, BEZOAR_NF4_FUSED_MAX_M=0)


def same_prefix(a, b) -> int:
    """How many leading tokens two (1, T) token tensors share."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0, 0]) if differ.numel() else int(a.shape[1])


def breakdown(args, device, dtype) -> int:
    """Profile ``args.breakdown`` static decode steps at batch 1; print the kernels by time per step."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    import step as step_bench
    from bezoar.model import generate_ids
    from bezoar.model.config import preset
    from bezoar.model.decode import Decoder

    cuda = device.type == "cuda"
    steps = args.breakdown
    config = preset("tiny" if args.smoke else "open_llama_3b_v2")
    t0 = time.perf_counter()
    model = step_bench.build_bezoar(config, 0, device, dtype).eval()
    print(f"built random {config.num_hidden_layers}-layer NF4 weights in {time.perf_counter() - t0:.1f}s")
    ids = torch.randint(3, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # the first two with SDPA (the decode attention before 2026-11-27); the last two differ in the attention
    # only (the H100 run of 2026-11-27 ran the last with the default NF4 paths, which mixed in the prefill's)
    modes = (("dequant + cuBLAS", (gemv_off, sdpa_attention)), ("gemv kernel", (gemv_on, sdpa_attention)),
             ("Triton decode attention", (gemv_on, decode_attention_on)))
    results = []
    for label, settings in modes:
        with contextlib.ExitStack() as stack:
            for setting in settings:
                stack.enter_context(setting())
            env = {name: os.environ.get(name) for name in
                   ("BEZOAR_NF4_GEMV_MAX_M", "BEZOAR_NF4_FUSED_MAX_M", "BEZOAR_DECODE_ATTENTION")}
            decoder = Decoder(model, "static")

            def run():
                out = generate_ids(model, ids, torch.ones_like(ids), max_new_tokens=steps, eos_id=None,
                                   decoder=decoder)
                if cuda:
                    torch.cuda.synchronize()
                return out

            run()  # compiles and tunes outside the profile
            t0 = time.perf_counter()
            run()
            wall_ms = (time.perf_counter() - t0) * 1e3
            with profile(activities=activities) as prof:
                run()
        rows, total = common.kernel_rows(prof, steps)
        where = "GPU" if cuda else "CPU (smoke: operator self time)"
        print(f"\n{label}: {steps} forwards at batch 1 (an 8-token prefill, then static steps): {wall_ms / steps:.3f} ms "
              f"per step wall clock, {total / 1e3:.3f} ms per step of {where} time\n")
        print(common.markdown_table(rows[:15], ["kernel", "calls_per", "us_per", "share"]))
        results.append({"mode": label, "environment": env, "wall_ms_per_step": wall_ms / steps,
                        "gpu_ms_per_step": total / 1e3, "kernels": rows[:15]})
        # after every mode, so that a run stopped by its time limit keeps the modes it finished
        common.write_results("generate-breakdown", results, args, {
            "steps": steps, "note": "static decode steps at batch 1 under torch.profiler, an 8-token prefill among "
            "the forwards counted; the top 15 kernels by GPU time per step. Wall time is a profiled static step "
            "(host-bound), not a graph replay."})
    return 0


def write_random_checkpoint(preset: str, folder: Path, device, dtype, seed: int = 0, **overrides) -> Path:
    """Random Llama weights (normal, std 0.02; norms 1) saved as a Hugging Face folder."""
    import torch

    from bezoar.model import preset as model_preset, save

    model = common.random_llama(model_preset(preset, **overrides), device, dtype, seed)
    path = save(model, folder, dtype=dtype, overwrite=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def load_peer(folder: Path, device, dtype):
    """transformers' Llama with bitsandbytes NF4 (double quant, ``dtype`` compute), or a note why not."""
    import torch

    try:
        import bitsandbytes  # noqa: F401
        import transformers
    except Exception as exc:  # the GPU machine may lack bitsandbytes
        return None, f"transformers + bitsandbytes peer skipped: {type(exc).__name__}: {exc}"
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), quantization_config=quant, dtype=dtype, device_map={"": str(device)})
    except Exception as exc:  # e.g. bitsandbytes without a backend for this device
        return None, f"transformers + bitsandbytes peer skipped: loading failed: {type(exc).__name__}: {exc}"
    if torch.device(device).type == "cpu":
        # On a CPU with AVX-512 BF16, bitsandbytes 0.50 repacks an eval-mode layer's weight at its first
        # call without grad, and refuses layers whose output size is not a multiple of 32 (the smoke
        # model's): the smoke run, which only checks the code path, keeps its portable CPU code
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model.eval(), None


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_smoke(args)
    import torch

    from bezoar.model import KVCache, generate_ids, load
    from bezoar.model.decode import Decoder
    from bezoar_kernels import nf4_matmul as mm

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/generate.py needs a CUDA GPU (use --smoke to check the code path on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.breakdown:
        return breakdown(args, device, dtype)
    batches = [int(b) for b in args.batches.split(",")]
    prompt_len, new_tokens = args.prompt_len, args.new_tokens
    if args.smoke:
        batches, prompt_len, new_tokens = [1, 2], 8, 4

    workdir = None
    if args.model:
        folder = Path(args.model)
    else:
        workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bezoar-bench-generate-"))
        preset = "tiny" if args.smoke else "open_llama_3b_v2"
        print(f"writing a random {preset} checkpoint to {workdir} ...", flush=True)
        folder = write_random_checkpoint(preset, workdir / "model", device, dtype)

    try:
        ours = load(folder, quant="nf4", device=device, dtype=dtype).eval()
        config = ours.config
        peer, peer_note = (None, "peer skipped (--no-peer)") if args.no_peer else load_peer(folder, device, dtype)
        if peer_note:
            print(peer_note)

        gen = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(3, config.vocab_size, (b, prompt_len), generator=gen).to(device) for b in batches}

        decoders = {}  # one per case: its cache and graphs live across the timed calls

        def bezoar_generate(ids, decode="auto", case="bezoar"):
            key = (case, ids.shape[0])
            if key not in decoders:
                decoders[key] = Decoder(ours, decode)
            decoder = decoders[key]
            return generate_ids(ours, ids, torch.ones_like(ids), max_new_tokens=new_tokens, eos_id=None,
                                decoder=decoder)

        def bezoar_prefill(ids):
            cache = KVCache(config, ids.shape[0], ids.shape[1] + new_tokens, ours.dtype, device)
            with torch.no_grad():
                return ours(ids, cache=cache)[:, -1]

        def peer_generate(ids):
            with torch.no_grad():
                return peer.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        def peer_prefill(ids):
            with torch.no_grad():
                return peer(input_ids=ids, use_cache=True).logits[:, -1]

        def under(setting, fn):
            """``fn`` run with ``setting()`` (an environment context) around each call."""
            def run():
                with setting():
                    return fn()
            return run

        cases = {}
        for b in batches:
            ids = prompts[b]
            cases[f"bezoar/b{b}"] = ("bezoar", b, lambda ids=ids: bezoar_generate(ids), lambda ids=ids: bezoar_prefill(ids))
            cases[f"bezoar-eager/b{b}"] = ("bezoar-eager", b, lambda ids=ids: bezoar_generate(ids, "eager", "eager"),
                                           lambda ids=ids: bezoar_prefill(ids))
            if b <= mm.GEMV_MAX_ROWS and mm.gemv_max_m(device) < b:
                cases[f"bezoar-gemv/b{b}"] = ("bezoar-gemv", b,
                                              under(gemv_on, lambda ids=ids: bezoar_generate(ids, case="gemv")),
                                              under(gemv_on, lambda ids=ids: bezoar_prefill(ids)))
            cases[f"bezoar-sdpa/b{b}"] = ("bezoar-sdpa", b,
                                          under(sdpa_attention, lambda ids=ids: bezoar_generate(ids, case="sdpa")),
                                          under(sdpa_attention, lambda ids=ids: bezoar_prefill(ids)))
            cases[f"bezoar-attn/b{b}"] = ("bezoar-attn", b,
                                          under(decode_attention_on, lambda ids=ids: bezoar_generate(ids, case="attn")),
                                          under(decode_attention_on, lambda ids=ids: bezoar_prefill(ids)))
            if peer is not None:
                cases[f"transformers-bnb/b{b}"] = ("transformers-bnb", b, lambda ids=ids: peer_generate(ids),
                                                   lambda ids=ids: peer_prefill(ids))
        if args.only:
            if args.only not in cases:
                print(f"--only {args.only!r}: no such case; cases: {', '.join(cases)}", file=sys.stderr)
                return 2
            cases = {args.only: cases[args.only]}
            if args.iters:
                common.run_plain(cases[args.only][2], args.iters)
                print(f"ran {args.only} {args.iters} times")
                return 0

        # Both sides must decode: check bezoar's greedy tokens against the peer's where it runs.
        if peer is not None:
            ids = prompts[batches[0]]
            a = torch.tensor(bezoar_generate(ids)[0], device=device)
            b_ = peer_generate(ids)[:, ids.shape[1]:]
            agree = float((a[:, :8] == b_[:, :8]).float().mean())
            print(f"greedy agreement with the peer over the first 8 tokens: {agree:.2f}")
            e = torch.tensor(bezoar_generate(ids, "eager", "eager")[0], device=device)
            # Random weights give nearly flat logits, so rounding differences (another attention kernel,
            # padded keys) flip near-ties and the sequences part; after that they share nothing. The
            # length of the common prefix says more than the share of equal tokens.
            print(f"... bezoar's eager loop against its default decode: the first {same_prefix(e, a)} of "
                  f"{new_tokens} tokens are the same")
            if f"bezoar-gemv/b{batches[0]}" in cases:
                with gemv_on():
                    g = torch.tensor(bezoar_generate(ids, case="gemv")[0], device=device)
                print(f"... with the gemv kernel, against the peer over the first 8 tokens: "
                      f"{float((g[:, :8] == b_[:, :8]).float().mean()):.2f}")

        rows = []
        extra = {"model": str(args.model or "random open_llama_3b_v2"), "dtype": str(dtype), "peer_note": peer_note,
                 "quant": "nf4, blocksize 64, double quant"}
        cases = timing_order(cases, batches)
        with common.maybe_profile(args.profile):
            for name, (impl, b, run_generate, run_prefill) in cases.items():
                prefill_ms = common.bench_ms(run_prefill, smoke=args.smoke)
                generate_ms = common.wall_ms(run_generate, smoke=args.smoke)
                decode_ms = generate_ms - prefill_ms  # not positive only in noisy CPU smoke timings
                ok = decode_ms > 0
                rows.append({"case": name, "impl": impl, "batch": b, "prompt_len": prompt_len,
                             "new_tokens": new_tokens, "prefill_ms": prefill_ms, "generate_ms": generate_ms,
                             "decode_tok_s": b * new_tokens / decode_ms * 1e3 if ok else None,
                             "e2e_tok_s": b * new_tokens / generate_ms * 1e3,
                             "ms_per_step": decode_ms / new_tokens if ok else None})
                print(f"{name}: {rows[-1]['e2e_tok_s']:.1f} end-to-end tok/s", flush=True)
                # rewritten after every case: a run stopped by its time limit keeps what it timed
                common.write_results("generate", rows, args, extra={**extra, "complete": False})

        for b in batches:
            theirs = next((r for r in rows if r["impl"] == "transformers-bnb" and r["batch"] == b), None)
            for mine in (r for r in rows if r["impl"].startswith("bezoar") and r["batch"] == b):
                if theirs and mine["decode_tok_s"] and theirs["decode_tok_s"]:
                    mine["speedup_vs_peer"] = mine["decode_tok_s"] / theirs["decode_tok_s"]
        print(common.markdown_table(rows, ["case", "batch", "prefill_ms", "generate_ms", "decode_tok_s", "e2e_tok_s",
                                           "ms_per_step", "speedup_vs_peer"]))
        b1 = next((r for r in rows if r["impl"] == "bezoar" and r["batch"] == 1 and "speedup_vs_peer" in r), None)
        if b1 is not None and not args.smoke:  # CPU smoke timings say nothing about the target
            verdict = "met" if b1["speedup_vs_peer"] >= 2.0 else "NOT met"
            print(f"target >= 2x the peer's decode tokens/s at batch 1: {verdict} ({b1['speedup_vs_peer']:.2f}x)")
        common.write_results("generate", rows, args, extra={**extra, "complete": True})
    finally:
        if workdir is not None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
