"""Assertion helpers that say how far apart two tensors are and where."""

from __future__ import annotations

import torch

# dtype -> (atol, rtol) for kernel-versus-reference comparisons on CPU (interpreter) and GPU.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol, rtol: float, name: str = "tensor"):
    """Like torch.testing.assert_close, but reports max/mean abs error and the worst index.

    ``atol`` is a number or a tensor of per-element bounds (see ``bf16_sum_bound``)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    if a.numel() == 0:
        return
    if isinstance(atol, torch.Tensor):
        atol_t = atol.detach().double().cpu().expand_as(a)
        atol = f"per element, {atol_t.min().item():.3g} .. {atol_t.max().item():.3g}"
    else:
        atol_t = atol
    diff = (a - e).abs()
    allowed = atol_t + rtol * e.abs()
    bad = diff > allowed
    bad |= torch.isnan(a) != torch.isnan(e)
    if bad.any():
        def at(index: int) -> tuple:
            return tuple(int(i) for i in torch.unravel_index(torch.tensor(index), a.shape))

        big = at(int(diff.nan_to_num(float("inf")).argmax()))
        # the element furthest past its bound, which is not the largest difference where bounds vary
        over = at(int(torch.where(bad, (diff - allowed).nan_to_num(float("inf")), -1.0).argmax()))
        allowed_over = allowed.expand_as(a)[over].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements off (atol={atol}, rtol={rtol}); "
            f"furthest past its bound at {over} (got {a[over].item():.6g}, want {e[over].item():.6g}, "
            f"allowed {allowed_over:.3g}); max |diff| {diff.max().item():.3e} at {big} (got {a[big].item():.6g}, "
            f"want {e[big].item():.6g}); mean |diff| {diff.mean().item():.3e}"
        )


def bf16_sum_bound(*terms: torch.Tensor, roundings: int = 4, floor: float = 1e-2) -> torch.Tensor:
    """Per-element error bound of a bf16 result made by adding ``terms`` (given exactly, in fp32).

    Each bf16 rounding of a partial result errs by at most 2**-8 of its magnitude, and a partial is
    at most sum |term|: the bound is ``roundings * 2**-8 * sum |term| + floor``. Against the result's
    own magnitude it can be large where the terms cancel, which is exactly where bf16 loses digits."""
    magnitude = sum(t.detach().float().abs() for t in terms)
    return roundings * 2.0**-8 * magnitude + floor


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def load_bench(name: str, tag: str, monkeypatch):
    """bench/<name>.py imported as module ``bench_<name>_<tag>`` (bench/ on sys.path while the test runs)."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}_{tag}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench_capturing(name: str, tag: str, monkeypatch, tmp_path):
    """``load_bench``, with its results captured instead of written: (module, smoke ``args`` with no budget,
    the list each ``write_results`` call appends its (name, rows, extra) to)."""
    import argparse

    module = load_bench(name, tag, monkeypatch)
    written = []
    monkeypatch.setattr(module.common, "write_results",
                        lambda bench, rows, args, extra=None: written.append((bench, rows, extra)))
    return module, argparse.Namespace(smoke=True, budget=0.0, out=str(tmp_path)), written


def bf16_copy_without_dtype(model_dir, folder, keep_fp32=()):
    """``model_dir``'s checkpoint in ``folder`` with its tensors in bf16 (those named in ``keep_fp32`` in fp32)
    and no dtype in config.json: a checkpoint whose dtype only its tensors tell. Returns ``folder``."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model_dir, folder = Path(model_dir), Path(folder)
    folder.mkdir(parents=True)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (folder / name).write_bytes((model_dir / name).read_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    for name in ("dtype", "torch_dtype"):
        config.pop(name, None)
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.to(torch.float32 if k in keep_fp32 else torch.bfloat16)
               for k, v in load_file(model_dir / "model.safetensors").items()}
    save_file(tensors, folder / "model.safetensors")
    return folder
