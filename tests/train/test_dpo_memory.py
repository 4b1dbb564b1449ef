"""Peak memory of a DPO step: one model's worth, not two (CPU resident set, fresh processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent / "dpo_memory_probe.py"
ROOT = PROBE.parents[2]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc (Linux)")
def test_dpo_step_peak_memory_is_one_model_not_two(record_property):
    modes = ("dpo", "dpo_copy", "sft")
    # One fresh process per mode (run side by side: each measures only itself).
    procs = {m: subprocess.Popen([sys.executable, str(PROBE), m], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in modes}
    results = {}
    for mode, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode} probe failed:\n{err[-3000:]}"
        results[mode] = json.loads(out.strip().splitlines()[-1])
    model = results["dpo"]["model_kib"]
    footprint = {m: r["peak_kib"] - r["base_kib"] for m, r in results.items()}  # peak above the bare imports
    step = {m: r["step_peak_kib"] - r["before_step_kib"] for m, r in results.items()}
    summary = {"model_mib": model / 1024, **{f"{m}_peak_over_imports_mib": v / 1024 for m, v in footprint.items()},
               **{f"{m}_step_growth_mib": v / 1024 for m, v in step.items()}}
    record_property("dpo_memory", json.dumps(summary))
    print("\nDPO step memory (MiB):", json.dumps({k: round(v, 1) for k, v in summary.items()}))

    # the measurement can see a second model: the deep-copy reference costs one more model
    assert footprint["dpo_copy"] > 1.9 * model, summary
    assert footprint["dpo_copy"] - footprint["dpo"] > 0.8 * model, summary
    # bezoar's DPO: one model plus activations, and about what an SFT step on the same batch takes. The
    # allocator's share varies with the install: 1.40-1.45x the model in the dev venv, 1.52-1.63x in CI's
    # fresh one (2026-11-26), against 2.4x and more with the copied reference; 1.75x leaves that room.
    assert footprint["dpo"] < 1.75 * model, summary
    assert footprint["dpo"] <= 1.1 * footprint["sft"], summary
