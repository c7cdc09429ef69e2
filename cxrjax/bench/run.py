"""Plan the cases of a benchmark run, run each in its own process before a deadline,
derive ratios, MFU, scaling efficiency and the targets from the measured rows, and write
the report.

Every finished case is appended to `<name>.jsonl` at once, so a run cut off by its
deadline (or killed) still leaves what it measured; cases the deadline leaves no time
for are recorded as "skipped: time".

This module imports no framework; the workers do.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cxrjax.bench.device import device_peak, library_versions, mfu
from cxrjax.bench.memory import GIB, MIB
from cxrjax.bench.spec import PEERS, RESULT_KEYS, CaseSpec, empty_result, not_measured

log = logging.getLogger(__name__)

# The targets. Throughput: cxrjax ÷ peer, training, bfloat16, at each size with
# the remat each size is run with (torch's memory_efficient stands for any remat).
THROUGHPUT_TARGETS = (("torch", 1.3), ("torch_compile", 1.1))
TARGET_SETTINGS = ((224, "none"), (1024, "all"))
FULL = {"size": 1024, "dtype": "bfloat16", "remat": "all"}  # the full-resolution setting
MFU_TARGET = 0.25
PEAK_BYTES_PER_IMAGE_TARGET = 0.25 * GIB
MAX_BATCH_RATIO_TARGET = 2.0  # cxrjax's largest batch ÷ torch's, same budget
FED_FRACTION_TARGET = 0.95  # grain-fed ÷ synthetic-data images/s
SAVED_ACTIVATIONS_TARGET = 100 * MIB  # per image; counted from shapes, so judged on any platform
# What a compiled target's budget leaves out of the card: the CUDA context (about 0.5 GiB
# outside JAX's pool), the cuDNN workspaces that autotuning adds on a real card (compile-only
# convolutions carry none) and allocator fragmentation. A stated guess, checked by the quick
# GPU run's plan check (compiled total beside the real peak); override with --allowance-gb.
DEFAULT_ALLOWANCE_GB = 1.5


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    out: Path
    arch: str = "densenet121"
    sizes: tuple[int, ...] = (224,)
    dtypes: tuple[str, ...] = ("bfloat16",)
    remat: tuple[str, ...] = ("none",)
    batch: tuple[int, ...] = (32,)  # per device: one value, or one per size
    steps: int = 20
    peers: tuple[str, ...] = ()
    memory_budget_gb: float = 0.0  # GiB per device; 0: no search
    scaling: bool = False
    prepared: str = ""  # a `cxrjax prepare` output: also time the grain-fed step
    workers: int = 0
    deadline_s: float = 0.0  # 0: none
    targets: tuple[str, ...] = ()  # GPU targets to compile for instead of measuring here
    target_devices: int = 1  # devices of each target on one host
    allowance_gb: float = DEFAULT_ALLOWANCE_GB  # card memory left out of a target's budget

    def __post_init__(self):
        from cxrjax.bench.gpu_target import get_target
        from cxrjax.models.densenet import arch_spec, remat_mode

        for target in self.targets:
            get_target(target)
        if self.targets and (self.peers or self.scaling or self.prepared):
            raise ValueError(
                "--target compiles cxrjax's step for a GPU that is not here: no peers, --scaling or --prepared"
            )
        if self.target_devices < 1 or self.allowance_gb < 0:
            raise ValueError("--target-devices must be at least 1 and --allowance-gb not negative")

        arch_spec(self.arch)
        for remat in self.remat:
            remat_mode(remat)
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
        if not self.sizes or min(self.sizes) < 32:
            raise ValueError(f"image sizes must be at least 32 px (five halvings), got {self.sizes}")
        if len(self.batch) not in (1, len(self.sizes)):
            raise ValueError(f"give one batch size or one per image size ({len(self.sizes)}), got {self.batch}")
        if min(self.batch) < 1 or self.steps < 1 or self.memory_budget_gb < 0 or self.workers < 0:
            raise ValueError("batch and steps must be positive; memory budget and workers not negative")
        if self.deadline_s < 0:
            raise ValueError(f"the deadline must be positive seconds (or 0 for none), got {self.deadline_s}")
        if self.prepared and not (Path(self.prepared) / "train").is_dir():
            raise ValueError(f"--prepared {self.prepared}: no train/ folder; give a `cxrjax prepare` output")


def plan(o: BenchOptions) -> list[CaseSpec]:
    """Every case of the run, cxrjax first at each setting so its rows lead the tables."""
    specs = []
    budget = int(o.memory_budget_gb * GIB)
    batches = o.batch * len(o.sizes) if len(o.batch) == 1 else o.batch
    for size, batch in zip(o.sizes, batches, strict=True):
        for dtype in o.dtypes:
            for remat in o.remat:
                same = {"arch": o.arch, "size": size, "dtype": dtype, "remat": remat, "batch": batch, "steps": o.steps}
                if o.targets:
                    specs.extend(
                        CaseSpec(
                            "cxrjax",
                            **same,
                            task="compiled",
                            target=target,
                            target_devices=o.target_devices,
                            allowance_bytes=int(o.allowance_gb * GIB),
                            memory_budget_bytes=budget,
                        )
                        for target in o.targets
                    )
                    continue
                specs.append(CaseSpec("cxrjax", **same, prepared=o.prepared, workers=o.workers))
                specs.extend(CaseSpec(peer, **same) for peer in o.peers)
                if budget:
                    specs.append(CaseSpec("cxrjax", **same, task="max_batch", memory_budget_bytes=budget))
                    if "torch" in o.peers:
                        specs.append(CaseSpec("torch", **same, task="max_batch", memory_budget_bytes=budget))
                if o.scaling:
                    specs.append(CaseSpec("cxrjax", **same, task="scaling"))
    return specs


# A peer whose libraries are not installed is skipped before its worker starts: the worker
# would spend seconds importing jax and torch only to find torchvision missing. (A library
# that is installed but broken is still found, and named, by the worker's own import.)
PEER_LIBRARIES = {"torch": ("torch", "torchvision"), "torch_compile": ("torch", "torchvision")}


def missing_peer_library(spec: CaseSpec) -> str | None:
    """Why `spec`'s peer cannot run here, or None."""
    needed = PEER_LIBRARIES.get(spec.framework, ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        return f"{'/'.join(needed)} not usable: {', '.join(missing)} not installed"
    return None


def run_in_subprocess(spec: CaseSpec, timeout_s: float | None = None) -> dict:
    """The case in a fresh worker process (and its own process group, so that a cut-off
    case takes torch.compile's or grain's helper processes with it)."""
    if (missing := missing_peer_library(spec)) is not None:
        return not_measured(spec, "skipped", missing)
    with tempfile.TemporaryDirectory(prefix="cxrjax-bench-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "cxrjax.bench.worker", json.dumps(dataclasses.asdict(spec)), str(result)]
        started = time.monotonic()
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as proc:
            try:
                _, stderr = proc.communicate(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                return not_measured(
                    spec, "skipped", f"time: cut off at the deadline after {time.monotonic() - started:.0f} s"
                )
        if proc.returncode != 0 or not result.exists():
            tail = " | ".join(stderr.strip().splitlines()[-6:])
            return not_measured(spec, "failed", f"worker exited with status {proc.returncode}: {tail}")
        return json.loads(result.read_text())


def run_bench(
    o: BenchOptions,
    command: str,
    run_case: Callable[..., dict] = run_in_subprocess,
    progress: Callable[[str], None] = log.info,
) -> dict:
    """Measure every planned case and write `<arch>.json`, `.jsonl`, `.md` and plots into `o.out`."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(o).items()}
    return run_cases(plan(o), Path(o.out), o.arch, command, options, o.deadline_s, run_case, progress)


def run_cases(
    specs: list[CaseSpec],
    out: Path,
    name: str,
    command: str,
    options: dict,
    deadline_s: float = 0.0,
    run_case: Callable[..., dict] = run_in_subprocess,
    progress: Callable[[str], None] = log.info,
) -> dict:
    """Run `specs` in order until `deadline_s` seconds have passed (0: no deadline)."""
    from cxrjax.bench.report import write_report

    out.mkdir(parents=True, exist_ok=True)
    journal = out / f"{name}.jsonl"
    journal.write_text("")
    end = time.monotonic() + deadline_s if deadline_s else None
    results = empty_result()
    for spec in specs:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            found = not_measured(spec, "skipped", "time: the run's deadline had passed")
        else:
            progress(f"bench: {spec.label()} ...")
            found = run_case(spec, left)
        for key, rows in results.items():
            rows.extend(found[key])
        with journal.open("a") as f:  # at once: a run cut off later keeps this case
            f.write(json.dumps({"case": spec.label(), "spec": dataclasses.asdict(spec), **found}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for key in RESULT_KEYS:
            for row in found[key]:
                progress(f"  {summary_line(row)}")
    results = derive(results)
    results["meta"] = metadata(name, options, command, results["measurements"])
    write_report(results, out, name)
    return results


def summary_line(row: dict) -> str:
    head = f"{row['framework']} {row['task']} ({row.get('devices') or 1} device(s))"
    if row["status"] != "ok":
        return f"{head}: {row['status']}: {row.get('reason', '')}"
    if row["task"] == "max_batch":
        return f"{head}: largest batch {row['batch']} under {row['budget_bytes'] / GIB:g} GiB"
    if row["task"] == "compiled":
        return compiled_line(row)
    return f"{head}: {row['images_per_s']:.1f} images/s, step {row['step_s_median'] * 1e3:.1f} ms" + (
        f", compile {row['compile_s']:.1f} s" if row.get("compile_s") is not None else ""
    )


def compiled_line(row: dict) -> str:
    """One line a person reads: the compiled plan of one case for one target."""
    from cxrjax.bench.report import format_bytes

    plan = row["largest_batch"]
    state = "compiled, fits" if plan["confirmed"] else "extrapolated"
    return (
        f"compiled for {row['devices']} x {row['device_kind']} ({row['size']} px {row['dtype']} remat {row['remat']}): "
        f"{row['bytes_per_image'] / MIB:.1f} MiB/image at batch {row['batch_per_device']}/device "
        f"({format_bytes(row['compiled_memory']['total_bytes'])}); largest batch {plan['batch']}/device under "
        f"{format_bytes(plan['budget_bytes'])} ({state}, {plan['compiles']} compiles"
        + (
            f"; the line through the last two probes says {plan['refined_batch']}, not compiled"
            if plan.get("refined_batch") and plan["refined_batch"] != plan["batch"]
            else ""
        )
        + "; "
        f"XLA_PYTHON_CLIENT_MEM_FRACTION={row['xla_mem_fraction']:.2f} gives JAX that budget)"
    )


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
        ratios.append(
            {
                "task": row["task"],
                "arch": row["arch"],
                "size": row["size"],
                "dtype": row["dtype"],
                "remat": row["remat"],
                "peer": row["framework"],
                "cxrjax_images_per_s_per_device": mine["images_per_s_per_device"],
                "peer_images_per_s_per_device": row["images_per_s_per_device"],
                "speedup": mine["images_per_s_per_device"] / row["images_per_s_per_device"],
                # Per-image time of steps waited for one by one: robust to stalls on a shared host.
                "speedup_median_step": (
                    (row["step_s_median"] / row["global_batch"]) / (mine["step_s_median"] / mine["global_batch"])
                ),
                "cxrjax_bytes_per_image": mine.get("bytes_per_image"),
                "peer_bytes_per_image": row.get("bytes_per_image"),
            }
        )
    results["ratios"] = ratios
    single = {
        _key(r, "train"): r["images_per_s"] for r in results["scaling"] if r["status"] == "ok" and r["devices"] == 1
    }
    for row in results["scaling"]:
        base = single.get(_key(row, "train"))
        row["efficiency"] = row["images_per_s"] / (row["devices"] * base) if row["status"] == "ok" and base else None
    results["plan_check"] = plan_check(results["compiled"], ok)
    measured = results["measurements"] or results["max_batch"] or results["scaling"]
    results["targets"] = targets(results["measurements"], ratios, results["max_batch"]) if measured else []
    return results


def plan_check(compiled: list[dict], measured: list[dict]) -> list[dict]:
    """A compile-only plan beside the same step measured on a real GPU: compiled total per
    image against the allocator's peak per image, same setting and batch per device."""
    real = {
        (r["size"], r["dtype"], r["remat"], r["batch_per_device"], r["device_kind"]): r
        for r in measured
        if r["task"] == "train" and r["framework"] == "cxrjax" and r.get("peak_bytes") and r["platform"] == "gpu"
    }
    checks = []
    for c in compiled:
        if c["status"] != "ok":
            continue
        r = real.get((c["size"], c["dtype"], c["remat"], c["batch_per_device"], c["device_kind"]))
        if r is None:
            continue
        checks.append(
            {
                "size": c["size"],
                "dtype": c["dtype"],
                "remat": c["remat"],
                "batch_per_device": c["batch_per_device"],
                "target": c["target"],
                "target_name": c["device_kind"],
                "compiled_bytes_per_image": c["bytes_per_image"],
                "measured_bytes_per_image": r["bytes_per_image"],
                "measured_over_compiled": r["bytes_per_image"] / c["bytes_per_image"],
                "measured_compiled_total_bytes": (r.get("compiled_memory") or {}).get("total_bytes"),
            }
        )
    return checks


def _target(what: str, value: float | None, op: str, limit: float, shown: str | None = None) -> dict:
    """The target "`what` `op` `limit`" (op ">=" or "<="), met or not by `value`; None: not measured."""
    met = value is not None and (value >= limit if op == ">=" else value <= limit)
    status = "not measured" if value is None else ("met" if met else "not met")
    return {"target": f"{what} {op} {shown or limit}", "value": value, "status": status}


def targets(rows: list[dict], ratios: list[dict], max_batch: list[dict]) -> list[dict]:
    """The issue's targets: GPU targets judged only from rows measured on a GPU in this run."""
    gpu = {
        (r["task"], r["framework"], r["size"], r["dtype"], r["remat"]): r
        for r in rows
        if r["status"] == "ok" and r["platform"] == "gpu"
    }
    full = (FULL["size"], FULL["dtype"], FULL["remat"])
    setting = f"{FULL['size']}px {FULL['dtype']} remat {FULL['remat']}"
    out = []
    by_pair = {
        (r["size"], r["remat"], r["peer"]): r for r in ratios if r["task"] == "train" and r["dtype"] == "bfloat16"
    }
    for size, remat in TARGET_SETTINGS:
        for peer, threshold in THROUGHPUT_TARGETS:
            ratio = by_pair.get((size, remat, peer))
            measured = ratio is not None and ("train", peer, size, "bfloat16", remat) in gpu
            value = ratio["speedup"] if measured else None
            out.append(
                _target(f"train {size}px bfloat16 remat {remat}: cxrjax ÷ {peer} images/s", value, ">=", threshold)
            )
    train = gpu.get(("train", "cxrjax", *full))
    mfu = train.get("mfu") if train else None
    peak = train["bytes_per_image"] / GIB if train and train.get("bytes_per_image") else None
    largest = {
        r["framework"]: r["batch"]
        for r in max_batch
        if r["status"] == "ok" and r["platform"] == "gpu" and (r["size"], r["dtype"], r["remat"]) == full
    }
    batch_ratio = largest["cxrjax"] / largest["torch"] if largest.get("torch") and "cxrjax" in largest else None
    fed = gpu.get(("train_fed", "cxrjax", *full))
    fed_fraction = fed.get("fed_fraction") if fed else None
    saved = next(
        (
            r
            for r in rows
            if r["status"] == "ok"
            and r["task"] == "train"
            and r["framework"] == "cxrjax"
            and (r["size"], r["dtype"], r["remat"]) == full
            and r.get("saved_activation_bytes_per_image")
        ),
        None,
    )
    saved_mib = saved["saved_activation_bytes_per_image"] / MIB if saved else None
    saved_limit = SAVED_ACTIVATIONS_TARGET / MIB
    return out + [
        _target(f"train {setting}: MFU", mfu, ">=", MFU_TARGET, f"{MFU_TARGET:.0%}"),
        _target(f"train {setting}: peak GiB per image", peak, "<=", PEAK_BYTES_PER_IMAGE_TARGET / GIB),
        _target(
            f"{setting}: largest batch under the budget, cxrjax ÷ torch", batch_ratio, ">=", MAX_BATCH_RATIO_TARGET
        ),
        _target(f"train {setting}: grain-fed ÷ synthetic images/s", fed_fraction, ">=", FED_FRACTION_TARGET),
        _target(
            f"train {setting}: saved activations MiB per image",
            saved_mib,
            "<=",
            saved_limit,
            f"{saved_limit:g} (any platform)",
        ),
    ]


def metadata(name: str, options: dict, command: str, rows: list[dict]) -> dict:
    ours = [r for r in rows if r["framework"] == "cxrjax" and r["status"] == "ok"]
    kind = ours[0]["device_kind"] if ours else None
    peak = device_peak(kind) if kind else None
    notes = []
    if ours and ours[0]["platform"] == "cpu":
        notes.append(
            f"CPU run on a {os.cpu_count()}-core host: timings are indicative only (a shared CPU "
            "is noisy) and MFU is undefined; GPU figures come from a run on a GPU."
        )
    if options.get("scaling") and ours and ours[0]["platform"] == "cpu":
        notes.append(
            "Scaling on CPU uses simulated devices that share the same cores: it exercises the "
            "data-parallel path, it does not measure scaling."
        )
    return {
        "name": name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "device": {
            "device_kind": kind,
            "platform": ours[0]["platform"] if ours else None,
            "devices": ours[0]["devices"] if ours else None,
            "peak_flops": dataclasses.asdict(peak) if peak else None,
        },
        "host": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "versions": library_versions(),
        "options": options,
        "notes": notes,
    }
