"""The training loop SFT and DPO share.

A stage object says what one batch costs (``loss``: a sum over the batch's units and the metric
sums) and how many units it holds (``units``: loss tokens for SFT, pairs for DPO). The loop does the
rest: AdamW over the trainable parameters only, warmup + cosine/linear schedule, gradient
accumulation normalised by the units of the whole optimizer step (so packing or splitting a batch
never changes the loss; an epoch's last step takes the micro-batches it has left), clipping, bf16
autocast on GPU (fp16 with dynamic loss scaling where bf16 is missing), progress with tokens/s and
ETA, ``metrics.jsonl``, periodic eval, atomic checkpoints with everything needed to continue bit for
bit, resume, SIGINT/SIGTERM, and a stop on a non-finite loss.

Run directory::

    config.toml          the resolved config (written by the caller)
    metrics.jsonl        one JSON object per logged step (and per eval)
    checkpoints/step-N/  adapter/ + trainer_state.pt, written as .tmp-step-N-PID/ and renamed into place when
                         complete (resume reads only step-N; a run removes the .tmp folders of dead processes)
    adapter/             the final adapter (PEFT format)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch

from bezoar.locking import writer_gone
from bezoar.model.lora import lora_modules, save_adapter
from bezoar_kernels import dequant_cache

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
TMP_CHECKPOINT_RE = re.compile(r"^\.tmp-step-(\d+)-(\d+)$")  # step, pid of the process writing it


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, broken checkpoint); the message says what to do."""


class UnreadableCheckpoint(TrainingError):
    """A checkpoint file that is missing or cannot be read (torn by a full disk, a copy cut short)."""


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    # None: warmup_ratio of the total steps, rounded up as transformers counts them (a ratio above 0 warms up for
    # one step at least: rounded to nearest, 0.03 of a stage under 17 steps had none)
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0  # 0 turns clipping off

    def __post_init__(self):
        # Checked here so that a bad value stops with the key's name, not deep inside AdamW or the schedule.
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas takes two numbers in [0, 1), got {list(self.betas)}")
        for name in ("lr", "weight_decay", "eps", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"optim.{name} must not be negative, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must not be negative, got {self.warmup_steps}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class LoopConfig:
    epochs: float = 1.0
    max_steps: int = 0  # 0: run the epochs; > 0: stop after this many optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp16; fp32 on CPU
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # optimizer steps between evals (0: only at the end when there is eval data)
    eval_max_batches: int = 0  # 0: the whole eval set; N: N batches of one fixed shuffled order, the same each eval
    save_every: int = 0  # optimizer steps between checkpoints (0: only the end state's)
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    profile: bool = False  # trace a few steps with torch.profiler into <out>/profile
    profile_steps: int = 3
    progress: bool = True

    def __post_init__(self):
        if self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be at least 1, got {self.grad_accum}")
        if self.max_steps < 0:
            raise ValueError(f"train.max_steps must not be negative (0: run the epochs), got {self.max_steps}")
        if self.max_steps == 0 and not 0 < self.epochs < math.inf:
            raise ValueError(f"train.epochs must be a positive, finite number when train.max_steps is 0, got "
                             f"{self.epochs}")
        for name in ("log_every", "eval_every", "eval_max_batches", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must not be negative, got {getattr(self, name)}")
        if self.profile_steps < 1:
            raise ValueError(f"train.profile_steps must be at least 1, got {self.profile_steps}")


class Stage(Protocol):
    def units(self, batch) -> float: ...
    def tokens(self, batch) -> int: ...
    def loss(self, model, batch) -> tuple[torch.Tensor, dict[str, float]]: ...


class Batches(Protocol):
    def __iter__(self): ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def lr_lambda(optim: OptimConfig, total_steps: int):
    # the ratio's count as transformers takes it (TrainingArguments.get_warmup_steps); the product is rounded first,
    # so that a ratio that is a whole number of steps (0.1 of 30) is not pushed one up by its binary error
    warmup = optim.warmup_steps if optim.warmup_steps is not None else \
        math.ceil(round(optim.warmup_ratio * total_steps, 9))
    floor = optim.min_lr_ratio

    def f(step: int) -> float:  # step = optimizer steps done so far
        if warmup > 0 and step < warmup:  # transformers' ramp: 0 at the first step, full lr at step ``warmup``
            return step / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if optim.schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def rng_state() -> dict:
    # numpy's key array is kept as a list of ints: trainer_state.pt then holds only tensors and plain values,
    # which torch.load(weights_only=True) reads without running any code the file names.
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached_gaussian),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]  # keys: a list, or an ndarray in old checkpoints
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a loss scaler)."""
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            return (torch.bfloat16 if name == "bf16" else torch.float16), False
        return None, False
    if name == "auto":  # bf16 where the GPU computes in it (is_bf16_supported said yes on a T4, which emulates it)
        from bezoar_kernels.launch import native_bf16

        name = "bf16" if native_bf16(device) else "fp16"
    if name == "bf16":
        return torch.bfloat16, False
    if name == "fp16":
        return torch.float16, True
    return None, False


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / "trainer_state.pt").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _old_numpy_rng_globals() -> list:
    """What unpickling numpy's RNG state as the ndarray that checkpoints of earlier versions hold needs: the
    array rebuilder (its module moved in numpy 2), ndarray and a uint32 dtype; nothing that calls other code."""
    return [np.zeros(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_trainer_state(path: Path) -> dict:
    """``trainer_state.pt`` loaded with ``weights_only=True``: a file from elsewhere cannot run code on resume."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # A checkpoint written before the numpy RNG state became a list of ints: retry allowing only that array.
        with torch.serialization.safe_globals(_old_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove ``checkpoints/.tmp-step-N-PID/`` folders left by a save that never finished: those of this process
    (its saves run one at a time, so none is in progress) and those whose process is gone. A folder of a live
    process is kept, since that process may still be writing it (a reused pid errs on the side of keeping)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    removed = []
    for path in root.iterdir():
        m = TMP_CHECKPOINT_RE.match(path.name)
        if m is None:
            continue
        if writer_gone(int(m.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class Trainer:
    """Runs one stage: ``Trainer(...).fit()``; ``resume=True`` continues from the newest checkpoint."""

    def __init__(self, model, stage: Stage, batches: Batches, loop: LoopConfig, optim: OptimConfig, out: Path,
                 eval_batches: Batches | None = None, resume: bool = False, dist=None, log=print,
                 base_model_name: str | None = None):
        self.model = model
        self.stage = stage
        self.batches = batches
        self.eval_batches = eval_batches
        self.loop = loop
        self.optim_cfg = optim
        self.out = Path(out)
        self.resume = resume
        self.dist = dist  # bezoar.train.distributed.Dist or None
        self.log = log
        self.base_model_name = base_model_name
        #: how a stopped run goes on, said when it stops (a recipe or the pipeline reruns the same command)
        self.resume_hint = "continue with --resume"
        self.rank0 = dist is None or dist.rank == 0
        self.device = next(p.device for p in model.parameters())
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainingError("the model has no trainable parameters (apply LoRA first)")
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": optim.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                           **({"fused": True} if fused else {"foreach": False}))
        micro_per_epoch = len(batches)
        if micro_per_epoch == 0:
            raise TrainingError("the training data gives no batch (is the dataset empty?)")
        # A step never reaches into the next epoch: an epoch whose micro-batches grad_accum does not divide ends
        # with a shorter step of those left (as transformers' Trainer does), normalised by its own units like any
        # other, so every batch of every epoch asked for is trained once and no batch of a later one is.
        self.steps_per_epoch = -(-micro_per_epoch // loop.grad_accum)
        self.total_steps = (loop.max_steps if loop.max_steps > 0
                            else max(1, math.ceil(round(loop.epochs * self.steps_per_epoch, 6))))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim, self.total_steps))
        self.autocast_dtype, use_scaler = resolve_precision(loop.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        # Every eval starts from the eval loader's first batch: a loader left mid-epoch (eval_max_batches)
        # would otherwise hand the next eval other batches, and eval losses would not be comparable.
        self._eval_start = eval_batches.state_dict() if eval_batches is not None else None
        self.step = 0
        self.tokens_seen = 0
        self._stop_signal = None
        self._stop_agreed = False  # multi-process: some rank got a signal by this step's all-reduce (all stop)
        self._iter = None

    # ---- batches --------------------------------------------------------------------------------

    def _next_micro_batches(self) -> list:
        """The next step's micro-batches: grad_accum of them, or fewer at the end of an epoch (the step takes what
        the epoch has left, and the next step starts the next epoch). A resume restores the loader's position, and
        a loader that stands at an epoch's end starts the next one here, so the steps are those of a run that never
        stopped."""
        group = []
        while len(group) < self.loop.grad_accum:
            if self._iter is None:
                self._iter = iter(self.batches)
            try:
                group.append(next(self._iter))
            except StopIteration:
                self._iter = None  # the loader moves to its next epoch on the next iter()
                if group:
                    break
        return group

    # ---- one optimizer step ----------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, group: list) -> dict[str, float]:
        self.model.train()
        # the NF4 dequant cache (where it is on) fetches each weight ahead in the order of the step before
        dequant_cache.begin_step()
        units = sum(float(self.stage.units(b)) for b in group)
        tokens = sum(int(self.stage.tokens(b)) for b in group)
        if self.dist is not None:
            units, tokens = self.dist.all_reduce_sum([units, float(tokens)])
            tokens = int(tokens)
        if units <= 0:
            raise TrainingError(f"step {self.step + 1}: the batch has nothing to learn from (no loss tokens)")
        total_loss = 0.0
        sums: dict[str, float] = {}
        not_finite: int | None = None  # the first micro-batch whose loss was not finite (on this rank)
        for i, batch in enumerate(group):
            sync = self.dist.no_sync(self.model) if self.dist is not None and i < len(group) - 1 else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss_sum, metrics = self.stage.loss(self.model, batch)
                # DDP averages gradients over ranks; scaling by the world size turns that average back
                # into the sum, so the step equals one process on the whole global batch.
                loss = loss_sum.float() / units * (self.dist.world_size if self.dist is not None else 1)
                if not torch.isfinite(loss):
                    if self.dist is None:
                        raise TrainingError(self._nan_message(i))
                    # Under DDP every rank stops together after this step's all-reduce: a rank raising here alone
                    # left the others in the backward's collective, to fail with gloo's "Connection closed by peer".
                    # The backward still runs (its gradients are never used) so that the collectives match.
                    not_finite = i if not_finite is None else not_finite
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total_loss += float(loss_sum.detach()) / units
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.dist is not None:
            # A signal reaches the ranks at different moments: it rides in this all-reduce, so that every rank
            # stops after the same step (a rank stopping alone would wait in its checkpoint's collectives forever).
            bad = [0.0] * self.dist.world_size
            bad[self.dist.rank] = float(not_finite is not None)
            values = self.dist.all_reduce_sum([total_loss, float(self._stop_signal is not None)] + bad
                                              + [sums[k] for k in sorted(sums)])
            total_loss = values[0]
            self._stop_agreed = values[1] > 0
            bad_ranks = [r for r, v in enumerate(values[2:2 + len(bad)]) if v > 0]
            sums = dict(zip(sorted(sums), values[2 + len(bad):]))
            if bad_ranks:  # this rank's own micro-batch where it is one of them, else the ranks that were
                raise TrainingError(self._nan_message(not_finite, ranks=None if not_finite is not None else bad_ranks))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.optim_cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.optim_cfg.max_grad_norm))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # Gradients that overflowed fp16 (inf/NaN once unscaled): the scaler skipped the optimizer step and
            # lowered its scale, the same on every rank (the all-reduced gradients hold the inf everywhere).
            skipped = self.scaler.get_scale() < scale
        else:
            if not math.isfinite(grad_norm):
                raise TrainingError(self._nan_message(None, what="gradient norm"))
            self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        # As in transformers' Trainer, a skipped optimizer step still counts as a step (its micro-batches were
        # taken, so the data order and the checkpoints' step numbers go on as usual) but the schedule stays where
        # it is: the next step takes the lr this one did not use. The scheduler's own count (saved with it)
        # then trails the step count by the skips, and a resume carries both.
        if not skipped:
            self.scheduler.step()
        elif self.rank0:
            self.log(f"step {self.step + 1}: the fp16 gradients overflowed; the optimizer step was skipped and the "
                     f"loss scale lowered to {self.scaler.get_scale():g}")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        out = {"loss": total_loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens}
        if skipped:
            out["skipped"] = True
        out.update({k: v / units for k, v in sums.items()})
        return out

    def _nan_message(self, micro: int | None, what: str = "loss", ranks: list[int] | None = None) -> str:
        ckpts = list_checkpoints(self.out)
        last = f"the last good checkpoint is {ckpts[-1][1]} (resume with --resume)" if ckpts else "no checkpoint was written yet"
        where = f" in micro-batch {micro}" if micro is not None else ""
        if ranks:
            where += f" on rank(s) {', '.join(map(str, ranks))}"
        return (f"non-finite {what} at step {self.step + 1}{where}; the run stops here and writes nothing more; "
                f"{last}. Lower the learning rate, check the data, or use bf16/fp32.")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        if self.eval_batches is None:
            return None
        self.model.eval()
        self.eval_batches.load_state_dict(self._eval_start)
        total, units, sums = 0.0, 0.0, {}
        for i, batch in enumerate(self.eval_batches):
            if self.loop.eval_max_batches and i >= self.loop.eval_max_batches:
                break
            with self._autocast():
                loss_sum, metrics = self.stage.loss(self.model, batch)
            total += float(loss_sum)
            units += float(self.stage.units(batch))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if self.dist is not None:
            keys = sorted(sums)
            values = self.dist.all_reduce_sum([total, units] + [sums[k] for k in keys])
            total, units = values[0], values[1]
            sums = dict(zip(keys, values[2:]))
        if units == 0:
            return None
        out = {"eval_loss": total / units}
        out.update({f"eval_{k}": v / units for k, v in sums.items()})
        return out

    # ---- checkpoints ----------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "total_steps": self.total_steps,
        }

    def save_checkpoint(self) -> Path | None:
        # The loader's state is the global data position, the same on every rank: rank 0 writes it,
        # with every rank's RNG state (dropout masks differ per rank).
        rng_per_rank = self.dist.gather_objects(rng_state()) if self.dist is not None else None
        if not self.rank0:
            self.dist.barrier()
            return None
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.out)  # this one's too, should an earlier try have left it
        final = root / f"step-{self.step}"
        tmp = root / f".tmp-step-{self.step}-{os.getpid()}"
        state = self._state()
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        try:
            tmp.mkdir()
            save_adapter(_unwrap(self.model), tmp / "adapter", self.base_model_name)
            torch.save(state, tmp / "trainer_state.pt")
            _fsync_tree(tmp)
        except (OSError, RuntimeError) as e:  # a full disk, a quota: torch.save says only "iostream error"
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(root).free / 2**30
            kept = list_checkpoints(self.out)
            raise TrainingError(f"{final}: the checkpoint could not be written ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no message'}; {free:.1f} GiB free in "
                                f"{root}); " + (f"the last checkpoint, {kept[-1][1]}, is kept" if kept else
                                                "no earlier checkpoint exists")) from None
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(self.out)[: -self.loop.keep_last] if self.loop.keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        if self.dist is not None:
            self.dist.barrier()
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        from bezoar.model.lora import PEFT_PREFIX

        weights_file = path / "adapter" / "adapter_model.safetensors"
        try:
            weights = load_file(str(weights_file))
        except Exception as e:  # missing or torn (a full disk, a copy cut short)
            raise UnreadableCheckpoint(f"{weights_file}: cannot be read ({type(e).__name__}: {e})") from None
        modules = lora_modules(_unwrap(self.model))
        with torch.no_grad():
            for name, m in modules.items():
                for part in ("lora_A", "lora_B"):
                    key = f"{PEFT_PREFIX}{name}.{part}.weight"
                    if key not in weights:
                        raise TrainingError(f"{path}: checkpoint adapter lacks {key!r}: it does not belong to this config")
                    getattr(m, part).weight.copy_(weights[key])
        file = path / "trainer_state.pt"
        try:
            state = read_trainer_state(file)
        except Exception as e:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in _old_numpy_rng_globals()}
            try:
                unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(file) if g not in allowed]
            except Exception:
                unsafe = []
            if unsafe:
                raise TrainingError(f"{file}: holds objects other than tensors and plain values "
                                    f"({', '.join(unsafe[:5])}), which are not loaded since unpickling them could "
                                    "run code; resume only from checkpoints bezoar wrote") from None
            raise UnreadableCheckpoint(f"{file}: cannot be read ({e})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._schedule_lr()
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        try:
            self.batches.load_state_dict(state["data"])
        except ValueError as e:  # the data file or the batching changed since the checkpoint was written
            raise TrainingError(f"{path}: cannot continue from this checkpoint: {e}. Resume with the data the run "
                                "started with, or start a new run (another out=)") from None
        if self.dist is not None:
            ranks = state.get("rng_per_rank")
            if not ranks or len(ranks) != self.dist.world_size:
                raise TrainingError(f"{path}: written by a run with {len(ranks) if ranks else 1} process(es); resume it "
                                    f"with the same number (this run has {self.dist.world_size})")
            set_rng_state(ranks[self.dist.rank])
        else:
            if state.get("rng_per_rank") and len(state["rng_per_rank"]) > 1:
                raise TrainingError(f"{path}: written by a run with {len(state['rng_per_rank'])} processes; resume it "
                                    "under torchrun with the same number")
            set_rng_state(state["rng"])

    def _schedule_lr(self) -> None:
        """Set each group's lr (and the scheduler's last lr) from this run's schedule at the step the scheduler
        stands at. Loading a checkpoint brings back the lr its run's schedule set for the next step; a run resumed
        with another length (train longer: a higher max_steps or epochs) has its schedule laid over the new total,
        and without this its first step would still take the old schedule's lr (0 at a cosine's end). With the
        same length the value is the one the checkpoint holds."""
        sched = self.scheduler
        for group, base, f in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _trim_metrics(self) -> None:
        """After a resume, drop metric lines logged past the checkpoint (they will be logged again)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        # Resumed at (or past) the last step, fit() goes straight to the final eval, which then logs again
        # the eval record the first run wrote at this step before it stopped.
        final_eval_again = self.eval_batches is not None and self.step >= self.total_steps
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash
            if final_eval_again and rec.get("step") == self.step and "eval_loss" in rec:
                continue
            if rec.get("step", 0) <= self.step:
                kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)

    # ---- the run --------------------------------------------------------------------------------

    def _install_signals(self):
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            self.log(f"\nbezoar.train: got {signal.Signals(signum).name}; finishing this step and writing a checkpoint")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _write_metrics(self, record: dict) -> None:
        if not self.rank0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def fit(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank0:
            for path in remove_stale_temporaries(self.out):
                self.log(f"removed {path}: a checkpoint whose save never finished")
        seed_everything(self.loop.seed + (self.dist.rank if self.dist is not None else 0))
        if self.resume:
            ckpts = list_checkpoints(self.out)
            if ckpts:
                try:
                    self.load_checkpoint(ckpts[-1][1])
                except UnreadableCheckpoint as e:
                    if len(ckpts) < 2:
                        raise
                    raise UnreadableCheckpoint(f"{e}. The checkpoint before it may be whole: move {ckpts[-1][1]} "
                                               f"aside and resume again to go on from step {ckpts[-2][0]}") from None
                if self.step > self.total_steps:  # finishing "at" the shorter length would report the longer
                    raise TrainingError(f"{ckpts[-1][1]}: the run is at step {self.step}, past the {self.total_steps} "
                                        "steps now asked for (train.max_steps / train.epochs); resume with at least "
                                        f"{self.step} steps, or start a new run with another out=")
                if self.rank0:
                    self._trim_metrics()
                self.log(f"resumed from {ckpts[-1][1]} (step {self.step} of {self.total_steps})")
            else:
                self.log(f"no checkpoint under {self.out / 'checkpoints'} yet: starting from step 0")
                if self.rank0 and (self.out / "metrics.jsonl").exists():
                    (self.out / "metrics.jsonl").unlink()
        elif self.rank0 and (self.out / "metrics.jsonl").exists():
            (self.out / "metrics.jsonl").unlink()
        previous = self._install_signals()
        profiler = self._profiler()
        bar = None
        if self.rank0 and self.loop.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.out.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        started = time.perf_counter()
        tokens_at_start = self.tokens_seen
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                group = self._next_micro_batches()
                record = self.train_step(group)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                record.update(step=self.step, epoch=round(self._epoch_progress(), 4), tokens_per_s=record["tokens"] / dt,
                              elapsed_s=round(time.perf_counter() - started, 3))
                if self.device.type == "cuda":
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if self.step % max(1, self.loop.log_every) == 0 or self.step == self.total_steps:
                    self._write_metrics(record)
                if bar is not None:
                    rate = (self.tokens_seen - tokens_at_start) / max(1e-9, time.perf_counter() - started)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{rate:,.0f}", lr=f"{record['lr']:.2e}")
                    bar.update(1)
                if profiler is not None:
                    profiler.step()
                    if self.step >= self.loop.profile_steps + 2:
                        profiler.stop()
                        profiler = None
                if self.loop.eval_every and self.step % self.loop.eval_every == 0 and self.step < self.total_steps:
                    ev = self.evaluate()
                    if ev:
                        self._write_metrics({"step": self.step, **ev})
                if self._stop_agreed if self.dist is not None else self._stop_signal is not None:
                    path = self.save_checkpoint()
                    self.log(f"stopped at step {self.step}; checkpoint {path}; {self.resume_hint}")
                    raise SystemExit(128 + int(self._stop_signal or signal.SIGTERM))
                if self.loop.save_every and self.step % self.loop.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
            # The end state is always saved (save_every 0 too), and before the final evaluation, while the loop's
            # handlers still hold SIGINT and SIGTERM: a run stopped in that evaluation (Ctrl-C there interrupts it
            # at once) or one that dies after it (in the merge, say) then resumes here instead of training from
            # step 0 again, and a later run can extend max_steps. The evaluation draws no random numbers, so the
            # state saved before it is the state after it.
            saved = list_checkpoints(self.out)
            if not (saved and saved[-1][0] == self.step):
                self.save_checkpoint()
            stop = self._stop_signal is not None
            if self.dist is not None:  # as in train_step: every rank stops, or none
                stop = self.dist.all_reduce_sum([float(stop)])[0] > 0
            if stop:  # a signal during that save: it is complete, and the run stops as the loop would
                self.log(f"stopped at step {self.step}, before the final evaluation; checkpoint "
                         f"{self.out / 'checkpoints' / f'step-{self.step}'}; {self.resume_hint}")
                raise SystemExit(128 + int(self._stop_signal or signal.SIGTERM))
        finally:
            dequant_cache.clear()  # its buffers (where it was on) back for the evaluation and what follows
            if bar is not None:
                bar.close()
            if profiler is not None:
                profiler.stop()
            for sig, h in previous.items():
                signal.signal(sig, h)
        ev = self.evaluate()
        if ev:
            self._write_metrics({"step": self.step, **ev})
        final = self.out / "adapter"
        if self.rank0:
            save_adapter(_unwrap(self.model), final, self.base_model_name)
        if self.dist is not None:
            self.dist.barrier()
        return final

    def _epoch_progress(self) -> float:
        return self.step / self.steps_per_epoch

    def _profiler(self):
        if not self.loop.profile or not self.rank0:
            return None
        import torch.profiler as tp

        acts = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        prof = tp.profile(activities=acts, schedule=tp.schedule(wait=1, warmup=1, active=self.loop.profile_steps),
                          on_trace_ready=tp.tensorboard_trace_handler(str(self.out / "profile")), record_shapes=True)
        prof.start()
        return prof


def _unwrap(model):
    return getattr(model, "module", model)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
