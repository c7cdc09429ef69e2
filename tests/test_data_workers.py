"""grain's decode workers end soon after a trainer killed with SIGKILL (they used to
wait on their full queue for good, ~300 MB each). A small parent process reads one
batch through two workers, then is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, prepared, wait_for  # noqa: F401 (fixture)

PARENT = """
import multiprocessing, sys, time
from cxrjax.data.pipeline import ShardedRecords, make_loader
source = ShardedRecords(sys.argv[1])
loader = make_loader(source, batch_size=4, image_size=32, seed=0, train=True, workers=2, process_index=0, process_count=1)
batches = iter(loader)  # kept: the workers live as long as their iterator
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie waiting to be reaped has ended


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_end_after_their_trainer_is_killed(prepared):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(prepared / "train")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        # A bound to fail on, not a measurement: the workers poll their parent every second.
        wait_for(lambda: not any(_alive(pid) for pid in workers), 60, "the workers to end", poll=0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
