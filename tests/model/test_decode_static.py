"""Static decode steps (one shape per step, the position on the device) and their CUDA graphs give the
tokens of the eager decode loop."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from bezoar.model import Tokenizer, generate_ids, load
from bezoar.model.decode import (KEY_BUCKET, Decoder, StaticKVCache, _fingerprint, _TokenQueue,
                                 resolve_decode_mode)
from bezoar.model.lora import LoraConfig, adapters_disabled, apply_lora
from bezoar_kernels.rope import rope_inv_freq

PROMPTS = ["The small cat reads the", "What is 12 plus 7? The answer is", "Q:"]


def _batch(folder):
    tok = Tokenizer(folder)
    return tok.batch(PROMPTS, bos=True, padding_side="left")


def _eager(model, ids, mask, **kw):
    return generate_ids(model, ids, mask, decode="eager", **kw)


@pytest.mark.parametrize("which", ["tiny", "tiny-odd"])
@pytest.mark.parametrize("bucket", [4, KEY_BUCKET])
def test_static_greedy_equals_eager(which, bucket, tiny_dir, tiny_odd_dir):
    folder = tiny_dir if which == "tiny" else tiny_odd_dir
    model = load(folder).eval()
    ids, mask = _batch(folder)
    assert int(mask.sum()) < mask.numel(), "the batch must have left padding"
    want = _eager(model, ids, mask, max_new_tokens=14)
    got = Decoder(model, "static", bucket=bucket).generate_ids(ids, mask, max_new_tokens=14)
    assert got == want
    assert all(len(row) == 14 for row in got[0]) and got[1] == ["length"] * 3


def test_triton_decode_attention_gives_the_same_tokens(tiny_odd_dir, monkeypatch):
    """BEZOAR_DECODE_ATTENTION=triton: the eager loop and static steps (left padding, GQA, head_dim 10)
    run the decode kernel for every one-token step and give SDPA's tokens."""
    import bezoar.model.llama as llama

    model = load(tiny_odd_dir).eval()
    ids, mask = _batch(tiny_odd_dir)
    want = _eager(model, ids, mask, max_new_tokens=6)
    calls = []
    monkeypatch.setattr(llama, "decode_attention", lambda *a, _f=llama.decode_attention: calls.append(1) or _f(*a))
    monkeypatch.setenv("BEZOAR_DECODE_ATTENTION", "triton")
    from bezoar_kernels.dispatch import backend

    with backend("triton"):
        assert _eager(model, ids, mask, max_new_tokens=6) == want
        eager_calls = len(calls)
        assert Decoder(model, "static", bucket=4).generate_ids(ids, mask, max_new_tokens=6) == want
    layers = model.config.num_hidden_layers
    assert eager_calls == 5 * layers and len(calls) == 10 * layers  # the prefill is not a one-token step


def test_static_sampling_equals_eager_with_the_same_seed(tiny_dir):
    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    want = _eager(model, ids, mask, max_new_tokens=12, temperature=1.0, top_p=0.9,
                  generator=torch.Generator().manual_seed(5))
    got = generate_ids(model, ids, mask, max_new_tokens=12, temperature=1.0, top_p=0.9,
                       generator=torch.Generator().manual_seed(5), decode="static")
    assert got == want
    greedy = _eager(model, ids, mask, max_new_tokens=12)
    assert got[0] != greedy[0], "sampling at temperature 1 should leave the greedy path"


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_top_k_reaches_the_decode_loop(decode, tiny_dir, monkeypatch):
    """Every draw of the eager loop and of the static steps gets top_k, and draws among the k largest logits."""
    import bezoar.model.decode as decode_module

    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    greedy = _eager(model, ids, mask, max_new_tokens=10)
    # top_k=1 at temperature 1 is greedy, where plain sampling leaves the greedy path
    one = generate_ids(model, ids, mask, max_new_tokens=10, temperature=1.0, top_k=1,
                       generator=torch.Generator().manual_seed(5), decode=decode)
    assert one == greedy
    assert generate_ids(model, ids, mask, max_new_tokens=10, temperature=1.0,
                        generator=torch.Generator().manual_seed(5), decode=decode)[0] != greedy[0]
    calls = []
    real = decode_module.sample_next

    def recording(logits, temperature, top_p, generator=None, top_k=0):
        out = real(logits, temperature, top_p, generator, top_k)
        allowed = logits.topk(3, dim=-1).values[:, -1:]
        calls.append((top_k, bool((logits.gather(1, out[:, None]) >= allowed).all())))
        return out

    monkeypatch.setattr(decode_module, "sample_next", recording)
    got = generate_ids(model, ids, mask, max_new_tokens=10, temperature=2.0, top_p=0.95, top_k=3,
                       generator=torch.Generator().manual_seed(5), decode=decode)
    assert len(calls) == 10 and all(k == 3 and inside for k, inside in calls)
    monkeypatch.setattr(decode_module, "sample_next", real)
    other = "static" if decode == "eager" else "eager"
    assert got == generate_ids(model, ids, mask, max_new_tokens=10, temperature=2.0, top_p=0.95, top_k=3,
                               generator=torch.Generator().manual_seed(5), decode=other)


def test_static_stops_rows_like_eager(tiny_dir):
    """EOS and should_stop end rows at the same token, although the host reads tokens one step late."""
    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    free, _ = _eager(model, ids, mask, max_new_tokens=10)
    eos = free[0][4]  # row 0 stops at its fifth token; the others whenever they meet it

    def runs(decode):
        seen = []

        def stop(row, new):
            seen.append((row, list(new)))
            return row == 2 and len(new) == 3

        done = []  # on_done: each row that ends early, once, with its final tokens, as it ends
        out = generate_ids(model, ids, mask, max_new_tokens=10, eos_id=eos, should_stop=stop, decode=decode,
                           on_done=lambda row, new, why: done.append((row, list(new), why, len(seen))))
        return out, seen, done

    (want, want_reasons), want_seen, want_done = runs("eager")
    (got, got_reasons), got_seen, got_done = runs("static")
    assert got == want and got_reasons == want_reasons and got_seen == want_seen and got_done == want_done
    assert got_reasons[0] == "stop" and len(got[0]) == free[0].index(eos)
    assert got_reasons[2] == "stop" and len(got[2]) == 3
    ended = {row: (new, why) for row, new, why, _ in got_done}
    assert len(ended) == len(got_done)  # once each
    assert ended[0] == (got[0], "eos") and ended[2] == (got[2], "stop")
    assert set(ended) == {r for r, reason in enumerate(got_reasons) if reason == "stop"}
    # row 2 was reported at its third token, before the rows still running had drawn theirs
    assert next(n for row, _, _, n in got_done if row == 2) < len(got_seen)


def test_decode_step_logits_equal_the_forward(tiny_odd_dir):
    """Step by step: decode_step's logits over the padded, masked cache equal a full forward's."""
    model = load(tiny_odd_dir).eval()
    ids, mask = _batch(tiny_odd_dir)
    B, T = ids.shape
    cache = StaticKVCache(model.config, B, T + 8, model.dtype, model.device)
    inv_freq = rope_inv_freq(model.config.head_dim, model.config.rope_theta)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, cache=cache)[:, -1]
        cache.key_valid[:, :T] = mask.bool()
        cache.slot.fill_(T)
        cache.stepping = True
        positions = mask.sum(1, keepdim=True)
        seq, full_mask = ids, mask
        for step in range(5):
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)], 1)
            cache.num_keys = T + 8 if step % 2 else T + step + 1  # padded to the end, or exactly the keys
            logits = model.decode_step(nxt, positions, cache, inv_freq)
            cache.slot += 1
            positions += 1
            want = model(seq, attention_mask=full_mask)[:, -1]
            torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


def test_qlora_static_equals_eager():
    """NF4 layers with LoRA adapters through the Triton kernels (interpreter on CPU), adapters on and off."""
    from bezoar.model.config import LlamaConfig
    from bezoar_kernels import lora as lora_kernels
    from bezoar_kernels.dispatch import backend

    from .qlora_helpers import qlora_model

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = qlora_model(config, targets=("q_proj", "k_proj", "v_proj", "down_proj")).eval()
    ids = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    dec = Decoder(model, "static", bucket=4)
    calls = []
    real = lora_kernels.lora_qkv_triton

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with backend("triton"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_kernels, "lora_qkv_triton", counting)
        on = dec.generate_ids(ids, mask, max_new_tokens=6)
        assert calls, "the fused q/k/v kernel must have run"
        assert on == _eager(model, ids, mask, max_new_tokens=6)
        with adapters_disabled(model):
            off = dec.generate_ids(ids, mask, max_new_tokens=6)
            assert off == _eager(model, ids, mask, max_new_tokens=6)
    assert off != on, "the adapters must change the tokens for this check to mean anything"


@pytest.mark.parametrize("sampling,top_k", [(False, 0), (True, 0), (True, 5)])
def test_padded_batch_gives_each_row_its_own_tokens(sampling, top_k, tiny_odd_dir):
    """3 rows decoded as 4: the real rows' tokens, and (sampling) the generator's draws, equal eager's."""
    model = load(tiny_odd_dir).eval()
    ids, mask = _batch(tiny_odd_dir)
    kw = dict(max_new_tokens=9, temperature=1.0, top_p=0.9, top_k=top_k) if sampling else dict(max_new_tokens=9)

    def gen(seed=3):
        return torch.Generator().manual_seed(seed)

    dec = Decoder(model, "static", bucket=8, pad_batch=32)
    g_static, g_eager = gen(), gen()
    got = dec.generate_ids(ids, mask, generator=g_static, **kw)
    assert set(dec._states) == {4} and len(got[0]) == 3
    assert got == _eager(model, ids, mask, generator=g_eager, **kw)
    assert torch.equal(g_static.get_state(), g_eager.get_state()), "the same draws, no more"
    two = dec.generate_ids(ids[:2], mask[:2], generator=gen(), **kw)
    assert two == _eager(model, ids[:2], mask[:2], generator=gen(), **kw)
    assert set(dec._states) == {2, 4}, "sizes that fit the storage keep their own state"
    capped = Decoder(model, "static", pad_batch=3)  # 3 rows stay 3: the padding never passes pad_batch
    capped.generate_ids(ids, mask, max_new_tokens=2)
    assert set(capped._states) == {3}


def test_decoder_shares_one_storage_between_batch_sizes(tiny_dir):
    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    T = ids.shape[1]
    dec = Decoder(model, "static", bucket=16)
    first = dec.generate_ids(ids, mask, max_new_tokens=4)
    storage, state = dec._storage, dec._states[3]
    assert storage[0].shape[1:3] == (3, -(-(T + 4) // 16) * 16)
    assert dec.generate_ids(ids, mask, max_new_tokens=4) == first and dec._states[3] is state
    one = dec.generate_ids(ids[:1], mask[:1], max_new_tokens=4)
    assert dec._storage is storage and set(dec._states) == {1, 3}, "a smaller batch uses the same storage"
    assert dec._states[1].cache.k.data_ptr() == storage[0].data_ptr()
    assert dec.generate_ids(ids, mask, max_new_tokens=4) == first, "batch 1 left batch 3's rows usable"
    assert one[0][0] == first[0][0]
    capacity = storage[0].shape[2]
    dec.generate_ids(ids[:1], mask[:1], max_new_tokens=capacity)  # does not fit: new storage, old states go
    assert dec._storage is not storage and set(dec._states) == {1}
    assert dec._storage[0].shape[1:3] == (1, -(-(T + capacity) // 16) * 16)
    dec.release()
    assert dec._storage is None and not dec._states
    with pytest.raises(ValueError, match="another model"):
        generate_ids(load(tiny_dir), ids, mask, decoder=dec)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("sampling", [False, True])
def test_short_generations_and_rows_that_end_at_once(steps, sampling, tiny_dir):
    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    kw = dict(temperature=1.0, top_p=0.9) if sampling else {}
    first = _eager(model, ids, mask, max_new_tokens=1, generator=torch.Generator().manual_seed(1), **kw)[0]
    for eos in (None, first[0][0]):  # with eos = row 0's first token, at least that row ends at once
        want = _eager(model, ids, mask, max_new_tokens=steps, eos_id=eos,
                      generator=torch.Generator().manual_seed(1), **kw)
        got = generate_ids(model, ids, mask, max_new_tokens=steps, eos_id=eos, decode="static",
                           generator=torch.Generator().manual_seed(1), **kw)
        assert got == want
    one = ids[:1], mask[:1]
    greedy_first = _eager(model, *one, max_new_tokens=1)[0][0][0]
    assert generate_ids(model, *one, max_new_tokens=steps, eos_id=greedy_first, decode="static") == ([[]], ["stop"])


def test_zero_new_tokens(tiny_dir):
    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    for decode in ("eager", "static"):
        assert generate_ids(model, ids, mask, max_new_tokens=0, decode=decode) == ([[], [], []], ["length"] * 3)


def test_decode_mode_resolution(tiny_dir, monkeypatch):
    model = load(tiny_dir).eval()
    monkeypatch.delenv("BEZOAR_DECODE", raising=False)
    assert resolve_decode_mode("auto", model) == "eager"  # a CPU model
    assert resolve_decode_mode("static", model) == "static"
    with pytest.raises(ValueError, match="decode=graph needs a model on a CUDA device"):
        resolve_decode_mode("graph", model)
    with pytest.raises(ValueError, match="decode='fast'"):
        resolve_decode_mode("fast", model)
    monkeypatch.setenv("BEZOAR_DECODE", "static")
    assert resolve_decode_mode(None, model) == "static"
    assert resolve_decode_mode("eager", model) == "eager"  # an explicit choice wins over the environment
    monkeypatch.setenv("BEZOAR_DECODE", "turbo")
    with pytest.raises(ValueError, match="BEZOAR_DECODE='turbo'"):
        resolve_decode_mode("auto", model)
    with pytest.raises(ValueError, match="bucket"):
        Decoder(model, bucket=0)


def test_fingerprint_sees_adapter_switches_weights_and_settings(tiny_dir, monkeypatch):
    model = load(tiny_dir).eval()
    apply_lora(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]))
    base = _fingerprint(model)
    assert _fingerprint(model) == base
    with adapters_disabled(model):
        assert _fingerprint(model) != base
    assert _fingerprint(model) == base
    monkeypatch.setenv("BEZOAR_NF4_GEMV_MAX_M", "8")
    assert _fingerprint(model) != base
    monkeypatch.delenv("BEZOAR_NF4_GEMV_MAX_M")
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    assert _fingerprint(model) != base
    model.train()
    assert _fingerprint(model) != _fingerprint(model.eval())


def test_fingerprint_sees_the_tuning_in_effect(tiny_dir, tmp_path, monkeypatch):
    """A tuning file rewritten and read again (same BEZOAR_TUNING) drops the captured graphs too."""
    from bezoar_kernels import tuning

    model = load(tiny_dir).eval()
    path = tmp_path / "tuning.json"

    def tuned(gemv_max_m):
        path.write_text(json.dumps({"format": 1, "devices": {"cpu": {"settings": {"nf4.gemv_max_m": gemv_max_m}}}}))
        tuning.reload()
        return _fingerprint(model)

    monkeypatch.setenv("BEZOAR_TUNING", str(path))
    try:
        first = tuned(4)
        assert tuned(4) == first and tuned(8) != first
    finally:
        monkeypatch.delenv("BEZOAR_TUNING")
        tuning.reload()


def test_token_queue_on_cpu_is_first_in_first_out():
    q = _TokenQueue(2, torch.device("cpu"))
    q.push(torch.tensor([[1], [2]]))
    q.push(torch.tensor([3, 4]))
    assert q.pop() == [1, 2] and q.pop() == [3, 4]


# ---- on a GPU: the captured graphs ----------------------------------------------------------------


def _cuda_model(folder, dtype):
    return load(folder, device="cuda", dtype=dtype).eval()


def _no_capture_failure(record):
    failed = [str(w.message) for w in record if "CUDA graph capture" in str(w.message)]
    assert not failed, failed


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["tiny", "tiny-odd"])
def test_graph_equals_eager_on_gpu(which, tiny_dir, tiny_odd_dir):
    folder = tiny_dir if which == "tiny" else tiny_odd_dir
    model = _cuda_model(folder, torch.float32)
    ids, mask = _batch(folder)
    assert resolve_decode_mode("auto", model) == "graph"
    dec = Decoder(model, "graph", bucket=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        want = _eager(model, ids, mask, max_new_tokens=20)
        assert dec.generate_ids(ids, mask, max_new_tokens=20) == want
        graphs = {k: g for k, (g, _) in dec._states[3].graphs.items()}
        assert len(graphs) >= 2, "20 steps over buckets of 8 keys take several graphs"
        assert dec.generate_ids(ids, mask, max_new_tokens=20) == want
        assert {k: g for k, (g, _) in dec._states[3].graphs.items()} == graphs, "the second call must replay"
        # sampling and greedy interleaved, twice: each replays its own graphs
        for _ in range(2):
            got = dec.generate_ids(ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.9,
                                   generator=torch.Generator("cuda").manual_seed(2))
            assert got == _eager(model, ids, mask, max_new_tokens=20, temperature=1.0, top_p=0.9,
                                 generator=torch.Generator("cuda").manual_seed(2))
            assert dec.generate_ids(ids, mask, max_new_tokens=20) == want
        # a shorter prompt starts in another bucket; another batch size takes a new cache
        short, short_mask = ids[:, -3:], mask[:, -3:]
        assert dec.generate_ids(short, short_mask, max_new_tokens=12) == _eager(model, short, short_mask,
                                                                               max_new_tokens=12)
        assert dec.generate_ids(ids[1:], mask[1:], max_new_tokens=12) == _eager(model, ids[1:], mask[1:],
                                                                               max_new_tokens=12)
        assert set(dec._states) == {2, 3}
    _no_capture_failure(record)
    # one-off calls capture only when enough steps replay; autocast never captures
    assert Decoder(model, "auto", graph_min_tokens=32).resolve(8) == "static"
    assert Decoder(model, "auto", graph_min_tokens=32).resolve(32) == "graph"
    assert Decoder(model, "graph", graph_min_tokens=32).resolve(8) == "graph"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert Decoder(model).resolve(64) == "static"


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_graph_equals_static_bitwise_in_bf16_with_nf4_and_lora(attention, monkeypatch):
    """A replay runs the very kernels of the eager static step, so bf16 tokens agree exactly; switching
    the adapters off between calls must recapture, not replay the adapters' graph. Also with the Triton
    decode-attention kernel (BEZOAR_DECODE_ATTENTION=triton), which must capture like SDPA."""
    from bezoar.model.config import LlamaConfig

    monkeypatch.setenv("BEZOAR_DECODE_ATTENTION", attention)

    from .qlora_helpers import qlora_model

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = qlora_model(config, dtype=torch.bfloat16).to("cuda").eval()
    ids = torch.randint(3, 256, (4, 9), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    graph, static = Decoder(model, "graph", bucket=16), Decoder(model, "static", bucket=16)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        on = graph.generate_ids(ids, mask, max_new_tokens=24)
        assert on == static.generate_ids(ids, mask, max_new_tokens=24)
        with adapters_disabled(model):
            off = graph.generate_ids(ids, mask, max_new_tokens=24)
            assert off == static.generate_ids(ids, mask, max_new_tokens=24)
        assert graph.generate_ids(ids, mask, max_new_tokens=24) == on
    _no_capture_failure(record)
    assert graph._states[4].graphs, "graphs were captured"
    assert off != on


@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_static_steps(tiny_dir, monkeypatch):
    model = _cuda_model(tiny_dir, torch.float32)
    ids, mask = _batch(tiny_dir)
    want = _eager(model, ids, mask, max_new_tokens=10)

    def broken(*args, **kwargs):
        raise RuntimeError("capture refused (test)")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    dec = Decoder(model, "graph", bucket=8)
    with pytest.warns(RuntimeWarning, match="capture refused"):
        assert dec.generate_ids(ids, mask, max_new_tokens=10) == want
    assert dec.resolve(10) == "static" and not any(st.graphs for st in dec._states.values())
    assert dec.generate_ids(ids, mask, max_new_tokens=10) == want


def test_prefills_run_the_lm_head_at_the_last_position_only(tiny_dir):
    """Every prefill (the eager loop's, the static decoder's, ContinuousBatch's) applies the LM head to
    each row's last hidden state alone, (B, C), never to (B, T, C); its logits are the full forward's
    last position's."""
    from bezoar.model.decode import ContinuousBatch, KVCache, Sequence, last_logits

    model = load(tiny_dir).eval()
    ids, mask = _batch(tiny_dir)
    with torch.no_grad():
        want = model(ids, attention_mask=mask)[:, -1]
        cache = KVCache(model.config, ids.shape[0], ids.shape[1], model.dtype, ids.device)
        got = last_logits(model, ids, mask, cache)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(args[0].shape)))
    try:
        _eager(model, ids, mask, max_new_tokens=3)
        Decoder(model, "static").generate_ids(ids, mask, max_new_tokens=3)
        batch = ContinuousBatch(model, 4, decode="static")
        batch.admit([Sequence(row[m.bool()].tolist(), 3) for row, m in zip(ids, mask)])
    finally:
        hook.remove()
    C = model.config.hidden_size
    assert shapes and all(s in ((ids.shape[0], C), (ids.shape[0], 1, C)) for s in shapes), shapes
    assert (ids.shape[0], C) in shapes  # the prefills
