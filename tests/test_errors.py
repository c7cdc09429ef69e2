"""One base class for bad input: every error cxrjax raises about a file, row or option
derives from it, and catching it imports nothing heavy."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from cxrjax.errors import InputError

PACKAGE = Path(__file__).resolve().parents[1] / "cxrjax"
NOT_INPUT = {"TrainingDiverged"}  # a run that went wrong, not a file that is wrong


def error_classes():
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith(("Error", "Diverged")):
                yield module, node.name


def test_every_input_error_derives_from_the_one_base_class():
    found = list(error_classes())
    # The scan sees classes in every layer (a scan that found none would pass vacuously).
    assert {
        ("cxrjax.workdir", "WorkdirError"),
        ("cxrjax.data.prepare", "PreparedDataError"),
        ("cxrjax.models.errors", "WeightsError"),
        ("cxrjax.train.checkpoint", "CheckpointError"),
        ("cxrjax.train.divergence", "TrainingDiverged"),
        ("cxrjax.eval.leaderboard", "LeaderboardError"),
    } <= set(found)
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, InputError) != (name in NOT_INPUT), f"{module}.{name}"


def test_catching_input_errors_imports_nothing_heavy():
    code = (
        "import sys; import cxrjax.errors, cxrjax.cli; "
        "heavy = {'jax', 'orbax', 'matplotlib', 'flax', 'grain', 'pandas'} & {m.split('.')[0] for m in sys.modules}; "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# Config mistakes are one line, before any workdir exists (`cxrjax.train.config_check`, `cxrjax.config.load_config`).
TRAIN = ["train", "--config", "chexnet:smoke"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.data.image_size=0", "data.image_size=0 is below 1"),
        ("--config.epochs=0", "epochs=0 is below 1"),
        ("--config.global_batch_size=-8", "global_batch_size=-8 is below 1"),
        ("--config.log_every_steps=0", "log_every_steps=0 is below 1"),
        ("--config.model.num_classes=5", "model.num_classes=5: the model predicts the 14 findings"),
        ("--config.optim.learning_rate=-0.1", "optim.learning_rate=-0.1 must be above 0"),
        ("--config.data.keep_no_finding=2", "data.keep_no_finding=2.0 is not in [0, 1]"),
        ("--config.loss.name=bse", "loss.name='bse' is not one of bce, weighted_bce"),
        ("--config.optim.schedule=step", "optim.schedule='step' is not one of constant"),
        ("--config.model.arch=resnet50", "model.arch='resnet50' is not one of densenet121"),
        ("--config.data.normalization=none", "data.normalization='none' is not one of imagenet, dataset"),
        ("--config.wandb.mode=off", "wandb.mode='off' is not one of offline"),
    ],
)
def test_a_bad_config_value_is_one_line_before_the_workdir_exists(tmp_path, capsys, override, expected):
    from cxrjax.cli import main

    work = tmp_path / "work"
    assert main([*TRAIN, "--workdir", str(work), f"--config.data.prepared={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cxrjax train: error: config: ") and expected in err, err
    assert "cxrjax/config.py" in err and not work.exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--config.epoch=1"], "--config.epoch=1: no field 'epoch'; did you mean 'epochs'?"),
        (["--config.optim.learnin_rate=1e-3"], "no field 'optim.learnin_rate'; did you mean 'optim.learning_rate'?"),
        (["--config.data.prepared", "/data"], "write --config.data.prepared=/data (an override takes its value after"),
    ],
)
def test_a_mistyped_override_is_one_line_with_a_hint(tmp_path, overrides, expected):
    from cxrjax.cli import main

    with pytest.raises(SystemExit) as e:
        main([*TRAIN, "--workdir", str(tmp_path / "work"), *overrides])
    message = str(e.value.code)
    assert "\n" not in message and expected in message, message
    assert not (tmp_path / "work").exists()


def test_train_help_says_how_overrides_work_and_where_the_fields_are(capsys):
    from cxrjax.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--config.FIELD=VALUE" in out and "cxrjax/config.py" in out and "docs/training.md" in out


def test_a_full_disk_is_one_line(tmp_path, capsys):
    """A real ENOSPC: /dev/full refuses every write."""
    from cxrjax.cli import main
    from cxrjax.findings import FINDINGS

    csv = tmp_path / "a.csv"
    csv.write_text(
        "Image Index," + ",".join(f"prob_{f}" for f in FINDINGS) + "\nx.png," + ",".join(["0.5"] * 14) + "\n"
    )
    assert main(["ensemble", str(csv), str(csv), "--out", "/dev/full"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cxrjax ensemble: error: no space left on device"), err


def test_a_full_disk_is_found_behind_the_errors_it_caused():
    import errno

    from cxrjax.cli import disk_full

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/w/checkpoints/4")
        except OSError as e:
            raise RuntimeError("async save failed") from e
    except RuntimeError as e:
        assert disk_full(e) == "no space left on device (/w/checkpoints/4)"
    assert disk_full(ValueError("Error writing local file: [OS error 28: No space left on device]")) is not None
    assert disk_full(ValueError("bad")) is None


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            "--config.optim.learnin_rate=1e-3;",
            "member 0: --config.optim.learnin_rate=1e-3: no field 'optim.learnin_rate'; did you mean",
        ),
        (";--config.optim.learning_rate=fast", "member 1: flag --config.optim.learning_rate=fast: could not convert"),
        ("--config.seed=1", "ensemble.overrides has 1 ';'-separated entries for 2 members"),
        ("optim.learning_rate=1e-3;", "member 0: unrecognized arguments: optim.learning_rate=1e-3"),
        (";--config.data.prepared /data", "member 1: --config.data.prepared /data: write --config.data.prepared=/data"),
    ],
)
def test_a_mistyped_ensemble_override_is_one_line_before_any_member_trains(tmp_path, capsys, overrides, expected):
    from cxrjax.cli import main

    argv = [*TRAIN, "--workdir", str(tmp_path / "ens"), f"--config.data.prepared={tmp_path}"]
    assert main([*argv, "--config.ensemble.members=2", f"--config.ensemble.overrides={overrides}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err
    assert not (tmp_path / "ens").exists()
