"""One writer per folder: an exclusive advisory lock (flock) on a file that holds the writer's pid.

The OS drops the lock when the process dies, however it dies, so a lock is never left stale; the pid in the
file only names the holder in the refusal of a second writer.
"""

from __future__ import annotations

import os
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
