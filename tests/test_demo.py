"""`cxrjax demo` end to end with the smoke recipe (tiny DenseNet, a few steps), run from a
wheel installed outside the checkout; the full recipe's time and AUC are checked by
.ci/run, which runs the Quickstart's demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pandas as pd
import pytest

from cxrjax.cli import main
from cxrjax.findings import FINDINGS
from cxrjax.workdir import METRICS_LOG

SMOKE = "demo:smoke"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """cxrjax as `pip install cxrjax` gives it: a wheel built from this checkout, installed
    into a fresh venv outside it. Its dependencies come from this environment through a
    .pth file (nothing is downloaded); the checkout itself is not on its path."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(REPO)], check=True, cwd=root
    )
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "outer_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (wheel,) = (root / "dist").glob("cxrjax-*.whl")
    # --force-reinstall: a cxrjax already visible through the .pth (this checkout's editable
    # install, or its build metadata on PYTHONPATH) must not stand in for the wheel.
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall", str(wheel)],
        check=True,
    )
    return root / "venv" / "bin"


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory, installed):
    """The Quickstart's demo (smoke recipe, by name) from the installed wheel, in an empty folder."""
    out, cwd = tmp_path_factory.mktemp("demo"), tmp_path_factory.mktemp("empty")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run(
        [str(installed / "python"), "-c", "import cxrjax.configs; print(cxrjax.configs.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    ).stdout
    assert where.startswith(str(installed.parent)), where  # the wheel's copy, not the checkout
    proc = subprocess.run(
        [str(installed / "cxrjax"), "demo", "--out", str(out), "--config", SMOKE],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_demo_writes_every_stage(demo_out):
    summary = json.loads((demo_out / "demo.json").read_text())
    assert summary["synthetic"] is True
    assert (demo_out / "synthetic" / "Data_Entry_2017.csv").exists()
    manifest = json.loads((demo_out / "prepared" / "manifest.json").read_text())
    assert manifest["synthetic"] is True and manifest["image_size"] == 32

    test_dir = demo_out / "synthetic-demo" / "test"
    metrics = json.loads((test_dir / "metrics.json").read_text())
    assert sorted(metrics["auc"]) == sorted(FINDINGS)
    assert metrics["mean_auc"] == summary["mean_auc"]
    preds = pd.read_csv(test_dir / "predictions.csv")
    assert len(preds) == manifest["parts"]["test"]["images"]
    assert [f"prob_{f}" for f in FINDINGS] == [c for c in preds.columns if c.startswith("prob_")]
    for figure in (
        "roc_curves.png",
        "score_histograms.png",
        "auc_vs_baselines.png",
        "reliability.png",
        "subgroups.png",
    ):
        assert (test_dir / figure).read_bytes()[:4] == b"\x89PNG"
    report = (test_dir / "report.md").read_text()
    assert "## Calibration" in report and "## Subgroups" in report and "### age" in report

    board = pd.read_csv(demo_out / "leaderboard" / "leaderboard.csv")
    run = board[board["kind"] == "run"]
    assert run["entry"].tolist() == ["synthetic-demo (test)"]  # the run.json name and its evaluation
    assert run["split_family"].tolist() == ["synthetic"]  # never ranked against NIH results


def test_an_empty_validation_part_is_a_clear_error(nih_dir, tmp_path, capsys):
    argv = ["demo", "--out", str(tmp_path / "nih0"), "--nih-dir", str(nih_dir), "--config", SMOKE]
    assert main(argv) == 2
    assert "val holds no images" in capsys.readouterr().err


def test_demo_rerun_resumes_without_redoing_stages(demo_out, capsys):
    unchanged = [demo_out / "synthetic" / "Data_Entry_2017.csv", demo_out / "synthetic-demo" / METRICS_LOG]
    before = [p.stat().st_mtime_ns for p in unchanged]
    manifest = (demo_out / "prepared" / "manifest.json").read_text()
    first = json.loads((demo_out / "demo.json").read_text())
    assert main(["demo", "--out", str(demo_out), "--config", SMOKE]) == 0
    assert [p.stat().st_mtime_ns for p in unchanged] == before  # not regenerated, not retrained
    assert (demo_out / "prepared" / "manifest.json").read_text() == manifest  # every shard kept
    assert json.loads((demo_out / "demo.json").read_text())["auc"] == first["auc"]


@pytest.mark.slow
def test_demo_on_the_real_nih_sample(nih_dir, tmp_path, capsys):
    """The real flow on the 64 shared PNGs: the rest of the 112,120 are listed as missing."""
    out = tmp_path / "nih"
    # Seed 1: the val carve-out of train_val then holds 5 of the 32 train_val PNGs (seed 0: none).
    argv = ["demo", "--out", str(out), "--nih-dir", str(nih_dir), "--config", SMOKE, "--config.seed=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "skipped 112056 missing or unreadable images" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert summary["synthetic"] is False
    manifest = json.loads((out / "prepared" / "manifest.json").read_text())
    assert sum(p["images"] for p in manifest["parts"].values()) == 64
    preds = pd.read_csv(out / "nih-demo" / "test" / "predictions.csv")
    assert set(preds["Image Index"]) <= {p.name for p in (nih_dir / "images").glob("*.png")}
    board = pd.read_csv(out / "leaderboard" / "leaderboard.csv")
    assert board.loc[board["kind"] == "run", "split_family"].tolist() == ["official"]
