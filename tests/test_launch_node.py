"""The on-node run step (`launch/g5_24xlarge.sh run` -> launch/node.py) and its exit-code
contract with SkyPilot's jobs controller: 0 only when done.json is in the workdir, the
recovery code (listed in launch/skypilot.yaml's recover_on_exit_codes) after a spot notice
and a checkpoint, and a real failure's own non-zero status (retried a bounded number of
times). S3 and SSM are moto's server on loopback, IMDSv2 is tests/fake_imds.py, and the
trainer is a stand-in that behaves like `cxrjax train` as far as the run step can tell.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_imds import FakeImds
from launch_helpers import LAUNCH, WANDB_IN_SSM, assert_no_secret, refusing_aws, s3_objects
from train_helpers import wait_for

TASK = yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())
RECOVERY = TASK["resources"]["job_recovery"]

# The venv's cxrjax on the node (Python, as the real one: it starts with SIGUSR1 ignored,
# which a bash trap could not undo). train: resumes from the newest step, saves one on SIGTERM
# (then exits 0 without done.json, as the trainer does) and on SIGUSR1 (and trains on);
# with done.json it has nothing to do; FAKE_FINISH=1 finishes at once, FAKE_FAIL=N exits N.
FAKE_CXRJAX = r"""
import json, os, signal, sys, time
from pathlib import Path

record = Path(os.environ["FAKE_RECORD"])
command, args = sys.argv[1], sys.argv[2:]
with open(record / "calls", "a") as f:
    f.write(f"{command} {' '.join(args)}\n")
if command == "prepare":
    out = Path(args[args.index("--out") + 1])
    (out / "train").mkdir(parents=True)
    (out / "train" / "train-00000-of-00001.tfrecord").write_text("shard\n")
    (out / "manifest.json").write_text("{}\n")
    sys.exit(0)
work = Path(args[args.index("--workdir") + 1])
names = ("CXRJAX_COORDINATOR", "CXRJAX_NUM_PROCESSES", "CXRJAX_PROCESS_ID", "JAX_COMPILATION_CACHE_DIR", "WANDB_API_KEY")
(record / "env").write_text("".join(f"{k}={os.environ[k]}\n" for k in names if k in os.environ))
if (work / "done.json").exists():
    print("already trained", flush=True)
    sys.exit(0)
steps = [int(p.name) for p in (work / "checkpoints").glob("*") if p.name.isdigit()]
step = max(steps, default=0)
(record / "resumed_from").write_text(f"{step}\n")

def checkpoint():
    global step
    step += 1
    (work / "checkpoints" / str(step)).mkdir(parents=True, exist_ok=True)
    (work / "checkpoints" / str(step) / "state").write_text(f"{step}\n")

if os.environ.get("FAKE_FAIL"):
    print("stand-in trainer fails", flush=True)
    sys.exit(int(os.environ["FAKE_FAIL"]))
if os.environ.get("FAKE_FINISH") == "1":
    checkpoint()
    (work / "done.json").write_text(json.dumps({"mean_auc": 0.5}))
    sys.exit(0)

def on_term(*_):
    checkpoint()
    print("saved a checkpoint on SIGTERM", flush=True)
    sys.exit(0)

def on_usr1(*_):
    checkpoint()
    print("saved a checkpoint on SIGUSR1", flush=True)

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGUSR1, on_usr1)
(work / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir(parents=True, exist_ok=True)
(work / "checkpoints" / "9.orbax-checkpoint-tmp-123" / "x").write_text("partial")
(record / "trainer.pid").write_text(str(os.getpid()))
(record / "training").touch()
while True:
    time.sleep(0.1)
"""


def test_skypilot_yaml_recovers_the_preemption_code_and_bounds_the_rest():
    """The code node.py exits with after a notice is one SkyPilot recovers; failures are
    retried, a bounded number of times."""
    sys.path.insert(0, str(LAUNCH))
    try:
        import node
    finally:
        sys.path.remove(str(LAUNCH))
    assert RECOVERY["recover_on_exit_codes"] == [node.PREEMPTED]
    assert node.PREEMPTED not in (node.DONE, node.FAILED)
    assert 0 < RECOVERY["max_restarts_on_errors"] <= 10
    assert RECOVERY["strategy"] == "FAILOVER"


class Node:
    """One node's volume (CXRJAX_HOME with a faked venv) and its run step."""

    def __init__(self, repo: Path, root: Path, aws: dict, settings: str):
        self.repo, self.home, self.record, self.aws = repo, root / "home", root / "record", aws
        self.config = root / "run.env"
        root.mkdir(parents=True, exist_ok=True)
        self.config.write_text(settings)
        self.record.mkdir(parents=True, exist_ok=True)
        self.fresh_volume()

    def fresh_volume(self) -> None:
        import shutil

        shutil.rmtree(self.home, ignore_errors=True)
        (self.home / "venv" / "bin").mkdir(parents=True)
        for name, text in (
            ("cxrjax", f"#!{sys.executable}\n{FAKE_CXRJAX}"),
            ("python", f'#!/bin/sh\nexec {sys.executable} "$@"\n'),
            # The AWS CLI that setup installs into the venv: records the call, then the next on PATH.
            ("aws", f'#!/bin/sh\necho "$3 $4" >>{self.record}/venv-aws\nPATH=${{PATH#*:}} exec aws "$@"\n'),
        ):
            (self.home / "venv" / "bin" / name).write_text(text)
            (self.home / "venv" / "bin" / name).chmod(0o755)

    def env(self, imds: FakeImds | None, **extra: str) -> dict[str, str]:
        return dict(
            self.aws["env"],
            CXRJAX_HOME=str(self.home),
            CXRJAX_IMDS_ENDPOINT=imds.endpoint if imds else "http://127.0.0.1:9",
            CXRJAX_SPOT_POLL_SECONDS="0.2",
            FAKE_RECORD=str(self.record),
            **extra,
        )

    def start(self, imds: FakeImds | None, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [str(self.repo / "launch" / "g5_24xlarge.sh"), "run", "--config", str(self.config)],
            env=self.env(imds, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, imds: FakeImds | None = None, **extra: str) -> tuple[int, str]:
        proc = self.start(imds, **extra)
        try:
            output, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        return proc.returncode, output

    def training(self, proc: subprocess.Popen) -> None:
        wait_for(lambda: (self.record / "training").exists() or proc.poll() is not None, 90, "training")
        assert proc.poll() is None, proc.stdout.read()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


SETTINGS = "S3_PREFIX=s3://cxrjax-bucket/runs/{run}\nREGION=us-east-1\nRUN_CONFIG=demo:small\nSYNC_INTERVAL=3600\n"


@pytest.mark.slow
def test_a_notice_checkpoints_uploads_and_exits_with_the_recovery_code_then_done_exits_0(repo, aws, tmp_path):
    """The notice scenario: the trainer checkpoints and exits 0 without done.json, and the
    run step exits with the code SkyPilot recovers (never 0, which it takes as success and
    tears the cluster down). A new node resumes from S3; done.json makes it exit 0."""
    s3 = aws["s3"]
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/flow/nih/Data_Entry_2017_v2020.csv", Body=b"csv")
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/flow/nih/images_001/images/a.png", Body=b"png")
    node = Node(repo, tmp_path, aws, SETTINGS.format(run="flow"))
    with FakeImds(instance_type="g5.48xlarge", zone="us-east-1b") as imds:
        proc = node.start(imds)
        try:
            node.training(proc)
            imds.notice()
            output, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == RECOVERY["recover_on_exit_codes"][0], output
    assert "spot interruption notice" in output and "saved a checkpoint on SIGTERM" in output

    home = node.home
    calls = (node.record / "calls").read_text().splitlines()
    assert calls[0] == f"prepare --nih-dir {home}/data/nih --out {home}/data/prepared-48 --image-size 48"
    assert calls[1] == (
        f"train --config configs/demo.py:small --workdir {home}/work/flow "
        f"--config.data.prepared={home}/data/prepared-48 --config.wandb.mode=online"
    )
    # The AWS calls go through the venv's CLI, first on PATH (SkyPilot's own is not on the task's).
    assert {"s3 sync", "s3 cp", "ssm get-parameter"} <= set((node.record / "venv-aws").read_text().splitlines())
    assert (node.record / "env").read_text().splitlines() == [
        f"JAX_COMPILATION_CACHE_DIR={home}/jax-cache",
        f"WANDB_API_KEY={WANDB_IN_SSM}",
    ]
    uploaded = s3_objects(s3, "runs/flow/")
    assert uploaded["runs/flow/workdir/checkpoints/1/state"] == b"1\n"
    assert "runs/flow/workdir/done.json" not in uploaded
    assert not any("orbax-checkpoint-tmp" in key for key in uploaded)  # half-written saves stay home
    assert uploaded["runs/flow/prepared-48/manifest.json"] == b"{}\n"
    log = uploaded["runs/flow/logs/process-0/run.log"].decode()
    assert "spot interruption notice" in log and "saved a checkpoint on SIGTERM" in log
    # What was launched, for `cost`: the node's own type and zone from IMDS.
    instance = json.loads(uploaded["runs/flow/logs/process-0/instance.json"])
    assert instance["instance_type"] == "g5.48xlarge" and instance["availability_zone"] == "us-east-1b"
    assert instance["lifecycle"] == "spot" and instance["nodes"] == 1
    for key, body in uploaded.items():
        assert_no_secret(body.decode(errors="replace"), key)
    assert_no_secret(output, "run output")

    # SkyPilot recovers it on a new node: empty volume, the workdir from S3, and it finishes.
    node.fresh_volume()
    code, output = node.run(FAKE_FINISH="1")
    assert code == 0, output
    assert (node.record / "resumed_from").read_text() == "1\n"  # the workdir came back from S3
    assert not (home / "data" / "nih").exists()  # the prepared data came from S3 instead
    uploaded = s3_objects(s3, "runs/flow/workdir/")
    assert json.loads(uploaded["runs/flow/workdir/done.json"]) == {"mean_auc": 0.5}
    assert uploaded["runs/flow/workdir/checkpoints/2/state"] == b"2\n"

    # Run again on that volume (done.json there): the trainer has nothing to do, the step is done.
    code, output = node.run()
    assert code == 0 and "already trained" in output, output


@pytest.mark.slow
def test_a_failing_trainer_is_a_failure_with_its_own_status(repo, aws, tmp_path):
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/fails/prepared-48/manifest.json", Body=b"{}")
    node = Node(repo, tmp_path, aws, SETTINGS.format(run="fails"))
    code, output = node.run(FAKE_FAIL="3")
    assert code == 3 and code not in RECOVERY["recover_on_exit_codes"], output
    assert "the trainer failed with status 3; exiting 3" in output
    # A trainer that happened to exit with the recovery code is still a failure, not a preemption.
    code, output = node.run(FAKE_FAIL=str(RECOVERY["recover_on_exit_codes"][0]))
    assert code == 1, output


def test_a_notice_during_set_up_stops_the_run_before_training(repo, aws, tmp_path):
    node = Node(repo, tmp_path, aws, SETTINGS.format(run="early"))
    with FakeImds() as imds:
        imds.notice()  # already there at boot: the node is going away
        code, output = node.run(imds)
    assert code == RECOVERY["recover_on_exit_codes"][0], output
    assert "spot interruption notice" in output and "stopped during set-up" in output
    assert not (node.record / "calls").exists()  # neither prepare nor train ran


@pytest.mark.slow
def test_a_failed_final_upload_fails_the_run(repo, aws, tmp_path):
    """A checkpoint that did not reach S3 is lost with the node: not a clean preemption."""
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/upload/prepared-48/manifest.json", Body=b"{}")
    node = Node(repo, tmp_path, aws, SETTINGS.format(run="upload"))
    refused = refusing_aws(tmp_path / "bin", {"runs/upload/workdir/checkpoints": "An error occurred (AccessDenied)"})
    with FakeImds() as imds:
        proc = node.start(imds, PATH=refused["PATH"], CXRJAX_UPLOAD_RETRY_SECONDS="0")
        try:
            node.training(proc)
            imds.notice()
            output, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
    assert proc.returncode == 1, output
    assert "AccessDenied" in output and "the final upload" in output


@pytest.mark.slow
def test_a_rebalance_recommendation_uploads_a_checkpoint_and_training_goes_on(repo, aws, tmp_path):
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/rebalance/prepared-48/manifest.json", Body=b"{}")
    node = Node(repo, tmp_path, aws, SETTINGS.format(run="rebalance"))
    with FakeImds() as imds:
        proc = node.start(imds)
        try:
            node.training(proc)
            imds.rebalance()
            wait_for(
                lambda: "runs/rebalance/workdir/checkpoints/1/state" in s3_objects(aws["s3"], "runs/rebalance/"),
                60,
                "the rebalance checkpoint in S3",
                poll=0.5,
            )
            assert proc.poll() is None  # training goes on
            proc.send_signal(signal.SIGTERM)  # a stop request (sky jobs cancel): checkpoint, then resume code
            output, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert "saved a checkpoint on SIGUSR1" in output and "saved a checkpoint on SIGTERM" in output
    assert proc.returncode == RECOVERY["recover_on_exit_codes"][0], output
    assert "runs/rebalance/workdir/checkpoints/2/state" in s3_objects(aws["s3"], "runs/rebalance/")


@pytest.mark.slow
def test_a_cluster_node_stops_with_a_clear_message_when_a_peer_node_dies(repo, aws, tmp_path):
    """Two nodes share a workdir; node 1 dies (SIGKILL of its run step, as a lost instance).
    Node 0 notices from the missing heartbeats, stops its trainer and exits non-zero, so
    SkyPilot recovers the cluster instead of a trainer waiting on a dead peer forever."""
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/peers/prepared-48/manifest.json", Body=b"{}")
    shared = tmp_path / "shared"
    nodes = [
        Node(
            repo,
            tmp_path / f"node-{i}",
            aws,
            SETTINGS.format(run="peers") + f"NODES=2\nPROCESS_ID={i}\nCOORDINATOR=10.0.0.1:1234\nSHARED_DIR={shared}\n",
        )
        for i in range(2)
    ]
    quick = {"CXRJAX_HEARTBEAT_SECONDS": "0.2", "CXRJAX_PEER_TIMEOUT_SECONDS": "2", "CXRJAX_STOP_GRACE_SECONDS": "5"}
    procs = [n.start(None, **quick) for n in nodes]
    try:
        for n, p in zip(nodes, procs):
            n.training(p)
        assert (nodes[1].record / "env").read_text().splitlines()[:3] == [
            "CXRJAX_COORDINATOR=10.0.0.1:1234",
            "CXRJAX_NUM_PROCESSES=2",
            "CXRJAX_PROCESS_ID=1",
        ]
        trainer = int((nodes[1].record / "trainer.pid").read_text())
        procs[1].kill()  # the node is gone: its run step and with it its trainer
        wait_for(lambda: not _alive(trainer), 30, "node 1's trainer to die with its run step")
        output, _ = procs[0].communicate(timeout=60)  # bounded: a hang fails here
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 1, output
    assert procs[0].returncode not in RECOVERY["recover_on_exit_codes"]
    assert "process 1 has not been heard from for" in output and "SkyPilot recovers the cluster" in output
    assert not (tmp_path / "node-0" / "home" / "work").exists()  # the shared workdir, not the volume's
    assert "runs/peers/workdir/checkpoints/1/state" in s3_objects(aws["s3"], "runs/peers/")
