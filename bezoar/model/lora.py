"""LoRA adapters: the trainable part of QLoRA, saved and loaded in PEFT's format, merged for export.

``y = base(x) + s * B(A(dropout(x)))`` with A (r, in) drawn Kaiming-uniform and B (out, r) zero at
the start, s = alpha / r (or alpha / sqrt(r) with rsLoRA). The base is a dense ``nn.Linear`` or an
``NF4Linear``; it stays frozen. ``adapters_disabled(model)`` switches every adapter off without
touching a weight (the DPO reference pass).

The forward runs ``bezoar_kernels.lora`` (base product and LoRA path fused, Triton on CUDA, PEFT's
arithmetic elsewhere); ``fused_qkv`` runs an attention block's q/k/v projections as one call, and
``fused_norm_projections`` runs them (or gate/up) together with the RMSNorm in front of them while
training with dropout (``bezoar_kernels.norm_lora``), and ``fused_swiglu_projection`` the SwiGLU with
down_proj (``bezoar_kernels.swiglu_lora``).
Dropout masks come from a seed drawn from torch's generator per call, so a run is reproducible
and resumes bit for bit when torch's RNG state is restored.

PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bezoar.locking import clear_dead_writes
from bezoar_kernels.lora import Adapter, draw_seed, lora_linear, lora_qkv
from bezoar_kernels.norm_lora import norm_lora_ok, rms_norm_lora
from bezoar_kernels.swiglu_lora import swiglu_lora, swiglu_lora_ok

from .checkpointing import in_cheap_frame
from .nf4 import NF4Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that does not fit the model: the message names the file and the key."""


# init_lora_weights values (PEFT 0.21) whose adapter is plain LoRA once trained: they choose only the starting
# A and B (None and false: none at all), which the saved weights replace; "mica" also freezes B in training.
PLAIN_INITS = (True, False, None, "gaussian", "eva", "orthogonal", "mica")
# Those that PEFT applies by changing the base weights as well (W - s * B0 @ A0 for PiSSA, CorDA, OLoRA and
# LoRA-GA; LoftQ's quantized residual): the trained weights are right only over that changed base, which PEFT
# rebuilds whenever it loads the adapter (all but LoRA-GA). PiSSA and CorDA come as prefixes ("pissa_niter_4").
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "lora_ga", "loftq")


def _base_changing_init(value) -> bool:
    if not isinstance(value, str):
        return False
    return value.startswith(("pissa", "corda")) or value.lower() in BASE_CHANGING_INITS


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    rslora: bool = False

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"lora.targets {unknown or self.targets!r}: choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class LoRALinear(nn.Module):
    """A frozen base linear plus a low-rank update. The base keeps its own name under ``base_layer``
    (PEFT's name), which checkpoint saving folds back into the Hugging Face key."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        # lora_dropout is the configured rate, which adapter_config.json records; dropout_p is the rate forward
        # applies, which a stage may turn off (dpo.disable_dropout) without changing what the adapter says.
        self.lora_dropout = dropout
        self.dropout_p = dropout
        device = _module_device(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32, device=device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return self.base_layer(x)
        base = self.base_layer
        weight = base_weight(base)
        if weight is None:  # a base the kernels do not know: PEFT's formula around it
            y = base(x)
            h = F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x
            a = self.lora_A.weight
            update = F.linear(F.linear(h.to(a.dtype), a), self.lora_B.weight) * self.scaling
            return y + update.to(y.dtype)
        dtype, out_dtype = compute_dtypes(base, x)
        seed = draw_seed()[0] if self.dropout_active else 0
        y = lora_linear(x.to(dtype), weight, self.lora_A.weight, self.lora_B.weight, self.scaling, self.dropout_p,
                        self.training, seed)
        if getattr(base, "bias", None) is not None:
            y = y + base.bias.to(y.dtype)
        return y.to(out_dtype)

    @property
    def dropout_active(self) -> bool:
        return self.training and self.dropout_p > 0

    def adapter(self) -> Adapter:
        return Adapter(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def merged_weight(self) -> torch.Tensor:
        """The dense base weight with this adapter added, in the base's dtype (fp32 arithmetic)."""
        base = self.base_layer
        if not isinstance(base, nn.Linear):
            raise AdapterError("merging into an NF4 base is not supported: load the dense (bf16/fp32) base "
                               "model and merge there")
        delta = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return (base.weight.float() + delta).to(base.weight.dtype)

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}"


def base_weight(base: nn.Module):
    """The frozen weight the kernels take: an NF4Weight, a dense tensor, or None for other modules."""
    if isinstance(base, NF4Linear):
        return base.nf4_weight
    if isinstance(base, nn.Linear):
        return base.weight
    return None


def compute_dtypes(base: nn.Module, x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype) of a projection through ``base``, as the base alone would have.

    NF4Linear computes in its compute dtype and returns x's dtype. nn.Linear computes in the autocast
    dtype under autocast (its output dtype too), else in its weight's dtype.
    """
    if isinstance(base, NF4Linear):
        return base.compute_dtype, x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return dtype, dtype
    return base.weight.dtype, base.weight.dtype


def _fusable(mods) -> tuple[list, list | None, list] | None:
    """(base weights, adapters or None, base modules) when the projections of one input can run as one
    call: LoRALinear with the same rank, dropout and on/off state over bases of one kind (all NF4Linear
    with one blocksize, double quant and compute dtype, or all bias-free nn.Linear of one dtype), or
    NF4Linear without adapters; None otherwise."""
    if all(isinstance(m, LoRALinear) for m in mods):
        if len({(m.enabled, m.r, m.dropout_p, m.training) for m in mods}) != 1:
            return None
        bases = [m.base_layer for m in mods]
        adapters = [m.adapter() for m in mods] if mods[0].enabled else None
    elif all(isinstance(m, NF4Linear) for m in mods):
        bases, adapters = list(mods), None
    else:
        return None
    if all(isinstance(b, NF4Linear) for b in bases):
        weights = [b.nf4_weight for b in bases]
        if len({(w.blocksize, w.double_quant, b.compute_dtype) for w, b in zip(weights, bases)}) != 1:
            return None
    elif all(type(b) is nn.Linear and b.bias is None for b in bases):
        weights = [b.weight for b in bases]
        if len({w.dtype for w in weights}) != 1:
            return None
    else:
        return None
    return weights, adapters, bases


def fused_qkv(q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module, x: torch.Tensor):
    """(q, k, v) from one fused call when the three projections allow it (``_fusable``), else None.
    Outputs equal the three modules called one by one."""
    mods = (q_proj, k_proj, v_proj)
    parts = _fusable(mods)
    if parts is None:
        return None
    weights, adapters, bases = parts
    dtype, out_dtype = compute_dtypes(bases[0], x)
    dropout = adapters is not None and mods[0].dropout_active
    seeds = draw_seed(3) if dropout else (0, 0, 0)
    p = mods[0].dropout_p if adapters is not None else 0.0
    training = bool(adapters is not None and mods[0].training)
    outputs = lora_qkv(x.to(dtype), weights, adapters, p, training, seeds)
    return tuple(o.to(out_dtype) for o in outputs)


def fused_norm_projections(norm: nn.Module, mods, x: torch.Tensor, residual: torch.Tensor | None,
                           seeds_together: bool):
    """``((y_j, ...), s)`` from ``rms_norm_lora``: the norm (of x + residual, or of x carried on as s) and
    the LoRA projections that read its output, in one computation, when they allow it; else None, and
    the caller runs the norm and the projections as separate calls.

    It applies to enabled LoRALinear projections (``_fusable``) training with dropout, computing in x's
    dtype, where ``norm_lora_ok`` takes the tensors, and not inside a ``cheap`` checkpointed layer
    (which keeps the outputs of its expensive calls: here that would keep s, which it recomputes
    otherwise). The dropout seeds are drawn as the separate calls draw them: three at once for
    ``fused_qkv`` (``seeds_together``), one per module for LoRALinear.forward, so either way of running
    a layer gives the same masks from the same torch RNG state."""
    if in_cheap_frame() or not all(isinstance(m, LoRALinear) and m.enabled and m.dropout_active for m in mods):
        return None
    parts = _fusable(mods)
    if parts is None:
        return None
    weights, adapters, bases = parts
    dtype, out_dtype = compute_dtypes(bases[0], x)
    p = mods[0].dropout_p
    if dtype != x.dtype or out_dtype != x.dtype or not norm_lora_ok(x, residual, norm.weight, weights, adapters, p,
                                                                    True):
        return None
    seeds = draw_seed(len(mods)) if seeds_together else [draw_seed()[0] for _ in mods]
    return rms_norm_lora(x, residual, norm.weight, norm.eps, weights, adapters, p, True, seeds)


def fused_swiglu_projection(down_proj: nn.Module, gate: torch.Tensor, up: torch.Tensor):
    """``down_proj(silu(gate) * up)`` from one ``swiglu_lora`` call (the SwiGLU and the masked LoRA passes
    over its output in one computation) when down_proj is an enabled LoRALinear training with dropout
    over a bias-free base of gate's dtype that the kernels take, outside a ``cheap`` checkpointed layer;
    else None. The seed is drawn as LoRALinear.forward draws it."""
    if in_cheap_frame() or not (isinstance(down_proj, LoRALinear) and down_proj.enabled and down_proj.dropout_active):
        return None
    parts = _fusable((down_proj,))
    if parts is None:
        return None
    (weight,), (adapter,), (base,) = parts
    dtype, out_dtype = compute_dtypes(base, gate)
    p = down_proj.dropout_p
    if dtype != gate.dtype or out_dtype != gate.dtype or not swiglu_lora_ok(gate, up, weight, adapter, p, True):
        return None
    seed = draw_seed()[0]
    return swiglu_lora(gate, up, weight, adapter.lora_a, adapter.lora_b, adapter.scaling, p, True, seed)


def _module_device(module: nn.Module):
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return None


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_linears(model: nn.Module, targets=TARGETS) -> list[str]:
    """Names of the decoder-block linears whose last name part is one of ``targets``."""
    return [name for name, _ in model.named_modules()
            if name.rpartition(".")[2] in targets and ".layers." in f".{name}"]


def apply_lora(model: nn.Module, config: LoraConfig, only: set[str] | None = None) -> dict[str, LoRALinear]:
    """Wrap every target linear of the decoder blocks (or those of them named in ``only``); freeze
    everything else. Returns the adapters."""
    if lora_modules(model):
        raise AdapterError("the model already has LoRA adapters")
    for p in model.parameters():
        p.requires_grad_(False)
    added = {}
    for name in target_linears(model, config.targets):
        if only is None or name in only:
            module = model.get_submodule(name)
            leaf = name.rpartition(".")[2]
            parent = model.get_submodule(name.rpartition(".")[0])
            wrapped = LoRALinear(module, config.r, config.alpha, config.dropout, config.rslora)
            setattr(parent, leaf, wrapped)
            added[name] = wrapped
    if not added:
        raise AdapterError(f"no module matches lora targets {config.targets}")
    model.lora_config = config
    return added


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the enclosed forward passes on the base model alone (no weight is copied or changed)."""
    modules = list(lora_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


# ---- PEFT format ------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().to("cpu").contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().to("cpu").contiguous()
    return out


def save_adapter(model: nn.Module, folder, base_model_name_or_path: str | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT's names), atomically. ``lora_dropout`` is the
    configured rate, also for a model that trained with its dropout turned off (``LoRALinear.lora_dropout``)."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA adapters to save")
    first = next(iter(modules.values()))
    targets = sorted({name.rpartition(".")[2] for name in modules})
    if set(target_linears(model, targets)) != set(modules):
        # Only some layers carry an adapter (a PEFT adapter loaded that way): name each module, as PEFT
        # itself does for "all-linear", so that PEFT and bezoar adapt the same ones on reading.
        targets = sorted(modules)
    if base_model_name_or_path is None:
        src = getattr(model, "source_path", None)
        base_model_name_or_path = str(src) if src is not None else None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": first.lora_dropout,
        "target_modules": targets,
        "use_rslora": first.rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "revision": None,
    }
    folder = Path(folder)
    clear_dead_writes(folder)  # what earlier writes of folder that were killed left beside it
    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    save_file(adapter_state_dict(model), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + f".old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def _peft_matches(spec, name: str) -> bool:
    """PEFT's rule for target_modules and exclude_modules: a string is a regular expression that the whole
    module name must match; a list names modules by their full name or by a suffix of whole parts."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in spec)


def _layer_index(name: str) -> int | None:
    match = re.match(r".*\.[^.]*\.(\d+)\.", name)  # PEFT's pattern with no layers_pattern
    return int(match.group(1)) if match else None


def read_adapter_config(folder: Path, model: nn.Module) -> tuple[LoraConfig, set[str]]:
    """The adapter's LoraConfig and the names of the modules of ``model`` that PEFT would adapt with it
    (target_modules, exclude_modules and layers_to_transform applied as PEFT applies them)."""
    path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: key 'peft_type' is {cfg.get('peft_type')!r}; only LORA adapters load")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(key)) != ok:
            raise AdapterError(f"{path}: key {key!r} is {cfg.get(key)!r}; bezoar supports {ok} only")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: key 'bias' is {cfg.get('bias')!r}; bezoar supports 'none' only")
    # PEFT features that change what the adapter computes (extra weights, other layers, another formula).
    for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "lora_bias", "use_qalora", "layer_replication",
                "alora_invocation_tokens", "trainable_token_indices", "target_parameters", "use_bdlora",
                "arrow_config", "kasa_config", "velora_config", "monteclora_config"):
        if cfg.get(key):
            raise AdapterError(f"{path}: key {key!r} is set ({cfg[key]!r}); bezoar does not support it")
    init = cfg.get("init_lora_weights", True)
    if _base_changing_init(init):
        how = ("save the base model LoftQ initialised, set init_lora_weights to true in the adapter's config and "
               "load the adapter on that base" if init.lower() == "loftq" else
               "save it again with PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=<the "
               "adapter saved before training, with init_lora_weights true>): that writes the plain LoRA adapter "
               "(of rank 2r) that gives the same model on the unchanged base")
        raise AdapterError(f"{path}: key 'init_lora_weights' is {init!r}: PEFT trains such an adapter on a base it "
                           "changes at initialisation, so its weights are right only on that changed base; bezoar adds "
                           f"adapters to the base as it is, which would give another model. To use it here, {how}")
    if init not in PLAIN_INITS or isinstance(init, (int, float)) and not isinstance(init, bool):
        plain = ", ".join(json.dumps(v) for v in PLAIN_INITS if v is not None)
        raise AdapterError(f"{path}: key 'init_lora_weights' is {init!r}; bezoar reads adapters initialised with "
                           f"{plain} (plain LoRA once trained)")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise AdapterError(f"{path}: key {key!r} must be a positive number, got {cfg.get(key)!r}")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and (not isinstance(dropout, (int, float)) or isinstance(dropout, bool)
                                or not 0.0 <= dropout < 1.0):
        raise AdapterError(f"{path}: key 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    if cfg.get("use_rslora") is not None and not isinstance(cfg["use_rslora"], bool):
        raise AdapterError(f"{path}: key 'use_rslora' must be true or false, got {cfg['use_rslora']!r}")

    spec = cfg.get("target_modules")
    exclude = cfg.get("exclude_modules") or []
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    elif layers == []:  # PEFT reads an empty list as no layer filter, and writes one when asked
        layers = None
    pattern = cfg.get("layers_pattern")
    if layers is not None and (not isinstance(layers, list) or pattern not in (None, "layers", ["layers"])):
        raise AdapterError(f"{path}: keys 'layers_to_transform' {cfg.get('layers_to_transform')!r} with "
                           f"'layers_pattern' {pattern!r}; bezoar reads a list of layer indices over model.layers")
    try:
        candidates = target_linears(model)
        chosen = [n for n in candidates if _peft_matches(spec, n) and not (exclude and _peft_matches(exclude, n))
                  # PEFT's layer filter is for the suffixes of a list: a module it names in full is adapted anyway
                  and (layers is None or _layer_index(n) in layers or isinstance(spec, list) and n in spec)
                  ] if isinstance(spec, (str, list)) else []
        others = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, NF4Linear))
                  and n not in candidates and isinstance(spec, (str, list)) and _peft_matches(spec, n)
                  and not (exclude and _peft_matches(exclude, n))]
    except (re.error, TypeError) as e:
        raise AdapterError(f"{path}: key 'target_modules' or 'exclude_modules' is malformed ({e})") from None
    if not chosen and layers is not None and isinstance(spec, (str, list)) and any(
            _peft_matches(spec, n) and not (exclude and _peft_matches(exclude, n)) for n in candidates):
        raise AdapterError(f"{path}: key 'layers_to_transform' is {cfg.get('layers_to_transform')!r}, which leaves "
                           f"none of the modules 'target_modules' selects (the model has layers 0 to "
                           f"{model.config.num_hidden_layers - 1})")
    if not chosen or others:
        raise AdapterError(f"{path}: key 'target_modules' is {spec!r}"
                           + (f", which also takes {others[0]!r}" if others else ", which selects no module") +
                           f"; bezoar adapts {', '.join(TARGETS)} in the decoder layers")
    config = LoraConfig(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                        dropout=float(cfg.get("lora_dropout") or 0.0),
                        targets=sorted({n.rpartition(".")[2] for n in chosen}, key=TARGETS.index),
                        rslora=bool(cfg.get("use_rslora", False)))
    return config, set(chosen)


def load_adapter(model: nn.Module, folder, trainable: bool = False) -> LoraConfig:
    """Attach a PEFT LoRA adapter to ``model`` (which must not have one yet); check every key and shape.
    An adapter that does not fit leaves ``model`` as it was."""
    folder = Path(folder)
    if lora_modules(model):
        raise AdapterError("the model already has LoRA adapters")
    config, chosen = read_adapter_config(folder, model)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        if (folder / "adapter_model.bin").exists():
            raise AdapterError(f"{folder / 'adapter_model.bin'}: pickled adapter weights; bezoar reads "
                               f"{ADAPTER_WEIGHTS} only")
        raise AdapterError(f"{folder}: no {ADAPTER_WEIGHTS}")
    trainable_before = {p: p.requires_grad for p in model.parameters()}
    modules = apply_lora(model, config, only=chosen)
    try:
        _copy_adapter_weights(modules, weights, config, folder)
    except BaseException:
        # Leave the model as it came: a half-loaded adapter would sit in every later forward, and a second
        # load_adapter (with the right folder) would be refused because adapters are already attached.
        for name, m in modules.items():
            setattr(model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], m.base_layer)
        del model.lora_config
        for p, flag in trainable_before.items():
            p.requires_grad_(flag)
        raise
    for p in lora_parameters(model):
        p.requires_grad_(trainable)
    model.adapter_path = folder
    return config


def _copy_adapter_weights(modules: dict[str, LoRALinear], weights: Path, config: LoraConfig, folder: Path) -> None:
    """Fill the freshly attached adapters from ``weights``; every key and shape must fit."""
    from safetensors import safe_open

    expected = {}
    for name, m in modules.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight
    seen: dict[str, str] = {}  # canonical key -> the file's key for it
    try:
        handle = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as e:  # torn or not safetensors: safetensors' own error names no file
        raise AdapterError(f"{weights}: cannot be read as safetensors ({e})") from None
    with handle as f:
        for key in f.keys():
            # PEFT writes adapter names out of the keys, but accept "...lora_A.default.weight" too.
            canonical = re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key)
            if canonical not in expected and not re.search(r"\.lora_[AB]\.weight$", canonical):
                # PEFT's save_embedding_layers (or a variant's extra tensors): not LoRA's A and B
                raise AdapterError(f"{weights}: key {key!r} is not a LoRA weight (lora_A / lora_B): the adapter "
                                   "carries other weights, such as the embedding or lm_head PEFT saves with "
                                   "save_embedding_layers, or a LoRA variant's; bezoar loads plain LoRA adapters only")
            if canonical not in expected:
                raise AdapterError(f"{weights}: key {key!r} does not fit this model (targets "
                                   f"{config.targets}; expected keys like {next(iter(expected))!r})")
            if canonical in seen:  # two adapters' weights in one file: which one is meant cannot be told
                raise AdapterError(f"{weights}: keys {seen[canonical]!r} and {key!r} are both the weight "
                                   f"{canonical!r}; the file holds more than one adapter (save each on its own)")
            t = f.get_tensor(key)
            p = expected[canonical]
            if tuple(t.shape) != tuple(p.shape):
                raise AdapterError(f"{weights}: key {key!r} has shape {tuple(t.shape)}, the model needs "
                                   f"{tuple(p.shape)} (r={config.r} in {folder / ADAPTER_CONFIG})")
            with torch.no_grad():
                p.copy_(t.to(p.dtype))
            seen[canonical] = key
    missing = [k for k in expected if k not in seen]
    if missing:
        raise AdapterError(f"{weights}: {len(missing)} adapter tensor(s) missing, e.g. {missing[0]!r}")


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its dense base weight and drop the adapters (in place)."""
    for name, m in lora_modules(model).items():
        base = m.base_layer
        merged = m.merged_weight()
        base.weight = nn.Parameter(merged, requires_grad=False)
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
