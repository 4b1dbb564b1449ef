"""The model's shape and numerics, read from a Hugging Face Llama ``config.json``.

One dataclass, derived sizes in ``__post_init__``, named presets in ``PRESETS``. Only what the
forward pass needs is kept; the rest of a config.json is carried in ``extra`` so that ``save``
writes it back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that bezoar cannot run: the message names the file and the key."""


# The dtypes a checkpoint's config.json may name (torch_dtype / dtype), each to its canonical name
DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
               "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 3200
    intermediate_size: int = 8640
    num_hidden_layers: int = 26
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads} and no head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")

    @property
    def num_parameters(self) -> int:
        """Parameter count of the full model (embeddings and lm_head included)."""
        c, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = c * q + 2 * c * kv + q * c + 3 * c * f + 2 * c
        head = 0 if self.tie_word_embeddings else v * c
        return v * c + self.num_hidden_layers * per_layer + c + head

    # ---- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in archs:
            raise ConfigError(
                f"{source}: key 'model_type' is {model_type!r} (architectures {archs}): "
                "bezoar runs Llama-architecture models only (model_type 'llama')"
            )
        _check_quantization(d.get("quantization_config"), source)
        for key, allowed in (("hidden_act", ("silu", "swish")),):  # transformers' swish is SiLU
            if key in d and d[key] not in allowed:
                raise ConfigError(f"{source}: key {key!r} is {d[key]!r}; bezoar supports {allowed}")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ConfigError(f"{source}: key {key!r} is true; bezoar's Llama has no biases")
        theta = d.get("rope_theta")
        theta_key = "rope_theta"
        # transformers 5 writes rope_parameters and still reads a rope_scaling: a non-empty rope_scaling replaces
        # rope_parameters whole (a theta only in rope_parameters then does not count: 10000 or the top-level
        # rope_theta does; merged, such a config ran at rope_parameters' theta, 3.5e-3 off transformers' logits)
        scaling = d.get("rope_scaling")
        for name in ("rope_scaling",) if isinstance(scaling, dict) and scaling else ("rope_parameters",):
            rope = d.get(name)
            if not isinstance(rope, dict):
                continue
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            if rope_type != "default":
                raise ConfigError(f"{source}: key {name!r} asks for rope type {rope_type!r}; only default RoPE is supported")
            if rope.get("rope_theta") is not None:
                theta, theta_key = rope["rope_theta"], f"{name}.rope_theta"
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in required:
            if key not in d:
                raise ConfigError(f"{source}: required key {key!r} is missing")
            if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0:
                raise ConfigError(f"{source}: key {key!r} must be a positive integer, got {d[key]!r}")
        for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = d.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{source}: key {key!r} must be a positive integer, got {value!r}")
        for key, value, zero_ok in (("rms_norm_eps", d.get("rms_norm_eps"), True), (theta_key, theta, False)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if value is not None and not (number and (value > 0 or (zero_ok and value == 0))):
                kind = "a non-negative number" if zero_ok else "a positive number"
                raise ConfigError(f"{source}: key {key!r} must be {kind}, got {value!r}")
        if "tie_word_embeddings" in d and not isinstance(d["tie_word_embeddings"], bool):
            raise ConfigError(f"{source}: key 'tie_word_embeddings' must be true or false, got "
                              f"{d['tie_word_embeddings']!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta"}
        kwargs = {k: d[k] for k in known if k in d and (d[k] is not None or k.endswith("_token_id"))}
        # transformers 5 writes "dtype" and reads it before the older "torch_dtype": so does bezoar.
        for key in ("torch_dtype", "dtype"):
            dtype = d.get(key)
            if dtype is not None and str(dtype).replace("torch.", "") not in DTYPE_NAMES:
                raise ConfigError(f"{source}: key {key!r} is {dtype!r}; bezoar reads checkpoints in "
                                  f"{', '.join(sorted(set(DTYPE_NAMES.values())))}")
        if d.get("dtype") is not None:
            kwargs["torch_dtype"] = d["dtype"]
        listed = {}
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several ids; the first is the main one
                listed[key] = kwargs[key]  # and the list is written back as it was (to_hf_dict)
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        extra = {k: v for k, v in d.items()
                 if k not in known and k not in ("rope_theta", "rope_parameters", "rope_scaling", "dtype")}
        if listed:
            extra["_token_id_lists"] = listed
        try:
            return cls(rope_theta=float(theta if theta is not None else 10000.0), extra=extra, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no config.json (a Hugging Face model folder needs one)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.pop("quantization_config", None)
        listed = d.pop("_token_id_lists", {})
        d.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            attention_bias=False,
            mlp_bias=False,
        )
        for key, ids in listed.items():  # several eos ids, as the source listed them (when the first is unchanged)
            if ids and ids[0] == d.get(key):
                d[key] = list(ids)
        if self.torch_dtype:  # under both names: transformers 5 reads "dtype", older versions "torch_dtype"
            name = str(self.torch_dtype).replace("torch.", "")
            d["dtype"] = d["torch_dtype"] = DTYPE_NAMES.get(name, name)
        return d


def _check_quantization(quant: Any, source: str) -> None:
    """Refuse, before any weight is read, a checkpoint quantized in a format bezoar cannot read: it reads
    dense weights and transformers' bitsandbytes 4-bit NF4 ones only. A bitsandbytes 8-bit checkpoint
    otherwise failed later on the dtype of its int8 weights, and other formats (GPTQ, AWQ, ...) on tensors a
    Llama model does not have: errors that did not say why."""
    if quant is None:
        return
    readable = "bezoar reads dense checkpoints and bitsandbytes 4-bit NF4 ones only"
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: key 'quantization_config' is {quant!r}, not an object; {readable}")
    method = quant.get("quant_method")
    four_bit = bool(quant.get("load_in_4bit") or quant.get("_load_in_4bit"))
    eight_bit = bool(quant.get("load_in_8bit") or quant.get("_load_in_8bit"))
    if method != "bitsandbytes":
        raise ConfigError(f"{source}: key 'quantization_config' has quant_method {method!r}; {readable}")
    if eight_bit or not four_bit:
        what = "load_in_8bit true (a bitsandbytes 8-bit checkpoint)" if eight_bit else \
            "neither load_in_4bit nor load_in_8bit true"
        raise ConfigError(f"{source}: key 'quantization_config' has {what}; {readable}")
    quant_type = quant.get("bnb_4bit_quant_type")
    if quant_type is not None and quant_type != "nf4":
        raise ConfigError(f"{source}: key 'quantization_config' has bnb_4bit_quant_type {quant_type!r}; "
                          f"{readable}")


PRESETS: dict[str, dict[str, Any]] = {
    # openlm-research/open_llama_3b_v2
    "open_llama_3b_v2": dict(vocab_size=32000, hidden_size=3200, intermediate_size=8640, num_hidden_layers=26,
                             num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6),
    # tiny models for tests and the demo (built by bezoar.model.tiny)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=512),
    "tiny-odd": dict(vocab_size=512, hidden_size=60, intermediate_size=100, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512,
                     tie_word_embeddings=True),  # head_dim 10 (not a power of two), GQA 6:3, tied head
    "demo": dict(vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=512),
}


def preset(name: str, **overrides) -> LlamaConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})
