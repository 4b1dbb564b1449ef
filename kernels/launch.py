"""Launching a Triton kernel on whatever GPU is there."""

from __future__ import annotations

import functools

# (kernel, argument dtypes, meta-parameters) -> the pipeline stages that fitted, for the launches that
# had to shrink. Empty on a GPU where every kernel fits, and then a launch computes no key at all.
_STAGES_THAT_FIT: dict[tuple, int] = {}


def _key(kernel, args: tuple, kwargs: dict) -> tuple:
    return (getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)),
            tuple(str(a.dtype) for a in args if hasattr(a, "dtype")),
            tuple(sorted((k, v) for k, v in kwargs.items()
                         if k != "num_stages" and isinstance(v, (bool, int, float, str)))))


def _out_of_shared_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfResources"  # triton.runtime.errors' (its module moved between releases)


def launch_fitting(kernel, grid, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, retried with fewer pipeline stages while the compiled kernel
    asks for more shared memory than the GPU has (an unaligned NF4 K on an H100 wanted 312 KB with 4
    stages; a consumer GPU has about 100 KB). What fitted is remembered per kernel, argument dtypes
    and meta-parameters, so later launches start there."""
    key = None
    if _STAGES_THAT_FIT:
        key = _key(kernel, args, kwargs)
        if key in _STAGES_THAT_FIT:
            kwargs = dict(kwargs, num_stages=min(kwargs["num_stages"], _STAGES_THAT_FIT[key]))
    stages = kwargs["num_stages"]
    while True:
        try:
            kernel[grid](*args, **dict(kwargs, num_stages=stages))
        except Exception as exc:
            if not _out_of_shared_memory(exc) or stages <= 1:
                raise
            stages -= 1
            continue
        if stages != kwargs["num_stages"]:  # it had to shrink: later launches start here
            _STAGES_THAT_FIT[key if key is not None else _key(kernel, args, kwargs)] = stages
        return


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints. The launchers use this, not ``triton.cdiv``: that one is a JIT function in
    recent Triton, and calling it from the host costs about 5 us (36 calls in one LoRA forward+backward)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1); host-side, for the same reason as ``cdiv``."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton, (0, 0) without one. Some tiles depend on it: the same
    kernel can spill under one release's compiler and not under another's (docs/notes.md)."""
    try:
        import triton
    except Exception:
        return (0, 0)
    return tuple(int(v) for v in triton.__version__.split(".")[:2])


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (its index None: the current one); looked up once."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(index)
