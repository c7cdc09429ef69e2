"""Multi-process training through jax.distributed, two CPU processes on localhost.

What holds across processes, and is tested here:
* the sharded train step equals the single-process step on the same global batch and
  the same total number of devices (to float rounding);
* `cxrjax train` runs to the end on 2 processes x 2 devices, stops cleanly when one
  process gets SIGTERM, resumes, and its test predictions are exactly what one
  process computes from the exported best weights.

What does not hold: a whole 2-process run does not reproduce a 1-process run with
the same devices and global batch, because the data differ. grain's IndexSampler
with ShardOptions gives each process a contiguous half of the records and shuffles
within it, so every global batch takes half its images from each half of the
training part, where one process shuffles all records together. Same images per
epoch, different batches, different trajectory.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest
from train_helpers import (  # noqa: F401 (fixtures)
    ROOT,
    best_weights_logits,
    finalized_steps,
    flat,
    prepared,
    train_command,
    train_env,
    wait_all,
    wait_for,
)

from cxrjax.train import distributed
from cxrjax.workdir import CHECKPOINTS, DONE

WORKER = ROOT / "tests" / "distributed_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_envs(base: dict, processes: int = 2, devices_each: int = 2) -> list[dict]:
    port = _free_port()
    envs = []
    for pid in range(processes):
        env = dict(base)
        env.update(
            CXRJAX_COORDINATOR=f"127.0.0.1:{port}",
            CXRJAX_NUM_PROCESSES=str(processes),
            CXRJAX_PROCESS_ID=str(pid),
            JAX_NUM_CPU_DEVICES=str(devices_each),
        )
        envs.append(env)
    return envs


def _start_all(commands, envs, logs):
    return [
        subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
        for cmd, env, log in zip(commands, envs, logs)
    ]


# --- reading the cluster description -------------------------------------------


@pytest.fixture
def recorded_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # the gloo switch; keep this process as it is
    for name in ("CXRJAX_COORDINATOR", "CXRJAX_NUM_PROCESSES", "CXRJAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _dist_cfg(**kw):
    cfg = ml_collections.ConfigDict({"coordinator": "", "num_processes": 0, "process_id": -1})
    cfg.update(kw)
    return cfg


def test_single_process_without_a_cluster(recorded_initialize):
    assert distributed.maybe_initialize(_dist_cfg()) is False
    assert recorded_initialize == []


def test_config_names_the_cluster(recorded_initialize):
    assert distributed.maybe_initialize(_dist_cfg(coordinator="10.0.0.1:1234", num_processes=4, process_id=0))
    assert recorded_initialize == [(("10.0.0.1:1234",), {"num_processes": 4, "process_id": 0})]


def test_environment_names_the_cluster_and_config_wins(recorded_initialize, monkeypatch):
    monkeypatch.setenv("CXRJAX_COORDINATOR", "head:5000")
    monkeypatch.setenv("CXRJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("CXRJAX_PROCESS_ID", "1")
    assert distributed.maybe_initialize(_dist_cfg())
    assert distributed.maybe_initialize(_dist_cfg(process_id=0))
    assert recorded_initialize == [
        (("head:5000",), {"num_processes": 2, "process_id": 1}),
        (("head:5000",), {"num_processes": 2, "process_id": 0}),
    ]


def test_coordinator_without_process_count_or_id_is_refused(recorded_initialize, monkeypatch):
    monkeypatch.setenv("CXRJAX_COORDINATOR", "head:5000")
    with pytest.raises(ValueError, match="without the process count and process id"):
        distributed.maybe_initialize(_dist_cfg(num_processes=2))
    assert recorded_initialize == []


def test_joins_once_per_process(recorded_initialize, monkeypatch):
    """Ensemble members train one after another in one process; jax refuses a second join."""
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert distributed.maybe_initialize(_dist_cfg(coordinator="head:5000", num_processes=2, process_id=0))
    assert recorded_initialize == []


def test_slurm_lets_jax_read_the_cluster(recorded_initialize, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.maybe_initialize(_dist_cfg()) is False  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.maybe_initialize(_dist_cfg())
    assert recorded_initialize == [((), {})]


# --- two real processes --------------------------------------------------------


@pytest.mark.slow
def test_two_process_step_equals_one_process_step(train_env, tmp_path):
    """The same 3 global batches through the sharded step: 2 processes x 2 devices
    against this process on 4 devices."""
    out = tmp_path / "two_process.npz"
    envs = _cluster_envs(train_env)
    logs = [tmp_path / f"worker_{i}.log" for i in range(2)]
    procs = _start_all([[sys.executable, str(WORKER), str(out)]] * 2, envs, logs)
    codes = wait_all(procs, timeout=300)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)

    sys.path.insert(0, str(WORKER.parent))
    try:
        import distributed_worker
    finally:
        sys.path.remove(str(WORKER.parent))
    from cxrjax.mesh import make_mesh

    state = distributed_worker.train(make_mesh(jax.devices()[:4]))
    one = flat(jax.device_get({"params": state.params, "batch_stats": state.batch_stats}))
    two = dict(np.load(out))
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_allclose(two[key], one[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.slow
def test_two_process_training_stops_resumes_and_predicts_like_one_process(prepared, train_env, tmp_path):
    workdir = tmp_path / "run"
    overrides = ("--config.checkpoint.every_steps=2", "--config.log_every_steps=1")
    command = train_command(workdir, prepared, *overrides)

    # SIGTERM to process 1 only: jax's preemption service tells process 0, and both stop
    # after the same step.
    logs = [tmp_path / f"first_{i}.log" for i in range(2)]
    procs = _start_all([command] * 2, _cluster_envs(train_env), logs)
    wait_for(lambda: finalized_steps(workdir), 300, "the first checkpoint", procs[0])
    procs[1].send_signal(signal.SIGTERM)
    codes = wait_all(procs)
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in text)
    assert not (workdir / DONE).exists(), "the run ended before the signal arrived"
    hint = "SIGTERM (preemption notice) reached a process: checkpoint saved at step "
    line = next((x for x in text[0].splitlines() if x.startswith(hint)), None)
    assert line and line.endswith("; rerun the same command to resume"), text[0][-2000:]
    stopped_at = int(line[len(hint) :].split(";")[0])
    assert stopped_at == finalized_steps(workdir)[-1]
    # Each process saved its own data iterator position.
    assert sorted(p.name for p in (workdir / CHECKPOINTS / str(stopped_at) / "data").glob("*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]

    logs = [tmp_path / f"second_{i}.log" for i in range(2)]
    codes = wait_all(_start_all([command] * 2, _cluster_envs(train_env), logs))
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in text)
    assert f"resumed from step {stopped_at}" in text[0]
    done = json.loads((workdir / DONE).read_text())

    # Process 0 wrote the test predictions gathered from both processes; one process
    # predicting from the exported best weights gets the same numbers for the same images.
    written = pd.read_csv(workdir / "test" / "predictions.csv", index_col=0)
    mine = _predict_test(workdir, prepared)
    assert list(written.index) == list(mine.index)
    np.testing.assert_allclose(written.to_numpy(), mine.to_numpy(), atol=1e-6)
    assert done["best_step"] in finalized_steps(workdir)


def _predict_test(workdir, prepared) -> pd.DataFrame:
    from cxrjax.data.pipeline import read_index
    from cxrjax.findings import FINDINGS

    probs = 1 / (1 + np.exp(-best_weights_logits(workdir, prepared, "test")))
    ids = read_index(prepared / "test")["image_id"].to_numpy()
    return pd.DataFrame(probs, index=pd.Index(ids, name="Image Index"), columns=[f"prob_{f}" for f in FINDINGS])
