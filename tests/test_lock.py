"""One process per training workdir and per `prepare` output (`cxrjax.lock`): a second
gets a one-line error naming the holder; the lock goes with its process, SIGKILL
included. The holder is a small second process (no training)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from cxrjax import lock
from cxrjax.cli import main

HOLD = (
    "import sys; from cxrjax import lock\n"
    "with lock.hold(sys.argv[1], sys.argv[2], 'folder'):\n"
    "    print('held', flush=True); sys.stdin.read()\n"
)


@pytest.fixture
def holder():
    """holder(folder, name): another process holding FOLDER/NAME until the test ends."""
    procs = []

    def start(folder, name):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(folder), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_process_is_refused_until_the_first_ends_even_by_sigkill(tmp_path, holder):
    first = holder(tmp_path / "run", ".lock")
    with pytest.raises(lock.FolderLocked) as e:
        with lock.hold(tmp_path / "run", ".lock", "workdir"):
            pass
    message = str(e.value)
    assert "\n" not in message and f"in use by another process (pid {first.pid} on " in message
    first.send_signal(signal.SIGKILL)
    first.wait()
    with lock.hold(tmp_path / "run", ".lock", "workdir"):  # the kernel dropped the dead process's lock
        pass


def test_a_second_train_into_a_workdir_in_use_is_one_line(tmp_path, holder, capsys):
    holder(tmp_path / "work", ".lock")
    argv = ["train", "--config", "chexnet:smoke", "--workdir", str(tmp_path / "work")]
    assert main([*argv, f"--config.data.prepared={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cxrjax train: error: {tmp_path / 'work'}: this workdir is in use")
    assert [p.name for p in (tmp_path / "work").iterdir()] == [".lock"]  # nothing else written


def test_a_second_prepare_into_one_folder_is_one_line(tmp_path, holder, capsys):
    holder(tmp_path / "prepared", ".lock")
    argv = ["prepare", "--nih-dir", str(tmp_path), "--out", str(tmp_path / "prepared"), "--image-size", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "this --out folder is in use by another process" in err
    assert [p.name for p in (tmp_path / "prepared").iterdir()] == [".lock"]


def test_a_prepare_refused_for_bad_input_leaves_no_folder_behind(tmp_path, capsys):
    argv = ["prepare", "--nih-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "new"), "--image-size", "32"]
    assert main(argv) == 2
    assert not (tmp_path / "new").exists()
