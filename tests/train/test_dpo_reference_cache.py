"""precompute_ref: one pass, a cache on disk keyed by data and reference weights, reuse, and rebuilds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bezoar.data import make_loader
from bezoar.model import Tokenizer
from bezoar.model.lora import lora_modules
from bezoar.train.config import DPOSection
from bezoar.train.dpo import DPOStage, ReferenceCache, reference_weights_digest
from tests.train.dpo_helpers import single_thread, documents, policy, write_pairs
from tests.utils import assert_close

assert single_thread  # an autouse fixture: every test here runs torch on one thread


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    path = write_pairs(tmp_path_factory.mktemp("refcache") / "pairs.jsonl", 11, seed=2)
    return documents(path, tokenizer)


def fake_trainer(model, docs, cfg, tokenizer, batch_size=4):
    """What prepare() reads of a Trainer: the model, its device and autocast dtype, the training batches."""
    batches = make_loader(docs, cfg, tokenizer, batch_size=batch_size, seed=3)
    return SimpleNamespace(model=model, device=torch.device("cpu"), autocast_dtype=None, batches=batches)


def prepared(model, docs, cfg, tokenizer, folder: Path, messages: list):
    stage = DPOStage(DPOSection(precompute_ref=True, ref_cache_dir=str(folder)), docs=docs, data_cfg=cfg,
                     batch_size=4, log=messages.append)
    trainer = fake_trainer(model, docs, cfg, tokenizer)
    stage.prepare(trainer)
    return stage, trainer


def test_cached_equals_on_the_fly_and_training_batches_carry_it(tiny_dir, tokenizer, data, tmp_path):
    docs, cfg = data
    model = policy(tiny_dir)
    messages = []
    stage, trainer = prepared(model, docs, cfg, tokenizer, tmp_path / "cache", messages)
    assert any("one pass over" in m for m in messages) and any("cached in" in m for m in messages)
    seen = 0
    for batch in trainer.batches:
        assert "ref_logps" in batch
        want = stage.reference_logps(model, batch)
        assert_close(batch["ref_logps"], want, 1e-5, 1e-5, "cached vs on-the-fly reference log-probs")
        seen += batch["doc_table"].shape[0]
        # the loss with the cached reference equals the loss that runs the reference pass itself
        with_cache, _ = stage.loss(model, batch)
        without = {k: v for k, v in batch.items() if k != "ref_logps"}
        on_the_fly, _ = stage.loss(model, without)
        assert_close(with_cache.detach(), on_the_fly.detach(), 1e-5, 1e-5, "loss")
    assert seen == docs.num_docs
    # the wrapper passes the loader's position through (checkpoints and resume)
    assert trainer.batches.state_dict() == trainer.batches.batches.state_dict()
    assert len(trainer.batches) == len(trainer.batches.batches)


def test_a_later_run_reuses_the_cache_without_a_pass(tiny_dir, tokenizer, data, tmp_path, monkeypatch):
    docs, cfg = data
    folder = tmp_path / "cache"
    prepared(policy(tiny_dir), docs, cfg, tokenizer, folder, [])
    first = ReferenceCache(folder, docs, cfg, policy(tiny_dir)).load()

    def no_pass(*a, **k):
        raise AssertionError("the reference pass ran although the cache is valid")

    monkeypatch.setattr(DPOStage, "_compute_all", no_pass)
    messages = []
    # other adapter weights (a resumed run): the reference is the base alone, so the key is the same
    _, trainer = prepared(policy(tiny_dir, seed=9), docs, cfg, tokenizer, folder, messages)
    assert any("reusing" in m for m in messages), messages
    batch = next(iter(trainer.batches))
    assert batch["ref_logps"].shape == (batch["doc_table"].shape[0],)
    assert first is not None and len(list(folder.glob("*.safetensors"))) == 1


def _corrupt_truncate(path: Path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _corrupt_flip(path: Path):
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x40  # inside the tensor data (the last tensor written is a log-prob or a document column)
    path.write_bytes(bytes(raw))


def _corrupt_nan(path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["logps"][0] = float("nan")
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("corrupt,reason", [(_corrupt_truncate, "unreadable"), (_corrupt_flip, "does not match"),
                                            (_corrupt_nan, "checksum")])
def test_a_corrupted_cache_is_reported_and_rebuilt(tiny_dir, tokenizer, data, tmp_path, corrupt, reason):
    docs, cfg = data
    folder = tmp_path / "cache"
    model = policy(tiny_dir)
    prepared(model, docs, cfg, tokenizer, folder, [])
    cache = ReferenceCache(folder, docs, cfg, model)
    good = cache.load()
    corrupt(cache.path)
    messages = []
    _, trainer = prepared(model, docs, cfg, tokenizer, folder, messages)
    assert any("rebuilding" in m and reason in m for m in messages), messages
    assert any("one pass over" in m for m in messages)
    rebuilt = ReferenceCache(folder, docs, cfg, model).load()
    assert rebuilt is not None and (rebuilt == good).all()


def test_a_cache_for_other_data_is_never_used(tiny_dir, tokenizer, data, tmp_path):
    docs, cfg = data
    folder = tmp_path / "cache"
    model = policy(tiny_dir)
    prepared(model, docs, cfg, tokenizer, folder, [])
    old = ReferenceCache(folder, docs, cfg, model)
    other_docs, other_cfg = documents(write_pairs(tmp_path / "other.jsonl", 11, seed=7), tokenizer)
    new = ReferenceCache(folder, other_docs, other_cfg, model)
    assert new.key != old.key and new.path != old.path
    # the old file put under the new name (a copied or renamed cache): its key gives it away
    new.path.write_bytes(old.path.read_bytes())
    messages = []
    _, trainer = prepared(model, other_docs, other_cfg, tokenizer, folder, messages)
    assert any("key does not match" in m and "rebuilding" in m for m in messages), messages
    assert any("not used" in m for m in messages), messages  # the first file is named and ignored
    batch = next(iter(trainer.batches))
    stage = DPOStage()
    assert_close(batch["ref_logps"], stage.reference_logps(model, {k: v for k, v in batch.items()}), 1e-5, 1e-5,
                 "rebuilt cache")


def test_the_key_follows_weights_and_data_but_not_the_adapter(tiny_dir, tokenizer, data):
    docs, cfg = data
    model = policy(tiny_dir)
    key = ReferenceCache("unused", docs, cfg, model).key
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.add_(1.0)
    assert ReferenceCache("unused", docs, cfg, model).key == key  # the reference runs with adapters off
    digest = reference_weights_digest(model)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.base_layer.weight[0, 0] += 1e-3
    assert reference_weights_digest(model) != digest
    assert ReferenceCache("unused", docs, cfg, model).key != key
    cfg2 = type(cfg)(**{**cfg.__dict__, "max_seq_len": cfg.max_seq_len + 8})
    model2 = policy(tiny_dir)
    assert ReferenceCache("unused", docs, cfg2, model2).key != ReferenceCache("unused", docs, cfg, model2).key


def test_lookup_refuses_batches_of_other_data(tiny_dir, tokenizer, data, tmp_path):
    docs, cfg = data
    model = policy(tiny_dir)
    _, trainer = prepared(model, docs, cfg, tokenizer, tmp_path / "cache", [])
    other_docs, other_cfg = documents(write_pairs(tmp_path / "other.jsonl", 11, seed=7), tokenizer)
    foreign = make_loader(other_docs, other_cfg, tokenizer, batch_size=4, shuffle=False).batch(0, 0)
    with pytest.raises(ValueError, match="not in the reference cache"):
        trainer.batches.lookup(foreign["doc_table"])


def test_weights_digest_covers_the_nf4_base(tiny_dir):
    nf4_a, nf4_b = policy(tiny_dir, quant="nf4"), policy(tiny_dir, quant="nf4", seed=5)
    dense = policy(tiny_dir)
    assert reference_weights_digest(nf4_a) == reference_weights_digest(nf4_b)  # same base, other adapters
    # other target modules: the same reference (it runs with adapters off), so no new pass over the data
    assert reference_weights_digest(policy(tiny_dir, quant="nf4", targets=("q_proj", "k_proj"))) == \
        reference_weights_digest(nf4_a)
    assert reference_weights_digest(nf4_a) != reference_weights_digest(dense)
    packed = next(b for n, b in nf4_a.named_buffers() if n.endswith("packed"))
    with torch.no_grad():
        packed[0] ^= 1  # one NF4 code of one weight
    assert reference_weights_digest(nf4_a) != reference_weights_digest(nf4_b)


def test_the_key_follows_the_nf4_compute_dtype_and_the_versions(tiny_dir, tokenizer, data, monkeypatch):
    """An NF4 base computing in bf16 under fp32 weights gives other reference log-probs (about 2e-3 here) than one
    computing in fp32, but had the same key: NF4Linear's compute_dtype (a torch.dtype) was left out."""
    import bezoar
    from bezoar.model import load

    docs, cfg = data
    keys = {}
    for compute in (torch.float32, torch.bfloat16):
        model = load(tiny_dir, device="cpu", quant="nf4", dtype=torch.float32, nf4_compute_dtype=compute)
        keys[compute] = ReferenceCache("unused", docs, cfg, model).key
    assert keys[torch.float32] != keys[torch.bfloat16]
    model = load(tiny_dir, device="cpu", quant="nf4", dtype=torch.float32, nf4_compute_dtype=torch.float32)
    assert ReferenceCache("unused", docs, cfg, model).key == keys[torch.float32]
    monkeypatch.setattr(bezoar, "__version__", "9.9.9")  # another forward pass or kernels: rebuilt, not reused
    assert ReferenceCache("unused", docs, cfg, model).key != keys[torch.float32]


def test_the_key_follows_the_code_of_the_forward_pass(tiny_dir, tokenizer, data, monkeypatch):
    """bezoar's version never moved: after a fix to the forward pass (a RoPE scaling, a norm) a shared cache or a
    resumed run served log-probs the code before it had made. The key holds a hash of that code's source."""
    import bezoar.train.dpo as dpo

    docs, cfg = data
    model = policy(tiny_dir)
    before = ReferenceCache("unused", docs, cfg, model)
    assert before.key_parts["compute"]["code"] == dpo.code_digest()
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: real(self) + (b"# fixed\n" if self.name == "llama.py" else b""))
    dpo.code_digest.cache_clear()
    try:
        assert ReferenceCache("unused", docs, cfg, model).key != before.key
    finally:
        monkeypatch.undo()
        dpo.code_digest.cache_clear()
    assert ReferenceCache("unused", docs, cfg, model).key == before.key


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_a_non_finite_reference_log_prob_is_named_and_never_cached(tiny_dir, tokenizer, data, tmp_path, monkeypatch,
                                                                   value):
    """A NaN the model gave read as 'the pass left documents without a log-prob' (it marked gaps with NaN); an -inf
    was cached and trained on, then refused and recomputed by every later run."""
    from bezoar.train.loop import TrainingError

    docs, cfg = data
    real = DPOStage.reference_logps

    def overflowing(self, model, batch):
        out = real(self, model, batch).clone()
        out[0] = value
        return out

    monkeypatch.setattr(DPOStage, "reference_logps", overflowing)
    with pytest.raises(TrainingError, match=r"the reference model gave \d+ documents a non-finite log-prob .*overflow"):
        prepared(policy(tiny_dir), docs, cfg, tokenizer, tmp_path / "cache", [])
    assert not list((tmp_path / "cache").glob("ref-logps-*"))


def test_a_cache_folder_that_cannot_be_written_stops_before_the_pass(tiny_dir, tokenizer, data, tmp_path, monkeypatch):
    """ref_cache_dir naming a file was found after the whole reference pass (hours on HH-RLHF), which was lost."""
    from bezoar.config import ConfigError

    docs, cfg = data
    (tmp_path / "a_file").write_text("x")

    def no_pass(*a, **k):
        raise AssertionError("the reference pass ran")

    monkeypatch.setattr(DPOStage, "_compute_all", no_pass)
    with pytest.raises(ConfigError, match=r"dpo.ref_cache_dir .*a_file: cannot be made a folder"):
        prepared(policy(tiny_dir), docs, cfg, tokenizer, tmp_path / "a_file", [])


def test_a_save_killed_before_its_rename_leaves_nothing_for_long(tiny_dir, tokenizer, data, tmp_path):
    docs, cfg = data
    folder = tmp_path / "cache"
    folder.mkdir()
    dead = folder / ".ref-logps-0123.safetensors.tmp-999999999"  # no such process
    dead.write_bytes(b"torn")
    prepared(policy(tiny_dir), docs, cfg, tokenizer, folder, [])
    assert not dead.exists() and len(list(folder.glob("ref-logps-*.safetensors"))) == 1


def test_moving_the_cache_changes_no_setting_of_the_run():
    """Where the cache lives cannot change what is trained (its key decides whether a file serves): a moved
    ref_cache_dir refused --resume and redid a finished DPO stage of a recipe."""
    from bezoar.train.run import RESUME_FREE, WATCH_KEYS

    assert "dpo.ref_cache_dir" in WATCH_KEYS and "dpo.ref_cache_dir" in RESUME_FREE


def test_the_chunked_reference_keeps_the_kernels_choice_in_a_backward_on_another_thread(monkeypatch):
    """On CUDA autograd runs the backward (and a checkpoint's recompute) on a thread of its own, where the
    thread-local model.kernels = "torch" was unset: 'auto' took Triton there, the forward had run the reference,
    and the checkpoint raised. Here BEZOAR_KERNELS=triton (under the interpreter) stands for 'auto' on a GPU."""
    import threading

    from bezoar.train.dpo import response_logprobs
    from bezoar_kernels.dispatch import backend

    monkeypatch.setenv("BEZOAR_KERNELS", "triton")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 32, generator=g, requires_grad=True)
    weight = torch.randn(100, 32, generator=g)
    targets = torch.randint(0, 100, (64,), generator=g)
    with backend("torch"):  # what run_stage does for model.kernels = "torch"
        logps = response_logprobs(hidden, weight, targets, chunk_tokens=16)
    raised = []

    def backward():
        try:
            logps.sum().backward()
        except Exception as e:  # noqa: BLE001 - the test's verdict
            raised.append(e)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert raised == [] and hidden.grad is not None
    want = torch.func.grad(lambda h: torch.log_softmax(h @ weight.T, -1).gather(1, targets[:, None]).sum())(
        hidden.detach())
    torch.testing.assert_close(hidden.grad, want, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_is_no_setting_of_the_run():
    from bezoar.train.run import RESUME_FREE, WATCH_KEYS

    assert "model.gradient_checkpointing" in WATCH_KEYS and "model.gradient_checkpointing" in RESUME_FREE
