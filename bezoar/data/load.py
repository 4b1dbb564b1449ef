"""Read datasets of records (dicts) from JSONL, JSON, Parquet and Hugging Face ``datasets``.

``load_records(source)`` takes:

- a ``.jsonl`` file (one JSON object a line; blank lines skipped);
- a ``.json`` file: a list of objects, ``{"data": [...]}``, or JSON lines under a .json name;
- either of those compressed (``.jsonl.gz``, ``.json.bz2``, ``.jsonl.xz``: HH-RLHF ships as
  ``<subset>/train.jsonl.gz``);
- a ``.parquet`` file;
- a folder written by ``datasets`` (``save_to_disk``), or a folder of data files. A folder's files are
  read by the readers here, each file's records named by its own file and line, when they are all
  JSON(L) or Parquet; its split's files are chosen as ``datasets`` chooses them (``_split_files``).
  A folder of CSV or Arrow files, or one whose README.md lists its ``configs:``, is read by
  ``datasets.load_dataset``;
- a hub name (``owner/name``) when the Hugging Face hub is reachable or the dataset is cached.

Every record remembers where it came from (``file:line`` for JSONL, ``file: record i`` otherwise)
so that later errors (a missing field, a bad transcript) can name it. ``limit`` keeps the first N
records in file order (e.g. the recipe's first 100K HH-RLHF examples); ``shuffle_seed`` then
shuffles them with a fixed seed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import logging
import lzma
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Record", "load_records"]

DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # for .jsonl and .json files
# The words that name a split in a data file's name or folder, as datasets' default file patterns have them.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


log = logging.getLogger("bezoar.data")


class DataError(ValueError):
    """Data the user gave cannot be used; the message names the file and line (or record)."""


@dataclass
class Record:
    data: dict
    origin: str  # "file.jsonl:12", "file.parquet: row 3", ...


def load_records(source: str | os.PathLike, split: str = "train", limit: int | None = None,
                 shuffle_seed: int | None = None, skipped: list[str] | None = None) -> list[Record]:
    """All records of ``source`` (see the module docstring), first ``limit`` ones, optionally shuffled.

    With a ``skipped`` list, a JSON(L) record that cannot be read (a malformed or non-UTF-8 line, a value
    that is not an object) is left out and its origin appended to the list, instead of stopping.
    """
    if limit is not None and limit <= 0:
        raise DataError(f"{source}: limit must be a positive number of records, got {limit}")
    path = Path(source).expanduser()  # "~/data.jsonl", as model.path takes it
    if path.is_file():
        records = _read_file(path, limit, skipped)
    elif path.is_dir():
        records = _read_datasets_folder(path, split, limit, skipped)
    elif _data_suffix(path)[0] in DATA_FILE_SUFFIXES or str(source).startswith(("/", ".", "~")):
        raise DataError(f"{source}: file not found")
    else:
        records = _read_hub(str(source), split, limit)
    if not records:
        bad = f"; {len(skipped)} unreadable ones skipped, first {skipped[0]}" if skipped else ""
        raise DataError(f"{source}: the dataset is empty (no records{bad})")
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(records))
        records = [records[i] for i in order]
    return records


# ---- files --------------------------------------------------------------------------------------------


def _data_suffix(path: Path) -> tuple[str, str | None]:
    """(the data suffix, the compression suffix or None) of a file name: train.jsonl.gz -> (".jsonl", ".gz")."""
    suffixes = [x.lower() for x in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        return (suffixes[-2] if len(suffixes) > 1 else ""), suffixes[-1]
    return (suffixes[-1] if suffixes else ""), None


def _own_reader(path: Path) -> bool:
    """Whether ``_read_file`` reads the file (JSON lines or JSON, compressed or not, or Parquet)."""
    suffix, compression = _data_suffix(path)
    return suffix in (".jsonl", ".json") or (suffix == ".parquet" and compression is None)


def _read_file(path: Path, limit: int | None, skipped: list[str] | None) -> list[Record]:
    suffix, compression = _data_suffix(path)
    if suffix == ".parquet" and compression is None:
        return _read_parquet(path, limit)
    if suffix not in (".jsonl", ".json"):
        shown = "".join(path.suffixes[-2:] if compression else path.suffixes[-1:]) or "(none)"
        raise DataError(f"{path}: unknown data file type {shown!r}; expected .jsonl, .json or .parquet (.jsonl "
                        f"and .json may be compressed: {', '.join(COMPRESSED)}), or a datasets folder")
    opener = COMPRESSED.get(compression, open)
    try:
        with opener(path, "rb") as f:
            if suffix == ".jsonl":
                return _read_jsonl(path, f, limit, skipped)
            return _read_json(path, f.read(), limit, skipped)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # a damaged or truncated archive
        raise DataError(f"{path}: cannot be read{f' as {compression[1:]}' if compression else ''} "
                        f"({type(e).__name__}: {e})") from None


def _object_or_error(value, origin: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object (a record with fields), got {type(value).__name__}")
    return value


def _decode_utf8(data: bytes, path: Path, first_line: int = 1) -> str:
    """``data`` as text; bytes that are not UTF-8 are a DataError naming the line they sit on."""
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark at the start (Windows editors) is dropped
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at byte {column} of the line); "
                        "data files must be UTF-8 text") from None


def _read_jsonl(path: Path, f, limit: int | None, skipped: list[str] | None = None) -> list[Record]:
    """The records of JSON lines read from ``f`` (bytes, so that a line that is not UTF-8 can be named)."""
    records = []
    for n, raw in enumerate(f, start=1):
        origin = f"{path}:{n}"
        try:
            line = _decode_utf8(raw, path, first_line=n)
            if not line.strip():
                continue
            try:
                # without the line's end: an error at the end of the record is then placed there, not
                # at column 1 of a next line that json counts after the newline
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{origin}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:  # json recurses per nesting level
                raise DataError(f"{origin}: not valid JSON (nested too deeply to read)") from None
            record = Record(_object_or_error(value, origin), origin)
        except DataError:
            if skipped is None:
                raise
            skipped.append(origin)
            continue
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    return records


def _read_json(path: Path, data: bytes, limit: int | None, skipped: list[str] | None = None) -> list[Record]:
    text = _decode_utf8(data, path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and _first_line_is_object(text):  # JSON lines under a .json name (the hub has many)
            return _read_jsonl(path, io.BytesIO(data), limit, skipped)
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # json recurses per nesting level
        raise DataError(f"{path}: not valid JSON (nested too deeply to read)") from None
    if isinstance(value, dict):
        if "data" not in value or not isinstance(value["data"], list):
            raise DataError(f"{path}: a JSON object file needs a 'data' list of records; its keys are "
                            f"{', '.join(repr(k) for k in list(value)[:12])}")
        value = value["data"]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a list of records or {{\"data\": [...]}}, got {type(value).__name__}")
    records = []
    for i, v in enumerate(value):
        origin = f"{path}: record {i}"
        if skipped is not None and not isinstance(v, dict):
            skipped.append(origin)
            continue
        records.append(Record(_object_or_error(v, origin), origin))
        if limit is not None and len(records) >= limit:
            break
    return records


def _first_line_is_object(text: str) -> bool:
    """Whether the first line that is not blank is a JSON object on its own (JSON lines, not a JSON document
    with something after it, whose own error is the one to show)."""
    line = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _read_parquet(path: Path, limit: int | None) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with its own wording
        raise DataError(f"{path}: cannot be read as Parquet ({e})") from None
    if limit is not None:
        table = table.slice(0, limit)
    return [Record(row, f"{path}: row {i}") for i, row in enumerate(table.to_pylist())]


# ---- datasets -------------------------------------------------------------------------------------------


def _rows(dataset, name: str, limit: int | None) -> list[Record]:
    n = len(dataset)
    if limit is not None:
        n = min(n, limit)
        dataset = dataset.select(range(n))
    return [Record(dict(row), f"{name}: row {i}") for i, row in enumerate(dataset)]


def _pick_split(dataset, name: str, split: str):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DataError(f"{name}: no split {split!r}; it has {', '.join(dataset)}")
        return dataset[split]
    return dataset


def _read_datasets_folder(path: Path, split: str, limit: int | None, skipped: list[str] | None = None) -> list[Record]:
    import datasets

    name = f"{path} [{split}]"
    if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        try:
            dataset = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DataError(f"{path}: cannot be read as a saved `datasets` folder ({type(e).__name__}: {e})") from None
        return _rows(_pick_split(dataset, str(path), split), name, limit)
    files = sorted(p for p in path.rglob("*") if p.is_file() and _data_suffix(p)[0] in DATA_FILE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: folder holds no data files (.jsonl/.json/.parquet/.csv/.arrow, .jsonl or .json "
                        "compressed) and is not a saved `datasets` folder")
    chosen = None if _lists_configs(path) else _split_files(path, files, split)
    kinds = _kinds(chosen if chosen is not None else files)
    if chosen is not None and len(kinds) > 1:  # datasets reads the most common kind and drops the rest unsaid
        listed = "; ".join(f"{kind}: {', '.join(str(f.relative_to(path)) for f in fs[:3])}"
                           + (" ..." if len(fs) > 3 else "") for kind, fs in sorted(kinds.items()))
        raise DataError(f"{path}: split {split!r} holds data files of {len(kinds)} kinds ({listed}); one kind is "
                        "read, the others would be dropped: keep one kind per split (convert the others, or move "
                        "them out)")
    if chosen is not None and all(_own_reader(p) for p in chosen):
        records: list[Record] = []
        for file in chosen:  # in order, each named by its own file and line
            records += _read_file(file, None if limit is None else limit - len(records), skipped)
            if limit is not None and len(records) >= limit:
                break
        return records
    # CSV cells are text: pandas' defaults read "N/A", "None", "null" and "" as missing and a column of digits as
    # numbers ("N/A" vanished from a prompt; an answer "42" was "not a string")
    # (a README's configs choose the files: the ones datasets resolves for this split)
    text_csv = _csv_as_text(chosen if chosen is not None else _config_files(path, split)) if set(kinds) == {"csv"} \
        else {}
    try:
        try:
            dataset = datasets.load_dataset(str(path), split=split, **text_csv)
        except Exception:  # noqa: BLE001 - the columns as read here did not fit (a config's own sep, say)
            if "features" not in text_csv:
                raise
            text_csv = {k: v for k, v in text_csv.items() if k != "features"}
            dataset = datasets.load_dataset(str(path), split=split, **text_csv)
    except Exception as e:
        causes, inner = [], e
        while inner is not None and len(causes) < 3:  # datasets wraps the reader's own error, which names the line
            causes.append(f"{type(inner).__name__}: {inner}")
            inner = inner.__cause__ or inner.__context__
        raise DataError(f"{path}: `datasets` could not read this folder ({'; caused by '.join(causes)})") from None
    if set(kinds) == {"csv"} and "features" not in text_csv:  # the columns typed by guess: numbers back to text
        numeric = {k: datasets.Value("string") for k, v in dataset.features.items()
                   if isinstance(v, datasets.Value) and v.dtype.startswith(("int", "uint", "float", "bool"))}
        if numeric:
            log.warning("%s: the CSV columns %s were read as numbers (their files' headers differ or could not be "
                        "read first) and are turned back into text: leading zeros and trailing decimals are lost",
                        path, ", ".join(sorted(numeric)))
            dataset = dataset.cast(datasets.Features({**dataset.features, **numeric}))
    return _rows(dataset, name, limit)


def _split_files(path: Path, files: list[Path], split: str) -> list[Path]:
    """The files of ``split``, as ``datasets`` picks them without a config. A split is named by a word
    (``SPLIT_WORDS``, or the split's own name; case counts) between separators (``-._``, a space or digits):
    first in folder names (a file under ``train/``), for every file, then, where no folder names one, in file
    names. Where something names a split, the files named for ``split`` are its files, and files named for
    none are left out, as ``datasets`` leaves them out; where nothing names one, every file is ``train``. A
    folder holding one file is read for the default split whatever its name (an eval folder's
    ``validation.jsonl`` under an eval_path, say), and refused for another split it is not named for."""
    words = {name: SPLIT_WORDS.get(name, (name,)) for name in (split, *SPLIT_WORDS)}

    def named(parts) -> str | None:
        for part in parts:
            for name, ws in words.items():
                if any(re.search(rf"(^|[-._ 0-9]){re.escape(w)}($|[-._ 0-9])", part) for w in ws):
                    return name
        return None

    rel = {file: file.relative_to(path) for file in files}
    # datasets' sharded pattern first (data/{split}-00000-of-00001.parquet, a hub repository's files): a file's split
    # is its exact prefix there (by keywords, 'train' took train_sft, train_gen and train_prefs together)
    sharded = {file: m.group(1) for file in files
               if (m := re.fullmatch(r"data/(.+?)-\d{5}-of-\d{5}[^/]*", rel[file].as_posix()))}
    if sharded:
        chosen = sorted(file for file, name in sharded.items() if name == split)
        if not chosen:
            raise DataError(f"{path}: no data files for split {split!r}; its data/ shards name the split(s) "
                            f"{', '.join(repr(x) for x in sorted(set(sharded.values())))}")
        _note_left_out(path, [file for file in files if file not in sharded], split,
                       "are no data/ shard, which decide the splits here")
        return chosen
    splits = {file: named(reversed(rel[file].parent.parts)) for file in files}  # folders first
    if not any(splits.values()):
        splits = {file: named([rel[file].name]) for file in files}
    if len(files) == 1 and split == "train":
        return files
    if not any(splits.values()):
        if split != "train":
            raise DataError(f"{path}: no split {split!r}: no file name says which split it holds, so its "
                            f"{len(files)} file(s) are the 'train' split")
        return files
    chosen = [file for file in files if splits[file] == split]
    if not chosen:
        found = sorted({name for name in splits.values() if name})
        raise DataError(f"{path}: no data files for split {split!r}; its files name the split(s) "
                        f"{', '.join(repr(x) for x in found)}")
    _note_left_out(path, [file for file in files if splits[file] is None], split, "name no split")
    return chosen


def _note_left_out(path: Path, files: list[Path], split: str, why: str) -> None:
    """Say which data files of a folder no split reads (``why``: named for none beside files that are, or not
    data/ shards beside them): ``datasets`` leaves them out too, and their records were dropped without a word."""
    if files:
        shown = ", ".join(str(f.relative_to(path)) for f in files[:5]) + (" ..." if len(files) > 5 else "")
        log.warning("%s: %d data file(s) %s, so split %r leaves them out: %s", path, len(files), why, split, shown)


def _config_files(path: Path, split: str) -> list[Path] | None:
    """The files ``datasets`` reads for ``split`` of a folder whose README declares configs (the default config's),
    or None where it cannot say."""
    import datasets

    try:
        files = datasets.load_dataset_builder(str(path)).config.data_files.get(split)
        return [Path(str(f)) for f in files] if files else None
    except Exception:  # noqa: BLE001 - load_dataset says what is wrong
        return None


def _csv_as_text(files: list[Path] | None) -> dict:
    """``load_dataset`` settings that read CSV cells as the text they hold: no NA words ("N/A", "None", "" stay
    text) and, where the files to read are known (``files``) and share one header, every column a string (no
    type guessing: "42" stays text). The header is read as pandas reads it, as ``datasets`` does (a blank
    name is "Unnamed: 0", a repeated one "note.1", blank lines before it skipped)."""
    settings = dict(keep_default_na=False, na_filter=False)
    if not files:
        return settings
    import datasets
    import pandas as pd

    headers = []
    for file in files:
        try:
            headers.append(tuple(pd.read_csv(file, nrows=0, skip_blank_lines=True).columns))
        except Exception:  # noqa: BLE001 - unreadable here: datasets' own reader names the problem
            return settings
    if len({frozenset(h) for h in headers}) != 1:  # other columns in other files: datasets' reader says which
        return settings
    names = headers[0]  # the same columns in another order in other files are read by name
    return {**settings, "features": datasets.Features({str(name): datasets.Value("string") for name in names})}


def _kinds(files: list[Path]) -> dict[str, list[Path]]:
    """The files by the reader they need: json (.jsonl, .json, compressed or not), parquet, csv, arrow."""
    kinds: dict[str, list[Path]] = {}
    for file in files:
        suffix = _data_suffix(file)[0]
        kinds.setdefault("json" if suffix in (".jsonl", ".json") else suffix[1:], []).append(file)
    return kinds


def _lists_configs(path: Path) -> bool:
    """Whether the folder's README.md declares ``configs:`` in its YAML header (a hub repository's choice of
    files, which ``datasets`` follows)."""
    try:
        text = (path / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    return re.search(r"^configs:", header, re.MULTILINE) is not None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _read_hub(name: str, split: str, limit: int | None) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:
        if _offline():
            raise DataError(f"{name}: not a local file or folder, and it is not in the datasets cache while "
                            "the Hugging Face hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); "
                            "download it when online or give a local path") from None
        raise DataError(f"{name}: not a local file or folder, and loading it from the Hugging Face hub "
                        f"failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _rows(dataset, f"{name} [{split}]", limit)
