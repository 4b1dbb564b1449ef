"""In-memory QLoRA models and packed batches for the checkpointing and kernel-path training tests."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bezoar.data import BatchLoader, DocumentSetBuilder
from bezoar.model.config import LlamaConfig
from bezoar.model.lora import LoraConfig, apply_lora
from bezoar.model.nf4 import NF4Linear
from bezoar.model.tiny import random_model
from bezoar_kernels.dispatch import backend

LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def qlora_model(config: LlamaConfig, seed: int = 0, targets=("q_proj", "k_proj", "v_proj"), r: int = 4,
                dropout: float = 0.0, lora_b_std: float = 0.05, dtype=torch.float32):
    """A random Llama whose decoder linears are NF4 (quantized by the torch reference, so every backend
    starts from the same bytes) with LoRA adapters; B drawn non-zero so the adapters matter at step 0."""
    model = random_model(config, seed, dtype=dtype)
    with backend("torch"):
        for layer in model.model.layers:
            for part, names in LINEARS.items():
                parent = getattr(layer, part)
                for name in names:
                    dense = getattr(parent, name)
                    setattr(parent, name, NF4Linear.from_float(dense.weight.data, compute_dtype=dtype))
    apply_lora(model, LoraConfig(r=r, alpha=2.0 * r, dropout=dropout, targets=list(targets)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(lora_b_std * torch.randn(p.shape, generator=g))
    return model


def packed_loader(vocab: int, row_len: int, rows_per_batch: int, num_docs: int, seed: int = 0,
                  min_len: int = 5, max_len: int = 13) -> BatchLoader:
    """Documents packed several to a row, loss on the second half of each. A document counts up from a
    random start (token t + 1 follows t), so a model can learn it and its loss falls."""
    rng = np.random.default_rng(seed)
    builder = DocumentSetBuilder()
    for i in range(num_docs):
        n = int(rng.integers(min_len, max_len + 1))
        start = int(rng.integers(3, vocab))
        ids = 3 + (start - 3 + np.arange(n)) % (vocab - 3)
        builder.add_item([(ids.tolist(), n // 2)], example=i)
    return BatchLoader(builder.build(), row_len, rows_per_batch, shuffle=True, seed=seed)


class StorageTracker(TorchDispatchMode):
    """Counts the bytes of the storages that ops create inside the ``with`` block and that are still
    alive when asked: after a forward, what the autograd graph holds for the backward (plus outputs).

    Storages that existed before (weights, buffers, caches) are left out by ``live_bytes(exclude=...)``.
    Relies on torch keeping one Python object per storage while the storage lives (it does since 2.0).
    """

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self.refs.append(weakref.ref(t.untyped_storage()))
        return out

    def live_bytes(self, exclude=()) -> int:
        gc.collect()
        skip = {t.untyped_storage().data_ptr() for t in exclude}
        alive = {}
        for ref in self.refs:
            storage = ref()
            if storage is not None and storage.data_ptr() not in skip:
                alive[storage.data_ptr()] = storage.nbytes()
        return sum(alive.values())
