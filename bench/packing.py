"""Packing efficiency and tokenize + pack throughput on HH-RLHF-like and Alpaca-like lengths (CPU).

No data is downloaded: example lengths are drawn from stated distributions (tokens, Llama-size
vocabulary, OpenBezoar template included), meant to resemble the two data sets:

    hh      prompt = 55 + LogNormal(median 70, sigma 0.9)   (template + dialogue so far)
            response = LogNormal(median 60, sigma 0.9)      (last Assistant turn)
    alpaca  prompt = 55 + LogNormal(median 18, sigma 0.6) [+ LogNormal(median 20, sigma 0.8) input, 40%]
            response = LogNormal(median 70, sigma 0.9)

Each example is truncated by bezoar's policy (``fit_budget``) to the document budget, then:

1. packing: ``--examples`` documents of those lengths -> BatchLoader (best-fit decreasing) at
   max_seq_len 2048 and 1024: efficiency (real tokens / slots), packing time, and collate
   throughput (building every batch of an epoch); the unpacked mode (padding per batch of
   ``--batch-rows`` rows, in shuffled order) is measured beside it;
2. tokenize + pack: ``--text-examples`` texts of about those lengths, tokenized by the tiny
   model's sentencepiece tokenizer (vocab 512, trained on project text; the OpenLLaMA tokenizer
   is not available offline) through ``encode_sft`` and packed: examples/s and tokens/s.

Target: packed efficiency >= 98%.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DISTRIBUTIONS = {
    "hh": "prompt = 55 + LogNormal(median 70, sigma 0.9); response = LogNormal(median 60, sigma 0.9)",
    "alpaca": ("prompt = 55 + LogNormal(median 18, sigma 0.6) + (40%) LogNormal(median 20, sigma 0.8); "
               "response = LogNormal(median 70, sigma 0.9)"),
}
SEQ_LENS = (2048, 1024)


def sample_lengths(dist: str, n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)

    def lognormal(median, sigma, size):
        return np.maximum(1, np.round(rng.lognormal(np.log(median), sigma, size))).astype(np.int64)

    if dist == "hh":
        prompt = 55 + lognormal(70, 0.9, n)
        response = lognormal(60, 0.9, n)
    elif dist == "alpaca":
        prompt = 55 + lognormal(18, 0.6, n) + lognormal(20, 0.8, n) * (rng.random(n) < 0.4)
        response = lognormal(70, 0.9, n)
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return prompt, response


def synthetic_documents(dist: str, n: int, max_len: int, seed: int):
    """A DocumentSet with the sampled (truncated) lengths and random token ids."""
    import numpy as np

    from bezoar.data import DocumentSet
    from bezoar.data.encode import fit_budget

    prompt, response = sample_lengths(dist, n, seed)
    kept = np.array([fit_budget(int(p), int(r) + 1, max_len, max_len // 2) for p, r in zip(prompt, response)])
    lengths = kept.sum(1)
    offsets = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    total = int(lengths.sum())
    tokens = np.random.default_rng(seed + 1).integers(3, 32000, size=total, dtype=np.int32)
    mask = np.ones(total, dtype=bool)
    for off, p in zip(offsets, kept[:, 0]):
        mask[off: off + p] = False
    return DocumentSet(tokens=tokens, loss_mask=mask, doc_offset=offsets, doc_length=lengths,
                       doc_example=np.arange(n, dtype=np.int64), doc_part=np.zeros(n, dtype=np.int64),
                       item_doc_offset=np.arange(n + 1, dtype=np.int64))


def synthetic_texts(dist: str, n: int, tokenizer, seed: int):
    """Prompt/response texts of about the sampled token lengths, in words the tokenizer knows."""
    import numpy as np

    from bezoar.data import PromptTemplate, SFTExample
    from bezoar.model.tiny import CORPUS

    words = CORPUS.read_text(encoding="utf-8").split()
    probe = " ".join(words[:2000])
    tokens_per_word = len(tokenizer.encode(probe)) / 2000
    template = PromptTemplate()
    overhead = len(tokenizer.encode(template.render("x")))
    prompt, response = sample_lengths(dist, n, seed)
    rng = np.random.default_rng(seed + 2)
    examples = []
    for p, r in zip(prompt.tolist(), response.tolist()):
        # The template costs `overhead` tokens in this vocabulary; the rest of the prompt is words.
        n_prompt = max(1, round(max(1, p - 55) / tokens_per_word))
        n_resp = max(1, round(r / tokens_per_word))
        start = int(rng.integers(0, len(words) - n_prompt - n_resp - 1))
        instruction = " ".join(words[start: start + n_prompt])
        answer = " ".join(words[start + n_prompt: start + n_prompt + n_resp])
        examples.append(SFTExample(template.render(instruction), answer))
    return examples, overhead


def measure_packing(dist: str, max_seq_len: int, n: int, batch_rows: int, repeats: int, smoke: bool) -> dict:
    from bezoar.data import BatchLoader

    docs = synthetic_documents(dist, n, max_seq_len, seed=0)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loader = BatchLoader(docs, max_seq_len, batch_rows, seed=0)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    collated = 0
    for batch in loader:
        collated += batch["num_tokens"]
    collate_s = time.perf_counter() - t0
    unpacked = BatchLoader(docs, max_seq_len, batch_rows, packed=False, seed=0)
    return {
        "examples": n, "tokens": docs.num_tokens, "mean_len": docs.num_tokens / n,
        "max_len": int(docs.doc_length.max()), "rows": loader.num_rows, "efficiency": loader.efficiency,
        "efficiency_unpacked": unpacked.efficiency, "pack_s": statistics.median(times),
        "pack_examples_per_s": n / statistics.median(times), "collate_tokens_per_s": collated / collate_s,
    }


def measure_tokenize_pack(dist: str, max_seq_len: int, n: int, batch_rows: int, tokenizer) -> dict:
    from bezoar.data import BatchLoader, encode_sft

    examples, overhead = synthetic_texts(dist, n, tokenizer, seed=1)
    t0 = time.perf_counter()
    docs, stats = encode_sft(examples, tokenizer, max_seq_len)
    t1 = time.perf_counter()
    loader = BatchLoader(docs, max_seq_len, batch_rows, seed=0, pad_id=tokenizer.pad_id)
    t2 = time.perf_counter()
    return {
        "text_examples": n, "text_tokens": stats.tokens, "text_truncated": stats.truncated,
        "template_tokens_tiny_vocab": overhead, "text_efficiency": loader.efficiency,
        "tokenize_examples_per_s": n / (t1 - t0), "tokenize_tokens_per_s": stats.tokens / (t1 - t0),
        "tokenize_pack_examples_per_s": n / (t2 - t0), "tokenize_pack_tokens_per_s": stats.tokens / (t2 - t0),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100_000, help="documents per packing case")
    p.add_argument("--text-examples", type=int, default=20_000, help="texts per tokenize+pack case")
    p.add_argument("--batch-rows", type=int, default=16, help="rows per batch (and unpacked batch size)")
    p.add_argument("--repeats", type=int, default=3, help="packing timings: median of this many runs")
    args = p.parse_args(argv)
    common.setup_smoke(args)
    if args.smoke:
        args.examples, args.text_examples, args.repeats = 1000, 100, 1

    from bezoar.model import Tokenizer
    from bezoar.model.tiny import build_tiny_model

    tokenizer = Tokenizer(build_tiny_model("demo"))
    cases = [(f"{dist}-{L}", dist, L) for dist in DISTRIBUTIONS for L in SEQ_LENS]
    if args.only:
        cases = [c for c in cases if c[0] == args.only]
        if not cases:
            print(f"no case named {args.only!r}; cases: "
                  + ", ".join(f"{d}-{L}" for d in DISTRIBUTIONS for L in SEQ_LENS), file=sys.stderr)
            return 2
    if args.only and args.iters:
        name, dist, L = cases[0]
        for _ in range(args.iters):
            measure_packing(dist, L, args.examples, args.batch_rows, 1, args.smoke)
        return 0

    rows = []
    with common.maybe_profile(args.profile):
        for name, dist, L in cases:
            row = {"case": name, "distribution": dist, "max_seq_len": L}
            row.update(measure_packing(dist, L, args.examples, args.batch_rows, args.repeats, args.smoke))
            row.update(measure_tokenize_pack(dist, L, args.text_examples, args.batch_rows, tokenizer))
            rows.append(row)
            print(f"{name}: efficiency {row['efficiency']:.4f} (unpacked {row['efficiency_unpacked']:.4f}), "
                  f"pack {row['pack_s']:.3f}s, tokenize+pack {row['tokenize_pack_examples_per_s']:.0f} ex/s",
                  flush=True)
    print()
    print(common.markdown_table(rows, [
        "case", "examples", "mean_len", "rows", "efficiency", "efficiency_unpacked", "pack_s",
        "pack_examples_per_s", "collate_tokens_per_s", "tokenize_pack_examples_per_s", "tokenize_pack_tokens_per_s"]))
    bad = [r["case"] for r in rows if r["efficiency"] < 0.98]
    if bad and not args.smoke:
        print(f"\nbelow the 98% efficiency target: {', '.join(bad)}")
    common.write_results("packing", rows, args, extra={
        "distributions": DISTRIBUTIONS, "batch_rows": args.batch_rows, "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "tokenizer": "bezoar tiny 'demo' sentencepiece (vocab 512)", "target_efficiency": 0.98})
    return 0


if __name__ == "__main__":
    sys.exit(main())
