"""The short benchmark: the cases the project's targets are judged on, in one run that
fits a few minutes of a bare, air-gapped GPU machine (benchmarks/gpu_quick.sh).

    python -m cxrjax.bench.quick --out benchmarks/results/h200 --deadline-s 420
    python -m cxrjax.bench.quick --out /tmp/quick --smoke      # tiny net, 32/64 px, CPU

DenseNet121 training steps only (forward, backward, optimizer; no inference), bfloat16:
the full-resolution setting (1024 px, remat "all") first, fed by the grain pipeline from a
synthetic prepare made on the spot; torch eager and torch.compile beside it
(memory-efficient torchvision); then 224 px at a large batch against both peers; then the
largest batch under a 24 GiB budget for cxrjax (compiled, not run) and torch (a capped
trial); last 1024 px with per-layer remat. Cases run in that order, most important first,
so a run cut off by its deadline keeps what matters; `quick.jsonl` holds each finished
case at once. The last lines printed are the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

from cxrjax.bench.args import add_arguments, command_line
from cxrjax.bench.gpu_target import ensure_plugin_registered
from cxrjax.bench.memory import GIB
from cxrjax.bench.spec import CaseSpec
from cxrjax.logs import show_library_logs

NAME = "quick"


@dataclasses.dataclass(frozen=True)
class QuickSettings:
    arch: str
    small: int  # image side of the large-batch case (224 px)
    full: int  # image side of the full-resolution cases (1024 px)
    small_batch: int
    full_batch: int
    steps: int
    budget_gb: float
    synthetic_patients: int  # for the grain-fed case's prepare
    target: str  # the compiled plan beside the measurements: "auto" is the GPU present
    target_budget_gb: float  # 0: the target card's memory less the allowance


GPU = QuickSettings("densenet121", 224, 1024, 128, 16, 10, 24.0, 30, "auto", 0.0)
# The smoke budget (3 MiB) fits the tiny net's batch 2 at 64 px but not batch 4, so the
# search ends after three compiles instead of reaching for batch 50. The smoke compiles its
# plan for an A10G (compile-only, on the CPU host).
SMOKE = QuickSettings("tiny", 32, 64, 4, 2, 2, 3 / 1024, 12, "a10g", 3 / 1024)


def quick_plan(s: QuickSettings, prepared: str = "", workers: int = 0) -> list[CaseSpec]:
    """The cases, most important first (see the module docstring)."""
    full = {
        "arch": s.arch,
        "size": s.full,
        "dtype": "bfloat16",
        "remat": "all",
        "batch": s.full_batch,
        "steps": s.steps,
        "inference": False,
    }
    small = {**full, "size": s.small, "remat": "none", "batch": s.small_batch}
    budget = int(s.budget_gb * GIB)
    from cxrjax.bench.run import DEFAULT_ALLOWANCE_GB

    plan_for_target = {
        "task": "compiled",
        "target": s.target,
        "allowance_bytes": int(DEFAULT_ALLOWANCE_GB * GIB),
        "memory_budget_bytes": int(s.target_budget_gb * GIB),
    }
    return [
        CaseSpec("cxrjax", **full, prepared=prepared, workers=workers),
        CaseSpec("torch", **full),
        CaseSpec("torch_compile", **full),
        CaseSpec("cxrjax", **small),
        CaseSpec("torch", **small),
        CaseSpec("torch_compile", **small),
        CaseSpec("cxrjax", **full, task="max_batch", memory_budget_bytes=budget),
        CaseSpec("torch", **full, task="max_batch", memory_budget_bytes=budget),
        CaseSpec("cxrjax", **full, **plan_for_target),  # the compile-only plan of this GPU, checked by case 1
        CaseSpec("cxrjax", **{**full, "remat": "dense_layers"}),
    ]


def synthetic_prepare(out: Path, s: QuickSettings, workers: int) -> str:
    """A small synthetic dataset prepared at the full size, for the grain-fed case."""
    from cxrjax.data.options import PrepareOptions
    from cxrjax.data.prepare import prepare
    from cxrjax.data.synth import write_synthetic_nih

    write_synthetic_nih(out / "nih", num_patients=s.synthetic_patients, image_size=s.full, seed=0)
    options = PrepareOptions(
        image_size=s.full, split="random", fractions=(0.8, 0.1, 0.1), source_size=0, workers=workers
    )
    prepare(out / "nih", out / "prepared", options)
    return str(out / "prepared")


def target_lines(results: dict) -> list[str]:
    lines = [
        f"plan: {c['size']}px {c['dtype']} remat {c['remat']} batch {c['batch_per_device']}: compiled for "
        f"{c['target_name']} {c['compiled_bytes_per_image'] / 2**20:.1f} MiB/image, measured peak "
        f"{c['measured_bytes_per_image'] / 2**20:.1f} MiB/image (measured ÷ compiled {c['measured_over_compiled']:.2f})"
        for c in results.get("plan_check", [])
    ]
    lines += [
        f"ratio: train {r['size']}px {r['dtype']} remat {r['remat']}: cxrjax ÷ {r['peer']} "
        f"= {r['speedup']:.2f} (images/s)"
        for r in results["ratios"]
    ]
    for t in results["targets"]:
        value = "—" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"target: {t['target']}: {value}: {t['status']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cxrjax.bench.quick", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shared = {
        "--out": dict(help="results folder, e.g. benchmarks/results/h200"),
        "--batch": dict(
            default=None,
            help="batch per device at the small and full size, e.g. 64,8 on a 24 GB card "
            f"(default {GPU.small_batch},{GPU.full_batch}; smoke {SMOKE.small_batch},{SMOKE.full_batch})",
        ),
        "--prepared": dict(
            help="a `cxrjax prepare` output at the full size for the grain-fed case "
            "(default: a synthetic one made on the spot)"
        ),
        "--workers": dict(default=-1, help="grain decode processes (default: every core; smoke: 0, in-process)"),
    }
    add_arguments(parser, only=("--out", "--deadline-s", "--batch", "--prepared", "--workers"), changes=shared)
    parser.add_argument("--smoke", action="store_true", help="tiny architecture at 32 and 64 px, for a CPU check")
    args = parser.parse_args(argv)
    ensure_plugin_registered()
    show_library_logs()
    settings = SMOKE if args.smoke else GPU
    if args.batch is not None:
        if len(args.batch) != 2:
            parser.error(f"--batch takes two integers, small,full; got {','.join(map(str, args.batch))}")
        small_batch, full_batch = args.batch
        settings = dataclasses.replace(settings, small_batch=small_batch, full_batch=full_batch)
    workers = args.workers if args.workers >= 0 else (0 if args.smoke else os.cpu_count() or 1)
    command = command_line(parser, args, "python -m cxrjax.bench.quick")

    from cxrjax.bench.run import run_cases

    with tempfile.TemporaryDirectory(prefix="cxrjax-quick-") as tmp:
        prepared = str(args.prepared or "")
        if not prepared:
            try:
                prepared = synthetic_prepare(Path(tmp), settings, workers)
            except ImportError as e:  # grain's or the record libraries' wheels missing: the fed case goes
                print(f"quick: no grain-fed case: {e}")
        options = {
            **dataclasses.asdict(settings),
            "prepared": prepared,
            "workers": workers,
            "deadline_s": args.deadline_s,
        }
        results = run_cases(quick_plan(settings, prepared, workers), args.out, NAME, command, options, args.deadline_s)
    print(f"quick: {args.out / (NAME + '.md')}, every case in {args.out / (NAME + '.jsonl')}")
    for line in target_lines(results):
        print(line)
    failed = [r for key in ("measurements", "max_batch", "compiled") for r in results[key] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
