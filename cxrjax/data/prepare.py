"""`cxrjax prepare`: an NIH download → sharded TFRecords per split part, with an index
of record offsets and a manifest.

Layout of OUT:
    manifest.json                  counts, frequencies, split, label file, checksums
    plan.json                      which image goes in which shard (resume guard)
    <part>/<part>-00000-of-000NN.tfrecord
    <part>/<part>-00000-of-000NN.index.json   offsets of that shard's records
    <part>/index.csv               every record of the part: shard, offset, labels

Shards are written under a temporary name and renamed when whole, so a rerun skips
finished shards and redoes a half-written one; a finished shard whose bytes no longer
match its recorded sha256 is rebuilt, with a warning naming it.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxrjax import __version__, lock
from cxrjax.data import examples, images, synth, tfrecord
from cxrjax.data.metadata import IMAGE_METADATA, MetadataError, find_metadata, label_matrix, read_metadata
from cxrjax.data.options import PrepareOptions
from cxrjax.data.splits import PARTS, make_split
from cxrjax.errors import InputError
from cxrjax.findings import FINDINGS
from cxrjax.jsonfile import read_json

MANIFEST = "manifest.json"
PLAN = "plan.json"
LOCK = ".lock"  # held while a prepare writes the folder
INDEX = "index.csv"
SHOWN = 1000  # image ids listed in the manifest per kind of finding; the count is always exact

log = logging.getLogger(__name__)


class PreparedDataError(InputError):
    """An output folder that is not (or not the same) prepared dataset."""


def locate_images(nih_dir: Path) -> dict[str, Path]:
    """image id → file, over images_*/images/ (the release) or any folder below."""
    found: dict[str, Path] = {}
    for path in _pngs_below(nih_dir):
        if path.name in found:
            raise MetadataError(f"duplicated image id {path.name!r}: {found[path.name]} and {path}")
        found[path.name] = path
    return found


def _pngs_below(folder: Path) -> list[Path]:
    """Every *.png below `folder`, sorted, following symlinked folders (an images_00N/
    linked from elsewhere) and entering each real folder once (no symlink loops)."""
    seen, pngs = set(), []
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        pngs += [Path(root) / n for n in names if n.endswith(".png")]
    return sorted(pngs)


def shard_name(part: str, index: int, count: int) -> str:
    return f"{part}-{index:05d}-of-{count:05d}.tfrecord"


def _is_plain_gray8(data: bytes) -> bool:
    # IHDR sits right after the signature: bytes 24/25 are bit depth and colour type.
    return len(data) > 26 and data[12:16] == b"IHDR" and data[24] == 8 and data[25] == 0


def _load(path: Path, size: int, source_size: int) -> tuple[bytes, bool]:
    """(record PNG, whether the source had colour)."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise images.ImageError(f"{source}: cannot read ({e.strerror})") from e
    gray, color = images.decode_noting_color(data, source)
    h, w = gray.shape
    if h != w or (source_size and (h, w) != (source_size, source_size)):
        expected = f"{source_size}x{source_size}" if source_size else "square"
        raise images.ImageError(f"{source}: unexpected size {w}x{h}, expected {expected}")
    if (h, w) == (size, size) and _is_plain_gray8(data):
        return data, False  # already what a record holds: keep the original bytes
    return images.encode_png(images.resize_square(gray, size, source)), color


def write_shard(task: dict) -> dict:
    """Write one shard; returns its index. Runs in a worker process."""
    out = Path(task["path"])
    tmp = out.with_suffix(".tmp")
    digest = hashlib.sha256()
    entries, skipped, colored = [], [], []
    offset = 0
    with open(tmp, "wb") as f:
        for row in task["rows"]:
            try:
                png, color = _load(Path(row["file"]), task["image_size"], task["source_size"])
            except images.ImageError as e:
                if not task["skip_bad"]:
                    raise
                skipped.append({"image_id": row["image_id"], "reason": str(e)})
                continue
            if color:
                colored.append(row["image_id"])
            record = examples.XrayRecord(
                image_png=png,
                image_id=row["image_id"],
                labels=np.asarray(row["labels"], np.float32),
                patient_id=row["patient_id"],
                follow_up=row["follow_up"],
                view=row["view"],
                age=row["age"],
                sex=row["sex"],
            )
            framed = tfrecord.frame(examples.encode(record))
            f.write(framed)
            digest.update(framed)
            entries.append({"image_id": row["image_id"], "offset": offset, "length": len(framed)})
            offset += len(framed)
    index = {"shard": out.name, "sha256": digest.hexdigest(), "records": entries, "skipped": skipped, "color": colored}
    index_path = _index_path(out)
    index_tmp = index_path.with_suffix(".tmp")
    index_tmp.write_text(json.dumps(index))
    os.replace(index_tmp, index_path)
    os.replace(tmp, out)  # the shard exists under its final name only when whole
    return index


def _index_path(shard: Path) -> Path:
    return shard.with_name(shard.name.replace(".tfrecord", ".index.json"))


def _shard_is_done(path: Path, skip_bad: bool) -> bool:
    """A shard a rerun may keep: its index exists and the file holds exactly the indexed
    bytes, checked by size and sha256 (a truncated, half-copied or bit-flipped shard is
    redone, with a warning when it had been finished). Without --skip-bad, a shard
    that skipped images is redone too, so the bad image is reported."""
    try:
        index = read_json(_index_path(path), PreparedDataError)
        size = path.stat().st_size
    except (OSError, ValueError):
        return False
    expected = sum(r["length"] for r in index["records"])
    if size != expected:
        log.warning("%s: %d bytes, its index says %d: rebuilding the damaged shard", path, size, expected)
        return False
    if sha256_of(path) != index["sha256"]:
        log.warning(
            "%s: sha256 does not match the one recorded when it was written: rebuilding the damaged shard", path
        )
        return False
    return skip_bad or not index["skipped"]


def _plan(table: pd.DataFrame, part: pd.Series, files: dict[str, Path], opts: PrepareOptions):
    labels = label_matrix(table)
    plan = {}
    for name in PARTS:
        rows = np.flatnonzero((part == name).to_numpy())
        count = max(1, -(-len(rows) // opts.records_per_shard))
        shards = []
        for chunk in np.array_split(rows, count):
            shards.append(
                [
                    {
                        "image_id": table.image_id.iat[r],
                        "file": str(files[table.image_id.iat[r]]),
                        "labels": labels[r].tolist(),
                        "patient_id": int(table.patient_id.iat[r]),
                        "follow_up": int(table.follow_up.iat[r]),
                        "view": str(table.view.iat[r]),
                        "age": int(table.age.iat[r]),
                        "sex": str(table.sex.iat[r]),
                    }
                    for r in chunk
                ]
            )
        plan[name] = shards
    return plan


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(nih_dir: str | Path, out: str | Path, opts: PrepareOptions) -> dict:
    """Run the whole conversion; returns the manifest. One process at a time per --out
    folder (`cxrjax.lock`): a second gets a one-line error instead of racing the first."""
    out = Path(out)
    created = not out.exists()
    try:
        with lock.hold(out, LOCK, "--out folder"):
            return _prepare(nih_dir, out, opts)
    except lock.FolderLocked:
        raise  # another process's folder: leave it as it is
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [LOCK]:  # refused before writing anything
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare(nih_dir: str | Path, out: str | Path, opts: PrepareOptions) -> dict:
    nih_dir, out = Path(nih_dir), Path(out)
    if not nih_dir.is_dir():
        raise MetadataError(f"{nih_dir}: no such folder (--nih-dir names the NIH download)")
    label_file = Path(opts.labels) if opts.labels else find_metadata(nih_dir)
    table = read_metadata(label_file)
    part = make_split(
        table,
        opts.split,
        nih_dir=nih_dir,
        val_fraction=opts.val_fraction,
        fractions=opts.fractions,
        seed=opts.seed,
    )
    files = locate_images(nih_dir)
    unlisted = sorted(set(files) - set(table["image_id"]))
    unassigned = table["image_id"][(part == "").to_numpy()].tolist()
    missing = (part != "").to_numpy() & ~table["image_id"].isin(files.keys()).to_numpy()
    if missing.any() and not opts.skip_bad:
        shown = ", ".join(table["image_id"][missing][:5])
        raise images.ImageError(
            f"{nih_dir}: {missing.sum()} image(s) of the split are missing from the download "
            f"(e.g. {shown}); pass --skip-bad to prepare the images that are present"
        )
    missing_rows = [
        {"image_id": i, "reason": f"{nih_dir}: image file missing from the download", "part": p}
        for i, p in zip(table["image_id"][missing], part[missing])
    ]
    part = part.where(~missing, "")
    plan = _plan(table, part, files, opts)

    settings = {
        "nih_dir": str(nih_dir.resolve()),
        "label_file": str(label_file.resolve()),
        "options": {k: v for k, v in asdict(opts).items() if k != "workers"},
    }
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / PLAN
    plan_doc = {
        "settings": settings,
        "shards": {p: [[r["image_id"] for r in s] for s in shards] for p, shards in plan.items()},
    }
    if plan_path.exists():
        _check_same_plan(read_json(plan_path, PreparedDataError), json.loads(json.dumps(plan_doc)), out)
    plan_path.write_text(json.dumps(plan_doc))

    tasks = []
    for name, shards in plan.items():
        (out / name).mkdir(exist_ok=True)
        for i, rows in enumerate(shards):
            path = out / name / shard_name(name, i, len(shards))
            tasks.append(
                {
                    "path": str(path),
                    "rows": rows,
                    "image_size": opts.image_size,
                    "source_size": opts.source_size,
                    "skip_bad": opts.skip_bad,
                }
            )
    todo = [t for t in tasks if not _shard_is_done(Path(t["path"]), opts.skip_bad)]
    if len(todo) < len(tasks):  # a rerun: say so, a reused folder is not a fresh conversion
        log.info(
            f"{out}: {len(tasks) - len(todo)} of {len(tasks)} shards already prepared with these options "
            f"(sizes and sha256 checked) are reused; {len(todo)} to write"
        )
    bar = tqdm(total=sum(len(t["rows"]) for t in todo), unit="img", desc="prepare", disable=None)
    if opts.workers <= 1 or len(todo) <= 1:
        for task in todo:
            write_shard(task)
            bar.update(len(task["rows"]))
    else:
        context = multiprocessing.get_context("spawn")  # safe even after jax started threads
        with cf.ProcessPoolExecutor(opts.workers, mp_context=context) as pool:
            futures = {pool.submit(write_shard, t): t for t in todo}
            try:
                for future in cf.as_completed(futures):
                    future.result()  # re-raises the first bad image with its file named
                    bar.update(len(futures[future]["rows"]))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # report now, not after every shard
                raise
    bar.close()
    unused = {"pngs_not_in_label_file": unlisted, "label_rows_in_no_split": unassigned}
    return _finish(out, table, tasks, settings, opts, missing_rows, unused)


def _check_same_plan(previous: dict, plan_doc: dict, out: Path) -> None:
    """Refuse to mix shards of two different conversions in one folder. --skip-bad may
    change between runs: finished shards stay valid either way (see _shard_is_done)."""

    def settings(doc):
        s = dict(doc["settings"])
        s["options"] = {k: v for k, v in s["options"].items() if k != "skip_bad"}
        return s

    old, new = settings(previous), settings(plan_doc)
    changed = [
        f"{key}: {old['options'].get(key)!r} -> {new['options'].get(key)!r}"
        for key in sorted(set(old["options"]) | set(new["options"]))
        if old["options"].get(key) != new["options"].get(key)
    ]
    changed += [f"{key}: {old[key]!r} -> {new[key]!r}" for key in ("nih_dir", "label_file") if old[key] != new[key]]
    if not changed and previous["shards"] != plan_doc["shards"]:
        changed = ["the images to prepare (the label file or the images on disk changed)"]
    if changed:
        raise PreparedDataError(
            f"{out} holds a conversion with other settings ({'; '.join(changed)}); "
            "rerun with the same options to resume it, or use a new --out folder"
        )


def _listing(ids: list[str]) -> dict:
    return {"count": len(ids), "images": ids[:SHOWN]}


def _finish(out, table, tasks, settings, opts, skipped: list[dict], unused: dict[str, list[str]]) -> dict:
    by_id = table.set_index("image_id")
    parts, shards_doc, colored = {}, [], []
    for name in PARTS:
        rows = []
        for task in (t for t in tasks if Path(t["path"]).parent.name == name):
            path = Path(task["path"])
            index = read_json(_index_path(path), PreparedDataError)
            skipped += [{**s, "part": name} for s in index["skipped"]]
            colored += index.get("color", [])
            shards_doc.append(
                {"file": f"{name}/{path.name}", "records": len(index["records"]), "sha256": index["sha256"]}
            )
            rows += [{"shard": path.name, **r} for r in index["records"]]
        frame = pd.DataFrame(rows, columns=["shard", "image_id", "offset", "length"])
        # sex, age and view travel with the labels for subgroup AUCs at evaluation.
        meta = by_id.loc[frame["image_id"], ["patient_id", "no_finding", *FINDINGS, *IMAGE_METADATA]]
        meta = meta.reset_index(drop=True)
        frame = pd.concat([frame, meta], axis=1)
        frame.to_csv(out / name / INDEX, index=False)
        labels = label_matrix(frame) if len(frame) else np.zeros((0, len(FINDINGS)))
        parts[name] = {
            "images": len(frame),
            "patients": int(frame["patient_id"].nunique()),
            "positives": {f: int(v) for f, v in zip(FINDINGS, labels.sum(0))},
            "frequency": {f: float(v) for f, v in zip(FINDINGS, labels.mean(0))} if len(frame) else {},
            "no_finding": int(frame["no_finding"].sum()),
            # Checked before every use of the index (`pipeline.read_index`).
            "index_sha256": sha256_of(out / name / INDEX),
        }
    if skipped:
        pd.DataFrame(skipped).to_csv(out / "skipped.csv", index=False)
    manifest = {
        "cxrjax_version": __version__,
        "findings": list(FINDINGS),
        "image_size": opts.image_size,
        "split": opts.split,
        **settings,
        "label_file_sha256": sha256_of(Path(settings["label_file"])),
        "synthetic": (Path(settings["nih_dir"]) / synth.MARKER).exists(),
        "parts": parts,
        "shards": shards_doc,
        "skipped": {
            "count": len(skipped),
            "file": "skipped.csv" if skipped else None,
            # Listed in full unless it is the bulk of a partial download.
            "images": skipped if len(skipped) <= SHOWN else "see skipped.csv",
        },
        # Prepared, but worth knowing: ChestX-ray14 has no colour images, and every PNG
        # and label row of a whole download belongs to the split.
        "color_converted_to_gray": _listing(sorted(colored)),
        **{kind: _listing(ids) for kind, ids in unused.items()},
    }
    text = json.dumps(manifest, indent=1)
    (out / MANIFEST).write_text(text)
    return json.loads(text)  # exactly what read_manifest gives later


def read_manifest(prepared: str | Path) -> dict:
    path = Path(prepared) / MANIFEST
    return read_json(
        path, PreparedDataError, missing=f"{path} not found: run `cxrjax prepare` first (or it did not finish)"
    )
