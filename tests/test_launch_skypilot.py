"""launch/skypilot.yaml: SkyPilot's own task parser accepts it (with the optional `launch`
extra installed), and its run step hands g5_24xlarge.sh settings that the script accepts,
with SkyPilot's node rank and head address as the process id and coordinator.

Self-contained (no conftest fixture), so it also runs under `pytest --noconftest` in an
environment that has SkyPilot but not the rest of the dev extras.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
TASK = LAUNCH / "skypilot.yaml"


def test_skypilot_parses_the_task_as_a_spot_job_on_four_a10g():
    sky = pytest.importorskip("sky", reason="SkyPilot is not installed (pip install 'cxrjax[launch]')")
    task = sky.Task.from_yaml(str(TASK))
    assert task.num_nodes == 1 and "launch/g5_24xlarge.sh run --config" in task.run
    resources = list(task.resources)
    assert len(resources) >= 2  # several regions to fall back on
    assert {r.region for r in resources} >= {"us-east-1", "us-west-2"}
    for r in resources:
        assert r.accelerators == {"A10G": 4} and r.use_spot
        assert str(r.cloud).lower() == "aws"
        assert r.job_recovery["strategy"] == "FAILOVER"
    assert set(task.envs) >= {"S3_PREFIX", "REGION", "RUN_CONFIG"}


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
    if shutil.which("git") is None:
        pytest.skip("git not found")
    check = subprocess.run(
        [str(LAUNCH / "g5_24xlarge.sh"), "iam-policy", "--config", str(tmp_path / "run.env"), "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
