"""NF4Linear: bitsandbytes/transformers serialization, round trips, errors, module behaviour."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

from bezoar.model.nf4 import QUANT_STATE_SUFFIX, NF4Linear  # noqa: E402
from bezoar_kernels.dispatch import backend  # noqa: E402
from tests.utils import TOLERANCES, assert_close  # noqa: E402

PREFIX = "model.layers.0.mlp.down_proj"
SOURCE = "model-00001-of-00002.safetensors"


def _dense(n=48, k=160, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(dtype)


def _bnb_state_dict(weight: torch.Tensor, double_quant: bool, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """What bitsandbytes itself serializes for this weight (quantize_4bit + QuantState.as_dict(packed=True),
    the pieces Linear4bit._save_to_state_dict writes)."""
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant,
                                       quant_type="nf4")
    out = {f"{PREFIX}.weight": packed}
    out.update({f"{PREFIX}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (128, True)])
def test_bnb_tensors_equal_bitsandbytes_serialization(blocksize, double_quant, dtype):
    w = _dense(dtype=dtype)
    expected = _bnb_state_dict(w, double_quant, blocksize)
    got = NF4Linear.from_float(w, blocksize=blocksize, double_quant=double_quant).bnb_tensors(PREFIX)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert torch.equal(got[key], value), f"{key} differs from bitsandbytes"
    state = json.loads(bytes(got[PREFIX + ".weight" + QUANT_STATE_SUFFIX].tolist()))
    assert state["dtype"] == str(dtype).removeprefix("torch.") and state["shape"] == [48, 160]


@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_through_bnb_tensors_and_state_dict(double_quant):
    w = _dense(n=37, k=61)  # odd element count: a padded final byte
    layer = NF4Linear.from_float(w, blocksize=128, double_quant=double_quant, compute_dtype=torch.float32)
    tensors = layer.bnb_tensors(PREFIX)
    again = NF4Linear.from_bnb_tensors(tensors, PREFIX, SOURCE, compute_dtype=torch.float32)
    assert torch.equal(again.dequantize(), layer.dequantize())
    assert all(torch.equal(again.bnb_tensors(PREFIX)[k], v) for k, v in tensors.items())

    state = layer.state_dict()
    assert sorted(state) == sorted(k[len(PREFIX) + 1:] for k in tensors)
    other = NF4Linear.from_float(_dense(n=37, k=61, seed=5), blocksize=64, double_quant=not double_quant,
                                 compute_dtype=torch.float32)
    other.load_state_dict(state)
    assert torch.equal(other.dequantize(), layer.dequantize()) and other.double_quant == double_quant

    parent = torch.nn.Module()
    parent.proj = layer
    bad = dict(parent.state_dict(), **{"proj.bias": torch.zeros(37)})
    missing, unexpected = parent.load_state_dict(bad, strict=False)
    assert unexpected == ["proj.bias"] and not missing
    with pytest.raises(RuntimeError, match="shape"):
        NF4Linear.from_float(_dense(n=8, k=61)).load_state_dict(state)


def test_dequantize_and_forward_match_bitsandbytes():
    w = _dense()
    tensors = _bnb_state_dict(w, True)
    layer = NF4Linear.from_bnb_tensors(tensors, PREFIX, SOURCE, compute_dtype=torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(packed, state))
    x = torch.randn(3, 5, 160)
    expected = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    assert_close(layer(x), expected, *TOLERANCES[torch.float32], name="forward vs bnb.matmul_4bit")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward_triton_matches_torch(dtype):
    layer = NF4Linear.from_float(_dense(n=50, k=128), compute_dtype=dtype)
    x = torch.randn(2, 9, 128, dtype=dtype)
    dy = torch.randn(2, 9, 50, dtype=dtype)
    results = []
    for name in ("torch", "triton"):
        xg = x.clone().requires_grad_(True)
        with backend(name):
            y = layer(xg)
            y.backward(dy)
        results.append((y.detach(), xg.grad))
    atol, rtol = TOLERANCES[dtype]
    assert_close(results[1][0], results[0][0], atol, rtol, name="forward")
    assert_close(results[1][1], results[0][1], atol, rtol, name="dx")


def test_module_behaviour():
    layer = NF4Linear.from_float(_dense(dtype=torch.bfloat16), compute_dtype=torch.float32)
    assert layer.in_features == 160 and layer.out_features == 48
    assert list(layer.parameters()) == []
    assert not any(b.requires_grad for b in layer.buffers())
    assert "in_features=160, out_features=48, blocksize=64, double_quant=True" in repr(layer)
    before = layer.dequantize()
    layer.to(torch.float16)  # casts the compute dtype, never the fp32 scales
    assert layer.compute_dtype == torch.float16
    assert layer.nested_absmax.dtype == torch.float32 and layer.nested_code.dtype == torch.float32
    assert layer.packed.dtype == torch.uint8 and layer.absmax.dtype == torch.uint8
    assert torch.equal(layer.dequantize().float(), before.half().float())
    layer.to("cpu")
    assert layer.compute_dtype == torch.float16
    x = torch.randn(4, 160)  # fp32 input: computed in fp16, returned as fp32
    assert layer(x).dtype == torch.float32
    cfg = layer.quantization_config()
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True and cfg["load_in_4bit"] is True
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_float(torch.randn(64))


def _corrupt(tensors, key, value=None):
    out = dict(tensors)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def _state_bytes(state: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


W, QS = f"{PREFIX}.weight", f"{PREFIX}.weight{QUANT_STATE_SUFFIX}"
GOOD_STATE = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [48, 160], "nested_blocksize": 256,
              "nested_dtype": "float32", "nested_offset": 0.01}
CORRUPTIONS = [
    ("missing weight", lambda t: _corrupt(t, W), W, "missing"),
    ("missing absmax", lambda t: _corrupt(t, W + ".absmax"), W + ".absmax", "missing"),
    ("missing quant state", lambda t: _corrupt(t, QS), QS, "missing"),
    ("missing nested absmax", lambda t: _corrupt(t, W + ".nested_absmax"), W + ".nested_absmax", "missing"),
    ("not json", lambda t: _corrupt(t, QS, torch.tensor(list(b"{oops"), dtype=torch.uint8)), QS, "corrupt"),
    ("not utf-8", lambda t: _corrupt(t, QS, torch.tensor([255, 254], dtype=torch.uint8)), QS, "corrupt"),
    ("fp4", lambda t: _corrupt(_corrupt(t, QS), W + ".quant_state.bitsandbytes__fp4", t[QS]),
     "bitsandbytes__fp4", "fp4"),
    ("quant_type", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, quant_type="fp4"))), QS, "quant_type"),
    ("blocksize", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, blocksize=96))), QS, "blocksize 96"),
    # 64.0 equals 64 and passed, then the first forward indexed with a float and failed far from the cause
    ("blocksize float", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, blocksize=64.0))), QS,
     "blocksize 64.0"),
    ("nested blocksize float", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, nested_blocksize=256.0))),
     QS, "nested_blocksize 256.0"),
    ("shape", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, shape=[48]))), QS, "shape"),
    ("shape vs bytes", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, shape=[48, 162]))), W, "bytes"),
    ("offset", lambda t: _corrupt(t, QS, _state_bytes(dict(GOOD_STATE, nested_offset="x"))), QS, "nested_offset"),
    ("half nested", lambda t: _corrupt(t, QS, _state_bytes({k: v for k, v in GOOD_STATE.items()
                                                             if k != "nested_dtype"})), QS, "not all of"),
    ("absmax dtype", lambda t: _corrupt(t, W + ".absmax", t[W + ".absmax"].float()), W + ".absmax", "uint8"),
    ("absmax length", lambda t: _corrupt(t, W + ".absmax", t[W + ".absmax"][:-1]), W + ".absmax", "expected"),
    ("quant map", lambda t: _corrupt(t, W + ".quant_map", bnbf.get_4bit_type("fp4", "cpu")), W + ".quant_map",
     "NF4 code"),
    ("nested map", lambda t: _corrupt(t, W + ".nested_quant_map", torch.zeros(255)), W + ".nested_quant_map",
     "256"),
    # Non-finite scales loaded and made every logit NaN
    ("quant map nan", lambda t: _corrupt(t, W + ".quant_map", t[W + ".quant_map"].clone().fill_(float("nan"))),
     W + ".quant_map", "NF4 code"),
    ("nested absmax nan", lambda t: _corrupt(t, W + ".nested_absmax", torch.full_like(t[W + ".nested_absmax"],
                                                                                      float("nan"))),
     W + ".nested_absmax", "not finite"),
    ("nested map inf", lambda t: _corrupt(t, W + ".nested_quant_map", torch.where(
        torch.arange(256) == 7, float("inf"), t[W + ".nested_quant_map"])), W + ".nested_quant_map", "not finite"),
    ("stray key", lambda t: _corrupt(t, W + ".absmax2", torch.zeros(1)), W + ".absmax2", "unexpected"),
]


@pytest.mark.parametrize("name,corrupt,key,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_or_mismatched_quant_state_raises(name, corrupt, key, message):
    tensors = _bnb_state_dict(_dense(), True)
    NF4Linear.from_bnb_tensors(tensors, PREFIX, SOURCE)  # the untouched tensors load
    with pytest.raises(ValueError) as info:
        NF4Linear.from_bnb_tensors(corrupt(tensors), PREFIX, SOURCE)
    text = str(info.value)
    assert text.startswith(SOURCE + ": "), text
    assert key in text and message in text, text


def test_non_finite_absmax_without_double_quant_raises():
    """Without double quant absmax is float32 in the file: a NaN or inf there is named, not loaded."""
    tensors = _bnb_state_dict(_dense(), False)
    NF4Linear.from_bnb_tensors(tensors, PREFIX, SOURCE)
    for bad in (float("nan"), float("inf")):
        absmax = tensors[W + ".absmax"].clone()
        absmax[3] = bad
        with pytest.raises(ValueError, match=r"\.absmax: 1 of its 120 values are not finite"):
            NF4Linear.from_bnb_tensors(_corrupt(tensors, W + ".absmax", absmax), PREFIX, SOURCE)


def test_nested_tensors_without_nested_state_raise():
    tensors = _bnb_state_dict(_dense(), False)
    tensors[W + ".nested_absmax"] = torch.zeros(1)
    with pytest.raises(ValueError, match="nested_absmax: present without"):
        NF4Linear.from_bnb_tensors(tensors, PREFIX, SOURCE)


# ----------------------------------------------------------------------------- transformers on CPU


@pytest.fixture(scope="module")
def transformers_nf4(tmp_path_factory):
    """A tiny random LlamaForCausalLM quantized by transformers + bitsandbytes on CPU."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    dense.save_pretrained(folder)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map="cpu",
                                                              dtype=torch.float32)
    return dense, model


def _linear_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_matches_transformers_bitsandbytes_state_dict(transformers_nf4):
    dense, model = transformers_nf4
    names = _linear_names(model)
    assert len(names) == 14  # 7 per layer; lm_head stays dense
    hf_state = model.state_dict()
    dense_state = dense.state_dict()
    for name in names:
        ours = NF4Linear.from_float(dense_state[name + ".weight"], compute_dtype=torch.float32).bnb_tensors(name)
        theirs = {k: v for k, v in hf_state.items() if k.startswith(name + ".weight")}
        assert sorted(ours) == sorted(theirs), name
        for key in theirs:
            assert torch.equal(ours[key], theirs[key].cpu()), f"{key} differs from transformers + bitsandbytes"


def test_loads_transformers_tensors_and_matches_linear4bit(transformers_nf4):
    _, model = transformers_nf4
    hf_state = model.state_dict()
    x = torch.randn(2, 7, 64)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj"):
        module = model.get_submodule(name)
        layer = NF4Linear.from_bnb_tensors(hf_state, name, "model.safetensors", compute_dtype=torch.float32)
        expected_w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(layer.dequantize(), expected_w)
        with torch.no_grad():
            assert_close(layer(x), module(x), *TOLERANCES[torch.float32], name=f"{name} forward")


# ----------------------------------------------------------------------------- python -m bezoar.quantize


def _quantized_checkpoint_matches(transformers, folder, dense_folder, blocksize, double_quant):
    from bezoar.model import load

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_use_double_quant"] is double_quant
    ours = load(folder, device="cpu")  # a bitsandbytes-4bit folder loads as NF4 whatever quant says
    q_proj = ours.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, NF4Linear) and q_proj.blocksize == blocksize and q_proj.double_quant is double_quant
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    assert isinstance(theirs.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    ids = torch.randint(3, ours.config.vocab_size, (2, 11))
    with torch.no_grad():
        want = ours(ids)
        # Same NF4 bytes on both sides and fp32 compute: only summation order differs.
        assert_close(theirs(ids).logits, want, atol=1e-4, rtol=0, name="transformers + bitsandbytes logits")
        if blocksize == 64 and double_quant:  # quantize-on-load uses the defaults
            on_load = load(dense_folder, quant="nf4", device="cpu")
            assert_close(on_load(ids), want, atol=0, rtol=0, name="quantized on load")


def test_quantize_cli_checkpoint_loads_in_transformers(tiny_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "nf4"
    cmd = [sys.executable, "-m", "bezoar.quantize", "--model", str(tiny_dir), "--out", str(out),
           "--compute-dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _quantized_checkpoint_matches(transformers, out, tiny_dir, 64, True)


def test_quantize_options_and_errors(tiny_dir, tmp_path, capsys):
    from bezoar.quantize import main

    transformers = pytest.importorskip("transformers")
    out = tmp_path / "nf4-128"
    assert main(["--model", str(tiny_dir), "--out", str(out), "--blocksize", "128", "--no-double-quant",
                 "--compute-dtype", "float32"]) == 0
    _quantized_checkpoint_matches(transformers, out, tiny_dir, 128, False)
    assert main(["--model", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already bitsandbytes 4-bit" in capsys.readouterr().err
    assert main(["--model", str(tiny_dir), "--out", str(out)]) == 2  # exists, no --overwrite
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--no-double-quant" in capsys.readouterr().out


def test_quantize_a_weight_that_is_not_finite_names_file_and_key_and_dense_parts_keep_the_stored_dtype(
        tiny_dir, tmp_path, capsys):
    """An inf in a linear weight crashed bezoar.quantize and quantize-on-load with an IndexError naming nothing
    (double quant) or wrote a checkpoint that bezoar then refused (without). A config.json that names no dtype
    wrote a bf16 model's embeddings and norms as fp32: they now keep the stored tensors' dtype."""
    from safetensors.torch import load_file, save_file

    from bezoar.model import CheckpointError, load
    from bezoar.quantize import main

    tensors = load_file(tiny_dir / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (tiny_dir / name).exists():
            (broken / name).write_bytes((tiny_dir / name).read_bytes())
    key = "model.layers.1.mlp.up_proj.weight"
    bad = dict(tensors)
    bad[key] = bad[key].clone()
    bad[key][2, 3] = float("inf")
    save_file(bad, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{key}': .*not finite"):
        load(broken, quant="nf4")
    for extra in ([], ["--no-double-quant"]):
        assert main(["--model", str(broken), "--out", str(tmp_path / "nf4-broken"), *extra]) == 2
        assert f"tensor '{key}'" in capsys.readouterr().err and not (tmp_path / "nf4-broken").exists()

    from tests.utils import bf16_copy_without_dtype

    bf16 = bf16_copy_without_dtype(tiny_dir, tmp_path / "bf16")
    assert main(["--model", str(bf16), "--out", str(tmp_path / "nf4-bf16")]) == 0
    written = load_file(tmp_path / "nf4-bf16" / "model.safetensors")
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert written["model.norm.weight"].dtype == torch.bfloat16


def test_quantize_refuses_an_unusable_out_before_quantizing(tiny_dir, tmp_path, capsys, monkeypatch):
    """A file, a non-empty folder (without --overwrite) or the model's own folder as --out: one error,
    before the model is loaded and quantized (minutes for 3B), and nothing there is touched."""
    import bezoar.model
    from bezoar.quantize import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(bezoar.model, "load", no_load)
    note = tmp_path / "notes.txt"
    note.write_text("mine\n")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    for out, extra, says in ((note, [], "is a file"), (full, [], "not empty"), (tiny_dir, ["--overwrite"], "is the model")):
        assert main(["--model", str(tiny_dir), "--out", str(out), *extra]) == 2
        assert says in capsys.readouterr().err
    assert note.read_text() == "mine\n" and (full / "keep.txt").read_text() == "mine\n"


@pytest.mark.parametrize("double_quant", [True, False])
def test_save_with_dtype_keeps_nf4_scales(tiny_dir, tmp_path, double_quant):
    """save(dtype=...) casts the dense weights only: the NF4 absmax, codes and nested scales stay float32; config.json
    names the dense weights' dtype under both keys transformers reads ("dtype" first, "torch_dtype")."""
    from safetensors.torch import load_file

    from bezoar.model import load, save

    model = load(tiny_dir, quant="nf4", device="cpu", nf4_double_quant=double_quant)
    out = save(model, tmp_path / "nf4-bf16", dtype="bfloat16")
    written = load_file(str(out / "model.safetensors"))
    layer = model.model.layers[0].mlp.down_proj
    for key, want in layer.bnb_tensors("model.layers.0.mlp.down_proj").items():
        assert written[key].dtype == want.dtype and torch.equal(written[key], want), key
    assert written["model.embed_tokens.weight"].dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16", config
    again = load(out, device="cpu")
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        assert_close(again(ids), model.to(torch.bfloat16).float()(ids), atol=1e-4, rtol=0, name="reloaded logits")


def test_quantize_writes_the_bytes_transformers_writes_when_stored_and_config_dtypes_differ(tiny_dir, tmp_path):
    """A checkpoint stored in fp32 whose config.json says bfloat16: transformers + bitsandbytes cast each weight to
    bfloat16 and quantize that; bezoar quantized the stored fp32 values (21 of 2048 packed bytes of a q_proj and
    the quant state's dtype differed from transformers' own quantization of the same folder)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from bezoar.quantize import main

    source = tmp_path / "fp32-stored"
    shutil.copytree(tiny_dir, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}))
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=quant, device_map="cpu")
    theirs.save_pretrained(tmp_path / "theirs")
    assert main(["--model", str(source), "--out", str(tmp_path / "ours")]) == 0
    want, got = load_file(tmp_path / "theirs" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(got) == set(want)
    differ = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    assert differ == []
