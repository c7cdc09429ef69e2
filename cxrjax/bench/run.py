"""Plan the cases of a benchmark run, run each in its own process, derive ratios, MFU,
scaling efficiency and the issue's targets from the measured rows, and write the report.

This module imports no framework; the workers do.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from cxrjax.bench.device import device_peak, library_versions, mfu
from cxrjax.bench.memory import GIB
from cxrjax.bench.spec import PEERS, CaseSpec, not_measured

THROUGHPUT_TARGETS = (("torch", 1.3), ("torch_compile", 1.1))  # cxrjax ÷ peer, training
TARGET_SIZES = (224, 1024)
MEMORY_TARGET = {"size": 1024, "dtype": "bfloat16", "remat": True, "bytes_per_image": 0.5 * GIB}


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    out: Path
    arch: str = "densenet121"
    sizes: tuple[int, ...] = (224,)
    dtypes: tuple[str, ...] = ("bfloat16",)
    remat: tuple[bool, ...] = (False,)
    batch: tuple[int, ...] = (32,)  # per device: one value, or one per size
    steps: int = 20
    peers: tuple[str, ...] = ()
    memory_budget_gb: float = 0.0  # GiB per device; 0: no search
    scaling: bool = False
    prepared: str = ""  # a `cxrjax prepare` output: also time the grain-fed step
    workers: int = 0

    def __post_init__(self):
        from cxrjax.models.densenet import arch_spec

        arch_spec(self.arch)
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
        if not self.sizes or min(self.sizes) < 32:
            raise ValueError(f"image sizes must be at least 32 px (five halvings), got {self.sizes}")
        if len(self.batch) not in (1, len(self.sizes)):
            raise ValueError(f"give one batch size or one per image size ({len(self.sizes)}), got {self.batch}")
        if min(self.batch) < 1 or self.steps < 1 or self.memory_budget_gb < 0 or self.workers < 0:
            raise ValueError("batch and steps must be positive; memory budget and workers not negative")
        if self.prepared and not (Path(self.prepared) / "train").is_dir():
            raise ValueError(f"--prepared {self.prepared}: no train/ folder; give a `cxrjax prepare` output")


def plan(o: BenchOptions) -> list[CaseSpec]:
    """Every case of the run, cxrjax first at each setting so its rows lead the tables."""
    specs = []
    batches = o.batch * len(o.sizes) if len(o.batch) == 1 else o.batch
    for size, batch in zip(o.sizes, batches, strict=True):
        for dtype in o.dtypes:
            for remat in o.remat:
                same = {"arch": o.arch, "size": size, "dtype": dtype, "remat": remat,
                        "batch": batch, "steps": o.steps}
                specs.append(CaseSpec("cxrjax", **same, memory_budget_bytes=int(o.memory_budget_gb * GIB),
                                      prepared=o.prepared, workers=o.workers))
                specs.extend(CaseSpec(peer, **same) for peer in o.peers)
                if o.scaling:
                    specs.append(CaseSpec("cxrjax", **same, scaling=True))
    return specs


def run_in_subprocess(spec: CaseSpec) -> dict:
    with tempfile.TemporaryDirectory(prefix="cxrjax-bench-") as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run(
            [sys.executable, "-m", "cxrjax.bench.worker", json.dumps(dataclasses.asdict(spec)), str(result)],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not result.exists():
            tail = " | ".join(proc.stderr.strip().splitlines()[-6:])
            return not_measured(spec, "failed", f"worker exited with status {proc.returncode}: {tail}")
        return json.loads(result.read_text())


def run_in_process(spec: CaseSpec) -> dict:
    """For tests: no isolation, so allocator peaks accumulate across cases."""
    from cxrjax.bench.worker import measure

    return measure(spec)


def run_bench(o: BenchOptions, command: str, run_case: Callable[[CaseSpec], dict] = run_in_subprocess,
              log: Callable[[str], None] = print) -> dict:
    """Measure every planned case and write `<arch>.json`, `.md` and plots into `o.out`."""
    from cxrjax.bench.report import write_report

    results = {"measurements": [], "max_batch": [], "scaling": []}
    for spec in plan(o):
        log(f"bench: {spec.label()} ...")
        found = run_case(spec)
        for key, rows in results.items():
            rows.extend(found[key])
        for row in found["measurements"] + found["scaling"]:
            log(f"  {summary_line(row)}")
    results = derive(results)
    results["meta"] = metadata(o, command, results["measurements"])
    write_report(results, Path(o.out), o.arch)
    return results


def summary_line(row: dict) -> str:
    head = f"{row['framework']} {row['task']} ({row.get('devices') or 1} device(s))"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row.get('reason', '')}"
    return (f"{head}: {row['images_per_s']:.1f} images/s, step {row['step_s_median'] * 1e3:.1f} ms"
            + (f", compile {row['compile_s']:.1f} s" if row.get("compile_s") is not None else ""))


def _key(row: dict, task: str | None = None) -> tuple:
    return (task or row["task"], row["arch"], row["size"], row["dtype"], row["remat"])


def derive(results: dict) -> dict:
    """MFU, cxrjax-vs-peer ratios, scaling efficiency and targets, all from the rows."""
    ok = [r for r in results["measurements"] if r["status"] == "ok"]
    cxrjax = {_key(r): r for r in ok if r["framework"] == "cxrjax" and r["task"] in ("train", "inference")}
    for row in ok:
        source = cxrjax.get(_key(row, "train" if row["task"] == "train_fed" else None))
        flops = source["model_flops_per_image"] if source else None
        row["mfu"] = mfu(flops, row["images_per_s_per_device"], row["device_kind"], row["dtype"])
    ratios = []
    for row in ok:
        mine = cxrjax.get(_key(row))
        if row["framework"] == "cxrjax" or mine is None:
            continue
        ratios.append({
            "task": row["task"], "arch": row["arch"], "size": row["size"], "dtype": row["dtype"],
            "remat": row["remat"], "peer": row["framework"],
            "cxrjax_images_per_s_per_device": mine["images_per_s_per_device"],
            "peer_images_per_s_per_device": row["images_per_s_per_device"],
            "speedup": mine["images_per_s_per_device"] / row["images_per_s_per_device"],
            # Per-image time of steps waited for one by one: robust to stalls on a shared host.
            "speedup_median_step": ((row["step_s_median"] / row["global_batch"])
                                    / (mine["step_s_median"] / mine["global_batch"])),
            "cxrjax_bytes_per_image": mine.get("bytes_per_image"),
            "peer_bytes_per_image": row.get("bytes_per_image"),
        })
    results["ratios"] = ratios
    single = {_key(r, "train"): r["images_per_s"] for r in results["scaling"]
              if r["status"] == "ok" and r["devices"] == 1}
    for row in results["scaling"]:
        base = single.get(_key(row, "train"))
        row["efficiency"] = (row["images_per_s"] / (row["devices"] * base)
                             if row["status"] == "ok" and base else None)
    results["targets"] = targets(results["measurements"], ratios)
    return results


def targets(rows: list[dict], ratios: list[dict]) -> list[dict]:
    """The issue's GPU targets, judged only from rows measured on a GPU in this run."""
    gpu = {(r["task"], r["framework"], r["size"], r["dtype"], r["remat"]): r
           for r in rows if r["status"] == "ok" and r["platform"] == "gpu"}
    by_pair = {(r["size"], r["peer"]): r for r in ratios
               if r["task"] == "train" and r["dtype"] == "bfloat16" and not r["remat"]}
    out = []
    for size in TARGET_SIZES:
        for peer, threshold in THROUGHPUT_TARGETS:
            ratio = by_pair.get((size, peer))
            measured = ratio is not None and ("train", peer, size, "bfloat16", False) in gpu
            value = ratio["speedup"] if measured else None
            out.append({"target": f"train {size}px bfloat16: cxrjax ÷ {peer} images/s >= {threshold}",
                        "value": value, "status": _judge(value, value is not None and value >= threshold)})
    m = MEMORY_TARGET
    row = gpu.get(("train", "cxrjax", m["size"], m["dtype"], m["remat"]))
    value = row["bytes_per_image"] / GIB if row and row.get("bytes_per_image") else None
    out.append({"target": f"train {m['size']}px {m['dtype']} remat: peak GiB per image <= "
                          f"{m['bytes_per_image'] / GIB}",
                "value": value, "status": _judge(value, value is not None and value * GIB <= m["bytes_per_image"])})
    return out


def _judge(value, passed: bool) -> str:
    return "not measured" if value is None else ("met" if passed else "not met")


def metadata(o: BenchOptions, command: str, rows: list[dict]) -> dict:
    ours = [r for r in rows if r["framework"] == "cxrjax" and r["status"] == "ok"]
    kind = ours[0]["device_kind"] if ours else None
    peak = device_peak(kind) if kind else None
    notes = []
    if ours and ours[0]["platform"] == "cpu":
        notes.append(f"CPU run on a {os.cpu_count()}-core host: timings are indicative only (a shared CPU "
                     "is noisy) and MFU is undefined; GPU figures come from a run on a GPU.")
    if o.scaling and ours and ours[0]["platform"] == "cpu":
        notes.append("Scaling on CPU uses simulated devices that share the same cores: it exercises the "
                     "data-parallel path, it does not measure scaling.")
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": {"device_kind": kind, "platform": ours[0]["platform"] if ours else None,
                   "devices": ours[0]["devices"] if ours else None,
                   "peak_flops": dataclasses.asdict(peak) if peak else None},
        "host": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "versions": library_versions(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(o).items()},
        "notes": notes,
    }
