"""Direct preference optimisation on the shared loop, with the frozen base as its own reference.

A batch holds preference pairs as documents (``bezoar.data``): for every pair, the prompt + chosen
response is one document (part 0) and the prompt + rejected response the next one (part 1), both in
one packed batch, so the policy sees chosen and rejected in ONE forward. For each document d the
sequence log-probability over its response tokens only is

    logp(d) = sum over response positions t of log softmax(h_{t-1} W^T)[y_t]

taken from the fused linear + log-prob kernel on the hidden states of the positions that have a
target (the (tokens, vocab) logits never exist in fp32 at once; the torch path does the same in
chunks under activation checkpointing).

The reference model is the same model with every LoRA adapter switched off
(``bezoar.model.lora.adapters_disabled``) under ``no_grad``: no second copy of any weight. With
``precompute_ref = true`` its log-probs come from one pass over the data before training, cached on
disk (see ``ReferenceCache``) and attached to each training batch as ``ref_logps``.

The losses. With policy log-probs ``pc, pr`` and reference log-probs ``rc, rr`` of the chosen and the
rejected response, the implicit reward margin is

    h = (pc - rc) - (pr - rr)          rewards: chosen = beta (pc - rc), rejected = beta (pr - rr)

and, per pair, with sigma the logistic function and eps = ``label_smoothing``:

- ``sigmoid``: DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model"), the Bradley-Terry likelihood of the preference under the implicit
  reward; with eps > 0 the conservative variant (cDPO, Mitchell 2023, "A note on DPO with noisy
  preferences and relationship to IPO") that assumes each label is flipped with probability eps:

      L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)

- ``ipo``: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences"), a squared regression of the log-ratio margin onto 1 / (2 beta), with beta as the
  paper's tau; h is built from summed (not length-averaged) log-probs, as in the paper:

      L = (h - 1 / (2 beta))^2

  This differs from TRL's ``loss_type="ipo"``, which divides each sequence's log-probs by its number of
  response tokens before forming h. The target 1 / (2 beta) is the same number on both, but here it is a
  margin of summed log-probs (over responses of tens to hundreds of tokens), so a beta tuned for TRL's
  IPO does not carry over: the same target margin per token needs about TRL's beta divided by the
  response length (and the loss, a square of summed log-probs, is on a larger scale than TRL's).

- ``hinge``: the calibration hinge of SLiC-HF (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
  Calibration with Human Feedback"), applied to the reference-normalised margin (as TRL's ``hinge``):

      L = max(0, 1 - beta h)

- ``robust``: robust DPO (Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with
  Noisy Feedback"), an unbiased estimate of the clean-label loss when labels flip with rate eps < 1/2:

      L = ((1 - eps) (-log sigma(beta h)) - eps (-log sigma(-beta h))) / (1 - 2 eps)

The stage returns the SUM of L over the batch's pairs (the loop divides by the pairs of the whole
optimizer step) and the sums of the metrics rewards/chosen, rewards/rejected, rewards/accuracies
(reward of chosen > reward of rejected), rewards/margins, logps/chosen, logps/rejected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from bezoar.config import ConfigError
from bezoar.data.packing import (DOC_EXAMPLE, DOC_LENGTH, DOC_PART, IGNORE_INDEX, BatchLoader, DocumentSet,
                                 batch_to, next_token_labels)
from bezoar.model.lora import adapters_disabled
from bezoar_kernels.cross_entropy import CHUNK_LOGITS_BYTES, linear_token_logprobs
from bezoar_kernels.dispatch import backend, current_backend, use_triton

from .config import DPOSection
from .loop import TrainingError

__all__ = ["DPOStage", "ReferenceCache", "preference_loss", "response_logprobs", "sequence_logprobs",
           "METRICS", "LOSSES"]

LOSSES = ("sigmoid", "ipo", "hinge", "robust")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
CACHE_FORMAT = "bezoar-ref-logps-1"


# ---- the losses ---------------------------------------------------------------------------------------


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (P,) and the implicit rewards of chosen and rejected (P,), detached.

    Inputs are summed response log-probs per sequence (P,); the formulas are in the module docstring.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    eps = label_smoothing
    if loss == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * h)
        if eps:
            losses = losses - eps * F.logsigmoid(-beta * h)
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss == "robust":
        losses = ((1.0 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    else:
        raise ValueError(f"dpo.loss {loss!r}: expected one of {', '.join(LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- sequence log-probs ----------------------------------------------------------------------------------


def response_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      chunk_tokens: int | None = None) -> torch.Tensor:
    """log p(target) per row of ``hidden`` (N, C) under the LM head ``weight`` (V, C): (N,) fp32.

    Triton: the fused kernel, which holds one chunk of logits at a time. Torch: the reference in
    chunks of ``chunk_tokens`` rows (default: CHUNK_LOGITS_BYTES of fp32 logits), each under
    activation checkpointing when a gradient is needed, so its logits are rebuilt in the backward
    instead of being kept: the fp32 logits of the whole batch never exist at once on either path.
    """
    n = hidden.shape[0]
    if use_triton(hidden, weight, targets):
        return linear_token_logprobs(hidden, weight, targets)
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    if n <= chunk_tokens:
        return linear_token_logprobs(hidden, weight, targets)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    kernels = current_backend()  # thread-local: on CUDA the recompute runs on autograd's own thread, where 'auto'
    # then took Triton where the forward had run the reference, and the checkpoint saw other tensors (it raised)

    def chunk(h, w, y):
        with backend(kernels):
            return linear_token_logprobs(h, w, y)

    parts = []
    for start in range(0, n, chunk_tokens):
        h, y = hidden[start: start + chunk_tokens], targets[start: start + chunk_tokens]
        if grad:
            parts.append(checkpoint(chunk, h, weight, y, use_reentrant=False))
        else:
            parts.append(chunk(h, weight, y))
    return torch.cat(parts)


def sequence_logprobs(model, batch: dict, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed response log-probs of every document of a packed (or padded) batch: (num_docs,) fp32.

    ``model`` is called as ``model(input_ids, position_ids=, doc_ids=, return_hidden=True)``; the LM head
    is ``model.lm_head`` (of the unwrapped module when ``model`` is a DDP wrapper). Only positions whose
    next token is a response token enter the head, and each adds to the document it sits in (the first
    token of a document carries no label, so a position and its target share the document).
    """
    inner = getattr(model, "module", model)
    targets = next_token_labels(batch["labels"])
    keep = targets != IGNORE_INDEX
    hidden = model(batch["input_ids"], position_ids=batch["position_ids"], doc_ids=batch["doc_ids"],
                   return_hidden=True)  # (B, L, C)
    token_logps = response_logprobs(hidden[keep], inner.lm_head.weight, targets[keep], chunk_tokens)  # (N,)
    num_docs = batch["doc_table"].shape[0]
    out = torch.zeros(num_docs, dtype=torch.float32, device=token_logps.device)
    return out.index_add(0, batch["doc_ids"][keep], token_logps)


# ---- the stage ----------------------------------------------------------------------------------------------


class DPOStage:
    """The DPO stage for ``bezoar.train.loop.Trainer`` (``units`` = pairs).

    Constructed with just the ``[dpo]`` section it runs the reference pass on the fly (what a bench
    script needs); ``precompute_ref`` also needs the documents, the data config and the batch size, and
    a cache folder (``ref_cache_dir``, or ``out``/ref_cache).
    """

    def __init__(self, cfg: DPOSection | None = None, *, out: str | Path | None = None, model=None,
                 docs: DocumentSet | None = None, data_cfg=None, batch_size: int | None = None,
                 device: torch.device | str | None = None, dist=None, log=print):
        self.cfg = cfg if cfg is not None else DPOSection()
        self.out = Path(out) if out is not None else None
        self.model = model
        self.docs = docs
        self.data_cfg = data_cfg
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else None
        self.dist = dist
        self.log = log
        self.logits_chunk_tokens: int | None = None  # torch path: rows of logits per chunk (None: by bytes)
        self.cache: ReferenceCache | None = None
        if data_cfg is not None and not data_cfg.is_pairs:
            raise ConfigError(f"data.format {data_cfg.format!r}: a DPO stage needs preference pairs "
                              "(data.format = 'pairs' or 'hh_pairs')")
        if self.cfg.precompute_ref:
            missing = [name for name, v in (("docs", docs), ("data_cfg", data_cfg), ("batch_size", batch_size))
                       if v is None]
            if missing:
                raise ValueError(f"dpo.precompute_ref needs {', '.join(missing)} to build the reference cache")
            if self.cfg.ref_cache_dir is None and out is None:
                raise ValueError("dpo.precompute_ref needs dpo.ref_cache_dir or a run directory (out)")

    # -- what the loop asks --

    def units(self, batch) -> float:
        return float(batch["doc_table"].shape[0] // 2)

    def tokens(self, batch) -> int:
        return int(batch["num_tokens"])

    def reference_logps(self, model, batch) -> torch.Tensor:
        """Summed response log-probs of every document under the reference: the base, adapters off."""
        inner = getattr(model, "module", model)
        with torch.no_grad(), adapters_disabled(inner):
            return sequence_logprobs(inner, batch, self.logits_chunk_tokens)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]:
        num_docs = batch["doc_table"].shape[0]
        if num_docs % 2:
            raise ValueError(f"a DPO batch holds pairs of documents, got {num_docs} documents: "
                             "use data.format = 'pairs' or 'hh_pairs'")
        ref = batch.get("ref_logps")
        if ref is None:
            ref = self.reference_logps(model, batch)  # first, so its activations are gone before the policy's
        policy = sequence_logprobs(model, batch, self.logits_chunk_tokens)
        chosen, rejected = policy[0::2], policy[1::2]
        losses, chosen_rewards, rejected_rewards = preference_loss(
            chosen, rejected, ref[0::2], ref[1::2], self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing)
        loss_sum = losses.sum()
        if num_docs == 0:  # a rank left with only padding still joins the gradient all-reduce
            loss_sum = loss_sum + 0.0 * policy.sum()
        # Every pair is (part 0, part 1) of one example, side by side in the table; checked in the same
        # device->host copy that brings the metrics over (one sync per micro-batch).
        table = batch["doc_table"]
        misplaced = ((table[0::2, DOC_PART] != 0) | (table[1::2, DOC_PART] != 1)
                     | (table[0::2, DOC_EXAMPLE] != table[1::2, DOC_EXAMPLE])).sum()
        stats = torch.stack([
            chosen_rewards.sum(), rejected_rewards.sum(), (chosen_rewards > rejected_rewards).sum().float(),
            (chosen_rewards - rejected_rewards).sum(), chosen.detach().sum(), rejected.detach().sum(),
            misplaced.float(),
        ]).tolist()
        if stats[-1]:
            raise ValueError(f"a DPO batch must list each pair as (chosen, rejected) documents of one example "
                             f"side by side; {int(stats[-1])} pair(s) are not")
        return loss_sum, dict(zip(METRICS, stats[:-1]))

    # -- precomputed reference --

    def prepare(self, trainer) -> None:
        """With ``precompute_ref``: load or build the cache, and attach ``ref_logps`` to every training batch."""
        if not self.cfg.precompute_ref:
            return
        model = self.model if self.model is not None else getattr(trainer.model, "module", trainer.model)
        folder = Path(self.cfg.ref_cache_dir) if self.cfg.ref_cache_dir else self.out / "ref_cache"
        where = "dpo.ref_cache_dir" if self.cfg.ref_cache_dir else "the stage's ref_cache folder"
        try:  # before the pass, which takes hours on HH-RLHF: a folder it cannot write lost the pass after it
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{where} {folder}: cannot be made a folder ({e.strerror or e})") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{where} {folder}: this process cannot write there")
        self.cache = ReferenceCache(folder, self.docs, self.data_cfg, model, autocast_dtype=trainer.autocast_dtype,
                                    log=self.log)
        logps = self.cache.load()
        need = logps is None
        if self.dist is not None:
            # One decision for every rank: building the cache ends in a collective, so a rank that found the file
            # (another run sharing ref_cache_dir finished it after rank 0 looked) must build it too, or the ranks
            # would wait for each other until the process group's timeout.
            need = self.dist.all_reduce_sum([float(need)])[0] > 0
        if need:
            logps = self._compute_all(model, trainer.autocast_dtype)
            self.cache.save(logps)
            if self.dist is not None:  # rank 0 wrote the file; every rank reads it
                self.dist.barrier()
                logps = self.cache.load(quiet=True)
            if logps is None:
                raise RuntimeError(f"{self.cache.path}: the reference cache just written cannot be read back")
        trainer.batches = WithReferenceLogps(trainer.batches, self.cache.lookup(logps, trainer.device))

    @torch.no_grad()
    def _compute_all(self, model, autocast_dtype) -> np.ndarray | None:
        """One pass over every document (this rank's share of each batch); rank 0 gets the whole array."""
        world, rank = (self.dist.world_size, self.dist.rank) if self.dist is not None else (1, 0)
        loader = BatchLoader(self.docs, self.data_cfg.max_seq_len, self.batch_size, packed=self.data_cfg.packed,
                             shuffle=False, world_size=world, rank=rank)
        device = self.device or next(model.parameters()).device
        index = DocumentIndex(self.docs)
        values = np.zeros(self.docs.num_docs, dtype=np.float32)
        done = np.zeros(self.docs.num_docs, dtype=bool)  # apart from the values: a NaN the model gives is no gap
        was_training = model.training
        model.eval()
        started = time.perf_counter()
        self.log(f"reference log-probs: one pass over {self.docs.num_docs} documents in {len(loader)} batches")
        try:
            for i in range(len(loader)):
                batch = batch_to(loader.batch(0, i), device)
                with _autocast(device, autocast_dtype):
                    logps = self.reference_logps(model, batch)
                where = index.find(batch["doc_table"].cpu().numpy())
                values[where] = logps.float().cpu().numpy()
                done[where] = True
        finally:
            model.train(was_training)
        if self.dist is not None:
            shares = self.dist.gather_objects((values, done))
            if rank != 0:
                return None
            for share, share_done in shares:  # each document was computed by one rank
                values[share_done] = share[share_done]
                done |= share_done
        missing = np.flatnonzero(~done)
        if len(missing):
            raise RuntimeError(f"reference pass left {len(missing)} documents without a log-prob "
                               f"(first: document {int(missing[0])})")
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):  # cached, an -inf was trained on, then refused and recomputed by every later run
            first = int(bad[0])
            raise TrainingError(f"the reference model gave {len(bad)} documents a non-finite log-prob (first: document "
                                f"{first}, example {int(self.docs.doc_example[first])}: {values[first]}): an overflow "
                                f"in {autocast_dtype or next(model.parameters()).dtype}; a dtype with more range "
                                "(train.precision = \"bf16\" or \"fp32\", model.dtype) avoids it")
        self.log(f"reference log-probs: {self.docs.num_docs} documents in {time.perf_counter() - started:.1f}s")
        return values


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class DocumentIndex:
    """(example, part) of a batch's ``doc_table`` rows -> the document's index in the DocumentSet.

    A dense table over example ids (they are record numbers, so about as many as the documents)."""

    def __init__(self, docs: DocumentSet):
        if docs.num_docs == 0:
            raise ValueError("no documents to index")
        self.parts = int(docs.doc_part.max()) + 1
        self.index = np.full((int(docs.doc_example.max()) + 1) * self.parts, -1, dtype=np.int64)
        keys = docs.doc_example * self.parts + docs.doc_part
        self.index[keys] = np.arange(docs.num_docs)
        if len(np.unique(keys)) != len(keys):
            raise ValueError("two documents share one (example, part): cannot index them")

    def find(self, table: np.ndarray) -> np.ndarray:
        part = table[:, DOC_PART]
        keys = table[:, DOC_EXAMPLE] * self.parts + part
        inside = (keys >= 0) & (keys < len(self.index)) & (part >= 0) & (part < self.parts)
        found = np.where(inside, self.index[np.clip(keys, 0, len(self.index) - 1)], -1)
        if (found < 0).any():
            raise ValueError("a batch holds a document that is not in the indexed data")
        return found


# ---- the reference cache ---------------------------------------------------------------------------------------


def reference_weights_digest(model) -> str:
    """blake2b of everything the reference pass computes with: the model config and every parameter and
    buffer outside the LoRA adapters, as the bytes in memory (so it covers the checkpoint's tensors, the
    NF4 quantization of them and the weights' dtype), plus NF4's settings (``offset``, ``blocksize``, and the
    ``compute_dtype`` its matmuls run in, which may differ from the model's dtype)."""
    h = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        h.update(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        if "lora_" in module_name:
            continue
        # named as in the checkpoint: a layer that carries an adapter holds its base as ``.base_layer``, and which
        # layers carry one (lora.targets) does not change the reference, which runs with adapters off
        module_name = module_name.replace(".base_layer", "")
        for attr in ("offset", "blocksize", "compute_dtype", "weight_dtype"):  # NF4Linear's settings beside its buffers
            value = getattr(module, attr, None)
            if isinstance(value, (int, float, torch.dtype)) and not isinstance(value, bool):
                h.update(f"{module_name}.{attr}={value!r}".encode())
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in tensors:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            h.update(f"{module_name}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            flat = t.detach().reshape(-1).contiguous()
            h.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A hash of the source that computes the reference log-probs: bezoar's model, data and DPO code and its
    kernels. bezoar's version never moved, so a fix to the forward pass (a RoPE scaling, a norm) kept serving
    log-probs the code before it had made."""
    import bezoar
    import bezoar_kernels

    h = hashlib.blake2b(digest_size=16)
    roots = [(Path(bezoar.__file__).parent, ("model", "data")), (Path(bezoar_kernels.__file__).parent, (".",))]
    files = [Path(bezoar.__file__).parent / "train" / "dpo.py"]
    for root, parts in roots:
        for part in parts:
            files += sorted((root / part).rglob("*.py"))
    for file in files:
        h.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return h.hexdigest()


def _compute_versions() -> dict[str, str]:
    """What else moves the reference log-probs in their last bits: bezoar's forward pass and kernels (their source,
    ``code_digest``), torch and Triton. (Not the GPU model: ranks on a node with two models must agree on one key,
    and rank 0 writes it.)"""
    import bezoar

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"bezoar": bezoar.__version__, "code": code_digest(), "torch": torch.__version__,
            "triton": triton_version}


class ReferenceCache:
    """Reference log-probs of every document of a DocumentSet, on disk, under a key.

    The key is a blake2b hash over (stated in ``key_parts``):
    - ``data``: the DocumentSet fingerprint (every token, loss-mask bit, document length and grouping)
      and the resolved ``[data]`` config;
    - ``reference``: ``reference_weights_digest`` of the model, i.e. the frozen weights the reference
      pass reads (base checkpoint tensors as loaded and quantized, and the model config). LoRA weights
      are left out on purpose: the reference pass runs with every adapter off, so they cannot change it;
    - ``compute``: the weights' dtype, the autocast dtype, the device type, the kernel backend and the versions
      of bezoar, torch and Triton, which change the numbers in the last bits.

    The file ``<folder>/ref-logps-<key[:24]>.safetensors`` holds ``logps`` (D,) fp32 in DocumentSet order
    and, for a check, each document's (example, part, length); its metadata holds the full key, the key
    parts and a blake2b checksum of the log-probs. A file that does not parse, carries another key, has the
    wrong documents, a wrong checksum or a non-finite value is reported and rebuilt, never used.
    """

    def __init__(self, folder: str | Path, docs: DocumentSet, data_cfg, model, autocast_dtype=None, log=print):
        from bezoar.config import to_dict

        self.folder = Path(folder)
        self.docs = docs
        self.log = log
        weight = model.lm_head.weight
        self.key_parts = {
            "format": CACHE_FORMAT,
            "data": {"fingerprint": docs.fingerprint(), "config": to_dict(data_cfg)},
            "reference": {"weights": reference_weights_digest(model), "adapters": "disabled"},
            "compute": {"dtype": str(model.lm_head.weight.dtype), "autocast": str(autocast_dtype),
                        "device": weight.device.type, "kernels": "triton" if use_triton(weight) else "torch",
                        **_compute_versions()},
        }
        self.key = hashlib.blake2b(json.dumps(self.key_parts, sort_keys=True).encode(), digest_size=32).hexdigest()
        self.path = self.folder / f"ref-logps-{self.key[:24]}.safetensors"

    def _documents(self) -> dict[str, torch.Tensor]:
        return {"doc_example": torch.from_numpy(self.docs.doc_example.astype(np.int64)),
                "doc_part": torch.from_numpy(self.docs.doc_part.astype(np.int64)),
                "doc_length": torch.from_numpy(self.docs.doc_length.astype(np.int64))}

    @staticmethod
    def _checksum(logps: np.ndarray) -> str:
        return hashlib.blake2b(np.ascontiguousarray(logps, dtype=np.float32).tobytes(), digest_size=16).hexdigest()

    def load(self, quiet: bool = False) -> np.ndarray | None:
        """The cached log-probs, or None (no file, or a bad one: then say why; the caller rebuilds it)."""
        others = sorted(p.name for p in self.folder.glob("ref-logps-*.safetensors") if p != self.path) \
            if self.folder.is_dir() else []
        if others and not quiet:
            self.log(f"reference cache {self.folder}: {len(others)} file(s) for other data, weights or settings "
                     f"are not used ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
        if not self.path.exists():
            return None
        problem = self._problem()
        if isinstance(problem, str):
            self.log(f"reference cache {self.path}: {problem}; rebuilding it")
            return None
        if not quiet:
            self.log(f"reference log-probs: reusing {self.path} ({self.docs.num_docs} documents)")
        return problem

    def _problem(self) -> str | np.ndarray:
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a torn or overwritten file
            return f"unreadable ({type(e).__name__}: {str(e)[:120]})"
        if meta.get("format") != CACHE_FORMAT:
            return f"format {meta.get('format')!r} is not {CACHE_FORMAT!r}"
        if meta.get("key") != self.key:
            return "its key does not match this data, reference weights and settings"
        if "logps" not in tensors:
            return "it holds no logps tensor"
        logps = tensors["logps"]
        if logps.dtype != torch.float32 or logps.shape != (self.docs.num_docs,):
            return f"logps is {logps.dtype} {tuple(logps.shape)}, expected float32 ({self.docs.num_docs},)"
        for name, want in self._documents().items():
            if name not in tensors or not torch.equal(tensors[name], want):
                return f"its {name} does not match the documents of this data"
        values = logps.numpy()
        if meta.get("checksum") != self._checksum(values):
            return "its checksum does not match its log-probs (the file is corrupted)"
        if not np.isfinite(values).all():
            return "it holds non-finite log-probs"
        return values.copy()

    def save(self, logps: np.ndarray | None) -> None:
        """Write atomically (temp file, fsync, rename). Ranks other than 0 pass None and write nothing."""
        if logps is None:
            return
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {"logps": torch.from_numpy(np.ascontiguousarray(logps, dtype=np.float32)), **self._documents()}
        meta = {"format": CACHE_FORMAT, "key": self.key, "key_parts": json.dumps(self.key_parts, sort_keys=True),
                "checksum": self._checksum(logps)}
        self._clear_dead_temporaries()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.log(f"reference log-probs cached in {self.path}")

    def _clear_dead_temporaries(self) -> None:
        """Remove the ``.ref-logps-*.tmp-PID`` files that saves killed before their rename left (of processes gone)."""
        from bezoar.locking import writer_gone

        for path in self.folder.glob(".ref-logps-*.safetensors.tmp-*"):
            pid = path.name.rpartition("-")[2]
            if pid.isdigit() and writer_gone(int(pid)):
                path.unlink(missing_ok=True)

    def lookup(self, logps: np.ndarray, device) -> "ReferenceLookup":
        return ReferenceLookup(self.docs, logps, device)


class ReferenceLookup:
    """On the training device: a batch's ``doc_table`` -> the cached reference log-prob of each document."""

    def __init__(self, docs: DocumentSet, logps: np.ndarray, device):
        index = DocumentIndex(docs)
        self.parts = index.parts
        self.index = torch.from_numpy(index.index).to(device)
        self.logps = torch.from_numpy(np.ascontiguousarray(logps, dtype=np.float32)).to(device)
        self.lengths = torch.from_numpy(docs.doc_length.astype(np.int64)).to(device)

    def __call__(self, table: torch.Tensor) -> torch.Tensor:
        part = table[:, DOC_PART]
        keys = table[:, DOC_EXAMPLE] * self.parts + part
        inside = (keys >= 0) & (keys < self.index.numel()) & (part >= 0) & (part < self.parts)
        docs = torch.where(inside, self.index[keys.clamp(0, self.index.numel() - 1)], -1)
        good = (docs >= 0) & (self.lengths[docs.clamp(min=0)] == table[:, DOC_LENGTH])
        if table.shape[0] and not bool(good.all()):
            raise ValueError("a training batch holds documents that are not in the reference cache "
                             "(the cache was built for other data)")
        return self.logps[docs.clamp(min=0)]


class WithReferenceLogps:
    """Training batches with ``ref_logps`` (num_docs,) attached from the cache; position and length pass through."""

    def __init__(self, batches, lookup: ReferenceLookup):
        self.batches = batches
        self.lookup = lookup

    def __iter__(self):
        for batch in self.batches:
            batch = dict(batch)
            batch["ref_logps"] = self.lookup(batch["doc_table"])
            yield batch

    def __len__(self):
        return len(self.batches)

    def state_dict(self):
        return self.batches.state_dict()

    def load_state_dict(self, state):
        self.batches.load_state_dict(state)

    def __getattr__(self, name):
        if name in ("batches", "lookup"):
            raise AttributeError(name)
        return getattr(self.batches, name)
