"""Interrupted training resumes exactly: a run killed with SIGKILL, restarted, stopped
with SIGTERM and restarted again ends with the same bits as a run never interrupted.

Every run is the real `cxrjax train` command in a subprocess on one CPU device.
Exactness holds bitwise: the restarted process runs the same XLA programs on the same
inputs (the grain iterator position is restored from the checkpoint, the per-step RNG
is derived from the step number), and XLA on CPU is deterministic.
"""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
from train_helpers import (  # noqa: F401 (fixtures)
    ROOT,
    STEPS_PER_EPOCH,
    finalized_steps,
    flat,
    metrics_rows,
    prepared,
    read_state,
    run_train,
    train_command,
    train_env,
    wait_for,
)

from cxrjax.models.weights import load_weights
from cxrjax.workdir import BEST_WEIGHTS, DONE

EPOCHS = 3
TOTAL = EPOCHS * STEPS_PER_EPOCH
OVERRIDES = (f"--config.epochs={EPOCHS}", "--config.checkpoint.every_steps=2", "--config.eval.test=False")


def _start(workdir, prepared, env):
    return subprocess.Popen(
        train_command(workdir, prepared, *OVERRIDES),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(proc, needle: str) -> str:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            return "".join(lines)
    proc.wait()
    raise AssertionError(f"process ended ({proc.returncode}) without printing {needle!r}:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_sigkill_and_sigterm_resume_bit_for_bit(prepared, train_env, tmp_path):
    reference = tmp_path / "reference"
    done = run_train(reference, prepared, train_env, *OVERRIDES)
    assert done.returncode == 0, done.stdout[-3000:]

    work = tmp_path / "interrupted"
    # 1. SIGKILL as soon as a checkpoint is committed: no chance to clean up.
    proc = _start(work, prepared, train_env)
    wait_for(lambda: finalized_steps(work), 240, "the first checkpoint", proc)
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (work / DONE).exists(), "the run ended before it could be killed"
    killed_at = finalized_steps(work)[-1]
    assert killed_at < TOTAL

    # 2. The same command resumes; SIGTERM as soon as it says so.
    proc = _start(work, prepared, train_env)
    head = _read_until(proc, "resumed from step")
    assert f"resumed from step {killed_at}" in head
    proc.send_signal(signal.SIGTERM)
    out = head + proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    hint = [line for line in out.splitlines() if line.startswith("SIGTERM received: checkpoint saved at step ")]
    assert len(hint) == 1 and hint[0].endswith("; rerun the same command to resume"), out[-3000:]
    stopped_at = int(hint[0].split("step ")[1].split(";")[0])
    print(f"killed at {killed_at}, SIGTERM at {stopped_at}")
    assert killed_at <= stopped_at < TOTAL
    assert stopped_at in finalized_steps(work)
    assert not (work / DONE).exists()

    # 3. And once more to the end.
    final = run_train(work, prepared, train_env, *OVERRIDES)
    assert final.returncode == 0, final.stdout[-3000:]
    assert f"resumed from step {stopped_at}" in final.stdout

    ref_done, work_done = (json.loads((d / DONE).read_text()) for d in (reference, work))
    assert work_done == {**ref_done, "weights": str(work / BEST_WEIGHTS)}

    # The whole train state of the last step, optimizer moments, RNG key and
    # plateau scale included, is bitwise identical.
    ref_state, work_state = flat(read_state(reference, TOTAL)), flat(read_state(work, TOTAL))
    assert ref_state.keys() == work_state.keys()
    different = [k for k in ref_state if not np.array_equal(ref_state[k], work_state[k])]
    assert not different, different[:5]
    assert int(work_state["['step']"]) == TOTAL

    # So are the exported best weights.
    _, ref_weights = load_weights(reference / BEST_WEIGHTS)
    _, work_weights = load_weights(work / BEST_WEIGHTS)
    ref_flat, work_flat = flat(ref_weights), flat(work_weights)
    assert all(np.array_equal(ref_flat[k], work_flat[k]) for k in ref_flat)

    # The data position: grain's iterator state in the last checkpoint.
    data_state = f"checkpoints/{TOTAL}/data/process_0-of-1.json"
    assert (reference / data_state).read_text() == (work / data_state).read_text()

    # Every validation the interrupted runs logged equals the uninterrupted run's at that
    # step, each once: a resume drops the rows logged past the checkpoint it restored.
    ref_val = {row["step"]: row for row in metrics_rows(reference, "val")}
    work_val = metrics_rows(work, "val")
    assert [row["step"] for row in work_val] == sorted(ref_val)
    train_steps = [row["step"] for row in metrics_rows(work, "train")]
    assert len(train_steps) == len(set(train_steps)) and set(train_steps) <= {
        row["step"] for row in metrics_rows(reference, "train")
    }
    for row in work_val:
        assert row["val_loss"] == ref_val[row["step"]]["val_loss"]
        assert row["val_mean_auc"] == ref_val[row["step"]]["val_mean_auc"]
