"""Recipes: an ordered list of stages, each starting from the merged model of the one before.

A recipe is a folder with ``recipe.toml``::

    description = "..."
    [[stages]]
    name = "lamini"            # the stage's folder under the run root
    config = "lamini.toml"     # a stage config (bezoar.train.config.StageConfig), relative to the recipe
    start_from = "..."         # optional: the stage whose <root>/<name>/merged is this stage's model.path

Every stage writes to ``<root>/<name>``; a stage whose ``summary.json`` exists is skipped, and one
that stopped half way resumes from its newest checkpoint, so rerunning a recipe continues where it
stopped. Overrides ``key=value`` apply to every stage; ``<stage>.key=value`` to that stage only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bezoar.config import ConfigError, load_config, parse_override

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .config import StageConfig
from .loop import list_checkpoints
from .run import is_complete

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


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


def find_recipe(name_or_dir: str) -> Path:
    path = Path(name_or_dir).expanduser()
    if (path / "recipe.toml").exists():
        return path
    if (RECIPES / name_or_dir / "recipe.toml").exists():
        return RECIPES / name_or_dir
    known = sorted(p.name for p in RECIPES.iterdir() if (p / "recipe.toml").exists())
    raise ConfigError(f"recipe {name_or_dir!r}: not a folder with recipe.toml, nor a shipped recipe ({', '.join(known)})")


def load_recipe(name_or_dir: str) -> Recipe:
    folder = find_recipe(name_or_dir)
    path = folder / "recipe.toml"
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    unknown = set(data) - {"description", "stages", "generate", "evaluate"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    stages, names = [], set()
    for i, entry in enumerate(data.get("stages", [])):
        where = f"{path}: stages[{i}]"
        extra = set(entry) - {"name", "config", "start_from"}
        if extra:
            raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r}")
        if "name" not in entry or "config" not in entry:
            raise ConfigError(f"{where}: needs 'name' and 'config'")
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
    return Recipe(folder, data.get("description", ""), stages)


def stage_configs(recipe: Recipe, root: Path, overrides: list[str]) -> list[tuple[RecipeStage, StageConfig]]:
    names = {s.name for s in recipe.stages}
    out = []
    for stage in recipe.stages:
        mine = []
        for text in overrides:
            key, _ = parse_override(text)
            head = key.split(".", 1)[0]
            if head in names:
                if head == stage.name:
                    mine.append(text.split(".", 1)[1])
            else:
                mine.append(text)
        forced = [f"out={root / stage.name}"]
        if stage.start_from:
            forced.append(f"model.path={root / stage.start_from / 'merged'}")
        cfg = load_config(StageConfig, stage.config, mine + forced)
        cfg.data.path = cfg.data.path.replace("{root}", str(root))
        cfg.eval_path = cfg.eval_path.replace("{root}", str(root))
        if any(s.start_from == stage.name for s in recipe.stages):
            cfg.merge = True  # a later stage starts from this one's merged model
        out.append((stage, cfg))
    return out


def describe_plan(recipe: Recipe, root: Path, overrides: list[str]) -> list[dict]:
    plan = []
    for stage, cfg in stage_configs(recipe, root, overrides):
        out = Path(cfg.out)
        if is_complete(out):
            status = "done"
        elif list_checkpoints(out):
            status = f"resume from step {list_checkpoints(out)[-1][0]}"
        else:
            status = "to run"
        plan.append({"name": stage.name, "stage": cfg.stage, "model": cfg.model.path, "data": cfg.data.path,
                     "out": str(out), "merge": cfg.merge, "status": status})
    return plan


def run_recipe(name_or_dir: str, root, overrides: list[str], log=print, dist=None) -> Path:
    from .run import run_stage

    recipe = load_recipe(name_or_dir)
    root = Path(root)
    configs = stage_configs(recipe, root, overrides)
    for stage, cfg in configs:
        if is_complete(Path(cfg.out)):
            log(f"[{stage.name}] done already: {cfg.out}")
            continue
        log(f"[{stage.name}] {cfg.stage} stage -> {cfg.out}")
        run_stage(cfg, resume=True, log=log, dist=dist)
    return root
