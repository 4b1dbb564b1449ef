"""bench/gemm_widths.py runs its code path in --smoke mode on CPU: every kind at each width against the
plain GEMM, one case alone with --only, and a clear error for a case that does not exist."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gemm_widths  # noqa: E402


def test_smoke_times_every_kind_at_each_width(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gemm_widths.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "x plain" in line]
    assert sorted(line.split(":")[0] for line in lines) == sorted(
        f"{kind} 48x64 M=32 +{e}" for kind in gemm_widths.KINDS for e in (0, 16))
    assert all(line.split(", ")[1].startswith("1.000x plain") for line in lines if " +0:" in line)
    assert not list(tmp_path.iterdir())  # smoke runs write nothing


def test_only_runs_one_case_and_names_a_missing_one(capsys):
    assert gemm_widths.main(["--smoke", "--only", "inner/48x64/M=32/+16", "--iters", "2"]) == 0
    assert "inner/48x64/M=32/+16: ran 2 times" in capsys.readouterr().out
    assert gemm_widths.main(["--smoke", "--only", "inner/48x64/M=32/+99"]) == 2
    assert "no case 'inner/48x64/M=32/+99'" in capsys.readouterr().err


def test_operands_refuse_an_unknown_kind():
    with pytest.raises(ValueError, match="one of rows, cols, inner, not 'diagonal'"):
        gemm_widths.operands("diagonal", 2, 2, 2, 0, None)


@pytest.mark.parametrize("kind,shapes", [("rows", [(5, 7), (3 + 16, 7)]), ("cols", [(5, 3), (3, 7 + 16)]),
                                         ("inner", [(5, 7 + 16), (3, 7 + 16)])])
def test_operands_widen_the_dimension_their_kind_names(kind, shapes):
    """M = 5, N = 3, K = 7, 16 extra: A's rows widen N, s B's columns widen dx (K), the concat forward the
    reduction; the product has the shape that widening gives."""
    import torch

    made = []

    def randn(*shape):
        made.append(shape)
        return torch.ones(*shape)

    out = gemm_widths.operands(kind, 5, 3, 7, 16, randn)()
    assert made == shapes
    assert out.shape == {"rows": (5, 3 + 16), "cols": (5, 7 + 16), "inner": (5, 3)}[kind]


@pytest.mark.parametrize("flag,value", [("--shapes", "3200"), ("--shapes", "ax3"), ("--ms", "4k"), ("--extras", "16,x")])
def test_malformed_lists_are_one_error_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        gemm_widths.main(["--smoke", flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err
