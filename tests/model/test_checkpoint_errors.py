"""Broken checkpoint folders fail with one message that names the file and the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bezoar.model import CheckpointError, ConfigError, load, save


@pytest.fixture
def sharded(tiny_dir, tmp_path):
    return save(load(tiny_dir), tmp_path / "sharded", max_shard_size=20_000)


def test_missing_shard_names_index_and_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (sharded / victim).unlink()
    with pytest.raises(CheckpointError) as e:
        load(sharded)
    assert "model.safetensors.index.json" in str(e.value) and victim in str(e.value)


def test_wrong_shape_names_file_and_key(tiny_dir, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(folder)
    msg = str(e.value)
    assert "model.safetensors" in msg and key in msg and "shape" in msg


def test_missing_tensor_named(tiny_dir, tmp_path):
    folder = tmp_path / "missing"
    shutil.copytree(tiny_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load(folder)


def test_unexpected_tensor_named(tiny_dir, tmp_path):
    folder = tmp_path / "extra"
    shutil.copytree(tiny_dir, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        load(folder)


def test_not_llama_config(tiny_dir, tmp_path):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load(folder)
    assert "config.json" in str(e.value) and "model_type" in str(e.value)


def test_config_missing_key_and_bad_json(tiny_dir, tmp_path):
    folder = tmp_path / "cfg"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="hidden_size"):
        load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load(folder)


def test_pickle_refused_unless_opted_in(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    torch.save(load_file(tiny_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        load(folder)
    model = load(folder, allow_pickle=True)
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), load(tiny_dir)(ids))


def test_unreadable_pickle_names_the_file(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    torch.save(load_file(tiny_dir / "model.safetensors"), folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read"):
        load(folder, allow_pickle=True)
    torch.save([1, 2], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load(folder, allow_pickle=True)


def test_sharded_pickles_follow_their_index(tiny_dir, tmp_path):
    """pytorch_model.bin.index.json names the shards: they load as the safetensors do, and a missing one is
    named with the index (not found out later as tensors missing from the model)."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    state = load_file(tiny_dir / "model.safetensors")
    keys = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, folder / name)
    weight_map = {k: name for name, part in halves.items() for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids = torch.randint(3, 500, (1, 7))
    with torch.no_grad():
        assert torch.equal(load(folder, allow_pickle=True)(ids), load(tiny_dir)(ids))
    (folder / "pytorch_model-00002-of-00002.bin").rename(folder / "elsewhere.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: shard "
                                              r"'pytorch_model-00002-of-00002\.bin' is missing"):
        load(folder, allow_pickle=True)


def test_model_safetensors_comes_before_an_index_beside_it(tiny_dir, tmp_path):
    """A folder saved again over an earlier save of the other kind holds both model.safetensors and
    model.safetensors.index.json (transformers leaves the old one): transformers reads model.safetensors, and so
    does bezoar, which followed the index (and refused the folder whose index named shards since removed). The
    same for pytorch_model.bin beside pytorch_model.bin.index.json."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        want = load(tiny_dir)(ids)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    unsharded_last = tmp_path / "unsharded-last"  # the index names shards that are gone
    hf.save_pretrained(unsharded_last, max_shard_size="100KB")
    hf.save_pretrained(unsharded_last)
    sharded_last = tmp_path / "sharded-last"  # whole shards with other weights, and the old single file
    hf.save_pretrained(sharded_last)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(0.5)
    hf.save_pretrained(sharded_last, max_shard_size="100KB")
    for folder in (unsharded_last, sharded_last):
        assert (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            got = load(folder)(ids)
            assert torch.equal(got, want), folder.name
            assert (theirs(ids).logits - got).abs().max() < 1e-4, folder.name

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_dir / "config.json", pickled / "config.json")
    torch.save(load_file(tiny_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    stale = {"metadata": {}, "weight_map": {"model.norm.weight": "pytorch_model-00001-of-00002.bin"}}
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps(stale))
    with torch.no_grad():
        assert torch.equal(load(pickled, allow_pickle=True)(ids), want)


def test_no_weights_and_not_a_folder(tmp_path, tiny_dir):
    folder = tmp_path / "empty"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load(folder)
    with pytest.raises(CheckpointError, match="not a folder"):
        load(tmp_path / "nowhere")


def test_save_refuses_to_clobber(tiny_dir, tmp_path):
    model = load(tiny_dir)
    out = save(model, tmp_path / "out")
    with pytest.raises(FileExistsError):
        save(model, out)
    save(model, out, overwrite=True)
    assert not list(tmp_path.glob("out.*")), "temporary folders must not be left behind"


def test_nf4_layer_of_the_wrong_shape_names_file_and_key(tiny_dir, tmp_path):
    """A bitsandbytes-4bit layer whose quant state holds another shape than config.json implies is refused."""
    nf4 = save(load(tiny_dir, quant="nf4", device="cpu"), tmp_path / "nf4")
    tensors = load_file(nf4 / "model.safetensors")
    victim, donor = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    for key in [k for k in tensors if k.startswith(donor)]:
        tensors[victim + key[len(donor):]] = tensors[key].clone()
    save_file(tensors, nf4 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load(nf4, device="cpu")
    msg = str(e.value)
    assert "model.safetensors" in msg and victim in msg and "shape" in msg, msg


def test_quantized_checkpoints_other_than_nf4_are_refused_up_front(tiny_dir, tmp_path, capsys):
    """A bitsandbytes 8-bit checkpoint (written here by transformers + bitsandbytes) failed on the dtype of its
    int8 weights, saying nothing of why; it, and other quant_methods or 4-bit types, is now one ConfigError
    naming config.json and quantization_config before any weight is read. quantize refuses it the same way."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from bezoar.quantize import main as quantize_main

    int8 = tmp_path / "int8"
    transformers.AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=torch.float32).save_pretrained(int8)
    with pytest.raises(ConfigError) as e:
        load(int8, device="cpu")
    msg = str(e.value)
    assert str(int8 / "config.json") in msg and "quantization_config" in msg and "8-bit" in msg, msg
    assert "4-bit NF4" in msg, msg
    assert quantize_main(["--model", str(int8), "--out", str(tmp_path / "nf4")]) == 2
    err = capsys.readouterr().err
    assert "quantization_config" in err and "Traceback" not in err, err

    folder = tmp_path / "other"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for quant, says in (({"quant_method": "gptq", "bits": 4, "group_size": 128}, "'gptq'"),
                        ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "'awq'"),
                        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
                         "'fp4'"),
                        ({"quant_method": "bitsandbytes"}, "neither"), ("nf4", "not an object")):
        (folder / "config.json").write_text(json.dumps(dict(cfg, quantization_config=quant)))
        with pytest.raises(ConfigError) as e:
            load(folder, device="cpu")
        msg = str(e.value)
        assert "config.json" in msg and "quantization_config" in msg and says in msg, msg


@pytest.mark.parametrize("key, value", [
    ("num_key_value_heads", 0), ("num_key_value_heads", -2), ("num_key_value_heads", "2"), ("head_dim", 0),
    ("head_dim", 16.0), ("max_position_embeddings", 0), ("rms_norm_eps", "1e-6"), ("rms_norm_eps", -1e-6),
    ("rope_theta", "abc"), ("rope_theta", 0), ("tie_word_embeddings", "false"), ("torch_dtype", "float64"),
    ("torch_dtype", "float8_e4m3fn"), ("dtype", "float64"),
])
def test_config_field_of_the_wrong_type_names_file_and_key(tiny_dir, tmp_path, key, value):
    """An optional config.json field that is present but unusable is one ConfigError naming the file and key,
    not a ZeroDivisionError, a torch error at build time, or a string taken as true."""
    folder = tmp_path / "cfg"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as e:
        load(folder, device="cpu")
    assert "config.json" in str(e.value) and key in str(e.value), str(e.value)


def _with_config(tiny_dir, tmp_path, **changes):
    folder = tmp_path / "cfg"
    shutil.copytree(tiny_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, key", [
    # transformers 5 writes rope_parameters (default) and still applies a rope_scaling beside it: bezoar read
    # only the first and ran default RoPE, logits 0.12-0.15 off
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": {"type": "linear", "factor": 4.0}},
     "rope_scaling"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": None, "type": "linear", "factor": 2.0}}, "rope_scaling"),  # read as default
])
def test_configs_bezoar_cannot_run_as_given_are_refused_naming_the_key(tiny_dir, tmp_path, changes, key):
    with pytest.raises(ConfigError, match=key):
        load(_with_config(tiny_dir, tmp_path, **changes), device="cpu")


@pytest.mark.parametrize("changes, theta", [
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 7.0},
          rope_scaling={"rope_type": "default", "rope_theta": 5.0}), 5.0),
    # a non-empty rope_scaling replaces rope_parameters whole: its theta is 10000 or the top-level one (bezoar kept
    # rope_parameters' 500000)
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rope_scaling={"rope_type": "default"}),
     10000.0),
    (dict(rope_theta=20000.0, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
          rope_scaling={"type": "default"}), 20000.0),
    (dict(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 10000.0),
    (dict(rope_theta=500000.0, rope_parameters={"rope_type": "default"}), 500000.0),
    (dict(rope_theta=500000.0, rope_parameters={}), 500000.0),
])
def test_rope_theta_beside_both_tables_is_read_as_transformers_reads_it(tiny_dir, tmp_path, changes, theta):
    import transformers

    base = json.loads((tiny_dir / "config.json").read_text())
    folder = _with_config(tiny_dir, tmp_path, **changes)
    if "rope_parameters" not in changes:  # the tiny model's own table goes, so that only the case's count
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        (folder / "config.json").write_text(json.dumps(cfg))
    if "rope_theta" not in changes and "rope_theta" in base:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("rope_theta")
        (folder / "config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoConfig.from_pretrained(folder)
    assert load(folder, device="cpu").config.rope_theta == theirs.rope_parameters["rope_theta"] == theta


def test_a_tied_config_with_a_stored_head_loads_as_transformers_loads_it(tiny_dir, tmp_path):
    """tie_word_embeddings true and a stored lm_head.weight: transformers unties where the two differ (bezoar tied
    the head to the embedding without a word, logits 30.9 off), takes the head as the embedding where only the
    head is stored (bezoar refused it as missing the embedding), and ties where they are equal."""
    import transformers
    from safetensors.torch import load_file, save_file

    hf_config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    ids = torch.arange(10)[None]
    for case in ("distinct", "head only", "equal"):
        folder = tmp_path / case.replace(" ", "-")
        transformers.LlamaForCausalLM(hf_config).save_pretrained(folder)
        tensors = load_file(folder / "model.safetensors")
        if case == "distinct":
            tensors["lm_head.weight"] = torch.randn(128, 64)
        elif case == "head only":
            tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
        else:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ours = load(folder, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=0)
        tied = ours.lm_head.weight is ours.model.embed_tokens.weight
        assert tied is (case != "distinct") and ours.config.tie_word_embeddings is tied, case
        if case == "distinct":  # saved again, both stay, untied, and transformers reads the same model
            again = transformers.LlamaForCausalLM.from_pretrained(save(ours, tmp_path / "resaved"),
                                                                  dtype=torch.float32).eval()
            with torch.no_grad():
                torch.testing.assert_close(again(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_swish_is_silu_and_a_list_of_eos_ids_is_written_back_whole(tiny_dir, tmp_path):
    import transformers

    folder = _with_config(tiny_dir, tmp_path, hidden_act="swish", eos_token_id=[2, 7], attention_dropout=0.0)
    (folder / "generation_config.json").unlink(missing_ok=True)
    model = load(folder, device="cpu")
    assert model.config.eos_token_id == 2
    out = save(model, tmp_path / "saved")
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 7]  # was cut to 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, 7]


def test_attention_dropout_loads_for_inference_and_is_refused_for_training(tiny_dir, tmp_path):
    """transformers trains with a config's attention_dropout; bezoar's attention has none, so training such a
    model refuses it (it was dropped without a word), while loading it to evaluate or serve is fine."""
    from bezoar.config import ConfigError as StageConfigError
    from bezoar.train.run import run_stage
    from tests.train.helpers import tiny_sft_config

    folder = _with_config(tiny_dir, tmp_path, attention_dropout=0.1)
    assert load(folder, device="cpu").config.extra["attention_dropout"] == 0.1
    cfg = tiny_sft_config(tmp_path / "run", f"model.path={folder}", "train.max_steps=1")
    with pytest.raises(StageConfigError, match="config.json key 'attention_dropout' is 0.1"):
        run_stage(cfg, log=lambda *a: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_4bit_checkpoints_with_skipped_modules_load_as_transformers_reads_them(tiny_dir, tmp_path):
    """transformers + bitsandbytes keep the modules of llm_int8_skip_modules dense. A linear layer saved dense
    beside 4-bit ones was refused as a 4-bit layer without its quant state; it now loads dense, with
    transformers' logits. A 4-bit lm_head (skip list empty) is one error that says so, not a shape mismatch."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    ids = torch.randint(3, 200, (2, 9))
    # one layer's down_proj dense: bezoar wrote the short name, and transformers built every down_proj dense
    # a 4-bit lm_head in bf16 storage (an (n, 1) bf16 column) was a shape "the config implies" otherwise
    for skip, storage in ((["down_proj", "lm_head"], torch.uint8), ([], torch.uint8), ([], torch.bfloat16),
                          (["lm_head", "model.layers.0.mlp.down_proj"], torch.uint8)):
        quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                                llm_int8_skip_modules=skip, bnb_4bit_quant_storage=storage)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, quantization_config=quant,
                                                                   device_map="cpu", dtype=torch.float32)
        folder = tmp_path / f"skip-{'-'.join(skip)}-{storage}"
        theirs.save_pretrained(folder)
        if not skip:
            with pytest.raises(CheckpointError, match=r"tensor 'lm_head.weight' is stored 4-bit .*lm_head dense"):
                load(folder, device="cpu")
            continue
        assert load_file(folder / "model.safetensors")["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
        ours = load(folder, device="cpu")
        assert type(ours.model.layers[0].mlp.down_proj) is torch.nn.Linear
        assert type(ours.model.layers[0].mlp.up_proj).__name__ == "NF4Linear"
        assert (type(ours.model.layers[1].mlp.down_proj) is torch.nn.Linear) is (skip[0] == "down_proj")
        with torch.no_grad():
            want = theirs(ids).logits
            torch.testing.assert_close(ours(ids), want, atol=1e-4, rtol=0)
            # saved again by bezoar: its config names the dense layers, so transformers builds them dense too
            resaved = save(ours, tmp_path / f"resaved-{'-'.join(skip)}")
            config = json.loads((resaved / "config.json").read_text())["quantization_config"]
            assert config["llm_int8_skip_modules"] == (["down_proj", "lm_head"] if skip[0] == "down_proj"
                                                       else ["model.layers.0.mlp.down_proj", "lm_head"])
            again = transformers.AutoModelForCausalLM.from_pretrained(resaved, device_map="cpu", dtype=torch.float32)
            torch.testing.assert_close(again(ids).logits, want, atol=1e-4, rtol=0)
