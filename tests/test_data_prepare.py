"""`cxrjax prepare`: shards read back by TensorFlow's own reader, pixels against an
independent decode and OpenCV's area resize, the offset index, the manifest, resuming,
and bad input."""

import hashlib
import os
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrjax.cli import main
from cxrjax.data import examples, tfrecord
from cxrjax.data.images import ImageError
from cxrjax.data.metadata import MetadataError, label_matrix, read_metadata
from cxrjax.data.prepare import PrepareOptions, prepare, read_manifest
from cxrjax.data.splits import make_split
from cxrjax.data.synth import write_synthetic_nih
from cxrjax.findings import FINDINGS

SOURCE = 64
SIZE = 32
OPTS = PrepareOptions(image_size=SIZE, source_size=SOURCE, records_per_shard=8, workers=1, seed=0)
PARTS = ("train", "val", "test")


@pytest.fixture(scope="module")
def tf():
    """TensorFlow as the reference reader only (cxrjax itself never imports it)."""
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("nih")
    # 20 images per archive folder: the files spread over images_001..images_00N.
    write_synthetic_nih(out, num_patients=24, image_size=SOURCE, seed=3, images_per_archive=20)
    return out


@pytest.fixture(scope="module")
def prepared(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(source, out, OPTS)


def _shards(out):
    return sorted(out.glob("*/*.tfrecord"))


def _reference_gray(path):
    """Decode a source PNG with Pillow, independently of cxrjax's OpenCV decoder."""
    array = np.array(Image.open(path))
    if array.dtype == np.uint16:
        array = np.floor(array / 257 + 0.5).astype(np.uint8)
    if array.ndim == 3:
        assert (array[..., 3] == 255).all() and (array[..., 0] == array[..., 2]).all()
        array = array[..., 0]
    return array


def _tf_records(tf, shard):
    spec = {
        "image/png": tf.io.FixedLenFeature([], tf.string),
        "image/id": tf.io.FixedLenFeature([], tf.string),
        "labels": tf.io.FixedLenFeature([14], tf.float32),
        "patient_id": tf.io.FixedLenFeature([], tf.int64),
        "follow_up": tf.io.FixedLenFeature([], tf.int64),
        "view": tf.io.FixedLenFeature([], tf.string),
        "age": tf.io.FixedLenFeature([], tf.int64),
        "sex": tf.io.FixedLenFeature([], tf.string),
    }
    for raw in tf.data.TFRecordDataset([str(shard)]):
        ex = tf.io.parse_single_example(raw, spec)
        yield raw.numpy(), ex, tf.io.decode_png(ex["image/png"]).numpy()


def _check_record_against_metadata(ex, row):
    assert ex["image/id"].numpy().decode() == row.name
    assert np.array_equal(ex["labels"].numpy(), row[list(FINDINGS)].to_numpy(np.float32))
    assert ex["patient_id"].numpy() == row["patient_id"] and ex["follow_up"].numpy() == row["follow_up"]
    assert ex["age"].numpy() == row["age"]
    assert ex["view"].numpy().decode() == row["view"] and ex["sex"].numpy().decode() == row["sex"]


def test_tensorflow_reads_every_record_with_its_metadata_and_area_resized_pixels(tf, source, prepared):
    out, _ = prepared
    table = read_metadata(source / "Data_Entry_2017.csv")
    part = make_split(table, "official", nih_dir=source, val_fraction=OPTS.val_fraction, seed=OPTS.seed)
    files = {p.name: p for p in source.glob("images_*/images/*.png")}
    by_id = table.set_index("image_id")
    kinds = set()
    for name in PARTS:
        seen = []
        for shard in sorted((out / name).glob("*.tfrecord")):
            for _, ex, image in _tf_records(tf, shard):
                image_id = ex["image/id"].numpy().decode()
                _check_record_against_metadata(ex, by_id.loc[image_id])
                assert image.shape == (SIZE, SIZE, 1)
                reference = cv2.resize(_reference_gray(files[image_id]), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
                assert np.array_equal(image[..., 0], reference), image_id
                kinds.add(Image.open(files[image_id]).mode)
                seen.append(image_id)
        assert sorted(seen) == sorted(table["image_id"][part == name]), name
    assert {"L", "RGBA", "I;16"} <= kinds  # every stored kind went through the reader


def test_tensorflow_reader_checks_crcs(tf, prepared, tmp_path):
    """The reference reader really verifies checksums, so the test above means it."""
    out, _ = prepared
    shard = tmp_path / "copy.tfrecord"
    data = bytearray(_shards(out)[0].read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset([str(shard)]))


def test_offset_index_gives_random_access_to_every_record(tf, prepared):
    out, _ = prepared
    for name in PARTS:
        index = pd.read_csv(out / name / "index.csv", dtype={"image_id": str})
        raw_by_id = {}
        for shard in sorted((out / name).glob("*.tfrecord")):
            for raw, ex, _ in _tf_records(tf, shard):
                raw_by_id[ex["image/id"].numpy().decode()] = raw
        assert sorted(raw_by_id) == sorted(index["image_id"])
        for row in index.sample(frac=1, random_state=0).itertuples():  # any order
            fd = os.open(out / name / row.shard, os.O_RDONLY)
            try:
                payload = tfrecord.read_at(fd, row.offset, row.shard)
            finally:
                os.close(fd)
            assert payload == raw_by_id[row.image_id]
            assert len(tfrecord.frame(payload)) == row.length
            record = examples.decode(payload)
            assert record.image_id == row.image_id
            assert np.array_equal(record.labels, [getattr(row, f) for f in FINDINGS])


def test_manifest_counts_frequencies_and_checksums(source, prepared):
    out, manifest = prepared
    assert read_manifest(out) == manifest
    table = read_metadata(source / "Data_Entry_2017.csv")
    part = make_split(table, "official", nih_dir=source, val_fraction=OPTS.val_fraction, seed=OPTS.seed)
    y = label_matrix(table)
    for name in PARTS:
        rows = (part == name).to_numpy()
        got = manifest["parts"][name]
        assert got["images"] == rows.sum()
        assert got["patients"] == table["patient_id"][rows].nunique()
        assert got["positives"] == dict(zip(FINDINGS, y[rows].sum(0).tolist()))
        assert np.allclose([got["frequency"][f] for f in FINDINGS], y[rows].mean(0))
        assert got["no_finding"] == table["no_finding"][rows].sum()
    assert sum(s["records"] for s in manifest["shards"]) == len(table)
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    label_file = source / "Data_Entry_2017.csv"
    assert manifest["label_file_sha256"] == hashlib.sha256(label_file.read_bytes()).hexdigest()
    assert manifest["findings"] == list(FINDINGS) and manifest["image_size"] == SIZE
    assert manifest["skipped"]["count"] == 0 and not (out / "skipped.csv").exists()


def test_same_size_keeps_the_source_pixels_exactly(source, tmp_path):
    manifest = prepare(source, tmp_path, PrepareOptions(image_size=SOURCE, source_size=SOURCE, workers=1))
    files = {p.name: p for p in source.glob("images_*/images/*.png")}
    count = 0
    for shard in _shards(tmp_path):
        with open(shard, "rb") as f:
            offsets = list(tfrecord.scan_offsets(f))
        fd = os.open(shard, os.O_RDONLY)
        for offset in offsets:
            record = examples.decode(tfrecord.read_at(fd, offset))
            decoded = cv2.imdecode(np.frombuffer(record.image_png, np.uint8), cv2.IMREAD_UNCHANGED)
            assert decoded.dtype == np.uint8 and decoded.shape == (SOURCE, SOURCE)
            assert np.array_equal(decoded, _reference_gray(files[record.image_id]))
            count += 1
        os.close(fd)
    assert count == sum(p["images"] for p in manifest["parts"].values())


def test_rerun_redoes_truncated_and_half_written_shards_identically(source, prepared, tmp_path):
    reference, _ = prepared
    out = tmp_path / "out"
    prepare(source, out, OPTS)
    shards = _shards(out)
    assert len(shards) >= 4
    truncated, killed, unrenamed, kept = shards[0], shards[1], shards[2], shards[3]
    truncated.write_bytes(truncated.read_bytes()[:100])  # cut short after it was finished
    killed.rename(killed.with_suffix(".tmp"))  # killed mid-write: only the temporary file
    killed.with_name(killed.name.replace(".tfrecord", ".index.json")).unlink()
    unrenamed.unlink()  # killed after the index was written, before the rename
    kept_stat = kept.stat()
    manifest = prepare(source, out, PrepareOptions(**{**OPTS.__dict__, "workers": 2}))
    assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns  # finished shards are not redone
    assert [p.relative_to(out) for p in _shards(out)] == [p.relative_to(reference) for p in _shards(reference)]
    for mine, theirs in zip(_shards(out), _shards(reference)):
        assert mine.read_bytes() == theirs.read_bytes(), mine.name
    assert manifest == {**read_manifest(reference), "nih_dir": manifest["nih_dir"]}
    assert not list(out.glob("*/*.tmp"))


def test_rerun_with_other_options_is_refused_naming_them(source, tmp_path):
    prepare(source, tmp_path, OPTS)
    with pytest.raises(ValueError, match=r"other settings \(image_size: 32 -> 16\).*new --out folder"):
        prepare(source, tmp_path, PrepareOptions(**{**OPTS.__dict__, "image_size": 16}))
    with pytest.raises(ValueError, match=r"split: 'official' -> 'random'"):
        prepare(source, tmp_path, PrepareOptions(**{**OPTS.__dict__, "split": "random"}))


@pytest.fixture
def broken_source(source, tmp_path):
    """A copy of the synthetic download to damage."""
    copy = tmp_path / "nih"
    shutil.copytree(source, copy)
    return copy, sorted(copy.glob("images_*/images/*.png"))


def test_each_bad_image_is_an_error_naming_its_file(broken_source, tmp_path):
    src, files = broken_source
    cut = files[5]
    good = cut.read_bytes()
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageError, match=rf"{cut}: truncated PNG"):
        prepare(src, tmp_path / "a", OPTS)
    cut.write_bytes(good)
    cv2.imwrite(str(files[7]), np.zeros((48, 48), np.uint8))
    with pytest.raises(ImageError, match=rf"{files[7]}: unexpected size 48x48, expected 64x64"):
        prepare(src, tmp_path / "b", OPTS)
    files[7].unlink()
    with pytest.raises(ImageError, match=rf"1 image\(s\) of the split are missing.*{files[7].name}.*--skip-bad"):
        prepare(src, tmp_path / "c", OPTS)


def test_two_files_with_one_image_name_are_refused(broken_source, tmp_path):
    src, files = broken_source
    extra = src / "images_099" / "images"
    extra.mkdir(parents=True)
    shutil.copy(files[0], extra / files[0].name)
    with pytest.raises(MetadataError, match=rf"duplicated image id '{files[0].name}': .*images_099"):
        prepare(src, tmp_path / "out", OPTS)


def test_unknown_label_is_an_error_naming_the_row(broken_source, tmp_path):
    src, _ = broken_source
    csv = src / "Data_Entry_2017.csv"
    lines = csv.read_text().splitlines()
    fields = lines[4].split(",")
    fields[1] = "Fracture"
    lines[4] = ",".join(fields)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(MetadataError, match=rf"{csv}: row 5: label 'Fracture' is not one of the 14"):
        prepare(src, tmp_path / "out", OPTS)


def test_skip_bad_skips_and_lists_bad_images_and_labels_the_rest_right(tf, broken_source, tmp_path):
    src, files = broken_source
    cut, small, gone = files[3], files[9], files[12]
    cut.write_bytes(cut.read_bytes()[:300])
    cv2.imwrite(str(small), np.zeros((48, 48), np.uint8))
    gone.unlink()
    out = tmp_path / "out"
    with pytest.raises(ImageError):  # a first run without --skip-bad stops at the bad file
        prepare(src, out, PrepareOptions(**{**OPTS.__dict__, "records_per_shard": 200}))
    manifest = prepare(src, out, PrepareOptions(**{**OPTS.__dict__, "records_per_shard": 200, "skip_bad": True}))
    skipped = pd.read_csv(out / "skipped.csv").set_index("image_id")
    assert sorted(skipped.index) == sorted([cut.name, small.name, gone.name])
    assert "truncated PNG" in skipped.loc[cut.name, "reason"] and str(cut) in skipped.loc[cut.name, "reason"]
    assert "unexpected size 48x48" in skipped.loc[small.name, "reason"]
    assert "missing" in skipped.loc[gone.name, "reason"]
    assert set(skipped["part"]) <= set(PARTS)
    assert manifest["skipped"]["count"] == 3
    assert {s["image_id"] for s in manifest["skipped"]["images"]} == set(skipped.index)
    by_id = read_metadata(src / "Data_Entry_2017.csv").set_index("image_id")
    seen = []
    for shard in _shards(out):
        for _, ex, _ in _tf_records(tf, shard):
            _check_record_against_metadata(ex, by_id.loc[ex["image/id"].numpy().decode()])
            seen.append(ex["image/id"].numpy().decode())
    assert sorted(seen + list(skipped.index)) == sorted(by_id.index)
    assert sum(p["images"] for p in manifest["parts"].values()) == len(by_id) - 3


def test_real_sample_end_to_end_at_1024(tf, nih_dir, tmp_path, capsys):
    """The 64 real PNGs lie flat in images/ (the release nests images_00x/images/)."""
    out = tmp_path / "out"
    code = main(
        [
            "prepare",
            "--nih-dir",
            str(nih_dir),
            "--out",
            str(out),
            "--image-size",
            "1024",
            "--skip-bad",
            "--workers",
            "1",
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and "112056 skipped; 0 colour images made gray, 0 PNGs not in the label file" in last
    manifest = read_manifest(out)
    # The six RGBA files have R = G = B: gray, not colour. Every row is in a split list.
    assert manifest["color_converted_to_gray"]["count"] == 0 and manifest["label_rows_in_no_split"]["count"] == 0
    raw = pd.read_csv(nih_dir / "Data_Entry_2017_v2020.csv.gz").set_index("Image Index")
    pngs = sorted(p.name for p in (nih_dir / "images").glob("*.png"))
    assert len(pngs) == 64
    test_list = set((nih_dir / "test_list.txt").read_text().split())
    # 32 in test and 32 in train_val (the shared README says 30 / 34).
    assert sum(name in test_list for name in pngs) == 32
    assert manifest["parts"]["test"]["images"] == 32
    assert manifest["parts"]["train"]["images"] + manifest["parts"]["val"]["images"] == 32
    seen = []
    for shard in _shards(out):
        for _, ex, image in _tf_records(tf, shard):
            image_id = ex["image/id"].numpy().decode()
            labels = raw.loc[image_id, "Finding Labels"]
            expected = [float(f in labels.split("|")) for f in FINDINGS]
            assert ex["labels"].numpy().tolist() == expected, image_id
            assert ex["patient_id"].numpy() == raw.loc[image_id, "Patient ID"]
            assert ex["age"].numpy() == raw.loc[image_id, "Patient Age"]
            assert image.shape == (1024, 1024, 1)
            original = np.array(Image.open(nih_dir / "images" / image_id))
            if original.ndim == 3:  # the six RGBA files: R = G = B, alpha 255
                original = original[..., 0]
            assert np.array_equal(image[..., 0], original), image_id
            assert (shard.parent.name == "test") == (image_id in test_list)
            seen.append(image_id)
    assert sorted(seen) == pngs
    assert manifest["skipped"]["count"] == 112_120 - 64
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 112_056 and skipped["reason"].str.contains("missing").all()


def test_symlinked_image_folders_are_followed_once(source, tmp_path):
    """A download put together from symlinks (say, each images_00N/ on another disk)
    finds every image, and a link back up the tree does not loop."""
    from cxrjax.data.prepare import locate_images

    linked = tmp_path / "nih"
    linked.mkdir()
    for entry in source.iterdir():
        (linked / entry.name).symlink_to(entry)
    loop = tmp_path / "loop-holder"
    loop.mkdir()
    (loop / "up").symlink_to(loop)
    (linked / "extra").symlink_to(loop)
    expected = locate_images(source)
    found = locate_images(linked)
    assert set(expected) == {p.name for p in source.rglob("*.png")} and found.keys() == expected.keys()
    assert all(found[k].resolve() == expected[k].resolve() for k in found)
