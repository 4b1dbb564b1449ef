"""Content fingerprints of files and folders: what a step or a stage records of its inputs, to tell later
whether they are still what it ran on."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASHES: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> sha256: a plan, the run and the report hash once


def _sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def fingerprint(path: Path, exclude=()) -> dict | None:
    """Size and sha256 of a file's content (of every file's relative name, size and sha256, for a folder, hidden
    files and caches left out, and the files or folders ``exclude`` names: a run's own output kept inside the
    folder it reads); None when it does not exist. Content only: a copy, a touch or a moved run root keep it."""
    path = Path(path)
    skip = [Path(e).expanduser().resolve() for e in exclude]

    def excluded(item: Path) -> bool:
        if not skip:
            return False
        real = item.resolve()
        return any(real == e or e in real.parents for e in skip)

    try:
        if path.is_file():
            st = path.stat()
            return {"size": st.st_size, "sha256": _sha256(path, st)}
        if path.is_dir():
            digest, size, count = hashlib.sha256(), 0, 0
            for item in sorted(x for x in path.rglob("*") if x.is_file() and not any(
                    part.startswith(".") or part == "__pycache__" for part in x.relative_to(path).parts)
                    and not excluded(x)):
                st = item.stat()
                digest.update(f"{item.relative_to(path).as_posix()}\t{st.st_size}\t{_sha256(item, st)}\n".encode())
                size, count = size + st.st_size, count + 1
            return {"files": count, "size": size, "sha256": digest.hexdigest()}
    except OSError:
        return None
    return None
