"""`launch/g5_24xlarge.sh cost` and launch/run_cost.py: dollars per hour and per epoch from
the spot price of what was launched and the run's own metrics, checked against
hand-computed figures, and the AWS calls against moto's server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import LAUNCH, clean_env, load_run_cost, recording_aws, script

from cxrjax.workdir import METRICS_LOG, RUN_CONFIG

run_cost = load_run_cost()

# Three epochs of 100 steps at a global batch of 16. The first logged interval holds the
# compilation (10 images/s); the others are steady. Validation ends epochs at t = 1000,
# 1400 and 1850 s, and epoch 2 was repeated after a restart (its second row).
ROWS = [
    {"step": 1, "kind": "train", "loss": 0.7, "images_per_s": 10.0, "time": 100.0},
    {"step": 3, "kind": "train", "loss": 0.6, "images_per_s": 40.0, "time": 101.0},
    {"step": 5, "kind": "train", "loss": 0.5, "images_per_s": 42.0, "time": 102.0},
    {"step": 7, "kind": "train", "loss": 0.5, "images_per_s": 38.0, "time": 103.0},
    {"step": 9, "kind": "train", "loss": 0.5, "images_per_s": 40.0, "time": 104.0},
    {"step": 100, "kind": "val", "epoch": 1, "val_loss": 0.4, "time": 1000.0},
    {"step": 200, "kind": "val", "epoch": 2, "val_loss": 0.4, "time": 1400.0},
    {"step": 200, "kind": "val", "epoch": 2, "val_loss": 0.4, "time": 5000.0},
    {"step": 300, "kind": "val", "epoch": 3, "val_loss": 0.4, "time": 5450.0},
]


def write_run(directory: Path, rows=ROWS, batch: int = 16) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    metrics, config = directory / METRICS_LOG, directory / RUN_CONFIG
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config.write_text(json.dumps({"global_batch_size": batch, "epochs": 20}))
    return metrics, config


def test_figures_equal_hand_computed_values(tmp_path):
    r = run_cost.cost(*write_run(tmp_path), price=2.5, instances=2)
    assert r["dollars_per_hour"] == 5.0  # 2 instances x $2.50
    assert r["images_per_s"] == 40.0  # median of 10, 40, 42, 38, 40
    assert r["steps_per_epoch"] == 100 and r["images_per_epoch"] == 1600
    assert r["training_hours_per_epoch"] == pytest.approx(1600 / 40 / 3600)  # 0.01111 h
    assert r["training_dollars_per_epoch"] == pytest.approx(5.0 * 1600 / 40 / 3600)
    # epoch 1 -> 2: 400 s; 2 -> 2 (a repeat) is no epoch; 2 -> 3: 450 s; median 425 s
    assert r["epochs_timed"] == 2
    assert r["wall_hours_per_epoch"] == pytest.approx(425 / 3600)
    assert r["wall_dollars_per_epoch"] == pytest.approx(5.0 * 425 / 3600)
    text = run_cost.report(r)
    assert "$2.5000 per instance-hour x 2 = $5.0000 per hour" in text
    assert "100 steps x 16 images = 1600 images" in text
    assert "0.011 h = $0.06 per epoch" in text and "0.118 h = $0.59 per epoch" in text


def test_before_the_first_epoch_only_the_hourly_figures(tmp_path):
    r = run_cost.cost(*write_run(tmp_path, ROWS[:3]), price=1.0, instances=1)
    assert r["images_per_s"] == 40.0 and r["steps_per_epoch"] is None
    assert "images_per_epoch" not in r and "wall_hours_per_epoch" not in r
    assert "known once the first epoch has ended" in run_cost.report(r)


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"step": 1, "kind": "train", "images_per_s": 3.0}\nnot json\n', "metrics.jsonl:2: not a JSON line"),
        ('{"step": 1, "images_per_s": 3.0}\n', "metrics.jsonl:1: a metrics row needs 'step' and 'kind'"),
        ('{"step": 4, "kind": "val", "epoch": 1}\n', "no training row with images_per_s"),
        (
            '{"step": 1, "kind": "train", "images_per_s": 3.0}\n{"step": 5, "kind": "val", "epoch": 2}\n',
            "are not whole epochs of one length",
        ),
    ],
)
def test_bad_metrics_are_refused_by_file_and_line(tmp_path, text, message):
    metrics, config = write_run(tmp_path)
    metrics.write_text(text)
    result = subprocess.run(
        [sys.executable, str(LAUNCH / "run_cost.py"), "--price", "1", str(metrics), str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and message in result.stderr
    assert str(tmp_path) in result.stderr


def test_cost_prices_what_the_node_says_it_runs_on(repo, aws, tmp_path):
    """The spot price of the type and zone the node recorded from IMDS (launch/node.py's
    instance.json; moto quotes $0.00001), times the run's figures: a fallback type in
    another zone is priced as such, not as the first choice."""
    metrics, config = write_run(tmp_path / "workdir")
    s3 = aws["s3"]
    for path in (metrics, config):
        s3.put_object(Bucket="cxrjax-bucket", Key=f"runs/priced/workdir/{path.name}", Body=path.read_bytes())

    def launched(type_, zone, nodes=2):
        instance = {"instance_type": type_, "availability_zone": zone, "lifecycle": "spot", "nodes": nodes}
        s3.put_object(Bucket="cxrjax-bucket", Key="runs/priced/logs/process-0/instance.json", Body=json.dumps(instance))

    launched("g5.48xlarge", "us-east-1a")
    args = ["cost", "--s3-prefix", "s3://cxrjax-bucket/runs/priced"]
    recording, calls = recording_aws(tmp_path)
    result = script(repo, *args, env=dict(aws["env"], **recording))
    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["s3 cp", "s3 cp", "s3 cp", "ec2 describe-spot-price-history"]
    assert result.stdout.startswith("launched: 2 x g5.48xlarge in us-east-1a; spot price at ")
    expected = run_cost.report(run_cost.cost(metrics, config, price=0.00001, instances=2))
    assert result.stdout.splitlines()[1:] == expected.splitlines()
    assert "$1e-05 per instance-hour x 2 = $2e-05 per hour" in result.stdout

    launched("g5.24xlarge", "us-east-1e")  # moto, like AWS, offers no g5 there
    unoffered = script(repo, *args, env=aws["env"])
    assert unoffered.returncode == 2
    assert "no spot price for g5.24xlarge in us-east-1e" in unoffered.stderr

    missing = script(repo, "cost", "--s3-prefix", "s3://cxrjax-bucket/runs/unstarted", env=aws["env"])
    assert missing.returncode == 2
    assert "no s3://cxrjax-bucket/runs/unstarted/logs/process-0/instance.json yet" in missing.stderr


def test_cost_dry_run_prints_its_calls(repo):
    result = script(repo, "cost", "--s3-prefix", "s3://cxrjax-bucket/runs/priced", "--dry-run", env=clean_env())
    assert result.returncode == 0, result.stderr
    calls = [line for line in result.stdout.splitlines() if line.startswith("[dry-run] aws")]
    assert [c.split()[7] for c in calls] == [
        "s3://cxrjax-bucket/runs/priced/logs/process-0/instance.json",
        "s3://cxrjax-bucket/runs/priced/workdir/metrics.jsonl",
        "s3://cxrjax-bucket/runs/priced/workdir/config.json",
    ]
    assert "dry run: nothing was launched" in result.stderr
