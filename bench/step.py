"""A full QLoRA training step (SFT and DPO) on OpenLLaMA 3B shapes: bezoar beside transformers + PEFT + bitsandbytes.

One step = forward, backward, gradient clipping and a fused AdamW update of the LoRA weights, under bf16
autocast, on packed rows of 2048 tokens (several documents per row), 8K and 32K tokens per step, LoRA
r=16 (alpha 16, dropout 0.05) on q/k/v (the OpenBezoar config) and on all seven linears.

Implementations, in one process on one GPU, on the same random weights (drawn once per tensor from a
seeded generator and quantized to NF4 by each side; nothing touches the disk):

* ``bezoar-full`` / ``bezoar-cheap`` / ``bezoar-off``: bezoar's model and kernels, with activation
  checkpointing full (recompute each layer), cheap (keep linear and attention outputs) or off. The
  SFT loss is ``bezoar.train.sft.SFTStage``, the DPO loss ``bezoar.train.dpo.DPOStage`` (sigmoid,
  beta 0.1, reference = the same model with adapters off, computed in the step).
* ``bezoar-full-cache`` (only when named in ``--impls``): ``bezoar-full`` with the NF4 dequant cache on
  (``bezoar_kernels.dequant_cache``: the next weight dequantized on a side stream during the current
  matmul, in the order of the step before), to be read beside ``bezoar-full`` of the same run. The
  other bezoar cases run with it off, whatever the environment or a tuning entry says; each bezoar row
  records the cache's counters over its timed steps (``dequant_cache``: empty where it was off).
* ``hf``: transformers' LlamaForCausalLM with bitsandbytes ``Linear4bit`` (NF4, double quant, bf16
  compute), PEFT LoRA, non-reentrant gradient checkpointing, SDPA attention, its own loss
  (``labels=``; full logits). It sees the same rows as plain causal rows (SDPA's is_causal path; no
  document mask, which is the usual way this stack trains on packed rows and costs it only attention
  FLOPs). Its DPO step is written out (TRL is not installed on the GPU machine): reference forward
  with ``disable_adapter()`` under no_grad, policy forward of chosen + rejected rows, sigmoid loss.

Figures per case: median step time over ``iters`` steps after warm-up (each step timed with CUDA
events; steps take up to seconds, so do_bench's five-call estimate is not used), tokens/s (real
tokens, padding excluded), MFU, and peak memory. MFU = model FLOPs / time / peak, where the peak is
the median of ``triton.testing.do_bench`` on a bf16 8192^3 GEMM in the same run, and model FLOPs per
step = 4 N tokens (2N forward + 2N input gradient; N = parameters doing multiply-adds, i.e. all but
the input embedding table) + attention (causal pairs within each document: 4 C per pair forward,
8 C backward, per layer); a DPO step adds the reference forward (2N tokens + its attention). The
recomputation of checkpointing is not model FLOPs. Peak memory = what a process holding only this
model would peak at: the model's resident bytes (measured when it was built) + its adapters and
optimizer state + the step's transient peak above them (``torch.cuda.max_memory_allocated``).

Then the targets of issues 10 and 6 (tokens/s >= 2.5x hf, MFU >= 45%, <= 5 GB at 8K, DPO <= 1.6x the
SFT time per token and <= 1.2x its memory) are printed met / missed / not measured.

    python bench/step.py                          # every case (several minutes), results JSON + tables
    python bench/step.py --budget 240             # stop starting cases after 240 s (gpu_bench.sh)
    python bench/step.py --tokens 8192 --lora qkv --impls bezoar-full,hf
    python bench/step.py --tokens 8192 --lora qkv --workloads sft --impls bezoar-full,bezoar-full-cache
    python bench/step.py --only sft/bezoar-full/qkv/8k --iters 5      # one case, plain steps (ncu, nsys)
    python bench/step.py --only 'sft/*/qkv/8k' --profile /tmp/trace  # torch.profiler traces
    python bench/step.py --tokens 8192 --lora qkv --workloads sft --impls bezoar-full --breakdown 3
                                                  # also where a step's GPU time goes, by kernel category
    python bench/step.py --smoke                  # tiny shapes on CPU (torch reference path), no results
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LORA_TARGETS = {"qkv": ["q_proj", "k_proj", "v_proj"],
                "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
IMPLS = ("bezoar-full", "bezoar-cheap", "bezoar-off", "hf")
# asked for by name only: bezoar-full with the NF4 dequant cache on (bezoar_kernels.dequant_cache)
EXTRA_IMPLS = ("bezoar-full-cache",)
WORKLOADS = ("sft", "dpo")
GEMM_N = 8192
DPO_BETA = 0.1


@dataclass(frozen=True)
class Setup:
    """Shapes of one run: the model preset (or a small config), rows, tokens per step, LoRA."""

    preset: str | None
    model_overrides: dict
    row_len: int
    tokens: tuple
    lora_r: int
    gemm_n: int
    warmup: int
    iters: dict  # tokens -> timed steps
    doc_mean: float  # mean document length (lognormal), tokens
    prompt_frac: float


FULL = Setup(preset="open_llama_3b_v2", model_overrides={}, row_len=2048, tokens=(8192, 32768), lora_r=16,
             gemm_n=GEMM_N, warmup=2, iters={8192: 5, 32768: 3}, doc_mean=400.0, prompt_frac=0.35)
SMOKE = Setup(preset=None, model_overrides=dict(vocab_size=128, hidden_size=64, intermediate_size=176,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=128),
              row_len=32, tokens=(64, 128), lora_r=4, gemm_n=128, warmup=1, iters={64: 1, 128: 1},
              doc_mean=9.0, prompt_frac=0.35)


@dataclass
class Case:
    name: str
    workload: str
    impl: str
    lora: str
    tokens: int
    result: dict = field(default_factory=dict)


def tokens_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def parse_args():
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", default=None, help="comma list of tokens per step (default 8192,32768)")
    p.add_argument("--lora", default="qkv,all", help="comma list of LoRA configs: qkv, all")
    p.add_argument("--impls", default=",".join(IMPLS),
                   help=f"comma list of implementations: {', '.join(IMPLS + EXTRA_IMPLS)} (default all but the last)")
    p.add_argument("--workloads", default="sft,dpo", help="comma list: sft, dpo")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds after which no new case starts (0: no limit); skipped cases are listed")
    p.add_argument("--breakdown", type=int, default=0, metavar="STEPS",
                   help="after timing each case, profile STEPS more steps: GPU time per step by kernel category "
                        "and the top kernels, in the row's 'breakdown' and a table per case")
    args = p.parse_args()
    if args.breakdown < 0:
        p.error(f"--breakdown must be a number of steps >= 0, got {args.breakdown}")
    if args.breakdown and args.profile:
        p.error("--breakdown and --profile each run torch.profiler: ask for one at a time")
    return args


def split_list(text: str, allowed, what: str) -> list:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"bench/step.py: --{what} {text!r}: choose from {', '.join(allowed)}")
    return items


# ----------------------------------------------------------------------------- the same random weights


class RandomWeights:
    """The k-th tensor of a model always comes from the same seeded generator on the device, so the
    bezoar model and the transformers model are built from identical bf16 weights, one tensor at a time."""

    def __init__(self, seed: int, device, dtype):
        import torch

        self.seed, self.device, self.dtype = seed, device, dtype
        self.gen = torch.Generator(device=device)
        self.count = 0

    def next(self, shape, kind: str = "linear"):
        import torch

        self.gen.manual_seed(self.seed * 100_003 + self.count)
        self.count += 1
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32)
        t = 1.0 + 0.1 * t if kind == "norm" else 0.02 * t
        return t.to(self.dtype)


def model_tensors(config, seed, device, dtype):
    """Yield (HF key, tensor) for every weight, layer by layer, in one fixed order."""
    weights = RandomWeights(seed, device, dtype)
    c, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    yield "model.embed_tokens.weight", weights.next((config.vocab_size, c))
    shapes = [("self_attn.q_proj", (q, c)), ("self_attn.k_proj", (kv, c)), ("self_attn.v_proj", (kv, c)),
              ("self_attn.o_proj", (c, q)), ("mlp.gate_proj", (f, c)), ("mlp.up_proj", (f, c)),
              ("mlp.down_proj", (c, f))]
    for i in range(config.num_hidden_layers):
        yield f"model.layers.{i}.input_layernorm.weight", weights.next((c,), "norm")
        for name, shape in shapes:
            yield f"model.layers.{i}.{name}.weight", weights.next(shape)
        yield f"model.layers.{i}.post_attention_layernorm.weight", weights.next((c,), "norm")
    yield "model.norm.weight", weights.next((c,), "norm")
    yield "lm_head.weight", weights.next((config.vocab_size, c))


def is_linear_key(key: str) -> bool:
    return ".layers." in key and key.endswith("_proj.weight")


def build_bezoar(config, seed, device, dtype):
    """bezoar's model with NF4 decoder linears, built on the meta device and filled one tensor at a time
    (each linear quantized on the device as it is drawn): the dense model never exists whole."""
    from torch import nn

    from bezoar.model.llama import LlamaForCausalLM
    from bezoar.model.nf4 import NF4Linear

    model = LlamaForCausalLM(config, dtype=dtype, device="meta")
    for key, tensor in model_tensors(config, seed, device, dtype):
        module_name = key[: -len(".weight")]
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if is_linear_key(key):
            setattr(parent, leaf, NF4Linear.from_float(tensor, blocksize=64, double_quant=True, compute_dtype=dtype))
        else:
            getattr(parent, leaf).weight = nn.Parameter(tensor, requires_grad=False)
        del tensor
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"bench/step.py: bezoar model tensors left on the meta device: {leftover[:3]}")
    model.train()
    return model


def build_hf(config, seed, device, dtype):
    """transformers' Llama with bitsandbytes NF4 linears (double quant, compute in ``dtype``) and SDPA,
    holding the same weights as build_bezoar."""
    import bitsandbytes as bnb
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(attn_implementation="sdpa", **{
        k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")})
    hf_config.use_cache = False
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built dense on the device, then each linear swapped for its NF4 twin
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    for key, tensor in model_tensors(config, seed, device, dtype):
        module_name = key[: -len(".weight")]
        parent_name, _, leaf = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if is_linear_key(key):
            linear = bnb.nn.Linear4bit(tensor.shape[1], tensor.shape[0], bias=False, compute_dtype=dtype,
                                       compress_statistics=True, quant_type="nf4", device="meta")
            linear.weight = bnb.nn.Params4bit(tensor, requires_grad=False, compress_statistics=True,
                                              quant_type="nf4", module=linear)
            setattr(parent, leaf, linear.to(device))  # Params4bit quantizes when moved to the device
        else:
            with torch.no_grad():
                getattr(parent, leaf).weight.copy_(tensor)
        del tensor
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def remove_bezoar_lora(model) -> None:
    from bezoar.model.lora import lora_modules

    for name, m in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, m.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config


# ----------------------------------------------------------------------------- data


def make_documents(setup: Setup, tokens: int, vocab: int, pairs: bool, seed: int):
    """Synthetic documents (lognormal lengths around ``doc_mean``), enough to fill the rows of one step;
    pairs share a prompt and differ in their responses."""
    import numpy as np

    from bezoar.data import DocumentSetBuilder

    rng = np.random.default_rng(seed)
    builder = DocumentSetBuilder()
    sigma = 0.6
    mu = math.log(setup.doc_mean) - sigma ** 2 / 2
    total, i = 0, 0
    def length(cap, scale=1.0):
        return int(np.clip(scale * rng.lognormal(mu, sigma), 4, cap))

    while total < 3 * tokens:  # plenty, so the first rows best-fit packing makes are nearly full
        if pairs:  # prompt + chosen + prompt + rejected must fit one row
            prompt = length(setup.row_len // 4, 0.5)
            chosen, rejected = length(setup.row_len // 4, 0.5), length(setup.row_len // 4, 0.5)
            p_ids = rng.integers(3, vocab, size=prompt)
            docs = [(np.concatenate([p_ids, rng.integers(3, vocab, size=n)]).tolist(), prompt)
                    for n in (chosen, rejected)]
            total += 2 * prompt + chosen + rejected
        else:
            n = length(setup.row_len)
            docs = [(rng.integers(3, vocab, size=n).tolist(), max(1, int(n * setup.prompt_frac)))]
            total += n
        builder.add_item(docs, example=i)
        i += 1
    return builder.build()


def make_batch(setup: Setup, tokens: int, vocab: int, pairs: bool, device, seed: int = 0) -> dict:
    from bezoar.data import BatchLoader, batch_to

    rows = max(1, tokens // setup.row_len)
    docs = make_documents(setup, tokens, vocab, pairs, seed)
    loader = BatchLoader(docs, setup.row_len, rows, shuffle=False)
    return batch_to(loader.batch(0, 0), device)


def hf_dpo_rows(setup: Setup, tokens: int, vocab: int, device, seed: int = 0):
    """The peer's DPO batch: as many full rows as bezoar's step has, half chosen and half rejected, each
    one sequence (a prompt of ``prompt_frac`` of the row, then the response)."""
    import torch

    rows = max(2, tokens // setup.row_len)
    rows -= rows % 2
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, setup.row_len), generator=g)
    prompt = int(setup.row_len * setup.prompt_frac)
    ids[rows // 2:, :prompt] = ids[: rows // 2, :prompt]  # a pair shares its prompt
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids.to(device), labels.to(device)


# ----------------------------------------------------------------------------- FLOPs


def matmul_params(config) -> int:
    """Parameters doing multiply-adds per token: everything but the input embedding table."""
    return config.num_parameters - config.vocab_size * config.hidden_size


def attention_pairs(batch) -> int:
    """Causal query-key pairs within the documents of a packed batch."""
    from bezoar.data import DOC_LENGTH

    lengths = batch["doc_table"][:, DOC_LENGTH].double()
    return int((lengths * (lengths + 1) / 2).sum().item())


def model_flops(config, tokens: int, pairs: int, reference_forward: bool) -> float:
    """4 N tokens + attention (4 C per pair forward, 8 C backward, per layer); DPO adds a forward."""
    n = matmul_params(config)
    per_pair = config.num_hidden_layers * config.num_attention_heads * config.head_dim
    flops = 4.0 * n * tokens + 12.0 * per_pair * pairs
    if reference_forward:
        flops += 2.0 * n * tokens + 4.0 * per_pair * pairs
    return flops


# ----------------------------------------------------------------------------- steps


def bezoar_step(model, workload: str, batch: dict, optimizer, params, autocast, dequant_cache: bool = False):
    from bezoar.train.sft import SFTStage

    if workload == "sft":
        stage, units = SFTStage(), float(batch["num_loss_tokens"])
    else:
        from bezoar.train.dpo import DPOStage

        stage, units = DPOStage(), float(batch["doc_table"].shape[0] // 2)

    def step():
        import torch

        from bezoar_kernels import dequant_cache as cache

        with common.environ(BEZOAR_NF4_DEQUANT_CACHE="1" if dequant_cache else "0"):
            cache.begin_step()  # as Trainer.train_step does
            with autocast():
                loss_sum, _ = stage.loss(model, batch)
            (loss_sum.float() / units).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_sequence_logps(logits, labels):
    """Summed log-probs of each row's labelled tokens (the shifted-label convention of transformers)."""
    import torch

    targets = labels[:, 1:]
    logits = logits[:, :-1].float()
    mask = targets != -100
    picked = torch.gather(logits, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (picked * mask).sum(-1)


def hf_step(model, workload: str, data, optimizer, params, autocast):
    import torch
    import torch.nn.functional as F

    if workload == "sft":
        ids, labels = data

        def step():
            with autocast():
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    ids, labels = data
    half = ids.shape[0] // 2

    def step():
        with autocast():
            with torch.no_grad(), model.disable_adapter():
                ref = hf_sequence_logps(model(input_ids=ids).logits, labels)
            policy = hf_sequence_logps(model(input_ids=ids).logits, labels)
            margin = (policy[:half] - ref[:half]) - (policy[half:] - ref[half:])
            loss = -F.logsigmoid(DPO_BETA * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ----------------------------------------------------------------------------- timing and memory


def synchronize(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def time_steps(step, iters: int, cuda: bool) -> list[float]:
    """Milliseconds of each of ``iters`` steps: CUDA events around each one (wall clock on CPU)."""
    import torch

    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def allocated(cuda: bool) -> int | None:
    if not cuda:
        return None
    import torch

    synchronize(cuda)
    return torch.cuda.memory_allocated()


def gemm_peak_tflops(n: int, device, dtype, smoke: bool) -> float:
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=torch.float32).to(dtype)
    ms = common.bench_ms(lambda: torch.matmul(a, b), smoke=smoke)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e12


# ----------------------------------------------------------------------------- the run


class Impl:
    """One implementation's model, built on first use and kept while its cases run; LoRA is swapped
    between the q/k/v and the all-linear configs."""

    def __init__(self, kind: str, config, setup: Setup, device, dtype, cuda: bool):
        self.kind, self.config, self.setup = kind, config, setup
        self.device, self.dtype, self.cuda = device, dtype, cuda
        self.model = None
        self.lora = None
        self.resident = 0  # bytes the model occupies (measured at build)
        self.before_lora = 0  # bytes allocated (by everything) just before the adapters were added
        self.others_at_lora = None  # of those, the other implementations' footprint (set by main)
        self.optimizer = None
        self.params = None

    def ensure(self, lora: str):
        import torch

        if self.model is None:
            before = allocated(self.cuda) or 0
            t0 = time.perf_counter()
            build = build_bezoar if self.kind == "bezoar" else build_hf
            self.model = build(self.config, 0, self.device, self.dtype)
            self.resident = (allocated(self.cuda) or 0) - before
            print(f"built the {self.kind} model in {time.perf_counter() - t0:.1f}s "
                  f"({self.resident / 2**30:.2f} GiB resident)", flush=True)
        if self.lora == lora:
            return
        self.optimizer = None
        if self.lora is not None:
            if self.kind == "bezoar":
                remove_bezoar_lora(self.model)
            else:
                self.model = self.model.unload()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.before_lora = allocated(self.cuda) or 0
        self.others_at_lora = None
        r, targets = self.setup.lora_r, LORA_TARGETS[lora]
        if self.kind == "bezoar":
            from bezoar.model.lora import LoraConfig, apply_lora, lora_parameters

            apply_lora(self.model, LoraConfig(r=r, alpha=float(r), dropout=0.05, targets=targets))
            self.params = lora_parameters(self.model)
        else:
            import peft

            self.model = peft.get_peft_model(self.model, peft.LoraConfig(
                r=r, lora_alpha=r, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"))
            self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, **({"fused": True} if self.cuda else {}))
        self.lora = lora

    def release(self):
        import torch

        self.model = self.optimizer = self.params = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def main() -> int:
    args = parse_args()
    common.setup_smoke(args)
    import torch

    from bezoar.model.config import LlamaConfig, preset
    from bezoar_kernels.dispatch import backend

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("bench/step.py needs a CUDA GPU (use --smoke to check the code path on CPU)", file=sys.stderr)
        return 2
    setup = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32  # the smoke run stays in fp32 on the torch path
    kernels = "auto" if cuda else "torch"
    config = preset(setup.preset) if setup.preset else LlamaConfig(**setup.model_overrides)
    try:
        tokens_list = [int(t) for t in args.tokens.split(",")] if args.tokens else list(setup.tokens)
    except ValueError:
        raise SystemExit(f"bench/step.py: --tokens {args.tokens!r}: expected a comma list of integers") from None
    loras = split_list(args.lora, LORA_TARGETS, "lora")
    impls = split_list(args.impls, IMPLS + EXTRA_IMPLS, "impls")
    workloads = split_list(args.workloads, WORKLOADS, "workloads")

    # Cases in priority order (a --budget cuts from the end): q/k/v before all-linear, SFT before DPO,
    # 8K before 32K; checkpointing modes other than full only at the smallest token count (the
    # activations of off / cheap at 32K do not fit an 80 GB card).
    cases: list[Case] = []
    for lora in loras:
        for workload in workloads:
            for tokens in tokens_list:
                for impl in impls:
                    if impl in ("bezoar-cheap", "bezoar-off") and tokens != min(tokens_list):
                        continue
                    if workload == "dpo" and impl == "bezoar-cheap":
                        continue
                    name = f"{workload}/{impl}/{lora}/{tokens_label(tokens)}"
                    cases.append(Case(name, workload, impl, lora, tokens))
    if args.only:
        chosen = [c for c in cases if c.name == args.only or fnmatch.fnmatch(c.name, args.only)]
        if not chosen:
            print(f"--only {args.only!r}: no such case (a name or a glob); cases are:\n  "
                  + "\n  ".join(c.name for c in cases), file=sys.stderr)
            return 2
        cases = chosen

    notes: list[str] = []
    if any(c.impl == "hf" for c in cases):
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
            import transformers  # noqa: F401
        except Exception as exc:  # the GPU machine may lack one of them
            notes.append(f"hf cases skipped: {type(exc).__name__}: {exc}")
            cases = [c for c in cases if c.impl != "hf"]
    if any(c.impl.startswith("bezoar") and c.workload == "dpo" for c in cases):
        try:
            from bezoar.train.dpo import DPOStage  # noqa: F401
        except ImportError as exc:
            notes.append(f"bezoar DPO cases skipped: bezoar.train.dpo does not import ({exc})")
            cases = [c for c in cases if not (c.impl.startswith("bezoar") and c.workload == "dpo")]
    for note in notes:
        print(f"note: {note}")

    def autocast():
        return torch.autocast("cuda", dtype=dtype) if cuda else contextlib.nullcontext()

    peak_tflops = None
    if not (args.only and args.iters):
        with backend(kernels):
            peak_tflops = gemm_peak_tflops(setup.gemm_n, device, dtype, args.smoke)
        print(f"{str(dtype).replace('torch.', '')} GEMM {setup.gemm_n}^3: {peak_tflops:.2f} TFLOP/s (the MFU peak)")

    batches: dict = {}

    def batch_for(workload: str, tokens: int):
        key = (workload, tokens)
        if key not in batches:
            batches[key] = make_batch(setup, tokens, config.vocab_size, workload == "dpo", device, seed=1)
        return batches[key]

    impl_objs = {"bezoar": Impl("bezoar", config, setup, device, dtype, cuda),
                 "hf": Impl("hf", config, setup, device, dtype, cuda)}
    # What each implementation keeps allocated between its cases (model, adapters, optimizer state,
    # kernel buffers), so one's memory figures do not count the other's model: both stay resident
    # while both have cases left (the first H100 run counted hf's 2.02 GiB in bezoar's adapters).
    footprint = {name: 0 for name in impl_objs}

    def others(kind: str) -> int:
        return sum(v for k, v in footprint.items() if k != kind)
    started = time.perf_counter()
    skipped = []
    profile_ctx = common.maybe_profile(args.profile) if args.profile else contextlib.nullcontext()
    with backend(kernels), profile_ctx:
        for case in cases:
            if args.budget and time.perf_counter() - started > args.budget:
                skipped.append(case.name)
                continue
            kind = "bezoar" if case.impl.startswith("bezoar") else "hf"
            impl = impl_objs[kind]
            batch = batch_for(case.workload, case.tokens)
            try:
                impl.ensure(case.lora)
                if impl.others_at_lora is None:
                    impl.others_at_lora = others(kind)
                if kind == "bezoar":
                    impl.model.gradient_checkpointing = case.impl.split("-")[1]
                    step = bezoar_step(impl.model, case.workload, batch, impl.optimizer, impl.params, autocast,
                                       dequant_cache=case.impl.endswith("-cache"))
                elif case.workload == "sft":
                    step = hf_step(impl.model, "sft", (batch["input_ids"], batch["labels"]), impl.optimizer,
                                   impl.params, autocast)
                else:
                    dpo_rows = hf_dpo_rows(setup, case.tokens, config.vocab_size, device)
                    step = hf_step(impl.model, "dpo", dpo_rows, impl.optimizer, impl.params, autocast)
                if args.only and args.iters:
                    common.run_plain(step, args.iters)
                    print(f"ran {case.name} {args.iters} times")
                    continue
                for _ in range(setup.warmup):
                    step()
                base = allocated(cuda)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                from bezoar_kernels import dequant_cache

                cache_before = dequant_cache.stats()
                times = time_steps(step, setup.iters.get(case.tokens, 3), cuda)
                cache_calls = {k: v - cache_before.get(k, 0) for k, v in dequant_cache.stats().items()}
                if kind == "hf" and case.workload == "dpo":  # its own rows: one sequence each, all real
                    n_rows, row_len = dpo_rows[0].shape
                    tokens, pairs = n_rows * row_len, n_rows * row_len * (row_len + 1) // 2
                else:  # the same packed rows: real tokens, causal pairs within documents
                    tokens, pairs = int(batch["num_tokens"]), attention_pairs(batch)
                case.result = summarize(case, times, tokens, pairs, config, peak_tflops, impl, base, cuda,
                                        others_growth=others(kind) - impl.others_at_lora)
                if kind == "bezoar":  # what went through the dequant cache in the timed steps (none: off)
                    case.result["dequant_cache"] = cache_calls
                if args.breakdown:
                    try:
                        case.result["breakdown"] = step_breakdown(step, args.breakdown, cuda)
                    except Exception as exc:  # the step's timing stands without it
                        case.result["breakdown"] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"{case.name}: breakdown failed ({type(exc).__name__}: {exc})")
                        if args.smoke:
                            raise
                print(f"{case.name}: {case.result['ms']:.1f} ms, {case.result['tokens_per_s']:,.0f} tok/s, "
                      f"MFU {fmt_pct(case.result.get('mfu'))}, peak {fmt_gib(case.result.get('peak_gib'))}",
                      flush=True)
            except torch.cuda.OutOfMemoryError as exc:
                case.result = {"error": "out of memory"}
                print(f"{case.name}: out of memory ({str(exc).splitlines()[0][:120]})")
            except Exception as exc:  # one failing case must not hide the others' figures
                case.result = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{case.name}: failed ({type(exc).__name__}: {exc})")
                if args.smoke:
                    raise
            finally:
                step = None
                if kind == "bezoar":
                    from bezoar_kernels import dequant_cache

                    dequant_cache.clear()  # its slots, where the case had it on
                if impl.optimizer is not None:
                    impl.optimizer.zero_grad(set_to_none=True)  # after a failure, no stale gradients
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                    footprint[kind] = (allocated(cuda) or 0) - others(kind)
            later = {("bezoar" if c.impl.startswith("bezoar") else "hf") for c in cases[cases.index(case) + 1:]}
            for name, obj in impl_objs.items():
                if obj.model is not None and name not in later:
                    obj.release()  # no case left for it: give its memory back
                    footprint[name] = 0
    if args.only and args.iters:
        return 0
    if skipped:
        note = f"--budget {args.budget:g}s reached: skipped {', '.join(skipped)}"
        notes.append(note)
        print(note)

    rows = [dict(case=c.name, workload=c.workload, impl=c.impl, lora=c.lora, tokens_per_step=c.tokens, **c.result)
            for c in cases if c.result]
    comparisons = compare(rows)
    targets = check_targets(rows, comparisons)
    if args.smoke:
        targets = [dict(t, status="smoke, not evaluated") for t in targets]
    print_tables(rows, comparisons, targets, notes)
    print_breakdowns(rows)
    common.write_results("step", rows, args, extra={
        "gemm_peak_tflops": peak_tflops, "gemm_n": setup.gemm_n, "row_len": setup.row_len,
        "model": setup.preset or setup.model_overrides, "matmul_params": matmul_params(config),
        "comparisons": comparisons, "targets": targets, "notes": notes, "skipped": skipped,
    })
    return 0


BREAKDOWN_TOP = 20  # kernels kept per case in a breakdown (the categories sum all of them)


def step_breakdown(step, steps: int, cuda: bool) -> dict:
    """``steps`` steps under torch.profiler (after one more outside it): GPU kernel time per step (CPU
    operator time in smoke runs) by kernel category (``common.kernel_category``) and the top kernels.
    Kernels that overlap (the dequant cache's side stream) are each counted whole, so the sum can
    exceed the step's wall time."""
    rows, total = common.profile_kernels(step, steps, cuda)
    return {"steps": steps, "us_per_step": total, "categories": common.category_totals(rows),
            "kernels": rows[:BREAKDOWN_TOP]}


def print_breakdowns(rows) -> None:
    for r in rows:
        b = r.get("breakdown")
        if not b or "error" in b:
            continue
        print(f"\n{r['case']}: {b['us_per_step'] / 1e3:.1f} ms of kernel time per step over {b['steps']} profiled "
              f"steps (median step {r['ms']:.1f} ms)\n")
        print(common.markdown_table(b["categories"], ["category", "kernels", "calls_per", "us_per", "share"]))


def summarize(case, times, tokens, pairs, config, peak_tflops, impl, base, cuda, others_growth: int = 0) -> dict:
    """The case's figures; ``others_growth``: what the other implementation added to the allocated
    bytes since this one's adapters went on (its model built in between), not this one's."""
    import torch

    ms = statistics.median(times)
    flops = model_flops(config, tokens, pairs, reference_forward=case.workload == "dpo")
    out = {"ms": ms, "ms_min": min(times), "ms_max": max(times), "iters": len(times), "tokens": tokens,
           "tokens_per_s": tokens / (ms * 1e-3), "model_tflop": flops / 1e12,
           "mfu": flops / (ms * 1e-3) / (peak_tflops * 1e12) if peak_tflops else None}
    if cuda:
        transient = torch.cuda.max_memory_allocated() - base
        adapters = base - impl.before_lora - others_growth
        out.update(peak_gib=(impl.resident + adapters + transient) / 2**30, model_gib=impl.resident / 2**30,
                   adapters_and_optimizer_gib=adapters / 2**30, step_transient_gib=transient / 2**30)
    return out


def compare(rows: list[dict]) -> list[dict]:
    """bezoar over hf (same workload, LoRA, tokens) and DPO over SFT (same implementation)."""
    by = {(r["workload"], r["impl"], r["lora"], r["tokens_per_step"]): r for r in rows if "ms" in r}
    out = []
    for (workload, impl, lora, tokens), r in sorted(by.items()):
        if not impl.startswith("bezoar"):
            continue
        peer = by.get((workload, "hf", lora, tokens))
        if peer:
            out.append({"what": "speedup_vs_hf", "workload": workload, "impl": impl, "lora": lora, "tokens": tokens,
                        "ratio": r["tokens_per_s"] / peer["tokens_per_s"],
                        "memory_ratio": (r.get("peak_gib") / peer["peak_gib"]) if peer.get("peak_gib") else None})
    for (workload, impl, lora, tokens), r in sorted(by.items()):
        if workload != "dpo":
            continue
        sft = by.get(("sft", impl, lora, tokens))
        if sft:
            per_token = (r["ms"] / r["tokens"]) / (sft["ms"] / sft["tokens"])
            mem = (r["peak_gib"] / sft["peak_gib"]) if r.get("peak_gib") and sft.get("peak_gib") else None
            out.append({"what": "dpo_over_sft", "workload": "dpo", "impl": impl, "lora": lora, "tokens": tokens,
                        "ratio": per_token, "memory_ratio": mem})
    return out


def check_targets(rows, comparisons) -> list[dict]:
    out = []

    def verdict(name, ok, detail):
        out.append({"target": name, "status": "not measured" if ok is None else ("met" if ok else "missed"),
                    "detail": detail})

    speed = [c for c in comparisons if c["what"] == "speedup_vs_hf" and c["workload"] == "sft"]
    best = {}
    for c in speed:
        key = (c["lora"], c["tokens"])
        if key not in best or c["ratio"] > best[key]["ratio"]:
            best[key] = c
    verdict("SFT tokens/s >= 2.5x transformers + PEFT + bitsandbytes (best bezoar mode per case)",
            all(c["ratio"] >= 2.5 for c in best.values()) if best else None,
            ", ".join(f"{lora} {tokens_label(t)}: {c['ratio']:.2f}x ({c['impl']})" for (lora, t), c in best.items()))
    full = [c for c in speed if c["impl"] == "bezoar-full"]
    verdict("SFT tokens/s >= 2.5x hf, both with full checkpointing",
            all(c["ratio"] >= 2.5 for c in full) if full else None,
            ", ".join(f"{c['lora']} {tokens_label(c['tokens'])}: {c['ratio']:.2f}x" for c in full))
    sft = [r for r in rows if r["workload"] == "sft" and r["impl"].startswith("bezoar") and r.get("mfu")]
    top = max(sft, key=lambda r: r["mfu"], default=None)
    verdict("MFU >= 45% (bezoar SFT, best case)", top["mfu"] >= 0.45 if top else None,
            f"{top['case']}: {top['mfu']:.1%}" if top else "")
    small = [r for r in rows if r["workload"] == "sft" and r["impl"].startswith("bezoar") and r["lora"] == "qkv"
             and r["tokens_per_step"] == 8192 and r.get("peak_gib") is not None]
    lowest = min(small, key=lambda r: r["peak_gib"], default=None)
    verdict("peak memory of the 3B QLoRA SFT step at 8K tokens <= 5 GB (q/k/v LoRA)",
            lowest["peak_gib"] * 2**30 / 1e9 <= 5.0 if lowest else None,
            f"{lowest['case']}: {lowest['peak_gib'] * 2**30 / 1e9:.2f} GB" if lowest else "")
    dpo = [c for c in comparisons if c["what"] == "dpo_over_sft" and c["impl"].startswith("bezoar")]
    verdict("DPO step time <= 1.6x an SFT step on the same tokens (bezoar)",
            all(c["ratio"] <= 1.6 for c in dpo) if dpo else None,
            ", ".join(f"{c['impl']} {c['lora']} {tokens_label(c['tokens'])}: {c['ratio']:.2f}x" for c in dpo))
    dpo_mem = [c for c in dpo if c["memory_ratio"] is not None]
    verdict("DPO peak memory <= 1.2x the SFT step's (bezoar)",
            all(c["memory_ratio"] <= 1.2 for c in dpo_mem) if dpo_mem else None,
            ", ".join(f"{c['impl']} {c['lora']} {tokens_label(c['tokens'])}: {c['memory_ratio']:.2f}x"
                      for c in dpo_mem))
    return out


def fmt_pct(v):
    return "-" if v is None else f"{v:.1%}"


def fmt_gib(v):
    return "-" if v is None else f"{v:.2f} GiB"


def print_tables(rows, comparisons, targets, notes) -> None:
    print()
    print(common.markdown_table(rows, ["case", "ms", "ms_min", "ms_max", "tokens", "tokens_per_s", "mfu",
                                       "peak_gib", "step_transient_gib", "error"]))
    if comparisons:
        print()
        print(common.markdown_table(comparisons, ["what", "workload", "impl", "lora", "tokens", "ratio",
                                                  "memory_ratio"]))
    print("\ntargets (issues 10 and 6):")
    for t in targets:
        print(f"  [{t['status']}] {t['target']}: {t['detail']}")
    for n in notes:
        print(f"note: {n}")


if __name__ == "__main__":
    sys.exit(main())
