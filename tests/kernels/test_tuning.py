"""Per-device tuning: the file format, the lookup order the kernels follow, and bench/tune.py's derivations."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from bezoar_kernels import lora as L
from bezoar_kernels import nf4, tuning
from bezoar_kernels import nf4_matmul as mm

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _load_bench(name):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tune = _load_bench("tune")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for var in ("BEZOAR_TUNING", "BEZOAR_NF4_GEMV_MAX_M", "BEZOAR_NF4_FUSED_MAX_M", "BEZOAR_NF4_TMA_MIN_M",
                "BEZOAR_LORA_LARGE_M_PATH", "BEZOAR_LORA_FUSED_MAX_M", "BEZOAR_LORA_CONCAT_ALIGN",
                "BEZOAR_NF4_FUSED_SWAP", "BEZOAR_NF4_GEMV_PDL"):
        monkeypatch.delenv(var, raising=False)
    tuning.reload()
    yield
    tuning.reload()


def _user_file(tmp_path, monkeypatch, settings, triton=None, name="cpu"):
    entry = {"settings": settings}
    if triton is not None:
        entry["triton"] = triton
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": 1, "devices": {name: entry}}))
    monkeypatch.setenv("BEZOAR_TUNING", str(path))
    tuning.reload()
    return path


def _release():
    import triton

    return ".".join(triton.__version__.split(".")[:2])


# ----------------------------------------------------------------------------- lookup order


def test_without_an_entry_the_module_constants_hold():
    weight = nf4.quantize_nf4_reference(torch.randn(32, 128), 64)
    assert tuning.setting("nf4.gemv_max_m", CPU) is None  # the shipped file has GPU entries only
    assert mm.gemv_max_m(CPU) == mm.GEMV_MAX_M and mm.fused_max_m(CPU) == mm.FUSED_MAX_M
    assert L.large_m_path(CPU) == L.LARGE_M_PATH
    assert mm.resolve_path(None, mm.GEMV_MAX_M, weight) == "gemv"
    assert mm.resolve_path(None, mm.GEMV_MAX_M + 1, weight) == "fused"  # both Hopper entries: fused to M = 16
    assert mm.resolve_path(None, mm.FUSED_MAX_M + 1, weight) == "dequant"


def test_a_device_entry_moves_the_thresholds_and_the_environment_wins(tmp_path, monkeypatch):
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_max_m": 4, "nf4.fused_max_m": 16, "lora.large_m_path": "concat"})
    weight = nf4.quantize_nf4_reference(torch.randn(32, 128), 64)
    assert mm.gemv_max_m(CPU) == 4 and mm.fused_max_m(CPU) == 16
    assert mm.resolve_path(None, 3, weight) == "gemv"
    assert mm.resolve_path(None, 5, weight) == "fused"
    assert mm.resolve_path(None, 17, weight) == "dequant"
    assert L.resolve_path(None, 3, True, CPU) == "gemv"
    assert L.resolve_path(None, 17, True, CPU) == "concat"
    assert L.resolve_path(None, 17, False, CPU) == "cublas"
    # no device: the environment and built-in defaults only
    assert L.resolve_path(None, 17, True) == L.LARGE_M_PATH
    # another device's entry does not apply
    assert mm.gemv_max_m(torch.device("meta")) == mm.GEMV_MAX_M
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "2")
    monkeypatch.setenv("BEZOAR_LORA_LARGE_M_PATH", "dequant")
    assert mm.resolve_path(None, 3, weight) == "fused"
    assert L.resolve_path(None, 17, True, CPU) == "dequant"


def test_the_lora_call_takes_the_tuned_path(tmp_path, monkeypatch):
    """The entry reaches a real call (Triton interpreter): "auto" runs the tuned large-M path and gives what
    that path gives when asked for by name."""
    _user_file(tmp_path, monkeypatch, {"lora.large_m_path": "concat"})
    taken = []
    real_plan = L._Plan
    monkeypatch.setattr(L, "_Plan", lambda **kw: taken.append(kw["path"]) or real_plan(**kw))
    weight = nf4.quantize_nf4_reference(torch.randn(16, 64), 64)
    x = torch.randn(40, 64)
    a, b = torch.randn(4, 64) * 0.1, torch.randn(16, 4) * 0.1
    auto = L.lora_linear_triton(x, weight, a, b, 2.0, 0.1, True, 7)
    named = L.lora_linear_triton(x, weight, a, b, 2.0, 0.1, True, 7, "concat")
    assert taken == ["concat", "concat"]
    assert torch.equal(auto, named)
    monkeypatch.delenv("BEZOAR_TUNING")
    tuning.reload()
    L.lora_linear_triton(x, weight, a, b, 2.0, 0.1, True, 7)
    assert taken[-1] == L.LARGE_M_PATH


class _LaunchSpy:
    """Stands in for a Triton kernel: records each launch's keyword arguments, runs nothing."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(dict(kwargs, grid=grid))


def test_tuned_gemv_tiles_and_dequant_launch_reach_the_launches(tmp_path, monkeypatch):
    _user_file(tmp_path, monkeypatch, {
        "nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, "num_warps": 2}},
        "nf4.dequant_launch": {"values_per_prog": 1024, "num_warps": 2}}, triton=_release())
    assert mm._tuned_gemv_config(1, CPU) == mm.GemvConfig(block_n=16, blocks=2, num_warps=2)
    assert mm._tuned_gemv_config(4, CPU) == mm.heuristic_gemv_config()  # no entry for 4 rows: the heuristic
    assert mm.heuristic_gemv_config().table == "gather" == mm.GEMV_TABLE  # fp32 codes, not the byte table
    assert nf4._blocks_per_prog(100, 64, 1024) == 16 and nf4._blocks_per_prog(100, 128, 1024) == 8
    weight = nf4.quantize_nf4_reference(torch.randn(32, 512), 64)
    gemv = _LaunchSpy()
    monkeypatch.setattr(mm, "_nf4_gemv_kernel", gemv)
    mm.nf4_gemv_forward(torch.randn(1, 512), weight)
    mm.nf4_gemv_forward(torch.randn(3, 512), weight)  # 4 rows of x: the heuristic's tiles and table
    mm.nf4_gemv_forward(torch.randn(3, 512), weight, mm.GemvConfig())  # a config naming no table: "byte"
    first, second, third = gemv.launches
    assert (first["BLOCK_N"], first["BLOCKS"], first["num_warps"], first["grid"]) == (16, 2, 2, (2, 4))
    assert [launch["TABLE"] for launch in gemv.launches] == ["byte", "gather", "byte"]
    # the byte table scales per block at one row of x, per word at more; "gather" per block (gemv_block_scale)
    assert [launch["BLOCK_SCALE"] for launch in gemv.launches] == [True, True, False]
    heuristic = mm.gemv_tile(4, 64, 8)
    assert (second["BLOCK_N"], second["BLOCKS"], second["num_warps"]) == (*heuristic, 4)
    assert (third["BLOCK_N"], third["BLOCKS"], third["num_warps"]) == (*heuristic, 4)
    dequant = _LaunchSpy()
    monkeypatch.setattr(nf4, "_nf4_dequantize_kernel", dequant)
    nf4.dequantize_nf4_triton(weight, torch.float32)
    nf4.dequantize_nf4_triton(weight, torch.float32, blocks_per_prog=4)  # one given: not mixed with the pair
    nf4.dequantize_nf4_triton(weight, torch.float32, num_warps=8)
    got = [(d["BLOCKS_PER_PROG"], d["num_warps"]) for d in dequant.launches]
    assert got == [(16, 2), (4, 4), (nf4._blocks_per_prog(weight.num_blocks, 64), 8)]


def test_tuned_merge_launch_reaches_the_merge_kernel(tmp_path, monkeypatch):
    """``lora.merge_launch`` sets the merged path's merge kernel launch; a launch given to the call wins."""
    _user_file(tmp_path, monkeypatch, {"lora.merge_launch": {"layout": "joined", "block_n": 16, "num_warps": 2}},
               triton=_release())
    assert L.merge_config(CPU) == L.MergeConfig("joined", 16, 2)
    weight = nf4.quantize_nf4_reference(torch.randn(40, 128), 64)
    plan = L._Plan(weights=(weight,), scalings=(2.0,), seeds=(0,), dropout_p=0.0, path="merged")
    a, b = torch.randn(1, 4, 128), torch.randn(40, 4)
    spy = _LaunchSpy()
    monkeypatch.setattr(L, "_nf4_merge_kernel", spy)
    L.merged_weights(plan, a, b, torch.float32)
    L.merged_weights(plan, a, b, torch.float32, config=L.MergeConfig("two_dots", 32, 8))
    got = [(k["LAYOUT"], k["BLOCK_N"], k["EVEN_N"], k["num_warps"], k["grid"]) for k in spy.launches]
    assert got == [("joined", 16, False, 2, (3, 2)), ("two_dots", 32, False, 8, (2, 2))]
    with pytest.raises(ValueError, match="merge layout must be one of pairs, two_dots, joined, not 'rows'"):
        L.merged_weights(plan, a, b, torch.float32, config=L.MergeConfig("rows"))
    with pytest.raises(ValueError, match="merge block_n must be a power of two of at least 16, not 24"):
        L.merged_weights(plan, a, b, torch.float32, config=L.MergeConfig(block_n=24))
    with pytest.raises(ValueError, match="merge num_warps must be a power of two, not 3"):
        L.merged_weights(plan, a, b, torch.float32, config=L.MergeConfig(num_warps=3))


def test_merge_sweep_rows_give_the_merge_launch():
    """bench/tune.py takes the merge launch with the lowest summed time from --sweep-merge rows, where it
    beats the default's sum by more than --min-gain; else none."""
    def row(default, times):
        grid = [{"config": {"layout": layout, "block_n": 64, "num_warps": 4}, "ms": t}
                for layout, t in zip(("pairs", "two_dots", "joined"), times)]
        return {"shape": "3200x3200", "r": 16, "default_ms": default, "grid": grid}

    rows = [row(0.1, [0.1, 0.05, 0.2]), row(0.2, [0.2, 0.1, 0.1])]
    out = tune.derive(_result(bench="lora-merge-sweep", rows=rows, complete=True))
    assert out["lora.merge_launch"][0] == {"layout": "two_dots", "block_n": 64, "num_warps": 4}
    assert "0.1500 ms against the heuristic's 0.3000 ms over 2 shapes" in out["lora.merge_launch"][1]
    # a sweep cut short (its budget, the call's limit) gives nothing: a shape it missed may want another launch
    assert "lora.merge_launch" not in tune.derive(_result(bench="lora-merge-sweep", rows=rows[:1], complete=False))
    same = tune.derive(_result(bench="lora-merge-sweep", rows=[row(0.1, [0.1, 0.099, 0.2])], complete=True))
    assert same["lora.merge_launch"][0] is None and "the heuristic stays" in same["lora.merge_launch"][1]
    table = {"format": 1, "devices": {"NVIDIA X": {"settings": {"lora.merge_launch": out["lora.merge_launch"][0]},
                                                   "triton": "3.6"}}}
    tuning.validate(table, "derived")


def test_tuned_dequant_launch_gives_the_same_values(tmp_path, monkeypatch):
    _user_file(tmp_path, monkeypatch, {"nf4.dequant_launch": {"values_per_prog": 1024, "num_warps": 2}},
               triton=_release())
    weight = nf4.quantize_nf4_reference(torch.randn(8, 256), 64)
    got = nf4.dequantize_nf4_triton(weight, torch.float32)  # the interpreter (tests/conftest.py)
    assert torch.equal(got, nf4.dequantize_nf4_reference(weight, torch.float32))


def test_tiles_of_another_triton_release_are_passed_over_with_one_warning(tmp_path, monkeypatch):
    path = _user_file(tmp_path, monkeypatch, {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, "num_warps": 2}},
                                              "nf4.gemv_max_m": 2}, triton="0.1")
    tuning.summary(CPU)  # what the benchmarks and the decode fingerprint call: no warning, and none used up
    with pytest.warns(UserWarning, match=r"timed with triton 0\.1\) not used .* using the built-in heuristic") as got:
        assert mm._tuned_gemv_config(1, CPU) == mm.heuristic_gemv_config()
    assert str(path) in str(got[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only, also after the memo is gone
        tuning._memo.clear()
        assert tuning.setting("nf4.gemv_tiles", CPU) is None
    assert mm.gemv_max_m(CPU) == 2  # thresholds hold across releases


def test_shipped_tiles_serve_when_the_users_are_of_another_release(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.json"
    tiles = {"1": {"block_n": 32, "blocks": 4, "num_warps": 4}}
    shipped.write_text(json.dumps({"format": 1, "devices": {"cpu": {
        "settings": {"nf4.gemv_tiles": tiles, "nf4.gemv_max_m": 4}, "triton": _release()}}}))
    monkeypatch.setattr(tuning, "SHIPPED", shipped)
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, "num_warps": 2}},
                                       "nf4.gemv_max_m": 2}, triton="0.1")
    with pytest.warns(UserWarning, match=r"using .*shipped\.json's instead"):
        assert tuning.setting("nf4.gemv_tiles", CPU) == tiles
    assert mm.gemv_max_m(CPU) == 2  # the user's threshold wins over the shipped one
    monkeypatch.delenv("BEZOAR_TUNING")
    tuning.reload()
    assert mm.gemv_max_m(CPU) == 4


def test_lora_fused_threshold_is_its_own_setting(tmp_path, monkeypatch):
    """lora.fused_max_m moves LoRA's auto and nothing else; nf4.fused_max_m moves the NF4 matmul only; the
    environment wins; a value that is not a whole number of rows is refused by its key."""
    _user_file(tmp_path, monkeypatch, {"lora.fused_max_m": 8, "nf4.fused_max_m": 16})
    assert L.fused_max_m(CPU) == 8 and mm.fused_max_m(CPU) == 16
    assert L.resolve_path(None, 8, device=CPU) == "fused" and L.resolve_path(None, 9, device=CPU) == L.large_m_path(CPU)
    monkeypatch.setenv("BEZOAR_LORA_FUSED_MAX_M", "0")
    assert L.fused_max_m(CPU) == 0 and L.resolve_path(None, 8, device=CPU) == L.large_m_path(CPU)
    monkeypatch.setenv("BEZOAR_LORA_FUSED_MAX_M", "many")
    with pytest.raises(ValueError, match="BEZOAR_LORA_FUSED_MAX_M"):
        L.fused_max_m(CPU)
    with pytest.raises(ValueError, match="lora.fused_max_m: expected a whole number of rows"):
        tuning.validate({"format": 1, "devices": {"x": {"settings": {"lora.fused_max_m": -1}}}}, "t.json")


@pytest.mark.parametrize("value", [16, 32, 64, 128])
def test_concat_align_accepts_the_aligns(value):
    table = {"format": 1, "devices": {"NVIDIA X": {"settings": {"lora.concat_align": value}}}}
    assert tuning.validate(table, "t.json") is table  # a threshold: no triton release needed


@pytest.mark.parametrize("value", [48, 8, 0, 256, "64", True, 64.0, None, [64]])
def test_concat_align_refuses_other_values_by_its_key(value):
    table = {"format": 1, "devices": {"NVIDIA X": {"settings": {"lora.concat_align": value}}}}
    with pytest.raises(ValueError, match=r"t\.json: devices\.NVIDIA X\.settings\.lora\.concat_align: expected one "
                                         r"of 16, 32, 64, 128, got " + re.escape(repr(value))):
        tuning.validate(table, "t.json")


def test_concat_align_from_the_environment_then_the_file_then_16(tmp_path, monkeypatch):
    """``lora.concat_align()``: BEZOAR_LORA_CONCAT_ALIGN (read at every call), else the device's entry, else 16;
    a value of the variable that is not an align is refused by the variable's name."""
    assert L.CONCAT_ALIGNS == tuning.CONCAT_ALIGNS == (16, 32, 64, 128)
    assert L.concat_align(CPU) == L.CONCAT_ALIGN == 16 and L.concat_align() == 16
    _user_file(tmp_path, monkeypatch, {"lora.concat_align": 64})
    assert L.concat_align(CPU) == 64
    assert L.concat_align() == 16  # no device: no entry to look up
    assert L.concat_align(torch.device("meta")) == 16  # another device's entry does not apply
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", "128")
    assert L.concat_align(CPU) == 128 and L.concat_align() == 128
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", " 32 ")
    assert L.concat_align(CPU) == 32  # read again at this call, not memoized
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", "")
    assert L.concat_align(CPU) == 64  # empty: as if unset
    for bad in ("48", "64.0", "sixty-four", "0", "true"):
        monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", bad)
        with pytest.raises(ValueError, match=rf"BEZOAR_LORA_CONCAT_ALIGN={bad!r}: expected one of 16, 32, 64, 128"):
            L.concat_align(CPU)
    # a tuning file with a bad value is refused at the lookup, naming the file and the key
    monkeypatch.delenv("BEZOAR_LORA_CONCAT_ALIGN")
    path = _user_file(tmp_path, monkeypatch, {"lora.concat_align": 48})
    with pytest.raises(ValueError, match=r"settings\.lora\.concat_align: expected one of 16, 32, 64, 128, got 48") as got:
        L.concat_align(CPU)
    assert str(path) in str(got.value)


def test_the_environment_is_read_before_the_file(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text("{")
    monkeypatch.setenv("BEZOAR_TUNING", str(path))
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "3")
    monkeypatch.setenv("BEZOAR_NF4_FUSED_MAX_M", "0")
    monkeypatch.setenv("BEZOAR_LORA_LARGE_M_PATH", "cublas")
    tuning.reload()
    assert (mm.gemv_max_m(CPU), mm.fused_max_m(CPU), L.large_m_path(CPU)) == (3, 0, "cublas")
    monkeypatch.delenv("BEZOAR_NF4_FUSED_MAX_M")
    with pytest.raises(ValueError, match="broken.json: line 1"):
        mm.fused_max_m(CPU)


def test_user_file_overrides_the_shipped_entry(tmp_path, monkeypatch):
    shipped = json.loads(tuning.SHIPPED.read_text())
    name, entry = next(iter(shipped["devices"].items()))
    key, value = next(iter(entry["settings"].items()))
    monkeypatch.setattr(tuning, "device_name", lambda device: name)
    tuning.reload()
    assert tuning.setting(key, CPU) == value
    other = {"lora.large_m_path": "concat" if value != "concat" else "dequant"} if key == "lora.large_m_path" \
        else {key: value + 5}
    _user_file(tmp_path, monkeypatch, other, name=name)
    assert tuning.setting(key, CPU) == other[key]


@pytest.mark.parametrize("text, match", [
    ("{", "line 1: not JSON"),
    ('{"format": 2, "devices": {}}', "expected a tuning file"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_max_m": -1}}}}',
     r"devices\.cpu\.settings\.nf4\.gemv_max_m: expected a whole number"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_max_m": true}}}}', "whole number"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"lora.large_m_path": "gemv"}}}}',
     r"lora\.large_m_path: expected one of dequant, cublas, concat, fused"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_maxm": 1}}}}', r"nf4\.gemv_maxm: unknown setting"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"norm_lora.grid": "wide"}}}}',
     r"norm_lora\.grid: expected persistent or per_block, got 'wide'"),
    ('{"format": 1, "devices": {"cpu": {"settings": {}, "extra": 1}}}', r"devices\.cpu: unknown field\(s\) extra"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.dequant_launch": {"values_per_prog": 1000, '
     '"num_warps": 4}}, "triton": "3.6"}}}', r"dequant_launch\.values_per_prog: expected a power of two"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.dequant_launch": {"values_per_prog": 1024, '
     '"num_warps": 4}}}}}', r"devices\.cpu\.triton: tile settings need the triton version"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_tiles": {"3": {"block_n": 16, "blocks": 2, '
     '"num_warps": 4}}}, "triton": "3.6"}}}', r"gemv_tiles: key '3'"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_tiles": {"08": {"block_n": 16, "blocks": 2, '
     '"num_warps": 4}}}, "triton": "3.6"}}}', r"gemv_tiles: key '08'"),
    ('{"format": 1, "devices": {"cpu": {"settings": {}, "triton": "3"}}}', r"triton: expected a major\.minor"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, '
     '"num_warps": 4, "table": "word"}}}, "triton": "3.6"}}}', r"gemv_tiles\.1\.table: expected one of byte, nibble"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, '
     '"num_warps": 4, "tabel": "byte"}}}, "triton": "3.6"}}}', r"gemv_tiles\.1: expected an object with exactly"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"lora.merge_launch": {"layout": "rows", "block_n": 64, '
     '"num_warps": 4}}, "triton": "3.6"}}}', r"merge_launch\.layout: expected one of pairs, two_dots, joined"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"lora.merge_launch": {"block_n": 48, "num_warps": 4}}, '
     '"triton": "3.6"}}}', r"merge_launch\.block_n: expected a power of two"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_pdl": "yes"}, "triton": "3.6"}}}',
     r"devices\.cpu\.settings\.nf4\.gemv_pdl: expected true or false, got 'yes'"),
    ('{"format": 1, "devices": {"cpu": {"settings": {"nf4.fused_swap": 1}, "triton": "3.6"}}}',
     r"devices\.cpu\.settings\.nf4\.fused_swap: expected true or false, got 1"),
    # a power of two the merge kernel cannot take (tl.dot needs 16 rows): the file is refused, not every call
    ('{"format": 1, "devices": {"cpu": {"settings": {"lora.merge_launch": {"block_n": 8, "num_warps": 4}}, '
     '"triton": "3.6"}}}', r"merge_launch\.block_n: expected at least 16"),
])
def test_bad_tuning_files_name_the_file_and_key(tmp_path, monkeypatch, text, match):
    path = tmp_path / "mine.json"
    path.write_text(text)
    monkeypatch.setenv("BEZOAR_TUNING", str(path))
    tuning.reload()
    with pytest.raises(ValueError, match=match) as info:
        mm.gemv_max_m(CPU)
    assert str(path) in str(info.value)


def test_a_missing_user_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BEZOAR_TUNING", str(tmp_path / "nope.json"))
    tuning.reload()
    with pytest.raises(ValueError, match="nope.json: no such tuning file"):
        L.large_m_path(CPU)


def test_the_shipped_file_is_what_tune_derives_from_the_recorded_results():
    shipped = tuning.validate(json.loads(tuning.SHIPPED.read_text()), str(tuning.SHIPPED))
    files = sorted(f for f in tune.RESULTS.glob("*.json") if f.name.startswith(("nf4", "lora")))
    table = {"format": 1, "devices": {}}
    tune.apply(files, table)
    assert table["devices"] == shipped["devices"]  # settings, sources and triton releases
    # and the measured H200 facts the module constants were set from (the defaults of a GPU with no entry)
    h200 = shipped["devices"]["NVIDIA H200"]["settings"]
    assert {key: h200[key] for key in ("lora.large_m_path", "nf4.gemv_max_m", "nf4.fused_max_m", "nf4.fused_swap",
                                       "nf4.gemv_pdl")} == {
        "lora.large_m_path": L.LARGE_M_PATH, "nf4.gemv_max_m": mm.GEMV_MAX_M, "nf4.fused_max_m": mm.FUSED_MAX_M,
        "nf4.fused_swap": mm.FUSED_SWAP, "nf4.gemv_pdl": mm.GEMV_PDL}
    # the H100's entry agrees on the thresholds
    h100 = shipped["devices"]["NVIDIA H100 80GB HBM3"]["settings"]
    assert (h100["nf4.gemv_max_m"], h100["nf4.fused_max_m"]) == (mm.GEMV_MAX_M, mm.FUSED_MAX_M)


# ----------------------------------------------------------------------------- bench/tune.py derivations


def _nf4_rows(times):
    """times: {(dir, shape, M): (gemv, fused, dequant)}"""
    return [{"dir": d, "shape": s, "M": m, "nf4_gemv": g, "nf4_fused": f, "nf4_dequant": q}
            for (d, s, m), (g, f, q) in times.items()]


def test_gemv_and_fused_thresholds():
    rows = _nf4_rows({
        ("fwd", "a", 1): (1.0, 3.0, 2.0), ("fwd", "b", 1): (1.0, 3.0, 1.5),
        ("fwd", "a", 4): (1.0, 3.0, 2.0), ("fwd", "b", 4): (3.0, 3.0, 1.5),  # dequant wins the sum at 4
        ("fwd", "a", 16): (None, 3.0, 2.0), ("fwd", "b", 16): (None, 3.0, 2.0),
        ("bwd", "a", 1): (None, 3.0, 2.0), ("bwd", "b", 1): (None, 3.0, 2.0),
    })
    assert tune.gemv_fastest_up_to(rows) == 1
    assert tune.fused_fastest_up_to(rows) == 0
    # the sum over the shapes decides, not each shape: losing b by 0.1 and winning a by 1.0 is a win
    rows[3]["nf4_gemv"] = 1.6
    assert tune.gemv_fastest_up_to(rows) == 4
    rows[3]["nf4_gemv"] = 2.6  # 3.6 against 3.5
    assert tune.gemv_fastest_up_to(rows) == 1
    # a shape the gemv kernel did not take at an M is a loss there, whatever the others gain
    assert tune.gemv_fastest_up_to([dict(r, nf4_gemv=None) if r["shape"] == "b" and r["M"] == 1 else r
                                    for r in rows]) == 0
    faster_fused = _nf4_rows({("fwd", "a", 1): (None, 1.0, 2.0), ("fwd", "a", 4): (None, 1.0, 2.0),
                              ("bwd", "a", 1): (None, 1.0, 2.0), ("bwd", "a", 4): (None, 2.5, 2.0),
                              ("fwd", "a", 16): (None, 1.0, 2.0)})
    # forward only: the backward losing at 4 does not count (auto's backward never runs fused)
    assert tune.fused_fastest_up_to(faster_fused) == 16
    assert tune.gemv_fastest_up_to(faster_fused) is None  # gemv never timed: no setting
    assert tune.fused_fastest_up_to([{"dir": "fwd", "M": 1, "nf4_fused": None, "nf4_dequant": 1.0}]) is None
    # a shape the fused forward failed on at an M (untimed) is a loss there: judged on the shape left, a kernel
    # failing on two of three shapes at M = 32 was taken there
    failing = _nf4_rows({("fwd", s, m): (None, None if m == 32 and s != "a" else 1.5, 2.0)
                         for s in ("a", "b", "c") for m in (1, 4, 16, 32)})
    assert tune.fused_fastest_up_to(failing) == 16
    # a run cut between a shape's fused and dequant timings: that half pair is no comparison (it raised TypeError)
    cut = failing[:-1] + [dict(failing[-1], nf4_dequant=None, nf4_fused=1.0)]
    assert tune.fused_fastest_up_to(cut) == 16 and tune.gemv_fastest_up_to(cut) is None
    assert tune.fused_fastest_up_to([{"dir": "bwd", "M": 1, "nf4_fused": 1.0, "nf4_dequant": 2.0}]) is None
    # files from before the register decode was the default timed it as nf4_fused_prmt: that one counts
    old = [dict(r, nf4_fused=3.0, nf4_fused_prmt=1.0 if r["M"] <= 4 else 2.5) for r in faster_fused]
    assert tune.fused_fastest_up_to(old) == 4
    assert tune.fused_fwd_time({"nf4_fused": 3.0, "nf4_fused_prmt": None}) == 3.0


def test_fused_operand_order_from_both_orders_timed(tmp_path, monkeypatch):
    """nf4.fused_swap: the order with the lower forward time summed over the rows that timed both; the
    fused threshold is then derived with that order's times (the rows' nf4_fused ran the old default),
    and the entry reaches the fused forward's default config (the environment first)."""
    rows = [{"dir": "fwd", "shape": s, "M": m, "nf4_fused": 3.0, "nf4_fused_swap": swap, "nf4_fused_xw": xw,
             "nf4_dequant": 2.0} for s, m, swap, xw in
            (("a", 1, 1.0, 2.5), ("b", 1, 1.5, 2.5), ("a", 16, 1.5, 2.5), ("b", 16, 2.4, 2.5))]
    rows.append({"dir": "fwd", "shape": "a", "M": 64, "nf4_fused": 3.0, "nf4_fused_swap": None,
                 "nf4_fused_xw": 1.0, "nf4_dequant": 2.0})  # one order only: not weighed, keeps nf4_fused
    swap, why = tune.fused_swap_pick(rows)
    assert swap is True and "6.4000 ms against x W^T 10.0000 ms summed over 4 forward rows (M = 1, 16)" in why
    derived = tune.derive({"bench": "nf4-graph", "rows": rows})
    assert derived["nf4.fused_swap"][0] is True
    # with swap's times the fused forward beats dequant (2.0 + 2.0) at M = 1 and 16; nf4_fused (3.0) did not
    assert derived["nf4.fused_max_m"][0] == 16
    assert tune.fused_fastest_up_to(rows) == 0
    slower = [dict(r, nf4_fused_swap=r["nf4_fused_swap"] and r["nf4_fused_swap"] + 2) for r in rows]
    assert tune.derive({"bench": "nf4-graph", "rows": slower})["nf4.fused_swap"][0] is False
    # x W^T picked: its times (1.0) beat dequant where swap's (2.5) would not, so the threshold is x W^T's
    xw_wins = [dict(r, nf4_fused_swap=2.5, nf4_fused_xw=1.0) if r["nf4_fused_swap"] is not None else r for r in rows]
    derived = tune.derive({"bench": "nf4-graph", "rows": xw_wins})
    assert derived["nf4.fused_swap"][0] is False and derived["nf4.fused_max_m"][0] == 16
    assert tune.fused_swap_pick([dict(r, nf4_fused_xw=None) for r in rows]) is None
    assert "nf4.fused_swap" not in tune.derive({"bench": "nf4-graph", "rows": [dict(r, nf4_fused_xw=None)
                                                                              for r in rows]})
    # the entry and the environment reach the default config
    _user_file(tmp_path, monkeypatch, {"nf4.fused_swap": not mm.FUSED_SWAP}, triton=_release())
    assert mm.default_fused_config("forward", 1, 64, 128, 64, CPU, prmt=True).swap is (not mm.FUSED_SWAP)
    monkeypatch.setenv("BEZOAR_NF4_FUSED_SWAP", "1" if mm.FUSED_SWAP else "0")
    assert mm.default_fused_config("forward", 1, 64, 128, 64, CPU, prmt=True).swap is mm.FUSED_SWAP


def test_gemv_dependent_launch_from_both_launches_timed(tmp_path, monkeypatch):
    """nf4.gemv_pdl: on where the rows that timed the gemv both ways take at least 3% less time summed as
    dependent launches; the thresholds stay those of the plain launches; the entry reaches the config."""
    rows = [{"dir": "fwd", "shape": s, "M": 1, "nf4_gemv": g, "nf4_gemv_pdl": p, "nf4_fused": 5.0,
             "nf4_dequant": 3.0} for s, g, p in (("a", 1.0, 0.9), ("b", 2.0, 1.95))]
    on, why = tune.gemv_pdl_pick(rows)
    assert on is True and "2.8500 ms against plain 3.0000 ms summed over 2 forward rows (M = 1" in why
    derived = tune.derive({"bench": "nf4-graph", "rows": rows})
    assert derived["nf4.gemv_pdl"][0] is True and derived["nf4.gemv_max_m"][0] == 1
    close = [dict(r, nf4_gemv_pdl=r["nf4_gemv"] * 0.98) for r in rows]  # 2% less: noise
    assert tune.gemv_pdl_pick(close)[0] is False
    assert tune.gemv_pdl_pick([dict(r, nf4_gemv_pdl=None) for r in rows]) is None
    assert "nf4.gemv_pdl" not in tune.derive({"bench": "nf4-graph", "rows": [dict(r, nf4_gemv_pdl=None)
                                                                            for r in rows]})
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_pdl": True}, triton=_release())
    assert mm._tuned_gemv_config(1, CPU).pdl is True
    monkeypatch.setenv("BEZOAR_NF4_GEMV_PDL", "0")
    assert mm._tuned_gemv_config(1, CPU).pdl is False


def test_a_loss_at_a_smallest_m_above_one_sets_nothing():
    """A run that starts at M = 4 and loses there says nothing about M = 1..3: no threshold, not 0."""
    rows = _nf4_rows({("fwd", "a", 4): (2.0, 3.0, 1.5), ("fwd", "a", 16): (2.0, 3.0, 1.5),
                      ("bwd", "a", 4): (None, 3.0, 1.5)})
    assert tune.gemv_fastest_up_to(rows) is None and tune.fused_fastest_up_to(rows) is None
    assert tune.derive(_result(bench="nf4-graph", rows=rows)) == {}
    # winning at that smallest M still counts
    rows = _nf4_rows({("fwd", "a", 4): (1.0, 3.0, 1.5), ("fwd", "a", 16): (2.0, 3.0, 1.5)})
    assert tune.gemv_fastest_up_to(rows) == 4


def test_gemv_is_weighed_against_what_auto_would_run_instead():
    """Fused beats dequant up to M = 1 (its forward loses at 4), so gemv is weighed against fused at M = 1
    and against dequant above."""
    rows = _nf4_rows({("fwd", "a", 1): (1.0, 0.9, 2.0), ("bwd", "a", 1): (None, 1.0, 2.0),
                      ("fwd", "a", 4): (1.0, 2.5, 2.0), ("bwd", "a", 4): (None, 3.0, 2.0),
                      ("fwd", "a", 16): (3.0, 2.5, 2.0), ("bwd", "a", 16): (None, 3.0, 2.0)})
    assert tune.fused_fastest_up_to(rows) == 1
    # at M = 1 auto would run fused (0.9 < gemv's 1.0): gemv loses there
    assert tune.gemv_fastest_up_to(rows) == 0
    rows[0]["nf4_fused"] = 1.1
    assert tune.gemv_fastest_up_to(rows) == 4  # M = 1 against fused, M = 4 against dequant; 16 loses


def test_gemv_threshold_uses_the_swept_tiles_it_chooses():
    """The rows' gemv times ran the heuristic's tiles; the threshold is derived at the tiles the same file's
    sweep chooses, where the sweep timed them (the H100 run of 2026-11-27: the heuristic's 18 us at
    M = 1 lost to the fused forward's 14.9, the chosen tiles' 10.2 did not)."""
    rows = _nf4_rows({("fwd", "a", 1): (18.0, 14.9, 20.8), ("fwd", "b", 1): (36.5, 23.0, 46.9),
                      ("fwd", "a", 4): (23.0, 15.4, 20.5), ("fwd", "b", 4): (52.0, 23.8, 46.9)})
    assert tune.gemv_fastest_up_to(rows) == 0

    def swept(shape, m, default, times):
        return {"shape": shape, "M": m, "default_ms": default,
                "grid": [{"config": {"block_n": bn, "blocks": b, "num_warps": 4, "table": t}, "ms": ms}
                         for (bn, b, t), ms in times.items()]}

    sweep = [swept("a", 1, 18.0, {(16, 8, "prmt"): 10.2, (4, 64, "prmt"): 10.0, (16, 8, "byte"): 18.0}),
             swept("b", 1, 36.5, {(16, 8, "prmt"): 19.5, (4, 64, "prmt"): 24.0, (16, 8, "byte"): 36.0}),
             swept("a", 4, 23.0, {(16, 4, "prmt"): 15.8}), swept("b", 4, 52.0, {(16, 4, "prmt"): 34.6})]
    tuned = tune.with_tuned_gemv(rows, sweep, {"1": {"block_n": 16, "blocks": 8, "num_warps": 4, "table": "prmt"}})
    assert [r["nf4_gemv"] for r in tuned] == [10.2, 19.5, 23.0, 52.0] and rows[0]["nf4_gemv"] == 18.0
    assert tune.gemv_fastest_up_to(tuned) == 1  # beats fused at 1; at 4 the heuristic's tiles still ran
    # where the sweep kept the heuristic (None), the heuristic's time (default_ms) replaces the rows': the
    # rows ran the tiles on record, which the entry then drops
    kept = tune.with_tuned_gemv(rows, sweep, {"1": None})
    assert [r["nf4_gemv"] for r in kept] == [18.0, 36.5, 23.0, 52.0]
    sweep_slow = [dict(r, default_ms=r["default_ms"] * 2) for r in sweep]
    assert [r["nf4_gemv"] for r in tune.with_tuned_gemv(rows, sweep_slow, {"1": None, "4": None})] == [36.0, 73.0, 46.0, 104.0]
    # a table left out of a config is the byte table
    byte = tune.with_tuned_gemv(rows, sweep, {"1": {"block_n": 16, "blocks": 8, "num_warps": 4}})
    assert [r["nf4_gemv"] for r in byte][:2] == [18.0, 36.0]
    derived = tune.derive(_result(bench="nf4-graph", rows=rows, sweep_gemv=sweep))
    assert derived["nf4.gemv_tiles"][0] == {"1": {"block_n": 16, "blocks": 8, "num_warps": 4, "table": "prmt"},
                                            "4": {"block_n": 16, "blocks": 4, "num_warps": 4, "table": "prmt"}}
    assert derived["nf4.gemv_max_m"][0] == 1 and derived["nf4.fused_max_m"][0] == 4


def test_large_m_path_picks_the_lowest_geometric_mean_on_common_cases():
    rows = [{"nf4_only": 1.0, "lora_dequant": 2.0, "lora_cublas": 1.3, "lora_concat": 1.2},
            {"nf4_only": 2.0, "lora_dequant": 3.0, "lora_cublas": 2.4, "lora_concat": 2.6},
            {"nf4_only": 1.0, "lora_dequant": 1.5, "lora_cublas": 1.2, "lora_concat": None}]
    # the two cases concat was timed on: cublas sqrt(1.3 * 1.2) = 1.249x, concat sqrt(1.2 * 1.1) = 1.149x
    rows[1]["lora_concat"] = 2.2
    path, why = tune.large_m_path(rows)
    assert path == "concat" and "on 2 cases" in why and "concat 1.149x" in why
    # concat timed nowhere: cublas against dequant on all three
    for r in rows:
        r["lora_concat"] = None
    assert tune.large_m_path(rows)[0] == "cublas" and "on 3 cases" in tune.large_m_path(rows)[1]
    assert tune.large_m_path([{"nf4_only": 1.0, "lora_cublas": 1.1}]) is None  # one candidate: nothing to pick


def _result(bench="lora", date="2026-11-26", device="NVIDIA H100 80GB HBM3", triton="3.6.0", **extra):
    return {"bench": bench, "date": date, "device": device, "triton": triton, "commit": "abc", **extra}


def test_dequant_cache_setting_from_a_whole_cache_run(tmp_path):
    rows = [{"shape": "3200x3200", "M": 4096, "cublas_ms": 2.0, "dequant_ms": 2.2, "cache_ms": 2.05},
            {"shape": "8640x3200", "M": 4096, "cublas_ms": 5.0, "dequant_ms": 5.4, "cache_ms": 5.35}]
    on, why = tune.derive(_result(bench="nf4-cache", rows=rows, complete=True))["nf4.dequant_cache"]
    assert on is True and "cache 7.400 ms, cache off 7.600 ms" in why  # summed over the cases
    rows[1]["cache_ms"] = 5.6
    assert tune.derive(_result(bench="nf4-cache", rows=rows, complete=True))["nf4.dequant_cache"][0] is False
    rows[1]["cache_ms"] = 5.5 - 0.01  # 7.54 against 7.60: under the 1% a second buffer has to earn
    assert tune.derive(_result(bench="nf4-cache", rows=rows, complete=True))["nf4.dequant_cache"][0] is False
    rows[1]["cache_ms"] = 5.4
    rows[1]["cache_high_priority_error"] = "ArithmeticError: results differ from the cache-off sequence"
    assert tune.derive(_result(bench="nf4-cache", rows=rows, complete=True)) == {}  # any variant wrong: nothing
    del rows[1]["cache_high_priority_error"]
    assert tune.derive(_result(bench="nf4-cache", rows=rows, complete=False)) == {}  # a run cut short
    del rows[0]["cache_ms"]  # a case in error
    assert tune.derive(_result(bench="nf4-cache", rows=rows, complete=True)) == {}
    # into a tuning file that tuning.py accepts
    rows[0]["cache_ms"] = 2.05
    rows[1]["cache_ms"] = 5.0
    path = tmp_path / "nf4-cache-x.json"
    path.write_text(json.dumps(_result(bench="nf4-cache", rows=rows, complete=True)))
    table = {"format": 1, "devices": {}}
    tune.apply([path], table)
    assert table["devices"]["NVIDIA H100 80GB HBM3"]["settings"] == {"nf4.dequant_cache": True}
    tuning.validate(table, "t.json")


def _align_rows(*times, case="single"):
    """--sweep-concat-align rows: times[i] is {align: ms} of case i."""
    return [{"shape": "3200x3200", "M": 16384, "r": 16, "case": case, "ms": {str(a): t for a, t in ms.items()}}
            for ms in times]


def test_concat_align_from_the_summed_times_of_a_sweep(tmp_path):
    """bench/tune.py takes the align whose time summed over the rows is lowest where it is at least 1% under
    align 16's, else 16; a file with an error in any row, or an incomplete sweep, gives nothing; rows
    missing an align do not count."""
    rows = _align_rows({16: 1.00, 64: 0.97, 128: 0.99}, {16: 2.00, 64: 1.99, 128: 1.95})  # 64: 2.96, 128: 2.94
    align, why = tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"]
    assert align == 128, why  # 2.94 against 3.00: 2% under
    assert why == ("concat forward + backward summed over 2 cases: align 16 3.000 ms, align 64 2.960 ms, "
                   "align 128 2.940 ms")
    rows = _align_rows({16: 1.00, 64: 0.95, 128: 1.02}, {16: 2.00, 64: 1.99, 128: 2.01})  # 64 3% under in sum
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"][0] == 64
    # under 1%: 16 (a value, so that a later run undoes an earlier pick)
    rows = _align_rows({16: 1.00, 64: 0.995, 128: 1.02}, {16: 2.00, 64: 1.99, 128: 2.01})  # 2.985 against 3.0
    align, why = tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"]
    assert align == 16 and "align 64 2.985 ms" in why and "none 1% under align 16" in why
    # 16 itself fastest
    rows = _align_rows({16: 1.00, 64: 1.10}, {16: 2.00, 64: 2.10})
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"][0] == 16
    # a row missing an align (cut short, or never timed) is left out of every sum
    rows = _align_rows({16: 1.00, 64: 0.95, 128: 1.02}, {16: 2.00, 64: 1.99, 128: 2.01}, {16: 5.0, 128: 4.0})
    align, why = tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"]
    assert align == 64 and "over 2 cases" in why and "align 128 3.030 ms" in why
    rows[2]["ms"]["64"] = None  # a null time is a missing one
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows))["lora.concat_align"][0] == 64
    # a sweep its budget or a SIGINT cut short (cases come rank by rank): nothing from the file
    rows = _align_rows({16: 1.00, 64: 0.95}, {16: 2.00, 64: 1.90})
    assert tune.derive(_result(bench="lora-concat-align", complete=False, rows=rows)) == {}
    assert tune.derive(_result(bench="lora-concat-align", rows=rows)) == {}
    # any error in any row: nothing from the file
    rows[1]["errors"] = {"128": "ArithmeticError: output 0 differs from align 16's by 0.3 of its largest |value|"}
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=rows)) == {}
    # no row with every align, or no align 16 to weigh against: nothing
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=_align_rows({16: 1.0}, {64: 0.9}))) == {}
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=_align_rows({32: 1.0, 64: 0.9}))) == {}
    assert tune.derive(_result(bench="lora-concat-align", complete=True, rows=[])) == {}
    # through apply into a file tuning.py accepts, then a later run at under 1% turns it back to 16
    first = tmp_path / "lora-concat-align-x-2026-11-27.json"
    first.write_text(json.dumps(_result(bench="lora-concat-align", complete=True, date="2026-11-27", rows=_align_rows(
        {16: 1.0, 64: 0.9, 128: 0.95}))))
    later = tmp_path / "lora-concat-align-x-2026-11-28.json"
    later.write_text(json.dumps(_result(bench="lora-concat-align", complete=True, date="2026-11-28", rows=_align_rows(
        {16: 1.0, 64: 0.999, 128: 1.0}))))
    table = {"format": 1, "devices": {}}
    tune.apply([first], table)
    entry = table["devices"]["NVIDIA H100 80GB HBM3"]
    assert entry["settings"] == {"lora.concat_align": 64} and "triton" not in entry
    assert "lora-concat-align-x-2026-11-27.json" in entry["sources"]["lora.concat_align"]
    tuning.validate(table, "t.json")
    changes = tune.apply([later], table)
    assert entry["settings"] == {"lora.concat_align": 16}
    assert [(c["setting"], c["old"], c["new"]) for c in changes] == [("lora.concat_align", 64, 16)]
    tuning.validate(table, "t.json")


def test_tune_cli_reads_concat_align_files_by_default(tmp_path, monkeypatch):
    """With no files named, tune.py reads bench/results' nf4* and lora* files: lora-concat-align-* among
    them; --keys lora.concat_align is a known setting."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "lora-concat-align-NVIDIA_X-2026-11-27.json").write_text(json.dumps(_result(
        bench="lora-concat-align", device="NVIDIA X", complete=True, rows=_align_rows({16: 1.0, 64: 0.9}))))
    (results / "gemm-widths-NVIDIA_X-2026-11-27.json").write_text("not read")
    monkeypatch.setattr(tune, "RESULTS", results)
    out = tmp_path / "t.json"
    assert tune.main(["--keys", "lora.concat_align", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["devices"]["NVIDIA X"]["settings"] == {"lora.concat_align": 64}


def test_lora_prefers_graph_rows_and_ignores_runs_without_dropout():
    eager = [{"nf4_only": 1.0, "lora_cublas": 1.1, "lora_concat": 1.3}]
    graph = [{"nf4_only": 1.0, "lora_cublas": 1.3, "lora_concat": 1.1}]
    assert tune.derive(_result(dropout=0.05, rows=eager, graph_rows=graph))["lora.large_m_path"][0] == "concat"
    assert tune.derive(_result(dropout=0.05, rows=eager, graph_rows=[]))["lora.large_m_path"][0] == "cublas"
    assert tune.derive(_result(bench="lora-no-dropout", dropout=0.0, rows=eager)) == {}
    assert tune.derive(_result(dropout=0.0, rows=eager)) == {}


def test_norm_grid_from_the_two_grids_timed_side_by_side():
    def row(group, persistent, per_block, **extra):
        return {"group": group, f"{group}_lora_fused_persistent": persistent,
                f"{group}_lora_fused_per_block": per_block, **extra}

    rows = [row("norm_qkv", 2.0, 1.8), row("norm_gateup", 3.0, 3.1), row("norm_qkv", None, None, M=4096)]
    grid, why = tune.norm_grid(rows)
    assert grid == "per_block" and "norm_qkv 2.000 / 1.800 ms" in why  # 4.9 against 5.0 summed
    assert tune.norm_grid([row("norm_qkv", 2.0, 2.0)])[0] == "persistent"  # a tie keeps the default
    assert tune.norm_grid([row("norm_qkv", 2.0, None)]) is None
    # from a lora file: graph rows first, eager where the graph rows lack the pair
    result = _result(dropout=0.05, rows=[row("norm_qkv", 1.0, 2.0)], graph_rows=[row("norm_qkv", 2.0, 1.0)])
    assert tune.derive(result)["norm_lora.grid"][0] == "per_block"
    result["graph_rows"] = [row("norm_qkv", None, None)]
    value, why = tune.derive(result)["norm_lora.grid"]
    assert value == "persistent" and why.startswith("eager:")
    table = {"format": 1, "devices": {"x": {"settings": {"norm_lora.grid": value}}}}
    tuning.validate(table, "derived")


def test_what_auto_runs_under_the_derived_thresholds():
    """The tuned columns of nf4.py and lora.py: gemv forward where it runs (then the backward is dequant,
    gemv has none), fused up to its threshold, dequant above; LoRA's large-M path only above both."""
    rows = _nf4_rows({("fwd", "a", 1): (1.0, 2.0, 3.0), ("bwd", "a", 1): (None, 2.5, 3.5),
                      ("fwd", "a", 4): (None, 2.0, 3.0), ("bwd", "a", 4): (None, 2.5, 3.5),  # gemv took no M = 4
                      ("fwd", "a", 16): (1.0, 2.0, 3.0), ("bwd", "a", 16): (None, 2.5, 3.5)})
    at = tune.gemv_runs_at(rows, 4)
    assert at == {("a", 1)}
    picked = {(r["dir"], r["M"]): tune.nf4_auto_time(r, (r["shape"], r["M"]) in at, 4, 8) for r in rows}
    # the backward of a fused forward is dequant as well
    assert picked == {("fwd", 1): 1.0, ("bwd", 1): 3.5, ("fwd", 4): 2.0, ("bwd", 4): 3.5,
                      ("fwd", 16): 3.0, ("bwd", 16): 3.5}
    row = {"M": 4096, "lora_cublas": 1.2, "lora_concat": 1.1}
    assert tune.lora_auto_time(row, "concat", 16) == 1.1 and tune.lora_auto_time(row, "concat", 4096) is None
    assert tune.lora_auto_time(row, "dequant", 16) is None


def test_tma_threshold_from_the_rows_and_into_auto(tmp_path, monkeypatch):
    """nf4.tma_min_m: the smallest M from which the tma kernels win every shape and direction up to the
    largest M; 0 when they lose at the largest; not set without tma times. A tuning entry moves auto."""
    def rows(times):
        return [{"dir": d, "shape": s, "M": m, "nf4_tma": t, "nf4_dequant": q} for (d, s, m), (t, q) in times.items()]

    won = rows({("fwd", "a", 1024): (1.1, 1.0), ("bwd", "a", 1024): (0.9, 1.0),  # the backward wins, not the fwd
                ("fwd", "a", 4096): (0.9, 1.0), ("bwd", "a", 4096): (0.9, 1.0),
                ("fwd", "b", 4096): (0.95, 1.0), ("fwd", "a", 16384): (0.9, 1.0), ("bwd", "b", 16384): (0.8, 1.0)})
    assert tune.tma_fastest_from(won) == 4096
    assert tune.derive(_result(bench="nf4-graph", rows=won))["nf4.tma_min_m"][0] == 4096
    lost = won + rows({("bwd", "a", 16384): (1.2, 1.0)})
    assert tune.tma_fastest_from(lost) == 0
    assert tune.tma_fastest_from(rows({("fwd", "a", 4096): (None, 1.0)})) is None
    # what auto runs for a row under the threshold: tma from it, where the row timed tma
    row = {"dir": "fwd", "shape": "a", "M": 4096, "nf4_fused": 9.0, "nf4_dequant": 1.0, "nf4_tma": 0.9}
    assert tune.nf4_auto_time(row, False, 1, 0, 4096) == 0.9
    assert tune.nf4_auto_time(row, False, 1, 0, 8192) == 1.0 and tune.nf4_auto_time(row, False, 1, 0) == 1.0
    assert tune.nf4_auto_time(dict(row, nf4_tma=None), False, 1, 0, 1024) == 1.0
    # an entry moves auto; the environment wins over it
    weight = nf4.quantize_nf4_reference(torch.randn(32, 128), 64)
    _user_file(tmp_path, monkeypatch, {"nf4.tma_min_m": 1024})
    assert mm.tma_min_m(CPU) == 1024
    assert mm.resolve_path(None, 1024, weight) == "tma" and mm.resolve_path(None, 1023, weight) == "dequant"
    monkeypatch.setenv("BEZOAR_NF4_TMA_MIN_M", "0")
    assert mm.resolve_path(None, 1 << 20, weight) == "dequant"
    with pytest.raises(ValueError, match="nf4.tma_min_m: expected a whole number of rows"):
        tuning.validate({"format": 1, "devices": {"x": {"settings": {"nf4.tma_min_m": "4096"}}}}, "t.json")


def test_swept_tiles_need_a_real_gain():
    def sweep(m, times, default):
        return [{"shape": s, "M": m, "default_ms": default,
                 "grid": [{"config": {"block_n": bn, "blocks": 4, "num_warps": 4}, "ms": t} for bn, t in times[s].items()]}
                for s in times]

    # 32 rows is best summed over both shapes (2.0 + 2.0 against 1.5 + 3.0 for 16), and 20% under the default
    rows = sweep(1, {"a": {16: 1.5, 32: 2.0}, "b": {16: 3.0, 32: 2.0}}, 2.5)
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=rows))
    assert out["nf4.gemv_tiles"][0] == {"1": {"block_n": 32, "blocks": 4, "num_warps": 4}}
    # 1% better than the default: the heuristic stays (None: any tiles for M = 1 on record go)
    rows = sweep(1, {"a": {16: 1.98}, "b": {16: 1.98}}, 2.0)
    value, why = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=rows))["nf4.gemv_tiles"]
    assert value == {"1": None} and "the heuristic stays" in why
    assert "nf4.gemv_tiles" not in tune.derive(_result(bench="nf4", rows=[], sweep_gemv=[]))
    # a config some shape could not run is not a candidate
    rows = sweep(4, {"a": {16: 0.5, 32: 1.0}, "b": {32: 1.0}}, 3.0)
    assert tune.derive(_result(bench="nf4", rows=[], sweep_gemv=rows))["nf4.gemv_tiles"][0]["4"]["block_n"] == 32


def test_a_cut_sweep_gives_no_tiles_for_its_m_and_cut_tables_give_nothing(tmp_path):
    """A gemv sweep stopped by its time limit: the M it did on every shape gives tiles; the M it left a shape
    out of, or cut a row of (complete false), gives none, and the tiles on record for that M stay. A
    dequantize sweep marked incomplete gives no launch; a file whose tables were cut gives nothing."""
    def row(shape, m, best, default=2.0, **extra):
        return {"shape": shape, "M": m, "default_ms": default, **extra,
                "grid": [{"config": {"block_n": 16, "blocks": 4, "num_warps": 4}, "ms": 1.0},
                         {"config": {"block_n": 32, "blocks": 4, "num_warps": 4}, "ms": best}]}

    rows = _nf4_rows({("fwd", s, m): (1.0, 3.0, 2.0) for s in ("a", "b", "c") for m in (1, 4)})
    sweep = [row(s, 1, 0.5) for s in ("a", "b", "c")] + [row("a", 4, 0.5), row("b", 4, 0.5)]  # cut: no c at 4
    result = _result(bench="nf4-graph", rows=rows, sweep_gemv=sweep, sweep_gemv_complete=False)
    assert tune.derive(result)["nf4.gemv_tiles"][0] == {"1": {"block_n": 32, "blocks": 4, "num_warps": 4}}
    assert tune.gemv_sweep_whole_ms(result) == [1]
    # every shape there, but the last row cut short
    cut = sweep + [row("c", 4, 0.5, complete=False)]
    assert tune.gemv_sweep_whole_ms(_result(bench="nf4", rows=rows, sweep_gemv=cut)) == [1]
    assert tune.gemv_sweep_whole_ms(_result(bench="nf4", rows=rows, sweep_gemv=cut[:-1] + [row("c", 4, 0.5)])) == [1, 4]
    # a shape the tables measured and the sweep never reached at any M: no tiles at all
    assert tune.gemv_sweep_whole_ms(_result(bench="nf4", rows=rows, sweep_gemv=sweep[:2])) == []
    # applied over tiles on record for M = 4: they stay, M = 1's are replaced
    table = {"format": 1, "devices": {"NVIDIA H100 80GB HBM3": {"settings": {"nf4.gemv_tiles": {
        "1": {"block_n": 64, "blocks": 2, "num_warps": 8}, "4": {"block_n": 64, "blocks": 2, "num_warps": 4}}},
        "sources": {}, "triton": "3.6"}}}
    path = tmp_path / "nf4-graph-cut.json"
    path.write_text(json.dumps(result))
    tune.apply([path], table, keys={"nf4.gemv_tiles"})
    assert table["devices"]["NVIDIA H100 80GB HBM3"]["settings"]["nf4.gemv_tiles"] == {
        "1": {"block_n": 32, "blocks": 4, "num_warps": 4}, "4": {"block_n": 64, "blocks": 2, "num_warps": 4}}
    # a dequantize sweep cut short gives no launch (one whole gives it)
    dq = [{"shape": "a", "default_ms": 2.0, "grid": [{"config": {"values_per_prog": 512, "num_warps": 4}, "ms": 1.0}]}]
    assert "nf4.dequant_launch" in tune.derive(_result(bench="nf4", rows=[], sweep_dequant=dq))
    assert "nf4.dequant_launch" not in tune.derive(_result(bench="nf4", rows=[], sweep_dequant=dq,
                                                           sweep_dequant_complete=False))
    assert "nf4.dequant_launch" not in tune.derive(_result(bench="nf4", rows=[], sweep_dequant=[
        dq[0], {"shape": "b", "complete": False}]))
    # tables cut short (or a run still writing them): nothing at all, the thresholds included
    assert tune.derive(dict(result, cases_complete=True))["nf4.gemv_max_m"][0] == 4
    assert tune.derive(dict(result, cases_complete=False)) == {}


def test_swept_code_table_reaches_the_entry_and_the_launch(tmp_path, monkeypatch):
    """A gemv sweep times both code tables: a "nibble" winner is written with its table, a "byte" winner
    without (the default), and sweeps recorded before the table existed still derive (they ran "byte")."""
    def row(shape, times):
        return {"shape": shape, "M": 1, "default_ms": 2.0,
                "grid": [{"config": dict({"block_n": 16, "blocks": 4, "num_warps": 4}, **extra), "ms": t}
                         for extra, t in times]}

    nibble, byte = {"table": "nibble"}, {"table": "byte"}
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=[row("a", [(byte, 1.9), (nibble, 1.0)]),
                                                                 row("b", [(byte, 1.9), (nibble, 1.2)])]))
    assert out["nf4.gemv_tiles"][0] == {"1": {"block_n": 16, "blocks": 4, "num_warps": 4, "table": "nibble"}}
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=[row("a", [(byte, 1.0), (nibble, 1.5)])]))
    assert out["nf4.gemv_tiles"][0] == {"1": {"block_n": 16, "blocks": 4, "num_warps": 4}}
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=[row("a", [({}, 1.0)])]))  # an older sweep
    assert out["nf4.gemv_tiles"][0] == {"1": {"block_n": 16, "blocks": 4, "num_warps": 4}}
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 2, "num_warps": 4,
                                                                "table": "nibble"}}}, triton=_release())
    assert mm._tuned_gemv_config(1, CPU) == mm.GemvConfig(block_n=16, blocks=2, table="nibble")
    gemv = _LaunchSpy()
    monkeypatch.setattr(mm, "_nf4_gemv_kernel", gemv)
    weight = nf4.quantize_nf4_reference(torch.randn(32, 512), 64)
    mm.nf4_gemv_forward(torch.randn(1, 512), weight)
    mm.nf4_gemv_forward(torch.randn(1, 512), weight, mm.GemvConfig())
    assert [launch["TABLE"] for launch in gemv.launches] == ["nibble", "byte"]


def test_swept_steps_reach_the_entry_and_the_launch(tmp_path, monkeypatch):
    """A stepped gemv config that wins is written with its steps (one range, the default, is left out),
    ``with_tuned_gemv`` finds its time, an entry's steps reach the launch, and a steps value the sweep
    never tries (or true for 1) is refused by name."""
    def row(shape, times):
        return {"shape": shape, "M": 1, "default_ms": 2.0,
                "grid": [{"config": dict({"block_n": 16, "blocks": 8, "num_warps": 4, "table": "prmt"}, **extra),
                          "ms": t} for extra, t in times]}

    sweep = [row("a", [({"steps": 1}, 1.0), ({"steps": 4}, 0.6)]), row("b", [({"steps": 1}, 1.9), ({"steps": 4}, 1.1)])]
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=sweep))
    won = {"block_n": 16, "blocks": 8, "num_warps": 4, "table": "prmt", "steps": 4}
    assert out["nf4.gemv_tiles"][0] == {"1": won}
    rows = [{"dir": "fwd", "shape": "a", "M": 1, "nf4_gemv": 1.0}, {"dir": "fwd", "shape": "b", "M": 1, "nf4_gemv": 1.9}]
    assert [r["nf4_gemv"] for r in tune.with_tuned_gemv(rows, sweep, {"1": won})] == [0.6, 1.1]
    one = {k: v for k, v in won.items() if k != "steps"}
    assert [r["nf4_gemv"] for r in tune.with_tuned_gemv(rows, sweep, {"1": one})] == [1.0, 1.9]
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=[row("a", [({"steps": 4}, 1.5), ({}, 1.0)])]))
    assert out["nf4.gemv_tiles"][0] == {"1": one}
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_tiles": {"1": dict(won, steps=8)}}, triton=_release())
    assert mm._tuned_gemv_config(1, CPU, torch.bfloat16) == mm.GemvConfig(16, 8, table="prmt", steps=8)
    gemv = _LaunchSpy()
    monkeypatch.setattr(mm, "_nf4_gemv_kernel", gemv)
    weight = nf4.quantize_nf4_reference(torch.randn(32, 3200), 64)  # 50 blocks a row: 7 ranges of 8
    mm.nf4_gemv_forward(torch.randn(1, 3200).to(torch.bfloat16), weight)
    assert [(launch["STEPS"], launch["grid"]) for launch in gemv.launches] == [(7, (2, 1))]
    for bad in (3, 0, True, "4", 4.0):
        with pytest.raises(ValueError, match=r"gemv_tiles\.1\.steps: expected one of 1, 2, 4, 8, 16, 64"):
            tuning.validate({"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_tiles": {"1": dict(won, steps=bad)}},
                                                              "triton": "3.6"}}}, "t.json")


def test_tuned_register_decode_is_for_16_bit_x_only(tmp_path, monkeypatch):
    """The sweeps time bf16 x: a tuned "prmt" lookup (codes rounded to bf16) serves 16-bit x, and an fp32
    caller gets the same tiles on the heuristic's fp32 codes ("gather"); asked for explicitly, it gets "prmt"."""
    tiles = {"block_n": 16, "blocks": 2, "num_warps": 4, "table": "prmt"}
    _user_file(tmp_path, monkeypatch, {"nf4.gemv_tiles": {"1": tiles}}, triton=_release())
    assert mm._tuned_gemv_config(1, CPU, torch.bfloat16) == mm.GemvConfig(16, 2, table="prmt")
    assert mm._tuned_gemv_config(1, CPU, torch.float16).table == "prmt"
    assert mm._tuned_gemv_config(1, CPU, torch.float32) == mm.GemvConfig(16, 2, table="gather")
    gemv = _LaunchSpy()
    monkeypatch.setattr(mm, "_nf4_gemv_kernel", gemv)
    weight = nf4.quantize_nf4_reference(torch.randn(32, 512), 64)
    mm.nf4_gemv_forward(torch.randn(1, 512), weight)
    mm.nf4_gemv_forward(torch.randn(1, 512).half(), weight)
    mm.nf4_gemv_forward(torch.randn(1, 512), weight, mm.GemvConfig(table="prmt"))
    assert [launch["TABLE"] for launch in gemv.launches] == ["gather", "prmt", "prmt"]
    assert [launch["ASM"] for launch in gemv.launches] == [False, False, False]  # the interpreter's model
    mm.nf4_gemv_forward(torch.randn(3, 512).half(), weight, mm.GemvConfig(table="prmt"))
    # one scale per block with "prmt" at any rows of x (gemv_block_scale)
    assert [launch["BLOCK_SCALE"] for launch in gemv.launches] == [True, True, True, True]


def test_register_decode_needs_an_nvidia_gpu_or_the_interpreter(monkeypatch):
    """Outside the interpreter the PTX permutes are for CUDA devices on NVIDIA builds only: anything else
    asking for them gets one error that says so, not a compile failure."""
    monkeypatch.setattr(nf4.dispatch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs or under the Triton interpreter only"):
        nf4.register_decode_asm(torch.device("cpu"))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    with pytest.raises(ValueError, match="NVIDIA GPUs"):
        nf4.register_decode_asm(torch.device("cuda"))
    monkeypatch.setattr(torch.version, "hip", None)
    assert nf4.register_decode_asm(torch.device("cuda")) is True
    monkeypatch.setattr(nf4.dispatch, "interpreting", lambda: True)
    assert nf4.register_decode_asm(torch.device("cpu")) is False

def test_the_sweeps_write_what_tune_reads():
    """bench/nf4.py's gemv and dequantize sweeps (timed by a stand-in, no kernel runs) produce rows from
    which tune derives settings that the tuning file accepts."""
    bench_nf4 = _load_bench("nf4")
    weight = nf4.quantize_nf4_reference(torch.randn(16, 128), 64)
    weight_b = nf4.quantize_nf4_reference(torch.randn(32, 64), 64)
    counter = iter(range(1000))  # every timing 20% faster than the one before: the last config wins

    def fake_bench(fn, m=None, quick=False):
        return 0.8 ** next(counter)

    class Args:
        smoke = False

    seen = []  # the rows a run stopped after each (M, shape) would have written: M = 1 on every shape first
    gemv = bench_nf4.sweep_gemv(Args, [(16, 128), (32, 64)],
                                {(16, 128): lambda: weight, (32, 64): lambda: weight_b},
                                lambda *shape: torch.zeros(shape), fake_bench, mm,
                                lambda rows: seen.append([(r["M"], r["shape"]) for r in rows]))
    assert seen[1] == [(1, "16x128"), (1, "32x64")] and len(seen) == 6 and seen[-1] == [
        (m, shape) for m in (1, 4, 8) for shape in ("16x128", "32x64")]
    assert {c["config"]["table"] for c in gemv[0]["grid"]} == set(mm.GEMV_TABLES)
    assert {c["config"]["num_warps"] for c in gemv[2]["grid"]} == {4}  # 8 warps only at M = 1
    # at M = 1: ten chosen tiles with the register decode, the first four also with the other three
    # lookups, and eleven stepped configs (eight with the register decode walking K, three with gather)
    assert len(gemv[0]["grid"]) == 10 + 4 * 3 + 11
    assert sorted({c["config"]["steps"] for c in gemv[0]["grid"]}) == [1, 2, 4, 8, 16, 64]
    assert {c["config"]["table"] for c in gemv[0]["grid"] if c["config"]["steps"] > 1} == {"prmt", "gather"}
    gemv = [r for r in gemv if r["shape"] == "16x128"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nf4, "dequantize_nf4_triton", lambda *a, **k: None)
        dq = bench_nf4.sweep_dequant(Args, [(16, 128)], {(16, 128): lambda: weight}, fake_bench, nf4, torch.float32)
    assert [r["M"] for r in gemv] == [1, 4, 8] and all(r["grid"] for r in gemv)
    out = tune.derive(_result(bench="nf4", rows=[], sweep_gemv=gemv, sweep_dequant=dq))
    assert set(out["nf4.gemv_tiles"][0]) == {"1", "4", "8"}
    last = gemv[0]["grid"][-1]["config"]
    assert out["nf4.gemv_tiles"][0]["1"] == last
    assert out["nf4.dequant_launch"][0] == {"values_per_prog": 256 * 64, "num_warps": 8}
    table = {"format": 1, "devices": {"NVIDIA X": {"settings": {k: v for k, (v, _) in out.items()}, "triton": "3.6"}}}
    tuning.validate(table, "derived")


def test_runs_of_one_day_are_applied_in_the_order_they_were_written(tmp_path):
    """Two runs of a day disagree: the one written later wins, whatever the names' order (the H100's two
    nf4-graph files of 2026-11-27 sort '-tuned' before the first run by name)."""
    def write(name, time, fused_wins):
        rows = _nf4_rows({("fwd", "a", 1): (None, 1.0 if fused_wins else 3.0, 2.0)})
        path = tmp_path / name
        path.write_text(json.dumps(_result(bench="nf4-graph", date="2026-11-27", time=time, rows=rows)))
        return path

    first = write("nf4-graph-x-2026-11-27.json", "02:23:36", False)
    later = write("nf4-graph-x-2026-11-27-tuned.json", "02:34:19", True)
    table = {"format": 1, "devices": {}}
    tune.apply([first, later], table)
    entry = table["devices"]["NVIDIA H100 80GB HBM3"]
    assert entry["settings"]["nf4.fused_max_m"] == 1 and "-tuned.json" in entry["sources"]["nf4.fused_max_m"]
    # swapped times: the first file by name is now the later run
    first = write("nf4-graph-x-2026-11-27.json", "03:00:00", False)
    table = {"format": 1, "devices": {}}
    tune.apply([first, later], table)
    assert table["devices"]["NVIDIA H100 80GB HBM3"]["settings"]["nf4.fused_max_m"] == 0


def test_apply_orders_files_and_keeps_tiles_to_their_triton_release(tmp_path):
    def write(name, result):
        path = tmp_path / name
        path.write_text(json.dumps(result))
        return path

    nf4_rows = _nf4_rows({("fwd", "a", 1): (1.0, 3.0, 2.0), ("fwd", "a", 4): (1.0, 3.0, 2.0)})
    older = write("nf4-old.json", _result(bench="nf4", date="2026-11-20", rows=nf4_rows))
    tiles = [{"shape": "a", "M": 1, "default_ms": 2.0, "grid": [{"config": {"block_n": 32, "blocks": 4, "num_warps": 4},
                                                                   "ms": 1.0}]}]
    newer = write("nf4-graph-new.json", _result(bench="nf4-graph", date="2026-11-26", timing="graph",
                                                rows=_nf4_rows({("fwd", "a", 1): (1.0, 3.0, 2.0),
                                                                ("fwd", "a", 4): (3.0, 3.0, 2.0)}),
                                                sweep_gemv=tiles))
    table = {"format": 1, "devices": {}}
    tune.apply([newer, older], table)  # given in any order: the older file is applied first
    entry = table["devices"]["NVIDIA H100 80GB HBM3"]
    assert entry["settings"]["nf4.gemv_max_m"] == 1 and entry["triton"] == "3.6"
    assert "nf4-graph-new.json" in entry["sources"]["nf4.gemv_max_m"]
    assert entry["settings"]["nf4.gemv_tiles"]["1"]["block_n"] == 32
    # a later run on another triton release without tiles keeps the thresholds moving and the tiles;
    # one with tiles replaces them and the release
    # the same release sweeping M = 4 only: M = 1's tiles stay beside the new ones
    more = write("nf4-more.json", _result(bench="nf4", date="2026-11-26", rows=[], sweep_gemv=[dict(tiles[0], M=4)]))
    tune.apply([more], table)
    assert set(entry["settings"]["nf4.gemv_tiles"]) == {"1", "4"}
    # a re-measured M whose sweep found nothing better drops its tiles (the heuristic runs again)
    flat = [dict(tiles[0], default_ms=1.0)]
    changes = tune.apply([write("nf4-flat.json", _result(bench="nf4", date="2026-11-26", rows=[], sweep_gemv=flat))],
                         table)
    assert set(entry["settings"]["nf4.gemv_tiles"]) == {"4"}
    assert changes[0]["new"] == {"4": {"block_n": 32, "blocks": 4, "num_warps": 4}}
    # a later run on another triton release replaces every tile and the release, and says so
    later = write("nf4-later.json", _result(bench="nf4", date="2026-11-27", triton="3.9.1", rows=nf4_rows,
                                            sweep_gemv=[dict(tiles[0], M=8)]))
    changes = tune.apply([later], table)
    assert entry["triton"] == "3.9" and set(entry["settings"]["nf4.gemv_tiles"]) == {"8"}
    assert any(c["new"] is None and "timed with triton 3.6" in c["why"] for c in changes)
    assert entry["settings"]["nf4.gemv_max_m"] == 4
    tuning.validate(table, "applied")
    # the only tiles gone: no release is kept either
    gone = [dict(tiles[0], M=8, default_ms=1.0)]
    tune.apply([write("nf4-gone.json", _result(bench="nf4", date="2026-11-28", triton="3.9.1", rows=[],
                                               sweep_gemv=gone))], table)
    assert "nf4.gemv_tiles" not in entry["settings"] and "triton" not in entry
    # tiles from a file without a triton version cannot be placed
    blind = write("nf4-blind.json", dict(_result(bench="nf4", rows=[], sweep_gemv=tiles), triton=None))
    with pytest.raises(SystemExit, match="nf4-blind.json: has tile sweeps but no"):
        tune.apply([blind], table)


def test_tune_cli_refuses_cpu_results_and_bad_files(tmp_path):
    cpu = tmp_path / "nf4-cpu.json"
    cpu.write_text(json.dumps(_result(bench="nf4", device="cpu", rows=_nf4_rows({("fwd", "a", 1): (1.0, 2.0, 3.0)}))))
    with pytest.raises(SystemExit, match="not a GPU"):
        tune.main([str(cpu), "--out", str(tmp_path / "t.json")])
    junk = tmp_path / "junk.json"
    junk.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a bench/ results file"):
        tune.main([str(junk), "--out", str(tmp_path / "t.json")])
    bad_out = tmp_path / "bad.json"
    bad_out.write_text('{"format": 1, "devices": {"x": {"settings": {"nope": 1}}}}')
    with pytest.raises(SystemExit, match=r"devices\.x\.settings\.nope: unknown setting"):
        tune.main(["--out", str(bad_out)])


def test_tune_cli_writes_a_file_the_kernels_read(tmp_path, monkeypatch):
    out = tmp_path / "mine.json"
    result = tmp_path / "nf4-graph-x.json"
    result.write_text(json.dumps(_result(bench="nf4-graph", device="cpu-as-gpu", timing="graph",
                                         rows=_nf4_rows({("fwd", "a", 1): (1.0, 3.0, 2.0),
                                                         ("fwd", "a", 4): (1.0, 3.0, 2.0),
                                                         ("fwd", "a", 16): (9.0, 3.0, 2.0)}))))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), str(result), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "cpu-as-gpu: nf4.gemv_max_m None -> 4" in proc.stdout
    monkeypatch.setenv("BEZOAR_TUNING", str(out))
    monkeypatch.setattr(tuning, "device_name", lambda device: "cpu-as-gpu")
    tuning.reload()
    assert mm.gemv_max_m(CPU) == 4
    dry = subprocess.run([sys.executable, str(ROOT / "bench" / "tune.py"), str(result), "--out", str(out), "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert dry.returncode == 0 and "nf4.gemv_max_m unchanged" in dry.stdout and "wrote" not in dry.stdout


def test_tune_cli_keys_limits_what_is_derived(tmp_path):
    """--keys derives only the named settings (a device call can take the gemv tiles from its own sweep and
    keeps the committed thresholds); an unknown name is refused with the known ones listed."""
    result = tmp_path / "nf4-graph-x.json"
    sweep = [{"shape": "a", "M": 1, "default_ms": 2.0,
              "grid": [{"config": {"block_n": 16, "blocks": 4, "num_warps": 4, "table": "prmt"}, "ms": 1.0}]}]
    result.write_text(json.dumps(_result(bench="nf4-graph", device="cpu-as-gpu", timing="graph", sweep_gemv=sweep,
                                         rows=_nf4_rows({("fwd", "a", 1): (1.0, 3.0, 2.0),
                                                         ("fwd", "a", 4): (1.0, 3.0, 2.0)}))))
    out = tmp_path / "t.json"
    assert tune.main([str(result), "--keys", "nf4.gemv_tiles", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["devices"]["cpu-as-gpu"]["settings"]
    assert settings == {"nf4.gemv_tiles": {"1": {"block_n": 16, "blocks": 4, "num_warps": 4, "table": "prmt"}}}
    with pytest.raises(SystemExit, match="--keys: unknown setting nf4.gemv_tile "):
        tune.main([str(result), "--keys", "nf4.gemv_tile", "--out", str(out)])

def test_results_are_replaced_whole(tmp_path):
    """bench/common.write_results goes through a temporary file and a rename: a rewrite (the gemv sweep
    rewrites its JSON after every row) never leaves a half-written file or the temporary behind."""
    common = _load_bench("common")

    class Args:
        smoke = False
        out = str(tmp_path)

    first = common.write_results("nf4-graph", [{"M": 1}], Args, extra={"sweep_gemv": []})
    second = common.write_results("nf4-graph", [{"M": 1}], Args, extra={"sweep_gemv": [{"M": 1}]})
    assert first == second and json.loads(second.read_text())["sweep_gemv"] == [{"M": 1}]
    assert [p.name for p in tmp_path.iterdir()] == [second.name]


def test_lora_targets_judge_only_cases_with_both_times():
    """bench/lora.py's comparisons with PEFT and bitsandbytes need lora_auto in the same case: a run that
    timed other paths only says what it lacked, and never reads as met."""
    lora = _load_bench("lora")

    def row(auto):
        return {"shape": "3200x3200", "M": 16384, "r": 16, "lora_auto": auto, "lora_auto/nf4_only": auto and auto / 1.0,
                "peft_style": 1.5, "peft_style/nf4_only": 1.5, "bnb_peft": 1.4}

    got = {t["target"]: t for t in lora.check_targets([row(None)], [], "graph replay")}
    for name in ("faster than PEFT-style separate LoRA matmuls on the same NF4 base [graph replay]",
                 "faster than bitsandbytes + PEFT [graph replay]"):
        assert got[name]["status"] == "not measured", got[name]
        assert got[name]["detail"] == "lora_auto not measured (--paths without auto)", got[name]
    got = {t["target"]: t for t in lora.check_targets([row(1.2)], [], "eager")}
    assert got["faster than PEFT-style separate LoRA matmuls on the same NF4 base [eager]"]["status"] == "met"
    assert got["faster than bitsandbytes + PEFT [eager]"]["status"] == "met"
    assert got["NF4+LoRA fwd+bwd <= 1.10x NF4 alone (M 4096/16384, r 16/64) [eager]"]["status"] == "missed"
    slow = {t["target"]: t for t in lora.check_targets([row(1.45)], [], "eager")}
    assert slow["faster than bitsandbytes + PEFT [eager]"]["status"] == "missed"
    no_bnb = {t["target"]: t for t in lora.check_targets([dict(row(None), bnb_peft=None)], [], "eager")}
    assert no_bnb["faster than bitsandbytes + PEFT [eager]"]["detail"] == "bitsandbytes not measured"


def test_lora_targets_without_the_nf4_baseline_still_judge_and_do_not_crash():
    """A case where lora_auto and the peers were timed but NF4 alone was not (its timing failed, or its
    graph capture did) has no ratios: the PEFT verdict still compares the times, and its detail says
    so, where formatting the missing ratios raised and lost the whole run (check_targets runs before
    the results are written)."""
    lora = _load_bench("lora")
    row = {"shape": "3200x3200", "M": 16384, "r": 16, "lora_auto": 1.2, "lora_auto/nf4_only": None,
           "peft_style": 1.5, "peft_style/nf4_only": None, "bnb_peft": 1.4}
    got = {t["target"]: t for t in lora.check_targets([row], [], "graph replay")}
    peft = got["faster than PEFT-style separate LoRA matmuls on the same NF4 base [graph replay]"]
    assert peft["status"] == "met", peft
    assert "3200x3200 M=16384 r=16" in peft["detail"] and "1.2" in peft["detail"], peft
    assert got["faster than bitsandbytes + PEFT [graph replay]"]["status"] == "met"
