"""Launching a Triton kernel on whatever GPU is there."""

from __future__ import annotations

import dataclasses
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


def _index(device) -> int:
    """A CUDA device's index (the current one where it names none)."""
    import torch

    if not isinstance(device, torch.device):
        device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (its index None: the current one); looked up once."""
    return _sm_count_of(_index(device))


# ----------------------------------------------------------------------------- occupancy and waves
#
# A launch whose programs each walk a range of rows (the LoRA reductions over M) finishes in waves: the
# GPU holds only so many programs at once, and programs past that wait for a free slot. Every program
# has the same work, so a grid of 1.04 waves takes as long as 2 full ones. How many fit is the
# CUDA occupancy rule over the compiled kernel's registers, warps and shared memory.

_REG_UNIT = 256  # registers are handed to warps in units of 256 (8 a thread), sm_50 and later
_SHARED_RESERVED = 1024  # what the driver keeps of each block's shared memory, sm_80 and later
_SHARED_UNIT = 128  # a block's shared memory is handed out in units of 128 bytes (sm_80-sm_90)
_BLOCKS_PER_SM = 16  # the smallest per-SM block limit of sm_80-sm_90 GPUs (sm_86: 16; sm_80/89/90 more)


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """What one streaming multiprocessor holds: 32-bit registers, threads, blocks, shared bytes."""

    registers: int = 65536
    threads: int = 2048
    blocks: int = _BLOCKS_PER_SM
    shared: int = 233472  # sm_90: 228 KB


def blocks_per_sm(registers: int, warps: int, shared: int, limits: SMLimits = SMLimits()) -> int:
    """Programs (blocks) of ``warps`` warps, ``registers`` a thread and ``shared`` bytes of shared memory
    that one SM runs at once (0: none fits), by the CUDA occupancy rules: a warp's registers are
    rounded up to 256, a block's warps all take registers, each block's shared memory is 1 KB more,
    rounded up to 128 bytes."""
    per_warp = cdiv(max(1, registers) * 32, _REG_UNIT) * _REG_UNIT
    by_registers = (limits.registers // per_warp) // warps
    by_threads = limits.threads // (32 * warps)
    by_shared = limits.shared // (cdiv(shared + _SHARED_RESERVED, _SHARED_UNIT) * _SHARED_UNIT)
    return max(0, min(by_registers, by_threads, by_shared, limits.blocks))


@functools.lru_cache(maxsize=None)
def _sm_limits_of(index: int) -> SMLimits:
    import torch

    props = torch.cuda.get_device_properties(index)
    default = SMLimits()
    return SMLimits(
        registers=int(getattr(props, "regs_per_multiprocessor", 0) or default.registers),
        threads=int(getattr(props, "max_threads_per_multi_processor", 0) or default.threads),
        shared=int(getattr(props, "shared_memory_per_multiprocessor", 0) or default.shared),
    )


def sm_limits(device) -> SMLimits:
    """``SMLimits`` of a CUDA device, from torch's device properties; looked up once."""
    return _sm_limits_of(_index(device))


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    import torch

    return tuple(torch.cuda.get_device_capability(index))


def capability(device) -> tuple[int, int]:
    """A CUDA device's compute capability, looked up once."""
    return _capability_of(_index(device))


def native_bf16(device) -> bool:
    """Whether a CUDA device computes in bf16 natively (sm_80 and later). ``torch.cuda.is_bf16_supported()`` says
    yes on a T4 (sm_75), where bf16 is emulated without tensor cores: there fp16 is the half precision to use."""
    return capability(device) >= (8, 0)


@functools.lru_cache(maxsize=None)
def _shared_per_block_of(index: int) -> int:
    import torch

    props = torch.cuda.get_device_properties(index)
    value = int(getattr(props, "shared_memory_per_block_optin", 0) or 0)
    if not value:  # a torch without the field: Triton's own query (the 48 KB default pinned an H100 to small builds)
        try:
            import triton

            value = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
        except Exception:  # noqa: BLE001 - no Triton driver here: the CUDA default
            value = 49152
    return value


def shared_per_block(device) -> int:
    """The most shared memory one block may use on a CUDA device (opted in): 64 KB on sm_75, 99 KB on sm_86 and
    sm_89, 163 KB on sm_80, 227 KB on sm_90; looked up once."""
    return _shared_per_block_of(_index(device))


# (the caller's key for a kernel's build, device index) -> programs that run at once, None if unknown
_RESIDENT: dict[tuple, int | None] = {}


def resident_programs(kernel, key: tuple, device, launch_args) -> int | None:
    """How many programs of ``kernel`` a CUDA ``device`` runs at once; None off CUDA or where the build
    cannot say. ``key`` names the build (the meta-parameters and dtypes that change it);
    ``launch_args()`` gives (args, kwargs) of a launch of it. The first call per key and device builds
    the kernel for those without launching it (``warmup``: the build the launch then finds in Triton's
    cache) and reads its registers and shared memory; later calls are a dict lookup."""
    if device.type != "cuda":
        return None
    full = (key, device.index)
    try:
        return _RESIDENT[full]
    except KeyError:
        pass
    count = None
    try:
        args, kwargs = launch_args()
        compiled = kernel.warmup(*args, grid=(1,), **kwargs)
        compiled._init_handles()  # loads the module: registers are known from here on
        per_sm = blocks_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                               sm_limits(device))
        count = per_sm * sm_count(device) if per_sm else None
    except Exception:  # the launch itself reports a kernel that does not build or fit
        count = None
    _RESIDENT[full] = count
    return count


@functools.lru_cache(maxsize=4096)
def wave_splits(blocks: int, tiles: int, resident: int, most: int) -> int:
    """Row splits for a launch of ``tiles`` x splits programs that share ``blocks`` row blocks (each
    program walks ceil(blocks / splits) of them), at most ``most``, when ``resident`` programs run at
    once: the fewest waves x blocks per program (the time when every step costs the same), ties to
    fewer splits (smaller partial sums). 25 column tiles with 528 programs at once split 21 ways (525
    programs, one wave), where 22 gave 550 programs: a second wave of 22 that took as long as the first."""
    resident = max(1, resident)
    best_cost, best = None, 1
    for splits in range(1, max(1, min(blocks, most)) + 1):
        steps = cdiv(blocks, splits)
        used = cdiv(blocks, steps)  # the splits that have rows
        cost = cdiv(tiles * used, resident) * steps
        if best_cost is None or cost < best_cost:
            best_cost, best = cost, used
    return best
