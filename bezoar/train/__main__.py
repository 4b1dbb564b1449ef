"""python -m bezoar.train: run a training stage, a recipe of stages, or (no argument) the demo.

    python -m bezoar.train                                   the demo: tiny model, SFT then DPO, CPU
    python -m bezoar.train CONFIG.toml [key=value ...]       one stage from a config (--resume to continue)
    python -m bezoar.train --recipe openbezoar --out RUN     every stage of a recipe, in order
    python -m bezoar.train --recipe openbezoar --out RUN --dry-run   the plan, and what is done already
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from pathlib import Path
from typing import NoReturn


def parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m bezoar.train",
        description="Train with bezoar: one stage from a TOML config, a recipe of stages, or the demo.",
        epilog="Examples:\n  python -m bezoar.train\n  python -m bezoar.train bezoar/recipes/demo/sft.toml "
               "out=runs/x train.max_steps=50\n  python -m bezoar.train --recipe openbezoar --out runs/ob --dry-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="stage config (TOML); omit it to run the demo or a --recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=1e-4 out=runs/x")
    p.add_argument("--resume", action="store_true", help="continue the run in `out` from its newest checkpoint")
    p.add_argument("--recipe", metavar="NAME|DIR", help="run a recipe (shipped: demo, openbezoar) instead of one stage")
    p.add_argument("--out", metavar="DIR", help="run root for --recipe and the demo (default runs/<recipe>)")
    p.add_argument("--dry-run", action="store_true", help="with --recipe: print the plan and what is done, run nothing")
    args = p.parse_intermixed_args(argv)  # flags may sit between the overrides
    # `python -m bezoar.train key=value` (no config) is an override list for the demo.
    if args.config and "=" in args.config and not args.config.endswith(".toml"):
        args.overrides.insert(0, args.config)
        args.config = None
    # A stage config names its own run directory (out=) and has no plan to show: refuse these flags rather
    # than train for real under --dry-run, or write somewhere other than the --out the user gave.
    if args.config and args.dry_run:
        p.error("--dry-run shows the plan of a --recipe; a stage config has none (drop --dry-run to run it)")
    if args.config and args.out:
        p.error(f"--out is the run root of a --recipe or the demo; a stage config takes out=DIR (e.g. out={args.out})")
    return p, args


def main(argv=None) -> int:
    p, args = parse(sys.argv[1:] if argv is None else argv)
    from bezoar.config import ConfigError, environment_error

    if (why := environment_error()) is not None:
        print(f"bezoar.train: error: {why}", file=sys.stderr)
        return 2
    from bezoar.data import DataError
    from bezoar.model import CheckpointError, ConfigError as ModelConfigError, TokenizerError
    from bezoar.model.lora import AdapterError

    from .loop import TrainingError

    expected = (ConfigError, DataError, CheckpointError, ModelConfigError, TokenizerError, AdapterError, TrainingError,
                FileExistsError)
    from .distributed import Dist, launched_by_torchrun

    dist = None
    log = print
    try:
        if launched_by_torchrun():
            dist = Dist()  # joins the process group on the first stage's model.device (run_stage)
            if dist.rank != 0:
                log = _quiet
        if args.config:
            if args.recipe:
                p.error("give a stage config or --recipe, not both")
            from bezoar.config import load_config

            from .config import StageConfig
            from .run import run_stage

            cfg = load_config(StageConfig, args.config, args.overrides)
            out = run_stage(cfg, resume=args.resume, log=log, dist=dist)
            log(f"run directory: {Path(out).resolve()}")
            return 0
        from .recipe import describe_plan, load_recipe, run_recipe

        name = args.recipe or "demo"
        root = Path(args.out or f"runs/{Path(name).name}")
        if args.dry_run:
            recipe = load_recipe(name, args.overrides)  # generate.* / evaluate.* checked as a run does
            print(f"recipe {recipe.folder.name}: {recipe.description}\nrun root: {root.resolve()}")
            plan = describe_plan(recipe, root, args.overrides)
            for s in plan:
                print(f"  {s['name']:<12} {s['stage']:<4} {s['status']:<22} model={s['model']}  data={s['data']}  "
                      f"out={s['out']}{'  (+merged)' if s['merge'] else ''}")
            stops = [s["name"] for s in plan if s["stops"]]
            if stops:  # as the pipeline's --dry-run: the plan is shown, and the status says a run would not go
                print(f"bezoar.train: a run stops at stage {stops[0]} (its line above says why)", file=sys.stderr)
                return 2
            return 0
        if args.resume:
            print("note: recipes always continue unfinished stages; --resume is implied")
        run_recipe(name, root, args.overrides, log=log, dist=dist)
        log(f"run root: {root.resolve()}")
        return 0
    except expected as e:
        rank = f" (rank {dist.rank})" if dist is not None else ""
        print(f"bezoar.train: error{rank}: {e}", file=sys.stderr)
        return 2
    finally:
        if dist is not None:
            dist.close()


def _quiet(*args, **kwargs):
    pass


def run_as_script() -> NoReturn:
    """``python -m bezoar.train``: ``main``'s exit status; a torchrun rank ends through ``exit_rank``, an
    unexpected error's traceback printed first, as Python would have printed it."""
    from .distributed import exit_rank, launched_by_torchrun

    if not launched_by_torchrun():
        sys.exit(main())
    try:
        code = main()
    except SystemExit as e:  # argparse's errors and --help
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    exit_rank(code)


if __name__ == "__main__":
    run_as_script()
