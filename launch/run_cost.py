"""Dollars per hour and per epoch of a cxrjax run, from a spot price and the run's own
metrics.jsonl and config.json: every figure it prints is measured by the run.

    python3 launch/run_cost.py --price 2.4513 --instances 1 WORKDIR/metrics.jsonl WORKDIR/config.json

`launch/g5_24xlarge.sh cost` fetches the current spot price and both files from S3 and
calls this. Standard library only, so it runs where cxrjax is not installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


class CostInputError(ValueError):
    """A metrics or config file that cannot give the figures; the message names it."""


def read_rows(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CostInputError(f"{path}:{number}: not a JSON line ({e.msg})") from None
        if not isinstance(row, dict) or "kind" not in row or "step" not in row:
            raise CostInputError(f"{path}:{number}: a metrics row needs 'step' and 'kind'")
        rows.append(row)
    return rows


def steps_per_epoch(val: list[dict], path: Path) -> int | None:
    """From the validation rows: the trainer validates after every whole epoch."""
    counts = {row["step"] // row["epoch"] for row in val if row.get("epoch")}
    if any(row["step"] % row["epoch"] for row in val if row.get("epoch")) or len(counts) > 1:
        raise CostInputError(f"{path}: validation steps {[r['step'] for r in val]} are not whole epochs of one length")
    return counts.pop() if counts else None


def epoch_seconds(val: list[dict]) -> list[float]:
    """Wall time between the ends of consecutive epochs, in the order they were logged."""
    spans = []
    for before, after in zip(val, val[1:]):
        if after.get("epoch") == (before.get("epoch") or 0) + 1 and "time" in before and "time" in after:
            spans.append(after["time"] - before["time"])
    return spans


def cost(metrics: Path, config: Path, price: float, instances: int) -> dict:
    rows = read_rows(metrics)
    try:
        global_batch = int(json.loads(config.read_text())["global_batch_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CostInputError(f"{config}: no global_batch_size ({e})") from None
    speeds = [row["images_per_s"] for row in rows if row["kind"] == "train" and "images_per_s" in row]
    if not speeds:
        raise CostInputError(f"{metrics}: no training row with images_per_s yet; wait for the first logged steps")
    val = [row for row in rows if row["kind"] == "val"]
    per_hour = price * instances
    result = {
        "price_per_instance_hour": price,
        "instances": instances,
        "dollars_per_hour": per_hour,
        "images_per_s": statistics.median(speeds),
        "logged_intervals": len(speeds),
        "global_batch_size": global_batch,
        "steps_per_epoch": steps_per_epoch(val, metrics),
    }
    if result["steps_per_epoch"]:
        images = result["steps_per_epoch"] * global_batch
        hours = images / result["images_per_s"] / 3600
        result.update(
            images_per_epoch=images, training_hours_per_epoch=hours, training_dollars_per_epoch=hours * per_hour
        )
    spans = epoch_seconds(val)
    if spans:
        hours = statistics.median(spans) / 3600
        result.update(epochs_timed=len(spans), wall_hours_per_epoch=hours, wall_dollars_per_epoch=hours * per_hour)
    return result


def dollars(x: float, places: int = 2) -> str:
    """Cents for real prices; significant digits for tiny ones (a test's emulator)."""
    return f"${x:,.{places}f}" if x >= 10**-places else f"${x:.2g}"


def report(r: dict) -> str:
    lines = [
        f"price: {dollars(r['price_per_instance_hour'], 4)} per instance-hour x {r['instances']} "
        f"= {dollars(r['dollars_per_hour'], 4)} per hour",
        f"training throughput: {r['images_per_s']:.1f} images/s (median of {r['logged_intervals']} logged intervals)",
    ]
    if "images_per_epoch" not in r:
        lines.append("per epoch: known once the first epoch has ended (no validation row yet)")
        return "\n".join(lines)
    lines += [
        f"an epoch: {r['steps_per_epoch']} steps x {r['global_batch_size']} images = {r['images_per_epoch']} images",
        f"  training steps alone: {r['training_hours_per_epoch']:.3f} h = {dollars(r['training_dollars_per_epoch'])} per epoch",
    ]
    if "wall_hours_per_epoch" in r:
        lines.append(
            f"  end to end (validation, checkpoints and any restart included; median of {r['epochs_timed']}): "
            f"{r['wall_hours_per_epoch']:.3f} h = {dollars(r['wall_dollars_per_epoch'])} per epoch"
        )
    else:
        lines.append("  end to end: known once two consecutive epochs have ended")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--price", type=float, required=True, help="dollars per instance-hour")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("metrics", type=Path, help="the run's metrics.jsonl")
    parser.add_argument("config", type=Path, help="the run's config.json")
    args = parser.parse_args(argv)
    if not args.price > 0 or args.instances < 1:
        parser.error(f"--price must be > 0 and --instances >= 1, got {args.price} and {args.instances}")
    try:
        print(report(cost(args.metrics, args.config, args.price, args.instances)))
    except (CostInputError, FileNotFoundError) as e:
        print(f"run_cost.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
