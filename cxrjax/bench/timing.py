"""One timing protocol for every framework, so their numbers compare.

`step()` launches one training or inference step and returns something to wait on;
`wait(x)` blocks until the device has finished it (block_until_ready,
torch.cuda.synchronize, or nothing where the step already returned a host value).

1. WARMUP_STEPS launched and waited for one by one; the first holds lazy compilation
   (torch.compile, Keras) and autotuning, reported as the first call's overhead.
2. `steps` launched and waited for one by one: the median is the step time.
3. `steps` launched back to back with one wait at the end, as a training loop runs
   them: throughput (images/s) comes from this, host launch overlapping device work.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

from cxrjax.bench.spec import WARMUP_STEPS


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup_s: tuple[float, ...]
    steps_s: tuple[float, ...]
    pipelined_s: float  # wall time of len(steps_s) steps launched back to back

    @property
    def median_s(self) -> float:
        return statistics.median(self.steps_s)

    def fields(self, global_batch: int, devices: int) -> dict:
        images_per_s = len(self.steps_s) * global_batch / self.pipelined_s
        return {
            "steps": len(self.steps_s),
            "step_s_median": self.median_s,
            "step_s_min": min(self.steps_s),
            "step_s_max": max(self.steps_s),
            "first_step_s": self.warmup_s[0],
            "first_call_overhead_s": max(self.warmup_s[0] - self.median_s, 0.0),
            "images_per_s": images_per_s,
            "images_per_s_per_device": images_per_s / devices,
        }


def time_steps(
    step: Callable[[], object], wait: Callable[[object], object], steps: int, warmup: int = WARMUP_STEPS
) -> Timing:
    def timed_one() -> float:
        start = time.perf_counter()
        wait(step())
        return time.perf_counter() - start

    warm = tuple(timed_one() for _ in range(warmup))
    each = tuple(timed_one() for _ in range(steps))
    start = time.perf_counter()
    last = None
    for _ in range(steps):
        last = step()
    wait(last)
    return Timing(warm, each, time.perf_counter() - start)
