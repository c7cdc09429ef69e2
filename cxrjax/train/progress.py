"""What the trainer shows while it works: a line before each long compile, step bars that
count the steps the device has finished (not the ones queued ahead of it), bars for
validation and test passes, and training metrics averaged over their log window.

Steps are dispatched asynchronously, so a bar advanced at dispatch reaches its end while
the device still has most of the epoch queued. Here a step counts once its outputs are
ready (`jax.Array.is_ready`, which never waits), and the epoch's bar is completed only
after the loop has waited for its last step. Metrics are summed on the device as they
come (no host sync) and read as means at log points, which the loop places on the step
before the current one so reading them does not stall the queue.
"""

from __future__ import annotations

import collections
import logging
import math
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

logger = logging.getLogger(__name__)

_announced: set[str] = set()


def before_compile(what: str, detail: str = "") -> None:
    """Log once per process, before the first call of a jitted function compiles it."""
    if what in _announced:
        return
    _announced.add(what)
    if jax.process_index() == 0:
        logger.info(
            f"compiling the {what}{f' ({detail})' if detail else ''}: the first call waits for XLA "
            "(seconds on a CPU at small sizes, minutes on a GPU at 1024 px)"
        )


def _bar(total: int, initial: int, desc: str, unit: str) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=jax.process_index() != 0 or None)


# Counts that must not be diluted by the window's other steps: their largest value.
WORST_OF_WINDOW = ("nonfinite_state",)


class MetricWindow:
    """Training metrics of the steps since the last read, summed on the device."""

    def __init__(self):
        self.total, self.steps = None, 0

    def add(self, metrics: dict) -> None:
        if self.total is None:
            self.total = dict(metrics)
        else:
            self.total = {
                k: (jnp.maximum if k in WORST_OF_WINDOW else jnp.add)(self.total[k], v) for k, v in metrics.items()
            }
        self.steps += 1

    def take(self) -> dict | None:
        """Host means over the window (None when empty; the worst for WORST_OF_WINDOW),
        with `steps_in_window`; resets it."""
        if not self.steps:
            return None
        host = jax.device_get(self.total)
        values = {k: float(v) / (1 if k in WORST_OF_WINDOW else self.steps) for k, v in host.items()}
        values["steps_in_window"] = self.steps
        self.total, self.steps = None, 0
        return values


class EpochProgress:
    """One epoch's step bar and log windows.

    `step_done(step, metrics)` after each dispatched step returns the window's means at
    log points (every `log_every` steps, read one step late), else None; `end(metrics)`
    after the loop has waited for the epoch's last step returns the rest of the window,
    so every epoch logs its training metrics at least once.
    """

    def __init__(self, epoch: int, epochs: int, steps_per_epoch: int, step: int, log_every: int, global_batch: int):
        self.end_step = (step // steps_per_epoch + 1) * steps_per_epoch
        self.finished = step % steps_per_epoch  # steps of this epoch the device has done
        self.desc = f"epoch {epoch + 1}/{epochs}"
        self.bar = _bar(steps_per_epoch, self.finished, self.desc, "step")
        self.log_every, self.global_batch = log_every, global_batch
        self.window, self.pending = MetricWindow(), collections.deque()
        self.previous, self.tick = None, time.perf_counter()

    @staticmethod
    def ready(array) -> bool:
        return array.is_ready()  # never waits

    def _count_finished(self) -> None:
        while self.pending and self.ready(self.pending[0]):
            self.pending.popleft()
            self.finished += 1
            self.bar.update(1)

    def _read(self) -> dict:
        values = self.window.take()
        now = time.perf_counter()
        values["images_per_s"] = values["steps_in_window"] * self.global_batch / (now - self.tick)
        self.tick = now
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
        return values

    def step_done(self, step: int, metrics: dict) -> dict | None:
        self.pending.append(metrics["loss"])
        self._count_finished()
        if self.previous is not None:
            self.window.add(self.previous)
        self.previous = metrics
        if step % self.log_every == 0 and step != self.end_step and self.window.steps:
            return self._read()
        return None

    def end(self, metrics: dict) -> dict | None:
        """The epoch's last step is finished (the loop waited for it): the rest of the
        window, and the bar at its end."""
        self.window.add(metrics)
        self.previous = None
        values = self._read()
        self.finished += len(self.pending)
        self.bar.update(len(self.pending))
        self.pending.clear()
        self.bar.close()
        return values

    def close(self) -> None:
        """Stopped mid-epoch: the bar as far as the device got."""
        self._count_finished()
        self.bar.close()


class PassBar:
    """A bar over the batches of a validation or test pass (`after_batch` runs once each
    batch's outputs are on the host)."""

    def __init__(self, records: int, batch_per_process: int, desc: str):
        per_process = math.ceil(records / jax.process_count())
        self.bar = _bar(math.ceil(per_process / batch_per_process), 0, desc, "batch")

    def update(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
