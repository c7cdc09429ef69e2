"""One run per folder: a training workdir or a `prepare` output is locked while a
process uses it, so a second run into it stops with a one-line error instead of
mixing its files with the first's.

The lock is a POSIX record lock (fcntl.lockf) on a file in the folder. The kernel
drops it when the process ends in any way, SIGKILL included, so a stale lock file
never blocks a rerun; forked children (grain workers) do not hold it; it also works
on NFS (EFS) between machines.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from cxrjax.errors import InputError
from cxrjax.jsonfile import read_json


class FolderLocked(InputError):
    """Another process holds the folder's lock."""


@contextlib.contextmanager
def hold(folder: Path, name: str, what: str):
    """Hold FOLDER/NAME exclusively for the block (the folder is created); `what`
    names the folder in the error, e.g. "workdir"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise FolderLocked(
                f"{folder}: this {what} is in use by another process ({_holder(path)}; lock {path}); "
                f"wait for it to end, or use another {what}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "since": time.time()}).encode())
        yield path
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> str:
    try:
        info = read_json(path)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):  # an InputError is a ValueError
        return "holder unknown"
