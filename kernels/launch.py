"""Launching a Triton kernel on whatever GPU is there."""

from __future__ import annotations

_STAGES_THAT_FIT: dict[tuple, int] = {}


def launch_fitting(kernel, grid, args: tuple, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)``, retried with fewer pipeline stages while the compiled kernel
    asks for more shared memory than the GPU has (an unaligned NF4 K on an H100 wanted 312 KB with 4
    stages; a consumer GPU has about 100 KB). What fitted is remembered per kernel and meta-parameters."""
    stages = kwargs["num_stages"]
    key = (getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)),
           tuple(str(a.dtype) for a in args if hasattr(a, "dtype")),
           tuple(sorted((k, v) for k, v in kwargs.items() if isinstance(v, (bool, int, float, str)))))
    stages = min(stages, _STAGES_THAT_FIT.get(key, stages))
    while True:
        try:
            kernel[grid](*args, **dict(kwargs, num_stages=stages))
        except Exception as exc:  # triton.runtime.errors.OutOfResources (its module moved between releases)
            if type(exc).__name__ != "OutOfResources" or stages <= 1:
                raise
            stages -= 1
            continue
        _STAGES_THAT_FIT[key] = stages
        return
