"""python -m bezoar.merge --out: an existing target is refused up front with one message, never a traceback."""

from __future__ import annotations

import pytest

from bezoar.merge import main
from bezoar.model import load
from bezoar.model.lora import LoraConfig, apply_lora, save_adapter


@pytest.fixture
def adapter(tiny_dir, tmp_path):
    model = load(tiny_dir, device="cpu")
    apply_lora(model, LoraConfig(r=2, alpha=4, dropout=0.0))
    return save_adapter(model, tmp_path / "adapter")


def test_out_that_is_a_file_is_an_error_and_the_file_is_kept(tiny_dir, adapter, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    for extra in ([], ["--overwrite"]):
        code = main(["--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(target), *extra])
        err = capsys.readouterr().err
        assert code == 2 and str(target) in err and "Traceback" not in err, err
        assert target.read_text() == "mine\n"


def test_out_that_holds_files_names_the_flag_that_replaces_it(tiny_dir, adapter, tmp_path, capsys):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("mine\n")
    code = main(["--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "--overwrite" in err, err
    assert (target / "keep.txt").read_text() == "mine\n"


def test_merged_checkpoint_keeps_the_base_generation_config(tiny_dir, adapter, tmp_path):
    """Stop ids and sampling defaults in the base's generation_config.json survive the merge."""
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    gen = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (base / "generation_config.json").write_text(json.dumps(gen))
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert json.loads((out / "generation_config.json").read_text()) == gen


def test_merged_checkpoint_carries_every_tokenizer_file_of_the_base(tiny_dir, adapter, tmp_path):
    """A base's fast tokenizer.json and added_tokens.json go with the merged checkpoint, byte for byte."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    extra = {"tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}\n', "added_tokens.json": b'{"<x>": 300}\n'}
    for name, data in extra.items():
        (base / name).write_bytes(data)
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", *extra):
        if (base / name).exists():
            assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert all((out / name).exists() for name in extra)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_the_inputs(tiny_dir, adapter, tmp_path, capsys):
    """--overwrite replaces an old output, never the base model or the adapter (nor a folder holding them)."""
    import shutil

    from bezoar.quantize import main as quantize_main

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    before = {base: _snapshot(base), adapter: _snapshot(adapter)}
    for out in (base, adapter, tmp_path):
        code = main(["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and str(out) in err and "Traceback" not in err, (out, err)
        if out == adapter:
            continue  # not an input of quantize
        code = quantize_main(["--model", str(base), "--out", str(out), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and str(out) in err and "Traceback" not in err, (out, err)
    assert {base: _snapshot(base), adapter: _snapshot(adapter)} == before


def test_merged_checkpoint_keeps_the_base_chat_template(tiny_dir, adapter, tmp_path):
    """transformers >= 4.47 saves a tokenizer's chat template as chat_template.jinja (older processors as
    chat_template.json), not inside tokenizer_config.json: the merged checkpoint must carry it."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    templates = {"chat_template.jinja": b"{% for m in messages %}{{ m['content'] }}{% endfor %}",
                 "chat_template.json": b'{"chat_template": "{{ messages[0].content }}"}\n'}
    for name, data in templates.items():
        (base / name).write_bytes(data)
    out = tmp_path / "merged"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    for name, data in templates.items():
        assert (out / name).exists() and (out / name).read_bytes() == data, name


def test_merged_and_quantized_checkpoints_keep_the_base_named_chat_templates(tiny_dir, adapter, tmp_path):
    """transformers 5 saves named chat templates (beside the default) as additional_chat_templates/<name>.jinja:
    merge and quantize dropped the folder, and the merged tokenizer then read the name "tool_use" as a literal
    template, rendering the text "tool_use"."""
    import shutil

    transformers = pytest.importorskip("transformers")
    from bezoar.quantize import main as quantize_main

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    tok.chat_template = {"default": "{% for m in messages %}D:{{ m['content'] }}{% endfor %}",
                         "tool_use": "{% for m in messages %}T:{{ m['content'] }}{% endfor %}"}
    tok.save_pretrained(str(base))
    assert (base / "additional_chat_templates" / "tool_use.jinja").exists(), "transformers saved them elsewhere"
    merged, quantized = tmp_path / "merged", tmp_path / "nf4"
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert quantize_main(["--model", str(base), "--out", str(quantized)]) == 0
    messages = [{"role": "user", "content": "hi"}]
    for out in (merged, quantized):
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tok.apply_chat_template(messages, chat_template="tool_use", tokenize=False) == "T:hi", out
        assert tok.apply_chat_template(messages, tokenize=False) == "D:hi", out


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_merges_killed_mid_write_leave_no_copies_behind(tiny_dir, adapter, tmp_path):
    """A merge killed while writing (merged.partial-PID) or between its renames (merged.old-PID) left full-size
    copies; the next write of that folder removes those of processes that are gone, and keeps a live one's."""
    target = tmp_path / "merged"
    args = ["--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(target), "--overwrite"]
    assert main(args) == 0
    import subprocess
    import sys

    gone = _gone_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for name in (f"merged.partial-{gone}", f"merged.old-{gone}", f"merged.partial-{alive.pid}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"a full-size copy")
        assert main(args) == 0
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == [
            "merged", f"merged.partial-{alive.pid}"]
        assert load(target, device="cpu") is not None
    finally:
        alive.kill()
        alive.wait()


def test_a_merge_killed_between_its_renames_gets_its_only_whole_copy_back(tiny_dir, adapter, tmp_path):
    """Killed after moving the old merged model aside and before renaming the new one into place: merged is
    missing, merged.old-PID is the only whole copy. The next write puts it back rather than delete it."""
    from bezoar.locking import clear_dead_writes

    gone = _gone_pid()
    target = tmp_path / "merged"
    assert main(["--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(target)]) == 0
    whole = _snapshot(target)
    target.rename(tmp_path / f"merged.old-{gone}")
    (tmp_path / f"merged.partial-{gone}").mkdir()  # the new copy, complete or not: nothing says which
    assert clear_dead_writes(target) == [tmp_path / f"merged.partial-{gone}"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("merged")) == ["merged"]
    assert _snapshot(target) == whole


def test_merge_dtype_is_the_dtype_transformers_loads(tiny_dir, adapter, tmp_path):
    """A base that transformers 5 saved in bf16 names its dtype as "dtype" (no "torch_dtype"). A float32 merge
    kept that stale "dtype" beside a new "torch_dtype": transformers reads "dtype" first and loaded the float32
    weights as bf16. Both keys now name the dtype the merged weights are stored in, and bezoar, like
    transformers, reads "dtype" first from a config that has both."""
    import json
    import shutil

    from safetensors import safe_open

    transformers = pytest.importorskip("transformers")
    import torch

    base = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_dir / name, base / name)
    assert json.loads((base / "config.json").read_text()).get("dtype") == "bfloat16"
    assert load(base, device="cpu").config.torch_dtype == "bfloat16"
    for dtype, torch_dtype in (("float32", torch.float32), ("float16", torch.float16)):
        out = tmp_path / f"merged-{dtype}"
        assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", dtype]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["dtype"] == config["torch_dtype"] == dtype, config
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch_dtype
        assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch_dtype
        assert load(out, device="cpu").config.torch_dtype == dtype
    stale = tmp_path / "merged-float16"
    config = json.loads((stale / "config.json").read_text())
    (stale / "config.json").write_text(json.dumps(dict(config, torch_dtype="float32")))
    assert load(stale, device="cpu").config.torch_dtype == "float16"  # as transformers: "dtype" first


def test_an_adapter_trained_on_another_local_base_is_merged_with_a_warning(tiny_dir, adapter, tmp_path, capsys):
    """Shapes that fit say nothing of the weights: a DPO adapter trained on an SFT stage's merged model merged
    into the raw base without a word."""
    import json
    import shutil

    other = tmp_path / "other-base"
    shutil.copytree(tiny_dir, other)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir)
    assert main(["--model", str(tiny_dir), "--adapter", str(adapter), "--out", str(tmp_path / "m1")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert main(["--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / "m2")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {adapter} was trained on {tiny_dir} (its base_model_name_or_path), not on {other}" in err
    for named in ("openlm-research/open_llama_3b_v2", None):  # a hub name or no record: nothing to compare
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": named}))
        assert main(["--model", str(other), "--adapter", str(adapter), "--out", str(tmp_path / f"m{named is None}"),
                     "--overwrite"]) == 0
        assert "warning" not in capsys.readouterr().err


def test_a_checkpoint_another_process_finished_meanwhile_is_kept_not_replaced(tiny_dir, tmp_path, monkeypatch):
    """Two merges to one --out: the second to finish moved the first's whole checkpoint aside and deleted it,
    without --overwrite, and both said they had merged. The later one is now refused and the other kept."""
    import safetensors.torch

    from bezoar.model import save

    out = tmp_path / "merged"
    real = safetensors.torch.save_file

    def slow_disk(tensors, filename, metadata=None):  # the other merge finishes while this one writes
        if not out.exists():
            out.mkdir()
            (out / "model.safetensors").write_bytes(b"the other merge")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", slow_disk)
    with pytest.raises(FileExistsError, match="another process wrote a checkpoint there"):
        save(load(tiny_dir), out)
    assert (out / "model.safetensors").read_bytes() == b"the other merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial copy left beside it
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    (out / "model.safetensors").unlink()
    assert save(load(tiny_dir), out) == out  # an empty folder is still taken


def test_merge_keeps_the_stored_dtype_and_writes_through_a_symlinked_out(tiny_dir, adapter, tmp_path):
    """A bf16 base whose config.json names no dtype was merged into fp32 (quantize kept bf16); an fp32 norm beside
    bf16 weights decided the dtype for the whole checkpoint; an --out that is a link to an empty folder failed
    after the merge."""
    import torch
    from safetensors.torch import load_file

    from bezoar.model.checkpoint import stored_float_dtype
    from tests.utils import bf16_copy_without_dtype

    base = bf16_copy_without_dtype(tiny_dir, tmp_path / "bf16", keep_fp32=("model.norm.weight",))
    assert stored_float_dtype(base) == "bfloat16"
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(["--model", str(base), "--adapter", str(adapter), "--out", str(link)]) == 0
    merged = load_file(target / "model.safetensors")
    assert merged["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert link.is_symlink() and link.resolve() == target
