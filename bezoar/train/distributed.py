"""Data-parallel training with PyTorch's own engine: torchrun + DDP over the LoRA parameters.

``torchrun --nproc-per-node N -m bezoar.train CONFIG.toml`` starts N processes; each reads the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) here. NCCL on GPUs, gloo on CPU.
The NF4 base is replicated and frozen (DDP syncs only parameters that require grad, and buffers are
not broadcast); every rank takes its own share of each global batch (``BatchLoader(world_size, rank)``),
so the global batch and the loss normalisation equal the single-process run. Rank 0 alone writes
metrics, checkpoints and the final adapter.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings

import torch
import torch.distributed as torch_dist


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class Dist:
    def __init__(self, device: str = "auto"):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        self.backend = "nccl" if use_cuda else "gloo"
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(self.backend, timeout=datetime.timedelta(minutes=30))

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if self.device.type == "cuda" else None
        with warnings.catch_warnings():
            # torch >= 2.13 renames broadcast_buffers; the old name keeps the frozen NF4 buffers from being
            # broadcast at init as well (they are equal on every rank), which the new one does not yet allow.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, find_unused_parameters=False)

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.backend == "nccl" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj`` in rank order (on every rank)."""
        out = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def no_sync(self, model):
        return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()

    def barrier(self) -> None:
        if self.backend == "nccl":
            torch_dist.barrier(device_ids=[self.local_rank])
        else:
            torch_dist.barrier()

    def close(self) -> None:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
