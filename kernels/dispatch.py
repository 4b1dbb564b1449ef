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
    name = os.environ.get("BEZOAR_KERNELS", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"BEZOAR_KERNELS={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


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
        return on_cuda and triton_available()
    # name == "triton": forced
    if not triton_available():
        raise RuntimeError("kernel backend 'triton' was asked for but triton does not import")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True
