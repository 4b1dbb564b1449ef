"""Recipes: an ordered list of stages, each starting from the merged model of the one before.

A recipe is a folder with ``recipe.toml``::

    description = "..."
    [[stages]]
    name = "lamini"            # the stage's folder under the run root
    config = "lamini.toml"     # a stage config (bezoar.train.config.StageConfig), relative to the recipe
    start_from = "..."         # optional: the stage whose <root>/<name>/merged is this stage's model.path

Every stage writes to ``<root>/<name>``; a stage whose ``summary.json`` exists is skipped (an error
when the ``config.toml`` it recorded differs from the stage's settings now), and one that stopped half
way resumes from its newest checkpoint, so rerunning a recipe continues where it stopped. Paths inside
the run root (the merged model a stage starts from, ``{root}`` data) are compared relative to it, so a
run root that was moved, or is named absolutely after relatively, keeps its stages. Overrides
``key=value`` apply to every stage; ``<stage>.key=value`` to that stage only. A stage named like a table
of the stage config (both shipped DPO recipes name their DPO stage ``dpo``) leaves that table's keys
addressable: ``dpo.beta=0.2`` is the key ``beta`` of the ``[dpo]`` table, for every stage (an SFT stage
reads nothing of it), and ``dpo.optim.lr=1e-5`` or ``dpo.dpo.beta=0.2`` address the stage ``dpo``: the
rest of the override is read as a key of the table when the table has it, else as a key of the stage.

Two more tables describe the steps around training, run by ``python -m bezoar.pipeline`` (the
trainer itself ignores them): ``[generate]`` (the teacher and judge endpoints, the filter, and
one table per generation scheme: ``lamini``, ``evol``, ``orca``) and ``[evaluate]`` (which
stages' models to evaluate, ``harness`` and ``mt_bench``: a stage's merged model, or its base with its
adapter where the stage does not merge). Their keys are the fields of
:class:`GenerateSection` and :class:`EvaluateSection` below; unknown keys and wrong types are
errors naming the key and its line. Overrides ``generate.KEY=VALUE`` and ``evaluate.KEY=VALUE``
set them from the command line. In their paths, ``{root}`` is the run root and ``bezoar:x`` a
file inside the installed package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from bezoar.config import ConfigError, load_config, parse_override

from .config import StageConfig
from .loop import list_checkpoints
from .run import (RESUME_FREE, base_changed, check_base, check_complete, check_started, config_changes,
                  describe_changes, is_complete)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
#: Top-level tables of recipe.toml that belong to the pipeline, not to the training stages.
PIPELINE_TABLES = ("generate", "evaluate")
SCHEMES = ("lamini", "orca", "evol")  # generation schemes, in the order the pipeline runs them


# ---- [generate] and [evaluate]: the pipeline's steps around training ------------------------------


@dataclass
class EndpointSection:
    """One LLM reached through the client pool: ``provider`` openai / anthropic (their SDKs, their
    public APIs unless ``base_url``) or compat (any OpenAI-compatible server at ``base_url``)."""

    provider: Literal["openai", "anthropic", "compat"] = "openai"
    model: str = ""
    base_url: str | list[str] = ""  # "" = the provider's public API; a list spreads requests over servers
    api_key_env: str = ""  # variable holding the key; "" = OPENAI_API_KEY / ANTHROPIC_API_KEY (compat: no key)
    concurrency: int = 64  # requests in flight
    rpm: float | None = None  # requests per minute (absent: no limit)
    tpm: float | None = None  # tokens (in + out) per minute (absent: no limit)
    timeout: float = 600.0  # seconds per attempt
    max_attempts: int = 8
    price: list[float] = field(default_factory=list)  # [input, output] USD per million tokens: shows the cost

    def __post_init__(self):
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.price and len(self.price) != 2:
            raise ValueError(f"price takes two numbers, [input, output] USD per million tokens, got {self.price}")

    @property
    def urls(self) -> list[str]:
        urls = [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)
        return [u for u in urls if u]


def _check_templates(templates: dict[str, str], module: str) -> None:
    """Template names of a scheme's ``templates`` table are the ones its command uses."""
    import importlib

    names = importlib.import_module(module).TEMPLATES
    for name in templates:
        if name not in names:
            raise ValueError(f"templates: unknown template {name!r}; this scheme uses {', '.join(names)}")


def _at_least(table, names: tuple[str, ...], low) -> None:
    """Each named field of ``table`` that is set must be at least ``low``: refused when the recipe loads, not when
    its step runs (after the paid or hour-long steps before it)."""
    for name in names:
        value = getattr(table, name)
        if value is not None and not value >= low:
            raise ValueError(f"{name} must be at least {low}, got {value}")


@dataclass
class SchemeCommon:
    enabled: bool = True
    seed: int = 0  # seed of every random choice of the scheme
    temperature: float | None = None  # absent: the command's default
    max_tokens: int | None = None  # per teacher answer; absent: the command's default

    def _check_sampling(self) -> None:
        _at_least(self, ("max_tokens",), 1)
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")


@dataclass
class LaminiSection(SchemeCommon):
    seeds: str = ""  # seed examples with 'instruction': a file or a datasets name
    split: str = "train"
    topics: str = ""  # topic list (one per line); "" = example-guided requests only
    example_guided: int = 10  # list requests showing seed examples
    topic_guided: int | None = None  # list requests naming topics (absent: 10 with topics, else 0)
    examples: int = 3  # seed examples per request
    topics_per_prompt: int = 3
    per_request: int = 20  # instructions asked for per request
    similarity: float = 0.7  # ROUGE-L F1 at or above which an instruction is a near-duplicate
    templates: dict[str, str] = field(default_factory=dict)  # lamini_examples / lamini_topics -> your own file

    def __post_init__(self):
        self._check_sampling()
        _at_least(self, ("example_guided", "topic_guided"), 0)
        _at_least(self, ("examples", "topics_per_prompt", "per_request"), 1)
        if not 0.0 < self.similarity <= 1.0:
            raise ValueError(f"similarity must be in (0, 1], got {self.similarity}")
        _check_templates(self.templates, "bezoar.generate.lamini")


@dataclass
class EvolSection(SchemeCommon):
    seeds: str = ""  # dolly-15k-format seeds: a file or a datasets name
    split: str = "train"
    epochs: int = 4  # rounds of evolution
    limit: int | None = None  # the first N seeds only
    templates: dict[str, str] = field(default_factory=dict)  # evol_depth / evol_breadth / evol_equal -> your file

    def __post_init__(self):
        self._check_sampling()
        _at_least(self, ("epochs", "limit"), 1)
        _check_templates(self.templates, "bezoar.generate.evol")


@dataclass
class OrcaSection(SchemeCommon):
    queries: str = ""  # FLAN queries (question, sub_collection, task): a file or a datasets name
    split: str = "train"
    cap_per_task: int | None = None  # at most N queries per task
    caps: dict[str, int] = field(default_factory=dict)  # per sub-collection, e.g. {niv2 = 300}
    system_messages: str = ""  # your own 16 system messages (JSON list); "" = the shipped ones

    def __post_init__(self):
        from bezoar.generate.orca import SUB_ALIASES, SUB_COLLECTIONS

        self._check_sampling()
        for sub, cap in self.caps.items():
            if sub.lower().replace("_", "").replace("-", "").replace(" ", "") not in SUB_ALIASES:
                raise ValueError(f"caps: unknown sub-collection {sub!r}; use one of {', '.join(SUB_COLLECTIONS)}")
            if cap < 1:
                raise ValueError(f"caps.{sub} must be at least 1, got {cap}")
        if self.cap_per_task is not None and self.cap_per_task < 1:
            raise ValueError(f"cap_per_task must be at least 1, got {self.cap_per_task}")


@dataclass
class FilterSection:
    threshold: float = 7.0  # keep records the judge scores at or above this (1-10)
    max_tokens: int | None = None  # per judge reply; absent: the command's default
    template: str = ""  # your own judge prompt file; "" = the shipped one

    def __post_init__(self):
        if not 1.0 <= self.threshold <= 10.0:
            raise ValueError(f"threshold must be between 1 and 10, got {self.threshold:g}")
        _at_least(self, ("max_tokens",), 1)


@dataclass
class GenerateSection:
    teacher: EndpointSection = field(default_factory=EndpointSection)
    judge: EndpointSection = field(default_factory=EndpointSection)
    filter: FilterSection = field(default_factory=FilterSection)
    lamini: LaminiSection | None = None
    orca: OrcaSection | None = None
    evol: EvolSection | None = None

    def schemes(self) -> list[tuple[str, SchemeCommon]]:
        """(name, table) of every enabled scheme, in the order they run."""
        out = []
        for name in SCHEMES:
            table = getattr(self, name)
            if table is not None and table.enabled:
                out.append((name, table))
        return out


@dataclass
class EvalModelSection:
    quant: Literal["none", "nf4"] = "none"  # nf4: quantize the merged model on load
    dtype: str = ""  # "" = by device (bf16 on GPU, fp32 on CPU)
    device: str = ""  # "" = cuda when present


@dataclass
class HarnessSection(EvalModelSection):
    enabled: bool = True
    preset: str = ""  # "openllm": the Open LLM Leaderboard v1 tasks and shots
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (instead of a preset)
    num_fewshot: int | None = None  # overrides the preset's counts
    limit: float | None = None  # examples per task (a fraction when < 1)
    include_path: str = ""  # folder of task YAML files; {here} in them is that folder
    builtin_tasks: bool = True  # false: index only include_path's tasks (faster start)
    batch_size: int | str = 8  # rows per forward, or "auto"
    max_batch_tokens: int = 16384
    max_length: int | None = None
    gen_kwargs: str = ""  # k=v,k=v for generate_until tasks

    def __post_init__(self):
        if bool(self.preset) == bool(self.tasks) and self.enabled:
            raise ValueError("give either preset or tasks")
        _at_least(self, ("num_fewshot",), 0)
        _at_least(self, ("max_batch_tokens", "max_length"), 1)
        if self.limit is not None and not (0 < self.limit < 1 or 1 <= self.limit < math.inf
                                           and self.limit == int(self.limit)):
            raise ValueError(f"limit must be a whole number of examples (1 or more) or a fraction (below 1), got "
                             f"{self.limit}")
        size = str(self.batch_size).strip()  # as the harness reads it: a count, or lm-eval's auto / auto:N
        if not (size.startswith("auto") or size.isdigit() and int(size) >= 1):
            raise ValueError(f"batch_size must be at least 1, or \"auto\", got {self.batch_size!r}")


@dataclass
class MTBenchSection(EvalModelSection):
    enabled: bool = True
    questions: str = ""  # FastChat question.jsonl, or a datasets name
    split: str = "train"
    reference: str = ""  # reference answers file; "" = the questions' own 'reference' field
    judge_prompts: str = ""  # FastChat judge_prompts.jsonl; "" = bezoar's
    max_new_tokens: int = 1024
    batch_size: int = 8
    seed: int = 0
    top_k: int = 50  # sampled categories draw from the k most likely tokens (FastChat's, via transformers); 0 = all
    judge: EndpointSection = field(default_factory=EndpointSection)

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or more, got {self.top_k}")
        _at_least(self, ("max_new_tokens", "batch_size"), 1)


@dataclass
class EvaluateSection:
    stages: list[str] = field(default_factory=list)  # whose models to evaluate; [] = the last stage
    harness: HarnessSection | None = None
    mt_bench: MTBenchSection | None = None


@dataclass
class RecipeFile:
    """What recipe.toml may hold (stages are checked by hand for clearer messages)."""

    description: str = ""
    stages: list[dict[str, Any]] = field(default_factory=list)
    generate: GenerateSection | None = None
    evaluate: EvaluateSection | None = None


# ---- the recipe ------------------------------------------------------------------------------------


@dataclass
class RecipeStage:
    name: str
    config: Path
    start_from: str | None = None


@dataclass
class Recipe:
    folder: Path
    description: str
    stages: list[RecipeStage]
    generate: GenerateSection | None = None
    evaluate: EvaluateSection | None = None

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def path(self) -> Path:
        return self.folder / "recipe.toml"

    def eval_stages(self) -> list[str]:
        if self.evaluate is None:
            return []
        return list(self.evaluate.stages) or [self.stages[-1].name]


def find_recipe(name_or_dir: str) -> Path:
    path = Path(name_or_dir).expanduser()
    if (path / "recipe.toml").exists():
        return path
    if (RECIPES / name_or_dir / "recipe.toml").exists():
        return RECIPES / name_or_dir
    known = sorted(p.name for p in RECIPES.iterdir() if (p / "recipe.toml").exists())
    raise ConfigError(f"recipe {name_or_dir!r}: not a folder with recipe.toml, nor a shipped recipe ({', '.join(known)})")


def _config_tables() -> tuple[dict[str, set[str]], set[str]]:
    """({table of the stage config: its keys}, the stage config's own keys)."""
    from dataclasses import fields, is_dataclass

    defaults = StageConfig()
    tables = {f.name: {g.name for g in fields(getattr(defaults, f.name))} for f in fields(StageConfig)
              if is_dataclass(getattr(defaults, f.name))}
    return tables, {f.name for f in fields(StageConfig)}


def addressed_stage(text: str, names: set[str]) -> str | None:
    """The stage that override ``text`` addresses (``<stage>.key=value``), or None when it goes to every stage.

    For a stage named like a table of the stage config (``dpo``), ``<name>.key`` is that table's key when the
    table has one (``dpo.beta``: every stage's ``dpo.beta``), else the stage's (``dpo.optim.lr``,
    ``dpo.dpo.beta``); a key of neither is an error that quotes the override and shows both forms."""
    key, _ = parse_override(text)
    head, dot, rest = key.partition(".")
    if not dot or head not in names:
        return None
    tables, stage_keys = _config_tables()
    if head not in tables:
        return head
    first = rest.split(".", 1)[0]
    if first in tables[head]:
        return None
    if first in stage_keys:
        return head
    raise ConfigError(f"override {text!r}: {head!r} is both a stage of this recipe and a table of the stage config, "
                      f"and {first!r} is a key of neither: {head}.KEY=VALUE sets KEY of the [{head}] table in every "
                      f"stage (one of {', '.join(sorted(tables[head]))}); {head}.SECTION.KEY=VALUE sets a key of stage "
                      f"{head!r} only (e.g. {head}.optim.lr=1e-5, {head}.{head}.{sorted(tables[head])[0]}=...)")


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(recipe-level overrides: generate.* and evaluate.*, stage overrides: the rest)."""
    tables, stages = [], []
    for text in overrides:
        key, _ = parse_override(text)
        (tables if key.split(".", 1)[0] in PIPELINE_TABLES else stages).append(text)
    return tables, stages


def load_recipe(name_or_dir: str, overrides: list[str] = ()) -> Recipe:
    """Read and check recipe.toml; ``overrides`` (``generate.*``, ``evaluate.*``) set its tables."""
    folder = find_recipe(name_or_dir)
    path = folder / "recipe.toml"
    tables, _ = split_overrides(list(overrides))
    data = load_config(RecipeFile, path, tables)
    stages, names = [], set()
    for i, entry in enumerate(data.stages):
        where = f"{path}: stages[{i}]"
        extra = set(entry) - {"name", "config", "start_from"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}")
        if "name" not in entry or "config" not in entry:
            raise ConfigError(f"{where}: needs 'name' and 'config'")
        for key in ("name", "config", "start_from"):
            if key in entry and not isinstance(entry[key], str):
                raise ConfigError(f"{where}: {key!r} must be a string, got {entry[key]!r}")
        if entry["name"] in ("", ".", "..") or "/" in entry["name"] or "\\" in entry["name"]:
            raise ConfigError(f"{where}: stage name {entry['name']!r} is not a folder name (the stage writes to "
                              "<run root>/<name>): give one name, without / or \\, other than . and ..")
        if entry["name"] in PIPELINE_TABLES:
            raise ConfigError(f"{where}: a stage may not be named {entry['name']!r} (the name of a recipe table)")
        start = entry.get("start_from")
        if start is not None and start not in names:
            raise ConfigError(f"{where}: start_from {start!r} is not an earlier stage")
        if entry["name"] in names:
            raise ConfigError(f"{where}: stage name {entry['name']!r} is used twice")
        cfg_path = folder / entry["config"]
        if not cfg_path.exists():
            raise ConfigError(f"{where}: config file {cfg_path} not found")
        names.add(entry["name"])
        stages.append(RecipeStage(entry["name"], cfg_path, start))
    if not stages:
        raise ConfigError(f"{path}: no [[stages]]")
    if data.evaluate is not None:
        for name in data.evaluate.stages:
            if name not in names:
                raise ConfigError(f"{path}: evaluate.stages names {name!r}, which is not a stage of this recipe "
                                  f"({', '.join(s.name for s in stages)})")
        judge = data.evaluate.mt_bench.judge if data.evaluate.mt_bench is not None else None
        if judge is not None and len(judge.urls) > 1:
            raise ConfigError(f"{path}: evaluate.mt_bench.judge.base_url: MT-Bench judging takes one URL")
    return Recipe(folder, data.description, stages, data.generate, data.evaluate)


def stage_configs(recipe: Recipe, root: Path, overrides: list[str]) -> list[tuple[RecipeStage, StageConfig]]:
    names = {s.name for s in recipe.stages}
    _, overrides = split_overrides(list(overrides))  # generate.* / evaluate.* are the pipeline's
    addressed = {text: addressed_stage(text, names) for text in overrides}
    out = []
    for stage in recipe.stages:
        mine, shown = [], {}
        for text in overrides:
            key, _ = parse_override(text)
            target = addressed[text]
            if target is not None:
                if target != stage.name:
                    continue
                key = key.split(".", 1)[1]
                shown[text.split(".", 1)[1]] = text  # errors quote the override as typed
                mine.append(text.split(".", 1)[1])
            else:
                mine.append(text)
            # The recipe sets these itself (below): an override of them would be dropped without a word.
            if key == "out":
                raise ConfigError(f"override {text!r}: a recipe writes each stage to <run root>/<stage name>; "
                                  "choose the run root with --out")
            if key == "model.path" and stage.start_from and target == stage.name:
                raise ConfigError(f"override {text!r}: stage {stage.name!r} starts from the merged model of stage "
                                  f"{stage.start_from!r} (start_from in {recipe.path})")
        forced = [f"out={root / stage.name}"]
        if stage.start_from:
            forced.append(f"model.path={root / stage.start_from / 'merged'}")
        cfg = load_config(StageConfig, stage.config, mine + forced, shown=shown)
        cfg.data.path = cfg.data.path.replace("{root}", str(root))
        cfg.eval_path = cfg.eval_path.replace("{root}", str(root))
        if any(s.start_from == stage.name for s in recipe.stages):
            cfg.merge = True  # a later stage starts from this one's merged model
        out.append((stage, cfg))
    return out


def base_retrained_first(stage: RecipeStage, root: Path) -> str | None:
    """Why a complete or partly trained stage cannot go on because this run trains the stage it starts from
    first (that stage is not complete now, so its merged model will be a new one), or None."""
    out = root / stage.name
    if not stage.start_from or not (is_complete(out) or list_checkpoints(out)) or is_complete(root / stage.start_from):
        return None
    return (f"stage {stage.name!r} {'is complete' if is_complete(out) else 'has checkpoints'}, but it starts from "
            f"the merged model of stage {stage.start_from!r}, which this run trains first: the new model would not "
            f"be the one {stage.name!r} trained on")


def describe_plan(recipe: Recipe, root: Path, overrides: list[str]) -> list[dict]:
    plan = []
    for stage, cfg in stage_configs(recipe, root, overrides):
        out = Path(cfg.out)
        stale = base_retrained_first(stage, root) or base_changed(out, cfg)
        if is_complete(out):
            status = "done"
            changed = config_changes(out, cfg, root=root)
            if changed:  # run_recipe stops here (check_complete): say so rather than show it as done
                status = f"done with other settings ({describe_changes(changed, 3)}): a run stops; remove {out} to redo"
            elif stale:
                status = f"done on another base ({stale}): a run stops; remove {out} to redo"
        elif list_checkpoints(out):
            status = f"resume from step {list_checkpoints(out)[-1][0]}"
            changed = config_changes(out, cfg, RESUME_FREE, root=root)
            if changed:  # run_recipe stops here (check_started)
                status = (f"started with other settings ({describe_changes(changed, 3)}): a run stops; put them back "
                          f"or remove {out} to redo")
            elif stale:
                status = f"checkpoints on another base ({stale}): a run stops; remove {out} to redo"
            elif 0 < cfg.train.max_steps < list_checkpoints(out)[-1][0]:  # run_recipe stops here (check_length)
                status = (f"checkpoints up to step {list_checkpoints(out)[-1][0]}, past train.max_steps="
                          f"{cfg.train.max_steps}: a run stops; raise max_steps or remove {out} to redo")
        else:
            status = "to run"
        plan.append({"name": stage.name, "stage": cfg.stage, "model": cfg.model.path, "data": cfg.data.path,
                     "out": str(out), "merge": cfg.merge, "status": status, "stops": "a run stops" in status})
    return plan


def run_recipe(name_or_dir: str, root, overrides: list[str], log=print, dist=None) -> Path:
    from .run import run_stage

    recipe = load_recipe(name_or_dir, overrides)
    root = Path(root)
    configs = stage_configs(recipe, root, overrides)
    for stage, cfg in configs:  # all before anything runs, not a changed later stage found hours in
        out = Path(cfg.out)
        why = base_retrained_first(stage, root)
        if why is not None:
            raise ConfigError(f"{why}; remove the folder {out} as well to train it again on the new model, or "
                              "choose another --out")
        if is_complete(out):
            check_complete(out, cfg, root)
        elif list_checkpoints(out):
            check_started(out, cfg, root)
            check_base(out, cfg)
    if dist is not None:  # one process group serves every stage: their model.device must agree
        from .distributed import rank_device

        todo = [(stage.name, cfg.model.device) for stage, cfg in configs if not is_complete(Path(cfg.out))]
        devices = [(name, setting, rank_device(setting, dist.local_rank)) for name, setting in todo]
        for name, setting, device in devices[1:]:
            if device != devices[0][2]:
                raise ConfigError(f'stage {name!r}: model.device = "{setting}" trains on {device}, but stage '
                                  f'{devices[0][0]!r} (model.device = "{devices[0][1]}") trains on {devices[0][2]}; '
                                  "under torchrun every stage of a run trains on the same device")
        # Each rank skips the stages it finds complete: ranks on machines that do not share --out would train
        # different stages against each other. They compare what they see first, stage by stage.
        from .run import check_ranks_agree

        dist.start(todo[0][1] if todo else configs[0][1].model.device)
        for stage, cfg in configs:
            check_ranks_agree(Path(cfg.out), dist)
    for stage, cfg in configs:
        if is_complete(Path(cfg.out)):
            log(f"[{stage.name}] done already: {cfg.out}")
            continue
        log(f"[{stage.name}] {cfg.stage} stage -> {cfg.out}")
        run_stage(cfg, resume=True, log=log, dist=dist, root=root)
    return root
