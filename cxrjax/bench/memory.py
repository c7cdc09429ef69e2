"""Device memory of a compiled step, and the largest batch that fits a memory budget.

The budget search compiles the step at candidate batch sizes and reads XLA's buffer
assignment (`compiled.memory_analysis()`); nothing is allocated or run, so a 24 GiB
budget (an A10G) can be searched on any device that compiles for the same backend.
"""

from __future__ import annotations

from collections.abc import Callable

GIB = 2**30
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
    parts["total_bytes"] = (
        parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"] + parts["temp_bytes"]
    )
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


def largest_batch(bytes_for: Callable[[int], int], budget_bytes: int, limit: int = 4096) -> dict:
    """The largest batch b <= limit with bytes_for(b) <= budget, for bytes_for
    non-decreasing in b. Returns the batch (0 if even 1 does not fit) and every probe.

    Memory is close to affine in the batch, so the first guess extrapolates from b=1
    and b=2; a bracket around the guess is then bisected. Each probe is a compile, so
    the search usually costs four or five of them rather than log2(limit) * 2.
    """
    probes: dict[int, int] = {}

    def fits(b: int) -> bool:
        if b not in probes:
            probes[b] = int(bytes_for(b))
        return probes[b] <= budget_bytes

    def result(batch: int) -> dict:
        return {"batch": batch, "budget_bytes": int(budget_bytes), "limit": limit,
                "bytes_at_batch": probes.get(batch), "bytes_at_next": probes.get(batch + 1),
                "probes": dict(sorted(probes.items()))}

    if not fits(1):
        return result(0)
    if limit == 1 or not fits(2):
        return result(1)
    per_image = probes[2] - probes[1]
    guess = limit if per_image <= 0 else 1 + (budget_bytes - probes[1]) // per_image
    guess = min(max(guess, 2), limit)
    if fits(guess):  # lo fits; step up until something does not
        lo, step = guess, 1
        while lo < limit and fits(min(lo + step, limit)):
            lo, step = min(lo + step, limit), step * 2
        if lo == limit:
            return result(limit)
        hi = min(lo + step, limit)
    else:  # hi does not fit; step down until something does (2 does)
        hi, step = guess, 1
        while not fits(max(hi - step, 2)):
            hi, step = max(hi - step, 2), step * 2
        lo = max(hi - step, 2)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return result(lo)
