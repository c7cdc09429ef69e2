"""The loop's claims as checks: batches reach the devices ahead of their step and a
checkpoint resumes at the right one (`DeviceBatches`); a step inside an epoch never
reads from the device but at log steps (a transfer guard fails the run otherwise); and
the trainer's validation and the benchmark's inference row run the one jitted inference.

In-process `train_and_test` on the suite's 8 CPU devices with the smoke recipe (4 steps
an epoch, a log step every 2).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax._src import array
from jax._src import config as jax_config
from train_helpers import SMOKE, prepared  # noqa: F401 (fixture)

from cxrjax import forward
from cxrjax.bench.jax_case import build_steps, measure_case
from cxrjax.bench.spec import CaseSpec
from cxrjax.config import load_config
from cxrjax.experiment import train_and_test
from cxrjax.mesh import DeviceBatches, make_mesh
from cxrjax.train import progress
from cxrjax.train.loop import itstime


class _Counting:
    """A host iterator with grain's get_state: its position is the count of batches taken."""

    def __init__(self, n: int):
        self.taken, self.n = 0, n

    def __next__(self):
        if self.taken == self.n:
            raise StopIteration
        self.taken += 1
        return {"image": np.full((8, 2), self.taken, np.uint8)}

    def get_state(self):
        return self.taken


def test_batches_are_sent_ahead_and_the_state_is_that_of_the_batch_yielded():
    host = _Counting(5)
    batches = DeviceBatches(host, make_mesh(), ahead=2)
    assert batches.get_state() == 0
    first = next(batches)
    assert isinstance(first["image"], jax.Array) and len(first["image"].sharding.device_set) == 8
    assert host.taken == 3  # this batch and the next two are on the devices
    assert batches.get_state() == 1  # a checkpoint now resumes at the second batch, not the fourth
    values = [int(np.asarray(first["image"])[0, 0])] + [int(np.asarray(b["image"])[0, 0]) for b in batches]
    assert values == [1, 2, 3, 4, 5] and batches.get_state() == 5


def test_itstime():
    assert [s for s in range(1, 10) if itstime(s, 4)] == [4, 8]
    assert not any(itstime(s, 0) for s in range(1, 10))  # 0: never


@pytest.fixture
def smoke_config(prepared):
    return load_config(
        SMOKE, [f"--config.data.prepared={prepared}", "--config.epochs=1", "--config.wandb.mode=disabled"]
    )


@pytest.fixture
def cpu_transfer_guard(monkeypatch):
    """jax's device-to-host guard as a GPU applies it, on the CPU: there jax lets every
    read through (the arrays are in host memory already), so the guard's check goes where
    CPU reads go, `ArrayImpl._value` (float(), int(), bool(), tolist(), device_get; not
    numpy's zero-copy buffer view)."""
    real = array.ArrayImpl._value

    def guarded(self):
        if jax_config.transfer_guard_device_to_host.value == "disallow_explicit":
            raise RuntimeError("Disallowed device-to-host transfer (the CPU stand-in for the GPU's guard)")
        return real.fget(self)

    monkeypatch.setattr(array.ArrayImpl, "_value", property(guarded))


@pytest.mark.slow
@pytest.mark.parametrize("read", ["implicit", "explicit"])
def test_a_read_from_the_device_inside_an_epoch_fails_the_run(
    smoke_config, tmp_path, monkeypatch, cpu_transfer_guard, read
):
    """Step 1 is no log step: the loop must not read its metrics, implicitly (float())
    or explicitly (device_get). Were the guard gone, this run would train to the end."""
    real = progress.EpochProgress.step_done

    def reading(self, step, metrics):
        if read == "implicit":
            float(metrics["loss"])
        else:
            jax.device_get(metrics["loss"])
        return real(self, step, metrics)

    monkeypatch.setattr(progress.EpochProgress, "step_done", reading)
    with pytest.raises(Exception, match="(?i)disallowed device-to-host transfer"):
        train_and_test(smoke_config, tmp_path / "run")


class _Spy:
    """Stands in for `forward.predict_batch`, recording what each caller passes to it."""

    def __init__(self, jitted):
        self.jitted, self.calls, self.lowered = jitted, [], []

    def __call__(self, *args):
        self.calls.append(args)
        return self.jitted(*args)

    def lower(self, *args):
        self.lowered.append(args)
        return self.jitted.lower(*args)


@pytest.mark.slow
def test_validation_and_the_benchmark_run_one_jitted_inference(smoke_config, tmp_path, monkeypatch, cpu_transfer_guard):
    """A whole run under the guard (nothing inside its epoch reads from the device), whose
    validation and test pass go through the same jitted inference the benchmark lowers."""
    spy = _Spy(forward.predict_batch)
    monkeypatch.setattr(forward, "predict_batch", spy)
    summary = train_and_test(smoke_config, tmp_path / "run")
    assert "stopped" not in summary and spy.calls  # validation and the test pass went through it
    trainer_args = spy.calls[0]

    # The benchmark's lowering for the same config and global batch is the same program.
    global_batch = smoke_config.eval.batch_size or smoke_config.global_batch_size
    labels = np.zeros((4, 14), np.float32)
    steps = build_steps(smoke_config, smoke_config.data.image_size, make_mesh(), labels)
    bench_text = steps.lower("inference", global_batch).as_text()
    assert spy.lowered, "the benchmark's inference did not go through forward.predict_batch"
    assert bench_text == forward.predict_batch.jitted.lower(*trainer_args).as_text()

    # And the inference row of `cxrjax bench` is timed (and its FLOPs counted) through it too.
    before = len(spy.lowered)
    result = measure_case(CaseSpec("cxrjax", "tiny", 32, "float32", "none", batch=1, steps=1))
    assert [r["task"] for r in result["measurements"]] == ["inference", "train"]
    timed, counted = spy.lowered[before:]
    assert timed[-1].shape == (8, 32, 32, 1) and counted[-1].shape == (8, 32, 32, 1)  # 8 devices x 1
