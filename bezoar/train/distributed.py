"""Data-parallel training with PyTorch's own engine: torchrun + DDP over the LoRA parameters.

``torchrun --nproc-per-node N -m bezoar.train CONFIG.toml`` starts N processes; each reads the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) here. NCCL on GPUs, gloo on CPU.
The NF4 base is replicated and frozen (DDP syncs only parameters that require grad, and buffers are
not broadcast); every rank takes its own share of each global batch (``BatchLoader(world_size, rank)``),
so the global batch and the loss normalisation equal the single-process run, and without LoRA dropout so do
the results (to float rounding). With dropout they agree only in distribution: each rank draws its masks
from its own seed (``train.seed + rank``), so no rank draws the masks that one process would for its rows.
Rank 0 alone writes metrics, checkpoints and the final adapter.

``model.device`` under torchrun (``rank_device``): ``auto`` trains each rank on its own GPU, cuda:LOCAL_RANK,
when torch sees CUDA, and on the CPU otherwise; ``cuda`` is the same but requires CUDA; ``cpu`` trains every
rank on the CPU with gloo, GPUs or not. ``cuda:N`` is refused: torchrun gives each rank one GPU by its
LOCAL_RANK, so one index cannot hold for every rank; CUDA_VISIBLE_DEVICES chooses which GPUs they are.
The process group starts with the first stage a process runs (``Dist.start``), on that stage's device.
A rank whose launcher is gone (torchrun killed outright) stops as on SIGTERM (``watch_launcher``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
import warnings
from typing import NoReturn

import torch
import torch.distributed as torch_dist

from bezoar.config import ConfigError


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device a torchrun rank with this LOCAL_RANK trains on, for ``model.device = name`` (see above).
    Every rank reads the same config, so a refused setting stops them all alike, before the process group
    starts; too few GPUs stops the ranks beyond them, and torchrun then stops the others."""
    if name == "cpu":
        return torch.device("cpu")
    if name != "auto":
        device = torch.device(name)
        if device.type != "cuda":
            raise ConfigError(f'model.device = "{name}": under torchrun a rank trains on "auto" (its own GPU, '
                              'else the CPU), "cuda" (its own GPU) or "cpu"')
        if device.index is not None:
            raise ConfigError(f'model.device = "{name}" names one GPU, but under torchrun every rank trains on a GPU '
                              f'of its own, which torchrun assigns by LOCAL_RANK (cuda:{local_rank} for this rank); '
                              'set model.device = "auto" or "cuda" (or "cpu"), and choose the GPUs with '
                              "CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=1,2 torchrun --nproc-per-node 2 ...)")
        if not torch.cuda.is_available():
            raise ConfigError(f'model.device = "{name}": this machine has no CUDA device torch can use '
                              '(model.device = "auto" or "cpu" trains every rank on the CPU)')
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(f'model.device = "{name}": torchrun started a rank with LOCAL_RANK {local_rank}, but torch '
                          f"sees {count} GPU{'s' if count != 1 else ''} "
                          f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'}); each rank needs a "
                          f"GPU of its own, so start at most {count} per node (--nproc-per-node), or set "
                          'model.device = "cpu" to train every rank on the CPU')
    return torch.device("cuda", local_rank)


LAUNCHER_POLL_S = 1.0  # how often a rank looks whether torchrun is still its parent


def watch_launcher(poll_s: float = LAUNCHER_POLL_S) -> threading.Thread:
    """Stop this rank as SIGTERM does (finish the step, write a checkpoint, exit) once the process that started
    it is gone. torchrun starts each worker in a session of its own and forwards SIGINT/SIGTERM to them, but a
    launcher killed outright (SIGKILL, the OOM killer) forwards nothing: its workers went on training to the
    end, into a folder that a resumed run would then share. A reparented process sees another parent pid."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        with contextlib.suppress(OSError, ValueError):
            print(f"bezoar.train: the launcher (pid {parent}) is gone; stopping this rank", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="bezoar-launcher-watch", daemon=True)
    thread.start()
    return thread


class Dist:
    """This process's place in a torchrun run; ``start`` joins the process group on the stage's device. Made,
    it watches the launcher (``watch_launcher``)."""

    def __init__(self, device: str | None = None):
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        self.device: torch.device | None = None
        self.backend: str | None = None
        self.launcher_watch = watch_launcher()
        if device is not None:
            self.start(device)

    def start(self, device: str = "auto") -> torch.device:
        """The device this rank trains on for ``model.device = device`` (``rank_device``), the process group
        started on it with the first call (NCCL on GPUs, gloo on the CPU). A later stage must train on the
        same device: one process group serves every stage of a run."""
        want = rank_device(device, self.local_rank)
        if self.device is not None:
            if want != self.device:
                raise ConfigError(f'model.device = "{device}" trains this rank on {want}, but an earlier stage of this '
                                  f"run started the process group on {self.device} ({self.backend}); under torchrun "
                                  "every stage of a run trains on the same device")
            return self.device
        if want.type == "cuda":
            torch.cuda.set_device(want)
        self.device, self.backend = want, ("nccl" if want.type == "cuda" else "gloo")
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(self.backend, timeout=datetime.timedelta(minutes=30))
        return want

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


def exit_rank(code: int) -> NoReturn:
    """End a torchrun rank with ``code`` without finalizing the interpreter (``os._exit``), once its work is
    written and its process group closed.

    Why: DDP keeps the gloo process group alive after ``destroy_process_group`` (measured with torch 2.13: its
    worker threads outlive every Python reference to the model), so those threads are still running while Python
    tears itself down. A thread of theirs that lets go of a tensor owned by a Python object then needs the GIL,
    and a thread that asks for the GIL during finalization is ended by ``pthread_exit``, whose unwinding through
    their C++ frames calls ``std::terminate``: "terminate called without an active exception", SIGABRT, and
    torchrun reports the finished run as failed. Skipping finalization leaves those threads nothing to run into.
    Everything bezoar writes is closed (or replaced into place) before ``main`` returns; buffered output is
    flushed here, and unreachable objects (a file in a reference cycle, say) are collected first."""
    import gc

    try:
        gc.collect()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    finally:
        os._exit(code)
