"""Three lm-eval tasks made from local files, for tests that must not touch the hub.

``write_tasks(folder, generate_targets)`` writes the data (JSONL) and one YAML per task into
``folder`` and returns the task names:

- ``bezoar_mc``: multiple choice (acc, acc_norm), one few-shot example from a train split;
- ``bezoar_gen``: generate_until with stop strings and a small ``max_gen_toks`` (exact_match, leading
  spaces ignored: an answer whose first token starts a word reads " an" from an OpenAI-compatible
  server such as bezoar.serve or vLLM, and "an" from lm-eval's ``hf`` and bezoar models, which decode
  the answer's tokens alone);
- ``bezoar_ppl``: loglikelihood_rolling over texts longer than the window the tests use
  (word/byte perplexity, bits per byte).

No text starts with a space: transformers 5's Llama tokenizer drops one leading space of a text
where sentencepiece (and bezoar) keeps it, and lm-eval's ``hf`` model is one of the peers these
tasks compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

MC_TEST = [
    {"question": "What color is the small cat?", "choices": ["red", "green", "the golden one", "blue"], "answer": 2},
    {"question": "Who opens the song on Tuesday?", "choices": ["Alice", "Bob does", "Carol", "David"], "answer": 0},
    {"question": "What is 7 plus 45?", "choices": ["52", "53", "It is 14", "79"], "answer": 0},
    {"question": "Where does the brown dog sleep?", "choices": ["near the window", "in the city", "on the road", "at home"], "answer": 3},
    {"question": "Which animal is orange?", "choices": ["The tiger", "The owl", "The goat", "The lion"], "answer": 0},
    {"question": "What do we talk about every day?", "choices": ["economics", "poetry and travel", "health", "songs"], "answer": 1},
]
MC_TRAIN = [
    {"question": "What color is the book?", "choices": ["red", "blue", "green", "silver"], "answer": 0},
    {"question": "Who builds the city?", "choices": ["Emma", "Leo", "Carol", "Bob"], "answer": 0},
]
GEN_PROMPTS = [
    "Q: Who builds the book? A:",
    "What is 74 plus 5? The answer is",
    "The bright eagle watches the",
    "Write a short poem about a blue fish.",
    "1. Carol opens a bright city.\n2.",
]
GEN_TRAIN = [{"prompt": "What is 7 times 2? It is", "target": "14"}]
PPL_TEXTS = [
    "Write a short poem about a golden cat. The golden cat sleeps, the small chair keeps, the night is deep. "
    "The bright eagle watches the green mountain near the window. Q: Who finds the road? A: Emma does, on "
    "Friday at 6 o'clock. What is 74 plus 5? The answer is 79. What is 74 times 2? It is 148.",
    "Health is a happy subject. Many people enjoy learning about it.",
    "1. Emma reads a large road.\n2. The lion is silver.\n3. We talk about mathematics every day.\n"
    "1. Bob describes a new chair.\n2. The owl is golden.\n3. We talk about travel every day.",
]

MC_YAML = """task: bezoar_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
test_split: test
fewshot_split: train
num_fewshot: 1
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """task: bezoar_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
training_split: train
test_split: test
fewshot_split: train
num_fewshot: 1
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: " "
fewshot_delimiter: "\\n\\n"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^ +"]
metadata:
  version: 1.0
"""

PPL_YAML = """task: bezoar_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {test}
test_split: test
num_fewshot: 0
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_tasks(folder: Path, generate_targets: list[str] | None = None) -> list[str]:
    """Write the three tasks under ``folder``; ``generate_targets`` are the gen task's targets
    (default: fixed strings), one per prompt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    targets = generate_targets or ["Alice does, on Tuesday", "79", "green mountain near the window", "Blue", "The tiger"]
    assert len(targets) == len(GEN_PROMPTS)
    files = {
        "mc_train": _jsonl(folder / "mc_train.jsonl", MC_TRAIN),
        "mc_test": _jsonl(folder / "mc_test.jsonl", MC_TEST),
        "gen_train": _jsonl(folder / "gen_train.jsonl", GEN_TRAIN),
        "gen_test": _jsonl(folder / "gen_test.jsonl", [{"prompt": p, "target": t} for p, t in zip(GEN_PROMPTS, targets)]),
        "ppl_test": _jsonl(folder / "ppl_test.jsonl", [{"text": t} for t in PPL_TEXTS]),
    }
    (folder / "bezoar_mc.yaml").write_text(MC_YAML.format(train=files["mc_train"], test=files["mc_test"]))
    (folder / "bezoar_gen.yaml").write_text(GEN_YAML.format(train=files["gen_train"], test=files["gen_test"]))
    (folder / "bezoar_ppl.yaml").write_text(PPL_YAML.format(test=files["ppl_test"]))
    return ["bezoar_mc", "bezoar_gen", "bezoar_ppl"]
