"""A damaged prepared folder never gives silently wrong labels or counts: the records are
the truth, the index is checked against the manifest before any use, a rerun of
`prepare` rebuilds a damaged shard, and each damage is a one-line `error:` that names
the file (and byte offset) and says how to repair it."""

import hashlib
import json
import logging
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
from tiny_run import write_run
from train_helpers import SMOKE

from cxrjax.cli import main
from cxrjax.data.pipeline import Balance, ShardedRecords, make_loader, read_index, training_table
from cxrjax.data.prepare import PreparedDataError, PrepareOptions, prepare, read_manifest
from cxrjax.eval.inference import Predictor, predict_for_evaluation, predict_part
from cxrjax.eval.model_source import load_trained
from cxrjax.findings import FINDINGS

SIZE = 32
OPTS = PrepareOptions(image_size=SIZE, source_size=64, records_per_shard=16, workers=1)
REPAIR = "re-run `cxrjax prepare` with the same options to repair it"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from cxrjax.data.synth import write_synthetic_nih

    tmp = tmp_path_factory.mktemp("integrity")
    write_synthetic_nih(tmp / "nih", num_patients=40, image_size=64, seed=5)
    prepare(tmp / "nih", tmp / "prep", OPTS)
    write_run(tmp / "run", SIZE, prepared=str(tmp / "prep"))
    return tmp


@pytest.fixture
def prep(base, tmp_path):
    """A copy of the prepared folder to damage."""
    shutil.copytree(base / "prep", tmp_path / "prep")
    return tmp_path / "prep"


def _evaluate(base, prep, out, capsys):
    code = main(
        ["evaluate", "--checkpoint", str(base / "run"), "--data", str(prep), "--out", str(out), "--bootstrap", "5"]
    )
    return code, capsys.readouterr()


def _one_line_error(captured, *parts):
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    for part in parts:
        assert part in err, (part, err)


def _edit_labels(index_csv, rows=(0, 1), finding="Effusion"):
    table = pd.read_csv(index_csv, dtype={"image_id": str, "shard": str})
    table.loc[list(rows), finding] = 1 - table.loc[list(rows), finding]
    table.to_csv(index_csv, index=False)
    return table


def test_edited_or_cut_index_is_refused_before_any_use(base, prep, tmp_path, capsys):
    """Before: evaluation used the edited labels, or 65 of 75 images, without a word."""
    test_index = prep / "test" / "index.csv"
    _edit_labels(test_index)
    code, captured = _evaluate(base, prep, tmp_path / "a", capsys)
    assert code == 2
    _one_line_error(captured, str(test_index), "changed after `prepare`", REPAIR)

    shutil.copy(base / "prep" / "test" / "index.csv", test_index)
    table = pd.read_csv(test_index)
    table.iloc[:-3].to_csv(test_index, index=False)
    n = read_manifest(prep)["parts"]["test"]["images"]
    code, captured = _evaluate(base, prep, tmp_path / "b", capsys)
    assert code == 2
    _one_line_error(captured, str(test_index), f"{n - 3} rows", f"says {n} images")

    # The trainer selects its training records from the train part's index.
    train_index = prep / "train" / "index.csv"
    pd.read_csv(train_index).iloc[5:].to_csv(train_index, index=False)
    with pytest.raises(PreparedDataError, match="train/index.csv was changed after `prepare`"):
        training_table(prep / "train", Balance(), seed=0)
    code = main(["train", "--config", SMOKE, "--workdir", str(tmp_path / "run"), f"--config.data.prepared={prep}"])
    assert code == 2
    _one_line_error(capsys.readouterr(), str(train_index), "changed after `prepare`", REPAIR)
    with pytest.raises(PreparedDataError, match="train/index.csv was changed"):
        ShardedRecords(prep / "train")

    # A manifest from before index checksums: refused with the same repair.
    manifest = json.loads((prep / "manifest.json").read_text())
    del manifest["parts"]["val"]["index_sha256"]
    (prep / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PreparedDataError, match=r"records no checksum of .*val/index.csv"):
        read_index(prep / "val")

    # Rerunning prepare repairs all of it without rewriting any shard.
    mtimes = {p: p.stat().st_mtime_ns for p in prep.glob("*/*.tfrecord")}
    prepare(base / "nih", prep, OPTS)
    assert {p: p.stat().st_mtime_ns for p in prep.glob("*/*.tfrecord")} == mtimes
    for part in ("train", "val", "test"):
        assert (prep / part / "index.csv").read_bytes() == (base / "prep" / part / "index.csv").read_bytes()
        read_index(prep / part)


def test_labels_and_ids_come_from_the_records(base, prep):
    """Even an index edited together with its manifest checksum cannot relabel an image
    for evaluation. Before: the labels came from index.csv."""
    truth = pd.read_csv(base / "prep" / "test" / "index.csv")
    finding = next(f for f in FINDINGS if 0 < truth[f].sum() < len(truth))
    _edit_labels(prep / "test" / "index.csv", rows=range(len(truth)), finding=finding)
    manifest = json.loads((prep / "manifest.json").read_text())
    manifest["parts"]["test"]["index_sha256"] = hashlib.sha256((prep / "test" / "index.csv").read_bytes()).hexdigest()
    (prep / "manifest.json").write_text(json.dumps(manifest))

    r = predict_for_evaluation(base / "run", prep, "test", batch_size=8)
    assert list(r["ids"]) == list(truth["image_id"])
    got = r["labels"].set_index("image_id").loc[truth["image_id"]]
    np.testing.assert_array_equal(got[list(FINDINGS)].to_numpy(), truth[list(FINDINGS)].to_numpy())
    val_labels = r["val"][2].set_index("image_id")
    val_truth = pd.read_csv(base / "prep" / "val" / "index.csv").set_index("image_id")
    np.testing.assert_array_equal(val_labels.loc[val_truth.index, list(FINDINGS)], val_truth[list(FINDINGS)])


def _shard(prep, part="test", i=0):
    return sorted((prep / part).glob("*.tfrecord"))[i]


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_rerun_rebuilds_a_bit_flipped_finished_shard_and_says_which(base, prep, caplog):
    """Before: the rerun kept the shard (its size was right) and said nothing."""
    shard, kept = _shard(prep, "train", 1), _shard(prep, "train", 0)
    _flip(shard, 700)
    kept_mtime = kept.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="cxrjax.data.prepare"):
        prepare(base / "nih", prep, OPTS)
    assert shard.read_bytes() == _shard(base / "prep", "train", 1).read_bytes()
    assert kept.stat().st_mtime_ns == kept_mtime
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and str(shard) in warned[0] and "sha256" in warned[0], warned


@pytest.mark.parametrize("damage", ["flip", "length", "truncate", "delete"])
def test_damaged_shard_stops_evaluate_with_one_line_naming_shard_and_offset(base, prep, tmp_path, capsys, damage):
    shard = _shard(prep, "test", 0)
    index = read_index(prep / "test")
    second = int(index.loc[index["shard"] == shard.name, "offset"].iloc[1])
    if damage == "flip":
        _flip(shard, second + 40)  # inside the second record's payload
        where = f"CRC mismatch in record at byte {second}"
    elif damage == "length":
        _flip(shard, second + 5)  # the second record's length field
        where = f"at byte {second}"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[: second + 20])
        where = "truncated"
    else:
        shard.unlink()
        where = "cannot read"
    code, captured = _evaluate(base, prep, tmp_path / "o", capsys)
    assert code == 2
    _one_line_error(captured, str(shard), where, "re-run `cxrjax prepare`")
    # Training reads through the same source, also from grain's worker processes.
    if damage == "flip":  # `cxrjax train` prints the same error (its index case is tested above)
        source = ShardedRecords(prep / "test")
        loader = make_loader(
            source, batch_size=4, image_size=SIZE, seed=0, train=True, workers=1, process_index=0, process_count=1
        )
        with pytest.raises(PreparedDataError, match=f"{shard}: .*{where}"):
            for _ in zip(range(3 * len(source)), loader):
                pass
    prepare(base / "nih", prep, OPTS)  # the repair
    assert shard.read_bytes() == _shard(base / "prep", "test", 0).read_bytes()


def test_empty_or_bom_only_label_file_is_a_one_line_error(base, tmp_path, capsys):
    """Before: a pandas EmptyDataError traceback."""
    nih = tmp_path / "nih"
    shutil.copytree(base / "nih", nih)
    label_file = nih / "Data_Entry_2017.csv"
    for content in (b"", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"):
        label_file.write_bytes(content)
        code = main(["prepare", "--nih-dir", str(nih), "--out", str(tmp_path / "out"), "--image-size", "32"])
        assert code == 2
        _one_line_error(capsys.readouterr(), str(label_file), "empty file")
    header = (base / "nih" / "Data_Entry_2017.csv").read_text().splitlines()[0]
    label_file.write_text(header + "\n")
    code = main(["prepare", "--nih-dir", str(nih), "--out", str(tmp_path / "out"), "--image-size", "32"])
    assert code == 2
    _one_line_error(capsys.readouterr(), str(label_file), "no image rows")


def test_bom_in_split_lists_is_not_part_of_the_first_image_id(base, tmp_path):
    """Before: the first id became '\\ufeff0000...png' and was reported as unknown."""
    nih = tmp_path / "nih"
    shutil.copytree(base / "nih", nih)
    for name in ("train_val_list.txt", "test_list.txt"):
        path = nih / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    manifest = prepare(nih, tmp_path / "out", OPTS)
    assert manifest["parts"] == read_manifest(base / "prep")["parts"]


def test_colour_pngs_unlisted_pngs_and_unsplit_rows_are_counted(base, tmp_path, capsys):
    """Before: converted or ignored without a count."""
    nih = tmp_path / "nih"
    shutil.copytree(base / "nih", nih)
    test_list = nih / "test_list.txt"
    names = test_list.read_text().split()
    test_list.write_text("\n".join(names[1:]))  # a labelled image no split list names
    files = [f for f in sorted(nih.glob("images_*/images/*.png")) if f.name != names[0]]  # still in a split
    gray = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE)
    colour = np.stack([gray, gray // 2, 255 - gray], -1)
    cv2.imwrite(str(files[0]), colour)
    shutil.copy(files[1], files[1].with_name("99999999_000.png"))  # a PNG the label file does not list
    code = main(
        [
            "prepare",
            "--nih-dir",
            str(nih),
            "--out",
            str(tmp_path / "out"),
            "--image-size",
            "32",
            "--source-size",
            "64",
            "--workers",
            "1",
        ]
    )
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "1 colour images made gray, 1 PNGs not in the label file, 1 label rows in no split list" in last, last
    manifest = read_manifest(tmp_path / "out")
    assert manifest["color_converted_to_gray"] == {"count": 1, "images": [files[0].name]}
    assert manifest["pngs_not_in_label_file"] == {"count": 1, "images": ["99999999_000.png"]}
    assert manifest["label_rows_in_no_split"] == {"count": 1, "images": [names[0]]}


def test_batch_size_changes_predictions_by_at_most_the_documented_tolerance(base):
    """docs/data.md: predictions over a prepared part agree within 1e-6 across batch sizes
    (XLA's reduction order depends on the batch shape), and exactly for one batch size."""
    trained = load_trained(base / "run")
    ids8, p8, labels8 = predict_part(Predictor(trained, batch_size=8), base / "prep" / "test")
    ids3, p3, labels3 = predict_part(Predictor(trained, batch_size=16), base / "prep" / "test")
    _, again, _ = predict_part(Predictor(trained, batch_size=8), base / "prep" / "test")
    assert list(ids8) == list(ids3)
    np.testing.assert_array_equal(labels8, labels3)
    np.testing.assert_array_equal(p8, again)
    assert np.abs(p8 - p3).max() <= 1e-6
