"""LoRA adapters: PEFT reads ours, we read PEFT's, merges equal base + adapter, misfits are named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bezoar.model import load
from bezoar.model.lora import (AdapterError, LoraConfig, adapters_disabled, apply_lora, lora_modules,
                               lora_parameters, save_adapter)
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("targets,rslora", [(["q_proj", "k_proj", "v_proj"], False), (ALL, True)])
def test_our_adapter_in_peft(tiny_odd_dir, tmp_path, targets, rslora):
    model = load(tiny_odd_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.05, targets=targets, rslora=rslora))
    randomize_adapters(model)
    out = save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf(tiny_odd_dir), out).eval()
    ids = torch.randint(3, 500, (2, 15))
    model.eval()
    with torch.no_grad():
        assert_close(model(ids), theirs(ids).logits, atol=1e-4, rtol=0, name="logits with adapter")
        with adapters_disabled(model):
            with theirs.disable_adapter():
                assert_close(model(ids), theirs(ids).logits, atol=1e-4, rtol=0, name="adapters off")


def test_peft_adapter_in_bezoar(tiny_dir, tmp_path):
    base = hf(tiny_dir)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                          task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    ours = load(tiny_dir, adapter=tmp_path / "peft")
    assert sorted({n.rpartition(".")[2] for n in lora_modules(ours)}) == ["down_proj", "q_proj", "v_proj"]
    ids = torch.randint(3, 500, (2, 11))
    theirs.eval()
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=0, name="PEFT adapter in bezoar")


@pytest.mark.parametrize("selection", [
    dict(target_modules="all-linear"),  # PEFT saves this as the list of full module names
    dict(target_modules=r".*layers\.1\..*(q_proj|down_proj)"),
    dict(target_modules=["q_proj", "up_proj"], exclude_modules=["model.layers.0.self_attn.q_proj"]),
    dict(target_modules=["self_attn.v_proj"], layers_to_transform=0),
    dict(target_modules=["q_proj"], layers_to_transform=[]),  # PEFT: no layer filter (bezoar refused it)
    # a module named in full is adapted whatever the layer filter says (bezoar filtered it out and refused its keys)
    dict(target_modules=["q_proj", "model.layers.1.self_attn.v_proj"], layers_to_transform=[0]),
], ids=["all-linear", "regex", "exclude", "layers_to_transform", "layers_to_transform-empty", "full-name-and-layers"])
def test_peft_module_selection_round_trips(tiny_dir, tmp_path, selection):
    """PEFT adapters that name modules by path, regex, exclusion or layer load onto the modules PEFT adapts,
    and ours saved from them adapt the same modules when PEFT or bezoar reads them back."""
    theirs = peft.get_peft_model(hf(tiny_dir), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              task_type="CAUSAL_LM", **selection))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path / "peft")
    theirs.eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    ours = load(tiny_dir, adapter=tmp_path / "peft")
    assert set(lora_modules(ours)) == adapted
    ids = torch.randint(3, 500, (2, 11))
    with torch.no_grad():
        want = theirs(ids).logits
        assert_close(ours(ids), want, atol=1e-4, rtol=0, name="PEFT adapter in bezoar")
        resaved = save_adapter(ours, tmp_path / "ours")
        again = load(tiny_dir, adapter=resaved)
        assert set(lora_modules(again)) == adapted
        assert_close(again(ids), want, atol=1e-4, rtol=0, name="saved again, read by bezoar")
        back = peft.PeftModel.from_pretrained(hf(tiny_dir), resaved).eval()
        assert {n.removeprefix("base_model.model.") for n, m in back.named_modules() if hasattr(m, "lora_A")} == adapted
        assert_close(back(ids).logits, want, atol=1e-4, rtol=0, name="saved again, read by PEFT")


def test_an_adapter_file_with_two_tensors_for_one_weight_or_no_layer_left_is_refused(tiny_dir, tmp_path):
    """A file holding one LoRA weight twice (two adapter names, or a plain key beside a named one) loaded the
    one safetensors listed last, where PEFT takes the plain one: now one error naming both keys. A
    layers_to_transform that leaves none of the targeted modules is named, not target_modules."""
    from safetensors.torch import load_file, save_file

    model = load(tiny_dir)
    apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    folder = save_adapter(model, tmp_path / "adapter")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    doubled = dict(tensors)
    doubled[key.replace("lora_A.weight", "lora_A.other.weight")] = tensors[key] + 1
    save_file(doubled, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"keys .*lora_A.* and .*lora_A.* are both the weight"):
        load(tiny_dir, adapter=folder)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [7]}))
    with pytest.raises(AdapterError, match=r"key 'layers_to_transform' is \[7\], which leaves none"):
        load(tiny_dir, adapter=folder)


def test_merge_cli_equals_base_plus_adapter(tiny_dir, tmp_path):
    model = load(tiny_dir)
    apply_lora(model, LoraConfig(r=4, alpha=4, dropout=0.0, targets=ALL))
    randomize_adapters(model, seed=2)
    adapter = save_adapter(model, tmp_path / "a1")
    out = tmp_path / "merged"
    run = subprocess.run([sys.executable, "-m", "bezoar.merge", "--model", str(tiny_dir), "--adapter", str(adapter),
                          "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ids = torch.randint(3, 500, (2, 12))
    model.eval()
    with torch.no_grad():
        want = model(ids)
        assert_close(hf(out)(ids).logits, want, atol=1e-4, rtol=0, name="transformers on merged")
        assert_close(load(out)(ids), want, atol=1e-4, rtol=0, name="bezoar on merged")
    # Stage two: an adapter trained on the merged model merges on top of it.
    stage2 = load(out)
    apply_lora(stage2, LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    randomize_adapters(stage2, seed=3)
    a2 = save_adapter(stage2, tmp_path / "a2")
    from bezoar.merge import merge

    final = merge(out, a2, tmp_path / "merged2")
    with torch.no_grad():
        assert_close(load(final)(ids), stage2.eval()(ids), atol=1e-4, rtol=0, name="two-stage merge")


def test_defaults_and_init(tiny_dir):
    model = load(tiny_dir)
    added = apply_lora(model, LoraConfig())
    assert sorted({n.rpartition(".")[2] for n in added}) == ["k_proj", "q_proj", "v_proj"]
    m = next(iter(added.values()))
    assert m.r == 16 and m.scaling == 1.0 and m.dropout_p == 0.05
    assert torch.count_nonzero(m.lora_B.weight) == 0 and torch.count_nonzero(m.lora_A.weight) > 0
    bound = 1 / m.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on (r, in)
    assert m.lora_A.weight.abs().max() <= bound
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert LoraConfig(r=16, alpha=16, rslora=True).scaling == 4.0


def test_dropout_turned_off_for_training_still_writes_the_configured_rate(tiny_dir, tmp_path):
    # What dpo.disable_dropout does: the layers run without dropout, the adapter says lora.dropout. Before,
    # adapter_config.json recorded the rate the layers ran with (0.0).
    model = load(tiny_dir)
    added = apply_lora(model, LoraConfig(dropout=0.05))
    randomize_adapters(model)
    for m in added.values():
        m.dropout_p = 0.0
    model.train()
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.equal(model(x), model(x)), "no dropout ran"
    out = save_adapter(model, tmp_path / "adapter")
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert {m.dropout_p for m in added.values()} == {0.0}


def write_adapter(model, tmp_path, **config_changes):
    out = save_adapter(model, tmp_path / "bad")
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_misfit_adapters_are_named(tiny_dir, tiny_odd_dir, tmp_path):
    donor = load(tiny_dir)
    apply_lora(donor, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    wrong_rank = write_adapter(donor, tmp_path, r=8)
    with pytest.raises(AdapterError, match=r"r=8"):
        load(tiny_dir, adapter=wrong_rank)
    wrong_targets = write_adapter(donor, tmp_path, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="v_proj"):
        load(tiny_dir, adapter=wrong_targets)
    good = write_adapter(donor, tmp_path)
    with pytest.raises(AdapterError, match="shape"):
        load(tiny_odd_dir, adapter=good)  # hidden 60 vs 64
    bogus = write_adapter(donor, tmp_path, target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="target_modules"):
        load(tiny_dir, adapter=bogus)
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        load(tiny_dir, adapter=tmp_path)


def test_an_adapter_that_does_not_fit_leaves_the_model_as_it_was(tiny_dir, tmp_path):
    """load_adapter on a misfit (here r=8 in the config, r=4 tensors) raises and takes its half-attached
    adapters off again: same modules, same outputs, same trainable flags, and the right adapter then loads."""
    from bezoar.model.lora import load_adapter

    donor = load(tiny_dir)
    apply_lora(donor, LoraConfig(r=4, dropout=0.0, targets=["q_proj", "v_proj"]))
    randomize_adapters(donor)
    model = load(tiny_dir)
    model.lm_head.weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        before = model(ids)
    with pytest.raises(AdapterError, match="r=8"):
        load_adapter(model, write_adapter(donor, tmp_path, r=8))
    assert not lora_modules(model) and not hasattr(model, "lora_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    load_adapter(model, save_adapter(donor, tmp_path / "good"))
    with torch.no_grad():
        assert torch.equal(model(ids), donor(ids))


def test_loaded_adapter_is_deterministic(tiny_dir, tmp_path):
    model = load(tiny_dir)
    apply_lora(model, LoraConfig(r=4, dropout=0.5))
    randomize_adapters(model)
    out = save_adapter(model, tmp_path / "a")
    again = load(tiny_dir, adapter=out)
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), again(ids)), "a loaded adapter must not apply dropout"


def test_an_adapter_saved_with_its_embedding_layers_is_refused_as_such(tiny_dir, tmp_path):
    """PEFT's save_embedding_layers writes the embedding (and lm_head) beside LoRA's weights: refused as weights
    that are not LoRA's, where the message read as a model that does not fit ("key ... does not fit this model")."""
    theirs = peft.get_peft_model(hf(tiny_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                              task_type="CAUSAL_LM"))
    theirs.save_pretrained(tmp_path / "peft", save_embedding_layers=True)
    from safetensors.torch import load_file

    assert any("embed_tokens" in k or "lm_head" in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"is not a LoRA weight .*save_embedding_layers"):
        load(tiny_dir, adapter=tmp_path / "peft")


@pytest.mark.parametrize("key, value", [
    ("lora_dropout", 1.5), ("lora_dropout", "0.1"), ("use_rslora", "false"), ("use_qalora", True),
    ("layer_replication", [[0, 1], [0, 2]]), ("alora_invocation_tokens", [1, 2]), ("lora_bias", True),
    ("trainable_token_indices", [5, 6]), ("target_parameters", ["mlp.experts.down_proj"]),
    # PEFT 0.21's other LoRA variants (refused only at their first extra tensor, as a model that did not fit)
    ("velora_config", {"num_tokens": 2}), ("monteclora_config", {"n_experts": 2}),
])
def test_adapter_config_values_bezoar_cannot_honor_are_named(tiny_dir, tmp_path, key, value):
    """A value that is malformed, or a PEFT feature that changes what the adapter computes and that bezoar
    does not implement, is one AdapterError naming adapter_config.json and the key, never ignored."""
    donor = load(tiny_dir)
    apply_lora(donor, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    with pytest.raises(AdapterError) as e:
        load(tiny_dir, adapter=write_adapter(donor, tmp_path, **{key: value}))
    assert "adapter_config.json" in str(e.value) and key in str(e.value), str(e.value)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_peft_adapters_are_refused_and_their_conversion_loads(tiny_dir, tmp_path, capsys, init):
    """A PiSSA or OLoRA adapter is trained on a base PEFT changed at initialisation (and changes again when it
    loads the adapter): taken as plain LoRA on the unchanged base it gave another model (logits 0.1-0.4 off).
    load and the merge CLI refuse it naming adapter_config.json and init_lora_weights; the plain LoRA adapter
    that the conversion the message names writes from it loads and gives the model as trained."""
    from bezoar.merge import main

    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=init, task_type="CAUSAL_LM")
    trained = peft.get_peft_model(hf(tiny_dir), cfg)
    trained.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the conversion's starting point
    trained.save_pretrained(tmp_path / "initial")
    trained.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained.save_pretrained(tmp_path / "raw")
    trained.save_pretrained(tmp_path / "converted",
                            path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    with pytest.raises(AdapterError) as e:
        load(tiny_dir, adapter=tmp_path / "raw")
    msg = str(e.value)
    assert "adapter_config.json" in msg and "init_lora_weights" in msg and repr(init) in msg, msg
    assert "path_initial_model_for_weight_conversion" in msg, msg
    out = tmp_path / "merged"
    assert main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "raw"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "adapter_config.json" in err and "init_lora_weights" in err and "Traceback" not in err, err
    assert not out.exists()
    ids = torch.randint(3, 500, (2, 10))
    with torch.no_grad():
        assert_close(load(tiny_dir, adapter=tmp_path / "converted")(ids), trained.eval()(ids).logits, atol=1e-4,
                     rtol=0, name=f"{init} adapter converted to plain LoRA")


def test_init_lora_weights_that_change_the_base_are_refused(tiny_dir, tmp_path):
    """Every init_lora_weights value of PEFT 0.21 that changes the base weights, and one bezoar does not know,
    is one AdapterError naming adapter_config.json and the key; those that only choose the starting A and B
    (the saved weights replace them) load as plain LoRA."""
    donor = load(tiny_dir)
    apply_lora(donor, LoraConfig(r=4, dropout=0.0, targets=["q_proj", "v_proj"]))
    randomize_adapters(donor)
    convert = "path_initial_model_for_weight_conversion"
    refused = {"pissa_niter_4": convert, "corda": convert, "lora_ga": convert, "loftq": "LoftQ",
               "kaiming": "plain LoRA", 1: "plain LoRA"}
    for value, says in refused.items():
        with pytest.raises(AdapterError) as e:
            load(tiny_dir, adapter=write_adapter(donor, tmp_path, init_lora_weights=value))
        msg = str(e.value)
        assert "adapter_config.json" in msg and "init_lora_weights" in msg and says in msg, msg
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        want = donor.eval()(ids)
        for value in (True, False, None, "gaussian", "eva", "orthogonal", "mica"):
            got = load(tiny_dir, adapter=write_adapter(donor, tmp_path, init_lora_weights=value))(ids)
            assert torch.equal(got, want), value


def test_an_adapter_write_cut_short_leaves_nothing_behind_once_written_again(tiny_dir, tmp_path, monkeypatch):
    """save_adapter stopped between its two renames (the old adapter moved aside, the new one not yet in
    place) left adapter.old-PID and adapter.partial-PID, full-size copies both; the next save leaves only the
    adapter it wrote."""
    from pathlib import Path

    from safetensors.torch import load_file

    model = load(tiny_dir, device="cpu")
    apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0))
    folder = save_adapter(model, tmp_path / "adapter")
    real_rename, renames = Path.rename, []

    def rename_cut_short(self, target):
        renames.append(self)
        if len(renames) == 2:
            raise KeyboardInterrupt  # as a kill between the renames
        return real_rename(self, target)

    randomize_adapters(model, seed=1)
    monkeypatch.setattr(Path, "rename", rename_cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, folder)
    monkeypatch.undo()
    assert not folder.exists()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("adapter.")]) == 2  # .old- and .partial-
    randomize_adapters(model, seed=2)
    save_adapter(model, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    name, module = next(iter(lora_modules(model).items()))
    assert torch.equal(saved[f"base_model.model.{name}.lora_A.weight"], module.lora_A.weight)


def test_a_damaged_adapter_file_is_one_error_naming_it(tiny_dir, tmp_path):
    """A torn adapter_model.safetensors gave safetensors' own "invalid header length" traceback in merge, serve
    and eval, naming no file."""
    model = load(tiny_dir)
    apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0, targets=["q_proj"]))
    folder = save_adapter(model, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    with pytest.raises(AdapterError, match=rf"{weights}: cannot be read as safetensors"):
        load(tiny_dir, adapter=folder)
