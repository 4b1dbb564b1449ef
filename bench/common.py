"""Shared plumbing for bench/ scripts: arguments, timing, device facts, result files.

Every bench script takes the same flags:
  --smoke          run the same code path at tiny shapes on CPU, print, write nothing
  --only NAME      run one case in isolation (friendly to ncu / nsys)
  --iters N        with --only: run it N times plainly (no do_bench), for a profiler to attach
  --profile DIR    write a torch.profiler trace of the measured cases into DIR
  --out DIR        where results JSON goes (default bench/results)
GPU timings use ``triton.testing.do_bench`` (median over repeats after warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def environ(**values):
    """The given environment variables set for the block, restored after."""
    old = {name: os.environ.get(name) for name in values}
    os.environ.update({name: str(value) for name, value in values.items()})
    try:
        yield
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def with_environ(fn, **values):
    """``fn`` wrapped to run under ``environ(**values)`` at every call (and so in a graph's capture)."""
    def run(*args, **kwargs):
        with environ(**values):
            return fn(*args, **kwargs)
    return run


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU; check the code path, write nothing")
    p.add_argument("--only", metavar="NAME", help="run only the case with this name")
    p.add_argument("--iters", type=int, default=0, help="with --only: run the case N times without do_bench")
    p.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace into DIR")
    p.add_argument("--out", metavar="DIR", default=str(RESULTS_DIR), help="folder for the results JSON")
    return p


def int_pairs(text: str, flag: str, parser: argparse.ArgumentParser,
              count: int | None = None) -> list[tuple[int, int]]:
    """``text`` ("3200x3200,8640x3200") as pairs of positive whole numbers; anything else (or not ``count``
    pairs, where given) is one usage error from ``parser`` naming ``flag``."""
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
        if any(len(pair) != 2 or min(pair) < 1 for pair in pairs) or (count and len(pairs) != count):
            raise ValueError
    except ValueError:
        example = "16x8" if count == 1 else "3200x3200,8640x3200"
        parser.error(f"{flag} {text!r}: expected {'one pair' if count == 1 else 'pairs'} of whole numbers AxB"
                     f"{'' if count == 1 else ', comma-separated'} (e.g. {example})")
    return pairs


def setup_smoke(args) -> None:
    """In smoke mode kernels run in the Triton interpreter on CPU; must run before triton imports."""
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def git_commit() -> str:
    """The commit of the code that runs: ``BEZOAR_COMMIT`` where it is set, else git's HEAD here (``-dirty``
    where tracked files differ from it). A lent GPU machine gets a copy of the working tree whose ``.git``
    can be an earlier call's, so git there can name an older commit than the code it runs: the device call
    passes the commit it sends (``scripts/gpu_short.sh``, bench/README.md)."""
    given = os.environ.get("BEZOAR_COMMIT", "").strip()
    return given or _git_head()


def commit_source() -> str:
    """Where ``git_commit`` took the commit from: "BEZOAR_COMMIT" or "git"."""
    return "BEZOAR_COMMIT" if os.environ.get("BEZOAR_COMMIT", "").strip() else "git"


@functools.lru_cache(maxsize=1)
def _git_head() -> str:
    """git's HEAD for this folder (asked once a process: a bench that rewrites its JSON after every case
    would otherwise run git twice a case)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def device_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, sm_count=props.multi_processor_count)
        # the per-GPU settings the files gave the run (kernels/tuning.json, BEZOAR_TUNING; a bench that
        # overrides one through the environment records that itself)
        from bezoar_kernels import tuning

        info["tuning"] = tuning.summary(torch.device("cuda"))
    else:
        info["device"] = "cpu"
    for name in ("bitsandbytes", "transformers", "peft"):  # the peers' versions (None where not installed)
        try:
            # from the installed metadata, not an import: importing bitsandbytes here (bench/ first on sys.path)
            # found bench/kernels.py for its optional `kernels` package and printed a failure
            info[name] = importlib.metadata.version(name)
        except Exception:
            info[name] = None
    return info


def bench_ms(fn, smoke: bool = False, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()``: do_bench on CUDA, a short wall-clock median in smoke mode."""
    if smoke:
        fn()
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def wall_ms(fn, smoke: bool = False, runs: int = 3, long_s: float = 2.0) -> float:
    """Median wall-clock milliseconds of ``fn()`` for calls of a second or more (a whole generation).

    ``do_bench`` calls a function five times to estimate its runtime before it times any call, so a
    7-second call cost about 8 calls there; here one warm-up call, then ``runs`` timed calls (one where
    the warm-up took over ``long_s`` seconds), each between device synchronizations."""
    import torch

    def once() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    warm = once()
    count = 1 if smoke or warm > long_s * 1e3 else max(1, runs)
    times = sorted(once() for _ in range(count))
    return times[len(times) // 2]


def graph_ms(fn, warmup: int = 25, rep: int = 100, calls: int = 1) -> float:
    """Median milliseconds of one call of ``fn`` captured in a CUDA graph: a replay of ``calls`` calls
    in a row, divided by ``calls``.

    Eager timing of a short op counts the host's launch gaps (Python, argument binding, autograd)
    when they are longer than the GPU work; a graph replay has no host work, so this is the GPU time
    the op costs inside a model whose host runs ahead. One replay still pays the graph's own launch
    latency (several microseconds, as long as a small kernel): ``calls`` > 1 spreads it, as inside a
    decode step's graph. A ``fn`` that cycles through several copies of its inputs keeps the repeated
    calls from reading them out of L2. ``fn`` runs three times on a side stream first (compiles,
    caches, allocator), then ``calls`` times under capture.
    """
    import torch
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return float(triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")) / calls
    finally:
        del graph
        torch.cuda.synchronize()


def run_plain(fn, iters: int) -> None:
    """Run ``fn`` ``iters`` times with no timing machinery (for ncu/nsys attached from outside)."""
    import torch

    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def maybe_profile(directory: str | None):
    if not directory:
        yield None
        return
    import torch.profiler as tp

    Path(directory).mkdir(parents=True, exist_ok=True)
    acts = [tp.ProfilerActivity.CPU]
    import torch

    if torch.cuda.is_available():
        acts.append(tp.ProfilerActivity.CUDA)
    with tp.profile(activities=acts, record_shapes=True,
                    on_trace_ready=tp.tensorboard_trace_handler(directory)) as prof:
        yield prof
    print(f"profiler trace written under {directory}")


def kernel_rows(prof, per: int, cuda: bool | None = None) -> tuple[list[dict], float]:
    """The kernels of a finished ``torch.profiler`` run, by self time per ``per`` (e.g. calls or
    steps), largest first: rows of kernel (the name cut to 90 characters), category (``kernel_category``
    of the whole name), calls_per, us_per, share; and the total us per ``per``. GPU kernels where the
    work ran on CUDA (``cuda``; None: wherever CUDA is available), else the CPU operators' self time."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    rows, total = [], 0.0
    for evt in prof.key_averages():
        if cuda:
            us = getattr(evt, "self_device_time_total", None)
            us = us if us is not None else evt.self_cuda_time_total
        else:
            us = evt.self_cpu_time_total
        if us <= 0 or (cuda and evt.device_type != torch.autograd.DeviceType.CUDA):
            continue
        total += us
        rows.append({"kernel": evt.key[:90], "category": kernel_category(evt.key), "calls_per": evt.count / per,
                     "us_per": us / per})
    rows.sort(key=lambda r: -r["us_per"])
    for r in rows:
        r["share"] = r["us_per"] * per / total if total else None
    return rows, total / per


def profile_kernels(fn, calls: int, cuda: bool | None = None) -> tuple[list[dict], float]:
    """``kernel_rows`` of ``calls`` runs of ``fn`` (run once before, outside the profile). ``cuda``: whether
    ``fn`` runs on the GPU (None: wherever CUDA is available); a smoke run on a GPU machine says False,
    or its CPU work would give no rows."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    return kernel_rows(prof, calls, cuda)


# What a kernel is, from its name in a profile: bezoar's Triton kernels by function name, the libraries'
# by the words their names carry (cuBLAS "gemm"/"nvjet", flash / cuDNN / memory-efficient attention,
# PyTorch's fused optimizer and elementwise kernels), a few CPU operators (smoke runs) by their aten names.
# The first rule that matches wins, so the specific come before the general ("fmha_cutlass" is attention).
KERNEL_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("norm + lora (fused)", ("_norm_lora_",)),
    ("swiglu + lora (fused)", ("_swiglu_lora_",)),
    ("nf4 matmul (triton)", ("_nf4_matmul_", "_nf4_gemv_", "_nf4_tma_", "_sum_splits_kernel")),
    ("lora", ("_lora_", "_tma_fwd_kernel", "_tma_bwd_kernel")),  # after _nf4_tma_
    # the merged LoRA path's merge kernel is its dequantize (W + s B A made in the same pass)
    ("nf4 dequantize", ("_nf4_dequantize_kernel", "_nf4_words_bf16_kernel", "_nf4_merge_kernel")),
    ("nf4 quantize", ("_nf4_quantize_kernel",)),
    ("attention", ("_attn_", "_decode_attn", "flash", "fmha", "sdpa", "attention")),
    ("rmsnorm", ("_rms_norm_",)),
    ("rope", ("_rope_",)),
    ("swiglu", ("_swiglu_",)),
    ("cross-entropy", ("_ce_rows_", "cross_entropy", "nll_loss", "log_softmax")),
    ("optimizer", ("multi_tensor_apply", "adam", "fused_sgd")),
    ("gemm (cublas)", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                       "aten::matmul", "aten::linear")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "catarraybatched", "aten::cat", "aten::clone",
                     "aten::zero")),
    ("reduction", ("reduce_kernel", "aten::sum", "aten::norm", "aten::mean")),
    ("elementwise", ("elementwise",)),
)


def kernel_category(name: str) -> str:
    """The category of a profiled kernel or operator name (``KERNEL_CATEGORIES``; "other" when none fits)."""
    low = name.lower()
    for category, words in KERNEL_CATEGORIES:
        if any(w in low for w in words):
            return category
    return "other"


def category_totals(rows: list[dict]) -> list[dict]:
    """``kernel_rows``' rows summed by category (theirs, else ``kernel_category`` of the row's name):
    category, kernels, calls_per, us_per, share (of the rows' total), largest first."""
    by: dict[str, dict] = {}
    for r in rows:
        name = r.get("category") or kernel_category(r["kernel"])
        c = by.setdefault(name, {"category": name, "kernels": 0, "calls_per": 0.0, "us_per": 0.0})
        c["kernels"] += 1
        c["calls_per"] += r["calls_per"]
        c["us_per"] += r["us_per"]
    total = sum(c["us_per"] for c in by.values())
    out = sorted(by.values(), key=lambda c: -c["us_per"])
    for c in out:
        c["share"] = c["us_per"] / total if total else None
    return out


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, rows: list[dict], args, extra: dict | None = None) -> Path | None:
    """Write bench/results/<name>-<device>-<date>.json (skipped in smoke mode)."""
    if args.smoke:
        return None
    info = device_info()
    device = info.get("device", "cpu").replace(" ", "_").replace("/", "_")
    date = _dt.date.today().isoformat()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}-{device}-{date}.json"
    written = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")  # orders a day's runs (bench/tune.py)
    payload = {"bench": name, "date": date, "time": written, "commit": git_commit(), "commit_source": commit_source(),
               "argv": sys.argv, **info,
               **(extra or {}), "rows": rows}
    partial = path.with_name(path.name + ".part")  # a run killed mid-write leaves the last whole file
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)
    print(f"results written to {path}")
    return path


def random_llama(config, device, dtype, seed: int = 0):
    """bezoar's dense Llama of ``config`` with random weights (normal, std 0.02; norms 1), in eval mode."""
    import torch

    from bezoar.model import LlamaForCausalLM

    model = LlamaForCausalLM(config, dtype=dtype, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()
