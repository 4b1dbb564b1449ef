"""The one place that picks the Triton kernel or its torch reference.

Backend choice, in order of precedence:

1. ``with backend("triton" | "torch" | "auto"):`` (tests, benchmarks, a config switch);
2. the environment variable ``BEZOAR_KERNELS`` (same three values);
3. ``auto``: Triton for CUDA tensors when triton imports, the torch reference otherwise.

``triton`` on CPU tensors needs ``TRITON_INTERPRET=1`` in the environment before triton is
first imported (the interpreter runs kernels on CPU tensors, slowly, for tests).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings

import torch

BACKENDS = ("auto", "triton", "torch")
_local = threading.local()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def current_backend() -> str:
    forced = getattr(_local, "backend", None)
    if forced is not None:
        return forced
    return env_backend()


def env_backend() -> str:
    """``BEZOAR_KERNELS`` (default ``auto``), checked."""
    name = os.environ.get("BEZOAR_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BEZOAR_KERNELS={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def env_switch(name: str) -> bool | None:
    """An on/off environment setting: ``0`` or ``1``, None where unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if raw not in ("0", "1"):
        raise ValueError(f"{name}: expected 0 or 1, got {raw!r}")
    return raw == "1"


@contextlib.contextmanager
def backend(name: str):
    """Run the enclosed calls with one kernel backend (``auto``, ``triton`` or ``torch``)."""
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r}: expected one of {', '.join(BACKENDS)}")
    previous = getattr(_local, "backend", None)
    _local.backend = name
    try:
        yield
    finally:
        _local.backend = previous


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the kernels for these tensors should run in Triton."""
    name = current_backend()
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if name == "auto":
        device = next((t.device for t in tensors if t is not None), None)
        return on_cuda and triton_available() and (device is None or triton_supported(device))
    # name == "triton": forced
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was asked for but triton does not import")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


_WARNED_OLD_GPU: set = set()


def triton_supported(device) -> bool:
    """Whether ``auto`` runs the Triton kernels on a CUDA device: sm_80 and later, what Triton supports and bezoar
    was measured on. Below (a T4, a V100) the torch reference runs, with one warning: ``model.kernels =
    "triton"`` (``BEZOAR_KERNELS=triton``) still forces the kernels there."""
    from bezoar_kernels.launch import capability

    major, minor = capability(device)
    if (major, minor) >= (8, 0):
        return True
    key = (device.type, device.index)
    if key not in _WARNED_OLD_GPU:
        _WARNED_OLD_GPU.add(key)
        warnings.warn(f"{device}: compute capability {major}.{minor} is below 8.0, where Triton's kernels are not "
                      "supported: bezoar runs its torch reference ops there (slower); model.kernels = \"triton\" "
                      "(BEZOAR_KERNELS=triton) forces the kernels", stacklevel=3)
    return False


def check_environment() -> None:
    """Parse now every ``BEZOAR_*`` setting the kernels read, so that a bad value is one error when a command
    starts rather than a failure inside its first step or request (or, for ``BEZOAR_KERNELS`` under a command
    that sets the backend itself, no word at all). Raises ValueError naming the variable."""
    from bezoar_kernels import attention, decode_attention, dequant_cache, lora, nf4_matmul, norm_lora, tuning

    env_backend()
    attention.packed_backend()
    decode_attention.choice()
    for env in ("BEZOAR_NF4_FUSED_MAX_M", "BEZOAR_NF4_GEMV_MAX_M", "BEZOAR_NF4_TMA_MIN_M", "BEZOAR_LORA_FUSED_MAX_M"):
        nf4_matmul._env_int(env)
    for env in ("BEZOAR_NF4_FUSED_SWAP", "BEZOAR_NF4_GEMV_PDL", "BEZOAR_LORA_WAVES", dequant_cache.ENV):
        env_switch(env)
    norm_lora._env_programs()
    if os.environ.get("BEZOAR_LORA_LARGE_M_PATH", "").strip():
        lora.large_m_path(None)
    if os.environ.get("BEZOAR_LORA_CONCAT_ALIGN", "").strip():
        lora.concat_align(None)
    user = os.environ.get("BEZOAR_TUNING", "").strip()
    if user:
        tuning._devices(user)  # read and checked once per process
