"""The `cxrjax bench` arguments, shared by `cxrjax bench` and `python -m cxrjax.bench`.

`python -m cxrjax.bench` exists for machines that have only the model stack (jax, flax,
optax, torch): the full `cxrjax` command also sets up `prepare`, which needs
tensorflow-datasets.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cxrjax.bench.spec import DTYPES, PEERS, RESULT_KEYS


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _choices(allowed):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v for v in text.split(",") if v)
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return values

    return parse


def _remat_modes(text: str) -> tuple[str, ...]:
    from cxrjax.models.densenet import REMAT_MODES  # lazily: `cxrjax --help` imports no flax

    return _choices(REMAT_MODES)(text)


def _target_keys() -> list[str]:
    from cxrjax.bench.gpu_target import targets

    return list(targets())


def _targets(text: str) -> tuple[str, ...]:
    return _choices(_target_keys())(text.lower())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="e.g. benchmarks/results/<device>")
    p.add_argument("--arch", default="densenet121", help="densenet121|densenet169|densenet201|tiny")
    p.add_argument("--sizes", type=_ints, default=(224,), help="image sizes, e.g. 224,320,512,1024")
    p.add_argument("--dtypes", type=_choices(DTYPES), default=("bfloat16",), help="float32,bfloat16")
    p.add_argument(
        "--remat", type=_remat_modes, default=("none",), help="model.remat values to measure: none,dense_layers,all"
    )
    p.add_argument(
        "--batch", type=_ints, default=(32,), help="batch per device: one value, or one per size (e.g. 64,32,16,4)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--peers", type=_choices(PEERS), default=(), help="torch,torch_compile,keras")
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=0.0,
        help="also find the largest batch per device whose compiled step fits this many GiB",
    )
    p.add_argument("--scaling", action="store_true", help="also measure 1/2/4/8 devices (simulated on CPU)")
    p.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="a `cxrjax prepare` output: also time the step fed by the grain pipeline",
    )
    p.add_argument("--workers", type=int, default=0, help="grain decode processes for --prepared")
    p.add_argument(
        "--target",
        type=_targets,
        default=(),
        help="compile for these GPU targets instead of measuring here (no GPU needed; memory plan and largest "
        "batch, nothing runs): " + ", ".join(_target_keys()),
    )
    p.add_argument(
        "--target-devices", type=int, default=1, help="devices of the target on one host (4 for a g5.24xlarge)"
    )
    p.add_argument(
        "--allowance-gb",
        type=float,
        default=None,
        help="GiB of each target card left out of its budget for what XLA does not plan (CUDA context, cuDNN "
        "workspace, fragmentation; default 1.5); --memory-budget-gb replaces the budget",
    )
    p.add_argument(
        "--deadline-s",
        type=float,
        default=0.0,
        help="stop starting cases after this many seconds; later cases are recorded as skipped: time",
    )


def command_line(args: argparse.Namespace, prog: str) -> str:
    """The parsed arguments written back as one complete command, to reproduce the run."""
    words = [
        *shlex.split(prog),
        "--out",
        str(args.out),
        "--arch",
        args.arch,
        "--sizes",
        ",".join(map(str, args.sizes)),
        "--dtypes",
        ",".join(args.dtypes),
        "--remat",
        ",".join(args.remat),
        "--batch",
        ",".join(map(str, args.batch)),
        "--steps",
        str(args.steps),
    ]
    if args.peers:
        words += ["--peers", ",".join(args.peers)]
    if args.memory_budget_gb:
        words += ["--memory-budget-gb", f"{args.memory_budget_gb:g}"]
    if args.scaling:
        words.append("--scaling")
    if args.prepared:
        words += ["--prepared", str(args.prepared), "--workers", str(args.workers)]
    if args.target:
        words += ["--target", ",".join(args.target), "--target-devices", str(args.target_devices)]
        if args.allowance_gb is not None:
            words += ["--allowance-gb", f"{args.allowance_gb:g}"]
    if args.deadline_s:
        words += ["--deadline-s", f"{args.deadline_s:g}"]
    return shlex.join(words)


def run(args: argparse.Namespace, prog: str) -> int:
    """Run the benchmark; `prog` is how it was invoked (`cxrjax bench`, `python -m cxrjax.bench`)."""
    from cxrjax.bench.run import BenchOptions, compiled_line, run_bench

    try:
        options = BenchOptions(
            out=args.out,
            arch=args.arch,
            sizes=args.sizes,
            dtypes=args.dtypes,
            remat=args.remat,
            batch=args.batch,
            steps=args.steps,
            peers=args.peers,
            memory_budget_gb=args.memory_budget_gb,
            scaling=args.scaling,
            prepared=str(args.prepared) if args.prepared else "",
            workers=args.workers,
            deadline_s=args.deadline_s,
            targets=args.target,
            target_devices=args.target_devices,
            **({} if args.allowance_gb is None else {"allowance_gb": args.allowance_gb}),
        )
    except ValueError as e:
        print(f"cxrjax bench: error: {e}", file=sys.stderr)
        return 2
    results = run_bench(options, command_line(args, prog))
    print(f"bench: {args.out / (args.arch + '.md')}")
    for row in results["compiled"]:
        if row["status"] == "ok":
            print(compiled_line(row))
    failed = [r for key in RESULT_KEYS for r in results[key] if r["status"] == "failed"]
    return 1 if failed else 0
