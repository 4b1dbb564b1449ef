"""python -m bezoar.eval: lm-evaluation-harness tasks and MT-Bench for a bezoar checkpoint.

    python -m bezoar.eval harness --model DIR --preset openllm            # Open LLM Leaderboard v1
    python -m bezoar.eval harness --model DIR --tasks hellaswag,arc_easy --num-fewshot 0 --limit 100
    python -m bezoar.eval harness --preset openllm --dry-run              # check and print the plan only
    python -m bezoar.eval mt-bench --model DIR --questions question.jsonl --out runs/mt \\
        --judge-model gpt-4o --judge-provider openai
    python -m bezoar.eval lm-eval --model bezoar --model_args pretrained=DIR,quant=nf4 --tasks arc_easy
        (lm-eval's own command line, with the bezoar model registered: every lm_eval flag works)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
from pathlib import Path


def _harness_parser(sub) -> None:
    p = sub.add_parser("harness", help="lm-evaluation-harness tasks with the 'bezoar' model",
                       description="Run lm-evaluation-harness tasks on a bezoar checkpoint and print the table.")
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="Hugging Face Llama checkpoint folder")
    g.add_argument("--adapter", metavar="DIR", help="PEFT-format LoRA adapter folder")
    g.add_argument("--quant", choices=["nf4"], help="quantize the decoder's linear layers to NF4 on load")
    g.add_argument("--dtype", help="float32, bfloat16 or float16 (default by device)")
    g.add_argument("--device", help="cuda, cpu ... (default: cuda when present)")
    g.add_argument("--batch-size", default="8", help="rows per forward, or 'auto' (bounded by --max-batch-tokens)")
    g.add_argument("--max-batch-tokens", type=int, default=16384, help="padded tokens per forward with 'auto'")
    g.add_argument("--max-length", type=int, help="context for scoring (default: the model's)")
    g.add_argument("--model-args", default="", help="extra bezoar model_args as k=v,k=v (lm-eval syntax)")
    g = p.add_argument_group("tasks")
    g.add_argument("--preset", choices=["openllm"], help="openllm: arc_challenge 25, hellaswag 10, "
                   "truthfulqa_mc2 0, mmlu 5, winogrande 5, gsm8k 5 (shots)")
    g.add_argument("--tasks", help="comma-separated lm-eval task names")
    g.add_argument("--num-fewshot", type=int, help="few-shot examples (overrides the preset's counts)")
    g.add_argument("--limit", type=float, help="examples per task, a whole number (or a fraction of each task when "
                   "below 1); for quick checks")
    g.add_argument("--include-path", help="folder with extra task YAML files")
    g.add_argument("--no-builtin-tasks", action="store_true",
                   help="index only --include-path's tasks (skips lm-eval's own thousands: faster start)")
    g.add_argument("--gen-kwargs", help="generation kwargs for generate_until tasks, k=v,k=v")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="FILE", help="write lm-eval's results (JSON) here, after each few-shot group. "
                   "Rerun the same command and it resumes an interrupted run, or prints a finished one without "
                   "evaluating; results of another run there are moved to a timestamped name beside it first")
    g.add_argument("--log-samples", action="store_true", help="keep per-example outputs in --output")
    g.add_argument("--dry-run", action="store_true",
                   help="check the flags, the task names (against lm-eval's index) and the --model and --adapter "
                        "folders, print the plan and what the run would do with --output, and stop without loading "
                        "a model; --model is optional here (without it, --output is not looked at)")


def _mt_bench_parser(sub) -> None:
    p = sub.add_parser("mt-bench", help="MT-Bench: two-turn answers, judged by an LLM through the client pool",
                       description="Answer MT-Bench questions with a bezoar model and grade them with an LLM judge. "
                                   "Rerunning with the same --out resumes: answered questions and judged turns are kept "
                                   "(answers made with other settings, or by a model or adapter with other files, are "
                                   "refused). The judge and its API key are checked before the model loads.")
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", help="checkpoint folder (not needed with --answers)")
    g.add_argument("--adapter", metavar="DIR", help="PEFT-format LoRA adapter folder")
    g.add_argument("--quant", choices=["nf4"], help="quantize to NF4 on load")
    g.add_argument("--dtype", help="float32, bfloat16 or float16")
    g.add_argument("--device", help="cuda, cpu ...")
    g.add_argument("--model-id", help="name in the answer and judgment files (default: the folder's name)")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="per answer turn (default 1024)")
    g.add_argument("--batch-size", type=int, default=8, help="answers decoded together (rows of the continuous batch)")
    g.add_argument("--seed", type=int, default=0, help="for the sampled categories")
    g.add_argument("--top-k", type=int, default=50, help="the sampled categories draw from this many most likely "
                   "tokens (default 50: transformers' default, which FastChat's answers get; 0: all)")
    g = p.add_argument_group("questions and answers")
    g.add_argument("--questions", required=True, help="FastChat question.jsonl, or a dataset name")
    g.add_argument("--split", default="train", help="dataset split when --questions is a dataset name")
    g.add_argument("--reference", metavar="FILE", help="reference answers (FastChat model-answer format); "
                   "default: the questions' own 'reference' field")
    g.add_argument("--answers", metavar="FILE", help="judge these answers instead of generating (model-answer format)")
    g.add_argument("--out", required=True, metavar="DIR", help="answers, judge store, judgments, table and chart")
    g = p.add_argument_group("judge")
    g.add_argument("--judge-model", help="e.g. gpt-4o or claude-sonnet-4-5 (required unless --skip-judge)")
    g.add_argument("--judge-provider", default="openai", choices=["openai", "anthropic", "compat"],
                   help="compat: any OpenAI-compatible server at --judge-base-url")
    g.add_argument("--judge-base-url", help="API base URL (e.g. http://host:8000/v1)")
    g.add_argument("--judge-api-key-env", help="environment variable holding the judge's API key "
                   "(default OPENAI_API_KEY / ANTHROPIC_API_KEY; compat sends no key unless one is named)")
    g.add_argument("--judge-prompts", metavar="FILE", help="FastChat judge_prompts.jsonl (default: bezoar's)")
    g.add_argument("--concurrency", type=int, default=16, help="judge calls in flight")
    g.add_argument("--rpm", type=float, help="judge requests per minute")
    g.add_argument("--tpm", type=float, help="judge tokens per minute")
    g.add_argument("--skip-judge", action="store_true", help="only generate the answers")


def run_harness(args) -> int:
    import math

    from bezoar.eval import harness

    if args.num_fewshot is not None and args.num_fewshot < 0:  # lm-eval would run it 0-shot, reported as -1
        raise ValueError(f"--num-fewshot must be 0 or more, got {args.num_fewshot}")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    plan = harness.make_plan(tasks, args.preset, args.num_fewshot)
    if not args.model and not args.dry_run:
        raise ValueError("--model DIR is required (only --dry-run runs without one)")
    limit = args.limit
    if limit is not None:  # checked now: lm-eval fails on a negative one only after the model has loaded
        if not math.isfinite(limit) or limit <= 0:
            raise ValueError(f"--limit {limit:g}: give a number of examples per task (1 or more) or a fraction "
                             "of each task (between 0 and 1)")
        if limit >= 1 and limit != int(limit):
            raise ValueError(f"--limit {limit:g}: a number of examples is a whole number (a fraction is below 1)")
        limit = int(limit) if limit >= 1 else limit
    out = Path(args.output) if args.output else None
    if out is not None:  # checked now: writing it fails only after every task has run
        if out.is_dir():
            raise ValueError(f"--output {out}: is a folder; give the results file's name (e.g. {out / 'results.json'})")
        above = next((p for p in out.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise ValueError(f"--output {out}: cannot create its folder {out.parent} ({above} is a file)")
    from lm_eval.utils import simple_parse_args_string

    if args.gen_kwargs:  # checked now: generation tasks run last, after hours of the others
        harness.GenerationSettings.from_gen_kwargs(simple_parse_args_string(args.gen_kwargs), 256, None,
                                                   where="--gen-kwargs")
    extra = simple_parse_args_string(args.model_args)
    flags = {"pretrained": "--model", "adapter": "--adapter", "quant": "--quant", "dtype": "--dtype",
             "device": "--device", "batch_size": "--batch-size", "max_batch_tokens": "--max-batch-tokens",
             "max_length": "--max-length"}
    clash = [key for key in extra if key in flags]
    if clash:  # passed twice, they would be a TypeError from the call below
        raise ValueError("; ".join(f"--model-args {key}={extra[key]}: set it with {flags[key]} instead"
                                   for key in clash))
    run = harness.run_identity(args, plan) if args.model else None
    state, earlier, why = harness.output_state(out, run) if out is not None and run is not None else ("none", None, "")
    if state == "complete" and not args.dry_run:  # the same run finished: its results, nothing evaluated again
        print(harness.results_table(earlier, plan if args.preset else None))
        print(f"\n{out}: complete results of this same run (tasks, settings, model and adapter files): "
              "nothing evaluated; move it away (or give another --output) to evaluate again")
        return 0
    manager = harness.task_manager(args.include_path, include_defaults=not args.no_builtin_tasks)
    harness.check_tasks(plan, manager)  # a misspelt task fails here, not after the model has loaded
    missing = [f"{flag} {value}: {'no such folder' if not Path(value).exists() else 'not a folder'}"
               for flag, value in (("--model", args.model), ("--adapter", args.adapter))
               if value and not Path(value).is_dir()]
    if missing:
        raise ValueError("; ".join(missing))
    if args.dry_run:
        print(harness.describe_plan(plan))
        if out is not None and run is not None:
            print(f"\n--output {out}: " + {
                "none": "written as the run goes",
                "complete": "complete results of this same run: a run prints them and evaluates nothing",
                "partial": f"an interrupted run of this one: a run resumes after {', '.join(sorted(earlier['results']))}"
                           if earlier and earlier.get("results") else "an interrupted run of this one: a run resumes",
                "other": f"holds {why}: a run moves it to a timestamped name beside it, then writes"}[state])
        return 0
    if state == "other":
        print(f"--output {out} holds {why}: it will be moved to a timestamped name beside it when this run writes",
              file=sys.stderr)
    lock = None
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--output {out}: cannot create its folder {out.parent} ({e.strerror})") from None
        lock = _hold(out.with_name(out.name + ".lock"), f"--output {out}", "bezoar.eval harness")
    with lock or contextlib.nullcontext():  # held until the last group is written
        lm = harness.BezoarLM(pretrained=args.model, adapter=args.adapter, quant=args.quant, dtype=args.dtype,
                              device=args.device, batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                              max_length=args.max_length, **extra)
        if state == "partial":
            print(f"resuming from {args.output}: {', '.join(sorted(earlier['results']))} done already")
        else:
            earlier = None
        aside = {"pending": state == "other"}

        def save(results: dict, done: bool) -> None:  # each few-shot group's results kept as soon as it finishes
            if out is None:
                return
            if aside["pending"]:  # another run's results: kept under another name, never written over
                aside["pending"] = False
                moved = harness.move_aside(out)
                print(f"--output {out}: the earlier results moved to {moved}", file=sys.stderr)
            harness.write_results({**results, "bezoar_run": run}, out, args.log_samples, complete=done)

        results = harness.run_plan(lm, plan, limit=limit, log_samples=args.log_samples,
                                   gen_kwargs=args.gen_kwargs, manager=manager, on_group=save, earlier=earlier)
    print(harness.results_table(results, plan if args.preset else None))
    if out is not None:
        print(f"results written to {out}")
    return 0


def _hold(path: Path, what: str, command: str):
    """The lock at ``path`` (``bezoar.locking.hold``), or one error naming the process that holds it: two runs
    writing one output would both pay for the work and write over each other."""
    from bezoar.locking import Held, hold

    try:
        return hold(path)
    except Held as e:
        raise ValueError(f"{what}: another {command} (pid {e.pid}) is writing it; wait for it to finish or stop "
                         "it, or choose another output") from None


MT_BENCH_LOCK = "mt_bench.lock"  # held while a run writes answers into --out


def run_mt_bench(args) -> int:
    from bezoar.eval import mt_bench as mt

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--concurrency", args.concurrency)):
        if value < 1:  # checked before the model loads; 0 would fail much later with a misleading message
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (off) or more, got {args.top_k}")
    _check_mt_bench_inputs(args)
    config = None
    if not args.skip_judge:  # the judge checked now, not after an hour of answers
        if not args.judge_model:
            raise ValueError("--judge-model is required (or pass --skip-judge to only generate answers)")
        config = mt.JudgeConfig(model=args.judge_model, provider=args.judge_provider, base_url=args.judge_base_url,
                                api_key_env=args.judge_api_key_env, concurrency=args.concurrency, rpm=args.rpm,
                                tpm=args.tpm)
        mt.check_judge(config)
        mt.load_judge_prompts(args.judge_prompts)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: not a folder")
    questions = mt.load_questions(args.questions, split=args.split)
    references = mt.load_reference_answers(args.reference) if args.reference else None
    if args.answers:
        answers = mt.read_answers(Path(args.answers))
        if not answers:
            raise ValueError(f"{args.answers}: no answers")
        mt.check_answered(questions, answers, f"--answers {args.answers}")  # before any folder or judge call
        model_id = args.model_id or next(iter(answers.values())).model_id
        out.mkdir(parents=True, exist_ok=True)  # every check passed: nothing is left behind by a refused run
        lock = _hold(out / MT_BENCH_LOCK, f"--out {out}", "bezoar.eval mt-bench")
    else:
        if not args.model:
            raise ValueError("--model DIR is required unless --answers FILE is given")
        from bezoar.model import Tokenizer, load

        model_id = args.model_id or Path(args.model).resolve().name
        answers_path = out / "answers.jsonl"
        # The lock first: the checks below read the answers and record the settings they are made with, which a
        # second run must not do while the first one writes them.
        made = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        lock = _hold(out / MT_BENCH_LOCK, f"--out {out}", "bezoar.eval mt-bench")  # refused: the folder is theirs
        try:
            existing = mt.read_answers(answers_path)
            mt.check_answers_model(answers_path, existing, model_id)
            loaded = {"quant": args.quant, "dtype": args.dtype, "device": args.device}
            made_by = mt.answer_model(args.model, args.adapter, out)
            settings = mt.answer_settings(args.max_new_tokens, args.seed, args.top_k, **loaded)
            if not mt.check_answer_settings(answers_path, settings, existing, made_by=made_by):
                print(f"bezoar.eval mt-bench: warning: {answers_path}: which model made its {len(existing)} answers "
                      f"is not recorded (they were written before bezoar recorded it), so they cannot be checked "
                      f"against --model {args.model}{' --adapter ' + args.adapter if args.adapter else ''}; they "
                      "are kept and reported as this model's", file=sys.stderr)
        except BaseException:  # refused: a folder this run made is not left behind
            if lock is not None:
                lock.close()
            if made and all(p.name == MT_BENCH_LOCK for p in out.iterdir()):
                shutil.rmtree(out, ignore_errors=True)
            raise
        pending = [q for q in questions if q.question_id not in existing]
        if pending:
            model = load(args.model, quant=args.quant, adapter=args.adapter, device=args.device, dtype=args.dtype)
            tokenizer = Tokenizer(args.model)
            mt.generate_answers(model, tokenizer, questions, model_id, answers_path,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                top_k=args.top_k, loaded=loaded, made_by=made_by)
        answers = mt.read_answers(answers_path)
        print(f"answers: {answers_path} ({len(answers)} questions)")
    if lock is not None:  # the answers are written; the judging has its own lock (its store's)
        lock.close()
    if args.skip_judge:
        return 0
    summary, _ = mt.run_judging(questions, answers, config, out, model_id, judge_prompts=args.judge_prompts,
                                references=references, progress=sys.stderr.isatty(),
                                answers_source=f"--answers {args.answers}" if args.answers else str(answers_path))
    print(mt.summary_table(summary, model_id, config.model))
    print(f"\njudgments, results.md, results.json and categories.png written to {out}")
    return 0


def _check_mt_bench_inputs(args) -> None:
    """Every file and folder the run will read, checked before anything loads: a missing judge-prompts
    file would otherwise surface only after all the answers were generated, and a missing --answers
    file read as an empty one."""
    files = [("--reference", args.reference), ("--answers", args.answers)]
    if str(args.questions).endswith((".jsonl", ".json")) or Path(args.questions).exists():
        files.append(("--questions", args.questions))  # otherwise a dataset name
    if not args.skip_judge:
        files.append(("--judge-prompts", args.judge_prompts))
    folders = [] if args.answers else [("--model", args.model), ("--adapter", args.adapter)]
    missing = []
    for (flag, value), want in [(f, "file") for f in files] + [(f, "folder") for f in folders]:
        if value is None:
            continue
        path = Path(value)
        if not path.exists():
            missing.append(f"{flag} {value}: no such {want}")
        elif not (path.is_file() if want == "file" else path.is_dir()):
            missing.append(f"{flag} {value}: not a {want}")
    if missing:
        raise ValueError("; ".join(missing))


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's command line after registering the ``bezoar`` model (lm_eval alone does not know it)."""
    import bezoar.eval.harness  # noqa: F401  (registers "bezoar")
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from bezoar.config import environment_error

    if argv and argv[0] == "lm-eval":
        if (why := environment_error()) is not None:
            print(f"bezoar.eval lm-eval: {why}", file=sys.stderr)
            return 2
        return run_lm_eval(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bezoar.eval", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _harness_parser(sub)
    _mt_bench_parser(sub)
    sub.add_parser("lm-eval", help="lm-eval's own command line with the 'bezoar' model registered",
                   add_help=False)
    args = parser.parse_args(argv)
    if (why := environment_error()) is not None:
        print(f"bezoar.eval {args.command}: {why}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from bezoar.signals import terminate_as_interrupt

    try:
        with terminate_as_interrupt():  # a SIGTERM stores the judgments in flight, as Ctrl-C does
            return run_harness(args) if args.command == "harness" else run_mt_bench(args)
    except _user_errors() as e:  # bad path, option, file or key: one line, no traceback
        print(f"bezoar.eval {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # what is stored (answers, judgments, finished few-shot groups) is kept
        print(f"bezoar.eval {args.command}: interrupted; rerun the same command to continue from what is stored",
              file=sys.stderr)
        return 130


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (ValueError, OSError)
    try:
        from bezoar.generate.request import GenerateError  # the judge's pool: bad key, unknown model ...

        errors += (GenerateError,)
    except ImportError:
        pass
    return errors


if __name__ == "__main__":
    sys.exit(main())
