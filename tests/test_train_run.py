"""`cxrjax train` end to end on the smoke config: what it writes while monitoring,
early stopping and the best checkpoint it keeps, divergence, and ensembles."""

from __future__ import annotations

import json
import math
import re
import statistics

import numpy as np
import pandas as pd
import pytest
from launch_helpers import load_run_cost
from sklearn.metrics import roc_auc_score
from train_helpers import (  # noqa: F401 (fixtures)
    NO_NETWORK,
    STEPS_PER_EPOCH,
    best_weights_logits,
    finalized_steps,
    flat,
    metrics_rows,
    prepared,
    read_state,
    run_train,
    train_env,
)

from cxrjax.data.pipeline import read_index
from cxrjax.findings import FINDINGS
from cxrjax.models.weights import load_weights
from cxrjax.workdir import BEST_WEIGHTS, CHECKPOINTS, DONE, METRICS_LOG, RUN_CONFIG, WANDB_RUN_ID

EPOCHS, PATIENCE = 6, 2
# A seed whose best validation epoch is not the last, so keeping the best is tested (seed 0
# stopped being one when the synthetic patients' metadata changed their random draws).
SEED = 1


@pytest.fixture(scope="module")
def monitored(prepared, train_env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("monitored") / "run"
    # Offline wandb must not need the network: every HTTP(S) request goes to a dead proxy.
    done = run_train(
        workdir,
        prepared,
        {**train_env, **NO_NETWORK},
        f"--config.epochs={EPOCHS}",
        f"--config.early_stopping_patience={PATIENCE}",
        "--config.checkpoint.keep=1",
        "--config.wandb.mode=offline",
        f"--config.seed={SEED}",
    )
    assert done.returncode == 0, done.stdout[-3000:]
    return workdir, done.stdout


def _expected_stop(aucs: list[float]) -> tuple[int, bool]:
    """Keras-style early stopping by hand: stop after PATIENCE epochs without a strictly
    better value. The epochs run, and whether patience ran out (it can on the last epoch)."""
    best, wait = -math.inf, 0
    for epoch, auc in enumerate(aucs, 1):
        if auc > best:
            best, wait = auc, 0
        else:
            wait += 1
            if wait >= PATIENCE:
                return epoch, True
    return EPOCHS, False


@pytest.mark.slow
def test_metrics_log_validation_loss_and_per_finding_auc_every_epoch(monitored):
    workdir, _ = monitored
    val = metrics_rows(workdir, "val")
    assert [row["epoch"] for row in val] == list(range(1, len(val) + 1))
    assert [row["step"] for row in val] == [STEPS_PER_EPOCH * row["epoch"] for row in val]
    for row in val:
        assert np.isfinite(row["val_loss"]) and 0 <= row["val_mean_auc"] <= 1
        aucs = [row[f"val_auc_{f}"] for f in FINDINGS]
        defined = [a for a in aucs if not math.isnan(a)]
        assert row["val_mean_auc"] == pytest.approx(np.mean(defined))
    csv = pd.read_csv(workdir / "metrics_val.csv")
    assert list(csv["step"]) == [row["step"] for row in val]
    np.testing.assert_allclose(csv["val_loss"], [row["val_loss"] for row in val], rtol=1e-12)
    for f in FINDINGS:
        np.testing.assert_allclose(csv[f"val_auc_{f}"], [row[f"val_auc_{f}"] for row in val], rtol=1e-12)

    train = metrics_rows(workdir, "train")
    assert train, "no training rows"
    # Every epoch logs its training metrics at its last step, as means over their window.
    ends = {row["step"]: row for row in train if row["step"] % STEPS_PER_EPOCH == 0}
    assert {row["step"] for row in val} <= set(ends)
    assert all(1 <= row["steps_in_window"] <= STEPS_PER_EPOCH for row in train)
    for row in train:
        assert {"loss", "grad_norm", "param_norm", "lr", "images_per_s"} <= row.keys()
        # chexnet: Adam 1e-3 times the plateau scale set by the last validation before the step.
        scale = ([1.0] + [v["lr_scale"] for v in val if v["step"] <= row["step"]])[-1]
        assert row["lr"] == pytest.approx(1e-3 * scale)
    assert (workdir / "metrics_train.csv").exists()


def test_rows_carry_the_wall_time_that_launch_cost_prices(monitored):
    """launch/run_cost.py reads these rows: whole epochs of STEPS_PER_EPOCH steps, timed
    from one validation to the next."""
    workdir, _ = monitored
    rows = [json.loads(line) for line in (workdir / METRICS_LOG).read_text().splitlines()]
    times = [row["time"] for row in rows]
    assert times == sorted(times) and times[0] > 1.7e9  # Unix seconds, in logging order
    priced = load_run_cost().cost(workdir / METRICS_LOG, workdir / RUN_CONFIG, price=1.0, instances=1)
    val = metrics_rows(workdir, "val")
    batch = json.loads((workdir / RUN_CONFIG).read_text())["global_batch_size"]
    assert priced["steps_per_epoch"] == STEPS_PER_EPOCH and priced["images_per_epoch"] == STEPS_PER_EPOCH * batch
    assert priced["epochs_timed"] == len(val) - 1
    spans = [after["time"] - before["time"] for before, after in zip(val, val[1:])]
    assert priced["wall_hours_per_epoch"] == pytest.approx(statistics.median(spans) / 3600)
    speeds = [row["images_per_s"] for row in metrics_rows(workdir, "train")]
    assert priced["images_per_s"] == pytest.approx(statistics.median(speeds))


def test_a_resumed_csv_keeps_its_own_columns(tmp_path):
    """A workdir from before the time column: new rows go under the file's own header,
    never shifted under the wrong names."""
    import ml_collections

    from cxrjax.train.monitor import MetricsLog

    (tmp_path / "metrics_train.csv").write_text("step,kind,loss\n1,train,0.5\n")
    log = MetricsLog(tmp_path, ml_collections.ConfigDict({"mode": "disabled"}), {}, "run")
    log.write(3, "train", {"loss": 0.25, "images_per_s": 9.0})
    log.close()
    table = pd.read_csv(tmp_path / "metrics_train.csv")
    assert table.to_dict("records") == [
        {"step": 1, "kind": "train", "loss": 0.5},
        {"step": 3, "kind": "train", "loss": 0.25},
    ]
    assert json.loads((tmp_path / METRICS_LOG).read_text())["images_per_s"] == 9.0  # all of it here


def test_early_stopping_follows_the_logged_auc(monitored):
    workdir, out = monitored
    aucs = [row["val_mean_auc"] for row in metrics_rows(workdir, "val")]
    epochs, stopped = _expected_stop(aucs)
    assert len(aucs) == epochs
    assert ("early stopping: no better val mean AUC" in out) == stopped


def test_best_checkpoint_by_auc_is_kept_and_exported(monitored):
    workdir, _ = monitored
    val = metrics_rows(workdir, "val")
    top = max(row["val_mean_auc"] for row in val)
    best = max(row["step"] for row in val if row["val_mean_auc"] == top)  # orbax keeps the latest of ties
    last = val[-1]["step"]
    assert best != last, "this seed no longer has a best epoch before the last; pick a config where it does"
    assert json.loads((workdir / DONE).read_text())["best_step"] == best
    assert finalized_steps(workdir) == sorted({best, last})  # keep=1 plus the best

    state = read_state(workdir, best)
    _, exported = load_weights(workdir / BEST_WEIGHTS)
    saved = flat({"params": state["params"], "batch_stats": state["batch_stats"]})
    exported = flat(exported)
    assert saved.keys() == exported.keys()
    assert all(np.array_equal(saved[k], exported[k]) for k in saved)


def test_logged_validation_metrics_match_sklearn_on_the_best_weights(monitored, prepared):
    """Recompute the best epoch's validation loss and per-finding AUC outside the trainer."""
    workdir, _ = monitored
    logits = best_weights_logits(workdir, prepared, "val")
    probs = 1 / (1 + np.exp(-logits))
    labels = read_index(prepared / "val")[list(FINDINGS)].to_numpy(np.float64)

    done = json.loads((workdir / DONE).read_text())
    row = next(r for r in metrics_rows(workdir, "val") if r["step"] == done["best_step"])
    bce = -np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs))
    assert row["val_loss"] == pytest.approx(bce, rel=1e-5)
    for j, f in enumerate(FINDINGS):
        if 0 < labels[:, j].sum() < len(labels):
            assert row[f"val_auc_{f}"] == pytest.approx(roc_auc_score(labels[:, j], probs[:, j]), abs=1e-9), f
        else:
            assert math.isnan(row[f"val_auc_{f}"]), f


def test_wandb_offline_run_is_written_in_the_workdir(monitored):
    workdir, _ = monitored
    runs = list((workdir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (workdir / WANDB_RUN_ID).read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")
    assert list(runs[0].glob(f"run-{run_id}.wandb"))


def test_divergence_stops_with_the_step_and_keeps_only_good_checkpoints(prepared, train_env, tmp_path):
    """SGD at learning rate 1e6 blows up within a few steps; a checkpoint is attempted
    after every step and must only exist for steps before the divergence."""
    workdir = tmp_path / "diverging"
    done = run_train(
        workdir,
        prepared,
        train_env,
        "--config.optim.name=sgd",
        "--config.optim.learning_rate=1e6",
        "--config.checkpoint.every_steps=1",
        "--config.log_every_steps=1",
        "--config.eval.test=False",
    )
    assert done.returncode == 1
    found = re.search(
        r"cxrjax train: error: training diverged at step (\d+): (.*)\. The last good checkpoint in "
        r"(\S+) is kept \(nothing after the divergence was saved\)\.",
        done.stdout,
    )
    assert found, done.stdout[-3000:]
    step = int(found.group(1))
    assert found.group(3) == str(workdir / CHECKPOINTS)
    kept = finalized_steps(workdir)
    assert kept and max(kept) < step
    for s in kept:
        state = read_state(workdir, s)
        assert all(np.isfinite(v).all() for v in flat({"p": state["params"], "b": state["batch_stats"]}).values())
    assert not (workdir / DONE).exists() and not (workdir / BEST_WEIGHTS).exists()


@pytest.mark.slow
def test_ensemble_members_get_their_own_seeds_and_workdirs(prepared, train_env, tmp_path):
    workdir = tmp_path / "ensemble"
    # member 1's own overrides, written as on the command line (member 0 keeps the command's)
    overrides = "--config.ensemble.overrides=;--config.optim.learning_rate=3e-4 --config.data.zoom=0.2"
    done = run_train(workdir, prepared, train_env, "--config.ensemble.members=2", "--config.epochs=1", overrides)
    assert done.returncode == 0, done.stdout[-3000:]
    members = [workdir / f"member_{i}" for i in range(2)]
    configs = [json.loads((m / RUN_CONFIG).read_text()) for m in members]
    assert [c["seed"] for c in configs] == [0, 1]
    assert [(c["optim"]["learning_rate"], c["data"]["zoom"]) for c in configs] == [(1e-3, 0.1), (3e-4, 0.2)]
    preds = [pd.read_csv(m / "test" / "predictions.csv", index_col=0) for m in members]
    assert not np.allclose(preds[0].to_numpy(), preds[1].to_numpy())
    ensemble = pd.read_csv(workdir / "ensemble_predictions.csv", index_col=0)
    expected = (preds[0] + preds[1].loc[preds[0].index]) / 2
    pd.testing.assert_frame_equal(ensemble.loc[expected.index], expected, rtol=1e-6)
    assert len(ensemble) == len(read_index(prepared / "test"))
