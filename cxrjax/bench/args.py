"""The benchmark arguments, defined once: `cxrjax bench` and `python -m cxrjax.bench` take
them all, `python -m cxrjax.bench.quick` the ones it shares; `command_line` writes any of
them back as the command that reproduces a run.

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


def _options() -> dict[str, dict]:
    """Every benchmark option, once: `cxrjax bench` and `python -m cxrjax.bench` take them
    all, `python -m cxrjax.bench.quick` the few it shares (`cxrjax.bench.quick.main`)."""
    return {
        "--out": dict(type=Path, required=True, help="results folder, e.g. benchmarks/results/<device>"),
        "--arch": dict(default="densenet121", help="densenet121|densenet169|densenet201|tiny"),
        "--sizes": dict(type=_ints, default=(224,), help="image sizes, e.g. 224,320,512,1024"),
        "--dtypes": dict(type=_choices(DTYPES), default=("bfloat16",), help="float32,bfloat16"),
        "--remat": dict(
            type=_remat_modes, default=("none",), help="model.remat values to measure: none,dense_layers,all"
        ),
        "--batch": dict(
            type=_ints, default=(32,), help="batch per device: one value, or one per size (e.g. 64,32,16,4)"
        ),
        "--steps": dict(type=int, default=20, help="timed steps (after 2 warm-up steps)"),
        "--peers": dict(type=_choices(PEERS), default=(), help="torch,torch_compile,keras"),
        "--memory-budget-gb": dict(
            type=float,
            default=0.0,
            help="also find the largest batch per device whose compiled step fits this many GiB",
        ),
        "--scaling": dict(action="store_true", help="also measure 1/2/4/8 devices (simulated on CPU)"),
        "--prepared": dict(
            type=Path, default=None, help="a `cxrjax prepare` output: also time the step fed by the grain pipeline"
        ),
        "--workers": dict(type=int, default=0, help="grain decode processes for --prepared"),
        "--target": dict(
            type=_targets,
            default=(),
            help="compile for these GPU targets instead of measuring here (no GPU needed; memory plan and largest "
            "batch, nothing runs): " + ", ".join(_target_keys()),
        ),
        "--target-devices": dict(type=int, default=1, help="devices of the target on one host (4 for a g5.24xlarge)"),
        "--allowance-gb": dict(
            type=float,
            default=None,
            help="GiB of each target card left out of its budget for what XLA does not plan (CUDA context, cuDNN "
            "workspace, fragmentation; default 1.5); --memory-budget-gb replaces the budget",
        ),
        "--deadline-s": dict(
            type=float,
            default=0.0,
            help="stop starting cases after this many seconds (0: none); later cases are recorded as skipped: time",
        ),
    }


def add_arguments(p: argparse.ArgumentParser, only: tuple[str, ...] = (), changes: dict | None = None) -> None:
    """The benchmark options on `p`: all of them, or `only` those named, each with the
    keyword arguments of `changes[name]` replacing the shared ones (another default or help)."""
    options = _options()
    for name in only or options:
        p.add_argument(name, **{**options[name], **(changes or {}).get(name, {})})


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, prog: str) -> str:
    """The parsed arguments written back as one complete command, to reproduce the run:
    every option of `parser` that has a value (an empty default left out)."""
    words = shlex.split(prog)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if not value and value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            words.append(action.option_strings[0])
            continue
        if isinstance(value, tuple):
            text = ",".join(map(str, value))
        else:
            text = f"{value:g}" if isinstance(value, float) else str(value)
        words += [action.option_strings[0], text]
    return shlex.join(words)


def run(parser: argparse.ArgumentParser, args: argparse.Namespace, prog: str) -> int:
    """Run the benchmark `parser` parsed into `args`; `prog` is how it was invoked (`cxrjax
    bench`, `python -m cxrjax.bench`)."""
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
    results = run_bench(options, command_line(parser, args, prog))
    print(f"bench: {args.out / (args.arch + '.md')}")
    for row in results["compiled"]:
        if row["status"] == "ok":
            print(compiled_line(row))
    failed = [r for key in RESULT_KEYS for r in results[key] if r["status"] == "failed"]
    return 1 if failed else 0
