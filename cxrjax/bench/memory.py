"""Device memory of a compiled step, and the largest batch that fits a memory budget.

The budget search compiles the step at candidate batch sizes and reads XLA's buffer
assignment (`compiled.memory_analysis()`); nothing is allocated or run, so a 24 GiB
budget (an A10G) can be searched on any device that compiles for the same backend.
"""

from __future__ import annotations

from collections.abc import Callable

GIB = 2**30
MIB = 2**20
PEAK_SOURCE = "device.memory_stats()['peak_bytes_in_use']"


def compiled_memory(compiled) -> dict | None:
    """Bytes XLA assigned to one compiled executable. `total_bytes` is what must be
    resident while it runs: arguments + outputs - donated (aliased) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without buffer-assignment statistics
        return None
    parts = {
        "argument_bytes": int(stats.argument_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
        "alias_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
    }
    parts["total_bytes"] = parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"] + parts["temp_bytes"]
    return parts


def device_peak_bytes(devices) -> int | None:
    """Largest allocator peak over `devices` since the process started (GPU/TPU), or None
    where the backend keeps no statistics (CPU)."""
    peaks = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "peak_bytes_in_use" not in stats:
            return None
        peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks)


def largest_batch(bytes_for: Callable[[int], int], budget_bytes: int, limit: int = 4096, first: int = 1) -> dict:
    """The largest batch b <= limit with bytes_for(b) <= budget, for bytes_for
    non-decreasing in b. Returns the batch (0 if even 1 does not fit) and every probe.

    Memory is close to affine in the batch, so the first guess extrapolates from `first`
    and 2 * `first` (1 and 2 when `first` does not fit); a bracket around the guess is
    then bisected. Each probe is a compile, so the search usually costs four or five of
    them rather than log2(limit) * 2.
    """
    probes: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in probes:
            probes[b] = int(bytes_for(b))
        return probes[b] <= budget_bytes

    def result(batch: int) -> dict:
        return {
            "batch": batch,
            "budget_bytes": int(budget_bytes),
            "limit": limit,
            "bytes_at_batch": probes.get(batch),
            "bytes_at_next": probes.get(batch + 1),
            "probes": dict(sorted(probes.items())),
        }

    a = min(max(first, 1), limit)
    if not fits(a):
        if a == 1:
            return result(0)
        a, limit_here = 1, a - 1  # start again from 1 and 2, below the batch that did not fit
        if not fits(1):
            return result(0)
    else:
        limit_here = limit
    b = min(2 * a, limit_here)
    if b == a:
        return result(a)
    if not fits(b):
        lo, hi = a, b
    else:
        per_image = (probes[b] - probes[a]) / (b - a)
        guess = limit_here if per_image <= 0 else a + int((budget_bytes - probes[a]) // per_image)
        guess = min(max(guess, b), limit_here)
        if fits(guess):  # lo fits; step up until something does not
            lo, step = guess, 1
            while lo < limit_here and fits(min(lo + step, limit_here)):
                lo, step = min(lo + step, limit_here), step * 2
            if lo == limit_here:
                return result(lo)
            hi = min(lo + step, limit_here)
        else:  # hi does not fit; step down until something does (b does)
            hi, step = guess, 1
            while not fits(max(hi - step, b)):
                hi, step = max(hi - step, b), step * 2
            lo = max(hi - step, b)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return result(lo)


def planned_batch(bytes_for: Callable[[int], int], budget_bytes: int, first: int) -> dict:
    """The largest batch that fits `budget_bytes`, in at most three calls of `bytes_for`
    (each a compile that can take minutes at 1024 px). Compiled memory is affine in the
    batch (fixed: parameters, optimizer state; per image: activations and their buffers),
    so `first` and 2 * `first` give the line, and its prediction is compiled to confirm.
    If the prediction does not fit, the line through it and the larger earlier probe gives
    the answer, which is then an extrapolation (`confirmed` False) unless it was probed.
    """
    first = max(first, 1)
    probes: dict[int, int] = {}

    def probe(b: int) -> int:
        if b not in probes:
            probes[b] = int(bytes_for(b))
        return probes[b]

    def line(a: int, b: int) -> tuple[float, float]:
        slope = (probe(b) - probe(a)) / (b - a)
        return slope, probe(a) - slope * a

    def predict(slope: float, fixed: float) -> int:
        return 0 if slope <= 0 else max(int((budget_bytes - fixed) // slope), 0)

    a, b = first, 2 * first
    slope, fixed = line(a, b)
    guess = predict(slope, fixed)
    confirmed = False
    if guess > 0 and guess not in probes and slope > 0:
        if probe(guess) <= budget_bytes:
            confirmed = True
        else:
            fitting = max((p for p in probes if probes[p] <= budget_bytes), default=None)
            if fitting is None:
                slope, fixed = line(b, guess)
            else:
                slope, fixed = line(fitting, guess)
            guess = min(predict(slope, fixed), guess - 1)
    if guess in probes:
        confirmed = probes[guess] <= budget_bytes
        if not confirmed:  # a probed batch over the budget: the largest probed one under it
            guess = max((p for p in probes if probes[p] <= budget_bytes), default=0)
            confirmed = guess > 0
    # XLA's scheduler packs a larger batch tighter than the line from the two small probes
    # says (seen: DenseNet121 at 1024 px on an A10G target, 8 -> 16 -> 86 images), so a
    # confirmed answer can leave room; the line through the two largest probes says how much.
    # Not compiled, so reported beside the answer, never as it.
    top = sorted(probes)[-2:]
    refined = predict(*line(*top)) if len(top) == 2 and probes[top[1]] > probes[top[0]] else None
    return {
        "batch": guess,
        "confirmed": confirmed,
        "refined_batch": refined,
        "budget_bytes": int(budget_bytes),
        "bytes_at_batch": probes.get(guess),
        "predicted_bytes_at_batch": int(fixed + slope * guess),
        "predicted_bytes_at_next": int(fixed + slope * (guess + 1)),
        "bytes_per_image_slope": slope,
        "fixed_bytes": fixed,
        "compiles": len(probes),
        "probes": dict(sorted(probes.items())),
    }
