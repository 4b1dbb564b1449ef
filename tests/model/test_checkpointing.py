"""Activation checkpointing: "off", "full" and "cheap" give the same loss and gradients; "cheap" runs no
linear layer or attention twice; the memory held between forward and backward is ordered off > cheap > full."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bezoar.model.checkpointing import CheckpointError, checkpoint_layer, resolve_mode, saved_call
from bezoar.model.config import LlamaConfig, preset
from bezoar.model.lora import lora_parameters
from bezoar_kernels import nf4_matmul
from bezoar_kernels.dispatch import backend
from tests.model.qlora_helpers import StorageTracker, qlora_model
from tests.utils import assert_close

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODES = ("off", "full", "cheap")


def packed_inputs(vocab: int, rows: int, length: int, doc_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, length), generator=g)
    pos = torch.arange(length) % doc_len
    doc_ids = (torch.arange(length) // doc_len).expand(rows, length).clone()
    doc_ids[:, -3:] = -1  # padding at the end of each row
    return ids, pos.expand(rows, length).clone(), doc_ids


def loss_and_grads(model, mode, ids, pos, doc_ids, kernels="torch"):
    model.gradient_checkpointing = mode
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the same dropout masks in every mode
    with backend(kernels):
        hidden = model(ids, position_ids=pos, doc_ids=doc_ids, return_hidden=True)
        loss = (hidden.float() ** 2).mean() + model.lm_head(hidden).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config_name,targets,dropout", [
    ("tiny", ("q_proj", "k_proj", "v_proj"), 0.0),      # the OpenBezoar LoRA targets
    ("tiny-odd", ALL, 0.0),                              # head_dim 10, GQA 6:3, tied head, 3 layers
    ("tiny", ALL, 0.1),                                  # LoRA dropout: RNG must replay exactly
])
def test_modes_give_equal_gradients(config_name, targets, dropout):
    model = qlora_model(preset(config_name), seed=0, targets=targets, dropout=dropout)
    ids, pos, doc_ids = packed_inputs(model.config.vocab_size, rows=2, length=29, doc_len=9)
    ref_loss, ref_grads = loss_and_grads(model, "off", ids, pos, doc_ids)
    assert len(ref_grads) == 2 * len(targets) * model.config.num_hidden_layers
    for mode in ("full", "cheap"):
        loss, grads = loss_and_grads(model, mode, ids, pos, doc_ids)
        assert_close(loss, ref_loss, 1e-6, 1e-6, f"{mode} loss")
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert_close(grads[name], ref_grads[name], 1e-6, 1e-5, f"{mode} {name}")


@pytest.mark.parametrize("mode", ["full", "cheap"])
def test_recomputation_replays_autocast_and_rng(mode):
    """A layer whose cheap part holds a matmul (autocast turns it to bf16) and a dropout (RNG): the
    recomputation must see the forward's autocast state and random stream, or its saved tensors (and so
    the gradients) differ from a backward without checkpointing."""
    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(16, 16, generator=g, requires_grad=True) for _ in range(2))
    x = torch.randn(8, 16, generator=g, requires_grad=True)

    def expensive(u):
        torch.rand(3)  # it draws from the stream (as the LoRA calls draw dropout seeds) and is not rerun
        return u @ w2

    def layer(t):
        h = torch.nn.functional.dropout(t @ w1, 0.3, training=True).sin()  # cheap part: recomputed
        h = saved_call(expensive, h)
        return torch.nn.functional.dropout(h, 0.5, training=True).cos()  # cheap, after the call

    def run(m):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = checkpoint_layer(layer, m, x)
        torch.randn(100)  # the global stream moves on before the backward
        out.float().square().sum().backward()
        grads = [t.grad.clone() for t in (x, w1, w2)]
        for t in (x, w1, w2):
            t.grad = None
        return grads

    for got, want in zip(run(mode), run("off")):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["full", "cheap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_under_checkpointing(mode, dtype):
    """The Triton path (interpreter): the attention kernel's saved q/k/v are cut again from the recomputed
    RoPE outputs; NF4 layers save nothing; results equal the same path without checkpointing bit for bit,
    in half precision too (three layers: full checkpointing takes the residual add in front of layers 2
    and 3, and their first norm's backward must round the summed gradient once, as the fused one does)."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=64)
    model = qlora_model(config, seed=0, targets=("q_proj", "v_proj", "down_proj"), dtype=dtype)
    ids, pos, doc_ids = packed_inputs(config.vocab_size, rows=1, length=21, doc_len=7)
    ref_loss, ref_grads = loss_and_grads(model, "off", ids, pos, doc_ids, kernels="triton")
    loss, grads = loss_and_grads(model, mode, ids, pos, doc_ids, kernels="triton")
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and len(grads) == 3 * 3 * 2
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products and attention calls that reach aten."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "baddbmm") or "scaled_dot_product" in name:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_cheap_runs_no_linear_or_attention_twice(monkeypatch):
    """The backward of cheap does the matrix products of the backward of off and no more (no linear
    layer or attention is recomputed), while the norms do run again; full recomputes everything."""
    model = qlora_model(preset("tiny"), seed=0, targets=("q_proj", "k_proj", "v_proj", "down_proj"))
    ids, pos, doc_ids = packed_inputs(model.config.vocab_size, rows=2, length=24, doc_len=8)
    import bezoar.model.llama as llama

    norms = {"n": 0}

    def counted(real):
        def norm(*a, **k):
            norms["n"] += 1
            return real(*a, **k)
        return norm

    monkeypatch.setattr(llama, "rms_norm_add", counted(llama.rms_norm_add))
    monkeypatch.setattr(llama, "rms_norm", counted(llama.rms_norm))
    monkeypatch.setattr(llama, "rms_norm_keep", counted(llama.rms_norm_keep))
    seen = {}
    for mode in MODES:
        model.gradient_checkpointing = mode
        model.train()
        model.zero_grad(set_to_none=True)
        norms["n"] = 0
        forward, backward = MatmulCounter(), MatmulCounter()
        with backend("torch"):
            with forward:
                loss = model(ids, position_ids=pos, doc_ids=doc_ids).float().logsumexp(-1).mean()
            with backward:
                loss.backward()
        seen[mode] = {"forward": forward.count, "backward": backward.count, "norms": norms["n"]}
    layers = model.config.num_hidden_layers
    inner_norms = 2 * layers  # two norms per layer (with or without the residual add); the final norm
    # sits outside the layers and runs once
    assert seen["cheap"]["backward"] == seen["off"]["backward"], seen
    assert seen["full"]["backward"] > seen["off"]["backward"] + layers, seen  # the layers' products again
    assert seen["off"]["norms"] == inner_norms + 1, seen
    assert seen["full"]["norms"] == seen["cheap"]["norms"] == 2 * inner_norms + 1, seen
    assert seen["off"]["forward"] == seen["full"]["forward"] == seen["cheap"]["forward"], seen


def kernel_caches() -> list:
    """Buffers the kernels keep between calls (dequantized weights): not activations."""
    from bezoar_kernels import lora as lora_kernels

    return list(nf4_matmul._dequant_buffers.values()) + list(lora_kernels._dequant_buffers.values())


def held_bytes(model, mode, ids, pos, doc_ids, kernels):
    model.gradient_checkpointing = mode
    model.train()
    with backend(kernels), torch.no_grad():  # warm the kernels' caches outside the count
        model(ids, position_ids=pos, doc_ids=doc_ids)
    tracker = StorageTracker()
    with backend(kernels), tracker:
        hidden = model(ids, position_ids=pos, doc_ids=doc_ids, return_hidden=True)
    exclude = list(model.parameters()) + list(model.buffers()) + kernel_caches() + [hidden]
    return tracker.live_bytes(exclude)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_memory_held_for_backward_is_ordered(kernels):
    """Bytes of the activations alive between forward and backward, counted at the storage level, with
    LoRA on every linear (with LoRA on q/k/v only, an NF4 layer saves nothing and cheap keeps about what
    off keeps). Per token and layer, full keeps the layer inputs (~2 hidden widths); cheap the inputs
    plus the q/k/v/attention/o_proj/gate/up outputs; off also the norm, RoPE and SwiGLU outputs that the
    adapters and the attention save."""
    if kernels == "torch":
        config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128)
        rows, length = 2, 96
    else:  # the interpreter is slow: one layer, one row
        config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                             num_attention_heads=2, max_position_embeddings=128)
        rows, length = 1, 48
    model = qlora_model(config, seed=0, targets=ALL)
    ids, pos, doc_ids = packed_inputs(config.vocab_size, rows=rows, length=length, doc_len=16)
    held = {mode: held_bytes(model, mode, ids, pos, doc_ids, kernels) for mode in MODES}
    width = rows * length * config.num_hidden_layers * 4  # bytes of one fp32 value per token and layer
    c, f = config.hidden_size, config.intermediate_size
    in_widths = {mode: round(held[mode] / width / c, 2) for mode in MODES}  # hidden widths per token and layer
    assert held["off"] > held["cheap"] > held["full"], in_widths
    # one hidden width per layer (the sum its first norm takes, where the pair x, residual was kept
    # before: this 2-layer model then held 2.16 widths, now 1.66), cos/sin tables, the final norm's input
    assert in_widths["full"] <= (1.8 if config.num_hidden_layers > 1 else 3.0), in_widths
    kept_outputs = 3 * c + c + c + 2 * f  # q, k, v, attention, o_proj, gate, up
    assert held["cheap"] - held["full"] >= kept_outputs * width * 0.9, in_widths
    assert held["off"] - held["cheap"] >= c * width, in_widths


def test_backward_twice_with_retained_graph():
    model = qlora_model(preset("tiny"), seed=0, targets=ALL)
    ids, pos, doc_ids = packed_inputs(model.config.vocab_size, rows=1, length=20, doc_len=10)
    model.gradient_checkpointing = "cheap"
    model.train()
    with backend("torch"):
        loss = model(ids, position_ids=pos, doc_ids=doc_ids).float().logsumexp(-1).mean()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in lora_parameters(model)]
    model.zero_grad()
    loss.backward()
    for a, b in zip(first, (p.grad for p in lora_parameters(model))):
        assert torch.equal(a, b)


def test_recompute_that_diverges_is_named():
    calls = {"n": 0}
    w = torch.randn(8, 8, requires_grad=True)

    def layer(x):
        calls["n"] += 1
        y = saved_call(lambda t: t @ w, x).sin()
        return y.cos() if calls["n"] == 1 else y.cos().exp()  # the recomputation takes another branch

    x = torch.randn(4, 8, requires_grad=True)
    out = checkpoint_layer(layer, "cheap", x)
    with pytest.raises(CheckpointError, match="same way twice"):
        out.sum().backward()


def test_mode_names():
    assert resolve_mode(True) == "full" and resolve_mode(False) == "off" and resolve_mode("cheap") == "cheap"
    with pytest.raises(ValueError, match="'off', 'full', 'cheap'"):
        resolve_mode("fast")
    model = qlora_model(preset("tiny"), seed=0)
    model.gradient_checkpointing = True
    assert model.gradient_checkpointing == "full"
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        model.gradient_checkpointing = "yes"


def test_stage_config_switch(tmp_path):
    from bezoar.config import ConfigError, dump_toml, load_config
    from bezoar.train.config import StageConfig

    cheap = load_config(StageConfig, None, ["model.gradient_checkpointing=cheap"])
    assert cheap.model.gradient_checkpointing == "cheap"
    legacy = load_config(StageConfig, None, ["model.gradient_checkpointing=true"])
    assert legacy.model.gradient_checkpointing == "full"
    path = tmp_path / "stage.toml"
    path.write_text(dump_toml(legacy))
    assert load_config(StageConfig, path).model.gradient_checkpointing == "full"
    path.write_text('[model]\ngradient_checkpointing = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"stage.toml:2: key 'model.gradient_checkpointing'"):
        load_config(StageConfig, path)


@pytest.mark.parametrize("mode", MODES)
def test_nothing_outlives_the_backward(mode):
    """Once the backward is done, no tensor made by the forward, the recomputation or the frames is alive
    (only the gradients): the checkpoint frames and their hooks hold nothing past their layer."""
    model = qlora_model(preset("tiny"), seed=0, targets=ALL)
    ids, pos, doc_ids = packed_inputs(model.config.vocab_size, rows=1, length=24, doc_len=8)
    model.gradient_checkpointing = mode
    model.train()
    model.zero_grad(set_to_none=True)
    tracker = StorageTracker()
    with backend("torch"), tracker:
        loss = model(ids, position_ids=pos, doc_ids=doc_ids).float().logsumexp(-1).mean()
        loss.backward()
    del loss
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    inputs = [ids, pos, doc_ids]  # views of them were recorded too
    assert tracker.live_bytes(list(model.parameters()) + list(model.buffers()) + grads + inputs) == 0


@pytest.mark.parametrize("mode", MODES)
def test_a_forward_never_run_backward_frees_everything(mode):
    """A training forward whose loss is dropped without a backward (a NaN stop, an exception) must not
    leak: no frame may close a reference cycle through the autograd graph."""
    model = qlora_model(preset("tiny"), seed=0, targets=ALL)
    ids, pos, doc_ids = packed_inputs(model.config.vocab_size, rows=1, length=24, doc_len=8)
    model.gradient_checkpointing = mode
    model.train()
    tracker = StorageTracker()
    with backend("torch"), tracker:
        loss = model(ids, position_ids=pos, doc_ids=doc_ids).float().logsumexp(-1).mean()
    assert tracker.live_bytes(list(model.parameters()) + list(model.buffers()) + [ids, pos, doc_ids]) > 0
    del loss
    assert tracker.live_bytes(list(model.parameters()) + list(model.buffers()) + [ids, pos, doc_ids]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["full", "cheap"])
def test_bf16_checkpointing_equals_off_on_gpu(mode):
    """bf16 on CUDA (the interpreter cannot round to bf16 the way the GPU does): checkpointing changes no
    bit of the loss or the gradients. Every kernel on this path is deterministic (no atomics; split
    reductions go through fp32 partials), so any difference is a rounding the modes do differently."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=2, max_position_embeddings=64)
    model = qlora_model(config, seed=0, targets=("q_proj", "v_proj", "down_proj"), dtype=torch.bfloat16).cuda()
    ids, pos, doc_ids = (t.cuda() for t in packed_inputs(config.vocab_size, rows=2, length=40, doc_len=8))
    ref_loss, ref_grads = loss_and_grads(model, "off", ids, pos, doc_ids, kernels="triton")
    loss, grads = loss_and_grads(model, mode, ids, pos, doc_ids, kernels="triton")
    assert torch.equal(loss, ref_loss), (loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), (name, (grads[name] - ref_grads[name]).abs().max())
