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
    # A folder of several data files that name no split: all of them are the train split.
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


def _hh_record(i: int, split: str) -> dict:
    return {"chosen": f"\n\nHuman: q{i} {split}\n\nAssistant: good", "rejected": f"\n\nHuman: q{i} {split}\n\nAssistant: bad"}


def _write_gz_jsonl(path, rows):
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_a_local_copy_of_hh_rlhf_reads_as_datasets_reads_it(tmp_path):
    """Anthropic/hh-rlhf ships as <subset>/train.jsonl.gz and test.jsonl.gz, beside red-team transcripts whose
    file names no split: neither the folder nor one of its files could be read (".gz" was an unknown type)."""
    import datasets

    root = tmp_path / "hh-rlhf"
    _write_gz_jsonl(root / "helpful-base" / "train.jsonl.gz", [_hh_record(i, "train") for i in range(3)])
    _write_gz_jsonl(root / "helpful-base" / "test.jsonl.gz", [_hh_record(i, "test") for i in range(2)])
    _write_gz_jsonl(root / "harmless-base" / "train.jsonl.gz", [_hh_record(i, "harmless") for i in range(4)])
    _write_gz_jsonl(root / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": "x"}])
    for split, n in (("train", 7), ("test", 2)):
        ours = load_records(root, split=split)
        theirs = datasets.load_dataset(str(root), split=split)
        assert len(ours) == len(theirs) == n
        assert sorted(json.dumps(r.data, sort_keys=True) for r in ours) == \
            sorted(json.dumps(dict(r), sort_keys=True) for r in theirs)
    ours = load_records(root)
    # each record named by its own file and line, the files in the order of their paths
    assert ours[0].origin == f"{root / 'harmless-base' / 'train.jsonl.gz'}:1"
    assert ours[4].origin == f"{root / 'helpful-base' / 'train.jsonl.gz'}:1"
    assert [r.data["chosen"] for r in load_records(root, limit=5)] == [r.data["chosen"] for r in ours[:5]]
    direct = load_records(root / "helpful-base" / "test.jsonl.gz")
    assert [r.origin for r in direct] == [f"{root / 'helpful-base' / 'test.jsonl.gz'}:{n}" for n in (1, 2)]
    with pytest.raises(DataError, match=r"no data files for split 'validation'; its files name the split\(s\) "
                                        r"'test', 'train'"):
        load_records(root, split="validation")


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_json_and_jsonl_files(tmp_path, samples, compression):
    import bz2
    import gzip
    import lzma

    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
    for name in ("lamini.jsonl", "alpaca.json"):
        path = tmp_path / f"{name}.{compression}"
        with opener(path, "wb") as f:
            f.write((samples / name).read_bytes())
        assert [r.data for r in load_records(path)] == [r.data for r in load_records(samples / name)]
    bad = tmp_path / f"bad.jsonl.{compression}"
    with opener(bad, "wb") as f:
        f.write(b'{"a": 1}\n{"a": }\n')
    with pytest.raises(DataError, match=rf"bad.jsonl.{compression}:2: not valid JSON"):
        load_records(bad)
    whole = (tmp_path / f"lamini.jsonl.{compression}").read_bytes()
    cut = tmp_path / f"cut.jsonl.{compression}"
    cut.write_bytes(whole[: len(whole) // 2])  # a download that stopped halfway
    with pytest.raises(DataError, match=rf"cut.jsonl.{compression}: cannot be read as {compression}"):
        load_records(cut)
    damaged = bytearray(whole)
    damaged[len(whole) // 2] ^= 0xFF  # a flipped byte inside the stream (zlib.error for gzip)
    (tmp_path / f"damaged.jsonl.{compression}").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=rf"damaged.jsonl.{compression}"):
        load_records(tmp_path / f"damaged.jsonl.{compression}")
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown data file type '.parquet.gz'"):
        load_records(tmp_path / "x.parquet.gz")


def test_a_folder_of_files_names_each_record_and_error_by_file_and_line(tmp_path):
    """With two files or more, the folder went through datasets.load_dataset: a bad line was "An error occurred
    while generating the dataset", a number became the string '5', and origins were "folder [train]: row 3"."""
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"instruction": "x", "response": "y"}\n')
    (folder / "b.jsonl").write_text('{"instruction": "x", "response": 5}\n')
    records = load_records(folder)
    assert [r.origin for r in records] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'b.jsonl'}:1"]
    assert records[1].data["response"] == 5  # as written: the format reader names its type
    (folder / "b.jsonl").write_text('{"instruction": "x", "response": "y"}\n{"instruction": \n')
    with pytest.raises(DataError, match=rf"{folder / 'b.jsonl'}:2: not valid JSON"):
        load_records(folder)
    skipped: list[str] = []
    assert len(load_records(folder, skipped=skipped)) == 2 and skipped == [f"{folder / 'b.jsonl'}:2"]


def test_a_folders_split_is_chosen_as_datasets_chooses_it(tmp_path):
    import datasets

    # One file is read for the default split whatever its name (an eval folder's validation.jsonl, read with
    # the train split that eval_path inherits, loaded before and must still load).
    evaldata = tmp_path / "evaldata"
    evaldata.mkdir()
    (evaldata / "validation.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    assert [r.data["a"] for r in load_records(evaldata)] == [1, 2]
    assert len(load_records(evaldata, split="validation")) == 2
    # Folders name the split before file names do, for every file, and case counts, as in datasets.
    nested = tmp_path / "nested"
    for rel, a in (("train/a.jsonl", 1), ("test/a.jsonl", 2), ("extra_train.jsonl", 3)):
        (nested / rel).parent.mkdir(parents=True, exist_ok=True)
        (nested / rel).write_text(json.dumps({"a": a}) + "\n")
    cased = tmp_path / "cased"
    cased.mkdir()
    (cased / "Train.jsonl").write_text('{"a": 1}\n')
    (cased / "Test.jsonl").write_text('{"a": 2}\n')
    for folder in (nested, cased):
        ours = sorted(r.data["a"] for r in load_records(folder))
        assert ours == sorted(r["a"] for r in datasets.load_dataset(str(folder), split="train")), folder

    one = tmp_path / "one"
    one.mkdir()
    (one / "train.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match=r"no data files for split 'test'; its files name the split\(s\) 'train'"):
        load_records(one, split="test")  # was: the train file's records, whatever the split
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match=r"no split 'test': no file name says which split it holds"):
        load_records(plain, split="test")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train-00000-of-00002.jsonl").write_text('{"a": 1}\n')
    (mixed / "train-00001-of-00002.jsonl").write_text('{"a": 2}\n')
    (mixed / "dev.jsonl").write_text('{"a": 3}\n')
    (mixed / "notes.jsonl").write_text('{"a": 4}\n')  # names no split beside files that do: left out
    for split in ("train", "validation"):
        ours = [r.data["a"] for r in load_records(mixed, split=split)]
        assert ours == sorted(r["a"] for r in datasets.load_dataset(str(mixed), split=split)), split
    assert [r.data["a"] for r in load_records(mixed)] == [1, 2]


@pytest.mark.parametrize("text, match", [
    ('{\n  "a": 1\n}\n{\n  "a": 2\n}\n', r"x.json:4: not valid JSON \(Extra data at column 1\)"),
    ('[{"a": 1}]\n]\n', r"x.json:2: not valid JSON \(Extra data at column 1\)"),
])
def test_json_with_something_after_it_is_not_taken_for_json_lines(tmp_path, text, match):
    """Any "Extra data" switched to reading JSON lines, and the first line's error was shown instead."""
    p = tmp_path / "x.json"
    p.write_text(text)
    with pytest.raises(DataError, match=match):
        load_records(p)
