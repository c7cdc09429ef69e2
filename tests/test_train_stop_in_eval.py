"""A stop request (SIGTERM: a spot notice) during validation or the final test evaluation
ends the pass at the next batch instead of after it, so the two minutes of a notice hold
at 1024 px; the run then resumes where it stopped and ends as an uninterrupted one.

In-process `train_and_test` on the suite's CPU devices with the smoke recipe; the signal is sent to this
process from inside the pass, so it lands mid-pass every time.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
from train_helpers import SMOKE, STEPS_PER_EPOCH, metrics_rows, prepared  # noqa: F401 (fixture)

from cxrjax.cli import main
from cxrjax.config import load_config
from cxrjax.experiment import train_and_test
from cxrjax.logs import show_library_logs
from cxrjax.train import evaluation, loop, setup
from cxrjax.workdir import BEST_WEIGHTS, DONE, RUN_CONFIG


def _signalling(fn, call: int, sig):
    """`fn`, sending `sig` to this process as its `call`-th call starts; `.calls` counts them."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)

    wrapped.calls = calls
    return wrapped


def _signal_on_call(monkeypatch, module, name: str, call: int, sig=signal.SIGTERM) -> list[int]:
    """Wrap module.<name> so that its `call`-th call sends `sig` to this process first."""
    wrapped = _signalling(getattr(module, name), call, sig)
    monkeypatch.setattr(module, name, wrapped)
    return wrapped.calls


def _signal_on_step(monkeypatch, step: int, sig=signal.SIGTERM) -> None:
    """The run's jitted training step sends `sig` to this process as its `step`-th call starts."""
    real = setup.make_train_step
    monkeypatch.setattr(setup, "make_train_step", lambda *a, **k: _signalling(real(*a, **k), step, sig))


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_a_stop_during_validation_or_the_final_evaluation_ends_the_pass_and_resumes(
    prepared, tmp_path, monkeypatch, capsys
):
    show_library_logs()  # the trainer's messages on (captured) stdout, as the command shows them
    config = load_config(
        SMOKE, [f"--config.data.prepared={prepared}", "--config.epochs=1", "--config.wandb.mode=disabled"]
    )
    whole, work = tmp_path / "whole", tmp_path / "stopped"
    # The uninterrupted run gets a SIGUSR1 (a rebalance recommendation) in its second step:
    # it saves a checkpoint there and trains on.
    with monkeypatch.context() as patch:
        _signal_on_step(patch, 2, signal.SIGUSR1)
        reference = train_and_test(config, whole)
    assert "SIGUSR1 (rebalance recommendation): checkpoint saved at step 2; training goes on" in capsys.readouterr().out
    assert "stopped" not in reference and (whole / DONE).exists()

    with monkeypatch.context() as patch:
        _signal_on_call(patch, loop, "validate", 1)
        out = train_and_test(config, work)
    assert out == {"stopped": "SIGTERM received during validation", "step": STEPS_PER_EPOCH}
    assert metrics_rows(work, "val") == [] and not (work / DONE).exists()

    with monkeypatch.context() as patch:  # the epoch's validation first, then the test pass
        predicts = _signal_on_call(patch, evaluation, "predict", 2)
        out = train_and_test(config, work)
        assert len(predicts) == 2  # the second pass ended at its first batch
    assert out == {"stopped": "SIGTERM received during the final evaluation", "step": STEPS_PER_EPOCH}
    assert not (work / DONE).exists()

    done = train_and_test(config, work)
    assert done == {**reference, "weights": str(work / BEST_WEIGHTS)}
    assert json.loads((work / DONE).read_text()) == done
    (val,), (ref_val,) = metrics_rows(work, "val"), metrics_rows(whole, "val")
    assert (val["step"], val["val_loss"], val["val_mean_auc"]) == (
        ref_val["step"],
        ref_val["val_loss"],
        ref_val["val_mean_auc"],
    )
    assert (work / "test" / "predictions.csv").read_text() == (whole / "test" / "predictions.csv").read_text()

    # A stop in the epoch's last step: the checkpoint marks the validation pending, and
    # the resumed run validates that epoch before anything else (it used to be dropped).
    last = tmp_path / "last_step"
    with monkeypatch.context() as patch:
        _signal_on_step(patch, STEPS_PER_EPOCH)
        out = train_and_test(config, last)
    assert out == {"stopped": "SIGTERM received", "step": STEPS_PER_EPOCH}
    assert metrics_rows(last, "val") == []
    assert train_and_test(config, last) == {**reference, "weights": str(last / BEST_WEIGHTS)}
    (val,) = metrics_rows(last, "val")
    assert (val["step"], val["val_loss"], val["val_mean_auc"]) == (
        ref_val["step"],
        ref_val["val_loss"],
        ref_val["val_mean_auc"],
    )

    # The finished run asked for another image size: refused in one line before anything
    # is written; more epochs of a finished run: refused, saying how to get them.
    recorded = (work / RUN_CONFIG).read_bytes()
    files = sorted(p.relative_to(work) for p in work.rglob("*"))
    command = ["train", "--config", SMOKE, "--workdir", str(work), "--config.epochs=1"]
    command.append(f"--config.data.prepared={prepared}")
    capsys.readouterr()
    assert main([*command, "--config.data.image_size=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.image_size 32 -> 64" in err and "another --workdir" in err, err
    assert main([*command, "--config.epochs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "epochs 1 -> 3" in err and "delete" in err and DONE in err, err
    # The same data through a symlink and a relative path is the same run (it is finished).
    link = tmp_path / "data-link"
    link.symlink_to(prepared)
    monkeypatch.chdir(tmp_path)
    assert main([*command[:-1], "--config.data.prepared=data-link"]) == 0
    assert (work / RUN_CONFIG).read_bytes() == recorded
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == files
