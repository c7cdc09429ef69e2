"""What holds the compiled training step's memory at its peak, for a GPU target that need
not be present: the live buffers at the peak of XLA's buffer assignment, by the JAX
operation that made them, and how far the packed temporary allocation exceeds that peak
(fragmentation of the heap XLA packs the temporaries into).

    python benchmarks/compiled_peak.py --target a10g --size 1024 --batch 8 --remat all --out DIR

Compiles once with `--xla_dump_to` into a temporary folder (or `--dump DIR`) and writes
DIR/compiled_peak.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20


def parse_peak(live_range_text: str) -> dict:
    """The peak section of XLA's `*-live-range.txt` dump: the peak's total and, per live
    buffer, its bytes and the JAX source it was made by (from the stack-trace breakdown)."""
    total = re.search(r"Stack trace breakdown for peak usage: ([\d ]+) bytes", live_range_text)
    rows = []
    for line in live_range_text.split("Stack trace breakdown for peak usage:", 1)[-1].splitlines()[1:]:
        m = re.match(r"\s*[├└]── (.+?) \(([\d.]+)%, total: ([\d ]+) bytes, current: ([\d ]+) bytes", line)
        if m:
            rows.append({"source": m.group(1), "bytes": int(m.group(3).replace(" ", ""))})
    return {"peak_bytes": int(total.group(1).replace(" ", "")) if total else None, "buffers": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="a10g")
    p.add_argument("--arch", default="densenet121")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8, help="per device")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="all")
    p.add_argument("--top", type=int, default=12, help="buffers to list")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dump", type=Path, default=None, help="keep XLA's dump here (default: a temporary folder)")
    args = p.parse_args(argv)
    dump = args.dump or Path(tempfile.mkdtemp(prefix="cxrjax-xla-dump-"))
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*"
    ).strip()
    from cxrjax.bench.gpu_target import ensure_plugin_registered

    ensure_plugin_registered()
    from cxrjax.bench.device import library_versions
    from cxrjax.bench.gpu_target import compile_only_devices, get_target
    from cxrjax.bench.jax_case import build_steps, synthetic_host_batch, training_config
    from cxrjax.bench.memory import compiled_memory
    from cxrjax.mesh import make_mesh

    target = get_target(args.target)
    devices, versions = compile_only_devices(target, 1)
    steps = build_steps(
        training_config(args.arch, args.dtype, args.remat),
        args.size,
        make_mesh(devices),
        synthetic_host_batch(args.batch, 32)["labels"],
    )
    start = time.perf_counter()
    memory = compiled_memory(steps.train_step.lower(steps.abstract_state, steps.abstract_batch(args.batch)).compile())
    seconds = time.perf_counter() - start
    (live,) = sorted(dump.glob("*train_step*gpu_after_optimizations-live-range.txt"))[-1:]
    peak = parse_peak(live.read_text())
    live_peak = peak["peak_bytes"]
    command = shlex.join(["python", "benchmarks/compiled_peak.py", *(sys.argv[1:] if argv is None else argv)])
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "target": target.name,
        "cuda_versions": versions,
        "versions": library_versions(),
        "case": {k: getattr(args, k) for k in ("arch", "size", "batch", "dtype", "remat")},
        "compiled_memory": memory,
        "compile_s": seconds,
        "live_peak_bytes": live_peak,
        "peak_buffers": peak["buffers"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled_peak.json").write_text(json.dumps(result, indent=1) + "\n")
    b = args.batch
    lines = [
        f"# What holds the compiled peak: {args.arch} {args.size} px {args.dtype} remat {args.remat}, "
        f"batch {b}, {target.name} (compiled, not measured)",
        "",
        f"- date: {result['date']}",
        f"- command: `{command}`",
        f"- compiled for: CUDA {versions['cuda']}, cuDNN {versions['cudnn']} ({versions['plugin']})",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- compiled total {memory['total_bytes'] / MIB:.1f} MiB ({memory['total_bytes'] / MIB / b:.1f} MiB/image): "
        f"arguments {memory['argument_bytes'] / MIB:.1f} + outputs {memory['output_bytes'] / MIB:.1f} - donated "
        f"{memory['alias_bytes'] / MIB:.1f} + temporaries {memory['temp_bytes'] / MIB:.1f} MiB",
        f"- live at the peak (XLA's live-range dump, arguments included): {live_peak / MIB:.1f} MiB "
        f"({live_peak / MIB / b:.1f} MiB/image); the rest of the total is the packing of temporaries "
        "into one allocation (fragmentation) and outputs not live at the peak",
        "",
        "| live at the peak, made by | MiB | MiB/image |",
        "|---|---|---|",
    ]
    for row in peak["buffers"][: args.top]:
        lines.append(f"| `{row['source'][-140:]}` | {row['bytes'] / MIB:.1f} | {row['bytes'] / MIB / b:.2f} |")
    rest = live_peak - sum(r["bytes"] for r in peak["buffers"][: args.top])
    lines.append(
        f"| everything else ({len(peak['buffers']) - args.top} buffers) | {rest / MIB:.1f} | {rest / MIB / b:.2f} |"
    )
    (args.out / "compiled_peak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
