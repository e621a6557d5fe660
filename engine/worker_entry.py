"""The first code a spawned worker runs: it ties the worker's life to the engine's before anything
heavy is imported.

A spawned process unpickles its Process target before the target's arguments, whose classes import
torch (seconds, or a minute under load). An engine killed in that window used to leave its workers
running for ever, blocked on their command queue. So the target is a `WorkerEntry`, whose unpickling
arms the guard: the death signal (Linux), a parent check (the engine may already be gone), and a
thread that watches the parent at every later stage (prctl fires when the parent *thread* exits, and
is Linux only). Nothing here runs in the engine. Standard library only.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

PARENT_POLL_S = 0.5
ORPHAN_EXIT_CODE = 75


class WorkerEntry:
    """The Process target: `WorkerEntry(os.getpid())(worker_main, *args)` in the spawned worker."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid

    def __reduce__(self) -> tuple[Callable[[int], WorkerEntry], tuple[int]]:
        return _arm, (self.parent_pid,)  # runs in the worker as soon as the target is unpickled

    def __call__(self, target: Callable[..., None], *args: Any) -> None:
        target(*args)


def _arm(parent_pid: int) -> WorkerEntry:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the engine, which stops the group
    if os.getppid() != parent_pid:  # the engine died before the death signal was set
        os._exit(ORPHAN_EXIT_CODE)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parastep-parent", daemon=True).start()
    return WorkerEntry(parent_pid)


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the engine dies."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(ORPHAN_EXIT_CODE)
