"""`cxrjax demo`: the whole flow on one machine in minutes.

synthetic NIH-format data (or a real download) → TFRecord shards → DenseNet121 + CBAM
training → test-part evaluation (predictions, metrics.json, report, plots) → leaderboard.
Each stage resumes: rerunning with the same `--out` reuses what is finished.

Layout of OUT:
    synthetic/      the generated dataset, in the NIH download layout (synthetic runs only)
    prepared/       `cxrjax prepare` output
    <run>/          the training workdir (checkpoints, metrics.jsonl, best_weights)
    <run>/test/     predictions.csv, metrics.json, report.md, figures
    leaderboard/    leaderboard.md, .csv, .png
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


SYNTHETIC_PATIENTS = 600
SYNTHETIC_SOURCE_SIZE = 64


def run_demo(out: Path, config, nih_dir: Path | None = None, prepare_workers: int = 2) -> dict:
    """Run every stage into `out`; returns the summary also written to out/demo.json."""
    from cxrjax.data.prepare import PrepareOptions, prepare
    from cxrjax.data.synth import MARKER, write_synthetic_nih
    from cxrjax.eval.leaderboard import write_leaderboard
    from cxrjax.experiment import train_members
    from cxrjax.jsonfile import read_json
    from cxrjax.summaries import part_counts
    from cxrjax.workdir import METRICS, REPORT, TEST_DIR

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    size = config.data.image_size
    if nih_dir is None:
        nih_dir = out / "synthetic"
        if not (nih_dir / MARKER).exists():  # written last
            logger.info(write_synthetic_nih(nih_dir, SYNTHETIC_PATIENTS, SYNTHETIC_SOURCE_SIZE, config.seed))
        run_name, source_size = "synthetic-demo", SYNTHETIC_SOURCE_SIZE
    else:
        run_name, source_size = "nih-demo", 1024

    prepared = out / "prepared"
    # A partial download is prepared as far as it goes; the missing images are listed.
    opts = PrepareOptions(
        image_size=size, source_size=source_size, seed=config.seed, workers=prepare_workers, skip_bad=True
    )
    manifest = prepare(nih_dir, prepared, opts)
    logger.info(f"prepared {part_counts(manifest['parts'])} at {size}px in {prepared}")
    if manifest["skipped"]["count"]:
        logger.info(
            f"skipped {manifest['skipped']['count']} missing or unreadable images: see {prepared / 'skipped.csv'}"
        )

    config.data.prepared = str(prepared)
    workdir = out / run_name
    train_members(config, workdir)
    test_dir = workdir / TEST_DIR
    metrics = read_json(test_dir / METRICS)
    board = write_leaderboard([test_dir], out / "leaderboard")
    summary = {
        "data": str(nih_dir),
        "synthetic": run_name == "synthetic-demo",
        "prepared": str(prepared),
        "workdir": str(workdir),
        "metrics": str(test_dir / METRICS),
        "report": str(test_dir / REPORT),
        "leaderboard": str(board["md"]),
        "mean_auc": metrics["mean_auc"],
        "auc": metrics["auc"],
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
