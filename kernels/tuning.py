"""Launch settings measured on a GPU model, looked up by the name of the device a call runs on.

The dispatch thresholds (which NF4 and LoRA path ``auto`` takes for M rows, the norm + LoRA grid) and
some launch tiles are facts about a GPU, not about the code: the crossover where dequantize + cuBLAS
beats the gemv kernel on an H100 is not where it is on an RTX 4090. ``bench/nf4.py`` and
``bench/lora.py`` measure them, and ``bench/tune.py`` turns their results into entries of a tuning
file, one per device name.

A setting comes from the first of:

1. its environment variable (``BEZOAR_NF4_GEMV_MAX_M``, ``BEZOAR_NF4_FUSED_MAX_M``,
   ``BEZOAR_NF4_TMA_MIN_M``, ``BEZOAR_LORA_FUSED_MAX_M``, ``BEZOAR_LORA_LARGE_M_PATH``,
   ``BEZOAR_NORM_LORA_PROGRAMS``, ``BEZOAR_NF4_DEQUANT_CACHE``, ``BEZOAR_LORA_CONCAT_ALIGN``,
   ``BEZOAR_NF4_FUSED_SWAP``, ``BEZOAR_NF4_GEMV_PDL``; read by the modules that own them);
2. the device's entry in the file that ``BEZOAR_TUNING`` names (a user's own measurements; read at the
   first lookup, and again after ``reload()``);
3. the device's entry in ``tuning.json`` beside this module (measurements committed with the code);
4. the module's constant (``FUSED_MAX_M``, ``GEMV_MAX_M``, ``TMA_MIN_M``, ``LARGE_M_PATH``, lora's
   ``FUSED_MAX_M``, the tile
   heuristics; ``nf4.dequant_cache``: off; ``lora.concat_align``: 16, no columns added;
   ``nf4.fused_swap``: ``FUSED_SWAP``; ``nf4.gemv_pdl``: ``GEMV_PDL``).

The file::

    {"format": 1,
     "devices": {
       "NVIDIA H200": {
         "triton": "3.6",
         "settings": {"nf4.gemv_max_m": 1, "nf4.fused_max_m": 0, "lora.large_m_path": "cublas",
                      "norm_lora.grid": "persistent",
                      "nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 8, "num_warps": 4}},
                      "nf4.dequant_launch": {"values_per_prog": 4096, "num_warps": 4},
                      "lora.merge_launch": {"layout": "pairs", "block_n": 64, "num_warps": 4}},
         "sources": {"nf4.gemv_max_m": "bench/results/nf4-graph-NVIDIA_H200-2026-11-26.json (764e428)"}}}}

Tile settings (``TILE_KEYS``) hold for the triton release they were timed with (``triton``, major.minor):
a ``nf4.gemv_tiles`` entry may also name the code ``table`` the gemv kernel looks codes up in
(``"byte"``, the default, ``"nibble"``, ``"prmt"`` or ``"gather"``) and the ``steps`` a program walks along K (one of
``GEMV_STEPS``; 1, the default, is one range per program). A different release compiles the same tile to different
code, so under it they are passed over (with one warning) for the next source in the order above. Thresholds hold across releases. Non-CUDA devices
are looked up by their type (``"cpu"``), which is how the tests reach this code without a GPU.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path

FORMAT = 1
SHIPPED = Path(__file__).with_name("tuning.json")
LARGE_M_PATHS = ("dequant", "cublas", "concat", "fused", "tma")  # what lora's "auto" may take above the small-M paths
NORM_GRIDS = ("persistent", "per_block")  # the fused RMSNorm + LoRA kernels' grids (norm_lora._programs)
GEMV_TABLES = ("byte", "nibble", "prmt", "gather")  # the gemv kernel's code lookups (nf4_matmul.GemvConfig.table)
# K ranges a gemv program walks (nf4_matmul.GemvConfig.steps) that a tuning entry may name: what the sweep tries
GEMV_STEPS = (1, 2, 4, 8, 16, 64)
MERGE_LAYOUTS = ("pairs", "two_dots", "joined")  # the NF4 + LoRA merge kernel's layouts (lora.MergeConfig.layout)
CONCAT_ALIGNS = (16, 32, 64, 128)  # the concat forward's LoRA column multiples (lora.concat_align)
THRESHOLD_KEYS = ("nf4.gemv_max_m", "nf4.fused_max_m", "nf4.tma_min_m", "lora.fused_max_m", "lora.large_m_path",
                  "norm_lora.grid", "nf4.dequant_cache", "lora.concat_align")
# the fused forward's operand order is with the tiles: which order is faster depends on the code a release
# builds (on triton 3.6 and 3.9 alike W x^T's loop is ~27% shorter, but that is a count, not a timing)
TILE_KEYS = ("nf4.gemv_tiles", "nf4.dequant_launch", "lora.merge_launch", "nf4.fused_swap", "nf4.gemv_pdl")


def _power_of_two(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value & (value - 1) == 0


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiles(value, where: str, fields: tuple[str, ...], optional: dict | None = None) -> None:
    """``value`` holds every name of ``fields`` (powers of two) and may hold the names of ``optional``
    (name -> allowed values), nothing else."""
    optional = optional or {}
    if not isinstance(value, dict) or not set(fields) <= set(value) <= set(fields) | set(optional):
        more = f" (and optionally {', '.join(optional)})" if optional else ""
        raise ValueError(f"{where}: expected an object with exactly {', '.join(fields)}{more}, got {value!r}")
    for name in fields:
        if not _power_of_two(value[name]):
            raise ValueError(f"{where}.{name}: expected a power of two, got {value[name]!r}")
    for name, allowed in optional.items():
        # the allowed values' own type: not true for 1, nor 4.0 for 4
        if name in value and (type(value[name]) is not type(allowed[0]) or value[name] not in allowed):
            raise ValueError(f"{where}.{name}: expected one of {', '.join(map(str, allowed))}, got {value[name]!r}")


def _check_setting(key: str, value, where: str) -> None:
    if key in ("nf4.gemv_max_m", "nf4.fused_max_m", "nf4.tma_min_m", "lora.fused_max_m"):
        if not _whole(value):
            raise ValueError(f"{where}: expected a whole number of rows, got {value!r}")
    elif key in ("nf4.dequant_cache", "nf4.fused_swap", "nf4.gemv_pdl"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif key == "lora.large_m_path":
        if value not in LARGE_M_PATHS:
            raise ValueError(f"{where}: expected one of {', '.join(LARGE_M_PATHS)}, got {value!r}")
    elif key == "lora.concat_align":
        if not isinstance(value, int) or isinstance(value, bool) or value not in CONCAT_ALIGNS:  # not 64.0 or true
            raise ValueError(f"{where}: expected one of {', '.join(map(str, CONCAT_ALIGNS))}, got {value!r}")
    elif key == "norm_lora.grid":
        if value not in NORM_GRIDS:
            raise ValueError(f"{where}: expected {' or '.join(NORM_GRIDS)}, got {value!r}")
    elif key == "nf4.gemv_tiles":
        if not isinstance(value, dict) or not value:
            raise ValueError(f"{where}: expected an object from rows of x (\"1\", \"4\", ...) to tiles, got {value!r}")
        for rows, tiles in value.items():
            if rows not in ("1", "2", "4", "8"):
                raise ValueError(f"{where}: key {rows!r}: expected rows of x, a power of two up to 8")
            _check_tiles(tiles, f"{where}.{rows}", ("block_n", "blocks", "num_warps"),
                         {"table": GEMV_TABLES, "steps": GEMV_STEPS})
    elif key == "nf4.dequant_launch":
        _check_tiles(value, where, ("values_per_prog", "num_warps"))
    elif key == "lora.merge_launch":
        _check_tiles(value, where, ("block_n", "num_warps"), {"layout": MERGE_LAYOUTS})
        if value["block_n"] < 16:  # the kernel's tl.dot takes at least 16 rows (lora.merged_weights refuses fewer)
            raise ValueError(f"{where}.block_n: expected at least 16, got {value['block_n']!r}")
    else:
        known = THRESHOLD_KEYS + TILE_KEYS
        raise ValueError(f"{where}: unknown setting (known: {', '.join(known)})")


def validate(data, path: str) -> dict:
    """``data`` (a parsed tuning file) checked whole; any problem is one ValueError naming the file and key."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{path}: expected a tuning file {{\"format\": {FORMAT}, \"devices\": {{...}}}}")
    for name, entry in data["devices"].items():
        where = f"{path}: devices.{name}"
        if not isinstance(entry, dict) or not isinstance(entry.get("settings"), dict):
            raise ValueError(f"{where}: expected an object with \"settings\"")
        extra = set(entry) - {"settings", "triton", "sources"}
        if extra:
            raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(extra))}")
        triton = entry.get("triton")
        if triton is not None and not (isinstance(triton, str) and len(triton.split(".")) == 2
                                       and all(p.isdigit() for p in triton.split("."))):
            raise ValueError(f"{where}.triton: expected a major.minor version such as \"3.6\", got {triton!r}")
        for key, value in entry["settings"].items():
            _check_setting(key, value, f"{where}.settings.{key}")
        if any(key in TILE_KEYS for key in entry["settings"]) and triton is None:
            raise ValueError(f"{where}.triton: tile settings need the triton version they were timed with")
        sources = entry.get("sources", {})
        if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
            raise ValueError(f"{where}.sources: expected an object of strings")
    return data


@functools.lru_cache(maxsize=8)
def _devices(path: str) -> dict:
    """The devices of one file, read once per process (``reload`` forgets them)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        if path == str(SHIPPED):
            return {}
        raise ValueError(f"{path}: no such tuning file (named by BEZOAR_TUNING)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the tuning file ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: line {exc.lineno}: not JSON ({exc.msg})") from None
    return validate(data, path)["devices"]


def reload() -> None:
    """Forget the files read so far (after one is rewritten in this process, as bench/tune.py and tests do)."""
    _devices.cache_clear()
    _memo.clear()
    _warned.clear()


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


def device_name(device) -> str | None:
    """The name entries are keyed by: the CUDA device's name, or a non-CUDA device's type."""
    if device is None:
        return None
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


def _triton_release() -> str | None:
    try:
        import triton
    except Exception:
        return None
    return ".".join(triton.__version__.split(".")[:2])


_warned: set = set()
_memo: dict = {}


def _look_up(key: str, device) -> tuple[object, str | None]:
    """(value or None, a warning to give or None): the first usable entry, the user's file before the shipped
    one; an entry of tiles timed with another triton release is passed over, and the warning says so."""
    name = device_name(device)
    user = os.environ.get("BEZOAR_TUNING", "").strip()
    release = _triton_release()
    skipped = []
    for path in ([user] if user else []) + [str(SHIPPED)]:
        entry = _devices(path).get(name)
        if entry is None or key not in entry["settings"]:
            continue
        if key in TILE_KEYS and entry.get("triton") != release:
            skipped.append(f"{path}: devices.{name}.settings.{key} (timed with triton {entry.get('triton')})")
            continue
        used = f"{path}'s" if not skipped else f"{path}'s instead"
        return entry["settings"][key], (f"{'; '.join(skipped)} not used under triton {release}: using {used}"
                                        if skipped else None)
    return None, (f"{'; '.join(skipped)} not used under triton {release}: using the built-in heuristic"
                  if skipped else None)


def setting(key: str, device, warn: bool = True):
    """The tuned value of ``key`` for ``device`` (a torch device, or None for none), or None where no file
    has one. The environment variables of step 1 are the caller's to read first. Looked up once per key
    and device (``BEZOAR_TUNING`` included: ``reload`` reads it again); after that a call costs a dict
    lookup, since the kernels ask on every call. Tiles passed over for their triton release are warned
    about once, by the first call with ``warn``."""
    if device is None:
        return None
    memo = (key, device)
    try:
        value, pending = _memo[memo]
    except KeyError:
        value, pending = _memo[memo] = _look_up(key, device)
    if pending is not None and warn and pending not in _warned:
        _warned.add(pending)
        warnings.warn(pending, stacklevel=3)
    return value


def summary(device) -> dict:
    """Every setting in effect for ``device`` from the files (what the benchmarks record beside their rows)."""
    keys = THRESHOLD_KEYS + TILE_KEYS
    out = {"device": device_name(device), "file": os.environ.get("BEZOAR_TUNING") or None}
    out.update({key: setting(key, device, warn=False) for key in keys})
    return out
