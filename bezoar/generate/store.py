"""Durable result store: one JSONL record per request key, appended as results arrive.

File format: one JSON object per line (:meth:`bezoar.generate.request.Result.to_record`), with
``"key"`` first and ``"ok"`` telling a success (``response``, ``usage``) from a final failure
(``error``, ``error_type``), in UTF-8 (a record holding a lone surrogate, which UTF-8 cannot
carry, is written with its non-ASCII characters escaped: see :func:`record_line`). The rules:

- A key is written at most once, ever: ``append`` refuses a key already in the file, and the pool
  never sends a key that is in the store (or already in flight).
- Each record is written with one ``write`` of the whole line, straight to the OS (the file has no
  buffer in the process), so a crash or SIGKILL of the process loses nothing written; only the
  requests in flight are lost.
  fsync policy (what survives a power cut or kernel crash): ``"interval"`` (default): a
  background thread fsyncs once a second when something was written, and close fsyncs, so a
  power cut loses at most the last second and the event loop never waits on the disk;
  ``"always"`` fsyncs every record in ``append``; ``"never"`` leaves it to the OS.
- A write that fails (disk full, I/O error; also a failed fsync under ``"always"``) is undone: the
  file is cut back to its length before that record and ``append`` raises :class:`StoreError`
  naming the file and the error. So a failure never leaves part of a line in the middle of the
  file, and a rerun after the cause is fixed resumes from every record stored. If even the cut
  fails, the store takes no more records, so that the fragment stays the torn last line below.
  An fsync that fails at close is a StoreError too, and so is one that failed in the background
  thread: the next ``append`` (which stops the pool) and ``close`` raise it.
- Opening an existing file indexes its keys (key -> byte offset, read back on demand by ``get``).
  A torn last line (no final newline: the writer died mid-line) is cut off, its bytes kept in
  ``<file>.torn-<UTC time>`` and a warning given; the rest of the file is used as is (a last line
  that is a whole record and lacks only its newline is kept, and the newline added). Any other
  line that is not a record (or a record whose ``usage`` is not token counts) is an error naming
  the line: that is damage, not a crash artefact.
- A file may hold several lines for one key (two runs' files joined by hand, say). The key's
  record is then its first success, or its first failure when it has no success: a paid answer
  always wins over a failure recorded before or after it. Every line stays in the file.
- Recorded failures count as done: a rerun does not retry them (a 400 stays a 400). With
  ``retry_failed=True`` every failure line is moved out of the file into
  ``<file>.failed-<UTC time>.jsonl`` (the file is rewritten atomically without them, success
  lines all kept) and the requests of keys with no success are sent again. ``retry_failed`` may
  instead be a set of keys: only those keys' failures are moved and sent again, the others stay
  recorded (a caller whose later work was built on some failures keeps those).
- An exclusive advisory lock (flock) keeps a second process from writing the same file. The
  lock is taken on the file the path names at that moment: a process that opened the file just
  before another one rewrote it (``retry_failed``) sees that its locked file is no longer the one
  at the path and opens the path again, so it never writes into a file already replaced.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import threading
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from bezoar.generate.request import GenerateError

try:  # advisory locking is POSIX-only; elsewhere the store runs unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("bezoar.generate")
FSYNC_POLICIES = ("interval", "always", "never")


class StoreError(GenerateError):
    pass


@dataclass
class StoreReport:
    """What opening a store found."""

    records: int = 0
    failed: int = 0
    torn_bytes: int = 0
    torn_copy: str | None = None
    duplicate_lines: int = 0
    moved_failures: int = 0
    failures_copy: str | None = None
    warnings: list[str] = field(default_factory=list)


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


class MemoryStore:
    """The store interface without a file: dedupes within one process, forgets at exit."""

    def __init__(self) -> None:
        self._records: dict[str, dict] = {}
        self.report = StoreReport()

    def open(self) -> StoreReport:
        return self.report

    def close(self) -> None:
        pass

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def __len__(self) -> int:
        return len(self._records)

    def keys(self):
        return self._records.keys()

    def failed(self, key: str) -> bool:
        record = self._records.get(key)
        return record is not None and _is_failure(record)

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def append(self, record: dict) -> None:
        key = record["key"]
        if key in self._records:
            raise StoreError(f"key {key} is already stored")
        self._records[key] = record


class JSONLStore:
    """Append-only JSONL store on disk (see the module doc)."""

    def __init__(self, path: str | os.PathLike, *, fsync: str = "interval",
                 retry_failed: bool | Collection[str] = False, fsync_interval_s: float = 1.0):
        if fsync not in FSYNC_POLICIES:
            raise StoreError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.path = Path(path)
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        # True: every failure is retried; a collection: the failures of those keys only.
        self.retry_failed = retry_failed if isinstance(retry_failed, bool) else frozenset(retry_failed)
        self._offsets: dict[str, int] = {}
        self._failed: set[str] = set()  # keys whose record is a failure
        self._failure_keys: set[str] = set()  # keys with a failure line (answered in another line too, maybe)
        self._file = None
        self._reader = None
        self._size = 0  # the file's length: where the next record starts, and where a failed one is cut
        self._broken: str | None = None  # why appends are refused (a failed write could not be undone)
        self._sync_failed: str | None = None  # the background fsync's error, raised by the next append or close
        self._dirty = False
        self._syncer: threading.Thread | None = None
        self._stop_syncer = threading.Event()
        self.report = StoreReport()

    def __repr__(self) -> str:
        return f"JSONLStore({str(self.path)!r}, records={len(self._offsets)})"

    # ------------------------------------------------------------------ open / close
    def open(self) -> StoreReport:
        if self._file is not None:
            return self.report
        self._offsets, self._failed, self.report = {}, set(), StoreReport()
        self._broken = self._sync_failed = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._open_locked()
        try:
            self._reader = self._open_reader()
            self._repair_tail()
            self._index()
            if any(self._retried(key) for key in self._failure_keys):
                self._move_failures()
        except BaseException:
            self.close()
            raise
        if self.report.duplicate_lines:
            self.report.warnings.append(
                f"{self.path}: {self.report.duplicate_lines} lines repeat a key seen earlier in the file; each key's "
                "first success is used (its first failure where it has no success)")
        if self.fsync == "interval":
            self._stop_syncer.clear()
            self._syncer = threading.Thread(target=self._sync_every_interval, name="store-fsync", daemon=True)
            self._syncer.start()
        for message in self.report.warnings:
            log.warning(message)
        return self.report

    def _open_locked(self):
        """The file at the path, opened for appending and locked. A process that rewrites the file
        (``retry_failed``) replaces it by a rename and then lets go of its lock on the old one: a lock
        taken on a file opened just before the rename is a lock on a file no longer at the path, and
        records written there are lost. So the locked file is checked to be the one at the path, and
        the path opened again while it is not."""
        for _ in range(100):
            try:
                file = _open_for_append(self.path)
            except OSError as e:
                raise StoreError(f"cannot open {self.path} for writing: {e.strerror or e}") from None
            if fcntl is None:
                return file
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                file.close()
                raise StoreError(f"{self.path} is being written by another process") from None
            if _same_file(file.fileno(), self.path):
                return file
            file.close()  # replaced between the open and the lock: the new file is the one to lock
        raise StoreError(f"{self.path} keeps being replaced by another process; cannot lock it")

    def _open_reader(self):
        """A reader of the locked file (by the path, checked to be the same file: records are
        indexed and read back from the file that is written, never from another one)."""
        reader = open(self.path, "rb")
        if fcntl is not None and not _same_file(self._file.fileno(), reader.fileno()):
            reader.close()
            raise StoreError(f"{self.path} was replaced while this process held its lock; another program "
                             "rewrites it: stop that program and rerun")
        return reader

    def _sync_every_interval(self) -> None:
        while not self._stop_syncer.wait(self.fsync_interval_s):
            if self._dirty:
                self._dirty = False  # cleared first: a write landing during the fsync sets it again
                try:
                    os.fsync(self._file.fileno())
                except (ValueError, AttributeError):  # closed under us: close() syncs
                    return
                except OSError as e:
                    # The disk failed to take what was written: records of the last interval may be gone
                    # from it. Syncing stops, and the next append or close says so (see _sync_failed).
                    self._sync_failed = (f"cannot sync {self.path} to disk: {e.strerror or e}; the records "
                                         "written in the second before may not be on the disk")
                    return

    def close(self) -> None:
        if self._syncer is not None:
            self._stop_syncer.set()
            self._syncer.join()
            self._syncer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._file is not None:
            file, self._file = self._file, None
            try:
                if self.fsync != "never" and self._dirty:
                    self._dirty = False
                    os.fsync(file.fileno())
            except OSError as e:
                raise StoreError(f"cannot sync {self.path} to disk: {e.strerror or e}; the records written since "
                                 "the last sync may be lost if the machine goes down now") from None
            finally:
                file.close()  # also releases the flock
        if self._sync_failed is not None:
            failed, self._sync_failed = self._sync_failed, None
            raise StoreError(failed)

    def __enter__(self) -> "JSONLStore":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _repair_tail(self) -> None:
        size = os.fstat(self._reader.fileno()).st_size
        if size == 0:
            return
        keep = self._last_newline(size) + 1
        if keep == size:
            return
        self._reader.seek(keep)
        torn = self._reader.read()
        # The file is changed below; a new reader holds none of it in a buffer.
        self._reader.close()
        self._reader = self._open_reader()
        if _is_record(torn):
            # Only the newline is missing (a prefix of a record never parses as one): the record is
            # whole and was paid for, so it is kept and the newline added.
            try:
                os.write(self._file.fileno(), b"\n")
            except OSError as e:
                raise StoreError(f"cannot write to {self.path}: {e.strerror or e}") from None
            self.report.warnings.append(f"{self.path}: the last record had no final newline; added it")
            return
        copy = self.path.with_name(f"{self.path.name}.torn-{_stamp()}")
        copy.write_bytes(torn)
        os.ftruncate(self._file.fileno(), keep)
        self.report.torn_bytes, self.report.torn_copy = len(torn), str(copy)
        self.report.warnings.append(
            f"{self.path}: the last line was torn ({len(torn)} bytes without a newline, left by a crash); "
            f"cut it off and kept its bytes in {copy.name}")

    def _last_newline(self, size: int) -> int:
        """Offset of the file's last newline, or -1 (read backwards in blocks: lines can be long)."""
        end = size
        while end > 0:
            start = max(0, end - 65536)
            self._reader.seek(start)
            cut = self._reader.read(end - start).rfind(b"\n")
            if cut >= 0:
                return start + cut
            end = start
        return -1

    def _index(self) -> None:
        """Index the keys of the file (from its start) and count its failure lines. A key with
        several lines is indexed at its first success, or at its first failure when it has none."""
        offset = 0
        self._offsets.clear()
        self._failed.clear()
        self._failure_keys.clear()
        self.report.duplicate_lines = 0
        self._reader.seek(0)
        for number, line in enumerate(self._reader, start=1):
            if not line.strip():  # a blank line (hand-edited file): nothing to index
                offset += len(line)
                continue
            try:
                record = json.loads(line)
                key = record["key"]
                if not isinstance(key, str):
                    raise TypeError("key is not a string")
                _check_usage(record.get("usage"))
            except (ValueError, KeyError, TypeError, IndexError) as e:
                raise StoreError(
                    f"{self.path} line {number} is not a result record ({type(e).__name__}: {e}); the file is "
                    "damaged beyond a torn last line: fix or remove that line, then rerun") from None
            failed = _is_failure(record)
            if failed:
                self._failure_keys.add(key)
            if key not in self._offsets:
                self._offsets[key] = offset
                if failed:
                    self._failed.add(key)
            else:
                self.report.duplicate_lines += 1
                if key in self._failed and not failed:  # a paid answer beats a failure recorded before it
                    self._offsets[key] = offset
                    self._failed.discard(key)
            offset += len(line)
        self._size = offset
        self.report.records, self.report.failed = len(self._offsets), len(self._failed)

    def _retried(self, key: str) -> bool:
        """Whether a failure recorded for ``key`` is to be moved aside and sent again."""
        return self.retry_failed is True or (self.retry_failed is not False and key in self.retry_failed)

    def _move_failures(self) -> None:
        """Rewrite the file without the failure lines to retry (atomically), keeping them in a side
        file. Every other line is kept as it is (a repeated success too): nothing is dropped. The
        keys whose only records were those failures are then missing from the store, and so are
        sent again."""
        copy = self.path.with_name(f"{self.path.name}.failed-{_stamp()}.jsonl")
        tmp = self.path.with_name(self.path.name + ".rewrite")
        retried, moved_lines = sum(1 for key in self._failed if self._retried(key)), 0
        new_file = None
        try:
            self._reader.seek(0)
            with open(tmp, "wb") as kept, open(copy, "wb") as moved:
                for line in self._reader:
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if _is_failure(record) and self._retried(record["key"]):
                        moved.write(line)
                        moved_lines += 1
                    else:
                        kept.write(line)
                for f in (kept, moved):  # both on the disk before the rename makes the move real
                    f.flush()
                    os.fsync(f.fileno())
            # The lock is on the old file: take it on the new file before it replaces the old one.
            new_file = _open_for_append(tmp)
            if fcntl is not None:
                fcntl.flock(new_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.replace(tmp, self.path)
        except OSError as e:
            if new_file is not None:
                new_file.close()
            for partial in (tmp, copy):
                with contextlib.suppress(OSError):
                    os.unlink(partial)
            raise StoreError(f"cannot rewrite {self.path} without its failures: {e.strerror or e}; the file is "
                             "unchanged") from None
        self._file.close()
        self._file = new_file
        try:
            fsync_dir(self.path.parent)  # the rename itself on the disk
        except OSError as e:
            raise StoreError(f"cannot sync the folder of {self.path} to disk: {e.strerror or e}") from None
        self._reader.close()
        self._reader = self._open_reader()
        self.report.moved_failures, self.report.failures_copy = retried, str(copy)
        superseded = moved_lines - retried
        self.report.warnings.append(
            f"{self.path}: moved {moved_lines} failure records to {copy.name}; {retried} requests will be retried"
            + (f" ({superseded} of the records moved were of keys answered in another line, or repeated)"
               if superseded else ""))
        self._index()

    # ------------------------------------------------------------------ queries and writes
    def __contains__(self, key: str) -> bool:
        return key in self._offsets

    def __len__(self) -> int:
        return len(self._offsets)

    def keys(self):
        return self._offsets.keys()

    def failed(self, key: str) -> bool:
        return key in self._failed

    def get(self, key: str) -> dict | None:
        """The stored record for ``key`` (read back from the file), or None."""
        offset = self._offsets.get(key)
        if offset is None:
            return None
        self._reader.seek(offset)
        return json.loads(self._reader.readline())

    def append(self, record: dict) -> None:
        """Write one record (one write of the whole line; fsync per the policy). Refuses a stored key.
        A failed write is cut back off the file and raised as StoreError (see the module doc)."""
        if self._file is None:
            raise StoreError(f"store {self.path} is not open")
        if self._broken is not None:
            raise StoreError(self._broken)
        if self._sync_failed is not None:
            raise StoreError(self._sync_failed)
        key = record["key"]
        if key in self._offsets:
            raise StoreError(f"key {key} is already stored in {self.path}")
        try:
            line = record_line(record)
        except (TypeError, ValueError, RecursionError) as e:
            raise StoreError(f"cannot store the record of key {key} in {self.path}: it is not JSON data "
                             f"({e})") from None
        fd = self._file.fileno()
        try:
            written = 0
            while written < len(line):  # a short write (the disk filling up) leaves the rest to send
                written += os.write(fd, line[written:])
            if self.fsync == "always":
                os.fsync(fd)
        except OSError as e:
            raise self._undo_write(e) from None
        self._offsets[key] = self._size
        self._size += len(line)
        if _is_failure(record):
            self._failed.add(key)
        if self.fsync != "always":
            self._dirty = True

    def _undo_write(self, error: OSError) -> StoreError:
        """Cut off whatever part of a failed record reached the file; the error to raise."""
        reason = error.strerror or str(error)
        if error.errno in errno.errorcode:
            reason += f" ({errno.errorcode[error.errno]})"
        message = f"cannot write to {self.path}: {reason}"
        try:
            os.ftruncate(self._file.fileno(), self._size)
        except OSError as e:
            # The fragment stays; appending after it would bury it mid-file, where open() refuses
            # it as damage. Left as the last line, the next open cuts it off as torn.
            self._broken = (f"{self.path}: an earlier write failed and its fragment could not be cut off "
                            f"({e.strerror or e}); no more records are taken: rerun once the disk is fixed")
            return StoreError(f"{message}; cutting off the part written also failed ({e.strerror or e})")
        return StoreError(f"{message}; the file is as before this record: free space or fix the disk and "
                          "rerun, the records stored are kept and not sent again")


def json_utf8(value, **dumps) -> bytes:
    """``value`` as JSON text in UTF-8 (``dumps``: json.dumps' layout arguments). Text is written as it
    is, except that a value holding a lone surrogate (a teacher's answer may end in half an emoji:
    "\\ud83d" is valid JSON, but no UTF-8) is written with every non-ASCII character escaped: valid
    UTF-8 that reads back as the same string. Raises TypeError or ValueError for a value JSON cannot
    hold."""
    try:
        return json.dumps(value, ensure_ascii=False, **dumps).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, **dumps).encode("ascii")


def record_line(record: dict) -> bytes:
    """One record as a JSONL line in UTF-8 (``json_utf8``, compact)."""
    return json_utf8(record, separators=(",", ":")) + b"\n"


def _is_record(line: bytes) -> bool:
    """Whether ``line`` is a whole result record (a JSON object with a string key)."""
    try:
        record = json.loads(line)
    except ValueError:  # also bad UTF-8
        return False
    return isinstance(record, dict) and isinstance(record.get("key"), str)


def _is_failure(record: dict) -> bool:
    return record.get("error") is not None or record.get("ok") is False


def _check_usage(usage) -> None:
    """Refuse a ``usage`` that is not token counts (a hand edit): found at open, the error names the
    line; found when the record is read back, it would stop a run with a traceback."""
    if not usage:
        return
    if not isinstance(usage, dict):
        raise TypeError(f"usage is a {type(usage).__name__}, not an object of token counts")
    for name in ("input_tokens", "output_tokens"):
        value = usage.get(name)
        try:
            int(value or 0)
        except (TypeError, ValueError, OverflowError):
            raise TypeError(f"usage.{name} is not a token count: {value!r}") from None


def _same_file(fd: int, other) -> bool:
    """Whether the open file ``fd`` is ``other`` (a descriptor or a path; False when the path is gone)."""
    try:
        theirs = os.fstat(other) if isinstance(other, int) else os.stat(other)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def fsync_dir(folder: Path) -> None:
    """Put a rename in ``folder`` on the disk (the name is the folder's data: fsyncing the file
    alone leaves a power cut free to bring back the old name). A no-op where folders cannot be
    opened or synced (Windows; some file systems answer EINVAL)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _open_for_append(path: Path):
    # Unbuffered: append writes each line with os.write itself, so no buffer in the process can
    # hold back (and later write out) the rest of a line whose write failed.
    return open(path, "ab", buffering=0)


def open_store(store) -> "JSONLStore | MemoryStore":
    """A store object from a path, a store, or None (memory only)."""
    if store is None:
        return MemoryStore()
    if isinstance(store, (str, os.PathLike)):
        return JSONLStore(store)
    return store
