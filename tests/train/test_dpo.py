"""DPO: loss and gradients against the textbook implementation, the reference pass, packing, chunking."""

from __future__ import annotations

import pytest
import torch

from bezoar.config import ConfigError, from_dict
from bezoar.data import DOC_EXAMPLE, DOC_PART, make_loader
from bezoar.model import Tokenizer, load
from bezoar.train.config import DPOSection, StageConfig
from bezoar.train.dpo import DPOStage, preference_loss, response_logprobs, sequence_logprobs
from bezoar_kernels.cross_entropy import linear_token_logprobs_reference
from tests.train.dpo_helpers import (direct_dpo, direct_sequence_logps, documents, lora_grads, one_batch, policy,
                                     single_thread, textbook_loss, write_pairs, zero_grads)
from tests.utils import assert_close

assert single_thread  # an autouse fixture: every test here runs torch on one thread

LOSS_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, tokenizer):
    path = write_pairs(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", 7)
    return documents(path, tokenizer)


@pytest.fixture(scope="module")
def reference_model(tiny_dir):
    return load(tiny_dir, device="cpu")  # no adapter at all


@pytest.mark.parametrize("kind,eps", LOSS_CASES)
def test_loss_and_grads_match_direct_implementation(tiny_dir, tokenizer, pairs, reference_model, kind, eps):
    docs, cfg = pairs
    beta = 0.1  # the default; IPO's target 1/(2 beta) = 5 keeps its factor (h - 5) well conditioned
    model = policy(tiny_dir)
    stage = DPOStage(DPOSection(beta=beta, loss=kind, label_smoothing=eps))
    batch = one_batch(docs, cfg, tokenizer, rows=8)
    loss, metrics = stage.loss(model, batch)
    loss.backward()
    grads = lora_grads(model)
    zero_grads(model)

    want, (pc, pr, rc, rr) = direct_dpo(model, reference_model, docs, beta, kind, eps)
    want.backward()
    want_grads = lora_grads(model)
    assert stage.units(batch) == docs.num_items == 7
    assert_close(loss, want, 1e-5, 1e-5, f"{kind} loss")
    for name, g in grads.items():
        # 1e-5 relative to the gradient's scale: the fp32 sums of a sequence's token log-probs are
        # accumulated in another order on each side (IPO's gradients are O(1) per element)
        scale = max(1.0, float(want_grads[name].abs().max()))
        assert_close(g, want_grads[name], 1e-5 * scale, 1e-5, f"{kind} grad {name}")
    assert any(g.abs().max() > 1e-3 for g in grads.values()), "gradients are all ~0: the test would prove nothing"
    # metrics are sums over the batch's pairs
    rewards_c, rewards_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    assert metrics["rewards/chosen"] == pytest.approx(float(rewards_c.sum()), abs=1e-4)
    assert metrics["rewards/rejected"] == pytest.approx(float(rewards_r.sum()), abs=1e-4)
    assert metrics["rewards/margins"] == pytest.approx(float((rewards_c - rewards_r).sum()), abs=1e-4)
    assert metrics["rewards/accuracies"] == float((rewards_c > rewards_r).sum())
    assert metrics["logps/chosen"] == pytest.approx(float(pc.detach().sum()), rel=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(float(pr.detach().sum()), rel=1e-5)


@pytest.mark.parametrize("kind,eps", LOSS_CASES)
def test_preference_loss_formulas(kind, eps):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (-30 * torch.rand(9, generator=g, dtype=torch.float64) for _ in range(4))
    losses, rew_c, rew_r = preference_loss(pc, pr, rc, rr, beta=0.3, loss=kind, label_smoothing=eps)
    assert_close(losses, textbook_loss(pc, pr, rc, rr, 0.3, kind, eps), 1e-12, 1e-12, kind)
    assert_close(rew_c, 0.3 * (pc - rc), 1e-12, 1e-12, "chosen rewards")
    assert_close(rew_r, 0.3 * (pr - rr), 1e-12, 1e-12, "rejected rewards")


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_reference_logps_equal_model_without_adapter(tiny_dir, tokenizer, pairs, reference_model, quant):
    docs, cfg = pairs
    model = policy(tiny_dir, quant=quant)
    batch = one_batch(docs, cfg, tokenizer, rows=8)
    got = DPOStage().reference_logps(model, batch)
    table = batch["doc_table"]
    order = [int(i) for i in _doc_indices(docs, table)]
    bare = reference_model if quant is None else load(tiny_dir, device="cpu", quant=quant)  # no adapter at all
    want = direct_sequence_logps(bare, docs, order)
    assert_close(got, want.detach(), 1e-5, 1e-5, "reference log-probs")
    assert not got.requires_grad
    # and the adapters are back on afterwards: the policy differs from the reference
    with torch.no_grad():
        policy_logps = sequence_logprobs(model, batch)
    assert (policy_logps - got).abs().max() > 1e-3


def _doc_indices(docs, table):
    lookup = {(int(docs.doc_example[d]), int(docs.doc_part[d])): d for d in range(docs.num_docs)}
    return [lookup[(int(r[DOC_EXAMPLE]), int(r[DOC_PART]))] for r in table]


def test_packed_and_unpacked_give_the_same_loss(tiny_dir, tokenizer, tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", 9, seed=5)
    stage = DPOStage(DPOSection(beta=0.2))
    results = {}
    for packed in (True, False):
        docs, cfg = documents(path, tokenizer, packed=packed)
        model = policy(tiny_dir)
        loader = make_loader(docs, cfg, tokenizer, batch_size=4, shuffle=False)
        total, sums, units = 0.0, {}, 0.0
        for batch in loader:  # several batches: the loss is summed over them, like micro-batches
            loss, metrics = stage.loss(model, batch)
            loss.backward()
            total += float(loss.detach())
            units += stage.units(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        results[packed] = (total, sums, units, lora_grads(model), len(loader))
    (lp, mp, up, gp, _), (lu, mu, uu, gu, _) = results[True], results[False]
    assert up == uu == 9
    assert lp == pytest.approx(lu, rel=1e-5, abs=1e-6)
    for k in mp:
        assert mp[k] == pytest.approx(mu[k], rel=1e-5, abs=1e-4), k
    for name in gp:
        assert_close(gp[name], gu[name], 1e-5, 1e-5, f"grad {name}")


@pytest.mark.parametrize("n_tokens,chunk", [(37, 5), (61, 64), (17, 1)])
def test_chunked_response_logprobs_match_whole(n_tokens, chunk):
    g = torch.Generator().manual_seed(n_tokens)
    hidden = torch.randn(n_tokens, 24, generator=g, requires_grad=True)
    weight = torch.randn(53, 24, generator=g, requires_grad=True)
    targets = torch.randint(0, 53, (n_tokens,), generator=g)
    upstream = torch.randn(n_tokens, generator=g)
    got = response_logprobs(hidden, weight, targets, chunk_tokens=chunk)
    (got * upstream).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = linear_token_logprobs_reference(hidden, weight, targets)
    (want * upstream).sum().backward()
    assert_close(got, want, 1e-5, 1e-5, "log-probs")
    assert_close(gh, hidden.grad, 1e-5, 1e-5, "d hidden")
    assert_close(gw, weight.grad, 1e-5, 1e-5, "d weight")


def test_chunked_stage_equals_unchunked(tiny_dir, tokenizer, pairs):
    docs, cfg = pairs
    batch = one_batch(docs, cfg, tokenizer, rows=8)
    out = []
    for chunk in (None, 7):
        model = policy(tiny_dir)
        stage = DPOStage(DPOSection())
        stage.logits_chunk_tokens = chunk
        loss, _ = stage.loss(model, batch)
        loss.backward()
        out.append((loss.detach(), lora_grads(model)))
    assert_close(out[1][0], out[0][0], 1e-6, 1e-6, "loss")
    for name in out[0][1]:
        assert_close(out[1][1][name], out[0][1][name], 1e-6, 1e-6, name)


def test_a_batch_that_is_not_pairs_is_refused(tiny_dir, tokenizer, pairs):
    docs, cfg = pairs
    batch = one_batch(docs, cfg, tokenizer, rows=8)
    batch["doc_table"] = batch["doc_table"].clone()
    batch["doc_table"][0, DOC_PART], batch["doc_table"][1, DOC_PART] = 1, 0  # rejected listed first
    with pytest.raises(ValueError, match="side by side"):
        DPOStage().loss(policy(tiny_dir), batch)
    odd = dict(batch, doc_table=batch["doc_table"][:3])
    with pytest.raises(ValueError, match="pairs of documents"):
        DPOStage().loss(policy(tiny_dir), odd)


def test_padding_only_batch_gives_zero_loss_with_a_graph(tiny_dir):
    model = policy(tiny_dir)
    batch = {"input_ids": torch.zeros(1, 16, dtype=torch.long), "labels": torch.full((1, 16), -100),
             "position_ids": torch.zeros(1, 16, dtype=torch.long), "doc_ids": torch.full((1, 16), -1),
             "doc_table": torch.zeros(0, 6, dtype=torch.long), "num_tokens": 0}
    stage = DPOStage()
    loss, metrics = stage.loss(model, batch)
    assert stage.units(batch) == 0 and float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert all(v == 0 for v in metrics.values())


@pytest.mark.parametrize("overrides,match", [
    (["dpo.beta=0"], "beta must be positive"),
    (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "applies to the sigmoid and robust"),
    (["dpo.loss=robust", "dpo.label_smoothing=0.5"], r"\[0, 0.5\)"),
    (["dpo.label_smoothing=1.0"], r"\[0, 0.5\)"),
    (["dpo.label_smoothing=0.5"], r"\[0, 0.5\) for the sigmoid loss .*would train away from the chosen"),
    (["dpo.loss=kto"], "dpo.loss"),
])
def test_bad_dpo_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(StageConfig, {"stage": "dpo"}, overrides=overrides)


def test_precompute_needs_its_inputs():
    with pytest.raises(ValueError, match="docs"):
        DPOStage(DPOSection(precompute_ref=True))
