"""Write the demo datasets in bezoar/assets/demo/ (deterministic: same seed, same bytes).

The demo trains the ``demo`` tiny model (4 layers, hidden 128, vocab 512) for a minute or two
on CPU, so the data is short, regular and learnable, and uses words the tiny tokenizer was
trained on (bezoar/assets/tokenizer_corpus.txt):

- sft.jsonl (instruction / response, some with a ``system`` message):
    color facts   "What color is the owl?" -> "The owl is golden."   (a fixed animal -> color table)
    one word      system "Answer with one word." + a color question -> "golden."
    builder facts "Who builds the bridge?" -> "Grace builds the bridge."   (object -> name table)
    repeat        "Repeat after me: lamp river cat" -> "lamp river cat"   (copying)
    swap          "Swap the words: red owl" -> "owl red"
- sft_eval.jsonl: held-out records of the same kinds (new word combinations) for eval loss.
- dpo.jsonl (prompt / chosen / rejected, the generic pair format): the chosen answer follows the
  rule of its task, the rejected one breaks it (a wrong color or name, a dropped or reordered
  word, an unswapped pair).

Usage: python scripts/make_demo_data.py [--out bezoar/assets/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ANIMALS = ["cat", "dog", "fish", "whale", "tiger", "lion", "owl", "goat", "mouse", "horse", "rabbit", "eagle", "bear"]
COLORS = ["red", "blue", "green", "white", "black", "brown", "pink", "grey", "orange", "silver", "golden", "yellow"]
OBJECTS = ["book", "bridge", "chair", "city", "computer", "garden", "lamp", "letter", "road", "table"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Jack", "Karen", "Leo", "Maria"]
WORDS = ANIMALS + COLORS + OBJECTS

COLOR_QUESTIONS = ["What color is the {a}?", "Tell me the color of the {a}.", "Which color does the {a} have?"]
BUILDER_QUESTIONS = ["Who builds the {o}?", "Tell me who builds the {o}.", "Which person builds the {o}?"]
ONE_WORD = "Answer with one word."

ROOT = Path(__file__).resolve().parent.parent


def world(rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
    colors = {a: rng.choice(COLORS) for a in ANIMALS}
    builders = {o: rng.choice(NAMES) for o in OBJECTS}
    return colors, builders


def sft_records(rng: random.Random, colors: dict, builders: dict, repeats: int, swaps: int,
                seen: set[tuple[str, ...]]) -> list[dict]:
    records = []
    for a, c in colors.items():
        for q in COLOR_QUESTIONS:
            records.append({"instruction": q.format(a=a), "response": f"The {a} is {c}."})
            records.append({"system": ONE_WORD, "instruction": q.format(a=a), "response": f"{c}."})
    for o, n in builders.items():
        for q in BUILDER_QUESTIONS:
            records.append({"instruction": q.format(o=o), "response": f"{n} builds the {o}."})
    records.extend(repeat_records(rng, repeats, seen))
    records.extend(swap_records(rng, swaps, seen))
    return records


def _fresh(rng: random.Random, k: int, seen: set[tuple[str, ...]]) -> tuple[str, ...]:
    while True:
        words = tuple(rng.sample(WORDS, k))
        if words not in seen:
            seen.add(words)
            return words


def repeat_records(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    for _ in range(n):
        words = " ".join(_fresh(rng, 3, seen))
        out.append({"instruction": f"Repeat after me: {words}", "response": words})
    return out


def swap_records(rng: random.Random, n: int, seen: set) -> list[dict]:
    out = []
    for _ in range(n):
        a, b = _fresh(rng, 2, seen)
        out.append({"instruction": f"Swap the words: {a} {b}", "response": f"{b} {a}"})
    return out


def dpo_records(rng: random.Random, colors: dict, builders: dict, n_copy: int, seen: set) -> list[dict]:
    pairs = []
    for a, c in colors.items():
        for q in COLOR_QUESTIONS:
            wrong = rng.choice([x for x in COLORS if x != c])
            pairs.append({"prompt": q.format(a=a), "chosen": f"The {a} is {c}.", "rejected": f"The {a} is {wrong}."})
    for o, n in builders.items():
        for q in BUILDER_QUESTIONS:
            wrong = rng.choice([x for x in NAMES if x != n])
            pairs.append({"prompt": q.format(o=o), "chosen": f"{n} builds the {o}.",
                          "rejected": f"{wrong} builds the {o}."})
    for i in range(n_copy):
        if i % 2 == 0:
            words = list(_fresh(rng, 3, seen))
            broken = rng.choice([words[:2], words[1:], [words[1], words[0], words[2]], [words[0], words[2], words[1]]])
            pairs.append({"prompt": f"Repeat after me: {' '.join(words)}", "chosen": " ".join(words),
                          "rejected": " ".join(broken)})
        else:
            a, b = _fresh(rng, 2, seen)
            pairs.append({"prompt": f"Swap the words: {a} {b}", "chosen": f"{b} {a}", "rejected": f"{a} {b}"})
    return pairs


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bezoar" / "assets" / "demo"), help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="random seed (the shipped files use 0)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    colors, builders = world(rng)
    seen: set[tuple[str, ...]] = set()
    train = sft_records(rng, colors, builders, repeats=160, swaps=140, seen=seen)
    rng.shuffle(train)
    held_out = repeat_records(rng, 16, seen) + swap_records(rng, 16, seen)
    held_out += [{"instruction": f"What color is the {a}?", "response": f"The {a} is {c}."}
                 for a, c in list(colors.items())[:8]]
    rng.shuffle(held_out)
    pairs = dpo_records(rng, colors, builders, n_copy=120, seen=seen)
    rng.shuffle(pairs)
    out = Path(args.out)
    write_jsonl(out / "sft.jsonl", train)
    write_jsonl(out / "sft_eval.jsonl", held_out)
    write_jsonl(out / "dpo.jsonl", pairs)


if __name__ == "__main__":
    main()
