"""One writer per folder: an exclusive advisory lock (flock) on a file that holds the writer's pid.

The OS drops the lock when the process dies, however it dies, so a lock is never left stale; the pid in the
file only names the holder in the refusal of a second writer.

Folders written whole or not at all (a merged model, an adapter) are written beside their target as
``<name>.partial-PID`` and renamed into place, the copy they replace first moved aside as ``<name>.old-PID``;
``clear_dead_writes`` removes what a process killed in between left behind.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


class Held(RuntimeError):
    """The lock file is held by another process; ``pid`` is what it wrote there ("unknown" if nothing)."""

    def __init__(self, path: Path, pid: str):
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


def hold(path: Path):
    """The open lock file at ``path`` (keep it open to hold the lock; close it to let go), with this process's
    pid written in it, or ``Held`` when another process holds it. None where the platform or the file system
    has no flock (some network mounts): the caller then runs unlocked rather than not at all."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise Held(Path(path), holder) from None
    except OSError:
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts). True where there is no cheap harmless probe, so
    that a caller keeps what such a process may still be writing."""
    if os.name != "posix":
        return True  # os.kill ends the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def writer_gone(pid: int) -> bool:
    """Whether what process ``pid`` was writing is left over: it is this process (whose writes of one target run
    one at a time, so none is in progress) or a process that no longer exists."""
    return pid == os.getpid() or not pid_alive(pid)


def clear_dead_writes(target: Path) -> list[Path]:
    """Before a whole-folder write of ``target``: remove the ``<name>.partial-PID`` and ``<name>.old-PID`` folders
    beside it that this process (its writes of one target run one at a time) or a process that is gone left.
    Each is a full-size copy, and every retry after a kill would leave another. A process killed between its two
    renames left ``target`` missing and ``<name>.old-PID`` as the only whole copy: that one is renamed back to
    ``target`` rather than removed (the newest, should several be there). A live process's folders are kept,
    since it may still be writing them (a reused pid errs on the side of keeping). Returns what was removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(target.name)}\.(partial|old)-(\d+)$")
    partial, old = [], []
    for path in target.parent.iterdir():
        m = pattern.match(path.name)
        if m is None:
            continue
        if writer_gone(int(m.group(2))):
            (partial if m.group(1) == "partial" else old).append(path)
    if old and not os.path.lexists(target):
        old.sort(key=lambda p: p.lstat().st_ctime_ns)  # the rename aside updates it: the last one moved aside
        os.rename(old.pop(), target)
    for path in partial + old:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return partial + old
