"""launch/g5_24xlarge.sh when AWS says no: a refused launch or upload is reported, never
taken for success, and nothing is left half-launched.

AWS is moto's server on loopback; an `aws` shim refuses chosen calls the way the CLI
reports a service error. Nothing here reaches a network beyond 127.0.0.1.
"""

from __future__ import annotations

import base64
import signal
import subprocess
import sys

import pytest
from fake_imds import FakeImds
from launch_helpers import CAPACITY_ERROR, refusing_aws, script
from train_helpers import wait_for


def _live(ec2, run: str) -> list[dict]:
    found = ec2.describe_instances(
        Filters=[
            {"Name": "tag:cxrjax-run", "Values": [run]},
            {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]},
        ]
    )
    return [i for r in found["Reservations"] for i in r["Instances"]]


def test_a_refused_launch_fails_up_and_leaves_nothing_half_launched(repo, aws, tmp_path):
    prefix = [
        "--s3-prefix",
        "s3://cxrjax-bucket/runs/refused",
        "--run-config",
        "demo",
        "--subnet",
        aws["subnet"],
        "--ami",
        aws["ami"],
    ]
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-refused")
    refusing = dict(aws["env"], **refusing_aws(tmp_path / "all", {"ec2 run-instances": CAPACITY_ERROR}))
    single = script(repo, "up", *prefix, env=refusing)
    assert single.returncode != 0, single.stderr
    assert "InsufficientInstanceCapacity" in single.stderr
    assert "is up" not in single.stderr and "launched process" not in single.stderr
    assert _live(aws["ec2"], "refused") == []

    # A cluster whose second member is refused: the first one goes again, nobody is told
    # to meet a coordinator at ":1234".
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-refused-cluster")
    second = dict(aws["env"], **refusing_aws(tmp_path / "second", {"cxrjax-process,Value=1": CAPACITY_ERROR}))
    cluster = script(repo, "up", *[p.replace("refused", "refused-cluster") for p in prefix], "--nodes", "2", env=second)
    assert cluster.returncode != 0, cluster.stderr
    assert "InsufficientInstanceCapacity" in cluster.stderr
    assert "launched process 0 of 2" in cluster.stderr and "terminated i-" in cluster.stderr
    assert "is up" not in cluster.stderr, cluster.stderr
    assert _live(aws["ec2"], "refused-cluster") == []


FAKE_TRAINER = r"""#!/bin/bash
# The venv's cxrjax on the instance: a trainer that checkpoints on SIGTERM.
work=""
while (($#)); do case $1 in --workdir) work=$2; shift 2 ;; *) shift ;; esac; done
trap 'mkdir -p "$work/checkpoints"; echo 1 >"$work/checkpoints/step"; exit 0' TERM
touch "$FAKE_RECORD/training"
while :; do sleep 0.1; done
"""


def test_a_failed_workdir_upload_is_reported_though_the_log_upload_succeeds(repo, aws, tmp_path):
    """The periodic sync and the final one: a refused workdir upload is logged, and the run
    exits non-zero (systemd then starts it again and the upload is retried)."""
    s3 = aws["s3"]
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/upload/prepared-40/manifest.json", Body=b"{}")
    home, record = tmp_path / "home", tmp_path / "record"
    record.mkdir()
    (home / "venv" / "bin").mkdir(parents=True)
    for name, text in (("cxrjax", FAKE_TRAINER), ("python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')):
        (home / "venv" / "bin" / name).write_text(text)
        (home / "venv" / "bin" / name).chmod(0o755)
    config = tmp_path / "run.env"
    config.write_text("S3_PREFIX=s3://cxrjax-bucket/runs/upload\nREGION=us-east-1\nRUN_CONFIG=demo\nSYNC_INTERVAL=10\n")
    refused = "upload failed: AccessDenied when calling the PutObject operation"
    # Both calls that upload the workdir (the checkpoints go with --delete) are refused.
    env = dict(
        aws["env"], **refusing_aws(tmp_path, {"workdir/ --exclude": refused, "workdir/checkpoints/ --delete": refused})
    )
    with FakeImds() as imds:
        env.update(
            CXRJAX_HOME=str(home),
            CXRJAX_IMDS_ENDPOINT=imds.endpoint,
            CXRJAX_SPOT_POLL_SECONDS="0.3",
            FAKE_RECORD=str(record),
        )
        run = subprocess.Popen(
            [str(repo / "launch" / "g5_24xlarge.sh"), "run", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log = home / "logs" / "run.log"
        try:
            wait_for(lambda: (record / "training").exists() or run.poll() is not None, 60, "training")
            # The first periodic sync (SYNC_INTERVAL=10 s) uploads the log but not the workdir.
            wait_for(
                lambda: "periodic S3 sync failed" in log.read_text() or run.poll() is not None,
                40,
                "the periodic sync's failure to be logged",
            )
            assert run.poll() is None
            imds.notice()
            output, _ = run.communicate(timeout=60)
        finally:
            run.kill()
    assert refused in output
    assert run.returncode != 0, output
    assert f"uploading {home}/work/upload to s3://cxrjax-bucket/runs/upload/workdir/ failed" in output
    assert "runs/upload/workdir/checkpoints/step" not in {
        o["Key"] for o in s3.list_objects_v2(Bucket="cxrjax-bucket", Prefix="runs/upload/").get("Contents", [])
    }


def _second_subnet(aws) -> str:
    """A subnet in another zone of the fixture's VPC (made once per moto server)."""
    ec2 = aws["ec2"]
    found = ec2.describe_subnets(Filters=[{"Name": "cidr-block", "Values": ["10.0.2.0/24"]}])["Subnets"]
    if found:
        return found[0]["SubnetId"]
    return ec2.create_subnet(VpcId=aws["vpc"], CidrBlock="10.0.2.0/24", AvailabilityZone="us-east-1b")["Subnet"][
        "SubnetId"
    ]


def test_capacity_fallback_tries_each_type_in_each_subnet_until_one_launches(repo, aws, tmp_path):
    first, second = aws["subnet"], _second_subnet(aws)
    prefix = [
        "--s3-prefix",
        "s3://cxrjax-bucket/runs/fallback",
        "--run-config",
        "demo",
        "--ami",
        aws["ami"],
        "--subnet",
        f"{first},{second}",
        "--instance-type",
        "g5.24xlarge,g5.48xlarge",
    ]
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-fallback")
    dry = script(repo, "up", *prefix, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert (
        f"[dry-run] plan: g5.24xlarge in {first}, then g5.24xlarge in {second}, "
        f"then g5.48xlarge in {first}, then g5.48xlarge in {second};"
    ) in dry.stdout

    # g5.24xlarge nowhere, and nothing in the first subnet: the fourth choice launches.
    refusals = {"--instance-type g5.24xlarge": CAPACITY_ERROR, f"--subnet-id {first}": CAPACITY_ERROR}
    up = script(repo, "up", *prefix, env=dict(aws["env"], **refusing_aws(tmp_path, refusals)))
    assert up.returncode == 0, up.stderr
    refused = [line for line in up.stderr.splitlines() if "refused: " in line]
    assert [line.split("refused: ")[1].split(" for ")[0] for line in refused] == [
        f"g5.24xlarge in {first}",
        f"g5.24xlarge in {second}",
        f"g5.48xlarge in {first}",
    ]
    assert all("InsufficientInstanceCapacity" in line for line in refused)
    assert f"is up (g5.48xlarge in {second})" in up.stderr
    (instance,) = _live(aws["ec2"], "fallback")
    assert (instance["InstanceType"], instance["SubnetId"]) == ("g5.48xlarge", second)
    aws["ec2"].terminate_instances(InstanceIds=[instance["InstanceId"]])

    # All refused: a clear error naming what was tried, and nothing launched.
    nothing = script(
        repo,
        "up",
        *prefix,
        env=dict(aws["env"], **refusing_aws(tmp_path / "all", {"ec2 run-instances": CAPACITY_ERROR})),
    )
    assert nothing.returncode == 2, nothing.stderr
    assert "no capacity: every instance type and subnet was refused" in nothing.stderr
    assert nothing.stderr.count("refused: ") == 4
    assert _live(aws["ec2"], "fallback") == []

    # Any other refusal is not a capacity problem: it ends up at once, with AWS's words.
    denied = "An error occurred (UnauthorizedOperation) when calling the RunInstances operation: not allowed"
    stop = script(
        repo, "up", *prefix, env=dict(aws["env"], **refusing_aws(tmp_path / "denied", {"ec2 run-instances": denied}))
    )
    assert stop.returncode == 2 and "UnauthorizedOperation" in stop.stderr
    assert "refused: " not in stop.stderr


@pytest.mark.slow
def test_keep_relaunches_an_interrupted_run_until_done_within_its_budget(repo, aws, tmp_path):
    """keep: launches, sees a member gone (a spot interruption), relaunches it with the same
    S3 prefix to resume from, and gives up with a clear error once its budget is spent."""
    ec2 = aws["ec2"]
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-kept")
    args = [
        "keep",
        "--s3-prefix",
        "s3://cxrjax-bucket/runs/kept",
        "--run-config",
        "demo",
        "--subnet",
        aws["subnet"],
        "--ami",
        aws["ami"],
        "--max-relaunches",
        "1",
    ]
    env = dict(aws["env"], CXRJAX_KEEP_POLL_SECONDS="0.5")
    keeper = subprocess.Popen(
        [str(repo / "launch" / "g5_24xlarge.sh"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def running() -> list[str]:
        return [i["InstanceId"] for i in _live(ec2, "kept") if i["State"]["Name"] in ("pending", "running")]

    try:
        wait_for(lambda: running() or keeper.poll() is not None, 120, "the first launch")
        (first,) = running()
        ec2.terminate_instances(InstanceIds=[first])  # what a spot interruption leaves
        wait_for(lambda: (running() and running() != [first]) or keeper.poll() is not None, 120, "the relaunch")
        (second,) = running()
        user_data = ec2.describe_instance_attribute(InstanceId=second, Attribute="userData")["UserData"]["Value"]
        assert "S3_PREFIX=s3://cxrjax-bucket/runs/kept\n" in base64.b64decode(user_data).decode()
        ec2.terminate_instances(InstanceIds=[second])  # the budget (one relaunch) is spent now
        output, _ = keeper.communicate(timeout=120)
    finally:
        keeper.kill()
    assert keeper.returncode == 2, output
    assert output.count("keep: interruption: 0 of 1 member(s) running") == 2
    assert "keep: relaunch 1 of 1" in output and "relaunch 2" not in output
    assert "the retry budget of 1 relaunch(es) is spent" in output
    assert _live(ec2, "kept") == []

    # Once the run uploaded done.json, keep has nothing to do.
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/kept/workdir/done.json", Body=b"{}")
    done = script(repo, *args, env=env)
    assert done.returncode == 0, done.stderr
    assert "keep: training finished" in done.stderr and "launching" not in done.stderr


PYTHON_TRAINER = r"""#!{python}
# The venv's cxrjax on the instance: a trainer that saves an orbax-like checkpoint step on
# SIGUSR1 and trains on, and checkpoints and exits on SIGTERM. Python, because a bash
# script cannot trap a signal that it started with ignored (as run starts the trainer).
import os, pathlib, shutil, signal, sys, time
work = pathlib.Path(sys.argv[sys.argv.index("--workdir") + 1])
record = pathlib.Path(os.environ["FAKE_RECORD"])
def step(n):
    (work / "checkpoints" / str(n)).mkdir(parents=True, exist_ok=True)
    (work / "checkpoints" / str(n) / "_CHECKPOINT_METADATA").write_text("{{}}")
def on_usr1(*_):
    step(3)
    print("saved a checkpoint on SIGUSR1; training goes on", flush=True)
def on_term(*_):
    step(4)
    shutil.rmtree(work / "checkpoints" / "3")  # as orbax does beyond its keep
    print("saved a checkpoint on SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGTERM, on_term)
(record / "training").touch()
while True:
    time.sleep(0.1)
"""


def _instance_volume(home, record):
    (home / "venv" / "bin").mkdir(parents=True)
    for name, text in (
        ("cxrjax", PYTHON_TRAINER.format(python=sys.executable)),
        ("python", f'#!/bin/sh\nexec {sys.executable} "$@"\n'),
    ):
        (home / "venv" / "bin" / name).write_text(text)
        (home / "venv" / "bin" / name).chmod(0o755)
    record.mkdir()


def test_a_rebalance_recommendation_uploads_a_checkpoint_and_training_goes_on(repo, aws, tmp_path):
    s3 = aws["s3"]
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/rebalance/prepared-40/manifest.json", Body=b"{}")
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/rebalance/workdir/only-in-s3.txt", Body=b"kept")
    home, record = tmp_path / "home", tmp_path / "record"
    _instance_volume(home, record)
    config = tmp_path / "run.env"
    config.write_text(
        "S3_PREFIX=s3://cxrjax-bucket/runs/rebalance\nREGION=us-east-1\nRUN_CONFIG=demo\nSYNC_INTERVAL=3600\n"
    )

    def keys() -> set[str]:
        listing = s3.list_objects_v2(Bucket="cxrjax-bucket", Prefix="runs/rebalance/workdir/")
        return {o["Key"] for o in listing.get("Contents", [])}

    with FakeImds() as imds:
        env = dict(
            aws["env"],
            CXRJAX_HOME=str(home),
            CXRJAX_IMDS_ENDPOINT=imds.endpoint,
            CXRJAX_SPOT_POLL_SECONDS="0.3",
            FAKE_RECORD=str(record),
        )
        run = subprocess.Popen(
            [str(repo / "launch" / "g5_24xlarge.sh"), "run", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for(lambda: (record / "training").exists() or run.poll() is not None, 60, "training")
            imds.rebalance()
            step = "runs/rebalance/workdir/checkpoints/3/_CHECKPOINT_METADATA"
            wait_for(lambda: step in keys() or run.poll() is not None, 60, "the rebalance checkpoint in S3")
            assert run.poll() is None  # training goes on
            assert "runs/rebalance/workdir/checkpoints/4/_CHECKPOINT_METADATA" not in keys()
            imds.notice()
            output, _ = run.communicate(timeout=60)
        finally:
            run.kill()
    assert run.returncode == 0, output
    assert "spot rebalance recommendation" in output and "saved a checkpoint on SIGUSR1" in output
    assert output.index("rebalance: checkpoint 3 saved; uploading it") < output.index("spot interruption notice")
    # S3 keeps what orbax keeps: step 3 went there too, nothing outside checkpoints/ did.
    assert {k for k in keys() if "/checkpoints/" in k} == {"runs/rebalance/workdir/checkpoints/4/_CHECKPOINT_METADATA"}
    assert "runs/rebalance/workdir/only-in-s3.txt" in keys()

    # The instance is gone: logs shows what it uploaded.
    logs = script(repo, "logs", "--s3-prefix", "s3://cxrjax-bucket/runs/rebalance", env=aws["env"])
    assert logs.returncode == 0, logs.stderr
    assert "logs/process-0/run.log" in logs.stdout and "spot rebalance recommendation" in logs.stdout


def test_a_notice_during_set_up_stops_the_run_before_training(repo, aws, tmp_path):
    """The watcher starts with the run: a notice already there stops it in its set-up."""
    home, record = tmp_path / "home", tmp_path / "record"
    _instance_volume(home, record)
    config = tmp_path / "run.env"
    config.write_text("S3_PREFIX=s3://cxrjax-bucket/runs/setup\nREGION=us-east-1\nRUN_CONFIG=demo\n")
    with FakeImds() as imds:
        imds.notice()
        env = dict(
            aws["env"],
            CXRJAX_HOME=str(home),
            CXRJAX_IMDS_ENDPOINT=imds.endpoint,
            CXRJAX_SPOT_POLL_SECONDS="0.3",
            FAKE_RECORD=str(record),
        )
        result = script(repo, "run", "--config", str(config), env=env, timeout=60)
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert not (record / "training").exists()
    assert "spot interruption notice" in (home / "logs" / "run.log").read_text()
