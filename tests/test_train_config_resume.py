"""A rerun into a workdir is checked against the config its run was trained with
(`cxrjax.train.resume`), before anything is written: fields defining the model, the data
or the results may not change; the others are appended to the run's history. No
training here: the check runs before any (the trained case is in test_train_stop_in_eval)."""

from __future__ import annotations

import json

import pytest

from cxrjax.cli import main
from cxrjax.config import load_config
from cxrjax.train import resume
from cxrjax.workdir import CHECKPOINTS, CONFIG_HISTORY, DONE, RUN_CONFIG, write_run_config

SMOKE = "chexnet:smoke"


def _run(tmp_path, *overrides):
    """A workdir as a started run leaves it (its config.json), and the data it names."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    config = resume.absolute_paths(load_config(SMOKE, [f"--config.data.prepared={data}", *overrides]))
    work = tmp_path / "work"
    work.mkdir()
    write_run_config(work, config)
    return work, data


def test_a_changed_image_size_or_batch_is_one_line_and_leaves_config_json_alone(tmp_path, capsys):
    work, data = _run(tmp_path)
    recorded = (work / RUN_CONFIG).read_bytes()
    argv = ["train", "--config", SMOKE, "--workdir", str(work), f"--config.data.prepared={data}"]
    assert main([*argv, "--config.data.image_size=64", "--config.global_batch_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"cxrjax train: error: {work / RUN_CONFIG}: ")
    assert "global_batch_size 8 -> 4" in err and "data.image_size 32 -> 64" in err and "another --workdir" in err
    assert (work / RUN_CONFIG).read_bytes() == recorded
    assert not (work / CONFIG_HISTORY).exists() and not (work / CHECKPOINTS).exists()


@pytest.mark.parametrize(
    "override",
    [
        "--config.optim.learning_rate=0.1",
        "--config.data.normalization=dataset",
        "--config.model.cbam=True",
        "--config.model.arch=densenet121",
        "--config.seed=1",
        "--config.max_steps_per_epoch=5",
        "--config.data.workers=2",
    ],
)
def test_fields_that_define_the_run_are_refused(tmp_path, override):
    work, data = _run(tmp_path)
    config = load_config(SMOKE, [f"--config.data.prepared={data}", override])
    field = override.removeprefix("--config.").split("=")[0]
    with pytest.raises(resume.ConfigMismatchError, match=f"{field} .* -> "):
        resume.changes(config, work)


def test_another_prepared_folder_is_refused_but_the_same_one_by_symlink_or_relative_path_is_not(tmp_path, monkeypatch):
    work, data = _run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(resume.ConfigMismatchError, match="data.prepared"):
        resume.changes(load_config(SMOKE, [f"--config.data.prepared={other}"]), work)
    (tmp_path / "link").symlink_to(data)
    monkeypatch.chdir(tmp_path)
    for name in ("link", "data", "./data/"):
        config = resume.absolute_paths(load_config(SMOKE, [f"--config.data.prepared={name}"]))
        assert config.data.prepared == str(data)
        assert resume.changes(config, work) == {}


def test_more_epochs_are_recorded_in_the_history_not_in_config_json(tmp_path):
    work, data = _run(tmp_path)
    recorded = (work / RUN_CONFIG).read_bytes()
    base = [f"--config.data.prepared={data}"]
    longer = load_config(SMOKE, [*base, "--config.epochs=5", "--config.log_every_steps=1"])
    changed = resume.changes(longer, work)
    assert changed == {"epochs": (2, 5), "log_every_steps": (2, 1)}
    resume.record(work, longer, changed)
    assert (work / RUN_CONFIG).read_bytes() == recorded
    (entry,) = [json.loads(line) for line in (work / CONFIG_HISTORY).read_text().splitlines()]
    assert entry["changes"] == {"epochs": [2, 5], "log_every_steps": [2, 1]}
    # The next rerun compares with the history applied: nothing new to record.
    assert resume.changes(longer, work) == {}
    assert resume.recorded_config(work)["epochs"] == 5


def test_epochs_may_not_change_under_a_cosine_schedule(tmp_path):
    work, data = _run(tmp_path, "--config.optim.schedule=cosine")
    config = load_config(SMOKE, [f"--config.data.prepared={data}", "--config.optim.schedule=cosine"])
    config.epochs = 3
    with pytest.raises(resume.ConfigMismatchError, match="epochs 2 -> 3"):
        resume.changes(config, work)


def test_more_epochs_of_a_finished_run_say_what_to_do(tmp_path, capsys):
    work, data = _run(tmp_path)
    (work / DONE).write_text(json.dumps({"best_step": 8}))
    argv = ["train", "--config", SMOKE, "--workdir", str(work), f"--config.data.prepared={data}"]
    assert main([*argv, "--config.epochs=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "epochs 2 -> 4" in err and f"delete {work / DONE}" in err
    assert main(argv) == 0  # the same config: the finished run's summary
    assert "already trained" in capsys.readouterr().out


def test_other_processes_of_a_cluster_run_may_read_the_data_from_their_own_folder(tmp_path, monkeypatch):
    work, data = _run(tmp_path)
    node = tmp_path / "node-1-data"
    node.mkdir()
    config = resume.absolute_paths(load_config(SMOKE, [f"--config.data.prepared={node}"]))
    monkeypatch.setattr(resume, "_process_index", lambda: 1)
    assert resume.changes(config, work) == {}
    config.data.image_size = 64
    with pytest.raises(resume.ConfigMismatchError, match="data.image_size 32 -> 64"):
        resume.changes(config, work)
