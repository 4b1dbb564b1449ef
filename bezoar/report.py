"""The report of a pipeline run: ``RUN/report.md``, with its figures in ``RUN/report/``.

Written by ``python -m bezoar.pipeline`` at the end of every run (and by ``--report-only``) from
the files the steps left on disk, so it shows whatever part of the run exists:

- Steps: each step of the recipe, its status and its folder.
- Synthetic data: per scheme, the inputs read, the records the teacher's answers made, and what the
  judge filter did with them (judged = scored = kept + below the threshold; judge failures, a failed
  request or an unreadable reply, on their own), with the score histogram and the scheme's own
  counters (duplicates, eliminated evolutions, capped queries ...).
- Training: per stage, the data (examples, tokens, packing efficiency), the steps and tokens trained,
  first and final loss and the last eval loss; for DPO stages the final rewards/accuracies, margins and
  rewards; and one PNG per stage of its curves from ``metrics.jsonl`` (loss and eval loss; for DPO also
  rewards/accuracies and margins).
- Evaluation: per evaluated stage, the lm-eval harness table and the MT-Bench table and chart. Results of a
  step that is not complete (to run again: stale, its marker removed, or resuming) or whose settings changed
  since are labelled as earlier results, of the model and settings that step ran with then.
- Timings: wall time per step (kept out of the tables: tables hold only what the run computed, so two
  runs that computed the same things, one of them killed and resumed, have the same tables).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

REPORT = "report.md"
FIGURES = "report"

DPO_KEYS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, eval records) of a metrics.jsonl; unreadable lines (a torn tail) are skipped."""
    train, evals = [], []
    if not path.exists():
        return train, evals
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        if "loss" in rec:
            train.append(rec)
        elif "eval_loss" in rec:
            evals.append(rec)
    return train, evals


def _num(value, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _exact(value) -> str:
    """A number as written in the file it came from (a threshold of 6.96 is not "7.0")."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _pct(value) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


# ---- sections ----------------------------------------------------------------------------------


def steps_section(steps, root: Path) -> list[str]:
    rows = [[s.name, s.status, _rel(s.out, root)] for s in steps]
    return ["## Steps", ""] + _table(["step", "status", "output"], rows) + [""]


INPUT_COUNT = {"lamini": lambda s: s.get("seeds"), "evol": lambda s: s.get("counts", {}).get("seeds"),
               "orca": lambda s: s.get("counts", {}).get("queries")}


def _scored(filt: dict):
    """The records the judge scored, from a filter-summary.json (``scored``; kept + below threshold where a
    summary lacks it). Not ``records``: that also counts the judge failures."""
    scored = filt.get("scored")
    if isinstance(scored, int):
        return scored
    kept, below = filt.get("kept"), filt.get("below_threshold")
    return kept + below if isinstance(kept, int) and isinstance(below, int) else None


def data_section(steps, root: Path) -> list[str]:
    schemes = [s for s in steps if s.kind == "generate"]
    if not schemes:
        return []
    rows, details, models = [], [], {}
    for s in schemes:
        gen = _read_json(s.out / f"{s.target}-summary.json") or {}
        filt = _read_json(s.out / "filter-summary.json") or {}
        models.setdefault("teacher", []).append(gen.get("teacher"))
        models.setdefault("judge", []).append(filt.get("judge"))
        kept, judged = filt.get("kept"), _scored(filt)
        share = kept / judged if isinstance(kept, int) and judged else None
        generated = gen.get("counts", {}).get("records")
        rows.append([s.target, _num(INPUT_COUNT[s.target](gen)), _num(generated),
                     _num(judged), _num(kept), _num(filt.get("below_threshold")), _num(filt.get("failures")),
                     _pct(share), _exact(filt.get("threshold"))])
        read = filt.get("records")
        if isinstance(read, int) and isinstance(generated, int) and read != generated:
            details.append(f"- {s.target}: the filter read {read:,} records, the generation made {generated:,}")
        counts = {k: v for k, v in gen.get("counts", {}).items() if k != "records"}
        if counts:
            details.append(f"- {s.target}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        scores = filt.get("scores")
        if scores:
            details.append(f"- {s.target} judge scores: " + ", ".join(f"{k}: {v}" for k, v in scores.items()))
    out = ["## Synthetic data", "", "Inputs read, records the teacher's answers made, and the judge filter. "
           "judged: the records the judge scored (kept + below threshold; judged.jsonl); kept: those scoring at least the "
           "threshold; judge failures: records whose judge request failed or whose reply could not be read "
           "(in judge-failures.jsonl: neither judged, kept nor below). judged + judge failures = the records "
           "the filter read; kept % is of the judged.", ""]
    out += _table(["scheme", "inputs", "generated", "judged", "kept", "below threshold", "judge failures", "kept %",
                   "threshold"], rows)
    names = [f"{role}: {', '.join(dict.fromkeys(m for m in found if m))}" for role, found in models.items()
             if any(found)]
    if names:
        details.insert(0, "- " + "; ".join(names))
    return out + [""] + details + [""]


def training_section(steps, root: Path, figures: Path) -> list[str]:
    stages = [s for s in steps if s.kind == "train"]
    if not stages:
        return []
    rows, dpo_rows, images = [], [], []
    for s in stages:
        data = _read_json(s.out / "data.json") or {}
        encode = data.get("encode", {})
        summary = _read_json(s.out / "summary.json") or {}
        train, evals = read_metrics(s.out / "metrics.jsonl")
        final = summary.get("final") or (train[-1] if train else {})
        kind = summary.get("stage") or _stage_kind(s.out)
        rows.append([s.target, kind or "-", s.inputs[0], s.inputs[1], _num(encode.get("examples")),
                     _num(encode.get("tokens")), _pct(data.get("packing_efficiency")),
                     _num(summary.get("steps", final.get("step"))), _num(summary.get("tokens")),
                     _num(train[0]["loss"] if train else None), _num(final.get("loss")),
                     _num(evals[-1]["eval_loss"] if evals else None)])
        if kind == "dpo" or any(k in final for k in DPO_KEYS):
            last_eval = evals[-1] if evals else {}
            dpo_rows.append([s.target] + [_num(final.get(k)) for k in DPO_KEYS]
                            + [_num(last_eval.get("rewards/accuracies"))])
        if train:
            image = plot_curves(s.target, train, evals, figures / f"{s.target}.png")
            images.append(f"![{s.target}]({_rel(image, root)})")
    out = ["## Training", "", "Per stage: the data it read, what it trained, and its loss (first and last logged "
           "training step; eval loss at the last evaluation).", ""]
    out += _table(["stage", "kind", "starts from", "data", "examples", "tokens", "packing", "steps", "tokens trained",
                   "first loss", "final loss", "eval loss"], rows)
    if dpo_rows:
        out += ["", "DPO, at the last logged step:", ""]
        out += _table(["stage"] + list(DPO_KEYS) + ["eval rewards/accuracies"], dpo_rows)
    return out + [""] + images + [""]


def _stage_kind(out: Path) -> str | None:
    config = out / "config.toml"
    if not config.exists():
        return None
    for line in config.read_text(encoding="utf-8").splitlines():
        if line.startswith("stage ="):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def plot_curves(name: str, train: list[dict], evals: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = any(k in train[-1] for k in DPO_KEYS)
    fig, axes = plt.subplots(1, 2 if dpo else 1, figsize=(10 if dpo else 5.5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="loss", color="#4c72b0", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss", color="#dd8452",
                ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{name}: loss", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if dpo:
        ax = axes[0][1]
        steps = [r["step"] for r in train]
        ax.plot(steps, [r.get("rewards/accuracies") for r in train], label="rewards/accuracies", color="#55a868")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        twin = ax.twinx()
        twin.plot(steps, [r.get("rewards/margins") for r in train], label="rewards/margins", color="#c44e52")
        twin.set_ylabel("margin")
        ax.set_title(f"{name}: preference", fontsize=10)
        lines = ax.get_lines() + twin.get_lines()
        ax.legend(lines, [x.get_label() for x in lines], fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluation_section(recipe, steps, root: Path) -> list[str]:
    evals = [s for s in steps if s.kind in ("harness", "mt-bench")]
    if not evals:
        return []
    out = ["## Evaluation", ""]
    for stage in dict.fromkeys(s.target for s in evals):
        out += [f"### {stage}", ""]
        for s in (x for x in evals if x.target == stage):
            if s.kind == "harness":
                out += harness_tables(recipe, s)
            else:
                out += mt_bench_tables(s, root)
    return out


def earlier_note(step) -> list[str]:
    """The label over an evaluation's tables when they are not of the run as it stands: the step is not complete
    (to run again, its model retrained or to be, or its marker removed; or resuming), or its settings changed since
    it ran. Empty for a complete step that is current."""
    if step.done and not step.changed:
        return []
    if step.done:
        why = f"the recipe's settings for {step.name} changed since it ran ({'; '.join(step.changed)})"
    else:
        why = f"{step.name} is {step.status}"
    return [f"> **Earlier results, not current:** {why}. What follows is what it wrote when it last ran, of the "
            "model and settings it had then; a run replaces it.", ""]


def harness_tables(recipe, step) -> list[str]:
    results = _read_json(step.out / "results.json")
    if results is None:
        return [f"lm-eval harness: not run yet ({step.status}).", ""]
    from bezoar.eval import harness

    section = recipe.evaluate.harness
    plan = harness.make_plan(list(section.tasks) or None, section.preset or None, section.num_fewshot)
    note = earlier_note(step)
    partial = results.get("complete") is False  # a run stopped between its few-shot groups
    title = "lm-eval harness" + (" (earlier results)" if note else "") + (" (partial: the run stopped before "
                                                                          "its last tasks)" if partial else "")
    return [title + ":", ""] + note + [harness.results_table(results, plan if section.preset else None), ""]


def mt_bench_tables(step, root: Path) -> list[str]:
    table = step.out / "results.md"
    if not table.exists():
        return [f"MT-Bench: not run yet ({step.status}).", ""]
    text = table.read_text(encoding="utf-8").strip().splitlines()
    note = earlier_note(step)
    text = [("#### " + line.lstrip("#").strip() + (" (earlier results)" if note else "")) if line.startswith("#")
            else line for line in text]
    head = 2 if text and text[0].startswith("#### ") else 0  # the note goes under the table's heading
    out = text[:head] + note + text[head:] + [""]
    chart = step.out / "categories.png"
    if chart.exists():
        out += [f"![MT-Bench {step.target}{' (earlier results)' if note else ''}]({_rel(chart, root)})", ""]
    return out


def timings_section(steps) -> list[str]:
    lines = []
    for s in steps:
        record = _read_json(s.out / "summary.json") if s.kind == "train" else _read_json(s.marker)
        if record and isinstance(record.get("seconds"), (int, float)):
            lines.append(f"- {s.name}: {record['seconds']:.1f} s")
    if not lines:
        return []
    return ["## Timings", "", "Wall time of each step's last session (a training stage: its training loop, "
            "the session that finished it).", ""] + lines + [""]


# ---- the report ----------------------------------------------------------------------------------


def write_report(recipe, root, steps) -> Path:
    """Write ``root/report.md`` (atomically) and its figures; returns the report's path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    figures = root / FIGURES
    lines = [f"# Run report: {recipe.name}", "", recipe.description, "",
             f"Run root `{root.resolve()}`; written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
             f"`python -m bezoar.pipeline --recipe {recipe.name}`.", ""]
    lines += steps_section(steps, root)
    lines += data_section(steps, root)
    lines += training_section(steps, root, figures)
    lines += evaluation_section(recipe, steps, root)
    lines += timings_section(steps)
    path = root / REPORT
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
