"""SIGTERM read as Ctrl-C by the commands that pay for calls or write what they paid for.

``timeout``, a job scheduler and ``docker stop`` end a process with SIGTERM. Python's default for it kills the
process on the spot, so the requests in flight were lost and paid for again on the rerun, where Ctrl-C lets
the client pool finish and store them (a second one abandons them). Training stages install their own
SIGTERM handler (a checkpoint, then exit 143) for as long as they run.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def terminate_as_interrupt():
    """While the block runs, SIGTERM raises SIGINT: the interrupted command takes its Ctrl-C path (asyncio's
    handler cancels the pool's task, which stores the answers in flight; elsewhere a KeyboardInterrupt). A SIGINT
    ignored (a command started with ``&`` by a script) is restored to Python's default for the block, or SIGTERM
    would do nothing. Outside the main thread, where no handler can be set, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        signal.raise_signal(signal.SIGINT)

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int in (signal.SIG_IGN, signal.SIG_DFL):
            signal.signal(signal.SIGINT, previous_int)
