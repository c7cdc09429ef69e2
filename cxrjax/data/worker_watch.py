"""grain's decode workers end soon after their trainer, however it ended.

grain starts its workers with multiprocessing "spawn" as daemons, which only a clean
exit of the parent stops: after a SIGKILL (an OOM kill, `kill -9`, a lost spot node)
they would wait on their full queue forever, holding their memory. A worker starts a
thread as it unpickles its batch transform (`pipeline.DecodeBatch`), or at its first
decode, that checks every `POLL_S` seconds whether the process that started the worker is
still its parent, and ends the worker when not.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

POLL_S = 1.0
_started = False


def start() -> None:
    """Watch the parent from this process, once; nothing in a process that is no worker."""
    global _started
    if _started:
        return
    _started = True
    if multiprocessing.parent_process() is None:  # the trainer itself
        return
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="cxrjax-parent-watch", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:  # a dead parent's children are re-parented (to 1 or a subreaper)
        time.sleep(POLL_S)
    os._exit(1)
