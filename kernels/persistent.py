"""What the persistent TMA GEMMs share (``lora_tma``, ``nf4_tma``): tensor descriptors, the program
count, and the grouped order in which programs walk output tiles."""

from __future__ import annotations

import torch

from bezoar_kernels.launch import sm_count

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    TensorDescriptor = None

# programs under the interpreter (no SMs to count): more than one, so the persistent loops' striding runs
INTERPRETER_PROGRAMS = 3


def available() -> bool:
    """Triton with tensor descriptors (triton.tools.tensor_descriptor, triton >= 3.4)."""
    return TensorDescriptor is not None


def describable(t: torch.Tensor) -> bool:
    """What a tensor descriptor needs: 2-D, unit last stride, 16-byte aligned base and row stride, and
    rows that do not overlap (a broadcast row stride of 0, as an expanded gradient has, is not described)."""
    size = t.element_size()
    return (t.dim() == 2 and t.stride(1) == 1 and t.data_ptr() % 16 == 0 and t.stride(0) >= max(1, t.shape[1])
            and (t.stride(0) * size) % 16 == 0)


def programs(configured: int | None, tiles: int, device: torch.device) -> int:
    """Persistent programs for ``tiles`` output tiles: ``configured`` if given, else one per SM (on CUDA)
    or INTERPRETER_PROGRAMS, never more than the tiles."""
    if configured:
        return max(1, min(tiles, configured))
    return max(1, min(tiles, sm_count(device) if device.type == "cuda" else INTERPRETER_PROGRAMS))


if triton is not None:

    @triton.jit
    def grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of ``tile`` in grouped order: GROUP_M row tiles walk the column tiles
        together, so the operands of the tiles in flight stay in L2."""
        per_group = GROUP_M * tiles_n
        first_m = (tile // per_group) * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size
