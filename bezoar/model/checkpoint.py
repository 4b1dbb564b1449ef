"""Hugging Face checkpoint folders in and out: safetensors (single or sharded), tensor by tensor.

``load`` builds the model on the meta device and fills it one tensor at a time from memory-mapped
safetensors, so it never holds two copies of the weights; with ``quant="nf4"`` each linear layer of
the decoder blocks is quantized as it arrives. ``save`` writes sharded safetensors, config.json and
the tokenizer files, into a temporary folder that is renamed into place when complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from bezoar.locking import clear_dead_writes

from .config import DTYPE_NAMES, ConfigError, LlamaConfig
from .llama import LlamaForCausalLM
from .tokenizer import TOKENIZER_FILES, TOKENIZER_FOLDERS

log = logging.getLogger("bezoar.model")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys some checkpoints carry that the forward pass recomputes instead.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder bezoar cannot load: the message names the file and the key."""


def _dtype_from_name(name: str | None) -> torch.dtype | None:
    if not name:
        return None
    name = str(name).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return getattr(torch, DTYPE_NAMES[name])


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a checkpoint folder, checked to exist.

    The file chosen is the one transformers' from_pretrained reads: model.safetensors before
    model.safetensors.index.json, and pytorch_model.bin before its index. A folder can hold both, for one
    saved again over an earlier save of the other kind (transformers leaves the old index, or the old single
    file, in place)."""
    index = folder / INDEX_FILE
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    if index.exists():
        return _shards_of(index)
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        raise CheckpointError(f"{folder}: has sharded safetensors but no {INDEX_FILE}")
    pickles = [folder / n for n in PICKLE_FILES if (folder / n).exists()] + sorted(folder.glob("pytorch_model-*.bin"))
    if pickles:
        if allow_pickle:
            if (folder / PICKLE_FILES[0]).exists():
                return [folder / PICKLE_FILES[0]]
            if (folder / PICKLE_FILES[1]).exists():
                return _shards_of(folder / PICKLE_FILES[1])
            return sorted(p for p in pickles if p.suffix == ".bin")
        raise CheckpointError(
            f"{pickles[0]}: pickled PyTorch weights; bezoar reads safetensors only, because unpickling can run "
            "code. Convert the folder to safetensors (transformers' save_pretrained writes them), or, from "
            "Python, pass allow_pickle=True to bezoar.model.load to read it with torch.load(weights_only=True)."
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} (no weights found)")


def _shards_of(index: Path) -> list[Path]:
    """The shard files an index's weight_map names, each checked to exist."""
    kind = "safetensors" if index.name == INDEX_FILE else "PyTorch"
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index}: not a {kind} index (needs a 'weight_map' object): {e}") from None
    for name in files:
        if not (index.parent / name).exists():
            keys = [k for k, v in weight_map.items() if v == name]
            raise CheckpointError(f"{index}: shard {name!r} is missing from {index.parent} "
                                  f"(it holds {len(keys)} tensors, e.g. {keys[0]!r})")
    return [index.parent / name for name in files]


def _iter_tensors(path: Path):
    """Yield (key, loader) for every tensor in one weight file; loader() reads that tensor only."""
    if path.suffix == ".bin":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # truncated zip, a pre-1.6 file mmap cannot read, globals weights_only refuses
            reason = str(e).splitlines()[0]
            raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({reason})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
        for key, t in state.items():
            yield key, (lambda t=t: t)
        return
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({e})") from None
    with handle as f:
        for key in f.keys():
            yield key, (lambda key=key: f.get_tensor(key))


_SAFETENSORS_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_float_dtype(folder: Path) -> str | None:
    """The dtype of the first floating-point tensor in a checkpoint's first weight file, read from its safetensors
    header alone (None for a pickled or unreadable file, or one without floating-point tensors)."""
    try:
        path = weight_files(Path(folder))[0]
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 1 << 30 else {}
    except (OSError, ValueError, CheckpointError):
        return None
    floats = {key: _SAFETENSORS_FLOATS[entry["dtype"]] for key, entry in header.items()
              if key != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _SAFETENSORS_FLOATS}
    if "model.embed_tokens.weight" in floats:  # a norm kept in fp32 beside bf16 weights does not decide it
        return floats["model.embed_tokens.weight"]
    return max(set(floats.values()), key=list(floats.values()).count) if floats else None


def _set_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    parent_name, _, name = key.rpartition(".")
    parent = model.get_submodule(parent_name)
    parent._parameters[name] = nn.Parameter(value, requires_grad=False)


def _untie_a_distinct_head(model, config, file: Path, head: torch.Tensor, seen: dict, device, dtype,
                           folder: Path) -> None:
    """A checkpoint whose config ties the head to the embedding but that stores ``lm_head.weight`` too, read as
    transformers reads it: the stored head is the embedding where the embedding is not stored, the model is
    untied where the two differ (it was tied to the embedding without a word: logits 30.9 off transformers'),
    and tied as the config says where they are equal."""
    embed = "model.embed_tokens.weight"
    want = tuple(model.model.embed_tokens.weight.shape)
    if tuple(head.shape) != want or not head.is_floating_point():
        raise CheckpointError(f"{file}: tensor 'lm_head.weight' has shape {tuple(head.shape)} ({head.dtype}), the "
                              f"config ({folder / 'config.json'}) implies {want}")
    if embed not in seen:
        _set_param(model, embed, head.to(device=device, dtype=dtype))
        seen[embed] = file
    elif not torch.equal(head.to(device=device, dtype=dtype), model.model.embed_tokens.weight):
        log.warning("%s: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight; "
                    "the model is untied and keeps both, as transformers loads it", folder)
        config.tie_word_embeddings = False
        model.config.tie_word_embeddings = False
        _set_param(model, "lm_head.weight", head.to(device=device, dtype=dtype))


def _replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def is_prequantized(config: LlamaConfig) -> bool:
    q = config.extra.get("quantization_config") or {}
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))



def _check_device(device) -> torch.device:
    """The device to load on (default CUDA when present, else CPU); one clear error for a name torch does not
    know or a GPU this machine lacks (torch fails later, deep in the first copy)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"device {device!r}: not a device torch knows ({e})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CheckpointError(f"device {str(device)!r}: this machine has no CUDA device torch can use "
                                  "(--device cpu runs on the CPU)")
        if dev.index is not None and dev.index >= count:
            raise CheckpointError(f"device {str(device)!r}: this machine has {count} CUDA device(s), "
                                  f"cuda:0 to cuda:{count - 1}")
    return dev


def default_dtype(quant: str | None, config: LlamaConfig, device: torch.device, source="") -> torch.dtype:
    """``load``'s dtype where none is given: float32 off CUDA; on CUDA bfloat16 for NF4 and the config's dtype (or
    bfloat16) for a dense model, float16 in place of bfloat16 on a GPU without native bf16 (compute capability
    below 8.0: a T4, a V100), where torch's is_bf16_supported() says yes and bf16 runs emulated."""
    if device.type != "cuda":
        return torch.float32
    from bezoar_kernels.launch import native_bf16

    dtype = torch.bfloat16 if quant == "nf4" else (_dtype_from_name(config.torch_dtype) or torch.bfloat16)
    if dtype == torch.bfloat16 and not native_bf16(device):
        log.warning("%s: %s has no native bf16 (compute capability below 8.0); the model loads in float16 (pass "
                    "dtype to choose)", source, device)
        return torch.float16
    return dtype


def load(path, quant: str | None = None, adapter=None, device=None, dtype=None, allow_pickle: bool = False,
         nf4_blocksize: int = 64, nf4_double_quant: bool = True, nf4_compute_dtype=None):
    """Load a Hugging Face Llama checkpoint folder into bezoar's model.

    - ``quant``: None (dense) or ``"nf4"`` (each decoder-block linear quantized as it streams in;
      embeddings, norms and lm_head stay dense). A folder that already holds a bitsandbytes-4bit
      checkpoint loads as NF4 whatever ``quant`` says.
    - ``adapter``: a PEFT-format LoRA adapter folder to attach (trainable weights stay as saved).
    - ``device``: default CUDA when present, else CPU. ``dtype``: default the config's ``dtype`` (or ``torch_dtype``)
      for CUDA (bfloat16 for NF4; float16 for either on a GPU without native bf16) and float32 on CPU
      (``default_dtype``).
    - ``nf4_blocksize`` (64 or 128), ``nf4_double_quant``, ``nf4_compute_dtype`` (default ``dtype``): how
      ``quant="nf4"`` quantizes a dense checkpoint.
    Every parameter comes back frozen (``requires_grad=False``); LoRA weights are the trainable part.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    config = LlamaConfig.from_file(folder)
    device = _check_device(device)
    prequant = is_prequantized(config)
    if quant not in (None, "nf4"):
        raise ValueError(f"quant={quant!r}: expected None or 'nf4'")
    if prequant:
        quant = "nf4"
    if isinstance(dtype, str):
        dtype = _dtype_from_name(dtype)
    if dtype is None:
        dtype = default_dtype(quant, config, device, folder)

    compute_dtype = _dtype_from_name(nf4_compute_dtype) if isinstance(nf4_compute_dtype, str) else (nf4_compute_dtype or dtype)
    files = weight_files(folder, allow_pickle=allow_pickle)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, dtype=dtype)
    expected = {k: p for k, p in model.named_parameters(remove_duplicate=False)}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    quantized_modules = {
        f"model.layers.{i}.{part}.{name}"
        for i in range(config.num_hidden_layers)
        for part, names in (("self_attn", QUANTIZED_LINEARS[:4]), ("mlp", QUANTIZED_LINEARS[4:]))
        for name in names
    } if quant == "nf4" else set()
    pending_bnb: dict[str, dict[str, torch.Tensor]] = {}
    tied_head: tuple[Path, torch.Tensor] | None = None
    seen: dict[str, Path] = {}
    unexpected: list[str] = []

    for file in files:
        for key, read in _iter_tensors(file):
            if key.endswith(IGNORED_SUFFIXES):
                continue
            if key in seen:
                raise CheckpointError(f"{file}: key {key!r} appears again (first in {seen[key].name})")
            module_name = key.partition(".weight")[0]
            if prequant and module_name in quantized_modules:
                seen[key] = file
                pending_bnb.setdefault(module_name, {})[key] = read()
                continue
            if key not in expected:
                if config.tie_word_embeddings and key == "lm_head.weight":
                    # a tied head saved anyway: kept to compare with the embedding once both are read (below)
                    tied_head = (file, read())
                    continue
                unexpected.append(key)
                continue
            seen[key] = file
            tensor = read()
            # packed 4-bit bytes are an (n, 1) column, of uint8 or of bnb_4bit_quant_storage's dtype (bf16 storage
            # was reported as a shape that the config did not imply)
            if prequant and tensor.dim() == 2 and tensor.shape[1] == 1 and expected[key].shape[1] != 1:
                raise CheckpointError(f"{file}: tensor {key!r} is stored 4-bit (bitsandbytes, {tensor.dtype}); "
                                      "bezoar reads only the decoder blocks' linear layers as 4-bit and needs "
                                      "embeddings, norms and lm_head dense (transformers keeps lm_head dense "
                                      "unless llm_int8_skip_modules leaves it out)")
            want = tuple(expected[key].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, the config "
                                      f"({folder / 'config.json'}) implies {want}")
            if not tensor.is_floating_point():
                raise CheckpointError(f"{file}: tensor {key!r} has dtype {tensor.dtype}; expected floating point")
            if key.endswith(".weight") and key[: -len(".weight")] in quantized_modules:
                from .nf4 import NF4Linear

                # in the model's dtype, as transformers + bitsandbytes cast a weight before quantizing it (quantized
                # as stored, an fp32 checkpoint whose config says bfloat16 gave other bytes in 21 of 2048)
                w = tensor.to(device=device, dtype=dtype)
                try:
                    module = NF4Linear.from_float(w, blocksize=nf4_blocksize, double_quant=nf4_double_quant,
                                                  compute_dtype=compute_dtype)
                except ValueError as e:  # a weight NF4 cannot hold (NaN or inf): name it
                    raise CheckpointError(f"{file}: tensor {key!r}: {e}") from None
                _replace_module(model, key[: -len(".weight")], module)
                del w, module
            else:
                _set_param(model, key, tensor.to(device=device, dtype=dtype))
            del tensor

    if pending_bnb:
        from .nf4 import NF4Linear

        for module_name, tensors in pending_bnb.items():
            source = ", ".join(sorted({seen[k].name for k in tensors}))
            key = f"{module_name}.weight"
            if set(tensors) == {key} and tensors[key].is_floating_point():
                # a linear layer saved dense in a 4-bit checkpoint (transformers' llm_int8_skip_modules): dense here too
                tensor, want = tensors[key], tuple(expected[key].shape)
                if tuple(tensor.shape) != want:
                    raise CheckpointError(f"{folder / source}: tensor {key!r} has shape {tuple(tensor.shape)}, the "
                                          f"config ({folder / 'config.json'}) implies {want}")
                _set_param(model, key, tensor.to(device=device, dtype=dtype))
                continue
            module = NF4Linear.from_bnb_tensors(tensors, module_name, source=source, compute_dtype=compute_dtype)
            got, want = (module.out_features, module.in_features), tuple(expected[f"{module_name}.weight"].shape)
            if got != want:
                raise CheckpointError(f"{folder / source}: tensor {module_name + '.weight'!r} is NF4 of shape {got} "
                                      f"(its quant state), the config ({folder / 'config.json'}) implies {want}")
            _replace_module(model, module_name, module.to(device))
            seen[f"{module_name}.weight"] = seen[next(iter(tensors))]
    if tied_head is not None:
        _untie_a_distinct_head(model, config, *tied_head, seen, device, dtype, folder)
    missing = [k for k in expected if k not in seen]
    if missing:
        index = folder / (INDEX_FILE if files[0].suffix == ".safetensors" else PICKLE_FILES[1])
        sharded = files[0].name not in (SINGLE_FILE, PICKLE_FILES[0]) and index.exists()
        where = index if sharded else files[0]
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"{files[0].parent}: {len(unexpected)} tensor(s) that a Llama model does not have, "
                              f"e.g. {unexpected[0]!r} (is config.json the right one for these weights?)")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.source_path = folder
    model.eval()
    if adapter is not None:
        from .lora import load_adapter

        load_adapter(model, adapter)
        model.eval()  # the adapter's new modules start in training mode (dropout on)
    return model


# ---- save -------------------------------------------------------------------------------------


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def dense_state_dict(model) -> dict[str, torch.Tensor]:
    """The base-model tensors under their Hugging Face keys (LoRA weights excluded; NF4 layers in
    transformers' bitsandbytes-4bit serialization)."""
    out: dict[str, torch.Tensor] = {}
    tied = model.config.tie_word_embeddings
    for name, module in model.named_modules():
        if ".lora_" in f".{name}" or name.rpartition(".")[2].startswith("lora_"):
            continue
        name = name.replace(".base_layer", "")  # a LoRA-wrapped layer saves its base under the HF key
        if hasattr(module, "bnb_tensors"):
            out.update(module.bnb_tensors(name))
            continue
        for pname, p in module.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            if tied and key == "lm_head.weight":
                continue
            if pname.startswith("lora_"):
                continue
            out[key] = p.detach()
    return out


def check_out_folder(out, overwrite: bool, **inputs) -> None:
    """Refuse, before any work, an output folder that ``save`` would refuse (a file; a non-empty folder
    without ``overwrite``) or that is one of the input folders (``model=...``, ``adapter=...``) or holds
    one: writing there, even with overwrite, would replace what the output is made from."""
    target = Path(out)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{out}: is a file; the checkpoint needs a folder")
    above = next((p for p in target.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise FileExistsError(f"{out}: cannot be made, {above} is a file")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty (--overwrite replaces it)")
    target = target.resolve()
    for what, folder in inputs.items():
        if folder is None:
            continue
        source = Path(folder).resolve()
        if target == source or target in source.parents:
            where = "is" if target == source else "holds"
            raise FileExistsError(f"{out}: {where} the {what} folder {folder}; write the output to another folder")


def save(model, path, tokenizer_from=None, max_shard_size="2GB", dtype=None, overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder that transformers loads.

    Shards above ``max_shard_size`` get an index file. The tokenizer files are copied from
    ``tokenizer_from`` (a folder) or from the folder the model was loaded from.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_symlink():  # written where it points: a rename onto the link itself would fail after the work
        path = path.resolve()
    clear_dead_writes(path)  # what earlier writes of path that were killed left beside it
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path}: is a file, not a folder for a checkpoint")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path}: exists and is not empty (pass overwrite=True to replace it)")
    if isinstance(dtype, str):
        dtype = _dtype_from_name(dtype)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    tmp.mkdir(parents=True)

    tensors = dense_state_dict(model)
    # NF4 layers keep their scales and codes in float32 (the format fixes it): only dense weights take dtype.
    nf4_layers = {name.replace(".base_layer", "") for name, module in model.named_modules()
                  if hasattr(module, "bnb_tensors")}
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        if dtype is not None and t.is_floating_point() and key.partition(".weight")[0] not in nf4_layers:
            t = t.to(dtype)
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata=metadata)
            for key, t in shard.items():
                weight_map[key] = name
                total += t.numel() * t.element_size()
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    hf = model.config.to_hf_dict()
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    out_dtype = dtype or (float_dtypes[0] if float_dtypes else torch.float32)
    # The dtype the dense weights are stored in, under both names: transformers 5 reads "dtype" first (and
    # loads in it by default), older versions read "torch_dtype".
    hf["dtype"] = hf["torch_dtype"] = str(out_dtype).replace("torch.", "")
    quant_cfg = getattr(model, "quantization_config", None)
    nf4_modules = [m for m in model.modules() if hasattr(m, "bnb_tensors")]
    if nf4_modules:
        hf["quantization_config"] = nf4_modules[0].quantization_config()
        # decoder linears kept dense beside the NF4 ones (a 4-bit checkpoint saved with some skipped): named, or
        # transformers would build them 4-bit and find no quant state. A kind dense in every layer by its short
        # name ("down_proj"), others by their full names: a short name makes every layer's module of that kind
        # dense in transformers, which then met the 4-bit tensors of the others ("MISMATCH ckpt [5632, 1]").
        linears = [(name, type(m) is nn.Linear) for name, m in model.named_modules()
                   if name.rpartition(".")[2] in QUANTIZED_LINEARS
                   and (type(m) is nn.Linear or hasattr(m, "bnb_tensors"))]
        dense = []
        for kind in QUANTIZED_LINEARS:
            of_kind = [(name, is_dense) for name, is_dense in linears if name.rpartition(".")[2] == kind]
            if of_kind and all(is_dense for _, is_dense in of_kind):
                dense.append(kind)
            else:
                dense.extend(name for name, is_dense in of_kind if is_dense)
        if dense:
            hf["quantization_config"]["llm_int8_skip_modules"] = sorted(dense) + ["lm_head"]
    elif quant_cfg:
        hf["quantization_config"] = quant_cfg
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    source = Path(tokenizer_from) if tokenizer_from is not None else getattr(model, "source_path", None)
    # The source's generation_config.json carries what config.json does not (several eos ids, sampling
    # defaults): keep it; write the minimal one only when there is none.
    gen_source = Path(source) / "generation_config.json" if source is not None else None
    if gen_source is not None and gen_source.is_file():
        shutil.copy2(gen_source, tmp / "generation_config.json")
    else:
        gen = {key: hf.get(key) for key in ("bos_token_id", "eos_token_id")}  # a list of eos ids stays one
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    if source is not None:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists():
                shutil.copy2(Path(source) / name, tmp / name)
        for name in TOKENIZER_FOLDERS:
            if (Path(source) / name).is_dir():
                shutil.copytree(Path(source) / name, tmp / name)

    if overwrite and path.exists():
        old = path.with_name(path.name + f".old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
        return path
    # Without overwrite the target is absent or an empty folder, as checked above; another writer (a second
    # merge to the same --out) may have put a whole checkpoint there since. rename(2) replaces an empty folder
    # but refuses a non-empty one, so that checkpoint is never replaced: this one is refused instead.
    try:
        tmp.rename(path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if path.is_dir() and any(path.iterdir()):
            raise FileExistsError(f"{path}: another process wrote a checkpoint there while this one was being "
                                  "written; it is kept (pass overwrite=True to replace it)") from None
        raise
    return path
