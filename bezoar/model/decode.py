"""Decoding with a KV cache: greedy and temperature/top-k/top-p sampling, batched with left padding.

``generate`` takes text and returns text; ``generate_ids`` is the token-level core that the
evaluation harness and the server also use. Three ways to run the decode steps (``decode=``, or
the environment variable ``BEZOAR_DECODE``):

* ``eager``: the plain forward with a growing ``KVCache``, one call per token.
* ``static``: ``LlamaForCausalLM.decode_step`` on a ``StaticKVCache``. Every step has the same
  shapes (the keys are padded to a multiple of ``KEY_BUCKET`` and masked) and the position lives
  on the device, so the host never waits for the GPU inside a step.
* ``graph``: ``static`` with each step shape captured once in a CUDA graph and replayed: one
  launch per token in place of several hundred kernel launches, which at batch 1 is most of the
  time an eager decode step takes on a 3B model.
* ``auto`` (the default): ``graph`` on a CUDA model in eval mode, else ``eager``.

In ``static`` and ``graph`` greedy decoding reads each step's tokens one step late (through a
pinned buffer and an event), so the GPU already runs the next step while the host checks stop
strings. A ``Decoder`` keeps the cache and the graphs between calls; ``generate_ids`` without one
builds a fresh one per call (and under ``auto`` captures only for 32 new tokens or more).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import LlamaConfig

DECODE_MODES = ("auto", "eager", "static", "graph")
KEY_BUCKET = 256  # static steps attend over the cache's first multiple of this many slots


class KVCache:
    """Preallocated keys and values for every layer, (L, B, max_len, Hk, D), filled left to right."""

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device, storage=None):
        shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
        if storage is not None:  # (k, v) views of that shape, each layer's block contiguous
            self.k, self.v = storage
            if tuple(self.k.shape) != shape or tuple(self.v.shape) != shape:
                raise ValueError(f"KVCache storage has shape {tuple(self.k.shape)}, expected {shape}")
        else:
            self.k = torch.empty(shape, dtype=dtype, device=device)
            self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's k/v (B, T, Hk, D) after the cached ones; return all keys/values so far."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, self.length:end] = k
        self.v[layer, :, self.length:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class StaticKVCache(KVCache):
    """A ``KVCache`` whose decode steps are graph-safe.

    The prefill fills it like a ``KVCache`` (``stepping`` False). Decode steps (``stepping`` True)
    write each row's keys and values at that row's device-side index ``slot`` (B,) and return the first
    ``num_keys`` slots. ``key_valid`` (B, max_len) marks the real tokens, and ``decode_step`` builds the
    mask from it. A batch decoded in step keeps every row's slot equal; ``ContinuousBatch`` gives each row
    its own. ``slot`` and ``key_valid`` may be given (views of an owner's tensors, as ``storage``).
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, dtype: torch.dtype, device, storage=None,
                 slot: torch.Tensor | None = None, key_valid: torch.Tensor | None = None):
        super().__init__(config, batch, max_len, dtype, device, storage)
        # Steps attend over slots not written yet (masked): they must hold finite numbers, since a masked
        # key still enters the softmax-times-values product with weight 0, and 0 * NaN is NaN. (Given
        # storage is the owner's to clear.)
        if storage is None:
            self.k.zero_()
            self.v.zero_()
        self.slot = torch.zeros(batch, dtype=torch.long, device=device) if slot is None else slot
        self.key_valid = (torch.zeros(batch, max_len, dtype=torch.bool, device=device) if key_valid is None
                          else key_valid)
        if tuple(self.slot.shape) != (batch,) or tuple(self.key_valid.shape) != (batch, max_len):
            raise ValueError(f"StaticKVCache: slot {tuple(self.slot.shape)} and key_valid "
                             f"{tuple(self.key_valid.shape)} must be ({batch},) and ({batch}, {max_len})")
        self.num_keys = max_len
        self.stepping = False

    def reset(self) -> None:
        self.length = 0
        self.stepping = False
        self.num_keys = self.max_len
        self.key_valid.zero_()

    def mark_step(self) -> None:
        """(Graph-safe.) Let each row's new token see itself: set ``key_valid`` at the row's slot."""
        self.key_valid.scatter_(1, self.slot[:, None], True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if not self.stepping:
            return super().update(layer, k, v)
        # row b's one new key goes to slot[b] (scatter: no host sync, so a CUDA graph can hold it)
        index = self.slot[:, None, None, None].expand(k.shape)
        self.k[layer].scatter_(1, index, k)
        self.v[layer].scatter_(1, index, v)
        return self.k[layer, :, :self.num_keys], self.v[layer, :, :self.num_keys]


def check_top_k(top_k) -> int:
    """``top_k`` as given when it is an integer >= 0 (0: off), else a ValueError naming it."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    return top_k


def _sampling_weights(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """``sampling_probs``, computed as transformers' warpers compute it (``torch.multinomial`` draws from it).

    A temperature so small that the softmax of logit / temperature is NaN (a finite logit scaled to +inf, or
    every finite logit to -inf: 1e-40, say, or one that is 0 in float32) made sampling fail; such a row keeps
    only its largest logits (ties share), the limit of a falling temperature: the largest is scaled to 0, the
    others (after it is subtracted) as usual. Every other row is scaled as transformers scales it, bit for bit."""
    logits = logits.float()
    scores = logits / temperature
    finite = torch.isfinite(logits)
    broken = ((scores == float("inf")) & finite).any(-1, keepdim=True) | (
        finite.any(-1, keepdim=True) & ~torch.isfinite(scores).any(-1, keepdim=True))
    shifted = logits - logits.amax(-1, keepdim=True)
    scores = torch.where(broken, torch.where(shifted == 0, shifted, shifted / temperature), scores)
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # ties with the k-th stay
    if top_p < 1.0:
        # transformers' TopPLogitsWarper, operation for operation: scores sorted ascending, the tokens whose
        # cumulative probability from the least likely up is at most 1 - top_p go, the most likely always stays.
        # (The mass above each token, summed from the top, kept another token in 61 of 200 rows at top_p 0.99
        # by float32 rounding at the cut, and the other end of a run of ties straddling it.)
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return torch.softmax(scores, dim=-1)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """The distribution (B, V), float32, that ``sample_next`` draws from at ``temperature`` > 0.

    The filters run in the order transformers' ``generate(do_sample=True)`` applies its warpers:
    the logits are divided by ``temperature``, then ``top_k`` (0 or >= V: off) keeps the tokens whose
    scaled logit is at least the k-th largest (ties with it stay, so more than k may), then ``top_p``
    (< 1) keeps the smallest set of the most likely remaining tokens whose probability, renormalised
    after top-k, reaches ``top_p`` (the most likely token always stays; of tokens tied at the cut, those
    transformers' ascending sort puts last).
    """
    check_top_k(top_k)
    if temperature <= 0:
        raise ValueError(f"sampling_probs needs a temperature above 0, got {temperature}")
    weights = _sampling_weights(logits, temperature, top_p, top_k)
    return weights / weights.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None,
                top_k: int = 0) -> torch.Tensor:
    """Pick one token per row from logits (B, V): argmax when temperature is 0, else a draw from
    ``sampling_probs`` (temperature, then top-k, then top-p)."""
    check_top_k(top_k)
    if temperature <= 0:
        return logits.argmax(-1)
    weights = _sampling_weights(logits, temperature, top_p, top_k)
    return torch.multinomial(weights, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int


def resolve_decode_mode(mode: str | None, model) -> str:
    """``eager``, ``static`` or ``graph`` for ``mode`` (``auto`` / None: ``BEZOAR_DECODE`` if set, else
    ``graph`` on a CUDA model in eval mode and ``eager`` otherwise)."""
    if mode in (None, "auto"):
        mode = os.environ.get("BEZOAR_DECODE", "").strip().lower() or "auto"
        where = "BEZOAR_DECODE"
    else:
        where = "decode"
    if mode not in DECODE_MODES:
        raise ValueError(f"{where}={mode!r}: choose one of {', '.join(DECODE_MODES)}")
    cuda = model.device.type == "cuda" and torch.cuda.is_available()
    if mode == "auto":
        return "graph" if cuda and not model.training else "eager"
    if mode == "graph" and not cuda:
        raise ValueError(f"{where}=graph needs a model on a CUDA device (this one is on {model.device})")
    if mode == "graph" and model.training:
        raise ValueError(f"{where}=graph needs the model in eval mode: a graph would replay one dropout mask")
    return mode


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists as a left-padded batch: ids (B, T) and attention mask (B, T), on the CPU."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


# The default bound on one admit's left-padded prompt tokens (bezoar.serve's --max-prefill-tokens, bench/serve.py's
# --prefill-tokens): 32 rows of 256-token prompts, or a 2,048-token context's prompt alone; OpenLLaMA 3B's
# activations for that many tokens are a few hundred MB.
MAX_PREFILL_TOKENS = 8192


def prefill_take(lengths, free: int, max_tokens: int | None) -> int:
    """How many of the waiting prompts (their lengths, first come first) one ``ContinuousBatch.admit`` takes:
    at most ``free``, and while the left-padded prefill (the prompts taken times the longest of them) stays
    within ``max_tokens`` (None: no bound). The first is taken whatever its length (alone, a prompt longer
    than the bound), so nothing waits forever; the others stay first in line for the next step's admit.

    A bound keeps a wave of long prompts from stopping the running rows for one long prefill (and its
    activations, which grow with the padded tokens, within reach), and keeps one long prompt from padding
    many short ones to its length."""
    taken = longest = 0
    for n in lengths:
        if taken >= free:
            break
        wider = max(longest, n)
        if taken and max_tokens is not None and (taken + 1) * wider > max_tokens:
            break
        taken, longest = taken + 1, wider
    return taken


def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
    """A prefill's (or a step's) logits at each row's last position, (B, V): the model's hidden states, then
    the LM head at that position alone. ``model(...)[:, -1]`` computed the head at every position first: for
    32 prompts of 2,048 tokens on OpenLLaMA 3B that is a (32, 2048, 32000) tensor, 4.2 GB in bf16, and 13
    TFLOP of which all but 1/2048 were dropped."""
    hidden = model(input_ids, attention_mask=attention_mask, cache=cache, return_hidden=True)
    return model.lm_head(hidden[:, -1])


def eos_set(eos_id) -> frozenset[int]:
    """The ids that end a sequence: one id, several (a model whose generation_config.json lists more than one
    EOS, as chat models do: transformers' generate stops at any of them), or None (none)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _Rows:
    """Per-row bookkeeping on the host: new tokens, finish reasons, which rows still run."""

    def __init__(self, batch: int, max_new_tokens: int, eos_id, should_stop, on_done=None):
        self.new_ids: list[list[int]] = [[] for _ in range(batch)]
        self.reasons = ["length"] * batch
        self.active = [True] * batch
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_set(eos_id)
        self.should_stop = should_stop
        self.on_done = on_done

    def take(self, tokens: list[int]) -> bool:
        """Record one token per row; False once every row has stopped or the longest is full."""
        for row, tok in enumerate(tokens):
            if not self.active[row]:
                continue
            if tok in self.eos_ids:
                self.active[row] = False
                self.reasons[row] = "stop"
            else:
                self.new_ids[row].append(tok)
                if self.should_stop is not None and self.should_stop(row, self.new_ids[row]):
                    self.active[row] = False
                    self.reasons[row] = "stop"
            if not self.active[row] and self.on_done is not None:
                self.on_done(row, self.new_ids[row], "eos" if tok in self.eos_ids else "stop")
        return any(self.active) and max(map(len, self.new_ids)) < self.max_new_tokens


class _TokenQueue:
    """Tokens (B,) copied to the host without waiting: pinned buffers and events on CUDA, so the host
    reads step i while the GPU runs step i + 1. At most two are in flight."""

    def __init__(self, batch: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list = []
        if self.cuda:
            self.buffers = [torch.empty(batch, dtype=torch.long, pin_memory=True) for _ in range(2)]
            self.events = [torch.cuda.Event() for _ in range(2)]
            self.turn = 0

    def push(self, tokens: torch.Tensor) -> None:
        tokens = tokens.reshape(-1)
        if not self.cuda:
            self.pending.append(tokens.tolist())
            return
        if len(self.pending) >= 2:
            raise RuntimeError("_TokenQueue: pop before a third push")
        buf, event = self.buffers[self.turn], self.events[self.turn]
        buf.copy_(tokens, non_blocking=True)
        event.record()
        self.pending.append((buf, event))
        self.turn ^= 1

    def pop(self) -> list[int]:
        item = self.pending.pop(0)
        if not self.cuda:
            return item
        buf, event = item
        event.synchronize()
        return buf.tolist()


class _DecodeState:
    """What static decode steps of one batch size share: the cache (a view of the decoder's storage),
    the step's inputs, the graphs."""

    def __init__(self, model, batch: int, storage: tuple[torch.Tensor, torch.Tensor],
                 rows: _RowTensors | None = None):
        from bezoar_kernels.rope import rope_inv_freq

        device = model.device
        capacity = storage[0].shape[2]
        view = (storage[0][:, :batch], storage[1][:, :batch])
        if rows is None:  # a batch of its own
            self.cache = StaticKVCache(model.config, batch, capacity, model.dtype, device, storage=view)
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        else:  # the first rows of a ContinuousBatch's tensors: every size steps the same rows
            self.cache = StaticKVCache(model.config, batch, capacity, model.dtype, device, storage=view,
                                       slot=rows.slot[:batch], key_valid=rows.key_valid[:batch])
            self.tokens = rows.tokens[:batch]
            self.positions = rows.positions[:batch]
        # a continuous batch's idle rows step too: their slot wraps around instead of running off the cache
        self.wrap = rows is not None
        self.inv_freq = rope_inv_freq(model.config.head_dim, model.config.rope_theta, device)
        self.graphs: dict[tuple[int, bool], tuple] = {}  # (num_keys, greedy) -> (CUDAGraph, logits)
        self.pool = None
        self.side_stream = None  # where warm-up steps run before a capture (one per state)
        self.scratch: list[torch.Tensor] = []  # kernel buffers the graphs write into
        self.fingerprint = None


_MODULE_SETTINGS = ("training", "enabled", "scaling", "dropout_p", "compute_dtype", "offset", "blocksize", "r")


def _fingerprint(model) -> tuple:
    """What a captured step depends on besides tensor contents. A change drops the graphs, so an adapter
    switched off, a new adapter, reloaded weights or another kernel setting is used, not replayed stale:

    * the module tree, and per module its Python-side settings (train/eval, LoRA switch, scaling,
      dropout, NF4 compute dtype, offset and blocksize) and the storage of its parameters and buffers;
    * the kernel backend (``bezoar_kernels.dispatch``), the NF4 / LoRA path constants, the tuning
      entry in effect for the model's device, every ``BEZOAR_*`` environment variable, and SDPA's
      enabled backends.

    Read from each module's ``__dict__`` (``getattr`` on an ``nn.Module`` is slow for missing names).
    """
    from bezoar_kernels import dispatch, tuning
    from bezoar_kernels import lora as lora_kernels
    from bezoar_kernels import nf4_matmul

    parts = []
    for name, m in model.named_modules():
        d = m.__dict__
        parts.append((name, id(m), tuple(d.get(k) for k in _MODULE_SETTINGS)))
        for group in (d["_parameters"], d["_buffers"]):
            for key, t in group.items():
                parts.append((key, None) if t is None else (key, t.data_ptr(), t.shape, t.dtype))
    device = next((t.device for t in model.parameters()), None)
    settings = (dispatch.current_backend(), nf4_matmul.FUSED_MAX_M, nf4_matmul.GEMV_MAX_M,
                lora_kernels.LARGE_M_PATH, lora_kernels.MAX_KERNEL_RANK,
                json.dumps(tuning.summary(device), sort_keys=True) if device is not None else None,
                tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("BEZOAR_"))))
    sdpa = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled())
    return tuple(parts), settings, sdpa


def _kernel_scratch() -> list[torch.Tensor]:
    """The kernels' shared scratch buffers (NF4 and LoRA dequantization). A captured graph writes into
    the ones that existed at capture, so its state keeps them alive even if the kernels replace them."""
    from bezoar_kernels import lora as lora_kernels
    from bezoar_kernels import nf4_matmul

    return [*nf4_matmul._dequant_buffers.values(), *lora_kernels._dequant_buffers.values()]


class Decoder:
    """Generation for one model that keeps its static KV cache and CUDA graphs between calls.

    Hold one where the same model generates again and again (the server, the harness, a bench):
    the first call at a batch size captures a graph per step shape, later calls replay them. One
    key/value storage, sized for the call that needed it (rows x slots, the slots rounded up to
    ``KEY_BUCKET``), serves every batch size that fits in it: each size's cache is a view of its
    first rows, with its own graphs. A call that does not fit replaces the storage (and drops every
    size's graphs), so the memory held is at most what one call needed, until ``release()``. Graphs
    are captured again whenever the model's modules, weights, adapter switches or kernel settings
    change between calls (``_fingerprint``).

    ``pad_batch`` (0: off): decode a batch of B rows as the next power of two, at most ``pad_batch``
    rows (the extra rows repeat the last prompt and its tokens, and are dropped), so a server whose
    batches vary in size keeps graphs for a few sizes instead of one per size. ``graph_min_tokens``:
    under ``auto``, calls asking for fewer new tokens run static steps without capturing (a capture
    costs about one step plus a device synchronisation, worth it only when it is replayed enough).
    """

    def __init__(self, model, decode: str | None = "auto", bucket: int = KEY_BUCKET, pad_batch: int = 0,
                 graph_min_tokens: int = 0):
        if bucket <= 0:
            raise ValueError(f"bucket must be positive, got {bucket}")
        self.model = model
        self.decode = decode
        self.bucket = bucket
        self.pad_batch = pad_batch
        self.graph_min_tokens = graph_min_tokens
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None  # (k, v): (L, rows, slots, Hk, D)
        self._states: dict[int, _DecodeState] = {}  # batch size -> its view of the storage and its graphs
        self._graphs_failed = False  # a capture raised once: this decoder runs static steps from then on

    def release(self) -> None:
        """Free the cache and the graphs (the next call builds them again)."""
        self._states.clear()
        self._storage = None

    def resolve(self, max_new_tokens: int) -> str:
        """The mode a call for ``max_new_tokens`` runs in: ``eager``, ``static`` or ``graph``."""
        model = self.model
        mode = resolve_decode_mode(self.decode, model)
        if mode == "graph":
            explicit = self.decode == "graph" or os.environ.get("BEZOAR_DECODE", "").strip().lower() == "graph"
            if self._graphs_failed or (not explicit and max_new_tokens < self.graph_min_tokens):
                mode = "static"
            elif torch.is_autocast_enabled("cuda"):
                # autocast's weight-cast cache is freed when its context ends: a graph would read freed memory
                mode = "static"
        return mode

    @torch.no_grad()
    def generate_ids(self, input_ids, attention_mask=None, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_p: float = 1.0, eos_id: int | Iterable[int] | None = None,
                     generator: torch.Generator | None = None,
                     should_stop=None, top_k: int = 0, on_done=None) -> tuple[list[list[int]], list[str]]:
        """As ``bezoar.model.generate_ids``."""
        check_top_k(top_k)  # before the prefill, not at the first draw
        model = self.model
        mode = self.resolve(max_new_tokens)
        input_ids = input_ids.to(model.device)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif T > 1:  # a row padded on the right (or with holes) would continue its pad tokens; checked where the
            # mask was made (the tokenizer's masks are on the CPU: no wait for the device)
            late = (attention_mask[:, 1:].long() < attention_mask[:, :-1].long()).any(dim=1).nonzero()
            if late.numel():
                raise ValueError(f"generate_ids: row {int(late[0])} of attention_mask has padding after its tokens; "
                                 "the batch must be left-padded (Tokenizer.batch(..., padding_side='left'))")
        attention_mask = attention_mask.to(model.device).long()
        rows = _Rows(B, max_new_tokens, eos_id, should_stop, on_done)
        if max_new_tokens <= 0 or B == 0:
            return rows.new_ids, rows.reasons
        if mode == "eager":
            return _generate_eager(model, input_ids, attention_mask, rows, temperature, top_p, top_k, generator)
        padded = min(1 << (B - 1).bit_length(), max(B, self.pad_batch)) if self.pad_batch else B
        if padded > B:
            input_ids = torch.cat([input_ids, input_ids[-1:].expand(padded - B, T)])
            attention_mask = torch.cat([attention_mask, attention_mask[-1:].expand(padded - B, T)])
        device = torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext()
        with device:  # events, streams and the pinned copies on the model's device
            return self._generate_static(input_ids, attention_mask, rows, temperature, top_p, top_k, generator,
                                         graphs=mode == "graph")

    def _state_for(self, batch: int, needed: int) -> _DecodeState:
        model, storage = self.model, self._storage
        if (storage is None or storage[0].shape[1] < batch or storage[0].shape[2] < needed
                or storage[0].dtype != model.dtype or storage[0].device != model.device):
            self.release()  # the old storage and graphs go before the new storage is allocated
            c = model.config
            shape = (c.num_hidden_layers, batch, _round_up(needed, self.bucket), c.num_key_value_heads, c.head_dim)
            # zeros: steps attend over masked slots not written yet, which must hold finite numbers
            self._storage = (torch.zeros(shape, dtype=model.dtype, device=model.device),
                             torch.zeros(shape, dtype=model.dtype, device=model.device))
        st = self._states.get(batch)
        if st is None:
            st = self._states[batch] = _DecodeState(model, batch, self._storage)
        return st

    def _generate_static(self, input_ids, attention_mask, rows: _Rows, temperature, top_p, top_k, generator,
                         graphs):
        model = self.model
        B, T = input_ids.shape  # B may exceed len(rows.new_ids): padded rows are decoded and dropped
        real = len(rows.new_ids)
        max_new = rows.max_new_tokens
        st = self._state_for(B, T + max_new)
        if graphs:
            fingerprint = _fingerprint(model)
            if fingerprint != st.fingerprint:
                st.graphs.clear()
                # and a new memory pool for the next capture: torch refuses to capture into a pool whose
                # graphs are all gone while blocks allocated in it are still alive (an internal assert,
                # use_count > 0, seen on an H100 with torch 2.11 when the adapters were switched off)
                st.pool = None
                st.fingerprint = fingerprint
        cache = st.cache
        cache.reset()
        logits = last_logits(model, input_ids, attention_mask, cache)
        cache.key_valid[:, :T] = attention_mask.bool()
        cache.slot.fill_(T)
        st.positions.copy_(attention_mask.sum(1, keepdim=True))  # the next token's rotary position
        cache.stepping = True
        greedy = temperature <= 0
        # Greedy steps run one ahead of the host. Sampled ones do not: a step the host did not need would
        # draw from the caller's generator, and its later draws would differ from the eager loop's.
        ahead = greedy
        queue = _TokenQueue(B, model.device)

        def draw(logits):  # only the real rows draw from the generator; padded rows copy the last one
            nxt = sample_next(logits[:real], temperature, top_p, generator, top_k)
            if B > real:
                nxt = torch.cat([nxt, nxt[-1:].expand(B - real)])
            st.tokens.copy_(nxt[:, None])

        draw(logits)
        queue.push(st.tokens)
        produced = 1
        try:
            while True:
                if not ahead and not rows.take(queue.pop()[:real]):
                    break
                if produced < max_new:  # the step that feeds token `produced` and yields the next one
                    cache.num_keys = min(cache.max_len, _round_up(T + produced, self.bucket))
                    logits = self._step(st, greedy, graphs)
                    if not greedy:
                        draw(logits)
                    queue.push(st.tokens)
                    produced += 1
                if ahead and not rows.take(queue.pop()[:real]):
                    break
        finally:
            cache.stepping = False
        return rows.new_ids, rows.reasons

    def _body(self, st: _DecodeState, greedy: bool) -> torch.Tensor:
        logits = self.model.decode_step(st.tokens, st.positions, st.cache, st.inv_freq)
        st.cache.slot.add_(1)
        if st.wrap:
            st.cache.slot.remainder_(st.cache.max_len)
        st.positions.add_(1)
        if greedy:
            st.tokens.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def _step(self, st: _DecodeState, greedy: bool, graphs: bool) -> torch.Tensor:
        """Run one decode step: a graph replay when one is captured for this shape, else eagerly (and
        then, in graph mode, capture one: the eager run has compiled and tuned every kernel)."""
        key = (st.cache.num_keys, greedy)
        graphs = graphs and not self._graphs_failed
        if graphs and key in st.graphs:
            graph, logits = st.graphs[key]
            graph.replay()
            return logits
        if not graphs:
            return self._body(st, greedy)
        # Warm up on a side stream (lazy initialisations must not land in the capture), as a real step.
        current = torch.cuda.current_stream()
        if st.side_stream is None:
            st.side_stream = torch.cuda.Stream()
        st.side_stream.wait_stream(current)
        with torch.cuda.stream(st.side_stream):
            logits = self._body(st, greedy)
        current.wait_stream(st.side_stream)
        try:
            if st.pool is None:
                st.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=st.pool, capture_error_mode="thread_local"):
                captured = self._body(st, greedy)
            st.graphs[key] = (graph, captured)
            st.scratch = _kernel_scratch()
        except Exception as exc:  # decoding goes on without graphs; the tokens are the same
            self._graphs_failed = True
            st.graphs.clear()
            st.pool = None
            warnings.warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {exc}); "
                          "this decoder runs without graphs from here on", RuntimeWarning, stacklevel=3)
        return logits


@dataclass
class _RowTensors:
    """A ``ContinuousBatch``'s per-row device state, for all its rows; each step size uses the first rows."""

    tokens: torch.Tensor  # (R, 1): the token each row feeds next
    positions: torch.Tensor  # (R, 1): that token's rotary position
    slot: torch.Tensor  # (R,): where that token's key and value go
    key_valid: torch.Tensor  # (R, width): the row's real keys


@dataclass(eq=False)
class Sequence:
    """One prompt decoded in a ``ContinuousBatch``, and what it has produced so far.

    ``should_stop(new_ids) -> bool`` is asked after each token kept (stop strings, a client gone);
    ``on_done(sequence)`` is called once, when the sequence has ended. ``generator`` None draws from the
    batch's generator; a sequence with a generator of its own draws alone, so its random numbers do not
    depend on the rows beside it. ``tag`` is the caller's.
    """

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    on_done: Callable[["Sequence"], None] | None = None
    tag: Any = None
    new_ids: list[int] = field(default_factory=list)
    # None while it runs; then "eos" (the EOS, not kept in new_ids), "stop" (should_stop), "length"
    # (max_new_tokens) or "error" (``error`` says what failed)
    finish: str | None = None
    error: BaseException | None = None
    row: int | None = None
    _in_flight: int = field(default=0, repr=False)  # its steps launched whose tokens the host has not read


class _CallbackError(Exception):
    """A ``Sequence.on_done`` raised (``error``): the caller's failure, not the batch's."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class ContinuousBatch:
    """Continuous batching: sequences join free rows between decode steps and leave the moment they end.

    ``admit`` prefills new sequences (together, left-padded), copies their keys and values into free rows
    of one static KV cache and draws their first tokens; ``step`` decodes one token for every running row.
    Each row has its own cache slot and rotary position, so a row that joins late decodes exactly as it
    would in a batch of its own (up to the floating-point effects of sharing a matmul with other rows). A
    row's tokens go to its ``Sequence``; ``should_stop``, the EOS and ``max_new_tokens`` end it, and its row
    is free for the next ``admit``.

    A step runs the first ``b`` rows, ``b`` the power of two (at most ``max_rows``) that covers the highest
    row in use; new sequences take the lowest free rows. Steps are ``decode_step`` on the shared cache, as
    ``Decoder``'s static mode, and under ``graph`` each (rows, keys) shape is captured once and replayed
    (``decode`` ``eager`` runs the same steps without graphs). Greedy rows take the argmax inside the step;
    sampled rows then draw, one ``sample_next`` per set of sampling settings. While only greedy rows run, the
    host reads a step's tokens while the next one runs (``step``); a new row can join at any step.

    The cache holds the rows in use (a power of two, at most ``max_rows``) and the slots the longest sequence
    needs (prompt plus ``max_new_tokens``, rounded up to ``bucket``): one request does not allocate all
    ``max_rows`` rows at the full context. It grows by a copy when a sequence needs a row or slots it lacks
    (and the graphs are captured again); it does not shrink (``release`` frees it while no row runs). The
    graphs are dropped, as ``Decoder``'s, when the model or a kernel setting changes (``_fingerprint``),
    checked at an ``admit`` while no row runs.

    Failures stay with the sequences they touch: a prefill that fails (out of memory growing the cache, say)
    raises from ``admit`` with nothing placed and the running rows intact; a draw or a ``should_stop`` that
    fails ends its own sequences (finish ``"error"``); a step that fails ends every running row (``fail``).
    """

    def __init__(self, model, max_rows: int, decode: str | None = "auto", eos_id: int | Iterable[int] | None = None,
                 pad_id: int = 0, generator: torch.Generator | None = None, bucket: int = KEY_BUCKET):
        if max_rows < 1:
            raise ValueError(f"ContinuousBatch needs max_rows >= 1, got {max_rows}")
        self.model = model
        self.decoder = Decoder(model, decode, bucket=bucket)  # its step and graph capture
        self.max_rows = max_rows
        self.bucket = bucket
        self.eos_ids = eos_set(eos_id)  # any of them ends a sequence
        self.pad_id = pad_id
        self.generator = generator
        self.rows: list[Sequence | None] = [None] * max_rows
        self._ends = [0] * max_rows  # host copy of each running row's slot
        self._storage: tuple[torch.Tensor, torch.Tensor] | None = None
        self._tensors: _RowTensors | None = None
        self._states: dict[int, _DecodeState] = {}
        self._fingerprint = None
        self._pending: deque = deque()  # steps launched, tokens not read: (host list | (buf, event, n), rows)
        self._buffers: list | None = None  # two pinned (max_rows,) buffers and their events (CUDA)
        self._turn = 0
        self.steps = 0  # decode steps run (for tests and logs)
        self.largest = 0  # most rows running in one step

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.rows if s is not None]

    @property
    def free(self) -> int:
        return sum(s is None for s in self.rows)

    def release(self) -> None:
        """Free the cache and the graphs (the next ``admit`` builds them again); only when no row runs."""
        if self.running:
            raise RuntimeError("ContinuousBatch.release: rows are still running")
        self._pending.clear()  # steps of rows that had all ended
        self._states.clear()
        self._storage = self._tensors = None

    def _device(self):
        model = self.model
        return torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext()

    def _graphs(self) -> bool:
        return self.decoder.resolve(1 << 30) == "graph"

    def _reserve(self, rows: int, needed: int) -> None:
        """Make the cache hold at least ``rows`` rows (rounded up to a power of two, at most ``max_rows``) of at
        least ``needed`` slots (rounded up to ``bucket``), keeping the running rows' keys and values."""
        old, old_rows = self._storage, self._tensors
        if old is not None and old[0].shape[1] >= rows and old[0].shape[2] >= needed:
            return
        model, c = self.model, self.model.config
        R = min(self.max_rows, 1 << (max(rows, old[0].shape[1] if old is not None else 1) - 1).bit_length())
        width = max(_round_up(needed, self.bucket), old[0].shape[2] if old is not None else 0)
        shape = (c.num_hidden_layers, R, width, c.num_key_value_heads, c.head_dim)
        dev = model.device
        # Allocated and filled before anything is dropped: a failure here (out of memory, most likely, with the
        # old cache still held) fails the admit that asked, and the running rows decode on in the old cache.
        # zeros: steps attend over masked slots not written yet, which must hold finite numbers
        storage = (torch.zeros(shape, dtype=model.dtype, device=dev), torch.zeros(shape, dtype=model.dtype, device=dev))
        tensors = _RowTensors(tokens=torch.zeros(R, 1, dtype=torch.long, device=dev),
                              positions=torch.zeros(R, 1, dtype=torch.long, device=dev),
                              slot=torch.zeros(R, dtype=torch.long, device=dev),
                              key_valid=torch.zeros(R, width, dtype=torch.bool, device=dev))
        if old is not None:
            r, w = old[0].shape[1], old[0].shape[2]
            storage[0][:, :r, :w] = old[0]
            storage[1][:, :r, :w] = old[1]
            tensors.key_valid[:r, :w] = old_rows.key_valid
            for name in ("tokens", "positions", "slot"):
                getattr(tensors, name)[:r] = getattr(old_rows, name)
        self._states.clear()  # drops the graphs that read the old storage
        self._storage, self._tensors = storage, tensors

    def _state(self, b: int) -> _DecodeState:
        st = self._states.get(b)
        if st is None:
            st = self._states[b] = _DecodeState(self.model, b, self._storage, rows=self._tensors)
            st.cache.stepping = True  # prefills go to a cache of their own
        return st

    def _check_fingerprint(self) -> None:
        """Drop every graph when the model or a kernel setting changed since they were captured."""
        fingerprint = _fingerprint(self.model)
        if fingerprint != self._fingerprint:
            for st in self._states.values():
                st.graphs.clear()
                st.pool = None  # a fresh pool for the next capture (see Decoder._generate_static)
            self._fingerprint = fingerprint

    def _sample_into(self, out: torch.Tensor, logits: torch.Tensor, pairs: list[tuple[int, Sequence]]) -> None:
        """Write into ``out[i]`` a draw from ``logits[i]`` for each sampled ``(i, sequence)``; greedy ones keep
        what ``out`` holds (the argmax). A set of sampling settings whose draw fails ends its own sequences
        with the error, not the others'."""
        groups: dict[tuple, list[tuple[int, Sequence]]] = {}
        for i, seq in pairs:
            if seq.temperature > 0 and seq.finish is None:  # a generator of its own: a group of its own
                key = (seq.temperature, seq.top_p, seq.top_k, None if seq.generator is None else id(seq))
                groups.setdefault(key, []).append((i, seq))
        for (temperature, top_p, top_k, _), members in groups.items():
            gen = members[0][1].generator or self.generator
            index = torch.tensor([i for i, _ in members], dtype=torch.long, device=logits.device)
            try:
                out[index] = sample_next(logits[index], temperature, top_p, gen, top_k)
            except Exception as e:  # noqa: BLE001 - the error is the sequences' answer
                for _, seq in members:
                    seq.finish, seq.error = "error", e

    def admit(self, sequences: list[Sequence]) -> None:
        """Prefill ``sequences`` together, put them in free rows and record their first tokens (a sequence may
        end at once). More sequences than free rows is an error."""
        if not sequences:
            return
        if len(sequences) > self.free:
            raise ValueError(f"ContinuousBatch.admit: {len(sequences)} sequences for {self.free} free rows")
        for seq in sequences:
            if not seq.prompt_ids:
                raise ValueError("ContinuousBatch.admit: a sequence has an empty prompt")
            if seq.max_new_tokens < 1:
                raise ValueError(f"ContinuousBatch.admit: max_new_tokens must be >= 1, got {seq.max_new_tokens}")
            check_top_k(seq.top_k)
            if seq.row is not None or seq.finish is not None:
                raise ValueError("ContinuousBatch.admit: a sequence can be admitted once")
        free = [r for r, s in enumerate(self.rows) if s is None][:len(sequences)]
        tokens = self._prefill(sequences, free)
        for seq, r in zip(sequences, free):
            seq.row, self.rows[r], self._ends[r] = r, seq, len(seq.prompt_ids)
        try:
            self._record(list(zip(sequences, tokens)))
        except _CallbackError as e:
            raise e.error from None

    def _prefill(self, sequences: list[Sequence], rows: list[int]) -> list[int]:
        """The model's part of ``admit``: prefill, fill ``rows`` of the cache, draw; the first tokens."""
        model = self.model
        with self._device(), torch.no_grad():
            self._reserve(max(rows) + 1, max(len(s.prompt_ids) + s.max_new_tokens for s in sequences))
            if self._graphs() and not self.running:
                # (checked when no row decodes: the modules are walked, milliseconds on a 3B model, and a model
                # changed under running rows would be wrong for them anyway)
                self._check_fingerprint()
            ids, mask = left_pad([s.prompt_ids for s in sequences], self.pad_id)
            n, T = ids.shape
            dev = model.device
            cache = KVCache(model.config, n, T, model.dtype, dev)
            logits = last_logits(model, ids.to(dev), mask.to(dev), cache)
            first = logits.argmax(-1)
            self._sample_into(first, logits, list(enumerate(sequences)))
            k, v = self._storage
            t = self._tensors
            lengths = [len(s.prompt_ids) for s in sequences]
            for i, (r, L) in enumerate(zip(rows, lengths)):
                k[:, r, :L] = cache.k[:, i, T - L:]
                v[:, r, :L] = cache.v[:, i, T - L:]
            index = torch.tensor(rows, dtype=torch.long, device=dev)
            length = torch.tensor(lengths, dtype=torch.long, device=dev)
            t.key_valid[index] = torch.arange(t.key_valid.shape[1], device=dev)[None, :] < length[:, None]
            t.slot[index] = length
            t.positions[index, 0] = length
            t.tokens[index, 0] = first
            return first.tolist()

    def step(self) -> None:
        """Decode one token for every running row, and record the tokens that are ready.

        While every running row is greedy, a step's tokens are read on the host while the next step runs
        (one step behind, as ``Decoder``'s static mode): the host's work (stop strings, streaming) overlaps
        the device's. A row that ended meanwhile has one more token decoded, which is dropped; a step whose
        rows will all have reached ``max_new_tokens`` is not launched. With a sampled row running, each
        step's tokens are read at once.

        A failure of the model or the device ends every running sequence with it (``fail``); the step does
        not raise, unless the device fails again while the ended rows are reset (raised once every sequence has
        been told). An exception from an ``on_done`` is raised, once the step's bookkeeping is done."""
        running = [(r, s) for r, s in enumerate(self.rows) if s is not None]
        launch = [(r, s) for r, s in running if len(s.new_ids) + s._in_flight < s.max_new_tokens]
        try:
            with self._device():  # the events and pinned copies too: an event records the current device's stream
                if launch:
                    tokens = self._decode(running)
                    self.steps += 1
                    self.largest = max(self.largest, len(running))
                    for r, _ in running:
                        self._ends[r] += 1
                    self._push(tokens, running)
                ahead = bool(launch) and all(s.temperature <= 0 for _, s in running)
                while len(self._pending) > (1 if ahead else 0):
                    self._record(*self._pop())
        except _CallbackError as e:  # the caller's on_done: the batch itself is fine
            raise e.error from None
        except Exception as e:  # the model or the device failed: the rows' state is unknown
            self.fail(e)

    def _push(self, tokens: torch.Tensor, running: list[tuple[int, Sequence]]) -> None:
        """Queue a step's tokens (b,) for the host, copied without waiting on CUDA (pinned buffers and events;
        at most two in flight)."""
        for _, seq in running:
            seq._in_flight += 1
        if tokens.device.type != "cuda":
            self._pending.append((tokens.tolist(), running))
            return
        if self._buffers is None:
            self._buffers = [(torch.empty(self.max_rows, dtype=torch.long, pin_memory=True), torch.cuda.Event())
                             for _ in range(2)]
        buf, event = self._buffers[self._turn]
        self._turn ^= 1
        buf[:tokens.numel()].copy_(tokens, non_blocking=True)
        event.record()
        self._pending.append(((buf, event, tokens.numel()), running))

    def _pop(self) -> tuple[list[tuple[Sequence, int]]]:
        """The oldest queued step's tokens, for the sequences it decoded that have not ended since (as
        ``_record``'s argument)."""
        item, running = self._pending.popleft()
        for _, seq in running:
            seq._in_flight -= 1
        if isinstance(item, tuple):
            buf, event, n = item
            event.synchronize()
            item = buf[:n].tolist()
        # every sequence that still holds its row: one whose draw failed in this step (finish "error") too, which
        # _record then ends
        return ([(seq, item[r]) for r, seq in running if self.rows[r] is seq],)

    def _decode(self, running: list[tuple[int, Sequence]]) -> torch.Tensor:
        """The model's part of ``step``: launch one decode step of the first rows; their next tokens (b,), on
        the device, not waited for."""
        top = running[-1][0] + 1
        b = min(self.max_rows, 1 << (top - 1).bit_length())
        with self._device(), torch.no_grad():
            st = self._state(b)
            width = st.cache.max_len
            st.cache.num_keys = min(width, _round_up(max(self._ends[r] for r, _ in running) + 1, self.bucket))
            logits = self.decoder._step(st, True, self._graphs())
            self._sample_into(st.tokens[:, 0], logits, running)
            return st.tokens[:, 0]

    def fail(self, error: BaseException) -> None:
        """End every running sequence with ``error`` (finish ``"error"``, ``on_done`` called)."""
        for _, running in self._pending:
            for _, seq in running:
                seq._in_flight -= 1
        self._pending.clear()
        try:
            self._record([(seq, None) for seq in self.running], error)
        except _CallbackError as e:
            raise e.error from None

    def _record(self, taken: list[tuple[Sequence, int | None]], error: BaseException | None = None) -> None:
        ended = []
        for seq, tok in taken:
            if error is not None:
                seq.finish, seq.error = "error", error
            if seq.finish is None:
                if tok in self.eos_ids:
                    seq.finish = "eos"
                else:
                    seq.new_ids.append(tok)
                    try:
                        if seq.should_stop is not None and seq.should_stop(seq.new_ids):
                            seq.finish = "stop"
                    except Exception as e:  # noqa: BLE001 - the error is the sequence's answer
                        seq.finish, seq.error = "error", e
                    if seq.finish is None and len(seq.new_ids) >= seq.max_new_tokens:
                        seq.finish = "length"
            if seq.finish is not None:
                ended.append(seq)
        reset_error = None
        if ended:
            for seq in ended:
                self.rows[seq.row] = None
            if self._tensors is not None:  # an idle row steps from slot 0, seeing only what it writes itself
                try:
                    with self._device():
                        t = self._tensors
                        for seq in ended:  # fills by a host index: no copy of an index to the device, which would
                            t.slot[seq.row] = 0  # wait for the step in flight
                            t.positions[seq.row] = 0
                            t.key_valid[seq.row] = False
                except Exception as e:  # noqa: BLE001 - a device that failed: raised once every sequence is told
                    reset_error = e
        failures = []
        for seq in ended:
            if seq.on_done is not None:
                try:
                    seq.on_done(seq)
                except Exception as e:  # noqa: BLE001 - every ended sequence is told before it is raised
                    failures.append(e)
        if reset_error is not None:
            raise reset_error
        if failures:
            raise _CallbackError(failures[0])


def _generate_eager(model, input_ids, attention_mask, rows: _Rows, temperature, top_p, top_k, generator):
    B, T = input_ids.shape
    device = input_ids.device
    cache = KVCache(model.config, B, T + rows.max_new_tokens, model.dtype, device)
    logits = last_logits(model, input_ids, attention_mask, cache)
    ones = torch.ones(B, 1, dtype=attention_mask.dtype, device=device)
    while True:
        nxt = sample_next(logits, temperature, top_p, generator, top_k)
        if not rows.take(nxt.tolist()):
            break
        attention_mask = torch.cat([attention_mask, ones], 1)
        logits = last_logits(model, nxt[:, None], attention_mask, cache)
    return rows.new_ids, rows.reasons


@torch.no_grad()
def generate_ids(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | Iterable[int] | None = None,
    generator: torch.Generator | None = None,
    should_stop=None,
    decode: str | None = "auto",
    decoder: Decoder | None = None,
    top_k: int = 0,
    on_done=None,
) -> tuple[list[list[int]], list[str]]:
    """Generate for a left-padded batch (B, T). Returns new token ids per row and finish reasons.

    ``temperature`` 0 is greedy; above 0 tokens are sampled, filtered by ``top_k`` (0: off) and then
    ``top_p`` (1: off) as ``sample_next`` describes. ``eos_id``: the id, or ids, that end a row (``eos_set``).
    ``should_stop(row, new_ids) -> bool`` lets the caller end a row early (stop strings).
    ``on_done(row, new_ids, why)`` is called once for each row that ends before the batch does, the moment it
    ends (``why``: ``"eos"``, or ``"stop"`` for ``should_stop``); ``new_ids`` is then final (a server answers that
    request at once). Rows still running when the batch ends are not reported.
    ``decode`` picks how the steps run (module docstring); ``decoder`` reuses a ``Decoder``'s cache
    and graphs (its own ``decode`` setting then applies).
    """
    if decoder is None:  # one call: capture only when enough steps replay the graphs
        decoder = Decoder(model, decode, graph_min_tokens=32)
    elif decoder.model is not model:
        raise ValueError("generate_ids: the decoder belongs to another model")
    return decoder.generate_ids(input_ids, attention_mask, max_new_tokens, temperature, top_p, eos_id, generator,
                                should_stop, top_k, on_done)


def generate(
    model,
    tokenizer,
    prompts: list[str] | str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    add_bos: bool = True,
    max_prompt_tokens: int | None = None,
    decode: str | None = "auto",
    decoder: Decoder | None = None,
    top_k: int = 0,
) -> list[Generation]:
    """Complete each prompt; text is cut before the first stop string (which is not returned).
    ``temperature``, ``top_k``, ``top_p``, ``decode`` / ``decoder`` as for ``generate_ids``."""
    if isinstance(prompts, str):
        prompts = [prompts]
    stop = [s for s in (stop or []) if s]
    limit = model.config.max_position_embeddings - max_new_tokens
    if max_prompt_tokens is not None:
        limit = min(limit, max_prompt_tokens)
    if limit <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                         f"{model.config.max_position_embeddings} positions")
    ids, mask = tokenizer.batch(prompts, bos=add_bos, max_length=limit, padding_side="left", truncation_side="left")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)

    def should_stop(row, new):
        if not stop:
            return False
        text = tokenizer.decode(new)
        return any(s in text for s in stop)

    out_ids, reasons = generate_ids(model, ids, mask, max_new_tokens, temperature, top_p,
                                    eos_id=getattr(tokenizer, "eos_ids", tokenizer.eos_id), generator=generator,
                                    should_stop=should_stop, decode=decode, decoder=decoder, top_k=top_k)
    results = []
    for row, new in enumerate(out_ids):
        text = tokenizer.decode(new)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        results.append(Generation(text=text, token_ids=new, finish_reason=reasons[row],
                                  prompt_tokens=int(mask[row].sum())))
    return results
