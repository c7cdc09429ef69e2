"""What the commands print for people (issue 21.7): sentences, not Python dicts; a reused
prepare says so; a missing folder is named as missing; gradcam findings in any case."""

import pytest

import cxrjax.experiment
from cxrjax.cli import main
from cxrjax.data.synth import write_synthetic_nih
from cxrjax.eval.gradcam import finding_indices
from cxrjax.findings import FINDINGS
from cxrjax.summaries import plural, train_summary


def test_train_prints_a_sentence_not_a_dict(monkeypatch, tmp_path, capsys):
    done = {"best_step": 30, "weights": "w/best_weights", "split": "official", "image_size": 224, "test_mean_auc": 0.8}
    monkeypatch.setattr(cxrjax.experiment, "train_members", lambda config, workdir: done)
    assert main(["train", "--config", "chexnet:smoke", "--workdir", str(tmp_path / "w")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "best step 30 (224 px, official split), test mean AUC 0.8000; weights: w/best_weights"
    stopped = train_summary({"stopped": "SIGTERM received", "step": 12})
    assert stopped == "stopped at step 12: SIGTERM received; rerun the same command to resume"
    ensemble = train_summary({"members": [done, done], "ensemble_predictions": "e.csv"})
    assert ensemble.startswith("ensemble of 2 members: best step 30") and "{" not in ensemble


def test_plurals():
    assert [plural(1, "overlay"), plural(2, "overlay"), plural(0, "image")] == ["1 overlay", "2 overlays", "0 images"]


def test_prepare_says_when_it_reuses_a_folder_and_names_a_missing_one(tmp_path, capsys):
    write_synthetic_nih(tmp_path / "nih", num_patients=8, image_size=16, seed=0)
    argv = ["prepare", "--nih-dir", str(tmp_path / "nih"), "--out", str(tmp_path / "p"), "--image-size", "16"]
    argv += ["--source-size", "16", "--workers", "1"]
    assert main(argv) == 0
    assert "already prepared" not in capsys.readouterr().out
    assert main(argv) == 0
    assert "3 of 3 shards already prepared with these options (sizes and sha256 checked) are reused; 0 to write" in (
        capsys.readouterr().out
    )
    missing = ["prepare", "--nih-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "q"), "--image-size", "16"]
    assert main(missing) == 2
    assert f"{tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_gradcam_findings_in_any_case():
    assert finding_indices("effusion, MASS,Pleural_thickening") == tuple(
        FINDINGS.index(f) for f in ("Effusion", "Mass", "Pleural_Thickening")
    )
    with pytest.raises(ValueError, match="unknown finding 'Efusion'"):
        finding_indices("Efusion")
