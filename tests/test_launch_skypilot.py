"""launch/skypilot.yaml and launch/sky_config.yaml, checked by SkyPilot itself: its task
parser takes the task (pinned instance types (its catalog, which it downloads, is not
read: the tests have no network), spot, the recovery code of launch/node.py),
its config schema takes the run's rendered config, and its own names of the jobs controller
and of a job's cluster map to different identities.

SkyPilot pins click below the dev tools' version, so it lives in its own venv (the
`launch` extra; .ci/run makes one): CXRJAX_SKY_PYTHON names that venv's python. Without it
these tests skip with a reason, except under CI=true, where they fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launch_helpers import LAUNCH, clean_env, script

TASK = LAUNCH / "skypilot.yaml"

CHECK = r"""
import fnmatch, json, os, sys
import sky
from sky import skypilot_config
from sky.jobs import utils as jobs_utils
from sky.utils import common, common_utils, schemas

task_path, config_path, bad_path = sys.argv[1:4]
out = {"version": sky.__version__}
task = sky.Task.from_yaml(task_path)
out["resources"] = [
    {"type": r.instance_type, "region": r.region, "spot": r.use_spot, "cloud": str(r.cloud),
     "recovery": r.job_recovery, "disk": r.disk_size}
    for r in task.resources
]
out["num_nodes"], out["run"], out["envs"] = task.num_nodes, task.run, sorted(task.envs)
config = dict(skypilot_config.parse_and_validate_config_file(config_path))
out["config"] = config
try:
    skypilot_config.parse_and_validate_config_file(bad_path)
    out["bad_refused"] = ""
except Exception as e:
    out["bad_refused"] = str(e).splitlines()[0] or type(e).__name__

def identity(cluster):  # as sky/backends/backend_utils.py picks one: the first match
    for entry in config["aws"]["remote_identity"]:
        if fnmatch.fnmatchcase(cluster, next(iter(entry))):
            return next(iter(entry.values()))
    return schemas.get_default_remote_identity("aws")

job_cluster = jobs_utils.generate_managed_job_cluster_name(sys.argv[4], 7)
out["identities"] = {"controller": identity(common.JOB_CONTROLLER_NAME), "job": identity(job_cluster)}
out["job_cluster"] = job_cluster
template = os.path.join(os.path.dirname(sky.__file__), "templates", "aws-ray.yml.j2")
out["imdsv2"] = "HttpTokens: required" in open(template).read()
print(json.dumps(out, default=str))
"""


@pytest.fixture(scope="module")
def sky_python() -> str:
    python = os.environ.get("CXRJAX_SKY_PYTHON", "")
    if not python or not Path(python).exists():
        reason = "CXRJAX_SKY_PYTHON (the python of a venv with `pip install '.[launch]'`) is not set"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; .ci/run makes that venv")
        pytest.skip(reason)
    return python


def checked(sky_python: str, repo: Path, tmp_path: Path, *flags: str) -> dict:
    """The task `up` would submit and the config it would pass, as SkyPilot reads them."""
    settings = ["--s3-prefix", "s3://cxrjax-bucket/runs/demo", "--run-config", "demo", *flags]
    dry = script(repo, "up", *settings, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    task, config = tmp_path / "task.yaml", tmp_path / "sky_config.yaml"
    blocks = dry.stdout.split("[dry-run] SkyPilot config:\n")
    task.write_text("".join(line[4:] + "\n" for line in blocks[0].splitlines() if line.startswith("  | ")))
    config.write_text("".join(line[4:] + "\n" for line in blocks[1].splitlines() if line.startswith("  | ")))
    assert config.read_text() == script(repo, "sky-config", *settings[:2]).stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("disk_encrypted: true", "disk_encrypted: yes-please"))
    result = subprocess.run(
        [sky_python, "-c", CHECK, str(task), str(config), str(bad), "cxrjax-demo"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=clean_env(HOME=str(tmp_path), SKYPILOT_DISABLE_USAGE_COLLECTION="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _recovery_code() -> int:
    sys.path.insert(0, str(LAUNCH))
    try:
        import node
    finally:
        sys.path.remove(str(LAUNCH))
    return node.PREEMPTED


@pytest.fixture(scope="module")
def default(sky_python, repo, tmp_path_factory) -> dict:
    """What SkyPilot makes of the default settings' task and config (one SkyPilot start)."""
    return checked(sky_python, repo, tmp_path_factory.mktemp("sky"))


def test_skypilot_takes_the_task_pinned_to_g5_24xlarge_with_the_recovery_code(default):
    out = default
    assert [(r["type"], r["region"]) for r in out["resources"]] == [
        ("g5.24xlarge", "us-east-1"),
        ("g5.24xlarge", "us-east-2"),
        ("g5.24xlarge", "us-west-2"),
    ]
    for r in out["resources"]:
        assert r["spot"] and r["cloud"] == "AWS" and r["disk"] == 300
        assert r["recovery"]["recover_on_exit_codes"] == [_recovery_code()]
        assert r["recovery"]["max_restarts_on_errors"] == 3 and r["recovery"]["strategy"] == "FAILOVER"
    assert "launch/g5_24xlarge.sh run --config" in out["run"]
    assert {"S3_PREFIX", "REGION", "RUN_CONFIG"} <= set(out["envs"])
    # The repository's own file parses the same way (sky jobs launch launch/skypilot.yaml by hand).
    assert yaml.safe_load(TASK.read_text())["resources"]["job_recovery"]["recover_on_exit_codes"] == [_recovery_code()]


def test_other_instance_types_only_where_the_user_lists_them(sky_python, repo, tmp_path):
    out = checked(
        sky_python,
        repo,
        tmp_path,
        "--instance-type",
        "g5.24xlarge,g5.48xlarge",
        "--regions",
        "us-west-2",
        "--max-restarts",
        "1",
    )
    assert [(r["type"], r["region"]) for r in out["resources"]] == [
        ("g5.24xlarge", "us-west-2"),
        ("g5.48xlarge", "us-west-2"),
    ]
    assert {r["recovery"]["max_restarts_on_errors"] for r in out["resources"]} == {1}


def test_skypilot_validates_the_run_config_controller_and_job_get_different_identities(default):
    out = default
    config = out["config"]
    assert out["identities"] == {"controller": "LOCAL_CREDENTIALS", "job": "cxrjax-demo"}, out["job_cluster"]
    assert config["jobs"]["bucket"] == "s3://cxrjax-bucket/runs/demo/sky"  # under the run's prefix
    assert config["aws"]["disk_encrypted"] is True
    # No port open to the world: SSH through SSM, in the run's group (SkyPilot's own opens 22 to all).
    assert config["aws"]["use_ssm"] is True and config["aws"]["security_group_name"] == "cxrjax-demo"
    assert out["imdsv2"]  # SkyPilot's AWS template requires IMDSv2 tokens
    assert "disk_encrypted" in out["bad_refused"], out["bad_refused"]  # the schema does refuse


def test_the_run_step_passes_node_rank_and_head_address_to_the_script(tmp_path):
    task = yaml.safe_load(TASK.read_text())
    work = tmp_path / "sky_workdir"
    (work / "launch").mkdir(parents=True)
    # The script as SkyPilot's node would call it: here it keeps the settings it was given.
    (work / "launch" / "g5_24xlarge.sh").write_text(
        '#!/bin/bash\ncp "$3" "$OUT/run.env"\necho "$CXRJAX_HOME" >"$OUT/cxrjax_home"\n'
    )
    (work / "launch" / "g5_24xlarge.sh").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SKYPILOT_"))}
    env.update({k: str(v) for k, v in task["envs"].items()})
    env.update(
        HOME=str(tmp_path / "home"),
        OUT=str(tmp_path),
        S3_PREFIX="s3://cxrjax-bucket/runs/sky",
        SKYPILOT_NODE_RANK="1",
        SKYPILOT_NUM_NODES="2",
        SKYPILOT_NODE_IPS="10.0.1.5\n10.0.1.6\n",
        SHARED_DIR="/mnt/shared",
    )
    result = subprocess.run(["bash", "-c", task["run"]], cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    settings = dict(line.split("=", 1) for line in (tmp_path / "run.env").read_text().splitlines())
    assert settings["PROCESS_ID"] == "1" and settings["NODES"] == "2"
    assert settings["COORDINATOR"] == "10.0.1.5:1234"
    assert (tmp_path / "cxrjax_home").read_text().strip() == str(tmp_path / "home" / "cxrjax")
    # The real script reads them as its own settings: every key known, every value valid.
    check = subprocess.run(
        [str(LAUNCH / "g5_24xlarge.sh"), "iam-policy", "--config", str(tmp_path / "run.env"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
