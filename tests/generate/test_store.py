"""The JSONL store: append once, resume, torn-line repair, failures, locking, fsync policy."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bezoar.generate.request import Result, Usage
from bezoar.generate.store import JSONLStore, MemoryStore, StoreError


def ok_record(key: str, text: str = "hi") -> dict:
    return Result(key, id=key, response=text, usage=Usage(3, 1), attempts=1, latency_s=0.01).to_record()


def failed_record(key: str) -> dict:
    return Result(key, id=key, error="HTTP 400: bad", error_type="request", attempts=1).to_record()


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_append_get_and_reopen(tmp_path):
    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        store.append(ok_record("a", "first é"))
        store.append(failed_record("b"))
        assert "a" in store and "b" in store and "c" not in store and len(store) == 2
        assert store.get("a")["response"] == "first é" and store.get("c") is None
        assert store.failed("b") and not store.failed("a")
    with JSONLStore(path) as store:
        assert store.report.records == 2 and store.report.failed == 1
        assert store.get("b")["error"] == "HTTP 400: bad"
        store.append(ok_record("c"))
        assert store.get("c")["key"] == "c" and store.get("a")["response"] == "first é"
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]


def test_reopening_the_same_store_object(tmp_path):
    store = JSONLStore(tmp_path / "o.jsonl")
    store.open()
    store.append(ok_record("a"))
    store.close()
    report = store.open()
    assert report.records == 1 and report.duplicate_lines == 0 and "a" in store
    store.close()


def test_memory_store_queries():
    store = MemoryStore()
    store.append(ok_record("a"))
    store.append(failed_record("b"))
    assert sorted(store.keys()) == ["a", "b"] and store.failed("b") and not store.failed("a")


@pytest.mark.parametrize("kind", ["memory", "jsonl"])
def test_a_key_is_never_written_twice(tmp_path, kind):
    store = MemoryStore() if kind == "memory" else JSONLStore(tmp_path / "o.jsonl")
    store.open()
    store.append(ok_record("a"))
    with pytest.raises(StoreError, match="already stored"):
        store.append(ok_record("a", "again"))
    store.close()


def test_torn_last_line_is_cut_kept_aside_and_warned(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        store.append(ok_record("a"))
        store.append(ok_record("b"))
    torn = b'{"key":"c","id":"c","ok":tr'
    with open(path, "ab") as f:
        f.write(torn)
    with caplog.at_level(logging.WARNING, logger="bezoar.generate"):
        store = JSONLStore(path)
        report = store.open()
    assert report.torn_bytes == len(torn) and "torn" in caplog.text
    assert open(report.torn_copy, "rb").read() == torn
    assert "c" not in store and len(store) == 2
    store.append(ok_record("c"))
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]
    assert open(path, "rb").read().endswith(b"\n")


def test_a_file_of_one_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"key": "x", "ok": tr')
    with JSONLStore(path) as store:
        assert len(store) == 0 and store.report.torn_bytes == 21
    assert path.read_bytes() == b""


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    # Only the final newline is missing (an editor that strips it, a short write that stopped one
    # byte short): the record is whole and was paid for. It is kept, not cut off and sent again.
    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        store.append(ok_record("a"))
        store.append(ok_record("b"))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    with JSONLStore(path) as store:
        assert len(store) == 2 and "b" in store and store.get("b")["response"] == "hi"
        assert store.report.torn_bytes == 0 and store.report.torn_copy is None
        store.append(ok_record("c"))
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]
    assert not list(tmp_path.glob("out.jsonl.torn-*"))


def test_a_damaged_middle_line_is_an_error_naming_it(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(ok_record("a")) + "\nnot json at all\n" + json.dumps(ok_record("b")) + "\n")
    with pytest.raises(StoreError, match=r"out.jsonl line 2 is not a result record"):
        JSONLStore(path).open()
    path.write_text(json.dumps({"no": "key"}) + "\n")
    with pytest.raises(StoreError, match="line 1"):
        JSONLStore(path).open()


def test_repeated_keys_in_a_file_use_the_first(tmp_path, caplog):
    path = tmp_path / "out.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (ok_record("a", "one"), ok_record("a", "two"))) + "\n\n")
    with caplog.at_level(logging.WARNING, logger="bezoar.generate"), JSONLStore(path) as store:
        assert store.report.duplicate_lines == 1 and store.get("a")["response"] == "one"
    assert "repeat a key" in caplog.text


def test_a_success_is_used_over_a_failure_of_the_same_key(tmp_path):
    # Two runs' files joined by hand: the failure of the first run and the paid answer of a
    # later one, in either order. The answer is the record; the failure does not hide it.
    path = tmp_path / "out.jsonl"
    rows = [failed_record("a"), ok_record("b", "b1"), ok_record("a", "paid"), ok_record("a", "paid again"),
            failed_record("b")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with JSONLStore(path) as store:
        assert store.get("a")["response"] == "paid" and store.get("b")["response"] == "b1"
        assert not store.failed("a") and not store.failed("b")
        assert store.report.failed == 0 and store.report.duplicate_lines == 3


def test_retry_failed_never_drops_a_paid_answer_of_a_repeated_key(tmp_path):
    path = tmp_path / "out.jsonl"
    rows = [failed_record("a"), ok_record("a", "paid"), ok_record("a", "paid twice"), failed_record("b"),
            failed_record("b"), ok_record("c")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with JSONLStore(path, retry_failed=True) as store:
        assert store.get("a")["response"] == "paid" and "b" not in store and "c" in store
        assert store.report.moved_failures == 1  # only b is sent again: a has its answer
    # Every line is somewhere: the success lines kept, every failure line in the side file.
    assert [(r["key"], r.get("response")) for r in lines(path)] == [("a", "paid"), ("a", "paid twice"),
                                                                     ("c", "hi")]
    assert [r["key"] for r in lines(store.report.failures_copy)] == ["a", "b", "b"]


def test_retry_failed_moves_failures_aside(tmp_path):
    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        for r in (ok_record("a"), failed_record("b"), ok_record("c"), failed_record("d")):
            store.append(r)
    with JSONLStore(path, retry_failed=True) as store:
        assert store.report.moved_failures == 2
        assert "b" not in store and "d" not in store and store.get("c")["response"] == "hi"
        store.append(ok_record("b", "now fine"))
    assert [r["key"] for r in lines(path)] == ["a", "c", "b"]
    assert [r["key"] for r in lines(store.report.failures_copy)] == ["b", "d"]
    with JSONLStore(path) as store:  # without the flag, failures stay failures
        assert store.report.failed == 0


def test_retry_failed_for_some_keys_moves_only_their_failures(tmp_path):
    """A caller whose later work was built on some failures (evol's later epochs) retries the others only."""
    path = tmp_path / "out.jsonl"
    rows = [ok_record("a"), failed_record("b"), failed_record("c"), ok_record("c", "paid"), failed_record("d")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = path.read_bytes()
    with JSONLStore(path, retry_failed={"a", "e"}) as store:  # no failure of those keys: nothing moves
        assert store.report.moved_failures == 0 and store.report.failures_copy is None
        assert store.failed("b") and store.failed("d")
    assert path.read_bytes() == before
    with JSONLStore(path, retry_failed=["b", "c"]) as store:
        assert store.report.moved_failures == 1  # b; c has its answer, its failure line goes with b's
        assert "b" not in store and store.failed("d") and store.get("c")["response"] == "paid"
    assert [(r["key"], r["ok"]) for r in lines(path)] == [("a", True), ("c", True), ("d", False)]
    assert [r["key"] for r in lines(store.report.failures_copy)] == ["b", "c"]


def test_a_second_writer_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    with JSONLStore(path):
        with pytest.raises(StoreError, match="another process"):
            JSONLStore(path).open()
    with JSONLStore(path):  # released on close
        pass


def test_a_file_rewritten_between_open_and_lock_is_opened_again(tmp_path, monkeypatch):
    # B opens the path; before B takes its lock, A (retry_failed) rewrites the file by a rename
    # and lets go of its lock on the old file. B's lock on the old file then succeeds: B must see
    # that file is no longer the store and open the path again, where it meets A's lock, instead
    # of writing its paid answers into a file that is gone. (flock is per open file: two stores in
    # one process stand for two processes.)
    import bezoar.generate.store as store_module

    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(ok_record("a")) + "\n" + json.dumps(failed_record("b")) + "\n")
    a = JSONLStore(path, retry_failed=True, fsync="never")
    b = JSONLStore(path, fsync="never")
    real_open = store_module._open_for_append
    opened = []

    def open_then_let_a_rewrite(target):
        file = real_open(target)
        opened.append(target)
        if len(opened) == 1:
            a.open()  # A's rewrite lands between B's open and B's lock
        return file

    monkeypatch.setattr(store_module, "_open_for_append", open_then_let_a_rewrite)
    with pytest.raises(StoreError, match="being written by another process"):
        b.open()
    monkeypatch.setattr(store_module, "_open_for_append", real_open)
    a.append(ok_record("b", "paid by A"))
    a.close()
    with b:  # A is done: B opens the rewritten file and its records land in it
        assert "b" in b and not b.failed("b")
        b.append(ok_record("c", "paid by B"))
    assert [r["key"] for r in lines(path)] == ["a", "b", "c"]


def test_the_rewrite_syncs_the_folder(tmp_path, monkeypatch):
    # The rename that drops the failures must be on the disk before records are appended to the
    # new file: otherwise a power cut can bring back the old file without them.
    path = tmp_path / "out.jsonl"
    path.write_text(json.dumps(failed_record("b")) + "\n")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real_fsync(fd))[1])
    with JSONLStore(path, retry_failed=True, fsync="never"):
        assert os.stat(tmp_path).st_ino in synced


@pytest.mark.parametrize("usage", ['"lots"', '[1, 2]', '{"input_tokens": "many", "output_tokens": 1}',
                                   '{"input_tokens": 1, "output_tokens": [2]}'])
def test_a_record_whose_usage_is_not_token_counts_is_an_error_naming_it(tmp_path, usage):
    # A hand edit gone wrong: found when the record is read back, it stopped the run with a traceback.
    path = tmp_path / "out.jsonl"
    bad = {**ok_record("b"), "usage": json.loads(usage)}
    path.write_text(json.dumps(ok_record("a")) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(StoreError, match=f"{path} line 2 is not a result record .*usage"):
        JSONLStore(path).open()


def test_a_lone_surrogate_is_stored_as_valid_utf8_and_reads_back_the_same(tmp_path):
    # A teacher's answer may end in half an emoji: "\\ud83d" is valid JSON, a str in Python, and
    # no UTF-8. The record is written escaped and reads back equal; other lines stay as they are.
    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        store.append(ok_record("a", "smile \ud83d and é"))
        store.append(ok_record("b", "plain é"))
        assert store.get("a")["response"] == "smile \ud83d and é"
    data = path.read_bytes()
    data.decode("utf-8")  # valid UTF-8 throughout
    assert b"\\ud83d" in data and "plain é".encode() in data
    with JSONLStore(path) as store:
        assert store.get("a")["response"] == "smile \ud83d and é" and store.get("b")["response"] == "plain é"


def test_a_record_json_cannot_hold_is_a_store_error_and_writes_nothing(tmp_path):
    import datetime

    path = tmp_path / "out.jsonl"
    with JSONLStore(path) as store:
        store.append(ok_record("a"))
        record = ok_record("b")
        record["meta"] = {"day": datetime.date(2024, 1, 1)}
        with pytest.raises(StoreError, match=f"cannot store the record of key b in {path}.*date"):
            store.append(record)
        assert "b" not in store
        store.append(ok_record("c"))
    assert [r["key"] for r in lines(path)] == ["a", "c"]


@pytest.mark.parametrize("policy,expected", [("always", 5), ("never", 0), ("interval", 1)])
def test_fsync_policy(tmp_path, monkeypatch, policy, expected):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    store = JSONLStore(tmp_path / "o.jsonl", fsync=policy, fsync_interval_s=3600)
    store.open()
    for i in range(5):
        store.append(ok_record(str(i)))
    store.close()
    # interval: nothing within the hour but the one at close; never: none at all
    assert len(calls) == expected


def test_interval_fsync_runs_in_the_background(tmp_path, monkeypatch):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    store = JSONLStore(tmp_path / "o.jsonl", fsync="interval", fsync_interval_s=0.02)
    store.open()
    store.append(ok_record("a"))
    deadline = time.monotonic() + 60  # a wait, not a bound: the thread syncs within 20 ms on an idle machine
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 1
    time.sleep(0.1)
    assert len(calls) == 1  # nothing new written: no more fsyncs
    store.append(ok_record("b"))
    store.close()
    assert len(calls) == 2  # one more, by the thread or by close, for the second record


def test_unwritable_path_is_one_clear_error(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    with pytest.raises(StoreError, match="cannot open"):
        JSONLStore(target).open()


# A file-size limit (RLIMIT_FSIZE) makes the kernel behave as a full disk would: write(2) stores what
# fits, returns short, and the next write fails (EFBIG instead of ENOSPC). It is set in a child
# process, where nothing else is writing.
REPO = Path(__file__).resolve().parents[2]
FILL_UP_PRELUDE = r"""
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
HARD = resource.getrlimit(resource.RLIMIT_FSIZE)[1]

def fill_up(path, room):
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + room, HARD))

def free_space():
    resource.setrlimit(resource.RLIMIT_FSIZE, (HARD, HARD))
"""


def run_filling_up(script: str, *args) -> dict:
    """Run ``script`` (after FILL_UP_PRELUDE) in a child process; it prints one JSON object."""
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_FSIZE") or resource.getrlimit(resource.RLIMIT_FSIZE)[1] != resource.RLIM_INFINITY:
        pytest.skip("needs an unlimited hard RLIMIT_FSIZE")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FILL_UP_PRELUDE + script, *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


STORE_FILLS_UP = r"""
from bezoar.generate.request import Result, Usage
from bezoar.generate.store import JSONLStore, StoreError

path, size = sys.argv[1], int(sys.argv[2])
record = lambda key: Result(key, id=key, response=key * size, attempts=1).to_record()
store = JSONLStore(path, fsync="never")
store.open()
store.append(record("a"))
before = open(path, "rb").read()
fill_up(path, 100)  # room for a part of the next line only
try:
    store.append(record("b"))
    error = None
except Exception as e:
    error = f"{type(e).__name__}: {e}"
after = open(path, "rb").read()
free_space()
store.append(record("c"))
got_c = store.get("c")["key"]
store.close()
print(json.dumps({"error": error, "unchanged": after == before, "got_c": got_c}))
"""


@pytest.mark.parametrize("size", [200, 20000])  # within and beyond the size of a write buffer
def test_a_disk_that_fills_up_mid_line_leaves_no_fragment(tmp_path, size):
    path = tmp_path / "out.jsonl"
    seen = run_filling_up(STORE_FILLS_UP, path, size)
    assert seen["error"].startswith(f"StoreError: cannot write to {path}: File too large"), seen["error"]
    assert seen["unchanged"], "the failed append left part of its line in the file"
    assert seen["got_c"] == "c"  # later records are read back from where they really are
    with JSONLStore(path) as store:
        assert sorted(store.keys()) == ["a", "c"] and store.report.torn_bytes == 0
        assert store.get("c")["response"] == "c" * size


def _failing_write(monkeypatch, path, *, after_bytes: int, error: int = errno.ENOSPC):
    """os.write on the store's file: the first call writes ``after_bytes`` (a short write, as
    the kernel does when the disk fills up), every later one fails with ``error``."""
    real_write = os.write
    short_writes = [after_bytes] if after_bytes else []

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") != os.path.realpath(path):
            return real_write(fd, data)
        if short_writes:
            return real_write(fd, bytes(data[:short_writes.pop()]))
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the store's fd by /proc")
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO])
def test_a_failed_write_is_undone_and_named(tmp_path, monkeypatch, error):
    path = tmp_path / "out.jsonl"
    store = JSONLStore(path, fsync="never")
    store.open()
    store.append(ok_record("a"))
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        _failing_write(patch, path, after_bytes=7, error=error)  # a short write, then the error
        with pytest.raises(StoreError) as info:
            store.append(ok_record("b"))
    assert str(info.value).startswith(f"cannot write to {path}: {os.strerror(error)} ({errno.errorcode[error]})")
    assert path.read_bytes() == before and "b" not in store
    store.append(ok_record("b", "second try"))
    assert store.get("b")["response"] == "second try"
    store.close()
    assert [r["key"] for r in lines(path)] == ["a", "b"]


def test_a_failed_fsync_is_undone(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    store = JSONLStore(path, fsync="always")
    store.open()
    store.append(ok_record("a"))
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
        with pytest.raises(StoreError, match="cannot write to .*out.jsonl: Input/output error"):
            store.append(ok_record("b"))
    assert path.read_bytes() == before and "b" not in store
    store.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the store's fd by /proc")
def test_a_fragment_that_cannot_be_cut_stays_last(tmp_path, monkeypatch):
    # If even the truncate fails, nothing more is appended: the fragment stays the last line,
    # which the next open cuts off as torn.
    path = tmp_path / "out.jsonl"
    store = JSONLStore(path, fsync="never")
    store.open()
    store.append(ok_record("a"))
    with monkeypatch.context() as patch:
        _failing_write(patch, path, after_bytes=7)
        patch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
        with pytest.raises(StoreError, match="No space left on device"):
            store.append(ok_record("b"))
    with pytest.raises(StoreError, match=r"out.jsonl: an earlier write failed .*no more records"):
        store.append(ok_record("c"))
    store.close()
    with JSONLStore(path) as store:
        assert list(store.keys()) == ["a"] and store.report.torn_bytes == 7


def test_a_failed_sync_at_close_is_named_and_the_lock_released(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    store = JSONLStore(path, fsync="interval", fsync_interval_s=3600)
    store.open()
    store.append(ok_record("a"))
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
        with pytest.raises(StoreError, match="cannot sync .*out.jsonl to disk: Input/output error"):
            store.close()
    with JSONLStore(path) as again:
        assert list(again.keys()) == ["a"]


def test_a_failed_background_sync_stops_the_next_append_and_close(tmp_path, monkeypatch):
    # The interval thread's fsync failing means the disk may not hold the last second's records: the
    # next append refuses (the pool stops on it) and close says so too, instead of syncing stopping quietly.
    path = tmp_path / "out.jsonl"
    tried = []

    def failing_fsync(fd):
        tried.append(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    store = JSONLStore(path, fsync="interval", fsync_interval_s=0.02)
    store.open()
    store.append(ok_record("a"))
    deadline = time.monotonic() + 60  # a wait, not a bound: the thread fails within 20 ms on an idle machine
    while store._syncer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tried and not store._syncer.is_alive()
    with pytest.raises(StoreError, match="cannot sync .*out.jsonl to disk: Input/output error"):
        store.append(ok_record("b"))
    monkeypatch.undo()
    with pytest.raises(StoreError, match="cannot sync .*out.jsonl to disk: Input/output error"):
        store.close()
    with JSONLStore(path) as again:
        assert list(again.keys()) == ["a"]
