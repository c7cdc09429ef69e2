"""grain's decode workers end soon after a trainer killed with SIGKILL (they used to
wait on their full queue for good, ~300 MB each). A small parent process reads one
batch through two workers, then is killed; another is killed while its worker is still
starting up."""

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


LATE_PARENT = """
import multiprocessing, sys, time
from pathlib import Path

def late_worker(go):
    while not Path(go).exists():  # still "starting up" until the test says so
        time.sleep(0.05)
    from cxrjax.data import worker_watch
    worker_watch.start()
    time.sleep(600)

if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=late_worker, args=(sys.argv[1],), daemon=True)
    child.start()
    print(child.pid, flush=True)
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
        # A bound to fail on, not a measurement: the workers wait on their parent's sentinel.
        wait_for(lambda: not any(_alive(pid) for pid in workers), 60, "the workers to end", poll=0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in workers if "workers" in locals() else []:
            if _alive(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_a_worker_still_starting_when_its_trainer_is_killed_ends_too(tmp_path):
    # It used to read its parent's PID only then, and watch its new parent (PID 1) forever.
    script, go = tmp_path / "late_parent.py", tmp_path / "go"
    script.write_text(LATE_PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(go)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _alive(worker)
        go.touch()
        wait_for(lambda: not _alive(worker), 60, "the late worker to end", poll=0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if worker is not None and _alive(worker):
            subprocess.run(["kill", "-9", str(worker)], check=False)
