"""The ``bezoar`` lm-eval model: request-level exactness, batching, and the acceptance check that it
gives the same metrics as lm-eval's ``hf`` model and as ``local-completions`` against bezoar.serve."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from bezoar.eval import harness  # noqa: E402  (registers "bezoar")
from tests.eval.local_tasks import GEN_PROMPTS, write_tasks  # noqa: E402

MAX_LENGTH = 64  # small, so the perplexity texts span several rolling windows


def make_lm(tiny_model, tiny_tokenizer, **kwargs):
    return harness.BezoarLM(model=tiny_model, tokenizer=tiny_tokenizer, **kwargs)


def instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def reference_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log P(ids[j] | ids[:j]) for j >= start, from one plain forward, and the greedy flag."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
    targets = torch.tensor(ids[start:])
    lp = logits[start - 1:].gather(1, targets[:, None]).squeeze(1)
    return float(lp.sum()), bool((logits[start - 1:].argmax(-1) == targets).all())


PAIRS = [
    ("Question: What color is the small cat?\nAnswer:", " red"),
    ("Question: What color is the small cat?\nAnswer:", " the golden one"),
    ("Question: What color is the small cat?\nAnswer:", " blue"),
    ("The bright eagle watches the", " green mountain near the window."),
    ("What is 7 plus 45? The answer is ", "52"),  # trailing space moves to the continuation
    ("", "Health is a happy subject."),  # empty context: conditioned on BOS
]


@pytest.mark.parametrize("batch_size", [1, 3, "auto"])
def test_loglikelihood_matches_a_plain_forward(tiny_model, tiny_tokenizer, batch_size):
    lm = make_lm(tiny_model, tiny_tokenizer, batch_size=batch_size, max_batch_tokens=100)
    got = lm.loglikelihood(instances("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got):
        if context:
            ctx = context.rstrip()
            ids = tiny_tokenizer.encode(ctx + context[len(ctx):] + continuation, bos=True)
            start = len(tiny_tokenizer.encode(ctx, bos=True))
        else:
            ids = [tiny_tokenizer.bos_id] + tiny_tokenizer.encode(continuation)
            start = 1
        want, want_greedy = reference_logprob(tiny_model, ids, start)
        assert math.isclose(logprob, want, rel_tol=1e-5, abs_tol=1e-4), (context, continuation, logprob, want)
        assert greedy == want_greedy


def test_requests_that_split_one_text_differently_score_their_own_continuations(tiny_model, tiny_tokenizer):
    """Two requests whose context + continuation is the same token sequence, split at different words,
    share one row; each still sums the log-probabilities of its own continuation tokens. (lm-eval
    0.4.13's hf model, with its default logits_cache=True, gives one of the two a wrong value here;
    with logits_cache=False it agrees with this.)"""
    pairs = [("The bright", " eagle watches"), ("The bright eagle", " watches")]
    whole = tiny_tokenizer.encode("The bright eagle watches", bos=True)
    for context, _ in pairs:
        assert whole[: len(tiny_tokenizer.encode(context, bos=True))] == tiny_tokenizer.encode(context, bos=True)
    got = make_lm(tiny_model, tiny_tokenizer, batch_size=3).loglikelihood(instances("loglikelihood", pairs),
                                                                          disable_tqdm=True)
    for (context, _), (logprob, greedy) in zip(pairs, got):
        want, want_greedy = reference_logprob(tiny_model, whole, len(tiny_tokenizer.encode(context, bos=True)))
        assert logprob == pytest.approx(want, rel=1e-5) and greedy == want_greedy


def test_greedy_flag_is_true_for_the_greedy_continuation(tiny_model, tiny_tokenizer):
    from bezoar.model import generate_ids

    context = "Q: Who builds the book? A:"
    ids = tiny_tokenizer.encode(context, bos=True)
    new, _ = generate_ids(tiny_model, torch.tensor([ids]), max_new_tokens=4, eos_id=None)
    lm = make_lm(tiny_model, tiny_tokenizer)
    # Call the token-level entry so the continuation is exactly the greedy tokens.
    (logprob, greedy), = lm._loglikelihood_tokens([(None, ids, new[0])])
    assert greedy is True
    altered = new[0][:-1] + [(new[0][-1] + 1) % tiny_tokenizer.vocab_size]
    (_, greedy2), = lm._loglikelihood_tokens([(None, ids, altered)])
    assert greedy2 is False
    assert logprob == pytest.approx(reference_logprob(tiny_model, ids + new[0], len(ids))[0], rel=1e-5)


def test_loglikelihood_truncates_long_contexts_from_the_left(tiny_model, tiny_tokenizer):
    lm = make_lm(tiny_model, tiny_tokenizer, max_length=16)
    context = "Write a short poem about a golden cat. The golden cat sleeps, the small chair keeps"
    (logprob, _), = lm.loglikelihood(instances("loglikelihood", [(context, ", the night is deep.")]), disable_tqdm=True)
    ids = tiny_tokenizer.encode(context + ", the night is deep.", bos=True)
    n_cont = len(ids) - len(tiny_tokenizer.encode(context, bos=True))
    kept = ids[-17:]  # max_length + 1 tokens: the model reads 16 of them
    assert logprob == pytest.approx(reference_logprob(tiny_model, kept, len(kept) - n_cont)[0], rel=1e-5)


def test_rolling_windows_cover_every_token_once(tiny_model, tiny_tokenizer):
    text = ("1. Emma reads a large road.\n2. The lion is silver.\n3. We talk about mathematics every day.\n"
            "1. Bob describes a new chair.")
    tokens = tiny_tokenizer.encode(text)
    whole = make_lm(tiny_model, tiny_tokenizer).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    # With the full context the rolling value is one forward over BOS + text.
    assert whole[0] == pytest.approx(reference_logprob(tiny_model, [tiny_tokenizer.bos_id] + tokens, 1)[0], rel=1e-5)
    # With windows of 8 tokens: each window scores its own tokens with the tokens before them as context.
    small = make_lm(tiny_model, tiny_tokenizer, max_length=8, batch_size=2)
    got = small.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,), ("Health is a happy subject.",)]))
    padded = [tiny_tokenizer.bos_id] + tokens
    want = 0.0
    for end in range(1, len(padded), 8):
        stop = min(end + 8, len(padded))
        window = padded[max(0, stop - 9): stop]
        want += reference_logprob(tiny_model, window, len(window) - (stop - end))[0]
    assert got[0] == pytest.approx(want, rel=1e-5)
    assert got[0] != pytest.approx(whole[0], rel=1e-3), "the short windows must lose context"


def test_generate_until_matches_bezoar_generate(tiny_model, tiny_tokenizer):
    from bezoar.model import generate

    lm = make_lm(tiny_model, tiny_tokenizer, batch_size=2)
    free = generate(tiny_model, tiny_tokenizer, GEN_PROMPTS, max_new_tokens=10)
    stop = free[1].text[2:4]
    requests = [(p, {"until": [stop], "max_gen_toks": 10, "do_sample": False}) for p in GEN_PROMPTS]
    requests.append((GEN_PROMPTS[0], {"until": ["\n\n"], "max_gen_toks": 3}))
    got = lm.generate_until(instances("generate_until", requests))
    for text, g in zip(got, free):
        assert text == (g.text[: g.text.find(stop)] if stop in g.text else g.text)
    assert stop not in got[1] and len(got[1]) < len(free[1].text)
    assert got[-1] == generate(tiny_model, tiny_tokenizer, GEN_PROMPTS[0], max_new_tokens=3, stop=["\n\n"])[0].text


def test_generate_until_sampling_is_seeded(tiny_model, tiny_tokenizer):
    requests = [(p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}) for p in GEN_PROMPTS]
    a = make_lm(tiny_model, tiny_tokenizer, seed=7).generate_until(instances("generate_until", requests))
    b = make_lm(tiny_model, tiny_tokenizer, seed=7).generate_until(instances("generate_until", requests))
    greedy = make_lm(tiny_model, tiny_tokenizer).generate_until(
        instances("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 8}) for p in GEN_PROMPTS]))
    assert a == b
    assert a != greedy


def test_generate_until_honours_top_k(tiny_model, tiny_tokenizer, monkeypatch, caplog):
    """gen_kwargs top_k reaches the decoder (lm-eval's hf model hands it to transformers' generate): top_k=1
    samples the greedy text, and it is not reported as ignored."""
    import logging

    sampled = {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    greedy = make_lm(tiny_model, tiny_tokenizer).generate_until(
        instances("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 8}) for p in GEN_PROMPTS]))
    with caplog.at_level(logging.WARNING, logger="bezoar.eval"):
        one = make_lm(tiny_model, tiny_tokenizer, seed=7).generate_until(
            instances("generate_until", [(p, {**sampled, "top_k": 1}) for p in GEN_PROMPTS]))
    assert one == greedy
    assert "ignoring" not in caplog.text
    plain = make_lm(tiny_model, tiny_tokenizer, seed=7).generate_until(
        instances("generate_until", [(p, sampled) for p in GEN_PROMPTS]))
    assert plain != greedy, "sampling without top_k (transformers' 50) leaves the greedy text"

    from bezoar.model.decode import ContinuousBatch

    seen = []
    admit = ContinuousBatch.admit
    monkeypatch.setattr(ContinuousBatch, "admit", lambda self, seqs: seen.extend(
        (s.temperature, s.top_k) for s in seqs) or admit(self, seqs))
    make_lm(tiny_model, tiny_tokenizer).generate_until(instances("generate_until", [
        (GEN_PROMPTS[0], {**sampled, "top_k": 40}), (GEN_PROMPTS[0], sampled),
        (GEN_PROMPTS[0], {"until": ["\n"], "max_gen_toks": 8, "do_sample": False, "top_k": 40})]))
    # greedy: top_k does not matter, and is off; sampling without one: transformers' default, as lm-eval's hf
    assert sorted(seen) == [(0.0, 0), (1.0, 40), (1.0, 50)]


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_a_bad_top_k_in_gen_kwargs_is_an_error(bad):
    with pytest.raises(ValueError, match="top_k"):
        harness.GenerationSettings.from_gen_kwargs({"do_sample": True, "temperature": 1.0, "top_k": bad}, 16, None)
    settings = harness.GenerationSettings.from_gen_kwargs({"do_sample": True, "top_k": None}, 16, None)
    assert settings.top_k == 50 and settings.temperature == 1.0  # None: generate's default, as lm-eval's hf
    assert harness.GenerationSettings.from_gen_kwargs({"do_sample": True, "top_k": 0}, 16, None).top_k == 0


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_generate_until_rows_decode_as_alone_whatever_the_batch(tiny_model, tiny_tokenizer, batch_size):
    """Continuous batching over requests of mixed settings and budgets: each greedy answer is the eager loop's
    for its prompt alone (bezoar.model.generate), at any number of rows; sampled ones are seeded."""
    from bezoar.model import generate

    requests = [(p, {"until": ["\n\n"], "max_gen_toks": 9 + 3 * i}) for i, p in enumerate(GEN_PROMPTS)]
    requests += [(p, {"until": ["\n"], "max_gen_toks": 7, "do_sample": True, "temperature": 1.0})
                 for p in GEN_PROMPTS[::-1]]
    lm = make_lm(tiny_model, tiny_tokenizer, batch_size=batch_size, seed=5)
    got = lm.generate_until(instances("generate_until", requests))
    for text, (prompt, kwargs) in zip(got, requests[:len(GEN_PROMPTS)]):
        want = generate(tiny_model, tiny_tokenizer, prompt, max_new_tokens=kwargs["max_gen_toks"], stop=["\n\n"],
                        decode="eager")[0].text
        assert text == want
    again = make_lm(tiny_model, tiny_tokenizer, batch_size=batch_size, seed=5).generate_until(
        instances("generate_until", requests))
    assert again == got and any(got[len(GEN_PROMPTS):])


def test_model_args_errors(tiny_dir):
    with pytest.raises(ValueError, match="unknown key.*bogus"):
        harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},bogus=1")
    with pytest.raises(ValueError, match="pretrained=DIR"):
        harness.BezoarLM.create_from_arg_string("batch_size=2")
    with pytest.raises(ValueError, match="max_length=4096 exceeds"):
        harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},max_length=4096")
    with pytest.raises(ValueError, match="add_bos_token='maybe'"):
        harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},add_bos_token=maybe")
    with pytest.raises(ValueError, match="decode='fast'"):
        harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},decode=fast")
    with pytest.raises(ValueError, match="decode=graph needs a model on a CUDA device"):
        harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},decode=graph,device=cpu")
    lm = harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir},batch_size=3,max_length=128",
                                                 {"batch_size": None, "device": "cpu"})
    assert (lm.batch_size, lm.max_length, lm.add_bos_token) == (3, 128, True)


# ---- the acceptance check: three backends, one set of numbers --------------------------------


def _evaluate(model, model_args, tasks, manager, **kwargs):
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   bootstrap_iters=0, log_samples=True, **kwargs)


def _metrics(out):
    return {(task, key): value for task, res in out["results"].items() for key, value in res.items()
            if "," in key and "_stderr" not in key}


def _responses(out):
    return {task: [s["resps"] for s in samples] for task, samples in out["samples"].items()}


@pytest.mark.slow  # about 25 s on 2 cores: nine lm-eval runs over three backends
def test_same_metrics_as_hf_and_as_local_completions_on_bezoar_serve(tiny_dir, tiny_model, tiny_tokenizer, served,
                                                                     tmp_path):
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    write_tasks(folder)
    bezoar_lm = make_lm(tiny_model, tiny_tokenizer, max_length=MAX_LENGTH, batch_size=4)
    # Make two of the generation targets what the model answers, so exact_match is neither 0 nor 1.
    # (Only answers without U+FFFD: see the decoding note below.)
    first = _evaluate(bezoar_lm, None, ["bezoar_gen"], TaskManager(include_path=str(folder), include_defaults=False))
    answers = [r[0][0] for r in _responses(first)["bezoar_gen"]]
    clean = [i for i, a in enumerate(answers) if "\ufffd" not in a][:2]
    assert len(clean) == 2, answers
    write_tasks(folder, [answers[i] if i in clean else "no" for i in range(len(answers))])
    # include_defaults=False: indexing lm-eval's thousands of built-in tasks costs 20 s on CI.
    manager = TaskManager(include_path=str(folder), include_defaults=False)

    # lm-eval's hf and local-completions models encode a perplexity text with add_special_tokens,
    # so with add_bos_token=True their first rolling window reads BOS twice and scores the second
    # BOS as a token of the text. bezoar never does that; the perplexity task is compared with
    # add_bos_token=False, where the text is conditioned on the one BOS prefix in all three.
    runs = [(["bezoar_mc", "bezoar_gen"], True), (["bezoar_ppl"], False)]
    try:  # lm-eval's API models (local-completions) need tenacity, which lm-eval installs only with [api]
        import tenacity  # noqa: F401

        with_api = True
    except ImportError:
        with_api = False
    for tasks, bos in runs:
        ours = _evaluate(make_lm(tiny_model, tiny_tokenizer, max_length=MAX_LENGTH, batch_size=4, add_bos_token=bos),
                         None, tasks, manager)
        hf = _evaluate("hf", f"pretrained={tiny_dir},dtype=float32,max_length={MAX_LENGTH},add_bos_token={bos}",
                       tasks, manager, batch_size=4, device="cpu")
        # local-completions keeps one token of max_length for the answer and one more in its rolling
        # windows: MAX_LENGTH + 2 gives it the same windows and truncation as the other two.
        api = _evaluate("local-completions",
                        f"model=tiny,base_url={served.url}/v1/completions,tokenizer={tiny_dir},"
                        f"tokenizer_backend=huggingface,max_length={MAX_LENGTH + 2},add_bos_token={bos},"
                        "batch_size=4,max_retries=1", tasks, manager) if with_api else ours
        m_ours, m_hf, m_api = _metrics(ours), _metrics(hf), _metrics(api)
        assert m_ours.keys() == m_hf.keys() == m_api.keys() and m_ours
        for key, value in m_ours.items():
            assert m_hf[key] == pytest.approx(value, rel=1e-5), (key, value, m_hf[key])
            assert m_api[key] == pytest.approx(value, rel=1e-5), (key, value, m_api[key])
        if "bezoar_gen" in tasks:
            assert m_ours[("bezoar_gen", "exact_match,none")] == pytest.approx(0.4)
            assert m_ours[("bezoar_mc", "acc,none")] not in (0.0, 1.0)
        r_ours, r_hf, r_api = _responses(ours), _responses(hf), _responses(api)
        for task in tasks:
            for a, b, c in zip(r_ours[task], r_hf[task], r_api[task]):
                if task == "bezoar_gen":
                    # bezoar.serve decodes exactly as the bezoar model does, but returns the answer as it
                    # follows the prompt (as vLLM does): a first token that starts a word keeps its space
                    (x,), (z,) = a[0], c[0]
                    assert z in (x, " " + x), (x, z)
                    # transformers decodes a run of byte-fallback tokens that is not valid UTF-8
                    # differently from sentencepiece; compare with hf where no such run occurs.
                    if "\ufffd" not in a[0][0] + b[0][0]:
                        assert a == b
                else:  # one [(logprob, is_greedy)] per choice, or [logprob] for a rolling text
                    for x, y, z in zip(a, b, c):
                        (x,), (y,), (z,) = x, y, z
                        if isinstance(x, tuple):
                            assert x[1] == y[1] == z[1]
                            x, y, z = x[0], y[0], z[0]
                        assert y == pytest.approx(x, rel=1e-5) and z == pytest.approx(x, rel=1e-5)
    if not with_api:
        pytest.skip("bezoar == hf checked; the local-completions half needs the tenacity package")


def test_adapter_and_nf4_model_args_reach_the_model(tiny_dir, tmp_path):
    """``adapter=`` and ``quant=nf4`` load what bezoar.model.load loads with them."""
    from bezoar.model import load
    from bezoar.model.lora import LoraConfig, apply_lora, lora_modules, save_adapter

    model = load(tiny_dir)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.copy_(0.05 * torch.randn(module.lora_B.weight.shape, generator=g))
    adapter = save_adapter(model, tmp_path / "adapter")
    pair = [("Q: Who builds the book? A:", " Alice does, on Tuesday.")]
    scores = {}
    for name, args in [("base", ""), ("adapter", f",adapter={adapter}"), ("nf4", ",quant=nf4"),
                       ("nf4+adapter", f",quant=nf4,adapter={adapter}")]:
        lm = harness.BezoarLM.create_from_arg_string(f"pretrained={tiny_dir}{args}")
        scores[name] = lm.loglikelihood(instances("loglikelihood", pair), disable_tqdm=True)[0][0]
        quant = "nf4" if "nf4" in name else None
        # .eval(): load(adapter=...) leaves the new LoRA layers in training mode (dropout on)
        reference = load(tiny_dir, quant=quant, adapter=adapter if "adapter" in name else None).eval()
        ids = lm.tok_encode(pair[0][0] + pair[0][1])
        start = len(lm.tok_encode(pair[0][0]))
        assert scores[name] == pytest.approx(reference_logprob(reference, ids, start)[0], rel=1e-5), name
    assert len({round(v, 3) for v in scores.values()}) == 4, scores  # each argument changes the model


# ---- plans, the table, the command line ---------------------------------------------------------


def test_openllm_preset_plan_and_dry_run(capsys):
    from bezoar.eval.__main__ import main

    plan = harness.make_plan(None, "openllm", None)
    assert [(p.task, p.num_fewshot) for p in plan] == [("arc_challenge", 25), ("hellaswag", 10), ("truthfulqa_mc2", 0),
                                                       ("mmlu", 5), ("winogrande", 5), ("gsm8k", 5)]
    assert [p.num_fewshot for p in harness.make_plan(None, "openllm", 0)] == [0] * 6
    assert [(p.task, p.num_fewshot) for p in harness.make_plan(["a", "b"], None, 3)] == [("a", 3), ("b", 3)]
    with pytest.raises(ValueError, match="unknown preset"):
        harness.make_plan(None, "helm", None)
    assert main(["harness", "--preset", "openllm", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "| arc_challenge | 25 | acc_norm |" in out and "| gsm8k | 5 | exact_match,strict-match |" in out
    assert main(["harness", "--preset", "openllm", "--tasks", "x", "--dry-run"]) == 2
    assert "not both" in capsys.readouterr().err


def test_results_table_headline_metrics_and_average():
    plan = harness.make_plan(None, "openllm", None)
    results = {
        "results": {
            "arc_challenge": {"acc,none": 0.40, "acc_stderr,none": 0.01, "acc_norm,none": 0.44, "acc_norm_stderr,none": 0.02},
            "hellaswag": {"acc,none": 0.50, "acc_norm,none": 0.70},
            "truthfulqa_mc2": {"acc,none": 0.36},
            "mmlu": {"acc,none": 0.26, "acc_stderr,none": 0.004},
            "mmlu_anatomy": {"acc,none": 0.99},
            "winogrande": {"acc,none": 0.64},
            "gsm8k": {"exact_match,flexible-extract": 0.09, "exact_match,strict-match": 0.05},
        },
        "n-shot": {"arc_challenge": 25, "hellaswag": 10, "truthfulqa_mc2": 0, "winogrande": 5, "gsm8k": 5},
    }
    table = harness.results_table(results, plan)
    assert "| arc_challenge | 25 | acc_norm | 0.4400 | 0.0200 |" in table
    assert "| gsm8k | 5 | exact_match (strict-match) | 0.0500 |" in table
    assert "mmlu_anatomy" not in table
    assert f"| {sum([0.44, 0.70, 0.36, 0.26, 0.64, 0.05]) / 6:.4f} |" in table
    assert "6 of 6 tasks" in table


def test_a_groups_headline_is_the_plain_mean_of_its_tasks_as_the_leaderboard_took_mmlu():
    """The Open LLM Leaderboard v1 scored MMLU as the plain mean of its 57 subjects; the preset's average took
    lm-eval's mmlu figure, which weighs each subject by its number of questions."""
    plan = [harness.TaskPlan("mmlu", 5, "acc", mean_of_tasks=True)]
    results = {
        "results": {"mmlu": {"acc,none": 0.30, "acc_stderr,none": 0.004}, "mmlu_stem": {"acc,none": 0.2},
                    "mmlu_a": {"acc,none": 0.2, "acc_stderr,none": 0.03}, "mmlu_b": {"acc,none": 0.5,
                                                                                   "acc_stderr,none": 0.04},
                    "mmlu_c": {"acc,none": 0.8, "acc_stderr,none": 0.0}},
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_c"], "mmlu_stem": ["mmlu_a", "mmlu_b"], "mmlu_a": [],
                           "mmlu_b": [], "mmlu_c": []},
        "n-shot": {"mmlu": 5},
    }
    table = harness.results_table(results, plan)
    assert "| mmlu | 5 | acc (lm-eval: weighted by size) | 0.3000 | 0.0040 |" in table
    assert "| mmlu | 5 | acc (mean of 3 tasks) | 0.5000 | 0.0167 |" in table  # sqrt(.03^2 + .04^2) / 3
    assert "| **average** | | 1 of 1 tasks | 0.5000 | |" in table
    # A subject without the metric (or results from before group_subtasks) falls back to lm-eval's figure.
    del results["results"]["mmlu_b"]["acc,none"]
    table = harness.results_table(results, plan)
    assert "weighted" not in table and "| **average** | | 1 of 1 tasks | 0.3000 | |" in table
    assert [p.mean_of_tasks for p in harness.make_plan(None, "openllm", 0)] == [False, False, False, True, False, False]


def test_a_groups_mean_over_lm_evals_own_group_record(tiny_model, tiny_tokenizer, tmp_path):
    """The leaves come from lm-eval's group_subtasks as it writes them: a group of a subgroup (whose tasks come
    from a tag, as mmlu_stem's) and a task, with different sizes."""
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    write_tasks(folder)
    mc = (folder / "bezoar_mc.yaml").read_text()
    rows = (folder / "mc_test.jsonl").read_text().splitlines()
    (folder / "mc_small.jsonl").write_text("\n".join(rows[:2]) + "\n")
    small = mc.replace("task: bezoar_mc", "task: bezoar_mc_small\ntag: bezoar_small_tasks").replace(
        str(folder / "mc_test.jsonl"), str(folder / "mc_small.jsonl"))
    assert small.count("mc_small.jsonl") == 1 and "tag: bezoar_small_tasks" in small
    (folder / "bezoar_mc_small.yaml").write_text(small)
    aggregate = "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: True\nmetadata:\n  version: 1\n"
    (folder / "sub.yaml").write_text("group: bezoar_sub\ntask:\n  - bezoar_small_tasks\n" + aggregate)
    (folder / "all.yaml").write_text("group: bezoar_all\ntask:\n  - bezoar_sub\n  - bezoar_mc\n" + aggregate)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    plan = [harness.TaskPlan("bezoar_all", 0, "acc", mean_of_tasks=True)]
    results = harness.run_plan(make_lm(tiny_model, tiny_tokenizer, max_length=MAX_LENGTH), plan, manager=manager)
    assert harness._leaf_tasks(results, "bezoar_all") == ["bezoar_mc_small", "bezoar_mc"]
    small_acc, big_acc = (results["results"][t]["acc,none"] for t in ("bezoar_mc_small", "bezoar_mc"))
    assert results["results"]["bezoar_all"]["acc,none"] == pytest.approx((2 * small_acc + 6 * big_acc) / 8)
    assert f"| bezoar_all | 0 | acc (mean of 2 tasks) | {(small_acc + big_acc) / 2:.4f} |" in \
        harness.results_table(results, plan)


def test_results_table_without_a_preset_shows_every_filter_of_a_metric():
    """gsm8k reports exact_match under two filters; the table (and report.md) showed the first one alone."""
    results = {"results": {"gsm8k": {"exact_match,flexible-extract": 0.09, "exact_match_stderr,flexible-extract": 0.01,
                                     "exact_match,strict-match": 0.05, "alias": "gsm8k"}}, "n-shot": {"gsm8k": 5}}
    table = harness.results_table(results)
    assert "| gsm8k | 5 | exact_match (flexible-extract) | 0.0900 | 0.0100 |" in table
    assert "| gsm8k | 5 | exact_match (strict-match) | 0.0500 |  |" in table


def test_gen_kwargs_top_p_and_max_length_as_transformers_reads_them(tiny_model, tiny_tokenizer):
    """top_p=0 switched the filter off (0 read as "unset"), where transformers keeps the most likely token alone;
    max_length (prompt + new tokens, per prompt) was dropped, so 256 tokens came back."""
    settings = harness.GenerationSettings.from_gen_kwargs({"do_sample": True, "top_p": 0}, 16, None)
    assert settings.top_p == 0.0
    with pytest.raises(ValueError, match=r"top_p=1.5: must be between 0 and 1"):
        harness.GenerationSettings.from_gen_kwargs({"do_sample": True, "top_p": 1.5}, 16, None)
    with pytest.raises(ValueError, match=r"max_length='x': expected an integer"):
        harness.GenerationSettings.from_gen_kwargs({"max_length": "x"}, 16, None)
    greedy = make_lm(tiny_model, tiny_tokenizer).generate_until(
        instances("generate_until", [(p, {"until": ["\n"], "max_gen_toks": 8}) for p in GEN_PROMPTS]))
    top0 = make_lm(tiny_model, tiny_tokenizer, seed=3).generate_until(instances("generate_until", [
        (p, {"until": ["\n"], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_p": 0}) for p in GEN_PROMPTS]))
    assert top0 == greedy
    lm = make_lm(tiny_model, tiny_tokenizer, batch_size=4)
    lengths = [len(lm.tok_encode(p)) for p in GEN_PROMPTS]
    total = max(lengths) + 3
    got = lm.generate_until(instances("generate_until", [(p, {"until": [], "max_length": total}) for p in GEN_PROMPTS]))
    for prompt, n, text in zip(GEN_PROMPTS, lengths, got):
        alone = make_lm(tiny_model, tiny_tokenizer).generate_until(
            instances("generate_until", [(prompt, {"until": [], "max_gen_toks": total - n})]))[0]
        assert text == alone, (prompt, total - n)
    assert lm.generate_until(instances("generate_until", [(GEN_PROMPTS[0], {"until": [], "max_length": 2})])) == [""]
    # A prompt is cut as lm-eval's HF model cuts it (max_length - max_gen_toks), not by gen_kwargs max_length:
    # max_length 64 in a 64-token context cut every prompt to its last token.
    short = make_lm(tiny_model, tiny_tokenizer, max_length=64, max_gen_toks=24, batch_size=3)
    long_prompt = " ".join(GEN_PROMPTS[:2])
    n = len(short.tok_encode(long_prompt))
    assert 24 < n <= 64 - 24, n  # fits the cut (max_length - max_gen_toks)
    got = short.generate_until(instances("generate_until", [(long_prompt, {"until": [], "max_length": 64}),
                                                            (GEN_PROMPTS[0], {"until": [], "max_length": 64})]))
    want = make_lm(tiny_model, tiny_tokenizer, max_length=64).generate_until(instances("generate_until", [
        (long_prompt, {"until": [], "max_gen_toks": 64 - n})]))
    assert got[0] == want[0]


def test_model_info_counts_an_nf4_model_by_its_weights_and_names_how_it_loaded(tiny_dir):
    dense = harness.BezoarLM(pretrained=str(tiny_dir), device="cpu").get_model_info()
    nf4 = harness.BezoarLM(pretrained=str(tiny_dir), device="cpu", quant="nf4").get_model_info()
    assert nf4["num_parameters"] == dense["num_parameters"]  # the packed bytes counted 65,856 of 166,208
    assert (dense["quant"], nf4["quant"], nf4["adapter"]) == (None, "nf4", None)


def test_bad_model_args_fail_before_the_model_loads(tiny_dir, monkeypatch):
    import bezoar.model

    monkeypatch.setattr(bezoar.model, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    for kwargs, match in (({"max_length": 10**6}, "exceeds the model's context"), ({"decode": "fast"}, "decode='fast'"),
                          ({"device": "tpu"}, "device='tpu': not a torch device")):
        with pytest.raises(ValueError, match=match):
            harness.BezoarLM(pretrained=str(tiny_dir), **kwargs)


def test_harness_command_line_on_local_tasks(tiny_dir, tmp_path, capsys):
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = tmp_path / "res" / "results.json"
    code = main(["harness", "--model", str(tiny_dir), "--tasks", "bezoar_mc,bezoar_ppl", "--include-path",
                 str(folder), "--no-builtin-tasks", "--limit", "2", "--max-length", str(MAX_LENGTH),
                 "--batch-size", "auto", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| bezoar_mc | 1 | acc |" in printed and "| bezoar_ppl | 0 | word_perplexity |" in printed
    saved = json.loads(out.read_text())
    assert saved["results"]["bezoar_mc"]["acc,none"] in (0.0, 0.5, 1.0) and "samples" not in saved
    # lm-eval's record of the run is kept: a --limit run says so, and how the model was loaded
    assert saved["complete"] is True and saved["config"]["limit"] == 2
    assert saved["n-samples"]["bezoar_mc"] == {"original": 6, "effective": 2}
    assert saved["model_info"]["pretrained"] == str(tiny_dir) and "higher_is_better" in saved
    assert main(["harness", "--tasks", "bezoar_mc", "--include-path", str(folder), "--no-builtin-tasks"]) == 2
    assert "--model DIR is required" in capsys.readouterr().err


def test_harness_command_line_checks_the_output_path_before_evaluating(tmp_path, capsys, monkeypatch):
    """--output naming a folder (lm-eval's own --output_path takes one) or a path under a file failed only
    after every task had run, losing the results."""
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    ran = []
    monkeypatch.setattr(harness, "BezoarLM", lambda **kwargs: ran.append("load"))
    monkeypatch.setattr(harness, "run_plan", lambda *a, **k: ran.append("run") or {"results": {}})
    (tmp_path / "a-file").write_text("x")
    for output in (tmp_path, tmp_path / "a-file" / "results.json"):
        code = main(["harness", "--model", str(tmp_path), "--tasks", "bezoar_mc", "--include-path", str(folder),
                     "--no-builtin-tasks", "--output", str(output)])
        assert code == 2
        err = capsys.readouterr().err
        assert "--output" in err and str(output) in err and "Traceback" not in err
        assert ran == [], "the output path must be checked before the model loads and the tasks run"


def test_model_args_that_have_their_own_flag_are_one_error(tmp_path, capsys, monkeypatch):
    """--model-args max_length=... (lm-eval's spelling) was a TypeError traceback: 'got multiple values for
    keyword argument'."""
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    ran = []
    monkeypatch.setattr(harness, "BezoarLM", lambda **kwargs: ran.append("load"))
    monkeypatch.setattr(harness, "run_plan", lambda *a, **k: ran.append("run") or {"results": {}})
    for extra, flag in (("max_length=64", "--max-length"), ("pretrained=/x,seed=3", "--model"),
                        ("batch_size=4", "--batch-size")):
        code = main(["harness", "--model", str(tmp_path), "--tasks", "bezoar_mc", "--include-path", str(folder),
                     "--no-builtin-tasks", "--model-args", extra])
        assert code == 2
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err
        assert ran == []


def test_harness_command_line_names_an_unknown_task_before_loading(tmp_path, capsys):
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    # The model folder does not exist: the task check must come first and be the one error shown.
    code = main(["harness", "--model", str(tmp_path / "no-model"), "--tasks", "bezoar_mc,bezoar_mcc",
                 "--include-path", str(folder), "--no-builtin-tasks"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown task(s) bezoar_mcc" in err and str(folder) in err
    assert "Traceback" not in err and "no-model" not in err


def test_lm_eval_passthrough_registers_bezoar(monkeypatch):
    import lm_eval.__main__ as lm_eval_main
    from lm_eval.api.registry import get_model

    from bezoar.eval.__main__ import main

    seen = {}

    def fake_cli():
        import sys

        seen["argv"] = list(sys.argv)
        seen["model"] = get_model("bezoar")

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", fake_cli)
    assert main(["lm-eval", "run", "--model", "bezoar", "--tasks", "x"]) == 0
    assert seen["argv"] == ["lm-eval", "run", "--model", "bezoar", "--tasks", "x"]
    assert seen["model"] is harness.BezoarLM


def test_harness_keeps_each_few_shot_groups_results_and_checks_gen_kwargs_first(tiny_dir, tiny_model, tiny_tokenizer,
                                                                                 tmp_path, capsys, monkeypatch):
    """A bad --gen-kwargs failed only when the generation tasks ran, last, and --output was written only at the
    very end: hours of results were lost. Now gen_kwargs are checked first, and each few-shot group's results are
    written (atomically, marked incomplete) as it finishes."""
    import lm_eval

    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = tmp_path / "results.json"
    code = main(["harness", "--model", str(tiny_dir), "--include-path", str(folder), "--no-builtin-tasks",
                 "--tasks", "bezoar_mc", "--gen-kwargs", "top_k=-1", "--output", str(out)])
    assert code == 2 and "top_k" in capsys.readouterr().err and not out.exists()

    real, calls = lm_eval.simple_evaluate, []

    def second_group_killed(*args, **kwargs):
        calls.append(kwargs["num_fewshot"])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", second_group_killed)
    plan = [harness.TaskPlan("bezoar_mc", 1), harness.TaskPlan("bezoar_ppl", 0)]
    manager = harness.task_manager(str(folder), include_defaults=False)
    lm = make_lm(tiny_model, tiny_tokenizer)
    with pytest.raises(RuntimeError, match="killed"):
        harness.run_plan(lm, plan, limit=2, manager=manager,
                         on_group=lambda results, done: harness.write_results(results, out, False, complete=done))
    saved = json.loads(out.read_text())
    assert calls == [1, 0] and saved["complete"] is False and list(saved["results"]) == ["bezoar_mc"]
    assert not list(out.parent.glob("results.json.tmp*"))


def test_an_interrupted_harness_run_resumes_from_its_finished_groups(tiny_dir, tmp_path, capsys, monkeypatch):
    """A run stopped after its first few-shot group evaluated that group again on the rerun (hours on a 3B
    model); now the rerun keeps it when the plan, settings and model are the same, and starts over otherwise."""
    import lm_eval

    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = tmp_path / "results.json"
    two_groups = [harness.TaskPlan("bezoar_mc", 1), harness.TaskPlan("bezoar_ppl", 0)]
    monkeypatch.setattr(harness, "make_plan", lambda *a: two_groups)
    real, calls = lm_eval.simple_evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(kwargs["tasks"])
        if kill_at == len(calls):
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate)
    argv = ["harness", "--model", str(tiny_dir), "--include-path", str(folder), "--no-builtin-tasks", "--limit", "2",
            "--max-length", str(MAX_LENGTH), "--tasks", "unused", "--output", str(out)]
    kill_at = 2
    with pytest.raises(RuntimeError, match="killed"):
        main(argv)
    first = json.loads(out.read_text())
    assert first["complete"] is False and list(first["results"]) == ["bezoar_mc"]
    kill_at, calls[:] = 0, []
    assert main(argv) == 0
    assert calls == [["bezoar_ppl"]] and "resuming from" in capsys.readouterr().out
    done = json.loads(out.read_text())
    assert done["complete"] is True and done["results"]["bezoar_mc"] == first["results"]["bezoar_mc"]
    assert "bezoar_ppl" in done["results"]
    # Another setting (or a finished file): evaluated anew.
    out.write_text(json.dumps({**first}))
    calls[:] = []
    assert main([*argv, "--limit", "3"]) == 0  # the last --limit counts
    assert calls == [["bezoar_mc"], ["bezoar_ppl"]]


def test_a_finished_run_is_shown_again_and_another_runs_results_are_moved_aside(tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """--output held a complete result: rerunning the same command evaluated everything again, and a run with
    other tasks wrote over it (the three-task result was gone). Now the same run's complete result is printed
    without loading the model, and another run's (or a file this command did not write) is moved to a
    timestamped name beside it, with a line on stderr, when the new run first writes; a run refused before that
    leaves it where it is."""
    import lm_eval

    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = tmp_path / "results.json"
    real, calls = lm_eval.simple_evaluate, []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]) or real(*a, **k))
    argv = ["harness", "--model", str(tiny_dir), "--include-path", str(folder), "--no-builtin-tasks", "--limit", "2",
            "--max-length", str(MAX_LENGTH), "--output", str(out)]
    assert main([*argv, "--tasks", "bezoar_mc,bezoar_ppl"]) == 0
    first = out.read_text()
    assert json.loads(first)["complete"] is True and calls == [["bezoar_mc", "bezoar_ppl"]]
    capsys.readouterr()

    real_lm = harness.BezoarLM
    monkeypatch.setattr(harness, "BezoarLM", lambda **kw: pytest.fail("the model loaded for a finished run"))
    calls[:] = []
    assert main([*argv, "--tasks", "bezoar_mc,bezoar_ppl"]) == 0
    printed = capsys.readouterr().out
    assert calls == [] and out.read_text() == first
    assert "| bezoar_mc | 1 | acc |" in printed and "complete results of this same run" in printed

    # Refused before anything is written (here: the model fails to load): the earlier results stay put.
    def no_model(**kwargs):
        raise ValueError("no model today")

    monkeypatch.setattr(harness, "BezoarLM", no_model)
    assert main([*argv, "--tasks", "bezoar_mc"]) == 2
    assert out.read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.json.lock", "tasks"]
    capsys.readouterr()

    monkeypatch.setattr(harness, "BezoarLM", real_lm)
    assert main([*argv, "--tasks", "bezoar_mc"]) == 0  # another run: the earlier results are kept beside
    err = capsys.readouterr().err
    (moved,) = tmp_path.glob("results.*.json")
    assert re.fullmatch(r"results\.\d{8}-\d{6}\.json", moved.name) and moved.read_text() == first
    assert f"--output {out}: the earlier results moved to {moved}" in err
    assert "results of another run (other tasks or few-shot counts)" in err
    assert list(json.loads(out.read_text())["results"]) == ["bezoar_mc"]

    out.write_text("notes, not results\n")  # a file this command did not write: kept too
    assert main([*argv, "--tasks", "bezoar_mc"]) == 0
    assert "not a results file of this command" in capsys.readouterr().err
    assert sorted(p.read_text()[:5] for p in tmp_path.glob("results.*.json")) == sorted([first[:5], "notes"])
    assert len(list(tmp_path.glob("results*.json"))) == 3


@pytest.mark.parametrize("flags,message", [
    (["--limit", "-3"], "--limit -3: give a number of examples per task (1 or more) or a fraction"),
    (["--limit", "0"], "--limit 0: give a number of examples"),
    (["--limit", "2.5"], "--limit 2.5: a number of examples is a whole number"),
    (["--gen-kwargs", "temperature=abc"], "--gen-kwargs temperature='abc': expected a number"),
    (["--gen-kwargs", "max_gen_toks=many"], "--gen-kwargs max_gen_toks='many': expected an integer"),
    (["--gen-kwargs", "do_sample=maybe"], "--gen-kwargs do_sample='maybe': expected true or false"),
    (["--gen-kwargs", "top_p=2"], "--gen-kwargs top_p=2.0: must be between 0 and 1"),
])
def test_bad_harness_flags_are_named_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    """--limit -3 failed after the model had loaded with an islice message; --gen-kwargs temperature=abc said
    only "could not convert string to float: 'abc'"."""
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    monkeypatch.setattr(harness, "BezoarLM", lambda **kw: pytest.fail("the model loaded before the check"))
    code = main(["harness", "--model", str(tmp_path), "--tasks", "bezoar_mc", "--include-path", str(folder),
                 "--no-builtin-tasks", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_dry_run_checks_tasks_and_folders_without_a_model(tiny_dir, tmp_path, capsys, monkeypatch):
    """harness --dry-run accepted unknown tasks and a missing --model; it now checks them (and the flags) without
    loading a model. --model stays optional for it; with --model and --output it says what a run would do."""
    from bezoar.eval.__main__ import main

    folder = tmp_path / "tasks"
    write_tasks(folder)
    monkeypatch.setattr(harness, "BezoarLM", lambda **kw: pytest.fail("a dry run loaded the model"))
    base = ["harness", "--include-path", str(folder), "--no-builtin-tasks", "--dry-run"]
    assert main([*base, "--tasks", "bezoar_mc,bezoar_nope"]) == 2
    assert "unknown task(s) bezoar_nope" in capsys.readouterr().err
    assert main([*base, "--tasks", "bezoar_mc", "--model", str(tmp_path / "no-model")]) == 2
    assert f"--model {tmp_path / 'no-model'}: no such folder" in capsys.readouterr().err
    assert main([*base, "--tasks", "bezoar_mc", "--adapter", str(folder / "bezoar_mc.yaml")]) == 2
    assert f"--adapter {folder / 'bezoar_mc.yaml'}: not a folder" in capsys.readouterr().err
    assert main([*base, "--tasks", "bezoar_mc", "--limit", "-1"]) == 2
    assert "--limit -1" in capsys.readouterr().err
    assert main([*base, "--tasks", "bezoar_mc", "--num-fewshot", "-1"]) == 2  # ran 0-shot, reported as -1
    assert "--num-fewshot must be 0 or more, got -1" in capsys.readouterr().err
    assert main([*base, "--tasks", "bezoar_mc"]) == 0  # no --model: the plan alone
    assert "| bezoar_mc | task default | all |" in capsys.readouterr().out
    out = tmp_path / "results.json"
    out.write_text('{"complete": true, "results": {}}\n')
    assert main([*base, "--tasks", "bezoar_mc", "--model", str(tiny_dir), "--output", str(out)]) == 0
    assert (f"--output {out}: holds results without a record of the run that wrote them: a run moves it"
            in capsys.readouterr().out)
    assert out.read_text() == '{"complete": true, "results": {}}\n', "a dry run moves nothing"


def test_results_kept_inside_the_model_folder_are_not_the_model(tiny_dir, tmp_path, capsys, monkeypatch):
    """--output inside --model counted the run's own results (and the ones moved aside) as model files: a
    finished run was moved aside and evaluated again, an interrupted one never resumed."""
    import shutil

    import lm_eval

    from bezoar.eval.__main__ import main

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = model / "eval" / "results.json"
    real, calls = lm_eval.simple_evaluate, []
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: calls.append(k["tasks"]) or real(*a, **k))
    argv = ["harness", "--model", str(model), "--include-path", str(folder), "--no-builtin-tasks", "--limit", "2",
            "--max-length", str(MAX_LENGTH), "--output", str(out), "--tasks", "bezoar_mc"]
    assert main(argv) == 0 and calls == [["bezoar_mc"]]
    first = out.read_text()
    capsys.readouterr()
    assert main(argv) == 0 and calls == [["bezoar_mc"]]  # the same run, finished: nothing evaluated again
    assert "complete results of this same run" in capsys.readouterr().out and out.read_text() == first
    (model / "eval" / "results.20250101-000000.json").write_text("{}")  # one moved aside earlier
    assert main(argv) == 0 and calls == [["bezoar_mc"]]
    (model / "extra.safetensors").write_bytes(b"x")  # the model's own files still count
    assert main(argv) == 0 and calls == [["bezoar_mc"], ["bezoar_mc"]]


def test_a_second_run_on_the_same_output_is_refused_before_its_model_loads(tiny_dir, tmp_path, capsys, monkeypatch):
    """Two harness runs on one --output both evaluated, and their writes shared one temporary name: the loser's
    rename failed after a whole task group. The second is now refused, naming the first's pid, and each write
    uses a temporary file of its own."""
    import os

    from bezoar.eval.__main__ import main
    from bezoar.locking import hold

    folder = tmp_path / "tasks"
    write_tasks(folder)
    out = tmp_path / "results.json"
    loaded = []
    monkeypatch.setattr(harness, "BezoarLM", lambda **kw: loaded.append(kw))
    held = hold(out.with_name("results.json.lock"))
    try:
        assert main(["harness", "--model", str(tiny_dir), "--include-path", str(folder), "--no-builtin-tasks",
                     "--tasks", "bezoar_mc", "--output", str(out)]) == 2
    finally:
        held.close()
    err = capsys.readouterr().err
    assert f"--output {out}: another bezoar.eval harness (pid {os.getpid()}) is writing it" in err, err
    assert loaded == [] and not out.exists()
    real_replace = os.replace
    names = []
    monkeypatch.setattr(os, "replace", lambda a, b: names.append(os.path.basename(a)) or real_replace(a, b))
    harness.write_results({"results": {}}, out, False)
    assert names == [f"results.json.tmp-{os.getpid()}"] and json.loads(out.read_text())["complete"] is True


def test_stop_strings_cut_in_the_tasks_order_as_lm_eval_cuts_them():
    """bezoar cut a generation at the earliest stop string; lm-eval's models split at each in list order, which
    differs where stop strings overlap (HFLM: "9", bezoar: "" for ["e9", "9e9"])."""
    from lm_eval.models.utils import postprocess_generated_text

    cases = [("9e9e9e9e9e", ["e9", "9e9"]), ("Foo Question: bar", [":", "Question:"]), ("x Q:\nnext", [":\n", "Q:"]),
             ("plain text", ["\n\n"]), ("a\n\nb", ["", "\n\n"]), ("", ["x"]), ("stop at start", ["stop"])]
    for text, stop in cases:
        assert harness.cut_in_list_order(text, stop) == postprocess_generated_text(text, stop, None), (text, stop)
    assert harness.cut_in_list_order("9e9e9", ["e9", "9e9"]) == "9"


def test_bos_follows_the_checkpoints_tokenizer_config_unless_given(tiny_dir, tmp_path):
    """bezoar always prepended BOS; lm-eval's hf model follows tokenizer_config.json's add_bos_token, so a
    checkpoint that says false scored other token sequences under the defaults of the two."""
    import shutil

    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    bos = harness.BezoarLM(pretrained=str(tiny_dir)).tok_encode("Hello")
    assert bos[0] == 1
    assert harness.BezoarLM(pretrained=str(folder)).tok_encode("Hello") == bos[1:]
    assert harness.BezoarLM(pretrained=str(folder), add_bos_token="true").tok_encode("Hello") == bos


def test_an_empty_context_is_decoded_after_bos(tiny_model, tiny_tokenizer):
    """With add_bos_token=False an empty prompt encodes to no token at all: it is decoded after BOS alone (the
    continuous batch refuses an empty prompt, and the old padded batches decoded a row of padding)."""
    from bezoar.model import generate_ids

    lm = make_lm(tiny_model, tiny_tokenizer, add_bos_token=False)
    got = lm.generate_until(instances("generate_until", [("", {"until": [], "max_gen_toks": 5}),
                                                         (GEN_PROMPTS[0], {"until": [], "max_gen_toks": 5})]))
    want = generate_ids(tiny_model, torch.tensor([[tiny_tokenizer.bos_id]]), max_new_tokens=5, decode="eager",
                        eos_id=tiny_tokenizer.eos_id)[0][0]
    assert got[0] == tiny_tokenizer.decode(want)
