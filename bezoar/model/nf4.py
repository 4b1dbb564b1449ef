"""NF4Linear: the frozen 4-bit linear layer that replaces ``nn.Linear(bias=False)`` in a QLoRA base.

The weight lives as buffers in bitsandbytes' NF4 layout (see ``bezoar_kernels.nf4``), so
``model.to(device)`` moves it and nothing requires grad. ``forward`` runs
``bezoar_kernels.nf4_matmul`` (Triton on CUDA, the torch reference elsewhere).

Serialization is transformers' bitsandbytes-4bit format. For a layer ``prefix`` (for example
``model.layers.0.self_attn.q_proj``) a checkpoint holds:

    {prefix}.weight                                  uint8 (ceil(out*in/2), 1)  packed nibbles
    {prefix}.weight.absmax                           uint8 (blocks,), fp32 without double quant
    {prefix}.weight.quant_map                        fp32 (16,)   the NF4 code
    {prefix}.weight.nested_absmax                    fp32 (ceil(blocks/256),)   double quant only
    {prefix}.weight.nested_quant_map                 fp32 (256,)  8-bit dynamic code, double quant only
    {prefix}.weight.quant_state.bitsandbytes__nf4    uint8 bytes of a JSON object:
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [out, in],
         "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": <float>}
        (the nested_* fields only with double quant; "dtype" is the dtype the weight had
        before quantization)

``from_bnb_tensors`` reads that, ``bnb_tensors`` writes it, and the module's own
``state_dict()`` / ``load_state_dict()`` use the same keys, so a quantized model's state dict
matches a transformers + bitsandbytes one key for key.
"""

from __future__ import annotations

import json
import math

import torch

from bezoar_kernels.nf4 import (
    NESTED_BLOCKSIZE,
    NF4_CODE,
    SUPPORTED_BLOCKSIZES,
    NF4Weight,
    dequantize_nf4,
    quantize_nf4,
)
from bezoar_kernels.nf4_matmul import nf4_matmul

QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_TENSOR_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", QUANT_STATE_SUFFIX)


class NF4Linear(torch.nn.Module):
    """y = x @ W.T with W (out_features, in_features) frozen in NF4; computes in ``compute_dtype``."""

    def __init__(self, weight: NF4Weight, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D (out, in) weight, got shape {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype  # the dtype before quantization, recorded in the quant state
        self.compute_dtype = compute_dtype
        self.offset = weight.offset
        self._nf4_cache: NF4Weight | None = None
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("nested_absmax", weight.nested_absmax)
        self.register_buffer("nested_code", weight.nested_code)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_float(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Quantize a float (out, in) weight on its own device (Triton on CUDA)."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear.from_float needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        return cls(quantize_nf4(weight, blocksize, double_quant), compute_dtype)

    @classmethod
    def from_bnb_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, source: str,
                         compute_dtype: torch.dtype = torch.bfloat16) -> NF4Linear:
        """Build from transformers' bitsandbytes-4bit tensors of layer ``prefix``; ``source`` names the file.

        ``tensors`` may hold the whole checkpoint; only keys under ``{prefix}.weight`` are read.
        Missing, corrupt or inconsistent entries raise ValueError naming ``source`` and the key.
        """
        weight_key = f"{prefix}.weight" if prefix else "weight"
        return cls(_parse_bnb(tensors, weight_key, source), compute_dtype)

    # ------------------------------------------------------------------ use

    @property
    def nf4_weight(self) -> NF4Weight:
        """The buffers as an NF4Weight (built once, rebuilt after .to() or load_state_dict)."""
        cached = self._nf4_cache
        if (cached is None or cached.packed is not self.packed or cached.absmax is not self.absmax
                or cached.nested_absmax is not self.nested_absmax or cached.nested_code is not self.nested_code
                or cached.offset != self.offset or cached.blocksize != self.blocksize):
            cached = NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.weight_dtype,
                               self.blocksize, self.nested_absmax, self.nested_code, self.offset)
            self._nf4_cache = cached
        return cached

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nf4_matmul(x.to(self.compute_dtype), self.nf4_weight)
        return out.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """W (out_features, in_features) in the compute dtype."""
        return dequantize_nf4(self.nf4_weight, self.compute_dtype)

    def quantization_config(self) -> dict:
        """The ``quantization_config`` of config.json that makes transformers read these tensors."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES.get(self.compute_dtype, "float32"),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None,
            "llm_int8_threshold": 6.0,
            "_load_in_4bit": True,
            "_load_in_8bit": False,
        }

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")

    def _apply(self, fn, recurse=True):
        # Module.to(dtype)/.half() would cast the fp32 scales and wreck the format: the buffers
        # follow only the device (and fn's other effects when it keeps the dtype); the compute
        # dtype follows a floating-point cast.
        for name, buf in self._buffers.items():
            if buf is None:
                continue
            moved = fn(buf)
            if moved.dtype != buf.dtype:
                moved = buf.to(moved.device)
            self._buffers[name] = moved
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.packed.device)).dtype
        return self

    # ------------------------------------------------------------------ serialization

    def bnb_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """This layer as transformers' bitsandbytes-4bit tensors (CPU), keys under ``{prefix}.weight``."""
        weight_key = f"{prefix}.weight" if prefix else "weight"
        return {k: v.detach().cpu() for k, v in self._bnb_entries(weight_key).items()}

    def _bnb_entries(self, weight_key: str) -> dict[str, torch.Tensor]:
        state = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": _DTYPE_NAMES[self.weight_dtype],
                 "shape": [self.out_features, self.in_features]}
        entries = {
            weight_key: self.packed.view(-1, 1),
            weight_key + ".absmax": self.absmax,
            weight_key + ".quant_map": torch.tensor(NF4_CODE, dtype=torch.float32, device=self.packed.device),
        }
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
            entries[weight_key + ".nested_absmax"] = self.nested_absmax
            entries[weight_key + ".nested_quant_map"] = self.nested_code
        payload = json.dumps(state).encode("utf-8")
        entries[weight_key + QUANT_STATE_SUFFIX] = torch.tensor(list(payload), dtype=torch.uint8,
                                                                device=self.packed.device)
        return entries

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in self._bnb_entries(prefix + "weight").items():
            destination[key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weight_key not in mine:
            missing_keys.append(weight_key)
            return
        known = {weight_key} | {weight_key + s for s in _TENSOR_SUFFIXES}
        if strict:  # NF4Linear has no children: every key under its prefix is its own
            unexpected_keys.extend(k for k in mine if k not in known)
        try:
            loaded = _parse_bnb(mine, weight_key, "state_dict")
        except ValueError as exc:
            error_msgs.append(str(exc))
            return
        if loaded.shape != (self.out_features, self.in_features):
            error_msgs.append(f"{weight_key}: checkpoint shape {loaded.shape} != module shape "
                              f"{(self.out_features, self.in_features)}")
            return
        device = self.packed.device
        self.blocksize = loaded.blocksize
        self.weight_dtype = loaded.dtype
        self.offset = loaded.offset
        self.packed = loaded.packed.to(device)
        self.absmax = loaded.absmax.to(device)
        self.nested_absmax = None if loaded.nested_absmax is None else loaded.nested_absmax.to(device)
        self.nested_code = None if loaded.nested_code is None else loaded.nested_code.to(device)


# ----------------------------------------------------------------------------- parsing the bnb format


def _parse_bnb(tensors: dict[str, torch.Tensor], weight_key: str, source: str) -> NF4Weight:
    """Validate and decode one layer's bitsandbytes-4bit tensors (keys under ``weight_key``)."""

    def fail(key: str, problem: str) -> ValueError:
        return ValueError(f"{source}: {key}: {problem}")

    def need(key: str) -> torch.Tensor:
        if key not in tensors:
            raise fail(key, "missing (NF4 checkpoint layer is incomplete)")
        return tensors[key]

    under = [k for k in tensors if k.startswith(weight_key + ".")]
    state_keys = [k for k in under if k.startswith(weight_key + ".quant_state.")]
    qs_key = weight_key + QUANT_STATE_SUFFIX
    if not state_keys:
        raise fail(qs_key, "missing (not a bitsandbytes 4-bit checkpoint?)")
    if state_keys != [qs_key]:
        other = ", ".join(sorted(state_keys))
        raise fail(other, "expected exactly one quant state, bitsandbytes__nf4 (fp4 is not supported)")
    for key in under:
        if key[len(weight_key):] not in _TENSOR_SUFFIXES:
            raise fail(key, "unexpected key for an NF4 layer")

    state = _read_quant_state(tensors[qs_key], qs_key, fail)
    if state.get("quant_type") != "nf4":
        raise fail(qs_key, f"quant_type {state.get('quant_type')!r}, only 'nf4' is supported")
    blocksize = state.get("blocksize")
    if not _is_int(blocksize) or blocksize not in SUPPORTED_BLOCKSIZES:  # 64.0 passed and broke the forward
        raise fail(qs_key, f"blocksize {blocksize!r}, supported are the integers {SUPPORTED_BLOCKSIZES}")
    if state.get("dtype") not in _DTYPES:
        raise fail(qs_key, f"dtype {state.get('dtype')!r}, expected one of {', '.join(_DTYPES)}")
    shape = state.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(_is_int(s) and s > 0 for s in shape)):
        raise fail(qs_key, f"shape {shape!r}, expected [out_features, in_features]")
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    nested_fields = [f for f in ("nested_blocksize", "nested_dtype", "nested_offset") if f in state]
    nested = bool(nested_fields)
    if nested:
        if len(nested_fields) != 3:
            raise fail(qs_key, f"has {', '.join(nested_fields)} but not all of nested_blocksize, nested_dtype, "
                               "nested_offset")
        if not _is_int(state["nested_blocksize"]) or state["nested_blocksize"] != NESTED_BLOCKSIZE:
            raise fail(qs_key, f"nested_blocksize {state['nested_blocksize']!r}, expected the integer "
                               f"{NESTED_BLOCKSIZE}")
        if state["nested_dtype"] != "float32":
            raise fail(qs_key, f"nested_dtype {state['nested_dtype']!r}, expected 'float32'")
        offset = state["nested_offset"]
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise fail(qs_key, f"nested_offset {offset!r} is not a finite number")

    packed = need(weight_key)
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage other than uint8: the same bytes, another view
        packed = packed.contiguous().view(-1).view(torch.uint8)
    packed = packed.reshape(-1)
    if packed.numel() != (numel + 1) // 2:
        raise fail(weight_key, f"{packed.numel()} bytes, but shape {shape} needs {(numel + 1) // 2}")

    absmax = need(weight_key + ".absmax")
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want or tuple(absmax.shape) != (n_blocks,):
        raise fail(weight_key + ".absmax", f"{absmax.dtype} {tuple(absmax.shape)}, expected {want} ({n_blocks},)"
                   + (" (double quant)" if nested else " (no double quant)"))
    if not nested:
        _check_finite(absmax, weight_key + ".absmax", fail)

    code = need(weight_key + ".quant_map")
    nf4 = torch.tensor(NF4_CODE, dtype=torch.float32)
    # Written as "all within 1e-6" so that a NaN (which compares false) fails it.
    if code.dtype != torch.float32 or tuple(code.shape) != (16,) or not bool(((code.cpu() - nf4).abs() <= 1e-6).all()):
        raise fail(weight_key + ".quant_map", "is not the NF4 code (16 float32 values)")

    nested_absmax = nested_code = None
    for suffix in (".nested_absmax", ".nested_quant_map"):
        if (weight_key + suffix in tensors) != nested:
            raise fail(weight_key + suffix, "present without nested_* fields in the quant state" if not nested
                       else "missing, but the quant state says double quant")
    if nested:
        n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
        nested_absmax = tensors[weight_key + ".nested_absmax"]
        if nested_absmax.dtype != torch.float32 or tuple(nested_absmax.shape) != (n_nested,):
            raise fail(weight_key + ".nested_absmax",
                       f"{nested_absmax.dtype} {tuple(nested_absmax.shape)}, expected float32 ({n_nested},)")
        _check_finite(nested_absmax, weight_key + ".nested_absmax", fail)
        nested_code = tensors[weight_key + ".nested_quant_map"]
        if nested_code.dtype != torch.float32 or tuple(nested_code.shape) != (256,):
            raise fail(weight_key + ".nested_quant_map",
                       f"{nested_code.dtype} {tuple(nested_code.shape)}, expected float32 (256,)")
        _check_finite(nested_code, weight_key + ".nested_quant_map", fail)

    device = packed.device
    move = (lambda t: None if t is None else t.to(device).contiguous())  # noqa: E731
    return NF4Weight(move(packed), move(absmax), tuple(shape), _DTYPES[state["dtype"]], blocksize,
                     move(nested_absmax), move(nested_code), state["nested_offset"] if nested else None)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite(tensor: torch.Tensor, key: str, fail) -> None:
    """Refuse a scale tensor holding NaN or inf, which would load and make every forward through the layer NaN.
    A scale tensor has one value per block of 64 or more weights, so the pass costs little next to the load."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise fail(key, f"{bad} of its {tensor.numel()} values are not finite (NaN or inf): the checkpoint is corrupt")


def _read_quant_state(tensor: torch.Tensor, key: str, fail) -> dict:
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.dim() != 1:
        raise fail(key, "must be a 1-D uint8 tensor holding JSON")
    try:
        state = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(key, f"corrupt quant state, not UTF-8 JSON ({exc})") from None
    if not isinstance(state, dict):
        raise fail(key, "corrupt quant state, expected a JSON object")
    return state
