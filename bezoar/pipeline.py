"""python -m bezoar.pipeline: a whole recipe end to end: generate, filter, train, evaluate, report.

    python -m bezoar.pipeline --recipe openbezoar --out RUN [key=value ...]      run (or continue) it
    python -m bezoar.pipeline --recipe openbezoar --out RUN --dry-run            the steps, and what is left
    python -m bezoar.pipeline --recipe openbezoar --out RUN --report-only        rewrite RUN/report.md only

The recipe (``bezoar/recipes/<name>/recipe.toml``, see :mod:`bezoar.train.recipe`) gives the
training stages and the ``[generate]`` / ``[evaluate]`` tables. The steps, in order, each in its own
folder under the run root:

    generate:<scheme>   RUN/data/<scheme>/raw.jsonl         python -m bezoar.generate lamini|orca|evol
    filter:<scheme>     RUN/data/<scheme>/filtered.jsonl    python -m bezoar.generate filter (the LLM judge)
    train:<stage>       RUN/<stage>/ (adapter, merged)      the recipe's stages, as python -m bezoar.train --recipe
    harness:<stage>     RUN/eval/<stage>/harness/           python -m bezoar.eval harness
    mt-bench:<stage>    RUN/eval/<stage>/mt_bench/          python -m bezoar.eval mt-bench
    report              RUN/report.md, RUN/report/*.png     rewritten at the end of every run

A training stage is complete when its ``summary.json`` exists; every other step when its marker
``<kind>.step.json`` exists, written after the command succeeded, with the settings it ran with and a
fingerprint of each local input it read: size and sha256 of a file's content (of every file, for a
folder), and for a stage's model the fingerprint of the stage's ``summary.json``, written once, last,
when the stage completes (cheap, and unchanged by a copy or a moved run root, where weights would take
minutes to hash). A training stage the pipeline runs records its inputs in ``RUN/<stage>/pipeline-inputs.json``
when it starts from step 0 and again when it completes. Hub names (datasets, MT-Bench questions) and a base
model that is not a stage's are not fingerprinted. A complete step is skipped; an unfinished one is run again and
continues from what it stored (the client pool's stores for generation, filtering and judging, the
newest checkpoint for training, the answers file for MT-Bench), so rerunning the same command after a
crash or a kill finishes the run. A complete step whose settings have changed since is an error
(remove its marker to redo it); for a training stage the settings are those its ``config.toml``
records, less the ones that only change how a run is watched or kept (progress, logging, eval and
checkpoint intervals), with its paths inside the run root compared relative to the root (so a moved run
root changes no stage's settings either), and the way to redo it is to remove the stage's folder. A setting added to
bezoar after a marker was written reads as what the step ran with then (``RECORDED_BEFORE``: MT-Bench's
``top_k`` as 0). MT-Bench's answers are resumed only under the settings they were made with
(``answers.jsonl.settings.json``): a step run again after its answer settings changed moves them, and the
results from them, to ``stale-<time>/`` and answers again (``--dry-run`` says ``to run (its answers were made
with other settings: ...)``); a settings file that cannot be read stops the run before anything runs.

A complete step is stale when its inputs are not what it ran on: one differs from the fingerprint it
recorded (``raw.jsonl`` or a data file edited, a stage trained again), or the step of the recipe that
writes one of them is to run (its marker or folder was removed to redo it), or is stale itself. Then:

- a filter, harness or MT-Bench step runs again (``--dry-run`` says ``to run (input changed: ...)``):
  the judge stores are keyed by request content, so only requests that changed are sent to a judge
  (new or edited records, new answers; all of them under an edited judge template), and the harness
  and the answers are local compute. A stale evaluation's earlier results
  move to ``stale-<time>/`` in its folder, with MT-Bench's ``answers.jsonl`` when the model or the
  questions changed (it is kept by question id, so a rerun would otherwise reuse it);
- a generation step or a training stage stops the run before anything runs, with an error naming the
  step, the input and the folder or marker to remove to redo it: generation pays the teacher again for
  every request that changed and replaces its output, training takes hours, and neither should start
  because a file was touched. A training stage with checkpoints but not complete is judged the same way
  against what it started from: it never resumes on another base model or other data.

A step that recorded no fingerprints (completed before the pipeline recorded them) counts as unchanged
unless a step before it is to run; a stage trained with ``python -m bezoar.train`` recorded the stage it
starts from (``inputs.json``), and only that. An input that is gone (removed to save space) does not count
as changed. No data and no stored answer is deleted.

Overrides: ``generate.KEY=VALUE`` and ``evaluate.KEY=VALUE`` set the recipe's tables (e.g.
``generate.teacher.base_url=http://gpu1:8000/v1``); any other ``KEY=VALUE`` goes to every training
stage and ``<stage>.KEY=VALUE`` to one, as with ``python -m bezoar.train --recipe`` (a stage named like a
table of the stage config, ``dpo``, leaves the table's keys addressable: ``bezoar.train.recipe`` says how).

Commands run in this process, one after another, so a kill stops everything at once. API keys are
read from the environment by the client pool (OPENAI_API_KEY, ANTHROPIC_API_KEY or the variable an
endpoint's ``api_key_env`` names; a compat endpoint gets a key only from its ``api_key_env``); before
anything runs, the variables the remaining steps need are checked to be set.

Failed requests: a generation or filter command whose requests partly ended as recorded failures exits
with status 1, its outputs written without them; the pipeline completes that step all the same (a few
failed requests do not stop a paid run) and logs how to send them again: remove the step's marker and
rerun (its command passes ``--retry-failed``). Judge calls of MT-Bench that failed stop the run instead,
and a rerun sends them again. Any other non-zero exit stops the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from bezoar.config import ConfigError, to_dict
from bezoar.fingerprint import fingerprint
from bezoar.locking import Held, hold
from bezoar.train.recipe import (EndpointSection, Recipe, load_recipe, split_overrides, stage_configs)
from bezoar.train.run import INPUTS, check_length

if TYPE_CHECKING:
    from bezoar.train.config import StageConfig

PACKAGE = Path(__file__).resolve().parent
DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow", ".txt")
STAGE_RECORD = "pipeline-inputs.json"  # a training stage completed by the pipeline: the fingerprints of its inputs
# What a complete step whose inputs changed becomes. Filter and evaluation steps run again: the judge stores
# are keyed by request content (only what changed is sent), and the harness and the answers are local compute.
# Generation (the teacher, paid, its whole output replaced) and training (hours) stop the run instead.
REDO_WHEN_STALE = ("filter", "harness", "mt-bench")
# Settings added since markers were first written, with what a marker without them ran with: such a marker
# reads as that, not as a changed setting, and a recipe that now says otherwise names both values.
LOCK_FILE = "pipeline.lock"  # in the run root, held while a pipeline runs (``_lock``)
RECORDED_BEFORE = {"mt_bench.top_k": 0}  # MT-Bench answers sampled from every token before top_k existed


class PipelineError(RuntimeError):
    """A step failed or cannot start; the message says which and what to do."""


@dataclass
class Step:
    name: str  # "generate:lamini", "train:orca", ...
    kind: str  # generate | filter | train | harness | mt-bench
    target: str  # the scheme or the stage
    out: Path  # the step's folder
    inputs: list[str]
    status: str = "to run"  # "done", "to run", or "resume ..." (something is stored already)
    settings: dict = field(default_factory=dict)  # what the marker records and a rerun compares
    changed: list[str] = field(default_factory=list)  # settings that differ from the complete step's marker
    data: str = ""  # train steps: the resolved data path
    config: StageConfig | None = None  # train steps: the StageConfig (its run folder's config.toml is what it ran with)
    run: Callable[[], None] | None = None
    sources: list[Source] = field(default_factory=list)  # the local inputs it reads, fingerprinted when it completes
    stale: list[str] = field(default_factory=list)  # why a complete step's inputs are not what it ran on
    set_aside: bool = False  # mt-bench: its answers.jsonl came from another model or other questions
    changed_answers: list[str] = field(default_factory=list)  # mt-bench: settings its answers were made without
    answers_error: str = ""  # mt-bench: why what its answers were made with cannot be told (it stops the run)

    @property
    def done(self) -> bool:
        return self.status == "done"

    @property
    def marker(self) -> Path:
        return self.out / f"{self.kind}.step.json"

    @property
    def record(self) -> Path:
        """Where the input fingerprints of the complete step are: its marker, or a training stage's record."""
        return self.out / STAGE_RECORD if self.kind == "train" else self.marker


@dataclass
class Source:
    """One local input of a step: a file or folder, or the model a training stage finished with."""

    key: str  # its name in the record: a path relative to the run root, as the recipe wrote it, or model:<stage>
    path: Path  # what is fingerprinted (for a model: the stage's summary.json)
    label: str  # how messages name it
    upstream: str | None = None  # the step of this recipe that writes it
    answers: bool = False  # mt-bench: the answers depend on it (set aside when it changed)


# ---- paths -------------------------------------------------------------------------------------


def resolve_path(text: str, root: Path) -> str:
    """``{root}`` -> the run root; ``bezoar:x`` -> x inside the installed package; else unchanged."""
    text = text.replace("{root}", str(root))
    if text.startswith("bezoar:"):
        return str(PACKAGE / text.split(":", 1)[1])
    return text


def looks_local(text: str) -> bool:
    """A file path rather than a ``datasets`` hub name (the rule bezoar.generate applies)."""
    path = Path(text)
    return path.exists() or text.startswith(("/", ".", "~")) or path.suffix.lower() in DATA_SUFFIXES


def relative(path: Path | str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ---- inputs and their fingerprints ---------------------------------------------------------------

def file_source(spec: str, root: Path, producers: dict[Path, str], answers: bool = False) -> Source | None:
    """The input a recipe path names, when it is local (a hub name is not fingerprinted)."""
    if not spec:
        return None
    resolved = resolve_path(spec, root)
    if not looks_local(resolved):
        return None
    path = Path(resolved).expanduser()
    key = spec if spec.startswith("bezoar:") else relative(path, root)
    return Source(key, path, key, producers.get(path.resolve()), answers)


def model_source(stage: str, root: Path, answers: bool = False) -> Source:
    """A stage's model as an input: its summary.json, written once, last, when the stage completes, names the
    adapter and the merged model it wrote (hashing gigabytes of weights on every plan would not be cheap)."""
    return Source(f"model:{stage}", root / stage / "summary.json", f"the model of stage {stage}", f"train:{stage}",
                  answers)


def input_fingerprints(step: Step) -> dict[str, dict]:
    """``{source key: fingerprint}`` of the step's inputs that exist now."""
    out = {}
    for source in step.sources:
        fp = fingerprint(source.path)
        if fp is not None:
            out[source.key] = fp
    return out


def recorded_inputs(step: Step) -> dict | None:
    """The fingerprints the step recorded; None when it recorded none (completed before the pipeline recorded
    them): unknown, and taken as unchanged. A training stage's base stage is also read from the stage's own
    record (``bezoar.train.run.INPUTS``, written by ``python -m bezoar.train`` too), where the pipeline's has none."""
    try:
        inputs = json.loads(step.record.read_text()).get("inputs")
    except (OSError, ValueError, AttributeError):
        inputs = None
    inputs = dict(inputs) if isinstance(inputs, dict) else None
    if step.kind == "train":
        try:
            base = json.loads((step.out / INPUTS).read_text()).get("base_summary")
        except (OSError, ValueError, AttributeError):
            base = None
        model = next((src.key for src in step.sources if src.key.startswith("model:")), None)
        if isinstance(base, dict) and model is not None and model not in (inputs or {}):
            inputs = {**(inputs or {}), model: base}
    return inputs


def _size_change(then, now: dict) -> str:
    if isinstance(then, dict) and "size" in then and then["size"] != now.get("size"):
        return f" ({then['size']} -> {now['size']} bytes)"
    return ""


def _partly_trained(step: Step) -> bool:
    """A training stage with checkpoints that is not complete: it would resume from them."""
    return step.kind == "train" and step.status.startswith("resume")


def refused_stale(step: Step) -> bool:
    """A stale step that stops the run rather than run again: a complete generation step, or a training stage that
    is complete or has checkpoints (resuming those on another base model or other data would mix two runs)."""
    return bool(step.stale) and (step.done or _partly_trained(step))


def _mark_stale(steps: list[Step]) -> None:
    """A complete step is stale when an input it recorded differs now, or when the step of this recipe that writes
    one of its inputs is to run (or stale itself); so is a training stage with checkpoints, against the inputs
    it recorded when it started. Steps come in order, writers before readers."""
    by_name = {s.name: s for s in steps}
    for step in steps:
        if not (step.done or _partly_trained(step)):
            continue
        recorded = recorded_inputs(step) or {}
        reasons, answers = [], False
        for source in step.sources:
            writer = by_name.get(source.upstream) if source.upstream else None
            if writer is not None and not writer.done:
                reasons.append(f"{writer.name} runs first and rewrites {source.label}")
            elif writer is not None and writer.stale:
                reasons.append(f"{source.label} comes from {writer.name}, which is stale")
            elif source.key in recorded:
                now = fingerprint(source.path)
                if now is None or now == recorded[source.key]:
                    continue  # gone (removed to save space, say) is not changed: nothing tells it is stale
                reasons.append(f"input changed: {source.label}{_size_change(recorded[source.key], now)}")
            else:
                continue
            answers = answers or source.answers
        if not reasons:
            continue
        step.stale = reasons
        if step.kind in REDO_WHEN_STALE and not step.changed:  # changed settings: that error comes first
            step.set_aside = answers and (step.out / "answers.jsonl").exists()
            note = "; its answers are set aside" if step.set_aside else ""
            step.status = f"to run ({'; '.join(reasons)}{note})"


# ---- command lines -----------------------------------------------------------------------------


def pool_args(endpoint: EndpointSection, progress: bool) -> list[str]:
    """The client-pool flags of an endpoint. (Generation and filter steps also pass --retry-failed: a step is
    only run while unfinished, and then the requests its store holds as failures get another chance; evol
    leaves alone the failures a later stored epoch was built on, so no paid answer is asked for again.)"""
    args = ["--provider", endpoint.provider, "--model", endpoint.model, "--concurrency", str(endpoint.concurrency),
            "--timeout", f"{endpoint.timeout:g}", "--max-attempts", str(endpoint.max_attempts)]
    for url in endpoint.urls:
        args += ["--base-url", url]
    if endpoint.api_key_env:
        args += ["--api-key-env", endpoint.api_key_env]
    if endpoint.rpm is not None:
        args += ["--rpm", f"{endpoint.rpm:g}"]
    if endpoint.tpm is not None:
        args += ["--tpm", f"{endpoint.tpm:g}"]
    if endpoint.price:
        args += ["--price", f"{endpoint.price[0]:g}", f"{endpoint.price[1]:g}"]
    if not progress:
        args.append("--no-progress")
    return args


def _sampling_args(table) -> list[str]:
    args = ["--seed", str(table.seed)]
    if table.temperature is not None:
        args += ["--temperature", f"{table.temperature:g}"]
    if table.max_tokens is not None:
        args += ["--max-tokens", str(table.max_tokens)]
    return args


def _template_args(templates: dict[str, str], root: Path) -> list[str]:
    args = []
    for name, path in templates.items():
        args += ["--template", f"{name}={resolve_path(path, root)}"]
    return args


def scheme_inputs(scheme: str, table) -> list[str]:
    if scheme == "lamini":
        return [x for x in (table.seeds, table.topics) if x]
    if scheme == "evol":
        return [table.seeds]
    return [x for x in (table.queries, table.system_messages) if x]


def generate_argv(scheme: str, table, teacher: EndpointSection, out: Path, root: Path, progress: bool) -> list[str]:
    if scheme == "lamini":
        args = ["lamini", resolve_path(table.seeds, root), "--split", table.split,
                "--example-guided", str(table.example_guided), "--examples", str(table.examples),
                "--topics-per-prompt", str(table.topics_per_prompt), "--per-request", str(table.per_request),
                "--similarity", f"{table.similarity:g}"]
        if table.topics:
            args += ["--topics", resolve_path(table.topics, root)]
        if table.topic_guided is not None:
            args += ["--topic-guided", str(table.topic_guided)]
        args += _template_args(table.templates, root)
    elif scheme == "evol":
        args = ["evol", resolve_path(table.seeds, root), "--split", table.split, "--epochs", str(table.epochs)]
        if table.limit is not None:
            args += ["--limit", str(table.limit)]
        args += _template_args(table.templates, root)
    else:
        args = ["orca", resolve_path(table.queries, root), "--split", table.split]
        if table.cap_per_task is not None:
            args += ["--cap-per-task", str(table.cap_per_task)]
        for sub, cap in table.caps.items():
            args += ["--cap", f"{sub}={cap}"]
        if table.system_messages:
            args += ["--system-messages", resolve_path(table.system_messages, root)]
    return args + ["--out", str(out)] + _sampling_args(table) + pool_args(teacher, progress) + ["--retry-failed"]


def filter_argv(gen, out: Path, root: Path, progress: bool) -> list[str]:
    args = ["filter", str(out / "raw.jsonl"), "--out", str(out), "--threshold", f"{gen.filter.threshold:g}"]
    if gen.filter.max_tokens is not None:
        args += ["--max-tokens", str(gen.filter.max_tokens)]
    if gen.filter.template:
        args += ["--template", resolve_path(gen.filter.template, root)]
    return args + pool_args(gen.judge, progress) + ["--retry-failed"]


def _model_args(section, model: dict) -> list[str]:
    args = ["--model", model["model"]]
    if model.get("adapter"):
        args += ["--adapter", model["adapter"]]
    if section.quant != "none":
        args += ["--quant", section.quant]
    if section.dtype:
        args += ["--dtype", section.dtype]
    if section.device:
        args += ["--device", section.device]
    return args


def harness_argv(section, model: dict, out: Path, tasks_dir: Path | None) -> list[str]:
    return (["harness"] + _model_args(section, model) + harness_settings_argv(section, tasks_dir)
            + ["--output", str(out / "results.json")])


def harness_settings_argv(section, tasks_dir: Path | None) -> list[str]:
    """The harness flags of ``section`` but for the model's and the output's."""
    args = []
    if section.preset:
        args += ["--preset", section.preset]
    if section.tasks:
        args += ["--tasks", ",".join(section.tasks)]
    if section.num_fewshot is not None:
        args += ["--num-fewshot", str(section.num_fewshot)]
    if section.limit is not None:
        args += ["--limit", f"{section.limit:g}"]
    if tasks_dir is not None:
        args += ["--include-path", str(tasks_dir)]
    if not section.builtin_tasks:
        args.append("--no-builtin-tasks")
    args += ["--batch-size", str(section.batch_size), "--max-batch-tokens", str(section.max_batch_tokens)]
    if section.max_length is not None:
        args += ["--max-length", str(section.max_length)]
    if section.gen_kwargs:
        args += ["--gen-kwargs", section.gen_kwargs]
    return args


def mt_bench_argv(section, model: dict, model_id: str, out: Path, root: Path) -> list[str]:
    judge = section.judge
    args = ["mt-bench"] + _model_args(section, model) + [
        "--model-id", model_id, "--questions", resolve_path(section.questions, root), "--split", section.split,
        "--out", str(out), "--max-new-tokens", str(section.max_new_tokens), "--batch-size", str(section.batch_size),
        "--seed", str(section.seed), "--top-k", str(section.top_k), "--judge-model", judge.model,
        "--judge-provider", judge.provider, "--concurrency", str(judge.concurrency)]
    if section.reference:
        args += ["--reference", resolve_path(section.reference, root)]
    if section.judge_prompts:
        args += ["--judge-prompts", resolve_path(section.judge_prompts, root)]
    if judge.urls:
        args += ["--judge-base-url", judge.urls[0]]
    if judge.api_key_env:
        args += ["--judge-api-key-env", judge.api_key_env]
    if judge.rpm is not None:
        args += ["--rpm", f"{judge.rpm:g}"]
    if judge.tpm is not None:
        args += ["--tpm", f"{judge.tpm:g}"]
    return args


# ---- the plan ----------------------------------------------------------------------------------


def _endpoint_identity(endpoint: EndpointSection) -> dict:
    """What of an endpoint changes the answers (where and how fast it is reached does not)."""
    return {"provider": endpoint.provider, "model": endpoint.model}


def _plain(section, drop=("enabled",)) -> dict:
    d = to_dict(section)
    for key in drop:
        d.pop(key, None)
    return d


def _marker_status(step: Step) -> None:
    """Set ``status`` (and ``changed``) of a marker-completed step from what is on disk."""
    if step.marker.exists():
        try:
            recorded = json.loads(step.marker.read_text()).get("settings", {})
        except (OSError, ValueError):
            recorded = None
        if recorded is None:
            step.status = "to run"  # an unreadable marker: the step is run again
            return
        step.status = "done"
        flat_now, flat_then = _flatten(step.settings), _flatten(recorded)
        flat_then = {**{k: v for k, v in RECORDED_BEFORE.items() if k in flat_now}, **flat_then}
        step.changed = [f"{k}: {flat_then.get(k)!r} -> {flat_now.get(k)!r}"
                        for k in sorted(set(flat_now) | set(flat_then)) if flat_now.get(k) != flat_then.get(k)]
        return
    if step.kind in ("generate", "filter"):
        # The scheme's stores and the filter's share work/: judge.jsonl is the filter's.
        stores = [p for p in step.out.glob("work/*.jsonl") if (p.name == "judge.jsonl") == (step.kind == "filter")]
        stored = sum(_count_lines(p) for p in stores)
        if stored:
            step.status = f"resume ({stored} answers stored)"
    elif step.kind == "mt-bench":
        answers = step.out / "answers.jsonl"
        judged = step.out / "judge_store.jsonl"
        if answers.exists() or judged.exists():
            n = _count_lines(answers) if answers.exists() else 0
            j = _count_lines(judged) if judged.exists() else 0
            step.status = f"resume ({n} questions answered, {j} judgments stored)"
        if answers.exists():
            try:
                if _answers_made_otherwise(step):
                    step.status = (f"to run (its answers were made with other settings: "
                                   f"{'; '.join(step.changed_answers)}; they are set aside)")
            except PipelineError as e:  # the plan (and the report) is still made; preflight stops the run
                step.answers_error = str(e)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plan(recipe: Recipe, root: Path, overrides: list[str], progress: bool = False, log=print) -> list[Step]:
    """Every step of the recipe with its status on disk (nothing is run)."""
    root = Path(root)
    _, stage_overrides = split_overrides(list(overrides))
    steps: list[Step] = []
    producers: dict[Path, str] = {}  # the files steps of this recipe write -> the step
    gen = recipe.generate
    if gen is not None:
        for scheme, table in gen.schemes():
            out = root / "data" / scheme
            step = Step(f"generate:{scheme}", "generate", scheme, out, scheme_inputs(scheme, table),
                        settings={scheme: _plain(table), "teacher": _endpoint_identity(gen.teacher)})
            step.run = _generate_runner(scheme, table, gen.teacher, out, root, progress, log)
            step.sources = [x for _, value in _scheme_files(scheme, table)
                            if (x := file_source(value, root, producers))]
            steps.append(step)
            producers[(out / "raw.jsonl").resolve()] = step.name
            step = Step(f"filter:{scheme}", "filter", scheme, out, [relative(out / "raw.jsonl", root)],
                        settings={"filter": _plain(gen.filter), "judge": _endpoint_identity(gen.judge)})
            step.run = _filter_runner(gen, out, root, progress, log)
            step.sources = [x for x in (file_source(str(out / "raw.jsonl"), root, producers),
                                        file_source(gen.filter.template, root, producers)) if x]
            steps.append(step)
            for name in ("filtered.jsonl", "judged.jsonl"):
                producers[(out / name).resolve()] = step.name
    # A stage's config is the one python -m bezoar.train --recipe derives (a stage trained there continues here):
    # an evaluated stage that does not merge is evaluated as its base with its adapter (eval_model).
    evaluated = {}  # stage -> (what the evaluations read, the stage it starts from)
    for stage, cfg in stage_configs(recipe, root, stage_overrides):
        evaluated[stage.name] = (f"{stage.name} ({'merged' if cfg.merge else 'base + adapter'})", stage.start_from)
        out = Path(cfg.out)
        start = f"{stage.start_from} (merged)" if stage.start_from else cfg.model.path
        step = Step(f"train:{stage.name}", "train", stage.name, out, [start, relative(cfg.data.path, root)],
                    data=cfg.data.path)
        step.run = _train_runner(cfg, root, log)
        step.config = cfg
        step.sources = ([model_source(stage.start_from, root)] if stage.start_from else []) + [
            x for x in (file_source(cfg.data.path, root, producers), file_source(cfg.eval_path, root, producers)) if x]
        steps.append(step)
    evaluate = recipe.evaluate
    for name in recipe.eval_stages():
        base = root / "eval" / name
        model_label, start_from = evaluated[name]
        if evaluate.harness is not None and evaluate.harness.enabled:
            out = base / "harness"
            step = Step(f"harness:{name}", "harness", name, out, [model_label],
                        settings={"harness": _plain(evaluate.harness)})
            step.run = _harness_runner(evaluate.harness, root, name, start_from, out)
            step.sources = [model_source(name, root)] + [
                x for x in (file_source(evaluate.harness.include_path, root, producers),) if x]
            steps.append(step)
        if evaluate.mt_bench is not None and evaluate.mt_bench.enabled:
            out = base / "mt_bench"
            section = evaluate.mt_bench
            settings = _plain(section, drop=("enabled", "judge"))
            settings["judge"] = _endpoint_identity(section.judge)
            step = Step(f"mt-bench:{name}", "mt-bench", name, out, [model_label, section.questions],
                        settings={"mt_bench": settings})
            step.run = _mt_bench_runner(section, root, f"{recipe.name}-{name}", name, start_from, out)
            # answers.jsonl is kept by question id: answers of another model or to other questions are set aside
            step.sources = [model_source(name, root, answers=True)] + [
                x for x in (file_source(section.questions, root, producers, answers=True),
                            file_source(section.reference, root, producers),
                            file_source(section.judge_prompts, root, producers)) if x]
            steps.append(step)
    from bezoar.train.loop import list_checkpoints
    from bezoar.train.run import RESUME_FREE, config_changes, describe_changes, is_complete

    for step in steps:
        if step.kind == "train":
            if is_complete(step.out):
                step.status = "done"
                # The stage's config.toml is its marker's settings: compared like those of the other steps.
                changed = config_changes(step.out, step.config, root=root)
                step.changed = [describe_changes({k: v}) for k, v in changed.items()]
            elif checkpoints := list_checkpoints(step.out):
                step.status = f"resume from step {checkpoints[-1][0]}"
                # its settings, but for its length (a resumed run may be lengthened): preflight stops on a change
                changed = config_changes(step.out, step.config, RESUME_FREE, root=root)
                step.changed = [describe_changes({k: v}) for k, v in changed.items()]
        else:
            _marker_status(step)
    _mark_stale(steps)
    return steps


# ---- running each kind of step -----------------------------------------------------------------


def _call(module_main, argv: list[str], step: str, failures_ok: str | None = None, log=print) -> None:
    """Run a command's ``main``; a non-zero exit stops the run, except exit status 1 of a generation or filter
    command (requests that ended as recorded failures, their outputs written without them) when ``failures_ok``
    is given: the step completes and ``failures_ok`` is logged."""
    code = module_main(argv)
    if code == 130:  # the command said where it stopped; the pipeline stops as interrupted too (exit 130)
        raise KeyboardInterrupt(step)
    if code == 1 and failures_ok is not None:
        log(f"[{step}] {failures_ok}")
        return
    if code:
        raise PipelineError(f"{step}: the command stopped with exit status {code} (its message is above); fix the "
                            "cause and rerun the same command to continue")


def _failures_note(out: Path, root: Path, kind: str, output: str) -> str:
    return (f"the step completes with the requests that ended as failures (counted above) left out of {output}, as "
            f"a few failures should not stop a paid run; to send them again, remove "
            f"{relative(out / f'{kind}.step.json', root)} and rerun")


def _generate_runner(scheme, table, teacher, out, root, progress, log=print):
    def run():
        from bezoar.generate.__main__ import main as generate_main

        _call(generate_main, generate_argv(scheme, table, teacher, out, root, progress), f"generate:{scheme}",
              _failures_note(out, root, "generate", "raw.jsonl"), log)
    return run


def _filter_runner(gen, out, root, progress, log=print):
    def run():
        from bezoar.generate.__main__ import main as generate_main

        _call(generate_main, filter_argv(gen, out, root, progress), f"filter:{out.name}",
              _failures_note(out, root, "filter", "filtered.jsonl (they are in judge-failures.jsonl)"), log)
    return run


def _train_runner(cfg, root, log):
    def run():
        from bezoar.train.run import run_stage

        run_stage(cfg, resume=True, log=log, root=root)
    return run


def eval_model(root: Path, stage: str, start_from: str | None = None) -> dict:
    """The model a stage produced: its merged folder, else (a stage with merge = false) its adapter on the base it
    trained on. Both are looked for under the run root as named now, which may not be where the stage ran: the
    adapter in the stage's folder and, for a stage that starts from ``start_from``, that stage's merged model;
    any other base is the one its ``summary.json`` names."""
    merged = root / stage / "merged"
    if (merged / "config.json").exists():
        return {"model": str(merged)}
    summary = root / stage / "summary.json"
    adapter = root / stage / "adapter"
    if summary.exists() and (adapter / "adapter_config.json").exists():
        base = str(root / start_from / "merged") if start_from else json.loads(summary.read_text()).get("base_model")
        if base:
            return {"model": base, "adapter": str(adapter)}
    raise PipelineError(f"stage {stage}: neither {merged} nor a finished adapter to evaluate; run its training first")


def render_tasks(include_path: str, root: Path, dest: Path) -> Path:
    """Copy the task YAML files of ``include_path`` to ``dest`` with ``{here}`` replaced by that folder, so
    task files can name their data files relative to themselves."""
    source = Path(resolve_path(include_path, root))
    if not source.is_dir():
        raise ConfigError(f"evaluate.harness.include_path: {source} is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.yaml")):
        text = path.read_text(encoding="utf-8").replace("{here}", str(source.resolve()))
        (dest / path.name).write_text(text, encoding="utf-8")
    return dest


def _harness_runner(section, root, stage, start_from, out):
    def run():
        from bezoar.eval.__main__ import main as eval_main

        tasks = render_tasks(section.include_path, root, out / "tasks") if section.include_path else None
        _call(eval_main, harness_argv(section, eval_model(root, stage, start_from), out, tasks), f"harness:{stage}")
    return run


def _mt_bench_runner(section, root, model_id, stage, start_from, out):
    def run():
        from bezoar.eval.__main__ import main as eval_main

        _call(eval_main, mt_bench_argv(section, eval_model(root, stage, start_from), model_id, out, root),
              f"mt-bench:{stage}")
        results = json.loads((out / "results.json").read_text())
        if results.get("failed"):
            raise PipelineError(f"mt-bench:{stage}: {results['failed']} judge calls failed (see "
                                f"{out / 'judgments.jsonl'}); rerun the same command to send them again")
    return run


def write_marker(step: Step, seconds: float, inputs: dict | None = None) -> None:
    """The step's completion record: its marker (the settings it ran with and the fingerprints of its inputs,
    ``inputs`` or, when None, those on disk now) or, for a training stage, its STAGE_RECORD (the fingerprints)."""
    record = {"step": step.name} if step.kind == "train" else {"step": step.name, "settings": step.settings}
    record.update(inputs=input_fingerprints(step) if inputs is None else inputs, seconds=round(seconds, 2),
                  finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    _write_record(step, record)


def _write_record(step: Step, record: dict) -> None:
    """``record`` as the step's record file, replaced whole (a kill leaves the old one or the new one)."""
    step.out.mkdir(parents=True, exist_ok=True)
    tmp = step.record.with_name(step.record.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, step.record)


def write_start_record(step: Step, inputs: dict) -> None:
    """A training stage starting from step 0: its STAGE_RECORD with the fingerprints of the inputs it starts from
    (and no ``finished``), which a plan compares before resuming its checkpoints; ``write_marker`` replaces it
    when the stage completes."""
    _write_record(step, {"step": step.name, "inputs": inputs, "started": time.strftime("%Y-%m-%d %H:%M:%S")})


def set_aside(step: Step) -> Path | None:
    """Move the results of a stale evaluation (and, where they came from another model or other questions, its
    MT-Bench answers, which a rerun would otherwise keep) to ``stale-<time>/`` in its folder. Nothing is deleted:
    the judge store stays where it is, so answers judged before are not paid again."""
    names = ["results.json"] if step.kind == "harness" else ["judgments.jsonl", "results.md", "results.json",
                                                              "categories.png"]
    if step.kind == "mt-bench" and step.set_aside:
        names += ["answers.jsonl", "answers.jsonl.settings.json"]
    present = [name for name in names if (step.out / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = step.out / f"stale-{stamp}", 1
    while dest.exists():
        n += 1
        dest = step.out / f"stale-{stamp}-{n}"
    dest.mkdir()
    for name in present:
        os.replace(step.out / name, dest / name)
    return dest


def _answers_made_otherwise(step: Step) -> bool:
    """Whether an MT-Bench step's answers.jsonl holds answers made with settings other than the step's
    (``step.changed_answers`` then says which)."""
    from bezoar.eval import mt_bench as mt

    s = step.settings["mt_bench"]
    try:
        step.changed_answers = mt.answer_settings_changes(
            step.out / "answers.jsonl", mt.answer_settings(s["max_new_tokens"], s["seed"], s["top_k"], s["quant"],
                                                           s["dtype"], s["device"]))
    except mt.MTBenchError as e:  # an unreadable settings file or answers file: one line, no traceback
        raise PipelineError(f"{step.name}: {e}") from None
    return bool(step.changed_answers)


def execute(step: Step, root: Path, log=print) -> None:
    """Run one step that is not done and record its completion (with the inputs as they were when it started)."""
    inputs = input_fingerprints(step)
    if step.stale and step.kind in REDO_WHEN_STALE:
        if step.kind in ("harness", "mt-bench"):
            moved = set_aside(step)
            if moved is not None:
                log(f"[{step.name}] earlier results{' and answers' if step.set_aside else ''} moved to "
                    f"{relative(moved, root)}")
        step.marker.unlink(missing_ok=True)  # after the set-aside: a kill in between leaves the step stale
    if step.kind == "mt-bench" and _answers_made_otherwise(step):
        # answers made with other settings (the marker was removed after they changed): the answers and the
        # results from them move aside, and the step answers again; the judge store stays
        step.set_aside = True
        moved = set_aside(step)
        log(f"[{step.name}] answers made with other settings ({'; '.join(step.changed_answers)}) and the "
            f"results from them moved to {relative(moved, root)}")
    if step.kind == "train" and not _partly_trained(step):
        write_start_record(step, inputs)  # what its checkpoints are checked against should it be resumed
    started = time.time()
    step.run()
    write_marker(step, time.time() - started, inputs)
    step.status = "done"
    step.stale = []


# ---- checks before anything runs ----------------------------------------------------------------


AFTER_REDO = ("; the steps after it that read what it writes then run again too, except a complete training "
              "stage, which stops the run until its folder is removed as well")


def preflight(recipe: Recipe, root: Path, steps: list[Step]) -> None:
    """Stop early, with one message, on what would otherwise fail hours into a run."""
    changed = [s for s in steps if s.done and s.changed]
    if changed:
        s = changed[0]
        if s.kind == "train":
            redo = f"Remove the stage's folder {s.out} to train it again"
        else:
            redo = (f"Remove {s.marker} to run it again (stored answers are reused where the settings they "
                    "were made with still hold, and set aside where not)")
        raise PipelineError(f"step {s.name} is complete but the recipe's settings for it changed since "
                            f"({'; '.join(s.changed[:4])}). {redo}{AFTER_REDO}, or use another --out.")
    started = [s for s in steps if s.kind == "train" and not s.done and s.changed]
    if started:  # run_stage would refuse its --resume only once the stages before it have run
        s = started[0]
        raise PipelineError(f"step {s.name} has checkpoints ({s.status}) but the recipe's settings for it changed "
                            f"since it started ({'; '.join(s.changed[:4])}). Put them back to continue it, or remove "
                            f"the stage's folder {s.out} to train it from step 0{AFTER_REDO}, or use another --out.")
    for s in steps:  # a started stage whose max_steps is now below its last checkpoint: run_stage would refuse it
        if s.kind == "train" and not s.done and s.status.startswith("resume"):
            try:
                check_length(s.out, s.config)
            except ConfigError as e:
                raise PipelineError(f"step {s.name}: {e}") from None
    stale = [s for s in steps if refused_stale(s)]  # generate and train: refused rather than redone
    if stale:
        s = stale[0]
        if s.kind == "train":
            also = [t for t in stale if t.kind == "train" and t is not s]
            redo = f"Remove the stage's folder {s.out} to train it again{'' if s.done else ' from step 0'}" + (
                f" (these {'complete ' if all(t.done for t in also) else ''}stages are stale too: remove "
                f"{', '.join(str(t.out) for t in also)} as well)" if also else "")
            what = "trained on"
        else:
            redo = (f"Remove {s.marker} to generate again (its stores are reused: only requests that changed are "
                    f"sent){AFTER_REDO}")
            what = "generated from"
        restore = ", or put the input back as it was" if any(r.startswith("input changed") for r in s.stale) else ""
        if not s.done:  # a training stage with checkpoints
            raise PipelineError(f"step {s.name} has checkpoints ({s.status}) but its inputs are not what it started "
                                f"from ({'; '.join(s.stale[:4])}), so it cannot resume from them. {redo}{restore}, "
                                "or use another --out.")
        raise PipelineError(f"step {s.name} is complete but its inputs are not what it was {what} "
                            f"({'; '.join(s.stale[:4])}). {redo}{restore}, or use another --out.")
    left = [s for s in steps if not s.done]
    unreadable = [s for s in left if s.answers_error]
    if unreadable:
        raise PipelineError(unreadable[0].answers_error)
    gen = recipe.generate
    needs_key: dict[str, str] = {}
    for s in left:
        if s.kind == "generate":
            table = getattr(gen, s.target)
            for label, value in _scheme_paths(s.target, table):
                path = resolve_path(value, root)
                if looks_local(path) and not Path(path).expanduser().exists():
                    raise ConfigError(f"{recipe.path}: generate.{s.target}.{label}: {path} not found")
            if not gen.teacher.model:
                raise ConfigError(f"{recipe.path}: generate.teacher.model is not set")
            needs_key.update(_key_needed(gen.teacher, "generate.teacher"))
        elif s.kind == "filter":
            if gen.filter.template and not Path(resolve_path(gen.filter.template, root)).expanduser().exists():
                raise ConfigError(f"{recipe.path}: generate.filter.template: "
                                  f"{resolve_path(gen.filter.template, root)} not found")
            if not gen.judge.model:
                raise ConfigError(f"{recipe.path}: generate.judge.model is not set")
            needs_key.update(_key_needed(gen.judge, "generate.judge"))
        elif s.kind == "harness" and recipe.evaluate.harness.include_path:
            folder = Path(resolve_path(recipe.evaluate.harness.include_path, root))
            if not folder.is_dir():
                raise ConfigError(f"{recipe.path}: evaluate.harness.include_path: {folder} is not a folder")
        elif s.kind == "mt-bench":
            section = recipe.evaluate.mt_bench
            if not section.questions:
                raise ConfigError(f"{recipe.path}: evaluate.mt_bench.questions is not set")
            path = resolve_path(section.questions, root)
            if looks_local(path) and not Path(path).expanduser().exists():
                raise ConfigError(f"{recipe.path}: evaluate.mt_bench.questions: {path} not found")
            for label in ("reference", "judge_prompts"):
                value = getattr(section, label)
                if value and not Path(resolve_path(value, root)).expanduser().exists():
                    raise ConfigError(f"{recipe.path}: evaluate.mt_bench.{label}: {resolve_path(value, root)} not found")
            if not section.judge.model:
                raise ConfigError(f"{recipe.path}: evaluate.mt_bench.judge.model is not set")
            needs_key.update(_key_needed(section.judge, "evaluate.mt_bench.judge"))
    made = {(s.out / "filtered.jsonl").resolve() for s in steps if s.kind == "filter"}
    inside = root.resolve()
    for s in left:
        if s.kind == "train" and Path(s.data).is_absolute():
            path = Path(s.data).resolve()
            if inside in path.parents and path not in made and not path.exists():
                raise ConfigError(f"stage {s.target} reads {path}, which does not exist and which no generation "
                                  "step of this recipe writes (is its [generate.<scheme>] table missing or disabled?)")
    # as the steps read it: stripped (a key of spaces, set by mistake, fails there after hours of other steps)
    missing = {var: who for var, who in needs_key.items() if not os.environ.get(var, "").strip()}
    if missing:
        var, who = next(iter(missing.items()))
        state = "is empty" if var in os.environ else "is not set"
        raise ConfigError(f"{who} needs an API key in the environment variable {var}, which {state} "
                          f"(set it, or name another variable with {who}.api_key_env)")
    harness = recipe.evaluate.harness if recipe.evaluate is not None else None
    if harness is not None and harness.enabled and any(s.kind == "harness" and not s.done for s in steps):
        check_harness_tasks(harness, root)


def check_harness_tasks(section, root: Path) -> None:
    """The harness step's own checks of its settings, task names included (a misspelt task otherwise stops the
    run after every stage has trained), on the task files as the step renders them. Indexing lm-eval's own
    tasks takes some seconds; without lm-eval installed nothing is checked here (its step then says so)."""
    import importlib.util
    import tempfile

    if importlib.util.find_spec("lm_eval") is None:
        return
    from lm_eval.utils import simple_parse_args_string

    from bezoar.eval import harness

    tasks = None
    try:
        plan = harness.make_plan(section.tasks or None, section.preset or None, section.num_fewshot)
        if section.gen_kwargs:
            harness.GenerationSettings.from_gen_kwargs(simple_parse_args_string(section.gen_kwargs), 256, None,
                                                       where="gen_kwargs")
        with tempfile.TemporaryDirectory() as tmp:
            tasks = render_tasks(section.include_path, root, Path(tmp) / "tasks") if section.include_path else None
            manager = harness.task_manager(str(tasks) if tasks else None, include_defaults=section.builtin_tasks)
            harness.check_tasks(plan, manager)
    except ValueError as e:
        why = str(e) if tasks is None else str(e).replace(str(tasks), section.include_path)
        raise ConfigError(f"evaluate.harness: {why}") from None


def _scheme_files(scheme: str, table) -> list[tuple[str, str]]:
    """(key, path) of each file a scheme's table names (unset ones included)."""
    if scheme == "lamini":
        pairs = [("seeds", table.seeds), ("topics", table.topics)]
    elif scheme == "evol":
        pairs = [("seeds", table.seeds)]
    else:
        pairs = [("queries", table.queries), ("system_messages", table.system_messages)]
    return pairs + [(f"templates.{k}", v) for k, v in getattr(table, "templates", {}).items()]


def _scheme_paths(scheme: str, table) -> list[tuple[str, str]]:
    pairs = _scheme_files(scheme, table)
    for label, value in pairs:
        if label in ("seeds", "queries") and not value:
            raise ConfigError(f"generate.{scheme}.{label} is not set")
    return [(label, value) for label, value in pairs if value]


def _key_needed(endpoint: EndpointSection, where: str) -> dict[str, str]:
    if endpoint.provider == "compat":
        return {endpoint.api_key_env: where} if endpoint.api_key_env else {}
    return {endpoint.api_key_env or DEFAULT_KEY_ENV[endpoint.provider]: where}


# ---- the run -----------------------------------------------------------------------------------


def describe(steps: list[Step], root: Path, stops: bool = False) -> str:
    """The dry run's table of steps. ``stops``: a run would stop before its first step (preflight's error, which the
    caller prints), so the last line says that rather than what a run would do."""
    lines = []
    for s in steps:
        redo = "the stage's folder" if s.kind == "train" else "the marker"
        status = s.status + (f" (settings changed since: remove {redo} to redo)" if s.changed else "")
        if refused_stale(s):
            status += f" (stale: remove {redo} to redo)"
        lines.append(f"  {s.name:<20} {status:<38} -> {relative(s.out, root)}")
        lines.append(f"  {'':<20} from {', '.join(s.inputs)}")
        if refused_stale(s):
            lines.append(f"  {'':<20} stale: {'; '.join(s.stale)}")
    left = [s for s in steps if not s.done]
    if stops:
        lines.append("steps left: " + (", ".join(s.name for s in left) if left else "none")
                     + "; but a run stops before its first step, on the error below")
    elif left:
        lines.append("steps left: " + ", ".join(s.name + ("" if s.status == "to run" else f" ({s.status})")
                                                for s in left) + "; then the report")
    else:
        lines.append("steps left: none (every step is complete; a run only rewrites the report)")
    return "\n".join(lines)


def run_pipeline(recipe_name: str, root, overrides: list[str], log=print, progress: bool | None = None) -> Path:
    """Run every step that is not complete, in order, then write the report. Returns the run root."""
    from bezoar.report import write_report

    root = Path(root)
    recipe = load_recipe(recipe_name, overrides)
    progress = sys.stderr.isatty() if progress is None else progress
    # The lock first, then the plan: a plan made before it could be out of date by the time the lock is held (a
    # pipeline that held it ran steps meanwhile), and this run would redo them or resume from what they left.
    made = [p for p in [root, *root.parents] if not p.exists()]  # the folders the lock's mkdir creates
    root.mkdir(parents=True, exist_ok=True)
    lock = _lock(root)
    try:
        steps = plan(recipe, root, overrides, progress=progress, log=log)
        preflight(recipe, root, steps)
    except BaseException:  # refused before anything ran: leave the disk as it was
        if lock is not None:
            lock.close()
        _remove_made(root, made)
        raise
    log(f"recipe {recipe.name} -> {root.resolve()}")
    try:
        for step in steps:
            if step.done:
                log(f"[{step.name}] done already ({relative(step.out, root)})")
                continue
            log(f"[{step.name}] {step.status} -> {relative(step.out, root)}")
            execute(step, root, log)
    finally:
        try:
            report = write_report(recipe, root, plan(recipe, root, overrides, log=log))
            log(f"report: {report}")
        except Exception as e:  # the report must never hide why a step stopped
            log(f"report: could not be written ({type(e).__name__}: {e})")
        if lock is not None:
            lock.close()
    return root


def _remove_made(root: Path, made: list[Path]) -> None:
    """Remove the folders in ``made`` (a new run root and the parents created with it, innermost first) when they
    hold nothing but the run's lock: a run refused before its first step leaves no trace."""
    lock = root / LOCK_FILE
    if root in made and lock.exists() and [p.name for p in root.iterdir()] == [lock.name]:
        lock.unlink()
    for folder in made:
        try:
            folder.rmdir()
        except OSError:  # not empty (or not ours to remove): kept
            return


def _lock(root: Path):
    """Hold an exclusive advisory lock on RUN/pipeline.lock while running (``bezoar.locking.hold``), so that
    two pipelines never write one run root."""
    try:
        return hold(root / LOCK_FILE)
    except Held as e:
        raise PipelineError(f"{root}: another pipeline is running on this run root (pid {e.pid}); wait for it or "
                            "stop it first") from None


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m bezoar.pipeline",
        description="Run a recipe end to end: synthetic data (generate, judge filter), the training stages, "
                    "evaluation (lm-eval harness, MT-Bench) and a report. Rerun the same command to continue.",
        epilog="Examples:\n  python -m bezoar.pipeline --recipe openbezoar_tiny --out runs/tiny\n"
               "  python -m bezoar.pipeline --recipe openbezoar --out runs/ob --dry-run\n"
               "  python -m bezoar.pipeline --recipe openbezoar --out runs/ob \\\n"
               "      generate.teacher.base_url=http://gpu1:8000/v1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="generate.* / evaluate.* set the recipe's tables; other keys go to the training stages "
                        "(<stage>.key=value to one stage)")
    p.add_argument("--recipe", default="openbezoar", metavar="NAME|DIR",
                   help="a shipped recipe (openbezoar, openbezoar_tiny) or a folder with recipe.toml "
                        "(default openbezoar)")
    p.add_argument("--out", metavar="DIR", help="the run root (default runs/<recipe>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true",
                   help="print every step, its inputs and outputs and whether it is done, to run (with why, for a "
                        "complete step whose inputs changed) or to resume, then the error a run would stop on "
                        "before its first step, if any; run nothing")
    g.add_argument("--report-only", action="store_true", help="rewrite RUN/report.md from what is on disk")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars of the generation commands (default: when stderr is a terminal)")
    return p.parse_intermixed_args(argv)  # flags may sit between the overrides (scripts/openbezoar.sh puts its own first)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    from bezoar.config import environment_error

    if (why := environment_error()) is not None:
        print(f"bezoar.pipeline: error: {why}", file=sys.stderr)
        return 2
    from bezoar.data import DataError
    from bezoar.generate.request import GenerateError
    from bezoar.model import CheckpointError, ConfigError as ModelConfigError, TokenizerError
    from bezoar.model.lora import AdapterError
    from bezoar.train.loop import TrainingError

    expected = (ConfigError, DataError, CheckpointError, ModelConfigError, TokenizerError, AdapterError, TrainingError,
                GenerateError, PipelineError, FileExistsError)
    root = Path(args.out or f"runs/{Path(args.recipe).name}")
    try:
        if args.dry_run or args.report_only:
            # Without the lock: taking it creates RUN/pipeline.lock, and a dry run writes nothing. What it shows is
            # the disk as it is now, which a pipeline running on the root may change next.
            recipe = load_recipe(args.recipe, args.overrides)
            steps = plan(recipe, root, args.overrides)
            if args.report_only:
                from bezoar.report import write_report

                if not root.is_dir():  # a mistyped root: no folder made, no report of nothing
                    raise PipelineError(f"--out {root}: no such run root (--report-only reports on a run that "
                                        "exists)")

                print(f"report: {write_report(recipe, root, steps)}")
                return 0
            print(f"recipe {recipe.name}: {recipe.description}\nrun root: {root.resolve()}")
            try:
                preflight(recipe, root, steps)  # what would stop a run before its first step stops this one too
            except expected:
                print(describe(steps, root, stops=True), flush=True)
                raise
            print(describe(steps, root), flush=True)
            return 0
        from bezoar.signals import terminate_as_interrupt

        with terminate_as_interrupt():  # a SIGTERM stores the answers in flight, as Ctrl-C does
            run_pipeline(args.recipe, root, args.overrides, progress=args.progress)
        print(f"run root: {root.resolve()}\nreport: {(root / 'report.md').resolve()}")
        return 0
    except expected as e:
        print(f"bezoar.pipeline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not e.args:  # a command that stopped on it (_call: its step's name) has said so itself
            print("bezoar.pipeline: interrupted; rerun the same command to continue from what is stored",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
