"""bench/lora.py --inference: forwards without gradients at small M, each implementation checked against the
merged path on the same copy of W before it is timed, the path auto took recorded per row."""

from __future__ import annotations

import torch

from bezoar_kernels import lora as L
from tests.utils import load_bench_capturing

CPU = torch.device("cpu")


def _bench(monkeypatch, tmp_path):
    for var in ("BEZOAR_NF4_GEMV_MAX_M", "BEZOAR_NF4_FUSED_MAX_M", "BEZOAR_LORA_FUSED_MAX_M"):
        monkeypatch.delenv(var, raising=False)
    return load_bench_capturing("lora", "lora_inference", monkeypatch, tmp_path)


def test_inference_rows_name_auto_s_path_and_time_every_implementation(monkeypatch, tmp_path):
    bench, args, written = _bench(monkeypatch, tmp_path)
    monkeypatch.setattr(bench.common, "bench_ms", lambda fn, smoke=False, **kw: fn() is not None and 1.0)
    fused_max = L.nf4_fused_max_m(CPU)
    assert bench.inference(args, [(64, 128)], [1, 3, fused_max + 1], [8], CPU, torch.float32) == 0
    name, rows, extra = written[-1]
    assert name == "lora-inference" and extra["complete"] is True and "not on a CUDA device" in extra["bnb_note"]
    assert [(r["M"], r["auto_path"]) for r in rows] == [(1, "gemv"), (3, "small"), (fused_max + 1, "merged")]
    for r in rows:  # every implementation agreed with merged on the same W and was timed (no bitsandbytes here)
        assert not [k for k in r if k.endswith("_error")], r
        assert all(r[k] == 1.0 for k in ("nf4_only", "lora_auto", "lora_merged", "peft_style")), r
        assert r["merged/auto"] == 1.0 and "bnb_peft" not in r


def test_an_implementation_that_disagrees_is_reported_not_timed(monkeypatch, tmp_path):
    bench, args, written = _bench(monkeypatch, tmp_path)
    timed = []
    monkeypatch.setattr(bench.common, "bench_ms", lambda fn, smoke=False, **kw: timed.append(1) or 1.0)
    real = L.lora_linear

    def wrong(x, w, a, b, s, p, training, seed, path=None):  # auto's path drops the LoRA term
        return real(x, w, a, b, 0.0 if path is None else s, p, training, seed, path)

    monkeypatch.setattr(L, "lora_linear", wrong)
    # at r = 64 too (scaling 16 / r): with PEFT-sized B the missing term was 4% of y and passed the check
    assert bench.inference(args, [(64, 128)], [3], [8, 64], CPU, torch.float32) == 0
    rows = written[-1][1]
    assert [r["r"] for r in rows] == [8, 64]
    for row in rows:
        assert row["lora_auto"] is None and "differs from lora_merged" in row["lora_auto_error"], row
        assert row["lora_merged"] == 1.0
    assert len(timed) == 6  # nf4_only, lora_merged, peft_style per rank
