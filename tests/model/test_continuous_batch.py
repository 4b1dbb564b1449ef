"""ContinuousBatch: sequences joining free rows between decode steps get the tokens they get decoded
alone; rows end on EOS, should_stop and max_new_tokens; bad calls are refused; CUDA graphs replay."""

from __future__ import annotations

import warnings

import pytest
import torch

from bezoar.model import Tokenizer, generate_ids, load
from bezoar.model.decode import ContinuousBatch, Sequence

PROMPTS = ["The small cat reads the", "What is 12 plus 7? The answer is", "Q:", "Once upon a time there was",
           "Health", "1. Emma reads a book and"]


def _alone(model, ids, n, eos_id=None, **kw):
    return generate_ids(model, torch.tensor([ids], device=model.device), max_new_tokens=n, eos_id=eos_id,
                        decode="eager", **kw)[0][0]


def _drive(batch: ContinuousBatch, seqs: list[Sequence], joins: dict[int, int]) -> None:
    """Admit ``seqs[i]`` at step ``joins[i]`` (or at the first step after with a free row), until all end."""
    pending = sorted(range(len(seqs)), key=lambda i: joins[i])
    step = 0
    while pending or batch.running:
        ready = [i for i in pending if joins[i] <= step][:batch.free]
        if ready:
            batch.admit([seqs[i] for i in ready])
            pending = [i for i in pending if i not in ready]
        batch.step()
        step += 1


@pytest.mark.parametrize("which", ["tiny", "tiny-odd"])
def test_rows_joining_at_any_step_decode_as_alone(which, tiny_dir, tiny_odd_dir):
    folder = tiny_dir if which == "tiny" else tiny_odd_dir
    model, tok = load(folder).eval(), Tokenizer(folder)
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    lengths = [20, 5, 31, 12, 1, 17]
    want = [_alone(model, p, n) for p, n in zip(prompts, lengths)]
    done = []
    seqs = [Sequence(p, n, on_done=done.append) for p, n in zip(prompts, lengths)]
    # 3 rows for 6 sequences; 8-slot buckets: the cache grows (and keeps the running rows) as longer ones join
    batch = ContinuousBatch(model, 3, decode="static", bucket=8)
    _drive(batch, seqs, {0: 0, 1: 0, 2: 2, 3: 3, 4: 3, 5: 9})
    assert [s.new_ids for s in seqs] == want
    assert [s.finish for s in seqs] == ["length"] * 6
    assert sorted(map(id, done)) == sorted(map(id, seqs)), "on_done once per sequence"
    assert batch.largest == 3 and not batch.running and batch.free == 3
    assert batch._storage[0].shape[2] >= max(len(p) + n for p, n in zip(prompts, lengths))


def test_the_cache_grows_with_the_rows_and_slots_in_use(tiny_dir):
    """One short request on a 32-row batch allocates one row of one bucket, not 32 rows at the longest
    context; rows and slots grow by a copy as more and longer sequences join, and every row decodes on."""
    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    batch = ContinuousBatch(model, 32, decode="static", bucket=16)
    seqs = [Sequence(prompts[0], 4), Sequence(prompts[1], 30), Sequence(prompts[2], 6), Sequence(prompts[3], 50),
            Sequence(prompts[5], 9)]

    def slots(upto):  # the longest need so far, in buckets of 16
        return -(-max(len(s.prompt_ids) + s.max_new_tokens for s in seqs[:upto]) // 16) * 16

    batch.admit(seqs[:1])
    assert tuple(batch._storage[0].shape[1:3]) == (1, slots(1)) and slots(1) < slots(3) < slots(5)
    batch.step()
    batch.admit(seqs[1:3])
    assert tuple(batch._storage[0].shape[1:3]) == (4, slots(3))
    batch.step()
    batch.admit(seqs[3:])
    assert tuple(batch._storage[0].shape[1:3]) == (8, slots(5))
    while batch.running:
        batch.step()
    assert [s.new_ids for s in seqs] == [_alone(model, s.prompt_ids, s.max_new_tokens) for s in seqs]


def test_eos_stop_and_length_end_rows(tiny_dir):
    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    eos_next = [1, 282, 295]  # [BOS, "on", "###"]: the tiny model (seed 0) follows it with EOS
    assert _alone(model, eos_next, 1) == [tok.eos_id], "the tiny model no longer follows EOS_NEXT with EOS"
    prompt = tok.encode("Once upon a time", bos=True)
    free = _alone(model, prompt, 12, eos_id=tok.eos_id)
    assert len(free) == 12
    stop_at = free[6]
    seqs = [Sequence(eos_next, 8), Sequence(prompt, 12, should_stop=lambda new: new[-1] == stop_at),
            Sequence(prompt, 1), Sequence(prompt, 12)]
    batch = ContinuousBatch(model, 4, decode="static", eos_id=tok.eos_id)
    batch.admit(seqs)
    assert seqs[0].finish == "eos" and seqs[0].new_ids == [], "an EOS first token ends the row at the prefill"
    assert seqs[2].finish == "length" and seqs[2].new_ids == free[:1]
    assert batch.free == 2
    while batch.running:
        batch.step()
    stopped = free.index(stop_at) + 1
    assert seqs[1].finish == "stop" and seqs[1].new_ids == free[:stopped]
    assert seqs[3].finish == "length" and seqs[3].new_ids == free


def test_a_failing_should_stop_ends_only_its_row(tiny_dir):
    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    prompt = tok.encode("Once upon a time", bos=True)

    def broken(new):
        if len(new) == 3:
            raise KeyError("broken")
        return False

    seqs = [Sequence(prompt, 8, should_stop=broken), Sequence(prompt, 8)]
    batch = ContinuousBatch(model, 2, decode="static")
    batch.admit(seqs)
    while batch.running:
        batch.step()
    assert seqs[0].finish == "error" and isinstance(seqs[0].error, KeyError) and len(seqs[0].new_ids) == 3
    assert seqs[1].finish == "length" and seqs[1].new_ids == _alone(model, prompt, 8)
    batch.release()
    assert batch._storage is None


def test_bad_calls_are_refused(tiny_dir):
    model = load(tiny_dir).eval()
    batch = ContinuousBatch(model, 2, decode="static")
    with pytest.raises(ValueError, match="3 sequences for 2 free rows"):
        batch.admit([Sequence([1, 5], 4) for _ in range(3)])
    with pytest.raises(ValueError, match="empty prompt"):
        batch.admit([Sequence([], 4)])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        batch.admit([Sequence([1, 5], 0)])
    with pytest.raises(ValueError, match="top_k"):
        batch.admit([Sequence([1, 5], 4, temperature=1.0, top_k=-1)])
    seq = Sequence([1, 5], 4)
    batch.admit([seq])
    with pytest.raises(ValueError, match="admitted once"):
        batch.admit([seq])
    with pytest.raises(RuntimeError, match="still running"):
        batch.release()
    with pytest.raises(ValueError, match="max_rows"):
        ContinuousBatch(model, 0)
    batch.fail(RuntimeError("gone"))
    assert seq.finish == "error" and str(seq.error) == "gone" and batch.free == 2


@pytest.mark.gpu
def test_graph_steps_give_the_static_steps_tokens_and_replay(tiny_odd_dir):
    """On CUDA each (rows, keys) step shape is captured once and replayed: the tokens equal static steps'
    (greedy and seeded sampling), rows joining at any step, and a second run captures nothing new."""
    model, tok = load(tiny_odd_dir, device="cuda", dtype=torch.float32).eval(), Tokenizer(tiny_odd_dir)
    prompts = [tok.encode(p, bos=True) for p in PROMPTS]
    lengths = [20, 5, 31, 12, 1, 17]
    joins = {0: 0, 1: 0, 2: 2, 3: 3, 4: 3, 5: 9}

    def run(batch):
        seqs = [Sequence(p, n, temperature=1.0 if i % 2 else 0.0,
                         generator=torch.Generator("cuda").manual_seed(i) if i % 2 else None)
                for i, (p, n) in enumerate(zip(prompts, lengths))]
        _drive(batch, seqs, joins)
        return [s.new_ids for s in seqs]

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        graph = ContinuousBatch(model, 4, decode="graph", bucket=8)
        want = run(ContinuousBatch(model, 4, decode="static", bucket=8))
        assert run(graph) == want  # captures; the cache grows on the way, which drops the graphs before
        assert run(graph) == want  # at full width: every shape is captured once more
        shapes = lambda: {(b, k): g for b, st in graph._states.items() for k, (g, _) in st.graphs.items()}  # noqa: E731
        captured = shapes()
        assert len(captured) >= 3, "several step shapes were captured"
        assert run(graph) == want
        assert shapes() == captured, "the third run must replay"
    failed = [str(w.message) for w in record if "CUDA graph capture" in str(w.message)]
    assert not failed, failed
    greedy = [_alone(model, p, n) for i, (p, n) in enumerate(zip(prompts, lengths)) if i % 2 == 0]
    assert want[0::2] == greedy


def test_a_failed_step_ends_the_rows_and_a_failing_on_done_is_raised_without_ending_others(tiny_dir, monkeypatch):
    """A model failure in a step ends every running row with it (finish "error", on_done told) and the step
    does not raise; an on_done that raises is raised from the step, its row ended, the other rows untouched."""
    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    prompt = tok.encode("Once upon a time", bos=True)
    told = []
    batch = ContinuousBatch(model, 2, decode="static")
    seqs = [Sequence(prompt, 8, on_done=told.append), Sequence(prompt, 8, on_done=told.append)]
    batch.admit(seqs)

    def broken(self, running):
        raise RuntimeError("device lost")

    with monkeypatch.context() as m:
        m.setattr(ContinuousBatch, "_decode", broken)
        batch.step()
    assert [s.finish for s in seqs] == ["error", "error"] and str(seqs[0].error) == "device lost"
    assert told == seqs and not batch.running and batch.free == 2

    def on_done(seq):
        raise ValueError("caller's bug")

    short, long = Sequence(prompt, 2, on_done=on_done), Sequence(prompt, 6)
    batch.admit([short, long])
    with pytest.raises(ValueError, match="caller's bug"):
        while short.finish is None:
            batch.step()
    assert short.finish == "length" and long.finish is None and batch.running == [long]
    while batch.running:
        batch.step()
    assert long.new_ids == _alone(model, prompt, 6)


def test_a_draw_that_fails_in_a_step_ends_its_row(tiny_dir, monkeypatch):
    """A sampled row whose draw failed at a step kept its row and was launched again forever (it was left out
    of the step's record): it now ends with the error, on_done told, and the greedy row beside it decodes on."""
    import bezoar.model.decode as decode_module

    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    prompt = tok.encode("Once upon a time", bos=True)
    sample_next, calls = decode_module.sample_next, []

    def failing(logits, temperature, *args, **kwargs):
        calls.append(temperature)
        if len(calls) == 3:
            raise RuntimeError("probability tensor contains nan")
        return sample_next(logits, temperature, *args, **kwargs)

    monkeypatch.setattr(decode_module, "sample_next", failing)
    told = []
    sampled = Sequence(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0), on_done=told.append)
    greedy = Sequence(prompt, 10, on_done=told.append)
    batch = ContinuousBatch(model, 2, decode="static")
    batch.admit([sampled, greedy])
    for _ in range(20):
        if not batch.running:
            break
        batch.step()
    assert sampled.finish == "error" and "nan" in str(sampled.error) and len(sampled.new_ids) == 2
    assert greedy.finish == "length" and greedy.new_ids == _alone(model, prompt, 10)
    assert told == [sampled, greedy] and not batch.running and batch.free == 2


def test_a_device_that_fails_again_while_rows_are_reset_still_tells_every_row(tiny_dir, monkeypatch):
    """After a failed step a broken device fails the rows' reset too: every running sequence is still told
    (on_done with the step's error) before the reset's error is raised; none is left hanging."""
    model, tok = load(tiny_dir).eval(), Tokenizer(tiny_dir)
    prompt = tok.encode("Once upon a time", bos=True)
    told = []
    batch = ContinuousBatch(model, 4, decode="static")
    seqs = [Sequence(prompt, 8, on_done=told.append) for _ in range(3)]
    batch.admit(seqs)

    class Broken:
        def __setitem__(self, key, value):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def broken_step(self, running):
        self._tensors.slot = Broken()  # every later write to the device fails
        raise RuntimeError("CUDA error: an illegal memory access was encountered (the step)")

    monkeypatch.setattr(ContinuousBatch, "_decode", broken_step)
    with pytest.raises(RuntimeError, match="illegal memory access was encountered$"):
        batch.step()
    assert told == seqs and all(s.finish == "error" and "(the step)" in str(s.error) for s in seqs)
    assert not batch.running and batch.free == 4
