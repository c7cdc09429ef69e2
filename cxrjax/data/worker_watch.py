"""grain's decode workers end soon after their trainer, however it ended.

grain starts its workers with multiprocessing "spawn" as daemons, which only a clean
exit of the parent stops: after a SIGKILL (an OOM kill, `kill -9`, a lost spot node)
they would wait on their full queue forever, holding their memory. A worker starts a
thread as it unpickles its batch transform (`pipeline.DecodeBatch`), or at its first
decode, that waits on multiprocessing's sentinel for the process that spawned it (a pipe
whose far end closes when that process ends) and then ends the worker.

The sentinel, not `os.getppid()`: a worker still starting up when its trainer is killed
would already see its new parent (PID 1 or a subreaper) and watch that one forever.
"""

from __future__ import annotations

import multiprocessing
import os
import threading

_started = False


def start() -> None:
    """Watch the parent from this process, once; nothing in a process that is no worker."""
    global _started
    if _started:
        return
    _started = True
    parent = multiprocessing.parent_process()
    if parent is None:  # the trainer itself
        return
    threading.Thread(target=_watch, args=(parent,), name="cxrjax-parent-watch", daemon=True).start()


def _watch(parent) -> None:
    parent.join()  # returns at once if the parent has already ended
    os._exit(1)
