"""A two-instance cluster run through `launch/g5_24xlarge.sh run`, as two CPU processes on
localhost: the real trainer joins through jax.distributed with the coordinator address the
script takes from (fake) IMDS, both processes share one workdir (the run's EFS, here a
directory), and a spot notice to one instance stops both with one checkpoint.

S3 and SSM are moto's server on loopback; nothing reaches a network beyond 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_imds import NOTICE_PATH, FakeImds
from launch_helpers import free_port, s3_objects
from train_helpers import prepared, train_env, wait_all, wait_for  # noqa: F401  (fixtures)

RUN = "cluster"
PREFIX = f"runs/{RUN}"

# The instance's venv: the test's own Python and cxrjax. The trainer records its pid so the
# test can hold it still while the notice goes out; exec keeps that pid for the watcher.
CXRJAX_SHIM = f"""#!/bin/sh
[ "$1" = train ] && echo $$ >"$CXRJAX_HOME/trainer.pid"
exec {sys.executable} -m cxrjax.cli "$@"
"""
PYTHON_SHIM = f'#!/bin/sh\nexec {sys.executable} "$@"\n'


def fresh_volume(home: Path, jax_cache: Path) -> None:
    """An instance's new EBS volume: a venv and nothing else. Its compilation cache is the
    test session's, which only saves compile time."""
    shutil.rmtree(home, ignore_errors=True)
    (home / "venv" / "bin").mkdir(parents=True)
    for name, text in (("cxrjax", CXRJAX_SHIM), ("python", PYTHON_SHIM)):
        (home / "venv" / "bin" / name).write_text(text)
        (home / "venv" / "bin" / name).chmod(0o755)
    jax_cache.mkdir(parents=True, exist_ok=True)
    (home / "jax-cache").symlink_to(jax_cache)


def upload_prepared(s3, prepared: Path, size: int) -> None:
    """As process 0 of an earlier launch would have: the shards, then the manifest."""
    for path in sorted(prepared.rglob("*")):
        if path.is_file():
            key = f"{PREFIX}/prepared-{size}/{path.relative_to(prepared)}"
            s3.put_object(Bucket="cxrjax-bucket", Key=key, Body=path.read_bytes())


@pytest.mark.slow
def test_two_instances_share_a_workdir_stop_together_on_a_notice_and_resume_from_s3(
    repo, aws, prepared, train_env, tmp_path
):
    cluster_repo = tmp_path / "repo"  # the shipped tree, with the real recipe
    shutil.copytree(repo, cluster_repo)
    shutil.copy(Path(__file__).resolve().parents[1] / "configs" / "chexnet.py", cluster_repo / "configs")
    upload_prepared(aws["s3"], prepared, 32)  # the smoke recipe trains at 32 px

    shared = tmp_path / "efs"
    homes = [tmp_path / f"instance-{i}" for i in range(2)]
    port = free_port()
    configs = []
    for pid in range(len(homes)):
        configs.append(tmp_path / f"run-{pid}.env")
        # What up writes into each instance's run.env (process 1 is told the coordinator).
        configs[-1].write_text(
            f"S3_PREFIX=s3://cxrjax-bucket/{PREFIX}\nREGION=us-east-1\nRUN_CONFIG=chexnet:smoke\nNODES=2\n"
            f"WANDB_PARAMETER=/cxrjax/no-such-key\nSYNC_INTERVAL=3600\nCOORDINATOR_PORT={port}\n"
            f"PROCESS_ID={pid}\nCOORDINATOR={'' if pid == 0 else f'127.0.0.1:{port}'}\nSHARED_DIR={shared}\n"
        )
    base_env = dict(aws["env"])
    base_env.update({k: v for k, v in train_env.items() if k.startswith(("JAX_", "WANDB_", "PYTHON"))})
    base_env["JAX_NUM_CPU_DEVICES"] = "1"

    def launch(imds: list[FakeImds]) -> list[subprocess.Popen]:
        procs = []
        for pid, home in enumerate(homes):
            fresh_volume(home, Path(train_env["JAX_COMPILATION_CACHE_DIR"]))
            env = dict(
                base_env, CXRJAX_HOME=str(home), CXRJAX_IMDS_ENDPOINT=imds[pid].endpoint, CXRJAX_SPOT_POLL_SECONDS="0.3"
            )
            procs.append(
                subprocess.Popen(
                    [str(cluster_repo / "launch" / "g5_24xlarge.sh"), "run", "--config", str(configs[pid])],
                    env=env,
                    stdout=open(home.parent / f"{home.name}.out", "a"),
                    stderr=subprocess.STDOUT,
                )
            )
        return procs

    def output(pid: int) -> str:
        return (homes[pid].parent / f"{homes[pid].name}.out").read_text()

    work = shared / "work" / RUN
    with FakeImds(local_ipv4="127.0.0.1") as imds0, FakeImds() as imds1:
        procs = launch([imds0, imds1])
        try:
            # Mid-training (the first logged steps), both trainers are held still until the
            # watcher on instance 1 has seen the notice and sent SIGTERM, so the signal lands
            # mid-run however fast the warm compilation cache makes the rest.
            wait_for(
                lambda: (work / "metrics.jsonl").exists() or any(p.poll() is not None for p in procs),
                300,
                "the first training metrics",
                poll=0.01,
            )
            assert all(p.poll() is None for p in procs), output(0)[-3000:] + output(1)[-3000:]
            trainers = [int((home / "trainer.pid").read_text()) for home in homes]
            for pid in trainers:
                os.kill(pid, signal.SIGSTOP)
            try:
                imds1.notice()
                noticed = time.monotonic()
                wait_for(lambda: imds1.count("GET", NOTICE_PATH, 200) >= 1, 10, "the watcher's poll")
                wait_for(lambda: "sending SIGTERM to" in output(1), 10, "the watcher's SIGTERM")
            finally:
                for pid in trainers:
                    os.kill(pid, signal.SIGCONT)
            codes = wait_all(procs, 60)
            seconds = time.monotonic() - noticed
        finally:
            for p in procs:
                p.kill()
    assert codes == [0, 0], output(0)[-3000:] + output(1)[-3000:]
    assert seconds < 30, f"{seconds:.1f} s from the notice to both instances done"
    assert imds0.count("GET", NOTICE_PATH, 200) == 0  # instance 0 got no notice of its own

    hint = "SIGTERM (preemption notice) reached a process: checkpoint saved at step "
    line = next(x for x in output(0).splitlines() if x.startswith(hint))
    stopped_at = int(line[len(hint) :].split(";")[0])
    assert not (work / "done.json").exists() and stopped_at < 8  # smoke: 2 epochs of 4 steps
    assert not any((home / "work").exists() for home in homes)  # one workdir, the shared one
    assert (work.parent / f"{RUN}.pulled").exists()

    # Process 0 uploaded the shared workdir: the checkpoint with both processes' data
    # positions; each instance its own log. Nothing half-written went up.
    uploaded = s3_objects(aws["s3"], f"{PREFIX}/")
    step_dir = f"{PREFIX}/workdir/checkpoints/{stopped_at}"
    assert {f"{step_dir}/data/process_0-of-2.json", f"{step_dir}/data/process_1-of-2.json"} <= uploaded.keys()
    assert f"{PREFIX}/workdir/done.json" not in uploaded
    assert not any("orbax-checkpoint-tmp" in key for key in uploaded)
    assert b"spot interruption notice" in uploaded[f"{PREFIX}/logs/process-1/run.log"]
    assert b"process 0 uploads the shared" in uploaded[f"{PREFIX}/logs/process-1/run.log"]

    # "up" again with a new file system and new volumes: process 0 pulls the workdir from
    # S3 while process 1 waits for the pull, and both finish from the checkpoint.
    shutil.rmtree(shared)
    with FakeImds(local_ipv4="127.0.0.1") as imds0, FakeImds() as imds1:
        codes = wait_all(launch([imds0, imds1]), 300)
    assert codes == [0, 0], output(0)[-3000:] + output(1)[-3000:]
    assert f"resumed from step {stopped_at} in {work / 'checkpoints'}" in output(0)
    done = json.loads((work / "done.json").read_text())
    uploaded = s3_objects(aws["s3"], f"{PREFIX}/workdir/")
    assert json.loads(uploaded[f"{PREFIX}/workdir/done.json"]) == done
    assert f"{PREFIX}/workdir/test/predictions.csv" in uploaded
