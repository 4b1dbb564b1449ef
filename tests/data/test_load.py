"""bezoar.data.load: every input format, limit and shuffle, and each bad input's one clear message."""

from __future__ import annotations

import json

import pytest

from bezoar.data import DataError, load_records

LAMINI_FIRST = "Name three fruits that are red."


def test_jsonl(samples):
    records = load_records(samples / "lamini.jsonl")
    assert len(records) == 5
    assert records[0].data["instruction"] == LAMINI_FIRST
    assert records[2].origin == f"{samples / 'lamini.jsonl'}:3"


def test_json_list_and_data_object(samples):
    alpaca = load_records(samples / "alpaca.json")
    assert [r.data["output"] for r in alpaca][:1] == ["Positive"] and len(alpaca) == 4
    assert alpaca[1].origin.endswith("alpaca.json: record 1")
    pairs = load_records(samples / "pairs.json")
    assert len(pairs) == 3 and pairs[1].data["system"] == "Answer with one word."


def test_json_lines_under_json_name(tmp_path, samples):
    p = tmp_path / "x.json"
    p.write_text((samples / "lamini.jsonl").read_text())
    assert [r.data for r in load_records(p)] == [r.data for r in load_records(samples / "lamini.jsonl")]


def test_parquet(tmp_path, samples):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.data for r in load_records(samples / "orca.jsonl")]
    cols = {k: [r.get(k) for r in rows] for k in ("system_prompt", "question", "response")}
    pq.write_table(pa.table(cols), tmp_path / "orca.parquet")
    records = load_records(tmp_path / "orca.parquet", limit=2)
    assert len(records) == 2 and records[1].data["question"] == rows[1]["question"]
    assert records[1].origin.endswith("orca.parquet: row 1")


def test_datasets_saved_folder_and_data_folder(tmp_path, samples):
    import datasets

    rows = [r.data for r in load_records(samples / "evol_instruct.jsonl")]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "saved"))
    got = load_records(tmp_path / "saved")
    assert [r.data for r in got] == rows and got[0].origin.startswith(f"{tmp_path / 'saved'} [train]: row 0")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_records(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match=r"no split 'validation'; it has train, test"):
        load_records(tmp_path / "dd", split="validation")
    # A folder of several data files goes through datasets.load_dataset.
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(2):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_records(folder)) == 2 * len(rows)


def test_limit_and_shuffle(samples):
    path = samples / "lamini.jsonl"
    full = [r.data["instruction"] for r in load_records(path)]
    assert [r.data["instruction"] for r in load_records(path, limit=2)] == full[:2]
    a = [r.data["instruction"] for r in load_records(path, shuffle_seed=1)]
    b = [r.data["instruction"] for r in load_records(path, shuffle_seed=1)]
    c = [r.data["instruction"] for r in load_records(path, shuffle_seed=2)]
    assert a == b and sorted(a) == sorted(full) and (a != full or c != full)
    # limit takes the first N in file order, then shuffles them
    assert sorted(r.data["instruction"] for r in load_records(path, limit=3, shuffle_seed=5)) == sorted(full[:3])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", "response": \n')
    with pytest.raises(DataError, match=rf"^{p}:3: not valid JSON \("):
        load_records(p)


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_malformed_jsonl_line_names_the_column_where_the_record_breaks(tmp_path, end):
    # json counts the line's own newline as the start of a next line: the error must not say column 1
    p = tmp_path / "bad.jsonl"
    p.write_bytes(f'{{"instruction": "a", "response": "b"}}{end}{{"instruction": "x", "response": {end}'.encode())
    with pytest.raises(DataError, match=rf"^{p}:2: not valid JSON \(Expecting value at column 34\)$"):
        load_records(p)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{p}:2: expected a JSON object"):
        load_records(p)


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_text_that_is_not_utf8_names_file_and_line(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b'[{"instruction": "a", "response": "b"},\n{"instruction": "caf\xe9", "response": "b"}]'
                  if name.endswith(".json") else
                  b'{"instruction": "a", "response": "b"}\n{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"^{p}:2: not valid UTF-8 \(byte 0xe9 at byte 21 of the line\)"):
        load_records(p)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_jsonl(tmp_path, text):
    p = tmp_path / "empty.jsonl"
    p.write_text(text)
    with pytest.raises(DataError, match=rf"^{p}: the dataset is empty"):
        load_records(p)


@pytest.mark.parametrize("text, match", [
    ("[]", "the dataset is empty"),
    ('{"data": []}', "the dataset is empty"),
    ('{"rows": [1]}', "needs a 'data' list"),
    ('"hello"', "expected a list of records"),
    ('[{"a": 1}, 3]', "record 1: expected a JSON object"),
    ('[{"a": 1},\n {"b": }]', r":2: not valid JSON"),
])
def test_bad_json(tmp_path, text, match):
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(DataError, match=match) as e:
        load_records(p)
    assert str(p) in str(e.value)


def test_missing_file_unknown_type_bad_parquet(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"unknown data file type '.csv'"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x.parquet: cannot be read as Parquet"):
        load_records(tmp_path / "x.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"folder holds no data files"):
        load_records(tmp_path / "empty_dir")
    with pytest.raises(DataError, match="limit must be a positive"):
        load_records(tmp_path / "x.parquet", limit=0)


def test_hub_name_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^bezoar-test/no-such-dataset: not a local file or folder.*offline"):
        load_records("bezoar-test/no-such-dataset")


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_a_byte_order_mark_at_the_start_is_dropped(tmp_path, name):
    """Editors on Windows start UTF-8 files with a byte-order mark; it is not part of the first record."""
    p = tmp_path / name
    body = ('[{"instruction": "a", "response": "b"}]' if name.endswith(".json")
            else '{"instruction": "a", "response": "b"}\n')
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    records = load_records(p)
    assert [r.data for r in records] == [{"instruction": "a", "response": "b"}]


def test_a_path_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    """data.path = "~/data/sft.jsonl" names a file in the home folder (as model.path's "~" does); it was
    'file not found' although the file was there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    (tmp_path / "data" / "folder").mkdir()
    (tmp_path / "data" / "folder" / "x.jsonl").write_text('{"instruction": "c", "response": "d"}\n')
    assert [r.data["response"] for r in load_records("~/data/sft.jsonl")] == ["b"]
    assert [r.data["response"] for r in load_records("~/data/folder")] == ["d"]
    with pytest.raises(DataError, match=r"nope.jsonl: file not found"):
        load_records("~/data/nope.jsonl")


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_json_nested_too_deep_names_file_and_line(tmp_path, name):
    # Python's json recurses per nesting level: a line nested deeper than its limit was a RecursionError traceback.
    p = tmp_path / name
    p.write_text('{"instruction": "a", "response": "b"}\n{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=rf"^{p}:2: not valid JSON \(nested too deeply"):
        load_records(p)
    skipped = []
    assert len(load_records(p, skipped=skipped)) == 1 and skipped == [f"{p}:2"]
