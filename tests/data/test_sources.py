"""Where training data comes from (review of data loading): the eval set is never the training set unsaid,
every file of a data folder is read or named, hub-style shards keep their splits apart, CSV cells are text,
bad data stops a run before the model loads, and a pair's system_prompt is read."""

from __future__ import annotations

import json
import logging

import pytest

from bezoar.config import ConfigError
from bezoar.data import DataConfig, read_examples
from bezoar.data.formats import PromptTemplate, pair_example
from bezoar.data.load import DataError, Record, load_records


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(tag, n):
    return [{"instruction": f"{tag} question {i}", "response": f"{tag} answer {i}"} for i in range(n)]


def test_an_eval_that_would_read_the_training_data_is_refused_or_counted(tmp_path):
    """eval_path was read at data.split whatever it named: a folder (or hub dataset) with train and test splits
    given as eval_path was evaluated on its train split, and eval_path = data.path was accepted without a word."""
    from tests.train.helpers import tiny_sft_config
    from bezoar.train.run import read_stage_data

    folder = tmp_path / "hh"
    _jsonl(folder / "train.jsonl", _rows("train", 6))
    _jsonl(folder / "test.jsonl", _rows("test", 2))
    base = [f"data.path={folder}", "data.format=instruction"]
    with pytest.raises(ConfigError, match=r"eval_path .* is data.path, read at the same split \('train'\)"):
        read_stage_data(tiny_sft_config(tmp_path / "a", *base, f"eval_path={folder}"), log=lambda *a: None)
    said = []
    train, eval_cfg, (held_out, _) = read_stage_data(
        tiny_sft_config(tmp_path / "b", *base, f"eval_path={folder}", "eval_split=test"), log=said.append)
    assert eval_cfg.split == "test" and len(train[0]) == 6 and not said
    assert [e.response for e in held_out] == ["test answer 0", "test answer 1"]
    # another file that repeats training examples: counted in a warning
    overlap = _jsonl(tmp_path / "eval.jsonl", _rows("train", 2) + _rows("other", 1))
    read_stage_data(tiny_sft_config(tmp_path / "c", *base, f"eval_path={overlap}"), log=said.append)
    assert said == [f"warning: 2 of the 3 eval examples ({overlap} [train]) are also in the training data "
                    f"({folder}): the eval loss is partly training loss"]


def test_a_folder_split_of_two_file_kinds_is_refused_and_files_no_split_reads_are_named(tmp_path, caplog):
    """datasets reads the most common kind of a split's files and dropped the others without a count (1 JSONL +
    2 CSV: the JSONL's records vanished); files named for no split beside named ones were left out unsaid."""
    mixed = tmp_path / "mixed"
    _jsonl(mixed / "part-0.jsonl", _rows("a", 1))
    (mixed / "part-1.csv").write_text("instruction,response\nb,c\n")
    (mixed / "part-2.csv").write_text("instruction,response\nd,e\n")
    with pytest.raises(DataError, match=r"split 'train' holds data files of 2 kinds \(csv: part-1.csv, part-2.csv; "
                                        r"json: part-0.jsonl\)"):
        load_records(mixed)
    named = tmp_path / "named"
    _jsonl(named / "train.jsonl", _rows("t", 2))
    _jsonl(named / "extra.jsonl", _rows("x", 3))
    with caplog.at_level(logging.WARNING, logger="bezoar.data"):
        assert len(load_records(named)) == 2
    assert "1 data file(s) name no split, so split 'train' leaves them out: extra.jsonl" in caplog.text


def test_hub_style_shards_keep_their_splits_apart(tmp_path):
    """data/{split}-00000-of-00001.parquet (ultrafeedback_binarized's layout without its README): split 'train'
    took train_sft, train_gen and train_prefs together, where datasets refuses it."""
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "uf"
    (folder / "data").mkdir(parents=True)
    for split in ("train_sft", "train_gen", "train_prefs", "test_sft"):
        pq.write_table(pa.Table.from_pylist(_rows(split, 2)), folder / "data" / f"{split}-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"no data files for split 'train'; its data/ shards name the split\(s\) "
                                        r"'test_sft', 'train_gen', 'train_prefs', 'train_sft'"):
        load_records(folder)
    assert [r.data["instruction"] for r in load_records(folder, split="train_sft")] == [
        "train_sft question 0", "train_sft question 1"]


def test_csv_cells_are_the_text_they_hold(tmp_path):
    """pandas read "N/A", "None" and empty cells as missing and a column of digits as numbers: "N/A" vanished from
    a prompt, an answer "None" was "null" and "42" was "not a string"."""
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train.csv").write_text("instruction,input,response\nFill in the form field,N/A,Leave it blank.\n"
                                      "What does print(None) output?,,None\nWhat is 6*7?,,42\n")
    examples, skipped = read_examples(DataConfig(path=str(folder), format="instruction"))
    assert not skipped and [e.response for e in examples] == ["Leave it blank.", "None", "42"]
    assert "Fill in the form field\n\nN/A" in examples[0].prompt
    assert "What does print(None) output?\n\n### Response:" in examples[1].prompt


@pytest.mark.parametrize("case", ["pandas index", "repeated name", "blank first line", "other order",
                                  "README configs", "README configs with sep"])
def test_csv_headers_as_pandas_reads_them(tmp_path, case):
    """The first version typed the columns from csv.reader's header: pandas' to_csv index (a blank name, which
    pandas calls 'Unnamed: 0') and a README's configs (another config's file first) were refused where they had
    loaded, and a repeated name or a blank first line left the digits as numbers."""
    folder = tmp_path / "csv"
    folder.mkdir()
    want = ["42"]
    if case == "pandas index":
        (folder / "train.csv").write_text(",instruction,response\n0,What is 6*7?,42\n")
    elif case == "repeated name":
        (folder / "train.csv").write_text("instruction,response,response\nWhat is 6*7?,42,43\n")
    elif case == "blank first line":
        (folder / "train.csv").write_text("\ninstruction,response\nWhat is 6*7?,42\n")
    elif case == "other order":
        (folder / "train-0.csv").write_text("instruction,response\nWhat is 6*7?,42\n")
        (folder / "train-1.csv").write_text("response,instruction\n4,What is 2+2?\n")
        want = ["42", "4"]
    elif case == "README configs with sep":  # a config's own CSV options: the header read with ',' did not fit
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: sft\n  default: true\n  sep: ';'\n"
                                          "  data_files:\n  - split: train\n    path: train.csv\n---\n")
        (folder / "train.csv").write_text("instruction;response\nWhat is 6*7?;42\n")
    else:
        (folder / "README.md").write_text("---\nconfigs:\n- config_name: sft\n  default: true\n  data_files:\n"
                                          "  - split: train\n    path: sft/train.csv\n---\n")
        (folder / "prefs").mkdir()
        (folder / "prefs" / "train.csv").write_text("prompt,chosen,rejected\na,b,c\n")
        (folder / "sft").mkdir()
        # a README's configs: the split's files as datasets resolves them (the cast of guessed numbers back to
        # text lost "00501" -> "501" and "3.10" -> "3.1")
        (folder / "sft" / "train.csv").write_text("instruction,response\nWhat is 6*7?,42\nA zip code?,00501\n"
                                                  "Pi to two places?,3.10\n")
        want = ["42", "00501", "3.10"]
    examples, _ = read_examples(DataConfig(path=str(folder), format="instruction"))
    assert [e.response for e in examples] == want


def test_an_eval_split_of_a_file_is_refused(tmp_path):
    """A file has no splits: eval_split = 'test' on one was accepted and read the whole file (the training data,
    where the refusal of eval_path = data.path had advised setting it)."""
    from bezoar.train.run import read_stage_data
    from tests.train.helpers import tiny_sft_config

    data = _jsonl(tmp_path / "train.jsonl", _rows("t", 3))
    base = [f"data.path={data}", "data.format=instruction"]
    with pytest.raises(ConfigError, match=r"eval_split = 'test', but eval_path .* is a file, which has no splits"):
        read_stage_data(tiny_sft_config(tmp_path / "a", *base, f"eval_path={data}", "eval_split=test"),
                        log=lambda *a: None)
    with pytest.raises(ConfigError, match=r"the eval would be the training data; point eval_path at held-out data$"):
        read_stage_data(tiny_sft_config(tmp_path / "b", *base, f"eval_path={data}"), log=lambda *a: None)


def test_bad_data_stops_a_stage_before_its_model_loads(tmp_path, monkeypatch):
    """Records were read after the base model had loaded (minutes for a 3B model, quantized): a missing field on
    line 10,000 was found only then."""
    import bezoar.train.run as run
    from tests.train.helpers import tiny_sft_config

    data = _jsonl(tmp_path / "d.jsonl", _rows("x", 3) + [{"instruction": "no answer"}])
    loaded = []
    monkeypatch.setattr(run, "build_model", lambda *a, **k: loaded.append(1) or (_ for _ in ()).throw(AssertionError))
    with pytest.raises(DataError, match=r"d.jsonl:4: record has no response field"):
        run.run_stage(tiny_sft_config(tmp_path / "run", f"data.path={data}", "data.format=instruction"),
                      log=lambda *a: None)
    assert loaded == []


def test_a_pair_reads_its_system_prompt_field():
    """The instruction formats read system_prompt first; pairs read only system and dropped a system_prompt."""
    template = PromptTemplate()
    record = Record({"prompt": "Hi", "chosen": "Hello.", "rejected": "No.", "system_prompt": "Be brief."}, "f:1")
    assert "Be brief." in pair_example(record, "pairs", template).prompt
    assert pair_example(record, "pairs", template).prompt == pair_example(
        Record({**record.data, "system": "Be brief.", "system_prompt": None}, "f:2"), "pairs", template).prompt
    assert "Be brief." not in pair_example(Record({**record.data, "system_prompt": None}, "f:3"), "pairs",
                                           template).prompt
