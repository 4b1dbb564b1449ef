"""The config of one training stage: what a stage TOML file may hold.

    stage = "sft"                 # or "dpo"
    out = "runs/my-stage"         # the run directory
    eval_path = ""                # held-out data, read with the [data] settings at eval_split (default data.split)
    [model]  path, quant, dtype, device, kernels, gradient_checkpointing
    [lora]   r, alpha, dropout, targets, rslora
    [data]   see bezoar.data.DataConfig
    [optim]  lr, schedule, warmup, clipping (bezoar.train.loop.OptimConfig)
    [train]  batch_size, grad_accum, epochs / max_steps, precision, logging, eval, checkpoints
    [dpo]    beta, loss, label_smoothing, precompute_ref, ref_cache_dir, disable_dropout (DPO stages)

Loaded with ``bezoar.config.load_config(StageConfig, path, ["optim.lr=1e-4", ...])``: unknown keys
and wrong types are errors that name the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from bezoar.data import DataConfig
from bezoar.model.lora import LoraConfig

from .loop import LoopConfig, OptimConfig


@dataclass
class ModelSection:
    path: str = "tiny:demo"  # a Hugging Face folder, or tiny:<preset> to build a tiny random model
    quant: Literal["nf4", "none"] = "nf4"  # QLoRA: NF4 base weights
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # auto: cuda when present, else cpu. Under torchrun (bezoar.train.distributed.rank_device): auto and cuda
    # train each rank on cuda:LOCAL_RANK, cpu every rank on the CPU (gloo); cuda:N is refused there.
    device: str = "auto"
    kernels: Literal["auto", "triton", "torch"] = "auto"  # auto: Triton on CUDA, torch reference elsewhere
    # activation checkpointing per decoder layer (bezoar.model.checkpointing): "off"; "full" (keep each
    # layer's inputs, recompute the layer); "cheap" (also keep the linear and attention outputs, recompute
    # only norms, RoPE and SwiGLU). true / false are read as "full" / "off".
    gradient_checkpointing: Literal["off", "full", "cheap"] | bool = "off"
    name: str | None = None  # base_model_name_or_path written into adapter_config.json

    def __post_init__(self):
        if isinstance(self.gradient_checkpointing, bool):
            self.gradient_checkpointing = "full" if self.gradient_checkpointing else "off"
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"model.device {self.device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None


@dataclass
class TrainSection(LoopConfig):
    batch_size: int = 8  # rows of max_seq_len per micro-batch (the global micro-batch, across all ranks)

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be at least 1, got {self.batch_size}")


@dataclass
class DPOSection:
    """The preference loss (formulas and papers in bezoar.train.dpo) and where the reference comes from."""

    # strength of the pull towards the reference. IPO: its tau, on SUMMED response log-probs (as in the paper),
    # where TRL's ipo averages them per token, so a beta from a TRL IPO run does not carry over (bezoar.train.dpo)
    beta: float = 0.1
    loss: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = 0.0  # assumed rate of flipped labels, in [0, 0.5): sigmoid (cDPO) and robust
    precompute_ref: bool = False  # one pass first; reference log-probs cached on disk and reused
    ref_cache_dir: str | None = None  # default: <out>/ref_cache
    # the policy's LoRA dropout off in DPO (as TRL's DPOConfig.disable_dropout, default true, does to every
    # dropout module): the policy's log-probs then come from the weights alone, like the reference's, and
    # the stage runs on the merged LoRA path; lora.dropout is still what adapter_config.json records
    disable_dropout: bool = True

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")
        if self.loss in ("ipo", "hinge") and self.label_smoothing != 0:
            raise ValueError(f"dpo.label_smoothing applies to the sigmoid and robust losses, not {self.loss!r}")
        # a flip rate of 0.5 or more says the labels carry no preference or the opposite one: at 0.5 the
        # sigmoid loss has no gradient in the margin, above it trains towards the rejected answers
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5) for the {self.loss} loss (the assumed rate "
                             f"of flipped labels; 0.5 or more would train away from the chosen answers), "
                             f"got {self.label_smoothing}")


@dataclass
class StageConfig:
    stage: Literal["sft", "dpo"] = "sft"
    out: str = "runs/stage"
    eval_path: str = ""  # optional held-out data, read with the same [data] settings
    # the split of eval_path to read (a hub dataset, a folder of splits); empty: data.split, which is refused where
    # eval_path is data.path (the eval would be the training data)
    eval_split: str = ""
    merge: bool = False  # after training, write <out>/merged: the base with the adapter folded in
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    dpo: DPOSection = field(default_factory=DPOSection)

    def __post_init__(self):
        if self.stage == "sft" and self.data.is_pairs:
            # encode_pairs makes two documents per pair, both with loss on their response: SFT would teach the
            # rejected answers as much as the chosen ones. (A DPO stage on SFT data is refused by DPOStage.)
            raise ValueError(f"data.format {self.data.format!r} holds preference pairs, which an SFT stage would "
                             "train on as two examples each, the rejected response included: for SFT use "
                             "data.format = 'hh' (the chosen transcripts of HH-RLHF records) or an instruction "
                             "format, or set stage = 'dpo'")
