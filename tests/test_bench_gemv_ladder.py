"""bench/gemv_ladder.py: its smoke run times every rung on CPU (Triton interpreter), each ladder kernel
computes what it claims (checked here against torch written independently of the bench's own checks,
and the bench's checks catch a wrong output), bad arguments are one usage error naming the flag, and
the rungs compile for sm_90 with the gemv's loads and decode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gemv_ladder  # noqa: E402


def _weight(n, k, seed=0):
    from bezoar_kernels import nf4

    gen = torch.Generator().manual_seed(seed)
    return nf4.quantize_nf4_reference(torch.randn(n, k, generator=gen) * 0.02, 64, True)


def _tiles(n, k, block_n, blocks, table="prmt"):
    return gemv_ladder.ladder_tiles(n, k, torch.device("cpu"), torch.bfloat16, (block_n, blocks), table)


def _run(rung, q, t, x=None):
    return gemv_ladder.launch(rung, q, t, gemv_ladder.rung_output(rung, q, t), x)


def _ranges(values, t, pad_value=0):
    """(N, blocks_per_row) per-block values -> (split, N) sums over each K range's blocks."""
    n, per_row = values.shape
    padded = torch.nn.functional.pad(values, (0, t.split * t.blocks - per_row), value=pad_value)
    return padded.view(n, t.split, t.blocks).sum(dim=2).t()


def _absmax(q):
    """The decoded fp32 absmax, from the format's formula (not nf4.decode_absmax)."""
    block = torch.arange(q.num_blocks)
    return q.nested_code[q.absmax.long()] * q.nested_absmax[block // 256] + q.offset


def test_smoke_prints_every_rung_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # --smoke sets it itself
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gemv_ladder.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timed = [line.split(":")[0] for line in proc.stdout.splitlines() if line.endswith(" us") or " us, " in line]
    assert timed == [f"24x384 {rung}" for rung in gemv_ladder.CASES], proc.stdout
    assert "2 x 2 programs of 16 rows x 4 blocks" in proc.stdout  # the smoke tiles split K into two ranges
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 24x384 |")]
    assert [line.split(" | ")[1] for line in table] == list(gemv_ladder.CASES)
    assert "failed" not in proc.stdout + proc.stderr
    assert not list(tmp_path.iterdir())  # smoke runs write nothing


# 40 rows: a row tile that N does not fill; 6 blocks a row: with 4 blocks a program the second K range is half
# masked; 16 x 2 fills its ranges exactly
@pytest.mark.parametrize("block_n,blocks", [(16, 4), (16, 2)])
def test_read_folds_every_word_and_absmax_byte(block_n, blocks):
    q = _weight(40, 384)
    t = _tiles(40, 384, block_n, blocks)
    out = _run("read", q, t)
    words = q.packed.view(torch.int32).view(40, 6, 8).tolist()
    absmax = q.absmax.view(40, 6).tolist()
    for s in range(t.split):
        for row in range(40):
            fold = 0
            for b in range(s * blocks, min(6, (s + 1) * blocks)):
                for word in words[row][b]:
                    fold ^= word
            assert int(out[s, row]) == fold ^ sum(absmax[row][s * blocks:(s + 1) * blocks]), (s, row)
    assert gemv_ladder.check_rung("read", q, t, out) == 0.0
    out[1, 3] ^= 1 << 7  # one bit of one word: the bench's check must see it
    with pytest.raises(ArithmeticError, match=f"1 of {t.split * 40} folds differ"):
        gemv_ladder.check_rung("read", q, t, out)


def test_read_scale_sums_the_decoded_absmax():
    q = _weight(40, 384)
    t = _tiles(40, 384, 16, 4)
    out = _run("read_scale", q, t)
    got = gemv_ladder.read_scale_sums(out, q, t)
    want = _ranges(_absmax(q).view(40, 6), t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert gemv_ladder.check_rung("read_scale", q, t, out) < 1e-5
    out[0, 5] ^= 1 << 29  # an exponent bit of one row's sum
    with pytest.raises(ArithmeticError, match="read_scale: differs"):
        gemv_ladder.check_rung("read_scale", q, t, out)


def test_decode_sums_the_dequantized_weight():
    """Per K range and row: the sum of the dequantized weights, the codes rounded to bf16 (at most 0.31% of
    a weight), so within 0.4% of the sum of the weights' magnitudes."""
    from bezoar_kernels import nf4

    q = _weight(40, 384)
    t = _tiles(40, 384, 16, 4)
    out = _run("decode", q, t)
    w = nf4.dequantize_nf4_reference(q, torch.float32).view(40, 6, 64)
    want, magnitude = _ranges(w.sum(dim=2), t), _ranges(w.abs().sum(dim=2), t)
    assert ((out - want).abs() <= 0.004 * magnitude).all(), (out - want).abs().max()
    assert gemv_ladder.check_rung("decode", q, t, out) < 1e-4
    out[1, 0] *= 1.01
    with pytest.raises(ArithmeticError, match="decode: differs"):
        gemv_ladder.check_rung("decode", q, t, out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_partials_add_up_to_the_gemv(dtype):
    from bezoar_kernels import nf4_matmul as mm

    q = _weight(40, 384)
    t = _tiles(40, 384, 16, 4, table="prmt" if dtype == torch.bfloat16 else "byte")
    x = torch.randn(1, 384).to(dtype)
    out = _run("gemv_nosplit_sum", q, t, x)
    assert out.shape == (2, 1, 40)
    want = mm.nf4_gemv_forward(x, q, t.config).float()
    torch.testing.assert_close(out.sum(dim=0), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    gemv_ladder.check_rung("gemv_nosplit_sum", q, t, out, x)
    out[0, 0, 7] += want.abs().max() * 0.5
    with pytest.raises(ArithmeticError, match="gemv_nosplit_sum: differs"):
        gemv_ladder.check_rung("gemv_nosplit_sum", q, t, out, x)


def test_empty_stores_each_programs_id():
    q = _weight(40, 384)
    t = _tiles(40, 384, 16, 4)
    out = _run("empty", q, t)
    assert out.tolist() == list(range(6))
    gemv_ladder.check_rung("empty", q, t, out)


def test_tiles_follow_the_launcher_and_whole_k_has_one_range():
    from bezoar_kernels import nf4_matmul as mm

    t = gemv_ladder.ladder_tiles(3200, 3200, torch.device("cpu"), torch.bfloat16)
    # no tuning entry for the CPU: the launcher's heuristic at M = 1
    assert (t.block_n, t.blocks, t.source) == (*mm.gemv_tile(1, 64, 50), "heuristic")
    assert (t.tiles, t.split) == (-(-3200 // t.block_n), -(-50 // t.blocks))
    for k, blocks in ((3200, 64), (8640, 256)):
        tiles = _tiles(3200, k, 16, 8)
        whole = gemv_ladder.whole_k_config(tiles, k)
        assert whole.blocks == blocks and whole.block_n & (whole.block_n - 1) == 0
        assert whole.block_n * whole.blocks * 4 // whole.num_warps <= 16 * 8 * 4  # words per warp no more
    q = _weight(24, 384)
    t = _tiles(24, 384, 16, 4)
    whole = gemv_ladder.whole_k_config(t, 384)
    assert (whole.blocks, whole.block_n) == (8, 8)
    assert gemv_ladder.check_whole_k(torch.randn(1, 384).to(torch.bfloat16), q, t.config, whole) < 2e-2


def test_only_runs_one_case_and_names_a_missing_one(capsys):
    assert gemv_ladder.main(["--smoke", "--only", "read/24x384", "--iters", "2"]) == 0
    assert "read/24x384: ran 2 times" in capsys.readouterr().out
    assert gemv_ladder.main(["--smoke", "--only", "unroll/24x384"]) == 2
    assert "no case 'unroll/24x384'" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--shapes", "3200"), ("--shapes", "ax3"), ("--shapes", "3200x100"),
                                        ("--tiles", "16"), ("--tiles", "12x8"), ("--tiles", "16x8,32x4"),
                                        ("--rounds", "0"), ("--rounds", "two"), ("--rep", "0"), ("--warmup", "-1"),
                                        ("--table", "lut")])
def test_malformed_arguments_are_one_error_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        gemv_ladder.main(["--smoke", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err and err.count("error:") == 1, err


triton = pytest.importorskip("triton")
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "nvdisasm").exists() or not (TOOLS / "ptxas").exists(),
                    reason="triton without its bundled ptxas / nvdisasm")
def test_rungs_compile_for_sm90_with_the_gemvs_loads_and_decode(tmp_path):
    """bench/sass.py's ladder presets at the gemv's tiles (16 rows x 8 blocks): no spills; read loads W as the
    gemv does (its 16-byte loads, one absmax byte load); decode has every byte permute of the gemv's decode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def sass(*args):
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "sass.py"), *args, "--json"], capture_output=True,
                             text=True, cwd=ROOT, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout)

    gemv_dump = tmp_path / "gemv.sass"
    gemv = sass("nf4_gemv_prmt", "--meta", "BLOCK_N=16", "--meta", "BLOCKS=8", "--meta", "SPLIT=false",
                "--dump", str(gemv_dump))
    for rung in ("empty", "read", "read_scale", "decode"):
        dump = tmp_path / f"{rung}.sass"
        info = sass(f"ladder_{rung}", "--dump", str(dump))
        assert "STACK:0" in info["usage"], (rung, info["usage"])
        if rung == "empty":
            assert info["counts"] == {"STG.E": 1}, info["counts"]
            continue
        for load in ("LDG.E.128", "LDG.E.U8"):
            assert info["counts"].get(load) == gemv["counts"].get(load), (rung, load, info["counts"], gemv["counts"])
        if rung == "decode":
            assert dump.read_text().count("PRMT") == gemv_dump.read_text().count("PRMT") > 100
