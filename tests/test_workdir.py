"""The training folder contract (`cxrjax.workdir`) and the shared batch padding
(`cxrjax.forward`): what training writes is what inference reads, a damaged file is a
one-line error naming it, and every process predicts the same number of full batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from tiny_run import write_run

from cxrjax.config import base_config
from cxrjax.data.augment import AugmentConfig
from cxrjax.eval.model_source import load_trained
from cxrjax.findings import FINDINGS
from cxrjax.forward import pad_rows, record_batches
from cxrjax.workdir import (
    BEST_WEIGHTS,
    NORMALIZATION,
    RUN_CONFIG,
    WorkdirError,
    input_stats,
    read_run_config,
    run_info,
    save_statistics,
    write_run_config,
)


def test_inference_reads_the_run_as_training_wrote_it(tmp_path):
    config = base_config()
    config.data.normalization = "dataset"
    config.data.rotation_deg, config.data.horizontal_flip = 7.0, True
    write_run_config(tmp_path, config)
    save_statistics(tmp_path, 0.4, 0.2)
    run = read_run_config(tmp_path)
    assert run.data.image_size == config.data.image_size and run.data.rotation_deg == 7.0
    assert input_stats(run, tmp_path, 3) == ((0.4,) * 3, (0.2,) * 3)
    (mean,), (std,) = input_stats(None, None, 1)  # no run: ImageNet, averaged over its channels
    assert (mean, std) == (pytest.approx(0.449), pytest.approx(0.226))


def test_trained_model_takes_the_runs_statistics_and_augmentation_ranges(tmp_path):
    write_run(tmp_path / "run", 32, dataset_stats=(0.3, 0.25))
    trained = load_trained(tmp_path / "run")
    assert (trained.mean, trained.std) == ((0.3,) * 3, (0.25,) * 3)
    data = trained.run_config.data
    assert trained.augment == AugmentConfig(
        data.rotation_deg, data.shift, data.zoom, data.shear_deg, data.horizontal_flip
    )
    bare = load_trained(tmp_path / "run" / BEST_WEIGHTS)  # the same weights named by their folder
    assert bare.workdir == tmp_path / "run" and bare.mean == trained.mean


@pytest.mark.parametrize("name", [RUN_CONFIG, NORMALIZATION])
def test_a_damaged_run_file_is_an_error_naming_it(tmp_path, name):
    write_run(tmp_path / "run", 32, dataset_stats=(0.3, 0.25))
    path = tmp_path / "run" / name
    path.write_text(path.read_text()[:-5])  # cut short
    with pytest.raises(WorkdirError, match=f"{path}: not valid JSON"):
        load_trained(tmp_path / "run")


def test_missing_dataset_statistics_are_an_error_naming_the_file(tmp_path):
    write_run(tmp_path / "run", 32, dataset_stats=(0.3, 0.25))
    (tmp_path / "run" / NORMALIZATION).unlink()
    with pytest.raises(WorkdirError, match=f"{tmp_path / 'run' / NORMALIZATION} not found"):
        load_trained(tmp_path / "run")


@pytest.mark.parametrize(
    "manifest, family",
    [
        ({"split": "official", "synthetic": True}, "synthetic"),
        ({"split": "official"}, "official"),
        ({"split": "patient-random-seed0"}, "random"),
    ],
)
def test_run_info_names_the_split_family(tmp_path, manifest, family):
    config = base_config()
    config.model.cbam = True
    info = run_info(config, manifest, tmp_path / "my-run")
    assert info == {
        "name": "my-run",
        "split_family": family,
        "split": manifest["split"],
        "px": config.data.image_size,
        "backbone": f"{config.model.arch} + CBAM",
        "evaluation": "test",
        "test_images_full": None,  # the manifest has no parts
        "smoke": config.model.arch == "tiny",
    }


def test_run_info_counts_the_split_full_test_list_and_flags_smoke_models(tmp_path):
    """The test images skipped (missing, unreadable) still belong to the split's test list."""
    config = base_config()
    config.model.arch = "tiny"
    skipped = [{"image_id": "a.png", "part": "test"}, {"image_id": "b.png", "part": "train"}]
    manifest = {"split": "chexnet", "parts": {"test": {"images": 75}}, "skipped": {"count": 2, "images": skipped}}
    info = run_info(config, manifest, tmp_path / "r", "test, tta 4")
    assert info["test_images_full"] == 76 and info["smoke"] is True and info["evaluation"] == "test, tta 4"
    pd.DataFrame(skipped * 3).to_csv(tmp_path / "skipped.csv", index=False)
    manifest["skipped"] = {"count": 6, "images": "see skipped.csv"}
    assert run_info(config, manifest, tmp_path / "r", prepared=tmp_path)["test_images_full"] == 78


def test_every_process_gets_the_same_number_of_full_batches():
    def batch(keys):
        n = len(keys)
        return {
            "image": np.full((n, 2, 2, 1), 9, np.uint8),
            "key": np.asarray(keys, np.int64),
            "labels": np.ones((n, len(FINDINGS)), np.float32),
        }

    out = list(record_batches([batch([0, 1, 2]), batch([3])], size=3, count=3, image_size=2))
    assert len(out) == 3 and all(len(b[name]) == 3 for b in out for name in ("image", "key", "labels"))
    assert [b["key"].tolist() for b in out] == [[0, 1, 2], [3, -1, -1], [-1, -1, -1]]
    assert out[1]["key"].dtype == np.int32 and out[1]["image"][1:].max() == 0 and out[2]["labels"].max() == 0
    with pytest.raises(ValueError, match="exceeds the batch size 2"):
        pad_rows(np.zeros(3), 2)
