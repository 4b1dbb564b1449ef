"""Assertion helpers that say how far apart two tensors are and where."""

from __future__ import annotations

import torch

# dtype -> (atol, rtol) for kernel-versus-reference comparisons on CPU (interpreter) and GPU.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but reports max/mean abs error and the worst index."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        worst = int(diff.nan_to_num(float("inf")).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"max |diff| {diff.max().item():.3e} at {idx} (got {a[idx].item():.6g}, want {e[idx].item():.6g}); "
            f"mean |diff| {diff.mean().item():.3e}"
        )


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()
