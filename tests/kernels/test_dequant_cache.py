"""The dequant cache (bezoar_kernels.dequant_cache): the same results with it on or off, the hits and
ahead-of-time dequantizes that a repeated order earns, and its switches. CPU tests run the Triton
kernels in the interpreter (no side stream: the ahead-of-time dequantize runs inline); the gpu tests
run the side stream."""

from __future__ import annotations

import pytest
import torch

from bezoar_kernels import dequant_cache, nf4, nf4_matmul as mm, tuning
from bezoar_kernels.dispatch import backend

# a chain x -> W1 -> W2 -> W3 as a model's linears run it; shapes not multiples of the blocksize
SHAPES = ((80, 64), (72, 80), (96, 72))


def _weights(device="cpu", seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [nf4.quantize_nf4_reference((torch.randn(n, k, generator=g) * 0.05).to(device), 64, True)
            for n, k in shapes]


def _step(weights, x, dy):
    """Forward through the chain and back, as a training step does: W1 W2 W3, then W3 W2 W1."""
    x = x.clone().requires_grad_(True)
    h = x
    for w in weights:
        h = mm.nf4_matmul_triton(h, w, "dequant")
    h.backward(dy)
    return h.detach(), x.grad


@pytest.fixture
def fresh_cache(monkeypatch):
    dequant_cache.clear()
    dequant_cache.reset_stats()
    yield
    dequant_cache.clear()
    dequant_cache.reset_stats()


def _inputs(dtype, device="cpu", m=40, shapes=SHAPES):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, shapes[0][1], generator=g).to(device=device, dtype=dtype)
    dy = torch.randn(m, shapes[-1][0], generator=g).to(device=device, dtype=dtype)
    return x, dy


def _off_then_on(monkeypatch, weights, x, dy, steps):
    """The chain's step with the cache off, then ``steps`` marked steps with it on: (off, [on, ...])."""
    monkeypatch.setenv(dequant_cache.ENV, "0")
    off = _step(weights, x, dy)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    outs = []
    for _ in range(steps):
        dequant_cache.begin_step()
        outs.append(_step(weights, x, dy))
    return off, outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_results_are_bitwise_the_same_with_the_cache_and_a_schedule(monkeypatch, fresh_cache, dtype):
    x, dy = _inputs(dtype)
    with backend("triton"):
        (y_off, dx_off), outs = _off_then_on(monkeypatch, _weights(), x, dy, 3)
    for y, dx in outs:
        assert torch.equal(y, y_off)
        assert torch.equal(dx, dx_off)


def test_a_repeated_order_turns_every_dequantize_into_a_hit(monkeypatch, fresh_cache):
    """Step 1 learns the order W1 W2 W3 W3 W2 W1 with two slots: W3's backward and W2's meet their
    weights still in a slot (2 hits, 4 inline dequantizes). From step 2 every call hits: W1 and W2 are
    left in the slots by the step before, W3 and W1 again are dequantized ahead of their calls."""
    weights = _weights()
    x, dy = _inputs(torch.float32)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    with backend("triton"):
        dequant_cache.begin_step()
        _step(weights, x, dy)
        assert dequant_cache.stats() == {"hits": 2, "misses": 4, "prefetched": 0, "prefetch_hits": 0,
                                         "unused_prefetches": 0}
        for _ in range(2):
            dequant_cache.begin_step()
            _step(weights, x, dy)
    assert dequant_cache.stats() == {"hits": 2 + 12, "misses": 4, "prefetched": 4, "prefetch_hits": 4,
                                     "unused_prefetches": 0}


def test_no_schedule_without_begin_step(monkeypatch, fresh_cache):
    weights = _weights()
    x, dy = _inputs(torch.float32)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    with backend("triton"):
        for _ in range(3):
            _step(weights, x, dy)
    s = dequant_cache.stats()
    assert s["prefetched"] == 0 and s["hits"] + s["misses"] == 18
    assert all(not c.trace and not c.previous for c in dequant_cache._caches.values())


def test_a_changed_order_finds_its_place_again(monkeypatch, fresh_cache):
    """A step that runs the forward only (an eval pass between training steps) wastes at most a guess,
    and the next whole step is found again by its weights: results stay exact."""
    weights = _weights()
    x, dy = _inputs(torch.float32)
    monkeypatch.setenv(dequant_cache.ENV, "0")
    with backend("triton"):
        y_ref, dx_ref = _step(weights, x, dy)
        monkeypatch.setenv(dequant_cache.ENV, "1")
        dequant_cache.begin_step()
        _step(weights, x, dy)
        dequant_cache.begin_step()
        with torch.no_grad():
            h = x
            for w in weights[:2]:
                h = mm.nf4_matmul_triton(h, w, "dequant")
        dequant_cache.begin_step()  # the schedule is now the forward-only one: W1 W2
        y, dx = _step(weights, x, dy)
        dequant_cache.begin_step()
        y2, dx2 = _step(weights, x, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    assert torch.equal(y2, y_ref) and torch.equal(dx2, dx_ref)
    assert dequant_cache.stats()["prefetch_hits"] >= 2


def test_a_weight_written_in_place_is_dequantized_again(monkeypatch, fresh_cache):
    weights = _weights()
    other = _weights(seed=5)
    x, dy = _inputs(torch.float32)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    with backend("triton"):
        dequant_cache.begin_step()
        _step(weights, x, dy)
        for w, o in zip(weights, other):  # new values in the same tensors (a reload into the model)
            for t, src in zip(w.tensors(), o.tensors()):
                t.copy_(src)
            w.offset = o.offset
        dequant_cache.begin_step()
        y, dx = _step(weights, x, dy)
        monkeypatch.setenv(dequant_cache.ENV, "0")
        y_ref, dx_ref = _step(other, x, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_a_dead_weight_is_not_served(monkeypatch, fresh_cache):
    """A slot remembers its weight weakly: once that NF4Weight is gone, a new one over the very same
    memory, with the same version counters (``.data`` aliases start at 0), scales and offset but new
    packed codes, is not mistaken for it (its identity is the dead one's exactly)."""
    import dataclasses

    def alias(w, **changes):
        return dataclasses.replace(w, packed=w.packed.data, absmax=w.absmax.data,
                                   nested_absmax=w.nested_absmax.data, nested_code=w.nested_code.data, **changes)

    monkeypatch.setenv(dequant_cache.ENV, "1")
    x, dy = _inputs(torch.float32)
    storage = _weights()
    other = [dataclasses.replace(w, packed=w.packed ^ 0x5A) for w in storage]  # other codes, same scales
    with backend("triton"):
        old = [alias(w) for w in storage]
        dequant_cache.begin_step()
        _step(old, x, dy)
        identities = [dequant_cache._identity(w) for w in old]
        del old
        for w, o in zip(storage, other):  # written where the version counters do not see it
            w.packed.data.copy_(o.packed)
        new = [alias(w) for w in storage]
        assert identities == [dequant_cache._identity(w) for w in new]
        dequant_cache.begin_step()
        misses = dequant_cache.stats()["misses"]
        y, dx = _step(new, x, dy)
        # W1 W2 W3 dequantized, W3 and W2 then in the slots, W1 again (the dead order predicts nothing)
        assert dequant_cache.stats()["misses"] - misses == 4
        monkeypatch.setenv(dequant_cache.ENV, "0")
        y_ref, dx_ref = _step(other, x, dy)
    assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)


def test_an_offset_or_shape_change_is_a_different_weight(fresh_cache):
    weights = _weights()
    w = weights[0]
    before = dequant_cache._identity(w)
    w.offset = w.offset + 1.0
    assert dequant_cache._identity(w) != before


def test_inference_mode_weights_bypass_the_cache(monkeypatch, fresh_cache):
    """Inference tensors have no version counter: such a weight takes the shared buffer, not the cache."""
    monkeypatch.setenv(dequant_cache.ENV, "1")
    with torch.inference_mode():
        weights = _weights()
        x, _ = _inputs(torch.float32)
        with backend("triton"):
            h = x
            for w in weights:
                h = mm.nf4_matmul_triton(h, w, "dequant")
            ref = x
            for w in weights:
                ref = torch.nn.functional.linear(ref, nf4.dequantize_nf4_reference(w, torch.float32))
    assert dequant_cache.stats() == {}
    assert torch.allclose(h, ref, rtol=1e-5, atol=1e-5)


def test_the_position_is_found_again_by_index(fresh_cache):
    """The schedule's position after a call off the expected order is the block's next place in the step
    before (or its first): looked up by the block, not by scanning the whole order."""
    cache = dequant_cache.DequantCache(torch.device("cpu"), torch.float32)
    ws = _weights() + _weights(seed=3)  # six distinct weights
    blocks = [dequant_cache.Block([w]) for w in ws]
    order = [0, 1, 2, 3, 2, 1, 4, 5]
    cache.begin_step()
    for i in order:
        cache._advance(blocks[i])
    cache.begin_step()
    assert sorted(cache.where.values()) == [[0], [1, 5], [2, 4], [3], [6], [7]]

    def expected(i):
        nxt = cache.expected_next(blocks[i])
        return nxt.weights[0] if nxt is not None else None

    cache._advance(blocks[2])  # off the order: its first place from position 0 is 2
    assert cache.pos == 3 and expected(2) is ws[3]
    cache._advance(blocks[1])  # next place of W1 from 3 is 5
    assert cache.pos == 6 and expected(1) is ws[4]
    cache._advance(blocks[0])  # only before: wraps to its first place
    assert cache.pos == 1 and expected(0) is ws[1]
    cache.pos = len(order)  # past the end: the next step's start is expected
    assert expected(5) is ws[0]
    cache._advance(dequant_cache.Block(_weights(seed=9)[:1]))  # a block the step before never had
    assert cache.pos == len(order)
    # a block of the same weights in other columns is another block
    assert not cache.previous[0].matches(dequant_cache.Block([ws[0]], cols=ws[0].shape[1] + 16))


def test_the_order_is_not_kept_past_max_trace(monkeypatch, fresh_cache):
    monkeypatch.setenv(dequant_cache.ENV, "1")
    monkeypatch.setattr(dequant_cache, "MAX_TRACE", 4)
    x, dy = _inputs(torch.float32)
    weights = _weights()
    with backend("triton"):
        dequant_cache.begin_step()
        _step(weights, x, dy)  # six calls: the record stops at four
    (cache,) = dequant_cache._caches.values()
    assert not cache.stepping and not cache.trace and not cache.previous


def test_switches(monkeypatch, tmp_path):
    monkeypatch.setenv(dequant_cache.ENV, "yes")
    with pytest.raises(ValueError, match="BEZOAR_NF4_DEQUANT_CACHE"):
        dequant_cache.enabled(torch.device("cpu"))
    monkeypatch.delenv(dequant_cache.ENV)
    assert dequant_cache.enabled(torch.device("cpu")) is False  # no entry: off
    f = tmp_path / "t.json"
    f.write_text('{"format": 1, "devices": {"cpu": {"settings": {"nf4.dequant_cache": true}}}}')
    monkeypatch.setenv("BEZOAR_TUNING", str(f))
    tuning.reload()
    try:
        assert dequant_cache.enabled(torch.device("cpu")) is True
        monkeypatch.setenv(dequant_cache.ENV, "0")
        assert dequant_cache.enabled(torch.device("cpu")) is False  # the environment first
        f.write_text('{"format": 1, "devices": {"cpu": {"settings": {"nf4.dequant_cache": 1}}}}')
        tuning.reload()
        with pytest.raises(ValueError, match=r"devices\.cpu\.settings\.nf4\.dequant_cache: expected true or false"):
            tuning.setting("nf4.dequant_cache", torch.device("cpu"))
    finally:
        monkeypatch.delenv("BEZOAR_TUNING")
        tuning.reload()


def test_buffers_made_under_inference_mode_stay_writable(fresh_cache):
    """A slot (or a shared dequant buffer) first allocated inside ``torch.inference_mode`` is written
    outside it later (the concat block's LoRA columns): it must not be an inference tensor."""
    from bezoar_kernels import lora as L

    cache = dequant_cache.DequantCache(torch.device("cpu"), torch.float32)
    block = dequant_cache.Block(_weights()[:1], cols=80)
    with torch.inference_mode():
        view = cache._view(cache.slots[0], block)
        shared = L._shared_buffer(torch.device("cpu"), torch.float16, 12345)
    assert not view.is_inference() and not shared.is_inference()
    view[:, 64:].fill_(1.0)  # as _concat_weights copies the LoRA columns
    with pytest.raises(ValueError, match="2-D weights of one K"):
        dequant_cache.Block([])


def test_two_slots_at_least():
    with pytest.raises(ValueError, match="at least 2 slots"):
        dequant_cache.DequantCache(torch.device("cpu"), torch.float32, slots=1)


@pytest.mark.gpu
@pytest.mark.parametrize("m,shapes", [(256, SHAPES), (4096, SHAPES), (4096, ((3200, 3200),) * 3)],
                         ids=["small-256", "small-4096", "3200-4096"])
def test_side_stream_dequantize_is_exact_on_cuda(monkeypatch, fresh_cache, m, shapes):
    """On a GPU the dequantize ahead runs on the side stream beside the matmul before it: ten steps in
    bf16 equal the cache-off step bit for bit, and from the second step every call hits."""
    x, dy = _inputs(torch.bfloat16, "cuda", m, shapes)
    (y_ref, dx_ref), outs = _off_then_on(monkeypatch, _weights("cuda", shapes=shapes), x, dy, 10)
    torch.cuda.synchronize()
    for y, dx in outs:
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    s = dequant_cache.stats()
    assert s["misses"] == 4 and s["prefetch_hits"] == 2 * 9 and s["unused_prefetches"] == 0


GROWING = ((256, 256), (512, 256), (1024, 512), (2048, 1024))  # each weight larger than the one before


def _delay(monkeypatch, where, cycles=10_000_000):
    """About 5 ms of sleep before every dequantize on the cache's side stream ("side") or before every
    read of a slot on the compute stream ("compute": the plain matmul's product, and the LoRA paths'
    reads, which follow the copy of their LoRA columns or the acquire), or nowhere (None)."""
    from bezoar_kernels import lora as L

    real_dequantize, real_product, real_held = (dequant_cache.dequantize_nf4_triton, dequant_cache._product,
                                                dequant_cache.held)

    def dequantize(weight, dtype, out):
        if where == "side" and any(torch.cuda.current_stream() == c.stream for c in dequant_cache._caches.values()):
            torch.cuda._sleep(cycles)
        return real_dequantize(weight, dtype, out=out)

    def product(a, w, transpose):
        if where == "compute":
            torch.cuda._sleep(cycles)
        return real_product(a, w, transpose)

    import contextlib

    @contextlib.contextmanager
    def held(weights, dtype, cols=None):
        with real_held(weights, dtype, cols) as view:
            if where == "compute":
                torch.cuda._sleep(cycles)
            yield view

    monkeypatch.setattr(dequant_cache, "dequantize_nf4_triton", dequantize)
    monkeypatch.setattr(dequant_cache, "_product", product)
    monkeypatch.setattr(L.dequant_cache, "held", held)


@pytest.mark.gpu
@pytest.mark.parametrize("delay", [None, "side", "compute"])
def test_the_streams_are_ordered_under_delays_on_cuda(monkeypatch, fresh_cache, delay):
    """The orderings the cache relies on, each made to matter by a delay of about 5 ms:

    * "side": before every dequantize on the side stream. A call that did not wait for its slot's
      dequantize (the ready event) would read it half written or holding the weight before;
    * "compute": before every product on the compute stream. A dequantize ahead that did not wait for
      the fence would overwrite a slot that a queued product is still to read.

    After the first step the slots' buffers are dropped, so in the second every dequantize ahead into
    a slot allocates (or grows) its buffer first: that allocation is before the fence too. Every step
    equals the cache-off step bit for bit."""
    weights = _weights("cuda", shapes=GROWING)
    x, dy = _inputs(torch.bfloat16, "cuda", 2048, GROWING)
    monkeypatch.setenv(dequant_cache.ENV, "0")
    y_ref, dx_ref = _step(weights, x, dy)
    torch.cuda.synchronize()
    _delay(monkeypatch, delay)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    outs = []
    for step in range(4):
        dequant_cache.begin_step()
        outs.append(_step(weights, x, dy))
        if step == 0:
            (cache,) = dequant_cache._caches.values()
            for slot in cache.slots:
                slot.buf, slot.ref = None, None
    torch.cuda.synchronize()
    for y, dx in outs:
        assert torch.equal(y, y_ref) and torch.equal(dx, dx_ref)
    s = dequant_cache.stats()
    assert s["prefetched"] >= 3 * 4 and s["prefetch_hits"] == s["prefetched"], s


@pytest.mark.gpu
def test_capture_bypasses_the_cache(monkeypatch, fresh_cache):
    """A CUDA graph captured with the cache on uses the shared buffer (no side-stream work in the graph)
    and replays to the eager result."""
    weights = _weights("cuda")
    x, _ = _inputs(torch.bfloat16, "cuda", 64)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    dequant_cache.begin_step()
    with torch.no_grad():
        eager = x
        for w in weights:
            eager = mm.nf4_matmul_triton(eager, w, "dequant")
        before = dequant_cache.stats()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                h = x
                for w in weights:
                    h = mm.nf4_matmul_triton(h, w, "dequant")
        torch.cuda.current_stream().wait_stream(side)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(h, eager)
    assert dequant_cache.stats() == before


def _lora_chain(path, device="cpu", dtype=torch.float32, k=128, m=24):
    """A step of q/k/v through the LoRA layers (a stacked block of three weights; for ``concat`` with the
    LoRA columns beside W) then two plain NF4 matmuls, forward and back: its outputs and gradients."""
    from bezoar_kernels import lora as L

    r, ns = 8, (k // 2, k // 4, k // 4)
    g = torch.Generator().manual_seed(4)

    def quantized(n, kk):
        return nf4.quantize_nf4_reference((torch.randn(n, kk, generator=g) * 0.05).to(device), 64, True)

    qkv = [quantized(n, k) for n in ns]
    o, o2 = quantized(k, ns[0]), quantized(k, k)
    adapters = [L.Adapter((torch.randn(r, k, generator=g) * 0.1).to(device),
                          (torch.randn(n, r, generator=g) * 0.1).to(device), 0.5) for n in ns]
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    dys = [torch.randn(m, n, generator=g).to(device=device, dtype=dtype) for n in (k, ns[1], ns[2])]

    def step(i=0):
        """Step ``i``: B scaled by 1 + i, as an optimizer step changes it (the concat block's LoRA columns
        must be copied on every call, hit or not)."""
        xx = x.clone().requires_grad_(True)
        ads = [L.Adapter(a.lora_a.clone().requires_grad_(True), (a.lora_b * (1 + i)).requires_grad_(True), a.scaling)
               for a in adapters]
        q, kk, v = L.lora_qkv(xx, qkv, ads, 0.2, True, (11, 12, 13), path)
        y = mm.nf4_matmul_triton(mm.nf4_matmul_triton(q, o, "dequant"), o2, "dequant")
        torch.autograd.backward([y, kk, v], dys)
        return [y.detach(), kk.detach(), v.detach(), xx.grad] + [t.grad for a in ads for t in (a.lora_a, a.lora_b)]

    return step


@pytest.mark.parametrize("path,align", [("dequant", 16), ("cublas", 16), ("concat", 16), ("concat", 64)])
def test_lora_paths_share_the_cache_with_the_plain_matmuls(monkeypatch, fresh_cache, path, align):
    """The LoRA paths' base weights go through the cache beside the plain matmuls (``_lora_chain``): the
    same outputs and gradients bit for bit with the cache off and on; from the second step every call
    finds its block in a slot, the LoRA block too, dequantized ahead where the two slots could not keep
    it. With ``lora.concat_align`` padding the concat forward, its backward keeps the forward's width
    while the cache is on (a narrower block would be another block to the cache: one miss more)."""
    monkeypatch.setenv("BEZOAR_LORA_CONCAT_ALIGN", str(align))
    step = _lora_chain(path)
    with backend("triton"):
        monkeypatch.setenv(dequant_cache.ENV, "0")
        want = [step(i) for i in range(3)]
        monkeypatch.setenv(dequant_cache.ENV, "1")
        got = []
        for i in range(3):
            dequant_cache.begin_step()
            got.append(step(i))
    for i, outs in enumerate(got):
        assert all(torch.equal(a, b) for a, b in zip(outs, want[i])), i
    s = dequant_cache.stats()
    # a step: the q/k/v block, o, o2 forward, then o2, o, the q/k/v block backward; the first step
    # dequantizes four times (the q/k/v block twice: o2 took its slot), the other two hit on every call
    assert s["hits"] + s["misses"] == 6 * 3 and s["misses"] == 4, s
    assert s["unused_prefetches"] == 0 and s["prefetch_hits"] >= 2 * 2, s


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["dequant", "cublas", "concat"])
@pytest.mark.parametrize("delay", ["side", "compute"])
def test_lora_paths_with_the_cache_under_delays_on_cuda(monkeypatch, fresh_cache, path, delay):
    """The LoRA blocks on the side stream, with the delays of ``test_the_streams_are_ordered_under_delays``
    (bf16, 3200-wide q/k/v at M = 2048): every step equals the cache-off step bit for bit."""
    step = _lora_chain(path, "cuda", torch.bfloat16, k=3200, m=2048)
    monkeypatch.setenv(dequant_cache.ENV, "0")
    want = [step(i) for i in range(4)]
    torch.cuda.synchronize()
    _delay(monkeypatch, delay)
    monkeypatch.setenv(dequant_cache.ENV, "1")
    got = []
    for i in range(4):
        dequant_cache.begin_step()
        got.append(step(i))
    torch.cuda.synchronize()
    for i, outs in enumerate(got):
        assert all(torch.equal(a, b) for a, b in zip(outs, want[i])), i
    assert dequant_cache.stats()["prefetch_hits"] >= 3 * 2


def test_training_steps_are_the_same_with_the_cache_and_learn_its_order(monkeypatch, fresh_cache, tmp_path):
    """Trainer.train_step marks each step: four steps of a tiny NF4 + LoRA model through the Triton
    kernels (interpreter) give the same losses bit for bit with the cache on and off, and from the second
    step on the projections' weights are dequantized ahead and used."""
    import copy
    import json

    from bezoar.model.config import LlamaConfig
    from bezoar.train.loop import LoopConfig, OptimConfig, Trainer
    from bezoar.train.sft import SFTStage
    from tests.model.qlora_helpers import packed_loader, qlora_model

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64)
    model = qlora_model(config, seed=0, targets=("q_proj",))

    def run(flag: str, out) -> list[float]:
        monkeypatch.setenv(dequant_cache.ENV, flag)
        loader = packed_loader(config.vocab_size, row_len=32, rows_per_batch=1, num_docs=12, seed=3)
        loop = LoopConfig(max_steps=4, precision="fp32", progress=False, log_every=1, seed=0)
        with backend("triton"):
            Trainer(copy.deepcopy(model), SFTStage(), loader, loop, OptimConfig(lr=2e-2, warmup_steps=1), out,
                    log=lambda *a: None).fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in records if "loss" in r]

    off = run("0", tmp_path / "off")
    assert dequant_cache.stats() == {}
    on = run("1", tmp_path / "on")
    assert on == off and len(on) == 4
    s = dequant_cache.stats()
    assert not dequant_cache._caches  # fit gave the buffers back; the counters were kept
    # q (its LoRA layer), k, v, o, gate, up, down in each of 2 layers forward, and backward but for the
    # first layer's q, k and v (the embeddings are frozen: no dx there, and q's dA and dB need no W):
    # 25 calls a step
    assert s["hits"] + s["misses"] == 25 * 4, s
    # the first step learns the order (every miss is in it); in the other three every call finds its
    # weight in a slot, nearly all of them dequantized ahead (the step's first too: past the end of an
    # order the next step's start is expected)
    assert s["misses"] <= 25 and s["hits"] >= 3 * 25 and s["prefetch_hits"] >= 3 * 20, s
    assert s["unused_prefetches"] == 0, s


def test_bench_cache_smoke():
    """bench/nf4.py --cache runs its sequences on CPU (interpreter, fp32; 3 weights against the 2 slots)
    and checks each variant's results against the cache-off sequence's before it times them."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    env.pop(dequant_cache.ENV, None)
    proc = subprocess.run([sys.executable, str(root / "bench" / "nf4.py"), "--smoke", "--cache"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = re.search(r"^96x128 M=40: calls 6, .*$", proc.stdout, re.M)
    assert line and "error" not in line.group(0), proc.stdout[-2000:]
    for label in ("dequant", "cache", "cache_high_priority", "cache_hits_only"):
        assert re.search(rf"\b{label}_over_cublas [0-9.]+", line.group(0)), label
    # from the second sequence on, every call with the schedule finds its weight in a slot
    assert "cache_hit_share 1," in line.group(0) and "cache_high_priority_hit_share 1," in line.group(0)
    # without it, only the calls that find their weight left in a slot: 4 of 6 (W1 and W2 from the
    # sequence before, W3 and W2 where the backward turns)
    assert "cache_hits_only_hit_share 0.6667," in line.group(0), line.group(0)
