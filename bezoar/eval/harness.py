"""bezoar as an lm-evaluation-harness model, and the Open LLM Leaderboard (v1) preset.

Importing this module registers the model under the name ``bezoar``::

    import bezoar.eval.harness  # noqa: F401  (registers "bezoar")
    lm_eval.simple_evaluate(model="bezoar", model_args="pretrained=DIR,adapter=DIR,quant=nf4", tasks=[...])

or from the shell: ``python -m bezoar.eval harness --model DIR --tasks hellaswag`` /
``--preset openllm``.

The three request types, all on bezoar's own forward pass and KV-cache decoding:

- ``loglikelihood(context, continuation)``: ``log P(continuation | context)`` and whether greedy
  decoding would produce exactly the continuation. Context and continuation are tokenized together
  and split after the context's tokens (lm-eval's ``TemplateLM`` rule); the model reads
  ``(context + continuation)[:-1]`` (the last ``max_length`` tokens of it) and the continuation's
  tokens are scored at their positions. Requests with equal model input (multiple choice with
  one-token answers) share one row; rows run longest first, ``batch_size`` to a forward.
- ``loglikelihood_rolling(text)``: the log-likelihood of a whole text for perplexity, cut into
  windows of ``max_length`` tokens with lm-eval's rolling-window helpers (every token predicted
  once, the first from BOS); all windows of all texts are batched together.
- ``generate_until(context, gen_kwargs)``: decoding until a stop string, EOS or ``max_gen_toks``,
  greedy unless the task asks for sampling (``temperature``, ``top_k``: 50 when it names none, as
  transformers' ``generate`` samples for lm-eval's HF model, ``top_p``); requests, longest first, are
  decoded with continuous batching (``bezoar.model.decode.ContinuousBatch``): each takes a row as one
  frees, with its own settings and budget, so a short answer never waits for a long one.

model_args: ``pretrained`` (checkpoint folder), ``adapter`` (PEFT LoRA folder), ``quant``
(``nf4``), ``dtype``, ``device``, ``batch_size`` (an integer, or ``auto``: rows up to
``max_batch_tokens`` padded tokens), ``max_length`` (default: the model's context),
``max_gen_toks`` (default 256), ``add_bos_token`` (default: the checkpoint's tokenizer_config.json
``add_bos_token``, true where it says nothing, as lm-eval's hf model does),
``seed`` (for sampling), ``decode`` (``auto``, ``eager``, ``static`` or ``graph``: how decode steps
run; ``auto`` replays CUDA graphs on a GPU, and ``eager`` runs the same static-cache steps as
``static``, without graphs, since continuous batching needs a cache slot per row).
An empty context (``add_bos_token=False`` and an empty prompt) is decoded after BOS alone: a model
cannot decode from no token at all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from bezoar.eval.decoding import StopStrings
from bezoar.eval.scoring import iter_logprobs, target_logprobs

log = logging.getLogger("bezoar.eval")

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise ValueError(f"model_args {name}={value!r}: expected true or false")


def _as_int(name: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"model_args {name}={value!r}: expected an integer") from None
    if number < minimum:
        raise ValueError(f"model_args {name}={value!r}: must be at least {minimum}")
    return number


def _context_length(folder) -> int | None:
    """max_position_embeddings from a checkpoint folder's config.json (None where it cannot be read: the load
    then says why)."""
    try:
        value = json.loads((Path(folder) / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None


@register_model("bezoar")
class BezoarLM(TemplateLM):
    """An lm-eval ``LM`` over a bezoar model (dense or NF4, with or without a LoRA adapter)."""

    backend = "causal"

    def __init__(
        self,
        pretrained: str | None = None,
        adapter: str | None = None,
        quant: str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str | None = 8,
        max_batch_size: int | None = None,
        max_batch_tokens: int | str = 16384,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str | None = None,
        seed: int | str = 1234,
        decode: str = "auto",
        model=None,
        tokenizer=None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"bezoar model_args: unknown key(s) {', '.join(sorted(unknown))}; known: pretrained, "
                             "adapter, quant, dtype, device, batch_size, max_batch_tokens, max_length, "
                             "max_gen_toks, add_bos_token, seed, decode")
        from bezoar.model import Tokenizer, load

        # Check the cheap arguments before the model loads.
        if batch_size is None or str(batch_size).startswith("auto"):
            self.batch_size = None  # rows bounded by max_batch_tokens only
        else:
            self.batch_size = _as_int("batch_size", batch_size)
        if max_batch_size is not None and self.batch_size is None:
            self.batch_size = _as_int("max_batch_size", max_batch_size)
        self.max_batch_tokens = _as_int("max_batch_tokens", max_batch_tokens)
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = None if add_bos_token in (None, "") else _as_bool("add_bos_token", add_bos_token)
        self.seed = _as_int("seed", seed, minimum=0)

        if device:
            try:
                torch.device(device)
            except RuntimeError:
                raise ValueError(f"model_args device={device!r}: not a torch device (cpu, cuda, cuda:N)") from None
        from bezoar.model.decode import DECODE_MODES

        if decode not in (None, "auto") and decode not in DECODE_MODES:
            raise ValueError(f"model_args decode={decode!r}: choose one of {', '.join(DECODE_MODES)}")
        context = _context_length(pretrained) if model is None and pretrained else None
        if max_length not in (None, "") and context is not None and _as_int("max_length", max_length) > context:
            raise ValueError(f"model_args max_length={max_length} exceeds the model's context of {context}")
        self.adapter = str(adapter) if adapter else None
        self.quant = None if quant in (None, "", "none", "None") else str(quant)
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 unless told otherwise; run where we can.
            log.warning("device=%s asked for, but CUDA is not available: running on the CPU", device)
            device = "cpu"
        if model is None:
            if not pretrained:
                raise ValueError("bezoar model_args: pretrained=DIR (a checkpoint folder) is required")
            if quant in ("", "none", "None"):
                quant = None
            model = load(pretrained, quant=quant, adapter=adapter or None, device=device or None, dtype=dtype or None)
        if tokenizer is None:
            source = pretrained or getattr(model, "source_path", None)
            if source is None:
                raise ValueError("BezoarLM(model=...) needs tokenizer=... or a model loaded from a folder")
            tokenizer = Tokenizer(source)
        self.model = model.eval()
        self.tokenizer = tokenizer
        if self.add_bos_token is None:  # as lm-eval's hf model: the tokenizer's own setting
            self.add_bos_token = getattr(tokenizer, "add_bos", True)
        from bezoar.model.decode import resolve_decode_mode

        resolve_decode_mode(decode, self.model)  # a bad value fails here, before any request runs
        self.decode = decode
        self.pretrained = str(pretrained or getattr(model, "source_path", "") or "")
        self._device = model.device

        context = model.config.max_position_embeddings
        self._max_length = _as_int("max_length", max_length) if max_length not in (None, "") else context
        if self._max_length > context:
            raise ValueError(f"model_args max_length={self._max_length} exceeds the model's context of {context}")

    # ---- what lm-eval asks of a model -------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and the first rolling window) is conditioned on: BOS."""
        bos = self.tokenizer.bos_id
        return bos if bos is not None and bos >= 0 else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.model_file)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def get_model_info(self) -> dict:
        """The model as loaded: its folder, adapter, quantization and dtype, and its parameter count by the
        weights' logical shapes (an NF4 weight's packed bytes are half its values)."""
        cfg = self.model.config
        count = 0
        for module in self.model.modules():
            nf4 = getattr(module, "out_features", None) is not None and hasattr(module, "packed")
            if nf4:
                count += module.out_features * module.in_features
            count += sum(p.numel() for n, p in module.named_parameters(recurse=False))
        return {"model": "bezoar", "pretrained": self.pretrained, "adapter": self.adapter, "quant": self.quant,
                "dtype": str(self.model.dtype), "num_parameters": count, "hidden_size": cfg.hidden_size,
                "num_layers": cfg.num_hidden_layers}

    # ---- loglikelihood ----------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        rows: dict[tuple[int, ...], int] = {}  # model input -> row index
        inputs: list[list[int]] = []
        queries: list[tuple[int, list[int]]] = []  # (row, continuation ids), in request order
        for _, context_ids, continuation_ids in requests:
            if not continuation_ids:
                raise ValueError("loglikelihood: a continuation encodes to no tokens")
            if len(continuation_ids) > self.max_length:
                raise ValueError(f"loglikelihood: a continuation of {len(continuation_ids)} tokens is longer than "
                                 f"max_length={self.max_length}")
            # Too long: drop tokens from the left of the context (the continuation always fits).
            whole = (list(context_ids) + list(continuation_ids))[-(self.max_length + 1):]
            key = tuple(whole[:-1])
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(inputs)
                inputs.append(whole[:-1])
            queries.append((row, list(continuation_ids)))
        # Each row is scored from the earliest position any of its requests needs.
        starts = [len(x) for x in inputs]
        for row, scored in queries:
            starts[row] = min(starts[row], len(inputs[row]) - len(scored))
        by_row: dict[int, list[int]] = {}
        for q, (row, _) in enumerate(queries):
            by_row.setdefault(row, []).append(q)
        results: list[tuple[float, bool] | None] = [None] * len(queries)
        for scored_row in iter_logprobs(self.model, inputs, starts, self.tokenizer.pad_id,
                                        batch_size=self.batch_size, max_batch_tokens=self.max_batch_tokens):
            for q in by_row[scored_row.index]:
                chosen, greedy = target_logprobs(scored_row, queries[q][1])
                results[q] = (float(chosen.sum()), bool(greedy.all()))
                request_text = requests[q][0]
                if request_text is not None:
                    self.cache_hook.add_partial("loglikelihood", request_text, results[q])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for n, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context_ids, continuation_ids in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context_ids, continuation_ids))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, scores):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation -------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from bezoar.model.decode import ContinuousBatch, Sequence

        out: list[str | None] = [None] * len(requests)
        eos_text = self.tokenizer.piece(self.eot_token_id)
        todo: list[tuple[int, list[int], int, GenerationSettings]] = []  # (request, prompt ids, budget, settings)
        settings_of: dict[str, GenerationSettings] = {}
        for i, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            if key not in settings_of:
                settings_of[key] = GenerationSettings.from_gen_kwargs(req.args[1], self.max_gen_toks, eos_text)
            settings = settings_of[key]
            room = self.max_length - settings.max_gen_toks  # the context's cut, as lm-eval's HF model makes it
            if room <= 0:
                raise ValueError(f"generate_until: max_gen_toks={settings.max_gen_toks} leaves no room for a "
                                 f"context in max_length={self.max_length}")
            encoded = self.tok_encode(req.args[0])[-room:]
            if not encoded:  # an empty context without BOS: decoded after BOS alone
                if self.tokenizer.bos_id is None or self.tokenizer.bos_id < 0:
                    raise ValueError(f"generate_until: request {i} has an empty context and the tokenizer no BOS")
                encoded = [self.tokenizer.bos_id]
            # each prompt's own number of new tokens: max_gen_toks, or what gen_kwargs max_length leaves it
            budget = settings.max_gen_toks if settings.max_length is None else \
                max(0, min(settings.max_length, self.max_length) - len(encoded))
            if budget == 0:  # max_length leaves this prompt nothing to add
                self._generated(requests[i], out, i, "")
            else:
                todo.append((i, encoded, budget, settings))
        if not todo:
            return out  # type: ignore[return-value]
        # Continuous batching: a request takes a row as one frees (each with its own budget and settings), the
        # longest prompts first; rows: batch_size, or as many as max_batch_tokens holds at the longest need.
        todo.sort(key=lambda t: -len(t[1]))
        rows = self.batch_size or max(1, self.max_batch_tokens // max(len(e) + b for _, e, b, _ in todo))
        # every EOS the checkpoint lists, as transformers' generate (lm-eval's hf model) stops at any of them
        batch = ContinuousBatch(self.model, rows, self.decode,
                                eos_id=getattr(self.tokenizer, "eos_ids", self.eot_token_id),
                                pad_id=self.tokenizer.pad_id,
                                generator=torch.Generator(device=self.model.device).manual_seed(self.seed))

        def finished(seq: Sequence) -> None:
            if seq.finish == "error":
                raise seq.error
            i, settings = seq.tag
            self._generated(requests[i], out, i, cut_in_list_order(self.tokenizer.decode(seq.new_ids), settings.stop))

        waiting = [Sequence(encoded, budget, settings.temperature, settings.top_p, settings.top_k,
                            should_stop=functools.partial(StopStrings(self.tokenizer, settings.stop), 0),
                            on_done=finished, tag=(i, settings))
                   for i, encoded, budget, settings in todo]
        waiting.reverse()  # popped from the end: longest first
        while waiting or batch.running:
            if waiting and batch.free:
                batch.admit([waiting.pop() for _ in range(min(batch.free, len(waiting)))])
            batch.step()
        return out  # type: ignore[return-value]

    def _generated(self, request, out: list, i: int, text: str) -> None:
        out[i] = text
        self.cache_hook.add_partial("generate_until", request.args, text)


def cut_in_list_order(text: str, stop: list[str]) -> str:
    """The text cut at each stop string in turn, in the task's order, as lm-eval's own models cut it
    (``postprocess_generated_text``): with stop strings that overlap, ["e9", "9e9"] on "9e9e9", that is not
    the cut at the earliest one (``cut_at_stop``, the server's and MT-Bench's rule), and task scores follow
    lm-eval's."""
    for s in stop:
        if s:
            text = text.split(s, 1)[0]
    return text


# ---- generation settings ----------------------------------------------------------------------


#: top_k of a sampling task that names none: transformers' GenerationConfig default, which lm-eval's HF model
#: samples with (it passes the task's gen_kwargs to ``generate``)
HF_TOP_K = 50


@dataclass
class GenerationSettings:
    max_gen_toks: int
    temperature: float
    top_p: float
    stop: list[str]
    top_k: int = 0  # 0: off
    max_length: int | None = None  # gen_kwargs max_length: prompt + new tokens, per prompt (replaces max_gen_toks)

    @classmethod
    def from_gen_kwargs(cls, gen_kwargs: dict, default_max: int, eos_text: str | None,
                        where: str = "generate_until: gen_kwargs") -> "GenerationSettings":
        """lm-eval's generation kwargs (``until``, ``max_gen_toks`` and its aliases, ``do_sample``,
        ``temperature``, ``top_k``, ``top_p``) as bezoar decoding settings. ``top_k`` is applied after the
        temperature and before ``top_p``, as lm-eval's HF model gets it from transformers' ``generate``;
        a sampling task that does not set it (or sets None) gets transformers' default, ``HF_TOP_K`` (50),
        as it does there; 0 is off. A bad value is a ValueError naming its key, after ``where`` (the command
        line passes its flag)."""
        from bezoar.model.decode import check_top_k

        _check_gen_kwargs_types(gen_kwargs, where)  # lm-eval's own conversions fail without naming the key
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, default_max))
        stop = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_p = kwargs.pop("top_p", None)
        top_p = 1.0 if top_p is None else float(top_p)  # 0 keeps the most likely token alone, as in transformers
        if not 0.0 <= top_p <= 1.0:
            raise ValueError(f"{where} top_p={top_p}: must be between 0 and 1")
        max_length = kwargs.pop("max_length", None)
        if max_length is not None:
            try:
                max_length = int(max_length)
            except (TypeError, ValueError):
                raise ValueError(f"{where} max_length={max_length!r}: expected an integer") from None
            if max_length < 1:
                raise ValueError(f"{where} max_length={max_length}: must be at least 1")
            log.warning("generate_until: gen_kwargs max_length=%d counts each prompt's tokens too (transformers' "
                        "meaning, which lm-eval's HF model follows) and replaces max_gen_toks; lm-eval tasks "
                        "name max_gen_toks", max_length)
        top_k = kwargs.pop("top_k", None)
        top_k = HF_TOP_K if top_k is None else top_k
        try:
            check_top_k(top_k)
        except ValueError as e:
            raise ValueError(f"{where} {e}") from None
        if do_sample and temperature <= 0:
            temperature = 1.0  # sampling without a temperature means the plain distribution
        if not do_sample:
            temperature, top_k = 0.0, 0
        ignored = sorted(kwargs)
        if ignored:
            log.warning("generate_until: ignoring generation kwargs bezoar does not implement: %s", ", ".join(ignored))
        return cls(max_gen_toks=max_gen_toks, temperature=temperature, top_p=top_p, stop=[s for s in stop if s],
                   top_k=top_k, max_length=max_length)


#: gen_kwargs keys and the type each must have (lm-eval's normalize_gen_kwargs converts the first ones bare)
GEN_KWARGS_NUMBERS = {"temperature": float, "top_p": float, "max_gen_toks": int, "max_new_tokens": int,
                      "max_tokens": int, "max_completion_tokens": int}


def _check_gen_kwargs_types(gen_kwargs: dict, where: str) -> None:
    """A ValueError naming the key for a number that is not one (``temperature=abc`` was "could not convert
    string to float: 'abc'"), or a ``do_sample`` that is not true or false (``bool("no")`` is True: sampling)."""
    for key, kind in GEN_KWARGS_NUMBERS.items():
        value = gen_kwargs.get(key)
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number) or (kind is int and number != int(number)):
                raise ValueError
        except (TypeError, ValueError):
            want = "an integer" if kind is int else "a number"
            raise ValueError(f"{where} {key}={value!r}: expected {want}") from None
    do_sample = gen_kwargs.get("do_sample")
    if do_sample is not None and do_sample not in (True, False):  # 0 and 1 too
        raise ValueError(f"{where} do_sample={do_sample!r}: expected true or false")


# ---- task plans and the results table --------------------------------------------------------


@dataclass(frozen=True)
class TaskPlan:
    task: str
    num_fewshot: int | None
    metric: str | None = None  # the headline metric (for the average); None: every metric is shown
    #: a group's headline is the plain mean of its tasks' metric (each subject counts once), not lm-eval's group
    #: figure (for mmlu, weighted by each subject's size)
    mean_of_tasks: bool = False


#: Open LLM Leaderboard v1: task, few-shot count, the metric the leaderboard averaged. Its MMLU score was
#: the plain mean of the 57 subjects' accuracies (it averaged every ``hendrycksTest-*`` result it had), where
#: lm-eval's ``mmlu`` group weighs each subject by its number of questions.
PRESETS: dict[str, list[TaskPlan]] = {
    "openllm": [
        TaskPlan("arc_challenge", 25, "acc_norm"),
        TaskPlan("hellaswag", 10, "acc_norm"),
        TaskPlan("truthfulqa_mc2", 0, "acc"),
        TaskPlan("mmlu", 5, "acc", mean_of_tasks=True),
        TaskPlan("winogrande", 5, "acc"),
        TaskPlan("gsm8k", 5, "exact_match,strict-match"),
    ],
}


def make_plan(tasks: list[str] | None, preset: str | None, num_fewshot: int | None) -> list[TaskPlan]:
    """The (task, few-shot) list to run: a preset's, or the named tasks with one few-shot count."""
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        if tasks:
            raise ValueError("give either --preset or --tasks, not both")
        plan = PRESETS[preset]
        if num_fewshot is not None:
            plan = [replace(p, num_fewshot=num_fewshot) for p in plan]
        return plan
    if not tasks:
        raise ValueError("nothing to run: give --tasks NAME[,NAME...] or --preset openllm")
    return [TaskPlan(t, num_fewshot) for t in tasks]


def describe_plan(plan: list[TaskPlan]) -> str:
    lines = ["| task | n-shot | headline metric |", "|---|---|---|"]
    for p in plan:
        shots = "task default" if p.num_fewshot is None else str(p.num_fewshot)
        metric = (p.metric or "all") + (" (plain mean over its tasks)" if p.mean_of_tasks else "")
        lines.append(f"| {p.task} | {shots} | {metric} |")
    return "\n".join(lines)


def _metric_value(task_results: dict, metric: str) -> tuple[float | None, float | None, str | None]:
    """(value, stderr, filter) of ``metric`` in one task's lm-eval results (``"acc,none"`` keys);
    ``metric`` may name the filter too (``"exact_match,strict-match"``), else the first one wins."""
    want_name, _, want_filter = metric.partition(",")
    for key, value in task_results.items():
        name, _, filt = key.partition(",")
        if name == want_name and (not want_filter or filt == want_filter) and isinstance(value, (int, float)):
            stderr = task_results.get(f"{name}_stderr,{filt}")
            return float(value), (float(stderr) if isinstance(stderr, (int, float)) else None), filt
    return None, None, None


def _stderr_text(stderr) -> str:
    return "" if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)) else f"{stderr:.4f}"


def _leaf_tasks(results: dict, group: str) -> list[str]:
    """The tasks (not groups) under ``group`` in lm-eval's ``group_subtasks``, in order; [] for a task."""
    tree = results.get("group_subtasks") or {}
    leaves, todo, seen = [], list(tree.get(group) or []), {group}
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        if tree.get(name):
            todo[:0] = tree[name]
        else:
            leaves.append(name)
    return leaves


def _mean_of_tasks(results: dict, group: str, metric: str) -> tuple[float, float | None, int] | None:
    """(mean, its stderr, count) of ``metric`` over the tasks under ``group``, each task counted once;
    None when the results name no such tasks or one of them lacks the metric."""
    per_task = results.get("results", {})
    leaves = _leaf_tasks(results, group)
    if not leaves:
        return None
    values, errors = [], []
    for leaf in leaves:
        value, stderr, _ = _metric_value(per_task.get(leaf, {}), metric)
        if value is None:
            return None
        values.append(value)
        errors.append(stderr)
    n = len(values)
    stderr = (math.sqrt(sum(e * e for e in errors)) / n
              if all(e is not None and not math.isnan(e) for e in errors) else None)
    return sum(values) / n, stderr, n


def results_table(results: dict, plan: list[TaskPlan] | None = None) -> str:
    """A markdown table of lm-eval's ``results["results"]``; with a preset plan, its headline
    metrics and their average (the leaderboard's score)."""
    per_task = results.get("results", {})
    shots = results.get("n-shot", {})
    lines = ["| task | n-shot | metric | value | stderr |", "|---|---|---|---|---|"]
    headline = []
    planned = {p.task: p for p in plan or []}
    # With a plan, only its tasks (a group such as mmlu shows its aggregate, not its 57 members).
    names = [p.task for p in plan if p.task in per_task] if plan else list(per_task)
    for task in names:
        task_results = per_task[task]
        p = planned.get(task)
        metrics = [p.metric] if p is not None and p.metric else sorted(  # each (metric, filter): gsm8k has two
            {k for k, v in task_results.items()
             if "," in k and isinstance(v, (int, float)) and "_stderr" not in k.partition(",")[0]})
        for metric in metrics:
            value, stderr, filt = _metric_value(task_results, metric)
            if value is None:
                continue
            name = metric.partition(",")[0]
            label = name if filt in (None, "", "none") else f"{name} ({filt})"
            mean = _mean_of_tasks(results, task, metric) if p is not None and p.mean_of_tasks else None
            if mean is not None:  # lm-eval's own group figure first, for reference; the mean is the headline
                lines.append(f"| {task} | {shots.get(task, '')} | {label} (lm-eval: weighted by size) | "
                             f"{value:.4f} | {_stderr_text(stderr)} |")
                value, stderr, count = mean
                label = f"{label} (mean of {count} tasks)"
            lines.append(f"| {task} | {shots.get(task, '')} | {label} | {value:.4f} | {_stderr_text(stderr)} |")
            if p is not None and p.metric:
                headline.append(value)
    if plan and any(p.metric for p in plan) and headline:
        lines.append(f"| **average** | | {len(headline)} of {len(plan)} tasks | {sum(headline) / len(headline):.4f} | |")
    return "\n".join(lines)


def task_manager(include_path: str | None = None, include_defaults: bool = True):
    """lm-eval's task index: its built-in tasks (unless ``include_defaults=False``) and ``include_path``'s."""
    from lm_eval.tasks import TaskManager

    if not include_defaults and not include_path:
        raise ValueError("only --include-path tasks were asked for, but no --include-path was given")
    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def check_tasks(plan: list[TaskPlan], manager) -> None:
    """Fail on a task name lm-eval does not know, before any model loads (lm-eval itself raises a
    bare KeyError only once evaluation starts)."""
    known = set(manager.all_tasks)
    unknown = [p.task for p in plan if p.task not in known and not Path(p.task).is_file()]
    if unknown:
        searched = f" (searched lm-eval's index and --include-path {manager.include_path})" if manager.include_path else ""
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: not an lm-eval task, group, tag or task YAML "
                         f"file{searched}")


#: lm-eval result keys that hold one entry per task (or group): merged across the plan's few-shot groups
PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                 "n-samples", "samples")


def run_plan(lm, plan: list[TaskPlan], limit: float | None = None, include_path: str | None = None,
             include_defaults: bool = True, log_samples: bool = False, bootstrap_iters: int = 100000,
             gen_kwargs: str | None = None, manager=None, on_group=None, earlier: dict | None = None) -> dict:
    """Evaluate ``lm`` on every task of the plan (one ``simple_evaluate`` per few-shot count) and
    merge lm-eval's result dicts: the per-task entries (``PER_TASK_KEYS``) of every group, and the run's own
    record (``config``: model, limit, batch size ...; ``date``, versions) of the first, with ``model_info``
    (bezoar's model: its folder, adapter, quantization, dtype). ``include_defaults=False`` indexes only
    ``include_path``'s tasks; ``manager`` (from ``task_manager``) replaces both. ``on_group(merged, done)``
    is called after each group with the results so far and whether the plan is finished. ``earlier``: the
    results of an interrupted run of the same plan (``output_state``); its finished groups are kept, not
    evaluated again."""
    import lm_eval

    if manager is None:
        manager = task_manager(include_path, include_defaults)
    check_tasks(plan, manager)
    merged: dict[str, Any] = {key: {} for key in PER_TASK_KEYS}
    if hasattr(lm, "get_model_info"):
        merged["model_info"] = lm.get_model_info()
    by_shots: dict[int | None, list[str]] = {}
    for p in plan:
        by_shots.setdefault(p.num_fewshot, []).append(p.task)
    if earlier is not None:
        for key, value in earlier.items():
            if key in PER_TASK_KEYS:
                merged[key].update(value or {})
            elif key not in ("complete", "bezoar_run"):
                merged.setdefault(key, value)
    for n, (shots, tasks) in enumerate(by_shots.items()):
        if earlier is not None and all(task in (earlier.get("results") or {}) for task in tasks):
            continue  # finished before the run was interrupted
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, limit=limit, task_manager=manager,
                                      log_samples=log_samples, bootstrap_iters=bootstrap_iters, gen_kwargs=gen_kwargs)
        if out is not None:
            for key, value in out.items():
                if key in PER_TASK_KEYS:
                    merged[key].update(value or {})
                else:
                    merged.setdefault(key, value)
        if on_group is not None:
            on_group(merged, n == len(by_shots) - 1)
    return merged


def run_identity(args, plan: list[TaskPlan]) -> dict:
    """What the results of ``python -m bezoar.eval harness`` depend on: the plan, the evaluation settings, the
    model and adapter folders as they are on disk (each file's name, size and modification time: a retrained
    model is another model), the ``--include-path`` tasks' files (their content: an edited task YAML is another
    task), and lm-eval's and bezoar's versions. An interrupted run resumes, and a finished one is kept, only under the same
    identity (``output_state``)."""
    import lm_eval

    import bezoar

    from bezoar.fingerprint import fingerprint

    output = Path(args.output).expanduser().resolve() if getattr(args, "output", None) else None

    def own(p: Path) -> bool:
        """The run's own results kept inside the model folder: --output, its temporary and lock files
        (results.json.tmp-PID, results.json.lock) and the earlier results moved aside beside it
        (results.<time>.json); they are not the model."""
        if output is None or p.resolve().parent != output.parent:
            return False
        return (p.name == output.name or p.name.startswith(output.name + ".")
                or (p.name.startswith(output.stem + ".") and p.name.endswith(output.suffix)))

    def folder(path):
        if not path:
            return None
        root = Path(path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file() and not own(p)) if root.is_dir() else []
        return {"path": str(root.resolve()),
                "files": [[str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}

    return {"plan": [[p.task, p.num_fewshot] for p in plan], "model": folder(args.model),
            "adapter": folder(args.adapter), "quant": args.quant, "dtype": args.dtype, "device": args.device,
            "max_length": args.max_length, "model_args": args.model_args, "limit": args.limit,
            "gen_kwargs": args.gen_kwargs, "include_path": args.include_path,
            "include_files": fingerprint(Path(args.include_path)) if args.include_path else None,
            "log_samples": args.log_samples, "lm_eval": getattr(lm_eval, "__version__", ""),
            "bezoar": bezoar.__version__}


#: how ``identity_changes`` names each part of a run's identity
IDENTITY_LABELS = {"plan": "other tasks or few-shot counts", "model": "another --model folder, or its files changed",
                   "adapter": "another --adapter folder, or its files changed",
                   "include_files": "the --include-path task files changed", "lm_eval": "another lm-eval version",
                   "bezoar": "another bezoar version"}


def identity_changes(recorded, run: dict) -> list[str]:
    """What differs between the identity recorded in a results file (``bezoar_run``) and ``run``'s, in words:
    settings as ``--flag: then -> now``, folders and plans by name."""
    if not isinstance(recorded, dict):
        return ["no record of the run"]
    now = json.loads(json.dumps(run, default=str))
    out = []
    for key in sorted(set(now) | set(recorded)):
        then, value = recorded.get(key), now.get(key)
        if then == value:
            continue
        if key in IDENTITY_LABELS:
            out.append(IDENTITY_LABELS[key])
        else:
            out.append(f"--{key.replace('_', '-')}: {then!r} -> {value!r}")
    return out


def output_state(out: Path, run: dict) -> tuple[str, dict | None, str]:
    """What ``--output`` holds, for the run with identity ``run``: ``("none", None, "")`` (no file),
    ``("complete", results, "")`` (this run finished: nothing to evaluate), ``("partial", results, "")`` (this run
    was interrupted: resume from its finished groups), or ``("other", None, why)``: results of another run (other
    tasks, settings or model files), or a file this command did not write; it is to be moved aside
    (``move_aside``), not written over."""
    out = Path(out)
    if not out.exists():
        return "none", None, ""
    try:
        earlier = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return "other", None, "not a results file of this command (unreadable or not JSON)"
    if not isinstance(earlier, dict) or earlier.get("complete") not in (True, False):
        return "other", None, "not a results file of this command"
    changes = identity_changes(earlier.get("bezoar_run"), run)
    if changes:
        if earlier.get("bezoar_run") is None:
            return "other", None, "results without a record of the run that wrote them"
        return "other", None, f"results of another run ({'; '.join(changes)})"
    return ("complete" if earlier["complete"] else "partial"), earlier, ""


def move_aside(path: Path) -> Path:
    """Rename ``path`` to a free timestamped name beside it (``results.json`` ->
    ``results.20250101-120000.json``) and return the new name: earlier results are kept, never written over."""
    import os
    import time

    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
    os.rename(path, dest)
    return dest


def write_results(results: dict, out: Path, log_samples: bool, complete: bool = True) -> None:
    """``results`` as JSON at ``out``, whole or not at all (a temporary file, fsynced, then renamed over it);
    ``complete`` False marks the results of a run still going (``"complete": false``)."""
    import os

    record = {k: v for k, v in results.items() if log_samples or k != "samples"}
    record["complete"] = complete
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # its own: another writer's rename cannot take it
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(record, indent=2, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
